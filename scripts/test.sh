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
