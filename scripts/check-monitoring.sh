#!/usr/bin/env bash
# Checks the monitoring kit with Prometheus's own tool (promtool, from Debian's `prometheus`
# package, which .ci/run installs): the recording and alerting rules are valid and pass their
# unit tests, the Grafana dashboard is valid JSON, and a live gateway's /metrics passes
# `promtool check metrics` in the default (classic text) format.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v promtool >/dev/null || { echo "promtool is missing: apt-get install prometheus" >&2; exit 1; }
promtool check rules packaging/prometheus/fleetgate.rules.yml
promtool test rules packaging/prometheus/fleetgate.test.yml
python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[1] + ":", len(d["panels"]), "panels")' \
  packaging/grafana/fleetgate.json

cargo build -q -p fleetgate
work=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/debug/fleetgate serve --data-dir "$work/data" --mqtt-listen 127.0.0.1:0 \
  --http-listen "127.0.0.1:$port" >"$work/out" 2>"$work/log" &
pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$port/api/v1/devices" >/dev/null || true   # a request counted (401)
curl -sf "http://127.0.0.1:$port/metrics" >"$work/metrics.txt"
promtool check metrics <"$work/metrics.txt"
echo "/metrics: $(grep -vc '^#' "$work/metrics.txt") series pass promtool check metrics"
