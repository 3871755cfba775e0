//! Loss and duplicate counting from telemetry sequence numbers, as a receiver of the
//! simulator's messages (the `load` subscriber) sees them.
//!
//! A device numbers its telemetry `seq = 0, 1, ...` within one `boot`. The gateway's tracker
//! keeps bounded state per device (a window of 64 for late arrivals, one boot at a time); this
//! one serves a single run of the simulator and keeps every boot of every device with its gaps
//! as ranges, so a late arrival fills its gap however late it comes, and messages of an older
//! boot arriving after a reboot count against their own boot. Its memory grows with the number
//! of devices, boots and gaps, never with the number of messages.
//!
//! [`SeqSet`] is the sender's side: the numbers a device had acknowledged, as ranges, so that
//! "acknowledged but not stored" can be checked number by number.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// What one observed `(boot, seq)` meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The first message of its boot.
    First,
    /// Above every number seen in its boot, after `skipped` missing numbers.
    Next { skipped: u64 },
    /// Below the highest number seen, not seen before: it fills (part of) a gap.
    Late,
    /// Seen before.
    Duplicate,
}

/// Totals over every device and boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SeqTotals {
    /// Messages observed, repeats included.
    pub received: u64,
    /// Distinct `(device, boot, seq)` observed.
    pub unique: u64,
    /// Messages observed again.
    pub duplicates: u64,
    /// Numbers missing now between the lowest and the highest seen of each boot (late arrivals
    /// fill their gap again).
    pub gaps: u64,
    /// Messages that arrived after a higher number of their boot.
    pub late: u64,
}

/// One boot's numbers: everything within `first..next` has arrived except `missing`.
#[derive(Debug, Clone)]
struct Boot {
    first: u64,
    next: u64,
    /// Gaps as `start -> end` (end exclusive), disjoint, within `first..next`.
    missing: BTreeMap<u64, u64>,
    unique: u64,
}

impl Boot {
    fn contains_missing(&self, seq: u64) -> Option<(u64, u64)> {
        self.missing
            .range(..=seq)
            .next_back()
            .map(|(s, e)| (*s, *e))
            .filter(|(_, e)| seq < *e)
    }
}

/// Counts loss and duplicates per device and boot.
#[derive(Debug, Clone, Default)]
pub struct SeqCounter {
    devices: HashMap<String, HashMap<u32, Boot>>,
    totals: SeqTotals,
}

impl SeqCounter {
    pub fn new() -> SeqCounter {
        SeqCounter::default()
    }

    /// Notes that `device` sent `seq` of `boot`.
    pub fn observe(&mut self, device: &str, boot: u32, seq: u32) -> Seen {
        let seq = u64::from(seq);
        let t = &mut self.totals;
        t.received += 1;
        let boots = match self.devices.get_mut(device) {
            Some(b) => b,
            None => self.devices.entry(device.to_owned()).or_default(),
        };
        let Some(b) = boots.get_mut(&boot) else {
            boots.insert(
                boot,
                Boot {
                    first: seq,
                    next: seq + 1,
                    missing: BTreeMap::new(),
                    unique: 1,
                },
            );
            t.unique += 1;
            return Seen::First;
        };
        if seq >= b.next {
            let skipped = seq - b.next;
            if skipped > 0 {
                b.missing.insert(b.next, seq);
            }
            b.next = seq + 1;
            b.unique += 1;
            t.unique += 1;
            t.gaps += skipped;
            return Seen::Next { skipped };
        }
        if seq < b.first {
            // An earlier number than any seen: the numbers between it and the old first are
            // now a gap.
            if seq + 1 < b.first {
                b.missing.insert(seq + 1, b.first);
                t.gaps += b.first - seq - 1;
            }
            b.first = seq;
            b.unique += 1;
            t.unique += 1;
            t.late += 1;
            return Seen::Late;
        }
        let Some((start, end)) = b.contains_missing(seq) else {
            t.duplicates += 1;
            return Seen::Duplicate;
        };
        b.missing.remove(&start);
        if start < seq {
            b.missing.insert(start, seq);
        }
        if seq + 1 < end {
            b.missing.insert(seq + 1, end);
        }
        b.unique += 1;
        t.unique += 1;
        t.gaps -= 1;
        t.late += 1;
        Seen::Late
    }

    pub fn totals(&self) -> SeqTotals {
        self.totals
    }

    /// Whether `seq` of `device`'s `boot` has arrived.
    pub fn seen(&self, device: &str, boot: u32, seq: u32) -> bool {
        let seq = u64::from(seq);
        self.devices
            .get(device)
            .and_then(|b| b.get(&boot))
            .is_some_and(|b| seq >= b.first && seq < b.next && b.contains_missing(seq).is_none())
    }

    /// Of the `sent` messages a device numbered `0..sent` in `boot`, how many have not arrived
    /// (gaps, the head and the tail alike). Assumes it never numbered beyond `sent`.
    pub fn unseen(&self, device: &str, boot: u32, sent: u64) -> u64 {
        let unique = self
            .devices
            .get(device)
            .and_then(|b| b.get(&boot))
            .map_or(0, |b| b.unique);
        sent.saturating_sub(unique)
    }
}

/// A set of sequence numbers kept as disjoint ranges: the numbers of one device's boot that
/// were acknowledged, in (nearly) ascending order, so it stays a range or a few whatever the
/// count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqSet {
    /// `start -> end` (end exclusive), disjoint and never adjacent (adjacent ranges merge).
    ranges: BTreeMap<u64, u64>,
    len: u64,
}

impl SeqSet {
    pub fn new() -> SeqSet {
        SeqSet::default()
    }

    /// Adds `seq`; false if it was already in.
    pub fn insert(&mut self, seq: u32) -> bool {
        let seq = u64::from(seq);
        let before = self.ranges.range(..=seq).next_back().map(|(s, e)| (*s, *e));
        if before.is_some_and(|(_, e)| seq < e) {
            return false;
        }
        let after_end = self.ranges.get(&(seq + 1)).copied();
        match (before.filter(|(_, e)| *e == seq), after_end) {
            (Some((s, _)), Some(e)) => {
                self.ranges.remove(&(seq + 1));
                self.ranges.insert(s, e);
            }
            (Some((s, _)), None) => {
                self.ranges.insert(s, seq + 1);
            }
            (None, Some(e)) => {
                self.ranges.remove(&(seq + 1));
                self.ranges.insert(seq, e);
            }
            (None, None) => {
                self.ranges.insert(seq, seq + 1);
            }
        }
        self.len += 1;
        true
    }

    pub fn contains(&self, seq: u32) -> bool {
        let seq = u64::from(seq);
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, e)| seq < *e)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
        self.len = 0;
    }

    /// The ranges, ascending, as `(first, last)` (inclusive).
    pub fn ranges(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.ranges
            .iter()
            .map(|(s, e)| (*s as u32, (*e - 1) as u32))
    }

    /// Every number, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges().flat_map(|(first, last)| first..=last)
    }
}

#[cfg(test)]
mod tests;
