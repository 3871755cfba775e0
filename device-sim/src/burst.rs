//! `fleetgate-sim burst`: devices that come back after an outage and flush what they buffered.
//! Every device connects (a ramp), then all of them publish their `messages` numbered
//! telemetry messages at once, each as fast as its client takes them (QoS 1: as fast as its
//! in-flight window allows).
//!
//! The report gives, from the first publish: how fast the broker acknowledged (to the last
//! PUBACK) and stored (the gateway's API) or delivered (a subscriber on a bare broker) the
//! burst, publish-to-PUBACK latency, what was acknowledged but never stored or delivered, and
//! the gateway's memory, CPU and backpressure counters. With `verify`, every acknowledged
//! sequence number is looked up in what the gateway stored.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ingest::Backpressure;
use crate::load::{ConnectReport, LoadError, LoadSpec, Target, qos_number};
use crate::stats::{self, Mib, Opt, Percentiles, Rate};
use crate::swarm::{BrokerUse, VerifyReport};

/// Most messages one device sends in a burst (sequence numbers are 32 bits).
pub const MAX_MESSAGES: u64 = u32::MAX as u64;
/// Most messages of a whole burst.
pub const MAX_TOTAL: u64 = 1_000_000_000;

/// What to run: `load` says who to connect and how (its rate, duration and linger are not
/// used); every device then sends `messages`.
#[derive(Debug, Clone)]
pub struct BurstSpec {
    pub load: LoadSpec,
    pub messages: u64,
    /// Longest the burst may take, from the first publish to the last acknowledgement; what is
    /// not handed over by then is not sent.
    pub timeout: Duration,
    /// Afterwards, look up every acknowledged sequence number in what the gateway stored.
    pub verify: bool,
}

impl BurstSpec {
    /// A burst of `messages` per device; QoS 1 and rumqttc's default in-flight window (100).
    pub fn new(mut load: LoadSpec, messages: u64) -> BurstSpec {
        load.inflight = 100;
        BurstSpec {
            load,
            messages,
            timeout: Duration::from_secs(60),
            verify: false,
        }
    }

    /// Checks the numbers; every problem, each naming its setting.
    pub fn validate(&self) -> Result<(), LoadError> {
        let mut problems = match self.load.validate() {
            Ok(()) => Vec::new(),
            Err(LoadError::Invalid(p)) => p,
            Err(e) => return Err(e),
        };
        if self.messages == 0 || self.messages > MAX_MESSAGES {
            problems.push(format!(
                "messages must be within 1..={MAX_MESSAGES} per device"
            ));
        }
        let total = self
            .messages
            .saturating_mul(self.load.target.devices() as u64);
        if total > MAX_TOTAL {
            problems.push(format!(
                "devices x messages must be at most {MAX_TOTAL} (is {total})"
            ));
        }
        if self.timeout.is_zero() || self.timeout > crate::load::MAX_DURATION {
            problems.push("timeout must be above 0 and at most 24h".into());
        }
        if self.verify {
            match &self.load.target {
                Target::Gateway { api: None, .. } => {
                    problems.push("verify reads the gateway's API: give its token".into());
                }
                Target::Mqtt { .. } => problems.push(
                    "verify reads the gateway's API: a bare broker is checked by its subscriber"
                        .into(),
                ),
                Target::Gateway { .. } => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LoadError::Invalid(problems))
        }
    }
}

