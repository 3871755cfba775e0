//! The clients of `load`, `stress` and `burst` runs: lean MQTT publishers (telemetry only, no
//! hello, no commands) driven in phases, an optional subscriber that counts what a bare broker
//! delivers, and the samples of the gateway's ingest counters around each phase.
//!
//! Each client has a polling task and a sending task, as in `fleet.rs` (rumqttc deadlocks if
//! the task that polls awaits a publish). The sender never awaits a publish: it hands messages
//! to the client with `try_publish`. In a paced phase a message the client cannot take (its
//! queue is full because the broker is not acknowledging fast enough) is counted as skipped and
//! not numbered, so it never shows up as loss; in a burst the sender waits for room instead.
//!
//! Every acknowledgement is matched with the sequence number it acknowledges, so "acknowledged
//! but not stored" can be checked number by number. rumqttc numbers packets itself, so the
//! sender queues each QoS 1 message's sequence number in `Dev::order` as it hands the message
//! over, and the poller takes the front one at each `Outgoing::Publish(pkid)`: the client sends
//! new requests in the order they were handed over. What breaks that order is a lost
//! connection: rumqttc then moves what was unacknowledged and what was still queued aside, and
//! drops it at the next CONNACK (clean sessions never resume). So the poller, holding
//! `Dev::order`, empties the client's queue (`EventLoop::clean`) and the order together, and
//! the sender hands over nothing while the client is offline; nothing is retransmitted, and an
//! acknowledgement always names the message it belongs to.
//!
//! Phases never overlap: one ends, its acknowledgements and the broker's ingest are waited
//! for (bounded), and only then does the next begin. An acknowledgement counts for the phase
//! its publish went out in; a late one from an earlier phase is ignored.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetgate_protocol::{Channel, Encoding, Telemetry, Uplink, decode, encode, limits, topic};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::behaviour::{Behaviour, DataShape};
use crate::burst::{BurstIngestRaw, BurstRaw};
use crate::ingest::{Api, Backpressure, IngestDelta, IngestSample, ProcSample, Stored};
use crate::progress::Progress;
use crate::seq::{SeqCounter, SeqSet};
use crate::stats::{self, Percentiles, per_second};

/// Requests a client queues before `try_publish` refuses (then the sender skips).
const CHANNEL: usize = 1024;
/// First reconnect delay after an error; doubles up to `MAX_BACKOFF`, with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the coordinator looks at counters while it waits for acknowledgements.
const POLL: Duration = Duration::from_millis(10);
/// How often the gateway's API is asked while ingest drains.
const API_POLL: Duration = Duration::from_millis(100);
/// Ingest that makes no progress for this long is considered drained.
const QUIET: Duration = Duration::from_secs(2);
/// Longest wait for the senders to finish a phase after its end.
const SETTLE: Duration = Duration::from_secs(5);
/// How often a burst samples ingest (the gateway's API, or the subscriber).
const BURST_POLL: Duration = Duration::from_millis(50);
/// Devices whose stored telemetry is read back at the same time.
const VERIFY_THREADS: usize = 4;
/// Sequence numbers a verification names when some are missing.
const VERIFY_EXAMPLES: usize = 10;

/// What every client of a run shares.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub host: String,
    pub port: u16,
    pub qos: QoS,
    pub encoding: Encoding,
    /// Raw samples (and features per sample) that pad each telemetry message.
    pub samples: usize,
    pub features: usize,
    pub inflight: u16,
    pub keep_alive: Duration,
    pub seed: u64,
    /// The broker's process on this machine, to sample its CPU and memory (Linux).
    pub broker_pid: Option<u32>,
}

/// How one client logs in: the device id is its client id, and its topic's id.
#[derive(Debug, Clone)]
pub(crate) struct Ident {
    pub id: String,
    /// Username and password; `None`: anonymous.
    pub login: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy)]
enum Plan {
    Idle,
    Send {
        phase: u32,
        rate: f64,
        start: Instant,
        until: Instant,
    },
    /// `messages` each, as fast as the client takes them, from `start`; what is not handed
    /// over by `until` is not sent.
    Burst {
        phase: u32,
        messages: u64,
        start: Instant,
        until: Instant,
    },
}

/// One client's counters, shared by its tasks and the coordinator.
#[derive(Debug)]
struct Dev {
    id: String,
    boot: u32,
    online: AtomicBool,
    /// Telemetry numbered so far in this boot (the next message's `seq`); written by the sender
    /// only.
    next_seq: AtomicU64,
    /// The last phase whose sending this client finished (everything due in it was handed to
    /// the client or skipped).
    finished: AtomicU32,
    /// This phase: handed to the client, due but not sent, acknowledged.
    offered: AtomicU64,
    skipped: AtomicU64,
    acked: AtomicU64,
    /// This phase: handed over, then dropped unacknowledged with a lost connection.
    dropped: AtomicU64,
    stats: Mutex<DevStats>,
    /// Sequence numbers of the QoS 1 messages handed to the client and not yet sent, oldest
    /// first (see the module's comment). Held while handing a message over, and while the
    /// poller drops the client's queue.
    order: Mutex<VecDeque<u32>>,
    /// Wakes a burst's sender: the client took a request from its queue, or connected.
    space: tokio::sync::Notify,
    /// Wakes the poller to drop the connection at once (a reconnect storm).
    drop: tokio::sync::Notify,
}

#[derive(Debug)]
struct DevStats {
    /// Publish to PUBACK, this phase (us).
    ack: Histogram<u64>,
    /// Connect attempt to CONNACK (us), since the coordinator last reset it.
    connack: Histogram<u64>,
    last_connack: Option<Instant>,
    /// CONNACK refusals by return code, and other connection errors.
    refused: BTreeMap<String, u64>,
    errors: u64,
    /// Size of the last telemetry payload sent.
    payload_bytes: u64,
    /// This phase: the sequence numbers acknowledged, and when the first and the last message
    /// went out and the last acknowledgement came.
    acked_seqs: SeqSet,
    first_sent: Option<Instant>,
    last_sent: Option<Instant>,
    last_ack: Option<Instant>,
    /// Publishes that went out without a sequence number waiting for them (never expected:
    /// it would mean the matching above is wrong, so it is reported).
    unmatched: u64,
}

