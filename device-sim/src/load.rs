//! `fleetgate-sim load`: a connect ramp, then a steady rate per device for a duration, against
//! a fleetgate gateway or any bare MQTT broker (such as Mosquitto), with the figures a
//! side-by-side comparison needs: connect rate and CONNACK latency, publish-to-PUBACK latency,
//! offered, acknowledged and ingested messages per second, loss and duplicates, end-to-end
//! latency, and the gateway's memory and CPU.

use std::fmt;
use std::time::Duration;

use fleetgate_protocol::{Encoding, limits};
use rumqttc::QoS;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::enroll::Credential;
use crate::ingest::Api;
use crate::progress::Progress;
use crate::stats::{Mib, Opt, Rate};
use crate::swarm::{self, Ident, Swarm};

pub use crate::swarm::{
    BrokerUse, ConnectReport, IngestReport, PhaseReport, StormReport, VerifyReport,
};

/// Highest telemetry rate of one device, messages per second.
pub const MAX_RATE: f64 = 10_000.0;
/// Largest payload the simulator pads telemetry to (the gateway's default packet limit is
/// 64 KiB, topic included).
pub const MAX_PAYLOAD: usize = 60_000;
/// Longest phase.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Most clients in one run.
pub const MAX_DEVICES: usize = 100_000;

