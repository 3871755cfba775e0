//! Tests of rollback directives: every refusal, the success path, the pinned encoding, and the
//! example in docs/protocol.md.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use proptest::prelude::*;
use semver::Version;

use super::*;
use crate::codec::decode;
use crate::sign::MAX_SIGNATURES;
use crate::{AckStatus, Action, Command, CommandAck};

/// The gateway's rollback key in these tests (and in the docs example).
fn gateway_key() -> SigningKey {
    SigningKey::from_bytes(&[1; 32])
}

fn trusted() -> [[u8; 32]; 1] {
    [gateway_key().verifying_key().to_bytes()]
}

fn image(version: &str, release: u64) -> Installed {
    Installed {
        name: "kws".into(),
        version: Version::parse(version).unwrap(),
        release,
    }
}

fn directive() -> RollbackDirective {
    RollbackDirective {
        device: "d1".into(),
        rollout: 7,
        transfer: 5,
        kind: ArtifactKind::Model,
        from: image("2.1.0", 9),
        to: image("2.0.0", 7),
        issued_ms: 1000,
        expires_ms: 2000,
    }
}

/// A device's slots of the model `kws`: running 2.1.0 installed by transfer 5, 2.0.0 in the
/// other slot.
struct Slots {
    running: Installed,
    installed_by: Option<u64>,
    previous: Option<Installed>,
}

impl Slots {
    fn new() -> Slots {
        Slots {
            running: image("2.1.0", 9),
            installed_by: Some(5),
            previous: Some(image("2.0.0", 7)),
        }
    }

    fn check(&self, signed: &Signed, now_ms: u64) -> Result<RollbackDirective, RollbackFailure> {
        check_rollback(signed, &trusted(), "d1", now_ms, |kind, name| {
            (kind == ArtifactKind::Model && name == self.running.name).then_some(SlotState {
                running: &self.running,
                installed_by: self.installed_by,
                previous: self.previous.as_ref(),
            })
        })
    }

    fn code(&self, signed: &Signed, now_ms: u64) -> Result<RollbackDirective, RollbackError> {
        self.check(signed, now_ms).map_err(|f| f.code)
    }
}

#[test]
fn a_good_directive_passes() {
    let d = directive();
    assert_eq!(Slots::new().check(&d.sign(&gateway_key()), 1500), Ok(d));
}

#[test]
fn every_refusal_is_distinct_and_in_order() {
    use RollbackError as E;
    let good = directive().sign(&gateway_key());
    let with = |f: fn(&mut RollbackDirective)| {
        let mut d = directive();
        f(&mut d);
        // Sign the encoding even where it breaks the rules, to reach the checks after decoding.
        Signed::sign(
            Domain::Rollback,
            encode(&d, Encoding::Postcard).unwrap(),
            &[gateway_key()],
        )
    };
    let mut tampered = good.clone();
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    let mut too_many = good.clone();
    too_many.signatures = vec![good.signatures[0].clone(); MAX_SIGNATURES + 1];
    let manifest_domain = Signed::sign(Domain::Manifest, good.body.clone(), &[gateway_key()]);
    let release_key = directive().sign(&SigningKey::from_bytes(&[2; 32]));
    let garbage = Signed::sign(Domain::Rollback, vec![1, 2, 3], &[gateway_key()]);
    let no_format = Signed::sign(
        Domain::Rollback,
        postcard::to_allocvec(&directive()).unwrap(),
        &[gateway_key()],
    );
    let long = Signed::sign(
        Domain::Rollback,
        vec![0; limits::MAX_ROLLBACK_LEN + 1],
        &[gateway_key()],
    );

    let slots = Slots::new();
    let factory = Slots {
        installed_by: None,
        ..Slots::new()
    };
    let empty_slot = Slots {
        previous: None,
        ..Slots::new()
    };
    let other_previous = Slots {
        previous: Some(image("1.9.0", 6)),
        ..Slots::new()
    };
    let other_release = Slots {
        running: image("2.1.0", 10),
        ..Slots::new()
    };
    let cases: Vec<(&str, &Slots, Signed, u64, RollbackError)> = vec![
        (
            "unknown key",
            &slots,
            release_key,
            1500,
            E::NoTrustedSignature,
        ),
        (
            "unsigned",
            &slots,
            Signed {
                signatures: vec![],
                ..good.clone()
            },
            1500,
            E::NoTrustedSignature,
        ),
        ("tampered body", &slots, tampered, 1500, E::BadSignature),
        (
            "signed as a manifest",
            &slots,
            manifest_domain,
            1500,
            E::BadSignature,
        ),
        (
            "too many signatures",
            &slots,
            too_many,
            1500,
            E::BadSignature,
        ),
        ("not a directive", &slots, garbage, 1500, E::Malformed),
        ("no format byte", &slots, no_format, 1500, E::Malformed),
        ("too long", &slots, long, 1500, E::Malformed),
        (
            "names differ",
            &slots,
            with(|d| d.to.name = "vad".into()),
            1500,
            E::Malformed,
        ),
        (
            "empty name",
            &slots,
            with(|d| {
                d.from.name.clear();
                d.to.name.clear()
            }),
            1500,
            E::Malformed,
        ),
        (
            "from is to",
            &slots,
            with(|d| d.to = d.from.clone()),
            1500,
            E::Malformed,
        ),
        (
            "bad device id",
            &slots,
            with(|d| d.device = "d/1".into()),
            1500,
            E::Malformed,
        ),
        (
            "expires before issued",
            &slots,
            with(|d| d.expires_ms = d.issued_ms),
            1500,
            E::Malformed,
        ),
        (
            "other device",
            &slots,
            with(|d| d.device = "d2".into()),
            1500,
            E::WrongDevice,
        ),
        // The device check comes first: a stale directive for another device is WrongDevice.
        (
            "other device, expired",
            &slots,
            with(|d| d.device = "d2".into()),
            2000,
            E::WrongDevice,
        ),
        ("at expiry", &slots, good.clone(), 2000, E::Expired),
        ("after expiry", &slots, good.clone(), 9000, E::Expired),
        (
            "other artifact",
            &slots,
            with(|d| {
                d.from.name = "vad".into();
                d.to.name = "vad".into()
            }),
            1500,
            E::NotRunning,
        ),
        (
            "firmware, not model",
            &slots,
            with(|d| d.kind = ArtifactKind::Firmware),
            1500,
            E::NotRunning,
        ),
        (
            "other version",
            &slots,
            with(|d| d.from.version = Version::new(2, 2, 0)),
            1500,
            E::NotRunning,
        ),
        (
            "same version, other release",
            &other_release,
            good.clone(),
            1500,
            E::NotRunning,
        ),
        (
            "other transfer",
            &slots,
            with(|d| d.transfer = 6),
            1500,
            E::NotInstalledByTransfer,
        ),
        (
            "factory image",
            &factory,
            good.clone(),
            1500,
            E::NotInstalledByTransfer,
        ),
        (
            "empty other slot",
            &empty_slot,
            good.clone(),
            1500,
            E::NoPrevious,
        ),
        (
            "other image in the other slot",
            &other_previous,
            good.clone(),
            1500,
            E::NotPrevious,
        ),
        (
            "a release it never had",
            &slots,
            with(|d| d.to.release = 8),
            1500,
            E::NotPrevious,
        ),
    ];
    for (name, slots, signed, now, want) in cases {
        assert_eq!(slots.code(&signed, now), Err(want), "{name}");
    }
}

