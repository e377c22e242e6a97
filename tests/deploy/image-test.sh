#!/usr/bin/env bash
# The image of deploy/Dockerfile (built by tests/deploy/build-image.sh): OCI labels, user
# 10001, no shell, the binary as entrypoint; its size (docker save | gzip); and the
# gateway's start-up: from `docker run` to the admin port answering gRPC health `liveness`
# SERVING and to readiness ("" SERVING: connected to a local control plane and a node
# attached). Prints the numbers; fails above the targets (40 MB compressed, 1 s to live).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/deploy/lib.sh
. "$here/lib.sh"
BINARY=${OZFLEET_BINARY:-$repo/target/release/ozfleet}
image=$("$here/build-image.sh" 2>/dev/null)

fail() { echo "FAIL: $*" >&2; exit 1; }
inspect() { "$DOCKER" image inspect -f "$1" "$image"; }
[ "$(inspect '{{.Config.User}}')" = "10001:10001" ] || fail "image user is $(inspect '{{.Config.User}}')"
[ "$(inspect '{{json .Config.Entrypoint}}')" = '["/usr/local/bin/ozfleet"]' ] || fail "entrypoint $(inspect '{{json .Config.Entrypoint}}')"
for label in version source revision; do
    value=$(inspect "{{index .Config.Labels \"org.opencontainers.image.$label\"}}")
    [ -n "$value" ] || fail "no org.opencontainers.image.$label label"
done
if "$DOCKER" run --rm --network none --entrypoint /bin/sh "$image" -c true >/dev/null 2>&1; then
    fail "the image has a shell"
fi
version=$("$DOCKER" run --rm --network none "$image" --version)
[ "$version" = "ozfleet $(inspect '{{index .Config.Labels "org.opencontainers.image.version"}}')" ] ||
    fail "version $version does not match the label"
compressed=$("$DOCKER" save "$image" | gzip | wc -c)
size=$(inspect '{{.Size}}')

# --- start-up -------------------------------------------------------------------------------
work=$(mktemp -d)
name=ozfleet-image-test-$$
cp_pid=""
cleanup() {
    "$DOCKER" rm -f "$name" "$name-agent" >/dev/null 2>&1 || true
    [ -z "$cp_pid" ] || { kill "$cp_pid" 2>/dev/null; wait "$cp_pid" 2>/dev/null || true; }
    rm -rf "$work"
}
trap cleanup EXIT
api_key=$(openssl rand -hex 16)
token=$(openssl rand -hex 32)
cp_port=$(free_port) gateway_port=$(free_port) admin_port=$(free_port)
WARP_API_KEY=$api_key "$BINARY" control-plane --listen "127.0.0.1:$cp_port" \
    --database "$work/runs.db" > "$work/control-plane.log" 2>&1 &
cp_pid=$!
wait_until 30 "the control plane" curl -s -o /dev/null "http://127.0.0.1:$cp_port/"

now_ms() { date +%s%3N; }
start=$(now_ms)
"$DOCKER" run -d --name "$name" --network host -e WARP_API_KEY="$api_key" -e OZFLEET_JOIN_TOKEN="$token" \
    -e OTEL_METRICS_EXPORTER=none "$image" gateway --worker-id image-test \
    --listen "127.0.0.1:$gateway_port" --admin-listen "127.0.0.1:$admin_port" \
    --web-socket-url "ws://127.0.0.1:$cp_port/api/v1/selfhosted/worker/ws" \
    --server-root-url "http://127.0.0.1:$cp_port" >/dev/null
until "$BINARY" health --address "127.0.0.1:$admin_port" --service liveness --timeout 1 >/dev/null 2>&1; do
    [ $(($(now_ms) - start)) -lt 20000 ] || fail "the gateway did not come up: $("$DOCKER" logs "$name" 2>&1 | tail -5)"
    sleep 0.01
done
live=$(($(now_ms) - start))
# Readiness also needs a node: one agent container (Direct backend, nothing runs).
agent_start=$(now_ms)
"$DOCKER" run -d --name "$name-agent" --network host -e OZFLEET_JOIN_TOKEN="$token" "$image" agent \
    --gateway "http://127.0.0.1:$gateway_port" --backend direct --state-dir /tmp/agent \
    --workspace-root /tmp/workspaces --oz-path /usr/local/bin/ozfleet >/dev/null
wait_until 20 "gateway readiness" "$BINARY" health --address "127.0.0.1:$admin_port" --service "" --timeout 1 || { "$DOCKER" logs "$name-agent" 2>&1 | tail -5 >&2; exit 1; }
ready=$(($(now_ms) - agent_start))

echo "image $image: $((size / 1000000)) MB, $(awk "BEGIN{printf \"%.1f\", $compressed/1000000}") MB compressed; gateway live ${live} ms after docker run (ready ${ready} ms after docker run of a node agent)" >&2
[ "$compressed" -lt 40000000 ] || fail "image is $compressed bytes compressed (target < 40 MB)"
[ "$live" -lt 1000 ] || fail "gateway took ${live} ms to serve health (target < 1 s)"
echo "image: PASS" >&2
