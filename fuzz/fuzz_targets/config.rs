//! The config file parser: any text gives a config or a list of problems, never a panic, and
//! every problem list is non-empty and displays. For a config that loads, an empty set of
//! rollout overrides gives back exactly the configured policy. Key parsing rides along.

#![no_main]

use fleetgate_config::{Config, parse_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml_str(text, "fuzz.toml") {
        Ok(config) => {
            let unchanged = config
                .rollouts
                .policy_with_value(&serde_json::Map::new())
                .expect("no overrides are valid overrides");
            assert_eq!(unchanged, config.rollouts.policy);
        }
        Err(e) => {
            assert!(!e.errors.is_empty(), "an error without problems");
            drop(e.to_string());
        }
    }
    if parse_key(text).is_ok() {
        assert_eq!(text.trim().len(), 64);
    }
});
