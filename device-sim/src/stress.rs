//! `fleetgate-sim stress`: find where a broker saturates, and how it survives a reconnect
//! storm.
//!
//! A **ramp** raises the per-device rate (or the number of devices) step by step, each step a
//! bounded phase of steady load, until a step breaks a stop rule: ingest fell behind what was
//! offered, something was lost, acknowledgements got too slow, or the clients could not even
//! offer their rate. The last step that broke none is the saturation point.
//!
//! A **storm** connects every device, then drops every connection at the same moment; each
//! device reconnects at once and backs off with jitter after a failure, as the fleet's devices
//! do. It reports how long until all were back, who never came back within the bound, and the
//! CONNACK refusals.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::load::{
    ConnectReport, LoadError, LoadSpec, PhaseReport, StormReport, qos_number, write_phase,
};
use crate::stats::{Opt, Rate};

/// Most steps of a ramp.
pub const MAX_STEPS: usize = 64;

/// What a ramp raises from step to step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ramp {
    /// The rate of every device: `rate x factor^step`.
    Rate,
    /// The number of devices: `start_devices x factor^step`, up to every device of the
    /// target, each at `rate`.
    Devices,
}

/// When a step counts as saturated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StopRules {
    /// Relative shortfall allowed: ingested below offered (per second of the step), or offered
    /// below the target rate, by more than this share stops the ramp.
    pub tolerance: f64,
    /// Publish-to-PUBACK p99 above this stops the ramp (QoS 1 only).
    pub p99_limit: Option<Duration>,
}

impl Default for StopRules {
    fn default() -> Self {
        StopRules {
            tolerance: 0.05,
            p99_limit: Some(Duration::from_secs(1)),
        }
    }
}

/// Why a step counts as saturated.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum StopReason {
    /// Ingested per second below offered per second by more than the tolerance.
    IngestBehind {
        ingested_per_s: f64,
        offered_per_s: f64,
    },
    /// Messages lost (by sequence numbers).
    Loss { lost: i64 },
    /// Publish-to-PUBACK p99 over the limit.
    AckLatency { p99_ms: f64, limit_ms: f64 },
    /// The clients could not offer the target rate (their queues were full: the broker did not
    /// acknowledge fast enough, or the simulator ran out of CPU).
    OfferedBehind {
        offered_per_s: f64,
        target_per_s: f64,
    },
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::IngestBehind {
                ingested_per_s,
                offered_per_s,
            } => write!(
                f,
                "ingested {} < offered {}",
                Rate(*ingested_per_s),
                Rate(*offered_per_s)
            ),
            StopReason::Loss { lost } => write!(f, "{lost} lost"),
            StopReason::AckLatency { p99_ms, limit_ms } => {
                write!(f, "PUBACK p99 {p99_ms:.2} ms > {limit_ms:.2} ms")
            }
            StopReason::OfferedBehind {
                offered_per_s,
                target_per_s,
            } => write!(
                f,
                "offered {} < target {}",
                Rate(*offered_per_s),
                Rate(*target_per_s)
            ),
        }
    }
}

/// The stop rules a step breaks (none: a good step). Rules whose figures were not measured
/// (no ingest counters, QoS 0) do not apply.
pub fn judge(step: &PhaseReport, rules: &StopRules) -> Vec<StopReason> {
    let mut reasons = Vec::new();
    let short = |got: f64, want: f64| got < want * (1.0 - rules.tolerance);
    if short(step.offered_per_s, step.target_per_s) {
        reasons.push(StopReason::OfferedBehind {
            offered_per_s: step.offered_per_s,
            target_per_s: step.target_per_s,
        });
    }
    if let Some(i) = &step.ingest {
        if short(i.ingested_per_s, step.offered_per_s) {
            reasons.push(StopReason::IngestBehind {
                ingested_per_s: i.ingested_per_s,
                offered_per_s: step.offered_per_s,
            });
        }
        if i.lost > 0 {
            reasons.push(StopReason::Loss { lost: i.lost });
        }
    }
    if let (Some(limit), Some(ack)) = (rules.p99_limit, step.ack_latency) {
        let limit_ms = limit.as_secs_f64() * 1000.0;
        if ack.p99_ms > limit_ms {
            reasons.push(StopReason::AckLatency {
                p99_ms: ack.p99_ms,
                limit_ms,
            });
        }
    }
    reasons
}

/// A ramp to run.
#[derive(Debug, Clone)]
pub struct RampSpec {
    /// Target, clients and payloads; `rate` is the first step's rate and `duration` each
    /// step's.
    pub load: LoadSpec,
    pub ramp: Ramp,
    /// Each step's rate (or devices) is the previous one's times this.
    pub factor: f64,
    pub steps: usize,
    /// Devices of the first step, for [`Ramp::Devices`].
    pub start_devices: usize,
    pub rules: StopRules,
}

