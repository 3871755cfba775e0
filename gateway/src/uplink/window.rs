//! The publishes of one upstream connection that wait for their PUBACK, and how far the outbox
//! is acknowledged: a pure state machine the sender drives with what the MQTT client reports.
//!
//! The client numbers publishes (packet ids) when it writes them, in the order they were
//! requested, and reuses a number once its PUBACK came. So the sender records each request in
//! order ([`Window::request`]), the client's "written with packet id p" gives the oldest
//! request without an id that id ([`Window::published`]), and "PUBACK p" marks the request
//! holding p ([`Window::puback`]). The outbox is acknowledged up to the newest entry such that
//! it and every entry before it have their PUBACK: a broker acknowledging out of order never
//! moves the cursor past an entry it has not acknowledged.
//!
//! Publishes that are no outbox entries (the site's status and heartbeat) take part in the
//! numbering too, without moving the cursor.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    /// The outbox entry, or `None` for a status or heartbeat publish.
    seq: Option<u64>,
    pkid: Option<u16>,
    acked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("the client wrote packet id {0} for no request")]
    UnexpectedPublish(u16),
    #[error("PUBACK for packet id {0}, which waits for none")]
    UnknownPuback(u16),
}

#[derive(Debug, Clone)]
pub struct Window {
    slots: VecDeque<Slot>,
    /// Newest outbox entry acknowledged together with every one before it.
    acked: u64,
    /// Newest outbox entry requested.
    requested: u64,
    /// Outbox entries requested and not yet acknowledged.
    pending: usize,
}

impl Window {
    /// A new connection's window: the outbox is acknowledged up to `acked`.
    pub fn new(acked: u64) -> Window {
        Window {
            slots: VecDeque::new(),
            acked,
            requested: acked,
            pending: 0,
        }
    }

    /// A publish is about to be requested: outbox entry `seq` (newer than any before), or
    /// `None` for one that is no outbox entry.
    pub fn request(&mut self, seq: Option<u64>) {
        if let Some(s) = seq {
            debug_assert!(s > self.requested, "entries are sent in order");
            self.requested = s;
            self.pending += 1;
        }
        self.slots.push_back(Slot {
            seq,
            pkid: None,
            acked: false,
        });
    }

    /// The client wrote the oldest request without a packet id, with id `pkid`.
    pub fn published(&mut self, pkid: u16) -> Result<(), WindowError> {
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.pkid.is_none())
            .ok_or(WindowError::UnexpectedPublish(pkid))?;
        slot.pkid = Some(pkid);
        Ok(())
    }

    /// The broker acknowledged packet id `pkid`. Returns the new acknowledged entry when the
    /// outbox cursor moved.
    pub fn puback(&mut self, pkid: u16) -> Result<Option<u64>, WindowError> {
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.pkid == Some(pkid) && !s.acked)
            .ok_or(WindowError::UnknownPuback(pkid))?;
        slot.acked = true;
        if slot.seq.is_some() {
            self.pending -= 1;
        }
        let before = self.acked;
        while self.slots.front().is_some_and(|s| s.acked) {
            if let Some(Slot { seq: Some(s), .. }) = self.slots.pop_front() {
                self.acked = s;
            }
        }
        Ok((self.acked > before).then_some(self.acked))
    }

    /// The newest outbox entry acknowledged with every one before it.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The newest outbox entry requested.
    pub fn requested(&self) -> u64 {
        self.requested
    }

    /// Outbox entries requested and not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Publishes of any kind waiting for their PUBACK (or for their packet id).
    pub fn waiting(&self) -> usize {
        self.slots.iter().filter(|s| !s.acked).count()
    }
}

#[cfg(test)]
mod tests;
