//! The `fleetgate-sim` command: runs a simulated fleet against a gateway.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetgate_protocol::Encoding;
use fleetgate_sim::behaviour::{DataShape, Regression, parse_classes};
use fleetgate_sim::updater::{DeviceProfile, Trust};
use fleetgate_sim::{FleetSpec, enroll};
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
    Run(Box<RunArgs>),
    /// Enroll N devices through the API and save their credentials for later runs.
    Enroll(EnrollArgs),
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

#[derive(Debug, Args)]
struct Target {
    /// Gateway MQTT address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Gateway API, to enroll the devices.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Operator token for enrolling.
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
struct RunArgs {
    #[command(flatten)]
    target: Target,
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
    let loopback = |ip: IpAddr| ip.is_loopback();
    if !t.allow_remote && !loopback(t.mqtt.ip()) {
        return Err(format!(
            "{} is not a loopback address; pass --allow-remote to load another machine",
            t.mqtt
        ));
    }
    Ok(())
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
    if !(args.rate > 0.0 && args.rate <= 1000.0) {
        return Err("--rate must be within (0, 1000] messages per second per device".into());
    }
    let duration = match (args.duration, args.messages) {
        (None, None) => Some(Duration::from_secs(60)),
        (d, _) => d,
    };
    if duration.is_some_and(|d| d > MAX_DURATION) {
        return Err("--duration is limited to 24h".into());
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
    for (f, delta) in args.shifts {
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
    let profile = DeviceProfile {
        trust: Trust {
            keys: args.trust_keys,
            threshold: args.trust_threshold,
            rollback_keys: args.rollback_keys,
        },
        regression,
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
    spec.messages = args.messages;
    // A message limit alone still ends: at the latest after the time it needs, twice over.
    spec.duration = duration.or_else(|| {
        args.messages
            .map(|m| spec.interval.mul_f64(m as f64 * 2.0) + Duration::from_secs(30))
    });
    spec.alert_every = args.alert_every;
    spec.connect_rate = args.connect_rate;
    spec.encoding = match args.encoding {
        Enc::Postcard => Encoding::Postcard,
        Enc::Json => Encoding::Json,
    };
    spec.shape = shape;
    spec.profiles = profiles;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let report = runtime.block_on(async {
        let stop = CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_signal.cancel();
            }
        });
        fleetgate_sim::run(spec, stop).await
    });
    println!("{report}");
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(if report.errors == 0 && report.unacked() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
