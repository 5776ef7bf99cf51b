#!/usr/bin/env bash
# swarm-lab.sh - a throw-away 3-node Docker Swarm on ONE Linux host, no registry needed.
#
# sandboxd's copy of ../shared/swarm-lab (scripts/test.sh brings it up and down around the
# swarm tests), with these additions: SWARMLAB_NODE_LABELS (labels put on every node after
# the swarm forms), `up-for-sandboxd` (up with the sandbox image on every node and
# no-new-privileges enforced and labelled), `kill-node nX` (node loss: SIGKILL its dockerd,
# containerd, shims and containers, keeping its state) and `start-node nX` (it comes back with
# the same identity).
#
#   swarm-lab.sh up       build the lab from nothing (netns, 3 dockerd, image, swarm)
#   swarm-lab.sh down     tear everything down (daemons, containers, netns, cgroups, files)
#   swarm-lab.sh status   show daemons / swarm nodes
#   swarm-lab.sh env      print shell exports (SWLAB_N1..3, DOCKER_HOST=manager)
#   swarm-lab.sh check    functional smoke test (spread, overlay, bind mount, labels, drain)
#   swarm-lab.sh bench    latency: 10x service create->running vs 10x docker run -d, drain
#   (check/bench create and remove their own services/networks and wait until the nodes
#    are clean again; they can run repeatedly against one lab)
#
# Topology (the host network namespace and its iptables are never modified, apart from
# one optional veth "swlab-host" = 10.77.0.254 so host processes can reach node IPs):
#
#   netns swlab-hub : Linux bridge br0 acting as the "switch"
#   netns swlab-n1  : eth0 10.77.0.11  dockerd+containerd  (swarm manager, hostname n1)
#   netns swlab-n2  : eth0 10.77.0.12  dockerd+containerd  (worker, hostname n2)
#   netns swlab-n3  : eth0 10.77.0.13  dockerd+containerd  (worker, hostname n3)
#
# Why a hub netns instead of a bridge in the host netns: the host has br_netfilter
# (bridge-nf-call-iptables=1) and the main dockerd sets "FORWARD policy DROP", so frames
# bridged between the nodes would be dropped by the HOST's FORWARD chain. Inside a private
# netns the bridge has an empty ruleset, so no host iptables rules need to be added.
#
# Why not plain `ip netns exec nX dockerd`: ip netns exec remounts /sys for the netns and
# thereby loses /sys/fs/cgroup -> dockerd dies with "Devices cgroup isn't mounted".
# We instead enter private mount+UTS namespaces (unshare), mount a fresh sysfs while inside
# the node netns, re-bind the host's /sys submounts (cgroups...), set the hostname (the
# swarm node name) and exec dockerd inside the node netns with nsenter.
#
# Every daemon has its own --data-root, --exec-root (=> its own containerd, socket, state,
# runc root), --pidfile, API socket, containerd namespaces, cgroup parent (/swlab-nX) and
# trust key (=> distinct engine IDs). HTTP(S)_PROXY=127.0.0.1:9 makes every pull fail fast,
# DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 makes swarm tasks skip the pull attempt entirely.
#
# Requirements: root, dockerd/containerd/runc (tested: Debian docker.io 20.10.24),
# docker CLI, iproute2, util-linux (unshare, nsenter), a STATIC busybox (busybox-static),
# curl + jq (only for check/bench).
#
# Tunables (environment): SWARMLAB_DIR ($TMPDIR/swarm-lab), SWARMLAB_NET (10.77.0),
#   SWARMLAB_HOST_LINK (1), SWARMLAB_BUSYBOX (/bin/busybox), SWARMLAB_IMAGE (swlab/busybox:1),
#   SWARMLAB_LOAD_IMAGES ("" = extra image tarballs to `docker load` into every node),
#   SWARMLAB_PREFER_OFFLINE (1), SWARMLAB_DOWN_ON_FAIL (1),
#   SWARMLAB_DAEMON_JSON_EXTRA (extra daemon.json members, e.g. '"no-new-privileges": true').
set -euo pipefail

LAB=${SWARMLAB_DIR:-${TMPDIR:-/tmp}/swarm-lab}
NET=${SWARMLAB_NET:-10.77.0}
HOST_LINK=${SWARMLAB_HOST_LINK:-1}
BUSYBOX=${SWARMLAB_BUSYBOX:-/bin/busybox}
IMAGE=${SWARMLAB_IMAGE:-swlab/busybox:1}
PREFER_OFFLINE=${SWARMLAB_PREFER_OFFLINE:-1}
DOWN_ON_FAIL=${SWARMLAB_DOWN_ON_FAIL:-1}
NODES=(n1 n2 n3)
HUB=swlab-hub
SELF=$(readlink -f "$0")
API=v1.41                       # Engine API version of docker.io 20.10

