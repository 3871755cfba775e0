//! What an outbox entry holds, and the JSON every upstream message carries: the envelope
//! (`site`, `seq`, `type`, `at`, `data`) and the `data` of each type. docs/uplink.md has their
//! schemas; `tests` checks the messages made here against them.
//!
//! Entries store the `data` already as JSON text: the writer renders it once, in the
//! transaction of its event, and the senders only wrap it.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::views::AlertView;
use crate::clock::rfc3339;
use crate::model::{AlertRecord, Device};
use crate::rollouts::model::{AuditEntry, RolloutRecord};

/// What an entry is about: its `type` upstream, and the last level of its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Alert,
    DriftWindow,
    Rollout,
    Presence,
    Inventory,
    Telemetry,
    /// The answer to a request from central operations.
    Reply,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Alert,
        Kind::DriftWindow,
        Kind::Rollout,
        Kind::Presence,
        Kind::Inventory,
        Kind::Telemetry,
        Kind::Reply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Alert => "alert",
            Kind::DriftWindow => "drift_window",
            Kind::Rollout => "rollout",
            Kind::Presence => "presence",
            Kind::Inventory => "inventory",
            Kind::Telemetry => "telemetry",
            Kind::Reply => "reply",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One outbox entry (stored as a versioned record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// [`Kind::name`].
    pub kind: String,
    /// When its event happened, ms since the epoch.
    pub at_ms: u64,
    /// The message's `data`, JSON text.
    pub data: Vec<u8>,
}

impl Entry {
    pub fn new(kind: Kind, at_ms: u64, data: &Value) -> Entry {
        Entry {
            kind: kind.name().to_owned(),
            at_ms,
            // A `Value` always serializes.
            data: serde_json::to_vec(data).unwrap_or_default(),
        }
    }

    /// The data as a JSON value (`Null` if it is not JSON, which the gateway never writes).
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.data).unwrap_or(Value::Null)
    }
}

/// The message that goes upstream for entry `seq` of `site`: the envelope around the data.
pub fn envelope(site: &str, seq: u64, e: &Entry) -> Vec<u8> {
    let head = json!({ "site": site, "seq": seq, "type": e.kind, "at": rfc3339(e.at_ms) });
    // `{"at":...,"seq":...,"site":...,"type":...}` with `,"data":<data>` before the brace.
    let mut out = serde_json::to_vec(&head).unwrap_or_default();
    out.pop();
    out.extend_from_slice(b",\"data\":");
    if e.data.is_empty() {
        out.extend_from_slice(b"null");
    } else {
        out.extend_from_slice(&e.data);
    }
    out.push(b'}');
    out
}

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertEvent {
    Opened,
    /// Folded into an unresolved alert with a higher severity.
    Escalated,
    Acknowledged,
    Resolved,
}

impl AlertEvent {
    pub fn name(self) -> &'static str {
        match self {
            AlertEvent::Opened => "opened",
            AlertEvent::Escalated => "escalated",
            AlertEvent::Acknowledged => "acknowledged",
            AlertEvent::Resolved => "resolved",
        }
    }

    /// Whether webhooks hear of it (Alertmanager knows firing and resolved only).
    pub fn notifies(self) -> bool {
        self != AlertEvent::Acknowledged
    }
}

/// `data` of an `alert` message: the event and the alert as the API shows it.
pub fn alert(event: AlertEvent, a: &AlertRecord) -> Value {
    json!({ "event": event.name(), "alert": AlertView::from(a.clone()) })
}

/// `data` of a `drift_window` message.
pub fn drift_window(model: &str, version: &str, cohort: &str, window: Value) -> Value {
    json!({ "model": model, "version": version, "cohort": cohort, "window": window })
}

/// Rollout events that page someone (webhooks): paused, rolled back, aborted; `resumed` ends
/// a pause. The rest (stages starting and passing, late joiners) go upstream only.
pub fn rollout_notifies(event: &str) -> bool {
    matches!(
        event,
        "paused" | "resumed" | "gate_failed" | "abort_threshold" | "rolled_back" | "aborted"
    )
}

/// `data` of a `rollout` message: one decision or operator action, with where the rollout is.
pub fn rollout(r: &RolloutRecord, e: &AuditEntry) -> Value {
    let detail: Value = serde_json::from_str(&e.detail).unwrap_or(Value::Null);
    json!({
        "rollout": r.id,
        "kind": r.kind.name(),
        "name": r.name,
        "version": r.version.to_string(),
        "state": r.state.name(),
        "stage": r.stage + 1,
        "stages": r.policy.stages.len(),
        "event": e.event,
        "message": e.message,
        "by": e.by,
        "detail": detail,
    })
}

/// `data` of a `presence` message.
pub fn presence(device: &str, online: bool, reason: Option<&str>) -> Value {
    json!({ "device": device, "online": online, "reason": reason })
}

/// `data` of an `inventory` message: what a device runs and is, from its last hello.
pub fn inventory(d: &Device) -> Value {
    let hello = d.hello.as_ref();
    json!({
        "device": d.id,
        "labels": d.labels,
        "firmware": hello.map(|h| &h.firmware),
        "models": hello.map(|h| h.models.clone()).unwrap_or_default(),
        "hardware": hello.map(|h| &h.hardware),
    })
}

/// `data` of a `telemetry` message: the stored row's values (raw samples and bin counts are
/// summarized by the drift windows, not forwarded).
pub fn telemetry(device: &str, t: &fleetgate_protocol::Telemetry) -> Value {
    json!({
        "device": device,
        "boot": t.boot,
        "seq": t.seq,
        "device_time": (t.time_ms > 0).then(|| rfc3339(t.time_ms)),
        "hw": t.hw,
        "model": t.model,
        "samples": t.samples.len(),
        "binned_features": t.bins.len(),
    })
}

/// `data` of a `reply` message: what became of a request from central operations.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reply {
    /// The request's `id` (rollout requests); `null` for bundles.
    pub request: Option<String>,
    /// The topic it came on.
    pub topic: String,
    /// `bundle` or `rollout`.
    pub what: String,
    /// `done`, `unchanged` (nothing to do: a bundle registered before, a request seen
    /// before) or `refused`.
    pub outcome: &'static str,
    /// As an HTTP answer would have it: 200, 201, 400, 403, 404, 409.
    pub status: u16,
    /// Why it was refused (a counter label): `not_permitted`, `unsigned`, `bad_signature`,
    /// `invalid`, `expired`, `conflict`, `not_found`, `failed`.
    pub reason: Option<&'static str>,
    pub message: String,
    /// The release registered (`kind name version`), or the rollout acted on.
    pub release: Option<String>,
    pub rollout: Option<u64>,
}

#[cfg(test)]
mod tests;
