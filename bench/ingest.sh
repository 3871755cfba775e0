#!/usr/bin/env bash
# Durable ingest side by side (issue 11): the same QoS 1 clients against Mosquitto (plus a
# subscriber that counts what it forwards), bare embedded rumqttd (plus the same subscriber) and
# the fleetgate gateway with `ingest.ack = "commit"` (a PUBACK means the message is committed to
# disk), in one run, each broker pinned to core 0 and the simulated devices to core 1:
#
#   burst-100x1000   100 devices flush 1,000 messages each at once (fleetgate-sim burst)
#   burst-1000x100   1,000 devices flush 100 messages each at once
#   paced-10000      10,000 devices at RATE msg/s each for DURATION (fleetgate-sim load)
#   saturation       the gateway alone: 10,000 paced devices, 0.8 msg/s each, x1.25 every 20 s
#                    step until it falls 5 % behind or its PUBACK p99 passes 1 s (stress)
#
# Bursts are QoS 1 with rumqttc's in-flight window of 100, each device as fast as its window
# allows. Every broker starts afresh for every run (the gateway on the same data dir, with the
# 10,000 devices enrolled once at the start). A burst lasts about a second, so each is run
# REPEAT times, the three brokers taking turns, and the figures are medians (rates also with
# their range). Before each run the script waits (at most about two minutes) until both cores
# are at least 90 % idle, as other work on a shared machine would take a core from the broker or
# the simulator unnoticed; the idle share is printed with each run. The paced scenario runs
# once. Prints, per broker and scenario: acknowledged msg/s (bursts: first publish to last
# PUBACK; paced: over the phase, or until the last PUBACK if later), stored (gateway) or delivered
# (bare brokers) msg/s, PUBACK p50 and p99, acknowledged-but-lost (the gateway: acknowledged
# minus stored, and every acknowledged sequence number looked up through its API with
# --verify; the bare brokers: each acknowledged number looked up at the subscriber), the
# broker's CPU over the burst or phase (--broker-pid, from /proc) and its peak RSS (VmHWM); then
# the ratio of the gateway's durable rate to Mosquitto's forwarding rate per scenario (median of
# the runs' ratios, each run paired with Mosquitto's run of the same turn). The simulator's own
# CPU is printed too: near a whole core, the load generator may have set the pace.
#
# Telemetry is JSON as the simulator's devices send it (hardware and model figures, 326 bytes):
# issue 11 measured JSON of about 130 bytes; the simulator's message is the smallest it makes,
# and a larger one costs the gateway (which decodes it) more than the bare brokers.
#
# The paced rate defaults to 1 msg/s per device, 10,000 msg/s offered in all: high (above the
# 7,600 msg/s the gateway sustained with 10,000 devices before issue 11) but sustainable for all
# three brokers, and near half of where the gateway saturates with 10,000 devices (the
# saturation ramp; on the BENCHMARKS.md machine its last good step was 15,600 msg/s), so the
# ramp's first steps and this scenario answer the "PUBACK p99 under 50 ms at half the
# saturation rate" target.
#
# Usage: [KEEP=DIR] [GW_CONFIG=FILE] [SCENARIOS=...] [BROKERS=...] bench/ingest.sh
#            [paced rate per device] [paced duration] [repeat]      (default 1 30s 5)
#   KEEP       keeps every run's report in DIR
#   GW_CONFIG  runs the gateway on FILE's settings (a preset such as
#              packaging/presets/512mb.toml, or any overlay) under the benchmark's own:
#              addresses, data dir, max_connections, the per-device limits, ingest.ack
#   SCENARIOS  some of: burst-100x1000 burst-1000x100 paced-10000 saturation (default: all)
#   BROKERS    some of: mosquitto rumqttd gateway (default: all)
# Needs release builds:
#   cargo build --release -p fleetgate -p fleetgate-sim --bins --example bare-rumqttd
# Installs Mosquitto if it is missing. Loopback only; every process is started and stopped by
# its pid; every run is bounded (the simulator's timeouts, and `timeout` around each run).
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1}
duration=${2:-30s}
repeat=${3:-5}
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
read -r -a scenarios <<< "${SCENARIOS:-burst-100x1000 burst-1000x100 paced-10000 saturation}"
read -r -a brokers <<< "${BROKERS:-mosquitto rumqttd gateway}"
port=18870
http=127.0.0.1:18879

