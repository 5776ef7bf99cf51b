#!/usr/bin/env bash
# Checks the HTTP contract against the real binary: the served OpenAPI document and the
# checked-in docs/openapi.json must be valid (openapi-spec-validator), and a bounded
# schemathesis run (all checks, stateful phase on, ~2 min) must find 0 failures.
# Needs a built binary (target/debug/sandboxd), a Docker engine and the sandboxd-test network:
# scripts/test.sh provides all three. Installs its Python tools into target/ once.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${SANDBOXD_BIN:-$ROOT/target/debug/sandboxd}"
WORK="$ROOT/target/schemathesis"
VENV="$WORK/venv"
REQ="schemathesis==4.32.5 openapi-spec-validator==0.9.0"
mkdir -p "$WORK"
if [ "$(cat "$VENV/.req" 2>/dev/null)" != "$REQ" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $REQ
  echo "$REQ" >"$VENV/.req"
fi

RUN="$(mktemp -d "$WORK/run.XXXXXX")"
mkdir -p "$RUN"/{chats,deps,tools,volumes/v}
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
INSTANCE="contract-$$"
export SANDBOXD_API_TOKEN="contract-$RANDOM$RANDOM"
# The test agent (busybox httpd as PID 1) ignores SIGTERM, so a hibernation's stop waits out
# its whole grace: 1 s here (10 s by default) keeps a resume right after a fuzzed hibernate
# well inside create_wait_seconds, as in the integration tests' settings.
cat >"$RUN/config.yaml" <<YAML
http: {host: 127.0.0.1, port: $PORT}
logging: {level: WARNING}
docker: {pull_policy: never}
sandbox: {image: sandboxd/agent-busybox:latest, network_name: sandboxd-test, ttl_seconds: 60, chats_root: $RUN/chats, dependencies_host_path: $RUN/deps, lambda_tools_host_path: $RUN/tools, allowed_volume_roots: [$RUN/volumes], hibernate_stop_seconds: 1}
security: {api_token: $SANDBOXD_API_TOKEN}
database: {path: $RUN/sandboxd.db}
controller: {instance: $INSTANCE, create_wait_seconds: 10, delete_wait_seconds: 10, max_wait_seconds: 2, take_over_old_service: false}
data_plane: {exec_default_timeout_seconds: 5, exec_max_timeout_seconds: 5}
storage: {root: $RUN/storage, default_quota_bytes: 4194304, max_quota_bytes: 16777216}
YAML
"$BIN" serve --config "$RUN/config.yaml" >"$RUN/server.log" 2>&1 &
PID=$!
cleanup() {
  kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  docker ps -aq --filter "label=sandboxd.instance=$INSTANCE" | xargs -r -n1 docker rm -f >/dev/null  # one at a time: see scripts/engine-watchdog.sh
  "$ROOT/scripts/egress-cleanup.sh" "$INSTANCE" || true
  # Workspace file systems the run made (loop mounts), deepest first.
  findmnt -rn -o TARGET | grep "^$RUN/" | sort -r | xargs -r -n1 umount -l || true
  rm -rf "$RUN"
}
trap cleanup EXIT

BASE="http://127.0.0.1:$PORT"
for _ in $(seq 100); do
  curl -fsS "$BASE/api/v1/health" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS -H "X-API-Token: $SANDBOXD_API_TOKEN" "$BASE/api/v1/openapi.json" -o "$RUN/openapi.json"
"$VENV/bin/openapi-spec-validator" "$RUN/openapi.json" "$ROOT/docs/openapi.json"
cp "$ROOT/tests/schemathesis.toml" "$RUN/"
printf '"%s"\n' "$RUN/volumes/v" >"$RUN/volumes.dict"
(cd "$WORK" && timeout 300 "$VENV/bin/schemathesis" --no-color \
  --config-file "$RUN/schemathesis.toml" run "$RUN/openapi.json" --url "$BASE" \
  --report junit --report-junit-path "$WORK/junit.xml")
