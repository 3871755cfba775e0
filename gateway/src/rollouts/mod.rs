//! The rollout engine: staged rollouts with automatic rollback. A pure state machine owned by
//! the writer: devices' hellos, transfer outcomes, telemetry, alerts, acknowledgements, operator
//! actions and time go in; what to save, which transfers to start or cancel and which rollback
//! directives to send come out. No I/O, no clock.
//!
//! Rules:
//! - A rollout's devices are ordered once (`plan`) and each belongs to one stage; stage k
//!   updates the devices of stages 0..=k. Offline devices stay pending and never count as
//!   failures; they are updated when they come back, as are devices that join later.
//! - A stage ends its install phase when every online device of it has finished and at least
//!   `min_reporting` have; if fewer than `success_pct` of them installed, or any outcome
//!   reaches its abort threshold at any time, the rollout rolls back.
//! - Then it bakes: the health gates compare updated and control devices; a gate failing for
//!   `gates.confirm` rolls the rollout back. At the end of the bake the next stage starts; if a
//!   gate still cannot judge after `gates.wait` more, the rollout pauses for an operator.
//! - Rolling back cancels downloads in flight and sends every device that took the new version
//!   a directive back to the version it ran before; a device that still runs the new version
//!   when it says hello again gets it again (at most `MAX_DIRECTIVES` times).
//! - Every state change is returned as a `Save` before the actions it implies, and the writer
//!   commits them before anything leaves the gateway.

pub mod health;
pub mod model;
pub mod plan;

use std::collections::{BTreeMap, HashMap, HashSet};

use fleetgate_protocol::{ArtifactKind, Installed};
use semver::Version;
use serde_json::json;

use self::health::{Cohort, DriftInput, Health, Sample};
use self::model::{
    AuditEntry, DeviceState, Gate, GateEval, RolloutDevice, RolloutRecord, RolloutState, Verdict,
};
use self::plan::Candidate;

/// Directives sent to one device before it counts as `rollback_failed`.
pub const MAX_DIRECTIVES: u32 = 3;
/// Gates are judged at most this often on traffic (and on every tick).
const EVAL_EVERY_MS: u64 = 200;
/// A device whose transfer could not start (another update in progress) is tried again after.
const RETRY_START_MS: u64 = 10_000;
/// Who the engine's own decisions are by.
pub const GATEWAY: &str = "gateway";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub directive_ttl_ms: u64,
}

/// What the writer must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Save(Box<RolloutRecord>),
    SaveDevice(u64, Box<RolloutDevice>),
    Audit(u64, u64, AuditEntry),
    /// Start a transfer of the rollout's release to the device; answer with
    /// [`Engine::transfer_started`] or [`Engine::transfer_refused`].
    StartTransfer {
        rollout: u64,
        device: String,
        timeout_ms: u64,
        retries: u32,
    },
    CancelTransfer {
        transfer: u64,
        by: String,
    },
    /// Sign and send a rollback directive; answer with [`Engine::rollback_sent`].
    SendRollback {
        rollout: u64,
        device: String,
        transfer: u64,
        kind: ArtifactKind,
        from: Installed,
        to: Installed,
        expires_ms: u64,
    },
}

/// Why the engine refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("rollout {0} not found")]
    NotFound(u64),
    #[error("rollout {id} is {state}: {what}")]
    State {
        id: u64,
        state: &'static str,
        what: String,
    },
    #[error("rollout {0} for {1} {2} is still {3}: finish, abort or roll it back first")]
    Busy(u64, &'static str, String, &'static str),
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    Pause,
    Resume,
    Abort,
    Rollback,
}

/// How a transfer of a rollout ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Installed,
    Failed(String),
    Rejected(String),
    TimedOut,
    Cancelled,
}

#[derive(Debug)]
struct Live {
    record: RolloutRecord,
    devices: HashMap<String, RolloutDevice>,
    sizes: Vec<u64>,
    health: Health,
    failing_since: BTreeMap<Gate, u64>,
    last_eval_ms: u64,
    drift: DriftInput,
    /// Devices whose transfer could not start, with when to try again.
    blocked: HashMap<String, u64>,
    /// Devices in `rollback_sent` that were offline since (or the gateway restarted): their
    /// directive may not have reached them, so their next hello on the new version gets it
    /// again. Others are sent nothing more: their hello may simply predate the directive.
    resend: HashSet<String>,
}

#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    live: BTreeMap<u64, Live>,
    /// Device -> the rollout that may still update it or roll it back.
    by_device: HashMap<String, u64>,
    by_transfer: HashMap<u64, (u64, String)>,
    online: HashSet<String>,
}

/// A view of one rollout for the API.
#[derive(Debug, Clone)]
pub struct View {
    pub record: RolloutRecord,
    pub sizes: Vec<u64>,
    pub counts: BTreeMap<&'static str, u64>,
    pub stage_counts: Vec<BTreeMap<&'static str, u64>>,
}

impl Engine {
    pub fn new(settings: Settings) -> Engine {
        Engine {
            settings,
            live: BTreeMap::new(),
            by_device: HashMap::new(),
            by_transfer: HashMap::new(),
            online: HashSet::new(),
        }
    }

