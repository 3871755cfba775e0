//! The rollout engine driven through whole rollouts by a stand-in for the writer: transfers
//! start and end when told, devices send telemetry every tick, and every saved state is kept
//! so a test can restart the engine from it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fleetgate_config::{Config, RolloutPolicy, StageSize};

use super::model::Target;
use super::*;
use crate::model::Stamp;

const NEW: &str = "2.0.0";

fn old() -> Installed {
    Installed {
        name: "kws".into(),
        version: Version::new(1, 0, 0),
        release: 1,
    }
}

fn new() -> Installed {
    Installed {
        name: "kws".into(),
        version: Version::parse(NEW).unwrap(),
        release: 2,
    }
}

/// A short default policy: the default stages, 2 s bakes, a 2 s gate window.
fn policy() -> RolloutPolicy {
    let mut p = Config::default().rollouts.policy;
    for s in &mut p.stages {
        s.bake = Duration::from_secs(2);
    }
    p.gates.window = Duration::from_secs(2);
    p.gates.confirm = Duration::from_millis(500);
    p.gates.wait = Duration::from_secs(5);
    p.gates.min_samples = 10;
    p.gates.drift = false;
    p
}

fn record(id: u64, policy: RolloutPolicy) -> RolloutRecord {
    RolloutRecord {
        id,
        kind: ArtifactKind::Model,
        name: "kws".into(),
        version: Version::parse(NEW).unwrap(),
        release: 2,
        target: Target::All,
        policy,
        planned: 0,
        state: RolloutState::Running,
        stage: 0,
        stage_started_ms: 0,
        baking_since_ms: None,
        gates: Vec::new(),
        created: Stamp {
            at_ms: 0,
            by: "operator".into(),
        },
        updated_ms: 0,
        finished_ms: None,
        audit_len: 0,
    }
}

/// What a simulated device does once it runs the new version.
#[derive(Debug, Clone, Copy, PartialEq)]
enum New {
    Fine,
    FailsInstall,
    SlowInference,
    Alerts,
}

#[derive(Debug)]
struct World {
    engine: Engine,
    now: u64,
    next_transfer: u64,
    next_command: u64,
    /// What each device runs, and whether it is online.
    running: BTreeMap<String, Installed>,
    online: BTreeMap<String, bool>,
    behaviour: HashMap<String, New>,
    /// Transfers in progress: transfer -> device.
    transfers: BTreeMap<u64, String>,
    /// Directives not yet applied: device -> (command, to).
    directives: BTreeMap<String, (u64, Installed)>,
    directives_sent: u64,
    /// Everything saved, as the writer would have stored it.
    records: BTreeMap<u64, RolloutRecord>,
    devices: BTreeMap<(u64, String), RolloutDevice>,
    audit: Vec<AuditEntry>,
    /// The next audit entry number of each rollout.
    audit_n: BTreeMap<u64, u64>,
    started: Vec<String>,
    /// Every class distribution is shifted (a change that hits the whole fleet).
    fleet_shift: bool,
    /// Validate stages as saved.
    validations: BTreeMap<u64, validate::ValidateStage>,
}

impl World {
    fn new(n: usize) -> World {
        let mut w = World {
            engine: Engine::new(Settings {
                directive_ttl_ms: 3_600_000,
            }),
            now: 1_000_000,
            next_transfer: 1,
            next_command: 1,
            running: BTreeMap::new(),
            online: BTreeMap::new(),
            behaviour: HashMap::new(),
            transfers: BTreeMap::new(),
            directives: BTreeMap::new(),
            directives_sent: 0,
            records: BTreeMap::new(),
            devices: BTreeMap::new(),
            audit: Vec::new(),
            audit_n: BTreeMap::new(),
            started: Vec::new(),
            fleet_shift: false,
            validations: BTreeMap::new(),
        };
        for i in 0..n {
            let id = format!("d{i:03}");
            w.running.insert(id.clone(), old());
            w.online.insert(id.clone(), true);
            w.behaviour.insert(id, New::Fine);
        }
        w
    }

    fn candidates(&self) -> Vec<Candidate> {
        self.running
            .iter()
            .map(|(id, r)| Candidate {
                device: id.clone(),
                stratum: "sim".into(),
                running: Some(r.clone()),
            })
            .collect()
    }

    fn hello_all(&mut self) {
        let ids: Vec<String> = self.online_ids();
        for id in ids {
            self.hello(&id);
        }
    }

