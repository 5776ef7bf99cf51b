#!/usr/bin/env bash
# Brings a fresh Debian machine (as root) to the point where sandboxd and its tests can run:
# a Docker engine that cannot pull from any registry, the sandbox image built locally, and the
# shared test network. Idempotent: every step checks first and does nothing when already done.
set -euo pipefail

IMAGE="${SANDBOXD_IMAGE:-sandboxd/agent-busybox:latest}"
TEST_NETWORK="${SANDBOXD_TEST_NETWORK:-sandboxd-test}"
# A second shared network, for the test that renames sandbox.network_name under live sandboxes.
TEST_NETWORK_ALT="${SANDBOXD_TEST_NETWORK_ALT:-sandboxd-test-alt}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/sandboxd-dockerd.log}"

log() { printf '[provision] %s\n' "$*" >&2; }

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need_pkgs+=(busybox-static)
command -v sqlite3 >/dev/null 2>&1 || need_pkgs+=(sqlite3)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
# The contract check (scripts/contract.sh) installs schemathesis into a venv.
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
# gVisor, for isolation profiles with `runtime: runsc`; iptables for egress rules.
command -v runsc >/dev/null 2>&1 || need_pkgs+=(runsc)
command -v iptables-restore >/dev/null 2>&1 || need_pkgs+=(iptables)
# The swarm lab (scripts/swarm-lab.sh): network namespaces, unshare/nsenter.
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v nsenter >/dev/null 2>&1 || need_pkgs+=(util-linux)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

engine_answers() { timeout 20 docker info >/dev/null 2>&1; }

# Registers gVisor with dockerd as runtime `runsc`. Debian's runsc (20221219) cannot use its
# own network stack under dockerd 20.10 ("cannot run with network enabled in root network
# namespace"); with --network=host it uses the container's network namespace, which Docker
# made (docs/security.md says what that gives up). Merged into an existing daemon.json.
register_runsc() {
  local conf=/etc/docker/daemon.json runsc_bin
  runsc_bin="$(command -v runsc)" || return 0
  mkdir -p /etc/docker
  python3 - "$conf" "$runsc_bin" <<'PY'
import json, os, sys
path, binary = sys.argv[1], sys.argv[2]
conf = {}
if os.path.exists(path):
    with open(path) as f:
        text = f.read().strip()
        conf = json.loads(text) if text else {}
want = {"path": binary, "runtimeArgs": ["--network=host"]}
if conf.get("runtimes", {}).get("runsc") != want:
    conf.setdefault("runtimes", {})["runsc"] = want
    with open(path, "w") as f:
        json.dump(conf, f, indent=2)
    print("changed")
PY
}
runsc_changed="$(register_runsc)"


# An engine that is running but no longer answers (dockerd 20.10.24 can deadlock in libnetwork
# when two containers leave one network at once, moby/moby#46661: seen here under a benchmark's
# burst of removals, and once in CI) is stopped, so a fresh one can start.
if ! engine_answers && [ -f /var/run/docker.pid ] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
  pid="$(cat /var/run/docker.pid)"
  log "dockerd ($pid) does not answer; restarting it"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL "$pid" 2>/dev/null || true
  # dockerd refuses to start while the pid in its pid file still exists: wait until the killed
  # one is gone (reaped, not just dying) before starting another.
  for _ in $(seq 1 60); do [ -e "/proc/$pid" ] || break; sleep 0.5; done
  rm -f /var/run/docker.pid
fi

if ! engine_answers; then
  log "no Docker engine answers; starting dockerd (registry traffic goes to a closed loopback port)"
  # Anything that tries to pull is sent to 127.0.0.1:9, where nothing listens.
  # Appended to (a restart keeps what led up to it), rotated once past 100 MB.
  if [ "$(stat -c %s "$DOCKERD_LOG" 2>/dev/null || echo 0)" -gt 100000000 ]; then
    mv "$DOCKERD_LOG" "$DOCKERD_LOG.1"
  fi
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
    nohup dockerd >>"$DOCKERD_LOG" 2>&1 &
  # After a killed engine, start-up cleans up its stale shims and sandboxes: ~1 min here.
  for _ in $(seq 1 240); do
    engine_answers && break
    sleep 0.5
  done
  engine_answers || { log "dockerd did not come up; see $DOCKERD_LOG"; tail -n 30 "$DOCKERD_LOG" >&2; exit 1; }
fi

# A running engine reloads its runtimes on SIGHUP (containers keep running).
if [ -n "$runsc_changed" ] || ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; then
  if [ -f /var/run/docker.pid ] && command -v runsc >/dev/null 2>&1; then
    log "registering runsc with dockerd (SIGHUP)"
    kill -HUP "$(cat /var/run/docker.pid)" 2>/dev/null || true
    for _ in $(seq 1 20); do
      docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' && break
      sleep 0.25
    done
  fi
fi

# The test image's version, in its environment (`docker import` sets no labels): a change of
# its applets rebuilds it on machines that have an older one.
TEST_IMAGE_VERSION=2
if ! docker image inspect -f '{{json .Config.Env}}' "$IMAGE" 2>/dev/null | grep -q "SANDBOXD_TEST_IMAGE=$TEST_IMAGE_VERSION\""; then
  log "building $IMAGE from the local busybox (docker import, no registry)"
  busybox_bin="$(command -v busybox)"
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/bin" "$root/www" "$root/tmp" "$root/etc"
  cp "$busybox_bin" "$root/bin/busybox"
  for applet in sh ls cat echo sleep httpd env id wget nc mkdir touch stty; do
    ln -s busybox "$root/bin/$applet"
  done
  echo 'sandboxd test agent' >"$root/www/index.html"
  echo 'root:x:0:0:root:/:/bin/sh' >"$root/etc/passwd"
  echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>"$root/etc/passwd"
  # The agent port is configurable; the image serves HTTP on $AGENT_PORT (default 8000).
  tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/bin' \
    -c 'ENV AGENT_PORT=8000' \
    -c "ENV SANDBOXD_TEST_IMAGE=$TEST_IMAGE_VERSION" \
    -c 'CMD ["/bin/sh","-c","exec httpd -f -p ${AGENT_PORT} -h /www"]' \
    - "$IMAGE" >/dev/null
fi

if [ "${SANDBOXD_PROVISION_TEST_NETWORK:-0}" = "1" ]; then
  for net in "$TEST_NETWORK" "$TEST_NETWORK_ALT"; do
    docker network inspect "$net" >/dev/null 2>&1 || docker network create "$net" >/dev/null
  done
fi
log "ready: engine $(docker version --format '{{.Server.Version}}'), image $IMAGE, runtimes $(docker info --format '{{range $k, $v := .Runtimes}}{{$k}} {{end}}')"