    /// Takes back a stored rollout after a restart (its devices as stored).
    pub fn restore(&mut self, record: RolloutRecord, devices: Vec<RolloutDevice>) {
        let id = record.id;
        let sizes = plan::sizes(&record.policy.stages, record.planned);
        let mut map = HashMap::new();
        let mut resend = HashSet::new();
        for d in devices {
            if matches!(d.state, DeviceState::RollbackSent { .. }) {
                resend.insert(d.device.clone());
            }
            if self.claims(&record, &d) {
                self.by_device.insert(d.device.clone(), id);
            }
            if let (Some(t), DeviceState::Updating) = (d.transfer, &d.state) {
                self.by_transfer.insert(t, (id, d.device.clone()));
            }
            map.insert(d.device.clone(), d);
        }
        let health = Health::new(record.policy.gates.window);
        self.live.insert(
            id,
            Live {
                record,
                devices: map,
                sizes,
                health,
                failing_since: BTreeMap::new(),
                last_eval_ms: 0,
                drift: DriftInput::Off,
                blocked: HashMap::new(),
                resend,
            },
        );
    }

    /// Whether a rollout keeps a device (to update it, or to see its rollback through).
    fn claims(&self, r: &RolloutRecord, d: &RolloutDevice) -> bool {
        match &r.state {
            RolloutState::Running | RolloutState::Paused { .. } | RolloutState::Completed => {
                !matches!(d.state, DeviceState::RolledBack)
            }
            RolloutState::RolledBack { .. } => matches!(
                d.state,
                DeviceState::RollbackSent { .. } | DeviceState::Cancelled
            ),
            RolloutState::Aborted { .. } => false,
        }
    }

    pub fn record(&self, id: u64) -> Option<&RolloutRecord> {
        self.live.get(&id).map(|l| &l.record)
    }

    /// Rollouts that may still start updates, with what they target.
    pub fn active(&self) -> impl Iterator<Item = &RolloutRecord> {
        self.live
            .values()
            .map(|l| &l.record)
            .filter(|r| r.state.is_active() || r.state == RolloutState::Completed)
    }

    /// The rollout a device belongs to, if any.
    pub fn rollout_of(&self, device: &str) -> Option<u64> {
        self.by_device.get(device).copied()
    }

    pub fn is_tracked_transfer(&self, transfer: u64) -> bool {
        self.by_transfer.contains_key(&transfer)
    }

    pub fn device(&self, rollout: u64, device: &str) -> Option<&RolloutDevice> {
        self.live.get(&rollout)?.devices.get(device)
    }

    pub fn view(&self, id: u64) -> Option<View> {
        let l = self.live.get(&id)?;
        let mut counts = BTreeMap::new();
        let mut stage_counts = vec![BTreeMap::new(); l.sizes.len()];
        for d in l.devices.values() {
            *counts.entry(d.state.name()).or_insert(0) += 1;
            if let Some(s) = stage_counts.get_mut(d.stage) {
                *s.entry(d.state.name()).or_insert(0) += 1;
            }
        }
        Some(View {
            record: l.record.clone(),
            sizes: l.sizes.clone(),
            counts,
            stage_counts,
        })
    }

    /// Model rollouts whose drift gate is on, with the new version and the version most of
    /// their devices ran before, for the writer to ask the drift engine.
    pub fn drift_pairs(&self) -> Vec<(u64, String, Version, Version)> {
        self.live
            .values()
            .filter(|l| l.record.state.is_active() && l.record.kind == ArtifactKind::Model)
            .filter(|l| l.record.policy.gates.drift)
            .filter_map(|l| {
                let mut olds: HashMap<&Version, usize> = HashMap::new();
                for d in l.devices.values() {
                    if let Some(f) = &d.from {
                        *olds.entry(&f.version).or_default() += 1;
                    }
                }
                let old = olds.into_iter().max_by_key(|(v, n)| (*n, (*v).clone()))?.0;
                Some((
                    l.record.id,
                    l.record.name.clone(),
                    l.record.version.clone(),
                    old.clone(),
                ))
            })
            .collect()
    }

    pub fn set_drift(&mut self, id: u64, input: DriftInput) {
        if let Some(l) = self.live.get_mut(&id) {
            l.drift = input;
        }
    }

