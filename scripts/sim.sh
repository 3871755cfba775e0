#!/usr/bin/env bash
# Runs the writer's deterministic simulation over many seeds (CI runs a few dozen).
#
#   scripts/sim.sh [SEEDS] [FIRST]
#
# SEEDS seeds from FIRST (default 2000 from 0) for each of the two simulation tests; a failure
# prints its seed, which replays alone with FLEETGATE_SIM_SEED=<seed>.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLEETGATE_SIM_SEEDS="${1:-2000}"
export FLEETGATE_SIM_FIRST="${2:-0}"
start=$(date +%s)
cargo test -p fleetgate --lib ingest::sim:: -- --nocapture
echo "seeds ${FLEETGATE_SIM_FIRST}..$((FLEETGATE_SIM_FIRST + FLEETGATE_SIM_SEEDS)) passed in $(($(date +%s) - start)) s"
