//! The storage quota (`storage.max_bytes`): keeps the database file within 1.1 x its limit
//! under a sustained flood by deleting the oldest telemetry and log rows.
//!
//! Two facts of redb shape it. A file below 4 GiB grows by doubling when it runs out of free
//! pages, so the quota must act before the file needs to grow, not after: a growth from 12 to
//! 24 MiB cannot be taken back by deleting rows. And the file shrinks only when its tail is
//! free, so the quota cannot steer by the file's size alone.
//!
//! So it caps the bytes of stored rows (what retention can delete). The room the data may use
//! is `max_bytes` while the file may still double within 1.1 x `max_bytes`, and the file's
//! current size once it may not. How many file bytes a row byte takes (page fill, indexes,
//! other tables, the pages a commit copies and the ones it frees for later) is learned each
//! time the file grows: the rows stored then needed more than the file had. The cap is the
//! room, less a margin, over that ratio. Pure: sizes are arguments.

/// The file may reach this multiple of `max_bytes`.
const SLACK: f64 = 1.1;
/// The share of the room the rows may fill: the rest is for what a commit writes before the
/// pages it frees can be used again, and for pages that fill less well than when the ratio
/// was learned.
const MARGIN: f64 = 0.8;
/// How the learned ratio is stored (an integer in millionths).
const RATIO_UNIT: f64 = 1e6;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// `storage.max_bytes`; 0: no quota.
    max: u64,
    /// The cap on row bytes of the last call; 0 before one.
    cap: u64,
    /// The file's size at the last call; 0 before one.
    file: u64,
    /// File bytes per row byte, learned when the file last grew; 0 while unknown.
    ratio: f64,
}

impl Quota {
    /// A quota of `max` bytes whose learned ratio was `ratio` (stored by
    /// [`Quota::stored_ratio`]; 0: unknown).
    pub fn new(max: u64, ratio: u64) -> Quota {
        Quota {
            max,
            cap: 0,
            file: 0,
            ratio: ratio as f64 / RATIO_UNIT,
        }
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// The learned ratio, to be stored so that a restart starts from it.
    pub fn stored_ratio(&self) -> u64 {
        (self.ratio * RATIO_UNIT) as u64
    }

    /// The most bytes the data may take in a file of `file` bytes.
    fn room(&self, file: u64) -> f64 {
        let (max, file) = (self.max as f64, file as f64);
        if 2.0 * file <= max * SLACK {
            max
        } else {
            file.min(max)
        }
    }

    /// After a batch's rows are written (before it commits): with the file at `file` bytes and
    /// `rows` bytes of rows stored, how many row bytes to delete now, oldest first.
    pub fn excess(&mut self, file: u64, rows: u64) -> u64 {
        if self.max == 0 || rows == 0 {
            self.file = file;
            return 0;
        }
        if self.file != 0 && file > self.file {
            // The file grew in this batch: these rows needed more than the file had.
            self.ratio = self.file as f64 / rows as f64;
        } else if self.ratio == 0.0 {
            // Not seen yet (a first start, or a database from before the ratio was stored):
            // the file over its rows, which is at least the ratio.
            self.ratio = file as f64 / rows as f64;
        }
        self.file = file;
        self.cap = ((self.room(file) * MARGIN / self.ratio) as u64).max(1);
        rows.saturating_sub(self.cap)
    }
}

#[cfg(test)]
mod tests;