    /// Starts a rollout of `record` (state running, stage 0) over `candidates`. Candidates in
    /// another rollout that may still update them are skipped with the reason.
    pub fn create(
        &mut self,
        mut record: RolloutRecord,
        candidates: Vec<Candidate>,
        now_ms: u64,
    ) -> Result<(Vec<Action>, Skipped), Refused> {
        if let Some(other) = self.live.values().find(|l| {
            l.record.kind == record.kind
                && l.record.name == record.name
                && l.record.state.is_active()
        }) {
            return Err(Refused::Busy(
                other.record.id,
                record.kind.name(),
                record.name.clone(),
                other.record.state.name(),
            ));
        }
        // A completed rollout of the same artifact stops serving its stragglers.
        let superseded: Vec<u64> = self
            .live
            .values()
            .filter(|l| {
                l.record.kind == record.kind
                    && l.record.name == record.name
                    && l.record.state == RolloutState::Completed
            })
            .map(|l| l.record.id)
            .collect();
        for id in superseded {
            self.by_device.retain(|_, r| *r != id);
            self.live.remove(&id);
        }
        let mut skipped = Vec::new();
        let candidates: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| match self.by_device.get(&c.device) {
                Some(other) => {
                    skipped.push((c.device.clone(), format!("in rollout {other}")));
                    false
                }
                None => true,
            })
            .collect();
        let id = record.id;
        record.planned = candidates.len() as u64;
        let sizes = plan::sizes(&record.policy.stages, record.planned);
        let mut devices = HashMap::new();
        for (position, i) in plan::order(id, &candidates).into_iter().enumerate() {
            let c = &candidates[i];
            devices.insert(
                c.device.clone(),
                RolloutDevice {
                    device: c.device.clone(),
                    stage: plan::stage_of(position as u64, &sizes),
                    order: position as u64,
                    state: DeviceState::Pending,
                    transfer: None,
                    from: c.running.clone(),
                    updated_ms: now_ms,
                },
            );
            self.by_device.insert(c.device.clone(), id);
        }
        let mut actions = Vec::new();
        let mut live = Live {
            health: Health::new(record.policy.gates.window),
            record,
            devices,
            sizes,
            failing_since: BTreeMap::new(),
            last_eval_ms: 0,
            drift: DriftInput::Off,
            blocked: HashMap::new(),
            resend: HashSet::new(),
        };
        let mut order: Vec<&RolloutDevice> = live.devices.values().collect();
        order.sort_by_key(|d| d.order);
        for d in order {
            actions.push(Action::SaveDevice(id, Box::new(d.clone())));
        }
        let stages: Vec<String> = live
            .record
            .policy
            .stages
            .iter()
            .map(|s| s.size.to_string())
            .collect();
        let r = &live.record;
        let by = r.created.by.clone();
        let message = format!(
            "{} {} {} (release {}) to {} devices in stages {}",
            r.kind.name(),
            r.name,
            r.version,
            r.release,
            r.planned,
            stages.join(", ")
        );
        let detail =
            json!({ "planned": r.planned, "stage_sizes": live.sizes, "skipped": skipped.len() });
        audit(
            &mut live.record,
            &mut actions,
            now_ms,
            &by,
            "created",
            message,
            detail,
        );
        stage_started(&mut live, &mut actions, now_ms);
        self.live.insert(id, live);
        self.drive(id, now_ms, &mut actions);
        Ok((actions, skipped))
    }

    pub fn online(&mut self, device: &str) {
        self.online.insert(device.to_owned());
    }

    pub fn offline(&mut self, device: &str, now_ms: u64) -> Vec<Action> {
        self.online.remove(device);
        let mut actions = Vec::new();
        if let Some(id) = self.rollout_of(device) {
            if let Some(l) = self.live.get_mut(&id)
                && l.devices
                    .get(device)
                    .is_some_and(|d| matches!(d.state, DeviceState::RollbackSent { .. }))
            {
                l.resend.insert(device.to_owned());
            }
            self.drive(id, now_ms, &mut actions);
        }
        actions
    }

    /// A device said hello: it is online and runs `running` of the artifact of its rollout (the
    /// writer looks it up). `join`: rollouts whose target it matches and that do not have it
    /// yet, with its candidacy.
    pub fn hello(
        &mut self,
        device: &str,
        running: impl Fn(ArtifactKind, &str) -> Option<Installed>,
        join: Vec<(u64, Candidate)>,
        now_ms: u64,
    ) -> Vec<Action> {
        self.online.insert(device.to_owned());
        let mut actions = Vec::new();
        if self.rollout_of(device).is_none() {
            for (id, c) in join {
                let Some(l) = self.live.get_mut(&id) else {
                    continue;
                };
                if l.devices.contains_key(&c.device) || self.by_device.contains_key(&c.device) {
                    continue;
                }
                let stage = plan::late_stage(id, &c.device, &l.sizes);
                let order = l.devices.len() as u64;
                let d = RolloutDevice {
                    device: c.device.clone(),
                    stage,
                    order,
                    state: DeviceState::Pending,
                    transfer: None,
                    from: c.running.clone(),
                    updated_ms: now_ms,
                };
                actions.push(Action::SaveDevice(id, Box::new(d.clone())));
                audit(
                    &mut l.record,
                    &mut actions,
                    now_ms,
                    GATEWAY,
                    "late_joiner",
                    format!("{} joined, in stage {}", c.device, stage + 1),
                    json!({ "device": c.device, "stage": stage }),
                );
                actions.push(Action::Save(Box::new(l.record.clone())));
                l.devices.insert(c.device.clone(), d);
                self.by_device.insert(c.device.clone(), id);
                break;
            }
        }
        let Some(id) = self.rollout_of(device) else {
            return actions;
        };
        let ttl = self.settings.directive_ttl_ms;
        let Some(l) = self.live.get_mut(&id) else {
            return actions;
        };
        let now_running = running(l.record.kind, &l.record.name);
        let new = Installed {
            name: l.record.name.clone(),
            version: l.record.version.clone(),
            release: l.record.release,
        };
        let Some(d) = l.devices.get_mut(device) else {
            return actions;
        };
        let runs_new = now_running.as_ref() == Some(&new);
        match d.state.clone() {
            DeviceState::RollbackSent { sent, .. } => {
                if runs_new && sent >= MAX_DIRECTIVES {
                    d.state = DeviceState::RollbackFailed {
                        reason: format!("still runs {} after {sent} directives", new.version),
                    };
                    self.by_device.remove(device);
                } else if runs_new && l.resend.remove(device) {
                    directive(
                        l.record.id,
                        l.record.kind,
                        d,
                        &new,
                        sent,
                        ttl,
                        now_ms,
                        &mut actions,
                    );
                } else if runs_new {
                    // The directive is on its way (this hello may predate it).
                    return actions;
                } else if now_running.is_some() && now_running == d.from {
                    d.state = DeviceState::RolledBack;
                    self.by_device.remove(device);
                } else {
                    return actions;
                }
                d.updated_ms = now_ms;
                actions.push(Action::SaveDevice(id, Box::new(d.clone())));
            }
            // The rollout was rolled back while this device downloaded: if the install went
            // through anyway it goes back too; if not, the rollout lets go of it.
            DeviceState::Cancelled if matches!(l.record.state, RolloutState::RolledBack { .. }) => {
                if runs_new {
                    directive(
                        l.record.id,
                        l.record.kind,
                        d,
                        &new,
                        0,
                        ttl,
                        now_ms,
                        &mut actions,
                    );
                    d.updated_ms = now_ms;
                    actions.push(Action::SaveDevice(id, Box::new(d.clone())));
                } else {
                    self.by_device.remove(device);
                }
            }
            DeviceState::Installed | DeviceState::Healthy
                if now_running.is_some() && now_running == d.from =>
            {
                // The device went back on its own (its boot check failed): a failed install.
                d.state = DeviceState::Failed {
                    reason: format!(
                        "runs {} again after installing {}",
                        d.from
                            .as_ref()
                            .map_or(String::new(), |f| f.version.to_string()),
                        new.version
                    ),
                };
                d.updated_ms = now_ms;
                actions.push(Action::SaveDevice(id, Box::new(d.clone())));
            }
            // Keep what it runs now: a rollback sends it back there.
            DeviceState::Pending if now_running.is_some() && d.from != now_running => {
                d.from = now_running;
                d.updated_ms = now_ms;
                actions.push(Action::SaveDevice(id, Box::new(d.clone())));
            }
            _ => {}
        }
        self.drive(id, now_ms, &mut actions);
        actions
    }

    /// The writer started the transfer asked for by [`Action::StartTransfer`].
    pub fn transfer_started(
        &mut self,
        rollout: u64,
        device: &str,
        transfer: u64,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(d) = self
            .live
            .get_mut(&rollout)
            .and_then(|l| l.devices.get_mut(device))
        {
            d.transfer = Some(transfer);
            d.state = DeviceState::Updating;
            d.updated_ms = now_ms;
            actions.push(Action::SaveDevice(rollout, Box::new(d.clone())));
            self.by_transfer
                .insert(transfer, (rollout, device.to_owned()));
        }
        actions
    }

    /// The writer could not start the transfer: `retry` (another update in progress) leaves
    /// the device pending for a while; otherwise it counts as rejected (`reason`), or as
    /// installed when it already runs the release.
    pub fn transfer_refused(
        &mut self,
        rollout: u64,
        device: &str,
        refusal: StartRefusal,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(l) = self.live.get_mut(&rollout) else {
            return actions;
        };
        let Some(d) = l.devices.get_mut(device) else {
            return actions;
        };
        match refusal {
            StartRefusal::Busy => {
                d.state = DeviceState::Pending;
                l.blocked.insert(device.to_owned(), now_ms + RETRY_START_MS);
                return actions;
            }
            StartRefusal::AlreadyRuns => d.state = DeviceState::Installed,
            StartRefusal::Refused(reason) => d.state = DeviceState::Rejected { reason },
        }
        d.updated_ms = now_ms;
        actions.push(Action::SaveDevice(rollout, Box::new(d.clone())));
        self.drive(rollout, now_ms, &mut actions);
        actions
    }

    /// A transfer ended. Transfers that are not the rollout's are ignored.
    pub fn transfer_finished(
        &mut self,
        transfer: u64,
        outcome: Outcome,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some((id, device)) = self.by_transfer.remove(&transfer) else {
            return actions;
        };
        let Some(l) = self.live.get_mut(&id) else {
            return actions;
        };
        let Some(d) = l.devices.get_mut(&device) else {
            return actions;
        };
        if d.state != DeviceState::Updating || d.transfer != Some(transfer) {
            return actions;
        }
        d.state = match outcome {
            Outcome::Installed => DeviceState::Installed,
            Outcome::Failed(reason) => DeviceState::Failed { reason },
            Outcome::Rejected(reason) => DeviceState::Rejected { reason },
            Outcome::TimedOut => DeviceState::TimedOut,
            Outcome::Cancelled => DeviceState::Cancelled,
        };
        d.updated_ms = now_ms;
        actions.push(Action::SaveDevice(id, Box::new(d.clone())));
        l.health.forget(&device);
        self.drive(id, now_ms, &mut actions);
        actions
    }

    /// A device's telemetry; `model`: the model name and version it reports running.
    pub fn telemetry(
        &mut self,
        device: &str,
        model: Option<(&str, &Version)>,
        sample: &Sample,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some((id, cohort)) = self.cohort(device, model) else {
            return actions;
        };
        if let Some(l) = self.live.get_mut(&id) {
            l.health.telemetry(device, cohort, sample, now_ms);
        }
        self.maybe_evaluate(id, now_ms, &mut actions);
        actions
    }

    /// A hardware alert a device sent.
    pub fn alert(&mut self, device: &str, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some((id, cohort)) = self.cohort(device, None) else {
            return actions;
        };
        if let Some(l) = self.live.get_mut(&id) {
            l.health.alert(device, cohort, now_ms);
        }
        self.maybe_evaluate(id, now_ms, &mut actions);
        actions
    }

    /// Which side of the comparison a device's data falls on now, if any.
    fn cohort(&self, device: &str, model: Option<(&str, &Version)>) -> Option<(u64, Cohort)> {
        let id = self.rollout_of(device)?;
        let l = self.live.get(&id)?;
        if !l.record.state.is_active() {
            return None;
        }
        let d = l.devices.get(device)?;
        let cohort = match &d.state {
            DeviceState::Installed | DeviceState::Healthy => Cohort::Updated,
            DeviceState::Pending => Cohort::Control,
            _ => return None,
        };
        // For a model rollout the telemetry names the model version that produced it: trust it
        // over the state (a device between its install and its next hello).
        if l.record.kind == ArtifactKind::Model
            && let Some((name, version)) = model
            && name == l.record.name
        {
            let runs_new = *version == l.record.version;
            if runs_new != (cohort == Cohort::Updated) {
                return None;
            }
        }
        Some((id, cohort))
    }

    /// A device acknowledged rollback directive `command`.
    pub fn rollback_ack(
        &mut self,
        device: &str,
        command: u64,
        result: Result<(), String>,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(id) = self.rollout_of(device) else {
            return actions;
        };
        let Some(d) = self
            .live
            .get_mut(&id)
            .and_then(|l| l.devices.get_mut(device))
        else {
            return actions;
        };
        if !matches!(d.state, DeviceState::RollbackSent { command: c, .. } if c == command) {
            return actions;
        }
        d.state = match result {
            Ok(()) => DeviceState::RolledBack,
            Err(reason) => DeviceState::RollbackFailed { reason },
        };
        d.updated_ms = now_ms;
        actions.push(Action::SaveDevice(id, Box::new(d.clone())));
        self.by_device.remove(device);
        actions
    }

    /// The writer sent the directive asked for by [`Action::SendRollback`] as `command`.
    pub fn rollback_sent(
        &mut self,
        rollout: u64,
        device: &str,
        command: u64,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(d) = self
            .live
            .get_mut(&rollout)
            .and_then(|l| l.devices.get_mut(device))
            && let DeviceState::RollbackSent { sent, .. } = d.state
        {
            d.state = DeviceState::RollbackSent { command, sent };
            d.updated_ms = now_ms;
            actions.push(Action::SaveDevice(rollout, Box::new(d.clone())));
        }
        actions
    }

    pub fn operator(
        &mut self,
        id: u64,
        action: OperatorAction,
        by: &str,
        reason: Option<String>,
        now_ms: u64,
    ) -> Result<Vec<Action>, Refused> {
        let l = self.live.get_mut(&id).ok_or(Refused::NotFound(id))?;
        let state = l.record.state.name();
        let refuse = |what: &str| Refused::State {
            id,
            state,
            what: what.to_owned(),
        };
        let mut actions = Vec::new();
        let reason = reason.unwrap_or_else(|| "by an operator".to_owned());
        match action {
            OperatorAction::Pause => {
                if l.record.state != RolloutState::Running {
                    return Err(refuse("only a running rollout can be paused"));
                }
                l.record.state = RolloutState::Paused {
                    reason: reason.clone(),
                    by: by.to_owned(),
                };
                audit(
                    &mut l.record,
                    &mut actions,
                    now_ms,
                    by,
                    "paused",
                    reason,
                    json!({}),
                );
            }
            OperatorAction::Resume => {
                if !matches!(l.record.state, RolloutState::Paused { .. }) {
                    return Err(refuse("only a paused rollout can be resumed"));
                }
                l.record.state = RolloutState::Running;
                // A bake that ended while paused is judged again from now.
                if l.record.baking_since_ms.is_some() {
                    l.record.baking_since_ms = Some(now_ms);
                }
                audit(
                    &mut l.record,
                    &mut actions,
                    now_ms,
                    by,
                    "resumed",
                    reason,
                    json!({}),
                );
            }
            OperatorAction::Abort => {
                if !l.record.state.is_active() {
                    return Err(refuse("only a running or paused rollout can be aborted"));
                }
                self.stop(
                    id,
                    false,
                    by,
                    "aborted",
                    reason,
                    json!({}),
                    now_ms,
                    &mut actions,
                );
                return Ok(actions);
            }
            OperatorAction::Rollback => {
                if !(l.record.state.is_active() || l.record.state == RolloutState::Completed) {
                    return Err(refuse("it is already stopped"));
                }
                self.stop(
                    id,
                    true,
                    by,
                    "rolled_back",
                    reason,
                    json!({}),
                    now_ms,
                    &mut actions,
                );
                return Ok(actions);
            }
        }
        l.record.updated_ms = now_ms;
        actions.push(Action::Save(Box::new(l.record.clone())));
        self.drive(id, now_ms, &mut actions);
        Ok(actions)
    }

    /// Time passed: bakes end, gates are judged, blocked devices are tried again.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let ids: Vec<u64> = self.live.keys().copied().collect();
        for id in ids {
            self.evaluate(id, now_ms, &mut actions);
            self.drive(id, now_ms, &mut actions);
        }
        actions
    }

    fn maybe_evaluate(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        let due = self
            .live
            .get(&id)
            .is_some_and(|l| now_ms.saturating_sub(l.last_eval_ms) >= EVAL_EVERY_MS);
        if due {
            self.evaluate(id, now_ms, actions);
        }
    }

    /// Judges the gates; one that failed for `confirm` rolls the rollout back.
    fn evaluate(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        if !l.record.state.is_active() {
            return;
        }
        l.last_eval_ms = now_ms;
        // Only devices that can send data make a control: pending and online.
        let control_exists = l
            .devices
            .values()
            .any(|d| d.state == DeviceState::Pending && self.online.contains(&d.device));
        let gates = l.record.policy.gates.clone();
        let mut evals = l.health.evaluate(&gates, now_ms, control_exists, &l.drift);
        let confirm = gates.confirm.as_millis() as u64;
        let mut failed = None;
        for e in &mut evals {
            if e.verdict == Verdict::Failing {
                let since = *l.failing_since.entry(e.gate).or_insert(now_ms);
                if now_ms.saturating_sub(since) >= confirm {
                    e.verdict = Verdict::Fail;
                    failed.get_or_insert_with(|| e.clone());
                }
            } else {
                l.failing_since.remove(&e.gate);
            }
        }
        let changed = verdicts(&l.record.gates) != verdicts(&evals);
        l.record.gates = evals;
        if let Some(e) = failed {
            let message = format!(
                "gate {} failed: updated {} against control {} (threshold {:.4}) over {} and {} samples from {} and {} devices",
                e.gate.name(),
                show(e.updated),
                show(e.control),
                e.threshold,
                e.updated_n,
                e.control_n,
                e.updated_devices,
                e.control_devices
            );
            let detail = serde_json::to_value(&e).unwrap_or_default();
            self.roll_back(id, "gate_failed", message, detail, now_ms, actions);
        } else if changed {
            l.record.updated_ms = now_ms;
            actions.push(Action::Save(Box::new(l.record.clone())));
        }
    }

    /// Moves a running rollout forward as far as it can go now.
    fn drive(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        let state = l.record.state.clone();
        if !(state.is_active() || state == RolloutState::Completed) {
            return;
        }
        // Abort thresholds, per stage, on every outcome so far.
        if state.is_active() {
            for k in 0..=l.record.stage.min(l.sizes.len() - 1) {
                if let Some((message, detail)) = abort_reached(l, k) {
                    self.roll_back(id, "abort_threshold", message, detail, now_ms, actions);
                    return;
                }
            }
        }
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        // Start the updates the current stage allows (a completed rollout still updates its
        // devices that were offline, and late joiners).
        if matches!(state, RolloutState::Running | RolloutState::Completed) {
            start_updates(l, &self.online, now_ms, actions);
        }
        if state != RolloutState::Running {
            return;
        }
        let k = l.record.stage;
        let stage = l.record.policy.stages[k].clone();
        match l.record.baking_since_ms {
            None => {
                // Install phase: every online device of stages 0..=k done, enough reporting.
                let waiting = l.devices.values().any(|d| {
                    d.stage <= k
                        && (d.state == DeviceState::Updating
                            || (d.state == DeviceState::Pending && self.online.contains(&d.device)))
                });
                let (mut devices, mut finished, mut installed) = (0u64, 0u64, 0u64);
                for d in l.devices.values().filter(|d| d.stage == k) {
                    devices += 1;
                    finished += u64::from(d.state.finished());
                    installed += u64::from(d.state.took_it());
                }
                let need = stage.min_reporting.min(devices);
                if waiting || finished < need {
                    return;
                }
                let pct = if finished == 0 {
                    100.0
                } else {
                    installed as f64 * 100.0 / finished as f64
                };
                let detail = json!({ "stage": k, "devices": devices, "finished": finished, "installed": installed, "success_pct": pct, "needed_pct": stage.success_pct });
                if pct < stage.success_pct {
                    let message = format!(
                        "stage {}: {installed} of {finished} finished devices installed ({pct:.1} %), {:.1} % needed",
                        k + 1,
                        stage.success_pct
                    );
                    self.roll_back(id, "stage_failed", message, detail, now_ms, actions);
                    return;
                }
                let Some(l) = self.live.get_mut(&id) else {
                    return;
                };
                l.record.baking_since_ms = Some(now_ms);
                let message = format!(
                    "stage {}: {installed} of {devices} devices installed; baking for {}",
                    k + 1,
                    humantime::format_duration(stage.bake)
                );
                audit(
                    &mut l.record,
                    actions,
                    now_ms,
                    GATEWAY,
                    "stage_installed",
                    message,
                    detail,
                );
                l.record.updated_ms = now_ms;
                actions.push(Action::Save(Box::new(l.record.clone())));
            }
            Some(since) => {
                let bake = stage.bake.as_millis() as u64;
                if now_ms < since + bake {
                    return;
                }
                let blocking: Vec<&GateEval> = l
                    .record
                    .gates
                    .iter()
                    .filter(|e| matches!(e.verdict, Verdict::Insufficient | Verdict::Failing))
                    .collect();
                // Nothing updated in this stage (all already ran it, or the stage was empty):
                // there is nothing to bake.
                let updated_here = l
                    .devices
                    .values()
                    .any(|d| d.stage == k && d.state.took_it());
                if updated_here && !blocking.is_empty() {
                    let wait = l.record.policy.gates.wait.as_millis() as u64;
                    if now_ms >= since + bake + wait {
                        let names: Vec<&str> = blocking.iter().map(|e| e.gate.name()).collect();
                        let reason = format!(
                            "stage {}: gates {} could not judge by the end of the bake",
                            k + 1,
                            names.join(", ")
                        );
                        l.record.state = RolloutState::Paused {
                            reason: reason.clone(),
                            by: GATEWAY.to_owned(),
                        };
                        let detail = serde_json::to_value(&l.record.gates).unwrap_or_default();
                        audit(
                            &mut l.record,
                            actions,
                            now_ms,
                            GATEWAY,
                            "paused",
                            reason,
                            detail,
                        );
                        l.record.updated_ms = now_ms;
                        actions.push(Action::Save(Box::new(l.record.clone())));
                    }
                    return;
                }
                // The stage passed.
                for d in l.devices.values_mut() {
                    if d.stage <= k && d.state == DeviceState::Installed {
                        d.state = DeviceState::Healthy;
                        d.updated_ms = now_ms;
                        actions.push(Action::SaveDevice(id, Box::new(d.clone())));
                    }
                }
                let detail = serde_json::to_value(&l.record.gates).unwrap_or_default();
                audit(
                    &mut l.record,
                    actions,
                    now_ms,
                    GATEWAY,
                    "stage_passed",
                    format!("stage {} passed its bake and every health gate", k + 1),
                    detail,
                );
                if k + 1 == l.sizes.len() {
                    l.record.state = RolloutState::Completed;
                    l.record.finished_ms = Some(now_ms);
                    let total = l.devices.len();
                    let healthy = l
                        .devices
                        .values()
                        .filter(|d| d.state == DeviceState::Healthy)
                        .count();
                    audit(
                        &mut l.record,
                        actions,
                        now_ms,
                        GATEWAY,
                        "completed",
                        format!("{healthy} of {total} devices run the new version"),
                        json!({ "healthy": healthy, "devices": total }),
                    );
                    l.record.updated_ms = now_ms;
                    actions.push(Action::Save(Box::new(l.record.clone())));
                } else {
                    l.record.stage = k + 1;
                    l.record.baking_since_ms = None;
                    stage_started(l, actions, now_ms);
                    self.drive(id, now_ms, actions);
                }
            }
        }
    }

    /// The gateway stops rollout `id` and rolls its updated devices back (`event` names why
    /// in the audit log).
    fn roll_back(
        &mut self,
        id: u64,
        event: &str,
        message: String,
        detail: serde_json::Value,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        self.stop(id, true, GATEWAY, event, message, detail, now_ms, actions);
    }

    /// Ends a rollout: cancels downloads in flight and, with `rollback`, sends every device that
    /// took the new version back.
    #[allow(clippy::too_many_arguments)]
    fn stop(
        &mut self,
        id: u64,
        rollback: bool,
        by: &str,
        event: &str,
        reason: String,
        detail: serde_json::Value,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let ttl = self.settings.directive_ttl_ms;
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        l.record.state = if rollback {
            RolloutState::RolledBack {
                reason: reason.clone(),
                by: by.to_owned(),
            }
        } else {
            RolloutState::Aborted {
                reason: reason.clone(),
                by: by.to_owned(),
            }
        };
        l.record.finished_ms = Some(now_ms);
        l.record.updated_ms = now_ms;
        audit(&mut l.record, actions, now_ms, by, event, reason, detail);
        let new = Installed {
            name: l.record.name.clone(),
            version: l.record.version.clone(),
            release: l.record.release,
        };
        let mut order: Vec<&mut RolloutDevice> = l.devices.values_mut().collect();
        order.sort_by_key(|d| d.order);
        let (mut sent, mut cancelled, mut stuck) = (0u64, 0u64, 0u64);
        let mut device_actions = Vec::new();
        for d in order {
            match d.state {
                DeviceState::Updating => {
                    if let Some(t) = d.transfer {
                        device_actions.push(Action::CancelTransfer {
                            transfer: t,
                            by: format!("rollout {id} stopped"),
                        });
                        self.by_transfer.remove(&t);
                    }
                    d.state = DeviceState::Cancelled;
                    cancelled += 1;
                }
                DeviceState::Installed | DeviceState::Healthy if rollback => {
                    if d.from.is_some() && d.transfer.is_some() {
                        directive(
                            id,
                            l.record.kind,
                            d,
                            &new,
                            0,
                            ttl,
                            now_ms,
                            &mut device_actions,
                        );
                        sent += 1;
                    } else {
                        d.state = DeviceState::RollbackFailed {
                            reason:
                                "nothing to go back to: the device had no earlier version of it"
                                    .to_owned(),
                        };
                        stuck += 1;
                    }
                }
                _ => continue,
            }
            d.updated_ms = now_ms;
            actions.push(Action::SaveDevice(id, Box::new(d.clone())));
        }
        if rollback {
            let message = format!(
                "rollback: {sent} directives sent, {cancelled} downloads cancelled, {stuck} devices without an earlier version"
            );
            audit(
                &mut l.record,
                actions,
                now_ms,
                GATEWAY,
                "rollback_sent",
                message,
                json!({ "directives": sent, "cancelled": cancelled, "no_previous": stuck }),
            );
        }
        actions.push(Action::Save(Box::new(l.record.clone())));
        actions.extend(device_actions);
        let keep: Vec<String> = l
            .devices
            .values()
            .filter(|d| {
                rollback
                    && matches!(
                        d.state,
                        DeviceState::RollbackSent { .. } | DeviceState::Cancelled
                    )
            })
            .map(|d| d.device.clone())
            .collect();
        self.by_device
            .retain(|dev, r| *r != id || keep.contains(dev));
    }
}

