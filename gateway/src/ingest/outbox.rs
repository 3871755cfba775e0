//! The writer's side of the outboxes: what goes to the upstream broker and to the alert
//! webhooks is recorded here, inside the transaction of the event that causes it, and the
//! destinations' acknowledgements come back here to move their cursors (see
//! `storage::outbox`, `uplink`).
//!
//! Invariants:
//! - An entry is pushed in the same transaction as its event: a failed commit loses both.
//! - Nothing is recorded for a destination that is not configured (the uplink off, no
//!   webhooks): then the writer does exactly what it did without outboxes.
//! - The only state kept in memory is when each device's telemetry was last forwarded (for
//!   `telemetry = "downsampled"`); a reload forgets it, so at worst one more message per
//!   device goes up.

use std::collections::HashMap;
use std::sync::Arc;

use fleetgate_config::{Config, Forward, TelemetryForward};
use fleetgate_protocol::{Hello, Telemetry};

use super::Writer;
use crate::drift::engine::{Evaluation, StreamKey};
use crate::model::AlertRecord;
use crate::rollouts::model::AuditEntry;
use crate::storage::outbox::{Limits, Stream};
use crate::storage::records::Record;
use crate::storage::{self, Tables};
use crate::uplink::event::{self, AlertEvent, Entry, Kind};
use crate::uplink::{Signals, upstream};

/// What the writer records, for whom.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// What goes upstream; `None`: the uplink is off.
    forward: Option<Forward>,
    upstream_limits: Limits,
    /// The configured webhooks' names; none: nothing is recorded for webhooks.
    webhooks: Vec<String>,
    webhook_limits: Limits,
    signals: Arc<Signals>,
    /// Streams that got entries since the last commit.
    pushed: [bool; 2],
    /// When each device's telemetry last went upstream (downsampling).
    last_telemetry: HashMap<String, u64>,
}

impl Recorder {
    pub fn new(config: &Config) -> Recorder {
        Recorder {
            forward: config.uplink.enabled.then(|| config.uplink.forward.clone()),
            upstream_limits: config.uplink.outbox.into(),
            webhooks: config
                .alerts
                .webhooks
                .iter()
                .map(|w| w.name.clone())
                .collect(),
            webhook_limits: config.alerts.webhook_outbox.into(),
            signals: Signals::new(),
            pushed: [false; 2],
            last_telemetry: HashMap::new(),
        }
    }

    pub fn signals(&self) -> Arc<Signals> {
        self.signals.clone()
    }

    /// Makes the configured destinations the outboxes' destinations (an outbox without any is
    /// emptied). Called once at start.
    pub fn init(&self, store: &storage::Store) -> storage::Result<()> {
        let upstream: Vec<&str> = match self.forward {
            Some(_) => vec![upstream::DESTINATION],
            None => Vec::new(),
        };
        let hooks: Vec<&str> = self.webhooks.iter().map(String::as_str).collect();
        store.write(|t| {
            t.outbox_destinations(Stream::Upstream, &upstream)?;
            t.outbox_destinations(Stream::Webhooks, &hooks)
        })
    }

    fn push(
        &mut self,
        t: &mut Tables<'_>,
        stream: Stream,
        kind: Kind,
        at_ms: u64,
        data: &serde_json::Value,
    ) -> storage::Result<()> {
        let limits = match stream {
            Stream::Upstream => self.upstream_limits,
            Stream::Webhooks => self.webhook_limits,
        };
        t.outbox_push(stream, &Entry::new(kind, at_ms, data).encode(), limits)?;
        self.pushed[stream as usize] = true;
        Ok(())
    }

    /// After a commit: wakes the senders of the streams that got entries. (After a failed
    /// commit too, harmlessly: they find nothing new.)
    pub fn committed(&mut self) {
        for stream in Stream::ALL {
            if std::mem::take(&mut self.pushed[stream as usize]) {
                self.signals.notify(stream);
            }
        }
    }

    /// After a reload: the downsampling memory is not stored.
    pub fn reloaded(&mut self) {
        self.last_telemetry.clear();
    }

    fn upstream(&self, wanted: impl Fn(&Forward) -> bool) -> bool {
        self.forward.as_ref().is_some_and(wanted)
    }
}

