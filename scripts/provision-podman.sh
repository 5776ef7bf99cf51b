#!/usr/bin/env bash
# Brings up Podman's Docker-compatible API for sandboxd (`runtime: podman`) and its tests, on a
# machine scripts/provision.sh has prepared (its Docker engine holds the sandbox image):
# podman installed, `podman system service` on PODMAN_SOCKET (rootful), unable to pull from any
# registry, the sandbox image loaded from the Docker engine, and the shared test networks.
# Idempotent: every step checks first.
set -euo pipefail

IMAGE="${SANDBOXD_IMAGE:-sandboxd/agent-busybox:latest}"
PODMAN_SOCKET="${PODMAN_SOCKET:-/run/podman/podman.sock}"
PODMAN_LOG="${PODMAN_LOG:-/var/log/sandboxd-podman.log}"

log() { printf '[provision-podman] %s\n' "$*" >&2; }

if ! command -v podman >/dev/null 2>&1; then
  log "installing podman"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman >/dev/null
fi

answers() { curl -sf --max-time 10 --unix-socket "$PODMAN_SOCKET" http://podman/_ping >/dev/null 2>&1; }

if ! answers; then
  log "starting podman system service on $PODMAN_SOCKET (registry traffic goes to a closed loopback port)"
  mkdir -p "$(dirname "$PODMAN_SOCKET")"
  rm -f "$PODMAN_SOCKET"
  # --time=0: never exits on its own. setsid: not a child of this script's process group.
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
    setsid nohup podman system service --time=0 "unix://$PODMAN_SOCKET" >>"$PODMAN_LOG" 2>&1 &
  for _ in $(seq 1 120); do
    answers && break
    sleep 0.5
  done
  answers || { log "podman did not come up; see $PODMAN_LOG"; tail -n 30 "$PODMAN_LOG" >&2; exit 1; }
fi

if ! podman image exists "$IMAGE"; then
  log "loading $IMAGE from the Docker engine (docker save | podman load, no registry)"
  docker save "$IMAGE" | podman load -q >/dev/null
fi

if [ "${SANDBOXD_PROVISION_TEST_NETWORK:-0}" = "1" ]; then
  for net in "${SANDBOXD_TEST_NETWORK:-sandboxd-test}" "${SANDBOXD_TEST_NETWORK_ALT:-sandboxd-test-alt}"; do
    podman network exists "$net" || podman network create "$net" >/dev/null
  done
fi
log "ready: podman $(podman version --format '{{.Server.Version}}' 2>/dev/null || podman --version), socket $PODMAN_SOCKET"
