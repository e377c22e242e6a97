#!/usr/bin/env bash
# Builds a real Kubernetes v1.20.2 control plane and kubelet (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet) from Debian's own `kubernetes` source
# package, for the Kubernetes backend tests.
#
# Run as root. Cached OUTSIDE the repository: the binaries land in $K8S_CACHE/bin (default
# ~/.cache/ozfleet-k8s/bin) and a machine that built once reuses them (the script exits at
# once). A cold build takes ~10 minutes on 2 cores and ~3 GB of scratch space, which is
# removed afterwards.
#
# Also installs (from Debian) etcd-server, and kubectl when missing, which start-k8s.sh needs.
#
# Why the source package: bookworm ships no kube-apiserver/kubelet binaries, but its
# `kubernetes` source package (1.20.5+really1.20.2) is the full upstream tree with vendor/,
# and builds offline with Debian's Go 1.19.
set -euo pipefail

K8S_CACHE=${K8S_CACHE:-${HOME:-/root}/.cache/ozfleet-k8s}
PREFIX="$K8S_CACHE"
WORK=${WORK:-$K8S_CACHE/src}
export DEBIAN_FRONTEND=noninteractive

need=()
for pkg in etcd-server etcd-client openssl curl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
command -v kubectl >/dev/null 2>&1 || need+=(kubernetes-client)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ -x "$PREFIX/bin/kube-apiserver" ] && [ -x "$PREFIX/bin/kubelet" ] &&
    [ -x "$PREFIX/bin/kube-controller-manager" ] && [ -x "$PREFIX/bin/kube-scheduler" ]; then
    echo "kubernetes already built in $PREFIX/bin"
    exit 0
fi

if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/ &&
    ! grep -qs '^deb-src' /etc/apt/sources.list; then
    cat > /etc/apt/sources.list.d/debian-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq
apt-get install -y -qq golang-go rsync jq make golang-github-modern-go-reflect2-dev dpkg-dev >/dev/null

started=$(date +%s)
mkdir -p "$WORK"
cd "$WORK"
ls -d kubernetes-1.20*/ >/dev/null 2>&1 || apt-get source -qq kubernetes
cd "$(ls -d kubernetes-1.20*/ | head -1)"
# Go 1.19 with the vendored reflect2 v1.0.1 makes the apiserver panic on every JSON decode of
# a map; Debian's reflect2 1.0.2 fixes it.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
find vendor/github.com/modern-go/reflect2 -name '*_test.go' -delete
export CGO_ENABLED=0 GOPROXY=off GOFLAGS= HOME=${HOME:-/root} KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet"
mkdir -p "$PREFIX/bin.tmp"
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager _output/bin/kube-scheduler \
    _output/bin/kubelet "$PREFIX/bin.tmp/"
rm -rf "$PREFIX/bin"
mv "$PREFIX/bin.tmp" "$PREFIX/bin"
cd /
rm -rf "$WORK" "${HOME:-/root}/go/pkg" 2>/dev/null || true
"$PREFIX/bin/kube-apiserver" --version
echo "built in $(( $(date +%s) - started )) s" >&2