impl DevStats {
    /// Forgets the figures of the last phase.
    fn reset_phase(&mut self) {
        self.ack.reset();
        self.refused.clear();
        self.errors = 0;
        self.acked_seqs.clear();
        self.first_sent = None;
        self.last_sent = None;
        self.last_ack = None;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Wall-clock milliseconds, as devices stamp telemetry.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Dev {
    fn set_offline(&self, connected: &AtomicU64) {
        if self.online.swap(false, Relaxed) {
            connected.fetch_sub(1, Relaxed);
        }
    }

    /// The connection is gone: drops what the client still holds (`unacked` of this phase
    /// in flight, and what is queued; rumqttc would drop it at the next CONNACK anyway)
    /// together with their sequence numbers, and takes no more messages until the client is
    /// connected again.
    fn lost_connection(
        &self,
        events: &mut rumqttc::EventLoop,
        connected: &AtomicU64,
        unacked: usize,
    ) {
        let mut order = lock(&self.order);
        events.clean();
        self.dropped
            .fetch_add((unacked + order.len()) as u64, Relaxed);
        order.clear();
        self.set_offline(connected);
    }
}

/// How the connect ramp went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectReport {
    /// Clients started.
    pub devices: u64,
    /// Clients connected at the end of the ramp.
    pub connected: u64,
    /// From the first connect attempt to the last CONNACK (or to the end of the wait).
    pub elapsed_s: f64,
    /// Connections per second achieved.
    pub rate_per_s: f64,
    /// Connect attempt to CONNACK.
    pub connack: Option<Percentiles>,
    /// CONNACKs that refused the connection, in total and by return code.
    pub refused: u64,
    pub refused_by: BTreeMap<String, u64>,
    /// Other failed attempts (network errors, timeouts).
    pub errors: u64,
}

/// What the broker (or gateway) took in during a phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IngestReport {
    /// `gateway_api` (the gateway's `GET /api/v1/ingest`) or `subscriber` (what the
    /// simulator's own subscriber received from a bare broker).
    pub source: &'static str,
    /// Telemetry stored (or received) for the phase's messages, after draining.
    pub ingested: u64,
    /// Telemetry stored (or received) during the phase, per second.
    pub ingested_per_s: f64,
    /// Messages missing by sequence numbers (the subscriber counts the tail against what was
    /// sent; the gateway counts gaps).
    pub lost: i64,
    pub duplicates: u64,
    /// QoS 1: messages acknowledged in the phase that did not arrive. The subscriber checks
    /// each acknowledged sequence number; from the gateway's counters it is acknowledged minus
    /// newly stored, exact as long as the gateway stored nothing unacknowledged: `None` if a
    /// connection was lost or the gateway restarted (`--verify` checks number by number).
    pub acked_lost: Option<u64>,
    /// Device timestamp to stored (the gateway's own figure, over everything it stored since
    /// it started) or to received (subscriber, this phase only, ms resolution of the
    /// timestamp).
    pub latency: Option<Percentiles>,
    /// The gateway's resident memory at the end of the phase, and its CPU use during it (in
    /// percent of one core).
    pub resident_bytes: Option<u64>,
    pub cpu_pct: Option<f64>,
    /// Subscriber only: messages on the telemetry topics that did not decode as telemetry,
    /// since the subscriber started.
    pub undecodable: u64,
}

/// One phase of steady load.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseReport {
    /// Clients connected when the phase began.
    pub devices: u64,
    pub rate_per_device: f64,
    pub duration_s: f64,
    /// `devices x rate_per_device`.
    pub target_per_s: f64,
    /// Telemetry handed to the clients.
    pub offered: u64,
    pub offered_per_s: f64,
    /// Due but not sent: the client was offline, or its queue was full.
    pub skipped: u64,
    /// QoS 1 only: acknowledged; per second over the phase, or until the last PUBACK if that
    /// came later (a broker that falls behind acknowledges the phase's messages more slowly
    /// than they were offered); not acknowledged after the linger.
    pub acked: Option<u64>,
    pub acked_per_s: Option<f64>,
    pub unacked: Option<u64>,
    /// QoS 1 only: publish to PUBACK.
    pub ack_latency: Option<Percentiles>,
    pub ingest: Option<IngestReport>,
    /// Payload size of the telemetry sent, in bytes.
    pub payload_bytes: u64,
    /// Connection errors and refusals during the phase.
    pub connection_errors: u64,
    /// With `--broker-pid`: the broker's CPU and memory over the phase.
    pub broker: Option<BrokerUse>,
    /// The simulator's own CPU over the phase, in percent of one core (all its threads): near
    /// a whole core, the load generator rather than the broker may have set the pace.
    pub clients_cpu_pct: Option<f64>,
}

/// The broker process during a phase (`--broker-pid`, from Linux's `/proc`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BrokerUse {
    pub pid: u32,
    /// CPU over the phase, in percent of one core (all its threads).
    pub cpu_pct: Option<f64>,
    /// Resident memory at the end, and the highest sampled.
    pub resident_bytes: Option<u64>,
    pub resident_peak_bytes: Option<u64>,
}

impl BrokerUse {
    /// From the marks of a phase: CPU from `first` to `last`, memory at `last` and the highest
    /// among `all`.
    fn of<'a>(
        pid: u32,
        first: Option<&Mark>,
        last: Option<&Mark>,
        all: impl Iterator<Item = &'a Mark>,
    ) -> BrokerUse {
        let sample = |m: Option<&Mark>| m.and_then(|m| m.broker);
        let (a, b) = (sample(first), sample(last));
        BrokerUse {
            pid,
            cpu_pct: match (a, b) {
                (Some(a), Some(b)) => b.cpu_pct_since(&a),
                _ => None,
            },
            resident_bytes: b.map(|b| b.resident_bytes),
            resident_peak_bytes: all.filter_map(|m| m.broker).map(|p| p.resident_bytes).max(),
        }
    }
}

impl std::fmt::Display for BrokerUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {}: CPU {} % of a core, RSS {} (highest sampled {})",
            self.pid,
            stats::Opt(self.cpu_pct.map(|c| format!("{c:.1}"))),
            stats::Opt(self.resident_bytes.map(stats::Mib)),
            stats::Opt(self.resident_peak_bytes.map(stats::Mib)),
        )
    }
}

/// Every sequence number acknowledged in the last phase, looked up in what the gateway stored
/// (`GET /api/v1/devices/{id}/telemetry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Devices read back, and those whose telemetry could not be read (named in `errors`).
    pub devices: u64,
    pub unreadable: u64,
    /// Acknowledged sequence numbers of the devices read back, and of those, stored and not.
    pub acked: u64,
    pub stored: u64,
    pub missing: u64,
    /// Some missing ones, as `device boot seq`.
    pub examples: Vec<String>,
    pub errors: Vec<String>,
}

impl VerifyReport {
    /// Every acknowledged number of every device was found.
    pub fn clean(&self) -> bool {
        self.unreadable == 0 && self.missing == 0
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} acknowledged sequence numbers of {} devices read back: {} stored, {} missing",
            self.acked, self.devices, self.stored, self.missing
        )?;
        if !self.examples.is_empty() {
            write!(f, " (e.g. {})", self.examples.join(", "))?;
        }
        if self.unreadable > 0 {
            write!(
                f,
                "; {} devices unreadable: {}",
                self.unreadable,
                self.errors.join("; ")
            )?;
        }
        Ok(())
    }
}

/// A reconnect storm: every client dropped at once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StormReport {
    /// Clients connected when the storm began (all of them were dropped).
    pub dropped: u64,
    /// Of those, connected again within the bound, and not.
    pub back: u64,
    pub never_back: u64,
    /// From the drop to the last one's CONNACK; `None` if some never came back.
    pub all_back_s: Option<f64>,
    pub timeout_s: f64,
    /// Reconnect attempt to CONNACK.
    pub connack: Option<Percentiles>,
    pub refused: u64,
    pub refused_by: BTreeMap<String, u64>,
    pub errors: u64,
}

/// A point in a run to measure ingest from.
#[derive(Debug, Clone)]
struct Mark {
    ingested: u64,
    lost: i64,
    duplicates: u64,
    gateway: Option<IngestSample>,
    /// The broker process, if its pid was given.
    broker: Option<ProcSample>,
    /// This process: the simulator itself.
    clients: Option<ProcSample>,
}

/// What the subscriber saw.
#[derive(Debug)]
struct SubState {
    seq: SeqCounter,
    /// Device timestamp to arrival, this phase (us).
    e2e: Histogram<u64>,
    undecodable: u64,
    /// When a message not seen before last arrived.
    last_new: Option<Instant>,
}

