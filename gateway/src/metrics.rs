//! The gateway's counters and gauges: one registry per gateway instance, rendered on
//! `/metrics` in the classic Prometheus text format (or OpenMetrics when asked for) and read
//! back for the JSON API.
//!
//! Also the vocabulary of refusals (why a connection or a message was turned away), their
//! rate-limited logging (every refusal is counted, at most one per reason is logged per
//! interval) and, per device, a short memory of its latest refusals with their reasons, so a
//! device maker can see why a message vanished (`GET /api/v1/devices/{id}/refusals`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetgate_protocol::{Severity, Uplink};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::clock::now_ms;

/// Why a message from a device was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// The topic is not a fleetgate topic.
    BadTopic,
    /// A fleetgate topic the device may not use: another device's, or a downlink channel.
    NotPermitted,
    /// The MQTT packet is larger than `mqtt.max_packet_bytes`.
    Oversized,
    /// The MQTT packet itself is malformed.
    Malformed,
    /// The payload does not decode in the topic's encoding.
    Undecodable,
    /// The payload decodes but breaks a rule (limits, finite numbers, ...).
    Invalid,
    /// From a device that is not enrolled (any more).
    UnknownDevice,
    /// An ack for a command this device was never sent.
    UnknownCommand,
    /// An update report for a transfer this device does not have.
    UnknownTransfer,
    /// Over the device's message rate (`limits.device_messages_per_second`, `device_burst`).
    RateLimited,
    /// A payload over its channel's `limits.max_message_bytes`.
    TooLarge,
    /// A packet a client may not send (a second CONNECT, a CONNACK, a SUBACK...): the
    /// connection is closed.
    ProtocolViolation,
}

impl Reject {
    pub const ALL: [Reject; 12] = [
        Reject::BadTopic,
        Reject::NotPermitted,
        Reject::Oversized,
        Reject::Malformed,
        Reject::Undecodable,
        Reject::Invalid,
        Reject::UnknownDevice,
        Reject::UnknownCommand,
        Reject::UnknownTransfer,
        Reject::RateLimited,
        Reject::TooLarge,
        Reject::ProtocolViolation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reject::BadTopic => "bad_topic",
            Reject::NotPermitted => "not_permitted",
            Reject::Oversized => "oversized",
            Reject::Malformed => "malformed",
            Reject::Undecodable => "undecodable",
            Reject::Invalid => "invalid",
            Reject::UnknownDevice => "unknown_device",
            Reject::UnknownCommand => "unknown_command",
            Reject::UnknownTransfer => "unknown_transfer",
            Reject::RateLimited => "rate_limited",
            Reject::TooLarge => "too_large",
            Reject::ProtocolViolation => "protocol_violation",
        }
    }

    fn index(self) -> usize {
        Reject::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Why a connection was refused or closed early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// No CONNECT within `mqtt.connect_timeout`.
    ConnectTimeout,
    /// First packet not a CONNECT, malformed, or an unsupported protocol version.
    Protocol,
    /// Missing, unknown or wrong username/password (unknown ids are not told apart, so that
    /// the answer does not reveal which devices are enrolled).
    BadCredentials,
    /// Client id is neither empty nor the username.
    ClientId,
    /// The will's topic is not one the device may publish to.
    Will,
    /// `mqtt.max_connections` reached.
    ServerFull,
    /// The gateway is shutting down.
    ShuttingDown,
    /// The source address opened connections faster than `mqtt.per_source_connects_per_second`
    /// allows; closed before anything was read.
    RateLimited,
    /// The TLS handshake failed (not TLS, no shared protocol version or cipher, a client
    /// certificate missing or not signed by `mqtt.tls.client_ca`).
    Tls,
    /// The device's previous session did not end in time to make room for this one.
    Takeover,
}

