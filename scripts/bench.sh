#!/usr/bin/env bash
# Prints sandboxd's end-to-end figures next to the raw Engine API (see benches/e2e.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
SANDBOXD_PROVISION_TEST_NETWORK=1 scripts/provision.sh
cargo bench --locked --bench e2e "$@"
