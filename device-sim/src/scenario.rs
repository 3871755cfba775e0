//! Scenario files: groups of simulated devices that behave differently in one `run` (hardware
//! classes, rates, drift, faults). TOML, read in two steps like the gateway's config: a raw
//! serde shape that refuses unknown fields, then one check that collects every problem, each
//! naming its field (`group[1].faults.flap.every: ...`).
//!
//! ```toml
//! [[group]]
//! prefix = "north"        # device ids north-00000, north-00001, ...
//! count = 40
//! rate = 1.0              # telemetry messages per second per device
//! alert_rate = 0.02       # alerts per second per device
//!
//! [group.faults]
//! flap = { every = "30s", down = "5s" }
//! ```
//!
//! `scenarios/example.toml` shows every field.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use fleetgate_protocol::{HardwareProfile, limits};
use serde::Deserialize;

use crate::behaviour::{DataShape, Regression, default_hardware};
use crate::fleet::Group;
use crate::updater::{DeviceProfile, Faults, Flap};

/// Most devices one scenario may simulate.
pub const MAX_DEVICES: usize = 100_000;
/// Longest delay a fault may ask for.
const MAX_FAULT_DELAY: Duration = Duration::from_secs(3600);

/// A checked scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub description: Option<String>,
    pub groups: Vec<Group>,
}

impl Scenario {
    /// Every device id, group by group, in the order the fleet runs them.
    pub fn ids(&self) -> Vec<String> {
        self.groups
            .iter()
            .flat_map(|g| crate::enroll::ids(&g.prefix, g.count))
            .collect()
    }

