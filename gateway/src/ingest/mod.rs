//! The storage writer: the one owner of device state, alerts and commands.
//!
//! Everything that changes stored state passes through one thread: device messages from the
//! broker, presence from the front, and operator requests from the API. It takes whatever is
//! queued (up to `ingest.batch` messages), applies it to its in-memory state and writes it in
//! one transaction. Effects that leave the gateway (command publishes, session kicks, API
//! replies, metric counts) happen only after the commit, so nothing is announced that a crash
//! could undo.
//!
//! Bad input never stops the writer: an undecodable or invalid message is counted, logged
//! (rate-limited) and skipped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleetgate_config::{AlertRule, Config};
use fleetgate_protocol::{
    Action, Alert, AlertKind, Command, CommandAck, DecodeError, DeviceId, Downlink, Encoding,
    Hello, LogLine, Severity, Telemetry, Uplink, decode, encode,
};
use tokio::sync::oneshot;

use crate::auth::{self, Credentials};
use crate::broker::DownlinkTx;
use crate::broker::front::{Kick, Sessions};
use crate::clock::{now_ms, now_us};
use crate::metrics::{Metrics, Reject};
use crate::model::{
    AlertRecord, AlertSource, AlertState, CommandRecord, CommandState, Device, LogRow, Stamp,
    TelemetryRow,
};
use crate::registry::ArtifactStore;
use crate::storage::{self, Store, Tables, schema};
use crate::updates;
use seq::SeqOutcome;

mod drift;
mod rollouts;
pub mod seq;
mod transfers;

pub use drift::{DriftAnswer, DriftQuery, DriftStream};

pub use rollouts::{RolloutCreated, RolloutRequest};
pub use transfers::{UpdatePlan, UpdateRequest};

pub type WriterTx = flume::Sender<WriterMsg>;

/// What the broker and the front send the writer.
#[derive(Debug)]
pub enum WriterMsg {
    Uplink(UplinkMsg),
    Presence(PresenceEvent),
    /// The front refused something from this device (counted per device).
    Rejected {
        device: String,
    },
    /// Flush marker `n` came through the broker: everything devices published before it was
    /// published has been delivered.
    FlushMarker(u64),
}

/// A message a device published, as the broker delivered it.
#[derive(Debug)]
pub struct UplinkMsg {
    pub device: String,
    pub channel: Uplink,
    pub encoding: Encoding,
    pub payload: Bytes,
    pub received_us: u64,
}

#[derive(Debug)]
pub struct PresenceEvent {
    pub device: String,
    /// Session id: a replaced session's late "offline" must not hide the new one.
    pub session: u64,
    pub online: bool,
    pub at_ms: u64,
    pub protocol: u8,
    pub peer: String,
    pub reason: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertAction {
    Acknowledge,
    Resolve,
}

/// A problem with an operator request, mapped to an HTTP status by the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("the gateway is shutting down")]
    Stopped,
}

type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// Operator requests; each is answered after its change is committed.
#[derive(Debug)]
pub enum Control {
    Enroll {
        id: String,
        labels: BTreeMap<String, String>,
        reply: Reply<String>,
    },
    RotateCredential {
        id: String,
        reply: Reply<String>,
    },
    Revoke {
        id: String,
        reply: Reply<()>,
    },
    Alert {
        id: u64,
        action: AlertAction,
        by: String,
        reply: Reply<AlertRecord>,
    },
    Command {
        device: String,
        action: Action,
        by: String,
        reply: Reply<CommandRecord>,
    },
    StartUpdates {
        request: UpdateRequest,
        by: String,
        reply: Reply<UpdatePlan>,
    },
    CancelUpdate {
        id: u64,
        by: String,
        reply: Reply<crate::model::TransferRecord>,
    },
    CreateRollout {
        request: Box<RolloutRequest>,
        by: String,
        reply: Reply<RolloutCreated>,
    },
    Rollout {
        id: u64,
        action: crate::rollouts::OperatorAction,
        by: String,
        reason: Option<String>,
        reply: Reply<crate::rollouts::model::RolloutRecord>,
    },
    /// Live views of one rollout, or of every rollout that may still act.
    RolloutViews {
        id: Option<u64>,
        reply: oneshot::Sender<Vec<crate::rollouts::View>>,
    },
    /// A model version's baseline was set or replaced.
    BaselineChanged {
        model: String,
        version: semver::Version,
    },
    Drift {
        query: DriftQuery,
        reply: oneshot::Sender<DriftAnswer>,
    },
    /// Answer once flush marker `upto` has arrived and what came before it is committed.
    Sync {
        upto: u64,
        reply: oneshot::Sender<()>,
    },
    /// Finish once flush marker `upto` has arrived (or at the deadline), then exit.
    Stop {
        upto: u64,
        deadline: Instant,
        reply: oneshot::Sender<()>,
    },
}

