//! On-device validation of a release before it reaches production devices: the requirements a
//! release is signed with, the golden set a bench device runs, and what the device measures.
//!
//! A bench device gets a [`ValidateOffer`](crate::ValidateOffer): the release's signed manifest
//! (checked exactly like an update offer), the golden set and how many times to run it. It
//! downloads the artifact into its spare slot as for an update, verifies it, and instead of
//! activating it runs the golden set from that slot, measuring each inference's latency, its
//! peak RAM and the energy drawn over the run. It reports a [`ValidationResult`] in an
//! `UpdateState::Validated` report; the slot it runs from does not change.
//!
//! Requirements are a signed document of their own ([`Domain::Requirements`]
//! (crate::sign::Domain)), bound to one manifest by its SHA-256: the gateway never lets an
//! operator loosen them, and devices never need to read them.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{self, Invalid, Validate};

/// Most cases in a golden set.
pub const MAX_GOLDEN_CASES: usize = 1024;
/// Largest golden set, encoded (it travels in one command to the device).
pub const MAX_GOLDEN_BYTES: usize = 32 * 1024;
/// Most times a device is asked to run the golden set.
pub const MAX_REPEAT: u32 = 1000;
/// Most requirements on one artifact.
pub const MAX_REQUIREMENTS: usize = 16;

/// One input of the golden set (one value per model input, in the model's order) and the
/// class the model must predict for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenCase {
    pub values: Vec<f32>,
    pub expected: u16,
}

/// Known inputs with their expected classes: what accuracy is measured on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenSet {
    pub cases: Vec<GoldenCase>,
}

impl Validate for GoldenSet {
    fn validate(&self) -> Result<(), Invalid> {
        limits::count("golden.cases", self.cases.len(), MAX_GOLDEN_CASES)?;
        for c in &self.cases {
            limits::count("golden.cases.values", c.values.len(), limits::MAX_FEATURES)?;
            if c.values
                .iter()
                .any(|v| !v.is_finite() || v.abs() > limits::MAX_VALUE)
            {
                return Err(Invalid::new(
                    "golden.cases.values",
                    "must be finite numbers within -1e12..=1e12",
                ));
            }
            if usize::from(c.expected) >= limits::MAX_CLASSES {
                return Err(Invalid::new(
                    "golden.cases.expected",
                    "must be a class id 0..=255",
                ));
            }
        }
        Ok(())
    }
}

/// What a device measures, and what a requirement bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    LatencyP50Us,
    LatencyP90Us,
    LatencyP95Us,
    LatencyP99Us,
    LatencyMaxUs,
    PeakRamBytes,
    EnergyPerInferenceUj,
    /// Share of golden cases predicted right, 0..=1.
    Accuracy,
}

impl Measure {
    pub const ALL: [Measure; 8] = [
        Measure::LatencyP50Us,
        Measure::LatencyP90Us,
        Measure::LatencyP95Us,
        Measure::LatencyP99Us,
        Measure::LatencyMaxUs,
        Measure::PeakRamBytes,
        Measure::EnergyPerInferenceUj,
        Measure::Accuracy,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Measure::LatencyP50Us => "latency_p50_us",
            Measure::LatencyP90Us => "latency_p90_us",
            Measure::LatencyP95Us => "latency_p95_us",
            Measure::LatencyP99Us => "latency_p99_us",
            Measure::LatencyMaxUs => "latency_max_us",
            Measure::PeakRamBytes => "peak_ram_bytes",
            Measure::EnergyPerInferenceUj => "energy_per_inference_uj",
            Measure::Accuracy => "accuracy",
        }
    }

    pub fn from_name(name: &str) -> Option<Measure> {
        Measure::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Which side of its bound a measure must stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// `<=`
    AtMost,
    /// `>=`
    AtLeast,
}

impl Bound {
    pub const fn symbol(self) -> &'static str {
        match self {
            Bound::AtMost => "<=",
            Bound::AtLeast => ">=",
        }
    }
}

/// One requirement, e.g. `latency_p95_us<=15000` or `accuracy>=0.93`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub measure: Measure,
    pub bound: Bound,
    pub limit: f64,
}

/// Why a requirement's text does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequirementError {
    #[error("{0:?} has no <= or >=: write it as MEASURE<=LIMIT or MEASURE>=LIMIT")]
    NoBound(String),
    #[error(
        "{0:?} is not a measure (one of latency_p50_us, latency_p90_us, latency_p95_us, \
         latency_p99_us, latency_max_us, peak_ram_bytes, energy_per_inference_uj, accuracy)"
    )]
    Measure(String),
    #[error("{0:?} is not a finite number, at least 0")]
    Limit(String),
    #[error("accuracy is a share: its limit must be within 0..=1, not {0}")]
    Accuracy(String),
}

impl Requirement {
    /// Parses `MEASURE<=LIMIT` or `MEASURE>=LIMIT` (spaces allowed around the operator).
    pub fn parse(text: &str) -> Result<Requirement, RequirementError> {
        let (at, bound) = match (text.find("<="), text.find(">=")) {
            (Some(i), None) => (i, Bound::AtMost),
            (None, Some(i)) => (i, Bound::AtLeast),
            _ => return Err(RequirementError::NoBound(text.into())),
        };
        let name = text[..at].trim();
        let value = text[at + 2..].trim();
        let measure =
            Measure::from_name(name).ok_or_else(|| RequirementError::Measure(name.into()))?;
        let limit: f64 = value
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| RequirementError::Limit(value.into()))?;
        if measure == Measure::Accuracy && limit > 1.0 {
            return Err(RequirementError::Accuracy(value.into()));
        }
        Ok(Requirement {
            measure,
            bound,
            limit,
        })
    }

    /// Whether `value` meets the requirement.
    pub fn met_by(&self, value: f64) -> bool {
        match self.bound {
            Bound::AtMost => value <= self.limit,
            Bound::AtLeast => value >= self.limit,
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}{}",
            self.measure.name(),
            self.bound.symbol(),
            self.limit
        )
    }
}

