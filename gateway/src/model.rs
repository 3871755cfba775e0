//! The gateway's domain records: what it knows about devices, their telemetry, logs, alerts and
//! commands. Storage encodes these (see `storage::records`); the API renders them.

use std::collections::BTreeMap;

use fleetgate_protocol::{
    Action, AlertKind, ArtifactKind, Compat, Encoding, HardwareMetrics, Hello, HwMetric, LogLevel,
    Manifest, ModelMetrics, Severity, Signed, UpdateError,
};
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::seq::SeqTracker;

/// Everything the gateway keeps about one enrolled device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub enrolled_at_ms: u64,
    /// SHA-256 of the device's credential; `None` once revoked.
    pub credential_hash: Option<[u8; 32]>,
    pub labels: BTreeMap<String, String>,
    pub presence: Presence,
    /// Encoding of the device's last hello; commands are sent in it.
    pub encoding: Encoding,
    pub hello: Option<Hello>,
    pub last_hw: Option<HardwareMetrics>,
    pub counters: DeviceCounters,
    pub seq: SeqTracker,
    /// Telemetry rows and log lines currently stored (retention keeps them bounded).
    pub telemetry_rows: u64,
    pub log_rows: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub online: bool,
    pub first_seen_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
    pub connected_at_ms: Option<u64>,
    pub disconnected_at_ms: Option<u64>,
    pub disconnect_reason: Option<String>,
    /// MQTT protocol level of the current or last connection (4 = 3.1.1, 5 = 5).
    pub protocol: Option<u8>,
    pub peer: Option<String>,
    pub connections: u64,
}

/// Per-device ingest counts since enrollment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

impl Device {
    pub fn new(id: String, labels: BTreeMap<String, String>, hash: [u8; 32], now_ms: u64) -> Self {
        Device {
            id,
            enrolled_at_ms: now_ms,
            credential_hash: Some(hash),
            labels,
            presence: Presence::default(),
            encoding: Encoding::Postcard,
            hello: None,
            last_hw: None,
            counters: DeviceCounters::default(),
            seq: SeqTracker::default(),
            telemetry_rows: 0,
            log_rows: 0,
        }
    }

    pub fn revoked(&self) -> bool {
        self.credential_hash.is_none()
    }

    pub fn touch(&mut self, now_ms: u64) {
        let p = &mut self.presence;
        p.first_seen_ms.get_or_insert(now_ms);
        p.last_seen_ms = Some(p.last_seen_ms.map_or(now_ms, |t| t.max(now_ms)));
    }
}

/// One stored telemetry message. The raw samples and bin counts feed drift detection and are
/// not kept here; their counts are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRow {
    pub received_ms: u64,
    pub boot: u32,
    pub seq: u32,
    pub device_time_ms: u64,
    pub hw: HardwareMetrics,
    pub model: Option<ModelMetrics>,
    pub samples: u32,
    pub binned_features: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub received_ms: u64,
    pub level: LogLevel,
    pub text: String,
    pub device_time_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlertState {
    Open,
    Acknowledged,
    Resolved,
}

impl AlertState {
    pub fn name(self) -> &'static str {
        match self {
            AlertState::Open => "open",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Resolved => "resolved",
        }
    }

    pub fn from_name(name: &str) -> Option<AlertState> {
        [
            AlertState::Open,
            AlertState::Acknowledged,
            AlertState::Resolved,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// Who raised an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AlertSource {
    /// The device published it.
    Device,
    /// A configured rule on a telemetry metric; the rule resolves it when the metric clears.
    Rule { metric: HwMetric },
    /// A model version's inputs or predictions drifted from its baseline in a cohort; the
    /// drift engine resolves it when they are back.
    Drift(DriftSubject),
}

/// What a drift alert is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftSubject {
    pub model: String,
    pub version: Version,
    pub cohort: String,
    /// The feature's name; `None` for the predictions.
    pub feature: Option<String>,
}

/// An operator's (or the gateway's) action on an alert: when and by whom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamp {
    pub at_ms: u64,
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub id: u64,
    pub device: String,
    pub kind: AlertKind,
    pub severity: Severity,
    pub state: AlertState,
    pub source: AlertSource,
    pub opened_ms: u64,
    pub last_ms: u64,
    /// Occurrences folded into this alert while it was not resolved.
    pub count: u64,
    pub value: Option<f64>,
    pub message: String,
    pub acknowledged: Option<Stamp>,
    pub resolved: Option<Stamp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandState {
    /// Published to the device, no answer yet.
    Sent,
    Done,
    Rejected {
        reason: String,
    },
    Unsupported,
}