/// The API's handle on the writer.
#[derive(Debug, Clone)]
pub struct ControlTx(flume::Sender<Control>);

impl ControlTx {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Control) -> Result<T, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send_async(make(tx))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    pub async fn enroll(
        &self,
        id: String,
        labels: BTreeMap<String, String>,
    ) -> Result<String, ControlError> {
        self.ask(|reply| Control::Enroll { id, labels, reply })
            .await
    }

    pub async fn rotate_credential(&self, id: String) -> Result<String, ControlError> {
        self.ask(|reply| Control::RotateCredential { id, reply })
            .await
    }

    pub async fn revoke(&self, id: String) -> Result<(), ControlError> {
        self.ask(|reply| Control::Revoke { id, reply }).await
    }

    pub async fn alert(
        &self,
        id: u64,
        action: AlertAction,
        by: String,
    ) -> Result<AlertRecord, ControlError> {
        self.ask(|reply| Control::Alert {
            id,
            action,
            by,
            reply,
        })
        .await
    }

    pub async fn command(
        &self,
        device: String,
        action: Action,
        by: String,
    ) -> Result<CommandRecord, ControlError> {
        self.ask(|reply| Control::Command {
            device,
            action,
            by,
            reply,
        })
        .await
    }

    pub async fn start_updates(
        &self,
        request: UpdateRequest,
        by: String,
    ) -> Result<UpdatePlan, ControlError> {
        self.ask(|reply| Control::StartUpdates { request, by, reply })
            .await
    }

    pub async fn cancel_update(
        &self,
        id: u64,
        by: String,
    ) -> Result<crate::model::TransferRecord, ControlError> {
        self.ask(|reply| Control::CancelUpdate { id, by, reply })
            .await
    }

    pub async fn create_rollout(
        &self,
        request: RolloutRequest,
        by: String,
    ) -> Result<RolloutCreated, ControlError> {
        let request = Box::new(request);
        self.ask(|reply| Control::CreateRollout { request, by, reply })
            .await
    }

    pub async fn rollout(
        &self,
        id: u64,
        action: crate::rollouts::OperatorAction,
        by: String,
        reason: Option<String>,
    ) -> Result<crate::rollouts::model::RolloutRecord, ControlError> {
        self.ask(|reply| Control::Rollout {
            id,
            action,
            by,
            reason,
            reply,
        })
        .await
    }

    pub async fn rollout_views(
        &self,
        id: Option<u64>,
    ) -> Result<Vec<crate::rollouts::View>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.0
            .send_async(Control::RolloutViews { id, reply })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)
    }

    pub async fn baseline_changed(&self, model: String, version: semver::Version) {
        let _ = self
            .0
            .send_async(Control::BaselineChanged { model, version })
            .await;
    }

    pub async fn drift(&self, query: DriftQuery) -> Result<DriftAnswer, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.0
            .send_async(Control::Drift { query, reply })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)
    }

    /// Registers a wait for flush marker `upto`. Send the marker after this returns; the
    /// receiver fires once everything before the marker is committed.
    pub async fn sync(&self, upto: u64) -> Result<oneshot::Receiver<()>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.0
            .send_async(Control::Sync { upto, reply })
            .await
            .map_err(|_| ControlError::Stopped)?;
        Ok(rx)
    }

    /// Asks the writer to finish once flush marker `upto` has arrived: it commits everything
    /// before the marker and exits. Send the marker after this returns.
    pub async fn stop(&self, upto: u64, grace: Duration) -> Option<oneshot::Receiver<()>> {
        let (reply, rx) = oneshot::channel();
        let stop = Control::Stop {
            upto,
            deadline: Instant::now() + grace,
            reply,
        };
        self.0.send_async(stop).await.ok().map(|()| rx)
    }
}

/// The writer's view of one device: the stored record plus what only lives in memory.
#[derive(Debug)]
struct DeviceState {
    device: Device,
    session: Option<u64>,
    last_telemetry_key: u64,
    last_log_key: u64,
    dirty: bool,
}

/// An API reply held until its batch commits; called with the storage error if it did not.
type AfterCommit = Box<dyn FnOnce(Option<&str>) + Send>;