/// Devices left out of a rollout, with why.
pub type Skipped = Vec<(String, String)>;

/// Why the writer could not start a rollout's transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartRefusal {
    /// Another update of the device is in progress: try later.
    Busy,
    /// It already runs this release (or a newer one).
    AlreadyRuns,
    /// Anything else (no artifact for its hardware any more, the manifest expired...).
    Refused(String),
}

fn verdicts(evals: &[GateEval]) -> Vec<(Gate, Verdict)> {
    evals.iter().map(|e| (e.gate, e.verdict)).collect()
}

fn show(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"))
}

fn audit(
    record: &mut RolloutRecord,
    actions: &mut Vec<Action>,
    now_ms: u64,
    by: &str,
    event: &str,
    message: String,
    detail: serde_json::Value,
) {
    let n = record.audit_len;
    record.audit_len += 1;
    actions.push(Action::Audit(
        record.id,
        n,
        AuditEntry {
            at_ms: now_ms,
            by: by.to_owned(),
            event: event.to_owned(),
            message,
            detail: detail.to_string(),
        },
    ));
}

fn stage_started(l: &mut Live, actions: &mut Vec<Action>, now_ms: u64) {
    let k = l.record.stage;
    l.record.stage_started_ms = now_ms;
    let size = l.sizes[k];
    let new = l.devices.values().filter(|d| d.stage == k).count();
    audit(
        &mut l.record,
        actions,
        now_ms,
        GATEWAY,
        "stage_started",
        format!(
            "stage {} of {}: {new} more devices, {size} in all",
            k + 1,
            l.sizes.len()
        ),
        json!({ "stage": k, "new_devices": new, "cumulative": size }),
    );
    l.record.updated_ms = now_ms;
    actions.push(Action::Save(Box::new(l.record.clone())));
}

