//! fleetgate: an edge gateway for fleets of TinyML devices.
//!
//! Devices speak MQTT to the gateway's own front (`broker`, with rumqttd's codecs and router);
//! what they publish goes to the storage writer (`bus`, `ingest`), which decodes, checks and
//! stores it in redb (`storage`) before the device's acknowledgement is sent; operators use the
//! HTTP API (`api`) and the CLI. ARCHITECTURE.md has the map.

pub mod api;
pub mod app;
pub mod auth;
pub mod backup;
pub mod broker;
pub mod bus;
pub mod cli;
pub mod clock;
pub mod drift;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod rollouts;
pub mod seq;
pub mod storage;
pub mod ui;
pub mod updates;
pub mod uplink;
pub mod validation;

pub use app::Gateway;
pub use fleetgate_config::Config;
