#!/usr/bin/env bash
# Prints sandboxd's end-to-end figures next to the raw Engine API (see benches/e2e.rs).
# `scripts/bench.sh swarm` runs the swarm figures (on the 3-node lab, benches/support/swarm.rs);
# `scripts/bench.sh engines` create→running on Docker and Podman (benches/support/engines.rs);
# `scripts/bench.sh hibernate` pause, resume and a 100-sandbox fleet (benches/support/hibernation.rs);
# `scripts/bench.sh scale` 1,000 sandboxes on one host (SCALE_SANDBOXES=N for another count;
# benches/support/scale.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
SANDBOXD_PROVISION_TEST_NETWORK=1 scripts/provision.sh
# The load tool of the desired-state scenario (a separate process, on loopback only).
if ! command -v wrk >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
fi
# `engines`: Docker against Podman needs the Podman service.
if [[ " $* " == *" engines "* ]]; then
  SANDBOXD_PROVISION_TEST_NETWORK=1 scripts/provision-podman.sh
fi
# `swarm`: the swarm figures need the 3-node lab, up for the bench and down after it.
if [[ " $* " == *" swarm "* ]]; then
  export SWARMLAB_DIR="${TMPDIR:-/tmp}/sandboxd-swarm-lab"
  trap 'scripts/swarm-lab.sh down >/dev/null 2>&1 || true; rm -rf "$SWARMLAB_DIR"' EXIT
  scripts/swarm-lab.sh up-for-sandboxd
  export SANDBOXD_SWARM_LAB="$SWARMLAB_DIR"
fi
cargo bench --locked --bench e2e -- "$@"
