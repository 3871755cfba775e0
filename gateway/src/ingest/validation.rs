//! The writer's side of validation: starting validation transfers on bench devices (asked by
//! an operator, or by a rollout's validate stage), offering them as `validate` commands with
//! the release's golden set, storing what each device measured (judged against the release's
//! signed requirements) in the transaction of the report that carried it, and telling the
//! rollout engine. A validation transfer is an update transfer in every other respect (slots,
//! window, stalls, retries), so the update engine runs it.

use std::collections::HashMap;

use fleetgate_protocol::{
    Action, ArtifactKind, Command, Downlink, Encoding, UpdateReport, UpdateState, ValidateOffer,
    encode,
};
use serde_json::json;

use super::uplink::Handled;
use super::{ControlError, Effects, Writer};
use crate::bus::Refusal;
use crate::metrics::Reject;
use crate::model::{Stamp, TransferRecord, TransferState};
use crate::rollouts::validate::BenchResult;
use crate::storage::{self, Tables, schema};
use crate::updates::Event;
use crate::validation::{self, Outcome, ValidationRecord, ValidationRun};

/// What an operator asks to validate.
#[derive(Debug, Clone)]
pub struct ValidationRequest {
    pub kind: ArtifactKind,
    pub name: String,
    /// A version or an alias.
    pub version: String,
    /// Bench devices to run it on; `None`: every bench device with an artifact for its class.
    pub devices: Option<Vec<String>>,
    /// Golden set runs; `None`: `validation.repeat`.
    pub repeat: Option<u32>,
}

/// What [`Writer::start_validation`] did for each device.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationPlan {
    pub version: semver::Version,
    pub release: u64,
    pub started: Vec<(String, u64)>,
    pub skipped: Vec<(String, String)>,
}

/// Validation transfers in progress, by transfer id (also in `validation_runs`).
pub(super) type Runs = HashMap<u64, ValidationRun>;

impl Writer {
    /// Whether a device is a bench device.
    pub(super) fn is_bench(&self, device: &str) -> bool {
        self.devices
            .get(device)
            .is_some_and(|s| self.validation_settings.is_bench(&s.device.labels))
    }

