//! Tests of the simulated device's update client: an install through offer and chunks records
//! its transfer, and rollback directives are obeyed or refused with the protocol's reasons.

use fleetgate_protocol::limits::Validate;
use fleetgate_protocol::manifest::{ArtifactKind, Compat, Manifest, ManifestSpec, chunk_leaves};
use fleetgate_protocol::sign::SigningKey;
use fleetgate_protocol::{Domain, Encoding, RollbackDirective, encode, merkle};
use semver::Version;

use super::*;
use crate::behaviour::DataShape;

const NOW: u64 = 1_000_000;

fn release_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

fn gateway_key() -> SigningKey {
    SigningKey::from_bytes(&[2; 32])
}

fn profile(faults: Faults) -> DeviceProfile {
    DeviceProfile {
        trust: Trust {
            keys: vec![release_key().verifying_key().to_bytes()],
            threshold: 1,
            rollback_keys: vec![gateway_key().verifying_key().to_bytes()],
        },
        faults,
        ..DeviceProfile::default()
    }
}

fn model(version: &str, release: u64) -> Installed {
    Installed {
        name: "sim-model".into(),
        version: Version::parse(version).unwrap(),
        release,
    }
}

/// `sim-model` 2.0.0 (release 2): its artifact and its signed manifest.
fn release() -> (Vec<u8>, Signed) {
    let artifact: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    let spec = ManifestSpec {
        kind: ArtifactKind::Model,
        name: "sim-model".into(),
        version: Version::new(2, 0, 0),
        release: 2,
        compat: Compat::default(),
        chunk_size: 256,
        created_ms: NOW - 1000,
        expires_ms: NOW + 3_600_000,
    };
    let body = encode(&Manifest::build(spec, &artifact), Encoding::Postcard).unwrap();
    (
        artifact,
        Signed::sign(Domain::Manifest, body, &[release_key()]),
    )
}

/// Offers `sim-model` 2.0.0 (release 2) as `transfer` and feeds every chunk.
fn install(updater: &mut Updater, b: &mut Behaviour, transfer: u64) -> UpdateEffect {
    let (artifact, manifest) = release();
    let offer = UpdateOffer { transfer, manifest };
    let report = updater.offer(b, &offer, NOW);
    assert_eq!(report.state, UpdateState::Accepted { next_chunk: 0 });
    let leaves = chunk_leaves(&artifact, 256);
    let mut effect = UpdateEffect::None;
    for (i, data) in artifact.chunks(256).enumerate() {
        let chunk = Chunk {
            transfer,
            index: i as u32,
            data: data.to_vec(),
            proof: merkle::proof(&leaves, i),
        };
        effect = updater.chunk(b, &chunk).1;
    }
    effect
}

/// A device that installed `sim-model` 2.0.0 with transfer 5, and 1.0.0 in its other slot.
fn updated(faults: Faults) -> (Updater, Behaviour) {
    let mut updater = Updater::new(profile(faults));
    let mut b = Behaviour::new("d1".into(), 0, 1000, DataShape::default());
    assert_eq!(install(&mut updater, &mut b, 5), UpdateEffect::Reboot);
    (updater, b)
}

fn directive() -> RollbackDirective {
    RollbackDirective {
        device: "d1".into(),
        rollout: 3,
        transfer: 5,
        kind: ArtifactKind::Model,
        from: model("2.0.0", 2),
        to: model("1.0.0", 1),
        issued_ms: NOW - 1000,
        expires_ms: NOW + 60_000,
    }
}

#[test]
fn an_install_records_its_transfer_and_keeps_the_old_image() {
    let (_, b) = updated(Faults::default());
    let slot = b.slot(ArtifactKind::Model, "sim-model").unwrap();
    assert_eq!(*slot.running, model("2.0.0", 2));
    assert_eq!(slot.installed_by, Some(5));
    assert_eq!(slot.previous, Some(&model("1.0.0", 1)));
    let fresh = Behaviour::new("d2".into(), 0, 1000, DataShape::default());
    let factory = fresh.slot(ArtifactKind::Model, "sim-model").unwrap();
    assert_eq!((factory.installed_by, factory.previous), (None, None));
    let firmware = fresh.slot(ArtifactKind::Firmware, "sim-fw").unwrap();
    assert_eq!(firmware.running.name, "sim-fw");
    assert!(fresh.slot(ArtifactKind::Firmware, "other-fw").is_none());
}

#[test]
fn a_rollback_swaps_the_slots_acks_done_and_reboots() {
    let (mut updater, mut b) = updated(Faults::default());
    let signed = directive().sign(&gateway_key());
    let outcome = updater.rollback(&mut b, 40, &signed, NOW);
    assert_eq!(
        outcome,
        RollbackOutcome {
            ack: CommandAck {
                id: 40,
                status: AckStatus::Done
            },
            refused: None,
            effect: UpdateEffect::Reboot,
        }
    );
    assert_eq!(b.models, [model("1.0.0", 1)]);
    assert_eq!(b.hello().models, [model("1.0.0", 1)]);
    let slot = b.slot(ArtifactKind::Model, "sim-model").unwrap();
    assert_eq!(slot.installed_by, None, "the factory image has no transfer");
    assert_eq!(
        slot.previous,
        Some(&model("2.0.0", 2)),
        "the reverted-from image stays in the other slot"
    );
    assert_eq!(b.previous[0].2, Some(5), "and keeps its transfer");

    // The same directive again (a redelivery) is refused cleanly.
    let again = updater.rollback(&mut b, 41, &signed, NOW + 10);
    assert_eq!(again.refused, Some(RollbackError::NotRunning));
    assert_eq!(again.effect, UpdateEffect::None);
    let AckStatus::Rejected { reason } = &again.ack.status else {
        panic!("{again:?}")
    };
    assert!(reason.starts_with("not_running: "), "{reason}");
    again.ack.validate().unwrap();
    assert_eq!(b.models, [model("1.0.0", 1)]);
}

