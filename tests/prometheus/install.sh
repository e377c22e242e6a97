#!/usr/bin/env bash
# Debian's Prometheus (server and promtool) and curl, for the metrics end-to-end tests and
# the alert rules check. Idempotent; needs root (apt).
set -euo pipefail
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v promtool >/dev/null || missing+=(prometheus)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
# The package may start a server of its own on systems with an init; the tests start
# their own on free loopback ports and need no other.
prometheus --version 2>&1 | head -n 1 >&2
