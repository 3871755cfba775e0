#!/usr/bin/env bash
# The storage quota under a sustained flood: a gateway with `storage.max_bytes` set takes
# telemetry from 200 devices, each as fast as the default rate limit lets it (50 msg/s, 10,000
# msg/s in all), for the given time; every 5 s the script samples the database file's size.
# It prints the largest and the last size against the quota, the samples above 1.1x, the largest
# per minute, and how many rows the quota removed (oldest first).
# Usage: bench/quota.sh [seconds] [max_bytes in MiB]   (default 600 s, 16 MiB)
# Needs: cargo build --release -p fleetgate -p fleetgate-sim --bins
# Loopback only; every process is started and stopped by its pid; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
mib=${2:-16}
source bench/lib.sh

mqtt=127.0.0.1:18870
http=127.0.0.1:18871
cat > "$work/gw.toml" <<TOML
[mqtt]
listen = "$mqtt"
[http]
listen = "$http"
[storage]
data_dir = "$work/data"
max_bytes = $((mib * 1024 * 1024))
TOML

serve_gateway
"$bin/fleetgate-sim" load --mqtt "$mqtt" --api "http://$http" --devices 200 --rate 50 \
  --duration "${seconds}s" --connect-rate 200 --json "$work/load.json" > "$work/sim.log" 2>&1 &
sim=$!
db="$work/data/fleetgate.redb"
max=0
samples=0
start=$SECONDS
end=$((SECONDS + seconds + 60))
while kill -0 "$sim" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do
  size=$(stat -c %s "$db")
  [ "$size" -gt "$max" ] && max=$size
  samples=$((samples + 1))
  echo "$((SECONDS - start)) $size" >> "$work/sizes"
  sleep 5
done
wait "$sim" || { echo "the load failed:" >&2; cat "$work/sim.log" >&2; exit 1; }
sim=
last=$(stat -c %s "$db")
metrics=$(curl -sf "http://$http/metrics")
rows=$(echo "$metrics" | awk '/^fleetgate_storage_quota_rows_total/ {print $2}')
trims=$(echo "$metrics" | awk '/^fleetgate_storage_quota_trims_total/ {print $2}')
stored=$(api "http://$http/api/v1/ingest" | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored"]["telemetry"])')
python3 - "$mib" "$max" "$last" "$samples" "$seconds" "$stored" "${rows:-0}" "${trims:-0}" "$work/sizes" <<'PY'
import sys
mib, largest, last, samples, seconds, stored = map(int, sys.argv[1:7])
rows, trims = float(sys.argv[7]), float(sys.argv[8])
series = [tuple(map(int, l.split())) for l in open(sys.argv[9])]
quota = mib * 1024 * 1024
print(f"quota {mib} MiB, {seconds} s of flood, {samples} samples of the file size")
print(f"telemetry stored: {stored} ({stored / seconds:.0f} msg/s)")
print(f"largest file: {largest / 2**20:.2f} MiB = {largest / quota:.3f} x the quota")
print(f"last file:    {last / 2**20:.2f} MiB = {last / quota:.3f} x the quota")
print(f"removed by the quota: {rows:.0f} rows in {trims:.0f} trims")
over = [t for t, size in series if size > 1.1 * quota]
print(f"samples above 1.1 x the quota: {len(over)} of {len(series)}"
      + (f", at {', '.join(f'{t} s' for t in over[:10])}" if over else ""))
second = [size for t, size in series if t >= seconds / 2]
if second:
    print(f"largest in the second half: {max(second) / 2**20:.2f} MiB = {max(second) / quota:.3f} x the quota")
print("file size (MiB) per minute: " + " ".join(
    f"{max(size for t, size in series if m * 60 <= t < (m + 1) * 60) / 2**20:.1f}"
    for m in range(seconds // 60) if any(m * 60 <= t < (m + 1) * 60 for t, _ in series)))
PY
kill -TERM "$gw"; wait "$gw" || true; gw=
