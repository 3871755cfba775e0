//! What the HTTP API parses from request bodies:
//! - 0: every JSON request body type (`fleetgate::api::fuzzing::api_bodies`);
//! - 1: a baseline as JSON (`PUT .../baseline`), checked like the registry does;
//! - 2: a reference CSV (`POST .../baseline.csv`), with the query's columns and bin count
//!   taken from the selector; a baseline built from it is valid;
//! - 3: rollout policy overrides (the `policy` object of `POST /rollouts`) over the default
//!   policy.

#![no_main]

use std::sync::OnceLock;

use fleetgate::drift::baseline::Baseline;
use fleetgate_config::{Config, Rollouts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => fleetgate::api::fuzzing::api_bodies(payload),
        1 => {
            if let Ok(b) = serde_json::from_slice::<Baseline>(payload)
                && b.validate().is_ok()
            {
                assert_eq!(b.edges().len(), b.features.len());
            }
        }
        2 => {
            let Ok(text) = std::str::from_utf8(payload) else {
                return;
            };
            let prediction = (selector & 0x04 != 0).then_some("prediction");
            let confidence = (selector & 0x08 != 0).then_some("confidence");
            let bins = 2 + usize::from(selector >> 4) * 7;
            if let Ok(b) = Baseline::from_csv(text, prediction, confidence, bins) {
                assert_eq!(b.validate(), Ok(()));
            }
        }
        _ => {
            let Ok(overrides) =
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload)
            else {
                return;
            };
            if let Err(errors) = rollouts().policy_with_value(&overrides) {
                errors.iter().for_each(|e| drop(e.to_string()));
            }
        }
    }
});

fn rollouts() -> &'static Rollouts {
    static ROLLOUTS: OnceLock<Rollouts> = OnceLock::new();
    ROLLOUTS.get_or_init(|| Config::default().rollouts)
}
