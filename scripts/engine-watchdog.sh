#!/usr/bin/env bash
# Watches the host's Docker engine while scripts/test.sh runs the suite; usage:
#   scripts/engine-watchdog.sh RECORD_FILE
#
# Why: dockerd 20.10.24 (Debian bookworm's) can deadlock for good in libnetwork when two
# containers leave one network at the same moment (moby/moby#46661, libnetwork#2649; fixed in
# 20.10.27). From then on every start, stop, removal and `docker info` hangs, and so would every
# test after it, until CI's time runs out. This loop asks the engine every 10 s; when it has not
# answered for two probes in a row (30 s each), it
#   1. asks dockerd for its goroutine stacks (SIGUSR1) and keeps them under /var/log, so the
#      deadlock can be read afterwards, not guessed;
#   2. restarts the engine through scripts/provision.sh (its "running but not answering" path);
#   3. appends one line to RECORD_FILE, which tells scripts/test.sh the engine was restarted
#      (it then reruns, once, the tests that failed while the engine was wedged).
# It never restarts an engine that answers, however slowly it answers.
set -uo pipefail
cd "$(dirname "$0")/.."
record="${1:?usage: engine-watchdog.sh RECORD_FILE}"

log() { printf '[engine-watchdog] %s\n' "$*" >&2; }

misses=0
while sleep 10; do
  if timeout 30 docker info >/dev/null 2>&1; then
    misses=0
    continue
  fi
  misses=$((misses + 1))
  [ "$misses" -lt 2 ] && continue
  at="$(date -u +%Y%m%dT%H%M%SZ)"
  kept=none
  pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
  marker="$(mktemp)"
  if [ -n "$pid" ] && kill -USR1 "$pid" 2>/dev/null; then
    sleep 3
    stacks="$(find /var/run/docker -maxdepth 1 -name 'goroutine-stacks-*.log' -newer "$marker" | head -n 1)"
    if [ -n "$stacks" ]; then
      kept="/var/log/sandboxd-dockerd-stacks-$at.log"
      cp "$stacks" "$kept"
    fi
  fi
  rm -f "$marker"
  log "the engine has not answered for over a minute; goroutine stacks: $kept; restarting it"
  if SANDBOXD_PROVISION_TEST_NETWORK=1 scripts/provision.sh >/dev/null 2>&1; then
    outcome="restarted"
  else
    outcome="restart FAILED"
  fi
  locked="$(grep -c 'semacquire' "$kept" 2>/dev/null)"
  echo "$at engine unresponsive (pid ${pid:-?}; ${locked:-0} goroutines waiting on a lock; stacks $kept): $outcome" >>"$record"
  log "$outcome"
  misses=0
done