/// Side effects of a batch, carried out after it commits.
#[derive(Default)]
struct Effects {
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
    sessions: Arc<Sessions>,
    downlink: DownlinkTx,
    metrics: Arc<Metrics>,
    devices: HashMap<String, DeviceState>,
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
    /// Database file size at the last storage quota trim.
    quota_trimmed_at: u64,
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
        sessions: Arc<Sessions>,
        downlink: DownlinkTx,
        metrics: Arc<Metrics>,
    ) -> storage::Result<Writer> {
        let settings = Settings {
            batch: config.ingest.batch,
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
            quota_trimmed_at: 0,
        };
        writer.reload()?;
        Ok(writer)
    }

    /// The key that signs rollback directives.
    pub fn set_rollback_key(&mut self, key: ed25519_dalek::SigningKey) {
        self.rollback_key = Some(Arc::new(key));
    }

    /// (Re)builds the in-memory state from storage: at start, and after a failed commit.
    fn reload(&mut self) -> storage::Result<()> {
        let loaded = self.store.load()?;
        self.devices.clear();
        for mut device in loaded.devices {
            // Nobody is connected to a gateway that is just starting.
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
                    session: None,
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
                dedup_key(&alert.device, &alert.kind, &alert.source),
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
        // Drift streams continue from their saved state (or their last stored windows).
        self.drift_restore()?;
        Ok(())
    }

    /// Runs until stopped. Call on a dedicated thread.
    pub fn run(mut self, msgs: flume::Receiver<WriterMsg>, controls: flume::Receiver<Control>) {
        let mut next_retention = Instant::now() + self.settings.retention_interval;
        let mut next_tick = Instant::now() + TICK;
        let mut stopping: Option<(u64, Instant, oneshot::Sender<()>)> = None;
        loop {
            let wake_at = match &stopping {
                Some((_, deadline, _)) => (*deadline).min(next_retention).min(next_tick),
                None => next_retention.min(next_tick),
            };
            let first = flume::Selector::new()
                .recv(&controls, |c| c.ok().map(Item::Control))
                .recv(&msgs, |m| m.ok().map(Item::Msg))
                .wait_deadline(wake_at);
            let mut items: Vec<Item> = first.ok().flatten().into_iter().collect();
            // Operator requests first, so that a sync registered before its marker was
            // published is always applied before the marker.
            items.extend(controls.try_iter().map(Item::Control));
            let room = self.settings.batch.saturating_sub(items.len());
            items.extend(msgs.try_iter().take(room).map(Item::Msg));
            self.metrics.queue_depth.set(msgs.len() as i64);

            if !items.is_empty() {
                let effects = self.apply_batch(items);
                if let Some(stop) = self.finish_batch(effects) {
                    stopping = Some(stop);
                }
            }
            if Instant::now() >= next_tick {
                self.tick();
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
                    return;
                }
            }
        }
    }

    fn apply_batch(&mut self, items: Vec<Item>) -> Effects {
        let mut fx = Effects::default();
        let result = self.store.clone().write(|t| {
            for item in items {
                match item {
                    Item::Msg(m) => self.apply_msg(t, m, &mut fx)?,
                    Item::Control(c) => self.apply_control(t, c, &mut fx)?,
                }
            }
            for state in self.devices.values_mut().filter(|s| s.dirty) {
                t.put_device(&state.device)?;
                state.dirty = false;
            }
            t.set_meta(schema::META_NEXT_ALERT_ID, self.next_alert_id)?;
            t.set_meta(schema::META_NEXT_COMMAND_ID, self.next_command_id)?;
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "storage write failed; batch dropped, state reloaded");
            let message = e.to_string();
            for reply in fx.replies.drain(..) {
                reply(Some(&message));
            }
            fx = Effects {
                stop: fx.stop.take(),
                marker: fx.marker,
                ..Effects::default()
            };
            if let Err(e) = self.reload() {
                tracing::error!(error = %e, "reloading state failed");
            }
        }
        fx
    }

    /// Carries out a committed batch's effects; returns a stop request if one came in.
    fn finish_batch(&mut self, mut fx: Effects) -> Option<(u64, Instant, oneshot::Sender<()>)> {
        self.metrics.batches.inc();
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
            WriterMsg::Uplink(m) => self.apply_uplink(t, m, fx)?,
            WriterMsg::Presence(p) => {
                let (device, online, at) = (p.device.clone(), p.online, p.at_ms);
                if self.apply_presence(p) && !online {
                    self.update_event(t, updates::Event::Offline(device.clone()), at, fx)?;
                    self.rollouts_offline(t, &device, at, fx)?;
                }
            }
            WriterMsg::Rejected { device } => {
                if let Some(s) = self.devices.get_mut(&device) {
                    s.device.counters.rejected += 1;
                    s.dirty = true;
                }
            }
            WriterMsg::FlushMarker(n) => fx.marker = fx.marker.max(n),
        }
        Ok(())
    }

    /// Applies presence; false when the event was stale (a replaced session's).
    fn apply_presence(&mut self, p: PresenceEvent) -> bool {
        let Some(state) = self.devices.get_mut(&p.device) else {
            return false;
        };
        let presence = &mut state.device.presence;
        if p.online {
            state.session = Some(p.session);
            presence.online = true;
            presence.connected_at_ms = Some(p.at_ms);
            presence.protocol = Some(p.protocol);
            presence.peer = Some(p.peer);
            presence.connections += 1;
            state.device.touch(p.at_ms);
        } else if state.session == Some(p.session) {
            state.session = None;
            presence.online = false;
            presence.disconnected_at_ms = Some(p.at_ms);
            presence.disconnect_reason = p.reason.map(str::to_owned);
        } else {
            return false;
        }
        state.dirty = true;
        true
    }

    fn reject(&mut self, device: &str, reason: Reject, detail: &dyn std::fmt::Display) {
        self.metrics.reject(reason, device, detail);
        if let Some(s) = self.devices.get_mut(device) {
            s.device.counters.rejected += 1;
            s.dirty = true;
        }
    }

    fn decode<T>(&mut self, m: &UplinkMsg) -> Option<T>
    where
        T: serde::de::DeserializeOwned + fleetgate_protocol::limits::Validate,
    {
        match decode::<T>(&m.payload, m.encoding) {
            Ok(v) => Some(v),
            Err(e) => {
                let reason = match e {
                    DecodeError::Invalid(_) => Reject::Invalid,
                    _ => Reject::Undecodable,
                };
                let detail = format!("{}: {e}", m.channel.name());
                self.reject(&m.device, reason, &detail);
                None
            }
        }
    }

    fn apply_uplink(
        &mut self,
        t: &mut Tables<'_>,
        m: UplinkMsg,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        if self
            .devices
            .get(&m.device)
            .is_none_or(|s| s.device.revoked())
        {
            self.metrics
                .reject(Reject::UnknownDevice, &m.device, &m.channel.name());
            return Ok(());
        }
        let received_ms = m.received_us / 1000;
        let stored = match m.channel {
            Uplink::Hello => {
                let said = self.hello(&m);
                if said {
                    let hello = self
                        .devices
                        .get(&m.device)
                        .and_then(|s| s.device.hello.clone());
                    if let Some(hello) = hello {
                        self.drift_bins(&m.device, &hello, fx);
                    }
                    self.update_event(
                        t,
                        updates::Event::Online(m.device.clone()),
                        received_ms,
                        fx,
                    )?;
                    self.rollouts_hello(t, &m.device, received_ms, fx)?;
                }
                said
            }
            Uplink::Telemetry => self.telemetry(t, &m, fx)?,
            Uplink::Alert => {
                let stored = self.device_alert(t, &m)?;
                if stored {
                    self.rollouts_alert(t, &m.device, received_ms, fx)?;
                }
                stored
            }
            Uplink::Log => self.log(t, &m)?,
            Uplink::Ack => self.ack(t, &m, fx)?,
            Uplink::Report => match self.decode::<fleetgate_protocol::UpdateReport>(&m) {
                Some(report) => self.report(t, &m.device, report, received_ms, fx)?,
                None => false,
            },
        };
        if stored {
            let i = Uplink::ALL
                .iter()
                .position(|c| *c == m.channel)
                .unwrap_or(0);
            fx.stored[i] += 1;
            if let Some(s) = self.devices.get_mut(&m.device) {
                s.device.touch(received_ms);
                s.dirty = true;
            }
        }
        Ok(())
    }

    fn hello(&mut self, m: &UplinkMsg) -> bool {
        let Some(hello) = self.decode::<Hello>(m) else {
            return false;
        };
        let Some(s) = self.devices.get_mut(&m.device) else {
            return false;
        };
        s.device.hello = Some(hello);
        s.device.encoding = m.encoding;
        s.device.counters.hellos += 1;
        true
    }

    fn telemetry(
        &mut self,
        t: &mut Tables<'_>,
        m: &UplinkMsg,
        fx: &mut Effects,
    ) -> storage::Result<bool> {
        let Some(tel) = self.decode::<Telemetry>(m) else {
            return Ok(false);
        };
        let keep = self.settings.telemetry_per_device;
        let Some(s) = self.devices.get_mut(&m.device) else {
            return Ok(false);
        };
        match s.device.seq.observe(tel.boot, tel.seq) {
            SeqOutcome::Duplicate => {
                s.device.counters.duplicates += 1;
                s.dirty = true;
                fx.duplicates += 1;
                return Ok(false);
            }
            SeqOutcome::Next { lost } if lost > 0 => {
                s.device.counters.lost += u64::from(lost);
                fx.lost += i64::from(lost);
            }
            SeqOutcome::Late => {
                s.device.counters.lost = s.device.counters.lost.saturating_sub(1);
                fx.lost -= 1;
            }
            SeqOutcome::Started | SeqOutcome::Next { .. } => {}
        }
        let row = TelemetryRow {
            received_ms: m.received_us / 1000,
            boot: tel.boot,
            seq: tel.seq,
            device_time_ms: tel.time_ms,
            hw: tel.hw.clone(),
            model: tel.model.clone(),
            samples: tel.samples.len() as u32,
            binned_features: tel.bins.len() as u32,
        };
        let key = unique_key(&mut s.last_telemetry_key, m.received_us);
        t.insert_telemetry(&m.device, key, &row, keep, &mut s.device.telemetry_rows)?;
        s.device.counters.telemetry += 1;
        s.device.last_hw = Some(tel.hw.clone());
        fx.telemetry_times.push(tel.time_ms);
        self.apply_rules(t, &m.device, &tel, m.received_us / 1000)?;
        self.drift_observe(t, &m.device, &tel, m.received_us / 1000)?;
        self.rollouts_telemetry(t, &m.device, &tel, m.received_us / 1000, fx)?;
        Ok(true)
    }

    /// Opens, bumps or clears rule alerts for one telemetry message.
    fn apply_rules(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        tel: &Telemetry,
        now: u64,
    ) -> storage::Result<()> {
        for i in 0..self.settings.rules.len() {
            let rule = &self.settings.rules[i];
            let Some(value) = tel.hw.get(rule.metric) else {
                continue;
            };
            if rule.fires(value) {
                let message = format!(
                    "{} {value} {} {}",
                    rule.metric.name(),
                    match rule.trigger {
                        fleetgate_config::Trigger::Above(_) => "above",
                        fleetgate_config::Trigger::Below(_) => "below",
                    },
                    match rule.trigger {
                        fleetgate_config::Trigger::Above(x)
                        | fleetgate_config::Trigger::Below(x) => x,
                    }
                );
                let (kind, severity, metric) = (rule.kind.clone(), rule.severity, rule.metric);
                let source = AlertSource::Rule { metric };
                self.raise(t, device, kind, severity, Some(value), message, source, now)?;
            } else if rule.clears(value) {
                let key = (device.to_owned(), rule.kind.name().to_owned());
                let metric = rule.metric;
                if let Some(&id) = self.open_index.get(&key)
                    && self
                        .unresolved
                        .get(&id)
                        .is_some_and(|a| a.source == AlertSource::Rule { metric })
                {
                    self.resolve(t, id, now, "rule")?;
                }
            }
        }
        Ok(())
    }

    fn device_alert(&mut self, t: &mut Tables<'_>, m: &UplinkMsg) -> storage::Result<bool> {
        let Some(alert) = self.decode::<Alert>(m) else {
            return Ok(false);
        };
        let Alert {
            kind,
            severity,
            value,
            message,
            ..
        } = alert;
        let now = m.received_us / 1000;
        let value = value.map(f64::from);
        self.raise(
            t,
            &m.device,
            kind,
            severity,
            value,
            message,
            AlertSource::Device,
            now,
        )?;
        if let Some(s) = self.devices.get_mut(&m.device) {
            s.device.counters.alerts += 1;
        }
        Ok(true)
    }

    /// Opens an alert, or folds it into the unresolved alert of the same device and kind.
    #[allow(clippy::too_many_arguments)]
    fn raise(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        kind: AlertKind,
        severity: Severity,
        value: Option<f64>,
        message: String,
        source: AlertSource,
        now: u64,
    ) -> storage::Result<()> {
        let key = dedup_key(device, &kind, &source);
        if let Some(alert) = self
            .open_index
            .get(&key)
            .and_then(|id| self.unresolved.get_mut(id))
        {
            alert.count += 1;
            alert.last_ms = now;
            alert.value = value;
            alert.severity = alert.severity.max(severity);
            if !message.is_empty() {
                alert.message = message;
            }
            return t.put_alert(alert);
        }
        let id = self.next_alert_id;
        self.next_alert_id += 1;
        let alert = AlertRecord {
            id,
            device: device.to_owned(),
            kind,
            severity,
            state: AlertState::Open,
            source,
            opened_ms: now,
            last_ms: now,
            count: 1,
            value,
            message,
            acknowledged: None,
            resolved: None,
        };
        t.put_alert(&alert)?;
        tracing::info!(
            alert = id,
            device,
            kind = alert.kind.name(),
            severity = alert.severity.name(),
            "alert opened"
        );
        self.open_index.insert(key, id);
        self.unresolved.insert(id, alert);
        Ok(())
    }

    fn resolve(
        &mut self,
        t: &mut Tables<'_>,
        id: u64,
        now: u64,
        by: &str,
    ) -> storage::Result<Option<AlertRecord>> {
        let Some(mut alert) = self.unresolved.remove(&id) else {
            return Ok(None);
        };
        self.open_index
            .remove(&dedup_key(&alert.device, &alert.kind, &alert.source));
        alert.state = AlertState::Resolved;
        alert.resolved = Some(Stamp {
            at_ms: now,
            by: by.to_owned(),
        });
        t.put_alert(&alert)?;
        Ok(Some(alert))
    }

    fn log(&mut self, t: &mut Tables<'_>, m: &UplinkMsg) -> storage::Result<bool> {
        let Some(line) = self.decode::<LogLine>(m) else {
            return Ok(false);
        };
        let keep = self.settings.logs_per_device;
        let Some(s) = self.devices.get_mut(&m.device) else {
            return Ok(false);
        };
        let row = LogRow {
            received_ms: m.received_us / 1000,
            level: line.level,
            text: line.text,
            device_time_ms: line.time_ms,
        };
        let key = unique_key(&mut s.last_log_key, m.received_us);
        t.insert_log(&m.device, key, &row, keep, &mut s.device.log_rows)?;
        s.device.counters.logs += 1;
        Ok(true)
    }

    fn ack(
        &mut self,
        t: &mut Tables<'_>,
        m: &UplinkMsg,
        fx: &mut Effects,
    ) -> storage::Result<bool> {
        let Some(ack) = self.decode::<CommandAck>(m) else {
            return Ok(false);
        };
        let CommandAck { id, status } = ack;
        let Some(mut cmd) = t.command(id)?.filter(|c| c.device == m.device) else {
            self.reject(
                &m.device,
                Reject::UnknownCommand,
                &format!("ack for command {id}"),
            );
            return Ok(false);
        };
        self.rollouts_ack(t, &cmd, &status, m.received_us / 1000, fx)?;
        cmd.state = match status {
            fleetgate_protocol::AckStatus::Done => CommandState::Done,
            fleetgate_protocol::AckStatus::Rejected { reason } => CommandState::Rejected { reason },
            fleetgate_protocol::AckStatus::Unsupported => CommandState::Unsupported,
        };
        cmd.answered_ms = Some(m.received_us / 1000);
        t.put_command(&cmd)?;
        if let Some(s) = self.devices.get_mut(&m.device) {
            s.device.counters.acks += 1;
        }
        Ok(true)
    }

    fn apply_control(
        &mut self,
        t: &mut Tables<'_>,
        c: Control,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        let now = now_ms();
        match c {
            Control::Enroll { id, labels, reply } => {
                let result = self.enroll(&id, labels, now, fx);
                fx.reply(reply, result);
            }
            Control::RotateCredential { id, reply } => {
                let result = match self.devices.get_mut(&id) {
                    None => Err(ControlError::NotFound(format!("device {id}"))),
                    Some(s) => new_credential().map(|(secret, digest)| {
                        s.device.credential_hash = Some(digest);
                        s.dirty = true;
                        fx.credentials.push((id.clone(), Some(digest)));
                        fx.kicks.push((id.clone(), Kick::Revoked));
                        secret
                    }),
                };
                fx.reply(reply, result);
            }
            Control::Revoke { id, reply } => {
                let result = match self.devices.get_mut(&id) {
                    None => Err(ControlError::NotFound(format!("device {id}"))),
                    Some(s) => {
                        s.device.credential_hash = None;
                        s.dirty = true;
                        fx.credentials.push((id.clone(), None));
                        fx.kicks.push((id.clone(), Kick::Revoked));
                        Ok(())
                    }
                };
                fx.reply(reply, result);
            }
            Control::Alert {
                id,
                action,
                by,
                reply,
            } => {
                let result = self.alert_action(t, id, action, &by, now)?;
                fx.reply(reply, result);
            }
            Control::Command {
                device,
                action,
                by,
                reply,
            } => {
                let result = self.command(t, device, action, by, now, fx)?;
                fx.reply(reply, result);
            }
            Control::StartUpdates { request, by, reply } => {
                let result = self.start_updates(t, request, &by, now, fx)?;
                fx.reply(reply, result);
            }
            Control::CancelUpdate { id, by, reply } => {
                let result = self.cancel_update(t, id, &by, now, fx)?;
                fx.reply(reply, result);
            }
            Control::CreateRollout { request, by, reply } => {
                let result = self.create_rollout(t, *request, &by, now, fx)?;
                fx.reply(reply, result);
            }
            Control::Rollout {
                id,
                action,
                by,
                reason,
                reply,
            } => {
                let result = self.rollout_operator(t, id, action, &by, reason, now, fx)?;
                fx.reply(reply, result);
            }
            Control::RolloutViews { id, reply } => {
                let _ = reply.send(self.rollout_views(id));
            }
            Control::BaselineChanged { model, version } => {
                self.baseline_changed(&model, &version, fx)
            }
            Control::Drift { query, reply } => {
                let _ = reply.send(self.drift_query(query));
            }
            Control::Sync { upto, reply } => self.sync_waiters.push((upto, reply)),
            Control::Stop {
                upto,
                deadline,
                reply,
            } => fx.stop = Some((upto, deadline, reply)),
        }
        Ok(())
    }

    fn enroll(
        &mut self,
        id: &str,
        labels: BTreeMap<String, String>,
        now: u64,
        fx: &mut Effects,
    ) -> Result<String, ControlError> {
        DeviceId::new(id)
            .map_err(|e| ControlError::BadRequest(format!("device id {id:?}: {e}")))?;
        if self.devices.get(id).is_some_and(|s| !s.device.revoked()) {
            return Err(ControlError::Conflict(format!(
                "device {id} is already enrolled; rotate its credential instead"
            )));
        }
        let (secret, digest) = new_credential()?;
        match self.devices.get_mut(id) {
            // Re-enrolling a revoked device keeps its history.
            Some(s) => {
                s.device.credential_hash = Some(digest);
                s.device.labels = labels;
                s.dirty = true;
            }
            None => {
                let device = Device::new(id.to_owned(), labels, digest, now);
                self.devices.insert(
                    id.to_owned(),
                    DeviceState {
                        device,
                        session: None,
                        last_telemetry_key: 0,
                        last_log_key: 0,
                        dirty: true,
                    },
                );
            }
        }
        fx.credentials.push((id.to_owned(), Some(digest)));
        Ok(secret)
    }

    fn alert_action(
        &mut self,
        t: &mut Tables<'_>,
        id: u64,
        action: AlertAction,
        by: &str,
        now: u64,
    ) -> storage::Result<Result<AlertRecord, ControlError>> {
        if !self.unresolved.contains_key(&id) {
            return Ok(Err(if self.store.alert(id)?.is_some() {
                ControlError::Conflict(format!("alert {id} is already resolved"))
            } else {
                ControlError::NotFound(format!("alert {id}"))
            }));
        }
        match action {
            AlertAction::Acknowledge => {
                let Some(alert) = self.unresolved.get_mut(&id) else {
                    return Ok(Err(ControlError::NotFound(format!("alert {id}"))));
                };
                if alert.state == AlertState::Open {
                    alert.state = AlertState::Acknowledged;
                    alert.acknowledged = Some(Stamp {
                        at_ms: now,
                        by: by.to_owned(),
                    });
                    t.put_alert(alert)?;
                }
                Ok(Ok(alert.clone()))
            }
            AlertAction::Resolve => Ok(self
                .resolve(t, id, now, by)?
                .ok_or_else(|| ControlError::NotFound(format!("alert {id}")))),
        }
    }

    fn command(
        &mut self,
        t: &mut Tables<'_>,
        device: String,
        action: Action,
        by: String,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Result<CommandRecord, ControlError>> {
        let Some(s) = self.devices.get(&device) else {
            return Ok(Err(ControlError::NotFound(format!("device {device}"))));
        };
        if s.device.revoked() {
            return Ok(Err(ControlError::Conflict(format!(
                "device {device} is revoked"
            ))));
        }
        if !s.device.presence.online {
            return Ok(Err(ControlError::Conflict(format!(
                "device {device} is offline"
            ))));
        }
        let encoding = s.device.encoding;
        let id = self.next_command_id;
        let payload = match encode(
            &Command {
                id,
                action: action.clone(),
            },
            encoding,
        ) {
            Ok(p) => p,
            Err(e) => return Ok(Err(ControlError::BadRequest(e.to_string()))),
        };
        self.next_command_id += 1;
        let record = CommandRecord {
            id,
            device: device.clone(),
            action,
            created: Stamp { at_ms: now, by },
            state: CommandState::Sent,
            answered_ms: None,
        };
        t.put_command(&record)?;
        fx.downlinks
            .push((device, Downlink::Command, encoding, payload));
        Ok(Ok(record))
    }

    /// Update timers: stalled transfers are offered again or time out.
    fn tick(&mut self) {
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
            self.drift_tick(t, now)
        });
        match result {
            Ok(()) => {
                self.trim_prepared();
                self.finish_batch(fx);
            }
            Err(e) => tracing::error!(error = %e, "update timers failed"),
        }
    }

    /// Deletes telemetry older than the retention age and long-resolved alerts; then, if the
    /// database file has passed `storage.max_bytes` and grown since the last time it did,
    /// each device's oldest quarter of telemetry and logs.
    fn retention(&mut self) {
        self.retention_by_age();
        let size = self.store.file_size();
        let quota = self.settings.max_db_bytes;
        if quota == 0 || size <= quota || size <= self.quota_trimmed_at {
            return;
        }
        // The file never shrinks: what is freed is reused. It grows again only once that space
        // is full, which is when the next trim is due.
        self.quota_trimmed_at = size;
        let devices = &mut self.devices;
        let result = self.store.write(|t| {
            let (mut telemetry, mut logs) = (0, 0);
            for s in devices.values_mut() {
                let d = &mut s.device;
                let (tel, log) =
                    t.trim_oldest(&d.id, d.telemetry_rows.div_ceil(4), d.log_rows.div_ceil(4))?;
                if tel + log > 0 {
                    d.telemetry_rows -= tel.min(d.telemetry_rows);
                    d.log_rows -= log.min(d.log_rows);
                    t.put_device(d)?;
                }
                telemetry += tel;
                logs += log;
            }
            Ok((telemetry, logs))
        });
        match result {
            Ok((telemetry, logs)) => {
                self.metrics.storage_quota_trims.inc();
                tracing::warn!(
                    size,
                    quota,
                    telemetry,
                    logs,
                    "the database passed storage.max_bytes: deleted each device's oldest quarter of telemetry and logs"
                );
            }
            Err(e) => tracing::error!(error = %e, "retention (storage quota) failed"),
        }
    }

    fn retention_by_age(&mut self) {
        let cutoff_us = now_us().saturating_sub(self.settings.telemetry_max_age.as_micros() as u64);
        let alert_cutoff =
            now_ms().saturating_sub(self.settings.resolved_alerts_max_age.as_millis() as u64);
        let devices = &mut self.devices;
        let result = self.store.write(|t| {
            let mut removed = 0;
            for s in devices.values_mut() {
                let n = t.trim_telemetry_before(&s.device.id, cutoff_us)?;
                if n > 0 {
                    removed += n;
                    s.device.telemetry_rows = s.device.telemetry_rows.saturating_sub(n);
                    t.put_device(&s.device)?;
                }
            }
            let alerts = t.delete_resolved_alerts_before(alert_cutoff)?;
            Ok((removed, alerts))
        });
        match result {
            Ok((0, 0)) => {}
            Ok((telemetry, alerts)) => {
                tracing::info!(telemetry, alerts, "retention removed old rows")
            }
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
    }
}

/// Alerts fold into an unresolved one with the same key: per device and kind, and per model
/// version, cohort and feature for drift (which is about a fleet, not a device).
fn dedup_key(device: &str, kind: &AlertKind, source: &AlertSource) -> (String, String) {
    match source {
        AlertSource::Drift(d) => {
            let subject = d.feature.as_deref().unwrap_or("prediction");
            (
                String::new(),
                format!("drift/{}/{}/{}/{subject}", d.model, d.version, d.cohort),
            )
        }
        AlertSource::Device | AlertSource::Rule { .. } => {
            (device.to_owned(), kind.name().to_owned())
        }
    }
}

fn new_credential() -> Result<(String, auth::Digest32), ControlError> {
    let secret =
        auth::new_secret().map_err(|e| ControlError::Storage(format!("no randomness: {e}")))?;
    let digest = auth::digest(&secret);
    Ok((secret, digest))
}

/// A key at least `now_us` and greater than the previous one, so that two messages in the same
/// microsecond (or after the clock went back) never overwrite each other.
fn unique_key(last: &mut u64, now_us: u64) -> u64 {
    *last = now_us.max(*last + 1);
    *last
}

#[cfg(test)]
mod tests;
