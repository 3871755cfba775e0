//! Runs a simulated fleet: one rumqttc client per device, each with a polling task (which
//! answers commands and counts acknowledgements) and a sending task (hello, telemetry, alerts).
//! Publishing and polling are separate tasks because rumqttc deadlocks when a task awaits a
//! publish while it is the one that polls the event loop.
//!
//! A fleet is made of groups ([`Group`], a scenario's `[[group]]`): devices alike in hardware,
//! rates, data and faults. A spec without groups is one group made of its fleet-wide fields.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetgate_protocol::topic;
use fleetgate_protocol::{
    Channel, Command, Downlink, Encoding, HardwareProfile, Uplink, decode, encode,
};
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::behaviour::{Behaviour, DataShape, Effect, default_hardware};
use crate::enroll::Credential;
use crate::report::{Counters, Report};
use crate::updater::{DeviceProfile, UpdateEffect, Updater, UpdaterStats};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub host: String,
    pub port: u16,
    pub credentials: Vec<Credential>,
    /// Time between two telemetry messages of one device.
    pub interval: Duration,
    /// Telemetry messages per device; `None`: until `duration` ends or the fleet is stopped.
    pub messages: Option<u64>,
    /// Longest time devices send; `None`: until `messages` are sent or the fleet is stopped.
    pub duration: Option<Duration>,
    /// Every this many telemetry messages a device also sends an alert (0: never).
    pub alert_every: u64,
    pub encoding: Encoding,
    pub qos: QoS,
    /// New connections per second while the fleet starts.
    pub connect_rate: f64,
    /// After its last message, how long a device waits for outstanding acknowledgements.
    pub linger: Duration,
    pub keep_alive: Duration,
    pub shape: DataShape,
    pub seed: u64,
    /// Device `i` gets `profiles[i % len]` (trusted keys, faults); none: default profile.
    pub profiles: Vec<DeviceProfile>,
    /// The groups of the fleet, in the order of `credentials`: the first `groups[0].count`
    /// credentials are the first group's devices, and so on. Each group's interval, alerts,
    /// data, hardware and profile replace the fleet-wide `interval`, `alert_every`, `shape`
    /// and `profiles`; devices past the last group (or every device, with no groups) use those.
    pub groups: Vec<Group>,
}

/// Devices alike in hardware, rates, data and faults.
#[derive(Debug, Clone)]
pub struct Group {
    /// Device ids are `<prefix>-00000`, `<prefix>-00001`, ... (what enrollment uses).
    pub prefix: String,
    pub count: usize,
    /// Time between two telemetry messages of one device.
    pub interval: Duration,
    /// Every this many telemetry messages a device also sends an alert (0: never).
    pub alert_every: u64,
    pub shape: DataShape,
    /// The shift of `shape` (drift injection) starts this long after a device first connects;
    /// `None`: from its first message.
    pub shift_after: Option<Duration>,
    /// What the devices run on (their hello says so; update offers are checked against it).
    pub hardware: HardwareProfile,
    pub profile: DeviceProfile,
}

impl Group {
    /// A group of `count` devices with the defaults of [`FleetSpec::new`].
    pub fn new(prefix: &str, count: usize) -> Group {
        Group {
            prefix: prefix.to_owned(),
            count,
            interval: Duration::from_secs(1),
            alert_every: 0,
            shape: DataShape::default(),
            shift_after: None,
            hardware: default_hardware(),
            profile: DeviceProfile::default(),
        }
    }
}

