#!/usr/bin/env bash
# Prints sandboxd's end-to-end figures next to the raw Engine API (see benches/e2e.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
SANDBOXD_PROVISION_TEST_NETWORK=1 scripts/provision.sh
# The load tool of the desired-state scenario (a separate process, on loopback only).
if ! command -v wrk >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
fi
cargo bench --locked --bench e2e -- "$@"
