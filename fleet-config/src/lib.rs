//! The gateway's configuration: a TOML file on top of an embedded default.
//!
//! Loading has two phases. The user's file is merged over the embedded default
//! ([`DEFAULT_TOML`]) as TOML tables, so every key exists afterwards; then one walk over the
//! merged table converts and checks each value. The walk never stops at the first problem: it
//! collects every unknown key, wrong type and out-of-range value, each named by its path
//! (`mqtt.listen`, `alerts.rules[1].metric`), and [`ConfigErrors`] reports them all.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetgate_protocol::{AlertKind, HwMetric, Severity, Uplink};

mod rollouts;
mod uplink;
mod walk;

pub use rollouts::{Abort, Gates, RolloutPolicy, Rollouts, StagePolicy, StageSize, Threshold};
pub use uplink::{
    Broker, Down, Forward, OutboxLimits, TelemetryForward, UplinkConfig, UplinkTls, Webhook,
    check_site,
};
use walk::{Problems, Section};

/// The embedded default configuration, with a comment on every setting.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mqtt: Mqtt,
    pub limits: Limits,
    pub http: Http,
    pub storage: Storage,
    pub retention: Retention,
    pub ingest: Ingest,
    pub registry: Registry,
    pub updates: Updates,
    pub drift: Drift,
    pub rollouts: Rollouts,
    pub validation: Validation,
    pub alerts: Alerts,
    pub log: Log,
    pub uplink: UplinkConfig,
}

/// Bench devices and validation runs (`[validation]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    /// A device carrying every one of these labels is a bench device; empty: none is.
    pub bench_labels: std::collections::BTreeMap<String, String>,
    /// Times a bench device runs the golden set in one validation.
    pub repeat: u32,
    /// Passing bench devices per hardware class a rollout's validate stage needs by default.
    pub min_devices: u32,
    /// How long a rollout's validate stage waits for them by default.
    pub timeout: Duration,
}

impl Validation {
    /// Whether a device with these labels is a bench device.
    pub fn is_bench(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        !self.bench_labels.is_empty()
            && self
                .bench_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// How the gateway writes its log (`[log]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub format: LogFormat,
}

/// One line per event for people, or one JSON object per line for log collectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: one of \"text\", \"json\"")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mqtt {
    /// The plain TCP listener's address; used only when `plain` is true.
    pub listen: SocketAddr,
    /// `false` when the file says `listen = ""` (then `tls` is set: one listener always is).
    pub plain: bool,
    /// The TLS listener; `None` when `mqtt.tls.listen` is empty.
    pub tls: Option<MqttTls>,
    pub max_connections: usize,
    /// Time from accepting a connection to a complete CONNECT (TLS handshake included).
    pub connect_timeout: Duration,
    pub max_packet_bytes: usize,
    pub max_keep_alive: Duration,
    /// New connections one source address may open: a token bucket refilled at this rate...
    pub per_source_connects_per_second: f64,
    /// ...holding at most this many.
    pub per_source_burst: u32,
    /// QoS 1/2 publishes one device may have waiting for their acknowledgement (the MQTT 5
    /// Receive Maximum the gateway announces); a session reads no further while this many wait.
    pub max_inflight: u16,
    pub router: Router,
}

/// MQTT over TLS (`[mqtt.tls]`).
#[derive(Debug, Clone, PartialEq)]
pub struct MqttTls {
    pub listen: SocketAddr,
    /// Certificate chain and private key (PEM). `None`: a self-signed certificate for `names`,
    /// generated on first start in `<data_dir>/tls/` and reused after.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Subject alternative names (host names or IP addresses) of the generated certificate.
    pub names: Vec<String>,
    /// CA certificates (PEM) that client certificates must chain to. `None`: devices present no
    /// certificate. Either way a device authenticates with its credential in CONNECT.
    pub client_ca: Option<PathBuf>,
}

/// What one device may cost the gateway (`[limits]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Publishes a device may send per second on average (a token bucket)...
    pub device_messages_per_second: f64,
    /// ...and at once after a quiet spell.
    pub device_burst: u32,
    pub max_message_bytes: MaxMessageBytes,
}

/// Largest payload, in bytes, a device may publish on each uplink channel.
#[derive(Debug, Clone, PartialEq)]
pub struct MaxMessageBytes {
    pub hello: usize,
    pub telemetry: usize,
    pub alert: usize,
    pub log: usize,
    pub ack: usize,
    pub report: usize,
}

