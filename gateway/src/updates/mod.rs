//! The update engine: which device gets which chunks when. A pure state machine: the writer
//! feeds it events (a transfer started, a device reported, came online, went offline, time
//! passed) and carries out the actions it returns (save a transfer, send an offer, send
//! chunks). No I/O, no clock: `now_ms` is an argument.
//!
//! Rules:
//! - At most `max_concurrent` transfers hold a download slot: offered or downloading, with the
//!   device online. The rest wait, oldest first. A transfer gets a slot only by being offered
//!   from the queue; download progress reported for one without a slot is from an earlier offer
//!   and is ignored.
//! - Chunks go out a window at a time: never more than `window` beyond what the device last
//!   said it has. The device's word is the truth: after a reconnect or reboot it says where it
//!   is (`accepted` with its next chunk) and the engine continues from there.
//! - A device that goes offline mid-download gives up its slot and is offered the transfer
//!   again when it returns. One that stays silent for `stall_timeout` is offered it again, up to
//!   `retries` times, then the transfer times out.
//! - An event costs what it concerns, not every transfer: the slots in use and the queue of
//!   transfers waiting for one (queued, device online) are kept as indexes, updated with every
//!   change of a transfer's state or its device's presence. A reconnect storm of N devices is
//!   O(N log N) in all. Only the timer looks at every transfer, once a tick.

use std::collections::{BTreeSet, HashMap, HashSet};

use fleetgate_protocol::{UpdateReport, UpdateState};

use crate::model::{TransferRecord, TransferState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub window: u32,
    pub max_concurrent: usize,
    pub stall_ms: u64,
    pub retries: u32,
}

impl From<&fleetgate_config::Updates> for Settings {
    fn from(c: &fleetgate_config::Updates) -> Self {
        Settings {
            window: c.window,
            max_concurrent: c.max_concurrent,
            stall_ms: c.stall_timeout.as_millis() as u64,
            retries: c.retries,
        }
    }
}

/// A transfer's own stall timeout and retries (a rollout stage's), instead of the gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub stall_ms: u64,
    pub retries: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Start(TransferRecord),
    StartLimited(TransferRecord, Limits),
    Report {
        device: String,
        report: UpdateReport,
    },
    /// The device said hello: it is connected and subscribed to its downlink topics.
    Online(String),
    /// The device's connection ended.
    Offline(String),
    Cancel {
        id: u64,
        by: String,
    },
    Tick,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Persist this state of a transfer (before anything it implies is sent).
    Save(Box<TransferRecord>),
    /// Send the transfer's signed manifest to its device.
    Offer { id: u64 },
    /// Send chunks `from..to` of the transfer to its device.
    Send { id: u64, from: u64, to: u64 },
}

/// The engine's refusal of an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no transfer {transfer} in progress for {device}")]
    UnknownTransfer { device: String, transfer: u64 },
    #[error("{0} already has an update in progress (transfer {1})")]
    Busy(String, u64),
    #[error("transfer {0} is not in progress")]
    NotLive(u64),
}

#[derive(Debug, Clone)]
struct Live {
    record: TransferRecord,
    /// Chunks below this have been sent since the last (re)start of the download.
    sent_upto: u64,
    last_activity_ms: u64,
    limits: Option<Limits>,
}

#[derive(Debug, Default)]
pub struct Engine {
    settings: Option<Settings>,
    live: HashMap<u64, Live>,
    by_device: HashMap<String, u64>,
    online: HashSet<String>,
    /// Transfers holding a slot (see [`holds_slot`]) with their device online.
    slots: usize,
    /// Transfers queued with their device online: the next to be offered, oldest first.
    waiting: BTreeSet<u64>,
}

/// Offered or downloading: what `max_concurrent` bounds (chunks go out to it). A device that
/// verifies or installs needs no more chunks and leaves its slot to the next download.
fn holds_slot(state: &TransferState) -> bool {
    matches!(state, TransferState::Offered | TransferState::Downloading)
}

/// Waiting for the device to say something: a silent one is offered again, then times out.
fn in_progress(state: &TransferState) -> bool {
    holds_slot(state) || matches!(state, TransferState::Verifying | TransferState::Installing)
}

