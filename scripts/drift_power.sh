#!/usr/bin/env bash
# The drift engine's power and false-alarm table (docs/drift.md): runs the engine itself with
# its default settings on seeded generated data and prints Markdown tables. Takes a few minutes
# in release mode. Extra arguments go to the example, e.g. `--runs 50 --windows 500` for a
# quicker, coarser table. The figures do not depend on the build profile.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -q -p fleetgate --example drift_power -- "$@"
