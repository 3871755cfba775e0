//! The storage writer: the one owner of device state, presence, alerts and commands.
//!
//! Everything that changes stored state passes through one thread: device messages and
//! presence from the sessions, and operator requests from the API. It opens a transaction at
//! the first thing queued and applies what is queued to its in-memory state as it takes it, up
//! to `ingest.batch` messages or until `ingest.commit_delay` has passed since the first, and
//! commits them together. Effects that leave the writer
//! (acknowledgements to devices, command publishes, session kicks, API replies, metric counts)
//! happen only after the commit, so nothing is announced that a crash could undo.
//!
//! Invariants:
//! - A device message's receipt says "committed" only after the commit; a batch that fails to
//!   commit marks the receipts of every session in it failed (those sessions disconnect
//!   unacknowledged), and the writer reloads its state from storage. Connections are not
//!   stored state: a failed commit does not disconnect anyone else (see `presence`).
//! - A transaction that changes nothing is not committed (an idle gateway does not write).
//! - Bad input never stops the writer: an undecodable or invalid message is counted, logged
//!   (rate-limited), refused with a reason and skipped.
//! - The writer is the gateway: if it cannot go on (its state cannot be reloaded), it stops,
//!   and the gateway stops with it (see `app`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_config::{AlertRule, Config};
use fleetgate_protocol::{Downlink, Encoding, Uplink};
use tokio::sync::oneshot;

use crate::auth::{self, Credentials};
use crate::bus::{DownlinkTx, Kick, Links, Receipts};
use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::model::{AlertRecord, Device};
use crate::registry::ArtifactStore;
use crate::storage::{self, Store, Tables, schema};
use crate::updates;

mod alerts;
mod control;
mod drift;
pub(crate) mod outbox;
mod presence;
mod rollouts;
mod rows;
mod transfers;
mod uplink;
mod validation;

pub use control::{AlertAction, Control, ControlError, ControlTx};
pub use drift::{DriftAnswer, DriftQuery, DriftStream};
pub use rollouts::{RolloutCreated, RolloutRequest, ValidateRequest};
pub use transfers::{UpdatePlan, UpdateRequest};
pub use validation::{ValidationPlan, ValidationRequest};

pub use crate::bus::{PresenceEvent, UplinkMsg, WriterMsg, WriterTx};

use control::Reply;
use presence::Connection;

/// The writer's view of one device: the stored record plus what only lives in memory.
#[derive(Debug)]
struct DeviceState {
    device: Device,
    last_telemetry_key: u64,
    last_log_key: u64,
    dirty: bool,
}

/// An API reply held until its batch commits; called with the storage error if it did not.
type AfterCommit = Box<dyn FnOnce(Option<&str>) + Send>;

/// Side effects of a batch, carried out after it commits.
#[derive(Default)]
struct Effects {
    /// Device messages of the batch, by session: the receipts to mark committed (or failed),
    /// with the device and the highest message number.
    receipts: Vec<(String, Arc<Receipts>, u64)>,
    replies: Vec<AfterCommit>,
    downlinks: Vec<(String, Downlink, Encoding, Vec<u8>)>,
    chunks: Vec<transfers::ChunkSend>,
    credentials: Vec<(String, Option<auth::Digest32>)>,
    kicks: Vec<(String, Kick)>,
    stored: [u64; Uplink::ALL.len()],
    lost: i64,
    duplicates: u64,
    stop: Option<(u64, Instant, oneshot::Sender<()>)>,
    /// Highest flush marker seen in this batch.
    marker: u64,
    /// Device timestamps of the telemetry stored in this batch (for the ingest latency).
    telemetry_times: Vec<u64>,
}

impl Effects {
    /// Notes that message `n` of a session is in this batch.
    fn receipt(&mut self, device: &str, receipts: Arc<Receipts>, n: u64) {
        if let Some(last) = self.receipts.last_mut()
            && Arc::ptr_eq(&last.1, &receipts)
        {
            last.2 = last.2.max(n);
            return;
        }
        self.receipts.push((device.to_owned(), receipts, n));
    }

    /// Queues a reply that sends `result` after a successful commit, or the storage error.
    fn reply<T: Send + 'static>(&mut self, tx: Reply<T>, result: Result<T, ControlError>) {
        self.replies.push(Box::new(move |failed: Option<&str>| {
            let result = match failed {
                Some(e) => Err(ControlError::Storage(e.to_owned())),
                None => result,
            };
            let _ = tx.send(result);
        }));
    }
}