/// The running clients of a load or stress run.
#[derive(Debug)]
pub(crate) struct Swarm {
    cfg: Arc<Config>,
    devs: Vec<Arc<Dev>>,
    tasks: tokio::task::JoinSet<()>,
    plan: watch::Sender<Plan>,
    phase: Arc<AtomicU32>,
    connected: Arc<AtomicU64>,
    stop: CancellationToken,
    close: CancellationToken,
    subscriber: Option<Arc<Mutex<SubState>>>,
    api: Option<Api>,
    progress: Progress,
    pub notes: Vec<String>,
}

impl Swarm {
    pub fn new(
        cfg: Config,
        api: Option<Api>,
        stop: CancellationToken,
        progress: Progress,
    ) -> Swarm {
        let (plan, _) = watch::channel(Plan::Idle);
        Swarm {
            cfg: Arc::new(cfg),
            devs: Vec::new(),
            tasks: tokio::task::JoinSet::new(),
            plan,
            phase: Arc::new(AtomicU32::new(0)),
            connected: Arc::new(AtomicU64::new(0)),
            close: stop.child_token(),
            stop,
            subscriber: None,
            api,
            progress,
            notes: Vec::new(),
        }
    }

    pub fn connected(&self) -> u64 {
        self.connected.load(Relaxed)
    }

    pub fn devices(&self) -> u64 {
        self.devs.len() as u64
    }

    /// Starts the subscriber (client id `client_id`, on `filter`) and waits, at most `wait`,
    /// for its SUBACK. Returns whether it is subscribed.
    pub async fn subscribe(&mut self, client_id: &str, filter: &str, wait: Duration) -> bool {
        let state = Arc::new(Mutex::new(SubState {
            seq: SeqCounter::new(),
            e2e: stats::histogram(),
            undecodable: 0,
            last_new: None,
        }));
        self.subscriber = Some(state.clone());
        let mut opts = MqttOptions::new(client_id, &self.cfg.host, self.cfg.port);
        opts.set_keep_alive(self.cfg.keep_alive);
        opts.set_clean_session(true);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_inflight(u16::MAX);
        let (ready_tx, mut ready) = watch::channel(false);
        let qos = self.cfg.qos;
        let filter = filter.to_owned();
        let close = self.close.clone();
        self.tasks
            .spawn(subscriber(opts, filter, qos, state, ready_tx, close));
        let deadline = Instant::now() + wait;
        loop {
            if *ready.borrow_and_update() {
                return true;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return false,
                r = ready.changed() => if r.is_err() { return false },
            }
        }
    }