#[test]
fn a_duplicate_after_the_revert_is_not_running() {
    let signed = directive().sign(&gateway_key());
    let mut slots = Slots::new();
    assert!(slots.check(&signed, 1500).is_ok());
    // The device swaps its slots, as it does when it reverts.
    let reverted = slots.previous.replace(slots.running.clone()).unwrap();
    slots.running = reverted;
    slots.installed_by = None;
    assert_eq!(slots.code(&signed, 1600), Err(RollbackError::NotRunning));
}

#[test]
fn names_are_snake_case_and_round_trip() {
    let names: Vec<&str> = RollbackError::ALL.iter().map(|e| e.name()).collect();
    assert_eq!(
        names,
        [
            "no_trusted_signature",
            "bad_signature",
            "malformed",
            "wrong_device",
            "expired",
            "not_running",
            "not_installed_by_transfer",
            "no_previous",
            "not_previous"
        ]
    );
    for e in RollbackError::ALL {
        assert_eq!(RollbackError::from_name(e.name()), Some(e));
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, alloc::format!("\"{}\"", e.name()));
    }
    assert_eq!(RollbackError::from_name("downgrade"), None);
}

#[test]
fn the_ack_reason_is_name_then_detail_and_always_fits() {
    let f = Slots::new()
        .check(&directive().sign(&gateway_key()), 2000)
        .unwrap_err();
    assert_eq!(
        f.reason(),
        "expired: expired at 2000 ms, device time 2000 ms"
    );
    let ack = CommandAck {
        id: 4,
        status: AckStatus::Rejected { reason: f.reason() },
    };
    ack.validate().unwrap();

    let long = RollbackFailure {
        code: RollbackError::NotRunning,
        detail: "é".repeat(limits::MAX_MESSAGE_LEN),
    };
    let reason = long.reason();
    assert!(reason.len() <= limits::MAX_MESSAGE_LEN && reason.starts_with("not_running: é"));
    limits::text("reason", &reason, limits::MAX_MESSAGE_LEN).unwrap();
}

fn hex(bytes: &[u8]) -> String {
    use core::fmt::Write;
    let mut s = String::new();
    for b in bytes {
        write!(s, "{b:02x}").unwrap();
    }
    s
}

