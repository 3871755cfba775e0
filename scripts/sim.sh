#!/usr/bin/env bash
# Runs the writer's deterministic simulation over many seeds (every test run runs 1,600 with
# chaos and 400 with and without).
#
#   scripts/sim.sh [SEEDS] [FIRST]
#
# SEEDS seeds from FIRST (default 10,000 from 0) for each of the two simulation tests (each split
# over its shards, which run side by side); a failure prints its seed, which replays alone with
# FLEETGATE_SIM_SEED=<seed>.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLEETGATE_SIM_SEEDS="${1:-10000}"
export FLEETGATE_SIM_FIRST="${2:-0}"
start=$(date +%s)
cargo test -p fleetgate --lib ingest::sim:: -- --nocapture
echo "seeds ${FLEETGATE_SIM_FIRST}..$((FLEETGATE_SIM_FIRST + FLEETGATE_SIM_SEEDS)) passed in $(($(date +%s) - start)) s"
