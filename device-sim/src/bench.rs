//! Bench mode: what a simulated bench device measures when it validates a release. Each model
//! version has its figures (inference latency, its spread, peak RAM, power draw, accuracy on
//! the golden set); unlisted versions get the defaults, and a version's [`Regression`] also
//! slows its inference and raises its power draw here, as on a production device. Runs are
//! deterministic: the same figures, golden set and repeat always give the same result.

use fleetgate_protocol::validation::{LatencyStats, energy_uj};
use fleetgate_protocol::{GoldenSet, ValidationResult};

use crate::behaviour::Regression;

/// A version's figures on the simulated bench hardware.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// Median inference latency.
    pub latency_us: u32,
    /// Spread: latencies are uniform within +- this share of the median.
    pub jitter: f32,
    pub peak_ram_bytes: u64,
    /// Power draw while inferring.
    pub power_mw: f32,
    /// Share of golden cases predicted right.
    pub accuracy: f32,
}

impl Default for Figures {
    fn default() -> Figures {
        Figures {
            latency_us: 10_000,
            jitter: 0.2,
            peak_ram_bytes: 150_000,
            power_mw: 60.0,
            accuracy: 0.96,
        }
    }
}

/// Figures of one model version.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionFigures {
    pub model: String,
    pub version: semver::Version,
    pub figures: Figures,
}

/// `MODEL@VERSION:key=value,...` with keys `latency_us`, `jitter`, `ram`, `power_mw` and
/// `accuracy`; unset keys keep the defaults, e.g. `sim-model@2.1.0:latency_us=18000`.
impl std::str::FromStr for VersionFigures {
    type Err = String;

    fn from_str(s: &str) -> Result<VersionFigures, String> {
        const FORM: &str = "expected MODEL@VERSION:key=value,... (keys: latency_us, jitter, \
                            ram, power_mw, accuracy)";
        let (target, values) = s.split_once(':').ok_or(FORM)?;
        let (model, version) = target.split_once('@').ok_or(FORM)?;
        let version =
            semver::Version::parse(version).map_err(|e| format!("version {version:?}: {e}"))?;
        let mut f = Figures::default();
        for kv in values.split(',') {
            let (key, value) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?}: expected key=value"))?;
            let number = |min: f64, max: f64| -> Result<f64, String> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && (min..=max).contains(v))
                    .ok_or_else(|| format!("{key}={value}: expected a number within {min}..={max}"))
            };
            match key {
                "latency_us" => f.latency_us = number(1.0, 60_000_000.0)? as u32,
                "jitter" => f.jitter = number(0.0, 0.99)? as f32,
                "ram" => f.peak_ram_bytes = number(0.0, 1e12)? as u64,
                "power_mw" => f.power_mw = number(0.0, 1e6)? as f32,
                "accuracy" => f.accuracy = number(0.0, 1.0)? as f32,
                other => return Err(format!("unknown key {other:?}; {FORM}")),
            }
        }
        Ok(VersionFigures {
            model: model.to_owned(),
            version,
            figures: f,
        })
    }
}

/// A bench device's figures: per version, else the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bench {
    pub default: Figures,
    pub versions: Vec<VersionFigures>,
}

impl Bench {
    pub fn figures(&self, model: &str, version: &semver::Version) -> Figures {
        self.versions
            .iter()
            .find(|v| v.model == model && v.version == *version)
            .map_or_else(|| self.default.clone(), |v| v.figures.clone())
    }

    /// Runs `golden` `repeat` times (or `repeat` synthetic inferences without one) on
    /// `model` `version`, with what `regression` changes, and reports what was measured.
    pub fn run(
        &self,
        model: &str,
        version: &semver::Version,
        golden: &GoldenSet,
        repeat: u32,
        regression: Option<&Regression>,
    ) -> ValidationResult {
        let mut f = self.figures(model, version);
        if let Some(r) = regression.filter(|r| r.model == model && r.version == *version) {
            f.latency_us = (f.latency_us as f32 * r.latency_factor).max(1.0) as u32;
            f.power_mw *= r.power_factor;
        }
        let cases = golden.cases.len().max(1) as u64;
        let n = cases * u64::from(repeat.max(1));
        let mut latencies = Vec::with_capacity(n as usize);
        // Power is read once per inference, at its end; the first reading starts the run.
        let mut readings = vec![(0u64, f.power_mw)];
        let mut t = 0u64;
        for i in 0..n {
            let spread = f64::from(f.jitter) * (unit(i) * 2.0 - 1.0);
            let us = (f64::from(f.latency_us) * (1.0 + spread)).max(1.0) as u32;
            latencies.push(us);
            t += u64::from(us);
            readings.push((t, f.power_mw));
        }
        // Case k is predicted right when its rank among the cases is within the accuracy: the
        // same cases every run, and a share as close to `accuracy` as the set's size allows.
        let correct = (!golden.cases.is_empty()).then(|| {
            let right = (f64::from(f.accuracy) * cases as f64).round() as u64;
            (right * u64::from(repeat.max(1))) as u32
        });
        ValidationResult {
            inferences: n as u32,
            correct,
            latency: LatencyStats::from_samples(&mut latencies),
            peak_ram_bytes: f.peak_ram_bytes,
            energy_uj: energy_uj(readings),
        }
    }
}

/// A fixed pseudo-random number in [0, 1) for inference `i` (splitmix64).
fn unit(i: u64) -> f64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests;
