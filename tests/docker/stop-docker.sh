#!/usr/bin/env bash
# Stops the Docker Engine started by start-docker.sh (only that one: it goes by the pid
# file in $RUN). Images, volumes and containers stay in /var/lib/docker for the next start.
set -uo pipefail
RUN=${RUN:-/tmp/ozfleet-docker}
[ -f "$RUN/dockerd.pid" ] || exit 0
pid=$(cat "$RUN/dockerd.pid")
if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 120); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    kill -0 "$pid" 2>/dev/null && echo "dockerd ($pid) still running after 30 s" >&2
fi
rm -f "$RUN/dockerd.pid"
