//! What a simulated fleet did, counted while it ran.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Counters shared by every device of a run.
#[derive(Debug, Default)]
pub struct Counters {
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub hello: AtomicU64,
    pub telemetry: AtomicU64,
    pub alerts: AtomicU64,
    pub command_acks: AtomicU64,
    pub commands: AtomicU64,
    pub update_reports: AtomicU64,
    pub chunks_stored: AtomicU64,
    pub chunks_duplicate: AtomicU64,
    pub updates_installed: AtomicU64,
    pub updates_rejected: AtomicU64,
    pub updates_failed: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    /// Devices that got a CONNACK at least once.
    pub ever_connected: AtomicU64,
    seen: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// Notified whenever a counter changes.
    pub changed: tokio::sync::Notify,
}

impl Counters {
    /// Adds to one of `self`'s counters and wakes whoever waits for a change.
    pub fn bump(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Waits until `cond` holds, at most `timeout`; returns whether it held.
    pub async fn wait_until(&self, timeout: Duration, cond: impl Fn(&Counters) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if cond(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return cond(self);
            }
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Notes that device `index` connected; counts each device once.
    pub fn mark_connected(&self, index: u64) {
        if self.seen.lock().is_ok_and(|mut s| s.insert(index)) {
            self.bump(&self.ever_connected, 1);
        }
    }

    /// QoS 1 publishes handed to the client (every kind of message).
    pub fn published(&self) -> u64 {
        [
            &self.hello,
            &self.telemetry,
            &self.alerts,
            &self.command_acks,
            &self.update_reports,
        ]
        .iter()
        .map(|c| Counters::get(c))
        .sum()
    }
}

/// The summary of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub devices: u64,
    /// Devices that got a CONNACK at least once.
    pub connected: u64,
    pub connects: u64,
    pub connect_errors: u64,
    pub sent: Sent,
    /// QoS 1 publishes acknowledged by the gateway.
    pub acked: u64,
    pub commands_received: u64,
    pub updates: Updates,
    pub errors: u64,
    pub elapsed_s: f64,
    /// Telemetry messages per second over the run.
    pub telemetry_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Updates {
    pub installed: u64,
    pub rejected: u64,
    pub failed: u64,
    pub chunks_stored: u64,
    /// Chunks received again after they were stored.
    pub chunks_duplicate: u64,
    pub reports: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sent {
    pub hello: u64,
    pub telemetry: u64,
    pub alerts: u64,
    pub command_acks: u64,
}

impl Report {
    pub fn from_counters(devices: u64, connected: u64, c: &Counters, elapsed: Duration) -> Report {
        let g = Counters::get;
        let secs = elapsed.as_secs_f64();
        Report {
            devices,
            connected,
            connects: g(&c.connects),
            connect_errors: g(&c.connect_errors),
            sent: Sent {
                hello: g(&c.hello),
                telemetry: g(&c.telemetry),
                alerts: g(&c.alerts),
                command_acks: g(&c.command_acks),
            },
            acked: g(&c.acked),
            commands_received: g(&c.commands),
            updates: Updates {
                installed: g(&c.updates_installed),
                rejected: g(&c.updates_rejected),
                failed: g(&c.updates_failed),
                chunks_stored: g(&c.chunks_stored),
                chunks_duplicate: g(&c.chunks_duplicate),
                reports: g(&c.update_reports),
            },
            errors: g(&c.errors),
            elapsed_s: secs,
            telemetry_rate: if secs > 0.0 {
                g(&c.telemetry) as f64 / secs
            } else {
                0.0
            },
        }
    }

    /// Messages sent at QoS 1 that were not acknowledged.
    pub fn unacked(&self) -> u64 {
        let s = &self.sent;
        (s.hello + s.telemetry + s.alerts + s.command_acks + self.updates.reports)
            .saturating_sub(self.acked)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "devices:   {} ({} connected, {} connects, {} connect errors)",
            self.devices, self.connected, self.connects, self.connect_errors
        )?;
        let s = &self.sent;
        writeln!(
            f,
            "sent:      {} hello, {} telemetry, {} alerts, {} command acks",
            s.hello, s.telemetry, s.alerts, s.command_acks
        )?;
        writeln!(
            f,
            "acked:     {} ({} not acknowledged)",
            self.acked,
            self.unacked()
        )?;
        writeln!(f, "commands:  {} received", self.commands_received)?;
        let u = &self.updates;
        if u.installed + u.rejected + u.failed + u.chunks_stored > 0 {
            writeln!(
                f,
                "updates:   {} installed, {} rejected, {} failed; {} chunks stored, {} received twice",
                u.installed, u.rejected, u.failed, u.chunks_stored, u.chunks_duplicate
            )?;
        }
        writeln!(f, "errors:    {}", self.errors)?;
        write!(
            f,
            "elapsed:   {:.2} s, {:.1} telemetry/s",
            self.elapsed_s, self.telemetry_rate
        )
    }
}