/// What the clients and the broker did in a burst, as measured; times since the burst's
/// planned start.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BurstRaw {
    /// Clients connected when the burst began, and messages each was to send.
    pub devices: u64,
    pub messages: u64,
    /// Handed to the clients.
    pub offered: u64,
    /// QoS 1: acknowledged.
    pub acked: Option<u64>,
    pub first_sent: Option<Duration>,
    pub last_sent: Option<Duration>,
    pub last_ack: Option<Duration>,
    pub ack_latency: Option<Percentiles>,
    pub payload_bytes: u64,
    pub connection_errors: u64,
    pub ingest: Option<BurstIngestRaw>,
    pub broker: Option<BrokerUse>,
    pub clients_cpu_pct: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BurstIngestRaw {
    /// `gateway_api` or `subscriber`.
    pub source: &'static str,
    /// `(time, ingested since the burst began)`, in time order, from the start.
    pub samples: Vec<(Duration, u64)>,
    /// Subscriber: when it last received a message it had not seen.
    pub last_new: Option<Duration>,
    pub ingested: u64,
    pub duplicates: u64,
    /// Missing by sequence numbers (the gateway's gaps; the subscriber: of what was sent).
    pub lost: i64,
    /// The gateway restarted, or connections were lost, during the burst: its counters cannot
    /// tell what was acknowledged but lost.
    pub counts_inexact: bool,
    /// Subscriber, QoS 1: acknowledged numbers it never received, looked up one by one.
    pub acked_lost: Option<u64>,
    pub resident_peak: Option<u64>,
    pub resident_end: Option<u64>,
    pub cpu_pct: Option<f64>,
    pub backpressure: Option<Backpressure>,
}

/// The figures of a burst.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BurstFigures {
    /// Clients connected when the burst began.
    pub devices: u64,
    /// Messages handed to the clients, and those not sent before the timeout.
    pub offered: u64,
    pub unsent: u64,
    pub payload_bytes: u64,
    /// From the first publish to the last.
    pub send_s: Option<f64>,
    /// QoS 1: acknowledged, not acknowledged, from the first publish to the last PUBACK, and
    /// acknowledged per second over that time.
    pub acked: Option<u64>,
    pub unacked: Option<u64>,
    pub acked_s: Option<f64>,
    pub acked_per_s: Option<f64>,
    pub ack_latency: Option<Percentiles>,
    pub ingest: Option<BurstIngest>,
    pub connection_errors: u64,
    /// With `--broker-pid`: the broker's CPU from the start of the burst to its last
    /// acknowledgement, and its memory.
    pub broker: Option<BrokerUse>,
    /// The simulator's own CPU over the same time, in percent of one core: near a whole core,
    /// the load generator rather than the broker may have set the pace.
    pub clients_cpu_pct: Option<f64>,
}

/// What the broker took in: stored (gateway) or delivered (bare broker, to the subscriber).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BurstIngest {
    /// `gateway_api` or `subscriber`.
    pub source: &'static str,
    pub ingested: u64,
    /// What had to arrive: the acknowledged messages (QoS 0: those sent).
    pub expected: u64,
    /// From the first publish until the count reached `expected` (or, if it never did, until
    /// it last moved), and `ingested` per second over that time.
    pub ingested_s: Option<f64>,
    pub ingested_per_s: Option<f64>,
    /// Missing by sequence numbers, and repeats.
    pub lost: i64,
    pub duplicates: u64,
    /// QoS 1: acknowledged but never stored (delivered).
    pub acked_lost: Option<u64>,
    /// How `acked_lost` was found: `by_number` (each acknowledged number looked up) or
    /// `by_count` (acknowledged minus newly stored: exact as long as no connection was lost).
    pub acked_lost_by: &'static str,
    /// Gateway only: its resident memory (highest sampled, and at the end), its CPU from the
    /// start of the burst to its last acknowledgement (percent of one core), and its
    /// backpressure counters during the burst.
    pub resident_peak_bytes: Option<u64>,
    pub resident_end_bytes: Option<u64>,
    pub cpu_pct: Option<f64>,
    pub queue_full: Option<u64>,
    pub publishes_delayed: Option<u64>,
}

/// When a counter, sampled as `(time, count)` in time order, reached `target`: in proportion
/// between the samples on either side, and `true`. If it never did, when it last moved (the
/// first sample with its final count), and `false`. `None` without samples.
pub(crate) fn reached(samples: &[(Duration, u64)], target: u64) -> Option<(Duration, bool)> {
    match samples.iter().position(|(_, c)| *c >= target) {
        Some(0) => Some((samples[0].0, true)),
        Some(i) => {
            let (t0, c0) = samples[i - 1];
            let (t1, c1) = samples[i];
            // c0 < target <= c1, so c1 > c0.
            let share = (target - c0) as f64 / (c1 - c0) as f64;
            Some((t0 + t1.saturating_sub(t0).mul_f64(share), true))
        }
        None => {
            let last = samples.last()?.1;
            samples
                .iter()
                .find(|(_, c)| *c == last)
                .map(|(t, _)| (*t, false))
        }
    }
}

