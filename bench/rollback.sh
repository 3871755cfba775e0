#!/usr/bin/env bash
# Rollback benchmark: how long from the moment a health gate fails to the moment the last
# device of the stage has its rollback directive.
# Usage: bench/rollback.sh [devices in the stage] [control devices]   (default 1000 100)
# The stage's devices all install sim-model 2.0.0, which makes them send a hardware alert with
# every telemetry message (1 per second); the control devices stay on 1.0.0. The alert gate
# fails 20 s after it first sees the difference (`confirm`), when every device of the stage
# runs 2.0.0. The gateway's audit log stamps the decision; the simulator stamps each directive
# as it arrives (same clock: both run here).
# Needs: cargo build --release -p fleetgate -p fleetgate-sim
# Loopback only; every process is started and stopped by its pid; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-1000}
control=${2:-100}
devices=$((stage + control))
source bench/lib.sh

release_key
mqtt=127.0.0.1:18833
http=127.0.0.1:18083
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
max_concurrent = $devices
[rollouts.policy]
stages = ["$stage", "100%"]
bake = "1h"
max_concurrent = $devices
min_reporting = $stage
[rollouts.policy.gates]
window = "10s"
confirm = "20s"
min_samples = 20
TOML
serve_gateway
export FLEETGATE_URL="http://$http"
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

head -c 4096 /dev/urandom > "$work/model.tflite"
"$bin/fleetgate" bundle sign "$work/model.tflite" --kind model --name sim-model --version 2.0.0 \
  --release 2 --class sim-mcu --key "$work/release.key" --out "$work/model.fgb" > /dev/null
"$bin/fleetgate" registry upload "$work/model.fgb" > /dev/null
rollback_key=$("$bin/fleetgate" rollout key)

"$bin/fleetgate-sim" enroll --api "http://$http" --devices "$devices" --prefix rb \
  --save-credentials "$work/creds.csv" > /dev/null
"$bin/fleetgate-sim" run --mqtt "$mqtt" --devices "$devices" --credentials "$work/creds.csv" \
  --rate 1 --duration 600s --alert-every 0 --connect-rate 1000 --trust-key "$key" \
  --rollback-key "$rollback_key" --regress "sim-model@2.0.0:alerts=1" \
  --json "$work/report.json" > "$work/sim.log" 2>&1 &
sim=$!
for _ in $(seq 600); do
  said=$(api "http://$http/api/v1/devices" | json 'sum(1 for x in d if x["models"])')
  [ "$said" -ge "$devices" ] && break
  sleep 0.1
done
[ "$said" -ge "$devices" ] || { echo "only $said of $devices devices said hello" >&2; exit 1; }

id=$(api -X POST -H 'Content-Type: application/json' "http://$http/api/v1/rollouts" \
  -d '{"kind": "model", "name": "sim-model", "version": "2.0.0", "all": true}' | json 'd["rollout"]["id"]')
for _ in $(seq 1200); do
  state=$(api "http://$http/api/v1/rollouts/$id" | json 'd["state"]')
  [ "$state" != running ] && break
  sleep 0.1
done
[ "$state" = rolled_back ] || { echo "rollout ended $state" >&2; exit 1; }
# Every directive acknowledged, then the fleet stops and writes its report.
for _ in $(seq 600); do
  left=$(api "http://$http/api/v1/rollouts/$id" | json 'd["counts"].get("rollback_sent", 0)')
  [ "$left" -eq 0 ] && break
  sleep 0.1
done
api "http://$http/api/v1/rollouts/$id" > "$work/rollout.json"
api "http://$http/api/v1/rollouts/$id/audit?limit=1000" > "$work/audit.json"
kill -INT "$sim"; wait "$sim" || true; sim=
python3 - "$work/rollout.json" "$work/audit.json" "$work/report.json" "$stage" <<'PY'
import json, sys
from datetime import datetime
rollout, audit, report = (json.load(open(p)) for p in sys.argv[1:4])
stage = int(sys.argv[4])
at = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000
decided = next(at(e["at"]) for e in audit if e["event"] == "gate_failed")
sent = next(e for e in audit if e["event"] == "rollback_sent")
first, last = report["first_rollback_ms"], report["last_rollback_ms"]
print(f"| devices in the stage | directives | gate | decision -> first directive at a device | decision -> last directive at a device | rolled back (acked) | refused |")
print(f"|---|---|---|---|---|---|---|")
print(f"| {stage} | {sent['detail']['directives']} | {rollout['reason'].split()[1]} | {first - decided:.0f} ms | {last - decided:.0f} ms | {rollout['counts'].get('rolled_back', 0)} | {report['rollbacks']['rejected']} |")
PY
kill -TERM "$gw"; wait "$gw" || true; gw=