    /// Starts clients for `idents`, `rate` new connections per second, and waits until all of
    /// them are connected or `timeout` after the ramp's planned end.
    pub async fn connect(
        &mut self,
        idents: Vec<Ident>,
        rate: f64,
        timeout: Duration,
    ) -> ConnectReport {
        let first = self.devs.len();
        let n = idents.len();
        let started = Instant::now();
        let planned = Duration::from_secs_f64(n as f64 / rate.max(0.001));
        let want = self.connected() + n as u64;
        self.progress.phase("connect", planned);
        for (i, ident) in idents.into_iter().enumerate() {
            let dev = Arc::new(Dev {
                id: ident.id.clone(),
                boot: rand::random(),
                online: AtomicBool::new(false),
                next_seq: AtomicU64::new(0),
                finished: AtomicU32::new(0),
                offered: AtomicU64::new(0),
                skipped: AtomicU64::new(0),
                acked: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                stats: Mutex::new(DevStats {
                    ack: stats::histogram(),
                    connack: stats::histogram(),
                    last_connack: None,
                    refused: BTreeMap::new(),
                    errors: 0,
                    payload_bytes: 0,
                    acked_seqs: SeqSet::new(),
                    first_sent: None,
                    last_sent: None,
                    last_ack: None,
                    unmatched: 0,
                }),
                order: Mutex::new(VecDeque::new()),
                space: tokio::sync::Notify::new(),
                drop: tokio::sync::Notify::new(),
            });
            self.devs.push(dev.clone());
            let client = Client {
                dev,
                ident,
                cfg: self.cfg.clone(),
                plan: self.plan.subscribe(),
                phase: self.phase.clone(),
                connected: self.connected.clone(),
                close: self.close.clone(),
                seed: self.cfg.seed.wrapping_add((first + i) as u64),
                start_at: started + Duration::from_secs_f64(i as f64 / rate.max(0.001)),
            };
            self.tasks.spawn(client.run());
        }
        let deadline = started + planned + timeout;
        let mut last_progress = Instant::now();
        while self.connected() < want && Instant::now() < deadline && !self.stop.is_cancelled() {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(POLL) => {}
            }
            if last_progress.elapsed() >= Duration::from_millis(250) {
                last_progress = Instant::now();
                self.progress.update(
                    started.elapsed(),
                    format!("{}/{} connected", self.connected(), want),
                );
            }
        }
        let devs = &self.devs[first..];
        let (connack, refused_by, errors) = collect_connects(devs);
        let last = devs
            .iter()
            .filter_map(|d| lock(&d.stats).last_connack)
            .max()
            .unwrap_or_else(Instant::now);
        let connected = devs.iter().filter(|d| d.online.load(Relaxed)).count() as u64;
        let elapsed = if connected == n as u64 {
            last.saturating_duration_since(started)
        } else {
            started.elapsed()
        };
        ConnectReport {
            devices: n as u64,
            connected,
            elapsed_s: elapsed.as_secs_f64(),
            rate_per_s: per_second(connected, elapsed),
            connack: Percentiles::of(&connack),
            refused: refused_by.values().sum(),
            refused_by,
            errors,
        }
    }

    /// Resets every client's figures for a new phase; returns its number.
    fn begin_phase(&mut self) -> u32 {
        for d in &self.devs {
            d.offered.store(0, Relaxed);
            d.skipped.store(0, Relaxed);
            d.acked.store(0, Relaxed);
            d.dropped.store(0, Relaxed);
            lock(&d.stats).reset_phase();
        }
        if let Some(sub) = &self.subscriber {
            lock(sub).e2e.reset();
        }
        self.phase.fetch_add(1, Relaxed) + 1
    }

    /// With a subscriber: the sequence numbers acknowledged in this phase that it has not
    /// received, counted one by one.
    fn subscriber_acked_lost(&self) -> Option<u64> {
        let sub = lock(self.subscriber.as_ref()?);
        Some(
            self.devs
                .iter()
                .map(|d| {
                    let s = lock(&d.stats);
                    s.acked_seqs
                        .iter()
                        .filter(|seq| !sub.seq.seen(&d.id, d.boot, *seq))
                        .count() as u64
                })
                .sum(),
        )
    }

    /// Publishes that went out without a sequence number to match (0 unless the matching
    /// of acknowledgements to numbers is broken).
    pub fn unmatched(&self) -> u64 {
        self.devs.iter().map(|d| lock(&d.stats).unmatched).sum()
    }

    /// Every connected client hands over `messages` telemetry messages as fast as its client
    /// takes them (QoS 1: as fast as its in-flight window allows), all starting together.
    /// Ingest is sampled throughout. The burst ends when everything was sent and acknowledged
    /// or at `timeout`; then ingest gets (at most) `drain` to catch up.
    pub async fn burst(&mut self, messages: u64, timeout: Duration, drain: Duration) -> BurstRaw {
        let phase = self.begin_phase();
        let devices = self.devices();
        let qos1 = self.cfg.qos != QoS::AtMostOnce;
        let before = self.mark().await;
        let backpressure_before = self.backpressure().await;
        let start = Instant::now() + Duration::from_millis(20);
        let until = start + timeout;
        self.plan.send_replace(Plan::Burst {
            phase,
            messages,
            start,
            until,
        });
        self.progress.phase("burst", timeout);
        // Nothing of the burst is ingested before it starts.
        let mut samples = vec![(Duration::ZERO, 0)];
        let mut resident_peak: Option<u64> = None;
        let mut broker_peak = before
            .as_ref()
            .and_then(|m| m.broker)
            .map(|p| p.resident_bytes);
        let mut last = before.clone();
        let total = devices * messages;
        // While the clients send and the acknowledgements come back.
        loop {
            let offered = self.sum(|d| &d.offered);
            let acked = self.sum(|d| &d.acked);
            let settled = acked + self.sum(|d| &d.dropped);
            let sent_all = self.devs.iter().all(|d| d.finished.load(Relaxed) == phase);
            if (sent_all && (!qos1 || settled >= offered))
                || Instant::now() >= until
                || self.stop.is_cancelled()
            {
                break;
            }
            tokio::time::sleep(BURST_POLL).await;
            if let Some(m) = self
                .burst_sample(before.as_ref(), start, &mut samples)
                .await
            {
                resident_peak = resident_peak.max(m.resident());
                broker_peak = broker_peak.max(m.broker.map(|p| p.resident_bytes));
                last = Some(m);
            }
            self.progress.update(
                start.elapsed(),
                format!("{offered}/{total} sent, {acked} acked"),
            );
        }
        self.plan.send_replace(Plan::Idle);
        // CPU figures run to here, the end of sending and acknowledging: a drain that waits for
        // a subscriber that will never see what its broker dropped would only dilute them.
        if let Some(m) = self
            .burst_sample(before.as_ref(), start, &mut samples)
            .await
        {
            resident_peak = resident_peak.max(m.resident());
            broker_peak = broker_peak.max(m.broker.map(|p| p.resident_bytes));
            last = Some(m);
        }
        let acked_mark = last.clone();
        let offered = self.sum(|d| &d.offered);
        let acked = self.sum(|d| &d.acked);
        // Then until ingest has everything it should have, or stops moving.
        let expected = if qos1 { acked } else { offered };
        let drain_end = Instant::now() + drain;
        let mut moved = Instant::now();
        if let Some(b) = &before {
            self.progress.phase("drain", drain);
            loop {
                let done = last
                    .as_ref()
                    .map_or(0, |m| stats::delta(b.ingested, m.ingested));
                if done >= expected
                    || Instant::now() >= drain_end
                    || moved.elapsed() >= QUIET
                    || self.stop.is_cancelled()
                {
                    break;
                }
                tokio::time::sleep(BURST_POLL).await;
                let Some(m) = self.burst_sample(Some(b), start, &mut samples).await else {
                    break;
                };
                if last.as_ref().is_none_or(|l| l.ingested != m.ingested) {
                    moved = Instant::now();
                }
                resident_peak = resident_peak.max(m.resident());
                broker_peak = broker_peak.max(m.broker.map(|p| p.resident_bytes));
                self.progress
                    .update(start.elapsed(), format!("{done}/{expected} ingested"));
                last = Some(m);
            }
        }
        let backpressure = match (backpressure_before, self.backpressure().await) {
            (Some(b), Some(a)) => Some(a.since(&b)),
            _ => None,
        };

        let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(start));
        let mut ack = stats::histogram();
        let (mut first_sent, mut last_sent, mut last_ack) = (None, None, None);
        let mut payload_bytes = 0;
        let mut connection_errors = 0;
        for d in &self.devs {
            let s = lock(&d.stats);
            let _ = ack.add(&s.ack);
            first_sent = match (first_sent, s.first_sent) {
                (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                (a, b) => a.or(b),
            };
            last_sent = last_sent.max(s.last_sent);
            last_ack = last_ack.max(s.last_ack);
            payload_bytes = payload_bytes.max(s.payload_bytes);
            connection_errors += s.errors + s.refused.values().sum::<u64>();
        }
        let restarted =
            matches!((&before, &last), (Some(b), Some(e)) if Mark::restarted_between(b, e));
        let inexact = self.api.is_some() && (restarted || connection_errors > 0);
        if inexact {
            self.notes.push(counts_note(restarted, "burst"));
        }
        let ingest = match (&before, &last) {
            (Some(b), Some(e)) => {
                let cpu_pct = match (
                    &b.gateway,
                    acked_mark.as_ref().and_then(|m| m.gateway.as_ref()),
                ) {
                    (Some(bg), Some(ag)) => IngestDelta::between(bg, ag).cpu_pct,
                    _ => None,
                };
                let (source, resident_end) = match &e.gateway {
                    Some(_) => ("gateway_api", e.resident()),
                    None => ("subscriber", None),
                };
                let last_new = self
                    .subscriber
                    .as_ref()
                    .and_then(|s| lock(s).last_new)
                    .filter(|t| *t >= start);
                Some(BurstIngestRaw {
                    source,
                    samples,
                    last_new: since(last_new),
                    ingested: stats::delta(b.ingested, e.ingested),
                    duplicates: stats::delta(b.duplicates, e.duplicates),
                    lost: e.lost - b.lost,
                    counts_inexact: inexact,
                    acked_lost: if qos1 {
                        self.subscriber_acked_lost()
                    } else {
                        None
                    },
                    resident_peak,
                    resident_end,
                    cpu_pct,
                    backpressure,
                })
            }
            _ => None,
        };
        let broker = self.cfg.broker_pid.map(|pid| {
            let mut b = BrokerUse::of(pid, before.as_ref(), acked_mark.as_ref(), last.iter());
            b.resident_bytes = last
                .as_ref()
                .and_then(|m| m.broker)
                .map(|p| p.resident_bytes);
            b.resident_peak_bytes = broker_peak.max(b.resident_peak_bytes);
            b
        });
        BurstRaw {
            broker,
            clients_cpu_pct: clients_cpu(before.as_ref(), acked_mark.as_ref()),
            devices,
            messages,
            offered,
            acked: qos1.then_some(acked),
            first_sent: since(first_sent),
            last_sent: since(last_sent),
            last_ack: since(last_ack),
            ack_latency: if qos1 { Percentiles::of(&ack) } else { None },
            payload_bytes,
            connection_errors,
            ingest,
        }
    }

    /// Takes a mark and keeps it as a sample: time since `start`, ingested since `before`.
    async fn burst_sample(
        &mut self,
        before: Option<&Mark>,
        start: Instant,
        samples: &mut Vec<(Duration, u64)>,
    ) -> Option<Mark> {
        let before = before?;
        let m = self.mark().await?;
        samples.push((
            Instant::now().saturating_duration_since(start),
            stats::delta(before.ingested, m.ingested),
        ));
        Some(m)
    }

    /// The gateway's backpressure counters, if there is a gateway API that answers.
    async fn backpressure(&mut self) -> Option<Backpressure> {
        let api = self.api.clone()?;
        match tokio::task::spawn_blocking(move || Backpressure::fetch(&api)).await {
            Ok(Ok(b)) => Some(b),
            Ok(Err(e)) => {
                self.notes
                    .push(format!("backpressure counters unavailable: {e}"));
                None
            }
            Err(e) => {
                self.notes
                    .push(format!("backpressure counters unavailable: {e}"));
                None
            }
        }
    }

    /// Reads back what the gateway stored for every client and looks up each sequence number
    /// acknowledged in the last phase. `None` without a gateway API.
    pub async fn verify(&mut self) -> Option<VerifyReport> {
        let api = self.api.clone()?;
        let work: Vec<(String, u32, SeqSet)> = self
            .devs
            .iter()
            .map(|d| (d.id.clone(), d.boot, lock(&d.stats).acked_seqs.clone()))
            .collect();
        self.progress.phase("verify", Duration::from_secs(60));
        let report = tokio::task::spawn_blocking(move || verify(&api, work))
            .await
            .ok()?;
        Some(report)
    }

    /// Every connected client sends telemetry at `rate` per second for `duration`; then the
    /// phase waits (at most `linger`) for acknowledgements and (at most `drain`) for ingest to
    /// catch up.
    pub async fn phase(
        &mut self,
        name: &str,
        rate: f64,
        duration: Duration,
        linger: Duration,
        drain: Duration,
    ) -> PhaseReport {
        let phase = self.begin_phase();
        let devices = self.connected();
        let before = self.mark().await;
        let start = Instant::now() + Duration::from_millis(20);
        let until = start + duration;
        self.plan.send_replace(Plan::Send {
            phase,
            rate,
            start,
            until,
        });
        self.progress.phase(name, duration);
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep_until(until.min(now + Duration::from_millis(250))) => {}
            }
            self.progress.update(
                start.elapsed(),
                format!(
                    "{} connected, {} sent, {} acked",
                    self.connected(),
                    self.sum(|d| &d.offered),
                    self.sum(|d| &d.acked)
                ),
            );
        }
        self.plan.send_replace(Plan::Idle);
        let steady = Instant::now().min(until).saturating_duration_since(start);
        // Senders woken late still hand over what fell due before the end; wait (bounded) for
        // them, so the counts below are final.
        let settle = Instant::now() + SETTLE;
        while self.devs.iter().any(|d| d.finished.load(Relaxed) != phase)
            && Instant::now() < settle
            && !self.stop.is_cancelled()
        {
            tokio::time::sleep(POLL).await;
        }
        let end = self.mark().await;

        let qos1 = self.cfg.qos != QoS::AtMostOnce;
        if qos1 {
            let linger_end = Instant::now() + linger;
            while self.sum(|d| &d.acked) + self.sum(|d| &d.dropped) < self.sum(|d| &d.offered)
                && Instant::now() < linger_end
                && !self.stop.is_cancelled()
            {
                tokio::time::sleep(POLL).await;
            }
        }
        let offered = self.sum(|d| &d.offered);
        let acked = self.sum(|d| &d.acked);
        let expected = if qos1 { acked } else { offered };
        let drained = self.drain(before.as_ref(), expected, drain).await;

        let mut ack = stats::histogram();
        let mut payload_bytes = 0;
        let mut connection_errors = 0;
        let mut last_ack = None;
        for d in &self.devs {
            let s = lock(&d.stats);
            let _ = ack.add(&s.ack);
            payload_bytes = payload_bytes.max(s.payload_bytes);
            connection_errors += s.errors + s.refused.values().sum::<u64>();
            last_ack = last_ack.max(s.last_ack);
        }
        let acking = last_ack.map_or(steady, |t| t.saturating_duration_since(start).max(steady));
        let mut ingest = match (&before, &end, &drained) {
            (Some(b), Some(e), Some(d)) => Some(self.ingest_report(b, e, d, steady, qos1)),
            _ => None,
        };
        let restarted =
            matches!((&before, &drained), (Some(b), Some(d)) if Mark::restarted_between(b, d));
        if let Some(i) = &mut ingest
            && self.api.is_some()
            && (restarted || connection_errors > 0)
        {
            i.acked_lost = None;
            self.notes.push(counts_note(restarted, "phase"));
        }
        let broker = self.cfg.broker_pid.map(|pid| {
            BrokerUse::of(
                pid,
                before.as_ref(),
                end.as_ref(),
                [&before, &end, &drained].into_iter().flatten(),
            )
        });
        PhaseReport {
            broker,
            clients_cpu_pct: clients_cpu(before.as_ref(), end.as_ref()),
            devices,
            rate_per_device: rate,
            duration_s: steady.as_secs_f64(),
            target_per_s: devices as f64 * rate,
            offered,
            offered_per_s: per_second(offered, steady),
            skipped: self.sum(|d| &d.skipped),
            acked: qos1.then_some(acked),
            acked_per_s: qos1.then(|| per_second(acked, acking)),
            unacked: qos1.then(|| offered.saturating_sub(acked)),
            ack_latency: if qos1 { Percentiles::of(&ack) } else { None },
            ingest,
            payload_bytes,
            connection_errors,
        }
    }

    fn ingest_report(
        &self,
        before: &Mark,
        end: &Mark,
        drained: &Mark,
        steady: Duration,
        qos1: bool,
    ) -> IngestReport {
        let undecodable = self.subscriber.as_ref().map_or(0, |s| lock(s).undecodable);
        let (source, latency, resident_bytes, cpu_pct) = match (&before.gateway, &end.gateway) {
            (Some(b), Some(e)) => (
                "gateway_api",
                drained.gateway.as_ref().and_then(|g| g.latency),
                e.process.and_then(|p| p.resident_bytes),
                IngestDelta::between(b, e).cpu_pct,
            ),
            _ => (
                "subscriber",
                self.subscriber
                    .as_ref()
                    .and_then(|s| Percentiles::of(&lock(s).e2e)),
                None,
                None,
            ),
        };
        let ingested = stats::delta(before.ingested, drained.ingested);
        let duplicates = stats::delta(before.duplicates, drained.duplicates);
        let acked_lost = qos1.then(|| match self.subscriber_acked_lost() {
            Some(exact) => exact,
            None => stats::acked_lost(self.sum(|d| &d.acked), ingested, duplicates),
        });
        IngestReport {
            source,
            ingested,
            ingested_per_s: per_second(stats::delta(before.ingested, end.ingested), steady),
            lost: drained.lost - before.lost,
            duplicates,
            acked_lost,
            latency,
            resident_bytes,
            cpu_pct,
            undecodable,
        }
    }

    /// Drops every connected client at once, without a DISCONNECT, and waits (at most
    /// `timeout`) until all of them are connected again. Each reconnects at once, then backs
    /// off with jitter after a failure, as the fleet's devices do.
    pub async fn storm(&mut self, timeout: Duration) -> StormReport {
        let victims: Vec<Arc<Dev>> = self
            .devs
            .iter()
            .filter(|d| d.online.load(Relaxed))
            .cloned()
            .collect();
        for d in &self.devs {
            let mut s = lock(&d.stats);
            s.connack.reset();
            s.refused.clear();
            s.errors = 0;
        }
        self.progress.phase("storm", timeout);
        let t0 = Instant::now();
        for d in &victims {
            d.drop.notify_one();
        }
        let back =
            |d: &Dev| d.online.load(Relaxed) && lock(&d.stats).last_connack.is_some_and(|t| t > t0);
        let deadline = t0 + timeout;
        let mut last_progress = Instant::now();
        loop {
            let n = victims.iter().filter(|d| back(d)).count();
            if n == victims.len() || Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(POLL) => {}
            }
            if last_progress.elapsed() >= Duration::from_millis(250) {
                last_progress = Instant::now();
                self.progress
                    .update(t0.elapsed(), format!("{n}/{} back", victims.len()));
            }
        }
        let came_back: Vec<&Arc<Dev>> = victims.iter().filter(|d| back(d)).collect();
        let all_back = (came_back.len() == victims.len()).then(|| {
            came_back
                .iter()
                .filter_map(|d| lock(&d.stats).last_connack)
                .max()
                .map_or(Duration::ZERO, |t| t.saturating_duration_since(t0))
        });
        let (connack, refused_by, errors) = collect_connects(&self.devs);
        StormReport {
            dropped: victims.len() as u64,
            back: came_back.len() as u64,
            never_back: (victims.len() - came_back.len()) as u64,
            all_back_s: all_back.map(|d| d.as_secs_f64()),
            timeout_s: timeout.as_secs_f64(),
            connack: Percentiles::of(&connack),
            refused: refused_by.values().sum(),
            refused_by,
            errors,
        }
    }

    /// Ends a run: reads back what the gateway stored if `verify`, notes publishes that went
    /// out without a sequence number to match, then closes every client. Returns the read-back
    /// and the run's notes.
    pub async fn finish(mut self, verify: bool) -> (Option<VerifyReport>, Vec<String>) {
        let verified = if verify { self.verify().await } else { None };
        let unmatched = self.unmatched();
        if unmatched > 0 {
            self.notes.push(format!(
                "{unmatched} publishes went out without a sequence number to match: the \
                 acknowledged numbers are not exact"
            ));
        }
        let notes = self.notes.clone();
        self.close().await;
        (verified, notes)
    }

    /// Disconnects every client (a DISCONNECT each, bounded) and waits for their tasks.
    pub async fn close(mut self) {
        self.plan.send_replace(Plan::Idle);
        self.close.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
        self.progress.finish();
    }

    fn sum(&self, counter: impl Fn(&Dev) -> &AtomicU64) -> u64 {
        self.devs.iter().map(|d| counter(d).load(Relaxed)).sum()
    }

    /// Where ingest stands now: the gateway's counters, or what the subscriber has seen
    /// (its loss counted against what every client has sent).
    async fn mark(&mut self) -> Option<Mark> {
        let mut mark = self.ingest_mark().await?;
        mark.broker = self.cfg.broker_pid.and_then(ProcSample::read);
        mark.clients = ProcSample::read(std::process::id());
        Some(mark)
    }

    async fn ingest_mark(&mut self) -> Option<Mark> {
        if let Some(api) = &self.api {
            return match IngestSample::fetch_async(api).await {
                Ok(s) => Some(Mark {
                    ingested: s.telemetry,
                    lost: s.lost,
                    duplicates: s.duplicates,
                    gateway: Some(s),
                    broker: None,
                    clients: None,
                }),
                Err(e) => {
                    let note = format!("ingest counters unavailable: {e}");
                    if !self.notes.contains(&note) {
                        self.notes.push(note);
                    }
                    None
                }
            };
        }
        let sub = self.subscriber.as_ref()?;
        let s = lock(sub);
        let t = s.seq.totals();
        let lost: u64 = self
            .devs
            .iter()
            .map(|d| s.seq.unseen(&d.id, d.boot, d.next_seq.load(Relaxed)))
            .sum();
        Some(Mark {
            ingested: t.unique,
            lost: lost as i64,
            duplicates: t.duplicates,
            gateway: None,
            broker: None,
            clients: None,
        })
    }

    /// Waits until `expected` messages past `before` are ingested, ingest stops moving for a
    /// while, or `limit` passes; returns the last mark.
    async fn drain(
        &mut self,
        before: Option<&Mark>,
        expected: u64,
        limit: Duration,
    ) -> Option<Mark> {
        let before = before?;
        let every = if self.api.is_some() { API_POLL } else { POLL };
        let deadline = Instant::now() + limit;
        let mut last = self.mark().await?;
        let mut moved = Instant::now();
        self.progress.phase("drain", limit);
        let started = Instant::now();
        loop {
            let done = stats::delta(before.ingested, last.ingested);
            if done >= expected
                || Instant::now() >= deadline
                || moved.elapsed() >= QUIET
                || self.stop.is_cancelled()
            {
                return Some(last);
            }
            tokio::time::sleep(every).await;
            let next = self.mark().await?;
            if next.ingested != last.ingested {
                moved = Instant::now();
            }
            self.progress
                .update(started.elapsed(), format!("{done}/{expected} ingested"));
            last = next;
        }
    }
}

