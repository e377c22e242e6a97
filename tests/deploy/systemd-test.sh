#!/usr/bin/env bash
# deploy/systemd units:
#   1. `systemd-analyze verify` is clean (no output, exit 0); the package is installed when
#      missing; ExecStart points at a temporary copy of the binary, which verify requires.
#   2. Their command lines work: this machine has no systemd as PID 1, so each ExecStart is
#      run the way systemd would run it (`$$` -> `$`; `%d` and $CREDENTIALS_DIRECTORY -> a
#      per-unit credentials directory filled from its LoadCredential= lines; Environment=
#      and the EnvironmentFile loaded; /etc/ozfleet, /var/lib/ozfleet* and the ports moved
#      to a temporary tree on 127.0.0.1) against a local control plane, with the fleet's
#      certificates made by `ozfleet certs` (mTLS on the node link, as the units configure
#      it); a run must succeed on the agent (Direct backend).
# The hardening directives themselves are checked by verify only (they need systemd).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/deploy/lib.sh
. "$here/lib.sh"
BINARY=${OZFLEET_BINARY:-$repo/target/release/ozfleet}
export DEBIAN_FRONTEND=noninteractive

if ! command -v systemd-analyze >/dev/null; then
    echo "installing systemd (for systemd-analyze)" >&2
    apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null; }
fi
[ -x "$BINARY" ] || (cd "$repo" && cargo build --release --locked -p ozfleet) >&2

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
cp "$BINARY" "$work/ozfleet"

