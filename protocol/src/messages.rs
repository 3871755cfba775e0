//! Every message a device and the gateway exchange.
//!
//! The same types serve both encodings. For JSON, optional fields may be left out (they default)
//! and unknown fields are refused, so a typo in a hand-written payload is an error rather than a
//! silently missing value. For postcard every field is always present, in declaration order.
//! Never reorder fields or enum variants: that changes the postcard bytes (golden tests pin them).

use alloc::string::String;
use alloc::vec::Vec;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::limits::{self, Invalid, Validate};
use crate::sign::Signed;
use crate::update::UpdateError;

/// A firmware image or model a device has installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Installed {
    pub name: String,
    pub version: Version,
    /// Monotonic release counter of this artifact (anti-rollback); 0 when unknown.
    #[serde(default)]
    pub release: u64,
}

/// What a device is made of. Rollouts use it to pick compatible artifacts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    /// CPU architecture, e.g. `armv7em`, `xtensa`, `aarch64`.
    pub arch: String,
    /// Board or device class, e.g. `esp32s3-cam`, `rpi4`.
    pub class: String,
    pub ram_bytes: u64,
    pub flash_bytes: u64,
    /// Accelerator, e.g. `ethos-u55`, `coral-tpu`.
    #[serde(default)]
    pub accelerator: Option<String>,
    /// Inference runtime and its version, e.g. `tflm 2.14.0`.
    #[serde(default)]
    pub runtime: Option<Installed>,
}

/// Sent by a device after every connect: who it is and what it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub firmware: Installed,
    #[serde(default)]
    pub models: Vec<Installed>,
    pub hardware: HardwareProfile,
    /// Boot counter (or random per boot): telemetry sequence numbers restart with each boot.
    #[serde(default)]
    pub boot: u32,
    /// Current telemetry interval in milliseconds; 0 when the device does not report one.
    #[serde(default)]
    pub telemetry_interval_ms: u32,
}

/// Hardware health, each value optional: a device reports what it can measure.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HardwareMetrics {
    pub cpu_pct: Option<f32>,
    pub free_mem_bytes: Option<u64>,
    pub temp_c: Option<f32>,
    pub battery_mv: Option<u32>,
    pub power_mw: Option<f32>,
    pub inference_latency_us: Option<u32>,
}

/// Names one of the [`HardwareMetrics`] values, for alert rules and rollout health gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HwMetric {
    CpuPct,
    FreeMemBytes,
    TempC,
    BatteryMv,
    PowerMw,
    InferenceLatencyUs,
}

impl HwMetric {
    pub const ALL: [HwMetric; 6] = [
        HwMetric::CpuPct,
        HwMetric::FreeMemBytes,
        HwMetric::TempC,
        HwMetric::BatteryMv,
        HwMetric::PowerMw,
        HwMetric::InferenceLatencyUs,
    ];

    /// The field name in [`HardwareMetrics`], also used in configs and the API.
    pub const fn name(self) -> &'static str {
        match self {
            HwMetric::CpuPct => "cpu_pct",
            HwMetric::FreeMemBytes => "free_mem_bytes",
            HwMetric::TempC => "temp_c",
            HwMetric::BatteryMv => "battery_mv",
            HwMetric::PowerMw => "power_mw",
            HwMetric::InferenceLatencyUs => "inference_latency_us",
        }
    }

    pub fn from_name(name: &str) -> Option<HwMetric> {
        HwMetric::ALL.into_iter().find(|m| m.name() == name)
    }
}

impl HardwareMetrics {
    /// The value of one metric, if the device reported it.
    pub fn get(&self, metric: HwMetric) -> Option<f64> {
        match metric {
            HwMetric::CpuPct => self.cpu_pct.map(f64::from),
            HwMetric::FreeMemBytes => self.free_mem_bytes.map(|v| v as f64),
            HwMetric::TempC => self.temp_c.map(f64::from),
            HwMetric::BatteryMv => self.battery_mv.map(f64::from),
            HwMetric::PowerMw => self.power_mw.map(f64::from),
            HwMetric::InferenceLatencyUs => self.inference_latency_us.map(f64::from),
        }
    }
}

