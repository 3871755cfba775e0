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
    started: Vec<String>,
    /// Every class distribution is shifted (a change that hits the whole fleet).
    fleet_shift: bool,
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
            started: Vec::new(),
            fleet_shift: false,
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
                Action::Audit(_, n, e) => {
                    assert_eq!(n as usize, self.audit.len(), "audit entries in order");
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
            let state = &self.engine.record(id).unwrap().state;
            if !state.is_active() && self.transfers.is_empty() && self.directives.is_empty() {
                break;
            }
        }
    }

    fn state(&self, id: u64) -> RolloutState {
        self.engine.record(id).unwrap().state.clone()
    }

    fn count(&self, id: u64, state: &str) -> u64 {
        self.engine
            .view(id)
            .unwrap()
            .counts
            .get(state)
            .copied()
            .unwrap_or(0)
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
    let view = w.engine.view(1).unwrap();
    assert_eq!(view.sizes, [5, 20, 100, 200]);
    let per_stage: Vec<u64> = view.stage_counts.iter().map(|c| c.values().sum()).collect();
    assert_eq!(per_stage, [5, 15, 80, 100]);
    // The canary was made of the first five in the plan's order.
    let canary: Vec<&String> = w.started.iter().take(5).collect();
    for d in canary {
        assert_eq!(w.devices[&(1, d.clone())].stage, 0);
    }
    // What was saved is what the engine holds.
    assert_eq!(w.records[&1], *w.engine.record(1).unwrap());
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
    let record = w.engine.record(1).unwrap();
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
        "{:?} {:?}",
        w.engine.view(1).unwrap().counts,
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
    assert_eq!(w.engine.record(1).unwrap().stage, 0, "caught in the canary");
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
