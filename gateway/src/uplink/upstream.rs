//! The connection to the upstream broker: sends the outbox in order at QoS 1, moves its cursor
//! as PUBACKs come (through the writer, in its next commit), publishes the site's status and
//! heartbeat, and hands requests from central operations to [`super::down`].
//!
//! Invariants:
//! - rumqttc deadlocks if the task polling its event loop awaits a publish: one task polls
//!   (and only ever `try_send`s what it learns, into queues no larger than what can be
//!   outstanding), another publishes.
//! - Each connection has its own client and event loop, dropped with it: nothing from one
//!   connection is sent on the next. After a reconnect the outbox is sent again from the
//!   newest entry acknowledged with every one before it, so the broker sees every entry, in
//!   order; entries it saw before the connection dropped come again after it (consumers
//!   deduplicate on (site, seq)).
//! - Nothing here blocks the writer: the outbox is read from storage snapshots; only the
//!   cursor goes through the writer, as a request it commits with its next batch.
//! - Every wait is bounded or raced against shutdown; the task ends when the gateway stops,
//!   after telling the writer how far the outbox was acknowledged.

use std::sync::Arc;
use std::time::Duration;

use fleetgate_config::{Broker, UplinkConfig};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet,
    Publish, QoS, TlsConfiguration, Transport,
};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::event::{Entry, envelope};
use super::window::Window;
use super::{Status, down::Down};
use crate::clock::{now_ms, rfc3339};
use crate::ingest::ControlTx;
use crate::metrics::Metrics;
use crate::storage::Store;
use crate::storage::outbox::Stream;
use crate::storage::records::Record;

/// The upstream's name among the outbox's destinations.
pub const DESTINATION: &str = "upstream";

/// How often the acknowledged position is handed to the writer while it moves.
const ACK_EVERY: Duration = Duration::from_millis(250);
/// How often the outbox is looked at even without a signal (a safety net, cheap).
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for a CONNACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read from the outbox at once.
const READ_BYTES: usize = 4 << 20;
/// Requests from central operations waiting for the one task that carries them out.
const DOWN_QUEUE: usize = 16;
/// Headroom of a message over its data: the envelope and the topic.
const ENVELOPE_BYTES: usize = 512;

/// What the polling task learns, in the order it learns it.
#[derive(Debug)]
enum Learned {
    ConnAck(ConnectReturnCode),
    /// A publish was written with this packet id.
    Published(u16),
    PubAck(u16),
    /// The connection ended (the event loop is dropped with its task).
    Closed(String),
}

/// A request from central operations and the client to acknowledge it on once handled.
struct DownMsg {
    publish: Publish,
    client: AsyncClient,
    broker: String,
}

#[derive(Debug)]
pub struct Upstream {
    pub cfg: Arc<UplinkConfig>,
    pub store: Store,
    pub signal: watch::Receiver<u64>,
    pub control: ControlTx,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub down: Arc<Down>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub password: Option<String>,
    pub shutdown: CancellationToken,
}

/// How a connection ended.
enum End {
    /// The gateway stops.
    Stopped,
    /// Lost or refused; `connected` says whether it got as far as a CONNACK.
    Lost { connected: bool, why: String },
}

fn topic(cfg: &UplinkConfig, last: &str) -> String {
    format!("{}/sites/{}/{last}", cfg.topic_prefix, cfg.site)
}

/// A random factor in [0.5, 1.5) for backoff jitter.
fn jitter() -> f64 {
    let r = getrandom::u32().unwrap_or(0x8000_0000);
    0.5 + f64::from(r) / f64::from(u32::MAX)
}

/// The wait before attempt `n` (from 1): `min * 2^(n-1)` up to `max`, with jitter.
pub fn backoff(n: u32, min: Duration, max: Duration) -> Duration {
    let base = min
        .saturating_mul(1u32 << n.saturating_sub(1).min(20))
        .min(max);
    base.mul_f64(jitter()).min(max)
}

