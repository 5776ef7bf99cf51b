#!/usr/bin/env bash
# Runs sandboxd on its embedded defaults (SQLite file under var/, the local Docker socket).
# Provisions what it needs first: a Docker engine and the default sandbox image.
# Extra arguments go to `sandboxd serve` (e.g. --config config/sandboxd.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/provision.sh
cargo build --release --locked --bin sandboxd
exec target/release/sandboxd serve "$@"
