//! The `fleetgate-sim` command: runs a simulated fleet against a gateway (`run`, `enroll`),
//! and load, stress and burst runs against a gateway or a bare MQTT broker (`load`, `stress`,
//! `burst`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetgate_protocol::Encoding;
use fleetgate_sim::behaviour::{DataShape, Regression, parse_classes};
use fleetgate_sim::burst::BurstSpec;
use fleetgate_sim::ingest::Api;
use fleetgate_sim::load::{LoadError, LoadSpec};
use fleetgate_sim::progress::Progress;
use fleetgate_sim::stress::{Ramp, RampSpec, StopRules};
use fleetgate_sim::updater::{DeviceProfile, Trust};
use fleetgate_sim::{FleetSpec, enroll, scenario};
use rumqttc::QoS;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Longest run the simulator accepts: every run is bounded.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Parser)]
#[command(
    name = "fleetgate-sim",
    version,
    about = "Simulated TinyML devices for fleetgate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect N devices that say hello, send telemetry and alerts, and answer commands.
    ///
    /// Each device is a full MQTT client with its own credentials and a stable client id: it
    /// says hello, sends telemetry and alerts, answers commands, takes updates and rollbacks
    /// with the real update client, and reconnects with jittered backoff. --scenario FILE
    /// runs groups of devices with different hardware, rates, data and faults instead
    /// (see device-sim/scenarios/example.toml).
    Run(Box<RunArgs>),
    /// Enroll N devices through the API and save their credentials for later runs.
    Enroll(EnrollArgs),
    /// Measure a broker under steady load: a connect ramp, then a fixed rate per device.
    ///
    /// Lean clients send numbered, timestamped telemetry only. The summary gives the connect
    /// rate and CONNACK latency; offered, acknowledged and ingested messages per second;
    /// loss and duplicates (from sequence numbers); latency; and, from a gateway, its memory
    /// and CPU. Against a gateway, ingest figures come from GET /api/v1/ingest (give --token);
    /// against a bare broker (--target mqtt), from a subscriber on the telemetry topics.
    /// --verify then looks up every acknowledged sequence number in what the gateway stored.
    Load(Box<LoadCmd>),
    /// Find where a broker saturates, or time a reconnect storm (--storm).
    ///
    /// A ramp raises the rate per device (or the number of devices, --ramp devices) step by
    /// step, each step a steady phase of --duration, until ingest falls behind what was
    /// offered, a message is lost, PUBACK p99 passes --p99-limit, or the clients cannot offer
    /// their rate; the last good step is the saturation point. --storm connects every device,
    /// drops every connection at once and reports how long until all are back.
    Stress(Box<StressArgs>),
    /// Devices flushing what they buffered: all connect, then each sends --messages at once.
    ///
    /// Every device connects (a ramp), then all of them publish their numbered telemetry
    /// messages at the same moment, each as fast as its client takes them (QoS 1: as fast as
    /// its in-flight window allows). The summary gives acknowledged messages per second (first
    /// publish to last PUBACK), publish-to-PUBACK latency, stored (gateway API) or delivered
    /// (subscriber, --target mqtt) messages per second, what was acknowledged but never stored
    /// or delivered, and the gateway's memory, CPU and backpressure counters.
    Burst(Box<BurstArgs>),
}

