#!/usr/bin/env bash
# Builds the sandboxd image on this machine without a registry (local base images, offline
# crates), then checks it: the binary runs as non-root and validates the shipped config.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/provision.sh
scripts/make-base-images.sh
docker build \
  --build-arg BUILDER_IMAGE=sandboxd/build-base:local \
  --build-arg RUNTIME_IMAGE=sandboxd/runtime-base:local \
  --build-arg CARGO_FLAGS=--offline \
  -t sandboxd:local .
docker run --rm sandboxd:local --version
docker run --rm --entrypoint /usr/local/bin/sandboxd sandboxd:local check-config >/dev/null
user="$(docker image inspect -f '{{.Config.User}}' sandboxd:local)"
[ "$user" = "sandboxd" ] || { echo "image runs as '$user', expected sandboxd" >&2; exit 1; }
echo "sandboxd:local built and checked"
