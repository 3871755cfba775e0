#!/usr/bin/env bash
# Runs schemathesis (https://schemathesis.io, from PyPI) against a live gateway on loopback:
# requests generated from the served OpenAPI document (/api/v1/openapi.json), valid and
# invalid, with an admin token. Fails on any 5xx answer, an answer whose status, content type
# or body the document does not describe, a malformed request that is accepted, or an
# operation that works without a token.
#
#   scripts/api-schema-test.sh [EXAMPLES_PER_OPERATION]     (default 40; CI uses the default)
#
# Bounded: at most EXAMPLES_PER_OPERATION requests per operation plus the coverage phase,
# one worker, against 127.0.0.1 only. The gateway is started and stopped by its pid.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

examples=${1:-40}
if ! command -v schemathesis >/dev/null 2>&1; then
  python3 -m pip install --quiet 'schemathesis>=4,<5'
fi

cargo build -q -p fleetgate
tmp=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

token=schema-test-token-0123456789abcdef
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fg() { "$root/target/debug/fleetgate" "$@"; }
fg keys generate --out "$tmp/release" >/dev/null
cat >"$tmp/gateway.toml" <<TOML
[mqtt]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:$port"
token = "$token"
[storage]
data_dir = "$tmp/data"
[registry]
trusted_keys = ["$(cat "$tmp/release.pub")"]
TOML
# The binary itself in the background (not through `fg`, whose subshell's pid would be
# stopped instead of the gateway's).
"$root/target/debug/fleetgate" serve --config "$tmp/gateway.toml" \
  >"$tmp/gateway.out" 2>"$tmp/gateway.log" &
pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$tmp/gateway.log"; exit 1; }
  sleep 0.1
done

# What the document's examples name exists, so requests reach past "not found": device
# pump-1, model kws 1.0.0 (alias production) with a baseline, rollout 1.
api=(--config "$tmp/gateway.toml")
head -c 20000 /dev/urandom >"$tmp/kws.tflite"
fg bundle sign "$tmp/kws.tflite" --kind model --name kws --version 1.0.0 --release 1 \
  --class nrf5340-dk --key "$tmp/release.key" --out "$tmp/kws.fgb" >/dev/null
fg registry upload "$tmp/kws.fgb" "${api[@]}" >/dev/null
fg registry alias model kws production 1.0.0 "${api[@]}" >/dev/null
fg devices enroll pump-1 --label site=north "${api[@]}" >/dev/null
python3 -c '
import random
random.seed(1)
print("temp,vibration,label")
for i in range(1000):
    print(f"{random.gauss(40, 5):.3f},{random.random():.3f},{i % 3}")
' >"$tmp/reference.csv"
fg baseline build "$tmp/reference.csv" --prediction label --out "$tmp/baseline.json" >/dev/null
fg baseline upload kws 1.0.0 "$tmp/baseline.json" "${api[@]}" >/dev/null
fg rollout create model kws 1.0.0 --device pump-1 "${api[@]}" >/dev/null || true

# positive_data_acceptance is left out: a request the schema allows may still be refused for
# what it names (a device that is not enrolled, a release that is not registered).
status=0
# From the temporary directory: schemathesis keeps its state in the working directory.
cd "$tmp"
schemathesis run "http://127.0.0.1:$port/api/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,ignored_auth,unsupported_method \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$examples" --seed 42 --workers 1 \
  --generation-database none --request-timeout 30 \
  --no-color || status=$?
if [ "$status" -ne 0 ]; then
  echo "== gateway log (last 50 lines)"
  tail -n 50 "$tmp/gateway.log"
fi
exit "$status"