/// Settings the writer uses.
#[derive(Debug, Clone)]
struct Settings {
    batch: usize,
    commit_delay: Duration,
    telemetry_per_device: u64,
    logs_per_device: u64,
    telemetry_max_age: Duration,
    resolved_alerts_max_age: Duration,
    retention_interval: Duration,
    /// `storage.max_bytes`; 0: no quota.
    max_db_bytes: u64,
    rules: Vec<AlertRule>,
}

pub struct Writer {
    store: Store,
    settings: Settings,
    credentials: Arc<Credentials>,
    sessions: Arc<dyn Links>,
    downlink: DownlinkTx,
    metrics: Arc<Metrics>,
    devices: HashMap<String, DeviceState>,
    /// Devices connected now, by their connection (not reloaded from storage).
    connections: HashMap<String, Connection>,
    /// Alerts not yet resolved, by id; and their dedup index (device, kind name) -> id.
    unresolved: HashMap<u64, AlertRecord>,
    open_index: HashMap<(String, String), u64>,
    next_alert_id: u64,
    next_command_id: u64,
    /// Highest flush marker committed, and who waits for which marker.
    marker: u64,
    sync_waiters: Vec<(u64, oneshot::Sender<()>)>,
    updates: updates::Engine,
    update_settings: updates::Settings,
    drift: crate::drift::engine::Engine,
    drift_settings: crate::drift::engine::Settings,
    drift_label: Option<String>,
    drift_history: usize,
    artifacts: ArtifactStore,
    prepared: transfers::PreparedCache,
    next_transfer_id: u64,
    rollouts: crate::rollouts::Engine,
    rollout_settings: crate::rollouts::Settings,
    next_rollout_id: u64,
    /// Signs rollback directives; without it none can be sent.
    rollback_key: Option<Arc<ed25519_dalek::SigningKey>>,
    /// Rows the batch will store at its end.
    rows: rows::Rows,
    /// The storage quota (`storage.max_bytes`).
    quota: storage::quota::Quota,
    /// Bench devices and validation runs (`validation`).
    validation_settings: fleetgate_config::Validation,
    validation_runs: validation::Runs,
    /// What goes to the upstream broker and the alert webhooks (see `outbox`).
    outbox: outbox::Recorder,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

/// Seed of the drift engine's reservoir sampling.
const DRIFT_SEED: u64 = 0x5eed_f1ee_7da7;

/// How often timers (update stalls) are checked.
const TICK: Duration = Duration::from_secs(1);

/// The writer's queues: device messages (bounded by `ingest.queue`) and operator requests.
pub fn channels(
    config: &Config,
) -> (
    WriterTx,
    flume::Receiver<WriterMsg>,
    ControlTx,
    flume::Receiver<Control>,
) {
    let (tx, rx) = flume::bounded(config.ingest.queue);
    let (ctx, crx) = flume::bounded(256);
    (tx, rx, ControlTx(ctx), crx)
}

enum Item {
    Msg(WriterMsg),
    Control(Control),
}

impl Writer {
    pub fn new(
        store: Store,
        config: &Config,
        credentials: Arc<Credentials>,
        sessions: Arc<dyn Links>,
        downlink: DownlinkTx,
        metrics: Arc<Metrics>,
    ) -> storage::Result<Writer> {
        let settings = Settings {
            batch: config.ingest.batch,
            commit_delay: config.ingest.commit_delay,
            telemetry_per_device: config.retention.telemetry_per_device,
            logs_per_device: config.retention.logs_per_device,
            telemetry_max_age: config.retention.telemetry_max_age,
            resolved_alerts_max_age: config.retention.resolved_alerts_max_age,
            retention_interval: config.retention.interval,
            max_db_bytes: config.storage.max_bytes,
            rules: config.alerts.rules.clone(),
        };
        let rollout_settings = crate::rollouts::Settings {
            directive_ttl_ms: config.rollouts.directive_ttl.as_millis() as u64,
        };
        let mut writer = Writer {
            store,
            settings,
            credentials,
            sessions,
            downlink,
            metrics,
            devices: HashMap::new(),
            connections: HashMap::new(),
            unresolved: HashMap::new(),
            open_index: HashMap::new(),
            next_alert_id: 1,
            next_command_id: 1,
            marker: 0,
            sync_waiters: Vec::new(),
            updates: updates::Engine::default(),
            update_settings: (&config.updates).into(),
            drift: crate::drift::engine::Engine::new((&config.drift).into(), DRIFT_SEED),
            drift_settings: (&config.drift).into(),
            drift_label: config.drift.cohort_label.clone(),
            drift_history: config.drift.history,
            artifacts: ArtifactStore::new(&config.storage.data_dir),
            prepared: transfers::PreparedCache::new(),
            next_transfer_id: 1,
            rollouts: crate::rollouts::Engine::new(rollout_settings),
            rollout_settings,
            next_rollout_id: 1,
            rollback_key: None,
            rows: rows::Rows::default(),
            quota: storage::quota::Quota::new(config.storage.max_bytes, 0),
            validation_settings: config.validation.clone(),
            validation_runs: validation::Runs::new(),
            outbox: outbox::Recorder::new(config),
        };
        writer.reload()?;
        writer.outbox.init(&writer.store)?;
        Ok(writer)
    }

