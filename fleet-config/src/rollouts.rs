//! The `[rollouts]` section: how staged rollouts proceed, when they stop and roll back, and the
//! per-rollout overrides an operator may give (checked by the same rules as the file).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::walk::{Problems, Section};
use crate::{ConfigError, FinishWith, days, ms, secs};

#[derive(Debug, Clone, PartialEq)]
pub struct Rollouts {
    /// The policy every rollout starts from.
    pub policy: RolloutPolicy,
    /// The gateway's key for signing rollback directives; `None`: `<data_dir>/rollback.key`,
    /// created on first start.
    pub signing_key: Option<PathBuf>,
    /// How long a rollback directive stays valid on a device.
    pub directive_ttl: Duration,
    /// The merged `[rollouts.policy]` table: overrides merge over it and are walked again.
    raw_policy: Table,
}

/// How one rollout proceeds. Stored with each rollout (postcard): changing these types changes
/// the gateway's rollout record version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPolicy {
    /// Cumulative stage sizes, smallest first; the last covers the whole target.
    pub stages: Vec<StagePolicy>,
    /// Device labels whose values spread every stage (the hardware class always does).
    pub stratify: Vec<String>,
    pub gates: Gates,
}

/// How many devices of the target a stage covers, counting earlier stages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum StageSize {
    Count(u64),
    Percent(f64),
}

impl StageSize {
    /// The number of devices of a target of `total` this stage covers (at least 1 of a
    /// non-empty target, at most all of it).
    pub fn of(self, total: u64) -> u64 {
        let n = match self {
            StageSize::Count(n) => n,
            StageSize::Percent(p) => (p / 100.0 * total as f64).ceil() as u64,
        };
        n.clamp(total.min(1), total)
    }

    /// The share of a target of `total` this stage covers, in [0, 1].
    pub fn share(self, total: u64) -> f64 {
        match self {
            StageSize::Percent(p) => p / 100.0,
            StageSize::Count(n) => (n as f64 / total.max(1) as f64).min(1.0),
        }
    }
}

impl std::fmt::Display for StageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageSize::Count(n) => write!(f, "{n}"),
            StageSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePolicy {
    pub size: StageSize,
    /// Devices of the stage that must have finished (installed, failed, rejected, timed out)
    /// before shares are judged; at most the stage's size.
    pub min_reporting: u64,
    /// Share of the stage's finished devices that must have installed, in percent.
    pub success_pct: f64,
    pub abort: Abort,
    /// How long the updated devices run under the health gates before the next stage.
    pub bake: Duration,
    /// The rollout's downloads in flight at once.
    pub max_concurrent: usize,
    /// A device silent this long during its update is offered it again...
    pub device_timeout: Duration,
    /// ...this many times, then times out.
    pub retries: u32,
}

/// Abort (and roll back) when any outcome reaches its threshold in a stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Abort {
    pub failed: Threshold,
    pub rejected: Threshold,
    pub timed_out: Threshold,
}

/// Reached at `count` devices, or at `pct` percent of the stage's finished devices once
/// `min_reporting` have finished.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub count: u64,
    pub pct: f64,
}

/// Health gates: the updated devices against the not-yet-updated (control) devices of the
/// same rollout, over the same window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    pub window: Duration,
    /// A gate fails only after failing continuously this long.
    pub confirm: Duration,
    /// When a stage's bake ends with a gate unable to judge, how much longer to wait before
    /// pausing the rollout for an operator.
    pub wait: Duration,
    pub min_devices: u64,
    pub min_samples: u64,
    /// Hardware alerts per telemetry message, updated over control.
    pub alert_rate: f64,
    pub min_alerts: u64,
    /// Inference latency p95, updated over control.
    pub latency_p95: f64,
    /// Mean free memory, updated over control, at least.
    pub free_mem: f64,
    /// Mean temperature (degrees C), updated over control.
    pub temp: f64,
    /// Mean power, updated over control.
    pub power: f64,
    /// Jensen-Shannon distance (base 2) between the two cohorts' predicted classes.
    pub prediction_js: f64,
    /// Fall of the mean confidence, control minus updated.
    pub confidence_drop: f64,
    /// Also fail when the drift engine finds the new model version's inputs or predictions
    /// drifting where the old version's do not.
    pub drift: bool,
    /// Share of a cohort's devices (at least one, from 3 devices on) whose values are left
    /// out at each end before a gate averages the devices, so that one device cannot move a
    /// verdict. Not stored with a rollout (the stored rollout layout predates it): a rollout
    /// read back after a restart gets the built-in default.
    #[serde(skip, default = "Gates::default_device_trim")]
    pub device_trim: f64,
}

