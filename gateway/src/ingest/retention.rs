//! Retention: telemetry and logs bounded per device and by age, resolved alerts by age, and the
//! database as a whole by `storage.max_bytes`.

use super::Writer;
use crate::clock::{now_ms, now_us};

impl Writer {
    /// Deletes telemetry older than the retention age and long-resolved alerts; then, if the
    /// database file has passed `storage.max_bytes` and grown since the last time it did,
    /// each device's oldest quarter of telemetry and logs.
    pub(super) fn retention(&mut self) {
        self.retention_by_age();
        let size = self.store.file_size();
        let quota = self.settings.max_db_bytes;
        if quota == 0 || size <= quota || size <= self.quota_trimmed_at {
            return;
        }
        // The file never shrinks: what is freed is reused. It grows again only once that space
        // is full, which is when the next trim is due.
        self.quota_trimmed_at = size;
        let devices = &mut self.devices;
        let result = self.store.write(|t| {
            let (mut telemetry, mut logs) = (0, 0);
            for s in devices.values_mut() {
                let d = &mut s.device;
                let (tel, log) =
                    t.trim_oldest(&d.id, d.telemetry_rows.div_ceil(4), d.log_rows.div_ceil(4))?;
                if tel + log > 0 {
                    d.telemetry_rows -= tel.min(d.telemetry_rows);
                    d.log_rows -= log.min(d.log_rows);
                    t.put_device(d)?;
                }
                telemetry += tel;
                logs += log;
            }
            Ok((telemetry, logs))
        });
        match result {
            Ok((telemetry, logs)) => {
                self.metrics.storage_quota_trims.inc();
                tracing::warn!(
                    size,
                    quota,
                    telemetry,
                    logs,
                    "the database passed storage.max_bytes: deleted each device's oldest quarter of telemetry and logs"
                );
            }
            Err(e) => tracing::error!(error = %e, "retention (storage quota) failed"),
        }
    }

    fn retention_by_age(&mut self) {
        let cutoff_us = now_us().saturating_sub(self.settings.telemetry_max_age.as_micros() as u64);
        let alert_cutoff =
            now_ms().saturating_sub(self.settings.resolved_alerts_max_age.as_millis() as u64);
        let devices = &mut self.devices;
        let result = self.store.write(|t| {
            let mut removed = 0;
            for s in devices.values_mut() {
                let n = t.trim_telemetry_before(&s.device.id, cutoff_us)?;
                if n > 0 {
                    removed += n;
                    s.device.telemetry_rows = s.device.telemetry_rows.saturating_sub(n);
                    t.put_device(&s.device)?;
                }
            }
            let alerts = t.delete_resolved_alerts_before(alert_cutoff)?;
            Ok((removed, alerts))
        });
        match result {
            Ok((0, 0)) => {}
            Ok((telemetry, alerts)) => {
                tracing::info!(telemetry, alerts, "retention removed old rows")
            }
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
    }
}