impl AlertKind {
    /// The snake_case name used in JSON, configs and the API; custom kinds are their own name.
    pub fn name(&self) -> &str {
        match self {
            AlertKind::Thermal => "thermal",
            AlertKind::BrownOut => "brown_out",
            AlertKind::OutOfMemory => "out_of_memory",
            AlertKind::WatchdogReset => "watchdog_reset",
            AlertKind::SensorFault => "sensor_fault",
            AlertKind::Custom(name) => name,
        }
    }

    /// Parses a kind name; a name that is not a built-in kind is a custom kind.
    pub fn from_name(name: &str) -> AlertKind {
        match name {
            "thermal" => AlertKind::Thermal,
            "brown_out" => AlertKind::BrownOut,
            "out_of_memory" => AlertKind::OutOfMemory,
            "watchdog_reset" => AlertKind::WatchdogReset,
            "sensor_fault" => AlertKind::SensorFault,
            other => AlertKind::Custom(String::from(other)),
        }
    }
}

impl Severity {
    pub const fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn from_name(name: &str) -> Option<Severity> {
        [Severity::Info, Severity::Warning, Severity::Critical]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

impl LogLevel {
    pub const fn name(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// What the model did since the previous telemetry message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMetrics {
    pub name: String,
    pub version: Version,
    /// Inferences run in this interval.
    #[serde(default)]
    pub inferences: u32,
    /// Count of each predicted class in this interval, indexed by class id.
    #[serde(default)]
    pub class_counts: Vec<u32>,
    #[serde(default)]
    pub mean_confidence: Option<f32>,
}

/// One raw model input (a row, one value per feature in the baseline's order), with what the
/// model predicted for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSample {
    pub values: Vec<f32>,
    #[serde(default)]
    pub prediction: Option<u16>,
    #[serde(default)]
    pub confidence: Option<f32>,
}

/// Counts of one feature's inputs on the baseline's bins (devices that received the bin edges
/// send these instead of raw samples).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureBins {
    pub feature: u16,
    pub counts: Vec<u32>,
}

/// Periodic report of a device: hardware health, model behaviour and drift inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// Boot this sequence belongs to (see [`Hello::boot`]).
    #[serde(default)]
    pub boot: u32,
    /// Per-device sequence number, +1 for each telemetry message within a boot. The gateway
    /// counts gaps as lost messages and repeats as duplicates.
    pub seq: u32,
    /// Device clock, Unix milliseconds; 0 when the device has no clock.
    #[serde(default)]
    pub time_ms: u64,
    #[serde(default)]
    pub hw: HardwareMetrics,
    #[serde(default)]
    pub model: Option<ModelMetrics>,
    #[serde(default)]
    pub samples: Vec<InputSample>,
    #[serde(default)]
    pub bins: Vec<FeatureBins>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    Thermal,
    BrownOut,
    OutOfMemory,
    WatchdogReset,
    SensorFault,
    Custom(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// A hardware or application problem the device noticed itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    pub kind: AlertKind,
    pub severity: Severity,
    /// The measured value that triggered the alert (temperature, millivolts, ...).
    #[serde(default)]
    pub value: Option<f32>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub time_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    pub level: LogLevel,
    pub text: String,
    #[serde(default)]
    pub time_ms: u64,
}

/// What the gateway asks a device to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Answer with an ack; proves the command path works end to end.
    Ping,
    Reboot,
    SetTelemetryInterval {
        interval_ms: u32,
    },
    /// Offers an update. Answered with [`UpdateReport`]s on the `report` channel, not with a
    /// command ack.
    Update(UpdateOffer),
    /// The bin edges of a model version's baseline, so the device can send counts per bin
    /// ([`FeatureBins`]) instead of raw samples. Sent after a hello and whenever the baseline
    /// changes; not acknowledged.
    DriftBins(DriftBins),
    /// A signed [`RollbackDirective`](crate::RollbackDirective): go back to the image in the
    /// other slot. Answered with a [`CommandAck`]: `done` (then the device reboots into that
    /// image and says hello again), or `rejected` with the reason
    /// `"<RollbackError name>: <detail>"`.
    Rollback(Signed),
    /// Validate a release on a bench device (see [`crate::validation`]): like an update offer,
    /// answered with [`UpdateReport`]s, but the device runs the golden set from its spare slot
    /// and reports [`UpdateState::Validated`] instead of activating it.
    Validate(ValidateOffer),
}

