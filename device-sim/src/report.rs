//! What a simulated fleet did, counted while it ran.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetgate_protocol::RollbackError;
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
    /// Rollback directives obeyed (the device reverted and rebooted).
    pub rollbacks_done: AtomicU64,
    /// Rollback directives refused, in total and by reason.
    pub rollbacks_rejected: AtomicU64,
    rollbacks_rejected_by: std::sync::Mutex<BTreeMap<&'static str, u64>>,
    /// Wall-clock time (ms since the UNIX epoch) the first and the last rollback directive
    /// arrived at any device; 0 until one does.
    pub first_rollback_ms: AtomicU64,
    pub last_rollback_ms: AtomicU64,
    /// Garbage sent in place of telemetry, and telemetry also sent as another device (faults).
    pub malformed: AtomicU64,
    pub impersonated: AtomicU64,
    /// Times a flapping link dropped, and devices that crashed after an install.
    pub flaps: AtomicU64,
    pub crashes: AtomicU64,
    /// QoS 1 publishes a link drop or a crash (faults) threw away before they were
    /// acknowledged.
    pub discarded: AtomicU64,
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

    /// Notes that a rollback directive arrived at wall-clock time `now_ms`.
    pub fn rollback_received(&self, now_ms: u64) {
        let _ =
            self.first_rollback_ms
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |first| {
                    (first == 0 || now_ms < first).then_some(now_ms)
                });
        self.last_rollback_ms.fetch_max(now_ms, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Counts a refused rollback directive under its reason.
    pub fn rollback_rejected(&self, code: RollbackError) {
        if let Ok(mut by) = self.rollbacks_rejected_by.lock() {
            *by.entry(code.name()).or_default() += 1;
        }
        self.bump(&self.rollbacks_rejected, 1);
    }

    /// Refused rollback directives by reason name.
    pub fn rollbacks_rejected_by(&self) -> BTreeMap<String, u64> {
        self.rollbacks_rejected_by
            .lock()
            .map(|by| by.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
            .unwrap_or_default()
    }

    /// QoS 1 publishes handed to the client (every kind of message).
    pub fn published(&self) -> u64 {
        [
            &self.hello,
            &self.telemetry,
            &self.alerts,
            &self.command_acks,
            &self.update_reports,
            &self.malformed,
            &self.impersonated,
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
    pub rollbacks: Rollbacks,
    pub faults: FaultCounts,
    /// Wall-clock time (ms since the UNIX epoch) the first rollback directive arrived at any
    /// device; with `last_rollback_ms`, what a benchmark measures the spread of a rollback by.
    pub first_rollback_ms: Option<u64>,
    /// Wall-clock time (ms since the UNIX epoch) the last rollback directive arrived.
    pub last_rollback_ms: Option<u64>,
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

/// What devices did with rollback directives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rollbacks {
    /// Reverted to the other slot (and rebooted into it).
    pub done: u64,
    pub rejected: u64,
    /// Refusals by reason (`not_running`, `expired`, ...).
    pub rejected_by: BTreeMap<String, u64>,
}

/// What the injected faults did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    /// Garbage payloads sent in place of telemetry.
    pub malformed: u64,
    /// Telemetry also published on another device's topic.
    pub impersonated: u64,
    /// Times a flapping link dropped.
    pub flaps: u64,
    /// Crashes after an install.
    pub crashes: u64,
    /// QoS 1 publishes lost with those link drops and crashes, never acknowledged.
    pub discarded: u64,
}

impl FaultCounts {
    fn any(&self) -> bool {
        self.malformed + self.impersonated + self.flaps + self.crashes > 0
    }
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
            rollbacks: Rollbacks {
                done: g(&c.rollbacks_done),
                rejected: g(&c.rollbacks_rejected),
                rejected_by: c.rollbacks_rejected_by(),
            },
            faults: FaultCounts {
                malformed: g(&c.malformed),
                impersonated: g(&c.impersonated),
                flaps: g(&c.flaps),
                crashes: g(&c.crashes),
                discarded: g(&c.discarded),
            },
            first_rollback_ms: Some(g(&c.first_rollback_ms)).filter(|ms| *ms > 0),
            last_rollback_ms: Some(g(&c.last_rollback_ms)).filter(|ms| *ms > 0),
            errors: g(&c.errors),
            elapsed_s: secs,
            telemetry_rate: if secs > 0.0 {
                g(&c.telemetry) as f64 / secs
            } else {
                0.0
            },
        }
    }

    /// Messages sent at QoS 1 that were not acknowledged (those a link drop or a crash threw
    /// away are counted under `faults.discarded` instead).
    pub fn unacked(&self) -> u64 {
        let s = &self.sent;
        let f = &self.faults;
        (s.hello
            + s.telemetry
            + s.alerts
            + s.command_acks
            + self.updates.reports
            + f.malformed
            + f.impersonated)
            .saturating_sub(self.acked + f.discarded)
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
        let r = &self.rollbacks;
        if r.done + r.rejected > 0 {
            write!(f, "rollbacks: {} done, {} rejected", r.done, r.rejected)?;
            if !r.rejected_by.is_empty() {
                let by: Vec<String> = r
                    .rejected_by
                    .iter()
                    .map(|(code, n)| format!("{code} {n}"))
                    .collect();
                write!(f, " ({})", by.join(", "))?;
            }
            if let (Some(first), Some(last)) = (self.first_rollback_ms, self.last_rollback_ms) {
                write!(
                    f,
                    "; directives received over {} ms",
                    last.saturating_sub(first)
                )?;
            }
            writeln!(f)?;
        }
        let x = &self.faults;
        if x.any() {
            writeln!(
                f,
                "faults:    {} malformed, {} impersonated, {} link drops, {} crashes after update; \
                 {} messages lost with the drops and crashes",
                x.malformed, x.impersonated, x.flaps, x.crashes, x.discarded
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

#[cfg(test)]
mod tests;