impl CommandState {
    pub fn name(&self) -> &'static str {
        match self {
            CommandState::Sent => "sent",
            CommandState::Done => "done",
            CommandState::Rejected { .. } => "rejected",
            CommandState::Unsupported => "unsupported",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub id: u64,
    pub device: String,
    pub action: Action,
    pub created: Stamp,
    pub state: CommandState,
    pub answered_ms: Option<u64>,
}

/// One release of a model or firmware: a version with its release counter, its artifacts (one
/// per hardware class), and the operator's annotations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub kind: ArtifactKind,
    pub name: String,
    pub version: Version,
    pub release: u64,
    pub registered: Stamp,
    /// Provenance: training run, dataset hash, metrics. Operator annotations, not signed.
    pub lineage: BTreeMap<String, String>,
    pub tags: Vec<String>,
    pub artifacts: Vec<ArtifactRecord>,
    /// What the model's inputs and predictions looked like on reference data (models only).
    pub baseline: Option<crate::drift::baseline::Baseline>,
}

/// One signed artifact of a release. The bytes live in the artifact store under `sha256`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub sha256: [u8; 32],
    pub size: u64,
    pub compat: Compat,
    pub manifest: Manifest,
    /// Exactly what devices are offered.
    pub signed: Signed,
    pub uploaded: Stamp,
}

impl ReleaseRecord {
    /// The artifact for a device with `hw`: the first whose compatibility rules it meets.
    pub fn artifact_for(
        &self,
        hw: &fleetgate_protocol::HardwareProfile,
    ) -> Option<&ArtifactRecord> {
        self.artifacts.iter().find(|a| a.compat.check(hw).is_ok())
    }
}

/// Where an update of one device stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TransferState {
    /// Waiting for a download slot or for the device to come online.
    Queued,
    /// Offer sent, no answer yet.
    Offered,
    Downloading,
    Verifying,
    Installing,
    Installed,
    /// The device refused the offer.
    Rejected {
        reason: UpdateError,
        detail: String,
    },
    /// The device gave up during download, verification or installation.
    Failed {
        reason: UpdateError,
        detail: String,
    },
    /// The device stopped answering, after every retry.
    TimedOut,
    /// Stopped by an operator (or superseded).
    Cancelled {
        by: String,
    },
    /// A validation transfer: the bench device ran the golden set from its spare slot and
    /// reported what it measured (stored with the validation results).
    Validated,
}

impl TransferState {
    pub fn name(&self) -> &'static str {
        match self {
            TransferState::Queued => "queued",
            TransferState::Offered => "offered",
            TransferState::Downloading => "downloading",
            TransferState::Verifying => "verifying",
            TransferState::Installing => "installing",
            TransferState::Installed => "installed",
            TransferState::Rejected { .. } => "rejected",
            TransferState::Failed { .. } => "failed",
            TransferState::TimedOut => "timed_out",
            TransferState::Cancelled { .. } => "cancelled",
            TransferState::Validated => "validated",
        }
    }

    /// No further change will come.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            TransferState::Installed
                | TransferState::Rejected { .. }
                | TransferState::Failed { .. }
                | TransferState::TimedOut
                | TransferState::Cancelled { .. }
                | TransferState::Validated
        )
    }
}

/// One update of one device, from offer to outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub id: u64,
    pub device: String,
    pub kind: ArtifactKind,
    pub name: String,
    pub version: Version,
    pub release: u64,
    pub sha256: [u8; 32],
    pub size: u64,
    pub chunks: u64,
    pub state: TransferState,
    /// Chunks the device has stored (all before this index).
    pub next_chunk: u64,
    pub chunks_sent: u64,
    /// Chunks sent again because the device asked for them again (after a disconnect).
    pub chunks_resent: u64,
    /// Offers made (the first one and every re-offer after a stall or reconnect).
    pub offers: u32,
    pub created: Stamp,
    pub updated_ms: u64,
    pub finished_ms: Option<u64>,
}

/// An operator token created through the API. The secret itself is shown once and never
/// stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub digest: [u8; 32],
    pub role: crate::auth::Role,
    pub created_ms: u64,
    pub created_by: String,
}

/// One change an operator made through the API, recorded whether it succeeded or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: u64,
    /// The token's name.
    pub by: String,
    pub role: crate::auth::Role,
    pub method: String,
    /// The request path, without the query.
    pub path: String,
    /// HTTP status of the answer.
    pub status: u16,
}
