#!/usr/bin/env bash
# Durable ingest side by side (issue 11): the same QoS 1 clients against Mosquitto (plus a
# subscriber that counts what it forwards), bare embedded rumqttd (plus the same subscriber) and
# the fleetgate gateway with `ingest.ack = "commit"` (a PUBACK means the message is committed to
# disk), in one run, each broker pinned to core 0 and the simulated devices to core 1:
#
#   burst-100x1000   100 devices flush 1,000 messages each at once (fleetgate-sim burst)
#   burst-1000x100   1,000 devices flush 100 messages each at once
#   paced-10000      10,000 devices at RATE msg/s each for DURATION (fleetgate-sim load)
#
# Bursts are QoS 1 with rumqttc's in-flight window of 100, each device as fast as its window
# allows. Every broker starts afresh for every scenario (the gateway on the same data dir, with
# the 10,000 devices enrolled once at the start). Prints, per broker and scenario: acknowledged
# msg/s (first publish to last PUBACK; paced: over the phase), stored (gateway) or delivered
# (bare brokers) msg/s, PUBACK p50 and p99, acknowledged-but-lost (the gateway: acknowledged
# minus stored, and every acknowledged sequence number looked up through its API with
# --verify; the bare brokers: each acknowledged number looked up at the subscriber), the
# broker's CPU over the burst or phase (--broker-pid, from /proc) and its peak RSS (VmHWM); then
# the ratio of the gateway's durable rate to Mosquitto's forwarding rate per scenario.
#
# Telemetry is JSON as the simulator's devices send it (hardware and model figures, 326 bytes):
# issue 11 measured JSON of about 130 bytes; the simulator's message is the smallest it makes,
# and a larger one costs the gateway (which decodes it) more than the bare brokers.
#
# The paced rate defaults to 2 msg/s per device, 20,000 msg/s offered in all: about half of the
# gateway's burst rate on this machine (so its PUBACK p99 there answers the "p99 < 50 ms at half
# saturation" target), above what the gateway of BENCHMARKS.md's earlier comparison sustained
# (7,600 msg/s), and below what one simulator core can offer 10,000 clients (25,600 msg/s).
#
# Usage: bench/ingest.sh [paced rate per device] [paced duration]   (default 2 30s)
# Needs release builds:
#   cargo build --release -p fleetgate -p fleetgate-sim --bins --example bare-rumqttd
# Installs Mosquitto if it is missing. Loopback only; every process is started and stopped by
# its pid; every run is bounded (the simulator's timeouts, and `timeout` around each run).
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-2}
duration=${2:-30s}
source bench/lib.sh
for b in "$bin/fleetgate" "$bin/fleetgate-sim" "$bin/examples/bare-rumqttd"; do
  [ -x "$b" ] || { echo "missing $b: cargo build --release -p fleetgate -p fleetgate-sim --bins --example bare-rumqttd" >&2; exit 1; }
done
find_mosquitto
devices=10000
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((devices + 200)) ]; then
  echo "open files limited to $(ulimit -n): not enough for $devices devices" >&2
  exit 1
fi
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# What every client sends: QoS 1 JSON telemetry.
common=(--qos 1 --inflight 100 --encoding json --connect-rate 1000)
scenarios=(burst-100x1000 burst-1000x100 paced-10000)
port=18870
http=127.0.0.1:18879

# sim_run <scenario> <broker> <broker pid> <sim args...>: runs the scenario's clients on core 1
# against the broker on $port; its report goes to $work/<scenario>-<broker>.{json,txt}.
sim_run() {
  local scenario=$1 name=$2 pid=$3
  shift 3
  local args
  case $scenario in
    burst-100x1000) args=(burst --devices 100 --messages 1000 --timeout 120s) ;;
    burst-1000x100) args=(burst --devices 1000 --messages 100 --timeout 120s) ;;
    paced-10000) args=(load --devices "$devices" --rate "$rate" --duration "$duration" --linger 10s) ;;
  esac
  local out="$work/$scenario-$name"
  timeout 900 taskset -c 1 "$bin/fleetgate-sim" "${args[@]}" "${common[@]}" --drain 30s \
    --mqtt "127.0.0.1:$port" --broker-pid "$pid" --json "$out.json" "$@" > "$out.txt" 2>&1 || true
  sed 's/^/    /' "$out.txt" | grep -v '^    *$' | tail -n 14
}

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
cat > "$work/gw.toml" <<TOML
[mqtt]
listen = "127.0.0.1:$port"
max_connections = $((devices + 100))
per_source_connects_per_second = 100000.0
per_source_burst = 100000
[limits]
# Far above what any device sends here: the limits do not interfere.
device_messages_per_second = 1000000.0
device_burst = 1000000
[http]
listen = "$http"
[storage]
data_dir = "$work/data"
[ingest]
ack = "commit"
TOML

