//! fleetgate: an edge gateway for fleets of TinyML devices.
//!
//! Devices speak MQTT to an embedded broker (rumqttd's router behind the gateway's own front,
//! see `broker`); what they publish is decoded, checked and stored in redb (`ingest`,
//! `storage`); operators use the HTTP API (`api`) and the CLI. ARCHITECTURE.md has the map.

pub mod api;
pub mod app;
pub mod auth;
pub mod backup;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod drift;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod rollouts;
pub mod storage;
pub mod ui;
pub mod updates;

pub use app::Gateway;
pub use fleetgate_config::Config;
