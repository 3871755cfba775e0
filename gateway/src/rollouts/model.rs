//! What a rollout stores: the rollout, each of its devices, and its audit log. Every state the
//! engine decides is saved in the writer's transaction before anything it implies is sent.

use std::collections::BTreeMap;

use fleetgate_config::RolloutPolicy;
use fleetgate_protocol::{ArtifactKind, Installed};
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::model::Stamp;

/// Which devices a rollout is for (before hardware compatibility narrows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    All,
    /// Devices carrying every one of these labels with these values.
    Labels(BTreeMap<String, String>),
    Devices(Vec<String>),
}

impl Target {
    pub fn matches(&self, id: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Target::All => true,
            Target::Labels(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
            Target::Devices(ids) => ids.iter().any(|d| d == id),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    /// Not starting updates nor advancing; health gates still watch (and may roll back).
    Paused {
        reason: String,
        by: String,
    },
    Completed,
    /// Stopped without rolling back.
    Aborted {
        reason: String,
        by: String,
    },
    /// Stopped, and every device that took the new version was sent back to its previous one.
    RolledBack {
        reason: String,
        by: String,
    },
}

impl RolloutState {
    pub fn name(&self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused { .. } => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Aborted { .. } => "aborted",
            RolloutState::RolledBack { .. } => "rolled_back",
        }
    }

    /// Running or paused: the rollout may still start updates.
    pub fn is_active(&self) -> bool {
        matches!(self, RolloutState::Running | RolloutState::Paused { .. })
    }
}

/// A health gate's latest judgement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateEval {
    pub gate: Gate,
    pub verdict: Verdict,
    /// The updated cohort's value, the control's, and the threshold they were judged by.
    pub updated: Option<f64>,
    pub control: Option<f64>,
    pub threshold: f64,
    /// Telemetry messages (or predictions) and devices behind each side.
    pub updated_n: u64,
    pub control_n: u64,
    pub updated_devices: u64,
    pub control_devices: u64,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    AlertRate,
    LatencyP95,
    FreeMemory,
    Temperature,
    Power,
    Predictions,
    Confidence,
    Drift,
}

impl Gate {
    pub const ALL: [Gate; 8] = [
        Gate::AlertRate,
        Gate::LatencyP95,
        Gate::FreeMemory,
        Gate::Temperature,
        Gate::Power,
        Gate::Predictions,
        Gate::Confidence,
        Gate::Drift,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Gate::AlertRate => "alert_rate",
            Gate::LatencyP95 => "latency_p95",
            Gate::FreeMemory => "free_memory",
            Gate::Temperature => "temperature",
            Gate::Power => "power",
            Gate::Predictions => "predictions",
            Gate::Confidence => "confidence",
            Gate::Drift => "drift",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    /// Over its threshold now; the gate fails once this has lasted `gates.confirm`.
    Failing,
    Fail,
    /// Too few devices or samples on a side.
    Insufficient,
    /// No device of the target is left to compare with (the last stage).
    NoControl,
    /// Not applicable (e.g. drift on a firmware rollout, no telemetry of that metric).
    Off,
}

/// One rollout, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub id: u64,
    pub kind: ArtifactKind,
    pub name: String,
    pub version: Version,
    pub release: u64,
    pub target: Target,
    pub policy: RolloutPolicy,
    /// Devices in the plan when the rollout was created (stage sizes are shares of this).
    pub planned: u64,
    pub state: RolloutState,
    pub stage: usize,
    pub stage_started_ms: u64,
    /// When the current stage's installs were done: its bake started.
    pub baking_since_ms: Option<u64>,
    pub gates: Vec<GateEval>,
    pub created: Stamp,
    pub updated_ms: u64,
    pub finished_ms: Option<u64>,
    /// Audit entries written so far (the next one's number).
    pub audit_len: u64,
}

impl RolloutRecord {
    /// The release it rolls out, as a device reports what it runs.
    pub fn installed(&self) -> Installed {
        Installed {
            name: self.name.clone(),
            version: self.version.clone(),
            release: self.release,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Not started: its stage has not come, it is offline, or the rollout is paused.
    Pending,
    /// A transfer is in progress (its own state says offered, downloading, ...).
    Updating,
    Installed,
    /// Installed, and its stage passed the health gates.
    Healthy,
    Failed {
        reason: String,
    },
    Rejected {
        reason: String,
    },
    TimedOut,
    /// Its transfer was cancelled (the rollout stopped while it downloaded).
    Cancelled,
    /// A rollback directive went out as command `command`.
    RollbackSent {
        command: u64,
        sent: u32,
    },
    RolledBack,
    RollbackFailed {
        reason: String,
    },
    /// The rollout stopped (aborted or rolled back) before it updated this device.
    NotUpdated,
}

impl DeviceState {
    pub fn name(&self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Updating => "updating",
            DeviceState::Installed => "installed",
            DeviceState::Healthy => "healthy",
            DeviceState::Failed { .. } => "failed",
            DeviceState::Rejected { .. } => "rejected",
            DeviceState::TimedOut => "timed_out",
            DeviceState::Cancelled => "cancelled",
            DeviceState::RollbackSent { .. } => "rollback_sent",
            DeviceState::RolledBack => "rolled_back",
            DeviceState::RollbackFailed { .. } => "rollback_failed",
            DeviceState::NotUpdated => "not_updated",
        }
    }

    /// The device runs (or ran) the new version.
    pub fn took_it(&self) -> bool {
        matches!(self, DeviceState::Installed | DeviceState::Healthy)
    }

    /// Its update is over, one way or another.
    pub fn finished(&self) -> bool {
        matches!(
            self,
            DeviceState::Installed
                | DeviceState::Healthy
                | DeviceState::Failed { .. }
                | DeviceState::Rejected { .. }
                | DeviceState::TimedOut
        )
    }
}

/// One device of a rollout, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutDevice {
    pub device: String,
    /// The stage that updates it.
    pub stage: usize,
    /// Its place in the rollout's order (stratified, then by hash).
    pub order: u64,
    pub state: DeviceState,
    pub transfer: Option<u64>,
    /// What it ran before the update: what a rollback sends it back to.
    pub from: Option<Installed>,
    pub updated_ms: u64,
}

/// A decision or an operator action, with the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    /// `gateway` for the engine's own decisions, else the operator's identity.
    pub by: String,
    /// What happened: `created`, `stage_started`, `stage_installed`, `stage_passed`,
    /// `gate_failed`, `abort_threshold`, `rolled_back`, `paused`, `resumed`, `aborted`,
    /// `completed`, `late_joiner`, ...
    pub event: String,
    pub message: String,
    /// The numbers, as JSON text.
    pub detail: String,
}