echo "== enrolling $devices devices"
serve_gateway taskset -c 0
await_port "$port"
t=$(date +%s)
"$bin/fleetgate-sim" enroll --api "http://$http" --devices "$devices" --prefix gw \
  --save-credentials "$work/creds.csv" > /dev/null
echo "   enrolled in $(( $(date +%s) - t )) s"
stop_pid "$gw"; gw=

mosquitto_version=$({ "$mosquitto" -h 2>/dev/null || true; } | head -n 1 | awk '{print $3}')
rumqttd_version=$(grep -A1 'name = "rumqttd"' Cargo.lock | awk -F'"' '/version/ {print $2}')
for scenario in "${scenarios[@]}"; do
  echo "== $scenario: Mosquitto $mosquitto_version"
  taskset -c 0 "$mosquitto" -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
  broker=$!
  await_port "$port"
  sim_run "$scenario" mosquitto "$broker" --target mqtt --prefix mq
  echo "$(peak_rss "$broker")" > "$work/$scenario-mosquitto.rss"
  stop_pid "$broker"; broker=

  echo "== $scenario: bare rumqttd $rumqttd_version"
  taskset -c 0 "$bin/examples/bare-rumqttd" "127.0.0.1:$port" $((devices + 100)) > "$work/rumqttd.log" 2>&1 &
  broker=$!
  await_port "$port"
  sim_run "$scenario" rumqttd "$broker" --target mqtt --prefix rq
  echo "$(peak_rss "$broker")" > "$work/$scenario-rumqttd.rss"
  stop_pid "$broker"; broker=

  echo "== $scenario: fleetgate gateway (ingest.ack = \"commit\")"
  serve_gateway taskset -c 0
  await_port "$port"
  sim_run "$scenario" gateway "$gw" --target gateway --api "http://$http" \
    --credentials "$work/creds.csv" --verify
  echo "$(peak_rss "$gw")" > "$work/$scenario-gateway.rss"
  stop_pid "$gw"; gw=
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$work" "${scenarios[@]}" <<'PY'
import json, sys
work, scenarios = sys.argv[1], sys.argv[2:]
brokers = ("mosquitto", "rumqttd", "gateway")

def figures(scenario, broker):
    base = f"{work}/{scenario}-{broker}"
    try:
        r = json.load(open(base + ".json"))
    except (OSError, ValueError):
        return None
    rss = open(base + ".rss").read().strip()
    p = r["burst"] if "burst" in r else r["steady"]
    i = p.get("ingest") or {}
    acked_per_s, ingested_per_s = p.get("acked_per_s"), i.get("ingested_per_s")
    lat = p.get("ack_latency") or {}
    verify = r.get("verify")
    lost = i.get("acked_lost")
    if verify:
        lost = f"{lost} / {verify['missing']} of {verify['acked']}"
    return {
        "acked": p.get("acked"), "acked_per_s": acked_per_s, "ingested_per_s": ingested_per_s,
        "p50": lat.get("p50_ms"), "p99": lat.get("p99_ms"), "lost": lost,
        "cpu": (p.get("broker") or {}).get("cpu_pct"),
        "rss_mib": int(rss) / 1024 if rss else None,
        "connected": r["connect"]["connected"], "devices": r["devices"],
    }

def f(v, fmt):
    return "-" if v is None else format(v, fmt)

print()
print(f"{'scenario':15} {'broker':10} {'acked/s':>9} {'stored|delivered/s':>18} {'PUBACK p50':>10} "
      f"{'p99 (ms)':>9} {'acked-but-lost':>22} {'CPU %':>6} {'peak RSS MiB':>12} connected")
rates = {}
for s in scenarios:
    for b in brokers:
        x = figures(s, b)
        if x is None:
            print(f"{s:15} {b:10} no report")
            continue
        rates[(s, b)] = x
        print(f"{s:15} {b:10} {f(x['acked_per_s'], '9.0f')} {f(x['ingested_per_s'], '18.0f')} "
              f"{f(x['p50'], '10.2f')} {f(x['p99'], '9.2f')} {str(x['lost']):>22} "
              f"{f(x['cpu'], '6.0f')} {f(x['rss_mib'], '12.1f')} {x['connected']}/{x['devices']}")
print()
for s in scenarios:
    g, m = rates.get((s, "gateway")), rates.get((s, "mosquitto"))
    if g and m and g["acked_per_s"] and m["ingested_per_s"]:
        print(f"{s}: gateway durable (acked = committed) {g['acked_per_s']:.0f}/s / Mosquitto "
              f"forwarding {m['ingested_per_s']:.0f}/s = {g['acked_per_s'] / m['ingested_per_s']:.2f}")
PY