/// Starts transfers for pending online devices of the stages reached, in rollout order, while
/// the stage's concurrency allows. When devices of the stages reached are offline, the next
/// online devices in order take their places, so that a stage is judged on as many devices as
/// planned; the offline ones are updated when they return.
fn start_updates(l: &mut Live, online: &HashSet<String>, now_ms: u64, actions: &mut Vec<Action>) {
    let completed = l.record.state == RolloutState::Completed;
    let k = if completed {
        l.sizes.len() - 1
    } else {
        l.record.stage
    };
    if !completed {
        let away =
            |d: &RolloutDevice| d.state == DeviceState::Pending && !online.contains(&d.device);
        let present = l
            .devices
            .values()
            .filter(|d| d.stage <= k && !away(d))
            .count() as u64;
        let missing = l.sizes[k].saturating_sub(present) as usize;
        if missing > 0 {
            let mut later: Vec<&mut RolloutDevice> = l
                .devices
                .values_mut()
                .filter(|d| {
                    d.stage > k && d.state == DeviceState::Pending && online.contains(&d.device)
                })
                .collect();
            later.sort_by_key(|d| d.order);
            let mut pulled = Vec::new();
            for d in later.into_iter().take(missing) {
                d.stage = k;
                d.updated_ms = now_ms;
                actions.push(Action::SaveDevice(l.record.id, Box::new(d.clone())));
                pulled.push(d.device.clone());
            }
            if !pulled.is_empty() {
                let message = format!(
                    "stage {}: {} devices offline, {} taken from later stages in their place",
                    k + 1,
                    missing,
                    pulled.len()
                );
                audit(
                    &mut l.record,
                    actions,
                    now_ms,
                    GATEWAY,
                    "pulled_forward",
                    message,
                    json!({ "stage": k, "devices": pulled }),
                );
                actions.push(Action::Save(Box::new(l.record.clone())));
            }
        }
    }
    let stage = &l.record.policy.stages[k];
    let in_flight = l
        .devices
        .values()
        .filter(|d| d.state == DeviceState::Updating)
        .count();
    let room = stage.max_concurrent.saturating_sub(in_flight);
    if room == 0 {
        return;
    }
    l.blocked.retain(|_, until| *until > now_ms);
    let mut ready: Vec<&mut RolloutDevice> = l
        .devices
        .values_mut()
        .filter(|d| {
            d.stage <= k
                && d.state == DeviceState::Pending
                && online.contains(&d.device)
                && !l.blocked.contains_key(&d.device)
        })
        .collect();
    ready.sort_by_key(|d| d.order);
    for d in ready.into_iter().take(room) {
        // Marked before the writer answers, so that the next device counts it in flight.
        d.state = DeviceState::Updating;
        d.updated_ms = now_ms;
        actions.push(Action::StartTransfer {
            rollout: l.record.id,
            device: d.device.clone(),
            timeout_ms: stage.device_timeout.as_millis() as u64,
            retries: stage.retries,
        });
        l.health.forget(&d.device);
    }
}

