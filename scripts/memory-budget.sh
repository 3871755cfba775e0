#!/usr/bin/env bash
# Measures the gateway's resident memory against connected devices and telemetry rate.
# Usage: scripts/memory-budget.sh [device counts...]   (default: 0 100 1000)
# Each count runs twice: idle (one message per device every 1000 s) and at one message per
# second per device; RSS is sampled 10 s after every device is connected.
# Needs release builds: cargo build --release -p fleetgate -p fleetgate-sim
# Everything runs on loopback; every process is started and stopped by its pid.
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("${@:-0 100 1000}")
[ $# -eq 0 ] && counts=(0 100 1000)
source bench/lib.sh

mqtt=127.0.0.1:18830
http=127.0.0.1:18080
cat > "$work/gw.toml" <<TOML
[mqtt]
listen = "$mqtt"
max_connections = 20000
[http]
listen = "$http"
[storage]
data_dir = "$work/data"
TOML
serve_gateway
max=${counts[-1]}
# Enroll the largest fleet once; smaller runs use the first n credentials.
"$bin/fleetgate-sim" enroll --api "http://$http" --devices "$max" --prefix mem --save-credentials "$work/creds.csv"
sleep 1
echo "| devices | telemetry/s | gateway RSS (MiB) | per device (KiB) |"
echo "|---|---|---|---|"
base=$(rss)
echo "| 0 | 0 | $((base / 1024)) | - |"
for n in "${counts[@]}"; do
  [ "$n" -eq 0 ] && continue
  for rate in 0.001 1; do
    "$bin/fleetgate-sim" run --mqtt "$mqtt" --devices "$n" --rate "$rate" --duration 300s --alert-every 0 \
      --connect-rate 1000 --credentials "$work/creds.csv" > "$work/sim.log" 2>&1 &
    sim=$!
    # Every device connected (bounded), then 10 s of steady state before the sample.
    for _ in $(seq 1200); do
      up=$(connected "$http")
      [ "$up" -ge "$n" ] && break
      sleep 0.1
    done
    [ "$up" -ge "$n" ] || { echo "only $up of $n devices connected" >&2; exit 1; }
    sleep 10
    now=$(rss)
    kill -INT "$sim" 2>/dev/null || true
    wait "$sim" || true
    sim=
    tps=$(python3 -c "print(round($n * $rate))")
    echo "| $n | $tps | $((now / 1024)) | $(( (now - base) / n )) |"
    # Let the sessions close before the next run.
    for _ in $(seq 600); do
      up=$(connected "$http")
      [ "$up" -eq 0 ] && break
      sleep 0.1
    done
  done
done
kill -TERM "$gw"; wait "$gw" || true; gw=
