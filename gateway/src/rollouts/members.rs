//! One rollout's devices, with the counts and queues the engine decides from, kept in step with
//! every change instead of recounted on every event.
//!
//! Invariants (checked against a count from scratch by the tests after every step):
//! - `stages[k]` counts the members of stage k by state, and by presence where it matters
//!   (pending and updating devices online).
//! - `ready` holds the pending, online members of the stages reached (stage <= `current`),
//!   `later` those of later stages, both by rollout order.
//! - Every change of a member's state, stage or presence goes through [`Members::update`] or
//!   [`Members::set_online`].

use std::collections::{BTreeSet, HashMap, HashSet};

use super::model::{DeviceState, RolloutDevice};

/// Members of one stage, by what the engine asks about them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub devices: u64,
    pub pending: u64,
    pub pending_online: u64,
    pub updating: u64,
    pub updating_online: u64,
    /// Its update is over, one way or another (see [`DeviceState::finished`]).
    pub finished: u64,
    /// It runs the new version (installed or healthy).
    pub took_it: u64,
    pub failed: u64,
    pub rejected: u64,
    pub timed_out: u64,
}

#[derive(Debug)]
pub(super) struct Members {
    devices: HashMap<String, RolloutDevice>,
    online: HashSet<String>,
    stages: Vec<Counts>,
    current: usize,
    ready: BTreeSet<(u64, String)>,
    later: BTreeSet<(u64, String)>,
}

impl Members {
    pub fn new(stages: usize) -> Members {
        Members {
            devices: HashMap::new(),
            online: HashSet::new(),
            stages: vec![Counts::default(); stages.max(1)],
            current: 0,
            ready: BTreeSet::new(),
            later: BTreeSet::new(),
        }
    }

    pub fn get(&self, device: &str) -> Option<&RolloutDevice> {
        self.devices.get(device)
    }

    pub fn contains(&self, device: &str) -> bool {
        self.devices.contains_key(device)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &RolloutDevice> {
        self.devices.values()
    }

    /// The members in rollout order.
    pub fn in_order(&self) -> Vec<&RolloutDevice> {
        let mut all: Vec<&RolloutDevice> = self.devices.values().collect();
        all.sort_by_key(|d| d.order);
        all
    }

    /// Members per stage.
    pub fn per_stage(&self) -> Vec<u64> {
        self.stages.iter().map(|c| c.devices).collect()
    }

    pub fn counts(&self, stage: usize) -> &Counts {
        &self.stages[stage.min(self.stages.len() - 1)]
    }

    /// Members of stages `0..=k` but those pending while offline: the stage can count on them
    /// (one updating while offline is usually rebooting into the new version: not replaced).
    pub fn present_upto(&self, k: usize) -> u64 {
        self.stages[..=k.min(self.stages.len() - 1)]
            .iter()
            .map(|c| c.devices - (c.pending - c.pending_online))
            .sum()
    }

    /// Whether a member of stages `0..=k` is still to start or finish while online.
    pub fn waiting_upto(&self, k: usize) -> bool {
        self.stages[..=k.min(self.stages.len() - 1)]
            .iter()
            .any(|c| c.pending_online + c.updating_online > 0)
    }

    /// Members not updated yet in stages after `k`, online or not: the control cohort exists
    /// while there is one.
    pub fn control_after(&self, k: usize) -> u64 {
        self.stages.iter().skip(k + 1).map(|c| c.pending).sum()
    }

    /// Updates in flight with their device online (a stage's concurrency).
    pub fn updating_online(&self) -> u64 {
        self.stages.iter().map(|c| c.updating_online).sum()
    }

    /// Pending, online members of the stages reached, by rollout order.
    pub fn ready(&self) -> impl Iterator<Item = &str> {
        self.ready.iter().map(|(_, d)| d.as_str())
    }

    /// Pending, online members of later stages, by rollout order.
    pub fn later(&self) -> impl Iterator<Item = &str> {
        self.later.iter().map(|(_, d)| d.as_str())
    }

    pub fn insert(&mut self, d: RolloutDevice, online: bool) {
        if let Some(old) = self.devices.remove(&d.device) {
            self.count(&old, false);
        }
        if online {
            self.online.insert(d.device.clone());
        } else {
            self.online.remove(&d.device);
        }
        self.count(&d, true);
        self.devices.insert(d.device.clone(), d);
    }

    /// Changes a member; returns it as changed (for saving), or `None` if it is not one.
    pub fn update(
        &mut self,
        device: &str,
        f: impl FnOnce(&mut RolloutDevice),
    ) -> Option<RolloutDevice> {
        let mut d = self.devices.remove(device)?;
        self.count(&d, false);
        f(&mut d);
        d.stage = d.stage.min(self.stages.len() - 1);
        self.count(&d, true);
        let out = d.clone();
        self.devices.insert(device.to_owned(), d);
        Some(out)
    }

    pub fn set_online(&mut self, device: &str, online: bool) {
        let Some(d) = self.devices.remove(device) else {
            return;
        };
        self.count(&d, false);
        if online {
            self.online.insert(device.to_owned());
        } else {
            self.online.remove(device);
        }
        self.count(&d, true);
        self.devices.insert(device.to_owned(), d);
    }

    /// The rollout reached stage `k`: pending members of the stages up to it are `ready`, the
    /// others `later`. Once per stage; costs the pending, online members.
    pub fn set_current(&mut self, k: usize) {
        self.current = k;
        let all: Vec<(u64, String)> = std::mem::take(&mut self.ready)
            .into_iter()
            .chain(std::mem::take(&mut self.later))
            .collect();
        for entry in all {
            let now = self.devices.get(&entry.1).is_some_and(|m| m.stage <= k);
            if now {
                self.ready.insert(entry);
            } else {
                self.later.insert(entry);
            }
        }
    }

    fn count(&mut self, d: &RolloutDevice, add: bool) {
        let on = self.online.contains(&d.device);
        let c = &mut self.stages[d.stage];
        let step = |n: &mut u64| {
            if add { *n += 1 } else { *n -= 1 }
        };
        step(&mut c.devices);
        match &d.state {
            DeviceState::Pending => {
                step(&mut c.pending);
                if on {
                    step(&mut c.pending_online);
                    let set = if d.stage <= self.current {
                        &mut self.ready
                    } else {
                        &mut self.later
                    };
                    let key = (d.order, d.device.clone());
                    if add {
                        set.insert(key);
                    } else {
                        set.remove(&key);
                    }
                }
            }
            DeviceState::Updating => {
                step(&mut c.updating);
                if on {
                    step(&mut c.updating_online);
                }
            }
            DeviceState::Failed { .. } => step(&mut c.failed),
            DeviceState::Rejected { .. } => step(&mut c.rejected),
            DeviceState::TimedOut => step(&mut c.timed_out),
            _ => {}
        }
        if d.state.finished() {
            step(&mut c.finished);
        }
        if d.state.took_it() {
            step(&mut c.took_it);
        }
    }

    /// Panics unless every index matches a count from scratch (tests).
    #[cfg(test)]
    pub fn check(&self) {
        let mut fresh = Members::new(self.stages.len());
        fresh.current = self.current;
        for d in self.devices.values() {
            fresh.insert(d.clone(), self.online.contains(&d.device));
        }
        assert_eq!(self.stages, fresh.stages, "stage counts");
        assert_eq!(self.ready, fresh.ready, "ready");
        assert_eq!(self.later, fresh.later, "later");
    }
}

#[cfg(test)]
mod tests;