impl Refusal {
    pub const ALL: [Refusal; 10] = [
        Refusal::ConnectTimeout,
        Refusal::Protocol,
        Refusal::BadCredentials,
        Refusal::ClientId,
        Refusal::Will,
        Refusal::ServerFull,
        Refusal::ShuttingDown,
        Refusal::RateLimited,
        Refusal::Tls,
        Refusal::Takeover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::ConnectTimeout => "connect_timeout",
            Refusal::Protocol => "protocol",
            Refusal::BadCredentials => "bad_credentials",
            Refusal::ClientId => "client_id",
            Refusal::Will => "will_not_permitted",
            Refusal::ServerFull => "server_full",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::RateLimited => "rate_limited",
            Refusal::Tls => "tls_handshake",
            Refusal::Takeover => "takeover_timeout",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub model: String,
    pub version: String,
    pub cohort: String,
    /// A feature's name, or `prediction`.
    pub subject: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SeverityLabel {
    severity: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    /// The route's pattern (`/api/v1/devices/{id}`), never the raw path: bounded.
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpRouteLabels {
    method: String,
    route: String,
}

/// Gauges of drift windows, keyed like a `Family` (`get_or_create(&labels).set(v)`), that
/// `/metrics` renders split by what they measure: a feature's PSI and the predictions' JS
/// distance in families of their own. Series of model versions that no device runs any more
/// are removed ([`Metrics::retain_drift`]).
#[derive(Debug, Default)]
pub struct DriftGauges<G> {
    by_labels: Mutex<HashMap<DriftLabels, G>>,
}

impl<G: Clone + Default> DriftGauges<G> {
    /// The gauge of `labels` (a handle: setting it sets the rendered value).
    pub fn get_or_create(&self, labels: &DriftLabels) -> G {
        let mut m = self.by_labels.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(labels.clone()).or_default().clone()
    }

    pub fn get(&self, labels: &DriftLabels) -> Option<G> {
        let m = self.by_labels.lock().unwrap_or_else(|e| e.into_inner());
        m.get(labels).cloned()
    }

    pub fn remove(&self, labels: &DriftLabels) -> bool {
        let mut m = self.by_labels.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(labels).is_some()
    }

    pub fn clear(&self) {
        self.by_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn len(&self) -> usize {
        self.by_labels.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn retain(&self, keep: impl Fn(&DriftLabels) -> bool) {
        let mut m = self.by_labels.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|l, _| keep(l));
    }

    /// A sorted copy, so that renders are stable.
    fn snapshot(&self) -> Vec<(DriftLabels, G)> {
        let m = self.by_labels.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(DriftLabels, G)> = m.iter().map(|(l, g)| (l.clone(), g.clone())).collect();
        v.sort_by(|a, b| {
            (&a.0.model, &a.0.version, &a.0.cohort, &a.0.subject).cmp(&(
                &b.0.model,
                &b.0.version,
                &b.0.cohort,
                &b.0.subject,
            ))
        });
        v
    }
}

/// The subject of the predictions' drift series (every other subject names a feature).
pub const PREDICTION_SUBJECT: &str = "prediction";

/// A window's PSI of one feature.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    model: String,
    version: String,
    cohort: String,
    feature: String,
}

/// The predictions of a model version in a cohort.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    model: String,
    version: String,
    cohort: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ValidationLabels {
    kind: String,
    name: String,
    version: String,
    class: String,
    measure: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ValidationVerdictLabels {
    kind: String,
    name: String,
    version: String,
    class: String,
    result: &'static str,
}

/// Renders the drift gauges and the process's own figures at each scrape.
#[derive(Debug)]
struct ScrapeCollector {
    drift_value: Arc<DriftGauges<Gauge<f64, AtomicU64>>>,
    drift_status: Arc<DriftGauges<Gauge>>,
    drift_window_samples: Arc<DriftGauges<Gauge>>,
    start_time_s: f64,
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let values = self.drift_value.snapshot();
        let gauge_f64 = ConstGauge::new(0.0f64).metric_type();
        {
            let mut family = encoder.encode_descriptor(
                "drift_psi",
                "Latest closed drift window: population stability index of a feature against its baseline",
                None,
                gauge_f64,
            )?;
            for (l, g) in values
                .iter()
                .filter(|(l, _)| l.subject != PREDICTION_SUBJECT)
            {
                let labels = FeatureLabels {
                    model: l.model.clone(),
                    version: l.version.clone(),
                    cohort: l.cohort.clone(),
                    feature: l.subject.clone(),
                };
                ConstGauge::new(g.get()).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "drift_prediction_js",
                "Latest closed drift window: Jensen-Shannon distance of the predicted classes from the baseline",
                None,
                gauge_f64,
            )?;
            for (l, g) in values
                .iter()
                .filter(|(l, _)| l.subject == PREDICTION_SUBJECT)
            {
                let labels = StreamLabels {
                    model: l.model.clone(),
                    version: l.version.clone(),
                    cohort: l.cohort.clone(),
                };
                ConstGauge::new(g.get()).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "drift_status",
                "Drift status of a feature or of the predictions (subject): -1 insufficient (no judged window), 0 ok, 1 warn, 2 alert",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (l, g) in self.drift_status.snapshot() {
                ConstGauge::new(g.get()).encode(family.encode_family(&l)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "drift_window_samples",
                "Samples in the latest closed drift window of a feature or of the predictions (after the per-device cap)",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (l, g) in self.drift_window_samples.snapshot() {
                ConstGauge::new(g.get()).encode(family.encode_family(&l)?)?;
            }
        }
        if let Some(cpu) = cpu_seconds() {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "CPU time (user and system) the gateway process has used, in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        if let Some(fds) = open_fds() {
            let g = ConstGauge::new(fds as i64);
            g.encode(encoder.encode_descriptor(
                "process_open_fds",
                "File descriptors the gateway process holds open (sockets included)",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(max) = max_fds() {
            let g = ConstGauge::new(max as i64);
            g.encode(encoder.encode_descriptor(
                "process_max_fds",
                "Most file descriptors the gateway process may open",
                None,
                g.metric_type(),
            )?)?;
        }
        let g = ConstGauge::new(self.start_time_s);
        g.encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "When the gateway started, in seconds since the Unix epoch",
            None,
            g.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Counters shared by the MQTT front, the ingest writer and the API.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connected: Gauge,
    pub connects: Counter,
    refused: Vec<Counter>,
    rejected: Vec<Counter>,
    stored: Vec<Counter>,
    pub lost: Gauge,
    pub duplicates: Counter,
    pub batches: Counter,
    pub queue_depth: Gauge,
    /// Unresolved alerts in all, as the writer counts them; `/metrics` shows them per
    /// severity ([`Metrics::set_unresolved_alerts`]).
    pub alerts_open: Gauge,
    alerts_unresolved: Family<SeverityLabel, Gauge>,
    /// Bench validation per release and hardware class: the worst device's value of each
    /// measure, and the devices by verdict.
    validation_value: Family<ValidationLabels, Gauge<f64, AtomicU64>>,
    validation_devices: Family<ValidationVerdictLabels, Gauge>,
    pub commands_sent: Counter,
    pub chunks_sent: Counter,
    /// Direct messages (update chunks) a session could not deliver: device gone, not
    /// subscribed, or its queue full.
    pub direct_dropped: Counter,
    pub transfers_active: Gauge,
    /// Latest closed window per model version, cohort and feature: PSI (JS for predictions,
    /// subject `prediction`), rendered as `drift_psi` and `drift_prediction_js`...
    pub drift_value: Arc<DriftGauges<Gauge<f64, AtomicU64>>>,
    /// ...its status (-1 insufficient, 0 ok, 1 warn, 2 alert)...
    pub drift_status: Arc<DriftGauges<Gauge>>,
    /// ...and its samples (after the per-device cap).
    pub drift_window_samples: Arc<DriftGauges<Gauge>>,
    /// Samples or bin counts that did not match their model's baseline.
    pub drift_mismatched: Counter,
    /// Rollouts running or paused.
    pub rollouts_active: Gauge,
    /// Signed rollback directives sent to devices.
    pub rollback_directives: Counter,
    /// Times retention deleted the oldest rows because the database passed `storage.max_bytes`.
    pub storage_quota_trims: Counter,
    /// Telemetry rows and log lines deleted to keep the database under `storage.max_bytes`.
    pub storage_quota_rows: Counter,
    /// Publishes a session held back because the device was over its message rate.
    pub publishes_delayed: Counter,
    /// Times a session found the writer's queue full and stopped reading until it had room.
    pub writer_queue_full: Counter,
    /// Sessions whose messages were in a batch that failed to commit (disconnected unacknowledged).
    pub sessions_failed: Counter,
    storage_bytes: Gauge,
    resident_bytes: Gauge,
    /// When the storage writer last went round its loop, in ms after `started`.
    writer_beat_ms: AtomicU64,
    writer_stopped: std::sync::atomic::AtomicBool,
    started: std::time::Instant,
    log_limit: LogLimit,
    /// Telemetry from its device timestamp to its commit, in microseconds...
    ingest_latency: Mutex<hdrhistogram::Histogram<u64>>,
    /// ...and the same in seconds, for Prometheus.
    ingest_latency_seconds: Histogram,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<HttpRouteLabels, Histogram>,
    refusals: Mutex<RefusalLog>,
    /// The upstream connection, the outboxes and the webhooks.
    pub uplink: crate::uplink::metrics::UplinkMetrics,
}

/// Percentiles of the ingest latency since the gateway started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Device timestamps further than this from the gateway's clock are not wall-clock times (a
/// device without a clock counts from its boot) and are left out of the latency.
const CLOCK_SLACK_MS: u64 = 86_400_000;

/// A JSON-friendly copy of the ingest counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestCounts {
    pub connected_devices: i64,
    pub connects: u64,
    pub refused: std::collections::BTreeMap<&'static str, u64>,
    pub stored: std::collections::BTreeMap<&'static str, u64>,
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
    pub lost: i64,
    pub duplicates: u64,
    pub batches: u64,
    pub queue_depth: i64,
}

impl Metrics {
    pub fn new(reject_log_interval: Duration) -> Metrics {
        let mut registry = Registry::with_prefix("fleetgate");
        let r = &mut registry;
        let refused = labelled(
            r,
            "mqtt_refused",
            "Connections refused or closed before CONNACK, by reason",
            Refusal::ALL.map(|x| ReasonLabel { reason: x.name() }),
        );
        let rejected = labelled(
            r,
            "ingest_rejected",
            "Device messages rejected, by reason",
            Reject::ALL.map(|x| ReasonLabel { reason: x.name() }),
        );
        let stored = labelled(
            r,
            "ingest_stored",
            "Device messages decoded and committed to storage, by channel",
            Uplink::ALL.map(|c| ChannelLabel { channel: c.name() }),
        );
        let validation_value = Family::<ValidationLabels, Gauge<f64, AtomicU64>>::default();
        r.register(
            "validation_value",
            "Bench validation of a release: the worst bench device's value of a measure in a hardware class",
            validation_value.clone(),
        );
        let validation_devices = Family::<ValidationVerdictLabels, Gauge>::default();
        r.register(
            "validation_devices",
            "Bench devices whose latest validation of a release passed, failed or ended in an error, per hardware class",
            validation_devices.clone(),
        );
        let alerts_unresolved = Family::<SeverityLabel, Gauge>::default();
        r.register(
            "alerts_unresolved",
            "Alerts open or acknowledged, by severity",
            alerts_unresolved.clone(),
        );
        for s in [Severity::Info, Severity::Warning, Severity::Critical] {
            // Every severity has a series from the start, 0 until an alert has it.
            let _ = alerts_unresolved.get_or_create_owned(&SeverityLabel { severity: s.name() });
        }
        let ingest_latency_seconds = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0,
        ]);
        r.register(
            "ingest_latency_seconds",
            "Telemetry from the device's timestamp to its commit to storage (wall-clock device timestamps only)",
            ingest_latency_seconds.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        r.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            http_requests.clone(),
        );
        let http_duration = Family::<HttpRouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        r.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (headers written), by method and route",
            http_duration.clone(),
        );
        r.register(
            "build",
            "The gateway's version",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("arch", std::env::consts::ARCH),
            ]),
        );
        let drift_value = Arc::new(DriftGauges::default());
        let drift_status = Arc::new(DriftGauges::default());
        let drift_window_samples = Arc::new(DriftGauges::default());
        r.register_collector(Box::new(ScrapeCollector {
            drift_value: drift_value.clone(),
            drift_status: drift_status.clone(),
            drift_window_samples: drift_window_samples.clone(),
            start_time_s: now_ms() as f64 / 1000.0,
        }));
        Metrics {
            connected: metric(r, "mqtt_connected_devices", "Devices connected now"),
            connects: metric(r, "mqtt_connects", "Accepted device connections"),
            refused,
            rejected,
            stored,
            lost: metric(
                r,
                "telemetry_lost",
                "Telemetry sequence numbers missing since start (late arrivals subtract)",
            ),
            duplicates: metric(
                r,
                "telemetry_duplicates",
                "Telemetry messages received more than once",
            ),
            batches: metric(r, "ingest_batches", "Storage write transactions"),
            queue_depth: metric(
                r,
                "ingest_queue_depth",
                "Messages waiting for the storage writer",
            ),
            alerts_open: Gauge::default(),
            alerts_unresolved,
            validation_value,
            validation_devices,
            commands_sent: metric(r, "commands_sent", "Commands published to devices"),
            chunks_sent: metric(r, "update_chunks_sent", "Update chunks sent to devices"),
            direct_dropped: metric(
                r,
                "update_chunks_dropped",
                "Update chunks a device's session could not take",
            ),
            transfers_active: metric(
                r,
                "updates_in_progress",
                "Update transfers not yet finished",
            ),
            drift_value,
            drift_status,
            drift_window_samples,
            drift_mismatched: metric(
                r,
                "drift_mismatched",
                "Samples or bin counts that did not match the model's baseline",
            ),
            rollouts_active: metric(r, "rollouts_active", "Rollouts running or paused"),
            rollback_directives: metric(
                r,
                "rollback_directives",
                "Signed rollback directives sent to devices",
            ),
            storage_quota_trims: metric(
                r,
                "storage_quota_trims",
                "Times the oldest telemetry and logs were deleted to keep the database under storage.max_bytes",
            ),
            storage_quota_rows: metric(
                r,
                "storage_quota_rows",
                "Telemetry rows and log lines deleted, oldest first, to keep the database under storage.max_bytes",
            ),
            publishes_delayed: metric(
                r,
                "mqtt_publishes_delayed",
                "Publishes held back until the device's message bucket refilled",
            ),
            writer_queue_full: metric(
                r,
                "ingest_queue_full",
                "Times a device session found the storage writer's queue full and stopped reading",
            ),
            sessions_failed: metric(
                r,
                "ingest_sessions_failed",
                "Device sessions disconnected because a batch with their messages failed to commit",
            ),
            storage_bytes: metric(r, "storage_bytes", "Size of the database file"),
            resident_bytes: metric(
                r,
                "process_resident_memory_bytes",
                "Resident memory of the gateway process",
            ),
            log_limit: LogLimit::new(reject_log_interval),
            writer_beat_ms: AtomicU64::new(0),
            writer_stopped: std::sync::atomic::AtomicBool::new(false),
            started: std::time::Instant::now(),
            ingest_latency: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("valid histogram bounds"),
            ),
            ingest_latency_seconds,
            http_requests,
            http_duration,
            refusals: Mutex::new(RefusalLog::default()),
            uplink: crate::uplink::metrics::UplinkMetrics::register(r),
            registry,
        }
    }

    /// The storage writer is going round its loop.
    pub fn writer_alive(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.writer_beat_ms.store(ms, Ordering::Relaxed);
    }

    /// The storage writer's thread has ended.
    pub fn writer_stopped(&self) {
        self.writer_stopped.store(true, Ordering::Relaxed);
    }

    /// Why the storage writer is not running, if it is not: stopped, or no progress for
    /// longer than `stuck`.
    pub fn writer_trouble(&self, stuck: Duration) -> Option<String> {
        if self.writer_stopped.load(Ordering::Relaxed) {
            return Some("the storage writer has stopped".to_owned());
        }
        let stalled = self.writer_stalled_for();
        (stalled > stuck).then(|| {
            format!(
                "the storage writer has made no progress for {} s",
                stalled.as_secs()
            )
        })
    }

    /// How long since the storage writer last went round its loop.
    pub fn writer_stalled_for(&self) -> Duration {
        let beat = self.writer_beat_ms.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(beat))
    }

    /// Counts a rejected message and logs it if its reason has not been logged lately.
    pub fn reject(&self, reason: Reject, device: &str, detail: &dyn std::fmt::Display) {
        self.rejected[reason.index()].inc();
        if let Ok(mut log) = self.refusals.lock() {
            log.record(device, reason, detail, now_ms());
        }
        if let Some(suppressed) = self.log_limit.allow(reason.index()) {
            tracing::warn!(
                reason = reason.name(),
                device,
                detail = %detail,
                suppressed,
                "device message rejected"
            );
        }
    }

    /// Counts a refused connection and logs it if its reason has not been logged lately.
    pub fn refuse(&self, reason: Refusal, peer: &dyn std::fmt::Display, detail: &str) {
        self.refused[reason.index()].inc();
        if let Some(suppressed) = self.log_limit.allow(Reject::ALL.len() + reason.index()) {
            tracing::warn!(reason = reason.name(), peer = %peer, detail, suppressed, "connection refused");
        }
    }

    pub fn stored(&self, channel: Uplink, n: u64) {
        let i = Uplink::ALL.iter().position(|c| *c == channel).unwrap_or(0);
        self.stored[i].inc_by(n);
    }

    pub fn rejected_count(&self, reason: Reject) -> u64 {
        self.rejected[reason.index()].get()
    }

    pub fn refused_count(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].get()
    }

    pub fn counts(&self) -> IngestCounts {
        IngestCounts {
            connected_devices: self.connected.get(),
            connects: self.connects.get(),
            refused: Refusal::ALL
                .iter()
                .map(|r| (r.name(), self.refused[r.index()].get()))
                .collect(),
            stored: Uplink::ALL
                .iter()
                .zip(&self.stored)
                .map(|(c, n)| (c.name(), n.get()))
                .collect(),
            rejected: Reject::ALL
                .iter()
                .map(|r| (r.name(), self.rejected[r.index()].get()))
                .collect(),
            lost: self.lost.get(),
            duplicates: self.duplicates.get(),
            batches: self.batches.get(),
            queue_depth: self.queue_depth.get(),
        }
    }

    /// Records, at their commit, telemetry messages stamped `device_ms` by their devices.
    pub fn ingested(&self, committed_ms: u64, device_ms: &[u64]) {
        let Ok(mut h) = self.ingest_latency.lock() else {
            return;
        };
        for &t in device_ms {
            if t.abs_diff(committed_ms) <= CLOCK_SLACK_MS {
                // A device clock slightly ahead of ours counts as no delay.
                let us = committed_ms.saturating_sub(t).saturating_mul(1000).max(1);
                h.saturating_record(us);
                self.ingest_latency_seconds.observe(us as f64 / 1e6);
            }
        }
    }

    pub fn ingest_latency(&self) -> Latency {
        let Ok(h) = self.ingest_latency.lock() else {
            return Latency::default();
        };
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
        }
    }

