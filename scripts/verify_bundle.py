#!/usr/bin/env python3
"""An independent verifier of fleetgate bundles, written from docs/bundle-format.md alone.

    verify_bundle.py BUNDLE --trust KEY [--trust KEY ...] [--threshold N] [--now MS]
    verify_bundle.py --vector docs/bundle-format.md
    verify_bundle.py --key release.key --trust release.pub

KEY is an ed25519 public key as 64 hex characters or a file holding them (a .pub file).
It checks what the document says a gateway and a device check, in that order: the file's
framing, the signatures (at least THRESHOLD distinct trusted keys), the manifest, its
expiry (against --now, Unix milliseconds, default the current time) and the artifact (size,
SHA-256, Merkle root), and prints the manifest as JSON. --vector checks the document's test
vector against its own stated values. --key loads a private key file (PKCS#8 PEM) with
`cryptography` and checks that its public key is a --trust key.

Needs `cryptography` (pip install cryptography). Exit code 0: valid; 1: not; 2: usage.
"""

import argparse
import hashlib
import json
import re
import struct
import sys
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAGIC = b"FGBUNDLE"
REQUIREMENTS_TAG = b"fleetgate/requirements/v1"
MEASURES = ["latency_p50_us", "latency_p90_us", "latency_p95_us", "latency_p99_us",
            "latency_max_us", "peak_ram_bytes", "energy_per_inference_uj", "accuracy"]
MAX_RULES = 16
MANIFEST_TAG = b"fleetgate/manifest/v1"
MAX_SIGNATURES = 8
NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class Invalid(Exception):
    pass


