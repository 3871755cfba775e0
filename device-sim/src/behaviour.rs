//! What a simulated device says and how it answers commands. No I/O: the fleet runner moves
//! these messages over MQTT.

use fleetgate_protocol::{
    AckStatus, Action, Alert, AlertKind, ArtifactKind, Command, CommandAck, FeatureBins,
    HardwareMetrics, HardwareProfile, Hello, InputSample, Installed, ModelMetrics, Severity,
    Telemetry,
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
        }
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
    /// What runs now (slot A/B: the active slot), and what the other slot still holds.
    pub firmware: Installed,
    pub models: Vec<Installed>,
    pub previous: Vec<(ArtifactKind, Installed)>,
    /// The real hardware (used to check offers), and the class the device claims in its hello
    /// (differs only under the `claim_class` fault).
    pub hardware: HardwareProfile,
    pub claimed_class: Option<String>,
    /// Bin edges of the running model's baseline, from the gateway's `drift_bins`.
    pub edges: Option<Vec<Vec<f32>>>,
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
            previous: Vec::new(),
            hardware: default_hardware(),
            claimed_class: None,
            edges: None,
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

    /// Activates a new image; the one it replaces stays in the other slot.
    pub fn install(&mut self, kind: ArtifactKind, new: Installed) {
        let slot = match kind {
            ArtifactKind::Firmware => Some(&mut self.firmware),
            ArtifactKind::Model => self.models.iter_mut().find(|m| m.name == new.name),
        };
        match slot {
            Some(current) => {
                let old = std::mem::replace(current, new);
                self.previous
                    .retain(|(k, p)| !(*k == kind && p.name == old.name));
                self.previous.push((kind, old));
            }
            None => self.models.push(new),
        }
    }

    /// The next telemetry message, with noisy but plausible values.
    pub fn telemetry<R: Rng>(&mut self, rng: &mut R, time_ms: u64) -> Telemetry {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.battery_mv = (self.battery_mv - rng.random_range(0.0..0.05)).max(3000.0);
        let normal = |mean: f32, std: f32, rng: &mut R| {
            Normal::new(mean, std).map_or(mean, |n| n.sample(rng))
        };
        let hw = HardwareMetrics {
            cpu_pct: Some(normal(35.0, 8.0, rng).clamp(0.0, 100.0)),
            free_mem_bytes: Some(normal(160_000.0, 8_000.0, rng).max(0.0) as u64),
            temp_c: Some(normal(42.0, 1.5, rng)),
            battery_mv: Some(self.battery_mv as u32),
            power_mw: Some(normal(180.0, 15.0, rng).max(0.0)),
            inference_latency_us: Some(normal(12_000.0, 1_200.0, rng).max(100.0) as u32),
        };
        let mut class_counts = vec![0u32; 3];
        let inferences = 20;
        for _ in 0..inferences {
            let p: f32 = rng.random();
            class_counts[if p < 0.7 {
                0
            } else if p < 0.9 {
                1
            } else {
                2
            }] += 1;
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
                prediction: Some(rng.random_range(0..3)),
                confidence: Some(normal(0.9, 0.04, rng).clamp(0.0, 1.0)),
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
            model: Some(ModelMetrics {
                name: "sim-model".into(),
                version: semver::Version::new(1, 0, 0),
                inferences,
                class_counts,
                mean_confidence: Some(normal(0.9, 0.02, rng).clamp(0.0, 1.0)),
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
            // Offers are answered by the update client with reports, never here.
            Action::Update(_) | Action::DriftBins(_) => return (None, Effect::None),
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
