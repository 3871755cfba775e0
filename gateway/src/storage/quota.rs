//! The storage quota (`storage.max_bytes`): keeps the database file near its limit under a
//! sustained flood by deleting the oldest telemetry and log rows.
//!
//! A redb file never shrinks; pages freed by deletes are reused. So the quota cannot watch the
//! file alone (once near the limit it stays there): it controls what retention can delete, the
//! bytes of stored rows, against a cap. The cap is set when the file first comes near the
//! limit (to the row bytes stored then, less a margin), and lowered again each time the file
//! grows while near it (page overhead, fragmentation, the copy-on-write pages of a commit).
//! Each lowering takes another share off the rows, so the file's growth converges instead of
//! following the flood. A file below the mark (a raised limit) lifts the cap. Pure: sizes are
//! arguments.

/// The file counts as near its limit from this share of it.
const NEAR: f64 = 0.9;
/// Each setting or lowering of the cap takes this share off the row bytes.
const STEP: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// `storage.max_bytes`; 0: no quota.
    max: u64,
    /// The cap on row bytes, once the file came near its limit; 0 before.
    cap: u64,
    /// The largest file size seen since the cap was last set.
    file: u64,
}

impl Quota {
    /// A quota of `max` bytes whose cap was `cap` (stored; 0: not reached yet).
    pub fn new(max: u64, cap: u64) -> Quota {
        Quota { max, cap, file: 0 }
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// After a batch: with the file at `file` bytes and `rows` bytes of rows stored, how many
    /// row bytes to delete now, oldest first.
    pub fn excess(&mut self, file: u64, rows: u64) -> u64 {
        if self.max == 0 {
            return 0;
        }
        let near = (self.max as f64 * NEAR) as u64;
        if file < near {
            // Far from the limit (or the limit was raised): nothing to hold back.
            self.cap = 0;
            return 0;
        }
        if self.cap == 0 {
            self.cap = ((rows as f64 * STEP) as u64).max(1);
            self.file = file;
        } else if self.file == 0 {
            // The first look after a start: the stored cap holds, from this size on.
            self.file = file;
        } else if file > self.file {
            self.cap = ((self.cap.min(rows) as f64 * STEP) as u64).max(1);
            self.file = file;
        }
        rows.saturating_sub(self.cap)
    }
}

#[cfg(test)]
mod tests;