/// Why the gateway's counters cannot tell what was acknowledged but lost in a `what`.
fn counts_note(restarted: bool, what: &str) -> String {
    if restarted {
        // Its counters started again from zero.
        format!(
            "the gateway restarted during the {what}: its ingest counters cover its last run \
             only; --verify looks up every acknowledged number"
        )
    } else {
        // Messages in flight when a connection went may have been stored unacknowledged, and
        // would make up for acknowledged ones lost.
        format!(
            "connections were lost during the {what}: acknowledged-but-lost by counts would not \
             be exact; --verify looks up every acknowledged number"
        )
    }
}

/// The simulator's CPU between two marks, in percent of one core.
fn clients_cpu(first: Option<&Mark>, last: Option<&Mark>) -> Option<f64> {
    let (a, b) = (first?.clients?, last?.clients?);
    b.cpu_pct_since(&a)
}

impl Mark {
    /// Whether the gateway restarted between two marks: its counters or its CPU time went
    /// back.
    fn restarted_between(earlier: &Mark, later: &Mark) -> bool {
        let (Some(e), Some(l)) = (&earlier.gateway, &later.gateway) else {
            return false;
        };
        let cpu = |s: &IngestSample| s.process.and_then(|p| p.cpu_seconds);
        l.telemetry < e.telemetry
            || l.duplicates < e.duplicates
            || matches!((cpu(e), cpu(l)), (Some(a), Some(b)) if b < a)
    }

