#!/usr/bin/env bash
# Gateway memory with drift on: N simulated devices running one model version whose baseline
# has F features, spread over C cohorts, each device sending S input samples per second.
# Usage: bench/drift-memory.sh [devices] [features] [cohorts] [samples per message]
#   (default 1000 16 20 10)
# Each row runs on a fresh gateway (fresh data directory) for 40 s and samples its RSS after
# 30 s: the same raw-sample traffic without a baseline (no drift work), with one, and with
# devices sending counts per baseline bin instead of raw samples.
# Needs: cargo build --release -p fleetgate -p fleetgate-sim
# Loopback only; every process is started and stopped by its pid; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-1000}
features=${2:-16}
cohorts=${3:-20}
samples=${4:-10}
source bench/lib.sh

release_key
mqtt=127.0.0.1:18832
http=127.0.0.1:18082
export FLEETGATE_URL="http://$http"

# The model the simulator runs (sim-model 1.0.0) and its baseline: standard normal features,
# classes 70/20/10 %, confidence 0.9, like the simulated devices.
head -c 65536 /dev/urandom > "$work/model.tflite"
"$bin/fleetgate" bundle sign "$work/model.tflite" --kind model --name sim-model --version 1.0.0 \
  --release 1 --class sim-mcu --key "$work/release.key" --out "$work/model.fgb" > /dev/null
python3 - "$features" > "$work/reference.csv" <<'PY'
import random, sys
f = int(sys.argv[1]); rng = random.Random(7)
print(",".join([f"f{i}" for i in range(f)] + ["prediction", "confidence"]))
for i in range(20000):
    c = 0 if i % 10 < 7 else 1 if i % 10 < 9 else 2
    print(",".join([f"{rng.gauss(0, 1):.6f}" for _ in range(f)] + [str(c), "0.9"]))
PY
"$bin/fleetgate" baseline build "$work/reference.csv" --prediction prediction --confidence confidence \
  --out "$work/baseline.json" > /dev/null

# A fresh gateway with the model registered (and its baseline set when $1 is "yes").
start_gateway() {
  rm -rf "$work/data"
  cat > "$work/gw.toml" <<TOML
[mqtt]
listen = "$mqtt"
max_connections = $((devices + 100))
[http]
listen = "$http"
[storage]
data_dir = "$work/data"
[registry]
trusted_keys = ["$key"]
[drift]
cohort_label = "site"
TOML
  serve_gateway
  "$bin/fleetgate" registry upload "$work/model.fgb" > /dev/null
  [ "$1" = yes ] && "$bin/fleetgate" baseline upload sim-model 1.0.0 "$work/baseline.json" > /dev/null
  "$bin/fleetgate-sim" enroll --api "http://$http" --devices "$devices" --prefix drift \
    --spread "site=$cohorts" --save-credentials "$work/creds.csv" > /dev/null
  sleep 1
}

stop_gateway() {
  kill -TERM "$gw"
  wait "$gw" || true
  gw=
}

echo "| devices x features | cohorts | baseline | inputs | sample-features/s | RSS before (MiB) | RSS at 30 s (MiB) | drift streams | windows closed | telemetry stored | lost |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for row in "no raw" "yes raw" "yes bins"; do
  read -r baseline mode <<< "$row"
  start_gateway "$baseline"
  before=$(rss)
  args=(--features "$features" --samples "$samples")
  [ "$mode" = bins ] && args+=(--bins)
  "$bin/fleetgate-sim" run --mqtt "$mqtt" --devices "$devices" --rate 1 --duration 40s --alert-every 0 \
    --connect-rate 500 --credentials "$work/creds.csv" "${args[@]}" > "$work/sim.log" 2>&1 &
  sim=$!
  sleep 30
  now=$(rss)
  wait "$sim" || { echo "simulator run failed:" >&2; cat "$work/sim.log" >&2; exit 1; }
  sim=
  streams=$(api "http://$http/api/v1/drift" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  closed=0
  if [ "$baseline" = yes ]; then
    closed=$(api "http://$http/api/v1/drift/sim-model/1.0.0/history?limit=10000" \
      | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
    closed="$closed (all)"
  fi
  read -r stored lost < <(api "http://$http/api/v1/ingest" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["stored"]["telemetry"], d["telemetry_lost"])')
  echo "| $devices x $features | $cohorts | $baseline | $mode | $((devices * features * samples)) | $((before / 1024)) | $((now / 1024)) | $streams | $closed | $stored | $lost |"
  stop_gateway
done