impl MaxMessageBytes {
    /// The limit of `channel`.
    pub fn of(&self, channel: Uplink) -> usize {
        match channel {
            Uplink::Hello => self.hello,
            Uplink::Telemetry => self.telemetry,
            Uplink::Alert => self.alert,
            Uplink::Log => self.log,
            Uplink::Ack => self.ack,
            Uplink::Report => self.report,
        }
    }
}

/// Sizes of the embedded broker's in-memory log of commands to devices (see ARCHITECTURE.md,
/// "Memory budget").
#[derive(Debug, Clone, PartialEq)]
pub struct Router {
    pub downlink_segment_bytes: usize,
    pub downlink_segment_count: usize,
    pub max_outgoing_packet_count: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Http {
    pub listen: SocketAddr,
    /// `None`: from the environment or the data dir (the gateway decides).
    pub token: Option<String>,
    /// How others reach this gateway's API (links in alert notifications); no trailing `/`.
    pub external_url: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Storage {
    pub data_dir: PathBuf,
    pub cache_bytes: usize,
    /// Quota of the database's used space; 0: none.
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    pub telemetry_per_device: u64,
    pub telemetry_max_age: Duration,
    pub logs_per_device: u64,
    pub resolved_alerts_max_age: Duration,
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ingest {
    pub queue: usize,
    /// The queue's bound in bytes of device messages.
    pub queue_bytes: usize,
    pub batch: usize,
    /// After the first message of a batch, how long the writer may wait for more before it
    /// commits (a batch also closes when `batch` messages are in it).
    pub commit_delay: Duration,
    pub ack: IngestAck,
    pub reject_log_interval: Duration,
}

/// When a device's QoS 1/2 publish is acknowledged (`ingest.ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestAck {
    /// Once the transaction holding it has committed: an acknowledged message survives a crash.
    Commit,
    /// Once it is in the writer's queue: lower latency, but what is acknowledged and not yet
    /// committed is lost if the gateway dies.
    Receipt,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Registry {
    /// Trusted release keys (ed25519 public keys).
    pub trusted_keys: Vec<[u8; 32]>,
    pub threshold: usize,
    pub max_bundle_bytes: usize,
    pub max_chunk_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Updates {
    pub window: u32,
    pub max_concurrent: usize,
    pub stall_timeout: Duration,
    pub retries: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    pub window_samples: u64,
    pub window: Duration,
    pub min_samples: u64,
    pub psi_alert: f64,
    pub psi_warn_floor: f64,
    pub prediction_js_alert: f64,
    pub confidence_drop_alert: f64,
    /// Share of windows drawn like the baseline that may be "over" by chance: the quantile of
    /// the simulated null distribution under the alert threshold.
    pub false_alarm: f64,
    /// Clean windows in a row that resolve a drift alert.
    pub resolve_after: u32,
    /// Also raise an alert when a CUSUM of the per-window statistic reaches its limit.
    pub sequential: bool,
    /// CUSUM allowance and limit, as multiples of the alert floors.
    pub cusum_k: f64,
    pub cusum_h: f64,
    /// Most of a window one device may hold (1: no cap).
    pub device_share: f64,
    /// `None`: every device is in the cohort "all" only.
    pub cohort_label: Option<String>,
    pub reservoir: usize,
    pub history: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Alerts {
    pub rules: Vec<AlertRule>,
    /// Endpoints alerts are pushed to.
    pub webhooks: Vec<Webhook>,
    /// Bounds of the webhooks' outbox.
    pub webhook_outbox: OutboxLimits,
}

/// Opens an alert when `metric` crosses `trigger`, resolves it when the metric is back past
/// `clear` (hysteresis, so a value hovering at the threshold does not flap).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    pub metric: HwMetric,
    pub trigger: Trigger,
    pub clear: f64,
    pub kind: AlertKind,
    pub severity: Severity,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    Above(f64),
    Below(f64),
}

impl AlertRule {
    /// Whether `value` opens the alert.
    pub fn fires(&self, value: f64) -> bool {
        match self.trigger {
            Trigger::Above(t) => value > t,
            Trigger::Below(t) => value < t,
        }
    }

    /// Whether `value` resolves an open alert.
    pub fn clears(&self, value: f64) -> bool {
        match self.trigger {
            Trigger::Above(_) => value <= self.clear,
            Trigger::Below(_) => value >= self.clear,
        }
    }
}

/// One problem in a config file, named by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `mqtt.listen`; empty for problems with the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub source_name: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        let s = if n == 1 { "" } else { "s" };
        write!(f, "{} has {n} problem{s}:", self.source_name)?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        // The embedded default is checked by a unit test; it cannot fail at run time.
        Config::from_toml_str(DEFAULT_TOML, "embedded default")
            .unwrap_or_else(|e| panic!("embedded default config is invalid: {e}"))
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            source_name: name.clone(),
            errors: vec![ConfigError {
                path: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Config::from_toml_str(&text, &name)
    }

    /// Parses and checks config text; `source_name` names it in error messages.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Config, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            source_name: source_name.to_owned(),
            errors,
        };
        let user: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            fail(vec![ConfigError {
                path: String::new(),
                message: format!("not valid TOML: {}", toml_error(text, &e)),
            }])
        })?;
        let mut merged: toml::Table = DEFAULT_TOML
            .parse()
            .map_err(|e: toml::de::Error| fail(vec![walk::internal(e.message())]))?;
        walk::merge(&mut merged, user);

        let mut problems = Problems::default();
        let config = Config::walk(Section::root(&merged), &mut problems);
        problems.into_result(config).map_err(fail)
    }