/// The first abort threshold stage `k` has reached, with the numbers.
fn abort_reached(l: &Live, k: usize) -> Option<(String, serde_json::Value)> {
    let stage = &l.record.policy.stages[k];
    let of_stage: Vec<&RolloutDevice> = l.devices.values().filter(|d| d.stage == k).collect();
    let finished = of_stage.iter().filter(|d| d.state.finished()).count() as u64;
    let need = stage.min_reporting.min(of_stage.len() as u64).max(1);
    let count =
        |f: fn(&DeviceState) -> bool| of_stage.iter().filter(|d| f(&d.state)).count() as u64;
    for (name, n, t) in [
        (
            "failed",
            count(|s| matches!(s, DeviceState::Failed { .. })),
            stage.abort.failed,
        ),
        (
            "rejected",
            count(|s| matches!(s, DeviceState::Rejected { .. })),
            stage.abort.rejected,
        ),
        (
            "timed out",
            count(|s| *s == DeviceState::TimedOut),
            stage.abort.timed_out,
        ),
    ] {
        let pct = if finished == 0 {
            0.0
        } else {
            n as f64 * 100.0 / finished as f64
        };
        let by_count = n >= t.count;
        let by_share = n > 0 && finished >= need && pct >= t.pct;
        if by_count || by_share {
            let message = format!(
                "stage {}: {n} devices {name} of {finished} finished ({pct:.1} %); the limit is {} devices or {:.1} %",
                k + 1,
                if t.count == u64::MAX {
                    "no".to_owned()
                } else {
                    t.count.to_string()
                },
                t.pct
            );
            let detail = json!({ "stage": k, "outcome": name, "count": n, "finished": finished, "pct": pct, "limit_count": t.count, "limit_pct": t.pct });
            return Some((message, detail));
        }
    }
    None
}

/// Puts a device in `rollback_sent` and asks for its directive.
#[allow(clippy::too_many_arguments)]
fn directive(
    rollout: u64,
    kind: ArtifactKind,
    d: &mut RolloutDevice,
    new: &Installed,
    sent_before: u32,
    ttl_ms: u64,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    let (Some(from), Some(transfer)) = (d.from.clone(), d.transfer) else {
        return;
    };
    d.state = DeviceState::RollbackSent {
        command: 0,
        sent: sent_before + 1,
    };
    actions.push(Action::SendRollback {
        rollout,
        device: d.device.clone(),
        transfer,
        kind,
        from: new.clone(),
        to: from,
        expires_ms: now_ms + ttl_ms,
    });
}

#[cfg(test)]
mod tests;