/// The signed requirements of one artifact: the body of a [`Domain::Requirements`]
/// (crate::sign::Domain) document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// SHA-256 of the signed manifest body they belong to: they cannot be moved to another
    /// artifact or release.
    #[serde(with = "crate::bytes::array")]
    pub manifest_sha256: [u8; 32],
    /// SHA-256 of the encoded golden set carried with them, or all zeros for none.
    #[serde(with = "crate::bytes::array")]
    pub golden_sha256: [u8; 32],
    pub rules: Vec<Requirement>,
}

impl Validate for Requirements {
    fn validate(&self) -> Result<(), Invalid> {
        limits::count("requirements.rules", self.rules.len(), MAX_REQUIREMENTS)?;
        for r in &self.rules {
            if !r.limit.is_finite() || r.limit < 0.0 {
                return Err(Invalid::new(
                    "requirements.rules.limit",
                    "must be a finite number, at least 0",
                ));
            }
        }
        Ok(())
    }
}

/// The latency distribution of a run, in microseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyStats {
    pub p50_us: u32,
    pub p90_us: u32,
    pub p95_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
}

impl LatencyStats {
    /// The distribution of `samples` (sorted in place); all zeros for none.
    pub fn from_samples(samples: &mut [u32]) -> LatencyStats {
        samples.sort_unstable();
        let at = |p: u64| -> u32 {
            let n = samples.len() as u64;
            if n == 0 {
                return 0;
            }
            // Nearest rank: the smallest value with at least p % of the samples at or below.
            let rank = (p * n).div_ceil(100).max(1);
            samples[(rank - 1) as usize]
        };
        LatencyStats {
            p50_us: at(50),
            p90_us: at(90),
            p95_us: at(95),
            p99_us: at(99),
            max_us: samples.last().copied().unwrap_or(0),
        }
    }
}

/// Energy in microjoules drawn over a run, from power readings `(time in us, power in mW)` in
/// time order: the trapezoid rule between consecutive readings (mW x us = nJ).
pub fn energy_uj(readings: impl IntoIterator<Item = (u64, f32)>) -> u64 {
    let mut nj = 0.0f64;
    let mut prev: Option<(u64, f32)> = None;
    for (t, mw) in readings {
        if let Some((t0, mw0)) = prev {
            let dt = t.saturating_sub(t0) as f64;
            nj += dt * (f64::from(mw0) + f64::from(mw)) / 2.0;
        }
        prev = Some((t, mw));
    }
    (nj / 1000.0) as u64
}

/// What a bench device measured running a release's golden set from its spare slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationResult {
    /// Inferences run (golden cases times repeats, or synthetic inputs without a golden set).
    pub inferences: u32,
    /// Predictions equal to the expected class; `None` without a golden set.
    pub correct: Option<u32>,
    pub latency: LatencyStats,
    /// Highest RAM in use during the run (arena, stack and buffers).
    pub peak_ram_bytes: u64,
    /// Energy drawn over the whole run (from power readings or an energy counter).
    pub energy_uj: u64,
}

impl ValidationResult {
    /// The value of one measure, if the run measured it.
    pub fn value(&self, m: Measure) -> Option<f64> {
        let per = |total: f64| (self.inferences > 0).then(|| total / f64::from(self.inferences));
        match m {
            Measure::LatencyP50Us => Some(f64::from(self.latency.p50_us)),
            Measure::LatencyP90Us => Some(f64::from(self.latency.p90_us)),
            Measure::LatencyP95Us => Some(f64::from(self.latency.p95_us)),
            Measure::LatencyP99Us => Some(f64::from(self.latency.p99_us)),
            Measure::LatencyMaxUs => Some(f64::from(self.latency.max_us)),
            Measure::PeakRamBytes => Some(self.peak_ram_bytes as f64),
            Measure::EnergyPerInferenceUj => per(self.energy_uj as f64),
            Measure::Accuracy => self.correct.and_then(|c| per(f64::from(c))),
        }
    }
}

impl Validate for ValidationResult {
    fn validate(&self) -> Result<(), Invalid> {
        if self.inferences == 0 {
            return Err(Invalid::new("validated.inferences", "must be at least 1"));
        }
        if self.correct.is_some_and(|c| c > self.inferences) {
            return Err(Invalid::new(
                "validated.correct",
                "must be at most validated.inferences",
            ));
        }
        let l = &self.latency;
        let (_, max) = limits::hw::LATENCY_US;
        if !(l.p50_us <= l.p90_us
            && l.p90_us <= l.p95_us
            && l.p95_us <= l.p99_us
            && l.p99_us <= l.max_us)
        {
            return Err(Invalid::new(
                "validated.latency",
                "percentiles must not decrease (p50 <= p90 <= p95 <= p99 <= max)",
            ));
        }
        if l.max_us > max {
            return Err(Invalid::new(
                "validated.latency.max_us",
                "must be at most 600000000",
            ));
        }
        if self.peak_ram_bytes > limits::hw::MAX_MEMORY_BYTES {
            return Err(Invalid::new(
                "validated.peak_ram_bytes",
                "must be at most 1 TiB",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
