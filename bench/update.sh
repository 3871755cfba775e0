#!/usr/bin/env bash
# Delivery benchmark: one signed bundle to a simulated fleet, over MQTT, on this machine.
# Usage: bench/update.sh [devices] [bundle MiB] [max concurrent downloads]
#   (default 1000 devices, 1 MiB, 1000 at once)
# Prints the time from the first offer to the last device reporting "installed", and the
# aggregate throughput. Needs: cargo build --release -p fleetgate -p fleetgate-sim
# Loopback only; every process is started and stopped by its pid; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-1000}
mib=${2:-1}
concurrent=${3:-1000}
source bench/lib.sh

release_key
mqtt=127.0.0.1:18831
http=127.0.0.1:18081
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
[updates]
max_concurrent = $concurrent
TOML
serve_gateway

head -c $((mib << 20)) /dev/urandom > "$work/model.tflite"
"$bin/fleetgate" bundle sign "$work/model.tflite" --kind model --name sim-model --version 2.0.0 \
  --release 2 --class sim-mcu --runtime 'tflm>=2.0.0' --key "$work/release.key" --out "$work/model.fgb" > /dev/null
"$bin/fleetgate" registry upload "$work/model.fgb" --url "http://$http" > /dev/null

"$bin/fleetgate-sim" enroll --api "http://$http" --devices "$devices" --prefix bench \
  --save-credentials "$work/creds.csv" > /dev/null
"$bin/fleetgate-sim" run --mqtt "$mqtt" --devices "$devices" --credentials "$work/creds.csv" \
  --rate 0.001 --duration 300s --alert-every 0 --connect-rate 1000 --trust-key "$key" > "$work/sim.log" 2>&1 &
sim=$!
for _ in $(seq 600); do
  online=$(api "http://$http/api/v1/devices?online=true" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  [ "$online" -ge "$devices" ] && break
  sleep 0.1
done
[ "$online" -ge "$devices" ] || { echo "only $online of $devices devices online" >&2; exit 1; }
# Devices say hello right after they connect; the offer goes to those that did.
sleep 1

rss_before=$(awk '/^VmRSS/ {print $2}' "/proc/$gw/status")
api -X POST -H 'Content-Type: application/json' "http://$http/api/v1/updates" \
  -d '{"kind": "model", "name": "sim-model", "version": "2.0.0", "all": true}' > "$work/plan.json"
started=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["started"]))' "$work/plan.json")
peak=0
for _ in $(seq 1200); do
  r=$(awk '/^VmRSS/ {print $2}' "/proc/$gw/status"); [ "$r" -gt "$peak" ] && peak=$r
  done_count=$(api "http://$http/api/v1/updates?limit=10000" | python3 -c '
import json,sys; t=json.load(sys.stdin); print(sum(1 for x in t if x["state"] in ("installed","failed","rejected","timed_out","cancelled")))')
  [ "$done_count" -ge "$started" ] && break
  sleep 0.1
done
api "http://$http/api/v1/updates?limit=10000" > "$work/transfers.json"
python3 - "$work/transfers.json" "$mib" "$started" "$rss_before" "$peak" <<'PY'
import json, sys
from datetime import datetime
t = json.load(open(sys.argv[1])); mib = int(sys.argv[2]); started = int(sys.argv[3])
parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
installed = [x for x in t if x["state"] == "installed"]
first = min(parse(x["created"]["at"]) for x in t)
last = max(parse(x["finished_at"]) for x in installed) if installed else first
secs = last - first
resent = sum(x["chunks_resent"] for x in t); offers = sum(x["offers"] for x in t)
others = sorted({f"{x['state']}: {x['reason']} ({x['detail']})" for x in t if x["state"] != "installed"})
print(f"devices updated: {len(installed)} of {started}; other outcomes: {others[:5]}")
if not installed:
    sys.exit(1)
print(f"time to deliver {mib} MiB to all: {secs:.2f} s; aggregate {len(installed) * mib / secs:.1f} MiB/s")
print(f"offers: {offers} (re-offers {offers - started}); chunks re-sent: {resent}")
print(f"gateway RSS: {int(sys.argv[4]) // 1024} MiB before, {int(sys.argv[5]) // 1024} MiB peak")
PY
kill -INT "$sim" 2>/dev/null || true; wait "$sim" 2>/dev/null || true; sim=
kill -TERM "$gw"; wait "$gw" || true; gw=
