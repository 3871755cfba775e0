//! What a simulated device says and how it answers commands. No I/O: the fleet runner moves
//! these messages over MQTT.

use std::collections::BTreeMap;

use fleetgate_protocol::{
    AckStatus, Action, Alert, AlertKind, ArtifactKind, Command, CommandAck, FeatureBins,
    HardwareMetrics, HardwareProfile, Hello, InputSample, Installed, ModelMetrics, Severity,
    SlotState, Telemetry, limits,
};
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// The shape of the data a device sees, so a test can shift it.
#[derive(Debug, Clone)]
pub struct DataShape {
    /// Raw input samples per telemetry message (0: none).
    pub samples: usize,
    /// Features per sample.
    pub features: usize,
    /// Mean and standard deviation of every feature.
    pub feature_mean: f32,
    pub feature_std: f32,
    /// Added to the mean of feature i (drift injection); missing entries are 0.
    pub shift: Vec<f32>,
    /// Send counts per baseline bin instead of raw samples, once the gateway sent the edges.
    pub bins: bool,
    /// Relative frequency of each predicted class (weights, normalised by their sum); empty:
    /// the model reports no classes.
    pub classes: Vec<f32>,
    /// Mean confidence of the model's predictions.
    pub mean_confidence: f32,
}

impl Default for DataShape {
    fn default() -> Self {
        DataShape {
            samples: 0,
            features: 4,
            feature_mean: 0.0,
            feature_std: 1.0,
            shift: Vec::new(),
            bins: false,
            classes: vec![0.7, 0.2, 0.1],
            mean_confidence: 0.9,
        }
    }
}

/// `rows` reference rows of what a device with the default [`DataShape`] sends: 4 standard
/// normal features (`f0`..`f3`), predicted classes 0, 1 and 2 at 70/20/10 %, confidence 0.9.
/// Deterministic (a fixed xorshift seed, Box-Muller), for baselines the simulator's fleet
/// should match.
pub fn reference_csv(rows: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = String::from("f0,f1,f2,f3,prediction,confidence\n");
    for i in 0..rows {
        let row: Vec<String> = (0..4)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
                format!("{z:.6}")
            })
            .collect();
        let class = [0, 0, 0, 0, 0, 0, 0, 1, 1, 2][i % 10];
        out.push_str(&format!("{},{class},0.9\n", row.join(",")));
    }
    out
}

/// Parses class weights separated by `sep` (e.g. `0.7,0.2,0.1`): at most
/// [`limits::MAX_CLASSES`], each finite and not negative, with a positive sum.
pub fn parse_classes(text: &str, sep: char) -> Result<Vec<f32>, String> {
    let classes = text
        .split(sep)
        .map(|w| {
            let v: f32 = w
                .trim()
                .parse()
                .map_err(|_| format!("class weight {w:?} is not a number"))?;
            if !v.is_finite() || v < 0.0 {
                return Err(format!("class weight {w:?} must be a finite number >= 0"));
            }
            Ok(v)
        })
        .collect::<Result<Vec<f32>, String>>()?;
    if classes.len() > limits::MAX_CLASSES {
        return Err(format!("at most {} classes", limits::MAX_CLASSES));
    }
    if classes.iter().sum::<f32>() <= 0.0 {
        return Err("class weights must not all be 0".into());
    }
    Ok(classes)
}

/// How a device behaves worse while it runs one model version: what a bad release looks like
/// to a rollout's health gates. Neutral values (factors 1, deltas 0, `alert_every` 0, no
/// classes) change nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Regression {
    /// The model name and version that regress.
    pub model: String,
    pub version: semver::Version,
    /// Multiplies the inference latency.
    pub latency_factor: f32,
    /// A hardware alert every this many telemetry messages sent on that version, on top of the
    /// fleet's `alert_every` (0: none).
    pub alert_every: u64,
    /// Class weights replacing the fleet's ([`DataShape::classes`]).
    pub classes: Option<Vec<f32>>,
    /// Added to the mean confidence.
    pub confidence_delta: f32,
    /// Added to the temperature.
    pub temp_delta_c: f32,
    /// Multiplies the free memory.
    pub free_mem_factor: f32,
    /// Multiplies the power draw.
    pub power_factor: f32,
}

