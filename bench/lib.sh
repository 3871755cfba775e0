# Shared by the benchmark scripts: source it from the repository root. It sets `bin` (the
# release binaries), `work` (a temporary directory) and the pids `gw`, `sim` and `broker`, and
# on exit stops whatever of them still runs, by pid, and removes `work`.
bin=target/release
work=$(mktemp -d)
gw=; sim=; broker=
# An empty pid must not become `kill 0`.
cleanup() {
  for pid in ${sim:-} ${gw:-} ${broker:-}; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The gateway's API with its operator token.
api() { curl -sf -H "Authorization: Bearer $FLEETGATE_API_TOKEN" "$@"; }
# The gateway's resident memory in KiB.
rss() { awk '/^VmRSS/ {print $2}' "/proc/$gw/status"; }
# Devices the gateway at http://$1 counts connected (0 if it does not answer).
connected() {
  api "http://$1/api/v1/ingest" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["mqtt"]["connected_devices"])' \
    || echo 0
}

# A release key pair in $work/release.{key,pub}; its public key in `key`.
release_key() {
  "$bin/fleetgate" keys generate --out "$work/release" > /dev/null
  key=$(cat "$work/release.pub")
}

# Starts `fleetgate serve` on $work/gw.toml (the arguments, e.g. `taskset -c 0`, go before
# it), keeps its pid in `gw`, and waits (at most 10 s) until its API at http://$http answers;
# exports the operator token it generated into its data dir.
serve_gateway() {
  unset FLEETGATE_API_TOKEN
  "$@" "$bin/fleetgate" serve --config "$work/gw.toml" >> "$work/gw.log" 2>&1 &
  gw=$!
  for _ in $(seq 100); do
    [ -s "$work/data/api-token" ] && curl -sf "http://$http/healthz" > /dev/null && break
    sleep 0.1
  done
  [ -s "$work/data/api-token" ] || { echo "the gateway did not start:" >&2; cat "$work/gw.log" >&2; exit 1; }
  export FLEETGATE_API_TOKEN=$(cat "$work/data/api-token")
}

# Waits (at most 10 s) until something listens on 127.0.0.1:$1.
await_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  exit 1
}
# Stops process $1 (SIGTERM) and waits for it.
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# Peak resident memory of process $1 so far (VmHWM), in KiB.
peak_rss() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
# Sets `mosquitto` to the Mosquitto broker, installed with apt-get if missing.
find_mosquitto() {
  if ! command -v mosquitto > /dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends mosquitto \
      || { apt-get update && apt-get install -y --no-install-recommends mosquitto; }
  fi
  mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
}
# Waits until the machine is quiet: both cores at least $1 % idle (default 90) over one second,
# at most $2 tries (default 120, about two minutes; then it goes on anyway). Leaves the idle
# share it last measured in `idle`. Other work on a shared machine takes cores from a broker
# or the simulator unnoticed; runs of a second or two can start when nothing else runs.
await_quiet() {
  local want=${1:-90} tries=${2:-120} a b
  for _ in $(seq "$tries"); do
    a=$(awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8, $5+$6}' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / {print $2+$3+$4+$5+$6+$7+$8, $5+$6}' /proc/stat)
    idle=$(echo "$a $b" | awk '{t = $3 - $1; print (t > 0) ? int(100 * ($4 - $2) / t) : 0}')
    [ "$idle" -ge "$want" ] && return 0
  done
  return 0
}