    fn online_ids(&self) -> Vec<String> {
        self.online
            .iter()
            .filter(|(_, on)| **on)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn hello(&mut self, id: &str) {
        let running = self.running.get(id).cloned();
        let actions = self
            .engine
            .hello(id, |_, _| running.clone(), Vec::new(), self.now);
        self.apply(actions);
    }

    fn create(&mut self, id: u64, policy: RolloutPolicy) {
        let candidates = self.candidates();
        self.hello_all();
        let (actions, skipped) = self
            .engine
            .create(record(id, policy), candidates, self.now)
            .unwrap();
        assert_eq!(skipped, Vec::<(String, String)>::new());
        self.apply(actions);
    }

    fn apply(&mut self, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Save(r) => {
                    self.records.insert(r.id, *r);
                }
                Action::SaveDevice(id, d) => {
                    self.devices.insert((id, d.device.clone()), *d);
                }
                Action::SaveValidation(id, stage) => {
                    self.validations.insert(id, *stage);
                }
                Action::Audit(id, n, e) => {
                    let next = self.audit_n.entry(id).or_default();
                    assert_eq!(n, *next, "audit entries of rollout {id} in order");
                    *next += 1;
                    self.audit.push(e);
                }
                Action::StartTransfer {
                    rollout, device, ..
                } => {
                    let t = self.next_transfer;
                    self.next_transfer += 1;
                    self.transfers.insert(t, device.clone());
                    self.started.push(device.clone());
                    queue.extend(self.engine.transfer_started(rollout, &device, t, self.now));
                }
                Action::CancelTransfer { transfer, .. } => {
                    self.transfers.remove(&transfer);
                    queue.extend(self.engine.transfer_finished(
                        transfer,
                        Outcome::Cancelled,
                        self.now,
                    ));
                }
                Action::SendRollback {
                    rollout,
                    device,
                    from,
                    to,
                    ..
                } => {
                    assert_eq!(from, new());
                    let c = self.next_command;
                    self.next_command += 1;
                    self.directives_sent += 1;
                    self.directives.insert(device.clone(), (c, to));
                    queue.extend(self.engine.rollback_sent(rollout, &device, c, self.now));
                }
            }
        }
    }

    /// Every transfer in progress ends (online devices only).
    fn finish_transfers(&mut self) {
        let transfers = std::mem::take(&mut self.transfers);
        for (t, device) in transfers {
            if !self.online[&device] {
                self.transfers.insert(t, device);
                continue;
            }
            let outcome = match self.behaviour[&device] {
                New::FailsInstall => Outcome::Failed("install_failed: flash".into()),
                _ => {
                    self.running.insert(device.clone(), new());
                    Outcome::Installed
                }
            };
            let actions = self.engine.transfer_finished(t, outcome, self.now);
            self.apply(actions);
            if self.running[&device] == new() {
                self.hello(&device);
            }
        }
    }

    /// Devices apply their directives: ack, reboot, hello.
    fn apply_directives(&mut self) {
        let directives = std::mem::take(&mut self.directives);
        for (device, (command, to)) in directives {
            if !self.online[&device] {
                continue;
            }
            self.running.insert(device.clone(), to);
            let actions = self.engine.rollback_ack(&device, command, Ok(()), self.now);
            self.apply(actions);
            self.hello(&device);
        }
    }

    /// One telemetry message from every online device, then 100 ms pass and the engine ticks
    /// every second.
    fn step(&mut self) {
        for id in self.online_ids() {
            let runs_new = self.running[&id] == new();
            let b = self.behaviour[&id];
            let latency = if runs_new && b == New::SlowInference {
                24_000
            } else {
                12_000
            };
            let classes = if self.fleet_shift {
                [6, 8, 6]
            } else {
                [14, 4, 2]
            };
            let s = Sample {
                latency_us: Some(latency + (self.now % 7) as u32 * 100),
                free_mem_bytes: Some(160_000),
                temp_c: Some(42.0),
                power_mw: Some(180.0),
                class_counts: classes.to_vec(),
                inferences: 20,
                mean_confidence: Some(0.9),
            };
            let version = self.running[&id].version.clone();
            let actions = self
                .engine
                .telemetry(&id, Some(("kws", &version)), &s, self.now);
            self.apply(actions);
            if runs_new && b == New::Alerts {
                let actions = self.engine.alert(&id, self.now);
                self.apply(actions);
            }
        }
        self.now += 100;
        if self.now.is_multiple_of(1000) {
            let actions = self.engine.tick(self.now);
            self.apply(actions);
        }
    }

    /// Runs until the rollout stops or `limit` of simulated time passes.
    fn run(&mut self, id: u64, limit: Duration) {
        let end = self.now + limit.as_millis() as u64;
        while self.now < end {
            self.finish_transfers();
            self.apply_directives();
            self.step();
            self.engine.check();
            let state = &self.records[&id].state;
            if !state.is_active() && self.transfers.is_empty() && self.directives.is_empty() {
                break;
            }
        }
    }

    /// The rollout's state as saved (the engine forgets a rollout that can no longer act).
    fn state(&self, id: u64) -> RolloutState {
        self.records[&id].state.clone()
    }

    /// Its devices in `state`, as saved.
    fn count(&self, id: u64, state: &str) -> u64 {
        self.devices
            .iter()
            .filter(|((r, _), d)| *r == id && d.state.name() == state)
            .count() as u64
    }

    fn events(&self) -> Vec<&str> {
        self.audit.iter().map(|e| e.event.as_str()).collect()
    }
}

