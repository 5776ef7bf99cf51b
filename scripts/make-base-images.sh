#!/usr/bin/env bash
# Makes the two base images the Dockerfile needs, locally, without any registry:
#   sandboxd/build-toolchain:local — Debian (debootstrap from the Debian package mirror) with gcc
#                                 and this machine's Rust toolchain (made once)
#   sandboxd/build-base:local   — that plus this machine's current crate cache, so the build runs
#                                 offline (refreshed on every run: Cargo.lock may have changed)
#   sandboxd/runtime-base:local — only the shared libraries the sandboxd binary links against,
#                                 taken from this machine, plus /etc/passwd with a non-root user
# Then: docker build --build-arg BUILDER_IMAGE=sandboxd/build-base:local \
#         --build-arg RUNTIME_IMAGE=sandboxd/runtime-base:local --build-arg CARGO_FLAGS=--offline .
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[base-images] %s\n' "$*" >&2; }
work="$(mktemp -d /var/tmp/sandboxd-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT

if ! docker image inspect sandboxd/runtime-base:local >/dev/null 2>&1; then
  log "runtime base from this machine's libc"
  root="$work/runtime"
  mkdir -p "$root/etc" "$root/tmp" "$root/var/lib/sandboxd" "$root/lib64" "$root/lib/x86_64-linux-gnu"
  for lib in libc.so.6 libm.so.6 libgcc_s.so.1; do
    cp -L "/lib/x86_64-linux-gnu/$lib" "$root/lib/x86_64-linux-gnu/"
  done
  cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
  printf 'root:x:0:0:root:/:/nonexistent\nsandboxd:x:10001:10001:sandboxd:/var/lib/sandboxd:/nonexistent\n' >"$root/etc/passwd"
  printf 'root:x:0:\nsandboxd:x:10001:\n' >"$root/etc/group"
  chmod 1777 "$root/tmp"
  chown 10001:10001 "$root/var/lib/sandboxd"
  tar -C "$root" -c . | docker import - sandboxd/runtime-base:local >/dev/null
fi

if ! docker image inspect sandboxd/build-toolchain:local >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -qq; apt-get install -y -qq debootstrap >/dev/null; }
  log "build base: debootstrap bookworm (a few minutes)"
  root="$work/build"
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  toolchain="$(rustc --print sysroot)"
  log "adding the Rust toolchain from $toolchain"
  mkdir -p "$root/usr/local/rust" "$root/usr/local/cargo"
  cp -a "$toolchain/." "$root/usr/local/rust/"
  tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV CARGO_HOME=/usr/local/cargo' \
    - sandboxd/build-toolchain:local >/dev/null
fi

log "build base: the toolchain image plus the current crate cache"
(cd "$(dirname "$0")/.." && cargo fetch --locked >/dev/null)
ctx="$work/crates"
mkdir -p "$ctx"
cp -a "${CARGO_HOME:-$HOME/.cargo}/registry" "$ctx/registry"
printf 'FROM sandboxd/build-toolchain:local\nCOPY registry /usr/local/cargo/registry\n' >"$ctx/Dockerfile"
docker build -q -t sandboxd/build-base:local "$ctx" >/dev/null
log "ready: sandboxd/build-base:local, sandboxd/runtime-base:local"
