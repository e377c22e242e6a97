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
# Built in the test profile: what it checks is that the benchmark runs, not its numbers,
# and this reuses the test build instead of a second, optimised one.
cargo test -p ozfleet --bench dispatch --locked -- --smoke

echo "== Deploy: image, compose, systemd units, Helm chart (tests/deploy/)"
# The binary cargo test just built goes into the image: Rust is compiled once. (A release
# build gives the published image's size; see README "Install".)
export OZFLEET_BINARY="${OZFLEET_BINARY:-$PWD/target/debug/ozfleet}"
tests/deploy/image-test.sh
tests/deploy/compose-test.sh
tests/deploy/systemd-test.sh
tests/deploy/helm-test.sh