#[test]
fn two_hundred_devices_go_through_every_stage() {
    let mut w = World::new(200);
    w.create(1, policy());
    w.run(1, Duration::from_secs(120));
    assert_eq!(w.state(1), RolloutState::Completed);
    assert_eq!(w.count(1, "healthy"), 200);
    assert!(w.running.values().all(|r| *r == new()));
    assert_eq!(w.started.len(), 200, "each device updated exactly once");
    assert_eq!(
        w.events(),
        [
            "created",
            "stage_started",
            "stage_installed",
            "stage_passed",
            "stage_started",
            "stage_installed",
            "stage_passed",
            "stage_started",
            "stage_installed",
            "stage_passed",
            "stage_started",
            "stage_installed",
            "stage_passed",
            "completed"
        ]
    );
    let record = &w.records[&1];
    assert_eq!(
        plan::sizes(&record.policy.stages, record.planned),
        [5, 20, 100, 200]
    );
    let mut per_stage = [0u64; 4];
    for d in w.devices.values() {
        per_stage[d.stage] += 1;
    }
    assert_eq!(per_stage, [5, 15, 80, 100]);
    // The canary was made of the first five in the plan's order.
    let canary: Vec<&String> = w.started.iter().take(5).collect();
    for d in canary {
        assert_eq!(w.devices[&(1, d.clone())].stage, 0);
    }
    // Done with every device: the engine lets the rollout go (it stays in storage).
    assert!(w.engine.record(1).is_none());
    assert_eq!(w.engine.rollout_of("d000"), None, "its devices are free");
}

#[test]
fn a_version_failing_on_30_percent_is_stopped_early_and_rolled_back() {
    let mut w = World::new(200);
    for i in (0..200).filter(|i| i % 10 < 3) {
        w.behaviour.insert(format!("d{i:03}"), New::FailsInstall);
    }
    w.create(1, policy());
    w.run(1, Duration::from_secs(120));
    let RolloutState::RolledBack { reason, by } = w.state(1) else {
        panic!("{:?}", w.state(1));
    };
    assert_eq!(by, GATEWAY);
    assert!(reason.contains("failed"), "{reason}");
    let record = &w.records[&1];
    assert!(record.stage <= 1, "stopped in stage {}", record.stage + 1);
    // No device of a later stage was ever offered the update.
    for d in &w.started {
        assert!(w.devices[&(1, d.clone())].stage <= 1, "{d}");
    }
    // Everyone who took it (a download cancelled mid-install included) went back, once.
    assert!(w.directives_sent > 0);
    assert_eq!(
        w.count(1, "rolled_back"),
        w.directives_sent,
        "{:?}",
        w.directives
    );
    assert_eq!(
        w.count(1, "rolled_back") + w.count(1, "failed") + w.count(1, "cancelled"),
        w.started.len() as u64
    );
    assert!(w.running.values().all(|r| *r == old()));
    assert!(w.events().contains(&"abort_threshold"), "{:?}", w.events());
    assert_eq!(w.events().last(), Some(&"rollback_sent"));
}

#[test]
fn slow_inference_on_the_updated_devices_rolls_back_by_the_latency_gate() {
    let mut w = World::new(200);
    for b in w.behaviour.values_mut() {
        *b = New::SlowInference;
    }
    w.create(1, policy());
    w.run(1, Duration::from_secs(60));
    let RolloutState::RolledBack { reason, .. } = w.state(1) else {
        panic!("{:?}", w.state(1));
    };
    assert!(reason.starts_with("gate latency_p95 failed"), "{reason}");
    let audit = w.audit.iter().find(|e| e.event == "gate_failed").unwrap();
    let detail: serde_json::Value = serde_json::from_str(&audit.detail).unwrap();
    assert_eq!(detail["gate"], "latency_p95");
    assert!(detail["updated"].as_f64().unwrap() > 1.5 * detail["control"].as_f64().unwrap());
    assert!(w.running.values().all(|r| *r == old()));
    assert_eq!(w.records[&1].stage, 0, "caught in the canary");
}

#[test]
fn alerts_on_the_updated_devices_roll_back_by_the_alert_gate() {
    let mut w = World::new(100);
    for b in w.behaviour.values_mut() {
        *b = New::Alerts;
    }
    w.create(1, policy());
    w.run(1, Duration::from_secs(60));
    let RolloutState::RolledBack { reason, .. } = w.state(1) else {
        panic!("{:?}", w.state(1));
    };
    assert!(reason.starts_with("gate alert_rate failed"), "{reason}");
    assert!(w.running.values().all(|r| *r == old()));
}

#[test]
fn a_change_that_hits_the_whole_fleet_does_not_roll_back() {
    let mut w = World::new(100);
    w.fleet_shift = true;
    w.create(1, policy());
    w.run(1, Duration::from_secs(120));
    assert_eq!(w.state(1), RolloutState::Completed, "{:?}", w.events());
    assert_eq!(w.count(1, "healthy"), 100);
}

#[test]
fn offline_devices_wait_without_failing_and_are_updated_when_they_return() {
    let mut w = World::new(50);
    let away: Vec<String> = (0..50)
        .filter(|i| i % 5 == 0)
        .map(|i| format!("d{i:03}"))
        .collect();
    for d in &away {
        w.online.insert(d.clone(), false);
    }
    w.create(1, policy());
    w.run(1, Duration::from_secs(120));
    assert_eq!(w.state(1), RolloutState::Completed, "{:?}", w.events());
    assert_eq!(w.count(1, "healthy"), 40);
    // The canary was still five devices: online ones took the places of the absent.
    let canary = w
        .devices
        .values()
        .filter(|d| d.stage == 0 && d.state == DeviceState::Healthy)
        .count();
    assert_eq!(canary, 5);
    assert_eq!(w.count(1, "pending"), 10);
    assert_eq!(w.count(1, "failed") + w.count(1, "timed_out"), 0);
    // They come back: the completed rollout still updates them.
    for d in &away {
        w.online.insert(d.clone(), true);
        w.hello(d);
    }
    w.finish_transfers();
    assert_eq!(w.count(1, "installed"), 10);
    assert!(w.running.values().all(|r| *r == new()));
}

