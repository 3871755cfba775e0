#!/usr/bin/env bash
# Store-and-forward to an upstream MQTT broker: forwarding rate, and catch-up after an outage.
# A gateway forwards every telemetry message (uplink.forward.telemetry = "all") to a local
# Mosquitto while simulated devices send RATE messages/s in total:
#   1. steady: the upstream is up for STEADY seconds; the gateway's forwarded rate and its
#      outbox depth (it should stay near 0);
#   2. outage: the upstream is stopped (SIGTERM, by pid) for OUTAGE seconds while the devices
#      go on; the backlog grows in the gateway's outbox;
#   3. catch-up: the upstream starts again; the script times how long until the outbox is
#      empty again (the devices still sending), and reports the drain rate (forwarded
#      messages/s while catching up) and any message dropped (there should be none).
# Usage: bench/uplink.sh [outage seconds] [messages/s] [steady seconds]
#        (defaults 600, 1000, 60: a 10-minute outage at 1,000 messages/s)
# Needs: cargo build --release -p fleetgate -p fleetgate-sim --bins; mosquitto.
# Loopback only; every process is started and stopped by its pid; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
outage=${1:-600}
rate=${2:-1000}
steady=${3:-60}
source bench/lib.sh
upstream=; consumer=
cleanup_upstream() {
  for pid in ${consumer:-} ${upstream:-}; do kill "$pid" 2>/dev/null || true; done
  cleanup
}
trap cleanup_upstream EXIT

devices=100
per_device=$(python3 -c "print($rate / $devices)")
mqtt=127.0.0.1:18860
http=127.0.0.1:18861
up_port=18862
cat > "$work/gw.toml" <<TOML
[mqtt]
listen = "$mqtt"
[http]
listen = "$http"
[storage]
data_dir = "$work/data"
[uplink]
enabled = true
brokers = ["127.0.0.1:$up_port"]
site = "bench"
backoff_min = "200ms"
backoff_max = "1s"
[uplink.forward]
telemetry = "all"
TOML
# `user root`: as root, Mosquitto would otherwise switch to user mosquitto (no effect as
# anyone else). No persistence: only the gateway's outbox is measured.
cat > "$work/mosquitto.conf" <<CONF
listener $up_port 127.0.0.1
allow_anonymous true
user root
max_queued_messages 0
CONF
start_upstream() {
  mosquitto -c "$work/mosquitto.conf" >> "$work/mosquitto.log" 2>&1 &
  upstream=$!
  for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$up_port") 2>/dev/null && return; sleep 0.1; done
  echo "mosquitto did not start:" >&2; cat "$work/mosquitto.log" >&2; exit 1
}
stop_upstream() { kill -TERM "$upstream"; wait "$upstream" || true; upstream=; }
now() { date +%s.%N; }
# One value of /metrics (first line starting with $1), 0 if absent.
metric() {
  local text v
  text=$(curl -sf "http://$http/metrics" || true)
  v=$(awk -v m="$1 " 'index($0, m) == 1 { print $NF; exit }' <<< "$text")
  echo "${v:-0}"
}
depth() { metric 'fleetgate_outbox_depth{stream="upstream",destination="upstream"}'; }
forwarded() { metric 'fleetgate_uplink_forwarded_total'; }
dropped() { metric 'fleetgate_outbox_dropped_total{stream="upstream"}'; }
connected_up() { metric 'fleetgate_uplink_connected'; }

start_upstream
# A consumer of every site's events, as central operations would run (it resubscribes after
# the upstream's restart).
mosquitto_sub -h 127.0.0.1 -p "$up_port" -q 1 -t 'fleetgate/sites/+/up/#' > /dev/null 2>&1 &
consumer=$!
serve_gateway
"$bin/fleetgate-sim" enroll --api "http://$http" --devices "$devices" --prefix up \
  --save-credentials "$work/creds.csv" > /dev/null
total=$((steady + outage + 3600))
"$bin/fleetgate-sim" run --mqtt "$mqtt" --devices "$devices" --rate "$per_device" \
  --duration "${total}s" --alert-every 0 --credentials "$work/creds.csv" > "$work/sim.log" 2>&1 &
sim=$!
for _ in $(seq 300); do [ "$(connected "$http")" -ge "$devices" ] && break; sleep 0.1; done
for _ in $(seq 100); do [ "$(connected_up)" = 1 ] && break; sleep 0.1; done
[ "$(connected_up)" = 1 ] || { echo "the gateway did not connect upstream" >&2; cat "$work/gw.log" >&2; exit 1; }

echo "load: $devices devices x $per_device messages/s = $rate telemetry messages/s, QoS 1"
sleep 5 # the devices' first messages; the steady phase starts after them
f0=$(forwarded); t0=$(now); max_depth=0
for _ in $(seq "$steady"); do
  sleep 1
  d=$(depth); [ "$d" -gt "$max_depth" ] && max_depth=$d
done
f1=$(forwarded); t1=$(now)
python3 -c "print(f'steady: forwarded {($f1 - $f0) / ($t1 - $t0):.0f} messages/s over {$t1 - $t0:.0f} s, outbox depth at most $max_depth')"

stop_upstream
t_down=$(now)
for _ in $(seq 100); do [ "$(connected_up)" = 0 ] && break; sleep 0.1; done
sleep "$outage"
backlog=$(depth)
start_upstream
t_up=$(now)
f_up=$(forwarded)
python3 -c "print(f'outage: {$t_up - $t_down:.0f} s, backlog {$backlog} messages when the upstream came back')"
# Catch-up: at most 4x the outage (and 10 minutes more).
limit=$((outage * 40 + 6000))
for _ in $(seq "$limit"); do
  d=$(depth)
  # Caught up: the backlog is gone (what remains is what is in flight at this rate).
  [ "$d" -le $((rate / 2 + 100)) ] && break
  sleep 0.1
done
t_done=$(now)
f_done=$(forwarded)
d=$(depth)
python3 - "$t_up" "$t_done" "$f_up" "$f_done" "$backlog" "$d" "$(dropped)" "$rate" <<'PY'
import sys
t_up, t_done, f_up, f_done = map(float, sys.argv[1:5])
backlog, left, dropped, rate = (int(float(x)) for x in sys.argv[5:9])
took = t_done - t_up
print(f"catch-up: {took:.1f} s to forward the backlog of {backlog} messages while "
      f"{rate} messages/s kept coming ({left} left in flight)")
print(f"drain: {(f_done - f_up) / took:.0f} messages/s forwarded during the catch-up; "
      f"dropped: {dropped}")
PY
kill -INT "$sim" 2>/dev/null || true
wait "$sim" 2>/dev/null || true
sim=
