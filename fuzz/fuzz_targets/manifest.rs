//! Manifests, signed manifests and bundle files:
//! - 0: a manifest body in either encoding (decodes without panic, round trips);
//! - 1: a signed manifest (postcard or JSON) through the device's `check_offer`;
//! - 2: any body, signed here by the trusted key, through `check_offer`, so the checks after
//!   the signature see arbitrary manifests;
//! - 3: a bundle file through the gateway's decoder and the registry's checks (signature,
//!   manifest, size, SHA-256, Merkle root); a bundle that decodes re-encodes to a bundle that
//!   decodes to the same value.

#![no_main]

use fleetgate::registry::bundle::BundleFile;
use fleetgate_fuzz::{NOW_MS, hardware, round_trip, split, test_key, trusted};
use fleetgate_protocol::manifest::chunk_leaves;
use fleetgate_protocol::update::{DevicePolicy, check_offer};
use fleetgate_protocol::{Domain, Encoding, Manifest, Signed, decode, merkle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((choice, encoding, payload)) = split(data) else {
        return;
    };
    match choice % 4 {
        0 => drop(round_trip::<Manifest>(payload, encoding)),
        1 => {
            if let Some(signed) = signed(payload, encoding) {
                offer(&signed);
            }
        }
        2 => offer(&Signed::sign(
            Domain::Manifest,
            payload.to_vec(),
            &[test_key()],
        )),
        _ => bundle(payload),
    }
});

/// A signed document alone, as it travels inside a command or a bundle.
fn signed(payload: &[u8], encoding: Encoding) -> Option<Signed> {
    match encoding {
        Encoding::Postcard => postcard::from_bytes(payload).ok(),
        Encoding::Json => serde_json::from_slice(payload).ok(),
    }
}

fn offer(signed: &Signed) {
    let hw = hardware();
    let policy = DevicePolicy {
        trusted_keys: &trusted(),
        threshold: 1,
        hardware: &hw,
        max_size: 1 << 32,
    };
    if let Ok(m) = check_offer(signed, &policy, NOW_MS, |_| 0) {
        assert!(m.expires_ms > NOW_MS && m.release > 0 && m.size <= policy.max_size);
    }
}

fn bundle(payload: &[u8]) {
    let Ok(bundle) = BundleFile::decode(payload) else {
        return;
    };
    assert_eq!(
        BundleFile::decode(&bundle.encode()).as_ref(),
        Ok(&bundle),
        "bundle round trip"
    );
    let Ok(body) = bundle.manifest.verify(Domain::Manifest, &trusted(), 1) else {
        return;
    };
    let Ok(manifest) = decode::<Manifest>(body, Encoding::Postcard) else {
        return;
    };
    let data = &bundle.artifact;
    if data.len() as u64 != manifest.size {
        return;
    }
    let leaves = chunk_leaves(data, manifest.chunk_size);
    assert_eq!(leaves.len() as u64, manifest.chunk_count());
    let _ = merkle::root(&leaves) == manifest.merkle_root;
}
