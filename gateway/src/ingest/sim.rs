//! Deterministic simulation of the writer with its engines and storage, without sockets.
//!
//! One seeded RNG drives everything: a fleet of simulated devices (the simulator's own device
//! and update client, `fleetgate_sim`), what they send and when, connections that come and go,
//! stale and repeated events (a hello of an ended connection, download reports sent again after
//! a reconnect), a rollout of a release that regresses or not, time, restarts of the writer from
//! storage at any step (everything queued and not yet committed is lost, as in a crash), and
//! commits that fail. The clock is simulated; the database is in memory and outlives the
//! writer's restarts, standing for the disk.
//!
//! After every step the invariants are checked:
//! - the engines' indexes match a count from scratch;
//! - every command that left the writer is committed, and leaves once;
//! - no stage passed a gate without `min_samples` in both cohorts (or `no_control` while a
//!   device of a later stage was still to update);
//! - a device is online in storage exactly when the writer holds its connection.
//!
//! At the end, with every device back and time run on (until the rollout ends, then past every
//! timer), the rollout has the outcome the release deserves (rolled back when it regresses,
//! completed when not, whatever the restarts and failures), every device runs exactly one of
//! the two versions, as its rollout state says, and no transfer is stuck.
//!
//! A failing seed is printed and replays exactly: `FLEETGATE_SIM_SEED=<seed> cargo nextest run
//! -p fleetgate ingest::sim`. `FLEETGATE_SIM_SEEDS=<n>` (and `FLEETGATE_SIM_FIRST`) run more;
//! `scripts/sim.sh` runs as many as you like.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use fleetgate_config::{Config, StageSize};
use fleetgate_protocol::{
    Action, ArtifactKind, Command, Encoding, Hello, Installed, Telemetry, UpdateReport, Uplink,
    decode, encode,
};
use fleetgate_sim::behaviour::{Behaviour, DataShape, Regression};
use fleetgate_sim::updater::{DeviceProfile, Trust, UpdateEffect, Updater};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::testing::{self, RecordingLinks};
use super::{Control, ControlError, Item, RolloutRequest, Writer};
use crate::auth::Credentials;
use crate::bus::{DownlinkTx, Downlinked, PresenceEvent, Receipts, UplinkMsg, WriterMsg};
use crate::metrics::Metrics;
use crate::rollouts::model::{Gate, RolloutState, Target, Verdict};
use crate::storage::Store;

const MODEL: &str = "sim-model";

/// How long time runs on after a rollout ended: past the longest timer of the runs' policy
/// (`gates.wait`).
const RUN_ON: Duration = Duration::from_secs(900);

/// What one seed's run looks like.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chaos {
    /// Restarts of the writer from storage (at random steps).
    pub restarts: bool,
    /// Commits that fail (at random steps).
    pub failures: bool,
    /// Hellos of ended connections and download reports sent twice.
    pub stale: bool,
}

