//! Telemetry and log rows stored in per-device blocks, with a time-ordered index of the blocks.
//!
//! A batch writes each device's new rows of a stream (telemetry or logs) as one block, keyed
//! by (device, key of its first row): one B-tree insert per device and batch instead of one per
//! message, so a burst from few devices dirties few pages. Every block also gets an entry in
//! one index keyed by (first key, stream, device), which grows at its right edge; retention by
//! age and by the storage quota walk that index from its left edge, oldest first, without
//! looking at every device.
//!
//! Block value: `rows: u32 LE`, `last key: u64 LE`, then per row `key: u64 LE`, `len: u32 LE`,
//! `len` bytes of the row's record encoding.
//!
//! Invariants:
//! - Row keys are unique and increasing per device and stream (the writer makes them so), so
//!   block keys are unique and a device's blocks are in key order.
//! - A block and its index entry are written and removed together; the totals in `meta`
//!   (`rows_*`, `row_bytes`) always equal the sum over the index.
//! - Blocks are removed whole: a device keeps at most its limit plus one block's rows.

use redb::{ReadableTable, Table};

use super::Result;

/// Most rows in one block (a larger batch of one device makes several).
pub const MAX_BLOCK_ROWS: usize = 256;
const HEADER: usize = 12;

/// Which rows a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Telemetry = 0,
    Logs = 1,
}

impl Stream {
    pub fn from_u8(v: u8) -> Option<Stream> {
        match v {
            0 => Some(Stream::Telemetry),
            1 => Some(Stream::Logs),
            _ => None,
        }
    }
}

/// What a removal took away from one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub stream: Stream,
    pub device: String,
    pub rows: u64,
    pub bytes: u64,
}