impl Engine {
    pub fn new(settings: Settings) -> Engine {
        Engine {
            settings: Some(settings),
            ..Engine::default()
        }
    }

    fn settings(&self) -> Settings {
        self.settings.unwrap_or(Settings {
            window: 8,
            max_concurrent: 1,
            stall_ms: 60_000,
            retries: 0,
        })
    }

    /// The live transfer of a device, if any.
    pub fn transfer_of(&self, device: &str) -> Option<&TransferRecord> {
        self.by_device
            .get(device)
            .and_then(|id| self.live.get(id))
            .map(|l| &l.record)
    }

    pub fn transfer(&self, id: u64) -> Option<&TransferRecord> {
        self.live.get(&id).map(|l| &l.record)
    }

    /// Transfers in progress.
    pub fn live(&self) -> impl Iterator<Item = &TransferRecord> {
        self.live.values().map(|l| &l.record)
    }

    /// Transfers holding a download slot now.
    pub fn active(&self) -> usize {
        self.slots
    }

    /// Panics unless the indexes match a count from scratch (tests).
    #[cfg(test)]
    pub(crate) fn check_indexes(&self) {
        let online = |l: &&Live| self.online.contains(&l.record.device);
        let slots = self
            .live
            .values()
            .filter(online)
            .filter(|l| holds_slot(&l.record.state))
            .count();
        let waiting: BTreeSet<u64> = self
            .live
            .values()
            .filter(online)
            .filter(|l| l.record.state == TransferState::Queued)
            .map(|l| l.record.id)
            .collect();
        assert_eq!(
            (self.slots, &self.waiting),
            (slots, &waiting),
            "update engine indexes"
        );
    }

    /// Takes transfer `id` out of the indexes (before it changes).
    fn unindex(&mut self, id: u64) {
        let Some(l) = self.live.get(&id) else {
            return;
        };
        if self.online.contains(&l.record.device) {
            if holds_slot(&l.record.state) {
                self.slots -= 1;
            }
            if l.record.state == TransferState::Queued {
                self.waiting.remove(&id);
            }
        }
    }

    /// Puts transfer `id` back into the indexes (after it changed).
    fn index(&mut self, id: u64) {
        let Some(l) = self.live.get(&id) else {
            return;
        };
        if self.online.contains(&l.record.device) {
            if holds_slot(&l.record.state) {
                self.slots += 1;
            }
            if l.record.state == TransferState::Queued {
                self.waiting.insert(id);
            }
        }
    }

    /// Changes the device's presence, keeping the indexes of its transfer in step.
    fn set_online(&mut self, device: &str, online: bool) {
        let transfer = self.by_device.get(device).copied();
        if let Some(id) = transfer {
            self.unindex(id);
        }
        if online {
            self.online.insert(device.to_owned());
        } else {
            self.online.remove(device);
        }
        if let Some(id) = transfer {
            self.index(id);
        }
    }

    pub fn on_event(&mut self, event: Event, now_ms: u64) -> Result<Vec<Action>, Refused> {
        let mut actions = Vec::new();
        match event {
            Event::Start(record) => self.start(record, None, now_ms, &mut actions)?,
            Event::StartLimited(record, limits) => {
                self.start(record, Some(limits), now_ms, &mut actions)?
            }
            Event::Report { device, report } => {
                self.report(device, report, now_ms, &mut actions)?
            }
            Event::Online(device) => self.set_online(&device, true),
            Event::Offline(device) => {
                self.set_online(&device, false);
                if let Some(&id) = self.by_device.get(&device)
                    && let Some(live) = self.live.get_mut(&id)
                    && matches!(
                        live.record.state,
                        TransferState::Offered | TransferState::Downloading
                    )
                {
                    // Offline: out of the indexes whatever its state.
                    live.record.state = TransferState::Queued;
                    live.record.updated_ms = now_ms;
                    actions.push(Action::Save(Box::new(live.record.clone())));
                }
            }
            Event::Cancel { id, by } => {
                if !self.live.contains_key(&id) {
                    return Err(Refused::NotLive(id));
                }
                self.unindex(id);
                if let Some(live) = self.live.get_mut(&id) {
                    live.record.state = TransferState::Cancelled { by };
                }
                self.finish(id, now_ms, &mut actions);
            }
            Event::Tick => self.stalls(now_ms, &mut actions),
        }
        self.admit(now_ms, &mut actions);
        Ok(actions)
    }

