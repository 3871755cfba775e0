//! JSON shapes of API responses. Times are RFC 3339 strings in UTC.

use std::collections::BTreeMap;

use fleetgate_protocol::{Action, HardwareMetrics, HardwareProfile, Installed, ModelMetrics};
use serde::Serialize;
use utoipa::ToSchema;

use crate::clock::rfc3339;
use crate::model::{
    AlertRecord, AlertSource, ArtifactRecord, CommandRecord, CommandState, Device, DeviceCounters,
    LogRow, ReleaseRecord, Stamp, TelemetryRow, TransferRecord, TransferState,
};
use crate::registry::keys::hex;

fn time(ms: Option<u64>) -> Option<String> {
    ms.map(rfc3339)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceView {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_at: String,
    pub revoked: bool,
    pub online: bool,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub connected_at: Option<String>,
    pub disconnected_at: Option<String>,
    pub disconnect_reason: Option<String>,
    pub protocol: Option<&'static str>,
    pub peer: Option<String>,
    pub connections: u64,
    pub encoding: &'static str,
    #[schema(value_type = Option<super::schema::Installed>)]
    pub firmware: Option<Installed>,
    #[schema(value_type = Vec<super::schema::Installed>)]
    pub models: Vec<Installed>,
    #[schema(value_type = Option<super::schema::HardwareProfile>)]
    pub hardware: Option<HardwareProfile>,
    pub boot: Option<u32>,
    pub telemetry_interval_ms: Option<u32>,
    #[schema(value_type = Option<super::schema::HardwareMetrics>)]
    pub last_hw: Option<HardwareMetrics>,
    #[schema(value_type = super::schema::DeviceCounters)]
    pub counters: DeviceCounters,
    pub stored: StoredRows,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StoredRows {
    pub telemetry: u64,
    pub logs: u64,
}

impl From<Device> for DeviceView {
    fn from(d: Device) -> Self {
        let hello = d.hello;
        DeviceView {
            revoked: d.credential_hash.is_none(),
            id: d.id,
            labels: d.labels,
            enrolled_at: rfc3339(d.enrolled_at_ms),
            online: d.presence.online,
            first_seen: time(d.presence.first_seen_ms),
            last_seen: time(d.presence.last_seen_ms),
            connected_at: time(d.presence.connected_at_ms),
            disconnected_at: time(d.presence.disconnected_at_ms),
            disconnect_reason: d.presence.disconnect_reason,
            protocol: d
                .presence
                .protocol
                .map(|p| if p == 5 { "mqtt-5" } else { "mqtt-3.1.1" }),
            peer: d.presence.peer,
            connections: d.presence.connections,
            encoding: d.encoding.name(),
            boot: hello.as_ref().map(|h| h.boot),
            telemetry_interval_ms: hello.as_ref().map(|h| h.telemetry_interval_ms),
            firmware: hello.as_ref().map(|h| h.firmware.clone()),
            models: hello.as_ref().map(|h| h.models.clone()).unwrap_or_default(),
            hardware: hello.map(|h| h.hardware),
            last_hw: d.last_hw,
            counters: d.counters,
            stored: StoredRows {
                telemetry: d.telemetry_rows,
                logs: d.log_rows,
            },
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TelemetryView {
    pub received_at: String,
    pub boot: u32,
    pub seq: u32,
    pub device_time: Option<String>,
    #[schema(value_type = super::schema::HardwareMetrics)]
    pub hw: HardwareMetrics,
    #[schema(value_type = Option<super::schema::ModelMetrics>)]
    pub model: Option<ModelMetrics>,
    pub samples: u32,
    pub binned_features: u32,
}

impl From<TelemetryRow> for TelemetryView {
    fn from(r: TelemetryRow) -> Self {
        TelemetryView {
            received_at: rfc3339(r.received_ms),
            boot: r.boot,
            seq: r.seq,
            device_time: (r.device_time_ms > 0).then(|| rfc3339(r.device_time_ms)),
            hw: r.hw,
            model: r.model,
            samples: r.samples,
            binned_features: r.binned_features,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LogView {
    pub received_at: String,
    pub level: &'static str,
    pub text: String,
    pub device_time: Option<String>,
}

impl From<LogRow> for LogView {
    fn from(r: LogRow) -> Self {
        LogView {
            received_at: rfc3339(r.received_ms),
            level: r.level.name(),
            text: r.text,
            device_time: (r.device_time_ms > 0).then(|| rfc3339(r.device_time_ms)),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StampView {
    pub at: String,
    pub by: String,
}

impl From<Stamp> for StampView {
    fn from(s: Stamp) -> Self {
        StampView {
            at: rfc3339(s.at_ms),
            by: s.by,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertView {
    pub id: u64,
    pub device: String,
    pub kind: String,
    pub severity: &'static str,
    pub state: &'static str,
    pub source: String,
    pub opened_at: String,
    pub last_at: String,
    pub count: u64,
    pub value: Option<f64>,
    pub message: String,
    pub acknowledged: Option<StampView>,
    pub resolved: Option<StampView>,
    /// For drift alerts: which model version, cohort and feature.
    #[schema(value_type = Option<super::schema::DriftSubject>)]
    pub drift: Option<crate::model::DriftSubject>,
}

impl From<AlertRecord> for AlertView {
    fn from(a: AlertRecord) -> Self {
        AlertView {
            id: a.id,
            device: a.device,
            kind: a.kind.name().to_owned(),
            severity: a.severity.name(),
            state: a.state.name(),
            source: match &a.source {
                AlertSource::Device => "device".to_owned(),
                AlertSource::Rule { metric } => format!("rule:{}", metric.name()),
                AlertSource::Drift(_) => "drift".to_owned(),
            },
            drift: match a.source {
                AlertSource::Drift(d) => Some(d),
                _ => None,
            },
            opened_at: rfc3339(a.opened_ms),
            last_at: rfc3339(a.last_ms),
            count: a.count,
            value: a.value,
            message: a.message,
            acknowledged: a.acknowledged.map(Into::into),
            resolved: a.resolved.map(Into::into),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandView {
    pub id: u64,
    pub device: String,
    #[schema(value_type = super::schema::Action)]
    pub action: Action,
    pub created: StampView,
    pub state: &'static str,
    pub reason: Option<String>,
    pub answered_at: Option<String>,
}

impl From<CommandRecord> for CommandView {
    fn from(c: CommandRecord) -> Self {
        CommandView {
            id: c.id,
            device: c.device,
            action: c.action,
            created: c.created.into(),
            state: c.state.name(),
            reason: match c.state {
                CommandState::Rejected { reason } => Some(reason),
                _ => None,
            },
            answered_at: time(c.answered_ms),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReleaseView {
    pub kind: &'static str,
    pub name: String,
    pub version: String,
    pub release: u64,
    pub registered: StampView,
    pub aliases: Vec<String>,
    pub lineage: BTreeMap<String, String>,
    pub tags: Vec<String>,
    pub artifacts: Vec<ArtifactView>,
    /// The signed requirements of its artifacts (bench validation before production).
    pub requirements: Vec<super::validation::RequirementsView>,
    /// Bench results per hardware class.
    pub validation: BTreeMap<String, super::validation::ClassView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ArtifactView {
    pub sha256: String,
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: u64,
    #[schema(value_type = super::schema::Compat)]
    pub compat: fleetgate_protocol::Compat,
    pub expires_at: String,
    /// Ids of the keys that signed the manifest (hex).
    pub signed_by: Vec<String>,
    pub uploaded: StampView,
}

impl ReleaseView {
    pub fn new(r: ReleaseRecord, aliases: Vec<String>) -> ReleaseView {
        ReleaseView {
            kind: r.kind.name(),
            name: r.name,
            version: r.version.to_string(),
            release: r.release,
            registered: r.registered.into(),
            aliases,
            lineage: r.lineage,
            tags: r.tags,
            artifacts: r.artifacts.into_iter().map(ArtifactView::from).collect(),
            requirements: Vec::new(),
            validation: BTreeMap::new(),
        }
    }
}

impl From<ArtifactRecord> for ArtifactView {
    fn from(a: ArtifactRecord) -> Self {
        ArtifactView {
            sha256: hex(&a.sha256),
            size: a.size,
            chunk_size: a.manifest.chunk_size,
            chunks: a.manifest.chunk_count(),
            compat: a.compat,
            expires_at: rfc3339(a.manifest.expires_ms),
            signed_by: a.signed.signatures.iter().map(|s| hex(&s.key_id)).collect(),
            uploaded: a.uploaded.into(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TransferView {
    pub id: u64,
    pub device: String,
    pub kind: &'static str,
    pub name: String,
    pub version: String,
    pub release: u64,
    pub state: &'static str,
    pub reason: Option<&'static str>,
    pub detail: Option<String>,
    pub chunks: u64,
    pub next_chunk: u64,
    /// Percent of the chunks the device has stored.
    pub progress: f64,
    pub chunks_sent: u64,
    pub chunks_resent: u64,
    pub offers: u32,
    pub created: StampView,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

impl From<TransferRecord> for TransferView {
    fn from(t: TransferRecord) -> Self {
        let (reason, detail) = match &t.state {
            TransferState::Rejected { reason, detail }
            | TransferState::Failed { reason, detail } => {
                (Some(reason.name()), Some(detail.clone()))
            }
            TransferState::Cancelled { by } => (None, Some(format!("cancelled by {by}"))),
            _ => (None, None),
        };
        TransferView {
            id: t.id,
            device: t.device,
            kind: t.kind.name(),
            name: t.name,
            version: t.version.to_string(),
            release: t.release,
            state: t.state.name(),
            reason,
            detail,
            chunks: t.chunks,
            next_chunk: t.next_chunk,
            progress: if t.chunks == 0 {
                100.0
            } else {
                (t.next_chunk as f64 * 1000.0 / t.chunks as f64).round() / 10.0
            },
            chunks_sent: t.chunks_sent,
            chunks_resent: t.chunks_resent,
            offers: t.offers,
            created: t.created.into(),
            updated_at: rfc3339(t.updated_ms),
            finished_at: time(t.finished_ms),
        }
    }
}