/// One step of a ramp.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub step: usize,
    /// Devices connected before the step (for a devices ramp, the new ones connect first).
    pub devices: u64,
    pub rate_per_device: f64,
    pub phase: PhaseReport,
    /// `good` or `saturated`.
    pub verdict: &'static str,
    pub reasons: Vec<StopReason>,
}

/// The last good step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Saturation {
    pub step: usize,
    pub devices: u64,
    pub rate_per_device: f64,
    pub offered_per_s: f64,
    pub ingested_per_s: Option<f64>,
}

/// What a ramp found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RampReport {
    pub target: &'static str,
    pub broker: String,
    pub qos: u8,
    pub encoding: &'static str,
    pub ramp: Ramp,
    pub factor: f64,
    /// Connecting the first step's devices.
    pub connect: ConnectReport,
    pub steps: Vec<Step>,
    /// The last step that broke no rule; `None` if the first one did.
    pub last_good: Option<Saturation>,
    /// Whether a step broke a rule (otherwise the ramp ran out of steps or was stopped).
    pub saturated: bool,
    pub notes: Vec<String>,
    pub elapsed_s: f64,
}

/// What step `k` runs: devices and rate per device.
pub fn plan_step(spec: &RampSpec, k: usize) -> (usize, f64) {
    let grow = spec.factor.powi(k as i32);
    match spec.ramp {
        Ramp::Rate => (spec.load.target.devices(), spec.load.rate * grow),
        Ramp::Devices => {
            let n = (spec.start_devices as f64 * grow).ceil() as usize;
            (n.clamp(1, spec.load.target.devices()), spec.load.rate)
        }
    }
}

impl RampSpec {
    pub fn validate(&self) -> Result<(), LoadError> {
        self.load.validate()?;
        let mut problems = Vec::new();
        if !(self.factor > 1.0 && self.factor <= 100.0) {
            problems.push("factor must be within (1, 100]".to_owned());
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            problems.push(format!("steps must be within 1..={MAX_STEPS}"));
        }
        if self.ramp == Ramp::Devices
            && (self.start_devices == 0 || self.start_devices > self.load.target.devices())
        {
            problems.push("start devices must be within 1..=devices".to_owned());
        }
        if !(0.0..1.0).contains(&self.rules.tolerance) {
            problems.push("tolerance must be within 0..1".to_owned());
        }
        let last_rate = plan_step(self, self.steps - 1).1;
        if self.ramp == Ramp::Rate && last_rate > crate::load::MAX_RATE {
            problems.push(format!(
                "the last step's rate ({last_rate:.1}/s) is over {} per device: fewer steps or a smaller factor",
                crate::load::MAX_RATE
            ));
        }
        if self.load.duration * self.steps as u32 > crate::load::MAX_DURATION {
            problems.push("steps x step duration is limited to 24h".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LoadError::Invalid(problems))
        }
    }
}

