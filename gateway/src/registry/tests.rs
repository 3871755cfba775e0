use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use fleetgate_protocol::manifest::{ManifestSpec, RuntimeReq};
use fleetgate_protocol::{ArtifactKind, Compat, HardwareProfile};
use semver::Version;

use super::*;

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn spec(version: &str, release: u64, class: &str) -> ManifestSpec {
    ManifestSpec {
        kind: ArtifactKind::Model,
        name: "kws".into(),
        version: Version::parse(version).unwrap(),
        release,
        compat: Compat {
            classes: vec![class.into()],
            runtime: Some(RuntimeReq {
                name: "tflm".into(),
                min_version: Version::new(2, 0, 0),
            }),
            ..Compat::default()
        },
        chunk_size: 1024,
        created_ms: 1_000,
        expires_ms: 10_000,
    }
}

fn artifact(seed: u8) -> Vec<u8> {
    (0..5000u32).map(|i| (i as u8).wrapping_mul(seed)).collect()
}

fn bundle(version: &str, release: u64, class: &str, seed: u8, keys: &[SigningKey]) -> Vec<u8> {
    BundleFile::sign(
        artifact(seed),
        spec(version, release, class),
        keys,
        BTreeMap::from([("run".into(), "r1".into())]),
        vec!["int8".into()],
    )
    .encode()
}

struct Reg {
    _dir: tempfile::TempDir,
    reg: Registry,
}

fn registry(threshold: usize) -> Reg {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let cfg = fleetgate_config::Registry {
        trusted_keys: vec![
            key(1).verifying_key().to_bytes(),
            key(2).verifying_key().to_bytes(),
        ],
        threshold,
        max_bundle_bytes: 1 << 20,
        max_chunk_bytes: 4096,
    };
    let reg = Registry::new(store, dir.path(), &cfg);
    Reg { _dir: dir, reg }
}

#[test]
fn a_signed_bundle_is_registered_once_and_its_artifact_stored() {
    let r = registry(1);
    let b = bundle("1.0.0", 1, "nrf53", 3, &[key(1)]);
    let first = r.reg.register(&b, 5_000, "op").unwrap();
    assert!(first.created);
    let rel = &first.release;
    assert_eq!(
        (rel.version.to_string(), rel.release, rel.artifacts.len()),
        ("1.0.0".into(), 1, 1)
    );
    assert_eq!(rel.lineage["run"], "r1");
    assert_eq!(rel.tags, ["int8"]);
    let stored = r
        .reg
        .artifacts
        .read_verified(&rel.artifacts[0].sha256)
        .unwrap();
    assert_eq!(stored, artifact(3));
    let again = r.reg.register(&b, 5_000, "op").unwrap();
    assert!(!again.created, "uploading the same bundle twice is a no-op");
    assert_eq!(r.reg.store.releases(None, None).unwrap().len(), 1);

    // A second artifact of the same version for other hardware.
    let pi = bundle("1.0.0", 1, "rpi4", 5, &[key(2)]);
    let both = r.reg.register(&pi, 5_000, "op").unwrap().release;
    assert_eq!(both.artifacts.len(), 2);
    let hw = |class: &str| HardwareProfile {
        arch: "x".into(),
        class: class.into(),
        ram_bytes: 1,
        flash_bytes: 1,
        accelerator: None,
        runtime: Some(fleetgate_protocol::Installed {
            name: "tflm".into(),
            version: Version::new(2, 1, 0),
            release: 0,
        }),
    };
    assert_eq!(
        both.artifact_for(&hw("rpi4")).unwrap().sha256,
        both.artifacts[1].sha256
    );
    assert_eq!(
        both.artifact_for(&hw("nrf53")).unwrap().sha256,
        both.artifacts[0].sha256
    );
    assert!(both.artifact_for(&hw("esp32")).is_none());
}