#[test]
fn a_late_joiner_gets_a_stage_and_the_update() {
    let mut w = World::new(20);
    let mut p = policy();
    p.stages.truncate(1);
    p.stages[0].size = StageSize::Percent(100.0);
    w.create(1, p);
    w.running.insert("late".into(), old());
    w.online.insert("late".into(), true);
    w.behaviour.insert("late".into(), New::Fine);
    let candidate = Candidate {
        device: "late".into(),
        stratum: "sim".into(),
        running: Some(old()),
    };
    let actions = w
        .engine
        .hello("late", |_, _| Some(old()), vec![(1, candidate)], w.now);
    w.apply(actions);
    assert!(w.events().contains(&"late_joiner"));
    w.run(1, Duration::from_secs(60));
    assert_eq!(w.state(1), RolloutState::Completed);
    assert_eq!(w.count(1, "healthy"), 21);
}

#[test]
fn a_restart_mid_stage_continues_to_the_same_outcome() {
    let mut w = World::new(200);
    w.create(1, policy());
    // Into stage 2, with transfers in flight.
    while w.engine.record(1).unwrap().stage < 1 {
        w.finish_transfers();
        w.step();
    }
    w.step();
    assert!(!w.transfers.is_empty());
    // The gateway dies: a new engine from what was saved. Devices reconnect and say hello;
    // their transfers in flight resume (the update engine's business) and end.
    let mut engine = Engine::new(Settings {
        directive_ttl_ms: 3_600_000,
    });
    for r in w.records.values() {
        let devices = w
            .devices
            .iter()
            .filter(|((id, _), _)| *id == r.id)
            .map(|(_, d)| d.clone())
            .collect();
        engine.restore(r.clone(), devices);
    }
    w.engine = engine;
    w.hello_all();
    w.run(1, Duration::from_secs(120));
    assert_eq!(w.state(1), RolloutState::Completed);
    assert_eq!(w.count(1, "healthy"), 200);
    let mut started = w.started.clone();
    started.sort();
    started.dedup();
    assert_eq!(
        started.len(),
        w.started.len(),
        "no device was started twice"
    );
}

#[test]
fn operators_pause_resume_abort_and_roll_back() {
    let mut w = World::new(50);
    w.create(1, policy());
    let a = w
        .engine
        .operator(1, OperatorAction::Resume, "op", None, w.now);
    assert!(matches!(a, Err(Refused::State { .. })), "{a:?}");
    let actions = w
        .engine
        .operator(1, OperatorAction::Pause, "op", Some("lunch".into()), w.now)
        .unwrap();
    w.apply(actions);
    let stage = w.engine.record(1).unwrap().stage;
    w.run(1, Duration::from_secs(20));
    assert!(matches!(w.state(1), RolloutState::Paused { .. }));
    assert_eq!(
        w.engine.record(1).unwrap().stage,
        stage,
        "no progress while paused"
    );
    let actions = w
        .engine
        .operator(1, OperatorAction::Resume, "op", None, w.now)
        .unwrap();
    w.apply(actions);
    while w.engine.record(1).unwrap().stage < 2 {
        w.finish_transfers();
        w.step();
    }
    let took: u64 = w.count(1, "installed") + w.count(1, "healthy");
    let actions = w
        .engine
        .operator(1, OperatorAction::Rollback, "op", None, w.now)
        .unwrap();
    w.apply(actions);
    assert!(matches!(
        w.state(1),
        RolloutState::RolledBack { ref by, .. } if by == "op"
    ));
    assert_eq!(w.directives_sent, took);
    w.run(1, Duration::from_secs(10));
    assert_eq!(w.count(1, "rolled_back"), took);
    assert!(w.running.values().all(|r| *r == old()));
    let a = w
        .engine
        .operator(1, OperatorAction::Abort, "op", None, w.now);
    assert!(matches!(a, Err(Refused::State { .. })), "{a:?}");
    assert_eq!(
        w.events()
            .iter()
            .filter(|e| ["paused", "resumed", "rolled_back"].contains(e))
            .count(),
        3
    );
    assert!(
        w.audit
            .iter()
            .any(|e| e.by == "op" && e.event == "paused" && e.message == "lunch")
    );
}

