#!/usr/bin/env bash
# deploy/compose/compose.yaml for real: Debian's docker-compose (1.29, installed when
# missing) brings up the local control plane, the gateway and a Docker node agent from the
# locally built image (tests/deploy/build-image.sh) on the project's Docker Engine; the
# gateway becomes ready (upstream connected and the node attached), a run submitted with
# curl to the control plane's loopback port completes in a task container, and
# `docker-compose down -v` leaves no container or volume behind. Run as root, after
# tests/docker/start-docker.sh. Ports are picked free on 127.0.0.1 for every run.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/deploy/lib.sh
. "$here/lib.sh"
export DEBIAN_FRONTEND=noninteractive

if ! command -v docker-compose >/dev/null; then
    echo "installing docker-compose (Debian)" >&2
    apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; }
fi

OZFLEET_IMAGE=$("$here/build-image.sh")
export OZFLEET_IMAGE
export WARP_API_KEY OZFLEET_JOIN_TOKEN DOCKER_GID
WARP_API_KEY=$(openssl rand -hex 16)
OZFLEET_JOIN_TOKEN=$(openssl rand -hex 32)
DOCKER_GID=$(stat -c %g /var/run/docker.sock)
export OZFLEET_CONTROL_PLANE_PORT OZFLEET_GATEWAY_PORT OZFLEET_ADMIN_PORT
OZFLEET_CONTROL_PLANE_PORT=$(free_port)
OZFLEET_GATEWAY_PORT=$(free_port)
OZFLEET_ADMIN_PORT=$(free_port)
export OZFLEET_WORKER_ID=compose-test-fleet
export OZFLEET_WEB_SOCKET_URL=ws://127.0.0.1:$OZFLEET_CONTROL_PLANE_PORT/api/v1/selfhosted/worker/ws
export OZFLEET_SERVER_ROOT_URL=http://127.0.0.1:$OZFLEET_CONTROL_PLANE_PORT
cp_url=$OZFLEET_SERVER_ROOT_URL

compose=(docker-compose --ansi never -p ozfleet-compose-test -f "$repo/deploy/compose/compose.yaml")
# docker-compose 1.29 talks to the daemon itself; Debian's CLI (not a newer one on PATH).
export DOCKER_HOST=unix:///var/run/docker.sock
logs() { "${compose[@]}" logs --no-color --tail=50 >&2 || true; }
down() { "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
on_exit() {
    local status=$?
    [ "$status" -eq 0 ] || logs
    down
    exit "$status"
}
trap on_exit EXIT
down

echo "compose: config check" >&2
"${compose[@]}" config -q
echo "compose: up (image $OZFLEET_IMAGE)" >&2
start=$(date +%s.%N)
"${compose[@]}" up -d 2>&1 | sed 's/^/  /' >&2

ready() {
    "${compose[@]}" exec -T gateway /usr/local/bin/ozfleet health \
        --address "127.0.0.1:$OZFLEET_ADMIN_PORT" --service ""
}
wait_until 90 "the gateway to be ready (Oz connection + one node attached)" ready
echo "compose: gateway ready $(python3 -c "import time;print(round(time.time()-$start,2))") s after up" >&2

# The node is the compose agent, with the Docker backend.
nodes=$("${compose[@]}" exec -T gateway /usr/local/bin/ozfleet nodes \
    --admin "127.0.0.1:$OZFLEET_ADMIN_PORT" --output json)
echo "$nodes" | grep -q '"compose-agent"' || { echo "FAIL: compose-agent not attached: $nodes" >&2; exit 1; }
echo "$nodes" | grep -qi 'docker' || { echo "FAIL: the node does not report the Docker backend: $nodes" >&2; exit 1; }

run=$(submit_run "$cp_url" "$WARP_API_KEY" "$OZFLEET_WORKER_ID" "sleep 1")
wait_run "$cp_url" "$WARP_API_KEY" "$run" SUCCEEDED 120 >&2
failing=$(submit_run "$cp_url" "$WARP_API_KEY" "$OZFLEET_WORKER_ID" "exit 3")
wait_run "$cp_url" "$WARP_API_KEY" "$failing" FAILED 120 >&2

# The gateway and agent run as uid 10001, read-only, with no capabilities.
user=$("$DOCKER" inspect -f '{{.Config.User}}' "$("${compose[@]}" ps -q gateway)")
[ "$user" = "10001:10001" ] || { echo "FAIL: gateway runs as '$user'" >&2; exit 1; }

down
left=$("$DOCKER" ps -aq --filter label=com.docker.compose.project=ozfleet-compose-test)
[ -z "$left" ] || { echo "FAIL: containers left after down: $left" >&2; exit 1; }
left=$("$DOCKER" volume ls -q --filter label=com.docker.compose.project=ozfleet-compose-test)
[ -z "$left" ] || { echo "FAIL: volumes left after down: $left" >&2; exit 1; }
echo "compose: PASS (run $run succeeded in a task container; down removed everything)" >&2
