#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit tests and the integration tests against a
# real Docker engine. Provisions the engine, the local test image and the shared test network.
set -euo pipefail
cd "$(dirname "$0")/.."
SANDBOXD_PROVISION_TEST_NETWORK=1 scripts/provision.sh
# Containers of test instances (`t-<hex>`) that nothing removed: a test whose clean-up ran while
# the engine was wedged, or an earlier run that was killed. Removed one at a time.
sweep_test_containers() {
  docker ps -a --filter label=sandboxd.instance --format '{{.ID}} {{.Label "sandboxd.instance"}}' |
    awk '$2 ~ /^t-[0-9a-f]+$/ {print $1}' | xargs -r -n1 docker rm -f >/dev/null 2>&1 || true
}
sweep_test_containers
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# Integration tests start real containers; 4 at a time keeps a 2-core engine responsive.
# scripts/engine-watchdog.sh watches the engine meanwhile: dockerd 20.10.24 can deadlock in
# libnetwork (moby/moby#46661). When it had to restart a wedged engine (and kept its goroutine
# stacks), the tests that failed in that run are run once more, and must all pass; any other
# failure fails the suite as it is.
engine_log="$(mktemp)"
suite_log="$(mktemp)"
scripts/engine-watchdog.sh "$engine_log" &
watchdog=$!
trap 'kill "$watchdog" 2>/dev/null || true' EXIT
# True, after saying so, when the watchdog restarted a wedged engine since the last call.
engine_was_restarted() {
  [ -s "$engine_log" ] || return 1
  echo "== the engine had to be restarted during $1:"
  cat "$engine_log"
  : >"$engine_log"
}
set +e
cargo test --locked --no-fail-fast -- --test-threads=4 2>&1 | tee "$suite_log"
suite=${PIPESTATUS[0]}
set -e
if [ "$suite" -ne 0 ]; then
  engine_was_restarted "the suite" || exit "$suite"
  mapfile -t failed < <(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$suite_log" | sort -u)
  if [ "${#failed[@]}" -eq 0 ]; then
    echo "== ...and no single test is named as failed: the suite fails as it is"
    exit "$suite"
  fi
  echo "== running the ${#failed[@]} tests that failed meanwhile once more: ${failed[*]}"
  cargo test --locked --no-fail-fast -- --test-threads=4 --exact "${failed[@]}"
fi
# The same integration binary against Podman (`runtime: podman`, docs/podman.md): rootful,
# its own socket, provisioned here. Skipped by name, docker-only by design: gVisor (Podman
# 4.3 ignores a container's runtime: such profiles are refused), the old service's takeover
# (it ran on dockerd) and the image-event accelerator (Podman reports image loads unlike
# dockerd).
SANDBOXD_PROVISION_TEST_NETWORK=1 scripts/provision-podman.sh
podman_skips=(
  profiles::a_gvisor_profile_runs_under_runsc_and_serves_its_endpoint
  takeover::the_old_services_containers_are_taken_over_not_restarted
  retries::a_missing_image_is_used_as_soon_as_it_appears
)
skip_args=()
for t in "${podman_skips[@]}"; do skip_args+=(--skip "$t"); done
echo "== the integration tests against Podman (${#podman_skips[@]} skipped by name: ${podman_skips[*]})"
SANDBOXD_TEST_ENGINE=podman cargo test --locked --test integration -- --test-threads=4 --exact "${skip_args[@]}"
# The HTTP contract: the OpenAPI document is valid and schemathesis (all checks, stateful
# phase, ~2 min) finds no difference between it and the binary. The watchdog still watches;
# the same rule holds: one more run only after a recorded restart of a wedged engine.
cargo build --locked --bin sandboxd
: >"$engine_log"
if ! scripts/contract.sh; then
  engine_was_restarted "the contract check" || exit 1
  echo "== running the contract check once more"
  scripts/contract.sh
fi
# The Python client, the alert rules and the dashboard, against the same binary.
scripts/kit-tests.sh
# The next test stops the engine on purpose: the watchdog must not take that for a deadlock.
kill "$watchdog" 2>/dev/null || true
trap - EXIT
sweep_test_containers
# Stops and restarts the host's dockerd: never part of a plain `cargo test`.
SANDBOXD_TEST_STOPS_ENGINE=1 cargo test --locked --test engine_restart -- --ignored
# The swarm backend on a real 3-node swarm (scripts/swarm-lab.sh: three dockerd in network
# namespaces, ~2 s up). Its tests drain and kill nodes, so they run one at a time. The trap
# takes the lab down however this script ends.
export SWARMLAB_DIR="${TMPDIR:-/tmp}/sandboxd-swarm-lab"
trap 'scripts/swarm-lab.sh down >/dev/null 2>&1 || true; rm -rf "$SWARMLAB_DIR"' EXIT
scripts/swarm-lab.sh up-for-sandboxd
SANDBOXD_SWARM_LAB="$SWARMLAB_DIR" cargo test --locked --test swarm -- --ignored --test-threads=1
