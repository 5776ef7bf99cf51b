#!/usr/bin/env bash
# Verifies deploy/sandboxd-stack.yml once on the swarm lab: sandboxd runs as a one-replica
# service pinned to the manager n1, starts three sandboxes, its own task is killed, Swarm
# restarts it, and no sandbox restarts. Not part of CI (it builds a release binary).
#
# The image is made offline for the lab: the release binary and the libraries it links,
# `docker import`ed (scripts/docker-build.sh builds the real image from the Dockerfile, which
# needs local base images and takes minutes more).
set -euo pipefail
cd "$(dirname "$0")/.."
export SWARMLAB_DIR="${TMPDIR:-/tmp}/sandboxd-stack-lab"
ROOT="$SWARMLAB_DIR/srv"
TOKEN="lab-$RANDOM$RANDOM"
N1="unix://$SWARMLAB_DIR/n1.sock"
URL=http://10.77.0.11:18123
log() { printf '[lab-check %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
d() { docker -H "$N1" "$@"; }
api() { curl -sS -m 10 -H "X-API-Token: $TOKEN" -H 'content-type: application/json' "$@"; }

scripts/provision.sh
cargo build --release --locked --bin sandboxd
trap 'scripts/swarm-lab.sh down >/dev/null 2>&1 || true; rm -rf "$SWARMLAB_DIR"' EXIT
scripts/swarm-lab.sh up-for-sandboxd

log "building sandboxd:local on n1 (binary + its libraries, docker import)"
rootfs="$SWARMLAB_DIR/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/var/lib/sandboxd" "$rootfs/etc/sandboxd" "$rootfs/tmp"
cp target/release/sandboxd "$rootfs/usr/local/bin/"
for lib in $(ldd target/release/sandboxd | grep -o '/[^ ]*'); do
  mkdir -p "$rootfs$(dirname "$lib")"; cp -L "$lib" "$rootfs$lib"
done
tar -C "$rootfs" -c . | d import -c 'ENTRYPOINT ["/usr/local/bin/sandboxd"]' -c 'CMD ["serve"]' - sandboxd:local >/dev/null

mkdir -p "$ROOT"/{chats,dependencies,lambda-tools,volumes/v1}
log "deploying the stack"
SANDBOXD_NODE=n1 SANDBOXD_ROOT="$ROOT" SANDBOXD_TOKEN="$TOKEN" SANDBOXD_PORT=18123 \
  MANAGER_SOCKET="$SWARMLAB_DIR/n1.sock" d stack deploy -c deploy/sandboxd-stack.yml sandboxd >/dev/null
for _ in $(seq 1 300); do curl -sf -m 2 "$URL/api/v1/health" >/dev/null && break; sleep 0.2; done
curl -sf -m 2 "$URL/api/v1/health" >/dev/null || { d service ps --no-trunc sandboxd_sandboxd >&2; exit 1; }

chats=()
for _ in 1 2 3; do
  chat=$(python3 -c 'import uuid; print(uuid.uuid4())')
  api -X POST "$URL/api/v1/create" -d "{\"chat_id\":\"$chat\",\"agent_id\":\"a\",\"volume_host_path\":\"$ROOT/volumes/v1\"}" >/dev/null
  chats+=("$chat")
done
tasks_of() { d service ps -q --filter desired-state=running "$1" | sort | tr '\n' ' '; }
before=""
for chat in "${chats[@]}"; do
  svc=$(api "$URL/api/v1/sandboxes/$chat" | python3 -c 'import json,sys; print(json.load(sys.stdin)["container_id"])')
  before+="$svc:$(tasks_of "$svc") "
done
log "3 sandboxes running: $before"

own=$(d ps -q --filter label=com.docker.swarm.service.name=sandboxd_sandboxd | head -1)
own_task=$(tasks_of sandboxd_sandboxd)
t0=$(now_ms)
d kill "$own" >/dev/null
log "killed sandboxd's container $own"
for _ in $(seq 1 600); do
  [ "$(tasks_of sandboxd_sandboxd)" != "$own_task" ] && curl -sf -m 1 "$URL/api/v1/health" >/dev/null && break
  sleep 0.1
done
back=$(( $(now_ms) - t0 ))
log "Swarm restarted sandboxd (task $(tasks_of sandboxd_sandboxd)) and it answers after $back ms"
sleep 5   # a few passes of the restarted loop
after=""
for chat in "${chats[@]}"; do
  view=$(api "$URL/api/v1/sandboxes/$chat")
  svc=$(echo "$view" | python3 -c 'import json,sys; print(json.load(sys.stdin)["container_id"])')
  phase=$(echo "$view" | python3 -c 'import json,sys; print(json.load(sys.stdin)["phase"])')
  [ "$phase" = running ] || { echo "FAIL: $chat is $phase" >&2; exit 1; }
  after+="$svc:$(tasks_of "$svc") "
done
if [ "$before" = "$after" ]; then
  echo "PASS: sandboxd's task killed, Swarm restarted it in $back ms, 0 of 3 sandboxes restarted (same services, same tasks)"
else
  echo "FAIL: sandboxes changed: before [$before] after [$after]" >&2
  exit 1
fi
d stack rm sandboxd >/dev/null