impl Writer {
    /// An alert opened, escalated, was acknowledged or resolved.
    pub(super) fn record_alert(
        &mut self,
        t: &mut Tables<'_>,
        alert: &AlertRecord,
        what: AlertEvent,
        now: u64,
    ) -> storage::Result<()> {
        let up = self.outbox.upstream(|f| f.alerts);
        let hooks = !self.outbox.webhooks.is_empty() && what.notifies();
        if !up && !hooks {
            return Ok(());
        }
        let data = event::alert(what, alert);
        if up {
            self.outbox
                .push(t, Stream::Upstream, Kind::Alert, now, &data)?;
        }
        if hooks {
            self.outbox
                .push(t, Stream::Webhooks, Kind::Alert, now, &data)?;
        }
        Ok(())
    }

    /// A drift window closed.
    pub(super) fn record_drift_window(
        &mut self,
        t: &mut Tables<'_>,
        key: &StreamKey,
        evaluation: &Evaluation,
    ) -> storage::Result<()> {
        if !self.outbox.upstream(|f| f.drift) {
            return Ok(());
        }
        let Some(baseline) = self.drift.stream(key).map(|s| s.baseline.clone()) else {
            return Ok(());
        };
        let window = serde_json::to_value(crate::api::drift_window_view(evaluation, &baseline))
            .unwrap_or_default();
        let version = key.version.to_string();
        let data = event::drift_window(&key.model, &version, &key.cohort, window);
        self.outbox.push(
            t,
            Stream::Upstream,
            Kind::DriftWindow,
            evaluation.closed_ms,
            &data,
        )
    }

    /// A rollout decision or operator action (an entry of its audit log).
    pub(super) fn record_rollout(
        &mut self,
        t: &mut Tables<'_>,
        rollout: u64,
        entry: &AuditEntry,
    ) -> storage::Result<()> {
        let up = self.outbox.upstream(|f| f.rollouts);
        let hooks = !self.outbox.webhooks.is_empty() && event::rollout_notifies(&entry.event);
        if !up && !hooks {
            return Ok(());
        }
        let Some(record) = self.rollouts.record(rollout) else {
            return Ok(());
        };
        let data = event::rollout(record, entry);
        if up {
            self.outbox
                .push(t, Stream::Upstream, Kind::Rollout, entry.at_ms, &data)?;
        }
        if hooks {
            self.outbox
                .push(t, Stream::Webhooks, Kind::Rollout, entry.at_ms, &data)?;
        }
        Ok(())
    }

    /// A device connected or disconnected.
    pub(super) fn record_presence(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        online: bool,
        reason: Option<&str>,
        at_ms: u64,
    ) -> storage::Result<()> {
        if !self.outbox.upstream(|f| f.presence) {
            return Ok(());
        }
        let data = event::presence(device, online, reason);
        self.outbox
            .push(t, Stream::Upstream, Kind::Presence, at_ms, &data)
    }

    /// A hello; recorded when it changes what the device runs or is (`before`: its last).
    pub(super) fn record_inventory(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        before: Option<&Hello>,
        at_ms: u64,
    ) -> storage::Result<()> {
        if !self.outbox.upstream(|f| f.inventory) {
            return Ok(());
        }
        let Some(state) = self.devices.get(device) else {
            return Ok(());
        };
        let Some(now) = &state.device.hello else {
            return Ok(());
        };
        let same = before.is_some_and(|b| {
            b.firmware == now.firmware && b.models == now.models && b.hardware == now.hardware
        });
        if same {
            return Ok(());
        }
        let data = event::inventory(&state.device);
        self.outbox
            .push(t, Stream::Upstream, Kind::Inventory, at_ms, &data)
    }

    /// A telemetry message was stored.
    pub(super) fn record_telemetry(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        tel: &Telemetry,
        received_ms: u64,
    ) -> storage::Result<()> {
        let Some(f) = &self.outbox.forward else {
            return Ok(());
        };
        match f.telemetry {
            TelemetryForward::None => return Ok(()),
            TelemetryForward::All => {}
            TelemetryForward::Downsampled => {
                let every = f.telemetry_interval.as_millis() as u64;
                let last = self.outbox.last_telemetry.get(device).copied();
                if last.is_some_and(|l| received_ms < l.saturating_add(every)) {
                    return Ok(());
                }
                self.outbox
                    .last_telemetry
                    .insert(device.to_owned(), received_ms);
            }
        }
        let data = event::telemetry(device, tel);
        self.outbox
            .push(t, Stream::Upstream, Kind::Telemetry, received_ms, &data)
    }

    /// A destination acknowledged its outbox up to `upto`.
    pub(super) fn outbox_acknowledged(
        &mut self,
        t: &mut Tables<'_>,
        stream: Stream,
        destination: &str,
        upto: u64,
    ) -> storage::Result<()> {
        t.outbox_ack(stream, destination, upto)
    }
}

#[cfg(test)]
mod tests;
