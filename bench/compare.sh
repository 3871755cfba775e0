#!/usr/bin/env bash
# Side-by-side ingest benchmark: the same QoS 1 load against Mosquitto (+ a subscriber that
# counts what it forwards), bare embedded rumqttd (+ the same subscriber) and the full fleetgate
# gateway (decode, validate, drift, store in redb). For each, `fleetgate-sim stress` raises the
# rate per device step by step until the broker falls behind, loses a message or its PUBACK
# p99 passes 1 s, and reports the last good step. Prints each saturation point and the ratios.
#
# Usage: bench/compare.sh [devices] [first rate per device] [factor] [steps] [step duration]
#        (default 10000 0.1 1.5 10 20s)
# Pinned like a small host: the broker on core 0, the simulated fleet on core 1 (taskset).
# Needs release builds:
#   cargo build --release -p fleetgate -p fleetgate-sim --bins --example bare-rumqttd
# Installs Mosquitto if it is missing. Loopback only; every process is started and stopped by
# its pid; every run is bounded by the ramp's steps and durations.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-10000}
rate=${2:-0.1}
factor=${3:-1.5}
steps=${4:-10}
duration=${5:-20s}
source bench/lib.sh
for b in "$bin/fleetgate" "$bin/fleetgate-sim" "$bin/examples/bare-rumqttd"; do
  [ -x "$b" ] || { echo "missing $b: cargo build --release -p fleetgate -p fleetgate-sim --bins --example bare-rumqttd" >&2; exit 1; }
done
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends mosquitto \
    || { apt-get update && apt-get install -y --no-install-recommends mosquitto; }
fi
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
# 10,000 clients need as many file descriptors on both sides: raise the soft limit to the hard.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((devices + 200)) ]; then
  echo "open files limited to $(ulimit -n): not enough for $devices devices" >&2
  exit 1
fi

port=18840
# stress <name> <target> <extra args...>: ramps against the broker on $port, writes $work/<name>.json
stress() {
  local name=$1 target=$2
  shift 2
  taskset -c 1 "$bin/fleetgate-sim" stress --target "$target" --mqtt "127.0.0.1:$port" \
    --devices "$devices" --connect-rate 1000 --rate "$rate" --factor "$factor" --steps "$steps" \
    --duration "$duration" --qos 1 --p99-limit 1s --json "$work/$name.json" "$@" \
    > "$work/$name.txt" 2>&1 || true
  sed 's/^/    /' "$work/$name.txt" | tail -n 25
}
stop_broker() {
  kill "$broker" 2>/dev/null || true
  wait "$broker" 2>/dev/null || true
  broker=
}
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $port" >&2
  exit 1
}

echo "== Mosquitto $("$mosquitto" -h 2>/dev/null | head -n 1 | awk '{print $3}')"
cat > "$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
max_connections -1
# The subscriber gets everything: no cap on its queue or in-flight window.
max_queued_messages 0
max_inflight_messages 0
persistence false
set_tcp_nodelay true
log_type error
CONF
taskset -c 0 "$mosquitto" -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
broker=$!
wait_port
stress mosquitto mqtt --prefix mq
stop_broker

port=18841
echo "== bare rumqttd (rumqttd $(grep -A1 'name = "rumqttd"' Cargo.lock | awk -F'"' '/version/ {print $2}'), ingest-sized log)"
taskset -c 0 "$bin/examples/bare-rumqttd" "127.0.0.1:$port" $((devices + 100)) > "$work/rumqttd.log" 2>&1 &
broker=$!
wait_port
stress rumqttd mqtt --prefix rq
stop_broker

port=18842
http=127.0.0.1:18843
echo "== fleetgate gateway (full pipeline, default config but the limits below)"
cat > "$work/gw.toml" <<TOML
[mqtt]
listen = "127.0.0.1:$port"
max_connections = $((devices + 100))
per_source_connects_per_second = 100000.0
per_source_burst = 100000
[limits]
device_messages_per_second = 1000.0
device_burst = 1000
[http]
listen = "$http"
[storage]
data_dir = "$work/data"
TOML
serve_gateway taskset -c 0
broker=$gw
wait_port
stress gateway gateway --api "http://$http" --prefix gw
stop_broker
gw=

python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
rows = {}
for name in ("mosquitto", "rumqttd", "gateway"):
    try:
        r = json.load(open(f"{work}/{name}.json"))
    except (OSError, ValueError) as e:
        print(f"{name}: no report ({e})")
        continue
    good = r.get("last_good")
    rate = good["ingested_per_s"] or good["offered_per_s"] if good else 0.0
    last = r["steps"][-1] if r["steps"] else None
    why = "; ".join(str(x) for x in (last or {}).get("reasons", [])) or "ran out of steps"
    rows[name] = rate
    print(f"{name:10} saturation {rate:10.0f} msg/s  (devices {r['connect'].get('connected', '?')}, "
          f"stopped: {why})")
if "gateway" in rows:
    for other in ("mosquitto", "rumqttd"):
        if rows.get(other):
            print(f"gateway / {other}: {rows['gateway'] / rows[other]:.2f}")
PY