impl Upstream {
    /// Runs until the gateway stops.
    pub async fn run(mut self) {
        let store = self.store.clone();
        let acked = tokio::task::spawn_blocking(move || store.outbox_snapshot(Stream::Upstream))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|s| s.cursor(DESTINATION))
            .unwrap_or(0);
        let mut pos = Position {
            acked,
            reported: acked,
            gaps_counted: acked,
        };
        let (down_tx, down_rx) = mpsc::channel::<DownMsg>(DOWN_QUEUE);
        let worker = tokio::spawn(down_worker(
            self.down.clone(),
            down_rx,
            self.shutdown.clone(),
        ));
        let mut failures = 0u32;
        let mut broker = 0usize;
        loop {
            let target = self.cfg.brokers[broker % self.cfg.brokers.len()].clone();
            let end = self.connection(&target, &mut pos, &down_tx).await;
            self.report(&mut pos).await;
            self.metrics.uplink.connected.set(0);
            match end {
                End::Stopped => break,
                End::Lost { connected, why } => {
                    self.metrics.uplink.connect_failures.inc();
                    self.status.disconnected(&why);
                    if connected {
                        failures = 1;
                        tracing::warn!(broker = %target, reason = why, "upstream connection lost");
                    } else {
                        failures = failures.saturating_add(1);
                        broker += 1;
                        tracing::warn!(broker = %target, reason = why, attempt = failures, "cannot connect to the upstream broker");
                    }
                }
            }
            let wait = backoff(failures, self.cfg.backoff_min, self.cfg.backoff_max);
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.status.disconnected("the gateway is stopping");
        drop(down_tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
    }

    /// Hands the acknowledged position to the writer if it moved.
    async fn report(&self, pos: &mut Position) {
        if pos.acked > pos.reported
            && self
                .control
                .outbox_ack(Stream::Upstream, DESTINATION.to_owned(), pos.acked)
                .await
                .is_ok()
        {
            pos.reported = pos.acked;
        }
    }

    fn options(&self, broker: &Broker) -> MqttOptions {
        let cfg = &self.cfg;
        let mut o = MqttOptions::new(cfg.client_id.clone(), broker.host.clone(), broker.port);
        o.set_keep_alive(cfg.keep_alive);
        o.set_clean_session(!cfg.persistent_session);
        o.set_manual_acks(true);
        o.set_inflight(cfg.inflight.saturating_add(8));
        o.set_request_channel_capacity(usize::from(cfg.inflight) + 16);
        o.set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes);
        if let Some(user) = &cfg.username {
            o.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        let offline = json!({ "site": cfg.site, "online": false }).to_string();
        o.set_last_will(LastWill::new(
            topic(cfg, "status"),
            offline,
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.clone())));
        }
        o
    }

    /// One connection, from connecting to its end.
    async fn connection(
        &mut self,
        broker: &Broker,
        pos: &mut Position,
        down_tx: &mpsc::Sender<DownMsg>,
    ) -> End {
        let cfg = self.cfg.clone();
        self.status.connecting(broker);
        let (client, mut eventloop) = AsyncClient::new(self.options(broker), 16);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        eventloop.set_network_options(net);
        // Everything that can be outstanding at once: each publish is written and acknowledged
        // (two events), plus the status and heartbeats, a CONNACK and the close.
        let (tx, mut learned) = mpsc::channel(2 * usize::from(cfg.inflight) + 64);
        let poller = tokio::spawn(poll(
            eventloop,
            tx,
            down_tx.clone(),
            client.clone(),
            broker.to_string(),
            self.metrics.clone(),
        ));
        let _abort = AbortOnDrop(poller);

        let connack = tokio::select! {
            _ = self.shutdown.cancelled() => return End::Stopped,
            got = tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), learned.recv()) => got,
        };
        match connack {
            Ok(Some(Learned::ConnAck(ConnectReturnCode::Success))) => {}
            Ok(Some(Learned::ConnAck(code))) => {
                return End::Lost {
                    connected: false,
                    why: format!("the broker refused the connection: {code:?}"),
                };
            }
            Ok(Some(Learned::Closed(why))) => {
                return End::Lost {
                    connected: false,
                    why,
                };
            }
            Ok(Some(other)) => {
                return End::Lost {
                    connected: false,
                    why: format!("unexpected before CONNACK: {other:?}"),
                };
            }
            Ok(None) | Err(_) => {
                return End::Lost {
                    connected: false,
                    why: "no CONNACK in time".to_owned(),
                };
            }
        }
        tracing::info!(broker = %broker, site = cfg.site, "connected to the upstream broker");
        self.metrics.uplink.connects.inc();
        self.metrics.uplink.connected.set(1);
        self.status.connected(broker);
        let since = now_ms();

        let mut window = Window::new(pos.acked);
        let down = &self.down;
        let wants_requests = down.perms.bundles || down.perms.rollouts;
        if wants_requests {
            let filters = super::down::topics(&cfg.topic_prefix, &cfg.site, down.perms.fleet)
                .into_iter()
                .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
            if client.subscribe_many(filters).await.is_err() {
                return lost("the client stopped");
            }
        }
        let online = json!({ "site": cfg.site, "online": true, "since": rfc3339(since), "version": env!("CARGO_PKG_VERSION") });
        window.request(None);
        if client
            .publish(
                topic(&cfg, "status"),
                QoS::AtLeastOnce,
                true,
                online.to_string(),
            )
            .await
            .is_err()
        {
            return lost("the client stopped");
        }
        if let Err(e) = self.heartbeat(&client, &mut window).await {
            return lost(&e);
        }

        let mut ack_tick = tokio::time::interval(ACK_EVERY);
        let mut poll_tick = tokio::time::interval(POLL_EVERY);
        let mut heartbeat = tokio::time::interval(cfg.heartbeat);
        heartbeat.reset();
        let mut caught_up = false;
        loop {
            // Send while there is room and something to send.
            if !caught_up && window.pending() < usize::from(cfg.inflight) {
                drop(self.signal.borrow_and_update());
                match self.fill(&client, &mut window, pos).await {
                    Ok(more) => caught_up = !more,
                    Err(e) => return lost(&e),
                }
                continue;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.goodbye(&client, &mut learned, &mut window, pos).await;
                    return End::Stopped;
                }
                got = learned.recv() => match got {
                    Some(Learned::Published(pkid)) => {
                        if let Err(e) = window.published(pkid) {
                            return lost(&e.to_string());
                        }
                    }
                    Some(Learned::PubAck(pkid)) => match window.puback(pkid) {
                        Ok(Some(acked)) => {
                            self.metrics.uplink.forwarded.inc_by(acked - pos.acked);
                            pos.acked = acked;
                            caught_up = false;
                        }
                        Ok(None) => caught_up = false,
                        Err(e) => tracing::warn!(error = %e, "upstream: unexpected PUBACK"),
                    },
                    Some(Learned::ConnAck(_)) => {}
                    Some(Learned::Closed(why)) => {
                        return End::Lost { connected: true, why };
                    }
                    None => return lost("the client stopped"),
                },
                changed = self.signal.changed() => {
                    if changed.is_ok() {
                        caught_up = false;
                    }
                }
                _ = ack_tick.tick() => self.report(pos).await,
                _ = poll_tick.tick() => caught_up = false,
                _ = heartbeat.tick() => {
                    if let Err(e) = self.heartbeat(&client, &mut window).await {
                        return lost(&e);
                    }
                }
            }
        }
    }

    /// Publishes the next outbox entries, up to the window. Returns whether more may be
    /// waiting (the read was full).
    async fn fill(
        &self,
        client: &AsyncClient,
        window: &mut Window,
        pos: &mut Position,
    ) -> Result<bool, String> {
        let room = usize::from(self.cfg.inflight).saturating_sub(window.pending());
        let after = window.requested();
        let store = self.store.clone();
        let entries = tokio::task::spawn_blocking(move || {
            store.outbox_read(Stream::Upstream, after, room, READ_BYTES)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the outbox: {e}"))?;
        let full = entries.len() == room;
        let limit = self.cfg.max_packet_bytes.saturating_sub(ENVELOPE_BYTES);
        for (seq, bytes) in entries {
            // Entries between what was asked for and what came were dropped (a full outbox).
            let first_missing = window.requested().max(pos.gaps_counted) + 1;
            if seq > first_missing {
                tracing::warn!(
                    from = first_missing,
                    to = seq - 1,
                    "upstream: outbox entries dropped before they were sent"
                );
                pos.gaps_counted = seq - 1;
            }
            let entry = match Entry::decode(&bytes) {
                Ok(e) if e.data.len() <= limit => e,
                Ok(e) => {
                    tracing::error!(
                        seq,
                        bytes = e.data.len(),
                        "upstream: outbox entry over uplink.max_packet_bytes, sent empty"
                    );
                    Entry {
                        data: b"null".to_vec(),
                        ..e
                    }
                }
                Err(err) => {
                    tracing::error!(seq, error = %err, "upstream: outbox entry does not decode, sent empty");
                    Entry {
                        kind: "unreadable".to_owned(),
                        at_ms: now_ms(),
                        data: b"null".to_vec(),
                    }
                }
            };
            let payload = envelope(&self.cfg.site, seq, &entry);
            window.request(Some(seq));
            client
                .publish(
                    topic(&self.cfg, &format!("up/{}", entry.kind)),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .map_err(|_| "the client stopped".to_owned())?;
        }
        Ok(full)
    }

    async fn heartbeat(&self, client: &AsyncClient, window: &mut Window) -> Result<(), String> {
        let (store, site) = (self.store.clone(), self.cfg.site.clone());
        let beat = tokio::task::spawn_blocking(move || {
            super::heartbeat::heartbeat(&store, &site, now_ms())
        })
        .await
        .map_err(|e| e.to_string())?;
        let beat = match beat {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "upstream: no heartbeat (storage)");
                return Ok(());
            }
        };
        window.request(None);
        client
            .publish(
                topic(&self.cfg, "heartbeat"),
                QoS::AtLeastOnce,
                true,
                beat.to_string(),
            )
            .await
            .map_err(|_| "the client stopped".to_owned())
    }

    /// The gateway stops: says the site is offline, waits briefly for what is in flight,
    /// hands the acknowledged position to the writer and disconnects.
    async fn goodbye(
        &self,
        client: &AsyncClient,
        learned: &mut mpsc::Receiver<Learned>,
        window: &mut Window,
        pos: &mut Position,
    ) {
        let offline = json!({ "site": self.cfg.site, "online": false, "since": rfc3339(now_ms()) });
        window.request(None);
        let _ = client.try_publish(
            topic(&self.cfg, "status"),
            QoS::AtLeastOnce,
            true,
            offline.to_string(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while window.waiting() > 0 {
            match tokio::time::timeout_at(deadline, learned.recv()).await {
                Ok(Some(Learned::Published(pkid))) => {
                    let _ = window.published(pkid);
                }
                Ok(Some(Learned::PubAck(pkid))) => {
                    if let Ok(Some(acked)) = window.puback(pkid) {
                        self.metrics.uplink.forwarded.inc_by(acked - pos.acked);
                        pos.acked = acked;
                    }
                }
                Ok(Some(Learned::ConnAck(_))) => {}
                _ => break,
            }
        }
        let _ = client.try_disconnect();
        // The poller writes the DISCONNECT, then sees the connection close.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(l) = learned.recv().await {
                if matches!(l, Learned::Closed(_)) {
                    break;
                }
            }
        })
        .await;
        tracing::info!(
            acknowledged = pos.acked,
            "upstream: disconnected (the gateway stops)"
        );
    }
}

