//! The writer's side of what devices send: decoding and checking each message, then storing it
//! and feeding it to the alert rules and the engines.
//!
//! Every message ends as stored, ignored (a duplicate, or a hello of a connection that has
//! ended) or refused with a [`Refusal`] that its session passes on in the device's v5 PUBACK.
//! Refusals are counted by reason and per device, and logged rate-limited.

use fleetgate_protocol::{
    AckStatus, Alert, CommandAck, DecodeError, Hello, LogLine, Telemetry, UpdateReport, Uplink,
    decode,
};

use super::{Effects, Writer};
use crate::bus::{Refusal, UplinkMsg};
use crate::metrics::Reject;
use crate::model::{AlertSource, CommandState, LogRow, TelemetryRow};
use crate::seq::SeqOutcome;
use crate::storage::records::Record;
use crate::storage::{self, Stream, Tables};
use crate::updates;

/// What became of one device message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handled {
    Stored,
    /// Nothing to store: a duplicate, or a hello of a connection that has ended.
    Ignored,
    Refused(Refusal),
}

impl Writer {
    /// Counts a refusal (globally and per device) and logs it, rate-limited.
    pub(super) fn reject(&mut self, device: &str, reason: Reject, detail: &dyn std::fmt::Display) {
        self.metrics.reject(reason, device, detail);
        if let Some(s) = self.devices.get_mut(device) {
            s.device.counters.rejected += 1;
            s.dirty = true;
        }
    }

    fn decode<T>(&mut self, m: &UplinkMsg) -> Result<T, Refusal>
    where
        T: serde::de::DeserializeOwned + fleetgate_protocol::limits::Validate,
    {
        decode::<T>(&m.payload, m.encoding).map_err(|e| {
            let reason = match e {
                DecodeError::Invalid(_) => Reject::Invalid,
                _ => Reject::Undecodable,
            };
            let detail = format!("{}: {e}", m.channel.name());
            self.reject(&m.device, reason, &detail);
            Refusal::Invalid
        })
    }

    /// Applies one device message; returns why it was refused, if it was.
    pub(super) fn apply_uplink(
        &mut self,
        t: &mut Tables<'_>,
        m: &mut UplinkMsg,
        fx: &mut Effects,
    ) -> storage::Result<Option<Refusal>> {
        if self
            .devices
            .get(&m.device)
            .is_none_or(|s| s.device.revoked())
        {
            self.metrics
                .reject(Reject::UnknownDevice, &m.device, &m.channel.name());
            return Ok(Some(Refusal::NotAuthorized));
        }
        let received_ms = m.received_us / 1000;
        let handled = match m.channel {
            Uplink::Hello => self.hello(t, m, fx)?,
            Uplink::Telemetry => self.telemetry(t, m, fx)?,
            Uplink::Alert => {
                let handled = self.device_alert(t, m)?;
                if handled == Handled::Stored {
                    self.rollouts_alert(t, &m.device, received_ms, fx)?;
                }
                handled
            }
            Uplink::Log => self.log(m)?,
            Uplink::Ack => self.ack(t, m, fx)?,
            Uplink::Report => match self.decode::<UpdateReport>(m) {
                Ok(report) => self.report(t, &m.device, report, received_ms, fx)?,
                Err(why) => Handled::Refused(why),
            },
        };
        match handled {
            Handled::Stored => {
                let i = Uplink::ALL
                    .iter()
                    .position(|c| *c == m.channel)
                    .unwrap_or(0);
                fx.stored[i] += 1;
                if let Some(s) = self.devices.get_mut(&m.device) {
                    s.device.touch(received_ms);
                    s.dirty = true;
                }
                Ok(None)
            }
            Handled::Ignored => Ok(None),
            Handled::Refused(why) => Ok(Some(why)),
        }
    }

    /// A hello: what the device runs and is. On its current connection it also makes the
    /// device online for the engines; a hello of a connection that has already ended (or been
    /// replaced) changes nothing.
    fn hello(
        &mut self,
        t: &mut Tables<'_>,
        m: &UplinkMsg,
        fx: &mut Effects,
    ) -> storage::Result<Handled> {
        let hello = match self.decode::<Hello>(m) {
            Ok(h) => h,
            Err(why) => return Ok(Handled::Refused(why)),
        };
        if !self.is_current(&m.device, m.session) {
            tracing::debug!(device = %m.device, session = m.session, "hello of an ended connection ignored");
            return Ok(Handled::Ignored);
        }
        let Some(s) = self.devices.get_mut(&m.device) else {
            return Ok(Handled::Ignored);
        };
        let before = s.device.hello.replace(hello.clone());
        s.device.encoding = m.encoding;
        s.device.counters.hellos += 1;
        self.said_hello(&m.device);
        let now = m.received_us / 1000;
        self.record_inventory(t, &m.device, before.as_ref(), now)?;
        self.drift_bins(&m.device, &hello, fx);
        self.update_event(t, updates::Event::Online(m.device.clone()), now, fx)?;
        self.rollouts_hello(t, &m.device, now, fx)?;
        Ok(Handled::Stored)
    }

