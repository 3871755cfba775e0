//! What the fuzz targets and the seed generator (`examples/seed.rs`) share: how an input picks
//! its decoder, the trusted test key, the fixtures the checks run against, and the round-trip
//! property every decoded message must keep.
//!
//! Inputs of the multi-decoder targets start with a selector byte: its high bit picks JSON over
//! postcard, the rest (modulo the number of choices) picks the decoder; the payload follows.

use std::sync::OnceLock;

use fleetgate_protocol::limits::Validate;
use fleetgate_protocol::manifest::{ArtifactKind, Compat, ManifestSpec, RuntimeReq, chunk_leaves};
use fleetgate_protocol::merkle::{self, Hash};
use fleetgate_protocol::sign::SigningKey;
use fleetgate_protocol::{Encoding, HardwareProfile, Installed, Manifest, decode, encode};
use semver::Version;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Selector bit for JSON; without it the payload is postcard.
pub const JSON_BIT: u8 = 0x80;

/// Splits an input into the decoder choice (selector without [`JSON_BIT`]), the encoding and
/// the payload.
pub fn split(data: &[u8]) -> Option<(u8, Encoding, &[u8])> {
    let (&selector, payload) = data.split_first()?;
    let encoding = if selector & JSON_BIT != 0 {
        Encoding::Json
    } else {
        Encoding::Postcard
    };
    Some((selector & !JSON_BIT, encoding, payload))
}

/// The selector byte of decoder `choice` in `encoding`.
pub fn selector(choice: u8, encoding: Encoding) -> u8 {
    match encoding {
        Encoding::Postcard => choice,
        Encoding::Json => choice | JSON_BIT,
    }
}

/// Channels of the `messages` target, in selector order (the topic scheme's order).
pub const MESSAGE_CHANNELS: [&str; 8] = [
    "hello",
    "telemetry",
    "alert",
    "log",
    "ack",
    "report",
    "cmd",
    "chunk",
];

/// Decodes `payload` and, if that succeeds, checks that the message survives re-encoding:
/// its postcard encoding decodes again and re-encodes to the same bytes, and its JSON encoding
/// decodes again. Comparing encodings rather than values keeps NaN payloads comparable.
pub fn round_trip<T>(payload: &[u8], encoding: Encoding) -> Option<T>
where
    T: Serialize + DeserializeOwned + Validate + std::fmt::Debug,
{
    let msg: T = decode(payload, encoding).ok()?;
    let postcard = encode(&msg, Encoding::Postcard).expect("a decoded message encodes");
    let again: T = decode(&postcard, Encoding::Postcard)
        .unwrap_or_else(|e| panic!("postcard of {msg:?} does not decode: {e}"));
    assert_eq!(
        encode(&again, Encoding::Postcard).expect("encodes"),
        postcard,
        "postcard round trip changed {msg:?}"
    );
    let json = encode(&msg, Encoding::Json).expect("a decoded message encodes as JSON");
    if let Err(e) = decode::<T>(&json, Encoding::Json) {
        panic!(
            "JSON of {msg:?} does not decode: {e}\n{}",
            String::from_utf8_lossy(&json)
        );
    }
    Some(msg)
}

/// The key that signed the examples in docs/protocol.md (seed 32 x 0x01). The targets trust it
/// as a release key and as the gateway's rollback key.
pub fn test_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

pub fn trusted() -> [[u8; 32]; 1] {
    [test_key().verifying_key().to_bytes()]
}

/// The device's clock in the update checks; the seed manifests are valid then.
pub const NOW_MS: u64 = 1_764_201_600_000;

/// The hardware of the hello example in docs/protocol.md.
pub fn hardware() -> HardwareProfile {
    HardwareProfile {
        arch: "armv7em".into(),
        class: "nrf5340-dk".into(),
        ram_bytes: 524_288,
        flash_bytes: 1_048_576,
        accelerator: None,
        runtime: Some(installed("tflm", "2.14.0", 0)),
    }
}

pub fn installed(name: &str, version: &str, release: u64) -> Installed {
    Installed {
        name: name.into(),
        version: Version::parse(version).expect("a valid version"),
        release,
    }
}

/// An artifact of four full chunks and a short one, its manifest (fits [`hardware`], valid at
/// [`NOW_MS`]), its chunks and their Merkle proofs.
#[derive(Debug)]
pub struct Fixture {
    pub artifact: Vec<u8>,
    pub manifest: Manifest,
    pub chunks: Vec<Vec<u8>>,
    pub proofs: Vec<Vec<Hash>>,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        const CHUNK: u32 = 256;
        let artifact: Vec<u8> = (0..4 * CHUNK + 100).map(|i| (i * 7 + 3) as u8).collect();
        let manifest = Manifest::build(spec(CHUNK), &artifact);
        let chunks = artifact
            .chunks(CHUNK as usize)
            .map(<[u8]>::to_vec)
            .collect();
        let proofs = merkle::all_proofs(&chunk_leaves(&artifact, CHUNK));
        Fixture {
            artifact,
            manifest,
            chunks,
            proofs,
        }
    })
}

/// A model release for the docs example hardware.
pub fn spec(chunk_size: u32) -> ManifestSpec {
    ManifestSpec {
        kind: ArtifactKind::Model,
        name: "kws".into(),
        version: Version::new(2, 1, 0),
        release: 9,
        compat: Compat {
            classes: vec!["nrf5340-dk".into()],
            arch: Some("armv7em".into()),
            min_ram_bytes: 1024,
            min_flash_bytes: 4096,
            runtime: Some(RuntimeReq {
                name: "tflm".into(),
                min_version: Version::new(2, 0, 0),
            }),
        },
        chunk_size,
        created_ms: NOW_MS - 86_400_000,
        expires_ms: NOW_MS + 86_400_000,
    }
}

/// The device of the rollback example in docs/protocol.md, and what its slots hold: it runs
/// model `kws` 2.1.0 (release 9), installed by transfer 5, over 2.0.0 (release 7).
pub const ROLLBACK_DEVICE: &str = "d1";
pub const ROLLBACK_TRANSFER: u64 = 5;
/// Between the example directive's `issued_ms` (1000) and `expires_ms` (2000).
pub const ROLLBACK_NOW_MS: u64 = 1500;

pub fn rollback_slots() -> &'static (Installed, Installed) {
    static SLOTS: OnceLock<(Installed, Installed)> = OnceLock::new();
    SLOTS.get_or_init(|| (installed("kws", "2.1.0", 9), installed("kws", "2.0.0", 7)))
}