#[test]
fn every_bad_bundle_is_refused_with_its_reason() {
    let r = registry(2);
    let ok_keys = [key(1), key(2)];
    let reason = |bytes: &[u8]| r.reg.register(bytes, 5_000, "op").unwrap_err().to_string();

    assert_eq!(
        reason(b"hello"),
        "not a fleetgate bundle (no FGBUNDLE header)"
    );
    assert_eq!(
        reason(&bundle("1.0.0", 1, "c", 1, &[key(9)])),
        "bundle signatures: not signed by any trusted key"
    );
    assert_eq!(
        reason(&bundle("1.0.0", 1, "c", 1, &[key(1)])),
        "bundle signatures: 1 valid signature(s) from distinct trusted keys, 2 needed"
    );
    let expired = r
        .reg
        .register(&bundle("1.0.0", 1, "c", 1, &ok_keys), 10_000, "op")
        .unwrap_err();
    assert!(matches!(expired, RegisterError::Expired(_)), "{expired}");

    let mut truncated = BundleFile::decode(&bundle("1.0.0", 1, "c", 1, &ok_keys)).unwrap();
    truncated.artifact.truncate(4000);
    assert_eq!(
        reason(&truncated.encode()),
        "artifact is 4000 bytes but the manifest says 5000 (truncated?)"
    );
    let mut tampered = BundleFile::decode(&bundle("1.0.0", 1, "c", 1, &ok_keys)).unwrap();
    tampered.artifact[10] ^= 1;
    assert_eq!(
        reason(&tampered.encode()),
        "artifact SHA-256 differs from the manifest"
    );
    let mut forged = BundleFile::decode(&bundle("1.0.0", 1, "c", 1, &ok_keys)).unwrap();
    forged.manifest.body[12] ^= 1;
    assert_eq!(
        reason(&forged.encode()),
        "bundle signatures: a trusted key's signature does not match the document (tampered?)"
    );

    let mut big = spec("1.0.0", 1, "c");
    big.chunk_size = 8192;
    let b = BundleFile::sign(artifact(1), big, &ok_keys, BTreeMap::new(), vec![]).encode();
    assert_eq!(
        reason(&b),
        "chunk size 8192 is over registry.max_chunk_bytes (4096)"
    );

    // A manifest signed with a wrong Merkle root (a broken signer) is caught too.
    let mut m = Manifest::build(spec("1.0.0", 1, "c"), &artifact(1));
    m.merkle_root[0] ^= 1;
    let body = fleetgate_protocol::encode(&m, Encoding::Postcard).unwrap();
    let wrong_root = BundleFile {
        manifest: fleetgate_protocol::Signed::sign(Domain::Manifest, body, &ok_keys),
        artifact: artifact(1),
        lineage: BTreeMap::new(),
        tags: vec![],
        validation: None,
    };
    assert_eq!(
        reason(&wrong_root.encode()),
        "artifact chunks do not match the manifest's Merkle root"
    );
    assert!(
        r.reg.store.releases(None, None).unwrap().is_empty(),
        "nothing was registered"
    );
}

#[test]
fn release_counters_and_hardware_slots_do_not_clash() {
    let r = registry(1);
    r.reg
        .register(&bundle("1.0.0", 1, "nrf53", 1, &[key(1)]), 5_000, "op")
        .unwrap();
    let clash = r
        .reg
        .register(&bundle("1.1.0", 1, "nrf53", 2, &[key(1)]), 5_000, "op")
        .unwrap_err();
    assert_eq!(
        clash.to_string(),
        "release counter 1 of model kws is already used by version 1.0.0"
    );
    let counter = r
        .reg
        .register(&bundle("1.0.0", 2, "rpi4", 2, &[key(1)]), 5_000, "op")
        .unwrap_err();
    assert_eq!(
        counter.to_string(),
        "version 1.0.0 has release counter 1, this bundle says 2"
    );
    let same_hw = r
        .reg
        .register(&bundle("1.0.0", 1, "nrf53", 9, &[key(1)]), 5_000, "op")
        .unwrap_err();
    assert_eq!(
        same_hw.to_string(),
        "version 1.0.0 already has an artifact for hardware class nrf53: each device must map to exactly one artifact of a version"
    );
}

/// Issue 12, registry: a device on 2.1.0 (release 9) took 2.0.0 (release 10) as an upgrade,
/// and a higher version with a lower counter could never install. Counters follow versions.
#[test]
fn release_counters_must_follow_version_order() {
    let r = registry(1);
    r.reg
        .register(&bundle("2.1.0", 9, "nrf53", 1, &[key(1)]), 5_000, "op")
        .unwrap();
    let older_higher = r
        .reg
        .register(&bundle("2.0.0", 10, "nrf53", 2, &[key(1)]), 5_000, "op")
        .unwrap_err();
    assert_eq!(
        older_higher.to_string(),
        "release counter 10 of model kws 2.0.0 does not follow version order: 2.1.0 has counter 9"
    );
    let newer_lower = r
        .reg
        .register(&bundle("2.2.0", 8, "nrf53", 3, &[key(1)]), 5_000, "op")
        .unwrap_err();
    assert_eq!(
        newer_lower.to_string(),
        "release counter 8 of model kws 2.2.0 does not follow version order: 2.1.0 has counter 9"
    );
    // Both in order are fine, on either side.
    r.reg
        .register(&bundle("2.0.0", 5, "nrf53", 2, &[key(1)]), 5_000, "op")
        .unwrap();
    r.reg
        .register(&bundle("2.2.0", 12, "nrf53", 3, &[key(1)]), 5_000, "op")
        .unwrap();
}