# start_broker <broker>: starts it on core 0; its pid in `broker` (the gateway's also in `gw`).
start_broker() {
  case $1 in
    mosquitto) taskset -c 0 "$mosquitto" -c "$work/mosquitto.conf" >> "$work/mosquitto.log" 2>&1 &
      broker=$! ;;
    rumqttd) taskset -c 0 "$bin/examples/bare-rumqttd" "127.0.0.1:$port" $((devices + 100)) \
      >> "$work/rumqttd.log" 2>&1 &
      broker=$! ;;
    gateway) serve_gateway taskset -c 0; broker=$gw ;;
  esac
  await_port "$port"
}
# run <scenario> <broker> <n>: one run of the scenario's clients on core 1 against a fresh
# broker; the report goes to $work/<scenario>-<broker>-<n>.{json,txt}, the broker's peak RSS
# (KiB) to .rss.
run() {
  local scenario=$1 name=$2 out="$work/$1-$2-$3" args target
  case $scenario in
    burst-100x1000) args=(burst --devices 100 --messages 1000 --timeout 120s) ;;
    burst-1000x100) args=(burst --devices 1000 --messages 100 --timeout 120s) ;;
    paced-10000) args=(load --devices "$devices" --rate "$rate" --duration "$duration" --linger 10s) ;;
  esac
  case $name in
    mosquitto) target=(--target mqtt --prefix mq) ;;
    rumqttd) target=(--target mqtt --prefix rq) ;;
    gateway) target=(--target gateway --api "http://$http" --credentials "$work/creds.csv" --verify) ;;
  esac
  # Other work on the machine would take the broker's or the simulator's core unnoticed.
  await_quiet 90
  echo "$idle" > "$out.idle"
  start_broker "$name"
  timeout 900 taskset -c 1 "$bin/fleetgate-sim" "${args[@]}" "${common[@]}" --drain 30s \
    --mqtt "127.0.0.1:$port" --broker-pid "$broker" --json "$out.json" "${target[@]}" \
    > "$out.txt" 2>&1 || true
  peak_rss "$broker" > "$out.rss"
  stop_pid "$broker"; broker=; gw=
  echo "   $scenario $name run $3 (idle $idle %): $(grep -E '^(acked|stored|delivered|lost):' "$out.txt" \
    | sed -E 's/publish->PUBACK //; s/ \(each acknowledged.*\)//; s/ \(acknowledged minus.*\)//' | tr '\n' ' ' | cut -c1-300)"
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
if [ -n "${GW_CONFIG:-}" ]; then
  # FILE's settings, with the ones above over them.
  python3 - "$GW_CONFIG" "$work/gw.toml" <<'PY'
import json, sys, tomllib
preset, bench = (tomllib.load(open(p, "rb")) for p in sys.argv[1:3])
def merge(a, b):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge(a[k], v)
        else:
            a[k] = v
    return a
def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
def write(table, path, out):
    plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if path:
        out.append(f"[{'.'.join(path)}]")
    out.extend(f"{k} = {value(v)}" for k, v in plain.items())
    for k, v in table.items():
        if isinstance(v, dict):
            write(v, path + [k], out)
out = []
write(merge(preset, bench), [], out)
open(sys.argv[2], "w").write("\n".join(out) + "\n")
PY
  echo "== the gateway runs $GW_CONFIG's settings under the benchmark's"
fi

echo "== enrolling $devices devices"
serve_gateway taskset -c 0
await_port "$port"
t=$(date +%s)
"$bin/fleetgate-sim" enroll --api "http://$http" --devices "$devices" --prefix gw \
  --save-credentials "$work/creds.csv" > /dev/null
echo "   enrolled in $(( $(date +%s) - t )) s"
stop_pid "$gw"; gw=