    fn resident(&self) -> Option<u64> {
        self.gateway
            .as_ref()
            .and_then(|g| g.process)
            .and_then(|p| p.resident_bytes)
    }
}

/// Looks up every acknowledged `(device, boot, seq)` of `work` in what the gateway at `api`
/// stored, a few devices at a time (blocking).
fn verify(api: &Api, work: Vec<(String, u32, SeqSet)>) -> VerifyReport {
    type Outcome = Result<(u64, Vec<u32>), String>;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let outcomes: Vec<Mutex<Option<Outcome>>> = work.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..VERIFY_THREADS.min(work.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    let Some((id, boot, acked)) = work.get(i) else {
                        return;
                    };
                    let outcome = Stored::fetch(api, id)
                        .map(|stored| {
                            let missing: Vec<u32> = acked
                                .iter()
                                .filter(|s| !stored.contains(*boot, *s))
                                .collect();
                            (acked.len() - missing.len() as u64, missing)
                        })
                        .map_err(|e| e.to_string());
                    *lock(&outcomes[i]) = Some(outcome);
                }
            });
        }
    });
    let mut report = VerifyReport {
        devices: 0,
        unreadable: 0,
        acked: 0,
        stored: 0,
        missing: 0,
        examples: Vec::new(),
        errors: Vec::new(),
    };
    for ((id, boot, acked), outcome) in work.iter().zip(outcomes) {
        match outcome
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(Ok((stored, missing))) => {
                report.devices += 1;
                report.acked += acked.len();
                report.stored += stored;
                report.missing += missing.len() as u64;
                for seq in missing {
                    if report.examples.len() < VERIFY_EXAMPLES {
                        report.examples.push(format!("{id} {boot} {seq}"));
                    }
                }
            }
            Some(Err(e)) => {
                report.unreadable += 1;
                report.errors.push(e);
            }
            None => {
                report.unreadable += 1;
                report.errors.push(format!("{id}: not read"));
            }
        }
    }
    report
}