/// Issue 12, registry: the one-artifact-per-class rule was bypassed by a different min_ram,
/// runtime or architecture, so two devices of one class ran different binaries of one version;
/// and a refused upload left its artifact file behind.
#[test]
fn one_version_maps_each_class_to_one_artifact_and_a_refused_upload_leaves_no_file() {
    let r = registry(1);
    r.reg
        .register(&bundle("1.0.0", 1, "nrf53", 1, &[key(1)]), 5_000, "op")
        .unwrap();
    type Change = fn(&mut ManifestSpec);
    let variants: [(&str, Change); 4] = [
        ("more RAM", |s| s.compat.min_ram_bytes = 1 << 20),
        ("no runtime", |s| s.compat.runtime = None),
        ("an architecture", |s| s.compat.arch = Some("armv8m".into())),
        ("every class", |s| s.compat.classes.clear()),
    ];
    for (seed, (what, change)) in (7u8..).zip(variants) {
        let mut sp = spec("1.0.0", 1, "nrf53");
        change(&mut sp);
        let bytes =
            BundleFile::sign(artifact(seed), sp, &[key(1)], BTreeMap::new(), vec![]).encode();
        let err = r.reg.register(&bytes, 5_000, "op").unwrap_err();
        assert!(
            err.to_string()
                .contains("each device must map to exactly one artifact"),
            "{what}: {err}"
        );
        let sha: [u8; 32] = Sha256::digest(artifact(seed)).into();
        assert!(
            !r.reg.artifacts.path(&sha).exists(),
            "{what}: the refused artifact's file is gone"
        );
    }
    // Another class is fine, and the same bytes for it share one file.
    r.reg
        .register(&bundle("1.0.0", 1, "rpi4", 1, &[key(1)]), 5_000, "op")
        .unwrap();
    let sha: [u8; 32] = Sha256::digest(artifact(1)).into();
    assert!(r.reg.artifacts.path(&sha).exists());
    // A refused upload of bytes a release already uses keeps the file.
    let clash = r
        .reg
        .register(&bundle("1.5.0", 1, "nrf53", 1, &[key(1)]), 5_000, "op");
    assert!(clash.is_err());
    assert!(r.reg.artifacts.path(&sha).exists());
}

#[test]
fn aliases_point_at_versions() {
    let r = registry(1);
    r.reg
        .register(&bundle("1.0.0", 1, "nrf53", 1, &[key(1)]), 5_000, "op")
        .unwrap();
    r.reg
        .register(&bundle("2.0.0", 2, "nrf53", 2, &[key(1)]), 5_000, "op")
        .unwrap();
    r.reg
        .set_alias(ArtifactKind::Model, "kws", "production", "1.0.0")
        .unwrap();
    r.reg
        .set_alias(ArtifactKind::Model, "kws", "canary", "2.0.0")
        .unwrap();
    let prod = r
        .reg
        .store
        .release(ArtifactKind::Model, "kws", "production")
        .unwrap()
        .unwrap();
    assert_eq!(prod.version, Version::new(1, 0, 0));
    r.reg
        .set_alias(ArtifactKind::Model, "kws", "production", "2.0.0")
        .unwrap();
    assert_eq!(
        r.reg
            .store
            .release(ArtifactKind::Model, "kws", "production")
            .unwrap()
            .unwrap()
            .release,
        2
    );
    assert_eq!(
        r.reg.store.aliases(ArtifactKind::Model, "kws").unwrap(),
        [("canary".to_owned(), 2), ("production".to_owned(), 2)]
    );
    assert!(matches!(
        r.reg.set_alias(ArtifactKind::Model, "kws", "Prod", "1.0.0"),
        Err(RegisterError::Invalid(_))
    ));
    assert!(matches!(
        r.reg.set_alias(ArtifactKind::Model, "kws", "x", "9.9.9"),
        Err(RegisterError::NotFound(_))
    ));
    r.reg
        .remove_alias(ArtifactKind::Model, "kws", "canary")
        .unwrap();
    assert!(
        r.reg
            .store
            .release(ArtifactKind::Model, "kws", "canary")
            .unwrap()
            .is_none()
    );
    let annotated = r
        .reg
        .annotate(
            ArtifactKind::Model,
            "kws",
            "1.0.0",
            Some(BTreeMap::from([("accuracy".into(), Some("0.93".into()))])),
            None,
        )
        .unwrap();
    assert_eq!(annotated.tags, ["int8"]);
    // A patch merges: the lineage the bundle brought stays.
    assert_eq!(
        annotated.lineage,
        BTreeMap::from([
            ("accuracy".to_owned(), "0.93".to_owned()),
            ("run".to_owned(), "r1".to_owned())
        ])
    );
    // A key set to null goes; tags, a list, are replaced.
    let annotated = r
        .reg
        .annotate(
            ArtifactKind::Model,
            "kws",
            "1.0.0",
            Some(BTreeMap::from([("run".into(), None)])),
            Some(vec!["fp16".into()]),
        )
        .unwrap();
    assert_eq!(
        annotated.lineage,
        BTreeMap::from([("accuracy".to_owned(), "0.93".to_owned())])
    );
    assert_eq!(annotated.tags, ["fp16"]);
    let stored = r
        .reg
        .store
        .release(ArtifactKind::Model, "kws", "1.0.0")
        .unwrap()
        .unwrap();
    assert_eq!(stored.lineage, annotated.lineage);
}
