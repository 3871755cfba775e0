#!/usr/bin/env bash
# Runs the README's quickstart end to end, with the files under examples/: a release key, a
# gateway that trusts it, 20 simulated pumps, two signed model releases with drift baselines,
# and a staged rollout of sim-model 2.0.0 that must complete with every pump running it.
# The commands are the README's, on free loopback ports and in a temporary directory.
#
#   scripts/quickstart.sh [--screenshots DIR]
#
# With --screenshots, headless Chromium (Debian's `chromium`) takes a picture of each
# dashboard page once the rollout completed (the README's screenshots come from this).
# Bounded: the rollout must complete within 6 minutes; everything runs on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
shots=
if [ "${1:-}" = --screenshots ]; then
  shots=$(realpath -m "${2:?give a directory}")
  mkdir -p "$shots"
fi
started=$SECONDS
say() { echo "== $* ($((SECONDS - started)) s)"; }

cargo build -q -p fleetgate -p fleetgate-sim
export PATH="$root/target/debug:$PATH"
work=$(mktemp -d)
gw=
sim=
cleanup() {
  for pid in $sim $gw; do kill "$pid" 2>/dev/null || true; done
  for pid in $sim $gw; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  tail -n 20 "$work/gateway.log" >&2 || true
  exit 1
}
cd "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mqtt=127.0.0.1:$(free_port)
http=127.0.0.1:$(free_port)
export FLEETGATE_URL=http://$http
unset FLEETGATE_API_TOKEN

say "a release key, and a gateway that trusts it"
fleetgate keys generate --out release >/dev/null
sed "s/REPLACE_WITH_RELEASE_KEY/$(cat release.pub)/" "$root/examples/gateway.toml" > gateway.toml
fleetgate serve --config gateway.toml --mqtt-listen "$mqtt" --http-listen "$http" \
  >gateway.out 2>gateway.log &
gw=$!
for _ in $(seq 1 100); do
  curl -sf "$FLEETGATE_URL/healthz" >/dev/null && break
  kill -0 "$gw" 2>/dev/null || fail "the gateway exited"
  sleep 0.1
done
export FLEETGATE_API_TOKEN=$(cat fleetgate-data/api-token)

say "20 simulated pumps that trust the release key and the gateway's rollback key"
fleetgate-sim run --scenario "$root/examples/fleet.toml" --duration 10m \
  --mqtt "$mqtt" --api "$FLEETGATE_URL" \
  --trust-key "$(cat release.pub)" --rollback-key "$(fleetgate rollout key)" >sim.log 2>&1 &
sim=$!

say "two signed releases of sim-model, registered; production names 2.0.0"
for spec in 1.0.0:1 2.0.0:2; do
  v=${spec%:*}
  fleetgate bundle sign "$root/examples/sim-model-$v.tflite" --kind model --name sim-model \
    --version "$v" --release "${spec#*:}" --class nrf5340-dk --runtime 'tflm>=2.14.0' \
    --lineage dataset=examples/reference.csv --key release.key --out "sim-model-$v.fgb"
  fleetgate bundle inspect "sim-model-$v.fgb" --trust release.pub >/dev/null
  fleetgate registry upload "sim-model-$v.fgb"
done
fleetgate registry alias model sim-model production 2.0.0

say "drift baselines from the reference data"
fleetgate baseline build "$root/examples/reference.csv" --prediction label --confidence confidence \
  --out baseline.json
fleetgate baseline upload sim-model 1.0.0 baseline.json
fleetgate baseline upload sim-model 2.0.0 baseline.json

deadline=$((SECONDS + 60))
until [ "$(fleetgate devices list --json | python3 -c 'import json,sys; print(sum(1 for d in json.load(sys.stdin) if d["online"] and d["models"]))')" = 20 ]; do
  kill -0 "$sim" 2>/dev/null || fail "the simulator exited: $(tail -n 5 sim.log)"
  [ $SECONDS -lt $deadline ] || fail "the 20 pumps did not all connect and say hello"
  sleep 1
done

say "a staged rollout of sim-model production to every pump"
fleetgate rollout create model sim-model production --all
deadline=$((SECONDS + 360))
while :; do
  state=$(fleetgate rollout show 1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [ "$state" != running ] && break
  [ $SECONDS -lt $deadline ] || fail "rollout 1 still running after 6 minutes: $(fleetgate rollout show 1)"
  sleep 2
done
fleetgate rollout show 1
[ "$state" = completed ] || fail "rollout 1 ended $state"
on_new=$(fleetgate devices list --json | python3 -c 'import json,sys; print(sum(1 for d in json.load(sys.stdin) if d["models"] and d["models"][0]["version"] == "2.0.0"))')
[ "$on_new" = 20 ] || fail "$on_new of 20 pumps run sim-model 2.0.0"

if [ -n "$shots" ]; then
  say "screenshots of the dashboard"
  # Let a drift window of 2.0.0 close, so its page has numbers.
  sleep 65
  alert_device=$(fleetgate alerts list --json | python3 -c 'import json,sys; a=json.load(sys.stdin); print(a[0]["device"] if a else "pump-00000")')
  for shot in "fleet:fleet" "device:devices/$alert_device" "alerts:alerts" "rollout:rollouts/1" \
    "drift:drift" "drift-detail:drift/sim-model/2.0.0?cohort=all"; do
    name=${shot%%:*}
    page=${shot#*:}
    sep='?'; case "$page" in *\?*) sep='&' ;; esac
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
      --disable-background-networking --disable-component-update --disable-sync \
      --user-data-dir="$work/chromium" --hide-scrollbars --window-size=1280,900 \
      --virtual-time-budget=5000 --screenshot="$shots/$name.png" \
      "$FLEETGATE_URL/ui/#/$page${sep}token=$FLEETGATE_API_TOKEN" >/dev/null 2>&1
    echo "  $shots/$name.png"
  done
fi
say "PASS: the quickstart rolled sim-model 2.0.0 out to 20 pumps"
