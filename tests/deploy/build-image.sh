#!/usr/bin/env bash
# Builds the ozfleet image from deploy/Dockerfile without any registry, for the deploy tests.
#
#   - localhost:5999/ozfleet-base:bookworm: the runtime base, made from Debian 12 packages
#     (libc6, libgcc-s1, ca-certificates: what the binary links and the CA bundle), i.e.
#     what the default base gcr.io/distroless/cc-debian12 holds; no shell. The .debs are
#     cached in ~/.cache/ozfleet-deploy.
#   - localhost:5999/ozfleet-binary:<hash>: the host-built target/release/ozfleet, stripped,
#     as /out/usr/local/bin/ozfleet (CI compiles Rust once: this is the binary the other
#     tests ran).
#   - localhost:5999/ozfleet:dev: deploy/Dockerfile built with BuildKit (Debian's Docker
#     20.10 has it built in; only the stages the result needs are built, so the from-source
#     `builder` stage and its Docker Hub image are skipped) and
#     --build-arg BASE_IMAGE=... --build-arg BINARY_IMAGE=...
#
# Idempotent: each image is rebuilt only when its inputs changed (label
# dev.ozfleet.source-hash). Prints the image name on stdout; size and compressed size on
# stderr. Needs the Docker Engine of tests/docker/start-docker.sh. Run as root.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
DOCKER=/usr/bin/docker
CACHE=${OZFLEET_DEPLOY_CACHE:-${HOME:-/root}/.cache/ozfleet-deploy}
IMAGE=${OZFLEET_IMAGE:-localhost:5999/ozfleet:dev}
BASE=localhost:5999/ozfleet-base:bookworm
BINARY=${OZFLEET_BINARY:-$repo/target/release/ozfleet}
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$CACHE/debs"

image_hash() { "$DOCKER" image inspect -f '{{index .Config.Labels "dev.ozfleet.source-hash"}}' "$1" 2>/dev/null || true; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- the runtime base, from Debian packages ---------------------------------------------------
recipe=1
packages=(libc6 libgcc-s1 ca-certificates)
if ! ls "$CACHE/debs/"libc6_*.deb "$CACHE/debs/"libgcc-s1_*.deb "$CACHE/debs/"ca-certificates_*.deb >/dev/null 2>&1; then
    (cd "$CACHE/debs" && { apt-get download "${packages[@]}" 2>/dev/null ||
        { apt-get update -qq && apt-get download "${packages[@]}"; }; }) >&2
fi
hash=$( (echo "$recipe"; cd "$CACHE/debs" && sha256sum ./*.deb) | sha256sum | cut -c1-16)
if [ "$(image_hash "$BASE")" != "$hash" ]; then
    root="$work/base"
    mkdir -p "$root"
    for deb in "$CACHE/debs/"*.deb; do dpkg-deb -x "$deb" "$root"; done
    # What ca-certificates' postinst would generate: the bundle of Mozilla's CAs.
    mkdir -p "$root/etc/ssl/certs"
    cat "$root"/usr/share/ca-certificates/mozilla/*.crt > "$root/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian" "$root/usr/share/locale"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:10001:10001:ozfleet:/var/lib/ozfleet:/sbin/nologin\n' > "$root/etc/passwd"
    printf 'root:x:0:\nnonroot:x:10001:\n' > "$root/etc/group"
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$root/etc/nsswitch.conf"
    mkdir -p "$root/tmp" "$root/root" "$root/proc" "$root/sys" "$root/dev"
    chmod 1777 "$root/tmp"
    tar -C "$root" -c . | "$DOCKER" import -c "LABEL dev.ozfleet.source-hash=$hash" - "$BASE" >/dev/null
    echo "built $BASE" >&2
fi

# --- the binary, built on the host ------------------------------------------------------------
if [ ! -x "$BINARY" ]; then
    (cd "$repo" && cargo build --release --locked -p ozfleet) >&2
fi
hash=$( (echo "$recipe"; sha256sum < "$BINARY") | sha256sum | cut -c1-16)
binary_image=localhost:5999/ozfleet-binary:$hash
if ! "$DOCKER" image inspect "$binary_image" >/dev/null 2>&1; then
    mkdir -p "$work/bin/out/usr/local/bin" "$work/bin/out/var/lib/ozfleet"
    objcopy --strip-all "$BINARY" "$work/bin/out/usr/local/bin/ozfleet"
    chmod 0755 "$work/bin/out/usr/local/bin/ozfleet"
    tar -C "$work/bin" -c . | "$DOCKER" import - "$binary_image" >/dev/null
    # Older binary images are of no use any more.
    "$DOCKER" images --format '{{.Repository}}:{{.Tag}}' localhost:5999/ozfleet-binary |
        grep -vx "$binary_image" | xargs -r "$DOCKER" rmi >/dev/null 2>&1 || true
fi

# --- the image: deploy/Dockerfile with the local base and binary ------------------------------
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
revision=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
hash=$( (echo "$recipe"; "$DOCKER" image inspect -f '{{.Id}}' "$BASE" "$binary_image";
         cat "$repo/deploy/Dockerfile"; echo "$version $revision") | sha256sum | cut -c1-16)
if [ "$(image_hash "$IMAGE")" != "$hash" ]; then
    previous=$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    # An empty context: the stages built here copy nothing from it.
    mkdir -p "$work/context"
    DOCKER_BUILDKIT=1 "$DOCKER" build -q -f "$repo/deploy/Dockerfile" \
        --build-arg BASE_IMAGE="$BASE" --build-arg BINARY_IMAGE="$binary_image" \
        --build-arg VERSION="$version" --build-arg REVISION="$revision" \
        --label dev.ozfleet.source-hash="$hash" -t "$IMAGE" "$work/context" >/dev/null
    [ -z "$previous" ] || "$DOCKER" rmi "$previous" >/dev/null 2>&1 || true
    echo "built $IMAGE" >&2
fi
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
compressed=$("$DOCKER" save "$IMAGE" | gzip | wc -c)
echo "image $IMAGE: $((size / 1000000)) MB, $((compressed / 1000000)) MB compressed (docker save | gzip)" >&2
echo "$IMAGE"
