//! Loss and duplicate detection from per-device telemetry sequence numbers.
//!
//! A device numbers its telemetry `seq = n, n+1, ...` within one `boot`. The tracker remembers
//! the highest number seen and which of the [`WINDOW`] numbers below it have arrived, so that a
//! late (reordered or redelivered) message fills its gap instead of counting twice.

use serde::{Deserialize, Serialize};

/// How far back a late message is still recognised.
pub const WINDOW: u32 = 64;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqTracker {
    /// `None` until the first message.
    boot: Option<u32>,
    /// One past the highest sequence number seen in this boot.
    next: u32,
    /// Bit i set: `next - 1 - i` has arrived.
    seen: u64,
}

/// What one sequence number means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqOutcome {
    /// The first message of a boot: nothing before it is counted as lost.
    Started,
    /// In order, after `lost` missing numbers (0 when consecutive).
    Next { lost: u32 },
    /// A number that was counted as lost arrived late: one fewer lost.
    Late,
    /// Seen before (or too old to tell): not stored again.
    Duplicate,
}

impl SeqTracker {
    pub fn observe(&mut self, boot: u32, seq: u32) -> SeqOutcome {
        if self.boot != Some(boot) {
            *self = SeqTracker {
                boot: Some(boot),
                next: seq.wrapping_add(1),
                seen: 1,
            };
            return SeqOutcome::Started;
        }
        if seq >= self.next {
            let lost = seq - self.next;
            let shift = lost.saturating_add(1);
            self.seen = if shift >= 64 { 0 } else { self.seen << shift } | 1;
            self.next = seq.wrapping_add(1);
            return SeqOutcome::Next { lost };
        }
        let back = self.next - 1 - seq;
        if back >= WINDOW {
            return SeqOutcome::Duplicate;
        }
        let bit = 1u64 << back;
        if self.seen & bit != 0 {
            SeqOutcome::Duplicate
        } else {
            self.seen |= bit;
            SeqOutcome::Late
        }
    }
}

#[cfg(test)]
mod tests;