/// Interior bin edges per feature (bin i holds x with `edges[i-1] <= x < edges[i]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftBins {
    pub model: String,
    pub version: Version,
    pub edges: Vec<Vec<f32>>,
}

/// A signed manifest offered to a device, and the transfer that will carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateOffer {
    pub transfer: u64,
    pub manifest: Signed,
}

/// A release to validate on a bench device: its signed manifest (checked as an update offer
/// is), the transfer that carries the artifact, and the golden set to run `repeat` times (a
/// device without a golden set runs `repeat` inferences on synthetic input and measures no
/// accuracy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateOffer {
    pub transfer: u64,
    pub manifest: Signed,
    pub golden: crate::validation::GoldenSet,
    pub repeat: u32,
}

/// One piece of an artifact, with its Merkle proof (see [`crate::merkle`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub transfer: u64,
    pub index: u32,
    #[serde(with = "crate::bytes::vec")]
    pub data: Vec<u8>,
    #[serde(with = "crate::bytes::hashes")]
    pub proof: Vec<[u8; 32]>,
}

/// Where a device is with a transfer. The gateway sends chunks from `next_chunk` on, a window
/// at a time, so a device that reconnects or reboots resumes where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// The offer checked out; send chunks from `next_chunk` (0, or where a download stopped).
    Accepted {
        next_chunk: u32,
    },
    /// Every chunk before `next_chunk` is verified and stored.
    Downloading {
        next_chunk: u32,
    },
    Verifying,
    Installing,
    /// Running the new version (after its reboot).
    Installed {
        version: Version,
        release: u64,
    },
    /// Refused before downloading (signature, expiry, downgrade, hardware, size, declined).
    Rejected {
        reason: UpdateError,
        detail: String,
    },
    /// Gave up during download, verification or installation.
    Failed {
        reason: UpdateError,
        detail: String,
    },
    /// A validation ran: the artifact is verified and in the spare slot, not active, and this
    /// is what the golden set measured.
    Validated(crate::validation::ValidationResult),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateReport {
    pub transfer: u64,
    pub state: UpdateState,
}

/// A command for one device. `id` is unique per gateway and comes back in the [`CommandAck`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub id: u64,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    Done,
    Rejected { reason: String },
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandAck {
    pub id: u64,
    pub status: AckStatus,
}

impl Validate for Installed {
    fn validate(&self) -> Result<(), Invalid> {
        limits::name("name", &self.name)?;
        limits::version("version", &self.version)
    }
}

impl Validate for HardwareProfile {
    fn validate(&self) -> Result<(), Invalid> {
        limits::name("hardware.arch", &self.arch)?;
        limits::name("hardware.class", &self.class)?;
        if let Some(acc) = &self.accelerator {
            limits::name("hardware.accelerator", acc)?;
        }
        if let Some(rt) = &self.runtime {
            rt.validate()?;
        }
        if self.ram_bytes > limits::hw::MAX_MEMORY_BYTES {
            return Err(Invalid::new("hardware.ram_bytes", "must be at most 1 TiB"));
        }
        if self.flash_bytes > limits::hw::MAX_MEMORY_BYTES {
            return Err(Invalid::new(
                "hardware.flash_bytes",
                "must be at most 1 TiB",
            ));
        }
        Ok(())
    }
}