impl Regression {
    /// A regression of `model` `version` that changes nothing yet.
    pub fn new(model: &str, version: semver::Version) -> Regression {
        Regression {
            model: model.to_owned(),
            version,
            latency_factor: 1.0,
            alert_every: 0,
            classes: None,
            confidence_delta: 0.0,
            temp_delta_c: 0.0,
            free_mem_factor: 1.0,
            power_factor: 1.0,
        }
    }

    /// Whether a device running `models` shows this regression.
    pub fn applies(&self, models: &[Installed]) -> bool {
        models
            .iter()
            .any(|m| m.name == self.model && m.version == self.version)
    }
}

/// `MODEL@VERSION:key=value,...` with keys `latency` (factor), `alerts` (every N messages),
/// `confidence` (delta), `temp` (delta, C), `free_mem` (factor), `power` (factor) and
/// `classes` (weights as `a/b/c`), e.g. `sim-model@2.0.0:latency=3,alerts=5`.
impl std::str::FromStr for Regression {
    type Err = String;

    fn from_str(s: &str) -> Result<Regression, String> {
        const FORM: &str = "expected MODEL@VERSION:key=value,... (keys: latency, alerts, \
                            confidence, temp, free_mem, power, classes)";
        let (target, effects) = s.split_once(':').ok_or(FORM)?;
        let (model, version) = target.split_once('@').ok_or(FORM)?;
        if model.is_empty() || model.len() > limits::MAX_NAME_LEN {
            return Err(format!(
                "model name {model:?} must be 1 to {} bytes",
                limits::MAX_NAME_LEN
            ));
        }
        let version =
            semver::Version::parse(version).map_err(|e| format!("version {version:?}: {e}"))?;
        let mut r = Regression::new(model, version);
        let mut seen: Vec<&str> = Vec::new();
        for effect in effects.split(',') {
            let (key, value) = effect
                .split_once('=')
                .ok_or_else(|| format!("{effect:?}: expected key=value"))?;
            if seen.contains(&key) {
                return Err(format!("{key} is given twice"));
            }
            seen.push(key);
            let number = |min: f32, max: f32| -> Result<f32, String> {
                value
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite() && (min..=max).contains(v))
                    .ok_or_else(|| format!("{key}={value}: expected a number within {min}..={max}"))
            };
            match key {
                "latency" => r.latency_factor = number(0.0, 1000.0)?,
                "alerts" => {
                    r.alert_every = value
                        .parse()
                        .map_err(|_| format!("alerts={value}: expected a whole number"))?
                }
                "confidence" => r.confidence_delta = number(-1.0, 1.0)?,
                "temp" => r.temp_delta_c = number(-100.0, 100.0)?,
                "free_mem" => r.free_mem_factor = number(0.0, 1000.0)?,
                "power" => r.power_factor = number(0.0, 1000.0)?,
                "classes" => {
                    r.classes =
                        Some(parse_classes(value, '/').map_err(|e| format!("classes: {e}"))?)
                }
                other => return Err(format!("unknown key {other:?}; {FORM}")),
            }
        }
        Ok(r)
    }
}

/// One device's evolving state.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub id: String,
    pub boot: u32,
    pub seq: u32,
    pub interval_ms: u32,
    pub shape: DataShape,
    battery_mv: f32,
    /// What runs now (slot A/B: the active slot).
    pub firmware: Installed,
    pub models: Vec<Installed>,
    /// The transfer that installed each running image, by kind and name; factory images have
    /// none.
    pub installed_by: BTreeMap<(ArtifactKind, String), u64>,
    /// What the other slot of an artifact still holds, and the transfer that had installed it.
    pub previous: Vec<(ArtifactKind, Installed, Option<u64>)>,
    /// The real hardware (used to check offers), and the class the device claims in its hello
    /// (differs only under the `claim_class` fault).
    pub hardware: HardwareProfile,
    pub claimed_class: Option<String>,
    /// Bin edges of the running model's baseline, from the gateway's `drift_bins`.
    pub edges: Option<Vec<Vec<f32>>>,
    /// How the device behaves worse on one model version.
    pub regression: Option<Regression>,
    /// Telemetry messages sent while the regression applied.
    regressed: u64,
    /// The regression asks for an alert with the latest telemetry message.
    regression_alert: bool,
}