# --- 1. systemd-analyze verify ---------------------------------------------------------------
mkdir -p "$work/units"
for unit in "$repo"/deploy/systemd/*.service; do
    sed "s#/usr/local/bin/ozfleet#$work/ozfleet#g" "$unit" > "$work/units/$(basename "$unit")"
done
out=$(cd "$work/units" && systemd-analyze verify --man=no ./*.service 2>&1) || {
    echo "FAIL: systemd-analyze verify: $out" >&2
    exit 1
}
if [ -n "$out" ]; then
    echo "FAIL: systemd-analyze verify is not clean:" >&2
    echo "$out" >&2
    exit 1
fi
echo "systemd: verify clean ($(systemd-analyze --version | head -1))" >&2
for directive in NoNewPrivileges=yes ProtectSystem=strict PrivateTmp=yes ProtectHome=yes LoadCredential=; do
    for unit in "$repo"/deploy/systemd/*.service; do
        grep -q "^$directive" "$unit" || { echo "FAIL: $unit lacks $directive" >&2; exit 1; }
    done
done
grep -q '^DynamicUser=yes' "$repo/deploy/systemd/ozfleet-gateway.service"
grep -q '^StateDirectory=ozfleet-gateway' "$repo/deploy/systemd/ozfleet-gateway.service"
grep -q '^StateDirectory=ozfleet/agent' "$repo/deploy/systemd/ozfleet-agent.service"

# --- 2. the command lines, run as systemd would ----------------------------------------------
cp_port=$(free_port)
gateway_port=$(free_port)
admin_port=$(free_port)
etc="$work/etc/ozfleet"
state="$work/var/lib/ozfleet"
mkdir -p "$etc/credentials" "$etc/tls" "$state" "$work/oz-workspaces"
api_key=$(openssl rand -hex 16)
printf %s "$api_key" > "$etc/credentials/warp-api-key"
openssl rand -hex 32 > "$etc/credentials/join-token"
chmod 0600 "$etc/credentials"/*
"$work/ozfleet" certs ca --dir "$etc/tls" >/dev/null
"$work/ozfleet" certs gateway --dir "$etc/tls" --ip 127.0.0.1 >/dev/null
"$work/ozfleet" certs node --dir "$etc/tls" --node-id systemd-node >/dev/null
mv "$etc/tls/node-systemd-node.pem" "$etc/tls/node.pem"
mv "$etc/tls/node-systemd-node-key.pem" "$etc/tls/node-key.pem"
ln -s "$work/ozfleet" "$work/oz-demo-agent"
cat > "$etc/worker.yaml" <<YAML
worker_id: systemd-test-fleet
max_concurrent_tasks: 2
backend:
  direct:
    workspace_root: $work/oz-workspaces
    oz_path: $work/oz-demo-agent
YAML
cat > "$etc/gateway.env" <<ENV
# Quoted: the one EnvironmentFile syntax systemd and a shell read alike.
OZFLEET_GATEWAY_ARGS="--web-socket-url ws://127.0.0.1:$cp_port/api/v1/selfhosted/worker/ws --server-root-url http://127.0.0.1:$cp_port"
ENV
cat > "$etc/agent.env" <<ENV
OZFLEET_GATEWAY=https://127.0.0.1:$gateway_port
OZFLEET_AGENT_ARGS="--name systemd-agent --label deploy=systemd"
ENV

# rewrite: the unit's paths and ports moved into the temporary tree.
rewrite() {
    sed -e "s#/usr/local/bin/ozfleet#$work/ozfleet#g" -e "s#/etc/ozfleet#$etc#g" \
        -e "s#/var/lib/ozfleet#$state#g" \
        -e "s#0\.0\.0\.0:7070#127.0.0.1:$gateway_port#" -e "s#127\.0\.0\.1:7071#127.0.0.1:$admin_port#"
}
# run_unit UNIT ENVFILE LOG: starts the unit's ExecStart in the background as systemd
# would: its credentials, Environment= lines and EnvironmentFile.
run_unit() {
    local unit=$1 creds command environment name path
    creds="$work/credentials/$(basename "$unit" .service)"
    mkdir -p "$creds"
    while IFS=: read -r name path; do
        cp "$path" "$creds/$name"
    done < <(sed -n 's/^LoadCredential=//p' "$unit" | rewrite)
    chmod 0400 "$creds"/*
    command=$(sed -n 's/^ExecStart=//p' "$unit" | sed -e 's/\$\$/$/g' -e "s#%d#$creds#g" | rewrite)
    environment=$(sed -n 's/^Environment=//p' "$unit")
    (
        set -a
        [ -z "$environment" ] || eval "$environment"
        # shellcheck disable=SC1090
        . "$2"
        set +a
        export CREDENTIALS_DIRECTORY="$creds"
        eval "exec $command"
    ) > "$3" 2>&1 &
    pids+=($!)
}

WARP_API_KEY=$api_key "$work/ozfleet" control-plane --listen "127.0.0.1:$cp_port" \
    --database "$work/runs.db" > "$work/control-plane.log" 2>&1 &
pids+=($!)
run_unit "$repo/deploy/systemd/ozfleet-gateway.service" "$etc/gateway.env" "$work/gateway.log"
run_unit "$repo/deploy/systemd/ozfleet-agent.service" "$etc/agent.env" "$work/agent.log"

ready() { "$work/ozfleet" health --address "127.0.0.1:$admin_port" --service ""; }
if ! wait_until 60 "the gateway of ozfleet-gateway.service to be ready" ready; then
    for f in "$work"/*.log; do echo "== $f"; tail -n 20 "$f"; done >&2
    exit 1
fi
[ "$(cat "$state/agent/node-id" 2>/dev/null)" = systemd-node ] ||
    { echo "FAIL: the agent did not keep its certificate's node id in its StateDirectory" >&2; exit 1; }
[ -n "$(ls -A "$state-gateway" 2>/dev/null)" ] ||
    { echo "FAIL: the gateway keeps no journal in its StateDirectory" >&2; exit 1; }
grep -q 'node_tls=true' "$work/gateway.log" || { echo "FAIL: the node link is not TLS" >&2; exit 1; }
cp_url=http://127.0.0.1:$cp_port
run=$(submit_run "$cp_url" "$api_key" systemd-test-fleet "sleep 1")
wait_run "$cp_url" "$api_key" "$run" SUCCEEDED 60 >&2 || { for f in "$work"/*.log; do echo "== $f"; tail -n 20 "$f"; done >&2; exit 1; }
if grep -q "$api_key" "$work/gateway.log" "$work/agent.log"; then
    echo "FAIL: the API key appears in a log" >&2
    exit 1
fi
echo "systemd: PASS (verify clean; gateway + agent from the units' ExecStart, mTLS node link, ran run $run)" >&2