/// Seconds from `from` to `to`; `None` if either is missing.
fn span(from: Option<Duration>, to: Option<Duration>) -> Option<f64> {
    Some(to?.saturating_sub(from?).as_secs_f64())
}

/// `count` per second over `s` seconds; `None` over no time.
fn rate(count: u64, s: Option<f64>) -> Option<f64> {
    s.filter(|s| *s > 0.0).map(|s| count as f64 / s)
}

impl BurstFigures {
    pub(crate) fn of(raw: &BurstRaw) -> BurstFigures {
        let t0 = raw.first_sent;
        let acked_s = raw.acked.and(span(t0, raw.last_ack));
        let expected = raw.acked.unwrap_or(raw.offered);
        let ingest = raw.ingest.as_ref().map(|i| {
            let at = match i.last_new {
                // The subscriber knows when the last new message arrived.
                Some(t) => Some(t),
                None => reached(&i.samples, expected).map(|(t, _)| t),
            };
            let ingested_s = span(t0, at);
            let (acked_lost, by) = match (raw.acked, i.acked_lost) {
                (Some(_), Some(exact)) => (Some(exact), "by_number"),
                (Some(_), None) if i.counts_inexact => (None, "by_count"),
                (Some(acked), None) => (
                    Some(stats::acked_lost(acked, i.ingested, i.duplicates)),
                    "by_count",
                ),
                (None, _) => (None, "by_count"),
            };
            BurstIngest {
                source: i.source,
                ingested: i.ingested,
                expected,
                ingested_s,
                ingested_per_s: rate(i.ingested, ingested_s),
                lost: i.lost,
                duplicates: i.duplicates,
                acked_lost,
                acked_lost_by: by,
                resident_peak_bytes: i.resident_peak,
                resident_end_bytes: i.resident_end,
                cpu_pct: i.cpu_pct,
                queue_full: i.backpressure.map(|b| b.queue_full),
                publishes_delayed: i.backpressure.map(|b| b.publishes_delayed),
            }
        });
        BurstFigures {
            devices: raw.devices,
            offered: raw.offered,
            unsent: (raw.devices * raw.messages).saturating_sub(raw.offered),
            payload_bytes: raw.payload_bytes,
            send_s: span(t0, raw.last_sent),
            acked: raw.acked,
            unacked: raw.acked.map(|a| raw.offered.saturating_sub(a)),
            acked_s,
            acked_per_s: raw.acked.and_then(|a| rate(a, acked_s)),
            ack_latency: raw.ack_latency,
            ingest,
            connection_errors: raw.connection_errors,
            broker: raw.broker,
            clients_cpu_pct: raw.clients_cpu_pct,
        }
    }
}

/// What a burst run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BurstReport {
    /// `gateway` or `mqtt`.
    pub target: &'static str,
    pub broker: String,
    /// Clients started, and messages each was to send.
    pub devices: u64,
    pub messages: u64,
    pub qos: u8,
    /// The clients' in-flight window (QoS 1).
    pub inflight: u16,
    pub encoding: &'static str,
    pub samples: usize,
    pub features: usize,
    pub connect: ConnectReport,
    pub burst: BurstFigures,
    /// With `verify`: every acknowledged number looked up in what the gateway stored.
    pub verify: Option<VerifyReport>,
    pub notes: Vec<String>,
    pub elapsed_s: f64,
}

impl BurstReport {
    /// Every device connected and sent everything, every QoS 1 message was acknowledged, and
    /// nothing acknowledged went missing or arrived twice.
    pub fn clean(&self) -> bool {
        let b = &self.burst;
        self.connect.connected == self.devices
            && b.unsent == 0
            && b.unacked.unwrap_or(0) == 0
            && b.ingest
                .as_ref()
                .is_none_or(|i| i.acked_lost.unwrap_or(0) == 0 && i.duplicates == 0)
            && self.verify.as_ref().is_none_or(VerifyReport::clean)
    }
}