impl Gates {
    /// The built-in `device_trim` (also in default.toml).
    pub fn default_device_trim() -> f64 {
        0.1
    }
}

impl Rollouts {
    pub(crate) fn walk(mut s: Section<'_>, p: &mut Problems) -> Rollouts {
        let key = s.string(p, "signing_key");
        let directive_ttl = s.duration(p, "directive_ttl", secs(60)..=days(30));
        let mut policy_section = s.section(p, "policy");
        let raw_policy = s
            .raw("policy")
            .and_then(Value::as_table)
            .cloned()
            .unwrap_or_default();
        let policy = RolloutPolicy::walk(&mut policy_section, p);
        policy_section.finish(p);
        Rollouts {
            policy: policy.unwrap_or_else(RolloutPolicy::fallback),
            signing_key: (!key.is_empty()).then(|| PathBuf::from(key)),
            directive_ttl,
            raw_policy,
        }
        .finish_with(s, p)
    }

    /// As [`Rollouts::policy_with`], for overrides in another form (a JSON object from the API).
    pub fn policy_with_value<T: Serialize>(
        &self,
        overrides: &T,
    ) -> Result<RolloutPolicy, Vec<ConfigError>> {
        let table = Table::try_from(overrides).map_err(|e| {
            vec![ConfigError {
                path: String::new(),
                message: format!("not a table of settings: {e}"),
            }]
        })?;
        self.policy_with(table)
    }

    /// The policy with an operator's overrides (keys as in `[rollouts.policy]`) merged over the
    /// configured one. Errors name the override's keys (`stages[1]`, `gates.window`).
    pub fn policy_with(&self, overrides: Table) -> Result<RolloutPolicy, Vec<ConfigError>> {
        let mut merged = self.raw_policy.clone();
        crate::walk::merge(&mut merged, overrides);
        let mut p = Problems::default();
        let mut section = Section::root(&merged);
        let policy = RolloutPolicy::walk(&mut section, &mut p);
        section.finish(&mut p);
        p.into_result(policy)
            .and_then(|policy| policy.ok_or_else(Vec::new))
    }
}

/// Stage settings given once for the policy and overridable per stage.
#[derive(Debug, Clone, Copy)]
struct StageDefaults {
    min_reporting: u64,
    success_pct: f64,
    abort: Abort,
    bake: Duration,
    max_concurrent: usize,
    device_timeout: Duration,
    retries: u32,
}

const STAGE_KEYS: [&str; 7] = [
    "min_reporting",
    "success_pct",
    "abort",
    "bake",
    "max_concurrent",
    "device_timeout",
    "retries",
];

