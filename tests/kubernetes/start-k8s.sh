#!/usr/bin/env bash
# Starts a real Kubernetes v1.20 cluster on 127.0.0.1 for the Kubernetes backend tests:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet on the
# project's Docker Engine (tests/docker/start-docker.sh must have run), then prepares what
# the tests use. Run as root. Binaries come from build-k8s.sh (cached in
# ~/.cache/ozfleet-k8s, built when missing). Every start is a fresh, empty cluster.
#
# Prepared in $RUN (default /tmp/ozfleet-k8s), which the tests find via OZFLEET_K8S_DIR:
#   kubeconfig          cluster admin (tests use it to look at and set up the cluster only)
#   agent-kubeconfig    the ServiceAccount ozfleet-agent of namespace ozfleet-test, bound
#                       to the Role in deploy/kubernetes/rbac.yaml: what the agent runs with
#   denied-kubeconfig   the ServiceAccount ozfleet-denied, with no rights at all
#   namespace           the test namespace (ozfleet-test)
# Local images (no registry exists; an accidental pull can only dial loopback):
#   localhost:5999/pause:1           pod sandbox: busybox sleeping until SIGTERM/SIGINT
#   localhost:5999/oz-k8s-sidecar:1  localhost:5999/oz-demo-sidecar:1 plus GNU tar and
#                                    dash as /bin/sh, which the sidecar copy script needs
#
# Network: every component listens on 127.0.0.1 only; the kubelet runs with
# AWS_EC2_METADATA_DISABLED=true so it never dials the cloud metadata address.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
K8S_CACHE=${K8S_CACHE:-${HOME:-/root}/.cache/ozfleet-k8s}
K8S_BIN=${K8S_BIN:-$K8S_CACHE/bin}
RUN=${RUN:-/tmp/ozfleet-k8s}
NAMESPACE=ozfleet-test
DOCKER=/usr/bin/docker

"$here/build-k8s.sh" >&2
"$here/stop-k8s.sh" >/dev/null 2>&1 || true

