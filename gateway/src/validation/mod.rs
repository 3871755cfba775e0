//! Validation of a release on bench devices: what is stored, how a result is judged against
//! the release's signed requirements, and the summaries per hardware class that the API, the
//! CLI, the registry's view and /metrics show. Pure: no I/O, no clock; the writer
//! (`ingest/validation.rs`) runs the transfers and stores what comes back.
//!
//! Rules:
//! - A result belongs to (release, hardware class, device); a newer run of the same device
//!   replaces it.
//! - A result passes when the run measured every value a requirement names and each meets
//!   its bound. A value not measured (accuracy without a golden set) fails its requirement.
//! - A run that never measured (the device refused, failed, timed out) is stored as an error:
//!   it neither passes nor fails the release.
//! - Per class, the figure shown for a measure is the worst device's (the highest latency,
//!   RAM and energy, the lowest accuracy), since one bad board is what a requirement is about.

use std::collections::BTreeMap;

use fleetgate_protocol::validation::{Measure, Requirement, Requirements};
use fleetgate_protocol::{ArtifactKind, GoldenSet, Signed, ValidationResult};
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::model::Stamp;

/// The signed requirements of one artifact of a release, as registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRequirements {
    pub sha256: [u8; 32],
    /// The artifact's device classes (empty: any).
    pub classes: Vec<String>,
    pub requirements: Requirements,
    /// Exactly what was signed (the registry's audit trail of who required what).
    pub signed: Signed,
    pub golden: Option<GoldenSet>,
    pub registered: Stamp,
}

/// The requirements of every artifact of one release that has any.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRequirements {
    pub artifacts: Vec<ArtifactRequirements>,
}

impl ReleaseRequirements {
    /// The requirements of the artifact with this SHA-256.
    pub fn of(&self, sha256: &[u8; 32]) -> Option<&ArtifactRequirements> {
        self.artifacts.iter().find(|a| a.sha256 == *sha256)
    }
}

/// A validation transfer in progress: which release it validates on which device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationRun {
    pub transfer: u64,
    pub kind: ArtifactKind,
    pub name: String,
    pub version: Version,
    pub release: u64,
    pub device: String,
    pub class: String,
    pub sha256: [u8; 32],
    pub repeat: u32,
    pub started: Stamp,
}

/// One requirement as a run measured it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub requirement: Requirement,
    /// `None`: the run did not measure it (a fail).
    pub value: Option<f64>,
    pub met: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// It measured: the result and each requirement judged on it.
    Measured {
        result: ValidationResult,
        checks: Vec<Check>,
    },
    /// It never measured: the device refused, failed, or stopped answering.
    Error { reason: String },
}

/// One device's latest validation of a release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationRecord {
    pub kind: ArtifactKind,
    pub name: String,
    pub version: Version,
    pub release: u64,
    pub class: String,
    pub device: String,
    pub transfer: u64,
    pub outcome: Outcome,
    pub started: Stamp,
    pub finished_ms: u64,
}

/// Pass, fail or error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Error,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Error => "error",
        }
    }
}

impl ValidationRecord {
    pub fn verdict(&self) -> Verdict {
        match &self.outcome {
            Outcome::Measured { checks, .. } if checks.iter().all(|c| c.met) => Verdict::Pass,
            Outcome::Measured { .. } => Verdict::Fail,
            Outcome::Error { .. } => Verdict::Error,
        }
    }

    /// The requirements it missed, as `measure value (bound limit)`.
    pub fn misses(&self) -> Vec<String> {
        match &self.outcome {
            Outcome::Measured { checks, .. } => checks
                .iter()
                .filter(|c| !c.met)
                .map(|c| {
                    format!(
                        "{} {} (required {}{})",
                        c.requirement.measure.name(),
                        c.value.map_or("not measured".to_owned(), show),
                        c.requirement.bound.symbol(),
                        show(c.requirement.limit)
                    )
                })
                .collect(),
            Outcome::Error { reason } => vec![reason.clone()],
        }
    }
}

/// A number as people read it: integers without decimals, shares to four places.
pub fn show(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// Judges a result against requirements.
pub fn judge(rules: &[Requirement], result: &ValidationResult) -> Vec<Check> {
    rules
        .iter()
        .map(|r| {
            let value = result.value(r.measure);
            Check {
                requirement: *r,
                value,
                met: value.is_some_and(|v| r.met_by(v)),
            }
        })
        .collect()
}

/// Which way a measure gets worse.
pub fn worse_is_higher(m: Measure) -> bool {
    m != Measure::Accuracy
}

/// The results of one hardware class of a release.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClassSummary {
    pub devices: u64,
    pub passed: u64,
    pub failed: u64,
    pub errors: u64,
    /// The worst device's value of each measure (see the module's rules).
    pub worst: BTreeMap<Measure, f64>,
}