#[derive(Debug, Args)]
struct EnrollArgs {
    #[command(flatten)]
    target: Target,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Enc {
    Postcard,
    Json,
}

impl From<Enc> for Encoding {
    fn from(e: Enc) -> Encoding {
        match e {
            Enc::Postcard => Encoding::Postcard,
            Enc::Json => Encoding::Json,
        }
    }
}

/// What kind of broker a load run talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Broker {
    /// A fleetgate gateway: enrolled devices, ingest figures from its API.
    Gateway,
    /// Any MQTT broker allowing anonymous clients on any topic (such as Mosquitto): a
    /// subscriber counts what arrives.
    Mqtt,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RampKind {
    /// Multiply the rate of every device.
    Rate,
    /// Multiply the number of devices, each at --rate.
    Devices,
}

#[derive(Debug, Args)]
struct Target {
    /// MQTT address of the gateway (or broker).
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Gateway API, to enroll the devices (and, for load, to read its ingest counters).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Operator token for the API.
    #[arg(long, env = "FLEETGATE_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Use the credentials in this file (id,secret lines) instead of enrolling.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Save the enrolled credentials here, for later runs.
    #[arg(long)]
    save_credentials: Option<PathBuf>,
    /// Device ids are <prefix>-00000, <prefix>-00001, ...
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Label enrolled devices into groups, as LABEL=GROUPS: device i gets
    /// LABEL="LABEL-<i mod GROUPS>" (e.g. site=20 gives site-0 .. site-19).
    #[arg(long)]
    spread: Option<enroll::Spread>,
    /// Allow a gateway that is not on this machine (load belongs on loopback by default).
    #[arg(long)]
    allow_remote: bool,
}

#[derive(Debug, Args)]
struct LoadArgs {
    #[command(flatten)]
    target: Target,
    /// What --mqtt is: a fleetgate gateway, or a bare MQTT broker.
    #[arg(
        long = "target",
        value_name = "KIND",
        value_enum,
        default_value = "gateway"
    )]
    broker: Broker,
    /// Number of devices (clients).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// New connections per second during the connect ramp.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// How long to wait for the last connections after the ramp's planned end.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    connect_timeout: Duration,
    /// Telemetry messages per second, per device (stress: of the first step).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// How long the steady phase lasts (stress: each step).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    duration: Duration,
    /// QoS of the telemetry: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload encoding.
    #[arg(long, value_enum, default_value = "postcard")]
    encoding: Enc,
    /// Pad each telemetry message with raw samples to at least this many bytes.
    #[arg(long, value_name = "BYTES")]
    payload_bytes: Option<usize>,
    /// Features per padding sample (more are used if 256 samples are not enough).
    #[arg(long, default_value_t = 4)]
    features: usize,
    /// Unacknowledged QoS 1 messages one client may have in flight.
    #[arg(long, default_value_t = 256)]
    inflight: u16,
    /// After sending, how long to wait for outstanding acknowledgements.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    linger: Duration,
    /// Then, how long to wait (at most) for the broker's ingest to catch up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    drain: Duration,
    /// Seed of the clients' random numbers (send phases, backoff jitter).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The broker's process id, when it runs on this machine: its CPU and memory over each
    /// phase are reported (from /proc, Linux).
    #[arg(long, value_name = "PID")]
    broker_pid: Option<u32>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct LoadCmd {
    #[command(flatten)]
    load: LoadArgs,
    /// After the run, read back every device's stored telemetry through the gateway's API and
    /// look up each acknowledged sequence number (QoS 1, gateway with --token). Only what
    /// retention kept can be found.
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Args)]
struct BurstArgs {
    #[command(flatten)]
    target: Target,
    /// What --mqtt is: a fleetgate gateway, or a bare MQTT broker.
    #[arg(
        long = "target",
        value_name = "KIND",
        value_enum,
        default_value = "gateway"
    )]
    broker: Broker,
    /// Number of devices (clients).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Telemetry messages each device sends.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// New connections per second during the connect ramp.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// How long to wait for the last connections after the ramp's planned end.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    connect_timeout: Duration,
    /// QoS of the telemetry: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Unacknowledged QoS 1 messages one client may have in flight (rumqttc's default: 100).
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Payload encoding.
    #[arg(long, value_enum, default_value = "postcard")]
    encoding: Enc,
    /// Pad each telemetry message with raw samples to at least this many bytes.
    #[arg(long, value_name = "BYTES")]
    payload_bytes: Option<usize>,
    /// Features per padding sample (more are used if 256 samples are not enough).
    #[arg(long, default_value_t = 4)]
    features: usize,
    /// Longest the burst may take; what is not sent by then is not sent.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    timeout: Duration,
    /// Then, how long to wait (at most) for the broker's ingest to catch up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    drain: Duration,
    /// Seed of the clients' random numbers (backoff jitter).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The broker's process id, when it runs on this machine: its CPU over the burst and its
    /// memory are reported (from /proc, Linux).
    #[arg(long, value_name = "PID")]
    broker_pid: Option<u32>,
    /// After the burst, read back every device's stored telemetry through the gateway's API
    /// and look up each acknowledged sequence number (QoS 1, gateway with --token).
    #[arg(long)]
    verify: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct StressArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// What the ramp raises from step to step.
    #[arg(long, value_enum, default_value = "rate")]
    ramp: RampKind,
    /// Each step's rate (or devices) is the previous step's times this.
    #[arg(long, default_value_t = 2.0)]
    factor: f64,
    /// Most steps to run.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Devices of the first step of a devices ramp.
    #[arg(long, default_value_t = 10)]
    start_devices: usize,
    /// Shortfall allowed before a step counts as saturated: ingested below offered, or
    /// offered below the target rate, by more than this share.
    #[arg(long, default_value_t = 0.05)]
    tolerance: f64,
    /// A step whose publish-to-PUBACK p99 is above this counts as saturated ("off": no limit).
    #[arg(long, value_parser = parse_limit, default_value = "1s")]
    p99_limit: Limit,
    /// Instead of a ramp: connect every device, drop all connections at once and wait for
    /// them to come back.
    #[arg(long)]
    storm: bool,
    /// How long a storm waits for every device to come back.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    storm_timeout: Duration,
}