pub(super) type Blocks<'txn> = Table<'txn, (&'static str, u64), &'static [u8]>;
pub(super) type Index<'txn> = Table<'txn, (u64, u8, &'static str), (u32, u32)>;

/// Encodes rows (key, record bytes), in key order, as one block.
pub fn encode(rows: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let len = HEADER + rows.iter().map(|(_, r)| 12 + r.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    out.extend_from_slice(&rows.last().map_or(0, |(k, _)| *k).to_le_bytes());
    for (key, row) in rows {
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&(row.len() as u32).to_le_bytes());
        out.extend_from_slice(row);
    }
    out
}

/// A block's row count and last key.
pub fn header(block: &[u8]) -> Option<(u32, u64)> {
    let rows = u32::from_le_bytes(block.get(0..4)?.try_into().ok()?);
    let last = u64::from_le_bytes(block.get(4..12)?.try_into().ok()?);
    Some((rows, last))
}

/// A block's rows, oldest first. A damaged block yields the rows before the damage.
pub fn rows(block: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut at = HEADER;
    std::iter::from_fn(move || {
        let key = u64::from_le_bytes(block.get(at..at + 8)?.try_into().ok()?);
        let len = u32::from_le_bytes(block.get(at + 8..at + 12)?.try_into().ok()?) as usize;
        let row = block.get(at + 12..at + 12 + len)?;
        at += 12 + len;
        Some((key, row))
    })
}

/// The totals kept in `meta` while blocks come and go, applied once per transaction.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Totals {
    pub telemetry: i64,
    pub logs: i64,
    pub bytes: i64,
}

impl Totals {
    fn add(&mut self, stream: Stream, rows: i64, bytes: i64) {
        match stream {
            Stream::Telemetry => self.telemetry += rows,
            Stream::Logs => self.logs += rows,
        }
        self.bytes += bytes;
    }
}

/// Writes a device's new rows of one stream as blocks of at most [`MAX_BLOCK_ROWS`].
pub(super) fn append(
    blocks: &mut Blocks<'_>,
    index: &mut Index<'_>,
    totals: &mut Totals,
    stream: Stream,
    device: &str,
    rows: &[(u64, Vec<u8>)],
) -> Result<()> {
    for chunk in rows.chunks(MAX_BLOCK_ROWS) {
        let Some(&(first, _)) = chunk.first() else {
            continue;
        };
        let block = encode(chunk);
        let bytes = block.len() as u32;
        blocks.insert((device, first), block.as_slice())?;
        index.insert((first, stream as u8, device), (chunk.len() as u32, bytes))?;
        totals.add(stream, chunk.len() as i64, i64::from(bytes));
    }
    Ok(())
}

/// Removes `device`'s oldest blocks while it would still have at least `keep` rows without
/// them; `rows` is its row count, kept up to date. Returns the rows removed.
pub(super) fn trim_device(
    blocks: &mut Blocks<'_>,
    index: &mut Index<'_>,
    totals: &mut Totals,
    stream: Stream,
    device: &str,
    keep: u64,
    rows: &mut u64,
) -> Result<u64> {
    let mut removed = 0;
    while *rows > keep {
        let oldest = match blocks.range((device, 0)..=(device, u64::MAX))?.next() {
            Some(entry) => {
                let (k, v) = entry?;
                let n = header(v.value()).map_or(0, |(n, _)| u64::from(n));
                Some((k.value().1, n, v.value().len() as u64))
            }
            None => None,
        };
        let Some((first, n, bytes)) = oldest else {
            // The count was higher than what is stored: resync instead of looping.
            *rows = 0;
            break;
        };
        if *rows - n.min(*rows) < keep {
            break;
        }
        blocks.remove((device, first))?;
        index.remove((first, stream as u8, device))?;
        totals.add(stream, -(n as i64), -(bytes as i64));
        *rows -= n.min(*rows);
        removed += n;
    }
    Ok(removed)
}

/// Removes the oldest blocks of every device and stream until `bytes` are freed (or nothing
/// is left), optionally only blocks that start before `before_us` and only of `only` stream.
pub(super) fn remove_oldest<'t>(
    telemetry: &mut Blocks<'t>,
    logs: &mut Blocks<'t>,
    index: &mut Index<'t>,
    totals: &mut Totals,
    bytes: u64,
    before_us: u64,
    only: Option<Stream>,
) -> Result<Vec<Removed>> {
    let mut out: Vec<Removed> = Vec::new();
    let mut freed = 0u64;
    let mut doomed = Vec::new();
    for entry in index.range((0, 0, "")..(before_us, 0, ""))? {
        if freed >= bytes {
            break;
        }
        let (k, v) = entry?;
        let (first, stream, device) = k.value();
        let Some(stream) = Stream::from_u8(stream).filter(|s| only.is_none_or(|o| o == *s)) else {
            continue;
        };
        let (rows, size) = v.value();
        freed += u64::from(size);
        doomed.push((first, stream, device.to_owned(), rows, size));
    }
    for (first, stream, device, rows, size) in doomed {
        let table = match stream {
            Stream::Telemetry => &mut *telemetry,
            Stream::Logs => &mut *logs,
        };
        table.remove((device.as_str(), first))?;
        index.remove((first, stream as u8, device.as_str()))?;
        totals.add(stream, -i64::from(rows), -i64::from(size));
        match out
            .iter_mut()
            .find(|r| r.stream == stream && r.device == device)
        {
            Some(r) => {
                r.rows += u64::from(rows);
                r.bytes += u64::from(size);
            }
            None => out.push(Removed {
                stream,
                device,
                rows: u64::from(rows),
                bytes: u64::from(size),
            }),
        }
    }
    Ok(out)
}

/// `device`'s rows with keys in `[from, to)`, newest first, at most `limit`.
pub(super) fn read(
    blocks: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    device: &str,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    if limit == 0 || from >= to {
        return Ok(out);
    }
    for entry in blocks.range((device, 0)..(device, to))?.rev() {
        let (k, v) = entry?;
        let first = k.value().1;
        let block = v.value();
        let mut newest_first: Vec<(u64, &[u8])> = rows(block)
            .filter(|(key, _)| *key >= from && *key < to)
            .collect();
        newest_first.reverse();
        for (key, row) in newest_first {
            out.push((key, row.to_vec()));
            if out.len() >= limit {
                return Ok(out);
            }
        }
        if first < from {
            break;
        }
    }
    Ok(out)
}

/// The key of `device`'s newest row, or 0.
pub(super) fn last_key(
    blocks: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    device: &str,
) -> Result<u64> {
    Ok(
        match blocks.range((device, 0)..=(device, u64::MAX))?.next_back() {
            Some(e) => header(e?.1.value()).map_or(0, |(_, last)| last),
            None => 0,
        },
    )
}

#[cfg(test)]
mod tests;