impl StageDefaults {
    /// Reads the stage keys present in `s`, each falling back to `base` (or, without a base,
    /// requiring it).
    fn walk(s: &mut Section<'_>, p: &mut Problems, base: Option<&StageDefaults>) -> StageDefaults {
        let given = |s: &Section<'_>, key: &str| base.is_none() || s.has(key);
        let min_reporting = if given(s, "min_reporting") {
            s.usize(p, "min_reporting", 1..=1_000_000) as u64
        } else {
            base.map_or(1, |b| b.min_reporting)
        };
        let success_pct = if given(s, "success_pct") {
            s.float_in(p, "success_pct", 0.0..=100.0)
        } else {
            base.map_or(100.0, |b| b.success_pct)
        };
        let abort = if given(s, "abort") {
            let mut a = s.section(p, "abort");
            let abort = Abort::walk(&mut a, p, base.map(|b| b.abort));
            a.finish(p);
            abort
        } else {
            base.map_or(Abort::NONE, |b| b.abort)
        };
        let bake = if given(s, "bake") {
            s.duration(p, "bake", ms(0)..=days(30))
        } else {
            base.map_or(Duration::ZERO, |b| b.bake)
        };
        let max_concurrent = if given(s, "max_concurrent") {
            s.usize(p, "max_concurrent", 1..=1_000_000)
        } else {
            base.map_or(1, |b| b.max_concurrent)
        };
        let device_timeout = if given(s, "device_timeout") {
            s.duration(p, "device_timeout", secs(1)..=days(7))
        } else {
            base.map_or(secs(60), |b| b.device_timeout)
        };
        let retries = if given(s, "retries") {
            s.usize(p, "retries", 0..=100) as u32
        } else {
            base.map_or(0, |b| b.retries)
        };
        StageDefaults {
            min_reporting,
            success_pct,
            abort,
            bake,
            max_concurrent,
            device_timeout,
            retries,
        }
    }

    fn stage(self, size: StageSize) -> StagePolicy {
        StagePolicy {
            size,
            min_reporting: self.min_reporting,
            success_pct: self.success_pct,
            abort: self.abort,
            bake: self.bake,
            max_concurrent: self.max_concurrent,
            device_timeout: self.device_timeout,
            retries: self.retries,
        }
    }
}

impl Abort {
    const NONE: Abort = Abort {
        failed: Threshold::NEVER,
        rejected: Threshold::NEVER,
        timed_out: Threshold::NEVER,
    };

    fn walk(s: &mut Section<'_>, p: &mut Problems, base: Option<Abort>) -> Abort {
        Abort {
            failed: Threshold::walk(s, p, "failed", base.map(|b| b.failed)),
            rejected: Threshold::walk(s, p, "rejected", base.map(|b| b.rejected)),
            timed_out: Threshold::walk(s, p, "timed_out", base.map(|b| b.timed_out)),
        }
    }
}

impl Threshold {
    const NEVER: Threshold = Threshold {
        count: u64::MAX,
        pct: 100.0,
    };

    /// Reads `key` of an abort table; with a `fallback` (a stage's override of the policy),
    /// missing keys and fields keep the fallback's values.
    fn walk(
        s: &mut Section<'_>,
        p: &mut Problems,
        key: &str,
        fallback: Option<Threshold>,
    ) -> Threshold {
        if let Some(f) = fallback
            && !s.has(key)
        {
            return f;
        }
        let mut t = s.section(p, key);
        let given = |t: &Section<'_>, k: &str| fallback.is_none() || t.has(k);
        let count = if given(&t, "count") {
            t.usize(p, "count", 1..=100_000_000) as u64
        } else {
            fallback.map_or(u64::MAX, |f| f.count)
        };
        let pct = if given(&t, "pct") {
            t.float_in(p, "pct", 0.0..=100.0)
        } else {
            fallback.map_or(100.0, |f| f.pct)
        };
        t.finish(p);
        Threshold { count, pct }
    }
}

fn parse_size(text: &str) -> Result<StageSize, String> {
    let text = text.trim();
    if let Some(pct) = text.strip_suffix('%') {
        match pct.trim().parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 100.0 => Ok(StageSize::Percent(v)),
            _ => Err(format!("{text:?}: a share must be within (0, 100]%")),
        }
    } else {
        match text.parse::<u64>() {
            Ok(n) if n > 0 => Ok(StageSize::Count(n)),
            _ => Err(format!(
                "{text:?} is neither a device count (\"5\") nor a share (\"10%\")"
            )),
        }
    }
}

