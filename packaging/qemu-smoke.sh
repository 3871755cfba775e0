#!/usr/bin/env bash
# Smoke test of an ARM package on this x86-64 machine: runs the packaged `fleetgate` (arm64 by
# default, or armhf) under qemu-user on loopback and drives it with simulated devices (the
# host build of `fleetgate-sim`). Checks the shipped config and presets, telemetry ingest
# through the API, and a staged rollout of a signed model bundle, created with the packaged
# CLI, that every simulated device installs.
# Usage: packaging/qemu-smoke.sh [arm64|armhf] [DEVICES]   (default arm64, 10 devices)
# Needs: packaging/build-debs.sh ARCH (the .deb under target/debian/); builds the host
# simulator itself (cargo build --release -p fleetgate-sim) and installs qemu-user if missing.
# Loopback only, with a temporary data directory and fresh ports; every process is started and
# stopped by its pid; every wait has a deadline. Exits non-zero on the first failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=arm64
case "${1:-}" in arm64 | armhf) arch=$1; shift ;; esac
devices=${1:-10}
case "$arch" in
  arm64) qemu=qemu-aarch64 sysroot=/usr/aarch64-linux-gnu loader=ld-linux-aarch64.so.1 cross=arm64 machine=b700 ;;
  armhf) qemu=qemu-arm sysroot=/usr/arm-linux-gnueabihf loader=ld-linux-armhf.so.3 cross=armhf machine=2800 ;;
esac
[ "$devices" -ge 4 ] || { echo "give at least 4 devices" >&2; exit 64; }
started=$SECONDS

say() { echo "== $* ($((SECONDS - started)) s)"; }
fail() {
  echo "FAIL: $*" >&2
  if [ -s "${work:-}/gw.log" ]; then
    echo "-- last lines of the gateway's log:" >&2
    tail -n 30 "$work/gw.log" >&2
  fi
  exit 1
}