    pub(super) fn start_validation(
        &mut self,
        t: &mut Tables<'_>,
        req: ValidationRequest,
        by: &str,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Result<ValidationPlan, ControlError>> {
        if self.validation_settings.bench_labels.is_empty() {
            return Ok(Err(ControlError::BadRequest(
                "no bench devices are configured (validation.bench_labels)".to_owned(),
            )));
        }
        let release = match self.release_of(req.kind, &req.name, &req.version)? {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let mut devices: Vec<String> = match req.devices {
            Some(list) => {
                if let Some(d) = list.iter().find(|d| !self.devices.contains_key(*d)) {
                    return Ok(Err(ControlError::NotFound(format!("device {d}"))));
                }
                if let Some(d) = list.iter().find(|d| !self.is_bench(d)) {
                    return Ok(Err(ControlError::BadRequest(format!(
                        "{d} is not a bench device (its labels do not match validation.bench_labels)"
                    ))));
                }
                list
            }
            None => self
                .devices
                .keys()
                .filter(|d| self.is_bench(d))
                .cloned()
                .collect(),
        };
        devices.sort_unstable();
        devices.dedup();
        let repeat = req.repeat.unwrap_or(self.validation_settings.repeat);
        let mut plan = ValidationPlan {
            version: release.version.clone(),
            release: release.release,
            started: Vec::new(),
            skipped: Vec::new(),
        };
        for device in devices {
            match self.start_run(t, &device, &release, repeat, by, now, fx)? {
                Ok(id) => plan.started.push((device, id)),
                Err(why) => plan.skipped.push((device, why)),
            }
        }
        if plan.started.is_empty() && plan.skipped.is_empty() {
            return Ok(Err(ControlError::BadRequest(
                "no enrolled device matches validation.bench_labels".to_owned(),
            )));
        }
        t.set_meta(schema::META_NEXT_TRANSFER_ID, self.next_transfer_id)?;
        Ok(Ok(plan))
    }

    /// Starts one validation transfer, or says why not.
    #[allow(clippy::too_many_arguments)]
    fn start_run(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        release: &crate::model::ReleaseRecord,
        repeat: u32,
        by: &str,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Result<u64, String>> {
        // Validation never activates what it installs, so a bench device may validate an
        // older release than it runs (to compare versions).
        let artifact = match self.fit(device, release, release.kind, now, true) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let Some(class) = self
            .devices
            .get(device)
            .and_then(|s| s.device.hello.as_ref())
            .map(|h| h.hardware.class.clone())
        else {
            return Ok(Err("hardware unknown".to_owned()));
        };
        let record = self.new_transfer(device, release, &artifact, by, now);
        let run = ValidationRun {
            transfer: record.id,
            kind: release.kind,
            name: release.name.clone(),
            version: release.version.clone(),
            release: release.release,
            device: device.to_owned(),
            class,
            sha256: artifact.sha256,
            repeat,
            started: Stamp {
                at_ms: now,
                by: by.to_owned(),
            },
        };
        t.put_validation_run(&run)?;
        let id = run.transfer;
        self.validation_runs.insert(id, run);
        tracing::info!(device, transfer = id, name = %release.name, version = %release.version, "validation started");
        self.update_event(t, Event::Start(record), now, fx)?;
        Ok(Ok(id))
    }

    /// The `validate` command offering validation transfer `record`, if it is one.
    pub(super) fn validate_offer(
        &self,
        record: &TransferRecord,
        manifest: &fleetgate_protocol::Signed,
    ) -> Option<Action> {
        let run = self.validation_runs.get(&record.id)?;
        let golden = self
            .store
            .requirements(run.kind, &run.name, run.release)
            .ok()
            .flatten()
            .and_then(|r| r.of(&run.sha256).and_then(|a| a.golden.clone()))
            .unwrap_or_default();
        Some(Action::Validate(ValidateOffer {
            transfer: record.id,
            manifest: manifest.clone(),
            golden,
            repeat: run.repeat,
        }))
    }

    /// An update report that concerns validation: a result (stored here, then passed to the
    /// update engine as the transfer's end), or a report that cannot be (an install reported
    /// for a validation, a result for a transfer that validates nothing). `None`: an ordinary
    /// report.
    pub(super) fn validation_report(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        report: &UpdateReport,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<Option<Handled>> {
        let run = self
            .validation_runs
            .get(&report.transfer)
            .filter(|r| r.device == device)
            .cloned();
        match (&report.state, run) {
            (UpdateState::Validated(_), None) => {
                self.reject(
                    device,
                    Reject::UnknownTransfer,
                    &format!(
                        "a validation result for transfer {}, which validates nothing",
                        report.transfer
                    ),
                );
                Ok(Some(Handled::Refused(Refusal::Unknown)))
            }
            (UpdateState::Installed { .. }, Some(_)) => {
                self.reject(
                    device,
                    Reject::Invalid,
                    &format!(
                        "transfer {} validates; it must not be installed",
                        report.transfer
                    ),
                );
                Ok(Some(Handled::Refused(Refusal::Invalid)))
            }
            (UpdateState::Validated(result), Some(run)) => {
                // Only a transfer still in progress takes a result (not one cancelled or timed
                // out meanwhile).
                if self.updates.transfer(run.transfer).is_none() {
                    return Ok(Some(Handled::Ignored));
                }
                let rules = self
                    .store
                    .requirements(run.kind, &run.name, run.release)?
                    .and_then(|r| r.of(&run.sha256).map(|a| a.requirements.rules.clone()))
                    .unwrap_or_default();
                let outcome = Outcome::Measured {
                    checks: validation::judge(&rules, result),
                    result: result.clone(),
                };
                self.store_result(t, &run, outcome, now, fx)?;
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// A transfer ended: a validation that ended without a result is stored as an error.
    pub(super) fn validation_transfer_finished(
        &mut self,
        t: &mut Tables<'_>,
        record: &TransferRecord,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        let Some(run) = self.validation_runs.remove(&record.id) else {
            return Ok(());
        };
        t.delete_validation_run(record.id)?;
        let reason = match &record.state {
            TransferState::Validated => return Ok(()),
            TransferState::Rejected { reason, detail } => {
                format!("rejected: {}: {detail}", reason.name())
            }
            TransferState::Failed { reason, detail } => {
                format!("failed: {}: {detail}", reason.name())
            }
            TransferState::TimedOut => "timed out".to_owned(),
            TransferState::Cancelled { by } => format!("cancelled by {by}"),
            other => other.name().to_owned(),
        };
        let now = record.updated_ms;
        self.store_result(t, &run, Outcome::Error { reason }, now, fx)
    }

    fn store_result(
        &mut self,
        t: &mut Tables<'_>,
        run: &ValidationRun,
        outcome: Outcome,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        let record = ValidationRecord {
            kind: run.kind,
            name: run.name.clone(),
            version: run.version.clone(),
            release: run.release,
            class: run.class.clone(),
            device: run.device.clone(),
            transfer: run.transfer,
            outcome,
            started: run.started.clone(),
            finished_ms: now,
        };
        t.put_validation_result(&record)?;
        let verdict = record.verdict();
        tracing::info!(device = %run.device, class = %run.class, name = %run.name, version = %run.version, verdict = verdict.name(), misses = ?record.misses(), "validation result");
        self.validation_gauges(run.kind, &run.name, run.release, Some(&record))?;
        let actions = self.rollouts.validation_result(
            run.kind,
            &run.name,
            run.release,
            &run.class,
            &run.device,
            bench_result(&record),
            now,
        );
        self.rollout_actions(t, actions, now, fx)
    }

    /// Sets the release's gauges from storage (plus `fresh`, written in this transaction).
    pub(super) fn validation_gauges(
        &self,
        kind: ArtifactKind,
        name: &str,
        release: u64,
        fresh: Option<&ValidationRecord>,
    ) -> storage::Result<()> {
        let mut records = self.store.validation_results(kind, name, release)?;
        if let Some(f) = fresh {
            records.retain(|r| !(r.class == f.class && r.device == f.device));
            records.push(f.clone());
        }
        let Some(version) = records.first().map(|r| r.version.to_string()) else {
            return Ok(());
        };
        self.metrics.set_validation(
            kind.name(),
            name,
            &version,
            &validation::summarize(&records),
        );
        Ok(())
    }

    /// After a reload: the validation transfers in progress, the rollouts' validate stages
    /// with the results they are judged on, and the gauges.
    pub(super) fn validation_restore(&mut self) -> storage::Result<()> {
        self.validation_runs = self
            .store
            .validation_runs()?
            .into_iter()
            .map(|r| (r.transfer, r))
            .collect();
        let waiting: Vec<(u64, ArtifactKind, String, u64)> = self
            .rollouts
            .active()
            .map(|r| (r.id, r.kind, r.name.clone(), r.release))
            .collect();
        for (id, kind, name, release) in waiting {
            let Some(stage) = self.store.rollout_validation(id)? else {
                continue;
            };
            self.rollouts.set_validation(id, stage);
            for r in self.store.validation_results(kind, &name, release)? {
                self.rollouts
                    .restore_validation_result(id, &r.class, &r.device, bench_result(&r));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for r in self.store.all_validation_results()? {
            if seen.insert((r.kind, r.name.clone(), r.release)) {
                self.validation_gauges(r.kind, &r.name, r.release, None)?;
            }
        }
        Ok(())
    }

    /// Starts what rollouts waiting on their validate stage still need on `device` (a bench
    /// device that said hello), or on every bench device when `device` is `None`: a run of
    /// the release on each bench device of a targeted class that has no result for it and
    /// none in progress. A device whose run ended in an error is not tried again by the
    /// rollout (`fleetgate validate run` does that).
    pub(super) fn validation_wanted(
        &mut self,
        t: &mut Tables<'_>,
        device: Option<&str>,
        now: u64,
        fx: &mut Effects,
    ) -> storage::Result<()> {
        let waiting = self.rollouts.waiting_validations();
        if waiting.is_empty() || self.validation_settings.bench_labels.is_empty() {
            return Ok(());
        }
        let mut bench: Vec<String> = match device {
            Some(d) => vec![d.to_owned()],
            None => self.devices.keys().cloned().collect(),
        };
        bench.retain(|d| self.is_bench(d) && self.connections.contains_key(d));
        bench.sort_unstable();
        let mut started = false;
        for (_, kind, name, version, classes) in waiting {
            let Some(release) = self.store.release(kind, &name, &version.to_string())? else {
                continue;
            };
            let done: std::collections::HashSet<String> = self
                .store
                .validation_results(kind, &name, release.release)?
                .into_iter()
                .map(|r| r.device)
                .collect();
            for d in &bench {
                let class = self
                    .devices
                    .get(d)
                    .and_then(|s| s.device.hello.as_ref())
                    .map(|h| h.hardware.class.clone());
                if !class.is_some_and(|c| classes.contains(&c)) || done.contains(d) {
                    continue;
                }
                let running = self.validation_runs.values().any(|r| {
                    r.device == *d
                        && r.kind == kind
                        && r.name == name
                        && r.release == release.release
                });
                if running || self.updates.transfer_of(d).is_some() {
                    continue;
                }
                let repeat = self.validation_settings.repeat;
                if let Ok(id) = self.start_run(t, d, &release, repeat, "gateway", now, fx)? {
                    tracing::info!(device = %d, transfer = id, "validation started for a rollout's validate stage");
                    started = true;
                }
            }
        }
        if started {
            t.set_meta(schema::META_NEXT_TRANSFER_ID, self.next_transfer_id)?;
        }
        Ok(())
    }

    /// Encodes a `validate` command for a device (after the commit, like every offer).
    pub(super) fn push_validate(
        &mut self,
        device: String,
        encoding: Encoding,
        action: Action,
        fx: &mut Effects,
    ) {
        let command = Command {
            id: self.next_command_id,
            action,
        };
        self.next_command_id += 1;
        match encode(&command, encoding) {
            Ok(payload) => fx
                .downlinks
                .push((device, Downlink::Command, encoding, payload)),
            Err(e) => tracing::error!(error = %e, "cannot encode a validate command"),
        }
    }
}

/// What the rollout engine needs of a stored result.
pub(super) fn bench_result(r: &ValidationRecord) -> BenchResult {
    let detail = match &r.outcome {
        Outcome::Measured { result, checks } => json!({
            "transfer": r.transfer,
            "inferences": result.inferences,
            "values": fleetgate_protocol::validation::Measure::ALL
                .iter()
                .filter_map(|m| result.value(*m).map(|v| (m.name(), v)))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "checks": checks.iter().map(|c| json!({
                "requirement": c.requirement.to_string(),
                "value": c.value,
                "met": c.met,
            })).collect::<Vec<_>>(),
        }),
        Outcome::Error { reason } => json!({ "transfer": r.transfer, "error": reason }),
    };
    BenchResult {
        verdict: r.verdict(),
        misses: r.misses(),
        detail,
    }
}