#[test]
fn a_device_that_keeps_the_new_version_gets_the_directive_again_then_counts_as_failed() {
    let mut w = World::new(10);
    let mut p = policy();
    p.stages.truncate(1);
    p.stages[0].size = StageSize::Percent(100.0);
    w.create(1, p);
    w.finish_transfers();
    let actions = w
        .engine
        .operator(1, OperatorAction::Rollback, "op", None, w.now)
        .unwrap();
    w.apply(actions);
    assert_eq!(w.directives_sent, 10);
    // d000 says hello on the new version before its directive arrives: nothing more is sent.
    w.hello("d000");
    assert_eq!(w.directives_sent, 10);
    // It misses its directives: each time it reconnects on the new version it gets another.
    w.directives.remove("d000");
    for expect in [11, 12] {
        let actions = w.engine.offline("d000", w.now);
        w.apply(actions);
        w.hello("d000");
        assert_eq!(w.directives_sent, expect);
        w.directives.remove("d000");
    }
    let actions = w.engine.offline("d000", w.now);
    w.apply(actions);
    w.hello("d000");
    assert_eq!(w.directives_sent, 12, "no more than {MAX_DIRECTIVES}");
    assert!(matches!(
        w.engine.device(1, "d000").map(|d| &d.state),
        None | Some(DeviceState::RollbackFailed { .. })
    ));
    assert!(matches!(
        w.devices[&(1, "d000".to_owned())].state,
        DeviceState::RollbackFailed { .. }
    ));
    // The rest ack; a second ack of the same command changes nothing.
    w.apply_directives();
    assert_eq!(w.count(1, "rolled_back"), 9);
    assert_eq!(w.engine.rollback_ack("d001", 2, Ok(()), w.now), Vec::new());
}

#[test]
fn a_second_rollout_of_the_same_model_waits_for_the_first() {
    let mut w = World::new(10);
    w.create(1, policy());
    let err = w
        .engine
        .create(record(2, policy()), w.candidates(), w.now)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "rollout 1 for model kws is still running: finish, abort or roll it back first"
    );
}

impl World {
    /// A new engine from what was saved, as after a gateway restart: every device is
    /// offline until it says hello again.
    fn restart(&mut self) {
        let mut engine = Engine::new(Settings {
            directive_ttl_ms: 3_600_000,
        });
        for r in self.records.values() {
            let devices = self
                .devices
                .iter()
                .filter(|((id, _), _)| *id == r.id)
                .map(|(_, d)| d.clone())
                .collect();
            engine.restore(r.clone(), devices);
        }
        self.engine = engine;
        for on in self.online.values_mut() {
            *on = false;
        }
    }

    /// `id` comes back: online, and says hello.
    fn back(&mut self, id: &str) {
        self.online.insert(id.to_owned(), true);
        self.hello(id);
    }

    fn saved(&self, id: u64, device: &str) -> &RolloutDevice {
        &self.devices[&(id, device.to_owned())]
    }
}

/// Issue 12, defect 1: a gateway killed just before the canary's bake ended came back with no
/// device online; every gate read `no_control` (which does not block) or kept its verdict from
/// before the kill, and the stage passed on no data, pushing a regressing release to the fleet.
/// After a restart the gates wait for `min_samples` of both cohorts, and the regression is
/// caught in the canary once the devices are back.
#[test]
fn a_restart_just_before_the_bake_ends_does_not_pass_the_stage_on_no_data() {
    let mut w = World::new(50);
    for b in w.behaviour.values_mut() {
        *b = New::SlowInference;
    }
    let mut p = policy();
    // A slow confirm: the gate is failing but has not failed when the gateway dies.
    p.gates.confirm = Duration::from_secs(10);
    p.gates.wait = Duration::from_secs(30);
    let bake = p.stages[0].bake.as_millis() as u64;
    w.create(1, p);
    loop {
        w.finish_transfers();
        w.step();
        let r = &w.records[&1];
        if r.baking_since_ms
            .is_some_and(|since| w.now + 300 >= since + bake)
        {
            break;
        }
    }
    let passed_before = w.events().iter().filter(|e| **e == "stage_passed").count();
    assert_eq!(passed_before, 0);
    w.restart();
    // Only the canary comes back at first: no control to compare with, no samples.
    let canary: Vec<String> = w.started.clone();
    for d in &canary {
        w.back(d);
    }
    for _ in 0..30 {
        w.step();
    }
    assert_eq!(
        w.events().iter().filter(|e| **e == "stage_passed").count(),
        0,
        "a stage passed on no data: {:?}",
        w.events()
    );
    assert_eq!(w.records[&1].stage, 0);
    // The rest come back: the gates judge, and the regression is caught in the canary.
    let ids: Vec<String> = w.online.keys().cloned().collect();
    for d in ids {
        if !w.online[&d] {
            w.back(&d);
        }
    }
    w.run(1, Duration::from_secs(60));
    assert!(
        matches!(w.state(1), RolloutState::RolledBack { .. }),
        "{:?}",
        w.state(1)
    );
    assert_eq!(w.records[&1].stage, 0, "caught in the canary");
}

/// Issue 12, defect 2: a completed rollout kept holding its devices, so a later rollout of
/// another artifact (firmware after a model) skipped them all and completed on nothing.
#[test]
fn a_completed_rollout_lets_go_of_its_devices() {
    let mut w = World::new(20);
    w.create(1, policy());
    w.run(1, Duration::from_secs(120));
    assert_eq!(w.state(1), RolloutState::Completed);
    let mut firmware = record(2, policy());
    firmware.kind = ArtifactKind::Firmware;
    firmware.name = "fw".into();
    let (actions, skipped) = w.engine.create(firmware, w.candidates(), w.now).unwrap();
    w.apply(actions);
    assert_eq!(skipped, Vec::<(String, String)>::new());
    assert_eq!(w.records[&2].planned, 20);
}