class Reader:
    """Postcard: LEB128 varints, length-prefixed strings and bytes, tagged options."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def byte(self):
        if self.pos >= len(self.data):
            raise Invalid("truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self, bits=64):
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift >= bits + 7:
                raise Invalid("varint too long")
        if value >= 1 << bits:
            raise Invalid("varint out of range")
        return value

    def bytes(self):
        n = self.varint()
        if self.pos + n > len(self.data):
            raise Invalid("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def raw(self, n):
        """`n` bytes as they are (a float: 8 bytes, little-endian)."""
        if self.pos + n > len(self.data):
            raise Invalid("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def fixed(self, n):
        out = self.bytes()
        if len(out) != n:
            raise Invalid(f"expected {n} bytes, found {len(out)}")
        return out

    def string(self):
        try:
            return self.bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("a string is not UTF-8")

    def option(self, read):
        tag = self.byte()
        if tag == 0:
            return None
        if tag == 1:
            return read()
        raise Invalid(f"option tag {tag}")

    def seq(self, read):
        return [read() for _ in range(self.varint())]

    def done(self):
        if self.pos != len(self.data):
            raise Invalid(f"{len(self.data) - self.pos} bytes left over")


def read_bundle(data):
    """The bundle's parts; `validation` is (requirements body, their signatures, golden set
    bytes) in format 2, None in format 1."""
    if not data.startswith(MAGIC):
        raise Invalid("not a fleetgate bundle (no FGBUNDLE magic)")
    if len(data) < 9 or data[8] not in (1, 2):
        raise Invalid("bundle format is neither 1 nor 2")
    r = Reader(data[9:])
    body = r.bytes()
    signatures = r.seq(lambda: (r.fixed(8), r.fixed(64)))
    artifact = r.bytes()
    lineage = dict(r.seq(lambda: (r.string(), r.string())))
    tags = r.seq(r.string)
    validation = None
    if data[8] == 2:
        req_body = r.bytes()
        req_signatures = r.seq(lambda: (r.fixed(8), r.fixed(64)))
        validation = (req_body, req_signatures, r.bytes())
    r.done()
    return body, signatures, artifact, lineage, tags, validation


def read_requirements(body):
    """Format byte 01, then postcard: two 32-byte hashes (as bytes, like every fixed array
    here), then the rules."""
    if not body or body[0] != 1:
        raise Invalid("the requirements body does not start with format byte 01")
    r = Reader(body[1:])
    manifest_sha256, golden_sha256 = r.fixed(32), r.fixed(32)
    rules = []
    for _ in range(r.varint()):
        measure, bound = r.varint(), r.varint()
        if measure >= len(MEASURES) or bound > 1:
            raise Invalid(f"unknown measure {measure} or bound {bound}")
        limit = struct.unpack("<d", r.raw(8))[0]
        rules.append(f"{MEASURES[measure]}{'<=' if bound == 0 else '>='}{limit:g}")
    if len(rules) > MAX_RULES:
        raise Invalid(f"more than {MAX_RULES} requirements")
    r.done()
    return manifest_sha256, golden_sha256, rules


def read_manifest(body):
    if not body or body[0] != 1:
        raise Invalid("the manifest body does not start with format byte 01")
    r = Reader(body[1:])
    kind = {0: "model", 1: "firmware"}.get(r.varint())
    if kind is None:
        raise Invalid("unknown artifact kind")
    m = {"kind": kind, "name": r.string(), "version": r.string(), "release": r.varint()}
    m["compat"] = {
        "classes": r.seq(r.string),
        "arch": r.option(r.string),
        "min_ram_bytes": r.varint(),
        "min_flash_bytes": r.varint(),
        "runtime": r.option(lambda: {"name": r.string(), "min_version": r.string()}),
    }
    m["size"] = r.varint()
    m["sha256"] = r.fixed(32).hex()
    m["chunk_size"] = r.varint(32)
    m["merkle_root"] = r.fixed(32).hex()
    m["created_ms"] = r.varint()
    m["expires_ms"] = r.varint()
    r.done()
    names = [m["name"], *m["compat"]["classes"]]
    names += [m["compat"]["arch"]] if m["compat"]["arch"] is not None else []
    names += [m["compat"]["runtime"]["name"]] if m["compat"]["runtime"] else []
    for n in names:
        if not NAME.match(n):
            raise Invalid(f"name {n!r} is not 1-64 of A-Z a-z 0-9 - _ . :")
    if len(m["compat"]["classes"]) > 16:
        raise Invalid("more than 16 classes")
    if not 256 <= m["chunk_size"] <= 1 << 20:
        raise Invalid("chunk_size is not within 256..=1048576")
    if m["size"] > 1 << 32:
        raise Invalid("size is over 2^32")
    if m["expires_ms"] <= m["created_ms"]:
        raise Invalid("expires_ms is not after created_ms")
    return m


def leaf(chunk):
    return hashlib.sha256(b"\x00" + chunk).digest()


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(leaves):
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def chunk_leaves(artifact, chunk_size):
    return [leaf(artifact[i:i + chunk_size]) for i in range(0, len(artifact), chunk_size)]


def key_id(public):
    return hashlib.sha256(public).digest()[:8]


def check_signatures(body, signatures, trusted, threshold, tag=MANIFEST_TAG):
    if len(signatures) > MAX_SIGNATURES:
        raise Invalid(f"more than {MAX_SIGNATURES} signatures")
    message = bytes([len(tag)]) + tag + body
    by_id = {key_id(k): k for k in trusted}
    seen, valid, bad = set(), 0, 0
    for kid, sig in signatures:
        if kid in seen:
            continue
        seen.add(kid)
        public = by_id.get(kid)
        if public is None:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(sig, message)
            valid += 1
        except InvalidSignature:
            bad += 1
    needed = max(threshold, 1)
    if valid >= needed:
        return valid
    if bad:
        raise Invalid("a trusted key's signature does not match the document (tampered?)")
    if valid == 0:
        raise Invalid("not signed by any trusted key")
    raise Invalid(f"{valid} valid signature(s) from distinct trusted keys, {needed} needed")


def verify(data, trusted, threshold, now_ms):
    body, signatures, artifact, lineage, tags, validation = read_bundle(data)
    valid = check_signatures(body, signatures, trusted, threshold)
    m = read_manifest(body)
    if now_ms >= m["expires_ms"]:
        raise Invalid(f"the manifest expired at {m['expires_ms']} (now {now_ms})")
    if len(artifact) != m["size"]:
        raise Invalid(f"the artifact is {len(artifact)} bytes, the manifest says {m['size']}")
    if hashlib.sha256(artifact).hexdigest() != m["sha256"]:
        raise Invalid("the artifact's SHA-256 differs from the manifest's")
    if merkle_root(chunk_leaves(artifact, m["chunk_size"])).hex() != m["merkle_root"]:
        raise Invalid("the artifact's chunks do not match the manifest's Merkle root")
    m["valid_signatures"] = valid
    m["lineage"], m["tags"] = lineage, tags
    if validation is not None:
        req_body, req_signatures, golden = validation
        try:
            check_signatures(req_body, req_signatures, trusted, threshold, REQUIREMENTS_TAG)
        except Invalid as e:
            raise Invalid(f"requirements: {e}")
        manifest_sha256, golden_sha256, rules = read_requirements(req_body)
        if manifest_sha256 != hashlib.sha256(body).digest():
            raise Invalid("the requirements are bound to another manifest")
        want = hashlib.sha256(golden).digest() if golden else bytes(32)
        if golden_sha256 != want:
            raise Invalid("the requirements are bound to another golden set")
        m["requirements"], m["golden_set_bytes"] = rules, len(golden)
    return m


def parse_key(text):
    text = text.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        try:
            text = open(text).read().strip()
        except OSError as e:
            raise SystemExit(f"verify_bundle: {text}: {e}")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise SystemExit(f"verify_bundle: {text!r} is not an ed25519 public key (64 hex characters)")
    return bytes.fromhex(text)


def doc_block(doc, name):
    """A `vector-NAME` block: hex, without spaces, line breaks and text after two spaces."""
    m = re.search(r"```vector-" + name + r"\n(.*?)```", doc, re.S)
    if not m:
        raise Invalid(f"no vector-{name} block")
    return bytes.fromhex("".join(line.split("  ")[0].replace(" ", "") for line in m.group(1).splitlines()))


def check_vector(path):
    doc = open(path).read()
    public = bytes.fromhex(re.search(r"\| public key \| `([0-9a-f]{64})` \|", doc).group(1))
    stated_id = re.search(r"\| key id \| `([0-9a-f]{16})` \|", doc).group(1)
    if key_id(public).hex() != stated_id:
        raise Invalid("the key id is not the first 8 bytes of SHA-256(public key)")
    data = doc_block(doc, "bundle")
    artifact = bytes(i % 251 for i in range(600))
    leaves = chunk_leaves(artifact, 256)
    if b"".join(leaves) != doc_block(doc, "leaves"):
        raise Invalid("the chunk leaves differ from vector-leaves")
    if merkle_root(leaves) != doc_block(doc, "root"):
        raise Invalid("the Merkle root differs from vector-root")
    body, signatures, got_artifact, _, _, _ = read_bundle(data)
    if body != doc_block(doc, "body") or signatures[0][1] != doc_block(doc, "signature"):
        raise Invalid("the bundle's body or signature differs from its block")
    if got_artifact != artifact:
        raise Invalid("the bundle's artifact is not byte i = i mod 251")
    m = verify(data, [public], 1, 1_767_225_600_000)
    expect = {"kind": "model", "name": "kws", "version": "2.1.0", "release": 9, "size": 600, "chunk_size": 256,
              "created_ms": 1767225600000, "expires_ms": 1775001600000, "lineage": {"run": "mlflow:4f2a"}, "tags": ["int8"]}
    for k, v in expect.items():
        if m[k] != v:
            raise Invalid(f"{k} is {m[k]!r}, the document says {v!r}")
    # A flipped byte anywhere in the signed body must fail the signature.
    tampered = bytearray(data)
    tampered[9 + 1 + 20] ^= 1
    try:
        verify(bytes(tampered), [public], 1, 1_767_225_600_000)
        raise Invalid("a tampered body verified")
    except Invalid as e:
        if "does not match" not in str(e):
            raise
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?")
    p.add_argument("--trust", action="append", default=[], help="a trusted public key (hex or .pub file)")
    p.add_argument("--threshold", type=int, default=1)
    p.add_argument("--now", type=int, help="Unix milliseconds (default: now)")
    p.add_argument("--vector", help="check the test vector of docs/bundle-format.md")
    p.add_argument("--key", help="a private key file (PKCS#8 PEM) whose public key must be a --trust key")
    a = p.parse_args()
    trusted = [parse_key(k) for k in a.trust]
    try:
        if a.vector:
            m = check_vector(a.vector)
            print(f"{a.vector}: test vector ok ({m['kind']} {m['name']} {m['version']})")
        if a.key:
            pem = open(a.key, "rb").read()
            private = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise Invalid(f"{a.key} is not an ed25519 key")
            public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            if public not in trusted:
                raise Invalid(f"{a.key}: its public key {public.hex()} is not a --trust key")
            print(f"{a.key}: ed25519 private key of {public.hex()}")
        if a.bundle:
            if not trusted:
                raise SystemExit("verify_bundle: give the trusted keys with --trust")
            now = a.now if a.now is not None else int(time.time() * 1000)
            m = verify(open(a.bundle, "rb").read(), trusted, a.threshold, now)
            print(json.dumps(m, indent=2))
        if not (a.vector or a.key or a.bundle):
            p.print_usage(sys.stderr)
            sys.exit(2)
    except Invalid as e:
        print(f"verify_bundle: {a.bundle or a.vector or a.key}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
