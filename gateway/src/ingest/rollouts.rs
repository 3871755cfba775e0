//! The writer's side of rollouts: creating them, feeding the rollout engine hellos, presence,
//! telemetry, alerts, transfer outcomes, acknowledgements and time, and carrying out what it
//! decides inside the batch's transaction (saves, transfers, signed rollback directives sent
//! after the commit).

use std::collections::VecDeque;

use fleetgate_config::RolloutPolicy;
use fleetgate_protocol::{
    AckStatus, Action, ArtifactKind, Command, Downlink, Installed, RollbackDirective, Telemetry,
    encode,
};

use super::transfers::{Unfit, running};
use super::{ControlError, Effects, Writer};
use crate::drift::engine::{ALL, StreamKey};
use crate::model::{CommandRecord, CommandState, Stamp, TransferRecord, TransferState};
use crate::rollouts::health::{DriftInput, Sample};
use crate::rollouts::model::{RolloutRecord, RolloutState, Target};
use crate::rollouts::plan::Candidate;
use crate::rollouts::{self, OperatorAction, Outcome, StartRefusal, View};
use crate::storage::{self, Tables, schema};
use crate::updates::{Event, Limits};

/// What an operator asks to roll out.
#[derive(Debug, Clone)]
pub struct RolloutRequest {
    pub kind: ArtifactKind,
    pub name: String,
    /// A version or an alias.
    pub version: String,
    pub target: Target,
    /// The configured policy with the request's overrides.
    pub policy: RolloutPolicy,
    /// A validate stage before the first production stage.
    pub validate: Option<ValidateRequest>,
}

/// A rollout's validate stage as asked (unset values from `[validation]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ValidateRequest {
    pub min_devices: Option<u32>,
    pub timeout: Option<std::time::Duration>,
}

impl ValidateRequest {
    /// Checks a validate stage as a request writes it (`min_devices`, `timeout` such as `30m`);
    /// the error names the field (`validate.timeout`).
    pub fn parse(min_devices: Option<u32>, timeout: Option<&str>) -> Result<Self, String> {
        if min_devices.is_some_and(|k| !(1..=1000).contains(&k)) {
            return Err("validate.min_devices must be within 1..=1000".to_owned());
        }
        let timeout = match timeout {
            None => None,
            Some(t) => {
                let d = humantime::parse_duration(t)
                    .map_err(|e| format!("validate.timeout {t:?}: {e}"))?;
                if d < std::time::Duration::from_secs(1)
                    || d > std::time::Duration::from_secs(30 * 86_400)
                {
                    return Err("validate.timeout must be within 1s..=30d".to_owned());
                }
                Some(d)
            }
        };
        Ok(ValidateRequest {
            min_devices,
            timeout,
        })
    }
}

/// A new rollout and the devices of its target it leaves out, with why.
#[derive(Debug, Clone)]
pub struct RolloutCreated {
    pub record: RolloutRecord,
    pub skipped: Vec<(String, String)>,
}