    fn telemetry(
        &mut self,
        t: &mut Tables<'_>,
        m: &mut UplinkMsg,
        fx: &mut Effects,
    ) -> storage::Result<Handled> {
        let decoded = m.telemetry.take().map(|tel| *tel);
        let tel = match decoded.map_or_else(|| self.decode::<Telemetry>(m), Ok) {
            Ok(tel) => tel,
            Err(why) => return Ok(Handled::Refused(why)),
        };
        let Some(s) = self.devices.get_mut(&m.device) else {
            return Ok(Handled::Ignored);
        };
        match s.device.seq.observe(tel.boot, tel.seq) {
            SeqOutcome::Duplicate => {
                s.device.counters.duplicates += 1;
                s.dirty = true;
                fx.duplicates += 1;
                return Ok(Handled::Ignored);
            }
            SeqOutcome::Next { lost } if lost > 0 => {
                s.device.counters.lost += u64::from(lost);
                fx.lost += i64::from(lost);
            }
            SeqOutcome::Late => {
                s.device.counters.lost = s.device.counters.lost.saturating_sub(1);
                fx.lost -= 1;
            }
            SeqOutcome::Started | SeqOutcome::Next { .. } | SeqOutcome::Old => {}
        }
        let row = TelemetryRow {
            received_ms: m.received_us / 1000,
            boot: tel.boot,
            seq: tel.seq,
            device_time_ms: tel.time_ms,
            hw: tel.hw.clone(),
            model: tel.model.clone(),
            samples: tel.samples.len() as u32,
            binned_features: tel.bins.len() as u32,
        };
        let key = unique_key(&mut s.last_telemetry_key, m.received_us);
        s.device.telemetry_rows += 1;
        s.device.counters.telemetry += 1;
        s.device.last_hw = Some(tel.hw.clone());
        self.rows
            .push(Stream::Telemetry, &m.device, key, row.encode());
        fx.telemetry_times.push(tel.time_ms);
        let now = m.received_us / 1000;
        self.record_telemetry(t, &m.device, &tel, now)?;
        self.apply_rules(t, &m.device, &tel, now)?;
        self.drift_observe(t, &m.device, &tel, now)?;
        self.rollouts_telemetry(t, &m.device, &tel, now, fx)?;
        Ok(Handled::Stored)
    }

    fn log(&mut self, m: &UplinkMsg) -> storage::Result<Handled> {
        let line = match self.decode::<LogLine>(m) {
            Ok(line) => line,
            Err(why) => return Ok(Handled::Refused(why)),
        };
        let Some(s) = self.devices.get_mut(&m.device) else {
            return Ok(Handled::Ignored);
        };
        let row = LogRow {
            received_ms: m.received_us / 1000,
            level: line.level,
            text: line.text,
            device_time_ms: line.time_ms,
        };
        let key = unique_key(&mut s.last_log_key, m.received_us);
        s.device.log_rows += 1;
        s.device.counters.logs += 1;
        self.rows.push(Stream::Logs, &m.device, key, row.encode());
        Ok(Handled::Stored)
    }

    fn ack(
        &mut self,
        t: &mut Tables<'_>,
        m: &UplinkMsg,
        fx: &mut Effects,
    ) -> storage::Result<Handled> {
        let CommandAck { id, status } = match self.decode::<CommandAck>(m) {
            Ok(ack) => ack,
            Err(why) => return Ok(Handled::Refused(why)),
        };
        let Some(mut cmd) = t.command(id)?.filter(|c| c.device == m.device) else {
            self.reject(
                &m.device,
                Reject::UnknownCommand,
                &format!("ack for command {id}"),
            );
            return Ok(Handled::Refused(Refusal::Unknown));
        };
        self.rollouts_ack(t, &cmd, &status, m.received_us / 1000, fx)?;
        cmd.state = match status {
            AckStatus::Done => CommandState::Done,
            AckStatus::Rejected { reason } => CommandState::Rejected { reason },
            AckStatus::Unsupported => CommandState::Unsupported,
        };
        cmd.answered_ms = Some(m.received_us / 1000);
        t.put_command(&cmd)?;
        if let Some(s) = self.devices.get_mut(&m.device) {
            s.device.counters.acks += 1;
        }
        Ok(Handled::Stored)
    }

    fn device_alert(&mut self, t: &mut Tables<'_>, m: &UplinkMsg) -> storage::Result<Handled> {
        let Alert {
            kind,
            severity,
            value,
            message,
            ..
        } = match self.decode::<Alert>(m) {
            Ok(alert) => alert,
            Err(why) => return Ok(Handled::Refused(why)),
        };
        let now = m.received_us / 1000;
        let value = value.map(f64::from);
        self.raise(
            t,
            &m.device,
            kind,
            severity,
            value,
            message,
            AlertSource::Device,
            now,
        )?;
        if let Some(s) = self.devices.get_mut(&m.device) {
            s.device.counters.alerts += 1;
        }
        Ok(Handled::Stored)
    }
}

/// A key at least `now_us` and greater than the previous one, so that two messages in the same
/// microsecond (or after the clock went back) never overwrite each other.
pub(super) fn unique_key(last: &mut u64, now_us: u64) -> u64 {
    *last = now_us.max(*last + 1);
    *last
}
