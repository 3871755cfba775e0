//! Presence and hellos in the rollout engine: a device coming online or going offline, and
//! what its hello says it runs (a late joiner's place in a rollout, a rollback seen through or
//! still owed, an install the device's boot check undid).

use fleetgate_protocol::{ArtifactKind, Installed};
use serde_json::json;

use super::model::{DeviceState, RolloutDevice, RolloutState};
use super::plan::{self, Candidate};
use super::{Action, Engine, GATEWAY, MAX_DIRECTIVES, audit, stop};

impl Engine {
    /// A device's hello: it is online now (the writer says so only for its current
    /// connection).
    pub fn online(&mut self, device: &str) {
        self.online.insert(device.to_owned());
        if let Some(l) = self
            .rollout_of(device)
            .and_then(|id| self.live.get_mut(&id))
        {
            l.members.set_online(device, true);
        }
    }

    pub fn offline(&mut self, device: &str, now_ms: u64) -> Vec<Action> {
        self.online.remove(device);
        let mut actions = Vec::new();
        if let Some(id) = self.rollout_of(device) {
            if let Some(l) = self.live.get_mut(&id) {
                l.members.set_online(device, false);
                match l.members.get(device).map(|d| &d.state) {
                    Some(DeviceState::RollbackSent { .. }) => {
                        l.resend.insert(device.to_owned());
                    }
                    Some(DeviceState::Updating) => {
                        l.gone.insert(device.to_owned(), now_ms);
                    }
                    _ => {}
                }
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
        self.online(device);
        let mut actions = Vec::new();
        if self.rollout_of(device).is_none() {
            for (id, c) in join {
                let Some(l) = self.live.get_mut(&id) else {
                    continue;
                };
                if l.members.contains(&c.device) || self.by_device.contains_key(&c.device) {
                    continue;
                }
                let per_stage = l.members.per_stage();
                let stage = plan::late_stage(id, &c.device, &l.record.policy.stages, &per_stage);
                let order = l.members.len() as u64;
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
                l.members.insert(d, true);
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
        let new = l.record.installed();
        let Some(d) = l.members.get(device).cloned() else {
            return actions;
        };
        let runs_new = now_running.as_ref() == Some(&new);
        if runs_new {
            l.runs_new.insert(device.to_owned());
        } else {
            l.runs_new.remove(device);
        }
        let mut release = false;
        let changed = match d.state.clone() {
            DeviceState::RollbackSent { sent, .. } => {
                if runs_new && sent >= MAX_DIRECTIVES {
                    release = true;
                    Some(DeviceState::RollbackFailed {
                        reason: format!("still runs {} after {sent} directives", new.version),
                    })
                } else if runs_new && l.resend.remove(device) {
                    stop::directive(&l.record, &d, &new, sent, ttl, now_ms, &mut actions)
                } else if runs_new {
                    // The directive is on its way (this hello may predate it).
                    None
                } else if now_running.is_some() && now_running == d.from {
                    release = true;
                    Some(DeviceState::RolledBack)
                } else {
                    None
                }
            }
            // The rollout was rolled back while this device downloaded: if the install went
            // through anyway it goes back too; if not, the rollout lets go of it.
            DeviceState::Cancelled if matches!(l.record.state, RolloutState::RolledBack { .. }) => {
                if runs_new {
                    stop::directive(&l.record, &d, &new, 0, ttl, now_ms, &mut actions)
                } else {
                    release = true;
                    None
                }
            }
            DeviceState::Installed | DeviceState::Healthy
                if now_running.is_some() && now_running == d.from =>
            {
                // The device went back on its own (its boot check failed): a failed install.
                Some(DeviceState::Failed {
                    reason: format!(
                        "runs {} again after installing {}",
                        d.from
                            .as_ref()
                            .map_or(String::new(), |f| f.version.to_string()),
                        new.version
                    ),
                })
            }
            // Keep what it runs now: a rollback sends it back there.
            DeviceState::Pending if now_running.is_some() && d.from != now_running => {
                if let Some(saved) = l.members.update(device, |m| {
                    m.from = now_running.clone();
                    m.updated_ms = now_ms;
                }) {
                    actions.push(Action::SaveDevice(id, Box::new(saved)));
                }
                None
            }
            _ => None,
        };
        if let Some(state) = changed
            && let Some(saved) = l.members.update(device, |m| {
                m.state = state;
                m.updated_ms = now_ms;
            })
        {
            actions.push(Action::SaveDevice(id, Box::new(saved)));
        }
        if release {
            self.by_device.remove(device);
        }
        self.drive(id, now_ms, &mut actions);
        self.forget_finished(id);
        actions
    }
}