log() { printf '[swarm-lab %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
nodeip() { echo "$NET.1${1#n}"; }                       # n2 -> 10.77.0.12
dk() { local n=$1; shift; docker -H "unix://$LAB/$n.sock" "$@"; }
# raw Engine API call: api <node> <METHOD> <path> [curl args...]
api() { local n=$1 m=$2 p=$3; shift 3; curl -sS --unix-socket "$LAB/$n.sock" -X "$m" "$@" "http://localhost/$API$p"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# ---------------------------------------------------------------------------- network
net_up() {
  ip netns add "$HUB"
  ip -n "$HUB" link set lo up
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
  local n i
  for n in "${NODES[@]}"; do
    i=${n#n}
    ip netns add "swlab-$n"
    ip -n "swlab-$n" link set lo up
    # veth pair: p<i> stays in the hub (bridge port), eth0 goes into the node netns
    ip -n "$HUB" link add "p$i" type veth peer name eth0 netns "swlab-$n"
    ip -n "$HUB" link set "p$i" master br0 up
    ip -n "swlab-$n" addr add "$(nodeip "$n")/24" dev eth0
    ip -n "swlab-$n" link set eth0 up
  done
  if [ "$HOST_LINK" = 1 ]; then   # lets host processes reach node IPs (e.g. mode=host ports)
    ip link add swlab-host type veth peer name phost netns "$HUB"
    ip -n "$HUB" link set phost master br0 up
    ip addr add "$NET.254/24" dev swlab-host
    ip link set swlab-host up
  fi
}

net_down() {
  local n
  for n in "${NODES[@]}"; do ip netns del "swlab-$n" 2>/dev/null || true; done
  ip netns del "$HUB" 2>/dev/null || true
  ip link del swlab-host 2>/dev/null || true   # normally already gone with the hub netns
}

# ---------------------------------------------------------------------------- daemons
# Runs INSIDE fresh mount+UTS namespaces (see start_node); ends by exec'ing dockerd.
launch_node() {
  local n=$1 dir=$LAB/$1 m t skip
  local -a subs=()
  echo "$n" > /proc/sys/kernel/hostname          # swarm node name = hostname
  # top-level submounts of /sys (cgroup tree, securityfs, bpf, ...) to carry over
  while read -r m; do
    skip=0
    for t in "${subs[@]}"; do case $m in "$t"/*) skip=1 ;; esac; done
    [ $skip = 1 ] || subs+=("$m")
  done < <(awk '$5 ~ "^/sys/" {print $5}' /proc/self/mountinfo | LC_ALL=C sort -u)
  mkdir -p "$dir/oldsys"
  mount --rbind /sys "$dir/oldsys"
  umount -l /sys
  nsenter --net="/run/netns/swlab-$n" mount -t sysfs sysfs /sys   # sysfs of the node netns
  for m in "${subs[@]}"; do mount --rbind "$dir/oldsys${m#/sys}" "$m"; done
  umount -l "$dir/oldsys"; rmdir "$dir/oldsys"
  exec nsenter --net="/run/netns/swlab-$n" \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
      HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
      http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 no_proxy= \
      DOCKER_SERVICE_PREFER_OFFLINE_IMAGE="$PREFER_OFFLINE" \
    dockerd --config-file "$dir/daemon.json" \
      --data-root "$dir/data" --exec-root "$dir/run" --pidfile "$dir/dockerd.pid" \
      -H "unix://$LAB/$n.sock" \
      --containerd-namespace "swlab-$n" --containerd-plugins-namespace "swlab-$n-plugins" \
      --cgroup-parent "/swlab-$n" \
      --swarm-default-advertise-addr "$(nodeip "$n")"
}

start_node() {
  local n=$1 dir=$LAB/$1
  mkdir -p "$dir"
  # deprecated-key-path: per-node trust key => distinct engine ID (default /etc/docker/key.json
  # would be shared with the host daemon). Only settable via daemon.json in 20.10.
  # A restarted node (start-node) keeps the daemon.json it was made with.
  [ -f "$dir/daemon.json" ] ||
  printf '{\n  "deprecated-key-path": "%s/key.json"%s\n}\n' "$dir" \
    "${SWARMLAB_DAEMON_JSON_EXTRA:+,
  $SWARMLAB_DAEMON_JSON_EXTRA}" > "$dir/daemon.json"
  # setsid: daemon survives the calling shell/CI step; slave propagation: host mounts
  # propagate into the node, node mounts (overlayfs, netns) stay private to it.
  setsid unshare --mount --uts --propagation slave "$SELF" _launch "$n" \
    </dev/null >"$dir/dockerd.log" 2>&1 &
  echo $! > "$dir/launcher.pid"
}

# 0 when node n's dockerd answers within 60 s; 1 when it exited or never answered.
node_answers() {
  local n=$1 k
  for ((k = 0; k < 600; k++)); do            # up to 60 s
    dk "$n" version --format '{{.Server.Version}}' >/dev/null 2>&1 && return 0
    kill -0 "$(cat "$LAB/$n/launcher.pid")" 2>/dev/null || { tail -5 "$LAB/$n/dockerd.log" >&2; return 1; }
    sleep 0.1
  done
  return 1
}

wait_node() {
  node_answers "$1" || die "dockerd $1 exited or is not answering on $LAB/$1.sock"
}

# is pid a process of node n (dockerd / containerd / shim)? matched on its own paths only
is_lab_proc() { { tr '\0' ' ' < "/proc/$1/cmdline"; } 2>/dev/null | grep -qE -- "$LAB/$2/(data|run)"; }

stop_node() {
  local n=$1 pid k ids
  if [ -S "$LAB/$n.sock" ] && timeout 5 docker -H "unix://$LAB/$n.sock" version >/dev/null 2>&1; then
    # SIGKILL all running containers first: a plain daemon shutdown would spend the stop
    # grace period (10 s) on every container whose PID 1 ignores SIGTERM (busybox httpd).
    # (`swarm leave --force` also kills them, but takes up to ~7 s on the manager.)
    ids=$(timeout 10 docker -H "unix://$LAB/$n.sock" ps -q 2>/dev/null || true)
    [ -z "$ids" ] || timeout 30 docker -H "unix://$LAB/$n.sock" kill $ids >/dev/null 2>&1 || true
  fi
  pid=$(cat "$LAB/$n/dockerd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && is_lab_proc "$pid" "$n"; then
    kill -TERM "$pid" 2>/dev/null || true    # dockerd also stops its containerd
    for ((k = 0; k < 300; k++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "dockerd $n ignored SIGTERM for 30 s, killing"; kill -KILL "$pid" || true; }
  fi
  return 0
}

# last resort: SIGKILL anything of the lab still alive (by pid, never by name)
sweep_node() {
  local n=$1 p f
  # container processes: everything in the node's cgroup parent
  for f in /sys/fs/cgroup/*/"swlab-$n" /sys/fs/cgroup/"swlab-$n"; do
    [ -d "$f" ] || continue
    find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r p; do kill -KILL "$p" 2>/dev/null || true; done
  done
  # dockerd / containerd / containerd-shim of this node
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = $$ ] && continue
    is_lab_proc "$p" "$n" && { log "killing leftover pid $p ($n)"; kill -KILL "$p" 2>/dev/null || true; }
  done
  # anything else still living in the node netns (docker-proxy ...)
  for p in $(ip netns pids "swlab-$n" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  return 0
}

cgroups_down() {
  local n d k
  for ((k = 0; k < 20; k++)); do
    local left=0
    for n in "${NODES[@]}"; do
      for d in /sys/fs/cgroup/*/"swlab-$n" /sys/fs/cgroup/"swlab-$n"; do
        [ -d "$d" ] || continue
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [ -d "$d" ] && left=1
      done
    done
    [ $left = 0 ] && return 0
    sleep 0.25
  done
  log "WARNING: some /sys/fs/cgroup/*/swlab-* directories could not be removed"
}

# ---------------------------------------------------------------------------- image
# Tiny image: static busybox + applet symlinks, CMD httpd -f -p 8000 serving /www.
build_image() {
  local r=$LAB/rootfs a
  [ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
  "$BUSYBOX" --list >/dev/null 2>&1 || die "$BUSYBOX is not a working busybox"
  rm -rf "$r"; mkdir -p "$r"/{bin,etc,tmp,www,proc,sys,dev,root}
  cp "$BUSYBOX" "$r/bin/busybox"
  for a in $("$BUSYBOX" --list); do [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' > "$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
  echo 'swlab ok' > "$r/www/index.html"
  chmod 1777 "$r/tmp"
  tar -C "$r" --numeric-owner --owner=0 --group=0 -c . |
    dk n1 import --change 'CMD ["httpd","-f","-p","8000"]' --change 'WORKDIR /www' \
      --change 'ENV PATH=/bin' - "$IMAGE" >/dev/null
  rm -rf "$r"
  # save/load (not import per node) so every node has the identical image ID
  dk n1 save -o "$LAB/image.tar" "$IMAGE"
  local n pids=()
  for n in "${NODES[@]:1}"; do dk "$n" load -q -i "$LAB/image.tar" >/dev/null & pids+=($!); done
  for a in ${SWARMLAB_LOAD_IMAGES:-}; do
    for n in "${NODES[@]}"; do dk "$n" load -q -i "$a" >/dev/null & pids+=($!); done
  done
  for a in "${pids[@]}"; do wait "$a" || die "docker load failed"; done
}

# ---------------------------------------------------------------------------- swarm
swarm_up() {
  local tok n k
  dk n1 swarm init --advertise-addr "$(nodeip n1)" --listen-addr "$(nodeip n1):2377" >/dev/null
  tok=$(dk n1 swarm join-token -q worker)
  for n in "${NODES[@]:1}"; do
    dk "$n" swarm join --advertise-addr "$(nodeip "$n")" --listen-addr "$(nodeip "$n"):2377" \
      --token "$tok" "$(nodeip n1):2377" >/dev/null
  done
  for ((k = 0; k < 300; k++)); do
    if [ "$(dk n1 node ls --format '{{.Status}}' | grep -c '^Ready$')" = "${#NODES[@]}" ]; then
      label_nodes
      return 0
    fi
    sleep 0.1
  done
  die "swarm nodes not Ready: $(dk n1 node ls)"
}

label_nodes() {
  local n l
  for n in "${NODES[@]}"; do
    for l in ${SWARMLAB_NODE_LABELS:-}; do dk n1 node update --label-add "$l" "$n" >/dev/null; done
  done
}

# The lab sandboxd's tests, bench and deploy check use: the sandbox image loaded on every
# node, no-new-privileges in every daemon.json, and the label that says so.
cmd_up_for_sandboxd() {
  mkdir -p "$LAB"
  docker save -o "$LAB/agent.tar" "${SANDBOXD_IMAGE:-sandboxd/agent-busybox:latest}"
  SWARMLAB_LOAD_IMAGES="$LAB/agent.tar"
  SWARMLAB_DAEMON_JSON_EXTRA='"no-new-privileges": true'
  SWARMLAB_NODE_LABELS=sandboxd.no-new-privileges=true
  cmd_up
}

cmd_kill_node() {
  local n=${1:?usage: kill-node n1|n2|n3}
  [ -d "$LAB/$n" ] || die "no node $n in $LAB"
  node_gone "$n" || die "node $n still has processes after 10 s"
  log "node $n killed (dockerd, containerd, shims, containers)"
}

# SIGKILLs everything of node n until nothing of it is left (processes can vanish mid-walk,
# so each sweep runs outside errexit); fails after 10 s.
node_gone() {
  local n=$1 k p left
  for ((k = 0; k < 100; k++)); do
    sweep_node "$n" >/dev/null 2>&1 || true
    left=0
    for p in /proc/[0-9]*; do
      p=${p#/proc/}
      [ "$p" = $$ ] && continue
      if is_lab_proc "$p" "$n"; then left=1; break; fi
    done
    [ -n "$(ip netns pids "swlab-$n" 2>/dev/null)" ] && left=1
    [ $left = 0 ] && return 0
    sleep 0.1
  done
  return 1
}

cmd_start_node() {
  local n=${1:?usage: start-node n1|n2|n3}
  [ -f "$LAB/$n/daemon.json" ] || die "node $n was never made in $LAB"
  # Whatever is left of its last life (a containerd outliving its dockerd) must go first.
  # A dockerd whose own containerd does not come up in time after a kill ("timeout waiting
  # for containerd to start", seen once in CI) exits: clear what is left and try once more.
  local try
  for try in 1 2; do
    node_gone "$n" || die "node $n still has processes after 10 s"
    rm -f "$LAB/$n.sock" "$LAB/$n/dockerd.pid" "$LAB/$n/run/containerd/containerd.pid"
    start_node "$n"
    if node_answers "$n"; then
      log "node $n answering again"
      return 0
    fi
    log "node $n did not come back (try $try)"
  done
  die "dockerd $n did not come back"
}

write_env() {
  {
    local n; for n in "${NODES[@]}"; do echo "export SWLAB_${n^^}=unix://$LAB/$n.sock"; done
    echo "export DOCKER_HOST=unix://$LAB/n1.sock   # swarm manager"
    echo "export SWLAB_IMAGE=$IMAGE"
  } > "$LAB/env"
}

on_up_fail() {
  local rc=$? n
  trap - ERR EXIT
  [ $rc = 0 ] && return 0
  log "up FAILED (rc=$rc); last daemon log lines:"
  for n in "${NODES[@]}"; do
    [ -f "$LAB/$n/dockerd.log" ] && { echo "--- $n" >&2; tail -15 "$LAB/$n/dockerd.log" >&2; }
  done
  if [ "$DOWN_ON_FAIL" = 1 ]; then log "tearing down (SWARMLAB_DOWN_ON_FAIL=0 keeps it)"; cmd_down; fi
  exit $rc
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  local c; for c in dockerd containerd runc docker ip unshare nsenter setsid; do
    command -v "$c" >/dev/null || die "missing command: $c"
  done
  if ip netns list | grep -qE "^(swlab-|$HUB)" || ls "$LAB"/n?.sock >/dev/null 2>&1; then
    log "leftovers of a previous lab found -> running down first"; cmd_down
  fi
  local t0; t0=$(now_ms)
  trap on_up_fail EXIT
  mkdir -p "$LAB"
  # `ip netns add` creates /run/netns (a self bind mount) and libmount creates /run/mount;
  # remember whether they pre-existed so that `down` can remove them again
  [ -e /run/netns ] || touch "$LAB/.made-run-netns"
  [ -e /run/mount ] || touch "$LAB/.made-run-mount"
  log "network namespaces + hub bridge ($NET.0/24)"
  net_up
  log "starting 3 dockerd"
  local n; for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do wait_node "$n"; done
  log "daemons up after $(( $(now_ms) - t0 )) ms; building/loading $IMAGE"
  build_image
  log "forming swarm"
  swarm_up
  write_env
  trap - EXIT
  dk n1 node ls >&2
  log "lab up in $(( $(now_ms) - t0 )) ms.  source $LAB/env   (manager: unix://$LAB/n1.sock)"
}

cmd_down() {
  local n pids=()
  log "stopping daemons"
  for n in "${NODES[@]}"; do stop_node "$n" & pids+=($!); done
  wait "${pids[@]}" 2>/dev/null || true
  for n in "${NODES[@]}"; do sweep_node "$n"; done
  sleep 0.3
  net_down
  cgroups_down
  # mounts are private to the (now dead) node mount namespaces; this is only a safety net
  awk -v l="$LAB/" 'index($5, l) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  for n in "${NODES[@]}"; do rm -rf "${LAB:?}/$n" "$LAB/$n.sock"; done
  rm -rf "$LAB/env" "$LAB/image.tar" "$LAB/rootfs" "$LAB/share"
  if [ -e "$LAB/.made-run-netns" ] && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
    while mountpoint -q /run/netns; do umount /run/netns || break; done
    rmdir /run/netns 2>/dev/null || true
  fi
  [ ! -e "$LAB/.made-run-mount" ] || rmdir /run/mount 2>/dev/null || true
  rm -f "$LAB/.made-run-netns" "$LAB/.made-run-mount"
  log "lab down"
}

cmd_status() {
  local n pid
  for n in "${NODES[@]}"; do
    pid=$(cat "$LAB/$n/dockerd.pid" 2>/dev/null || echo -)
    printf '%s  ip=%s  dockerd pid=%s  ' "$n" "$(nodeip "$n")" "$pid"
    dk "$n" info --format 'swarm={{.Swarm.LocalNodeState}} containers={{.ContainersRunning}}' 2>/dev/null || echo down
  done
  dk n1 node ls 2>/dev/null || true
}

# ---------------------------------------------------------------------------- check / bench
FAILS=0
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; FAILS=$((FAILS + 1)); }

# tasks (desired running) of a service as "state node_id" lines, straight from the API
svc_tasks() {
  api n1 GET /tasks -G --data-urlencode "filters={\"service\":[\"$1\"],\"desired-state\":[\"running\"]}" |
    jq -r '.[] | "\(.Status.State) \(.NodeID)"'
}
node_name() { dk n1 node inspect -f '{{.Description.Hostname}}' "$1"; }
# wait (<= 60 s) until service $1 has a task in state running (not on node-id $2);
# prints that task's node ID. Polls the manager API every ~20 ms.
wait_running_id() {
  local s=$1 not=${2:-} k st nid
  for ((k = 0; k < 3000; k++)); do
    while read -r st nid; do
      [ "$st" = running ] && [ "$nid" != "$not" ] && { echo "$nid"; return 0; }
    done < <(svc_tasks "$s")
    sleep 0.02
  done
  return 1
}
wait_running() { local id; id=$(wait_running_id "$@") && node_name "$id"; }   # -> node name
# container id of service $1 on node $2
svc_cid() { dk "$2" ps -q --filter "label=com.docker.swarm.service.name=$1" | head -1; }
# Removal is asynchronous: `service rm` returns at once, the containers stop later (stop grace
# period + a fixed 2 s "gossip converge" sleep in the swarm executor), and a swarm network
# deleted on the manager lingers on every node until its last container is gone (a new network
# with the same name fails meanwhile). So wait until nothing is left on any node.
wait_gone() {   # wait_gone <label filter value> <network>
  local w n left
  for ((w = 0; w < 300; w++)); do
    left=0
    for n in "${NODES[@]}"; do
      [ -z "$(dk "$n" ps -aq --filter "label=$1")" ] || left=1
      [ -z "$2" ] || [ -z "$(dk "$n" network ls -q --filter "name=^$2\$")" ] || left=1
    done
    [ $left = 0 ] && return 0
    [ -z "$2" ] || dk n1 network rm "$2" >/dev/null 2>&1 || true
    sleep 0.1
  done
  echo "WARN  leftovers ($1 / $2) still present after 30 s"
}

cmd_check() {
  command -v jq >/dev/null && command -v curl >/dev/null || die "check needs curl and jq"
  local ready; ready=$(dk n1 node ls --format '{{.Status}}/{{.Availability}}' | grep -c '^Ready/Active$' || true)
  [ "$ready" = 3 ] && pass "3 nodes Ready/Active" || fail "nodes ready=$ready"
  dk n1 service rm chk1 chk2 chk3 chkopts chkpub chkvip >/dev/null 2>&1 || true   # leftovers of an aborted run
  wait_gone swlab.check swlab-chk

  dk n1 network create -d overlay --attachable swlab-chk >/dev/null
  mkdir -p "$LAB/share"; echo "hello-from-host" > "$LAB/share/msg"
  local k
  # --init + short grace period: task stop (and so a drain) takes ~3 s instead of ~14 s,
  # because busybox httpd as PID 1 ignores SIGTERM and would wait the full 10 s grace period
  for k in 1 2 3; do
    dk n1 service create -d -q --no-resolve-image --name "chk$k" --endpoint-mode dnsrr \
      --network swlab-chk --label swlab.check=yes --label "swlab.idx=$k" \
      --container-label "swlab.clabel=c$k" --container-label swlab.check=svc --init --stop-grace-period 1s \
      --mount "type=bind,source=$LAB/share,target=/share,readonly" "$IMAGE" >/dev/null
  done
  local -A node=() cid=()
  for k in 1 2 3; do node[$k]=$(wait_running "chk$k") || fail "chk$k never running"; done
  echo "      placement: chk1=${node[1]} chk2=${node[2]} chk3=${node[3]}"
  [ "$(printf '%s\n' "${node[@]}" | sort -u | wc -l)" = 3 ] && pass "spread: 3 services on 3 different nodes" \
    || fail "spread: not on 3 distinct nodes"
  for k in 1 2 3; do cid[$k]=$(svc_cid "chk$k" "${node[$k]}"); done

  # overlay IP: in the task object and inside the container
  local tip cip
  tip=$(api n1 GET /tasks -G --data-urlencode 'filters={"service":["chk2"],"desired-state":["running"]}' |
        jq -r '.[0].NetworksAttachments[] | select(.Network.Spec.Name=="swlab-chk") | .Addresses[0]')
  cip=$(dk "${node[2]}" exec "${cid[2]}" sh -c "ip -4 -o addr show eth0 | awk '{print \$4}'")
  [ -n "$tip" ] && [ "$tip" = "$cip" ] && pass "overlay IP of chk2 task = container eth0 = $tip" \
    || fail "overlay IP task=$tip container=$cip"

  # cross-node HTTP over the overlay (busybox 1.35 wget -T segfaults: use `timeout` instead)
  local out
  out=$(dk "${node[1]}" exec "${cid[1]}" timeout 10 wget -qO- "http://tasks.chk2:8000/" 2>&1 || true)
  [ "$out" = "swlab ok" ] && pass "wget ${node[1]} -> ${node[2]} http://tasks.chk2:8000 over overlay" || fail "tasks.chk2: $out"
  out=$(dk "${node[1]}" exec "${cid[1]}" timeout 10 wget -qO- "http://chk3:8000/" 2>&1 || true)
  [ "$out" = "swlab ok" ] && pass "wget ${node[1]} -> ${node[3]} http://chk3:8000 (dnsrr service name)" || fail "chk3: $out"
  out=$(dk "${node[3]}" exec "${cid[3]}" timeout 10 wget -qO- "http://${tip%/*}:8000/" 2>&1 || true)
  [ "$out" = "swlab ok" ] && pass "wget ${node[3]} -> ${node[2]} by overlay IP ${tip%/*}" || fail "by IP: $out"
  out=$(dk n1 run --rm --network swlab-chk "$IMAGE" timeout 10 wget -qO- http://tasks.chk3:8000/ 2>&1 || true)
  [ "$out" = "swlab ok" ] && pass "plain docker run on the attachable overlay reaches a task" || fail "attachable: $out"

  # bind mount (read-only) of a host directory
  out=$(dk "${node[2]}" exec "${cid[2]}" cat /share/msg 2>&1 || true)
  [ "$out" = "hello-from-host" ] && pass "bind mount of host dir readable in task" || fail "bind: $out"
  if dk "${node[2]}" exec "${cid[2]}" touch /share/x 2>/dev/null; then fail "readonly bind mount writable"
  else pass "readonly bind mount rejects writes"; fi

  # labels via the API
  local n_svc clabel tlabel
  n_svc=$(api n1 GET /services -G --data-urlencode 'filters={"label":["swlab.check=yes"]}' | jq length)
  [ "$n_svc" = 3 ] && pass "GET /services?filters=label=swlab.check=yes -> 3 services" || fail "label filter: $n_svc"
  tlabel=$(api n1 GET /tasks -G --data-urlencode 'filters={"service":["chk1"]}' |
           jq -r '.[0].Spec.ContainerSpec.Labels["swlab.clabel"]')
  [ "$tlabel" = c1 ] && pass "task Spec.ContainerSpec.Labels visible in GET /tasks" || fail "task label: $tlabel"
  clabel=$(api "${node[1]}" GET "/containers/${cid[1]}/json" |
           jq -r '.Config.Labels | "\(.["swlab.clabel"]) \(.["com.docker.swarm.service.name"]) \(.["com.docker.swarm.task.id"] != null)"')
  [ "$clabel" = "c1 chk1 true" ] && pass "container labels (custom + com.docker.swarm.*) on the node" || fail "container labels: $clabel"

  # sandbox-relevant container options carried by a service spec (API 1.41)
  dk n1 service create -d -q --no-resolve-image --name chkopts --endpoint-mode dnsrr --container-label swlab.check=opts \
    --cap-drop ALL --cap-add NET_BIND_SERVICE --limit-pids 64 --limit-memory 64m --limit-cpu 0.5 \
    --read-only --mount type=tmpfs,target=/tmp,tmpfs-size=16m --user 65534:65534 --env FOO=bar \
    --mount "type=bind,source=$LAB/share,target=/share,readonly" --init --ulimit nofile=256:512 \
    --stop-grace-period 1s "$IMAGE" >/dev/null
  local on oc; on=$(wait_running chkopts); oc=$(svc_cid chkopts "$on")
  out=$(dk "$on" exec "$oc" sh -c 'set -- $(grep CapBnd /proc/self/status); echo "capbnd=$2";
      echo "pids=$(cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max)";
      echo "mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max)";
      echo "cpuq=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d" " -f1 /sys/fs/cgroup/cpu.max)";
      touch /rootfs-probe 2>/dev/null && echo rootfs=rw || echo rootfs=ro;
      touch /tmp/p 2>/dev/null && echo tmpfs=rw || echo tmpfs=ro;
      echo "uid=$(id -u)"; echo "env=$FOO"; echo "nofile=$(ulimit -n)";
      set -- $(grep NoNewPrivs /proc/self/status); echo "nnp=$2"' 2>&1 | tr '\n' ' ')
  echo "      in-container: $out"
  local want
  for want in capbnd=0000000000000400 pids=64 mem=67108864 cpuq=50000 rootfs=ro tmpfs=rw uid=65534 env=bar nofile=256; do
    case " $out " in *" $want "*) pass "service option -> $want" ;; *) fail "service option: expected $want" ;; esac
  done
  echo "INFO  no-new-privileges in container: $(echo ${out##*nnp=}) (not settable per service at API 1.41)"
  dk n1 service rm chkopts >/dev/null

  # published ports: mode=host works (iptables DNAT in the node netns); ingress needs IPVS
  dk n1 service create -d -q --no-resolve-image --name chkpub --endpoint-mode dnsrr \
    --container-label swlab.check=pub --init --stop-grace-period 1s \
    --publish mode=host,target=8000,published=18000 "$IMAGE" >/dev/null
  local pn; pn=$(wait_running chkpub)
  if [ "$HOST_LINK" = 1 ]; then
    out=$(curl -s -m 5 "http://$(nodeip "$pn"):18000/" || true)
    [ "$out" = "swlab ok" ] && pass "host -> $(nodeip "$pn"):18000 (--publish mode=host)" || fail "mode=host publish: $out"
  fi
  dk n1 service rm chkpub >/dev/null

  # VIP endpoint mode (the default) and the ingress mesh need IPVS; report, do not fail
  dk n1 service create -d -q --no-resolve-image --name chkvip --network swlab-chk \
    --container-label swlab.check=vip --init --stop-grace-period 1s "$IMAGE" >/dev/null
  wait_running chkvip >/dev/null || true
  if dk "${node[1]}" exec "${cid[1]}" timeout 5 wget -qO- http://chkvip:8000/ >/dev/null 2>&1; then
    echo "INFO  VIP (default endpoint mode) works"
  else
    echo "INFO  VIP endpoint mode NOT reachable (kernel without IPVS) - use --endpoint-mode dnsrr / tasks.<svc>"
  fi
  dk n1 service rm chkvip >/dev/null

  # drain: every task on the drained node must be re-created elsewhere
  local victim=n2 vid t0 moved=0 where
  vid=$(dk n1 node inspect -f '{{.ID}}' "$victim")
  local affected=(); for k in 1 2 3; do [ "${node[$k]}" = "$victim" ] && affected+=("chk$k"); done
  t0=$(now_ms)
  dk n1 node update --availability drain "$victim" >/dev/null
  for k in "${affected[@]}"; do
    where=$(wait_running "$k" "$vid") && moved=$((moved + 1))
    echo "      $k: $victim -> $where after $(( $(now_ms) - t0 )) ms"
  done
  [ ${#affected[@]} -gt 0 ] && [ $moved = ${#affected[@]} ] \
    && pass "drain $victim: ${#affected[@]} task(s) running elsewhere after $(( $(now_ms) - t0 )) ms" \
    || fail "drain: affected=${#affected[@]} moved=$moved"
  dk n1 node update --availability active "$victim" >/dev/null

  dk n1 service rm chk1 chk2 chk3 >/dev/null
  wait_gone swlab.check swlab-chk
  rm -rf "$LAB/share"
  echo "check finished: $FAILS failure(s)"
  [ $FAILS = 0 ]
}

stats() {  # "p50=.. max=.. (all: ..)" for ms values on stdin (p50 = nearest rank)
  sort -n | awk '{v[NR]=$1} END {printf "p50=%d ms  max=%d ms  (all: ", v[int((NR+1)/2)], v[NR];
    for (i=1;i<=NR;i++) printf "%s%s", v[i], (i<NR?" ":")\n")}'
}
started_ms() { echo $(( $(date -d "$(dk "$1" inspect -f '{{.State.StartedAt}}' "$2")" +%s%N) / 1000000 )); }

cmd_bench() {
  command -v jq >/dev/null && command -v curl >/dev/null || die "bench needs curl and jq"
  local N=${BENCH_N:-10} i t0 t1 tc nid nd c
  dk n1 service rm $(dk n1 service ls -q --filter label=swlab.bench) >/dev/null 2>&1 || true  # leftovers
  wait_gone swlab.bench swlab-bench
  dk n1 network create -d overlay --attachable swlab-bench >/dev/null
  local svc_ret=() svc_ctr=() run_bridge=() run_ovl=()
  for ((i = 1; i <= N; i++)); do
    tc=$(now_ms)
    dk n1 service create -d -q --no-resolve-image --name "b$i" --endpoint-mode dnsrr \
      --label swlab.bench=1 --container-label swlab.bench=1 --network swlab-bench "$IMAGE" >/dev/null
    t0=$(now_ms)
    nid=$(wait_running_id "b$i")
    t1=$(now_ms)
    nd=$(node_name "$nid"); c=$(svc_cid "b$i" "$nd")
    svc_ret+=($((t1 - t0))); svc_ctr+=($(( $(started_ms "$nd" "$c") - t0 )))
    echo "  b$i on $nd: create call $((t0 - tc)) ms; returned->container started ${svc_ctr[-1]} ms; returned->task running (API) $((t1 - t0)) ms"
  done
  for ((i = 1; i <= N; i++)); do
    t0=$(now_ms); dk n2 run -d --label swlab.bench=1 --name "r$i" "$IMAGE" >/dev/null; t1=$(now_ms)
    run_bridge+=($((t1 - t0)))
    t0=$(now_ms); dk n2 run -d --label swlab.bench=1 --name "o$i" --network swlab-bench "$IMAGE" >/dev/null; t1=$(now_ms)
    run_ovl+=($((t1 - t0)))
  done
  echo "service: create returned -> task running (API poll) : $(printf '%s\n' "${svc_ret[@]}" | stats)"
  echo "service: create returned -> container StartedAt     : $(printf '%s\n' "${svc_ctr[@]}" | stats)"
  echo "docker run -d on n2, default bridge (whole call)   : $(printf '%s\n' "${run_bridge[@]}" | stats)"
  echo "docker run -d on n2, attachable overlay (whole call): $(printf '%s\n' "${run_ovl[@]}" | stats)"
  for ((i = 1; i <= N; i++)); do dk n1 service rm "b$i" >/dev/null; done
  for ((i = 1; i <= N; i++)); do dk n2 rm -f "r$i" "o$i" >/dev/null; done

  # drain latency: one default service and one tuned (--init, 1 s grace) pinned to n2 by
  # pausing n1/n3 while they are scheduled, then drain n2
  dk n1 node update --availability pause n1 >/dev/null; dk n1 node update --availability pause n3 >/dev/null
  dk n1 service create -d -q --no-resolve-image --name dflt --endpoint-mode dnsrr --network swlab-bench \
    --label swlab.bench=1 --container-label swlab.bench=1 "$IMAGE" >/dev/null
  dk n1 service create -d -q --no-resolve-image --name tuned --endpoint-mode dnsrr --network swlab-bench \
    --label swlab.bench=1 --container-label swlab.bench=1 --init --stop-grace-period 1s "$IMAGE" >/dev/null
  wait_running dflt >/dev/null; wait_running tuned >/dev/null
  dk n1 node update --availability active n1 >/dev/null; dk n1 node update --availability active n3 >/dev/null
  local vid; vid=$(dk n1 node inspect -f '{{.ID}}' n2)
  t0=$(now_ms); dk n1 node update --availability drain n2 >/dev/null
  wait_running_id tuned "$vid" >/dev/null; echo "drain n2 -> tuned task (--init, grace 1s) running elsewhere: $(( $(now_ms) - t0 )) ms"
  wait_running_id dflt "$vid" >/dev/null;  echo "drain n2 -> default task (no init, grace 10s) running elsewhere: $(( $(now_ms) - t0 )) ms"
  dk n1 node update --availability active n2 >/dev/null
  dk n1 service rm dflt tuned >/dev/null
  wait_gone swlab.bench swlab-bench
}

case ${1:-} in
  up) cmd_up ;;
  up-for-sandboxd) cmd_up_for_sandboxd ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cat "$LAB/env" ;;
  check) cmd_check ;;
  bench) cmd_bench ;;
  kill-node) cmd_kill_node "${2:-}" ;;
  start-node) cmd_start_node "${2:-}" ;;
  _launch) launch_node "$2" ;;
  *) echo "usage: $0 up|up-for-sandboxd|down|status|env|check|bench|kill-node nX|start-node nX" >&2; exit 2 ;;
esac
