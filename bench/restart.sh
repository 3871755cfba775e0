#!/usr/bin/env bash
# Reconnect after a gateway restart: N simulated devices are connected, the gateway stops
# (SIGTERM) and starts again on the same data dir, and the script times how long until every
# device is connected again (the gateway's own count, GET /api/v1/ingest). The devices retry
# with jittered exponential backoff (100 ms doubling to 5 s).
# Usage: bench/restart.sh [devices]   (default 10000)
# Needs: cargo build --release -p fleetgate -p fleetgate-sim --bins
# Loopback only; every process is started and stopped by its pid; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
source bench/lib.sh
ulimit -n "$(ulimit -Hn)"

mqtt=127.0.0.1:18850
http=127.0.0.1:18851
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
TOML
now() { date +%s.%N; }

serve_gateway
"$bin/fleetgate-sim" enroll --api "http://$http" --devices "$n" --prefix rs \
  --save-credentials "$work/creds.csv" > /dev/null
"$bin/fleetgate-sim" run --mqtt "$mqtt" --devices "$n" --rate 0.01 --duration 900s \
  --alert-every 0 --connect-rate 1000 --credentials "$work/creds.csv" > "$work/sim.log" 2>&1 &
sim=$!
t=$(now)
for _ in $(seq 1200); do [ "$(connected "$http")" -ge "$n" ] && break; sleep 0.1; done
up=$(connected "$http")
[ "$up" -ge "$n" ] || { echo "only $up of $n devices connected" >&2; exit 1; }
echo "first connect: $n devices in $(python3 -c "print(round($(now) - $t, 2))") s (ramp 1000/s)"

t_stop=$(now)
kill -TERM "$gw"
wait "$gw" || true
t_start=$(now)
serve_gateway
t_up=$(now)
for _ in $(seq 1200); do [ "$(connected "$http")" -ge "$n" ] && break; sleep 0.1; done
t_all=$(now)
up=$(connected "$http")
python3 - "$n" "$up" "$t_stop" "$t_start" "$t_up" "$t_all" <<'PY'
import sys
n, up = int(sys.argv[1]), int(sys.argv[2])
stop, start, api_up, done = map(float, sys.argv[3:])
print(f"stop (SIGTERM to exit): {start - stop:.2f} s")
print(f"start (exec to API up): {api_up - start:.2f} s")
print(f"devices back: {up} of {n}, {done - api_up:.2f} s after the API was up, "
      f"{done - stop:.2f} s after the stop began")
PY
kill -INT "$sim" 2>/dev/null || true
wait "$sim" || true
sim=
kill -TERM "$gw"; wait "$gw" || true; gw=