/// Runs the ramp until a step saturates, the steps run out, or `stop`.
pub async fn ramp(spec: RampSpec, stop: CancellationToken) -> Result<RampReport, LoadError> {
    spec.validate()?;
    let started = Instant::now();
    let load = &spec.load;
    let mut swarm = load.swarm(&stop).await?;
    let (first, _) = plan_step(&spec, 0);
    let connect = swarm
        .connect(
            load.target.idents(0..first),
            load.connect_rate,
            load.connect_timeout,
        )
        .await;
    let mut steps: Vec<Step> = Vec::new();
    let mut saturated = false;
    for k in 0..spec.steps {
        if stop.is_cancelled() {
            break;
        }
        let (devices, rate) = plan_step(&spec, k);
        let have = swarm.devices() as usize;
        if devices > have {
            swarm
                .connect(
                    load.target.idents(have..devices),
                    load.connect_rate,
                    load.connect_timeout,
                )
                .await;
        } else if k > 0 && spec.ramp == Ramp::Devices {
            // Every device is already running: another step would repeat the last.
            break;
        }
        let phase = swarm
            .phase(
                &format!("step {k}"),
                rate,
                load.duration,
                load.linger,
                load.drain,
            )
            .await;
        let reasons = judge(&phase, &spec.rules);
        let bad = !reasons.is_empty();
        steps.push(Step {
            step: k,
            devices: phase.devices,
            rate_per_device: rate,
            verdict: if bad { "saturated" } else { "good" },
            reasons,
            phase,
        });
        if bad {
            saturated = true;
            break;
        }
    }
    let notes = swarm.notes.clone();
    swarm.close().await;
    let last_good = steps
        .iter()
        .rev()
        .find(|s| s.reasons.is_empty())
        .map(|s| Saturation {
            step: s.step,
            devices: s.devices,
            rate_per_device: s.rate_per_device,
            offered_per_s: s.phase.offered_per_s,
            ingested_per_s: s.phase.ingest.as_ref().map(|i| i.ingested_per_s),
        });
    Ok(RampReport {
        target: load.target.name(),
        broker: format!("{}:{}", load.host, load.port),
        qos: qos_number(load.qos),
        encoding: load.encoding.name(),
        ramp: spec.ramp,
        factor: spec.factor,
        connect,
        steps,
        last_good,
        saturated,
        notes,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// What a storm did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StormRun {
    pub target: &'static str,
    pub broker: String,
    pub devices: u64,
    /// Connecting the devices before the storm.
    pub connect: ConnectReport,
    pub storm: StormReport,
    pub notes: Vec<String>,
    pub elapsed_s: f64,
}

impl StormRun {
    /// Every device was connected before the storm and came back.
    pub fn clean(&self) -> bool {
        self.connect.connected == self.devices && self.storm.never_back == 0
    }
}

/// Connects every device of `load` (its ramp), drops them all at once and waits, at most
/// `timeout`, for them to come back.
pub async fn storm(
    load: LoadSpec,
    timeout: Duration,
    stop: CancellationToken,
) -> Result<StormRun, LoadError> {
    load.validate()?;
    if timeout.is_zero() || timeout > crate::load::MAX_DURATION {
        return Err(LoadError::Invalid(vec![
            "storm timeout must be within (0, 24h]".into(),
        ]));
    }
    let started = Instant::now();
    let mut swarm = load.swarm(&stop).await?;
    let n = load.target.devices();
    let connect = swarm
        .connect(
            load.target.idents(0..n),
            load.connect_rate,
            load.connect_timeout,
        )
        .await;
    let storm = swarm.storm(timeout).await;
    let notes = swarm.notes.clone();
    swarm.close().await;
    Ok(StormRun {
        target: load.target.name(),
        broker: format!("{}:{}", load.host, load.port),
        devices: n as u64,
        connect,
        storm,
        notes,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

impl fmt::Display for RampReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "target:    {} at {}, QoS {}, {}; ramp of the {} x{}",
            self.target,
            self.broker,
            self.qos,
            self.encoding,
            match self.ramp {
                Ramp::Rate => "rate",
                Ramp::Devices => "devices",
            },
            self.factor
        )?;
        writeln!(f, "connect:   {}", self.connect)?;
        for s in &self.steps {
            writeln!(
                f,
                "step {}:    {} devices at {} each: {}",
                s.step,
                s.devices,
                Rate(s.rate_per_device),
                s.verdict
            )?;
            write_phase(f, &s.phase, "  ")?;
            writeln!(f)?;
            if !s.reasons.is_empty() {
                let why: Vec<String> = s.reasons.iter().map(ToString::to_string).collect();
                writeln!(f, "  stopped:   {}", why.join("; "))?;
            }
        }
        match &self.last_good {
            Some(g) => write!(
                f,
                "last good: step {}, {} devices at {} each: offered {}, ingested {}",
                g.step,
                g.devices,
                Rate(g.rate_per_device),
                Rate(g.offered_per_s),
                Opt(g.ingested_per_s.map(Rate))
            )?,
            None => write!(f, "last good: none")?,
        }
        if !self.saturated {
            write!(f, " (not saturated: the ramp ended first)")?;
        }
        for n in &self.notes {
            write!(f, "\nnote:      {n}")?;
        }
        Ok(())
    }
}

impl fmt::Display for StormRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.storm;
        writeln!(
            f,
            "target:    {} at {}, {} devices",
            self.target, self.broker, self.devices
        )?;
        writeln!(f, "connect:   {}", self.connect)?;
        writeln!(
            f,
            "storm:     {} dropped at once; {} back, {} not back within {:.0} s",
            s.dropped, s.back, s.never_back, s.timeout_s
        )?;
        writeln!(
            f,
            "all back:  {}",
            Opt(s.all_back_s.map(|t| format!("{t:.2} s")))
        )?;
        write!(
            f,
            "reconnect: CONNACK {}; {} refused",
            Opt(s.connack),
            s.refused
        )?;
        if !s.refused_by.is_empty() {
            let by: Vec<String> = s
                .refused_by
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            write!(f, " ({})", by.join(", "))?;
        }
        write!(f, ", {} other errors", s.errors)?;
        for n in &self.notes {
            write!(f, "\nnote:      {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
