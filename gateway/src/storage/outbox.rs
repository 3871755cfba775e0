//! Outboxes: messages waiting for destinations outside the gateway (the upstream broker, alert
//! webhooks), each stream an append-only log of numbered entries with a cursor per destination.
//!
//! Invariants:
//! - An entry is written in the same transaction as the event that caused it, so a gateway that
//!   committed an event has its message, and one that did not has neither.
//! - Sequence numbers of a stream only grow (1, 2, ...), and never repeat, even after every
//!   entry was removed: `(site, stream, seq)` identifies a message for good.
//! - The entries present are exactly `tail..=head`: removal happens only at the old end.
//! - A destination's cursor is the highest sequence number it acknowledged; it only moves
//!   forward. Entries every destination acknowledged are removed.
//! - A stream holds at most `max_messages` entries and `max_bytes` bytes of them (one entry is
//!   always kept): past either, the oldest go first, counted in `dropped`.
//! - A stream without destinations keeps nothing.

use redb::{ReadableDatabase, ReadableTable};

use super::schema::{OUTBOX, OUTBOX_CURSORS, OUTBOX_STATE};
use super::{Result, Store, Tables};

/// The outbox streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// What goes to the upstream broker.
    Upstream,
    /// Alert notifications for the webhooks.
    Webhooks,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Upstream, Stream::Webhooks];

    fn key(self) -> u8 {
        match self {
            Stream::Upstream => 0,
            Stream::Webhooks => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stream::Upstream => "upstream",
            Stream::Webhooks => "webhooks",
        }
    }
}

/// Bounds of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_messages: u64,
    pub max_bytes: u64,
}

impl From<fleetgate_config::OutboxLimits> for Limits {
    fn from(l: fleetgate_config::OutboxLimits) -> Self {
        Limits {
            max_messages: l.max_messages,
            max_bytes: l.max_bytes,
        }
    }
}

/// Where a stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    /// The last sequence number given (0: none yet).
    pub head: u64,
    /// The oldest entry still stored (`head + 1` when none is).
    pub tail: u64,
    /// Bytes of the stored entries.
    pub bytes: u64,
    /// Entries removed before every destination acknowledged them, since the stream began.
    pub dropped: u64,
}

impl Default for StreamState {
    fn default() -> Self {
        StreamState {
            head: 0,
            tail: 1,
            bytes: 0,
            dropped: 0,
        }
    }
}

impl StreamState {
    /// Entries stored.
    pub fn len(&self) -> u64 {
        (self.head + 1).saturating_sub(self.tail)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn from_value(v: (u64, u64, u64, u64)) -> StreamState {
        StreamState {
            head: v.0,
            tail: v.1,
            bytes: v.2,
            dropped: v.3,
        }
    }

    fn value(&self) -> (u64, u64, u64, u64) {
        (self.head, self.tail, self.bytes, self.dropped)
    }
}

/// A stream's state and its destinations' cursors, as of one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub state: StreamState,
    pub cursors: Vec<(String, u64)>,
}

impl Snapshot {
    pub fn cursor(&self, destination: &str) -> Option<u64> {
        self.cursors
            .iter()
            .find(|(d, _)| d == destination)
            .map(|(_, c)| *c)
    }
}

