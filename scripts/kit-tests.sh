#!/usr/bin/env bash
# The clients' and operators' kit against the real binary (part of scripts/test.sh):
#  - the Python client (clients/python): type-checked with mypy --strict, then its pytest
#    suite against target/debug/sandboxd and the engine scripts/test.sh provisioned;
#  - the Prometheus alert rules (deploy/prometheus): promtool check + unit tests;
#  - the Grafana dashboard (deploy/grafana) and the rules: every metric they query is one
#    sandboxd exports on a live /metrics (clients/python/tests/test_deploy_kit.py).
# Installs its tools into target/ once (a venv; Debian's prometheus package for promtool).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/target/kit-venv"
REQ="httpx==0.28.1 websockets==15.0.1 pytest==8.3.4 pytest-asyncio==0.25.3 mypy==1.15.0"
if [ "$(cat "$VENV/.req" 2>/dev/null)" != "$REQ" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $REQ
  echo "$REQ" >"$VENV/.req"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall "$ROOT/clients/python"
echo "== the Python client: mypy --strict"
(cd "$ROOT/clients/python" && "$VENV/bin/mypy" --strict src tests)
echo "== the Python client: tests against the real binary"
(cd "$ROOT/clients/python" && SANDBOXD_BIN="${SANDBOXD_BIN:-$ROOT/target/debug/sandboxd}" "$VENV/bin/pytest" -q -p no:cacheprovider tests)
echo "== the alert rules: promtool check and unit tests"
command -v promtool >/dev/null || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q prometheus >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }
}
(cd "$ROOT/deploy/prometheus" && promtool check rules sandboxd-alerts.yml && promtool test rules sandboxd-alerts.test.yml)
