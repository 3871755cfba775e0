use alloc::vec::Vec;

use ed25519_dalek::SigningKey;

use super::*;
use crate::codec::encode;
use crate::manifest::{ManifestSpec, chunk_leaves};
use crate::{HardwareProfile, Installed};

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn hw() -> HardwareProfile {
    HardwareProfile {
        arch: "armv7em".into(),
        class: "nrf53".into(),
        ram_bytes: 1 << 20,
        flash_bytes: 1 << 22,
        accelerator: None,
        runtime: Some(Installed {
            name: "tflm".into(),
            version: semver::Version::new(2, 14, 0),
            release: 0,
        }),
    }
}

fn artifact() -> Vec<u8> {
    (0..1000u32).map(|i| (i * 7) as u8).collect()
}

fn manifest(release: u64, expires_ms: u64) -> Manifest {
    let mut spec: ManifestSpec = crate::manifest::tests::spec();
    spec.release = release;
    spec.expires_ms = expires_ms;
    Manifest::build(spec, &artifact())
}

fn signed(m: &Manifest, keys: &[SigningKey]) -> Signed {
    Signed::sign(
        Domain::Manifest,
        encode(m, Encoding::Postcard).unwrap(),
        keys,
    )
}

struct Device {
    keys: [[u8; 32]; 2],
    threshold: usize,
    hw: HardwareProfile,
    max_size: u64,
}

impl Device {
    fn new() -> Device {
        Device {
            keys: [
                key(1).verifying_key().to_bytes(),
                key(2).verifying_key().to_bytes(),
            ],
            threshold: 1,
            hw: hw(),
            max_size: 1 << 20,
        }
    }

    fn check(&self, s: &Signed, now: u64, installed: u64) -> Result<Manifest, UpdateError> {
        let policy = DevicePolicy {
            trusted_keys: &self.keys,
            threshold: self.threshold,
            hardware: &self.hw,
            max_size: self.max_size,
        };
        check_offer(s, &policy, now, |_| installed).map_err(|f| f.code)
    }
}

#[test]
fn a_good_offer_passes_and_every_refusal_is_distinct() {
    let d = Device::new();
    let m = manifest(9, 2000);
    assert_eq!(d.check(&signed(&m, &[key(1)]), 1500, 8), Ok(m.clone()));

    assert_eq!(
        d.check(&signed(&m, &[key(3)]), 1500, 8),
        Err(UpdateError::NoTrustedSignature),
        "wrong key"
    );
    let mut tampered = signed(&m, &[key(1)]);
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    assert_eq!(
        d.check(&tampered, 1500, 8),
        Err(UpdateError::BadSignature),
        "tampered manifest"
    );
    let two = Device {
        threshold: 2,
        ..Device::new()
    };
    assert_eq!(
        two.check(&signed(&m, &[key(1)]), 1500, 8),
        Err(UpdateError::BelowThreshold),
        "one of two keys"
    );
    assert_eq!(
        two.check(&signed(&m, &[key(1), key(2)]), 1500, 8),
        Ok(m.clone())
    );
    let garbage = Signed::sign(Domain::Manifest, alloc::vec![1, 2, 3], &[key(1)]);
    assert_eq!(
        d.check(&garbage, 1500, 8),
        Err(UpdateError::MalformedManifest)
    );
    assert_eq!(
        d.check(&signed(&m, &[key(1)]), 2000, 8),
        Err(UpdateError::Expired)
    );
    assert_eq!(
        d.check(&signed(&m, &[key(1)]), 1500, 9),
        Err(UpdateError::Downgrade),
        "same release"
    );
    assert_eq!(
        d.check(&signed(&m, &[key(1)]), 1500, 12),
        Err(UpdateError::Downgrade)
    );
    let other = Device {
        hw: HardwareProfile {
            class: "esp32".into(),
            ..hw()
        },
        ..Device::new()
    };
    assert_eq!(
        other.check(&signed(&m, &[key(1)]), 1500, 8),
        Err(UpdateError::Incompatible)
    );
    let small = Device {
        max_size: 999,
        ..Device::new()
    };
    assert_eq!(
        small.check(&signed(&m, &[key(1)]), 1500, 8),
        Err(UpdateError::TooLarge)
    );
}

fn chunks(m: &Manifest) -> Vec<(u64, Vec<u8>, Vec<[u8; 32]>)> {
    let data = artifact();
    let leaves = chunk_leaves(&data, m.chunk_size);
    data.chunks(m.chunk_size as usize)
        .enumerate()
        .map(|(i, c)| (i as u64, c.to_vec(), merkle::proof(&leaves, i)))
        .collect()
}

#[test]
fn chunks_are_verified_in_order_and_the_whole_at_the_end() {
    let m = manifest(9, 2000);
    let cs = chunks(&m);
    assert_eq!(cs.len(), 4);
    let mut d = Download::new(m.clone());
    assert_eq!(d.accept(1, &cs[1].1, &cs[1].2), Ok(Accepted::Ahead));
    assert_eq!(d.accept(0, &cs[0].1, &cs[0].2), Ok(Accepted::Stored));
    assert_eq!(d.accept(0, &cs[0].1, &cs[0].2), Ok(Accepted::Duplicate));
    let mut bad = cs[1].1.clone();
    bad[3] ^= 0xff;
    assert_eq!(
        d.accept(1, &bad, &cs[1].2).unwrap_err().code,
        UpdateError::ChunkHash
    );
    assert_eq!(
        d.accept(1, &cs[1].1[..100], &cs[1].2).unwrap_err().code,
        UpdateError::Truncated
    );
    assert_eq!(
        d.accept(9, &cs[1].1, &cs[1].2).unwrap_err().code,
        UpdateError::ChunkOutOfRange
    );
    assert_eq!(
        d.clone().finish().unwrap_err().code,
        UpdateError::Incomplete
    );
    for (i, data, proof) in &cs[1..] {
        assert_eq!(d.accept(*i, data, proof), Ok(Accepted::Stored));
    }
    assert!(d.is_complete());
    assert_eq!(d.finish(), Ok(m));
}

#[test]
fn a_restored_download_resumes_at_the_first_missing_chunk() {
    let m = manifest(9, 2000);
    let cs = chunks(&m);
    let stored: Vec<&[u8]> = cs[..2].iter().map(|c| &c.1[..]).collect();
    let mut d = Download::restore(m.clone(), stored);
    assert_eq!(d.next_chunk(), 2);
    for (i, data, proof) in &cs[2..] {
        assert_eq!(d.accept(*i, data, proof), Ok(Accepted::Stored));
    }
    assert_eq!(d.finish(), Ok(m));
}

#[test]
fn a_wrong_final_hash_is_caught() {
    // A manifest whose tree is right but whose whole-file hash is not (a signer's mistake).
    let mut m = manifest(9, 2000);
    m.sha256[0] ^= 1;
    let mut d = Download::new(m);
    for (i, data, proof) in chunks(&manifest(9, 2000)) {
        d.accept(i, &data, &proof).unwrap();
    }
    assert_eq!(d.finish().unwrap_err().code, UpdateError::FinalHash);
}