/// A latency limit, or none.
#[derive(Debug, Clone, Copy)]
struct Limit(Option<Duration>);

fn parse_limit(s: &str) -> Result<Limit, String> {
    if s == "off" {
        return Ok(Limit(None));
    }
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    Ok(Limit(Some(d)))
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    target: Target,
    /// Run the groups of devices a scenario file describes (TOML; see
    /// device-sim/scenarios/example.toml) instead of one group set up by the flags below.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "devices", "rate", "alert_every", "samples", "features", "bins", "shifts",
        "fail_install_every", "regress", "classes", "confidence",
    ])]
    scenario: Option<PathBuf>,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Telemetry messages per second, per device.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// How long devices send (e.g. 30s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Telemetry messages per device (stop after this many).
    #[arg(long)]
    messages: Option<u64>,
    /// Send an alert with every Nth telemetry message (0: none).
    #[arg(long, default_value_t = 50)]
    alert_every: u64,
    /// New connections per second while starting.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Payload encoding.
    #[arg(long, value_enum, default_value = "postcard")]
    encoding: Enc,
    /// Raw input samples per telemetry message.
    #[arg(long, default_value_t = 0)]
    samples: usize,
    /// Input features per sample (standard normal each, unless shifted).
    #[arg(long, default_value_t = 4)]
    features: usize,
    /// Send counts per baseline bin instead of raw samples, once the gateway sent the edges.
    #[arg(long)]
    bins: bool,
    /// Shift the mean of one feature, as FEATURE=DELTA (e.g. 2=1.5); repeatable.
    #[arg(long = "shift", value_parser = parse_shift)]
    shifts: Vec<(usize, f32)>,
    /// Release key the devices trust for updates (64 hex characters); repeatable. Without
    /// one, devices refuse every update.
    #[arg(long = "trust-key", value_parser = fleetgate_config::parse_key)]
    trust_keys: Vec<[u8; 32]>,
    /// Distinct trusted keys an update must be signed by.
    #[arg(long, default_value_t = 1)]
    trust_threshold: usize,
    /// The gateway's key the devices trust for rollback directives (64 hex characters);
    /// repeatable. Without one, devices refuse every rollback.
    #[arg(long = "rollback-key", value_parser = fleetgate_config::parse_key)]
    rollback_keys: Vec<[u8; 32]>,
    /// Make every Nth device's installs fail after a good download (the devices with index
    /// N-1, 2N-1, ...).
    #[arg(long, value_name = "N")]
    fail_install_every: Option<u64>,
    /// Make every device behave worse while it runs one model version, as
    /// MODEL@VERSION:key=value,... with keys latency (factor), alerts (an alert every N
    /// messages), confidence (delta), temp (delta, C), free_mem (factor), power (factor) and
    /// classes (weights a/b/c), e.g. sim-model@2.0.0:latency=3,alerts=5.
    #[arg(long, value_name = "SPEC")]
    regress: Option<String>,
    /// Bench mode: the devices validate releases when the gateway asks (enroll them with the
    /// gateway's validation.bench_labels), measuring the defaults (10 ms, 150 kB of RAM,
    /// 60 mW, 96 % accurate) or, per model version, MODEL@VERSION:key=value,... with keys
    /// latency_us, jitter, ram, power_mw and accuracy; repeatable, e.g.
    /// --bench sim-model@2.1.0:latency_us=18000. A --regress version is slower here too.
    #[arg(long, value_name = "FIGURES", num_args = 0..=1, default_missing_value = "")]
    bench: Vec<String>,
    /// The devices' hardware class (default sim-mcu).
    #[arg(long, value_name = "CLASS")]
    class: Option<String>,
    /// Relative frequency of each predicted class, e.g. 0.7,0.2,0.1 (the default).
    #[arg(long, value_name = "A,B,C")]
    classes: Option<String>,
    /// Mean confidence of the model's predictions, within 0..=1 (default 0.9).
    #[arg(long)]
    confidence: Option<f32>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEETGATE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => match run(*args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("fleetgate-sim: {e}");
                ExitCode::from(64)
            }
        },
        Command::Load(args) => exit(load(*args)),
        Command::Stress(args) => exit(stress(*args)),
        Command::Burst(args) => exit(burst(*args)),
        Command::Enroll(args) => {
            if args.target.save_credentials.is_none() {
                eprintln!("fleetgate-sim: give --save-credentials FILE");
                return ExitCode::from(64);
            }
            match credentials(&args.target, args.devices) {
                Ok(creds) => {
                    println!("enrolled {} devices", creds.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fleetgate-sim: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn parse_shift(s: &str) -> Result<(usize, f32), String> {
    let (f, delta) = s
        .split_once('=')
        .ok_or("expected FEATURE=DELTA, e.g. 2=1.5")?;
    let f = f
        .parse()
        .map_err(|_| format!("feature index {f:?} is not a number"))?;
    let delta: f32 = delta
        .parse()
        .map_err(|_| format!("delta {delta:?} is not a number"))?;
    if !delta.is_finite() {
        return Err("delta must be finite".into());
    }
    Ok((f, delta))
}

fn check_target(t: &Target) -> Result<(), String> {
    if t.allow_remote {
        return Ok(());
    }
    if !t.mqtt.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address; pass --allow-remote to load another machine",
            t.mqtt
        ));
    }
    if !url_is_loopback(&t.api) {
        return Err(format!(
            "--api {} is not on a loopback address; pass --allow-remote to use another machine",
            t.api
        ));
    }
    Ok(())
}

/// Whether `url` (`http://host[:port][/...]`) names this machine: `localhost`, 127.0.0.0/8
/// or `[::1]`.
fn url_is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The credentials of exactly `ids`, in that order: from --credentials, or enrolled.
fn credentials_for(t: &Target, ids: &[String]) -> Result<Vec<enroll::Credential>, String> {
    if let Some(path) = &t.credentials {
        let all = enroll::load(path).map_err(|e| e.to_string())?;
        let by_id: std::collections::HashMap<&str, &enroll::Credential> =
            all.iter().map(|c| (c.id.as_str(), c)).collect();
        return ids
            .iter()
            .map(|id| {
                by_id
                    .get(id.as_str())
                    .map(|c| (*c).clone())
                    .ok_or_else(|| format!("{} has no credential for {id}", path.display()))
            })
            .collect();
    }
    let token = t
        .token
        .as_deref()
        .ok_or("give --token (or FLEETGATE_API_TOKEN) to enroll, or --credentials")?;
    let creds =
        enroll::enroll(&t.api, token, ids, t.spread.as_ref(), 8).map_err(|e| e.to_string())?;
    if let Some(path) = &t.save_credentials {
        enroll::save(path, &creds).map_err(|e| e.to_string())?;
    }
    Ok(creds)
}

/// Runs `f` on a new runtime; Ctrl-C cancels the token it gets.
fn on_runtime<F, Fut, T>(f: F) -> Result<T, String>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = T>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    Ok(runtime.block_on(async {
        let stop = CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_signal.cancel();
            }
        });
        f(stop).await
    }))
}

