//! Simulated fleetgate devices: real MQTT clients (rumqttc) that say hello, send noisy
//! telemetry and alerts, answer commands and reconnect with jittered backoff, like devices in
//! the field. Used by the `fleetgate-sim` command and by the end-to-end tests. Also load, stress
//! and burst runs (lean clients, measured phases) against a gateway or any MQTT broker.

pub mod behaviour;
pub mod bench;
pub mod burst;
pub mod enroll;
pub mod fleet;
pub mod ingest;
pub mod load;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod seq;
pub mod stats;
pub mod stress;
mod swarm;
pub mod updater;

pub use enroll::Credential;
pub use fleet::{FleetSpec, run};
pub use report::Report;