    /// Renders every metric as OpenMetrics text, sampling the storage size and process memory.
    pub fn render(&self, storage_bytes: u64) -> String {
        self.storage_bytes
            .set(i64::try_from(storage_bytes).unwrap_or(i64::MAX));
        self.resident_bytes
            .set(resident_memory_bytes().map_or(0, |b| b as i64));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The same in the classic Prometheus text format (0.0.4), what Prometheus and `promtool
    /// check metrics` read by default.
    pub fn render_text(&self, storage_bytes: u64) -> String {
        openmetrics_to_text(&self.render(storage_bytes))
    }

    /// Sets a release's validation gauges from its summaries per class.
    pub fn set_validation(
        &self,
        kind: &str,
        name: &str,
        version: &str,
        classes: &std::collections::BTreeMap<String, crate::validation::ClassSummary>,
    ) {
        for (class, s) in classes {
            for (measure, v) in &s.worst {
                self.validation_value
                    .get_or_create(&ValidationLabels {
                        kind: kind.to_owned(),
                        name: name.to_owned(),
                        version: version.to_owned(),
                        class: class.clone(),
                        measure: measure.name().to_owned(),
                    })
                    .set(*v);
            }
            for (result, n) in [("pass", s.passed), ("fail", s.failed), ("error", s.errors)] {
                self.validation_devices
                    .get_or_create(&ValidationVerdictLabels {
                        kind: kind.to_owned(),
                        name: name.to_owned(),
                        version: version.to_owned(),
                        class: class.clone(),
                        result,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Sets the unresolved alerts per severity (counted from storage at each scrape).
    pub fn set_unresolved_alerts(&self, info: u64, warning: u64, critical: u64) {
        for (s, n) in [
            (Severity::Info, info),
            (Severity::Warning, warning),
            (Severity::Critical, critical),
        ] {
            self.alerts_unresolved
                .get_or_create(&SeverityLabel { severity: s.name() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Drops the drift series of model versions for which `runs(model, version)` is false:
    /// versions no device runs any more would otherwise keep their last verdict for ever.
    pub fn retain_drift(&self, runs: impl Fn(&str, &str) -> bool) {
        self.drift_value.retain(|l| runs(&l.model, &l.version));
        self.drift_status.retain(|l| runs(&l.model, &l.version));
        self.drift_window_samples
            .retain(|l| runs(&l.model, &l.version));
    }

    /// Counts one answered HTTP request (`route` is the matched pattern).
    pub fn http_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.http_requests
            .get_or_create(&HttpLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&HttpRouteLabels {
                method: method.to_owned(),
                route: route.to_owned(),
            })
            .observe(seconds);
    }

    /// The device's latest refusals, newest first, and how many it had since the start.
    pub fn refusals(&self, device: &str) -> (u64, Vec<RefusalEntry>) {
        let Ok(log) = self.refusals.lock() else {
            return (0, Vec::new());
        };
        log.by_device.get(device).map_or((0, Vec::new()), |d| {
            (d.total, d.recent.iter().rev().cloned().collect())
        })
    }
}

/// Rewrites OpenMetrics text as the classic Prometheus text format: a counter's HELP and TYPE
/// name its `_total` sample, an info metric is a gauge named `<name>_info`, and the UNIT and
/// EOF lines go (Prometheus 2.42's `promtool check metrics` reads only this format).
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // Families whose HELP/TYPE lines are renamed, by OpenMetrics name.
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            types.insert(name, kind);
        }
    }
    let renamed = |name: &str| -> (String, &'static str) {
        match types.get(name).copied() {
            Some("counter") => (format!("{name}_total"), "counter"),
            Some("info") => (format!("{name}_info"), "gauge"),
            Some("gauge") => (name.to_owned(), "gauge"),
            Some("histogram") => (name.to_owned(), "histogram"),
            Some("summary") => (name.to_owned(), "summary"),
            _ => (name.to_owned(), "untyped"),
        }
    };
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", renamed(name).0));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (name, kind) = renamed(name);
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.contains("_created") && !line.starts_with('#') {
            // OpenMetrics-only creation timestamps (none are registered today).
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Most refusals kept per device...
pub const REFUSALS_PER_DEVICE: usize = 10;
/// ...for at most this many devices (the ones refused longest ago are forgotten first)...
const REFUSAL_DEVICES: usize = 2048;
/// ...with at most this many characters of detail each.
const REFUSAL_DETAIL_CHARS: usize = 200;

/// One of a device's latest refusals: repeats of the same reason and detail in a row are
/// folded into one entry with a count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalEntry {
    pub first_ms: u64,
    pub last_ms: u64,
    pub count: u64,
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, Default)]
struct DeviceRefusals {
    total: u64,
    last_ms: u64,
    recent: VecDeque<RefusalEntry>,
}

#[derive(Debug, Default)]
struct RefusalLog {
    by_device: HashMap<String, DeviceRefusals>,
}

impl RefusalLog {
    fn record(&mut self, device: &str, reason: Reject, detail: &dyn std::fmt::Display, now: u64) {
        if device.is_empty() {
            return;
        }
        if !self.by_device.contains_key(device) && self.by_device.len() >= REFUSAL_DEVICES {
            let oldest = self
                .by_device
                .iter()
                .min_by_key(|(_, d)| d.last_ms)
                .map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                self.by_device.remove(&id);
            }
        }
        let d = self.by_device.entry(device.to_owned()).or_default();
        d.total += 1;
        d.last_ms = now;
        let mut text = detail.to_string();
        if text.chars().count() > REFUSAL_DETAIL_CHARS {
            text = text.chars().take(REFUSAL_DETAIL_CHARS).collect::<String>() + "...";
        }
        if let Some(last) = d.recent.back_mut()
            && last.reason == reason.name()
            && last.detail == text
        {
            last.count += 1;
            last.last_ms = now;
            return;
        }
        if d.recent.len() == REFUSALS_PER_DEVICE {
            d.recent.pop_front();
        }
        d.recent.push_back(RefusalEntry {
            first_ms: now,
            last_ms: now,
            count: 1,
            reason: reason.name(),
            detail: text,
        });
    }
}

/// Registers one metric and returns a handle to it.
fn metric<M: prometheus_client::registry::Metric + Clone + Default>(
    r: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let m = M::default();
    r.register(name, help, m.clone());
    m
}

/// Registers a counter family and returns one counter per label set, in order.
fn labelled<L, const N: usize>(
    r: &mut Registry,
    name: &str,
    help: &str,
    labels: [L; N],
) -> Vec<Counter>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Counter>::default();
    r.register(name, help, family.clone());
    labels
        .iter()
        .map(|l| family.get_or_create(l).clone())
        .collect()
}

/// Allows one log line per slot per interval and counts what it held back.
#[derive(Debug)]
struct LogLimit {
    interval_ms: u64,
    last_ms: Vec<AtomicU64>,
    suppressed: Vec<AtomicU64>,
}

impl LogLimit {
    fn new(interval: Duration) -> Self {
        let slots = Reject::ALL.len() + Refusal::ALL.len();
        LogLimit {
            interval_ms: interval.as_millis() as u64,
            last_ms: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            suppressed: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// `Some(held back since the last line)` when this slot may log now.
    fn allow(&self, slot: usize) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms[slot].load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval_ms;
        if due
            && self.last_ms[slot]
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed[slot].swap(0, Ordering::Relaxed))
        } else {
            self.suppressed[slot].fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// CPU time (user + system) this process has used, in seconds (Linux: /proc/self/stat).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux the gateway targets.
    Some(ticks as f64 / 100.0)
}

/// File descriptors this process holds open (Linux: /proc/self/fd).
pub fn open_fds() -> Option<u64> {
    // The directory's own descriptor, open while it is read, is counted too: take it off.
    Some(
        std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1) as u64,
    )
}

/// The soft limit of open file descriptors (Linux: "Max open files" of /proc/self/limits).
pub fn max_fds() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Resident set size of this process (Linux: `VmRSS` of /proc/self/status).
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests;