fn lost(why: &str) -> End {
    End::Lost {
        connected: true,
        why: why.to_owned(),
    }
}

/// How far the outbox is acknowledged (in memory), handed to the writer, and how far dropped
/// entries were counted.
struct Position {
    acked: u64,
    reported: u64,
    gaps_counted: u64,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls one connection's event loop until it fails; never awaits anything but the poll.
async fn poll(
    mut eventloop: EventLoop,
    tx: mpsc::Sender<Learned>,
    down: mpsc::Sender<DownMsg>,
    client: AsyncClient,
    broker: String,
    metrics: Arc<Metrics>,
) {
    loop {
        let learned = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(c))) => Learned::ConnAck(c.code),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Learned::Published(pkid),
            Ok(Event::Incoming(Packet::PubAck(a))) => Learned::PubAck(a.pkid),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let msg = DownMsg {
                    publish: p,
                    client: client.clone(),
                    broker: broker.clone(),
                };
                if let Err(e) = down.try_send(msg) {
                    // Not acknowledged: a persistent session gets it again after a reconnect.
                    metrics.uplink.refused("busy");
                    let topic = match &e {
                        mpsc::error::TrySendError::Full(m)
                        | mpsc::error::TrySendError::Closed(m) => m.publish.topic.clone(),
                    };
                    tracing::warn!(
                        topic,
                        "upstream: a request came while {DOWN_QUEUE} wait; not taken"
                    );
                }
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.try_send(Learned::Closed(e.to_string()));
                return;
            }
        };
        if tx.try_send(learned).is_err() {
            // More outstanding than can be (or the connection's task is gone): end it; the
            // next connection sends again from the acknowledged position.
            let _ = tx.try_send(Learned::Closed("event queue full".to_owned()));
            return;
        }
    }
}

/// Carries out requests from central operations one at a time, in the order they came; each
/// is acknowledged (PUBACK) once recorded.
async fn down_worker(
    down: Arc<Down>,
    mut rx: mpsc::Receiver<DownMsg>,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        let reply = down
            .handle(&msg.publish.topic, &msg.publish.payload, &msg.broker)
            .await;
        if let Some(reply) = reply {
            tracing::debug!(
                topic = msg.publish.topic,
                outcome = reply.outcome,
                status = reply.status,
                "request from the upstream handled"
            );
        }
        let _ = msg.client.ack(&msg.publish).await;
    }
}