impl Chaos {
    pub const ALL: Chaos = Chaos {
        restarts: true,
        failures: true,
        stale: true,
    };
    pub const NONE: Chaos = Chaos {
        restarts: false,
        failures: false,
        stale: false,
    };
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ending {
    pub state: &'static str,
    pub regressed: bool,
    /// Whether a gate ever compared updated devices with a control (a rollout whose every
    /// stage had none, such as a fleet all in its canary, cannot tell a regression).
    pub judged: bool,
    /// The rollout's audit log (event: message), to tell what happened when it is not what
    /// was expected.
    pub audit: Vec<String>,
}

struct SimDevice {
    id: String,
    behaviour: Behaviour,
    updater: Updater,
    session: Option<u64>,
    /// Messages of this session not yet committed: sent again after a reconnect if their
    /// batch failed (as a device's MQTT client does with what was not acknowledged).
    unacked: Vec<(Uplink, Vec<u8>)>,
    receipts: Arc<Receipts>,
    sent: u64,
}

pub(super) struct Sim {
    seed: u64,
    rng: StdRng,
    chaos: Chaos,
    _dir: tempfile::TempDir,
    config: Config,
    store: Store,
    writer: Option<Writer>,
    links: Arc<RecordingLinks>,
    downlink: flume::Receiver<Downlinked>,
    clock_us: u64,
    devices: Vec<SimDevice>,
    next_session: u64,
    /// The writer's queue: what sessions sent and the writer has not taken yet.
    queue: VecDeque<(Option<usize>, WriterMsg)>,
    rollout: Option<u64>,
    regresses: bool,
    /// Commands delivered to devices, to check that each leaves once.
    delivered: HashSet<u64>,
    /// Audit entries already checked, and the devices the current stage installed.
    audited: u64,
    installed_here: u64,
    judged: bool,
    step: u64,
}

impl Sim {
    pub fn new(seed: u64, chaos: Chaos) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.storage.data_dir = dir.path().to_owned();
        config.updates.window = 4;
        config.updates.stall_timeout = Duration::from_secs(5);
        config.updates.retries = 50;
        config.ingest.batch = 64;
        config.drift.cohort_label = None;
        let p = &mut config.rollouts.policy;
        p.stages.truncate(2);
        p.stages[0].size = StageSize::Count(3);
        p.stages[1].size = StageSize::Percent(100.0);
        for s in &mut p.stages {
            s.bake = Duration::from_secs(4);
            s.min_reporting = 3;
            s.device_timeout = Duration::from_secs(120);
            s.retries = 50;
        }
        p.gates.window = Duration::from_secs(4);
        p.gates.confirm = Duration::from_secs(1);
        p.gates.wait = Duration::from_secs(600);
        p.gates.min_samples = 8;
        p.gates.min_devices = 2;
        p.gates.drift = false;
        // The runs judge the engine, not the statistics: windows of a few seconds hold tens of
        // predictions, so the class-mix and confidence gates get floors far above their
        // sampling noise (with 0.05, 1 seed in about 4,000 failed a release that does not
        // regress on the confidence of 40 samples from 2 devices).
        p.gates.prediction_js = 0.4;
        p.gates.confidence_drop = 0.3;
        let store = Store::in_memory().unwrap();
        let clock_us = 1_700_000_000_000_000;
        crate::clock::set_thread_clock(Some(clock_us));
        let registry =
            crate::registry::Registry::new(store.clone(), dir.path(), &testing::registry_config());
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 31 % 251) as u8).collect();
        let bundle =
            testing::model_bundle(MODEL, "2.0.0", 2, &["sim-mcu"], data, 256, clock_us / 1000);
        registry.register(&bundle, clock_us / 1000, "sim").unwrap();
        let regresses = rng.random_bool(0.5);
        let n = rng.random_range(6..14);
        let trust = Trust {
            keys: vec![testing::release_key().verifying_key().to_bytes()],
            threshold: 1,
            rollback_keys: vec![rollback_key().verifying_key().to_bytes()],
        };
        let devices = (0..n)
            .map(|i| {
                let id = format!("s{i:02}");
                let mut behaviour = Behaviour::new(id.clone(), 1, 1000, DataShape::default());
                if regresses {
                    let mut r = Regression::new(MODEL, "2.0.0".parse().unwrap());
                    r.latency_factor = 3.0;
                    behaviour.regression = Some(r);
                }
                let updater = Updater::new(DeviceProfile {
                    trust: trust.clone(),
                    ..DeviceProfile::default()
                });
                SimDevice {
                    id,
                    behaviour,
                    updater,
                    session: None,
                    unacked: Vec::new(),
                    receipts: Arc::new(Receipts::default()),
                    sent: 0,
                }
            })
            .collect();
        let (downlink_tx, downlink) = DownlinkTx::bounded(100_000);
        let links = Arc::new(RecordingLinks::default());
        let mut sim = Sim {
            seed,
            rng,
            chaos,
            _dir: dir,
            config,
            store,
            writer: None,
            links,
            downlink,
            clock_us,
            devices,
            next_session: 1,
            queue: VecDeque::new(),
            rollout: None,
            regresses,
            delivered: HashSet::new(),
            audited: 0,
            installed_here: 0,
            judged: false,
            step: 0,
        };
        sim.writer = Some(sim.new_writer(downlink_tx));
        let ids: Vec<String> = sim.devices.iter().map(|d| d.id.clone()).collect();
        for id in ids {
            sim.control(|reply| Control::Enroll {
                id,
                labels: BTreeMap::new(),
                reply,
            })
            .unwrap();
        }
        sim
    }

    fn new_writer(&self, downlink: DownlinkTx) -> Writer {
        let mut w = Writer::new(
            self.store.clone(),
            &self.config,
            Arc::new(Credentials::default()),
            self.links.clone(),
            downlink,
            Arc::new(Metrics::new(Duration::from_secs(3600))),
        )
        .unwrap_or_else(|e| panic!("seed {}: writer restarts: {e}", self.seed));
        w.set_rollback_key(rollback_key());
        w
    }

    fn writer(&mut self) -> &mut Writer {
        self.writer.as_mut().expect("a writer")
    }

    fn now_ms(&self) -> u64 {
        self.clock_us / 1000
    }

    /// Runs an operator request in a batch of its own and returns the answer.
    fn control<T: Send + 'static>(
        &mut self,
        make: impl FnOnce(super::control::Reply<T>) -> Control,
    ) -> Result<T, ControlError> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let fx = self
            .writer()
            .apply_batch(vec![Item::Control(make(tx))])
            .unwrap();
        self.writer().finish_batch(fx);
        self.after_commit();
        rx.try_recv().expect("answered")
    }

    /// Queues a message of device `i`'s current connection (nothing if it has none).
    fn send(&mut self, i: usize, channel: Uplink, payload: Vec<u8>) {
        let Some(session) = self.devices[i].session else {
            return;
        };
        let d = &mut self.devices[i];
        d.sent += 1;
        d.unacked.push((channel, payload.clone()));
        let msg = UplinkMsg {
            device: d.id.clone(),
            session,
            channel,
            encoding: Encoding::Postcard,
            payload: payload.into(),
            telemetry: None,
            received_us: self.clock_us,
            receipt: Some((d.receipts.clone(), d.sent)),
            room: None,
            rejected: 0,
        };
        self.queue.push_back((Some(i), WriterMsg::Uplink(msg)));
    }

    fn presence(&mut self, i: usize, session: u64, online: bool) {
        let event = PresenceEvent {
            device: self.devices[i].id.clone(),
            session,
            online,
            at_ms: self.now_ms(),
            protocol: 5,
            peer: "sim".into(),
            reason: (!online).then_some("sim"),
        };
        self.queue.push_back((None, WriterMsg::Presence(event)));
    }

    fn hello_of(&self, i: usize) -> Hello {
        self.devices[i].behaviour.hello()
    }

    /// A device connects: online, its hello, then what its last connection did not get
    /// acknowledged, then a report it owes from before a reboot.
    fn connect(&mut self, i: usize) {
        if self.devices[i].session.is_some() {
            return;
        }
        let session = self.next_session;
        self.next_session += 1;
        self.devices[i].session = Some(session);
        self.devices[i].receipts = Arc::new(Receipts::default());
        self.devices[i].sent = 0;
        self.presence(i, session, true);
        let hello = encode(&self.hello_of(i), Encoding::Postcard).unwrap();
        let again = std::mem::take(&mut self.devices[i].unacked);
        self.send(i, Uplink::Hello, hello);
        for (channel, payload) in again {
            if channel != Uplink::Hello {
                self.send(i, channel, payload);
            }
        }
        if let Some(report) = self.devices[i].updater.pending.take() {
            self.send_report(i, &report);
        }
    }

    fn disconnect(&mut self, i: usize) {
        if let Some(session) = self.devices[i].session.take() {
            self.presence(i, session, false);
            // A stale hello of the ended connection, delivered late.
            if self.chaos.stale && self.rng.random_bool(0.1) {
                let hello = encode(&self.hello_of(i), Encoding::Postcard).unwrap();
                self.devices[i].session = Some(session);
                self.send(i, Uplink::Hello, hello);
                self.devices[i].session = None;
            }
        }
    }

    fn send_report(&mut self, i: usize, report: &UpdateReport) {
        let payload = encode(report, Encoding::Postcard).unwrap();
        self.send(i, Uplink::Report, payload.clone());
        if self.chaos.stale && self.rng.random_bool(0.05) {
            self.send(i, Uplink::Report, payload);
        }
    }

    fn telemetry(&mut self, i: usize) {
        if self.devices[i].session.is_none() {
            return;
        }
        let now = self.now_ms();
        let t: Telemetry = self.devices[i].behaviour.telemetry(&mut self.rng, now);
        let payload = encode(&t, Encoding::Postcard).unwrap();
        self.send(i, Uplink::Telemetry, payload);
    }

    /// The writer takes part of its queue and commits it (or fails to).
    fn write(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let n = self.rng.random_range(1..=self.queue.len().min(40));
        let batch: Vec<(Option<usize>, WriterMsg)> = self.queue.drain(..n).collect();
        let failing = self.chaos.failures && self.rng.random_bool(0.05);
        if failing {
            self.store.fail_next_commits(1);
        }
        let items = batch.into_iter().map(|(_, m)| Item::Msg(m)).collect();
        let fx = self
            .writer()
            .apply_batch(items)
            .unwrap_or_else(|e| panic!("seed {}: the writer cannot go on: {e}", self.seed));
        self.writer().finish_batch(fx);
        self.store.fail_next_commits(0);
        self.after_commit();
    }

    /// What sessions do with the writer's answers: drop what is committed from what they
    /// would send again; a session whose batch failed disconnects (its device comes back).
    fn after_commit(&mut self) {
        for i in 0..self.devices.len() {
            let d = &mut self.devices[i];
            if d.receipts.is_failed() {
                self.disconnect(i);
                continue;
            }
            let upto = d.receipts.upto();
            let sent = d.sent;
            let keep = (sent - upto.min(sent)) as usize;
            let len = d.unacked.len();
            d.unacked.drain(..len.saturating_sub(keep));
        }
    }

    /// Devices get what the writer sent them (commands through the broker, chunks straight to
    /// the session) if they are connected, and answer.
    fn deliver(&mut self) {
        let commands: Vec<Downlinked> = self.downlink.try_iter().collect();
        let chunks = self.links.take();
        for d in commands {
            let cmd: Command = decode(&d.payload, d.encoding).unwrap();
            self.check_committed(&cmd);
            let Some(i) = self.devices.iter().position(|x| x.id == d.device) else {
                continue;
            };
            if self.devices[i].session.is_none() {
                continue;
            }
            self.command(i, &cmd);
        }
        for (device, direct) in chunks {
            let Some(i) = self.devices.iter().position(|x| x.id == device) else {
                continue;
            };
            if self.devices[i].session.is_none() {
                continue;
            }
            let chunk: fleetgate_protocol::Chunk =
                decode(&direct.payload, direct.encoding).unwrap();
            let d = &mut self.devices[i];
            let (reports, effect) = d.updater.chunk(&mut d.behaviour, &chunk);
            for r in &reports {
                self.send_report(i, r);
            }
            if effect == UpdateEffect::Reboot {
                self.reboot(i);
            }
        }
    }

    fn command(&mut self, i: usize, cmd: &Command) {
        let now = self.now_ms();
        match &cmd.action {
            Action::Update(offer) => {
                let d = &mut self.devices[i];
                let report = d.updater.offer(&d.behaviour, offer, now);
                self.send_report(i, &report);
            }
            Action::Rollback(directive) => {
                let d = &mut self.devices[i];
                let outcome = d.updater.rollback(&mut d.behaviour, cmd.id, directive, now);
                let payload = encode(&outcome.ack, Encoding::Postcard).unwrap();
                self.send(i, Uplink::Ack, payload);
                if outcome.effect == UpdateEffect::Reboot {
                    self.reboot(i);
                }
            }
            _ => {
                let (ack, _) = self.devices[i].behaviour.command(cmd);
                if let Some(ack) = ack {
                    let payload = encode(&ack, Encoding::Postcard).unwrap();
                    self.send(i, Uplink::Ack, payload);
                }
            }
        }
    }

    fn reboot(&mut self, i: usize) {
        self.disconnect(i);
        self.devices[i].behaviour.reboot();
    }

    /// A random step of time (see [`Sim::advance`]).
    fn tick(&mut self) {
        let ms = self.rng.random_range(100..1200);
        self.advance(ms);
    }

    /// `ms` milliseconds pass: devices send telemetry now and then, and the writer's timers
    /// run.
    fn advance(&mut self, ms: u64) {
        let before = self.now_ms() / 1000;
        self.clock_us += ms * 1000;
        crate::clock::set_thread_clock(Some(self.clock_us));
        for i in 0..self.devices.len() {
            if self.rng.random_bool(0.8) {
                self.telemetry(i);
            }
        }
        if self.now_ms() / 1000 > before {
            self.writer()
                .tick()
                .unwrap_or_else(|e| panic!("seed {}: the writer cannot go on: {e}", self.seed));
            self.after_commit();
        }
    }

    /// The writer dies (what it had not committed is lost with its queue and every session)
    /// and starts again from storage.
    fn restart(&mut self) {
        self.writer = None;
        self.queue.clear();
        for d in &mut self.devices {
            d.session = None;
        }
        let (tx, rx) = DownlinkTx::bounded(100_000);
        // Whatever had not left yet leaves with the dead process.
        self.downlink = rx;
        self.links.take();
        self.writer = Some(self.new_writer(tx));
    }

    fn create_rollout(&mut self) {
        let request = RolloutRequest {
            kind: ArtifactKind::Model,
            name: MODEL.into(),
            version: "2.0.0".into(),
            target: Target::All,
            policy: self.config.rollouts.policy.clone(),
            validate: None,
        };
        match self.control(|reply| Control::CreateRollout {
            request: Box::new(request),
            by: "sim".into(),
            reply,
        }) {
            Ok(created) => self.rollout = Some(created.record.id),
            // Every device still to say hello: the operator tries again later.
            Err(ControlError::BadRequest(_)) => {}
            Err(e) => panic!("seed {}: creating the rollout: {e}", self.seed),
        }
    }

    /// One random step.
    pub fn step(&mut self) {
        self.step += 1;
        let n = self.devices.len();
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=19 => self.write(),
            20..=39 => self.deliver(),
            40..=69 => self.tick(),
            70..=79 => {
                let i = self.rng.random_range(0..n);
                self.connect(i);
            }
            80..=84 => {
                let i = self.rng.random_range(0..n);
                self.disconnect(i);
            }
            85..=87 if self.chaos.restarts && self.rng.random_bool(0.1) => self.restart(),
            _ => {
                if self.rollout.is_none() && self.step > 30 {
                    self.create_rollout();
                }
            }
        }
        self.check();
    }

    /// The invariants that hold after every step.
    fn check(&mut self) {
        let seed = self.seed;
        let w = self.writer.as_ref().expect("a writer");
        w.updates.check_indexes();
        w.rollouts.check();
        if let Some(id) = self.rollout {
            let min = self.config.rollouts.policy.gates.min_samples;
            let audit = self.store.rollout_audit(id, self.audited, 1000).unwrap();
            for (n, e) in audit {
                self.audited = n + 1;
                if e.event == "gate_failed" {
                    self.judged = true;
                }
                if e.event == "stage_installed" {
                    let detail: serde_json::Value = serde_json::from_str(&e.detail).unwrap();
                    self.installed_here = detail["installed"].as_u64().unwrap_or(0);
                }
                // A stage in which nobody installed anything has nothing to judge.
                if e.event != "stage_passed" || self.installed_here == 0 {
                    continue;
                }
                let gates: Vec<crate::rollouts::model::GateEval> =
                    serde_json::from_str(&e.detail).unwrap();
                for g in gates {
                    match g.verdict {
                        Verdict::Pass => {
                            self.judged = true;
                            assert!(
                                g.updated_n >= min && g.control_n >= min,
                                "seed {seed} step {}: gate {} passed on {} and {} samples",
                                self.step,
                                g.gate.name(),
                                g.updated_n,
                                g.control_n
                            );
                            // The regression triples inference latency on every updated device.
                            assert!(
                                !(self.regresses && g.gate == Gate::LatencyP95),
                                "seed {seed} step {}: a regressing release passed the latency gate",
                                self.step
                            );
                        }
                        Verdict::NoControl | Verdict::Off => {}
                        other => panic!(
                            "seed {seed} step {}: stage passed with gate {} {other:?}",
                            self.step,
                            g.gate.name()
                        ),
                    }
                }
            }
        }
    }

    /// Every command that leaves the writer is one it committed (an offer: its transfer;
    /// bin edges are not recorded), and leaves once.
    fn check_committed(&mut self, cmd: &Command) {
        let committed = match &cmd.action {
            Action::Update(offer) => self
                .store
                .transfer(offer.transfer)
                .unwrap()
                .is_some_and(|t| t.offers > 0),
            Action::DriftBins(_) => true,
            _ => self.store.command(cmd.id).unwrap().is_some(),
        };
        assert!(
            committed,
            "seed {}: command {} ({:?}) left before its commit",
            self.seed, cmd.id, cmd.action
        );
        assert!(
            self.delivered.insert(cmd.id),
            "seed {}: command {} left twice",
            self.seed,
            cmd.id
        );
    }

    /// Every device back, the queue drained, time run on until the rollout ends and settles;
    /// then the final invariants.
    pub fn settle(&mut self) -> Ending {
        let seed = self.seed;
        for _ in 0..1500 {
            for i in 0..self.devices.len() {
                self.connect(i);
            }
            if self.rollout.is_none() {
                self.create_rollout();
            }
            while !self.queue.is_empty() {
                self.write();
            }
            self.deliver();
            self.check();
            // Checked before time runs on: a tick queues telemetry, so after it the queue is
            // never empty.
            let connected = self.devices.iter().all(|d| d.session.is_some());
            if self.rollout_state().is_some_and(|s| !s.is_active())
                && self.quiet()
                && connected
                && self.queue.is_empty()
            {
                break;
            }
            self.tick();
            // An operator resumes a rollout the gateway paused (gates that could not judge).
            if let Some(RolloutState::Paused { .. }) = self.rollout_state() {
                let id = self.rollout.unwrap();
                let _ = self.control(|reply| Control::Rollout {
                    id,
                    action: crate::rollouts::OperatorAction::Resume,
                    by: "sim".into(),
                    reason: None,
                    reply,
                });
            }
        }
        // Time runs on past every timer (gate waits, device and stall timeouts): a rollout that
        // ended stays as it ended, and nothing starts moving again.
        let ended = self.rollout_state();
        self.advance(RUN_ON.as_millis() as u64);
        while !self.queue.is_empty() {
            self.write();
        }
        self.deliver();
        self.check();
        assert_eq!(
            self.rollout_state(),
            ended,
            "seed {seed}: the rollout moved after it ended: {:#?}",
            self.audit_log()
        );
        let state = self.rollout_state().expect("a rollout");
        let devices: Vec<String> = self
            .store
            .rollout_devices(self.rollout.unwrap())
            .unwrap()
            .iter()
            .map(|d| {
                format!(
                    "{} stage {} {:?} transfer {:?}",
                    d.device, d.stage, d.state, d.transfer
                )
            })
            .collect();
        let open: Vec<String> = self
            .store
            .transfers(None, 1000)
            .unwrap()
            .iter()
            .filter(|t| !t.state.is_final())
            .map(|t| format!("{} {} {}", t.id, t.device, t.state.name()))
            .collect();
        assert!(
            !state.is_active() && self.quiet(),
            "seed {seed}: not settled: {state:?}\ndevices {devices:#?}\nopen transfers {open:?}\n{:#?}",
            self.audit_log()
        );
        // Every device runs exactly one of the two versions, as its rollout state says.
        let id = self.rollout.unwrap();
        let log: Vec<String> = self
            .store
            .rollout_audit(id, 0, 10_000)
            .unwrap()
            .into_iter()
            .map(|(_, e)| format!("{} {}: {}", e.at_ms, e.event, e.message))
            .collect();
        let states: HashMap<String, String> = self
            .store
            .rollout_devices(id)
            .unwrap()
            .into_iter()
            .map(|d| (d.device, d.state.name().to_owned()))
            .collect();
        let old = Installed {
            name: MODEL.into(),
            version: "1.0.0".parse().unwrap(),
            release: 1,
        };
        for d in &self.devices {
            let running = d.behaviour.models.iter().find(|m| m.name == MODEL).unwrap();
            let on_new = running.version.to_string() == "2.0.0";
            assert!(
                on_new || *running == old,
                "seed {seed}: {} runs {running:?}",
                d.id
            );
            let state = states.get(&d.id).map_or("none", String::as_str);
            // A device that did not go back after every directive may run either.
            if state != "rollback_failed" {
                let want_new = matches!(state, "healthy" | "installed");
                assert_eq!(
                    on_new, want_new,
                    "seed {seed}: {} runs {} but its rollout state is {state}: {log:#?}",
                    d.id, running.version
                );
            }
        }
        let audit = self
            .store
            .rollout_audit(id, 0, 10_000)
            .unwrap()
            .into_iter()
            .map(|(_, e)| format!("{} {}: {}", e.at_ms, e.event, e.message))
            .collect();
        Ending {
            state: state.name(),
            regressed: self.regresses,
            judged: self.judged,
            audit,
        }
    }

    fn audit_log(&self) -> Vec<String> {
        self.rollout.map_or_else(Vec::new, |id| {
            self.store
                .rollout_audit(id, 0, 10_000)
                .unwrap()
                .into_iter()
                .map(|(_, e)| format!("{} {}: {}", e.at_ms, e.event, e.message))
                .collect()
        })
    }

    fn rollout_state(&self) -> Option<RolloutState> {
        self.rollout
            .and_then(|id| self.store.rollout(id).unwrap())
            .map(|r| r.state)
    }

    /// No transfer in progress and no directive waiting.
    fn quiet(&self) -> bool {
        let transfers = self.store.transfers(None, 1000).unwrap();
        let open = transfers.iter().any(|t| !t.state.is_final());
        let waiting = self.rollout.is_some_and(|id| {
            self.store
                .rollout_devices(id)
                .unwrap()
                .iter()
                .any(|d| d.state.name() == "rollback_sent")
        });
        !open && !waiting
    }
}

fn rollback_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[9; 32])
}

/// Runs one seed to its end.
pub(super) fn run(seed: u64, chaos: Chaos, steps: u64) -> Ending {
    let mut sim = Sim::new(seed, chaos);
    for _ in 0..steps {
        sim.step();
    }
    let ending = sim.settle();
    crate::clock::set_thread_clock(None);
    ending
}

#[cfg(test)]
mod tests;