    fn walk(mut root: Section<'_>, p: &mut Problems) -> Config {
        let mut mqtt = root.section(p, "mqtt");
        let mut router = mqtt.section(p, "router");
        let router = Router {
            downlink_segment_bytes: router.usize(p, "downlink_segment_bytes", 1024..=1 << 30),
            downlink_segment_count: router.usize(p, "downlink_segment_count", 1..=64),
            max_outgoing_packet_count: router.usize(p, "max_outgoing_packet_count", 1..=10_000)
                as u64,
        }
        .finish_with(router, p);
        let tls = MqttTls::walk(mqtt.section(p, "tls"), p);
        let listen = mqtt.opt_socket_addr(p, "listen");
        match (listen, &tls) {
            (None, None) if mqtt.exists() => mqtt.error(
                p,
                "listen",
                "is empty and so is mqtt.tls.listen: set at least one listener",
            ),
            (Some(plain), Some(tls)) if plain == tls.listen && plain.port() != 0 => {
                mqtt.error(p, "listen", "is the same address as mqtt.tls.listen");
            }
            _ => {}
        }
        let mqtt = Mqtt {
            listen: listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            plain: listen.is_some(),
            tls,
            max_connections: mqtt.usize(p, "max_connections", 1..=1_000_000),
            connect_timeout: mqtt.duration(p, "connect_timeout", ms(100)..=secs(65)),
            max_packet_bytes: mqtt.usize(p, "max_packet_bytes", 1024..=256 << 20),
            max_keep_alive: mqtt.duration(p, "max_keep_alive", secs(1)..=secs(65_535)),
            per_source_connects_per_second: mqtt.float_in(
                p,
                "per_source_connects_per_second",
                RATE_RANGE,
            ),
            per_source_burst: mqtt.usize(p, "per_source_burst", 1..=1_000_000) as u32,
            max_inflight: mqtt.usize(p, "max_inflight", 1..=65_535) as u16,
            router,
        }
        .finish_with(mqtt, p);

        let limits = Limits::walk(root.section(p, "limits"), p);

        let mut http = root.section(p, "http");
        let token = http.string(p, "token");
        if !token.is_empty() && token.len() < 16 {
            http.error(p, "token", "must be at least 16 characters (or empty)");
        }
        let listen = http.socket_addr(p, "listen");
        let external_url = http.string(p, "external_url");
        let external_url = if external_url.is_empty() {
            let mut addr = listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        } else {
            let ok = ["http://", "https://"].iter().any(|s| {
                external_url
                    .strip_prefix(s)
                    .is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
            });
            if !ok || external_url.contains(char::is_whitespace) {
                http.error(
                    p,
                    "external_url",
                    "must be an http:// or https:// URL (or empty)",
                );
            }
            external_url.trim_end_matches('/').to_owned()
        };
        let http = Http {
            listen,
            token: (!token.is_empty()).then_some(token),
            external_url,
        }
        .finish_with(http, p);

        let mut storage = root.section(p, "storage");
        let data_dir = storage.string(p, "data_dir");
        if data_dir.is_empty() {
            storage.error(p, "data_dir", "must not be empty");
        }
        let storage = Storage {
            data_dir: PathBuf::from(data_dir),
            cache_bytes: storage.usize(p, "cache_bytes", 1 << 20..=pow2(34)),
            max_bytes: storage.u64(p, "max_bytes", 0..=1 << 50),
        }
        .finish_with(storage, p);

        let mut ret = root.section(p, "retention");
        let retention = Retention {
            telemetry_per_device: ret.usize(p, "telemetry_per_device", 1..=100_000_000) as u64,
            telemetry_max_age: ret.duration(p, "telemetry_max_age", secs(60)..=days(36_500)),
            logs_per_device: ret.usize(p, "logs_per_device", 1..=1_000_000) as u64,
            resolved_alerts_max_age: ret.duration(
                p,
                "resolved_alerts_max_age",
                secs(60)..=days(36_500),
            ),
            interval: ret.duration(p, "interval", secs(1)..=days(1)),
        }
        .finish_with(ret, p);

        let mut ing = root.section(p, "ingest");
        let ingest = Ingest {
            queue: ing.usize(p, "queue", 16..=10_000_000),
            queue_bytes: ing.usize(p, "queue_bytes", 64 << 10..=1 << 40),
            batch: ing.usize(p, "batch", 1..=1_000_000),
            commit_delay: ing.duration(p, "commit_delay", ms(0)..=secs(1)),
            ack: match ing.string(p, "ack").as_str() {
                "commit" => IngestAck::Commit,
                "receipt" => IngestAck::Receipt,
                other => {
                    ing.error(
                        p,
                        "ack",
                        &format!("{other:?} is not one of \"commit\", \"receipt\""),
                    );
                    IngestAck::Commit
                }
            },
            reject_log_interval: ing.duration(p, "reject_log_interval", ms(0)..=days(1)),
        }
        .finish_with(ing, p);

        let mut reg = root.section(p, "registry");
        let keys = reg.strings(p, "trusted_keys");
        // (index in the file, key); a key given twice would count twice towards the threshold.
        let mut trusted: Vec<(usize, [u8; 32])> = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            match parse_key(k) {
                Ok(key) => match trusted.iter().find(|(_, t)| *t == key) {
                    Some((first, _)) => reg.error(
                        p,
                        &format!("trusted_keys[{i}]"),
                        &format!(
                            "is the same key as trusted_keys[{first}]; list each key once (one key counts once towards the threshold)"
                        ),
                    ),
                    None => trusted.push((i, key)),
                },
                Err(e) => reg.error(p, &format!("trusted_keys[{i}]"), &e),
            }
        }
        let trusted_keys: Vec<[u8; 32]> = trusted.into_iter().map(|(_, k)| k).collect();
        let threshold = reg.usize(p, "threshold", 1..=16);
        if !trusted_keys.is_empty() && threshold > trusted_keys.len() {
            reg.error(p, "threshold", "is more than the number of trusted keys");
        }
        let registry = Registry {
            trusted_keys,
            threshold,
            max_bundle_bytes: reg.usize(p, "max_bundle_bytes", 1024..=pow2(32)),
            max_chunk_bytes: reg.usize(p, "max_chunk_bytes", 256..=1 << 20),
        }
        .finish_with(reg, p);

