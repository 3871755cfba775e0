//! A rollout's validate stage: before its first production stage, the release runs on bench
//! devices of every hardware class the rollout targets.
//!
//! Rules:
//! - The first production stage starts only when every targeted class has passing results
//!   from at least `min_devices` bench devices. Until then the rollout starts no update.
//! - A failing result (a requirement missed) from a bench device of a targeted class ends the
//!   rollout at once (aborted by the gateway, nothing to roll back), with every missed
//!   requirement's numbers in the audit log. An error (the device never measured) neither
//!   passes nor fails: another device, or a new run, may still pass.
//! - Without enough passing results by `timeout` the rollout ends the same way, with the
//!   counts per class.
//! - Results come from storage after a restart (the writer feeds them again), and the stage's
//!   state is saved (`SaveValidation`) in the same transaction as the decision, so a restarted
//!   engine decides what the first one did.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::progress::stage_started;
use super::{Action, Engine, GATEWAY, audit};
use crate::validation::Verdict;

/// A rollout's validate stage, as stored (table `rollout_validation`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidateStage {
    /// Passing bench devices needed per class (k).
    pub min_devices: u32,
    pub timeout_ms: u64,
    /// The hardware classes the rollout targets.
    pub classes: Vec<String>,
    pub started_ms: u64,
    pub state: StageState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Waiting,
    Passed { at_ms: u64 },
    Failed { at_ms: u64, reason: String },
}

impl StageState {
    pub fn name(&self) -> &'static str {
        match self {
            StageState::Waiting => "waiting",
            StageState::Passed { .. } => "passed",
            StageState::Failed { .. } => "failed",
        }
    }
}

/// One bench device's latest result, as the engine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    pub verdict: Verdict,
    /// Missed requirements with their values (or the error).
    pub misses: Vec<String>,
    /// The measured values and checks, as JSON (for the audit log).
    pub detail: serde_json::Value,
}

/// The stage and the results it is judged on.
#[derive(Debug, Clone)]
pub(super) struct Gate {
    pub stage: ValidateStage,
    /// Class -> device -> result.
    pub results: BTreeMap<String, BTreeMap<String, BenchResult>>,
}

/// The stage's counts per class, for views and the audit log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ClassCounts {
    pub passed: u64,
    pub failed: u64,
    pub errors: u64,
}

impl Gate {
    pub fn counts(&self) -> BTreeMap<String, ClassCounts> {
        self.stage
            .classes
            .iter()
            .map(|c| {
                let mut n = ClassCounts::default();
                for r in self.results.get(c).into_iter().flat_map(|m| m.values()) {
                    match r.verdict {
                        Verdict::Pass => n.passed += 1,
                        Verdict::Fail => n.failed += 1,
                        Verdict::Error => n.errors += 1,
                    }
                }
                (c.clone(), n)
            })
            .collect()
    }

    fn passed(&self) -> bool {
        let k = u64::from(self.stage.min_devices.max(1));
        self.counts().values().all(|n| n.passed >= k)
    }
}

/// What the API shows of a rollout's validate stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateView {
    pub stage: ValidateStage,
    pub classes: BTreeMap<String, ClassCounts>,
}

impl Engine {
    /// Gives a rollout (created or restored) its validate stage. Call before feeding results.
    pub fn set_validation(&mut self, id: u64, stage: ValidateStage) {
        if let Some(l) = self.live.get_mut(&id) {
            l.validate = Some(Gate {
                stage,
                results: BTreeMap::new(),
            });
        }
    }

    /// The validate stage of a rollout, with its counts.
    pub fn validation_view(&self, id: u64) -> Option<GateView> {
        let g = self.live.get(&id)?.validate.as_ref()?;
        Some(GateView {
            stage: g.stage.clone(),
            classes: g.counts(),
        })
    }

    /// Rollouts waiting on bench results, with their release and classes: what the writer
    /// runs validations for.
    pub fn waiting_validations(
        &self,
    ) -> Vec<(
        u64,
        fleetgate_protocol::ArtifactKind,
        String,
        semver::Version,
        Vec<String>,
    )> {
        self.live
            .values()
            .filter(|l| l.record.state.is_active())
            .filter_map(|l| {
                let g = l.validate.as_ref()?;
                (g.stage.state == StageState::Waiting).then(|| {
                    (
                        l.record.id,
                        l.record.kind,
                        l.record.name.clone(),
                        l.record.version.clone(),
                        g.stage.classes.clone(),
                    )
                })
            })
            .collect()
    }

    /// A bench device's result for a release (stored, or read back after a restart). Rollouts
    /// of that release waiting on their validate stage take it; a failing one of a targeted
    /// class ends them.
    #[allow(clippy::too_many_arguments)]
    pub fn validation_result(
        &mut self,
        kind: fleetgate_protocol::ArtifactKind,
        name: &str,
        release: u64,
        class: &str,
        device: &str,
        result: BenchResult,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let ids: Vec<u64> = self
            .live
            .values()
            .filter(|l| {
                l.record.kind == kind && l.record.name == name && l.record.release == release
            })
            .filter(|l| {
                l.validate
                    .as_ref()
                    .is_some_and(|g| g.stage.state == StageState::Waiting)
            })
            .map(|l| l.record.id)
            .collect();
        for id in ids {
            let Some(l) = self.live.get_mut(&id) else {
                continue;
            };
            let Some(g) = l.validate.as_mut() else {
                continue;
            };
            if !g.stage.classes.iter().any(|c| c == class) {
                continue;
            }
            g.results
                .entry(class.to_owned())
                .or_default()
                .insert(device.to_owned(), result.clone());
            self.drive(id, now_ms, &mut actions);
            self.forget_finished(id);
        }
        actions
    }

