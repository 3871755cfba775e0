//! Health gates: the rollout's updated devices against its devices not updated yet (the
//! control), over the same sliding window. Comparing two cohorts at the same time, instead of
//! one cohort with its own past, is what keeps a change that hits the whole fleet (a heat wave,
//! a new season's data) from rolling a good release back.
//!
//! Every gate judges per-device summaries, not pooled messages: each device's alerts per
//! message, latency p95, mean free memory, temperature, power and confidence, and class
//! shares. A side's value is the trimmed mean of its devices' values: `gates.device_trim` of
//! the devices (at least one from 3 devices on) are left out at each end. So one device, however
//! much it sends and whatever values it reports, cannot pass or fail a gate on its own
//! (issue 13); values outside the protocol's plausible ranges are ignored outright.
//!
//! The window is kept per device as up to `BUCKETS` time buckets; a bucket holds counts, sums,
//! a sparse log-scale latency histogram (2 % steps) and class counts, so memory is bounded per
//! device whatever the traffic.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use fleetgate_config::Gates;
use fleetgate_protocol::limits::{MAX_CLASSES, hw};

use super::model::{Gate, GateEval, Verdict};
use crate::drift::engine::Comparison;
use crate::drift::metrics::{self, Chi2Table};

const BUCKETS: u64 = 10;
/// Latency histogram step: bucket i holds latencies around STEP^i microseconds.
const LATENCY_STEP: f64 = 1.02;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cohort {
    Updated,
    Control,
}

/// What one telemetry message says about a device's health.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub latency_us: Option<u32>,
    pub free_mem_bytes: Option<u64>,
    pub temp_c: Option<f32>,
    pub power_mw: Option<f32>,
    /// Predicted classes since the last message, by class id.
    pub class_counts: Vec<u32>,
    pub inferences: u32,
    pub mean_confidence: Option<f32>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    sum: f64,
    n: u64,
}

impl Mean {
    fn add(&mut self, v: f64, n: u64) {
        self.sum += v * n as f64;
        self.n += n;
    }

    fn merge(&mut self, o: &Mean) {
        self.sum += o.sum;
        self.n += o.n;
    }