impl Writer {
    pub(super) fn create_rollout(
        &mut self,
        t: &mut Tables<'_>,
        req: RolloutRequest,
        by: &str,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Result<RolloutCreated, ControlError>> {
        let release = match self.release_of(req.kind, &req.name, &req.version)? {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        if let Target::Devices(ids) = &req.target
            && let Some(unknown) = ids.iter().find(|d| !self.devices.contains_key(*d))
        {
            return Ok(Err(ControlError::NotFound(format!("device {unknown}"))));
        }
        let mut candidates = Vec::new();
        let mut skipped = Vec::new();
        let mut classes = std::collections::BTreeSet::new();
        let mut ids: Vec<&String> = self.devices.keys().collect();
        ids.sort();
        for id in ids {
            let s = &self.devices[id];
            if s.device.revoked() || !req.target.matches(id, &s.device.labels) {
                continue;
            }
            if self.validation_settings.is_bench(&s.device.labels) {
                skipped.push((
                    id.clone(),
                    "bench device: it validates releases, never in a production rollout".to_owned(),
                ));
                continue;
            }
            let Some(hello) = &s.device.hello else {
                skipped.push((
                    id.clone(),
                    "has not said hello yet: it joins the rollout when it does".to_owned(),
                ));
                continue;
            };
            match self.fit(id, &release, req.kind, now, false) {
                Ok(_) | Err(Unfit::Busy(_)) => {
                    classes.insert(hello.hardware.class.clone());
                    candidates.push(Candidate {
                        device: id.clone(),
                        stratum: stratum(&s.device, hello, &req.policy.stratify),
                        running: running(hello, req.kind, &req.name),
                    })
                }
                Err(why) => skipped.push((id.clone(), why.to_string())),
            }
        }
        let id = self.next_rollout_id;
        let record = RolloutRecord {
            id,
            kind: release.kind,
            name: release.name.clone(),
            version: release.version.clone(),
            release: release.release,
            target: req.target,
            policy: req.policy,
            planned: 0,
            state: RolloutState::Running,
            stage: 0,
            stage_started_ms: now,
            baking_since_ms: None,
            gates: Vec::new(),
            created: Stamp {
                at_ms: now,
                by: by.to_owned(),
            },
            updated_ms: now,
            finished_ms: None,
            audit_len: 0,
        };
        let validate = match req.validate {
            Some(v) if self.validation_settings.bench_labels.is_empty() => {
                let _ = v;
                return Ok(Err(ControlError::BadRequest(
                    "a validate stage needs bench devices: none are configured (validation.bench_labels)"
                        .to_owned(),
                )));
            }
            Some(v) => Some(rollouts::validate::ValidateStage {
                min_devices: v
                    .min_devices
                    .unwrap_or(self.validation_settings.min_devices),
                timeout_ms: v
                    .timeout
                    .unwrap_or(self.validation_settings.timeout)
                    .as_millis() as u64,
                classes: classes.into_iter().collect(),
                started_ms: now,
                state: rollouts::validate::StageState::Waiting,
            }),
            None => None,
        };
        let (actions, busy) = match self
            .rollouts
            .create_validated(record, candidates, validate, now)
        {
            Ok(done) => done,
            Err(rollouts::Refused::NoDevices(more)) => {
                skipped.extend(more);
                return Ok(Err(ControlError::BadRequest(no_devices(&skipped))));
            }
            Err(e) => return Ok(Err(ControlError::Conflict(e.to_string()))),
        };
        skipped.extend(busy);
        self.next_rollout_id += 1;
        t.set_meta(schema::META_NEXT_ROLLOUT_ID, self.next_rollout_id)?;
        self.rollout_actions(t, actions, now, fx)?;
        // Results already stored (from `validate run`) count; the rest are started.
        if let Some(r) = self.rollouts.record(id).cloned() {
            for v in self.store.validation_results(r.kind, &r.name, r.release)? {
                let actions = self.rollouts.validation_result(
                    r.kind,
                    &r.name,
                    r.release,
                    &v.class,
                    &v.device,
                    super::validation::bench_result(&v),
                    now,
                );
                self.rollout_actions(t, actions, now, fx)?;
            }
        }
        self.validation_wanted(t, None, now, fx)?;
        Ok(match self.rollouts.record(id).cloned() {
            Some(record) => Ok(RolloutCreated { record, skipped }),
            None => Err(ControlError::Storage(format!("rollout {id} was not kept"))),
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rollout_operator(
        &mut self,
        t: &mut Tables<'_>,
        id: u64,
        action: OperatorAction,
        by: &str,
        reason: Option<String>,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Result<RolloutRecord, ControlError>> {
        match self.rollouts.operator(id, action, by, reason, now) {
            Ok(actions) => {
                self.rollout_actions(t, actions, now, fx)?;
                Ok(self
                    .rollouts
                    .record(id)
                    .cloned()
                    .ok_or_else(|| ControlError::NotFound(format!("rollout {id}"))))
            }
            Err(rollouts::Refused::NotFound(_)) => Ok(Err(match t.rollout_exists(id)? {
                true => ControlError::Conflict(format!(
                    "rollout {id} has ended; nothing more can be done with it"
                )),
                false => ControlError::NotFound(format!("rollout {id}")),
            })),
            Err(e) => Ok(Err(ControlError::Conflict(e.to_string()))),
        }
    }

    pub(super) fn rollout_views(&self, id: Option<u64>) -> Vec<View> {
        match id {
            Some(id) => self.rollouts.view(id).into_iter().collect(),
            None => self
                .rollouts
                .active()
                .filter_map(|r| self.rollouts.view(r.id))
                .collect(),
        }
    }

    /// After a hello: the device's rollout learns what it runs; a device that matches a rollout's
    /// target and is not in it yet joins.
    pub(super) fn rollouts_hello(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        let Some(s) = self.devices.get(device) else {
            return Ok(());
        };
        let Some(hello) = s.device.hello.clone() else {
            return Ok(());
        };
        let mut join = Vec::new();
        let bench = self.validation_settings.is_bench(&s.device.labels);
        if self.rollouts.rollout_of(device).is_none() && !bench {
            let active: Vec<RolloutRecord> = self.rollouts.active().cloned().collect();
            for r in active {
                if !r.target.matches(device, &s.device.labels) {
                    continue;
                }
                let Some(release) = self
                    .store
                    .release(r.kind, &r.name, &r.version.to_string())?
                else {
                    continue;
                };
                if matches!(
                    self.fit(device, &release, r.kind, now, false),
                    Ok(_) | Err(Unfit::Busy(_))
                ) {
                    join.push((
                        r.id,
                        Candidate {
                            device: device.to_owned(),
                            stratum: stratum(&s.device, &hello, &r.policy.stratify),
                            running: running(&hello, r.kind, &r.name),
                        },
                    ));
                }
            }
        }
        let actions =
            self.rollouts
                .hello(device, |kind, name| running(&hello, kind, name), join, now);
        self.rollout_actions(t, actions, now, fx)?;
        if bench {
            self.validation_wanted(t, Some(device), now, fx)?;
        }
        Ok(())
    }

    pub(super) fn rollouts_offline(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        let actions = self.rollouts.offline(device, now);
        self.rollout_actions(t, actions, now, fx)
    }

    pub(super) fn rollouts_telemetry(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        tel: &Telemetry,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        if self.rollouts.rollout_of(device).is_none() {
            return Ok(());
        }
        let m = tel.model.as_ref();
        let sample = Sample {
            latency_us: tel.hw.inference_latency_us,
            free_mem_bytes: tel.hw.free_mem_bytes,
            temp_c: tel.hw.temp_c,
            power_mw: tel.hw.power_mw,
            class_counts: m.map(|m| m.class_counts.clone()).unwrap_or_default(),
            inferences: m.map_or(0, |m| m.inferences),
            mean_confidence: m.and_then(|m| m.mean_confidence),
        };
        let model = m.map(|m| (m.name.as_str(), &m.version));
        let actions = self.rollouts.telemetry(device, model, &sample, now);
        self.rollout_actions(t, actions, now, fx)
    }

    pub(super) fn rollouts_alert(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        if self.rollouts.rollout_of(device).is_none() {
            return Ok(());
        }
        let actions = self.rollouts.alert(device, now);
        self.rollout_actions(t, actions, now, fx)
    }

    /// A device acknowledged a command; rollback directives matter to their rollout.
    pub(super) fn rollouts_ack(
        &mut self,
        t: &mut Tables<'_>,
        cmd: &CommandRecord,
        status: &AckStatus,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        if !matches!(cmd.action, Action::Rollback(_)) {
            return Ok(());
        }
        let result = match status {
            AckStatus::Done => Ok(()),
            AckStatus::Rejected { reason } => Err(reason.clone()),
            AckStatus::Unsupported => Err("the device does not support rollback".to_owned()),
        };
        let actions = self.rollouts.rollback_ack(&cmd.device, cmd.id, result, now);
        self.rollout_actions(t, actions, now, fx)
    }

    /// A transfer reached a final state.
    pub(super) fn rollouts_transfer_finished(
        &mut self,
        t: &mut Tables<'_>,
        record: &TransferRecord,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        if !self.rollouts.is_tracked_transfer(record.id) {
            return Ok(());
        }
        let outcome = match &record.state {
            TransferState::Installed => Outcome::Installed,
            TransferState::Failed { reason, detail } => {
                Outcome::Failed(format!("{}: {detail}", reason.name()))
            }
            TransferState::Rejected { reason, detail } => {
                Outcome::Rejected(format!("{}: {detail}", reason.name()))
            }
            TransferState::TimedOut => Outcome::TimedOut,
            TransferState::Cancelled { .. } => Outcome::Cancelled,
            _ => return Ok(()),
        };
        let actions = self.rollouts.transfer_finished(record.id, outcome, now);
        self.rollout_actions(t, actions, now, fx)
    }

    /// Time passed: the drift engine's view of each model rollout, then the rollout timers.
    pub(super) fn rollouts_tick(
        &mut self,
        t: &mut Tables<'_>,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        for (id, model, new, old) in self.rollouts.drift_pairs() {
            let key = |version| StreamKey {
                model: model.clone(),
                version,
                cohort: ALL.to_owned(),
            };
            let input =
                if self.baseline(&model, &new).is_none() || self.baseline(&model, &old).is_none() {
                    DriftInput::Off
                } else {
                    match self.drift.worse(&key(new), &key(old)) {
                        Some(c) => DriftInput::Compared(c),
                        None => DriftInput::Unknown,
                    }
                };
            self.rollouts.set_drift(id, input);
        }
        let actions = self.rollouts.tick(now);
        self.rollout_actions(t, actions, now, fx)?;
        self.validation_wanted(t, None, now, fx)?;
        let active = self
            .rollouts
            .active()
            .filter(|r| r.state.is_active())
            .count();
        self.metrics.rollouts_active.set(active as i64);
        Ok(())
    }

    /// Carries out the rollout engine's actions, and what its answers to them decide.
    pub(super) fn rollout_actions(
        &mut self,
        t: &mut Tables<'_>,
        actions: Vec<rollouts::Action>,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        let mut queue: VecDeque<rollouts::Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                rollouts::Action::Save(r) => t.put_rollout(&r)?,
                rollouts::Action::SaveDevice(id, d) => t.put_rollout_device(id, &d)?,
                rollouts::Action::SaveValidation(id, stage) => {
                    t.put_rollout_validation(id, &stage)?
                }
                rollouts::Action::Audit(id, n, e) => {
                    tracing::info!(rollout = id, event = %e.event, by = %e.by, message = %e.message, "rollout");
                    t.put_audit(id, n, &e)?;
                    self.record_rollout(t, id, &e)?
                }
                rollouts::Action::StartTransfer {
                    rollout,
                    device,
                    timeout_ms,
                    retries,
                } => {
                    let limits = Limits {
                        stall_ms: timeout_ms,
                        retries,
                    };
                    let next =
                        match self.start_rollout_transfer(t, rollout, &device, limits, now, fx)? {
                            Ok(transfer) => self
                                .rollouts
                                .transfer_started(rollout, &device, transfer, now),
                            Err(refusal) => self
                                .rollouts
                                .transfer_refused(rollout, &device, refusal, now),
                        };
                    queue.extend(next);
                }
                rollouts::Action::CancelTransfer { transfer, by } => {
                    if self.updates.transfer(transfer).is_some() {
                        self.update_event(t, Event::Cancel { id: transfer, by }, now, fx)?;
                    }
                }
                rollouts::Action::SendRollback {
                    rollout,
                    device,
                    transfer,
                    kind,
                    from,
                    to,
                    expires_ms,
                } => {
                    let command = self.send_rollback(
                        t, rollout, &device, transfer, kind, from, to, expires_ms, now, fx,
                    )?;
                    queue.extend(self.rollouts.rollback_sent(rollout, &device, command, now));
                }
            }
        }
        Ok(())
    }

    fn start_rollout_transfer(
        &mut self,
        t: &mut Tables<'_>,
        rollout: u64,
        device: &str,
        limits: Limits,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Result<u64, StartRefusal>> {
        let Some(r) = self.rollouts.record(rollout).cloned() else {
            return Ok(Err(StartRefusal::Refused("the rollout is gone".into())));
        };
        let Some(release) = self
            .store
            .release(r.kind, &r.name, &r.version.to_string())?
        else {
            return Ok(Err(StartRefusal::Refused(format!(
                "release {} {} is no longer registered",
                r.name, r.version
            ))));
        };
        let artifact = match self.fit(device, &release, r.kind, now, false) {
            Ok(a) => a,
            Err(Unfit::Busy(_)) => return Ok(Err(StartRefusal::Busy)),
            Err(Unfit::Runs(_)) => return Ok(Err(StartRefusal::AlreadyRuns)),
            Err(Unfit::Skip(why)) => return Ok(Err(StartRefusal::Refused(why))),
        };
        let record = self.new_transfer(
            device,
            &release,
            &artifact,
            &format!("rollout {rollout}"),
            now,
        );
        let id = record.id;
        t.set_meta(schema::META_NEXT_TRANSFER_ID, self.next_transfer_id)?;
        self.update_event(t, Event::StartLimited(record, limits), now, fx)?;
        Ok(Ok(id))
    }

    /// Signs a rollback directive, records it as a command and queues it for the device.
    #[allow(clippy::too_many_arguments)]
    fn send_rollback(
        &mut self,
        t: &mut Tables<'_>,
        rollout: u64,
        device: &str,
        transfer: u64,
        kind: ArtifactKind,
        from: Installed,
        to: Installed,
        expires_ms: u64,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<u64> {
        let id = self.next_command_id;
        self.next_command_id += 1;
        t.set_meta(schema::META_NEXT_COMMAND_ID, self.next_command_id)?;
        let Some(key) = self.rollback_key.clone() else {
            tracing::error!(
                rollout,
                device,
                "no rollback signing key: directive not sent"
            );
            return Ok(id);
        };
        let directive = RollbackDirective {
            device: device.to_owned(),
            rollout,
            transfer,
            kind,
            from,
            to,
            issued_ms: now,
            expires_ms,
        };
        let action = Action::Rollback(directive.sign(&key));
        let encoding = self
            .devices
            .get(device)
            .map_or(fleetgate_protocol::Encoding::Postcard, |s| {
                s.device.encoding
            });
        let command = Command { id, action };
        match encode(&command, encoding) {
            Ok(payload) => {
                fx.downlinks
                    .push((device.to_owned(), Downlink::Command, encoding, payload))
            }
            Err(e) => {
                tracing::error!(rollout, device, error = %e, "cannot encode a rollback directive")
            }
        }
        let record = CommandRecord {
            id,
            device: device.to_owned(),
            action: command.action,
            created: Stamp {
                at_ms: now,
                by: format!("rollout {rollout}"),
            },
            state: CommandState::Sent,
            answered_ms: None,
        };
        t.put_command(&record)?;
        self.metrics.rollback_directives.inc();
        Ok(id)
    }

    /// Restarts the rollout engine from storage, with the stage limits of transfers in flight.
    pub(super) fn restore_rollouts(
        &mut self,
        rollouts: Vec<(RolloutRecord, Vec<rollouts::model::RolloutDevice>)>,
    ) -> Vec<(u64, Limits)> {
        let mut limits = Vec::new();
        for (r, devices) in rollouts {
            for d in &devices {
                if let Some(transfer) = d.transfer
                    && let Some(stage) = r.policy.stages.get(d.stage)
                {
                    limits.push((
                        transfer,
                        Limits {
                            stall_ms: stage.device_timeout.as_millis() as u64,
                            retries: stage.retries,
                        },
                    ));
                }
            }
            self.rollouts.restore(r, devices);
        }
        limits
    }
}

/// Why a rollout would have no device: the target's devices and why each was left out (the
/// first few), or that the target matches no enrolled device at all.
fn no_devices(skipped: &[(String, String)]) -> String {
    if skipped.is_empty() {
        return "the target matches no enrolled device (check the labels or ids)".to_owned();
    }
    let shown: Vec<String> = skipped
        .iter()
        .take(5)
        .map(|(d, why)| format!("{d}: {why}"))
        .collect();
    let more = skipped.len().saturating_sub(shown.len());
    let tail = if more > 0 {
        format!("; and {more} more")
    } else {
        String::new()
    };
    format!(
        "no device of the target can take this release ({}{tail})",
        shown.join("; ")
    )
}

/// A device's stratum for a rollout: its hardware class and the values of the stratifying labels.
fn stratum(
    device: &crate::model::Device,
    hello: &fleetgate_protocol::Hello,
    labels: &[String],
) -> String {
    let mut s = hello.hardware.class.clone();
    for l in labels {
        s.push('|');
        s.push_str(l);
        s.push('=');
        s.push_str(device.labels.get(l).map_or("", String::as_str));
    }
    s
}