#[test]
fn a_revert_restores_the_transfer_that_installed_the_old_image() {
    // 1.0.0 -> 2.0.0 (transfer 5) -> 3.0.0 (transfer 6), then back to 2.0.0.
    let (_, mut b) = updated(Faults::default());
    b.install(ArtifactKind::Model, model("3.0.0", 3), 6);
    assert!(b.revert(ArtifactKind::Model, "sim-model"));
    let slot = b.slot(ArtifactKind::Model, "sim-model").unwrap();
    assert_eq!(
        (slot.running, slot.installed_by, slot.previous),
        (&model("2.0.0", 2), Some(5), Some(&model("3.0.0", 3)))
    );
    assert!(!b.revert(ArtifactKind::Model, "other-model"));
}

#[test]
fn refused_rollbacks_say_why_and_change_nothing() {
    let untrusted = directive().sign(&release_key());
    let other_device = RollbackDirective {
        device: "d2".into(),
        ..directive()
    };
    let expired = RollbackDirective {
        expires_ms: NOW,
        ..directive()
    };
    let never_had = RollbackDirective {
        to: model("0.9.0", 1),
        ..directive()
    };
    let other_transfer = RollbackDirective {
        transfer: 4,
        ..directive()
    };
    let gw = gateway_key();
    let skewed = Faults {
        clock_skew_ms: 120_000,
        ..Faults::default()
    };
    let cases: Vec<(&str, Faults, Signed, RollbackError)> = vec![
        (
            "release key, not the gateway's",
            Faults::default(),
            untrusted,
            RollbackError::NoTrustedSignature,
        ),
        (
            "other device",
            Faults::default(),
            other_device.sign(&gw),
            RollbackError::WrongDevice,
        ),
        (
            "expired",
            Faults::default(),
            expired.sign(&gw),
            RollbackError::Expired,
        ),
        (
            "expired on a fast clock",
            skewed,
            directive().sign(&gw),
            RollbackError::Expired,
        ),
        (
            "a version it never had",
            Faults::default(),
            never_had.sign(&gw),
            RollbackError::NotPrevious,
        ),
        (
            "other transfer",
            Faults::default(),
            other_transfer.sign(&gw),
            RollbackError::NotInstalledByTransfer,
        ),
    ];
    for (name, faults, signed, want) in cases {
        let (mut updater, mut b) = updated(faults);
        let outcome = updater.rollback(&mut b, 7, &signed, NOW);
        assert_eq!(outcome.refused, Some(want), "{name}");
        assert_eq!(outcome.effect, UpdateEffect::None, "{name}");
        let AckStatus::Rejected { reason } = &outcome.ack.status else {
            panic!("{name}: {outcome:?}")
        };
        assert!(
            reason.starts_with(&format!("{}: ", want.name())),
            "{name}: {reason}"
        );
        assert_eq!(b.models, [model("2.0.0", 2)], "{name}");
    }
}

#[test]
fn a_device_without_rollback_keys_refuses_every_directive() {
    let mut updater = Updater::new(DeviceProfile::default());
    let mut b = Behaviour::new("d1".into(), 0, 1000, DataShape::default());
    let outcome = updater.rollback(&mut b, 1, &directive().sign(&gateway_key()), NOW);
    assert_eq!(outcome.refused, Some(RollbackError::NoTrustedSignature));
}

#[test]
fn a_factory_image_has_nothing_to_roll_back_to() {
    let mut updater = Updater::new(profile(Faults::default()));
    let mut b = Behaviour::new("d1".into(), 0, 1000, DataShape::default());
    let factory = RollbackDirective {
        from: model("1.0.0", 1),
        to: model("0.9.0", 0),
        ..directive()
    };
    let outcome = updater.rollback(&mut b, 1, &factory.sign(&gateway_key()), NOW);
    assert_eq!(outcome.refused, Some(RollbackError::NotInstalledByTransfer));
}

#[test]
fn the_transfer_that_installed_the_running_image_is_answered_installed_again() {
    let (mut updater, b) = updated(Faults::default());
    let (_, manifest) = release();
    let again = UpdateOffer {
        transfer: 5,
        manifest: manifest.clone(),
    };
    assert_eq!(
        updater.offer(&b, &again, NOW).state,
        UpdateState::Installed {
            version: Version::new(2, 0, 0),
            release: 2
        }
    );
    // Another transfer of the same release is still a downgrade.
    let other = UpdateOffer {
        transfer: 6,
        manifest,
    };
    assert!(matches!(
        updater.offer(&b, &other, NOW).state,
        UpdateState::Rejected {
            reason: UpdateError::Downgrade,
            ..
        }
    ));
}
