#!/usr/bin/env bash
# Checks bundles made by the CLI with an independent verifier (scripts/verify_bundle.py,
# written from docs/bundle-format.md alone, using Python's `cryptography`, installed from
# PyPI if missing): the document's test vector; bundles of several shapes that must verify;
# changed ones that must not; release keys that OpenSSL and `cryptography` must load.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import cryptography' 2>/dev/null || python3 -m pip install --quiet cryptography
cargo build -q -p fleetgate
fg=target/debug/fleetgate
verify=scripts/verify_bundle.py
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

python3 "$verify" --vector docs/bundle-format.md

for k in a b c; do "$fg" keys generate --out "$work/$k" >/dev/null; done
for k in a b c; do
  python3 "$verify" --key "$work/$k.key" --trust "$work/$k.pub" >/dev/null \
    || fail "cryptography does not load $k.key"
  openssl pkey -in "$work/$k.key" -noout 2>/dev/null || fail "openssl does not load $k.key"
done

# (artifact bytes, chunk size): one chunk, a power of two of them, an uneven count, big chunks.
i=0
for spec in "100 256" "4096 1024" "70000 1000" "300000 65536"; do
  set -- $spec
  i=$((i + 1))
  head -c "$1" /dev/urandom >"$work/art$i"
  "$fg" bundle sign "$work/art$i" --kind firmware --name "fw$i" --version "1.$i.0" --release "$i" \
    --class nrf5340-dk --class esp32s3 --arch armv7em --min-ram 65536 --runtime 'tflm>=2.14.0' \
    --chunk-size "$2" --lineage run=ci --tag t --key "$work/a.key" --out "$work/b$i.fgb" >/dev/null
  python3 "$verify" "$work/b$i.fgb" --trust "$work/a.pub" >"$work/out$i.json" \
    || fail "bundle $i ($1 bytes, chunks of $2) does not verify"
  python3 - "$work/out$i.json" "$1" "$2" "$i" <<'PY' || fail "bundle $i: the verifier read other values"
import json, sys
m, size, chunk, i = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
assert (m["kind"], m["name"], m["version"], m["release"]) == ("firmware", f"fw{i}", f"1.{i}.0", int(i)), m
assert (m["size"], m["chunk_size"]) == (size, chunk), m
assert m["compat"] == {"classes": ["nrf5340-dk", "esp32s3"], "arch": "armv7em", "min_ram_bytes": 65536,
                       "min_flash_bytes": 0, "runtime": {"name": "tflm", "min_version": "2.14.0"}}, m
assert (m["lineage"], m["tags"]) == ({"run": "ci"}, ["t"]), m
PY
done

# k of n: cosigned by b, checked with a 2-of-3 threshold; c never signed.
"$fg" bundle cosign "$work/b3.fgb" --key "$work/b.key" --trust "$work/a.pub" >/dev/null
python3 "$verify" "$work/b3.fgb" --trust "$work/a.pub" --trust "$work/b.pub" --trust "$work/c.pub" \
  --threshold 2 >/dev/null || fail "the cosigned bundle does not meet 2 of 3"
if python3 "$verify" "$work/b3.fgb" --trust "$work/a.pub" --trust "$work/c.pub" --threshold 2 2>/dev/null; then
  fail "a bundle signed by a and b met a threshold of 2 among a and c"
fi

# Changed bundles: a byte of the artifact, of the signed manifest, of a signature.
python3 - "$work/b3.fgb" "$work" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
for name, at in (("artifact", len(data) - 100), ("manifest", 12), ("signature", 9 + 1 + data[9] + 1 + 1 + 8 + 1 + 5)):
    bad = bytearray(data)
    bad[at] ^= 0x01
    open(f"{sys.argv[2]}/changed-{name}.fgb", "wb").write(bad)
PY
for what in artifact manifest signature; do
  if python3 "$verify" "$work/changed-$what.fgb" --trust "$work/a.pub" --trust "$work/b.pub" \
    --threshold 2 2>"$work/err"; then
    fail "a bundle with a changed $what verified"
  fi
  echo "changed $what refused: $(cat "$work/err")"
done
# Expired: signed an hour ago for a minute.
"$fg" bundle sign "$work/art1" --kind model --name m --version 1.0.0 --release 1 --expires-in 1m \
  --key "$work/a.key" --out "$work/old.fgb" >/dev/null
if python3 "$verify" "$work/old.fgb" --trust "$work/a.pub" --now $(( $(date +%s) * 1000 + 3600000 )) 2>/dev/null; then
  fail "an expired bundle verified"
fi
# Format 2: signed requirements and a golden set; both bound to this manifest.
printf 'a,b,expected\n0.5,1.5,2\n-1,0.25,0\n' >"$work/golden.csv"
"$fg" bundle sign "$work/art2" --kind model --name kws --version 2.0.0 --release 2 \
  --require 'latency_p95_us<=15000' --require 'accuracy>=0.93' --golden "$work/golden.csv" \
  --key "$work/a.key" --out "$work/v2.fgb" >/dev/null
[ "$(head -c 9 "$work/v2.fgb" | tail -c 1 | od -An -tu1 | tr -d ' ')" = 2 ] \
  || fail "a bundle with requirements is not format 2"
python3 "$verify" "$work/v2.fgb" --trust "$work/a.pub" >"$work/v2.json" \
  || fail "the format 2 bundle does not verify"
python3 - "$work/v2.json" <<'PY' || fail "the verifier read other requirements"
import json, sys
m = json.load(open(sys.argv[1]))
assert m["requirements"] == ["latency_p95_us<=15000", "accuracy>=0.93"], m
assert m["golden_set_bytes"] > 0, m
PY
# A changed limit (the requirements' last byte, the f64's sign and exponent) and a changed
# golden set (the file's last byte).
python3 - "$work/v2.fgb" "$work" <<'PY'
import sys
sys.path.insert(0, "scripts")
from verify_bundle import read_bundle
data = bytearray(open(sys.argv[1], "rb").read())
req_body = read_bundle(bytes(data))[5][0]
at = bytes(data).index(req_body) + len(req_body) - 1
for name, i in (("limit", at), ("golden", len(data) - 1)):
    bad = bytearray(data)
    bad[i] ^= 0x40
    open(f"{sys.argv[2]}/changed-{name}.fgb", "wb").write(bad)
PY
for what in limit golden; do
  if python3 "$verify" "$work/changed-$what.fgb" --trust "$work/a.pub" 2>"$work/err"; then
    fail "a format 2 bundle with a changed $what verified"
  fi
  echo "changed $what refused: $(cat "$work/err")"
done
echo "PASS: the test vector and $((i + 1)) bundles made by the CLI verify independently; changed and expired ones do not"