    fn value(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

/// One device's health in one bucket (or, merged, over the window).
#[derive(Debug, Clone, Default)]
struct Agg {
    messages: u64,
    alerts: u64,
    /// (log bucket, count), sorted by bucket.
    latency: Vec<(u16, u32)>,
    free_mem: Mean,
    temp: Mean,
    power: Mean,
    classes: Vec<u64>,
    /// Confidence weighted by inferences.
    confidence: Mean,
}

fn latency_bucket(us: u32) -> u16 {
    (f64::from(us.max(1)).ln() / LATENCY_STEP.ln()).round() as u16
}

fn latency_value(bucket: u16) -> f64 {
    LATENCY_STEP.powi(i32::from(bucket))
}

impl Agg {
    fn record_latency(&mut self, bucket: u16, count: u32) {
        match self.latency.binary_search_by_key(&bucket, |(b, _)| *b) {
            Ok(i) => self.latency[i].1 = self.latency[i].1.saturating_add(count),
            Err(i) => self.latency.insert(i, (bucket, count)),
        }
    }

    fn merge(&mut self, o: &Agg) {
        self.messages += o.messages;
        self.alerts += o.alerts;
        for &(b, c) in &o.latency {
            self.record_latency(b, c);
        }
        self.free_mem.merge(&o.free_mem);
        self.temp.merge(&o.temp);
        self.power.merge(&o.power);
        if self.classes.len() < o.classes.len() {
            self.classes.resize(o.classes.len(), 0);
        }
        for (a, b) in self.classes.iter_mut().zip(&o.classes) {
            *a += b;
        }
        self.confidence.merge(&o.confidence);
    }

    fn latency_n(&self) -> u64 {
        self.latency.iter().map(|(_, c)| u64::from(*c)).sum()
    }

    /// The device's latency p95 (nearest rank), to the histogram's 2 %.
    fn latency_p95(&self) -> Option<f64> {
        let n = self.latency_n();
        if n == 0 {
            return None;
        }
        let rank = (0.95 * n as f64).ceil() as u64;
        let mut seen = 0;
        for &(b, c) in &self.latency {
            seen += u64::from(c);
            if seen >= rank {
                return Some(latency_value(b));
            }
        }
        self.latency.last().map(|(b, _)| latency_value(*b))
    }
}

/// One device's buckets on one side.
#[derive(Debug, Default)]
struct DeviceWindow {
    buckets: VecDeque<(u64, Agg)>,
}

/// One rollout's health window.
#[derive(Debug)]
pub struct Health {
    window_ms: u64,
    bucket_ms: u64,
    devices: HashMap<(String, Cohort), DeviceWindow>,
    chi2: Chi2Table,
}

/// What the drift engine said about the new model version against the old one.
#[derive(Debug, Clone, PartialEq)]
pub enum DriftInput {
    /// Not asked: a firmware rollout, no baselines, or the gate is off.
    Off,
    /// Asked, but a version has no judged window yet (the gate does not hold the stage).
    Unknown,
    Compared(Comparison),
}

/// How many devices of `k` a trimmed mean leaves out at each end.
fn trim_count(k: usize, trim: f64) -> usize {
    if k < 3 || trim <= 0.0 {
        return 0;
    }
    ((trim * k as f64).floor() as usize).max(1).min((k - 1) / 2)
}

/// The mean of `values` without the `trim_count` smallest and largest; `None` when empty.
fn trimmed_mean(mut values: Vec<f64>, trim: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let t = trim_count(values.len(), trim);
    let kept = &values[t..values.len() - t];
    Some(kept.iter().sum::<f64>() / kept.len() as f64)
}

/// A side's devices over the window, merged per device.
struct Side {
    devices: Vec<Agg>,
}

impl Side {
    fn total(&self, f: impl Fn(&Agg) -> u64) -> u64 {
        self.devices.iter().map(f).sum()
    }

    fn trimmed(&self, trim: f64, f: impl Fn(&Agg) -> Option<f64>) -> Option<f64> {
        trimmed_mean(self.devices.iter().filter_map(f).collect(), trim)
    }

    /// Per-class trimmed means of the devices' class shares, normalised; and a robust count of
    /// predictions behind them (devices x their median count).
    fn classes(&self, trim: f64, width: usize) -> (Vec<f64>, u64) {
        let with: Vec<&Agg> = self
            .devices
            .iter()
            .filter(|d| d.classes.iter().any(|&c| c > 0))
            .collect();
        if with.is_empty() {
            return (vec![0.0; width], 0);
        }
        let shares: Vec<Vec<f64>> = with
            .iter()
            .map(|d| {
                let mut c = d.classes.clone();
                c.resize(width, 0);
                metrics::shares(&c)
            })
            .collect();
        let mut robust: Vec<f64> = (0..width)
            .map(|i| trimmed_mean(shares.iter().map(|s| s[i]).collect(), trim).unwrap_or(0.0))
            .collect();
        let total: f64 = robust.iter().sum();
        if total > 0.0 {
            robust.iter_mut().for_each(|r| *r /= total);
        }
        let mut counts: Vec<u64> = with.iter().map(|d| d.classes.iter().sum()).collect();
        counts.sort_unstable();
        let median = counts[counts.len() / 2];
        (robust, median * with.len() as u64)
    }
}

impl Health {
    pub fn new(window: Duration) -> Health {
        let window_ms = (window.as_millis() as u64).max(BUCKETS);
        Health {
            window_ms,
            bucket_ms: window_ms / BUCKETS,
            devices: HashMap::new(),
            chi2: Chi2Table::default(),
        }
    }

    /// The bucket of `device` on `cohort`'s side for a message at `now_ms`.
    fn bucket(&mut self, device: &str, cohort: Cohort, now_ms: u64) -> &mut Agg {
        let start = now_ms - now_ms % self.bucket_ms;
        let oldest = now_ms.saturating_sub(self.window_ms);
        let bucket_ms = self.bucket_ms;
        let w = self.devices.entry((device.to_owned(), cohort)).or_default();
        while w
            .buckets
            .front()
            .is_some_and(|(b, _)| b + bucket_ms <= oldest)
        {
            w.buckets.pop_front();
        }
        // A message stamped before the newest bucket (the clock went back) counts in it.
        if w.buckets.back().is_none_or(|(b, _)| *b < start) {
            w.buckets.push_back((start, Agg::default()));
        }
        &mut w.buckets.back_mut().expect("a bucket was just ensured").1
    }

    fn expire(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms);
        let bucket_ms = self.bucket_ms;
        self.devices.retain(|_, w| {
            while w
                .buckets
                .front()
                .is_some_and(|(b, _)| b + bucket_ms <= oldest)
            {
                w.buckets.pop_front();
            }
            !w.buckets.is_empty()
        });
    }

    /// Takes one message's values; a value outside the protocol's plausible range (which the
    /// decoder refuses anyway) is left out rather than trusted.
    pub fn telemetry(&mut self, device: &str, cohort: Cohort, s: &Sample, now_ms: u64) {
        let a = self.bucket(device, cohort, now_ms);
        a.messages += 1;
        let in_range = |v: f32, (lo, hi): (f32, f32)| v.is_finite() && (lo..=hi).contains(&v);
        if let Some(l) = s.latency_us {
            a.record_latency(
                latency_bucket(l.clamp(hw::LATENCY_US.0, hw::LATENCY_US.1)),
                1,
            );
        }
        if let Some(v) = s.free_mem_bytes.filter(|v| *v <= hw::MAX_FREE_MEM_BYTES) {
            a.free_mem.add(v as f64, 1);
        }
        if let Some(v) = s.temp_c.filter(|v| in_range(*v, hw::TEMP_C)) {
            a.temp.add(f64::from(v), 1);
        }
        if let Some(v) = s.power_mw.filter(|v| in_range(*v, hw::POWER_MW)) {
            a.power.add(f64::from(v), 1);
        }
        let classes = &s.class_counts[..s.class_counts.len().min(MAX_CLASSES)];
        if a.classes.len() < classes.len() {
            a.classes.resize(classes.len(), 0);
        }
        for (c, &k) in a.classes.iter_mut().zip(classes) {
            *c += u64::from(k);
        }
        if let Some(c) = s.mean_confidence.filter(|c| in_range(*c, (0.0, 1.0))) {
            a.confidence
                .add(f64::from(c), u64::from(s.inferences.max(1)));
        }
    }

    pub fn alert(&mut self, device: &str, cohort: Cohort, now_ms: u64) {
        self.bucket(device, cohort, now_ms).alerts += 1;
    }

    /// Forgets a device (it moved from control to updating): what it sent as control no longer
    /// counts for either side.
    pub fn forget(&mut self, device: &str) {
        self.devices.retain(|(d, _), _| d != device);
    }

    fn side(&self, want: Cohort) -> Side {
        let devices = self
            .devices
            .iter()
            .filter(|((_, c), _)| *c == want)
            .map(|(_, w)| {
                let mut a = Agg::default();
                for (_, b) in &w.buckets {
                    a.merge(b);
                }
                a
            })
            .collect();
        Side { devices }
    }

    /// Judges every gate on the current window. `control_exists`: the rollout still has enough
    /// devices that are not updated to compare with (`min_devices`, online or not).
    pub fn evaluate(
        &mut self,
        g: &Gates,
        now_ms: u64,
        control_exists: bool,
        drift: &DriftInput,
    ) -> Vec<GateEval> {
        self.expire(now_ms);
        let (u, c) = (self.side(Cohort::Updated), self.side(Cohort::Control));
        let trim = g.device_trim;
        let (ud, cd) = (u.devices.len() as u64, c.devices.len() as u64);
        let (u_msgs, c_msgs) = (u.total(|a| a.messages), c.total(|a| a.messages));
        let base = |gate: Gate, un: u64, cn: u64| GateEval {
            gate,
            verdict: Verdict::Pass,
            updated: None,
            control: None,
            threshold: 0.0,
            updated_n: un,
            control_n: cn,
            updated_devices: ud,
            control_devices: cd,
            at_ms: now_ms,
        };
        // Whether both sides have enough devices and `n` samples each.
        let enough = |un: u64, cn: u64| {
            ud >= g.min_devices && cd >= g.min_devices && un >= g.min_samples && cn >= g.min_samples
        };
        let judge = |mut e: GateEval, over: bool, have: bool| {
            e.verdict = if !control_exists {
                Verdict::NoControl
            } else if !enough(e.updated_n, e.control_n) || !have {
                Verdict::Insufficient
            } else if over {
                Verdict::Failing
            } else {
                Verdict::Pass
            };
            e
        };
        let mut out = Vec::with_capacity(Gate::ALL.len());

        // Alerts per telemetry message, per device; the control's rate gets one alert's worth
        // (1 / its messages) so that a control without alerts does not make a single alert look
        // infinitely worse, and the updated side needs `min_alerts` among its kept devices.
        let mut e = base(Gate::AlertRate, u_msgs, c_msgs);
        let rate = |a: &Agg| Some(a.alerts as f64 / a.messages.max(1) as f64);
        let (ur, cr) = (u.trimmed(trim, rate), c.trimmed(trim, rate));
        e.updated = ur;
        e.control = cr;
        e.threshold = g.alert_rate * (cr.unwrap_or(0.0) + 1.0 / c_msgs.max(1) as f64);
        let kept_alerts = {
            let mut alerts: Vec<u64> = u.devices.iter().map(|a| a.alerts).collect();
            alerts.sort_unstable();
            let t = trim_count(alerts.len(), trim);
            alerts[t..alerts.len() - t].iter().sum::<u64>()
        };
        let over = kept_alerts >= g.min_alerts && ur.unwrap_or(0.0) > e.threshold;
        out.push(judge(e, over, true));

        let (ul, cl) = (u.total(Agg::latency_n), c.total(Agg::latency_n));
        let mut e = base(Gate::LatencyP95, ul, cl);
        if ul == 0 && cl == 0 {
            e.verdict = Verdict::Off;
            out.push(e);
        } else {
            let (pu, pc) = (
                u.trimmed(trim, Agg::latency_p95),
                c.trimmed(trim, Agg::latency_p95),
            );
            e.updated = pu;
            e.control = pc;
            e.threshold = g.latency_p95 * pc.unwrap_or(0.0);
            let over = pu.zip(pc).is_some_and(|(pu, pc)| pu > g.latency_p95 * pc);
            out.push(judge(e, over, pu.is_some() && pc.is_some()));
        }

        // Means: (gate, the value of a device, the factor, whether higher is worse).
        type Get = fn(&Agg) -> &Mean;
        let means: [(Gate, Get, f64, bool); 3] = [
            (Gate::FreeMemory, |a| &a.free_mem, g.free_mem, false),
            (Gate::Temperature, |a| &a.temp, g.temp, true),
            (Gate::Power, |a| &a.power, g.power, true),
        ];
        for (gate, get, factor, higher_is_worse) in means {
            let (un, cn) = (u.total(|a| get(a).n), c.total(|a| get(a).n));
            let mut e = base(gate, un, cn);
            if un == 0 && cn == 0 {
                e.verdict = Verdict::Off;
                out.push(e);
                continue;
            }
            let (uv, cv) = (
                u.trimmed(trim, |a| get(a).value()),
                c.trimmed(trim, |a| get(a).value()),
            );
            e.updated = uv;
            e.control = cv;
            let cv = cv.unwrap_or(0.0);
            e.threshold = factor * cv;
            let uv0 = uv.unwrap_or(0.0);
            let over = if higher_is_worse {
                uv0 > factor * cv
            } else {
                uv0 < factor * cv
            };
            out.push(judge(e, over, uv.is_some() && cv > 0.0));
        }

        // Predicted classes: the JS distance between the sides' robust class shares, never
        // judged below what sampling noise alone produces between samples of these sizes.
        let (un, cn) = (
            u.total(|a| a.classes.iter().sum()),
            c.total(|a| a.classes.iter().sum()),
        );
        let mut e = base(Gate::Predictions, un, cn);
        if un == 0 && cn == 0 {
            e.verdict = Verdict::Off;
            out.push(e);
        } else {
            let width = u
                .devices
                .iter()
                .chain(&c.devices)
                .map(|a| a.classes.len())
                .max()
                .unwrap_or(0);
            let ((us, u_n), (cs, c_n)) = (u.classes(trim, width), c.classes(trim, width));
            let js = metrics::js_distance(&us, &cs);
            e.updated = Some(js);
            // Classes no kept device predicts do not widen the noise threshold.
            let seen = us
                .iter()
                .zip(&cs)
                .filter(|(a, b)| **a > 0.0 || **b > 0.0)
                .count();
            e.threshold = g.prediction_js.max(self.chi2.js_noise(seen, c_n, u_n, 0.0));
            let over = js >= e.threshold;
            out.push(judge(e, over, u_n > 0 && c_n > 0));
        }

        let (un, cn) = (u.total(|a| a.confidence.n), c.total(|a| a.confidence.n));
        let mut e = base(Gate::Confidence, un, cn);
        if un == 0 && cn == 0 {
            e.verdict = Verdict::Off;
            out.push(e);
        } else {
            let (uv, cv) = (
                u.trimmed(trim, |a| a.confidence.value()),
                c.trimmed(trim, |a| a.confidence.value()),
            );
            e.updated = uv;
            e.control = cv;
            e.threshold = cv.unwrap_or(0.0) - g.confidence_drop;
            let over = uv.is_some_and(|uv| uv <= e.threshold);
            out.push(judge(e, over, uv.is_some() && cv.is_some()));
        }

        let mut e = base(Gate::Drift, u_msgs, c_msgs);
        match drift {
            _ if !g.drift => e.verdict = Verdict::Off,
            // Drift windows close after thousands of samples; until both versions have one,
            // this gate stays out of the way rather than holding every stage.
            DriftInput::Off | DriftInput::Unknown => e.verdict = Verdict::Off,
            DriftInput::Compared(cmp) => {
                let worse = cmp.is_worse();
                e.updated = Some(cmp.features.len() as f64 + f64::from(u8::from(cmp.prediction)));
                e.verdict = if !control_exists {
                    Verdict::NoControl
                } else if worse {
                    Verdict::Failing
                } else {
                    Verdict::Pass
                };
            }
        }
        out.push(e);
        out
    }
}

#[cfg(test)]
mod tests;