/// Who the load goes to.
#[derive(Debug, Clone)]
pub enum Target {
    /// A fleetgate gateway: devices connect with their credentials. Ingest counters come from
    /// the gateway's API when `api` is given.
    Gateway {
        credentials: Vec<Credential>,
        api: Option<Api>,
    },
    /// Any MQTT broker, anonymous: `devices` clients `<prefix>-00000`, ... on the same topics
    /// and payloads, and one subscriber (`<prefix>-sub`) on `fg/+/telemetry` that counts what
    /// the broker delivers.
    Mqtt { prefix: String, devices: usize },
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::Gateway { .. } => "gateway",
            Target::Mqtt { .. } => "mqtt",
        }
    }

    pub fn devices(&self) -> usize {
        match self {
            Target::Gateway { credentials, .. } => credentials.len(),
            Target::Mqtt { devices, .. } => *devices,
        }
    }

    /// The first `n` clients' identities.
    pub(crate) fn idents(&self, range: std::ops::Range<usize>) -> Vec<Ident> {
        match self {
            Target::Gateway { credentials, .. } => credentials[range]
                .iter()
                .map(|c| Ident {
                    id: c.id.clone(),
                    login: Some((c.id.clone(), c.secret.clone())),
                })
                .collect(),
            Target::Mqtt { prefix, .. } => range
                .map(|i| Ident {
                    id: format!("{prefix}-{i:05}"),
                    login: None,
                })
                .collect(),
        }
    }

    fn api(&self) -> Option<Api> {
        match self {
            Target::Gateway { api, .. } => api.clone(),
            Target::Mqtt { .. } => None,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub host: String,
    pub port: u16,
    pub target: Target,
    /// New connections per second during the ramp.
    pub connect_rate: f64,
    /// How long to wait for the last connections after the ramp's planned end.
    pub connect_timeout: Duration,
    /// Telemetry messages per second, per device, during the steady phase.
    pub rate: f64,
    pub duration: Duration,
    pub qos: QoS,
    pub encoding: Encoding,
    /// Pad telemetry with raw samples to about this many bytes (`None`: no samples).
    pub payload_bytes: Option<usize>,
    /// Features per padding sample (more are used if 256 samples are not enough).
    pub features: usize,
    /// Unacknowledged QoS 1 publishes a client may have in flight.
    pub inflight: u16,
    /// After the steady phase, how long to wait for outstanding acknowledgements.
    pub linger: Duration,
    /// Then, how long to wait for the broker's ingest to catch up.
    pub drain: Duration,
    pub keep_alive: Duration,
    pub seed: u64,
    /// After the run, look up every acknowledged sequence number in what the gateway stored
    /// (its API; gateway targets only).
    pub verify: bool,
    /// The broker's process on this machine: its CPU and memory are sampled (Linux).
    pub broker_pid: Option<u32>,
    pub progress: Progress,
}

impl LoadSpec {
    fn new(host: &str, port: u16, target: Target) -> LoadSpec {
        LoadSpec {
            host: host.to_owned(),
            port,
            target,
            connect_rate: 500.0,
            connect_timeout: Duration::from_secs(30),
            rate: 1.0,
            duration: Duration::from_secs(30),
            qos: QoS::AtLeastOnce,
            encoding: Encoding::Postcard,
            payload_bytes: None,
            features: 4,
            inflight: 256,
            linger: Duration::from_secs(10),
            drain: Duration::from_secs(30),
            keep_alive: Duration::from_secs(30),
            seed: 1,
            verify: false,
            broker_pid: None,
            progress: Progress::hidden(),
        }
    }

    /// Load on a fleetgate gateway with these devices' credentials; `api` gives the ingest
    /// counters.
    pub fn gateway(
        host: &str,
        port: u16,
        credentials: Vec<Credential>,
        api: Option<Api>,
    ) -> LoadSpec {
        LoadSpec::new(host, port, Target::Gateway { credentials, api })
    }

    /// Load on a bare MQTT broker: `devices` anonymous clients `<prefix>-NNNNN`.
    pub fn mqtt(host: &str, port: u16, prefix: &str, devices: usize) -> LoadSpec {
        LoadSpec::new(
            host,
            port,
            Target::Mqtt {
                prefix: prefix.to_owned(),
                devices,
            },
        )
    }

    /// Checks the numbers; every problem, each naming its setting.
    pub fn validate(&self) -> Result<(), LoadError> {
        let mut problems = Vec::new();
        let n = self.target.devices();
        if n == 0 || n > MAX_DEVICES {
            problems.push(format!("devices must be within 1..={MAX_DEVICES}"));
        }
        if !(self.rate > 0.0 && self.rate <= MAX_RATE) {
            problems.push(format!("rate must be within (0, {MAX_RATE}] per device"));
        }
        if !(self.connect_rate > 0.0 && self.connect_rate.is_finite()) {
            problems.push("connect rate must be above 0".into());
        }
        for (name, d) in [
            ("duration", self.duration),
            ("linger", self.linger),
            ("drain", self.drain),
            ("connect timeout", self.connect_timeout),
        ] {
            if d > MAX_DURATION {
                problems.push(format!("{name} is limited to 24h"));
            }
        }
        if self.duration.is_zero() {
            problems.push("duration must be above 0".into());
        }
        if self.payload_bytes.is_some_and(|b| b > MAX_PAYLOAD) {
            problems.push(format!("payload bytes must be at most {MAX_PAYLOAD}"));
        }
        if self.features == 0 || self.features > limits::MAX_FEATURES {
            problems.push(format!(
                "features must be within 1..={}",
                limits::MAX_FEATURES
            ));
        }
        if self.qos == QoS::ExactlyOnce {
            problems.push("QoS must be 0 or 1".into());
        }
        if self.verify {
            match &self.target {
                Target::Gateway { api: None, .. } => {
                    problems.push("verify reads the gateway's API: give its token".into());
                }
                Target::Mqtt { .. } => problems.push(
                    "verify reads the gateway's API: a bare broker is checked by its subscriber"
                        .into(),
                ),
                Target::Gateway { .. } => {}
            }
            if self.qos == QoS::AtMostOnce {
                problems.push("verify looks up acknowledged messages: use QoS 1".into());
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LoadError::Invalid(problems))
        }
    }

    pub(crate) fn swarm_config(&self) -> Result<(swarm::Config, usize), LoadError> {
        let (samples, features, bytes) = match self.payload_bytes {
            Some(b) => swarm::padding(b, self.features, self.encoding)
                .map_err(|e| LoadError::Invalid(vec![format!("payload bytes: {e}")]))?,
            None => swarm::padding(0, self.features, self.encoding)
                .map_err(|e| LoadError::Invalid(vec![e]))?,
        };
        Ok((
            swarm::Config {
                host: self.host.clone(),
                port: self.port,
                qos: self.qos,
                encoding: self.encoding,
                samples,
                features,
                inflight: self.inflight,
                keep_alive: self.keep_alive,
                seed: self.seed,
                broker_pid: self.broker_pid,
            },
            bytes,
        ))
    }

    /// Starts the clients' machinery, and for a bare broker the subscriber.
    pub(crate) async fn swarm(&self, stop: &CancellationToken) -> Result<Swarm, LoadError> {
        let (cfg, _) = self.swarm_config()?;
        let mut swarm = Swarm::new(cfg, self.target.api(), stop.clone(), self.progress.clone());
        if let Target::Mqtt { prefix, .. } = &self.target {
            let filter = match self.encoding {
                Encoding::Postcard => "fg/+/telemetry",
                Encoding::Json => "fg/+/telemetry/json",
            };
            let client_id = format!("{prefix}-sub");
            if !swarm
                .subscribe(&client_id, filter, Duration::from_secs(10))
                .await
            {
                swarm.close().await;
                return Err(LoadError::Subscriber(format!(
                    "{client_id} could not subscribe to {filter} on {}:{} within 10 s",
                    self.host, self.port
                )));
            }
        }
        Ok(swarm)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("subscriber: {0}")]
    Subscriber(String),
}

/// What a load run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// `gateway` or `mqtt`.
    pub target: &'static str,
    pub broker: String,
    pub devices: u64,
    pub qos: u8,
    pub encoding: &'static str,
    /// Raw samples x features that pad each telemetry message.
    pub samples: usize,
    pub features: usize,
    pub connect: ConnectReport,
    pub steady: PhaseReport,
    /// With `verify`: every acknowledged number looked up in what the gateway stored.
    pub verify: Option<VerifyReport>,
    /// Things the figures do not show (an API that did not answer, ...).
    pub notes: Vec<String>,
    pub elapsed_s: f64,
}