# --- images -----------------------------------------------------------------------------
image_hash() { "$DOCKER" image inspect -f '{{index .Config.Labels "dev.ozfleet.source-hash"}}' "$1" 2>/dev/null || true; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

image=localhost:5999/pause:1
pause_cmd='CMD ["/bin/sh","-c","trap \"exit 0\" TERM INT; sleep 2147483647 & wait"]'
hash=$(printf '%s\n' "$("$DOCKER" image inspect -f '{{.Id}}' localhost:5999/busybox:1)" "$pause_cmd" | sha256sum | cut -c1-16)
if [ "$(image_hash "$image")" != "$hash" ]; then
    container=$("$DOCKER" create localhost:5999/busybox:1)
    "$DOCKER" export "$container" | "$DOCKER" import -c 'ENV PATH=/bin' -c "$pause_cmd" \
        -c "LABEL dev.ozfleet.source-hash=$hash" - "$image" >/dev/null
    "$DOCKER" rm "$container" >/dev/null
    echo "built $image" >&2
fi

image=localhost:5999/oz-k8s-sidecar:1
base=localhost:5999/oz-demo-sidecar:1
hash=$(printf '%s\n' "$("$DOCKER" image inspect -f '{{.Id}}' "$base")" "$(sha256sum /bin/tar /bin/dash)" 2 | sha256sum | cut -c1-16)
if [ "$(image_hash "$image")" != "$hash" ]; then
    root="$work/sidecar"
    mkdir -p "$root"
    container=$("$DOCKER" create "$base")
    "$DOCKER" export "$container" | tar -C "$root" -x
    "$DOCKER" rm "$container" >/dev/null
    rm -f "$root/bin/sh" "$root/bin/tar"
    cp /bin/dash "$root/bin/sh"
    cp /bin/tar "$root/bin/tar"
    for lib in $( (ldd /bin/tar; ldd /bin/dash) | grep -o '/[^ ]*' | sort -u); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    tar -C "$root" -c . | "$DOCKER" import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' \
        -c "LABEL dev.ozfleet.source-hash=$hash" - "$image" >/dev/null
    echo "built $image" >&2
fi

# --- cluster ----------------------------------------------------------------------------
mkdir -p "$RUN/pki"
cd "$RUN"
if [ ! -f pki/sa.key ]; then
    openssl genrsa -out pki/sa.key 2048 2>/dev/null
    openssl rsa -in pki/sa.key -pubout -out pki/sa.pub 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -keyout pki/ca.key -out pki/ca.crt -days 3650 -subj /CN=ozfleet-test-ca 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout pki/apiserver.key -out pki/apiserver.csr -subj /CN=kube-apiserver 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default\n' > pki/ext.cnf
    openssl x509 -req -in pki/apiserver.csr -CA pki/ca.crt -CAkey pki/ca.key -CAcreateserial \
        -out pki/apiserver.crt -days 3650 -extfile pki/ext.cnf 2>/dev/null
    echo "$(openssl rand -hex 24),admin,admin,\"system:masters\"" > pki/tokens.csv
    chmod 0600 pki/tokens.csv pki/*.key
fi
admin_token=$(cut -d, -f1 pki/tokens.csv)

kubeconfig() { # FILE TOKEN [NAMESPACE]
    umask 077
    cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$RUN/pki/ca.crt"}}]
users: [{name: user, user: {token: "$2"}}]
contexts: [{name: local, context: {cluster: local, user: user, namespace: "${3:-default}"}}]
current-context: local
KC
}
kubeconfig "$RUN/kubeconfig" "$admin_token"
echo "nameserver 127.0.0.1" > resolv.conf
rm -rf "$RUN/etcd" "$RUN/kubelet"

launch() { # NAME COMMAND...
    local name=$1; shift
    nohup "$@" > "$RUN/$name.log" 2>&1 &
    echo $! > "$RUN/$name.pid"
}
wait_for() { # WHAT TRIES COMMAND...
    local what=$1 tries=$2; shift 2
    for _ in $(seq 1 "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    echo "$what did not come up; logs in $RUN" >&2
    exit 1
}

launch etcd etcd --name local --data-dir "$RUN/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster local=http://127.0.0.1:2380
wait_for etcd 60 curl -sf http://127.0.0.1:2379/health

launch apiserver "$K8S_BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 --secure-port=6443 --tls-cert-file=pki/apiserver.crt \
    --tls-private-key-file=pki/apiserver.key --client-ca-file=pki/ca.crt --token-auth-file=pki/tokens.csv \
    --service-account-key-file=pki/sa.pub --service-account-signing-key-file=pki/sa.key \
    --service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.96.0.0/24 \
    --authorization-mode=RBAC --endpoint-reconciler-type=none --feature-gates=TTLAfterFinished=true
readyz() { [ "$(curl -sk https://127.0.0.1:6443/readyz)" = ok ]; }
wait_for kube-apiserver 240 readyz

launch kcm "$K8S_BIN/kube-controller-manager" --kubeconfig="$RUN/kubeconfig" \
    --service-account-private-key-file=pki/sa.key --root-ca-file=pki/ca.crt \
    --use-service-account-credentials=false --leader-elect=false --bind-address=127.0.0.1 --port=0 \
    --controllers='*' --feature-gates=TTLAfterFinished=true
launch sched "$K8S_BIN/kube-scheduler" --kubeconfig="$RUN/kubeconfig" --leader-elect=false \
    --bind-address=127.0.0.1 --port=0

mkdir -p "$RUN/kubelet"
# Node name "localhost" so apiserver -> kubelet (logs) dials localhost:10250.
launch kubelet env AWS_EC2_METADATA_DISABLED=true "$K8S_BIN/kubelet" --kubeconfig="$RUN/kubeconfig" \
    --root-dir="$RUN/kubelet" --hostname-override=localhost --container-runtime=docker \
    --docker-endpoint=unix:///var/run/docker.sock --pod-infra-container-image=localhost:5999/pause:1 \
    --cgroup-driver=cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= --fail-swap-on=false \
    --oom-score-adj=0 --address=127.0.0.1 --read-only-port=0 --healthz-bind-address=127.0.0.1 \
    --resolv-conf="$RUN/resolv.conf" --image-gc-high-threshold=100 --eviction-hard=

export KUBECONFIG="$RUN/kubeconfig"
node_ready() {
    kubectl get node localhost -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -q True
}
wait_for "node localhost" 240 node_ready

# --- namespace, RBAC, tokens ------------------------------------------------------------
kubectl create namespace "$NAMESPACE" >/dev/null
wait_for "default ServiceAccount" 120 kubectl -n "$NAMESPACE" get sa default
kubectl apply -n "$NAMESPACE" -f "$repo/deploy/kubernetes/rbac.yaml" >/dev/null
kubectl create -n "$NAMESPACE" serviceaccount ozfleet-denied >/dev/null
sa_token() { # SERVICEACCOUNT: the token of its (1.20: auto-created) secret
    local secret=""
    for _ in $(seq 1 120); do
        secret=$(kubectl -n "$NAMESPACE" get sa "$1" -o jsonpath='{.secrets[0].name}' 2>/dev/null || true)
        [ -n "$secret" ] && break
        sleep 0.5
    done
    [ -n "$secret" ] || { echo "no token secret for $1" >&2; exit 1; }
    kubectl -n "$NAMESPACE" get secret "$secret" -o jsonpath='{.data.token}' | base64 -d
}
kubeconfig "$RUN/agent-kubeconfig" "$(sa_token ozfleet-agent)" "$NAMESPACE"
kubeconfig "$RUN/denied-kubeconfig" "$(sa_token ozfleet-denied)" "$NAMESPACE"
echo "$NAMESPACE" > "$RUN/namespace"
echo "OZFLEET_K8S_DIR=$RUN"