/// Connects every device, runs the burst, reads back what was stored if asked, and disconnects
/// every client. `stop` ends it early (the report covers what ran).
pub async fn run(spec: BurstSpec, stop: CancellationToken) -> Result<BurstReport, LoadError> {
    spec.validate()?;
    let started = Instant::now();
    let load = &spec.load;
    let (cfg, _) = load.swarm_config()?;
    let mut swarm = load.swarm(&stop).await?;
    let n = load.target.devices();
    let connect = swarm
        .connect(
            load.target.idents(0..n),
            load.connect_rate,
            load.connect_timeout,
        )
        .await;
    let raw = swarm.burst(spec.messages, spec.timeout, load.drain).await;
    let (verify, notes) = swarm.finish(spec.verify).await;
    Ok(BurstReport {
        target: load.target.name(),
        broker: format!("{}:{}", load.host, load.port),
        devices: n as u64,
        messages: spec.messages,
        qos: qos_number(load.qos),
        inflight: load.inflight,
        encoding: load.encoding.name(),
        samples: cfg.samples,
        features: cfg.features,
        connect,
        burst: BurstFigures::of(&raw),
        verify,
        notes,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// Seconds with three decimals, or `-`.
struct Secs(Option<f64>);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, "{s:.3} s"),
            None => f.write_str("-"),
        }
    }
}

impl fmt::Display for BurstReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.burst;
        writeln!(
            f,
            "target:    {} at {}, {} devices x {} messages, QoS {}, window {}, {}, {} samples x {} features",
            self.target,
            self.broker,
            self.devices,
            self.messages,
            self.qos,
            self.inflight,
            self.encoding,
            self.samples,
            self.features
        )?;
        writeln!(f, "connect:   {}", self.connect)?;
        writeln!(
            f,
            "burst:     {} devices sent {} ({} unsent) in {}; {} B payloads",
            b.devices,
            b.offered,
            b.unsent,
            Secs(b.send_s),
            b.payload_bytes
        )?;
        writeln!(
            f,
            "acked:     {} ({} unacknowledged) in {} ({}); publish->PUBACK {}",
            Opt(b.acked),
            Opt(b.unacked),
            Secs(b.acked_s),
            Opt(b.acked_per_s.map(Rate)),
            Opt(b.ack_latency)
        )?;
        match &b.ingest {
            Some(i) => {
                let gateway = i.source == "gateway_api";
                let (label, verb, by) = if gateway {
                    ("stored:   ", "stored", "by the gateway")
                } else {
                    ("delivered:", "delivered", "to the subscriber")
                };
                writeln!(
                    f,
                    "{label} {} of {} in {} ({}) {by}",
                    i.ingested,
                    i.expected,
                    Secs(i.ingested_s),
                    Opt(i.ingested_per_s.map(Rate)),
                )?;
                let how = match i.acked_lost_by {
                    "by_number" => "each acknowledged number looked up",
                    _ => "acknowledged minus newly stored",
                };
                writeln!(
                    f,
                    "lost:      {} acknowledged but not {verb} ({how}); {} missing by sequence numbers, {} duplicates",
                    Opt(i.acked_lost),
                    i.lost,
                    i.duplicates
                )?;
                if gateway {
                    writeln!(
                        f,
                        "gateway:   RSS peak {}, at the end {}, CPU {} %; writer queue full {} times, {} publishes delayed",
                        Opt(i.resident_peak_bytes.map(Mib)),
                        Opt(i.resident_end_bytes.map(Mib)),
                        Opt(i.cpu_pct.map(|c| format!("{c:.1}"))),
                        Opt(i.queue_full),
                        Opt(i.publishes_delayed)
                    )?;
                }
            }
            None => writeln!(f, "stored:    - (no ingest counters)")?,
        }
        if let Some(v) = &self.verify {
            writeln!(f, "verified:  {v}")?;
        }
        if let Some(u) = &b.broker {
            writeln!(f, "broker:    {u}")?;
        }
        write!(
            f,
            "errors:    {} connection errors; simulator CPU {} % of a core",
            b.connection_errors,
            Opt(b.clients_cpu_pct.map(|c| format!("{c:.1}")))
        )?;
        for n in &self.notes {
            write!(f, "\nnote:      {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