/// Summaries per class of a release's results.
pub fn summarize(records: &[ValidationRecord]) -> BTreeMap<String, ClassSummary> {
    let mut out: BTreeMap<String, ClassSummary> = BTreeMap::new();
    for r in records {
        let s = out.entry(r.class.clone()).or_default();
        s.devices += 1;
        match r.verdict() {
            Verdict::Pass => s.passed += 1,
            Verdict::Fail => s.failed += 1,
            Verdict::Error => s.errors += 1,
        }
        if let Outcome::Measured { result, .. } = &r.outcome {
            for m in Measure::ALL {
                let Some(v) = result.value(m) else {
                    continue;
                };
                s.worst
                    .entry(m)
                    .and_modify(|w| {
                        if (worse_is_higher(m) && v > *w) || (!worse_is_higher(m) && v < *w) {
                            *w = v;
                        }
                    })
                    .or_insert(v);
            }
        }
    }
    out
}

/// One row of `validate compare`: a measure of a class in two versions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub class: String,
    pub measure: Measure,
    /// The requirement on it (the newer version's, else the older's), as text.
    pub requirement: Option<String>,
    pub old: Option<f64>,
    pub new: Option<f64>,
    /// new - old.
    pub difference: Option<f64>,
    /// Whether the new value meets the requirement (`None`: no requirement or no value).
    pub met: Option<bool>,
}

/// Each requirement of either version (or, with none, every measure), per class present in
/// either, with both versions' worst values and the difference.
pub fn compare(
    old: &[ValidationRecord],
    new: &[ValidationRecord],
    old_rules: &BTreeMap<String, Vec<Requirement>>,
    new_rules: &BTreeMap<String, Vec<Requirement>>,
) -> Vec<Comparison> {
    let (a, b) = (summarize(old), summarize(new));
    let mut classes: Vec<&String> = a.keys().chain(b.keys()).collect();
    classes.sort();
    classes.dedup();
    let mut out = Vec::new();
    for class in classes {
        let rule_of = |rules: &BTreeMap<String, Vec<Requirement>>, m: Measure| {
            rules_for(rules, class).and_then(|rs| rs.iter().find(|r| r.measure == m).copied())
        };
        let mut measures: Vec<Measure> = [rules_for(old_rules, class), rules_for(new_rules, class)]
            .into_iter()
            .flatten()
            .flatten()
            .map(|r| r.measure)
            .collect();
        if measures.is_empty() {
            measures = Measure::ALL.to_vec();
        }
        measures.sort();
        measures.dedup();
        for m in measures {
            let old_v = a.get(class).and_then(|s| s.worst.get(&m)).copied();
            let new_v = b.get(class).and_then(|s| s.worst.get(&m)).copied();
            let rule = rule_of(new_rules, m).or_else(|| rule_of(old_rules, m));
            out.push(Comparison {
                class: class.clone(),
                measure: m,
                requirement: rule.map(|r| r.to_string()),
                old: old_v,
                new: new_v,
                difference: old_v.zip(new_v).map(|(o, n)| n - o),
                met: rule.zip(new_v).map(|(r, v)| r.met_by(v)),
            });
        }
    }
    out
}

/// The requirements per device class of a release (an artifact for any class is under `*`).
pub fn rules_by_class(reqs: &ReleaseRequirements) -> BTreeMap<String, Vec<Requirement>> {
    let mut out = BTreeMap::new();
    for a in &reqs.artifacts {
        if a.classes.is_empty() {
            out.insert("*".to_owned(), a.requirements.rules.clone());
        }
        for c in &a.classes {
            out.insert(c.clone(), a.requirements.rules.clone());
        }
    }
    out
}

/// The requirements that apply to a device class: its artifact's, or the any-class one's.
pub fn rules_for<'a>(
    rules: &'a BTreeMap<String, Vec<Requirement>>,
    class: &str,
) -> Option<&'a Vec<Requirement>> {
    rules.get(class).or_else(|| rules.get("*"))
}

#[cfg(test)]
mod tests;