        let mut upd = root.section(p, "updates");
        let updates = Updates {
            window: upd.usize(p, "window", 1..=256) as u32,
            max_concurrent: upd.usize(p, "max_concurrent", 1..=1_000_000),
            stall_timeout: upd.duration(p, "stall_timeout", secs(1)..=days(7)),
            retries: upd.usize(p, "retries", 0..=100) as u32,
        }
        .finish_with(upd, p);

        let mut dr = root.section(p, "drift");
        let label = dr.string(p, "cohort_label");
        let drift = Drift {
            window_samples: dr.usize(p, "window_samples", 10..=100_000_000) as u64,
            window: dr.duration(p, "window", secs(1)..=days(30)),
            min_samples: dr.usize(p, "min_samples", 1..=100_000_000) as u64,
            psi_alert: dr.float_in(p, "psi_alert", 0.0..=100.0),
            psi_warn_floor: dr.float_in(p, "psi_warn_floor", 0.0..=100.0),
            prediction_js_alert: dr.float_in(p, "prediction_js_alert", 0.0..=1.0),
            confidence_drop_alert: dr.float_in(p, "confidence_drop_alert", 0.0..=1.0),
            false_alarm: dr.float_in(p, "false_alarm", 0.0001..=0.1),
            resolve_after: dr.usize(p, "resolve_after", 1..=1000) as u32,
            sequential: dr.boolean(p, "sequential"),
            cusum_k: dr.float_in(p, "cusum_k", 0.0..=10.0),
            cusum_h: dr.float_in(p, "cusum_h", 0.01..=100.0),
            device_share: dr.float_in(p, "device_share", 0.001..=1.0),
            cohort_label: (!label.is_empty()).then_some(label),
            reservoir: dr.usize(p, "reservoir", 0..=1_000_000),
            history: dr.usize(p, "history", 3..=1_000_000),
        };
        if drift.min_samples > drift.window_samples {
            dr.error(p, "min_samples", "must not be more than window_samples");
        }
        if drift.psi_warn_floor > drift.psi_alert {
            dr.error(p, "psi_warn_floor", "must not be more than psi_alert");
        }
        let drift = drift.finish_with(dr, p);