/// A completed rollout with nobody left to update leaves memory, so it takes no late joiner.
/// Restored from storage (a restart, or the reload after a failed commit) it came back and
/// took one: a device that said hello after the reload joined a rollout that had ended
/// (found by the simulation, seed 1378, with telemetry while time ran on).
#[test]
fn a_completed_rollout_stays_forgotten_after_a_restart() {
    let mut w = World::new(20);
    w.create(1, policy());
    w.run(1, Duration::from_secs(120));
    assert_eq!(w.state(1), RolloutState::Completed);
    assert_eq!(w.engine.active().count(), 0);
    w.restart();
    assert_eq!(w.engine.active().count(), 0, "the ended rollout came back");
    assert!(w.engine.record(1).is_none());
}

/// Issue 12, defect 3: a rollout with no device (a label typo) was accepted, stayed running
/// and blocked every other rollout of its model. It is refused, with why.
#[test]
fn a_rollout_with_no_device_is_refused_and_blocks_nothing() {
    let mut w = World::new(5);
    let err = w
        .engine
        .create(record(1, policy()), Vec::new(), w.now)
        .unwrap_err();
    assert_eq!(err, Refused::NoDevices(Vec::new()));
    // Every candidate already in a running rollout of another artifact: refused too, naming it.
    let mut firmware = record(2, policy());
    firmware.kind = ArtifactKind::Firmware;
    firmware.name = "fw".into();
    let (actions, _) = w.engine.create(firmware, w.candidates(), w.now).unwrap();
    w.apply(actions);
    let err = w
        .engine
        .create(record(3, policy()), w.candidates(), w.now)
        .unwrap_err();
    let Refused::NoDevices(skipped) = err else {
        panic!("{err:?}");
    };
    assert_eq!(skipped.len(), 5);
    assert_eq!(skipped[0].1, "in rollout 2");
    assert!(w.engine.record(1).is_none() && w.engine.record(3).is_none());
}

/// Issue 12, defect 5: a device that went offline mid-download kept its concurrency slot and
/// held its stage until it came back, which might be never. Its slot goes to the next device
/// at once, and the stage waits for it only for its `device_timeout` (a device rebooting into
/// the new version is back well within it), then goes on without it.
#[test]
fn a_device_offline_mid_download_frees_its_slot_and_does_not_hold_the_stage() {
    let mut w = World::new(40);
    let mut p = policy();
    p.stages[0].max_concurrent = 1;
    p.stages[0].device_timeout = Duration::from_secs(10);
    w.create(1, p);
    let first = w.started[0].clone();
    assert_eq!(w.started.len(), 1, "one at a time");
    w.online.insert(first.clone(), false);
    let actions = w.engine.offline(&first, w.now);
    w.apply(actions);
    assert_eq!(w.started.len(), 2, "its slot went to the next device");
    // Stage 1 completes without it once its timeout has passed; the rollout moves on.
    let gone_at = w.now;
    let deadline = w.now + 60_000;
    while w.records[&1].stage == 0 && w.now < deadline {
        w.finish_transfers();
        w.step();
    }
    assert!(w.records[&1].stage >= 1, "{:?}", w.events());
    assert!(w.now >= gone_at + 10_000, "waited for it for its timeout");
    assert_eq!(w.saved(1, &first).state, DeviceState::Updating);
    // When it returns, its transfer ends and it counts like the others.
    w.back(&first);
    w.run(1, Duration::from_secs(120));
    assert_eq!(w.state(1), RolloutState::Completed);
    assert_eq!(w.saved(1, &first).state, DeviceState::Healthy);
}

/// Issue 12, defect 10: the devices a rolled-back rollout never reached stayed `pending`
/// forever, and finished rollouts never left the engine's memory.
#[test]
fn a_stopped_rollout_leaves_no_device_pending_and_leaves_memory() {
    let mut w = World::new(50);
    w.create(1, policy());
    w.finish_transfers();
    w.step();
    let actions = w
        .engine
        .operator(1, OperatorAction::Rollback, "op", None, w.now)
        .unwrap();
    w.apply(actions);
    assert_eq!(w.count(1, "pending"), 0);
    assert_eq!(w.count(1, "not_updated"), 50 - w.started.len() as u64);
    assert!(
        w.engine.record(1).is_some(),
        "directives still to see through"
    );
    w.apply_directives();
    assert!(w.engine.record(1).is_none(), "nothing left to act on");
    // Aborted ones leave at once.
    let (actions, _) = w
        .engine
        .create(record(2, policy()), w.candidates(), w.now)
        .unwrap();
    w.apply(actions);
    let actions = w
        .engine
        .operator(2, OperatorAction::Abort, "op", None, w.now)
        .unwrap();
    w.apply(actions);
    assert!(w.engine.record(2).is_none());
    assert_eq!(w.count(2, "pending"), 0);
}

