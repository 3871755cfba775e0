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
//! - No stage passes on data it does not have: a gate is `no_control` only when no device is
//!   left to compare with (none pending in a later stage, online or not), and verdicts are
//!   judged afresh at the end of a bake, never taken from before a restart (its window is gone,
//!   so after a restart a gate waits for `min_samples` of both cohorts again).
//! - A device is claimed by at most one rollout that may still act on it: to update it (pending
//!   or updating), or to see its rollback through. A completed rollout lets go of the devices it
//!   updated, so the next rollout, of any artifact, can take them.
//! - An event costs what it concerns: each rollout's members keep their counts and queues as
//!   indexes (`members`), so a reconnect storm of N devices is O(N log N) in all.

pub mod health;
mod members;
pub mod model;
pub mod plan;
mod presence;
mod progress;
mod stop;
pub mod validate;

use std::collections::{BTreeMap, HashMap, HashSet};

use fleetgate_protocol::{ArtifactKind, Installed};
use semver::Version;
use serde_json::json;

use self::health::{Cohort, DriftInput, Health, Sample};
use self::members::Members;
use self::model::{AuditEntry, DeviceState, Gate, RolloutDevice, RolloutRecord, RolloutState};
use self::plan::Candidate;

/// Directives sent to one device before it counts as `rollback_failed`.
pub const MAX_DIRECTIVES: u32 = 3;
/// Gates are judged at most this often on traffic (and on every tick).
const EVAL_EVERY_MS: u64 = 200;
/// A device whose transfer could not start (another update in progress) is tried again after.
const RETRY_START_MS: u64 = 10_000;
/// After a restart, devices of a stage are not replaced by later ones for being offline until
/// this long has passed: they are reconnecting, not gone.
const RECONNECT_GRACE_MS: u64 = 30_000;
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
    /// Save a rollout's validate stage (`validate`).
    SaveValidation(u64, Box<validate::ValidateStage>),
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
    /// No device of the target can take the release (every one skipped, with why).
    #[error("no device of the target can take this release")]
    NoDevices(Skipped),
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
    members: Members,
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
    /// Taken back after a restart: when this engine first drove it (see `RECONNECT_GRACE_MS`).
    restored: Option<Option<u64>>,
    /// Devices whose last hello said they run the new version (one can run it before its
    /// transfer is reported finished: its last report was still on the way).
    runs_new: HashSet<String>,
    /// Updating devices that are offline, since when. One rebooting into the new version is
    /// waited for; one gone for longer than its stage's `device_timeout` no longer holds the
    /// stage (it is updated if it returns).
    gone: HashMap<String, u64>,
    /// The validate stage, if the rollout has one (`validate`).
    validate: Option<validate::Gate>,
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

