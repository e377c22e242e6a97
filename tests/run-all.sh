#!/usr/bin/env bash
# The whole test suite: formatting, proto lint, clippy, unit, integration and
# end-to-end tests. Installs what it needs: buf and grpcurl (tests/install-tools.sh), a real
# Docker Engine with locally built test images (tests/docker/start-docker.sh, needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir="$(tests/install-tools.sh)"
export OZFLEET_GRPCURL="$bin_dir/grpcurl"
echo "== Docker Engine and test images"
tests/docker/start-docker.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== buf lint proto/"
"$bin_dir/buf" lint
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
