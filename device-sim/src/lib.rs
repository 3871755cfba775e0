//! Simulated fleetgate devices: real MQTT clients (rumqttc) that say hello, send noisy
//! telemetry and alerts, answer commands and reconnect with jittered backoff, like devices in
//! the field. Used by the `fleetgate-sim` command and by the end-to-end tests.

pub mod behaviour;
pub mod enroll;
pub mod fleet;
pub mod report;
pub mod updater;

pub use enroll::Credential;
pub use fleet::{FleetSpec, run};
pub use report::Report;
