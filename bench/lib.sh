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
