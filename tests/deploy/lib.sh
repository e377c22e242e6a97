# Shared helpers of the deploy tests (sourced).
# shellcheck shell=bash

# Debian's client, matching the daemon (a newer one may shadow it on PATH).
export DOCKER=/usr/bin/docker

# free_port: a TCP port nothing listens on at 127.0.0.1 right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_until SECONDS WHAT COMMAND...: run COMMAND every 0.2 s until it succeeds.
wait_until() {
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "FAIL: timed out after ${seconds}s waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

# submit_run URL API_KEY WORKER_ID PROMPT: prints the new run's id.
submit_run() {
    curl -sf -H "Authorization: Bearer $2" -H 'Content-Type: application/json' \
        -d "{\"prompt\":\"$4\",\"config\":{\"worker_host\":\"$3\"}}" "$1/api/v1/agent/runs" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])'
}

# run_state URL API_KEY RUN_ID: prints the run's state.
run_state() {
    curl -sf -H "Authorization: Bearer $2" "$1/api/v1/agent/runs/$3" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'
}

# wait_run URL API_KEY RUN_ID STATE SECONDS: waits for a terminal state, fails unless STATE.
wait_run() {
    local deadline=$((SECONDS + $5)) state=""
    while [ "$SECONDS" -lt "$deadline" ]; do
        state=$(run_state "$1" "$2" "$3" || true)
        case "$state" in
            SUCCEEDED | FAILED | CANCELLED | ERROR) break ;;
        esac
        sleep 0.5
    done
    if [ "$state" != "$4" ]; then
        echo "FAIL: run $3 ended as '${state:-<none>}', expected $4" >&2
        curl -s -H "Authorization: Bearer $2" "$1/api/v1/agent/runs/$3" >&2 || true
        echo >&2
        return 1
    fi
    echo "run $3: $state"
}
