#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests and the integration tests against a
# real Docker engine. Provisions the engine, the local test image and the shared test network.
set -euo pipefail
cd "$(dirname "$0")/.."
SANDBOXD_PROVISION_TEST_NETWORK=1 scripts/provision.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# Integration tests start real containers; 4 at a time keeps a 2-core engine responsive.
cargo test --locked -- --test-threads=4
# The HTTP contract: the OpenAPI document is valid and schemathesis (all checks, stateful
# phase, ~2 min) finds no difference between it and the binary.
cargo build --locked --bin sandboxd
scripts/contract.sh
# Stops and restarts the host's dockerd: never part of a plain `cargo test`.
SANDBOXD_TEST_STOPS_ENGINE=1 cargo test --locked --test engine_restart -- --ignored
# The swarm backend on a real 3-node swarm (scripts/swarm-lab.sh: three dockerd in network
# namespaces, ~2 s up). Its tests drain and kill nodes, so they run one at a time. The trap
# takes the lab down however this script ends.
export SWARMLAB_DIR="${TMPDIR:-/tmp}/sandboxd-swarm-lab"
trap 'scripts/swarm-lab.sh down >/dev/null 2>&1 || true; rm -rf "$SWARMLAB_DIR"' EXIT
scripts/swarm-lab.sh up-for-sandboxd
SANDBOXD_SWARM_LAB="$SWARMLAB_DIR" cargo test --locked --test swarm -- --ignored --test-threads=1