    /// What wakes the outboxes' senders when the writer committed entries for them.
    pub fn outbox_signals(&self) -> Arc<crate::uplink::Signals> {
        self.outbox.signals()
    }

    /// The key that signs rollback directives.
    pub fn set_rollback_key(&mut self, key: ed25519_dalek::SigningKey) {
        self.rollback_key = Some(Arc::new(key));
    }

    /// (Re)builds the in-memory state from storage: at start, and after a failed commit (then
    /// [`Writer::resume_connections`] puts the live connections back).
    fn reload(&mut self) -> storage::Result<()> {
        let loaded = self.store.load()?;
        self.rows.clear();
        self.outbox.reloaded();
        self.quota = storage::quota::Quota::new(self.settings.max_db_bytes, loaded.quota_ratio);
        self.devices.clear();
        for mut device in loaded.devices {
            // Stored presence is history; who is connected now is in `connections`.
            if device.presence.online {
                device.presence.online = false;
                device.presence.disconnect_reason = Some("gateway restarted".to_owned());
            }
            match device.credential_hash {
                Some(h) => self.credentials.set(&device.id, h),
                None => self.credentials.remove(&device.id),
            }
            let (t, l) = loaded.last_keys.get(&device.id).copied().unwrap_or((0, 0));
            self.devices.insert(
                device.id.clone(),
                DeviceState {
                    device,
                    last_telemetry_key: t,
                    last_log_key: l,
                    dirty: false,
                },
            );
        }
        self.unresolved.clear();
        self.open_index.clear();
        for alert in loaded.unresolved_alerts {
            self.open_index.insert(
                alerts::dedup_key(&alert.device, &alert.kind, &alert.source),
                alert.id,
            );
            self.unresolved.insert(alert.id, alert);
        }
        self.next_alert_id = loaded.next_alert_id;
        self.next_command_id = loaded.next_command_id;
        self.next_transfer_id = loaded.next_transfer_id;
        self.metrics.alerts_open.set(self.unresolved.len() as i64);
        // Transfers in progress resume: each is offered again when its device says hello.
        self.updates = updates::Engine::new(self.update_settings);
        self.prepared.clear();
        let now = now_ms();
        self.next_rollout_id = loaded.next_rollout_id;
        self.rollouts = crate::rollouts::Engine::new(self.rollout_settings);
        let limits: HashMap<u64, updates::Limits> =
            self.restore_rollouts(loaded.rollouts).into_iter().collect();
        for record in loaded.open_transfers {
            let event = match limits.get(&record.id) {
                Some(l) => updates::Event::StartLimited(record, *l),
                None => updates::Event::Start(record),
            };
            let _ = self.updates.on_event(event, now);
        }
        self.validation_restore()?;
        // Drift streams continue from their saved state (or their last stored windows).
        self.drift_restore()?;
        Ok(())
    }

