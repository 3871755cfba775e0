#!/usr/bin/env bash
# Reconnect storm with a rollout running: N devices are connected and in a rollout of
# sim-model 2.0.0 (its canary of 100 updating, the rest pending), the gateway stops (SIGTERM)
# and starts again on the same data dir, and every device reconnects and says hello at once.
# The script reports, per N, the time until every device is back and the gateway's CPU time
# over that interval, per device: constant per device means the storm costs O(N) in total.
# Usage: bench/storm.sh [device counts...]   (default: 2500 5000 10000)
# Needs: cargo build --release -p fleetgate -p fleetgate-sim --bins
# Loopback only; every process is started and stopped by its pid; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("$@")
[ $# -eq 0 ] && counts=(2500 5000 10000)
source bench/lib.sh
ulimit -n "$(ulimit -Hn)"
release_key
head -c 4096 /dev/urandom > "$work/model.tflite"
"$bin/fleetgate" bundle sign "$work/model.tflite" --kind model --name sim-model --version 2.0.0 \
  --release 2 --class sim-mcu --key "$work/release.key" --out "$work/model.fgb" > /dev/null

mqtt=127.0.0.1:18880
http=127.0.0.1:18881
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# CPU seconds (user and system) the gateway has used.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$gw/stat"; }
now() { date +%s.%N; }

printf '%8s %10s %12s %14s %16s\n' devices back_s cpu_s cpu_ms/device hellos_stored
for n in "${counts[@]}"; do
  rm -rf "$work/data" "$work/gw.log"
  cat > "$work/gw.toml" <<TOML
[mqtt]
listen = "$mqtt"
max_connections = $((n + 100))
per_source_connects_per_second = 100000.0
per_source_burst = 100000
[http]
listen = "$http"
[storage]
data_dir = "$work/data"
[registry]
trusted_keys = ["$key"]
[rollouts.policy]
stages = ["100", "100%"]
bake = "1h"
max_concurrent = 100
TOML
  serve_gateway
  export FLEETGATE_URL="http://$http"
  "$bin/fleetgate" registry upload "$work/model.fgb" > /dev/null
  rollback_key=$("$bin/fleetgate" rollout key)
  "$bin/fleetgate-sim" enroll --api "http://$http" --devices "$n" --prefix st \
    --save-credentials "$work/creds.csv" > /dev/null
  "$bin/fleetgate-sim" run --mqtt "$mqtt" --devices "$n" --credentials "$work/creds.csv" \
    --rate 0.1 --duration 900s --alert-every 0 --connect-rate 1000 --trust-key "$key" \
    --rollback-key "$rollback_key" > "$work/sim.log" 2>&1 &
  sim=$!
  for _ in $(seq 1200); do
    said=$(api "http://$http/api/v1/devices" | json 'sum(1 for x in d if x["models"])')
    [ "$said" -ge "$n" ] && break
    sleep 0.2
  done
  [ "$said" -ge "$n" ] || { echo "only $said of $n devices said hello" >&2; exit 1; }
  api -X POST -H 'Content-Type: application/json' "http://$http/api/v1/rollouts" \
    -d '{"kind": "model", "name": "sim-model", "version": "2.0.0", "all": true}' > /dev/null

  kill -TERM "$gw"; wait "$gw" || true
  serve_gateway
  t0=$(now); c0=$(cpu)
  for _ in $(seq 1200); do [ "$(connected "$http")" -ge "$n" ] && break; sleep 0.1; done
  # Every device back and its hello stored.
  for _ in $(seq 600); do
    hellos=$(api "http://$http/api/v1/ingest" | json 'd["stored"]["hello"]')
    [ "$hellos" -ge "$n" ] && break
    sleep 0.1
  done
  t1=$(now); c1=$(cpu)
  python3 - "$n" "$t0" "$t1" "$c0" "$c1" "$hellos" <<'PY'
import sys
n = int(sys.argv[1]); t0, t1, c0, c1 = map(float, sys.argv[2:6]); hellos = int(sys.argv[6])
print(f"{n:8d} {t1 - t0:10.2f} {c1 - c0:12.2f} {(c1 - c0) * 1000 / n:14.3f} {hellos:16d}")
PY
  stop_pid "$sim"; sim=
  kill -TERM "$gw"; wait "$gw" || true; gw=
done
