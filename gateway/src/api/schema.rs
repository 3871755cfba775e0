//! OpenAPI schemas of what the API serves but does not define: wire types of
//! `fleetgate-protocol` (a `no_std` crate that knows nothing of OpenAPI) and records of the
//! gateway's model, as their JSON looks. `schema/tests.rs` checks each against a real value's
//! JSON, field by field, so a change to the type shows up as a failing test here.

#![allow(dead_code)]

use std::collections::BTreeMap;

use utoipa::ToSchema;

/// An error answer: every 4xx and 5xx body.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong (4xx), or that the gateway log has the details (5xx).
    pub error: String,
}

/// A firmware, model or runtime a device runs.
#[derive(Debug, ToSchema)]
pub struct Installed {
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Monotonic release counter (anti-rollback); 0 when unknown.
    pub release: u64,
}

/// What a device is made of, from its hello.
#[derive(Debug, ToSchema)]
pub struct HardwareProfile {
    pub arch: String,
    pub class: String,
    pub ram_bytes: u64,
    pub flash_bytes: u64,
    pub accelerator: Option<String>,
    pub runtime: Option<Installed>,
}

/// Hardware health; a device reports what it can measure.
#[derive(Debug, ToSchema)]
pub struct HardwareMetrics {
    pub cpu_pct: Option<f32>,
    pub free_mem_bytes: Option<u64>,
    pub temp_c: Option<f32>,
    pub battery_mv: Option<u32>,
    pub power_mw: Option<f32>,
    pub inference_latency_us: Option<u32>,
}

/// What a model did since the device's previous telemetry message.
#[derive(Debug, ToSchema)]
pub struct ModelMetrics {
    pub name: String,
    pub version: String,
    pub inferences: u32,
    /// Predictions per class, indexed by class id.
    pub class_counts: Vec<u32>,
    pub mean_confidence: Option<f32>,
}

/// A device's message counts since its enrollment.
#[derive(Debug, ToSchema)]
pub struct DeviceCounters {
    pub hellos: u64,
    pub telemetry: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub alerts: u64,
    pub logs: u64,
    pub acks: u64,
    pub rejected: u64,
}

/// The runtime an artifact needs, at least this version.
#[derive(Debug, ToSchema)]
pub struct RuntimeReq {
    pub name: String,
    pub min_version: String,
}

/// Which devices an artifact is for; empty lists and zeros mean "any".
#[derive(Debug, ToSchema)]
pub struct Compat {
    pub classes: Vec<String>,
    pub arch: Option<String>,
    pub min_ram_bytes: u64,
    pub min_flash_bytes: u64,
    pub runtime: Option<RuntimeReq>,
}

/// What a drift alert is about.
#[derive(Debug, ToSchema)]
pub struct DriftSubject {
    pub model: String,
    pub version: String,
    pub cohort: String,
    /// The feature; null for the predictions.
    pub feature: Option<String>,
}

/// A new telemetry interval.
#[derive(Debug, ToSchema)]
pub struct TelemetryInterval {
    /// 100 to 86,400,000.
    #[schema(minimum = 100, maximum = 86_400_000)]
    pub interval_ms: u32,
}

/// A command for a device. Operators send `ping`, `reboot` and `set_telemetry_interval`;
/// the other actions are sent by the gateway's engines (updates, drift, rollouts) and appear
/// in command records only.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum Action {
    Ping,
    Reboot,
    SetTelemetryInterval(TelemetryInterval),
    #[schema(value_type = Object)]
    Update(BTreeMap<String, serde_json::Value>),
    #[schema(value_type = Object)]
    DriftBins(BTreeMap<String, serde_json::Value>),
    #[schema(value_type = Object)]
    Rollback(BTreeMap<String, serde_json::Value>),
}

#[cfg(test)]
mod tests;