    /// Runs until stopped. Call on a dedicated thread. Returns an error when the writer cannot
    /// go on; the gateway must stop then (nothing may be acknowledged without it).
    pub fn run(
        mut self,
        msgs: flume::Receiver<WriterMsg>,
        controls: flume::Receiver<Control>,
    ) -> Result<(), storage::StorageError> {
        let mut next_retention = Instant::now() + self.settings.retention_interval;
        let mut next_tick = Instant::now() + TICK;
        let mut stopping: Option<(u64, Instant, oneshot::Sender<()>)> = None;
        loop {
            self.metrics.writer_alive();
            let wake_at = match &stopping {
                Some((_, deadline, _)) => (*deadline).min(next_retention).min(next_tick),
                None => next_retention.min(next_tick),
            };
            if let Some(first) = next_item(&msgs, &controls, wake_at) {
                let intake = Intake {
                    msgs: &msgs,
                    controls: &controls,
                    buffer: VecDeque::from([first]),
                    taken: 1,
                    max: self.settings.batch,
                    close_at: Instant::now() + self.settings.commit_delay,
                };
                let effects = self.apply_items(intake)?;
                self.metrics.queue_depth.set(msgs.len() as i64);
                if let Some(stop) = self.finish_batch(effects) {
                    stopping = Some(stop);
                }
            }
            if Instant::now() >= next_tick {
                self.tick()?;
                next_tick = Instant::now() + TICK;
            }
            if Instant::now() >= next_retention {
                self.retention();
                next_retention = Instant::now() + self.settings.retention_interval;
            }
            if let Some((upto, deadline, _)) = &stopping {
                let flushed = self.marker >= *upto;
                if flushed || Instant::now() >= *deadline {
                    if !flushed {
                        tracing::warn!(
                            queued = msgs.len(),
                            "shutdown grace over before the flush marker"
                        );
                    }
                    if let Some((_, _, reply)) = stopping.take() {
                        let _ = reply.send(());
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Applies a batch collected beforehand (tests and the simulation).
    #[cfg(test)]
    fn apply_batch(&mut self, items: Vec<Item>) -> Result<Effects, storage::StorageError> {
        self.apply_items(items.into_iter())
    }

    /// Applies the items `items` yields, as it yields them, in one transaction. A failed commit
    /// fails the receipts of the sessions whose messages were in it, answers the API with the
    /// error and reloads; only a failed reload is returned (the writer cannot go on).
    fn apply_items(
        &mut self,
        items: impl Iterator<Item = Item>,
    ) -> Result<Effects, storage::StorageError> {
        let mut fx = Effects::default();
        let result = self.store.clone().write(|t| {
            for item in items {
                match item {
                    Item::Msg(m) => self.apply_msg(t, m, &mut fx)?,
                    Item::Control(c) => self.apply_control(t, c, &mut fx)?,
                }
            }
            self.write_dirty(t)
        });
        match result {
            Ok(()) => Ok(fx),
            Err(e) => {
                tracing::error!(error = %e, "storage write failed; batch dropped, state reloaded");
                let message = e.to_string();
                for reply in fx.replies.drain(..) {
                    reply(Some(&message));
                }
                self.fail_receipts(&fx);
                let kept = Effects {
                    stop: fx.stop.take(),
                    marker: fx.marker,
                    ..Effects::default()
                };
                self.recover()?;
                Ok(kept)
            }
        }
    }

    /// Writes the batch's rows, then the device records and counters it changed.
    fn write_dirty(&mut self, t: &mut Tables<'_>) -> storage::Result<()> {
        self.store_rows(t)?;
        for state in self.devices.values_mut().filter(|s| s.dirty) {
            t.put_device(&state.device)?;
            state.dirty = false;
        }
        t.set_meta(schema::META_NEXT_ALERT_ID, self.next_alert_id)?;
        t.set_meta(schema::META_NEXT_COMMAND_ID, self.next_command_id)
    }

    /// A batch did not commit: none of its device messages may be acknowledged. Their sessions
    /// disconnect; their devices send the messages again after reconnecting, and say hello
    /// again (so the engines do not count them as online meanwhile).
    fn fail_receipts(&mut self, fx: &Effects) {
        for (device, receipts, _) in &fx.receipts {
            receipts.failed();
            self.metrics.sessions_failed.inc();
            if let Some(c) = self.connections.get_mut(device) {
                c.hello = false;
            }
        }
    }

    /// After a failed commit: state from storage again, then the live connections back.
    fn recover(&mut self) -> Result<(), storage::StorageError> {
        if let Err(e) = self.reload() {
            tracing::error!(error = %e, "reloading state after a failed commit failed");
            return Err(e);
        }
        self.resume_connections()
    }

    /// Carries out a committed batch's effects; returns a stop request if one came in.
    fn finish_batch(&mut self, mut fx: Effects) -> Option<(u64, Instant, oneshot::Sender<()>)> {
        self.metrics.batches.inc();
        self.outbox.committed();
        for (_, receipts, n) in fx.receipts.drain(..) {
            receipts.committed(n);
        }
        for (i, channel) in Uplink::ALL.iter().enumerate() {
            if fx.stored[i] > 0 {
                self.metrics.stored(*channel, fx.stored[i]);
            }
        }
        self.metrics
            .ingested(now_ms(), &std::mem::take(&mut fx.telemetry_times));
        self.metrics.lost.inc_by(fx.lost);
        self.metrics.duplicates.inc_by(fx.duplicates);
        self.metrics.alerts_open.set(self.unresolved.len() as i64);
        for (device, digest) in fx.credentials.drain(..) {
            match digest {
                Some(d) => self.credentials.set(&device, d),
                None => self.credentials.remove(&device),
            }
        }
        for (device, why) in fx.kicks.drain(..) {
            self.sessions.kick(&device, why);
        }
        for (device, channel, encoding, payload) in fx.downlinks.drain(..) {
            if self
                .downlink
                .send(&device, channel, encoding, payload)
                .is_ok()
            {
                self.metrics.commands_sent.inc();
            }
        }
        self.send_chunks(std::mem::take(&mut fx.chunks));
        self.metrics
            .transfers_active
            .set(self.updates.live().count() as i64);
        for reply in fx.replies.drain(..) {
            reply(None);
        }
        self.marker = self.marker.max(fx.marker);
        let marker = self.marker;
        for (_, waiter) in self
            .sync_waiters
            .extract_if(.., |(upto, _)| *upto <= marker)
        {
            let _ = waiter.send(());
        }
        fx.stop
    }

    fn apply_msg(
        &mut self,
        t: &mut Tables<'_>,
        msg: WriterMsg,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        match msg {
            WriterMsg::Uplink(mut m) => {
                if m.rejected > 0
                    && let Some(s) = self.devices.get_mut(&m.device)
                {
                    s.device.counters.rejected += m.rejected;
                    s.dirty = true;
                }
                let refused = self.apply_uplink(t, &mut m, fx)?;
                if let Some((receipts, n)) = m.receipt {
                    if let Some(why) = refused {
                        receipts.refuse(n, why);
                    }
                    fx.receipt(&m.device, receipts, n);
                }
            }
            WriterMsg::Presence(p) => self.apply_presence(t, p, fx)?,
            WriterMsg::Rejected { device, count } => {
                if let Some(s) = self.devices.get_mut(&device) {
                    s.device.counters.rejected += count;
                    s.dirty = true;
                }
            }
            WriterMsg::FlushMarker(n) => fx.marker = fx.marker.max(n),
        }
        Ok(())
    }

    /// Timers: stalled transfers are offered again or time out, rollouts bake and judge their
    /// gates, drift windows close on time. Like a batch, a failed commit reloads (so what the
    /// engines decided in it is decided again, not lost).
    fn tick(&mut self) -> Result<(), storage::StorageError> {
        if self.updates.live().next().is_none() {
            self.prepared.clear();
        }
        let mut fx = Effects::default();
        let now = now_ms();
        let store = self.store.clone();
        let result = store.write(|t| {
            if self.updates.live().next().is_some() {
                self.update_event(t, updates::Event::Tick, now, &mut fx)?;
            }
            self.rollouts_tick(t, now, &mut fx)?;
            self.drift_tick(t, now)?;
            self.write_dirty(t)
        });
        match result {
            Ok(()) => {
                self.trim_prepared();
                self.finish_batch(fx);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "storage write of the timers failed; state reloaded");
                self.recover()
            }
        }
    }
}

/// Waits until a device message or an operator request arrives, or until `until`.
fn next_item(
    msgs: &flume::Receiver<WriterMsg>,
    controls: &flume::Receiver<Control>,
    until: Instant,
) -> Option<Item> {
    flume::Selector::new()
        .recv(controls, |c| c.ok().map(Item::Control))
        .recv(msgs, |m| m.ok().map(Item::Msg))
        .wait_deadline(until)
        .ok()
        .flatten()
}

/// The items of one batch, taken from the queues while the writer applies them: the batch
/// closes at `ingest.batch` items, or `ingest.commit_delay` after its first item, whichever
/// comes first. Taking them as they are applied (rather than collecting the batch first and
/// then applying it) keeps the writer working through the commit delay: messages that arrive
/// during it are applied as they arrive, and the commit follows the last one at once.
struct Intake<'q> {
    msgs: &'q flume::Receiver<WriterMsg>,
    controls: &'q flume::Receiver<Control>,
    /// Taken from the queues, not yet applied.
    buffer: VecDeque<Item>,
    /// Taken from the queues so far, the buffer included.
    taken: usize,
    max: usize,
    close_at: Instant,
}

impl Iterator for Intake<'_> {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.buffer.pop_front() {
                return Some(item);
            }
            if self.taken >= self.max {
                return None;
            }
            // Operator requests first, so that a sync registered before its marker was queued
            // is always applied before the marker.
            self.buffer
                .extend(self.controls.try_iter().map(Item::Control));
            let room = self.max.saturating_sub(self.taken + self.buffer.len());
            self.buffer
                .extend(self.msgs.try_iter().take(room).map(Item::Msg));
            self.taken += self.buffer.len();
            if !self.buffer.is_empty() {
                continue;
            }
            if Instant::now() >= self.close_at {
                return None;
            }
            let item = next_item(self.msgs, self.controls, self.close_at)?;
            self.taken += 1;
            return Some(item);
        }
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
