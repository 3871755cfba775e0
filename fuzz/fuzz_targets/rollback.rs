//! Rollback directives, as a device checks them:
//! - 0: a directive body in either encoding (decodes without panic, round trips);
//! - 1: a signed directive (postcard or JSON) through `check_rollback`;
//! - 2: any body, signed here by the trusted key, through `check_rollback`, so the checks after
//!   the signature see arbitrary directives.
//!
//! Every refusal must give a reason that makes a valid rejecting ack, as `reason()` promises;
//! an accepted directive must be for this device and name exactly what its slots hold.

#![no_main]

use fleetgate_fuzz::{
    ROLLBACK_DEVICE, ROLLBACK_NOW_MS, ROLLBACK_TRANSFER, rollback_slots, round_trip, split,
    test_key, trusted,
};
use fleetgate_protocol::limits::Validate;
use fleetgate_protocol::{
    AckStatus, ArtifactKind, CommandAck, Domain, Encoding, RollbackDirective, Signed, SlotState,
    check_rollback,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((choice, encoding, payload)) = split(data) else {
        return;
    };
    match choice % 3 {
        0 => drop(round_trip::<RollbackDirective>(payload, encoding)),
        1 => {
            let signed: Option<Signed> = match encoding {
                Encoding::Postcard => postcard::from_bytes(payload).ok(),
                Encoding::Json => serde_json::from_slice(payload).ok(),
            };
            if let Some(signed) = signed {
                check(&signed);
            }
        }
        _ => check(&Signed::sign(
            Domain::Rollback,
            payload.to_vec(),
            &[test_key()],
        )),
    }
});

fn check(signed: &Signed) {
    let (running, previous) = rollback_slots();
    let slot = |kind: ArtifactKind, name: &str| {
        (kind == ArtifactKind::Model && name == running.name).then_some(SlotState {
            running,
            installed_by: Some(ROLLBACK_TRANSFER),
            previous: Some(previous),
        })
    };
    match check_rollback(signed, &trusted(), ROLLBACK_DEVICE, ROLLBACK_NOW_MS, slot) {
        Ok(d) => {
            assert_eq!(d.device, ROLLBACK_DEVICE);
            assert_eq!(d.transfer, ROLLBACK_TRANSFER);
            assert!((&d.from, &d.to) == (running, previous));
            assert!(ROLLBACK_NOW_MS < d.expires_ms);
        }
        Err(failure) => {
            let ack = CommandAck {
                id: 0,
                status: AckStatus::Rejected {
                    reason: failure.reason(),
                },
            };
            if let Err(e) = ack.validate() {
                panic!("the rejecting ack for {failure:?} is invalid: {e}");
            }
        }
    }
}