    /// A stored result read back after a restart: taken without deciding anything (the next
    /// `drive` decides, as the engine before the restart would have).
    pub fn restore_validation_result(
        &mut self,
        id: u64,
        class: &str,
        device: &str,
        result: BenchResult,
    ) {
        if let Some(g) = self.live.get_mut(&id).and_then(|l| l.validate.as_mut())
            && g.stage.classes.iter().any(|c| c == class)
        {
            g.results
                .entry(class.to_owned())
                .or_default()
                .insert(device.to_owned(), result);
        }
    }

    /// Ends a rollout whose validate stage failed: saved, audited, no device updated.
    fn validation_failed(
        &mut self,
        id: u64,
        message: String,
        detail: serde_json::Value,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        let Some(g) = l.validate.as_mut() else {
            return;
        };
        g.stage.state = StageState::Failed {
            at_ms: now_ms,
            reason: message.clone(),
        };
        actions.push(Action::SaveValidation(id, Box::new(g.stage.clone())));
        self.stop_by_gateway(id, "validation_failed", message, detail, now_ms, actions);
        self.forget_finished(id);
    }

    /// Called by `drive` for a running or paused rollout: true while its validate stage holds
    /// the first production stage back. A failing result of a targeted class fails it; a
    /// running rollout passes it (and starts stage 1) or fails it on timeout.
    pub(super) fn validation_holds(
        &mut self,
        id: u64,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> bool {
        let Some(l) = self.live.get_mut(&id) else {
            return false;
        };
        let Some(g) = l.validate.as_mut() else {
            return false;
        };
        if g.stage.state != StageState::Waiting {
            return false;
        }
        let counts = g.counts();
        let failed = g.results.iter().find_map(|(class, devices)| {
            devices
                .iter()
                .find(|(_, r)| r.verdict == Verdict::Fail)
                .map(|(device, r)| (class.clone(), device.clone(), r.clone()))
        });
        if let Some((class, device, r)) = failed {
            let message = format!(
                "validation failed on bench device {device} ({class}): {}",
                r.misses.join(", ")
            );
            let detail = json!({
                "device": device,
                "class": class,
                "misses": r.misses,
                "result": r.detail,
                "classes": counts,
            });
            self.validation_failed(id, message, detail, now_ms, actions);
            return true;
        }
        if l.record.state != super::model::RolloutState::Running {
            return true;
        }
        if g.passed() {
            g.stage.state = StageState::Passed { at_ms: now_ms };
            actions.push(Action::SaveValidation(id, Box::new(g.stage.clone())));
            let message = format!(
                "validation passed: at least {} bench device(s) of each class ({}) meet every requirement",
                g.stage.min_devices.max(1),
                g.stage.classes.join(", ")
            );
            audit(
                &mut l.record,
                actions,
                now_ms,
                GATEWAY,
                "validation_passed",
                message,
                json!({ "classes": counts, "min_devices": g.stage.min_devices }),
            );
            stage_started(l, actions, now_ms);
            return false;
        }
        if now_ms >= g.stage.started_ms.saturating_add(g.stage.timeout_ms) {
            let short: Vec<String> = counts
                .iter()
                .filter(|(_, n)| n.passed < u64::from(g.stage.min_devices.max(1)))
                .map(|(c, n)| {
                    format!(
                        "{c}: {} passed, {} error(s) of {} needed",
                        n.passed,
                        n.errors,
                        g.stage.min_devices.max(1)
                    )
                })
                .collect();
            let message = format!(
                "validation timed out after {}: {}",
                humantime::format_duration(std::time::Duration::from_millis(g.stage.timeout_ms)),
                short.join("; ")
            );
            let detail = json!({ "classes": counts, "min_devices": g.stage.min_devices });
            self.validation_failed(id, message, detail, now_ms, actions);
            return true;
        }
        true
    }
}

/// The audit message of a validate stage's start.
pub(super) fn started(l: &mut super::Live, actions: &mut Vec<Action>, now_ms: u64) {
    let Some(g) = &l.validate else {
        return;
    };
    let message = format!(
        "validate stage: {} bench device(s) of each class ({}) must pass before stage 1, within {}",
        g.stage.min_devices.max(1),
        g.stage.classes.join(", "),
        humantime::format_duration(std::time::Duration::from_millis(g.stage.timeout_ms))
    );
    let detail = json!({ "classes": g.stage.classes, "min_devices": g.stage.min_devices, "timeout_ms": g.stage.timeout_ms });
    audit(
        &mut l.record,
        actions,
        now_ms,
        GATEWAY,
        "validation_started",
        message,
        detail,
    );
    l.record.updated_ms = now_ms;
    actions.push(Action::Save(Box::new(l.record.clone())));
}