target_dir=${CARGO_TARGET_DIR:-target}
deb=$(ls "$target_dir"/debian/fleetgate_*_"$arch".deb 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$deb" ] || fail "no $target_dir/debian/fleetgate_*_$arch.deb: run packaging/build-debs.sh $arch"
if ! command -v "$qemu" >/dev/null 2>&1 || [ ! -e "$sysroot/lib/$loader" ]; then
  say "installing qemu-user and the $arch C library"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(qemu-user "libc6-$cross-cross" "libgcc-s1-$cross-cross")
  "${sudo[@]}" apt-get install -y --no-install-recommends "${pkgs[@]}" \
    || { "${sudo[@]}" apt-get update && "${sudo[@]}" apt-get install -y --no-install-recommends "${pkgs[@]}"; }
fi
for tool in curl python3 dpkg-deb; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is needed"
done

say "building the host simulator"
cargo build --release --locked -p fleetgate-sim
sim_bin=$target_dir/release/fleetgate-sim

work=$(mktemp -d)
gw=
sim=
# Stop what is still running, by pid (an empty pid must not become `kill 0`).
cleanup() {
  for pid in ${sim:-} ${gw:-}; do kill "$pid" 2>/dev/null || true; done
  for pid in ${sim:-} ${gw:-}; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

say "unpacking $deb"
dpkg-deb -x "$deb" "$work/root"
gwcli() { "$qemu" -L "$sysroot" "$work/root/usr/bin/fleetgate" "$@"; }
file_type=$(od -An -tx1 -j18 -N2 "$work/root/usr/bin/fleetgate" | tr -d ' ')
[ "$file_type" = "$machine" ] || fail "usr/bin/fleetgate is not an $arch executable (e_machine $file_type)"
gwcli --version
for cfg in etc/fleetgate/fleetgate.toml usr/share/fleetgate/presets/512mb.toml \
  usr/share/fleetgate/presets/1gb.toml; do
  gwcli config check "$work/root/$cfg" > /dev/null || fail "$cfg does not pass fleetgate config check"
done

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
mqtt=127.0.0.1:$(free_port)
http=127.0.0.1:$(free_port)
[ "$mqtt" != "$http" ] || http=127.0.0.1:$(free_port)

say "signing a release ($arch CLI)"
gwcli keys generate --out "$work/release" > /dev/null
key=$(cat "$work/release.pub")
head -c 65536 /dev/urandom > "$work/model.tflite"
gwcli bundle sign "$work/model.tflite" --kind model --name sim-model --version 2.0.0 \
  --release 2 --class sim-mcu --key "$work/release.key" --out "$work/model.fgb" > /dev/null

# The shipped config (the 512 MB preset) with the release key trusted; addresses and data
# directory come from the command line.
sed "/^\[registry\]\$/a trusted_keys = [\"$key\"]" "$work/root/etc/fleetgate/fleetgate.toml" \
  > "$work/gw.toml"
grep -q "^trusted_keys = \[\"$key\"\]" "$work/gw.toml" || fail "no [registry] table in the shipped config"

say "starting the $arch gateway under $qemu (mqtt $mqtt, http $http)"
unset FLEETGATE_API_TOKEN
FLEETGATE_LOG=info "$qemu" -L "$sysroot" "$work/root/usr/bin/fleetgate" serve \
  --config "$work/gw.toml" --data-dir "$work/data" --mqtt-listen "$mqtt" --http-listen "$http" \
  > "$work/gw.log" 2>&1 &
gw=$!
deadline=$((SECONDS + 60))
until curl -sf "http://$http/healthz" > /dev/null; do
  kill -0 "$gw" 2>/dev/null || fail "the gateway exited"
  [ $SECONDS -lt $deadline ] || fail "the gateway did not answer /healthz within 60 s"
  sleep 0.2
done
[ -s "$work/data/api-token" ] || fail "no api-token in the data directory"
export FLEETGATE_API_TOKEN=$(cat "$work/data/api-token") FLEETGATE_URL="http://$http"
api() { curl -sf --max-time 20 -H "Authorization: Bearer $FLEETGATE_API_TOKEN" "http://$http/api/v1$1"; }
json() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

say "registering the bundle ($arch CLI)"
gwcli registry upload "$work/model.fgb" > /dev/null || fail "bundle upload refused"
rollback_key=$(gwcli rollout key)

say "enrolling and connecting $devices simulated devices (host simulator)"
"$sim_bin" enroll --api "http://$http" --devices "$devices" --prefix smoke \
  --save-credentials "$work/creds.csv" > /dev/null
"$sim_bin" run --mqtt "$mqtt" --devices "$devices" --credentials "$work/creds.csv" \
  --rate 4 --duration 300s --alert-every 0 --connect-rate 100 --trust-key "$key" \
  --rollback-key "$rollback_key" --json "$work/report.json" > "$work/sim.log" 2>&1 &
sim=$!

# Every device connected and its hello stored, then telemetry arriving.
deadline=$((SECONDS + 90))
while :; do
  said=$(api /devices | json 'sum(1 for x in d if x["models"])') || said=0
  [ "$said" -ge "$devices" ] && break
  kill -0 "$sim" 2>/dev/null || fail "the simulator exited: $(tail -n 5 "$work/sim.log")"
  [ $SECONDS -lt $deadline ] || fail "only $said of $devices devices said hello within 90 s"
  sleep 0.5
done
deadline=$((SECONDS + 60))
while :; do
  api /ingest > "$work/ingest.json" || fail "GET /api/v1/ingest failed"
  stored=$(json 'd["stored"]["telemetry"]' < "$work/ingest.json")
  [ "$stored" -ge $((devices * 10)) ] && break
  [ $SECONDS -lt $deadline ] || fail "only $stored telemetry messages stored within 60 s"
  sleep 0.5
done
python3 - "$work/ingest.json" "$devices" <<'PY' || fail "ingest counters"
import json, sys
d, n = json.load(open(sys.argv[1])), int(sys.argv[2])
problems = []
if d["mqtt"]["connected_devices"] != n:
    problems.append(f"connected_devices {d['mqtt']['connected_devices']}, expected {n}")
if any(d["mqtt"]["refused"].values()):
    problems.append(f"refused connections: {d['mqtt']['refused']}")
if any(d["rejected"].values()):
    problems.append(f"rejected messages: {d['rejected']}")
if d["telemetry_lost"] != 0:
    problems.append(f"telemetry lost: {d['telemetry_lost']}")
if d["storage"]["telemetry_rows"] < d["stored"]["telemetry"] // 2:
    problems.append(f"telemetry rows {d['storage']['telemetry_rows']} of {d['stored']['telemetry']} stored")
print(f"ingest: {n} devices connected, {d['stored']['telemetry']} telemetry messages stored, "
      f"latency p99 {d['latency']['p99_ms']} ms, nothing refused, rejected or lost")
for p in problems:
    print("  " + p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY

say "rolling sim-model 2.0.0 out to every device ($arch CLI)"
half=$((devices / 2))
cat > "$work/policy.toml" <<TOML
stages = ["$half", "100%"]
bake = "3s"
min_reporting = $half
[gates]
window = "3s"
confirm = "1s"
wait = "60s"
min_devices = 2
min_samples = 10
TOML
gwcli rollout create model sim-model 2.0.0 --all --policy "$work/policy.toml" > "$work/created.txt" \
  || fail "rollout create refused"
cat "$work/created.txt"
# "rollout ID: model sim-model 2.0.0 to N devices in 2 stages"
id=$(sed -n 's/^rollout \([0-9][0-9]*\): .*/\1/p' "$work/created.txt")
[ -n "$id" ] || fail "no rollout id in the CLI's answer"
grep -q " to $devices devices in 2 stages" "$work/created.txt" || fail "the rollout does not plan all $devices devices"
deadline=$((SECONDS + 240))
while :; do
  api "/rollouts/$id" > "$work/rollout.json" || fail "GET /api/v1/rollouts/$id failed"
  state=$(json 'd["state"]' < "$work/rollout.json")
  [ "$state" != running ] && break
  [ $SECONDS -lt $deadline ] || fail "rollout $id still running after 240 s: $(cat "$work/rollout.json")"
  sleep 1
done
[ "$state" = completed ] || fail "rollout $id ended $state: $(cat "$work/rollout.json")"
healthy=$(json 'd["counts"].get("healthy", 0)' < "$work/rollout.json")
[ "$healthy" -eq "$devices" ] || fail "rollout $id: $healthy of $devices devices healthy: $(cat "$work/rollout.json")"
deadline=$((SECONDS + 60))
while :; do
  on_new=$(api /devices | json 'sum(1 for x in d if x["models"] and x["models"][0]["version"] == "2.0.0")')
  [ "$on_new" -eq "$devices" ] && break
  [ $SECONDS -lt $deadline ] || fail "$on_new of $devices devices report sim-model 2.0.0"
  sleep 0.5
done
echo "rollout $id completed: $healthy of $devices devices healthy and running sim-model 2.0.0"

say "stopping"
kill -INT "$sim"
wait "$sim" || true
sim=
kill -TERM "$gw"
deadline=$((SECONDS + 60))
while kill -0 "$gw" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || fail "the gateway did not stop within 60 s of SIGTERM"
  sleep 0.2
done
code=0
wait "$gw" || code=$?
gw=
[ "$code" -eq 0 ] || fail "the gateway exited with $code after SIGTERM"
if grep -q 'panicked' "$work/gw.log"; then fail "the gateway's log shows a panic"; fi
echo "PASS: qemu smoke test of $(basename "$deb") in $((SECONDS - started)) s"
