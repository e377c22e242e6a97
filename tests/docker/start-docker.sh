#!/usr/bin/env bash
# Starts a real Docker Engine for the Docker backend tests and builds their images.
#
# Run as root; idempotent: a daemon that already answers on /var/run/docker.sock is reused,
# packages are installed only when missing, and an image is rebuilt only when its sources
# changed (each image carries the hash of its sources in the label dev.ozfleet.source-hash).
#
#   - Debian docker.io (Engine 20.10, API 1.41), started by hand (no systemd here) with
#     --bridge=none --iptables=false: no docker0, no NAT rules, so containers have loopback
#     only; a test that must reach a server on the host uses network mode "host".
#   - runc-noneg: a runc wrapper that clamps negative oom_score_adj to 0 (this machine has no
#     CAP_SYS_RESOURCE, and runc fails on a negative value).
#   - Images, made locally with `docker import` (no registry exists; the localhost:5999
#     registry part means an accidental pull can only dial loopback):
#       localhost:5999/busybox:1          static busybox rootfs, ENV PATH=/bin
#       localhost:5999/oz-demo-sidecar:1  busybox + /entrypoint.sh (the demo agent, see
#                                         oz-demo-sidecar/entrypoint.sh) + /bin/hog (static
#                                         C memory hog); mounted at /agent it gives
#                                         /agent/entrypoint.sh and /agent/bin/hog
#
# Daemon state and logs: $RUN (default /tmp/ozfleet-docker). Stop with stop-docker.sh.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
RUN=${RUN:-/tmp/ozfleet-docker}
DOCKER=/usr/bin/docker # Debian's client, matching the daemon (a newer one may shadow it on PATH)
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$RUN"

# --- packages -------------------------------------------------------------------------------
missing=()
for pkg in docker.io busybox-static gcc libc6-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- runc wrapper ---------------------------------------------------------------------------
wrapper=/usr/local/sbin/runc-noneg
wrapper_text='#!/bin/sh
# Clamp a negative oomScoreAdj to 0 in the OCI bundle: without CAP_SYS_RESOURCE runc fails
# with "can'"'"'t get final child'"'"'s PID from pipe: EOF".
bundle=""; prev=""
for a in "$@"; do
  case "$prev" in --bundle|-b) bundle="$a";; esac
  case "$a" in --bundle=*) bundle="${a#--bundle=}";; esac
  prev="$a"
done
[ -n "$bundle" ] && [ -f "$bundle/config.json" ] && sed -i '"'"'s/"oomScoreAdj":[[:space:]]*-[0-9]*/"oomScoreAdj":0/'"'"' "$bundle/config.json"
exec /usr/sbin/runc "$@"'
if [ "$(cat "$wrapper" 2>/dev/null)" != "$wrapper_text" ]; then
    printf '%s\n' "$wrapper_text" > "$wrapper"
    chmod 0755 "$wrapper"
fi

# --- daemon ---------------------------------------------------------------------------------
if ! "$DOCKER" version >/dev/null 2>&1; then
    # dockerd turns IP forwarding on even with --iptables=false; put it back afterwards.
    forwarding=$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null || echo 1)
    # A daemon that was killed (e.g. when the session that started it ended) leaves pid
    # files behind, and dockerd refuses to start while they exist.
    for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null || true)
        # "<pid> (<comm>) <state> ...": a live dockerd/containerd keeps its file (dockerd then
        # reports the conflict); a zombie, another program or no process at all does not.
        stat=$(cat "/proc/$pid/stat" 2>/dev/null || true)
        case "$stat" in
            *"(dockerd) "[!Z]* | *"(containerd) "[!Z]*) ;;
            *) rm -f "$pidfile" ;;
        esac
    done
    nohup dockerd --add-runtime runc-noneg="$wrapper" --default-runtime=runc-noneg \
        --iptables=false --ip6tables=false --bridge=none > "$RUN/dockerd.log" 2>&1 &
    echo $! > "$RUN/dockerd.pid"
    for _ in $(seq 1 120); do
        "$DOCKER" version >/dev/null 2>&1 && break
        kill -0 "$(cat "$RUN/dockerd.pid")" 2>/dev/null || { tail -20 "$RUN/dockerd.log" >&2; exit 1; }
        sleep 0.25
    done
    "$DOCKER" version >/dev/null 2>&1 || { echo "dockerd did not answer; see $RUN/dockerd.log" >&2; exit 1; }
    [ "$forwarding" = 0 ] && echo 0 > /proc/sys/net/ipv4/ip_forward
fi

# --- images ---------------------------------------------------------------------------------
# Bump when the way images are assembled changes, so existing images get rebuilt.
recipe=2
busybox_hash=$(sha256sum /bin/busybox | cut -c1-64)

image_hash() { "$DOCKER" image inspect -f '{{index .Config.Labels "dev.ozfleet.source-hash"}}' "$1" 2>/dev/null || true; }

# busybox_rootfs DIR: a minimal root filesystem of the static busybox and its applets.
busybox_rootfs() {
    mkdir -p "$1"/{bin,tmp,etc,proc,sys,dev}
    chmod 1777 "$1/tmp"
    cp /bin/busybox "$1/bin/busybox"
    local applet
    for applet in $("$1/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$1/bin/$applet"
    done
}

# import DIR IMAGE HASH: docker import DIR as IMAGE, labelled with HASH; the build it
# replaces is deleted (unless something still uses it).
import() {
    local previous
    previous=$("$DOCKER" image inspect -f '{{.Id}}' "$2" 2>/dev/null || true)
    tar -C "$1" -c . | "$DOCKER" import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' \
        -c "LABEL dev.ozfleet.source-hash=$3" - "$2" >/dev/null
    [ -z "$previous" ] || "$DOCKER" rmi "$previous" >/dev/null 2>&1 || true
    echo "built $2"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

image=localhost:5999/busybox:1
hash=$(printf '%s\n' "$recipe" "$busybox_hash" | sha256sum | cut -c1-16)
if [ "$(image_hash "$image")" != "$hash" ]; then
    busybox_rootfs "$work/busybox"
    import "$work/busybox" "$image" "$hash"
fi

image=localhost:5999/oz-demo-sidecar:1
src="$here/oz-demo-sidecar"
hash=$(cat <(printf '%s\n' "$recipe" "$busybox_hash") "$src/entrypoint.sh" "$src/hog.c" | sha256sum | cut -c1-16)
if [ "$(image_hash "$image")" != "$hash" ]; then
    root="$work/sidecar"
    busybox_rootfs "$root"
    install -m 0755 "$src/entrypoint.sh" "$root/entrypoint.sh"
    gcc -static -O2 -o "$root/bin/hog" "$src/hog.c"
    import "$root" "$image" "$hash"
    # Sidecar volumes cached by the backend for earlier builds can never be used again.
    "$DOCKER" volume ls -q --filter "label=dev.ozfleet.sidecar-image=$image" |
        xargs -r "$DOCKER" volume rm >/dev/null 2>&1 || true
fi

"$DOCKER" version --format 'docker server {{.Server.Version}} API {{.Server.APIVersion}} ({{.Server.Os}}/{{.Server.Arch}})'