    pub fn devices(&self) -> usize {
        self.groups.iter().map(|g| g.count).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario {path}: {message}")]
    Read { path: String, message: String },
    #[error("scenario {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("scenario {path}:\n  {}", problems.join("\n  "))]
    Invalid { path: String, problems: Vec<String> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    description: Option<String>,
    #[serde(default)]
    group: Vec<RawGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    prefix: String,
    count: u64,
    rate: Option<f64>,
    alert_rate: Option<f64>,
    classes: Option<Vec<f64>>,
    confidence: Option<f64>,
    regression: Option<String>,
    hardware: Option<RawHardware>,
    data: Option<RawData>,
    faults: Option<RawFaults>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHardware {
    class: Option<String>,
    arch: Option<String>,
    ram_bytes: Option<u64>,
    flash_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    samples: Option<u64>,
    features: Option<u64>,
    bins: Option<bool>,
    shift: Option<BTreeMap<String, f64>>,
    shift_after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFaults {
    flap: Option<RawFlap>,
    slow_link: Option<String>,
    crash_after_update: Option<String>,
    malformed_every: Option<u64>,
    impersonate_every: Option<u64>,
    fail_install: Option<bool>,
    decline: Option<bool>,
    corrupt_chunk: Option<u64>,
    truncate_chunk: Option<u64>,
    disconnect_at: Option<f64>,
    clock_skew_ms: Option<i64>,
    claim_class: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlap {
    every: String,
    down: String,
}

/// Reads and checks a scenario file.
pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|e| ScenarioError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and checks a scenario; `name` is what errors call the file.
pub fn parse(text: &str, name: &str) -> Result<Scenario, ScenarioError> {
    let raw: RawScenario = toml::from_str(text).map_err(|e| ScenarioError::Syntax {
        path: name.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let mut problems = Problems::default();
    let scenario = check(raw, &mut problems);
    if problems.0.is_empty() {
        Ok(scenario)
    } else {
        Err(ScenarioError::Invalid {
            path: name.to_owned(),
            problems: problems.0,
        })
    }
}

#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, field: &str, problem: impl std::fmt::Display) {
        self.0.push(format!("{field}: {problem}"));
    }

    /// A duration such as `30s` or `2m`, within `0 < d <= max`.
    fn duration(&mut self, field: &str, text: &str, max: Duration) -> Option<Duration> {
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => self.add(field, "must be above 0"),
            Ok(d) if d > max => self.add(
                field,
                format!("must be at most {}", humantime::format_duration(max)),
            ),
            Ok(d) => return Some(d),
            Err(e) => self.add(
                field,
                format!("{text:?} is not a duration such as 30s or 2m ({e})"),
            ),
        }
        None
    }

    fn name(&mut self, field: &str, value: &str) {
        if value.is_empty() || value.len() > limits::MAX_NAME_LEN {
            self.add(
                field,
                format!("must be 1 to {} bytes", limits::MAX_NAME_LEN),
            );
        }
    }
}

fn check(raw: RawScenario, p: &mut Problems) -> Scenario {
    if raw.group.is_empty() {
        p.add("group", "a scenario needs at least one [[group]]");
    }
    let mut prefixes = HashSet::new();
    let mut total: u64 = 0;
    let groups = raw
        .group
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let at = format!("group[{i}]");
            if !prefixes.insert(g.prefix.clone()) {
                p.add(
                    &format!("{at}.prefix"),
                    format!("{:?} is used by an earlier group", g.prefix),
                );
            }
            total = total.saturating_add(g.count);
            group(g, &at, p)
        })
        .collect();
    if total > MAX_DEVICES as u64 {
        p.add(
            "group",
            format!("{total} devices in all; at most {MAX_DEVICES}"),
        );
    }
    Scenario {
        description: raw.description,
        groups,
    }
}

fn group(g: RawGroup, at: &str, p: &mut Problems) -> Group {
    let field = |name: &str| format!("{at}.{name}");
    if let Err(e) = fleetgate_protocol::id::validate(&format!("{}-00000", g.prefix)) {
        p.add(
            &field("prefix"),
            format!("{:?} does not make valid device ids: {e}", g.prefix),
        );
    }
    if g.count == 0 || g.count > MAX_DEVICES as u64 {
        p.add(&field("count"), format!("must be within 1..={MAX_DEVICES}"));
    }
    let rate = g.rate.unwrap_or(1.0);
    if !(rate > 0.0 && rate <= 1000.0) {
        p.add(
            &field("rate"),
            "must be within (0, 1000] messages per second",
        );
    }
    let alert_rate = g.alert_rate.unwrap_or(0.0);
    let alert_every = if !(0.0..=rate).contains(&alert_rate) {
        p.add(
            &field("alert_rate"),
            "must be within 0..=rate (alerts ride on telemetry messages)",
        );
        0
    } else if alert_rate == 0.0 {
        0
    } else {
        (rate / alert_rate).round().max(1.0) as u64
    };
    let mut shape = DataShape::default();
    if let Some(classes) = g.classes {
        if classes.len() > limits::MAX_CLASSES {
            p.add(
                &field("classes"),
                format!("at most {} classes", limits::MAX_CLASSES),
            );
        }
        if classes.iter().any(|w| !w.is_finite() || *w < 0.0) {
            p.add(&field("classes"), "weights must be finite numbers >= 0");
        } else if classes.iter().sum::<f64>() <= 0.0 {
            p.add(&field("classes"), "weights must not all be 0");
        }
        shape.classes = classes.iter().map(|w| *w as f32).collect();
    }
    if let Some(c) = g.confidence {
        if !(0.0..=1.0).contains(&c) {
            p.add(&field("confidence"), "must be within 0..=1");
        }
        shape.mean_confidence = c as f32;
    }
    let regression = g.regression.as_deref().and_then(|r| {
        r.parse::<Regression>()
            .map_err(|e| p.add(&field("regression"), e))
            .ok()
    });
    let hardware = g
        .hardware
        .map_or_else(default_hardware, |h| hardware(h, &field("hardware"), p));
    let mut shift_after = None;
    if let Some(d) = g.data {
        shift_after = data(d, &field("data"), &mut shape, p);
    }
    let faults = g
        .faults
        .map_or_else(Faults::default, |f| faults(f, &field("faults"), p));
    Group {
        prefix: g.prefix,
        count: g.count as usize,
        interval: if rate > 0.0 && rate.is_finite() {
            Duration::from_secs_f64(1.0 / rate)
        } else {
            Duration::from_secs(1)
        },
        alert_every,
        shape,
        shift_after,
        hardware,
        profile: DeviceProfile {
            faults,
            regression,
            ..DeviceProfile::default()
        },
    }
}

fn hardware(h: RawHardware, at: &str, p: &mut Problems) -> HardwareProfile {
    let mut hw = default_hardware();
    if let Some(class) = h.class {
        p.name(&format!("{at}.class"), &class);
        hw.class = class;
    }
    if let Some(arch) = h.arch {
        p.name(&format!("{at}.arch"), &arch);
        hw.arch = arch;
    }
    for (name, value, slot) in [
        ("ram_bytes", h.ram_bytes, &mut hw.ram_bytes),
        ("flash_bytes", h.flash_bytes, &mut hw.flash_bytes),
    ] {
        if let Some(v) = value {
            if v == 0 {
                p.add(&format!("{at}.{name}"), "must be above 0");
            }
            *slot = v;
        }
    }
    hw
}

/// Fills `shape` from the data table; returns when the shift starts.
fn data(d: RawData, at: &str, shape: &mut DataShape, p: &mut Problems) -> Option<Duration> {
    if let Some(s) = d.samples {
        if s > limits::MAX_SAMPLES as u64 {
            p.add(
                &format!("{at}.samples"),
                format!("must be at most {}", limits::MAX_SAMPLES),
            );
        }
        shape.samples = s.min(limits::MAX_SAMPLES as u64) as usize;
    }
    if let Some(f) = d.features {
        if f == 0 || f > limits::MAX_FEATURES as u64 {
            p.add(
                &format!("{at}.features"),
                format!("must be within 1..={}", limits::MAX_FEATURES),
            );
        }
        shape.features = f.clamp(1, limits::MAX_FEATURES as u64) as usize;
    }
    if let Some(bins) = d.bins {
        if bins && shape.samples == 0 {
            p.add(
                &format!("{at}.bins"),
                "bins summarise samples: set samples too",
            );
        }
        shape.bins = bins;
    }
    let mut shift = vec![0.0; shape.features];
    let mut shifted = false;
    for (feature, delta) in d.shift.unwrap_or_default() {
        let field = format!("{at}.shift.{feature}");
        let Ok(f) = feature.parse::<usize>() else {
            p.add(&field, "keys are feature indexes (0, 1, ...)");
            continue;
        };
        if !delta.is_finite() {
            p.add(&field, "must be a finite number");
        }
        match shift.get_mut(f) {
            Some(slot) => {
                *slot = delta as f32;
                shifted = true;
            }
            None => p.add(&field, format!("there are {} features", shape.features)),
        }
    }
    shape.shift = shift;
    let after = d.shift_after.and_then(|t| {
        p.duration(
            &format!("{at}.shift_after"),
            &t,
            Duration::from_secs(24 * 3600),
        )
    });
    if after.is_some() && !shifted {
        p.add(&format!("{at}.shift_after"), "there is no shift to start");
    }
    after
}

fn faults(f: RawFaults, at: &str, p: &mut Problems) -> Faults {
    let field = |name: &str| format!("{at}.{name}");
    let flap = f.flap.and_then(|flap| {
        let every = p.duration(
            &field("flap.every"),
            &flap.every,
            Duration::from_secs(24 * 3600),
        );
        let down = p.duration(&field("flap.down"), &flap.down, MAX_FAULT_DELAY);
        Some(Flap {
            every: every?,
            down: down?,
        })
    });
    let slow_link = f
        .slow_link
        .and_then(|t| p.duration(&field("slow_link"), &t, MAX_FAULT_DELAY));
    let crash_after_update = f
        .crash_after_update
        .and_then(|t| p.duration(&field("crash_after_update"), &t, MAX_FAULT_DELAY));
    for (name, value) in [
        ("malformed_every", f.malformed_every),
        ("impersonate_every", f.impersonate_every),
    ] {
        if value == Some(0) {
            p.add(&field(name), "must be at least 1");
        }
    }
    if let Some(d) = f.disconnect_at
        && !(d > 0.0 && d < 1.0)
    {
        p.add(
            &field("disconnect_at"),
            "must be a share of the chunks within (0, 1)",
        );
    }
    if let Some(class) = &f.claim_class {
        p.name(&field("claim_class"), class);
    }
    Faults {
        corrupt_chunk: f.corrupt_chunk,
        truncate_chunk: f.truncate_chunk,
        disconnect_at: f.disconnect_at,
        decline: f.decline.unwrap_or(false),
        clock_skew_ms: f.clock_skew_ms.unwrap_or(0),
        claim_class: f.claim_class,
        fail_install: f.fail_install.unwrap_or(false),
        flap,
        slow_link,
        crash_after_update,
        malformed_every: f.malformed_every.filter(|n| *n > 0),
        impersonate_every: f.impersonate_every.filter(|n| *n > 0),
    }
}

#[cfg(test)]
mod tests;