        let rollouts = Rollouts::walk(root.section(p, "rollouts"), p);

        let mut val = root.section(p, "validation");
        let mut bench_labels = std::collections::BTreeMap::new();
        for (i, text) in val.strings(p, "bench_labels").iter().enumerate() {
            match text.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
                    bench_labels.insert(k.trim().to_owned(), v.trim().to_owned());
                }
                _ => val.error(
                    p,
                    &format!("bench_labels[{i}]"),
                    &format!("{text:?} is not KEY=VALUE"),
                ),
            }
        }
        let validation = Validation {
            bench_labels,
            repeat: val.usize(p, "repeat", 1..=1000) as u32,
            min_devices: val.usize(p, "min_devices", 1..=1000) as u32,
            timeout: val.duration(p, "timeout", secs(1)..=days(30)),
        }
        .finish_with(val, p);

        let mut alerts = root.section(p, "alerts");
        let rules = alerts
            .tables(p, "rules")
            .into_iter()
            .filter_map(|rule| AlertRule::walk(rule, p))
            .collect();
        // (index in the file, webhook) of the valid ones.
        let hooks: Vec<(usize, Webhook)> = alerts
            .tables(p, "webhooks")
            .into_iter()
            .enumerate()
            .filter_map(|(i, hook)| Webhook::walk(hook, p).map(|w| (i, w)))
            .collect();
        for (k, (i, hook)) in hooks.iter().enumerate() {
            if hooks[..k].iter().any(|(_, h)| h.name == hook.name) {
                alerts.error(
                    p,
                    &format!("webhooks[{i}].name"),
                    &format!("{:?} names an earlier webhook too", hook.name),
                );
            }
        }
        let webhooks: Vec<Webhook> = hooks.into_iter().map(|(_, w)| w).collect();
        let webhook_outbox = OutboxLimits::walk(alerts.section(p, "webhook_outbox"), p);
        let alerts = Alerts {
            rules,
            webhooks,
            webhook_outbox,
        }
        .finish_with(alerts, p);

        let mut log = root.section(p, "log");
        let format = log.string(p, "format");
        let format = format.parse().unwrap_or_else(|e: String| {
            log.error(p, "format", &e);
            LogFormat::Text
        });
        let log = Log { format }.finish_with(log, p);

        let uplink = UplinkConfig::walk(root.section(p, "uplink"), p);

        Config {
            mqtt,
            limits,
            http,
            storage,
            retention,
            ingest,
            registry,
            updates,
            drift,
            rollouts,
            validation,
            alerts,
            log,
            uplink,
        }
        .finish_with(root, p)
    }
}

impl MqttTls {
    /// `None` when `listen` is empty; the other keys are checked either way.
    fn walk(mut s: Section<'_>, p: &mut Problems) -> Option<MqttTls> {
        let listen = s.opt_socket_addr(p, "listen");
        let path = |s: &mut Section<'_>, p: &mut Problems, key: &str| {
            Some(PathBuf::from(s.string(p, key))).filter(|p| !p.as_os_str().is_empty())
        };
        let cert = path(&mut s, p, "cert");
        let key = path(&mut s, p, "key");
        match (&cert, &key) {
            (Some(_), None) => s.error(p, "key", "must be set when cert is"),
            (None, Some(_)) => s.error(p, "cert", "must be set when key is"),
            _ => {}
        }
        let names = s.strings(p, "names");
        for (i, name) in names.iter().enumerate() {
            if !is_host_name(name) {
                let msg = format!("{name:?} is not a host name or IP address");
                s.error(p, &format!("names[{i}]"), &msg);
            }
        }
        if listen.is_some() && cert.is_none() && names.is_empty() {
            s.error(
                p,
                "names",
                "must hold at least one name for the generated certificate (or set cert and key)",
            );
        }
        let client_ca = path(&mut s, p, "client_ca");
        s.finish(p);
        Some(MqttTls {
            listen: listen?,
            cert,
            key,
            names,
            client_ca,
        })
    }
}