fn collect_connects(devs: &[Arc<Dev>]) -> (Histogram<u64>, BTreeMap<String, u64>, u64) {
    let mut connack = stats::histogram();
    let mut refused_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = 0;
    for d in devs {
        let s = lock(&d.stats);
        let _ = connack.add(&s.connack);
        for (code, n) in &s.refused {
            *refused_by.entry(code.clone()).or_default() += n;
        }
        errors += s.errors;
    }
    (connack, refused_by, errors)
}

/// A CONNACK return code as a report key (`bad_user_name_or_password`, ...).
fn refusal_name(code: rumqttc::ConnectReturnCode) -> String {
    use rumqttc::ConnectReturnCode as C;
    match code {
        C::Success => "success",
        C::RefusedProtocolVersion => "protocol_version",
        C::BadClientId => "bad_client_id",
        C::ServiceUnavailable => "server_unavailable",
        C::BadUserNamePassword => "bad_user_name_or_password",
        C::NotAuthorized => "not_authorized",
    }
    .to_owned()
}

/// The smallest telemetry padding (raw samples of `features` values, more features if 256
/// samples are not enough) whose encoding is at least `bytes` long. Returns the samples, the
/// features, and the size of one message.
pub(crate) fn padding(
    bytes: usize,
    features: usize,
    encoding: Encoding,
) -> Result<(usize, usize, usize), String> {
    let size = |samples: usize, features: usize| -> Result<usize, String> {
        let t = template("pad", 0, samples, features);
        encode(&t, encoding)
            .map(|p| p.len())
            .map_err(|e| e.to_string())
    };
    let base = size(0, features)?;
    if bytes <= base {
        return Ok((0, features, base));
    }
    for f in features..=limits::MAX_FEATURES {
        if size(limits::MAX_SAMPLES, f)? < bytes {
            continue;
        }
        // The fewest samples that reach `bytes` (JSON numbers differ in length, so the size
        // of one sample is not a constant to divide by).
        let (mut lo, mut hi) = (0, limits::MAX_SAMPLES);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if size(mid, f)? >= bytes {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        return Ok((lo, f, size(lo, f)?));
    }
    let most = size(limits::MAX_SAMPLES, limits::MAX_FEATURES)?;
    Err(format!(
        "a telemetry message holds at most about {most} bytes in {}",
        encoding.name()
    ))
}

/// A device's telemetry message to send again and again, renumbered: noisy values drawn once
/// (with a fixed seed, so every client's payload has the same size).
fn template(id: &str, boot: u32, samples: usize, features: usize) -> Telemetry {
    let shape = DataShape {
        samples,
        features,
        ..DataShape::default()
    };
    let mut rng = StdRng::seed_from_u64(7);
    Behaviour::new(id.to_owned(), boot, 1000, shape).telemetry(&mut rng, now_ms())
}

/// One publishing client.
struct Client {
    dev: Arc<Dev>,
    ident: Ident,
    cfg: Arc<Config>,
    plan: watch::Receiver<Plan>,
    phase: Arc<AtomicU32>,
    connected: Arc<AtomicU64>,
    close: CancellationToken,
    seed: u64,
    start_at: Instant,
}

impl Client {
    /// The polling task: connects (after its place in the ramp), reconnects with jittered
    /// backoff, matches publishes with their acknowledgements.
    async fn run(self) {
        tokio::select! {
            _ = self.close.cancelled() => return,
            _ = tokio::time::sleep_until(self.start_at) => {}
        }
        let Client {
            dev,
            ident,
            cfg,
            plan,
            phase,
            connected,
            close,
            seed,
            ..
        } = self;
        let mut opts = MqttOptions::new(&ident.id, &cfg.host, cfg.port);
        if let Some((user, password)) = &ident.login {
            opts.set_credentials(user, password);
        }
        opts.set_keep_alive(cfg.keep_alive);
        opts.set_clean_session(true);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_inflight(cfg.inflight.max(1));
        let (client, mut events) = AsyncClient::new(opts, CHANNEL);
        let sender = tokio::spawn(send(
            dev.clone(),
            client.clone(),
            cfg.clone(),
            plan,
            close.clone(),
            seed,
        ));
        let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        // pkid -> (when it went out, its phase, its sequence number).
        let mut inflight: HashMap<u16, (Instant, u32, Option<u32>)> = HashMap::new();
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = Instant::now();
        loop {
            let event = tokio::select! {
                biased;
                _ = close.cancelled() => break,
                _ = dev.drop.notified() => {
                    // The link goes away without a DISCONNECT, as when a network drops; the
                    // next poll reconnects at once.
                    let p = phase.load(Relaxed);
                    let unacked = inflight.values().filter(|v| v.1 == p).count();
                    dev.lost_connection(&mut events, &connected, unacked);
                    inflight.clear();
                    attempt = Instant::now();
                    continue;
                }
                e = events.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let now = Instant::now();
                    {
                        let mut s = lock(&dev.stats);
                        stats::record(&mut s.connack, now.saturating_duration_since(attempt));
                        s.last_connack = Some(now);
                    }
                    backoff = FIRST_BACKOFF;
                    if !dev.online.swap(true, Relaxed) {
                        connected.fetch_add(1, Relaxed);
                    }
                    dev.space.notify_one();
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let now = Instant::now();
                    let p = phase.load(Relaxed);
                    let seq = if pkid != 0 {
                        lock(&dev.order).pop_front()
                    } else {
                        None
                    };
                    {
                        let mut s = lock(&dev.stats);
                        s.first_sent.get_or_insert(now);
                        s.last_sent = Some(now);
                        if pkid != 0 && seq.is_none() {
                            s.unmatched += 1;
                        }
                    }
                    if pkid != 0 {
                        inflight.insert(pkid, (now, p, seq));
                    }
                    dev.space.notify_one();
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some((sent, p, seq)) = inflight.remove(&ack.pkid)
                        && p == phase.load(Relaxed)
                    {
                        dev.acked.fetch_add(1, Relaxed);
                        let now = Instant::now();
                        let mut s = lock(&dev.stats);
                        stats::record(&mut s.ack, now.saturating_duration_since(sent));
                        s.last_ack = Some(now);
                        if let Some(seq) = seq {
                            s.acked_seqs.insert(seq);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let p = phase.load(Relaxed);
                    let unacked = inflight.values().filter(|v| v.1 == p).count();
                    dev.lost_connection(&mut events, &connected, unacked);
                    inflight.clear();
                    {
                        let mut s = lock(&dev.stats);
                        match e {
                            ConnectionError::ConnectionRefused(code) => {
                                *s.refused.entry(refusal_name(code)).or_default() += 1;
                            }
                            _ => s.errors += 1,
                        }
                    }
                    let jitter = rng.random_range(0.5..1.5);
                    tokio::select! {
                        _ = close.cancelled() => break,
                        _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt = Instant::now();
                }
            }
        }
        sender.abort();
        if dev.online.load(Relaxed) {
            let _ = client.try_disconnect();
            // Let the DISCONNECT go out, then stop polling.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match events.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        _ => {}
                    }
                }
            })
            .await;
        }
        dev.set_offline(&connected);
    }
}

enum PhaseEnd {
    Done,
    Changed,
    Closed,
}