/// Issue 12, defect 10: a restart just before a stage started counted the devices still
/// reconnecting as offline and pulled later devices forward in their place. For a while after
/// a restart, nobody is pulled forward.
#[test]
fn devices_reconnecting_after_a_restart_are_not_replaced() {
    let mut w = World::new(100);
    let mut p = policy();
    // The canary's half may be the half that is late: the gates wait for it.
    p.gates.wait = Duration::from_secs(60);
    w.create(1, p);
    while w.records[&1].baking_since_ms.is_none() {
        w.finish_transfers();
        w.step();
    }
    w.restart();
    // Half the fleet is back quickly, the rest later but within the grace.
    let ids: Vec<String> = w.online.keys().cloned().collect();
    for d in ids.iter().step_by(2) {
        w.back(d);
    }
    let restarted = w.now;
    while w.now < restarted + 10_000 {
        w.finish_transfers();
        w.step();
    }
    for d in ids.iter().skip(1).step_by(2) {
        w.back(d);
    }
    w.run(1, Duration::from_secs(120));
    assert_eq!(w.state(1), RolloutState::Completed);
    let pulled = w
        .audit
        .iter()
        .filter(|e| e.event == "pulled_forward" && e.at_ms >= restarted)
        .count();
    assert_eq!(pulled, 0, "{:?}", w.events());
}

/// Found by the simulation (seed 1000008): a rollback decided while an updated device was
/// offline sent its directive into the void, and when the device came back on the new version
/// nothing was sent again (only a device that went offline *after* its directive was marked
/// for a resend). It stayed in `rollback_sent` on the new version for good.
#[test]
fn a_device_away_when_the_rollback_is_decided_gets_its_directive_when_it_returns() {
    let mut w = World::new(10);
    let mut p = policy();
    p.stages.truncate(1);
    p.stages[0].size = StageSize::Percent(100.0);
    w.create(1, p);
    w.finish_transfers();
    w.online.insert("d003".to_owned(), false);
    let actions = w.engine.offline("d003", w.now);
    w.apply(actions);
    let actions = w
        .engine
        .operator(1, OperatorAction::Rollback, "op", None, w.now)
        .unwrap();
    w.apply(actions);
    assert_eq!(w.directives_sent, 10);
    // The directive to d003 is lost: it is offline.
    w.directives.remove("d003");
    w.apply_directives();
    assert_eq!(w.count(1, "rolled_back"), 9);
    w.back("d003");
    assert_eq!(w.directives_sent, 11, "d003 gets its directive again");
    w.apply_directives();
    assert_eq!(w.count(1, "rolled_back"), 10);
    assert_eq!(w.running["d003"], old());
}

/// Found by the simulation (seed 450): a fleet of 4 with a canary of 3 left one device as the
/// control, fewer than `gates.min_devices` (2). The gates read `insufficient` for good: the
/// rollout paused for an operator, and a resume only baked again into the same pause. A control
/// that can never be big enough is no control: the canary's stage passes on its installs.
#[test]
fn a_control_smaller_than_min_devices_does_not_stall_the_stage() {
    let mut w = World::new(4);
    let mut p = policy();
    p.stages.truncate(2);
    p.stages[0].size = StageSize::Count(3);
    p.stages[1].size = StageSize::Percent(100.0);
    p.gates.min_devices = 2;
    w.create(1, p);
    w.run(1, Duration::from_secs(60));
    assert_eq!(w.state(1), RolloutState::Completed, "{:?}", w.events());
    assert!(!w.events().contains(&"paused"), "{:?}", w.events());
    assert_eq!(w.count(1, "healthy"), 4);
}

mod validate_stage {
    //! A rollout that starts with a validate stage: bench results in, the first production
    //! stage held until every class has k passing devices, a failure or a timeout ending it.

    use super::*;
    use crate::rollouts::validate::{BenchResult, StageState, ValidateStage};
    use crate::validation::Verdict;

    fn stage(classes: &[&str], k: u32) -> ValidateStage {
        ValidateStage {
            min_devices: k,
            timeout_ms: 600_000,
            classes: classes.iter().map(|c| (*c).to_owned()).collect(),
            started_ms: 1_000_000,
            state: StageState::Waiting,
        }
    }

    fn result(verdict: Verdict) -> BenchResult {
        let misses = match verdict {
            Verdict::Fail => vec!["latency_p95_us 18000 (required <=15000)".to_owned()],
            _ => vec![],
        };
        BenchResult {
            verdict,
            misses,
            detail: serde_json::json!({ "values": { "latency_p95_us": 18000.0 } }),
        }
    }

    fn create(w: &mut World, s: ValidateStage) {
        let candidates = w.candidates();
        w.hello_all();
        let (actions, _) = w
            .engine
            .create_validated(record(1, policy()), candidates, Some(s), w.now)
            .unwrap();
        w.apply(actions);
    }

    fn bench(w: &mut World, class: &str, device: &str, verdict: Verdict) {
        let actions = w.engine.validation_result(
            ArtifactKind::Model,
            "kws",
            2,
            class,
            device,
            result(verdict),
            w.now,
        );
        w.apply(actions);
    }