echo "== Mosquitto $({ "$mosquitto" -h 2>/dev/null || true; } | head -n 1 | awk '{print $3}'), bare rumqttd $(grep -A1 'name = "rumqttd"' Cargo.lock | awk -F'"' '/version/ {print $2}'), fleetgate gateway (ingest.ack = \"commit\")"
# The gateway alone: 10,000 paced devices, the rate raised step by step.
saturation() {
  echo "== saturation: the gateway alone, 10,000 paced devices"
  await_quiet 90
  echo "$idle" > "$work/saturation.idle"
  start_broker gateway
  timeout 1200 taskset -c 1 "$bin/fleetgate-sim" stress --devices "$devices" --rate 0.8 \
    --factor 1.25 --steps 6 --duration 20s --p99-limit 1s "${common[@]}" \
    --mqtt "127.0.0.1:$port" --api "http://$http" --credentials "$work/creds.csv" \
    --broker-pid "$gw" --json "$work/saturation.json" > "$work/saturation.txt" 2>&1 || true
  stop_pid "$gw"; gw=; broker=
}
for scenario in "${scenarios[@]}"; do
  if [ "$scenario" = saturation ]; then saturation; continue; fi
  n=$repeat
  [ "$scenario" = paced-10000 ] && n=1
  for i in $(seq "$n"); do
    for b in "${brokers[@]}"; do run "$scenario" "$b" "$i"; done
  done
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
# KEEP=DIR keeps every run's report (the work dir goes at exit).
if [ -n "${KEEP:-}" ]; then
  mkdir -p "$KEEP"
  cp "$work"/*.json "$work"/*.txt "$work"/*.rss "$work"/*.idle "$work/gw.toml" "$KEEP"/ 2>/dev/null || true
fi

python3 - "$work" "$repeat" "${scenarios[@]}" <<'PY'
import json, statistics, sys
work, repeat, scenarios = sys.argv[1], int(sys.argv[2]), [s for s in sys.argv[3:] if s != "saturation"]
brokers = ("mosquitto", "rumqttd", "gateway")

def one(scenario, broker, n):
    base = f"{work}/{scenario}-{broker}-{n}"
    try:
        r = json.load(open(base + ".json"))
    except (OSError, ValueError):
        return None
    rss = open(base + ".rss").read().strip()
    idle = int(open(base + ".idle").read().strip() or 0)
    p = r["burst"] if "burst" in r else r["steady"]
    i = p.get("ingest") or {}
    lat = p.get("ack_latency") or {}
    verify = r.get("verify") or {}
    return {
        "acked": p.get("acked_per_s"), "ingested": i.get("ingested_per_s"),
        "p50": lat.get("p50_ms"), "p99": lat.get("p99_ms"),
        "lost": i.get("acked_lost"), "missing": verify.get("missing"),
        "checked": verify.get("acked"),
        "cpu": (p.get("broker") or {}).get("cpu_pct"), "sim": p.get("clients_cpu_pct"),
        "rss": int(rss) / 1024 if rss else None,
        "connected": r["connect"]["connected"] == r["devices"],
        "idle": idle,
    }

def med(runs, key):
    v = [r[key] for r in runs if r[key] is not None]
    return statistics.median(v) if v else None

def rng(runs, key):
    v = [r[key] for r in runs if r[key] is not None]
    return f"{min(v):.0f}-{max(v):.0f}" if len(v) > 1 else ""

def f(v, fmt):
    return "-" if v is None else format(v, fmt)

print()
print("medians over the runs (rates also min-max); acked-but-lost: by counts / by number "
      "(gateway: every acknowledged number read back), summed over the runs; CPU: the broker's, "
      "sim: the simulator's, over the burst or phase; idle: the least idle share of the machine "
      "before a run")
print(f"{'scenario':15} {'broker':10} {'runs':>4} {'acked/s':>22} {'stored|delivered/s':>22} "
      f"{'p50 ms':>8} {'p99 ms':>8} {'acked-but-lost':>20} {'CPU %':>6} {'sim %':>6} {'RSS MiB':>8} "
      f"{'idle %':>6}")
table = {}
for s in scenarios:
    for b in brokers:
        runs = [x for n in range(1, repeat + 1) if (x := one(s, b, n))]
        table[(s, b)] = runs
        if not runs:
            continue
        lost = sum(r["lost"] or 0 for r in runs)
        if any(r["missing"] is not None for r in runs):
            lost = f"{lost} / {sum(r['missing'] or 0 for r in runs)} of {sum(r['checked'] or 0 for r in runs)}"
        acked = f"{f(med(runs, 'acked'), '.0f')} {rng(runs, 'acked')}"
        ingested = f"{f(med(runs, 'ingested'), '.0f')} {rng(runs, 'ingested')}"
        unconnected = "" if all(r["connected"] for r in runs) else "  (not every device connected)"
        print(f"{s:15} {b:10} {len(runs):4} {acked:>22} {ingested:>22} {f(med(runs, 'p50'), '8.1f')} "
              f"{f(med(runs, 'p99'), '8.1f')} {str(lost):>20} {f(med(runs, 'cpu'), '6.0f')} "
              f"{f(med(runs, 'sim'), '6.0f')} {f(med(runs, 'rss'), '8.1f')} "
              f"{min(r['idle'] for r in runs):6d}{unconnected}")
print()
for s in scenarios:
    g, m = table.get((s, "gateway"), []), table.get((s, "mosquitto"), [])
    ratios = [a["acked"] / b["ingested"] for a, b in zip(g, m) if a["acked"] and b["ingested"]]
    if ratios:
        spread = f" (runs {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"{s}: gateway durable (acked = committed) / Mosquitto forwarding = "
              f"{statistics.median(ratios):.2f}{spread}")

if "saturation" not in sys.argv[3:]:
    sys.exit(0)
try:
    r = json.load(open(f"{work}/saturation.json"))
except (OSError, ValueError) as e:
    print(f"saturation: no report ({e})")
    sys.exit(0)
idle = open(f"{work}/saturation.idle").read().strip()
print(f"\nsaturation of the gateway with 10,000 paced devices (idle {idle} % before the ramp):")
print(f"{'msg/s each':>10} {'offered/s':>10} {'stored/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
      f"{'gw CPU %':>8} {'sim %':>6} {'RSS MiB':>8}  verdict")
for s in r["steps"]:
    p, i = s["phase"], s["phase"].get("ingest") or {}
    lat, b = p.get("ack_latency") or {}, p.get("broker") or {}
    rss = b.get("resident_peak_bytes")
    print(f"{s['rate_per_device']:10.2f} {p['offered_per_s']:10.0f} {f(i.get('ingested_per_s'), '10.0f')} "
          f"{f(lat.get('p50_ms'), '8.1f')} {f(lat.get('p99_ms'), '8.1f')} {f(b.get('cpu_pct'), '8.0f')} "
          f"{f(p.get('clients_cpu_pct'), '6.0f')} {f(rss and rss / 2**20, '8.1f')}  {s['verdict']}")
good = r.get("last_good")
if good:
    print(f"last good step: {good['offered_per_s']:.0f} msg/s offered, {good['ingested_per_s']:.0f} stored")
PY