impl FleetSpec {
    pub fn new(host: &str, port: u16, credentials: Vec<Credential>) -> FleetSpec {
        FleetSpec {
            host: host.to_owned(),
            port,
            credentials,
            interval: Duration::from_secs(1),
            messages: None,
            duration: None,
            alert_every: 0,
            encoding: Encoding::Postcard,
            qos: QoS::AtLeastOnce,
            connect_rate: 500.0,
            linger: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            shape: DataShape::default(),
            seed: 1,
            profiles: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// How device `index` (of `credentials`) is set up: its group's settings, or the
    /// fleet-wide ones.
    fn setup(&self, index: usize) -> Group {
        let mut first = 0;
        for g in &self.groups {
            if index < first + g.count {
                return g.clone();
            }
            first += g.count;
        }
        Group {
            prefix: String::new(),
            count: 1,
            interval: self.interval,
            alert_every: self.alert_every,
            shape: self.shape.clone(),
            shift_after: None,
            hardware: default_hardware(),
            profile: if self.profiles.is_empty() {
                DeviceProfile::default()
            } else {
                self.profiles[index % self.profiles.len()].clone()
            },
        }
    }
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    counters: Arc<Counters>,
    connected: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    devices: u64,
    started: Instant,
}

/// Runs a fleet until every device has sent its messages (or the duration is over), then
/// reports. Stop it early with `stop`.
pub async fn run(spec: FleetSpec, stop: CancellationToken) -> Report {
    let fleet = Fleet::start(spec, stop);
    fleet.finish().await
}

impl Fleet {
    pub fn start(spec: FleetSpec, stop: CancellationToken) -> Fleet {
        let counters = Arc::new(Counters::default());
        let connected = Arc::new(AtomicU64::new(0));
        let devices = spec.credentials.len() as u64;
        let spec = Arc::new(spec);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, cred) in spec.credentials.iter().cloned().enumerate() {
            let start_after = Duration::from_secs_f64(i as f64 / spec.connect_rate.max(0.001));
            // Whom the impersonation fault pretends to be: the next device of the fleet.
            let next = &spec.credentials[(i + 1) % spec.credentials.len()].id;
            let victim = if *next == cred.id {
                format!("{}-twin", cred.id)
            } else {
                next.clone()
            };
            let device = Device {
                spec: spec.clone(),
                setup: Arc::new(spec.setup(i)),
                victim,
                cred,
                index: i as u64,
                counters: counters.clone(),
                connected: connected.clone(),
                stop: stop.clone(),
            };
            tasks.spawn(async move {
                tokio::select! {
                    _ = device.stop.cancelled() => return,
                    _ = tokio::time::sleep(start_after) => {}
                }
                device.run().await;
            });
        }
        Fleet {
            counters,
            connected,
            stop,
            tasks,
            devices,
            started: Instant::now(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Devices with a live connection right now.
    pub fn connected_now(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    /// Waits until `n` devices are connected at once, at most `timeout`.
    pub async fn wait_connected(&self, n: u64, timeout: Duration) -> bool {
        let connected = self.connected.clone();
        self.counters
            .wait_until(timeout, move |_| connected.load(Ordering::Relaxed) >= n)
            .await
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits for every device to finish and reports.
    pub async fn finish(mut self) -> Report {
        while self.tasks.join_next().await.is_some() {}
        let ever_connected = self.counters.ever_connected.load(Ordering::Relaxed);
        Report::from_counters(
            self.devices,
            ever_connected,
            &self.counters,
            self.started.elapsed(),
        )
    }
}

struct Device {
    spec: Arc<FleetSpec>,
    setup: Arc<Group>,
    /// The device the impersonation fault publishes as.
    victim: String,
    cred: Credential,
    index: u64,
    counters: Arc<Counters>,
    connected: Arc<AtomicU64>,
    stop: CancellationToken,
}

/// What the polling and sending tasks of one device share.
struct Shared {
    behaviour: Mutex<Behaviour>,
    sent: AtomicU64,
    acked: AtomicU64,
    acks: Notify,
    up: Notify,
    online: std::sync::atomic::AtomicBool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn topic_for(id: &str, channel: Uplink, encoding: Encoding) -> String {
    topic::format(id, Channel::Up(channel), encoding)
}

/// What the malformed-payload fault sends as telemetry: neither postcard (an overlong varint)
/// nor JSON (not UTF-8).
const GARBAGE: [u8; 24] = [0xff; 24];

/// Drops the connection without a DISCONNECT, as a network failure or a crash does, and
/// returns how many QoS 1 publishes went with it. Those are what was in flight or still
/// queued: with a clean session the client would throw them away at the next CONNACK anyway,
/// so they are thrown away now, where they can be counted.
fn drop_link(events: &mut rumqttc::EventLoop) -> u64 {
    events.clean();
    let lost = events
        .pending
        .iter()
        .filter(|r| matches!(r, rumqttc::Request::Publish(p) if p.qos != QoS::AtMostOnce))
        .count() as u64;
    events.pending.clear();
    lost
}

impl Device {
    async fn run(self) {
        let spec = &self.spec;
        let id = self.cred.id.clone();
        let mut opts = MqttOptions::new(&id, &spec.host, spec.port);
        opts.set_credentials(&id, &self.cred.secret);
        opts.set_keep_alive(spec.keep_alive);
        opts.set_clean_session(true);
        opts.set_max_packet_size(1 << 20, 64 << 10);
        let (client, mut events) = AsyncClient::new(opts, 64);
        // A new boot number on every start, as after a power-on: a device that starts again
        // begins a new sequence rather than repeating the numbers of its last run.
        let boot: u32 = rand::random();
        let setup = self.setup.clone();
        let interval_ms = setup.interval.as_millis().min(u128::from(u32::MAX)) as u32;
        let mut shape = setup.shape.clone();
        if setup.shift_after.is_some() {
            // The shift starts later (the sender applies it).
            shape.shift.clear();
        }
        let mut behaviour = Behaviour::new(id.clone(), boot, interval_ms, shape);
        behaviour.hardware = setup.hardware.clone();
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acks: Notify::new(),
            up: Notify::new(),
            online: std::sync::atomic::AtomicBool::new(false),
        });
        let done_sending = CancellationToken::new();
        let sender = tokio::spawn(send(
            Sender {
                spec: self.spec.clone(),
                setup: setup.clone(),
                victim: self.victim.clone(),
                client: client.clone(),
                shared: shared.clone(),
                counters: self.counters.clone(),
                stop: self.stop.clone(),
                done: done_sending.clone(),
            },
            device_seed(spec.seed, &self.cred.id).wrapping_mul(31),
        ));

        let subscriptions = [Downlink::Command, Downlink::Chunk]
            .map(|d| topic::format(&id, Channel::Down(d), spec.encoding));
        let profile = setup.profile.clone();
        let flap = profile.faults.flap;
        let crash_after_update = profile.faults.crash_after_update;
        {
            let mut b = shared.behaviour.lock().await;
            b.claimed_class = profile.faults.claim_class.clone();
            if let Some(class) = &profile.class {
                b.hardware.class = class.clone();
            }
            b.regression = profile.regression.clone();
            if let Some(release) = profile.model_release
                && let Some(m) = b.models.first_mut()
            {
                m.release = release;
            }
        }
        let mut updater = Updater::new(profile);
        let mut stats = UpdaterStats::default();
        let mut backoff = Duration::from_millis(100);
        let mut restart: Option<UpdateEffect> = None;
        // A restart waits until everything sent is acknowledged, so the gateway has the
        // device's last reports before it drops the connection.
        let mut restart_pending = false;
        // The connection is ending because the device dropped it on purpose (a reboot or the
        // disconnect fault): the error that follows is not one.
        let mut planned_drop = false;
        let mut rng = rand::rngs::StdRng::seed_from_u64(device_seed(spec.seed, &self.cred.id));
        // When the flapping link drops next (while connected).
        let mut flap_at: Option<tokio::time::Instant> = None;
        // The link is down because of a flap or a crash (not an error).
        let mut down_by_fault = false;
        loop {
            let event = tokio::select! {
                biased;
                _ = done_sending.cancelled() => {
                    let _ = client.try_disconnect();
                    // Let the DISCONNECT go out, then stop polling.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        loop {
                            match events.poll().await {
                                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                                _ => {}
                            }
                        }
                    }).await;
                    break;
                }
                _ = sleep_until_some(flap_at) => {
                    flap_at = None;
                    let lost = drop_link(&mut events);
                    self.discard(&shared, lost);
                    self.go_offline(&shared);
                    down_by_fault = true;
                    self.counters.bump(&self.counters.flaps, 1);
                    let down = flap.map_or(Duration::ZERO, |f| f.down);
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = done_sending.cancelled() => break,
                        _ = tokio::time::sleep(down) => {}
                    }
                    continue;
                }
                e = events.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(100);
                    flap_at = flap.map(|f| tokio::time::Instant::now() + f.every);
                    if !shared.online.swap(true, Ordering::Relaxed) {
                        self.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    self.counters.bump(&self.counters.connects, 1);
                    self.counters.mark_connected(self.index);
                    restart = None;
                    // What the last connection had in flight is resent by the client or was
                    // lost with it; either way this connection starts with nothing to wait for
                    // (otherwise one lost message would hold every later restart forever).
                    // After a fault's drop the lost ones are already taken off, and what was
                    // sent while the link was down goes out now: wait for it.
                    if !std::mem::take(&mut down_by_fault) {
                        shared
                            .sent
                            .store(shared.acked.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                    // Subscribe before hello: the gateway sends offers once it has the hello.
                    for t in &subscriptions {
                        let _ = client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                    }
                    let hello = shared.behaviour.lock().await.hello();
                    if let Ok(payload) = encode(&hello, spec.encoding)
                        && client
                            .try_publish(
                                topic_for(&id, Uplink::Hello, spec.encoding),
                                spec.qos,
                                false,
                                payload,
                            )
                            .is_ok()
                    {
                        self.counters.bump(&self.counters.hello, 1);
                        count_sent(&shared, spec.qos);
                    }
                    if let Some(report) = updater.pending.take() {
                        self.send_report(&client, &shared, &id, &report);
                    }
                    shared.up.notify_waiters();
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    self.counters.bump(&self.counters.acked, 1);
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                    shared.acks.notify_waiters();
                    if restart_pending && shared.all_acked() {
                        restart_pending = false;
                        let _ = client.try_disconnect();
                    }
                }
                // A device going down (reboot, or the disconnect fault) handles nothing more:
                // what it would send now could be lost with the connection.
                Ok(Event::Incoming(Packet::Publish(_))) if restart.is_some() => {}
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let installed = updater.stats.installed;
                    let effect = self
                        .on_publish(&p, &client, &shared, &id, &mut updater)
                        .await;
                    self.sync_stats(&mut stats, updater.stats);
                    if let Some(after) = crash_after_update
                        && effect == UpdateEffect::Reboot
                        && updater.stats.installed > installed
                    {
                        // The crash takes the last reports with it; the new image reports the
                        // install after its hello.
                        let lost = drop_link(&mut events);
                        self.discard(&shared, lost);
                        self.counters.bump(&self.counters.crashes, 1);
                        self.go_offline(&shared);
                        down_by_fault = true;
                        flap_at = None;
                        shared.behaviour.lock().await.reboot();
                        tokio::select! {
                            _ = self.stop.cancelled() => break,
                            _ = done_sending.cancelled() => break,
                            _ = tokio::time::sleep(after) => {}
                        }
                        continue;
                    }
                    if effect != UpdateEffect::None {
                        restart = Some(effect);
                        if shared.all_acked() {
                            let _ = client.try_disconnect();
                        } else {
                            restart_pending = true;
                        }
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) if restart.is_some() => {
                    planned_drop = true;
                    if shared.online.swap(false, Ordering::Relaxed) {
                        self.connected.fetch_sub(1, Ordering::Relaxed);
                    }
                    if restart == Some(UpdateEffect::Reboot) {
                        shared.behaviour.lock().await.reboot();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(_) => {}
                Err(e) => {
                    self.go_offline(&shared);
                    // The client lost what it had in flight with this error: the next
                    // CONNACK starts afresh.
                    down_by_fault = false;
                    if !std::mem::take(&mut planned_drop) {
                        self.counters.bump(&self.counters.errors, 1);
                    }
                    if matches!(e, rumqttc::ConnectionError::ConnectionRefused(_)) {
                        self.counters.bump(&self.counters.connect_errors, 1);
                    }
                    if self.stop.is_cancelled() {
                        break;
                    }
                    // Jittered exponential backoff, so a gateway restart is not met by a
                    // synchronized reconnect storm.
                    let jitter = rng.random_range(0.5..1.5);
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        sender.abort();
        if down_by_fault {
            // The run ended while the fault kept the link down: what was sent meanwhile never
            // left the device.
            let lost = drop_link(&mut events);
            self.discard(&shared, lost);
        }
        self.go_offline(&shared);
    }
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Device {
    /// Counts `lost` QoS 1 publishes that a fault threw away: nothing waits for their
    /// acknowledgement any more.
    fn discard(&self, shared: &Shared, lost: u64) {
        self.counters.bump(&self.counters.discarded, lost);
        let _ = shared
            .sent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sent| {
                Some(sent.saturating_sub(lost))
            });
        shared.acks.notify_waiters();
    }

    fn go_offline(&self, shared: &Shared) {
        if shared.online.swap(false, Ordering::Relaxed) {
            self.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Handles a message from the gateway: a command, an update offer, a rollback directive or
    /// a chunk.
    async fn on_publish(
        &self,
        p: &rumqttc::Publish,
        client: &AsyncClient,
        shared: &Shared,
        id: &str,
        updater: &mut Updater,
    ) -> UpdateEffect {
        let Ok(parsed) = fleetgate_protocol::Topic::parse(&p.topic) else {
            self.counters.bump(&self.counters.errors, 1);
            return UpdateEffect::None;
        };
        let encoding = parsed.encoding;
        match parsed.channel {
            Channel::Down(Downlink::Chunk) => {
                let Ok(chunk) = decode::<fleetgate_protocol::Chunk>(&p.payload, encoding) else {
                    self.counters.bump(&self.counters.errors, 1);
                    return UpdateEffect::None;
                };
                let (reports, effect) = {
                    let mut b = shared.behaviour.lock().await;
                    updater.chunk(&mut b, &chunk)
                };
                for r in &reports {
                    self.send_report(client, shared, id, r);
                }
                effect
            }
            _ => {
                self.counters.bump(&self.counters.commands, 1);
                let Ok(cmd) = decode::<Command>(&p.payload, encoding) else {
                    self.counters.bump(&self.counters.errors, 1);
                    return UpdateEffect::None;
                };
                if let fleetgate_protocol::Action::Update(offer) = &cmd.action {
                    let report = updater.offer(&*shared.behaviour.lock().await, offer, now_ms());
                    self.send_report(client, shared, id, &report);
                    return UpdateEffect::None;
                }
                if let fleetgate_protocol::Action::Validate(offer) = &cmd.action {
                    let report = updater.validate(&*shared.behaviour.lock().await, offer, now_ms());
                    self.send_report(client, shared, id, &report);
                    return UpdateEffect::None;
                }
                if let fleetgate_protocol::Action::Rollback(directive) = &cmd.action {
                    let now = now_ms();
                    self.counters.rollback_received(now);
                    let outcome = {
                        let mut b = shared.behaviour.lock().await;
                        updater.rollback(&mut b, cmd.id, directive, now)
                    };
                    match outcome.refused {
                        None => self.counters.bump(&self.counters.rollbacks_done, 1),
                        Some(code) => self.counters.rollback_rejected(code),
                    }
                    // The ack goes out before the reboot: a restart waits until it is acked.
                    self.send_ack(client, shared, id, &outcome.ack);
                    return outcome.effect;
                }
                let (ack, effect) = shared.behaviour.lock().await.command(&cmd);
                if let Some(ack) = ack {
                    self.send_ack(client, shared, id, &ack);
                }
                if effect == Effect::Reboot {
                    UpdateEffect::Reboot
                } else {
                    UpdateEffect::None
                }
            }
        }
    }

    fn send_ack(
        &self,
        client: &AsyncClient,
        shared: &Shared,
        id: &str,
        ack: &fleetgate_protocol::CommandAck,
    ) {
        if let Ok(payload) = encode(ack, self.spec.encoding)
            && client
                .try_publish(
                    topic_for(id, Uplink::Ack, self.spec.encoding),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .is_ok()
        {
            self.counters.bump(&self.counters.command_acks, 1);
            count_sent(shared, QoS::AtLeastOnce);
        }
    }

    fn send_report(
        &self,
        client: &AsyncClient,
        shared: &Shared,
        id: &str,
        report: &fleetgate_protocol::UpdateReport,
    ) {
        if let Ok(payload) = encode(report, self.spec.encoding)
            && client
                .try_publish(
                    topic_for(id, Uplink::Report, self.spec.encoding),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .is_ok()
        {
            self.counters.bump(&self.counters.update_reports, 1);
            count_sent(shared, QoS::AtLeastOnce);
        }
    }

    /// Adds what the update client counted since the last call to the fleet's counters.
    fn sync_stats(&self, last: &mut UpdaterStats, now: UpdaterStats) {
        let c = &self.counters;
        for (counter, before, after) in [
            (&c.chunks_stored, last.chunks_stored, now.chunks_stored),
            (
                &c.chunks_duplicate,
                last.chunks_duplicate,
                now.chunks_duplicate,
            ),
            (&c.updates_installed, last.installed, now.installed),
            (&c.updates_rejected, last.rejected, now.rejected),
            (&c.updates_failed, last.failed, now.failed),
        ] {
            if after > before {
                c.bump(counter, after - before);
            }
        }
        *last = now;
    }
}

impl Shared {
    fn all_acked(&self) -> bool {
        self.acked.load(Ordering::Relaxed) >= self.sent.load(Ordering::Relaxed)
    }
}

fn count_sent(shared: &Shared, qos: QoS) {
    if qos != QoS::AtMostOnce {
        shared.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// A device's random seed: the run's seed mixed with the device id (FNV-1a), so that two fleets
/// run side by side with the same seed never draw the same numbers.
fn device_seed(seed: u64, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What the sending task of one device works with.
struct Sender {
    spec: Arc<FleetSpec>,
    setup: Arc<Group>,
    victim: String,
    client: AsyncClient,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    /// Cancelled when the device is done sending (the poller then disconnects).
    done: CancellationToken,
}

/// The sending task: telemetry (and alerts) on the device's interval, with the group's
/// faults, then waits for the acknowledgements and tells the polling task to disconnect.
async fn send(s: Sender, seed: u64) {
    let Sender {
        spec,
        setup,
        victim,
        client,
        shared,
        counters,
        stop,
        done,
    } = s;
    // Wait for the first CONNACK.
    loop {
        let up = shared.up.notified();
        if shared.online.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => return done.cancel(),
            _ = up => {}
        }
    }
    let faults = &setup.profile.faults;
    let every = |n: Option<u64>, slot: u64| n.is_some_and(|n| slot.is_multiple_of(n));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let deadline = spec.duration.map(|d| tokio::time::Instant::now() + d);
    let mut shift_at = setup.shift_after.map(|d| tokio::time::Instant::now() + d);
    // Spread devices over the interval so a fleet does not publish in lockstep.
    let phase = setup.interval.mul_f64(rng.random_range(0.0..1.0));
    let mut next = tokio::time::Instant::now() + phase;
    let id = shared.behaviour.lock().await.id.clone();
    let mut sent = 0u64;
    'sending: while spec.messages.is_none_or(|m| sent < m) {
        // Stay connected until the run ends even when the next message would come after it.
        if let Some(d) = deadline
            && d < next
        {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep_until(d) => {}
            }
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
        let slot = sent + 1;
        // The malformed message takes the place of a telemetry message, and no number.
        let malformed = every(faults.malformed_every, slot);
        let (telemetry, alerts, interval_ms) = {
            let mut b = shared.behaviour.lock().await;
            if shift_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
                shift_at = None;
                b.shape.shift = setup.shape.shift.clone();
            }
            let t = (!malformed).then(|| b.telemetry(&mut rng, now_ms()));
            let mut alerts = Vec::new();
            if setup.alert_every > 0 && slot.is_multiple_of(setup.alert_every) {
                alerts.push(b.alert(&mut rng, now_ms()));
            }
            // A regressed version alerts on its own cadence, on top of the fleet's.
            if b.take_regression_alert() {
                alerts.push(b.alert(&mut rng, now_ms()));
            }
            (t, alerts, b.interval_ms)
        };
        let publish = |device: &str, channel, payload: Vec<u8>| {
            client.publish(
                topic_for(device, channel, spec.encoding),
                spec.qos,
                false,
                payload,
            )
        };
        // A slow link: every publish waits (the timestamps inside were taken before).
        let slow = || async {
            if let Some(d) = faults.slow_link {
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(d) => {}
                }
            }
            true
        };
        let payload = match &telemetry {
            Some(t) => match encode(t, spec.encoding) {
                Ok(p) => p,
                Err(_) => break,
            },
            None => GARBAGE.to_vec(),
        };
        if !slow().await
            || publish(&id, Uplink::Telemetry, payload.clone())
                .await
                .is_err()
        {
            break;
        }
        let counter = if telemetry.is_some() {
            &counters.telemetry
        } else {
            &counters.malformed
        };
        counters.bump(counter, 1);
        count_sent(&shared, spec.qos);
        if telemetry.is_some() && every(faults.impersonate_every, slot) {
            if publish(&victim, Uplink::Telemetry, payload).await.is_err() {
                break;
            }
            counters.bump(&counters.impersonated, 1);
            count_sent(&shared, spec.qos);
        }
        for alert in alerts {
            if !slow().await {
                break 'sending;
            }
            if let Ok(payload) = encode(&alert, spec.encoding)
                && publish(&id, Uplink::Alert, payload).await.is_ok()
            {
                counters.bump(&counters.alerts, 1);
                count_sent(&shared, spec.qos);
            }
        }
        sent += 1;
        next += Duration::from_millis(u64::from(interval_ms));
    }
    // With no message limit and no duration, a device runs until the fleet is stopped.
    if spec.messages.is_none() && spec.duration.is_none() {
        stop.cancelled().await;
    }
    // Wait (bounded) until every QoS 1 message is acknowledged.
    let linger_end = tokio::time::Instant::now() + spec.linger;
    loop {
        let acked = shared.acks.notified();
        if shared.acked.load(Ordering::Relaxed) >= shared.sent.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            _ = acked => {}
            _ = tokio::time::sleep_until(linger_end) => break,
        }
    }
    done.cancel();
}