impl Validate for Hello {
    fn validate(&self) -> Result<(), Invalid> {
        self.firmware.validate()?;
        limits::count("models", self.models.len(), limits::MAX_MODELS)?;
        self.models.iter().try_for_each(Validate::validate)?;
        self.hardware.validate()
    }
}

impl Validate for HardwareMetrics {
    fn validate(&self) -> Result<(), Invalid> {
        use limits::hw;
        limits::opt_range(
            "hw.cpu_pct",
            self.cpu_pct,
            hw::CPU_PCT,
            "must be within 0..=100",
        )?;
        if self
            .free_mem_bytes
            .is_some_and(|v| v > hw::MAX_FREE_MEM_BYTES)
        {
            return Err(Invalid::new("hw.free_mem_bytes", "must be at most 1 TiB"));
        }
        limits::opt_range(
            "hw.temp_c",
            self.temp_c,
            hw::TEMP_C,
            "must be within -100..=200",
        )?;
        if self.battery_mv.is_some_and(|v| v > hw::MAX_BATTERY_MV) {
            return Err(Invalid::new("hw.battery_mv", "must be at most 100000"));
        }
        limits::opt_range(
            "hw.power_mw",
            self.power_mw,
            hw::POWER_MW,
            "must be within 0..=1000000",
        )?;
        let (lo, hi) = hw::LATENCY_US;
        if self
            .inference_latency_us
            .is_some_and(|v| !(lo..=hi).contains(&v))
        {
            return Err(Invalid::new(
                "hw.inference_latency_us",
                "must be within 1..=600000000 (leave it out when not measured)",
            ));
        }
        Ok(())
    }
}

impl Validate for Telemetry {
    fn validate(&self) -> Result<(), Invalid> {
        self.hw.validate()?;
        if let Some(m) = &self.model {
            limits::name("model.name", &m.name)?;
            limits::version("model.version", &m.version)?;
            limits::counts("model.class_counts", &m.class_counts, limits::MAX_CLASSES)?;
            let total: u64 = m.class_counts.iter().map(|&c| u64::from(c)).sum();
            if m.inferences > 0 && total > u64::from(m.inferences) {
                return Err(Invalid::new(
                    "model.class_counts",
                    "add up to more than model.inferences",
                ));
            }
            limits::opt_range(
                "model.mean_confidence",
                m.mean_confidence,
                (0.0, 1.0),
                "must be within 0..=1",
            )?;
        }
        limits::count("samples", self.samples.len(), limits::MAX_SAMPLES)?;
        for s in &self.samples {
            limits::count("samples.values", s.values.len(), limits::MAX_FEATURES)?;
            if s.values.iter().any(|v| !v.is_finite()) {
                return Err(Invalid::new("samples.values", "must be finite numbers"));
            }
            if s.values.iter().any(|v| v.abs() > limits::MAX_VALUE) {
                return Err(Invalid::new(
                    "samples.values",
                    "must be within -1e12..=1e12",
                ));
            }
            if s.prediction
                .is_some_and(|p| usize::from(p) >= limits::MAX_CLASSES)
            {
                return Err(Invalid::new(
                    "samples.prediction",
                    "must be a class id 0..=255",
                ));
            }
            limits::opt_range(
                "samples.confidence",
                s.confidence,
                (0.0, 1.0),
                "must be within 0..=1",
            )?;
        }
        limits::count("bins", self.bins.len(), limits::MAX_FEATURES)?;
        // One bit per feature: a feature's counts may appear once per message.
        let mut seen: u64 = 0;
        for b in &self.bins {
            if usize::from(b.feature) >= limits::MAX_FEATURES {
                return Err(Invalid::new("bins.feature", "must be below 64"));
            }
            let bit = 1u64 << b.feature;
            if seen & bit != 0 {
                return Err(Invalid::new("bins.feature", "appears twice"));
            }
            seen |= bit;
            limits::counts("bins.counts", &b.counts, limits::MAX_BINS)?;
        }
        Ok(())
    }
}

