//! Operators' actions on a rollout, and how a rollout stops: aborted (downloads cancelled,
//! nothing sent back) or rolled back (downloads cancelled, every device that took the new
//! version sent a signed directive back to the version it ran before).
//!
//! Invariant: when a rollout stops, every one of its devices ends in a final state: those it
//! never reached become `not_updated`, and none stays pending.

use fleetgate_protocol::Installed;
use serde_json::json;

use super::model::{DeviceState, RolloutDevice, RolloutRecord, RolloutState};
use super::{Action, Engine, GATEWAY, OperatorAction, Refused, audit};

impl Engine {
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
                self.forget_finished(id);
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
                self.forget_finished(id);
                return Ok(actions);
            }
        }
        l.record.updated_ms = now_ms;
        actions.push(Action::Save(Box::new(l.record.clone())));
        self.drive(id, now_ms, &mut actions);
        Ok(actions)
    }

    /// The gateway stops rollout `id` and rolls its updated devices back (`event` names why
    /// in the audit log).
    pub(super) fn roll_back(
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

    /// The gateway stops rollout `id` without rolling anything back (`event` names why).
    pub(super) fn stop_by_gateway(
        &mut self,
        id: u64,
        event: &str,
        message: String,
        detail: serde_json::Value,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        self.stop(id, false, GATEWAY, event, message, detail, now_ms, actions);
    }

    /// Ends a rollout: cancels downloads in flight and, with `rollback`, sends every device that
    /// took the new version back. Devices it never reached are not updated.
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
        let new = l.record.installed();
        let (mut sent, mut cancelled, mut stuck, mut untouched) = (0u64, 0u64, 0u64, 0u64);
        let mut device_actions = Vec::new();
        let order: Vec<RolloutDevice> = l.members.in_order().into_iter().cloned().collect();
        for d in order {
            let state = match d.state {
                DeviceState::Pending => {
                    untouched += 1;
                    DeviceState::NotUpdated
                }
                DeviceState::Updating => {
                    if let Some(t) = d.transfer {
                        device_actions.push(Action::CancelTransfer {
                            transfer: t,
                            by: format!("rollout {id} stopped"),
                        });
                        self.by_transfer.remove(&t);
                    }
                    cancelled += 1;
                    // It said hello on the new version already (its "installed" report is on
                    // the way): it goes back like the others.
                    let installed = rollback && l.runs_new.contains(&d.device);
                    match installed
                        .then(|| {
                            directive(&l.record, &d, &new, 0, ttl, now_ms, &mut device_actions)
                        })
                        .flatten()
                    {
                        Some(state) => {
                            sent += 1;
                            state
                        }
                        None => DeviceState::Cancelled,
                    }
                }
                DeviceState::Installed | DeviceState::Healthy if rollback => {
                    match directive(&l.record, &d, &new, 0, ttl, now_ms, &mut device_actions) {
                        Some(state) => {
                            sent += 1;
                            state
                        }
                        None => {
                            stuck += 1;
                            DeviceState::RollbackFailed {
                                reason:
                                    "nothing to go back to: the device had no earlier version of it"
                                        .to_owned(),
                            }
                        }
                    }
                }
                _ => continue,
            };
            // A directive to a device that is away is lost: its next hello on the new version
            // gets it again.
            if matches!(state, DeviceState::RollbackSent { .. }) && !self.online.contains(&d.device)
            {
                l.resend.insert(d.device.clone());
            }
            if let Some(saved) = l.members.update(&d.device, |m| {
                m.state = state;
                m.updated_ms = now_ms;
            }) {
                actions.push(Action::SaveDevice(id, Box::new(saved)));
            }
        }
        if rollback {
            let message = format!(
                "rollback: {sent} directives sent, {cancelled} downloads cancelled, {stuck} devices without an earlier version, {untouched} never updated"
            );
            audit(
                &mut l.record,
                actions,
                now_ms,
                GATEWAY,
                "rollback_sent",
                message,
                json!({ "directives": sent, "cancelled": cancelled, "no_previous": stuck, "not_updated": untouched }),
            );
        }
        actions.push(Action::Save(Box::new(l.record.clone())));
        actions.extend(device_actions);
        let state = l.record.state.clone();
        let keep: Vec<String> = l
            .members
            .values()
            .filter(|d| super::claims(&state, d))
            .map(|d| d.device.clone())
            .collect();
        self.by_device
            .retain(|dev, r| *r != id || keep.contains(dev));
    }
}

/// A rollback directive for a device that took the new version: asks the writer to sign and
/// send it, and returns the device's new state (`None`: it has nothing to go back to).
pub(super) fn directive(
    record: &RolloutRecord,
    d: &RolloutDevice,
    new: &Installed,
    sent_before: u32,
    ttl_ms: u64,
    now_ms: u64,
    actions: &mut Vec<Action>,
) -> Option<DeviceState> {
    let (Some(from), Some(transfer)) = (d.from.clone(), d.transfer) else {
        return None;
    };
    actions.push(Action::SendRollback {
        rollout: record.id,
        device: d.device.clone(),
        transfer,
        kind: record.kind,
        from: new.clone(),
        to: from,
        expires_ms: now_ms + ttl_ms,
    });
    Some(DeviceState::RollbackSent {
        command: 0,
        sent: sent_before + 1,
    })
}