impl RolloutPolicy {
    /// Walks a policy table; `None` when a problem makes the stages unusable.
    fn walk(s: &mut Section<'_>, p: &mut Problems) -> Option<RolloutPolicy> {
        let defaults = StageDefaults::walk(s, p, None);
        let mut stages = Vec::new();
        let mut ok = true;
        for (path, item) in s.array(p, "stages") {
            let stage = match item {
                Value::String(text) => parse_size(text).map(|size| defaults.stage(size)),
                Value::Table(t) => {
                    let mut st = Section::at(path.clone(), t);
                    let size = st.string(p, "size");
                    let own = StageDefaults::walk(&mut st, p, Some(&defaults));
                    st.finish(p);
                    parse_size(&size)
                        .map(|size| own.stage(size))
                        .map_err(|e| format!("size: {e}"))
                }
                other => Err(format!(
                    "expected a size (\"5\", \"10%\") or a table with `size` and any of {STAGE_KEYS:?}, found {}",
                    other.type_str()
                )),
            };
            match stage {
                Ok(stage) => stages.push(stage),
                Err(e) => {
                    p.push(path, e);
                    ok = false;
                }
            }
        }
        if ok {
            if stages.is_empty() {
                s.error(p, "stages", "needs at least one stage");
                ok = false;
            } else if stages.last().map(|st| st.size) != Some(StageSize::Percent(100.0)) {
                s.error(p, "stages", "the last stage must be \"100%\"");
                ok = false;
            }
            // Sizes are cumulative: a percentage after a percentage must grow, and so must a
            // count after a count (mixed kinds depend on the target's size and are clamped).
            for (i, w) in stages.windows(2).enumerate() {
                let grows = match (w[0].size, w[1].size) {
                    (StageSize::Count(a), StageSize::Count(b)) => b > a,
                    (StageSize::Percent(a), StageSize::Percent(b)) => b > a,
                    _ => true,
                };
                if !grows {
                    s.error(
                        p,
                        &format!("stages[{}]", i + 1),
                        "must be larger than the stage before it (sizes are cumulative)",
                    );
                    ok = false;
                }
            }
        }
        let stratify = s.strings(p, "stratify");
        let mut g = s.section(p, "gates");
        let gates = Gates {
            window: g.duration(p, "window", secs(1)..=days(1)),
            confirm: g.duration(p, "confirm", ms(0)..=days(1)),
            wait: g.duration(p, "wait", ms(0)..=days(7)),
            min_devices: g.usize(p, "min_devices", 1..=1_000_000) as u64,
            min_samples: g.usize(p, "min_samples", 1..=100_000_000) as u64,
            alert_rate: g.float_in(p, "alert_rate", 1.0..=1000.0),
            min_alerts: g.usize(p, "min_alerts", 1..=1_000_000) as u64,
            latency_p95: g.float_in(p, "latency_p95", 1.0..=1000.0),
            free_mem: g.float_in(p, "free_mem", 0.0..=1.0),
            temp: g.float_in(p, "temp", 1.0..=10.0),
            power: g.float_in(p, "power", 1.0..=1000.0),
            prediction_js: g.float_in(p, "prediction_js", 0.0..=1.0),
            confidence_drop: g.float_in(p, "confidence_drop", 0.0..=1.0),
            drift: g.boolean(p, "drift"),
            device_trim: g.float_in(p, "device_trim", 0.0..=0.4),
        }
        .finish_with(g, p);
        ok.then_some(RolloutPolicy {
            stages,
            stratify,
            gates,
        })
    }

    /// Stands in for a policy whose stages did not parse (the config is refused anyway).
    fn fallback() -> RolloutPolicy {
        RolloutPolicy {
            stages: vec![
                StageDefaults {
                    min_reporting: 1,
                    success_pct: 100.0,
                    abort: Abort::NONE,
                    bake: Duration::ZERO,
                    max_concurrent: 1,
                    device_timeout: secs(60),
                    retries: 0,
                }
                .stage(StageSize::Percent(100.0)),
            ],
            stratify: Vec::new(),
            gates: Gates {
                window: secs(60),
                confirm: Duration::ZERO,
                wait: Duration::ZERO,
                min_devices: 1,
                min_samples: 1,
                alert_rate: 2.0,
                min_alerts: 1,
                latency_p95: 2.0,
                free_mem: 0.5,
                temp: 1.5,
                power: 2.0,
                prediction_js: 0.1,
                confidence_drop: 0.1,
                drift: false,
                device_trim: Gates::default_device_trim(),
            },
        }
    }
}

#[cfg(test)]
mod tests;