/// Whether a rollout keeps a device (to update it, or to see its rollback through).
fn claims(state: &RolloutState, d: &RolloutDevice) -> bool {
    match state {
        RolloutState::Running | RolloutState::Paused { .. } => {
            !matches!(d.state, DeviceState::RolledBack)
        }
        // It still updates the devices that were away; the others are done with it.
        RolloutState::Completed => {
            matches!(d.state, DeviceState::Pending | DeviceState::Updating)
        }
        RolloutState::RolledBack { .. } => matches!(
            d.state,
            DeviceState::RollbackSent { .. } | DeviceState::Cancelled
        ),
        RolloutState::Aborted { .. } => false,
    }
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

    /// Takes back a stored rollout after a restart (its devices as stored). Its gate verdicts
    /// are not: the window they were judged on is gone.
    pub fn restore(&mut self, mut record: RolloutRecord, devices: Vec<RolloutDevice>) {
        let id = record.id;
        record.gates.clear();
        let sizes = plan::sizes(&record.policy.stages, record.planned);
        let mut members = Members::new(sizes.len());
        let mut resend = HashSet::new();
        for d in devices {
            if matches!(d.state, DeviceState::RollbackSent { .. }) {
                resend.insert(d.device.clone());
            }
            if claims(&record.state, &d) {
                self.by_device.insert(d.device.clone(), id);
            }
            if let (Some(t), DeviceState::Updating) = (d.transfer, &d.state) {
                self.by_transfer.insert(t, (id, d.device.clone()));
            }
            let online = self.online.contains(&d.device);
            members.insert(d, online);
        }
        members.set_current(record.stage);
        let health = Health::new(record.policy.gates.window);
        self.live.insert(
            id,
            Live {
                record,
                members,
                sizes,
                health,
                failing_since: BTreeMap::new(),
                last_eval_ms: 0,
                drift: DriftInput::Off,
                blocked: HashMap::new(),
                resend,
                restored: Some(None),
                runs_new: HashSet::new(),
                gone: HashMap::new(),
                validate: None,
            },
        );
        // As when it finished live: a rollout with nobody left to act on leaves memory (else a
        // restart would bring an ended rollout back to take late joiners).
        self.forget_finished(id);
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
        self.live.get(&rollout)?.members.get(device)
    }

    pub fn view(&self, id: u64) -> Option<View> {
        let l = self.live.get(&id)?;
        let mut counts = BTreeMap::new();
        let mut stage_counts = vec![BTreeMap::new(); l.sizes.len()];
        for d in l.members.values() {
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
                for d in l.members.values() {
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
    /// another rollout that may still update them are skipped with the reason; a rollout left
    /// with no device is refused.
    pub fn create(
        &mut self,
        record: RolloutRecord,
        candidates: Vec<Candidate>,
        now_ms: u64,
    ) -> Result<(Vec<Action>, Skipped), Refused> {
        self.create_validated(record, candidates, None, now_ms)
    }

    /// [`Engine::create`] with a validate stage before the first production stage (saved
    /// with `SaveValidation` before anything else the rollout decides).
    pub fn create_validated(
        &mut self,
        mut record: RolloutRecord,
        candidates: Vec<Candidate>,
        validate: Option<validate::ValidateStage>,
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
        let mut skipped = Vec::new();
        let candidates: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| match self.by_device.get(&c.device) {
                Some(&other) if !self.supersedes(other, &record) => {
                    skipped.push((c.device.clone(), format!("in rollout {other}")));
                    false
                }
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(Refused::NoDevices(skipped));
        }
        // A completed rollout of the same artifact stops serving its stragglers.
        let superseded: Vec<u64> = self
            .live
            .values()
            .filter(|l| self.supersedes(l.record.id, &record))
            .map(|l| l.record.id)
            .collect();
        for id in superseded {
            self.by_device.retain(|_, r| *r != id);
            self.live.remove(&id);
        }
        let id = record.id;
        record.planned = candidates.len() as u64;
        let sizes = plan::sizes(&record.policy.stages, record.planned);
        let mut members = Members::new(sizes.len());
        for (position, i) in plan::order(id, &candidates).into_iter().enumerate() {
            let c = &candidates[i];
            let d = RolloutDevice {
                device: c.device.clone(),
                stage: plan::stage_of(position as u64, &sizes),
                order: position as u64,
                state: DeviceState::Pending,
                transfer: None,
                from: c.running.clone(),
                updated_ms: now_ms,
            };
            members.insert(d, self.online.contains(&c.device));
            self.by_device.insert(c.device.clone(), id);
        }
        let mut actions = Vec::new();
        for d in members.in_order() {
            actions.push(Action::SaveDevice(id, Box::new(d.clone())));
        }
        let mut live = Live {
            health: Health::new(record.policy.gates.window),
            record,
            members,
            sizes,
            failing_since: BTreeMap::new(),
            last_eval_ms: 0,
            drift: DriftInput::Off,
            blocked: HashMap::new(),
            resend: HashSet::new(),
            restored: None,
            runs_new: HashSet::new(),
            gone: HashMap::new(),
            validate: validate.map(|stage| validate::Gate {
                stage,
                results: BTreeMap::new(),
            }),
        };
        if let Some(g) = &live.validate {
            actions.push(Action::SaveValidation(id, Box::new(g.stage.clone())));
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
        if live.validate.is_some() {
            validate::started(&mut live, &mut actions, now_ms);
        } else {
            progress::stage_started(&mut live, &mut actions, now_ms);
        }
        self.live.insert(id, live);
        self.drive(id, now_ms, &mut actions);
        Ok((actions, skipped))
    }

    /// Whether a new rollout of `record`'s artifact replaces rollout `other`: a completed
    /// rollout of the same artifact, which only still served its stragglers.
    fn supersedes(&self, other: u64, record: &RolloutRecord) -> bool {
        self.live.get(&other).is_some_and(|l| {
            l.record.kind == record.kind
                && l.record.name == record.name
                && l.record.state == RolloutState::Completed
        })
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
        if let Some(l) = self.live.get_mut(&rollout)
            && let Some(saved) = l.members.update(device, |d| {
                d.transfer = Some(transfer);
                d.state = DeviceState::Updating;
                d.updated_ms = now_ms;
            })
        {
            actions.push(Action::SaveDevice(rollout, Box::new(saved)));
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
        let state = match refusal {
            StartRefusal::Busy => {
                l.members.update(device, |d| d.state = DeviceState::Pending);
                l.blocked.insert(device.to_owned(), now_ms + RETRY_START_MS);
                return actions;
            }
            StartRefusal::AlreadyRuns => DeviceState::Installed,
            StartRefusal::Refused(reason) => DeviceState::Rejected { reason },
        };
        if let Some(saved) = l.members.update(device, |d| {
            d.state = state;
            d.updated_ms = now_ms;
        }) {
            actions.push(Action::SaveDevice(rollout, Box::new(saved)));
        }
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
        if !l
            .members
            .get(&device)
            .is_some_and(|d| d.state == DeviceState::Updating && d.transfer == Some(transfer))
        {
            return actions;
        }
        let state = match outcome {
            Outcome::Installed => DeviceState::Installed,
            Outcome::Failed(reason) => DeviceState::Failed { reason },
            Outcome::Rejected(reason) => DeviceState::Rejected { reason },
            Outcome::TimedOut => DeviceState::TimedOut,
            Outcome::Cancelled => DeviceState::Cancelled,
        };
        if let Some(saved) = l.members.update(&device, |d| {
            d.state = state;
            d.updated_ms = now_ms;
        }) {
            actions.push(Action::SaveDevice(id, Box::new(saved)));
        }
        l.health.forget(&device);
        l.gone.remove(&device);
        // A completed rollout is done with a straggler once it has its outcome.
        if l.record.state == RolloutState::Completed
            && l.members
                .get(&device)
                .is_some_and(|d| !claims(&l.record.state, d))
        {
            self.by_device.remove(&device);
        }
        self.drive(id, now_ms, &mut actions);
        self.forget_finished(id);
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
        let d = l.members.get(device)?;
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
        let Some(l) = self.live.get_mut(&id) else {
            return actions;
        };
        if !l.members.get(device).is_some_and(
            |d| matches!(d.state, DeviceState::RollbackSent { command: c, .. } if c == command),
        ) {
            return actions;
        }
        let state = match result {
            Ok(()) => DeviceState::RolledBack,
            Err(reason) => DeviceState::RollbackFailed { reason },
        };
        if let Some(saved) = l.members.update(device, |d| {
            d.state = state;
            d.updated_ms = now_ms;
        }) {
            actions.push(Action::SaveDevice(id, Box::new(saved)));
        }
        self.by_device.remove(device);
        self.forget_finished(id);
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
        if let Some(l) = self.live.get_mut(&rollout)
            && let Some(DeviceState::RollbackSent { sent, .. }) =
                l.members.get(device).map(|d| d.state.clone())
            && let Some(saved) = l.members.update(device, |d| {
                d.state = DeviceState::RollbackSent { command, sent };
                d.updated_ms = now_ms;
            })
        {
            actions.push(Action::SaveDevice(rollout, Box::new(saved)));
        }
        actions
    }

    /// Time passed: bakes end, gates are judged, blocked devices are tried again.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let ids: Vec<u64> = self.live.keys().copied().collect();
        for id in ids {
            self.evaluate(id, now_ms, &mut actions);
            self.drive(id, now_ms, &mut actions);
            self.forget_finished(id);
        }
        actions
    }

    /// Drops a rollout that can no longer act from memory (it stays in storage): aborted, or
    /// completed or rolled back with no device left to see through.
    fn forget_finished(&mut self, id: u64) {
        let Some(l) = self.live.get(&id) else {
            return;
        };
        let done = match &l.record.state {
            RolloutState::Running | RolloutState::Paused { .. } => false,
            RolloutState::Aborted { .. } => true,
            state => !l.members.values().any(|d| claims(state, d)),
        };
        if done {
            self.live.remove(&id);
            self.by_device.retain(|_, r| *r != id);
            self.by_transfer.retain(|_, (r, _)| *r != id);
        }
    }

    /// Panics unless every rollout's indexes match a count from scratch (tests).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        for l in self.live.values() {
            l.members.check();
        }
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

#[cfg(test)]
mod tests;
