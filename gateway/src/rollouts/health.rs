//! Health gates: the rollout's updated devices against its devices not updated yet (the
//! control), over the same sliding window. Comparing two cohorts at the same time, instead of
//! one cohort with its own past, is what keeps a change that hits the whole fleet (a heat wave,
//! a new season's data) from rolling a good release back.
//!
//! The window is kept as `BUCKETS` buckets per cohort; a bucket holds counts, sums, a latency
//! histogram and class counts, so memory is bounded per rollout whatever the traffic.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use fleetgate_config::Gates;
use hdrhistogram::Histogram;

use super::model::{Gate, GateEval, Verdict};
use crate::drift::engine::Comparison;
use crate::drift::metrics::{self, Chi2Table};

const BUCKETS: u64 = 10;
/// Latencies are kept to 2 significant digits (1 %) up to 10 minutes.
const LATENCY_MAX_US: u64 = 600_000_000;

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
    fn add(&mut self, v: f64) {
        self.sum += v;
        self.n += 1;
    }

    fn merge(&mut self, o: &Mean) {
        self.sum += o.sum;
        self.n += o.n;
    }

    fn value(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

#[derive(Debug, Clone)]
struct Agg {
    messages: u64,
    alerts: u64,
    latency: Histogram<u64>,
    free_mem: Mean,
    temp: Mean,
    power: Mean,
    classes: Vec<u64>,
    /// Confidence weighted by inferences.
    confidence: Mean,
}

impl Agg {
    fn new() -> Agg {
        Agg {
            messages: 0,
            alerts: 0,
            latency: Histogram::new_with_bounds(1, LATENCY_MAX_US, 2)
                .expect("valid histogram bounds"),
            free_mem: Mean::default(),
            temp: Mean::default(),
            power: Mean::default(),
            classes: Vec::new(),
            confidence: Mean::default(),
        }
    }

    fn merge(&mut self, o: &Agg) {
        self.messages += o.messages;
        self.alerts += o.alerts;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&o.latency);
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
}

#[derive(Debug)]
struct Bucket {
    start_ms: u64,
    updated: Agg,
    control: Agg,
}

impl Bucket {
    fn cohort(&mut self, c: Cohort) -> &mut Agg {
        match c {
            Cohort::Updated => &mut self.updated,
            Cohort::Control => &mut self.control,
        }
    }
}

/// One rollout's health window.
#[derive(Debug)]
pub struct Health {
    window_ms: u64,
    bucket_ms: u64,
    buckets: VecDeque<Bucket>,
    /// The last time each device was seen in a cohort.
    seen: HashMap<String, (Cohort, u64)>,
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

impl Health {
    pub fn new(window: Duration) -> Health {
        let window_ms = (window.as_millis() as u64).max(BUCKETS);
        Health {
            window_ms,
            bucket_ms: window_ms / BUCKETS,
            buckets: VecDeque::new(),
            seen: HashMap::new(),
            chi2: Chi2Table::default(),
        }
    }

    fn bucket(&mut self, now_ms: u64) -> &mut Bucket {
        let start = now_ms - now_ms % self.bucket_ms;
        if self.buckets.back().is_none_or(|b| b.start_ms < start) {
            self.buckets.push_back(Bucket {
                start_ms: start,
                updated: Agg::new(),
                control: Agg::new(),
            });
        }
        self.expire(now_ms);
        // A message stamped before the newest bucket (the clock went back) counts in it.
        self.buckets.back_mut().expect("a bucket was just ensured")
    }

    fn expire(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms);
        while self
            .buckets
            .front()
            .is_some_and(|b| b.start_ms + self.bucket_ms <= oldest)
        {
            self.buckets.pop_front();
        }
        self.seen.retain(|_, (_, at)| *at > oldest);
    }

    pub fn telemetry(&mut self, device: &str, cohort: Cohort, s: &Sample, now_ms: u64) {
        self.seen.insert(device.to_owned(), (cohort, now_ms));
        let a = self.bucket(now_ms).cohort(cohort);
        a.messages += 1;
        if let Some(l) = s.latency_us {
            a.latency
                .saturating_record(u64::from(l).clamp(1, LATENCY_MAX_US));
        }
        if let Some(v) = s.free_mem_bytes {
            a.free_mem.add(v as f64);
        }
        if let Some(v) = s.temp_c.filter(|v| v.is_finite()) {
            a.temp.add(f64::from(v));
        }
        if let Some(v) = s.power_mw.filter(|v| v.is_finite()) {
            a.power.add(f64::from(v));
        }
        if a.classes.len() < s.class_counts.len() {
            a.classes.resize(s.class_counts.len(), 0);
        }
        for (c, &k) in a.classes.iter_mut().zip(&s.class_counts) {
            *c += u64::from(k);
        }
        if let Some(c) = s.mean_confidence.filter(|c| c.is_finite()) {
            let n = u64::from(s.inferences.max(1));
            a.confidence.sum += f64::from(c) * n as f64;
            a.confidence.n += n;
        }
    }

    pub fn alert(&mut self, device: &str, cohort: Cohort, now_ms: u64) {
        self.seen
            .entry(device.to_owned())
            .or_insert((cohort, now_ms));
        self.bucket(now_ms).cohort(cohort).alerts += 1;
    }

    /// Forgets a device's cohort (it moved from control to updating).
    pub fn forget(&mut self, device: &str) {
        self.seen.remove(device);
    }

    /// Judges every gate on the current window. `control_exists`: the rollout still has devices
    /// that are not updated (else there is nothing to compare with).
    pub fn evaluate(
        &mut self,
        g: &Gates,
        now_ms: u64,
        control_exists: bool,
        drift: &DriftInput,
    ) -> Vec<GateEval> {
        self.expire(now_ms);
        let mut u = Agg::new();
        let mut c = Agg::new();
        for b in &self.buckets {
            u.merge(&b.updated);
            c.merge(&b.control);
        }
        let devices = |want: Cohort| {
            self.seen
                .values()
                .filter(|(cohort, _)| *cohort == want)
                .count() as u64
        };
        let (ud, cd) = (devices(Cohort::Updated), devices(Cohort::Control));
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

        // Alerts per telemetry message; the control's count gets +1 so that a control without
        // alerts does not make a single alert look infinitely worse.
        let mut e = base(Gate::AlertRate, u.messages, c.messages);
        let rate = |alerts: u64, msgs: u64| alerts as f64 / msgs.max(1) as f64;
        e.updated = Some(rate(u.alerts, u.messages));
        e.control = Some(rate(c.alerts, c.messages));
        e.threshold = g.alert_rate * rate(c.alerts + 1, c.messages);
        let over = u.alerts >= g.min_alerts && rate(u.alerts, u.messages) > e.threshold;
        out.push(judge(e, over, true));

        let (ul, cl) = (u.latency.len(), c.latency.len());
        let mut e = base(Gate::LatencyP95, ul, cl);
        if ul == 0 && cl == 0 {
            e.verdict = Verdict::Off;
            out.push(e);
        } else {
            let (pu, pc) = (
                u.latency.value_at_quantile(0.95) as f64,
                c.latency.value_at_quantile(0.95) as f64,
            );
            e.updated = (ul > 0).then_some(pu);
            e.control = (cl > 0).then_some(pc);
            e.threshold = g.latency_p95 * pc;
            out.push(judge(e, pu > g.latency_p95 * pc, ul > 0 && cl > 0));
        }

        // Means: (gate, updated, control, the factor, whether higher is worse).
        for (gate, um, cm, factor, higher_is_worse) in [
            (Gate::FreeMemory, u.free_mem, c.free_mem, g.free_mem, false),
            (Gate::Temperature, u.temp, c.temp, g.temp, true),
            (Gate::Power, u.power, c.power, g.power, true),
        ] {
            let mut e = base(gate, um.n, cm.n);
            if um.n == 0 && cm.n == 0 {
                e.verdict = Verdict::Off;
                out.push(e);
                continue;
            }
            e.updated = um.value();
            e.control = cm.value();
            let cv = cm.value().unwrap_or(0.0);
            e.threshold = factor * cv;
            let uv = um.value().unwrap_or(0.0);
            let over = if higher_is_worse {
                uv > factor * cv
            } else {
                uv < factor * cv
            };
            out.push(judge(e, over, um.n > 0 && cm.n > 0 && cv > 0.0));
        }

        // Predicted classes: the JS distance between the cohorts, never judged below what
        // sampling noise alone produces between samples of these sizes.
        let (un, cn): (u64, u64) = (u.classes.iter().sum(), c.classes.iter().sum());
        let mut e = base(Gate::Predictions, un, cn);
        if un == 0 && cn == 0 {
            e.verdict = Verdict::Off;
            out.push(e);
        } else {
            let width = u.classes.len().max(c.classes.len());
            let (mut uc, mut cc) = (u.classes.clone(), c.classes.clone());
            uc.resize(width, 0);
            cc.resize(width, 0);
            let js = metrics::js_distance(&metrics::shares(&uc), &metrics::shares(&cc));
            e.updated = Some(js);
            e.threshold = g.prediction_js.max(self.chi2.js_noise(width, cn, un, 0.0));
            let over = js >= e.threshold;
            out.push(judge(e, over, un > 0 && cn > 0));
        }

        let mut e = base(Gate::Confidence, u.confidence.n, c.confidence.n);
        if u.confidence.n == 0 && c.confidence.n == 0 {
            e.verdict = Verdict::Off;
            out.push(e);
        } else {
            e.updated = u.confidence.value();
            e.control = c.confidence.value();
            let cv = c.confidence.value().unwrap_or(0.0);
            e.threshold = cv - g.confidence_drop;
            let over = u.confidence.value().is_some_and(|uv| uv <= e.threshold);
            out.push(judge(e, over, u.confidence.n > 0 && c.confidence.n > 0));
        }

        let mut e = base(Gate::Drift, u.messages, c.messages);
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
