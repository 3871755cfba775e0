//! How a rollout moves: starting updates as its stage allows, the install phase, the bake and
//! the health gates, the next stage. `Engine::drive` runs after every event that can move a
//! rollout; every count it needs comes from the members' indexes.

use serde_json::json;

use super::model::{DeviceState, Gate, GateEval, RolloutState, Verdict};
use super::{Action, EVAL_EVERY_MS, Engine, GATEWAY, Live, RECONNECT_GRACE_MS, audit};

impl Engine {
    pub(super) fn maybe_evaluate(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        let due = self
            .live
            .get(&id)
            .is_some_and(|l| now_ms.saturating_sub(l.last_eval_ms) >= EVAL_EVERY_MS);
        if due {
            self.evaluate(id, now_ms, actions);
        }
    }

    /// Judges the gates; one that failed for `confirm` rolls the rollout back.
    pub(super) fn evaluate(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        if !l.record.state.is_active() {
            return;
        }
        l.last_eval_ms = now_ms;
        // A control exists while enough devices of later stages to compare with
        // (`min_devices`) are not updated, online or not: an offline one comes back, and until
        // both cohorts have their samples the gates wait. Fewer can never be enough: waiting for
        // them would stall the stage for good.
        let gates = l.record.policy.gates.clone();
        let control_exists = l.members.control_after(l.record.stage) >= gates.min_devices.max(1);
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
    pub(super) fn drive(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        if let Some(since @ None) = &mut l.restored {
            *since = Some(now_ms);
            // Updating devices are offline after a restart until they say hello: gone from now.
            let offline: Vec<String> = l
                .members
                .values()
                .filter(|d| d.state == DeviceState::Updating)
                .map(|d| d.device.clone())
                .collect();
            for device in offline {
                if !self.online.contains(&device) {
                    l.gone.insert(device, now_ms);
                }
            }
        }
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
        // A validate stage holds the first production stage back until bench devices pass.
        if state.is_active() && self.validation_holds(id, now_ms, actions) {
            return;
        }
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        // Start the updates the current stage allows (a completed rollout still updates its
        // devices that were offline, and late joiners).
        if matches!(state, RolloutState::Running | RolloutState::Completed) {
            start_updates(l, now_ms, actions);
        }
        if state != RolloutState::Running {
            return;
        }
        let k = l.record.stage;
        let stage = l.record.policy.stages[k].clone();
        match l.record.baking_since_ms {
            None => {
                // Install phase: every online device of stages 0..=k done (and every one that went
                // offline while updating, for its `device_timeout`: it is rebooting into the new
                // version), enough reporting.
                let c = l.members.counts(k).clone();
                let timeout = stage.device_timeout.as_millis() as u64;
                let (mut gone_waiting, mut gone_expired) = (false, 0u64);
                for (device, since) in &l.gone {
                    let Some(d) = l.members.get(device) else {
                        continue;
                    };
                    if d.state != DeviceState::Updating || d.stage > k {
                        continue;
                    }
                    if now_ms.saturating_sub(*since) < timeout {
                        gone_waiting = true;
                    } else if d.stage == k {
                        gone_expired += 1;
                    }
                }
                // A device offline and still pending is replaced by a later one (see
                // `start_updates`), not left out: a stage of offline devices waits.
                let need = stage.min_reporting.min(c.devices - gone_expired);
                if l.members.waiting_upto(k) || gone_waiting || c.finished < need {
                    return;
                }
                let (devices, finished, installed) = (c.devices, c.finished, c.took_it);
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
                // Judged now, on the window as it is: never on verdicts from before a restart
                // or from before the bake ended.
                self.evaluate(id, now_ms, actions);
                let Some(l) = self.live.get_mut(&id) else {
                    return;
                };
                if l.record.state != RolloutState::Running {
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
                let updated_here = l.members.counts(k).took_it > 0;
                if updated_here && (!blocking.is_empty() || l.record.gates.is_empty()) {
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
                self.stage_passed(id, now_ms, actions);
            }
        }
    }

    /// Stage k passed its bake and every gate: its devices are healthy, and the next stage
    /// starts (or the rollout completes).
    fn stage_passed(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        let k = l.record.stage;
        let installed: Vec<String> = l
            .members
            .values()
            .filter(|d| d.stage <= k && d.state == DeviceState::Installed)
            .map(|d| d.device.clone())
            .collect();
        for device in installed {
            if let Some(saved) = l.members.update(&device, |d| {
                d.state = DeviceState::Healthy;
                d.updated_ms = now_ms;
            }) {
                actions.push(Action::SaveDevice(id, Box::new(saved)));
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
        if k + 1 < l.sizes.len() {
            l.record.stage = k + 1;
            l.record.baking_since_ms = None;
            stage_started(l, actions, now_ms);
            self.drive(id, now_ms, actions);
            return;
        }
        l.record.state = RolloutState::Completed;
        l.record.finished_ms = Some(now_ms);
        let total = l.members.len();
        let healthy = l
            .members
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
        // The devices it updated are free for the next rollout, of any artifact; it keeps
        // only the ones still to update.
        let done: Vec<String> = l
            .members
            .values()
            .filter(|d| !super::claims(&l.record.state, d))
            .map(|d| d.device.clone())
            .collect();
        for device in done {
            if self.by_device.get(&device) == Some(&id) {
                self.by_device.remove(&device);
            }
        }
    }
}

pub(super) fn verdicts(evals: &[GateEval]) -> Vec<(Gate, Verdict)> {
    evals.iter().map(|e| (e.gate, e.verdict)).collect()
}

pub(super) fn show(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"))
}

pub(super) fn stage_started(l: &mut Live, actions: &mut Vec<Action>, now_ms: u64) {
    let k = l.record.stage;
    l.members.set_current(k);
    l.record.stage_started_ms = now_ms;
    let size = l.sizes[k];
    let new = l.members.counts(k).devices;
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
/// the stage's concurrency allows. When devices of the stages reached are pending and offline,
/// the next online devices in order take their places, so that a stage is judged on as many
/// devices as planned; the offline ones are updated when they return. Not right after a
/// restart, while devices are still reconnecting.
fn start_updates(l: &mut Live, now_ms: u64, actions: &mut Vec<Action>) {
    let completed = l.record.state == RolloutState::Completed;
    let k = if completed {
        l.sizes.len() - 1
    } else {
        l.record.stage
    };
    let reconnecting = l
        .restored
        .flatten()
        .is_some_and(|since| now_ms < since + RECONNECT_GRACE_MS);
    if !completed && !reconnecting {
        let missing = l.sizes[k].saturating_sub(l.members.present_upto(k)) as usize;
        if missing > 0 {
            let pulled: Vec<String> = l.members.later().take(missing).map(str::to_owned).collect();
            for device in &pulled {
                if let Some(saved) = l.members.update(device, |d| {
                    d.stage = k;
                    d.updated_ms = now_ms;
                }) {
                    actions.push(Action::SaveDevice(l.record.id, Box::new(saved)));
                }
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
    let room = stage
        .max_concurrent
        .saturating_sub(l.members.updating_online() as usize);
    if room == 0 {
        return;
    }
    l.blocked.retain(|_, until| *until > now_ms);
    let start: Vec<String> = l
        .members
        .ready()
        .filter(|d| !l.blocked.contains_key(*d))
        .take(room)
        .map(str::to_owned)
        .collect();
    for device in start {
        // Marked before the writer answers, so that the next device counts it in flight.
        l.members.update(&device, |d| {
            d.state = DeviceState::Updating;
            d.updated_ms = now_ms;
        });
        actions.push(Action::StartTransfer {
            rollout: l.record.id,
            device: device.clone(),
            timeout_ms: stage.device_timeout.as_millis() as u64,
            retries: stage.retries,
        });
        l.health.forget(&device);
    }
}

/// The first abort threshold stage `k` has reached, with the numbers.
fn abort_reached(l: &Live, k: usize) -> Option<(String, serde_json::Value)> {
    let stage = &l.record.policy.stages[k];
    let c = l.members.counts(k);
    let finished = c.finished;
    let need = stage.min_reporting.min(c.devices).max(1);
    for (name, n, t) in [
        ("failed", c.failed, stage.abort.failed),
        ("rejected", c.rejected, stage.abort.rejected),
        ("timed out", c.timed_out, stage.abort.timed_out),
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
