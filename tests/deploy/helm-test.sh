#!/usr/bin/env bash
# deploy/helm/ozfleet for real (tests/deploy/helm_test.py): lint, schema refusals, install
# with wait on the project's Kubernetes v1.20 cluster, gateway Ready, Kubernetes and Docker
# node agents attached, a run completing as a Job, a config change rolling the pods,
# uninstall leaving nothing. Helm is PyPI's helm-sdkpy (Helm's Go library; Debian has no
# helm), installed with --ignore-requires-python into ~/.cache/ozfleet-helm-venv.
#
# Needs the Docker Engine (tests/docker/start-docker.sh) and the cluster
# (tests/kubernetes/start-k8s.sh): a cluster already answering at $OZFLEET_K8S_DIR
# (default /tmp/ozfleet-k8s) is used as it is, else it is started. The image is built by
# tests/deploy/build-image.sh into the node's Docker (pull policy Never). The control plane
# runs on the host, on a free loopback port. Run as root.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/deploy/lib.sh
. "$here/lib.sh"
BINARY=${OZFLEET_BINARY:-$repo/target/release/ozfleet}
VENV=${OZFLEET_HELM_VENV:-${HOME:-/root}/.cache/ozfleet-helm-venv}
K8S_DIR=${OZFLEET_K8S_DIR:-/tmp/ozfleet-k8s}

# --- Helm (helm-sdkpy) ---------------------------------------------------------------------
if ! "$VENV/bin/python" -c 'import helm_sdkpy, yaml' 2>/dev/null; then
    echo "installing helm-sdkpy into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --ignore-requires-python helm-sdkpy pyyaml >&2
fi

# --- cluster and image ------------------------------------------------------------------------
if [ "$(curl -sk https://127.0.0.1:6443/readyz 2>/dev/null)" != ok ] || [ ! -f "$K8S_DIR/kubeconfig" ]; then
    RUN="$K8S_DIR" "$repo/tests/kubernetes/start-k8s.sh" >&2
fi
export KUBECONFIG="$K8S_DIR/kubeconfig"
[ -x "$BINARY" ] || (cd "$repo" && cargo build --release --locked -p ozfleet) >&2
OZFLEET_IMAGE=$("$here/build-image.sh")
# The test sidecar with GNU tar and dash (tests/kubernetes/start-k8s.sh builds it).
"$DOCKER" image inspect localhost:5999/oz-k8s-sidecar:1 >/dev/null

# --- the local control plane on the host ------------------------------------------------------
work=$(mktemp -d)
cp_pid=""
cleanup() {
    [ -z "$cp_pid" ] || { kill "$cp_pid" 2>/dev/null; wait "$cp_pid" 2>/dev/null || true; }
    kubectl delete namespace ozfleet-helm-test --ignore-not-found --wait=false >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
# A release left by an interrupted run goes first.
if kubectl get namespace ozfleet-helm-test >/dev/null 2>&1; then
    kubectl delete namespace ozfleet-helm-test --wait=true --timeout=120s >/dev/null
fi
api_key=$(openssl rand -hex 16)
cp_port=$(free_port)
WARP_API_KEY=$api_key "$BINARY" control-plane --listen "127.0.0.1:$cp_port" \
    --database "$work/runs.db" --docker-image localhost:5999/busybox:1 \
    --sidecar-image localhost:5999/oz-k8s-sidecar:1 > "$work/control-plane.log" 2>&1 &
cp_pid=$!
wait_until 30 "the control plane" curl -s -o /dev/null "http://127.0.0.1:$cp_port/"

export OZFLEET_REPO="$repo" OZFLEET_BIN="$BINARY" OZFLEET_IMAGE OZFLEET_TEST_API_KEY="$api_key"
export OZFLEET_CP_URL="http://127.0.0.1:$cp_port"
OZFLEET_GATEWAY_PORT=$(free_port) OZFLEET_ADMIN_PORT=$(free_port) OZFLEET_METRICS_PORT=$(free_port)
export OZFLEET_GATEWAY_PORT OZFLEET_ADMIN_PORT OZFLEET_METRICS_PORT
export OZFLEET_DOCKER_GID
OZFLEET_DOCKER_GID=$(stat -c %g /var/run/docker.sock)
if ! "$VENV/bin/python" "$here/helm_test.py"; then
    echo "--- control plane log" >&2; tail -n 20 "$work/control-plane.log" >&2
    echo "--- pods" >&2; kubectl -n ozfleet-helm-test get pods -o wide >&2 || true
    for pod in $(kubectl -n ozfleet-helm-test get pods -o name 2>/dev/null); do
        echo "--- $pod" >&2; kubectl -n ozfleet-helm-test logs "$pod" --all-containers --tail=30 >&2 || true
    done
    exit 1
fi