/// A DNS name (letters, digits, `-`, `.`, a leading `*.` wildcard) or an IP address.
fn is_host_name(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Limits {
    fn walk(mut s: Section<'_>, p: &mut Problems) -> Limits {
        let mut max = s.section(p, "max_message_bytes");
        let mut bytes = |key: &str| max.usize(p, key, 16..=256 << 20);
        let max_message_bytes = MaxMessageBytes {
            hello: bytes("hello"),
            telemetry: bytes("telemetry"),
            alert: bytes("alert"),
            log: bytes("log"),
            ack: bytes("ack"),
            report: bytes("report"),
        }
        .finish_with(max, p);
        Limits {
            device_messages_per_second: s.float_in(p, "device_messages_per_second", RATE_RANGE),
            device_burst: s.usize(p, "device_burst", 1..=1_000_000) as u32,
            max_message_bytes,
        }
        .finish_with(s, p)
    }
}

/// Rates of the token buckets, per second: from one per ~17 minutes to a million.
const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.001..=1_000_000.0;

impl AlertRule {
    fn walk(mut s: Section<'_>, p: &mut Problems) -> Option<AlertRule> {
        let metric_name = s.string(p, "metric");
        let metric = HwMetric::from_name(&metric_name);
        if metric.is_none() {
            let names: Vec<_> = HwMetric::ALL.iter().map(|m| m.name()).collect();
            s.error(
                p,
                "metric",
                &format!("unknown metric {metric_name:?}; one of {names:?}"),
            );
        }
        let above = s.opt_float(p, "above");
        let below = s.opt_float(p, "below");
        let trigger = match (above, below) {
            (Some(a), None) => Some(Trigger::Above(a)),
            (None, Some(b)) => Some(Trigger::Below(b)),
            (Some(_), Some(_)) => {
                s.error(p, "above", "give either `above` or `below`, not both");
                None
            }
            (None, None) => {
                s.error(p, "above", "give a threshold: `above` or `below`");
                None
            }
        };
        let clear = s.opt_float(p, "clear");
        match (trigger, clear) {
            (Some(Trigger::Above(t)), Some(c)) if c > t => {
                s.error(p, "clear", "must not be greater than `above`");
            }
            (Some(Trigger::Below(t)), Some(c)) if c < t => {
                s.error(p, "clear", "must not be less than `below`");
            }
            _ => {}
        }
        let kind = s.string(p, "kind");
        if kind.is_empty() || kind.len() > fleetgate_protocol::limits::MAX_NAME_LEN {
            s.error(p, "kind", "must be 1 to 64 characters");
        }
        let severity_name = s.string(p, "severity");
        let severity = Severity::from_name(&severity_name);
        if severity.is_none() {
            s.error(p, "severity", "must be one of info, warning, critical");
        }
        let rule = (|| {
            let trigger = trigger?;
            Some(AlertRule {
                metric: metric?,
                clear: clear.unwrap_or(match trigger {
                    Trigger::Above(t) | Trigger::Below(t) => t,
                }),
                trigger,
                kind: AlertKind::from_name(&kind),
                severity: severity?,
            })
        })();
        s.finish(p);
        rule
    }
}

/// Checks a section for unknown keys once its known keys have been read.
trait FinishWith: Sized {
    fn finish_with(self, section: Section<'_>, p: &mut Problems) -> Self {
        section.finish(p);
        self
    }
}

impl<T> FinishWith for T {}

/// A TOML syntax error with where it is: `line 3, column 7: <what toml says>`.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let at = span.start.min(text.len());
            let before = &text[..at];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

/// Parses an ed25519 public key written as 64 hex characters.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{text:?} is not an ed25519 public key (64 hex characters)"
        ));
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(key)
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

/// 2^bits as a size, capped at `usize::MAX` on 32-bit hosts (armv7 Raspberry Pi OS).
fn pow2(bits: u32) -> usize {
    usize::try_from(1u64 << bits).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests;