fn write_json(path: Option<&PathBuf>, report: &impl Serialize) -> Result<(), String> {
    let Some(path) = path else {
        return Ok(());
    };
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Why a load or stress command did not finish: bad arguments (exit 64) or a failed run
/// (exit 1).
#[derive(Debug)]
enum Failure {
    Usage(String),
    Run(String),
}

impl From<LoadError> for Failure {
    fn from(e: LoadError) -> Failure {
        match e {
            LoadError::Invalid(_) => Failure::Usage(e.to_string()),
            LoadError::Subscriber(_) => Failure::Run(e.to_string()),
        }
    }
}

fn exit(result: Result<ExitCode, Failure>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(Failure::Usage(e)) => {
            eprintln!("fleetgate-sim: {e}");
            ExitCode::from(64)
        }
        Err(Failure::Run(e)) => {
            eprintln!("fleetgate-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The load spec of the arguments, checked by `check` before any device is enrolled.
fn load_spec(
    a: &LoadArgs,
    check: impl Fn(&LoadSpec) -> Result<(), LoadError>,
) -> Result<LoadSpec, Failure> {
    check_target(&a.target).map_err(Failure::Usage)?;
    let host = a.target.mqtt.ip().to_string();
    let port = a.target.mqtt.port();
    let fill = |mut spec: LoadSpec| {
        spec.connect_rate = a.connect_rate;
        spec.connect_timeout = a.connect_timeout;
        spec.rate = a.rate;
        spec.duration = a.duration;
        spec.qos = if a.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        spec.encoding = a.encoding.into();
        spec.payload_bytes = a.payload_bytes;
        spec.features = a.features;
        spec.inflight = a.inflight;
        spec.linger = a.linger;
        spec.drain = a.drain;
        spec.seed = a.seed;
        spec.broker_pid = a.broker_pid;
        spec.progress = Progress::stderr();
        spec
    };
    check(&fill(LoadSpec::mqtt(
        &host,
        port,
        &a.target.prefix,
        a.devices,
    )))?;
    Ok(match a.broker {
        Broker::Mqtt => fill(LoadSpec::mqtt(&host, port, &a.target.prefix, a.devices)),
        Broker::Gateway => {
            let creds = credentials(&a.target, a.devices).map_err(Failure::Usage)?;
            let api = a.target.token.clone().map(|token| Api {
                url: a.target.api.clone(),
                token,
            });
            if api.is_none() {
                eprintln!("fleetgate-sim: no --token: the gateway's ingest counters are not read");
            }
            fill(LoadSpec::gateway(&host, port, creds, api))
        }
    })
}

/// Checks what --verify needs before any device is enrolled.
fn check_verify(broker: Broker, target: &Target, qos: u8) -> Result<(), Failure> {
    let problem = if broker == Broker::Mqtt {
        "--verify reads the gateway's API: a bare broker is checked by its subscriber"
    } else if target.token.is_none() {
        "--verify reads the gateway's API: give --token (or FLEETGATE_API_TOKEN)"
    } else if qos == 0 {
        "--verify looks up acknowledged messages: use --qos 1"
    } else {
        return Ok(());
    };
    Err(Failure::Usage(problem.to_owned()))
}

fn load(cmd: LoadCmd) -> Result<ExitCode, Failure> {
    let a = cmd.load;
    if cmd.verify {
        check_verify(a.broker, &a.target, a.qos)?;
    }
    let mut spec = load_spec(&a, LoadSpec::validate)?;
    spec.verify = cmd.verify;
    let report =
        on_runtime(|stop| fleetgate_sim::load::run(spec, stop)).map_err(Failure::Run)??;
    println!("{report}");
    write_json(a.json.as_ref(), &report).map_err(Failure::Run)?;
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn burst(a: BurstArgs) -> Result<ExitCode, Failure> {
    if a.verify {
        check_verify(a.broker, &a.target, a.qos)?;
    }
    let (messages, timeout, verify, json) = (a.messages, a.timeout, a.verify, a.json.clone());
    let load = LoadArgs {
        target: a.target,
        broker: a.broker,
        devices: a.devices,
        connect_rate: a.connect_rate,
        connect_timeout: a.connect_timeout,
        // A burst has no rate, duration or linger of its own.
        rate: 1.0,
        duration: Duration::from_secs(1),
        qos: a.qos,
        encoding: a.encoding,
        payload_bytes: a.payload_bytes,
        features: a.features,
        inflight: a.inflight,
        linger: Duration::ZERO,
        drain: a.drain,
        seed: a.seed,
        broker_pid: a.broker_pid,
        json: None,
    };
    let spec = |load: LoadSpec| {
        let mut spec = BurstSpec::new(load, messages);
        spec.load.inflight = a.inflight;
        spec.timeout = timeout;
        spec
    };
    let load = load_spec(&load, |l| spec(l.clone()).validate())?;
    let mut spec = spec(load);
    spec.verify = verify;
    let report =
        on_runtime(|stop| fleetgate_sim::burst::run(spec, stop)).map_err(Failure::Run)??;
    println!("{report}");
    write_json(json.as_ref(), &report).map_err(Failure::Run)?;
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn stress(a: StressArgs) -> Result<ExitCode, Failure> {
    let json = a.load.json.clone();
    if a.storm {
        let timeout = a.storm_timeout;
        let load = load_spec(&a.load, LoadSpec::validate)?;
        let run = on_runtime(|stop| fleetgate_sim::stress::storm(load, timeout, stop))
            .map_err(Failure::Run)??;
        println!("{run}");
        write_json(json.as_ref(), &run).map_err(Failure::Run)?;
        return Ok(if run.clean() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let ramp = |load: LoadSpec| RampSpec {
        load,
        ramp: match a.ramp {
            RampKind::Rate => Ramp::Rate,
            RampKind::Devices => Ramp::Devices,
        },
        factor: a.factor,
        steps: a.steps,
        start_devices: a.start_devices,
        rules: StopRules {
            tolerance: a.tolerance,
            p99_limit: a.p99_limit.0,
        },
    };
    let load = load_spec(&a.load, |l| ramp(l.clone()).validate())?;
    let spec = ramp(load);
    let report =
        on_runtime(|stop| fleetgate_sim::stress::ramp(spec, stop)).map_err(Failure::Run)??;
    println!("{report}");
    write_json(json.as_ref(), &report).map_err(Failure::Run)?;
    // Saturating is what a ramp is for; failing to connect its first devices is not.
    Ok(if report.connect.connected == report.connect.devices {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn credentials(t: &Target, n: usize) -> Result<Vec<enroll::Credential>, String> {
    if let Some(path) = &t.credentials {
        let mut creds = enroll::load(path).map_err(|e| e.to_string())?;
        if creds.len() < n {
            return Err(format!(
                "{} holds {} credentials, {n} needed",
                path.display(),
                creds.len()
            ));
        }
        creds.truncate(n);
        return Ok(creds);
    }
    let token = t
        .token
        .as_deref()
        .ok_or("give --token (or FLEETGATE_API_TOKEN) to enroll, or --credentials")?;
    let ids = enroll::ids(&t.prefix, n);
    let creds =
        enroll::enroll(&t.api, token, &ids, t.spread.as_ref(), 8).map_err(|e| e.to_string())?;
    if let Some(path) = &t.save_credentials {
        enroll::save(path, &creds).map_err(|e| e.to_string())?;
    }
    Ok(creds)
}

fn run(args: RunArgs) -> Result<ExitCode, String> {
    check_target(&args.target)?;
    let duration = match (args.duration, args.messages) {
        (None, None) => Some(Duration::from_secs(60)),
        (d, _) => d,
    };
    if duration.is_some_and(|d| d > MAX_DURATION) {
        return Err("--duration is limited to 24h".into());
    }
    let trust = Trust {
        keys: args.trust_keys.clone(),
        threshold: args.trust_threshold,
        rollback_keys: args.rollback_keys.clone(),
    };
    let mut spec = match &args.scenario {
        Some(path) => scenario_fleet(&args.target, path, trust)?,
        None => plain_fleet(&args, trust)?,
    };
    spec.messages = args.messages;
    // A message limit alone still ends: at the latest after the time the slowest device
    // needs, twice over.
    let slowest = spec
        .groups
        .iter()
        .map(|g| g.interval)
        .max()
        .unwrap_or(spec.interval);
    spec.duration = duration.or_else(|| {
        args.messages
            .map(|m| slowest.mul_f64(m as f64 * 2.0) + Duration::from_secs(30))
    });
    spec.connect_rate = args.connect_rate;
    spec.encoding = args.encoding.into();

    let report = on_runtime(|stop| fleetgate_sim::run(spec, stop))?;
    println!("{report}");
    write_json(args.json.as_ref(), &report)?;
    Ok(match failures(report.errors, report.unacked()) {
        None => ExitCode::SUCCESS,
        Some(why) => {
            eprintln!("fleetgate-sim: failed: {why}");
            ExitCode::FAILURE
        }
    })
}

/// Why a run failed, if it did: the exit code and the report must tell the same story (the
/// report said "errors: 0" on runs that exited 1 for unacknowledged messages).
fn failures(errors: u64, unacked: u64) -> Option<String> {
    let mut why = Vec::new();
    if errors > 0 {
        why.push(format!("{errors} errors"));
    }
    if unacked > 0 {
        why.push(format!(
            "{unacked} messages were not acknowledged by the broker (QoS 1)"
        ));
    }
    (!why.is_empty()).then(|| why.join(", "))
}

/// The fleet a scenario file describes; every group trusts `trust`.
fn scenario_fleet(t: &Target, path: &Path, trust: Trust) -> Result<FleetSpec, String> {
    let scenario = scenario::load(path).map_err(|e| e.to_string())?;
    let creds = credentials_for(t, &scenario.ids())?;
    println!(
        "scenario:  {} ({} devices in {} groups){}",
        path.display(),
        scenario.devices(),
        scenario.groups.len(),
        scenario
            .description
            .as_deref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default()
    );
    let mut spec = FleetSpec::new(&t.mqtt.ip().to_string(), t.mqtt.port(), creds);
    spec.groups = scenario
        .groups
        .into_iter()
        .map(|mut g| {
            g.profile.trust = trust.clone();
            g
        })
        .collect();
    Ok(spec)
}

/// The fleet of the `run` flags: one group of alike devices (every Nth failing installs with
/// --fail-install-every).
fn plain_fleet(args: &RunArgs, trust: Trust) -> Result<FleetSpec, String> {
    if !(args.rate > 0.0 && args.rate <= 1000.0) {
        return Err("--rate must be within (0, 1000] messages per second per device".into());
    }
    if args.features == 0 || args.features > fleetgate_protocol::limits::MAX_FEATURES {
        return Err(format!(
            "--features must be within 1..={}",
            fleetgate_protocol::limits::MAX_FEATURES
        ));
    }
    if args.samples > fleetgate_protocol::limits::MAX_SAMPLES {
        return Err(format!(
            "--samples must be at most {}",
            fleetgate_protocol::limits::MAX_SAMPLES
        ));
    }
    if args.bins && args.samples == 0 {
        return Err("--bins summarises samples: give --samples too".into());
    }
    let mut shift = vec![0.0; args.features];
    for &(f, delta) in &args.shifts {
        *shift
            .get_mut(f)
            .ok_or_else(|| format!("--shift {f}=..: there are {} features", args.features))? =
            delta;
    }
    let mut shape = DataShape {
        samples: args.samples,
        features: args.features,
        shift,
        bins: args.bins,
        ..DataShape::default()
    };
    if let Some(classes) = &args.classes {
        shape.classes = parse_classes(classes, ',').map_err(|e| format!("--classes: {e}"))?;
    }
    if let Some(c) = args.confidence {
        if !(0.0..=1.0).contains(&c) {
            return Err("--confidence must be within 0..=1".into());
        }
        shape.mean_confidence = c;
    }
    let regression = args
        .regress
        .as_deref()
        .map(str::parse::<Regression>)
        .transpose()
        .map_err(|e| format!("--regress: {e}"))?;
    let bench = if args.bench.is_empty() {
        None
    } else {
        let mut b = fleetgate_sim::bench::Bench::default();
        for text in args.bench.iter().filter(|t| !t.is_empty()) {
            b.versions
                .push(text.parse().map_err(|e| format!("--bench {text}: {e}"))?);
        }
        Some(b)
    };
    if let Some(class) = &args.class {
        let ok = !class.is_empty()
            && class.len() <= fleetgate_protocol::limits::MAX_NAME_LEN
            && class
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if !ok {
            return Err(format!(
                "--class {class:?}: 1-64 of A-Z a-z 0-9 - _ . : expected"
            ));
        }
    }
    let profile = DeviceProfile {
        trust,
        regression,
        bench,
        class: args.class.clone(),
        ..DeviceProfile::default()
    };
    // Device i gets profiles[i % len]: with N profiles, the last one is every Nth device's.
    let profiles = match args.fail_install_every {
        None => vec![profile],
        Some(n) if n >= 1 && n <= args.devices as u64 => (1..=n)
            .map(|i| {
                let mut p = profile.clone();
                p.faults.fail_install = i == n;
                p
            })
            .collect(),
        Some(_) => {
            return Err(format!(
                "--fail-install-every must be within 1..={} (the number of devices)",
                args.devices
            ));
        }
    };
    let creds = credentials(&args.target, args.devices)?;
    let mut spec = FleetSpec::new(
        &args.target.mqtt.ip().to_string(),
        args.target.mqtt.port(),
        creds,
    );
    spec.interval = Duration::from_secs_f64(1.0 / args.rate);
    spec.alert_every = args.alert_every;
    spec.shape = shape;
    spec.profiles = profiles;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::failures;

    #[test]
    fn a_failed_run_says_why() {
        assert_eq!(failures(0, 0), None);
        assert_eq!(
            failures(0, 12).as_deref(),
            Some("12 messages were not acknowledged by the broker (QoS 1)")
        );
        assert_eq!(
            failures(2, 1).as_deref(),
            Some("2 errors, 1 messages were not acknowledged by the broker (QoS 1)")
        );
    }
}
