//! Loss and duplicate detection from per-device telemetry sequence numbers.
//!
//! A device numbers its telemetry `seq = n, n+1, ...` within one `boot`. The tracker remembers,
//! per boot, the highest number seen and which of the [`WINDOW`] numbers below it have
//! arrived, so that a late (reordered or redelivered) message fills its gap instead of
//! counting twice.
//!
//! Invariants:
//! - Only a repeat the tracker has seen is a duplicate (and not stored again). A message too
//!   far behind to tell is [`SeqOutcome::Old`]: stored, and neither lost nor found.
//! - The tracker follows the current boot and the one before it. A stray message of the
//!   previous boot (delivered late, after the reboot) is judged against that boot's window and
//!   does not reset the current one, so it cannot hide the current boot's gaps. A message of
//!   any other boot starts a new sequence; the current boot becomes the previous one.

use serde::{Deserialize, Serialize};

/// How far back a late message is still recognised, in sequence numbers.
pub const WINDOW: u32 = 256;
const WORDS: usize = (WINDOW / 64) as usize;

/// One boot's sequence: one past the highest number seen, and which of the [`WINDOW`] numbers
/// below it have arrived (bit i: `next - 1 - i`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootWindow {
    pub boot: u32,
    next: u32,
    seen: [u64; WORDS],
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqTracker {
    current: Option<BootWindow>,
    previous: Option<BootWindow>,
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
    /// Seen before: not stored again.
    Duplicate,
    /// More than [`WINDOW`] behind the newest: stored, but whether it was lost or is a repeat
    /// cannot be told any more.
    Old,
}

impl BootWindow {
    fn start(boot: u32, seq: u32) -> BootWindow {
        let mut seen = [0; WORDS];
        seen[0] = 1;
        BootWindow {
            boot,
            next: seq.wrapping_add(1),
            seen,
        }
    }

    fn bit(&self, back: u32) -> bool {
        self.seen[(back / 64) as usize] & (1 << (back % 64)) != 0
    }

    fn set(&mut self, back: u32) {
        self.seen[(back / 64) as usize] |= 1 << (back % 64);
    }

    /// Shifts the window forward by `by` numbers (the newest moves to bit `by`).
    fn shift(&mut self, by: u32) {
        if by >= WINDOW {
            self.seen = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, by % 64);
        for i in (0..WORDS).rev() {
            let from = i.checked_sub(words);
            let hi = from.map_or(0, |j| self.seen[j]);
            let lo = from
                .and_then(|j| j.checked_sub(1))
                .map_or(0, |j| self.seen[j]);
            self.seen[i] = if bits == 0 {
                hi
            } else {
                (hi << bits) | (lo >> (64 - bits))
            };
        }
    }

    fn observe(&mut self, seq: u32) -> SeqOutcome {
        if seq >= self.next {
            let lost = seq - self.next;
            self.shift(lost.saturating_add(1));
            self.set(0);
            self.next = seq.wrapping_add(1);
            return SeqOutcome::Next { lost };
        }
        let back = self.next - 1 - seq;
        if back >= WINDOW {
            return SeqOutcome::Old;
        }
        if self.bit(back) {
            SeqOutcome::Duplicate
        } else {
            self.set(back);
            SeqOutcome::Late
        }
    }
}

impl SeqTracker {
    /// A tracker that has seen `seq` of `boot` and, of the 64 numbers below it, those whose
    /// bit is set in `seen` (how trackers were stored before the window grew).
    pub fn from_v1(boot: Option<u32>, next: u32, seen: u64) -> SeqTracker {
        SeqTracker {
            current: boot.map(|boot| {
                let mut w = BootWindow {
                    boot,
                    next,
                    seen: [0; WORDS],
                };
                w.seen[0] = seen;
                w
            }),
            previous: None,
        }
    }

    pub fn observe(&mut self, boot: u32, seq: u32) -> SeqOutcome {
        match (&mut self.current, &mut self.previous) {
            (Some(cur), _) if cur.boot == boot => cur.observe(seq),
            (Some(_), Some(prev)) if prev.boot == boot => {
                let outcome = prev.observe(seq);
                // The previous boot moving forward is the live one (the "new" boot was a
                // stray): make it current again.
                if matches!(outcome, SeqOutcome::Next { .. }) {
                    std::mem::swap(&mut self.current, &mut self.previous);
                }
                outcome
            }
            _ => {
                self.previous = self.current.take();
                self.current = Some(BootWindow::start(boot, seq));
                SeqOutcome::Started
            }
        }
    }
}

#[cfg(test)]
mod tests;