    #[test]
    fn no_update_starts_until_every_class_has_k_passing_bench_devices() {
        let mut w = World::new(20);
        create(&mut w, stage(&["a", "b"], 2));
        assert_eq!(w.validations[&1].state, StageState::Waiting);
        assert_eq!(w.events(), ["created", "validation_started"]);
        for _ in 0..30 {
            w.step();
        }
        assert!(
            w.started.is_empty(),
            "no production device before validation"
        );
        assert_eq!(w.engine.waiting_validations().len(), 1);
        bench(&mut w, "a", "bench-a1", Verdict::Pass);
        bench(&mut w, "a", "bench-a2", Verdict::Pass);
        bench(&mut w, "b", "bench-b1", Verdict::Pass);
        // An error neither passes nor fails; another class's device does not count.
        bench(&mut w, "b", "bench-b2", Verdict::Error);
        bench(&mut w, "c", "bench-c1", Verdict::Fail);
        w.step();
        assert!(w.started.is_empty());
        let view = w.engine.validation_view(1).unwrap();
        assert_eq!(
            (
                view.classes["a"].passed,
                view.classes["b"].passed,
                view.classes["b"].errors
            ),
            (2, 1, 1)
        );
        bench(&mut w, "b", "bench-b3", Verdict::Pass);
        assert!(matches!(w.validations[&1].state, StageState::Passed { .. }));
        assert_eq!(
            w.events()[2..4],
            ["validation_passed", "stage_started"],
            "the first production stage starts when validation passes"
        );
        assert!(!w.started.is_empty());
        assert!(w.engine.waiting_validations().is_empty());
        w.run(1, Duration::from_secs(120));
        assert_eq!(w.state(1), RolloutState::Completed);
        assert_eq!(w.count(1, "healthy"), 20);
    }

    #[test]
    fn a_failing_bench_device_ends_the_rollout_with_its_numbers() {
        let mut w = World::new(20);
        create(&mut w, stage(&["a", "b"], 1));
        bench(&mut w, "a", "bench-a1", Verdict::Pass);
        bench(&mut w, "b", "bench-b1", Verdict::Fail);
        assert!(matches!(w.state(1), RolloutState::Aborted { ref by, .. } if by == GATEWAY));
        assert!(matches!(w.validations[&1].state, StageState::Failed { .. }));
        assert!(w.started.is_empty());
        assert_eq!(w.count(1, "not_updated"), 20);
        let e = w
            .audit
            .iter()
            .find(|e| e.event == "validation_failed")
            .unwrap();
        assert_eq!(
            e.message,
            "validation failed on bench device bench-b1 (b): latency_p95_us 18000 (required <=15000)"
        );
        let detail: serde_json::Value = serde_json::from_str(&e.detail).unwrap();
        assert_eq!(detail["result"]["values"]["latency_p95_us"], 18000.0);
        assert_eq!(detail["classes"]["a"]["passed"], 1);
        assert!(
            w.engine.record(1).is_none(),
            "an aborted rollout leaves memory"
        );
    }

    #[test]
    fn without_enough_passing_devices_by_the_timeout_the_rollout_ends() {
        let mut w = World::new(10);
        create(&mut w, stage(&["a"], 2));
        bench(&mut w, "a", "bench-a1", Verdict::Pass);
        bench(&mut w, "a", "bench-a2", Verdict::Error);
        w.now = 1_000_000 + 600_000;
        let actions = w.engine.tick(w.now);
        w.apply(actions);
        assert!(matches!(w.state(1), RolloutState::Aborted { .. }));
        let e = w
            .audit
            .iter()
            .find(|e| e.event == "validation_failed")
            .unwrap();
        assert_eq!(
            e.message,
            "validation timed out after 10m: a: 1 passed, 1 error(s) of 2 needed"
        );
        assert!(w.started.is_empty());
    }

    #[test]
    fn a_restart_takes_the_stage_and_its_results_back_from_storage() {
        let mut w = World::new(10);
        create(&mut w, stage(&["a"], 2));
        bench(&mut w, "a", "bench-a1", Verdict::Pass);
        // The gateway dies; a new engine from what was saved, results read back.
        let mut engine = Engine::new(Settings {
            directive_ttl_ms: 3_600_000,
        });
        let r = w.records[&1].clone();
        let devices = w.devices.values().cloned().collect();
        engine.restore(r, devices);
        engine.set_validation(1, w.validations[&1].clone());
        engine.restore_validation_result(1, "a", "bench-a1", result(Verdict::Pass));
        w.engine = engine;
        w.hello_all();
        for _ in 0..20 {
            w.step();
        }
        assert!(
            w.started.is_empty(),
            "one of two is not enough after a restart either"
        );
        bench(&mut w, "a", "bench-a2", Verdict::Pass);
        assert!(matches!(w.validations[&1].state, StageState::Passed { .. }));
        w.run(1, Duration::from_secs(180));
        assert_eq!(w.state(1), RolloutState::Completed);

        // A failing result stored before the restart fails the stage at the first drive.
        let mut w = World::new(5);
        create(&mut w, stage(&["a"], 1));
        let mut engine = Engine::new(Settings {
            directive_ttl_ms: 3_600_000,
        });
        engine.restore(w.records[&1].clone(), w.devices.values().cloned().collect());
        engine.set_validation(1, w.validations[&1].clone());
        engine.restore_validation_result(1, "a", "bench-a1", result(Verdict::Fail));
        w.engine = engine;
        w.now += 1000;
        let actions = w.engine.tick(w.now);
        w.apply(actions);
        assert!(matches!(w.state(1), RolloutState::Aborted { .. }));
        assert!(w.started.is_empty());
    }
}