/// The simulated hardware: an MCU class with a TFLite Micro runtime.
pub fn default_hardware() -> HardwareProfile {
    HardwareProfile {
        arch: "armv7em".into(),
        class: "sim-mcu".into(),
        ram_bytes: 512 * 1024,
        flash_bytes: 2 * 1024 * 1024,
        accelerator: None,
        runtime: Some(Installed {
            name: "tflm".into(),
            version: semver::Version::new(2, 14, 0),
            release: 0,
        }),
    }
}

/// What the runner must do after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Change the telemetry interval.
    Interval(u32),
    /// Disconnect, start a new boot, reconnect.
    Reboot,
}

impl Behaviour {
    pub fn new(id: String, boot: u32, interval_ms: u32, shape: DataShape) -> Behaviour {
        Behaviour {
            id,
            boot,
            seq: 0,
            interval_ms,
            shape,
            battery_mv: 3950.0,
            firmware: Installed {
                name: "sim-fw".into(),
                version: semver::Version::new(1, 0, 0),
                release: 1,
            },
            models: vec![Installed {
                name: "sim-model".into(),
                version: semver::Version::new(1, 0, 0),
                release: 1,
            }],
            installed_by: BTreeMap::new(),
            previous: Vec::new(),
            hardware: default_hardware(),
            claimed_class: None,
            edges: None,
            regression: None,
            regressed: 0,
            regression_alert: false,
        }
    }

    pub fn hello(&self) -> Hello {
        let mut hardware = self.hardware.clone();
        if let Some(class) = &self.claimed_class {
            hardware.class = class.clone();
        }
        Hello {
            firmware: self.firmware.clone(),
            models: self.models.clone(),
            hardware,
            boot: self.boot,
            telemetry_interval_ms: self.interval_ms,
        }
    }

    /// The installed release of an artifact (0 when none is installed).
    pub fn installed_release(&self, kind: ArtifactKind, name: &str) -> u64 {
        match kind {
            ArtifactKind::Firmware => (self.firmware.name == name).then_some(self.firmware.release),
            ArtifactKind::Model => self
                .models
                .iter()
                .find(|m| m.name == name)
                .map(|m| m.release),
        }
        .unwrap_or(0)
    }

    /// The running image that `transfer` installed, if it still runs.
    pub fn installed_by_transfer(&self, transfer: u64) -> Option<&Installed> {
        let ((kind, name), _) = self.installed_by.iter().find(|(_, t)| **t == transfer)?;
        match kind {
            ArtifactKind::Firmware => Some(&self.firmware),
            ArtifactKind::Model => self.models.iter().find(|m| &m.name == name),
        }
    }

    /// Activates a new image installed by `transfer`; the one it replaces stays in the other
    /// slot, with the transfer that had installed it.
    pub fn install(&mut self, kind: ArtifactKind, new: Installed, transfer: u64) {
        let slot = match kind {
            ArtifactKind::Firmware => Some(&mut self.firmware),
            ArtifactKind::Model => self.models.iter_mut().find(|m| m.name == new.name),
        };
        let key = (kind, new.name.clone());
        match slot {
            Some(current) => {
                let old = std::mem::replace(current, new);
                let old_by = self.installed_by.remove(&(kind, old.name.clone()));
                self.previous
                    .retain(|(k, p, _)| !(*k == kind && p.name == old.name));
                self.previous.push((kind, old, old_by));
            }
            None => self.models.push(new),
        }
        self.installed_by.insert(key, transfer);
        if kind == ArtifactKind::Model {
            // Bin edges belong to a model version: the new one waits for its own.
            self.edges = None;
        }
    }