/// The sending task: telemetry at the plan's rate while a phase lasts.
async fn send(
    dev: Arc<Dev>,
    client: AsyncClient,
    cfg: Arc<Config>,
    mut plan: watch::Receiver<Plan>,
    close: CancellationToken,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut telemetry = template(&dev.id, dev.boot, cfg.samples, cfg.features);
    let topic = topic::format(&dev.id, Channel::Up(Uplink::Telemetry), cfg.encoding);
    loop {
        let current = *plan.borrow_and_update();
        let end = match current {
            Plan::Idle => PhaseEnd::Done,
            Plan::Send {
                phase,
                rate,
                start,
                until,
            } => {
                let period = Duration::from_secs_f64(1.0 / rate);
                // Spread the clients over the period so they do not publish in lockstep.
                let mut next = start + period.mul_f64(rng.random_range(0.0..1.0));
                // Everything due by now (timers are coarser than a fast rate's period).
                let mut due = |next: &mut Instant| {
                    let now = Instant::now();
                    while *next <= now && *next < until {
                        publish(&dev, &client, &cfg, &topic, &mut telemetry);
                        *next += period;
                    }
                };
                let end = loop {
                    if next >= until {
                        break PhaseEnd::Done;
                    }
                    tokio::select! {
                        _ = close.cancelled() => break PhaseEnd::Closed,
                        r = plan.changed() => {
                            // The plan changes when the phase is over (or stopped): what fell
                            // due before that still goes out.
                            due(&mut next);
                            break if r.is_ok() { PhaseEnd::Changed } else { PhaseEnd::Closed };
                        }
                        _ = tokio::time::sleep_until(next) => {}
                    }
                    due(&mut next);
                };
                dev.finished.store(phase, Relaxed);
                end
            }
            Plan::Burst {
                phase,
                messages,
                start,
                until,
            } => {
                let end = burst(
                    &dev,
                    &client,
                    &cfg,
                    &topic,
                    &mut telemetry,
                    (messages, start, until),
                    &mut plan,
                    &close,
                )
                .await;
                dev.finished.store(phase, Relaxed);
                end
            }
        };
        match end {
            PhaseEnd::Closed => return,
            PhaseEnd::Changed => continue,
            PhaseEnd::Done => {}
        }
        tokio::select! {
            _ = close.cancelled() => return,
            r = plan.changed() => if r.is_err() { return },
        }
    }
}

/// A burst's sending: `messages` in a row, each as soon as the client takes it (waiting for
/// room, or for the connection to come back), from `start` until everything is handed over,
/// `until` passes, or the plan changes.
#[allow(clippy::too_many_arguments)]
async fn burst(
    dev: &Dev,
    client: &AsyncClient,
    cfg: &Config,
    topic: &str,
    telemetry: &mut Telemetry,
    (messages, start, until): (u64, Instant, Instant),
    plan: &mut watch::Receiver<Plan>,
    close: &CancellationToken,
) -> PhaseEnd {
    tokio::select! {
        _ = close.cancelled() => return PhaseEnd::Closed,
        r = plan.changed() => return if r.is_ok() { PhaseEnd::Changed } else { PhaseEnd::Closed },
        _ = tokio::time::sleep_until(start) => {}
    }
    let mut sent = 0;
    while sent < messages {
        if hand_over(dev, client, cfg, topic, telemetry) == Handed::Yes {
            sent += 1;
            continue;
        }
        // The client's queue is full or it is offline: the poller wakes us when that changes.
        tokio::select! {
            _ = close.cancelled() => return PhaseEnd::Closed,
            r = plan.changed() => return if r.is_ok() { PhaseEnd::Changed } else { PhaseEnd::Closed },
            _ = tokio::time::sleep_until(until) => return PhaseEnd::Done,
            _ = dev.space.notified() => {}
        }
    }
    PhaseEnd::Done
}

#[derive(Debug, PartialEq, Eq)]
enum Handed {
    Yes,
    /// The client is offline or its queue is full.
    No,
}

/// Numbers the next telemetry message and hands it to the client, if it is online and takes
/// it. Only a message handed over is numbered (and, QoS 1, queued in `Dev::order`).
fn hand_over(
    dev: &Dev,
    client: &AsyncClient,
    cfg: &Config,
    topic: &str,
    t: &mut Telemetry,
) -> Handed {
    if !dev.online.load(Relaxed) {
        return Handed::No;
    }
    let seq = dev.next_seq.load(Relaxed);
    t.seq = seq as u32;
    t.time_ms = now_ms();
    let Ok(payload) = encode(t, cfg.encoding) else {
        return Handed::No;
    };
    let len = payload.len() as u64;
    {
        // Checked again under the lock: the poller empties the queue and the order together
        // when the connection goes, and marks the client offline while it holds the lock.
        let mut order = lock(&dev.order);
        if !dev.online.load(Relaxed)
            || client
                .try_publish(topic.to_owned(), cfg.qos, false, payload)
                .is_err()
        {
            return Handed::No;
        }
        if cfg.qos != QoS::AtMostOnce {
            order.push_back(seq as u32);
        }
    }
    dev.next_seq.store(seq + 1, Relaxed);
    dev.offered.fetch_add(1, Relaxed);
    lock(&dev.stats).payload_bytes = len;
    Handed::Yes
}

/// A paced phase's sending: a message the client cannot take now is skipped, not numbered.
fn publish(dev: &Dev, client: &AsyncClient, cfg: &Config, topic: &str, t: &mut Telemetry) {
    if hand_over(dev, client, cfg, topic, t) == Handed::No {
        dev.skipped.fetch_add(1, Relaxed);
    }
}

/// What the subscriber reads of a telemetry message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
struct Numbered {
    #[serde(default)]
    boot: u32,
    seq: u32,
    #[serde(default)]
    time_ms: u64,
}

/// A telemetry message's numbers. JSON is read for them alone, the rest skipped rather than
/// built and checked: at 100,000 messages a second the subscriber shares its core with every
/// publisher. Postcard has no fields to skip: the whole message is decoded.
fn numbered(payload: &[u8], encoding: Encoding) -> Option<Numbered> {
    match encoding {
        Encoding::Json => serde_json::from_slice(payload).ok(),
        Encoding::Postcard => decode::<Telemetry>(payload, encoding)
            .ok()
            .map(|t| Numbered {
                boot: t.boot,
                seq: t.seq,
                time_ms: t.time_ms,
            }),
    }
}

/// The subscriber: counts every telemetry message a bare broker delivers, by device and
/// sequence number, and its latency from the device's timestamp.
async fn subscriber(
    opts: MqttOptions,
    filter: String,
    qos: QoS,
    state: Arc<Mutex<SubState>>,
    ready: watch::Sender<bool>,
    close: CancellationToken,
) {
    let (client, mut events) = AsyncClient::new(opts, 16);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let event = tokio::select! {
            biased;
            _ = close.cancelled() => break,
            e = events.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = FIRST_BACKOFF;
                let _ = client.try_subscribe(filter.clone(), qos);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                ready.send_replace(true);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let arrived_us = now_us();
                let parsed = fleetgate_protocol::Topic::parse(&p.topic)
                    .ok()
                    .and_then(|t| Some((t.device, numbered(&p.payload, t.encoding)?)));
                let mut s = lock(&state);
                match parsed {
                    Some((device, t)) => {
                        if s.seq.observe(device, t.boot, t.seq) != crate::seq::Seen::Duplicate {
                            s.last_new = Some(Instant::now());
                        }
                        if t.time_ms > 0 {
                            let sent_us = t.time_ms.saturating_mul(1000);
                            stats::record_us(&mut s.e2e, arrived_us.saturating_sub(sent_us));
                        }
                    }
                    None => s.undecodable += 1,
                }
            }
            Ok(_) => {}
            Err(_) => {
                ready.send_replace(false);
                tokio::select! {
                    _ = close.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                _ => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests;