impl Tables<'_> {
    fn outbox_state(&self, stream: Stream) -> Result<StreamState> {
        Ok(self
            .outbox_state
            .get(stream.key())?
            .map_or_else(StreamState::default, |v| StreamState::from_value(v.value())))
    }

    fn put_outbox_state(&mut self, stream: Stream, s: &StreamState) -> Result<()> {
        self.changed = true;
        self.outbox_state.insert(stream.key(), s.value())?;
        Ok(())
    }

    /// Appends `entry` to `stream` and returns its sequence number; drops the oldest entries
    /// while the stream is over `limits` (never the new one).
    pub fn outbox_push(&mut self, stream: Stream, entry: &[u8], limits: Limits) -> Result<u64> {
        let mut s = self.outbox_state(stream)?;
        s.head += 1;
        let seq = s.head;
        self.outbox.insert((stream.key(), seq), entry)?;
        s.bytes += entry.len() as u64;
        while s.len() > 1 && (s.len() > limits.max_messages || s.bytes > limits.max_bytes) {
            if let Some(old) = self.outbox.remove((stream.key(), s.tail))? {
                s.bytes = s.bytes.saturating_sub(old.value().len() as u64);
            }
            s.tail += 1;
            s.dropped += 1;
        }
        self.put_outbox_state(stream, &s)?;
        Ok(seq)
    }

    /// Destination `destination` acknowledged every entry of `stream` up to `upto`. Unknown
    /// destinations (no longer configured) change nothing; a cursor never goes back.
    pub fn outbox_ack(&mut self, stream: Stream, destination: &str, upto: u64) -> Result<()> {
        let Some(cursor) = self
            .outbox_cursors
            .get((stream.key(), destination))?
            .map(|v| v.value())
        else {
            return Ok(());
        };
        let s = self.outbox_state(stream)?;
        let upto = upto.min(s.head);
        if upto <= cursor {
            return Ok(());
        }
        self.changed = true;
        self.outbox_cursors
            .insert((stream.key(), destination), upto)?;
        self.outbox_collect(stream)
    }

    /// Makes `destinations` the stream's destinations: new ones start at the oldest entry
    /// stored, ones no longer named are forgotten (and hold nothing back any more).
    pub fn outbox_destinations(&mut self, stream: Stream, destinations: &[&str]) -> Result<()> {
        let k = stream.key();
        let mut gone = Vec::new();
        for entry in self.outbox_cursors.range((k, "")..(k + 1, ""))? {
            let (key, _) = entry?;
            let name = key.value().1.to_owned();
            if !destinations.contains(&name.as_str()) {
                gone.push(name);
            }
        }
        let s = self.outbox_state(stream)?;
        let mut changed = !gone.is_empty();
        for name in gone {
            self.outbox_cursors.remove((k, name.as_str()))?;
        }
        for d in destinations {
            if self.outbox_cursors.get((k, *d))?.is_none() {
                self.outbox_cursors.insert((k, *d), s.tail - 1)?;
                changed = true;
            }
        }
        if changed {
            self.changed = true;
            self.outbox_collect(stream)?;
        }
        Ok(())
    }

    /// Removes the entries every destination acknowledged (all of them without destinations).
    fn outbox_collect(&mut self, stream: Stream) -> Result<()> {
        let k = stream.key();
        let mut s = self.outbox_state(stream)?;
        let mut done = s.head;
        for entry in self.outbox_cursors.range((k, "")..(k + 1, ""))? {
            done = done.min(entry?.1.value());
        }
        if done < s.tail {
            return Ok(());
        }
        let mut freed = 0u64;
        self.outbox.retain_in((k, s.tail)..=(k, done), |_, v| {
            freed += v.len() as u64;
            false
        })?;
        s.bytes = s.bytes.saturating_sub(freed);
        s.tail = done + 1;
        self.put_outbox_state(stream, &s)
    }
}

impl Store {
    /// Up to `max` entries of `stream` after sequence number `after`, oldest first, at most
    /// `max_bytes` of them (but at least one).
    pub fn outbox_read(
        &self,
        stream: Stream,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        let k = stream.key();
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in table.range((k, after.saturating_add(1))..=(k, u64::MAX))? {
            if out.len() >= max || (bytes >= max_bytes && !out.is_empty()) {
                break;
            }
            let (key, value) = entry?;
            bytes += value.value().len();
            out.push((key.value().1, value.value().to_vec()));
        }
        Ok(out)
    }

    /// A stream's state and cursors.
    pub fn outbox_snapshot(&self, stream: Stream) -> Result<Snapshot> {
        let txn = self.db.begin_read()?;
        let k = stream.key();
        let state = txn
            .open_table(OUTBOX_STATE)?
            .get(k)?
            .map_or_else(StreamState::default, |v| StreamState::from_value(v.value()));
        let mut cursors = Vec::new();
        for entry in txn
            .open_table(OUTBOX_CURSORS)?
            .range((k, "")..(k + 1, ""))?
        {
            let (key, value) = entry?;
            cursors.push((key.value().1.to_owned(), value.value()));
        }
        Ok(Snapshot { state, cursors })
    }
}

#[cfg(test)]
mod tests;
