#!/usr/bin/env bash
# SIGKILL during a stream (issue 11): 10 devices stream 200 msg/s each, 2,000 msg/s in all, QoS 1,
# to the real gateway binary (`ingest.ack = "commit"`); at KILLS random moments the gateway is
# killed with SIGKILL and started again on the same data dir; the devices reconnect (jittered
# backoff from 100 ms) and go on. At the end `fleetgate-sim load --verify` reads every device's
# stored telemetry back through the API and looks up every sequence number that got a PUBACK:
# acknowledged but not stored must be 0. Messages in flight at a kill were never acknowledged
# and do not count (the device would send them again).
#
# The moments: after each restart the gateway runs for a random 0.5-3.5 s (bash's RANDOM,
# seeded with SEED) before the next kill; the kills stop at least 10 s before the stream ends,
# so the last figures are read from a running gateway.
#
# Usage: [ACK=receipt] bench/kill.sh [kills] [seed]   (default 20, and a seed from the clock;
#        printed). ACK=receipt runs the gateway with `ingest.ack = "receipt"`, which acknowledges
#        before the commit: what it acknowledged in the last moments before a kill is lost, and
#        the script shows how much.
# Needs: cargo build --release -p fleetgate -p fleetgate-sim --bins
# Loopback only; every process is started and stopped by its pid; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-20}
ack=${ACK:-commit}
seed=${2:-$(date +%s)}
source bench/lib.sh
for b in "$bin/fleetgate" "$bin/fleetgate-sim"; do
  [ -x "$b" ] || { echo "missing $b: cargo build --release -p fleetgate -p fleetgate-sim --bins" >&2; exit 1; }
done
RANDOM=$seed
devices=10
rate=200
# Long enough for every kill (each at most 3.5 s of running plus a restart) and 10 s more.
duration=$((kills * 4 + 20))
echo "kills $kills, seed $seed, $devices devices x $rate msg/s for ${duration}s, ingest.ack = \"$ack\"; load average $(cut -d' ' -f1-3 /proc/loadavg)"

mqtt=127.0.0.1:18890
http=127.0.0.1:18891
cat > "$work/gw.toml" <<TOML
[mqtt]
listen = "$mqtt"
[limits]
# Above the devices' rate: the limits do not interfere.
device_messages_per_second = 100000.0
device_burst = 100000
[http]
listen = "$http"
[storage]
data_dir = "$work/data"
[retention]
# Keep every message of the run, so that each acknowledged one can be looked up.
telemetry_per_device = 10000000
[ingest]
ack = "$ack"
TOML

serve_gateway
"$bin/fleetgate-sim" enroll --api "http://$http" --devices "$devices" --prefix kill \
  --save-credentials "$work/creds.csv" > /dev/null
"$bin/fleetgate-sim" load --mqtt "$mqtt" --api "http://$http" --credentials "$work/creds.csv" \
  --devices "$devices" --rate "$rate" --duration "${duration}s" --qos 1 --inflight 100 \
  --connect-rate 100 --linger 10s --drain 10s --verify --json "$work/sim.json" \
  > "$work/sim.txt" 2>&1 &
sim=$!
start=$(date +%s.%N)
elapsed() { python3 -c "print($(date +%s.%N) - $start)"; }
# Until the devices are connected (bounded), then the kills.
for _ in $(seq 100); do [ "$(connected "$http")" -ge "$devices" ] && break; sleep 0.1; done

done_kills=0
restarts=()
for _ in $(seq "$kills"); do
  # A random moment: 0.5 to 3.5 s after the last restart.
  sleep "$(printf '%d.%03d' $((RANDOM % 3)) $((RANDOM % 1000)))"
  sleep 0.5
  python3 -c "import sys; sys.exit(0 if $(elapsed) < $duration - 10 else 1)" || break
  kill -KILL "$gw"
  wait "$gw" 2>/dev/null || true
  done_kills=$((done_kills + 1))
  t=$(date +%s.%N)
  serve_gateway
  restarts+=("$(python3 -c "print(round($(date +%s.%N) - $t, 3))")")
done
echo "kills done: $done_kills; restart (exec to API up) s: ${restarts[*]:-}"

# The stream ends on its own (bounded by its duration, linger, drain and the read-back).
for _ in $(seq $(((duration + 300) * 10))); do kill -0 "$sim" 2>/dev/null || break; sleep 0.1; done
wait "$sim" || true
sim=
sed 's/^/    /' "$work/sim.txt" | grep -v '^ *$' | tail -n 12
echo "gateway log: $(grep -c ' ERROR ' "$work/gw.log" || true) ERROR lines, $(grep -c ' WARN ' "$work/gw.log" || true) WARN lines"
grep -E ' (ERROR|WARN) ' "$work/gw.log" | sed 's/^/    /' | sort | uniq -c | sort -rn | head -n 8 || true
status=0
python3 - "$work/sim.json" "$done_kills" <<'PY' || status=$?
import json, sys
r = json.load(open(sys.argv[1]))
kills = int(sys.argv[2])
s, v = r["steady"], r.get("verify")
print(f"offered {s['offered']}, acknowledged {s['acked']}, not acknowledged {s['unacked']} "
      f"(in flight at a kill), skipped while offline {s['skipped']}")
if not v:
    print("no read-back: " + "; ".join(r.get("notes", [])))
    sys.exit(1)
print(f"acknowledged {v['acked']}, stored {v['stored']}, acknowledged-but-lost {v['missing']}"
      f"{' e.g. ' + ', '.join(v['examples']) if v['examples'] else ''}, kills {kills}"
      f"{', unreadable devices: ' + '; '.join(v['errors']) if v['unreadable'] else ''}")
for n in r.get("notes", []):
    print("note: " + n)
sys.exit(0 if v["missing"] == 0 and v["unreadable"] == 0 else 1)
PY
stop_pid "$gw"; gw=
exit "$status"