/// Pins the signed bytes of a directive (devices verify signatures over exactly these) and the
/// signature itself (ed25519 is deterministic), which pins the domain tag too.
#[test]
fn directive_golden_bytes() {
    let d = directive();
    let bytes = encode(&d, Encoding::Postcard).unwrap();
    // 01 format; 02 "d1"; 07 rollout; 05 transfer; 00 Model; from: 03 "kws" 05 "2.1.0" 09
    // release; to: 03 "kws" 05 "2.0.0" 07 release; e807 issued 1000; d00f expires 2000.
    assert_eq!(
        hex(&bytes),
        "01026431070500036b777305322e312e3009036b777305322e302e3007e807d00f"
    );
    let back: RollbackDirective = decode(&bytes, Encoding::Postcard).unwrap();
    assert_eq!(back, d);

    let signed = d.sign(&gateway_key());
    assert_eq!(signed.body, bytes);
    assert_eq!(signed.signatures.len(), 1);
    assert_eq!(
        signed.signatures[0].key_id,
        crate::sign::key_id(&trusted()[0])
    );
    assert_eq!(hex(&signed.signatures[0].signature), GOLDEN_SIGNATURE);
}

/// ed25519 signature by the key with seed 32 x 0x01 over
/// `len(tag) || "fleetgate/rollback/v1" || body` of the golden directive, computed
/// independently with Python's `cryptography` package.
const GOLDEN_SIGNATURE: &str = "c18de6401a47027dc8377ba7a7cf7607a1ee310b7a64d4bd725e273fa39e16ff\
                                c7910b8d914d026ce14309e961fbc8afb0e6e49d553105eb0ea074ee3cd9150a";

/// In JSON the action is `{"rollback": <signed document>}`, like any signed document. (The
/// postcard bytes of a rollback command are pinned with every other message's.)
#[test]
fn a_rollback_command_in_json() {
    let cmd = Command {
        id: 2,
        action: Action::Rollback(Signed {
            body: vec![1, 2],
            signatures: vec![crate::sign::Signature {
                key_id: [7; 8],
                signature: [9; 64],
            }],
        }),
    };
    let json = encode(&cmd, Encoding::Json).unwrap();
    let text = core::str::from_utf8(&json).unwrap();
    assert!(
        text.starts_with(r#"{"id":2,"action":{"rollback":{"body":"AQI=","signatures":[{"key_id":"BwcHBwcHBwc=","signature":"#),
        "{text}"
    );
    assert_eq!(decode::<Command>(&json, Encoding::Json).unwrap(), cmd);
}

#[test]
fn commands_bound_a_directives_size_and_signatures() {
    let cmd = |body: usize, sigs: usize| Command {
        id: 1,
        action: Action::Rollback(Signed {
            body: vec![0; body],
            signatures: vec![
                crate::sign::Signature {
                    key_id: [0; 8],
                    signature: [0; 64],
                };
                sigs
            ],
        }),
    };
    cmd(limits::MAX_ROLLBACK_LEN, MAX_SIGNATURES)
        .validate()
        .unwrap();
    assert_eq!(
        cmd(limits::MAX_ROLLBACK_LEN + 1, 1)
            .validate()
            .unwrap_err()
            .field,
        "action.rollback.body"
    );
    assert_eq!(
        cmd(10, MAX_SIGNATURES + 1).validate().unwrap_err().field,
        "action.rollback.signatures"
    );
}

/// The rollback command in docs/protocol.md carries a real directive, signed by the test key.
#[test]
fn the_docs_example_verifies_and_decodes() {
    let doc = include_str!("../../../docs/protocol.md");
    let example = doc
        .split("```json cmd\n")
        .skip(1)
        .map(|b| &b[..b.find("```").unwrap()])
        .find(|b| b.contains("\"rollback\""))
        .expect("a rollback example in docs/protocol.md");
    let cmd: Command = decode(example.as_bytes(), Encoding::Json).unwrap();
    let Action::Rollback(signed) = cmd.action else {
        panic!("not a rollback: {example}")
    };
    assert_eq!(signed, directive().sign(&gateway_key()));
}

proptest! {
    /// Whatever a trusted key signed, checking it never panics.
    #[test]
    fn signed_arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut framed = vec![crate::codec::POSTCARD_FORMAT];
        framed.extend_from_slice(&body);
        for b in [body, framed] {
            let signed = Signed::sign(Domain::Rollback, b, &[gateway_key()]);
            let _ = Slots::new().check(&signed, 1500);
        }
    }

    /// Mutations of a valid directive, signed, never panic and never pass unless unchanged.
    #[test]
    fn mutated_directives_never_panic(idx in 0usize..64, byte in any::<u8>()) {
        let mut body = encode(&directive(), Encoding::Postcard).unwrap();
        let i = idx % body.len();
        let changed = body[i] != byte;
        body[i] = byte;
        let signed = Signed::sign(Domain::Rollback, body, &[gateway_key()]);
        let result = Slots::new().check(&signed, 1500);
        if changed {
            prop_assert!(result != Ok(directive()));
        }
    }
}
