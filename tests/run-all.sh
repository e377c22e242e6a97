#!/usr/bin/env bash
# The whole test suite: formatting, proto lint, clippy, unit, integration and
# end-to-end tests. Installs what it needs: buf and grpcurl (tests/install-tools.sh), a real
# Docker Engine with locally built test images (tests/docker/start-docker.sh, needs root),
# Debian's Prometheus and promtool (tests/prometheus/install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir="$(tests/install-tools.sh)"
export OZFLEET_GRPCURL="$bin_dir/grpcurl"
echo "== Docker Engine and test images"
tests/docker/start-docker.sh
echo "== Kubernetes v1.20 cluster on 127.0.0.1 (built once into ~/.cache/ozfleet-k8s)"
trap 'tests/kubernetes/stop-k8s.sh' EXIT
tests/kubernetes/start-k8s.sh
export OZFLEET_K8S_DIR=/tmp/ozfleet-k8s

echo "== Prometheus (Debian) for the metrics tests; alert rules check"
tests/prometheus/install.sh
promtool check rules deploy/prometheus/alerts.yaml

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== buf lint proto/"
"$bin_dir/buf" lint
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== dispatch benchmark, smoke run (seconds, no thresholds; the full run: BENCHMARKS.md)"
cargo bench -p ozfleet --bench dispatch --locked -- --smoke