impl Validate for Alert {
    fn validate(&self) -> Result<(), Invalid> {
        if let AlertKind::Custom(name) = &self.kind {
            limits::name("kind.custom", name)?;
        }
        limits::opt_range(
            "value",
            self.value,
            (-limits::MAX_VALUE, limits::MAX_VALUE),
            "must be within -1e12..=1e12",
        )?;
        limits::text("message", &self.message, limits::MAX_MESSAGE_LEN)
    }
}

impl Validate for LogLine {
    fn validate(&self) -> Result<(), Invalid> {
        limits::text("text", &self.text, limits::MAX_LOG_LEN)
    }
}

impl Validate for Command {
    fn validate(&self) -> Result<(), Invalid> {
        match &self.action {
            Action::Update(offer) => limits::count(
                "action.update.manifest.signatures",
                offer.manifest.signatures.len(),
                crate::sign::MAX_SIGNATURES,
            ),
            Action::DriftBins(bins) => {
                limits::name("action.drift_bins.model", &bins.model)?;
                limits::version("action.drift_bins.version", &bins.version)?;
                limits::count(
                    "action.drift_bins.edges",
                    bins.edges.len(),
                    limits::MAX_FEATURES,
                )?;
                for e in &bins.edges {
                    limits::count("action.drift_bins.edges", e.len(), limits::MAX_BINS)?;
                    // A NaN or infinite edge bins nothing, and JSON cannot carry it.
                    if e.iter().any(|v| !v.is_finite()) {
                        return Err(Invalid::new(
                            "action.drift_bins.edges",
                            "must be finite numbers",
                        ));
                    }
                }
                Ok(())
            }
            Action::Rollback(directive) => {
                limits::count(
                    "action.rollback.signatures",
                    directive.signatures.len(),
                    crate::sign::MAX_SIGNATURES,
                )?;
                if directive.body.len() > limits::MAX_ROLLBACK_LEN {
                    return Err(Invalid::new("action.rollback.body", "is too long"));
                }
                Ok(())
            }
            Action::Validate(v) => {
                limits::count(
                    "action.validate.manifest.signatures",
                    v.manifest.signatures.len(),
                    crate::sign::MAX_SIGNATURES,
                )?;
                if v.repeat == 0 || v.repeat > crate::validation::MAX_REPEAT {
                    return Err(Invalid::new(
                        "action.validate.repeat",
                        "must be within 1..=1000",
                    ));
                }
                v.golden.validate()
            }
            Action::Ping | Action::Reboot | Action::SetTelemetryInterval { .. } => Ok(()),
        }
    }
}

impl Validate for Chunk {
    fn validate(&self) -> Result<(), Invalid> {
        limits::count("data", self.data.len(), crate::manifest::MAX_CHUNK as usize)?;
        limits::count("proof", self.proof.len(), 40)
    }
}

impl Validate for UpdateReport {
    fn validate(&self) -> Result<(), Invalid> {
        match &self.state {
            UpdateState::Rejected { detail, .. } | UpdateState::Failed { detail, .. } => {
                limits::text("state.detail", detail, limits::MAX_MESSAGE_LEN)
            }
            UpdateState::Installed { version, .. } => {
                limits::version("state.installed.version", version)
            }
            UpdateState::Validated(result) => result.validate(),
            _ => Ok(()),
        }
    }
}

impl Validate for CommandAck {
    fn validate(&self) -> Result<(), Invalid> {
        match &self.status {
            AckStatus::Rejected { reason } => {
                limits::text("status.rejected.reason", reason, limits::MAX_MESSAGE_LEN)
            }
            AckStatus::Done | AckStatus::Unsupported => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