    fn start(
        &mut self,
        mut record: TransferRecord,
        limits: Option<Limits>,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(), Refused> {
        if let Some(&id) = self.by_device.get(&record.device) {
            return Err(Refused::Busy(record.device, id));
        }
        // A transfer reloaded after a restart waits to be offered again; its device will say
        // where its download stands.
        if matches!(
            record.state,
            TransferState::Offered | TransferState::Downloading
        ) {
            record.state = TransferState::Queued;
        }
        record.updated_ms = now_ms;
        actions.push(Action::Save(Box::new(record.clone())));
        self.by_device.insert(record.device.clone(), record.id);
        // Chunks go out in order and only go back on a rewind, so the chunks sent once are
        // 0..(sent - resent): a device resuming below that gets some of them again, counted
        // as resent like any rewind.
        let sent_upto = record
            .chunks_sent
            .saturating_sub(record.chunks_resent)
            .clamp(record.next_chunk.min(record.chunks), record.chunks);
        let id = record.id;
        self.live.insert(
            id,
            Live {
                record,
                sent_upto,
                last_activity_ms: now_ms,
                limits,
            },
        );
        self.index(id);
        Ok(())
    }

    fn report(
        &mut self,
        device: String,
        report: UpdateReport,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(), Refused> {
        let id = match self.by_device.get(&device) {
            Some(&id) if id == report.transfer => id,
            _ => {
                return Err(Refused::UnknownTransfer {
                    device,
                    transfer: report.transfer,
                });
            }
        };
        if !self.live.contains_key(&id) {
            return Err(Refused::UnknownTransfer {
                device,
                transfer: report.transfer,
            });
        }
        // The device's offline event can overtake the last reports of the connection that
        // ended (presence goes straight to the writer, reports through the broker). A download
        // report from a device that is offline is such a straggler: acting on it would send
        // chunks nowhere and leave the transfer "downloading", so the device's next hello
        // would not offer it again. The device says where it is when it is offered again.
        if !self.online.contains(&device)
            && matches!(
                report.state,
                UpdateState::Accepted { .. } | UpdateState::Downloading { .. }
            )
        {
            return Ok(());
        }
        self.unindex(id);
        let outcome = self.apply_report(id, report, now_ms, actions);
        self.index(id);
        if outcome {
            self.finish(id, now_ms, actions);
        }
        Ok(())
    }

    /// Applies a report to a live transfer; true when the transfer reached a final state.
    fn apply_report(
        &mut self,
        id: u64,
        report: UpdateReport,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> bool {
        let window = u64::from(self.settings().window);
        let Some(live) = self.live.get_mut(&id) else {
            return false;
        };
        // After an offer the device's first word is `accepted` with where it stands. A
        // `downloading` before it is from the previous offer (its device sends again what was
        // not acknowledged when its connection ended); acting on it would send chunks the
        // device may already have.
        if live.record.state == TransferState::Offered
            && matches!(report.state, UpdateState::Downloading { .. })
        {
            return false;
        }
        // Download progress counts only for a transfer holding a slot: for a queued one (not
        // offered since it was queued), or one verifying or installing, it is from an earlier
        // offer, and taking it would hold a slot past `max_concurrent`. Such a transfer is
        // offered when a slot is free and the device says then where it is. Progress past the
        // download never needs a slot, and a final outcome counts whatever the state.
        let progress = match report.state {
            UpdateState::Accepted { .. } | UpdateState::Downloading { .. } => {
                holds_slot(&live.record.state)
            }
            UpdateState::Verifying | UpdateState::Installing => {
                live.record.state != TransferState::Queued
            }
            _ => true,
        };
        if !progress {
            return false;
        }
        live.last_activity_ms = now_ms;
        let r = &mut live.record;
        r.updated_ms = now_ms;
        let chunks = r.chunks;
        let mut finished = false;
        match report.state {
            UpdateState::Accepted { next_chunk } | UpdateState::Downloading { next_chunk } => {
                let next = u64::from(next_chunk).min(chunks);
                if matches!(report.state, UpdateState::Accepted { .. })
                    || next < live.sent_upto.saturating_sub(window)
                {
                    // A (re)start: the device says where it is; anything sent past that point
                    // is sent again.
                    r.chunks_resent += live.sent_upto.saturating_sub(next);
                    live.sent_upto = next;
                }
                r.state = TransferState::Downloading;
                r.next_chunk = next;
                let from = live.sent_upto.max(next);
                let to = (next + window).min(chunks);
                if from < to {
                    r.chunks_sent += to - from;
                    live.sent_upto = to;
                    actions.push(Action::Save(Box::new(r.clone())));
                    actions.push(Action::Send { id, from, to });
                    return false;
                }
            }
            UpdateState::Verifying => r.state = TransferState::Verifying,
            UpdateState::Installing => r.state = TransferState::Installing,
            UpdateState::Installed { .. } => {
                r.state = TransferState::Installed;
                r.next_chunk = chunks;
                finished = true;
            }
            UpdateState::Rejected { reason, detail } => {
                r.state = TransferState::Rejected { reason, detail };
                finished = true;
            }
            UpdateState::Failed { reason, detail } => {
                r.state = TransferState::Failed { reason, detail };
                finished = true;
            }
            // The writer passes this on only for a validation transfer, having stored the
            // result.
            UpdateState::Validated(_) => {
                r.state = TransferState::Validated;
                r.next_chunk = chunks;
                finished = true;
            }
        }
        if !finished {
            actions.push(Action::Save(Box::new(live.record.clone())));
        }
        finished
    }

    /// Records a final state and frees the device and its slot.
    fn finish(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        self.unindex(id);
        if let Some(mut live) = self.live.remove(&id) {
            self.by_device.remove(&live.record.device);
            live.record.finished_ms = Some(now_ms);
            live.record.updated_ms = now_ms;
            actions.push(Action::Save(Box::new(live.record)));
        }
    }

    /// Offers queued transfers of online devices, oldest first, while slots are free.
    fn admit(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        while self.slots < self.settings().max_concurrent {
            let Some(&id) = self.waiting.first() else {
                return;
            };
            self.offer(id, now_ms, actions);
        }
    }

    fn offer(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        self.unindex(id);
        self.offer_unindexed(id, now_ms, actions);
        self.index(id);
    }

    fn offer_unindexed(&mut self, id: u64, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        live.record.state = TransferState::Offered;
        live.record.offers += 1;
        live.record.updated_ms = now_ms;
        live.last_activity_ms = now_ms;
        actions.push(Action::Save(Box::new(live.record.clone())));
        actions.push(Action::Offer { id });
    }

    /// Re-offers transfers whose device went silent, or times them out.
    fn stalls(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let s = self.settings();
        let limits = |l: &Live| {
            l.limits.unwrap_or(Limits {
                stall_ms: s.stall_ms,
                retries: s.retries,
            })
        };
        let mut stalled: Vec<u64> = self
            .live
            .values()
            .filter(|l| in_progress(&l.record.state) && self.online.contains(&l.record.device))
            .filter(|l| now_ms.saturating_sub(l.last_activity_ms) >= limits(l).stall_ms)
            .map(|l| l.record.id)
            .collect();
        stalled.sort_unstable();
        for id in stalled {
            let offers = self.live[&id].record.offers;
            if offers > limits(&self.live[&id]).retries {
                self.unindex(id);
                if let Some(live) = self.live.get_mut(&id) {
                    live.record.state = TransferState::TimedOut;
                }
                self.finish(id, now_ms, actions);
            } else if holds_slot(&self.live[&id].record.state) {
                self.offer(id, now_ms, actions);
            } else {
                // Silent while verifying or installing: offered again when a slot is free.
                self.unindex(id);
                if let Some(live) = self.live.get_mut(&id) {
                    live.record.state = TransferState::Queued;
                    live.record.updated_ms = now_ms;
                    live.last_activity_ms = now_ms;
                    actions.push(Action::Save(Box::new(live.record.clone())));
                }
                self.index(id);
            }
        }
    }
}

#[cfg(test)]
mod tests;
