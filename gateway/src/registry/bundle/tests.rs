use std::collections::BTreeMap;

use fleetgate_protocol::manifest::{RuntimeReq, chunk_leaves};
use fleetgate_protocol::{ArtifactKind, Compat};
use semver::Version;

use super::*;
use crate::registry::keys::hex;

/// The bundle of docs/bundle-format.md's test vector.
pub(crate) fn vector() -> (SigningKey, Vec<u8>, BundleFile) {
    let key = SigningKey::from_bytes(&[7; 32]);
    let artifact: Vec<u8> = (0..600u32).map(|i| (i % 251) as u8).collect();
    let spec = ManifestSpec {
        kind: ArtifactKind::Model,
        name: "kws".into(),
        version: Version::new(2, 1, 0),
        release: 9,
        compat: Compat {
            classes: vec!["nrf5340-dk".into()],
            arch: None,
            min_ram_bytes: 262_144,
            min_flash_bytes: 0,
            runtime: Some(RuntimeReq {
                name: "tflm".into(),
                min_version: Version::new(2, 14, 0),
            }),
        },
        chunk_size: 256,
        created_ms: 1_767_225_600_000,
        expires_ms: 1_775_001_600_000,
    };
    let bundle = BundleFile::sign(
        artifact.clone(),
        spec,
        std::slice::from_ref(&key),
        BTreeMap::from([("run".to_owned(), "mlflow:4f2a".to_owned())]),
        vec!["int8".to_owned()],
    );
    (key, artifact, bundle)
}

const DOC: &str = include_str!("../../../../docs/bundle-format.md");

/// The bytes of a `vector-NAME` block of docs/bundle-format.md: hex, with spaces, line breaks
/// and text after two or more spaces left out.
fn doc_block(name: &str) -> Vec<u8> {
    let start = DOC
        .find(&format!("```vector-{name}\n"))
        .unwrap_or_else(|| panic!("no vector-{name} block"));
    let body = &DOC[start..].split_once('\n').unwrap().1;
    let body = &body[..body.find("```").unwrap()];
    let hex: String = body
        .lines()
        .map(|l| l.split("  ").next().unwrap_or(""))
        .collect::<String>()
        .replace(' ', "");
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// docs/bundle-format.md's test vector is what the CLI's code makes, byte for byte.
#[test]
fn the_documented_test_vector_is_what_the_code_makes() {
    let (key, artifact, b) = vector();
    let leaves = chunk_leaves(&artifact, 256);
    assert_eq!(leaves.concat(), doc_block("leaves"));
    assert_eq!(merkle::root(&leaves).to_vec(), doc_block("root"));
    assert_eq!(b.manifest.body, doc_block("body"));
    assert_eq!(b.manifest.body.len(), 125);
    assert_eq!(
        b.manifest.signatures[0].signature.to_vec(),
        doc_block("signature")
    );
    let file = b.encode();
    assert_eq!(file, doc_block("bundle"));
    assert_eq!(file.len(), 835);
    assert_eq!(
        hex(key.verifying_key().as_bytes()),
        "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
    );
    assert_eq!(hex(&b.manifest.signatures[0].key_id), "fe812c12f3ab4ce6");
    // The documented file reads back as the same bundle, and checks out.
    let back = BundleFile::decode(&doc_block("bundle")).unwrap();
    assert_eq!(back, b);
    assert_eq!(back.check_artifact().unwrap().release, 9);
    assert_eq!(
        back.signatures(&[key.verifying_key().to_bytes()]),
        [(b.manifest.signatures[0].key_id, SignatureStatus::Valid)]
    );
    // The signed message: one length byte, the tag, the body.
    let mut message = vec![21u8];
    message.extend_from_slice(b"fleetgate/manifest/v1");
    message.extend_from_slice(&b.manifest.body);
    use ed25519_dalek::Verifier;
    let signature = ed25519_dalek::Signature::from_bytes(&b.manifest.signatures[0].signature);
    assert!(key.verifying_key().verify(&message, &signature).is_ok());
}