    /// What the device holds for one artifact, for checking a rollback directive.
    pub fn slot(&self, kind: ArtifactKind, name: &str) -> Option<SlotState<'_>> {
        let running = match kind {
            ArtifactKind::Firmware => Some(&self.firmware).filter(|f| f.name == name),
            ArtifactKind::Model => self.models.iter().find(|m| m.name == name),
        }?;
        Some(SlotState {
            running,
            installed_by: self.installed_by.get(&(kind, name.to_owned())).copied(),
            previous: self
                .previous
                .iter()
                .find(|(k, p, _)| *k == kind && p.name == name)
                .map(|(_, p, _)| p),
        })
    }

    /// Activates the other slot of an artifact (after a rollback directive checked out): the
    /// image it leaves goes to the other slot, and each image keeps the transfer that installed
    /// it, so the restored one has its own again (none for a factory image). Returns whether
    /// there was another slot to go back to.
    pub fn revert(&mut self, kind: ArtifactKind, name: &str) -> bool {
        let Some(i) = self
            .previous
            .iter()
            .position(|(k, p, _)| *k == kind && p.name == name)
        else {
            return false;
        };
        let running = match kind {
            ArtifactKind::Firmware => Some(&mut self.firmware).filter(|f| f.name == name),
            ArtifactKind::Model => self.models.iter_mut().find(|m| m.name == name),
        };
        let Some(running) = running else {
            return false;
        };
        let (_, restored, restored_by) = self.previous.swap_remove(i);
        let left = std::mem::replace(running, restored);
        let left_by = self.installed_by.remove(&(kind, name.to_owned()));
        self.previous.push((kind, left, left_by));
        if let Some(by) = restored_by {
            self.installed_by.insert((kind, name.to_owned()), by);
        }
        if kind == ArtifactKind::Model {
            self.edges = None;
        }
        true
    }

    /// Whether the regression asked for an alert with the latest telemetry message (once).
    pub fn take_regression_alert(&mut self) -> bool {
        std::mem::take(&mut self.regression_alert)
    }

    /// The next telemetry message, with noisy but plausible values (worse ones while a
    /// regression applies).
    pub fn telemetry<R: Rng>(&mut self, rng: &mut R, time_ms: u64) -> Telemetry {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.battery_mv = (self.battery_mv - rng.random_range(0.0..0.05)).max(3000.0);
        let neutral = Regression::new("", semver::Version::new(0, 0, 0));
        let regression = self.regression.as_ref().filter(|r| r.applies(&self.models));
        if let Some(r) = regression {
            self.regressed += 1;
            self.regression_alert =
                r.alert_every > 0 && self.regressed.is_multiple_of(r.alert_every);
        }
        let r = regression.unwrap_or(&neutral);
        let normal = |mean: f32, std: f32, rng: &mut R| {
            Normal::new(mean, std).map_or(mean, |n| n.sample(rng))
        };
        let hw = HardwareMetrics {
            cpu_pct: Some(normal(35.0, 8.0, rng).clamp(0.0, 100.0)),
            free_mem_bytes: Some(
                (normal(160_000.0, 8_000.0, rng).max(0.0) * r.free_mem_factor) as u64,
            ),
            temp_c: Some(normal(42.0, 1.5, rng) + r.temp_delta_c),
            battery_mv: Some(self.battery_mv as u32),
            power_mw: Some(normal(180.0, 15.0, rng).max(0.0) * r.power_factor),
            inference_latency_us: Some(
                (normal(12_000.0, 1_200.0, rng).max(100.0) * r.latency_factor) as u32,
            ),
        };
        let classes = r.classes.as_deref().unwrap_or(&self.shape.classes);
        let total: f32 = classes.iter().sum();
        // One uniform draw per prediction, walked along the cumulative weights.
        let class = |rng: &mut R| -> Option<usize> {
            let p = rng.random::<f32>() * total;
            let mut upto = 0.0;
            for (i, w) in classes.iter().enumerate() {
                upto += w;
                if p < upto {
                    return Some(i);
                }
            }
            classes.len().checked_sub(1)
        };
        let confidence = (self.shape.mean_confidence + r.confidence_delta).clamp(0.0, 1.0);
        let mut class_counts = vec![0u32; classes.len()];
        let inferences = 20;
        for _ in 0..inferences {
            if let Some(c) = class(rng) {
                class_counts[c] += 1;
            }
        }
        let shift = |f: usize| self.shape.shift.get(f).copied().unwrap_or(0.0);
        let mut samples: Vec<InputSample> = (0..self.shape.samples)
            .map(|_| InputSample {
                values: (0..self.shape.features)
                    .map(|f| {
                        normal(
                            self.shape.feature_mean + shift(f),
                            self.shape.feature_std,
                            rng,
                        )
                    })
                    .collect(),
                prediction: class(rng).map(|c| c as u16),
                confidence: Some(normal(confidence, 0.04, rng).clamp(0.0, 1.0)),
            })
            .collect();
        let mut bins = Vec::new();
        if let Some(edges) = self.edges.as_ref().filter(|_| self.shape.bins) {
            // Summarise on the device: one count per bin of each feature, no raw samples.
            for (f, e) in edges.iter().enumerate() {
                let mut counts = vec![0u32; e.len() + 1];
                for s in &samples {
                    if let Some(v) = s.values.get(f) {
                        counts[e.partition_point(|edge| edge <= v)] += 1;
                    }
                }
                bins.push(FeatureBins {
                    feature: f as u16,
                    counts,
                });
            }
            samples.clear();
        }
        Telemetry {
            boot: self.boot,
            seq,
            time_ms,
            hw,
            // The model that runs now (the simulated device runs its first one).
            model: self.models.first().map(|m| ModelMetrics {
                name: m.name.clone(),
                version: m.version.clone(),
                inferences,
                class_counts,
                mean_confidence: Some(normal(confidence, 0.02, rng).clamp(0.0, 1.0)),
            }),
            samples,
            bins,
        }
    }

    /// A hardware alert, as a device notices one.
    pub fn alert<R: Rng>(&self, rng: &mut R, time_ms: u64) -> Alert {
        let kinds = [
            (AlertKind::Thermal, Severity::Warning, 78.0),
            (AlertKind::BrownOut, Severity::Warning, 3310.0),
            (AlertKind::WatchdogReset, Severity::Critical, 1.0),
        ];
        let (kind, severity, value) = kinds[rng.random_range(0..kinds.len())].clone();
        Alert {
            message: format!("simulated {}", kind.name()),
            kind,
            severity,
            value: Some(value),
            time_ms,
        }
    }

    /// Answers a command (`None`: this command is not acknowledged) and says what the runner
    /// must do.
    pub fn command(&mut self, cmd: &Command) -> (Option<CommandAck>, Effect) {
        if let Action::DriftBins(bins) = &cmd.action {
            let runs = self
                .models
                .iter()
                .any(|m| m.name == bins.model && m.version == bins.version);
            if runs {
                self.edges = Some(bins.edges.clone());
            }
            return (None, Effect::None);
        }
        let (status, effect) = match cmd.action {
            Action::Ping => (AckStatus::Done, Effect::None),
            Action::Reboot => (AckStatus::Done, Effect::Reboot),
            Action::SetTelemetryInterval { interval_ms } if interval_ms >= 100 => {
                self.interval_ms = interval_ms;
                (AckStatus::Done, Effect::Interval(interval_ms))
            }
            Action::SetTelemetryInterval { .. } => (
                AckStatus::Rejected {
                    reason: "interval below 100 ms".into(),
                },
                Effect::None,
            ),
            // Offers are answered by the update client with reports, and rollback directives by
            // the update client with acks (it holds the trust), never here.
            Action::Update(_)
            | Action::Rollback(_)
            | Action::DriftBins(_)
            | Action::Validate(_) => {
                return (None, Effect::None);
            }
        };
        (Some(CommandAck { id: cmd.id, status }), effect)
    }

    /// A reboot starts a new sequence.
    pub fn reboot(&mut self) {
        self.boot = self.boot.wrapping_add(1);
        self.seq = 0;
    }
}

#[cfg(test)]
mod tests;