impl LoadReport {
    /// Every device connected, every QoS 1 message was acknowledged and nothing was lost.
    pub fn clean(&self) -> bool {
        self.connect.connected == self.devices
            && self.steady.unacked.unwrap_or(0) == 0
            && self
                .steady
                .ingest
                .as_ref()
                .is_none_or(|i| i.lost <= 0 && i.duplicates == 0 && i.acked_lost.unwrap_or(0) == 0)
            && self.verify.as_ref().is_none_or(VerifyReport::clean)
    }
}

pub(crate) fn qos_number(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// Runs the ramp and the steady phase, then disconnects every client. `stop` ends it early
/// (the report covers what ran).
pub async fn run(spec: LoadSpec, stop: CancellationToken) -> Result<LoadReport, LoadError> {
    spec.validate()?;
    let started = Instant::now();
    let (cfg, _) = spec.swarm_config()?;
    let mut swarm = spec.swarm(&stop).await?;
    let n = spec.target.devices();
    let connect = swarm
        .connect(
            spec.target.idents(0..n),
            spec.connect_rate,
            spec.connect_timeout,
        )
        .await;
    let steady = swarm
        .phase("steady", spec.rate, spec.duration, spec.linger, spec.drain)
        .await;
    let (verify, notes) = swarm.finish(spec.verify).await;
    Ok(LoadReport {
        target: spec.target.name(),
        broker: format!("{}:{}", spec.host, spec.port),
        devices: n as u64,
        qos: qos_number(spec.qos),
        encoding: spec.encoding.name(),
        samples: cfg.samples,
        features: cfg.features,
        connect,
        steady,
        verify,
        notes,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

impl fmt::Display for ConnectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} connected in {:.2} s ({}); CONNACK {}; {} refused",
            self.connected,
            self.devices,
            self.elapsed_s,
            Rate(self.rate_per_s),
            Opt(self.connack),
            self.refused
        )?;
        write_by(f, &self.refused_by)?;
        write!(f, ", {} other errors", self.errors)
    }
}

fn write_by(
    f: &mut fmt::Formatter<'_>,
    by: &std::collections::BTreeMap<String, u64>,
) -> fmt::Result {
    if by.is_empty() {
        return Ok(());
    }
    let parts: Vec<String> = by.iter().map(|(k, n)| format!("{k} {n}")).collect();
    write!(f, " ({})", parts.join(", "))
}

/// The lines of a phase, each prefixed by `indent`.
pub(crate) fn write_phase(
    f: &mut fmt::Formatter<'_>,
    p: &PhaseReport,
    indent: &str,
) -> fmt::Result {
    writeln!(
        f,
        "{indent}phase:     {:.2} s, {} devices at {} each (target {})",
        p.duration_s,
        p.devices,
        Rate(p.rate_per_device),
        Rate(p.target_per_s)
    )?;
    writeln!(
        f,
        "{indent}offered:   {} ({}), {} skipped; {} B payloads",
        p.offered,
        Rate(p.offered_per_s),
        p.skipped,
        p.payload_bytes
    )?;
    writeln!(
        f,
        "{indent}acked:     {} ({}), {} unacknowledged; publish->PUBACK {}",
        Opt(p.acked),
        Opt(p.acked_per_s.map(Rate)),
        Opt(p.unacked),
        Opt(p.ack_latency)
    )?;
    match &p.ingest {
        Some(i) => {
            writeln!(
                f,
                "{indent}ingested:  {} ({}) by {}; lost {}, duplicates {}, acknowledged but lost {}",
                i.ingested,
                Rate(i.ingested_per_s),
                i.source,
                i.lost,
                i.duplicates,
                Opt(i.acked_lost)
            )?;
            let what = if i.source == "subscriber" {
                "device->subscriber"
            } else {
                "device->stored (since the gateway started)"
            };
            writeln!(f, "{indent}latency:   {what} {}", Opt(i.latency))?;
            // A bare broker says nothing about itself; its subscriber sees what it delivers.
            if i.source == "subscriber" {
                if i.undecodable > 0 {
                    writeln!(
                        f,
                        "{indent}received:  {} messages that are not telemetry",
                        i.undecodable
                    )?;
                }
            } else {
                writeln!(
                    f,
                    "{indent}gateway:   RSS {}, CPU {} %",
                    Opt(i.resident_bytes.map(Mib)),
                    Opt(i.cpu_pct.map(|c| format!("{c:.1}")))
                )?;
            }
        }
        None => writeln!(f, "{indent}ingested:  - (no ingest counters)")?,
    }
    if let Some(u) = &p.broker {
        writeln!(f, "{indent}broker:    {u}")?;
    }
    write!(
        f,
        "{indent}errors:    {} connection errors; simulator CPU {} % of a core",
        p.connection_errors,
        Opt(p.clients_cpu_pct.map(|c| format!("{c:.1}")))
    )
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "target:    {} at {}, {} devices, QoS {}, {}, {} samples x {} features",
            self.target,
            self.broker,
            self.devices,
            self.qos,
            self.encoding,
            self.samples,
            self.features
        )?;
        writeln!(f, "connect:   {}", self.connect)?;
        write_phase(f, &self.steady, "")?;
        if let Some(v) = &self.verify {
            write!(f, "\nverified:  {v}")?;
        }
        for n in &self.notes {
            write!(f, "\nnote:      {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
