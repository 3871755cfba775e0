//! The telemetry rows and log lines a batch stores, and their retention: per device
//! (`retention.*_per_device`), by age (`retention.telemetry_max_age`), and for the database as
//! a whole by the storage quota (`storage.max_bytes`, see `storage::quota`).
//!
//! Invariants:
//! - A batch's rows are written at its end, as one block per device and stream, in the same
//!   transaction as everything else the batch did; a device's row counts in its record always
//!   match what is stored.
//! - The quota is enforced in every batch, in the batch's own transaction: under a flood the
//!   oldest rows make room as the new ones arrive, instead of once per retention interval.
//!   What it deletes is counted (`fleetgate_storage_quota_rows`).

use std::collections::BTreeMap;

use super::Writer;
use crate::clock::{now_ms, now_us};
use crate::storage::{self, Removed, Stream, Tables};

/// Rows of one device and stream: (key, record encoding), in key order.
type DeviceRows = Vec<(u64, Vec<u8>)>;

/// The rows a batch will store, per device and stream (indexed by `Stream as usize`), in
/// arrival order.
#[derive(Debug, Default)]
pub(super) struct Rows {
    pending: BTreeMap<String, [DeviceRows; 2]>,
}

impl Rows {
    pub(super) fn push(&mut self, stream: Stream, device: &str, key: u64, row: Vec<u8>) {
        // Looked up by `&str`: no allocation for a device already in the batch.
        let rows = match self.pending.get_mut(device) {
            Some(rows) => rows,
            None => self.pending.entry(device.to_owned()).or_default(),
        };
        rows[stream as usize].push((key, row));
    }

    pub(super) fn clear(&mut self) {
        self.pending.clear();
    }
}

impl Writer {
    /// Writes the batch's rows, trims each device to its limits, then holds the quota.
    pub(super) fn store_rows(&mut self, t: &mut Tables<'_>) -> storage::Result<()> {
        let pending = std::mem::take(&mut self.rows.pending);
        for (device, [telemetry, logs]) in pending {
            for (stream, rows) in [(Stream::Telemetry, telemetry), (Stream::Logs, logs)] {
                if rows.is_empty() {
                    continue;
                }
                t.append_rows(stream, &device, &rows)?;
                let Some(s) = self.devices.get_mut(&device) else {
                    continue;
                };
                let (keep, count) = match stream {
                    Stream::Telemetry => (
                        self.settings.telemetry_per_device,
                        &mut s.device.telemetry_rows,
                    ),
                    Stream::Logs => (self.settings.logs_per_device, &mut s.device.log_rows),
                };
                t.trim_device(stream, &device, keep, count)?;
                s.dirty = true;
            }
        }
        self.hold_quota(t)
    }

    /// Deletes the oldest rows the quota asks for (see `storage::quota`).
    fn hold_quota(&mut self, t: &mut Tables<'_>) -> storage::Result<()> {
        if self.settings.max_db_bytes == 0 {
            return Ok(());
        }
        let row_bytes = t.row_bytes()?;
        let before = self.quota.stored_ratio();
        let excess = self.quota.excess(self.store.file_size(), row_bytes);
        if self.quota.stored_ratio() != before {
            t.set_meta(storage::schema::META_QUOTA_RATIO, self.quota.stored_ratio())?;
        }
        if excess == 0 {
            return Ok(());
        }
        let removed = t.remove_oldest(excess, u64::MAX, None)?;
        let rows: u64 = removed.iter().map(|r| r.rows).sum();
        self.forget_rows(&removed);
        self.metrics.storage_quota_trims.inc();
        self.metrics.storage_quota_rows.inc_by(rows);
        tracing::warn!(
            quota = self.settings.max_db_bytes,
            cap = self.quota.cap(),
            rows,
            "the database is at storage.max_bytes: the oldest rows made room"
        );
        Ok(())
    }

    /// Lowers the devices' row counts by what was removed.
    fn forget_rows(&mut self, removed: &[Removed]) {
        for r in removed {
            if let Some(s) = self.devices.get_mut(&r.device) {
                let count = match r.stream {
                    Stream::Telemetry => &mut s.device.telemetry_rows,
                    Stream::Logs => &mut s.device.log_rows,
                };
                *count = count.saturating_sub(r.rows);
                s.dirty = true;
            }
        }
    }

    /// Deletes telemetry older than the retention age and long-resolved alerts.
    pub(super) fn retention(&mut self) {
        let cutoff_us = now_us().saturating_sub(self.settings.telemetry_max_age.as_micros() as u64);
        let alert_cutoff =
            now_ms().saturating_sub(self.settings.resolved_alerts_max_age.as_millis() as u64);
        let store = self.store.clone();
        let result = store.write(|t| {
            let removed = t.remove_oldest(u64::MAX, cutoff_us, Some(Stream::Telemetry))?;
            self.forget_rows(&removed);
            let alerts = t.delete_resolved_alerts_before(alert_cutoff)?;
            self.write_dirty(t)?;
            Ok((removed.iter().map(|r| r.rows).sum::<u64>(), alerts))
        });
        match result {
            Ok((0, 0)) => {}
            Ok((telemetry, alerts)) => {
                tracing::info!(telemetry, alerts, "retention removed old rows")
            }
            Err(e) => {
                tracing::error!(error = %e, "retention failed");
                // The removed rows' counts were lowered in memory: take them back from storage.
                if let Err(e) = self.recover() {
                    tracing::error!(error = %e, "reloading after a failed retention failed");
                }
            }
        }
    }
}
