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

# Containers the tests make themselves (not through sandboxd, which sets its own limits) need
# limits within the host's hard ones too: Podman's defaults exceed them here.
conf=/etc/containers/containers.conf
if ! grep -q '^default_ulimits' "$conf" 2>/dev/null; then
  nofile=$(( $(ulimit -Hn) < 65536 ? $(ulimit -Hn) : 65536 ))
  nproc=$(( $(ulimit -Hu) < 32768 ? $(ulimit -Hu) : 32768 ))
  mkdir -p /etc/containers
  if grep -q '^\[containers\]' "$conf" 2>/dev/null; then
    sed -i "/^\[containers\]/a default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]" "$conf"
  else
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' "$nofile" "$nofile" "$nproc" "$nproc" >>"$conf"
  fi
  log "set default_ulimits in $conf (nofile $nofile, nproc $nproc)"
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

# The same image as the Docker engine's (its version is in its environment: provision.sh).
want="$(docker image inspect -f '{{json .Config.Env}}' "$IMAGE" 2>/dev/null | grep -o 'SANDBOXD_TEST_IMAGE=[0-9]*' || true)"
if ! podman image inspect --format '{{json .Config.Env}}' "$IMAGE" 2>/dev/null | grep -q "${want:-SANDBOXD_TEST_IMAGE=}"; then
  log "loading $IMAGE from the Docker engine (docker save | podman load, no registry)"
  docker save "$IMAGE" | podman load -q >/dev/null
fi

# Podman's networks are /24 by default; the load test runs hundreds of sandboxes on one.
if [ "${SANDBOXD_PROVISION_TEST_NETWORK:-0}" = "1" ]; then
  podman network exists "${SANDBOXD_TEST_NETWORK:-sandboxd-test}" ||
    podman network create --subnet 10.90.0.0/16 "${SANDBOXD_TEST_NETWORK:-sandboxd-test}" >/dev/null
  podman network exists "${SANDBOXD_TEST_NETWORK_ALT:-sandboxd-test-alt}" ||
    podman network create --subnet 10.91.0.0/16 "${SANDBOXD_TEST_NETWORK_ALT:-sandboxd-test-alt}" >/dev/null
fi
log "ready: podman $(podman version --format '{{.Server.Version}}' 2>/dev/null || podman --version), socket $PODMAN_SOCKET"
