//! The drift engine: streaming windows per (model version, cohort), evaluated against the model
//! version's baseline. A pure state machine: telemetry and time go in, events come out
//! (a window closed, an alert rises or resolves); no I/O, no clock.
//!
//! - A window counts each feature's inputs on the baseline's bins (raw samples are binned here;
//!   devices that know the edges send counts), plus predicted classes and confidence. Counts
//!   merge by addition, so memory is O(bins) per feature whatever the number of samples.
//! - A window closes after `window_samples` samples of any feature, or `window` time.
//! - Verdicts are honest: no verdict below `min_samples`; a window is "over" when PSI reaches
//!   the alert threshold, which is never below what sampling noise alone produces; an alert
//!   rises when 2 of the last 3 judged windows are over and resolves when that no longer holds.
//!   p-values are never used.
//! - Every cohort's data also feeds the cohort `all`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use fleetgate_protocol::Telemetry;
use semver::Version;
use serde::{Deserialize, Serialize};

use super::baseline::{Baseline, bin_of};
use super::metrics;

/// The cohort every device belongs to.
pub const ALL: &str = "all";
/// Judged windows the alert rule looks back over, and how many of them must be over.
const LOOKBACK: usize = 3;
const OVER_NEEDED: usize = 2;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub window_samples: u64,
    pub window_ms: u64,
    pub min_samples: u64,
    pub psi_alert: f64,
    pub psi_warn_floor: f64,
    pub prediction_js_alert: f64,
    pub confidence_drop_alert: f64,
    pub reservoir: usize,
}

impl From<&fleetgate_config::Drift> for Settings {
    fn from(c: &fleetgate_config::Drift) -> Self {
        Settings {
            window_samples: c.window_samples,
            window_ms: c.window.as_millis() as u64,
            min_samples: c.min_samples,
            psi_alert: c.psi_alert,
            psi_warn_floor: c.psi_warn_floor,
            prediction_js_alert: c.prediction_js_alert,
            confidence_drop_alert: c.confidence_drop_alert,
            reservoir: c.reservoir,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamKey {
    pub model: String,
    pub version: Version,
    pub cohort: String,
}

impl std::fmt::Display for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (cohort {})",
            self.model, self.version, self.cohort
        )
    }
}

/// What one closed window showed for one feature or for the predictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Fewer than `min_samples`: not judged.
    Insufficient,
    Ok,
    /// Over the noise threshold, under the alert threshold.
    Warn,
    /// At or over the alert threshold.
    Over,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureEval {
    pub feature: u16,
    pub n: u64,
    pub psi: f64,
    pub js: f64,
    pub ks: f64,
    pub ks_bound: f64,
    pub wasserstein: f64,
    pub warn_threshold: f64,
    pub alert_threshold: f64,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionEval {
    pub n: u64,
    pub js: f64,
    pub l_inf: f64,
    pub mean_confidence: Option<f64>,
    pub confidence_change: Option<f64>,
    pub js_threshold: f64,
    pub verdict: Verdict,
}

/// One closed window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub opened_ms: u64,
    pub closed_ms: u64,
    pub features: Vec<FeatureEval>,
    pub prediction: Option<PredictionEval>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Warn,
    Alert,
}

/// Which part of a stream an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Feature(u16),
    Prediction,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Closed {
        key: StreamKey,
        evaluation: Evaluation,
    },
    Raise {
        key: StreamKey,
        subject: Subject,
        evaluation: Evaluation,
    },
    Resolve {
        key: StreamKey,
        subject: Subject,
        evaluation: Evaluation,
    },
}

/// Where one cohort is worse than another (see [`Engine::worse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// Features drifted in the first cohort and not in the second.
    pub features: Vec<u16>,
    /// Predictions drifted (or confidence fell) in the first cohort and not in the second.
    pub prediction: bool,
}

impl Comparison {
    pub fn is_worse(&self) -> bool {
        !self.features.is_empty() || self.prediction
    }
}

/// A raw input kept for retraining (see [`Engine::reservoir`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub device: String,
    pub received_ms: u64,
    pub values: Vec<f32>,
    pub prediction: Option<u16>,
    pub confidence: Option<f32>,
}

#[derive(Debug, Clone)]
struct FeatureWindow {
    counts: Vec<u64>,
    n: u64,
    min: f64,
    max: f64,
}

#[derive(Debug, Clone)]
struct Window {
    features: Vec<FeatureWindow>,
    classes: Vec<u64>,
    confidence_sum: f64,
    confidence_n: u64,
}

impl Window {
    fn new(baseline: &Baseline) -> Window {
        Window {
            features: baseline
                .features
                .iter()
                .map(|f| FeatureWindow {
                    counts: vec![0; f.edges.len() + 1],
                    n: 0,
                    min: f64::INFINITY,
                    max: f64::NEG_INFINITY,
                })
                .collect(),
            classes: Vec::new(),
            confidence_sum: 0.0,
            confidence_n: 0,
        }
    }

    /// Empties the window, keeping its allocations.
    fn clear(&mut self) {
        for f in &mut self.features {
            f.counts.fill(0);
            (f.n, f.min, f.max) = (0, f64::INFINITY, f64::NEG_INFINITY);
        }
        self.classes.fill(0);
        (self.confidence_sum, self.confidence_n) = (0.0, 0);
    }

    fn samples(&self) -> u64 {
        let features = self.features.iter().map(|f| f.n).max().unwrap_or(0);
        features.max(self.classes.iter().sum())
    }
}

/// Recent over/not-over verdicts of one subject, and its status.
#[derive(Debug, Clone)]
struct Track {
    recent: VecDeque<bool>,
    status: Status,
}

impl Track {
    fn new() -> Track {
        Track {
            recent: VecDeque::with_capacity(LOOKBACK),
            status: Status::Ok,
        }
    }

    /// Adds a verdict; returns whether the alert started (`Some(true)`) or ended (`Some(false)`).
    fn judge(&mut self, verdict: Verdict) -> Option<bool> {
        if verdict == Verdict::Insufficient {
            return None;
        }
        if self.recent.len() == LOOKBACK {
            self.recent.pop_front();
        }
        self.recent.push_back(verdict == Verdict::Over);
        let alerting = self.recent.iter().filter(|o| **o).count() >= OVER_NEEDED;
        let was = self.status == Status::Alert;
        self.status = if alerting {
            Status::Alert
        } else if matches!(verdict, Verdict::Warn | Verdict::Over) {
            Status::Warn
        } else {
            Status::Ok
        };
        (alerting != was).then_some(alerting)
    }
}

#[derive(Debug)]
struct Reservoir {
    rows: Vec<Row>,
    seen: u64,
}

#[derive(Debug)]
struct Stream {
    baseline: Arc<Baseline>,
    opened_ms: u64,
    window: Window,
    features: Vec<Track>,
    prediction: Track,
    last: Option<Evaluation>,
    reservoir: Reservoir,
}

/// A read-only view of a stream for the API.
#[derive(Debug, Clone)]
pub struct StreamView<'a> {
    pub key: &'a StreamKey,
    pub baseline: &'a Arc<Baseline>,
    pub window_samples: u64,
    pub opened_ms: u64,
    pub feature_status: Vec<Status>,
    pub prediction_status: Status,
    pub last: Option<&'a Evaluation>,
}

#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    baselines: HashMap<(String, Version), Option<Arc<Baseline>>>,
    streams: BTreeMap<StreamKey, Stream>,
    /// Verdict history from before a restart, for streams not created yet.
    restored: HashMap<StreamKey, Vec<Evaluation>>,
    rng: u64,
    chi2: metrics::Chi2Table,
}

/// What one telemetry message did, beyond events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Samples whose length, or bin counts whose shape, did not match the baseline.
    pub mismatched: u64,
}

impl Engine {
    pub fn new(settings: Settings, seed: u64) -> Engine {
        Engine {
            settings,
            baselines: HashMap::new(),
            streams: BTreeMap::new(),
            restored: HashMap::new(),
            rng: seed | 1,
            chi2: metrics::Chi2Table::default(),
        }
    }

    /// Whether the baseline of this model version has been looked up.
    pub fn knows(&self, model: &str, version: &Version) -> bool {
        self.baselines
            .contains_key(&(model.to_owned(), version.clone()))
    }

    /// A model version's baseline, if it has one and it was set.
    pub fn baseline(&self, model: &str, version: &Version) -> Option<Arc<Baseline>> {
        self.baselines
            .get(&(model.to_owned(), version.clone()))
            .cloned()
            .flatten()
    }

    /// Sets (or clears) a model version's baseline; its windows start over.
    pub fn set_baseline(
        &mut self,
        model: &str,
        version: &Version,
        baseline: Option<Arc<Baseline>>,
    ) {
        self.streams
            .retain(|k, _| !(k.model == model && k.version == *version));
        self.baselines
            .insert((model.to_owned(), version.clone()), baseline);
    }

    /// Verdict history loaded from storage after a restart (oldest first).
    pub fn restore(&mut self, key: StreamKey, evaluations: Vec<Evaluation>) {
        self.restored.insert(key, evaluations);
    }

    fn random(&mut self) -> u64 {
        // SplitMix64: deterministic for a seed, good enough for reservoir sampling.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Feeds one telemetry message from `device` in `cohort`.
    pub fn observe(
        &mut self,
        cohort: &str,
        device: &str,
        tel: &Telemetry,
        now_ms: u64,
    ) -> (Vec<Event>, Observed) {
        let mut events = Vec::new();
        let mut observed = Observed::default();
        let Some(model) = &tel.model else {
            return (events, observed);
        };
        let Some(Some(baseline)) = self
            .baselines
            .get(&(model.name.clone(), model.version.clone()))
            .cloned()
        else {
            return (events, observed);
        };
        let mut cohorts = vec![ALL.to_owned()];
        if cohort != ALL {
            cohorts.push(cohort.to_owned());
        }
        for cohort in cohorts {
            let key = StreamKey {
                model: model.name.clone(),
                version: model.version.clone(),
                cohort,
            };
            if !self.streams.contains_key(&key) {
                let stream = self.new_stream(&key, baseline.clone(), now_ms);
                self.streams.insert(key.clone(), stream);
            }
            let reservoir = self.settings.reservoir;
            let draws: Vec<u64> = (0..tel.samples.len()).map(|_| self.random()).collect();
            let Some(stream) = self.streams.get_mut(&key) else {
                continue;
            };
            observed.mismatched += stream.add(tel, device, now_ms, reservoir, &draws);
            if stream.window.samples() >= self.settings.window_samples {
                events.extend(Self::close(
                    &self.settings,
                    &self.chi2,
                    &key,
                    stream,
                    now_ms,
                ));
            }
        }
        (events, observed)
    }

    fn new_stream(&mut self, key: &StreamKey, baseline: Arc<Baseline>, now_ms: u64) -> Stream {
        let mut stream = Stream {
            window: Window::new(&baseline),
            features: baseline.features.iter().map(|_| Track::new()).collect(),
            prediction: Track::new(),
            opened_ms: now_ms,
            last: None,
            reservoir: Reservoir {
                rows: Vec::new(),
                seen: 0,
            },
            baseline,
        };
        for evaluation in self.restored.remove(key).unwrap_or_default() {
            for f in &evaluation.features {
                if let Some(track) = stream.features.get_mut(usize::from(f.feature)) {
                    track.judge(f.verdict);
                }
            }
            if let Some(p) = &evaluation.prediction {
                stream.prediction.judge(p.verdict);
            }
            stream.last = Some(evaluation);
        }
        stream
    }

    /// Closes windows that have been open for `window` time.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Event> {
        let mut events = Vec::new();
        for (key, stream) in &mut self.streams {
            if now_ms.saturating_sub(stream.opened_ms) < self.settings.window_ms {
                continue;
            }
            if stream.window.samples() == 0 {
                stream.opened_ms = now_ms;
                continue;
            }
            events.extend(Self::close(&self.settings, &self.chi2, key, stream, now_ms));
        }
        events
    }

    fn close(
        settings: &Settings,
        chi2: &metrics::Chi2Table,
        key: &StreamKey,
        stream: &mut Stream,
        now_ms: u64,
    ) -> Vec<Event> {
        let evaluation = stream.evaluate(settings, chi2, now_ms);
        let mut events = vec![Event::Closed {
            key: key.clone(),
            evaluation: evaluation.clone(),
        }];
        for f in &evaluation.features {
            if let Some(change) = stream.features[usize::from(f.feature)].judge(f.verdict) {
                let subject = Subject::Feature(f.feature);
                let (key, evaluation) = (key.clone(), evaluation.clone());
                events.push(if change {
                    Event::Raise {
                        key,
                        subject,
                        evaluation,
                    }
                } else {
                    Event::Resolve {
                        key,
                        subject,
                        evaluation,
                    }
                });
            }
        }
        if let Some(p) = &evaluation.prediction
            && let Some(change) = stream.prediction.judge(p.verdict)
        {
            let (key, evaluation) = (key.clone(), evaluation.clone());
            let subject = Subject::Prediction;
            events.push(if change {
                Event::Raise {
                    key,
                    subject,
                    evaluation,
                }
            } else {
                Event::Resolve {
                    key,
                    subject,
                    evaluation,
                }
            });
        }
        stream.window.clear();
        stream.opened_ms = now_ms;
        stream.last = Some(evaluation);
        events
    }

    /// Whether cohort `a` looks worse than cohort `b` of the same model version in their
    /// latest closed windows: for some feature (or for the predictions) `a` is over its alert
    /// threshold while `b` is not, and `a`'s value exceeds `b`'s by more than `a`'s noise
    /// threshold. A drift both cohorts share (the environment changed for everyone) does not
    /// make one worse than the other. `None` while either cohort has no judged window.
    pub fn worse(&self, a: &StreamKey, b: &StreamKey) -> Option<Comparison> {
        let (ea, eb) = (
            self.streams.get(a)?.last.as_ref()?,
            self.streams.get(b)?.last.as_ref()?,
        );
        let judged = |v: Verdict| v != Verdict::Insufficient;
        let mut features = Vec::new();
        for fa in &ea.features {
            let Some(fb) = eb.features.iter().find(|f| f.feature == fa.feature) else {
                continue;
            };
            if !judged(fa.verdict) || !judged(fb.verdict) {
                continue;
            }
            if fa.verdict == Verdict::Over
                && fb.verdict != Verdict::Over
                && fa.psi - fb.psi >= fa.warn_threshold
            {
                features.push(fa.feature);
            }
        }
        let prediction = match (&ea.prediction, &eb.prediction) {
            (Some(pa), Some(pb)) if judged(pa.verdict) && judged(pb.verdict) => {
                pa.verdict == Verdict::Over && pb.verdict != Verdict::Over
            }
            _ => false,
        };
        let judged_any = ea.features.iter().any(|f| judged(f.verdict))
            || ea.prediction.as_ref().is_some_and(|p| judged(p.verdict));
        judged_any.then_some(Comparison {
            features,
            prediction,
        })
    }

    pub fn streams(&self) -> impl Iterator<Item = StreamView<'_>> {
        self.streams.iter().map(|(key, s)| StreamView {
            key,
            baseline: &s.baseline,
            window_samples: s.window.samples(),
            opened_ms: s.opened_ms,
            feature_status: s.features.iter().map(|t| t.status).collect(),
            prediction_status: s.prediction.status,
            last: s.last.as_ref(),
        })
    }

    pub fn stream(&self, key: &StreamKey) -> Option<StreamView<'_>> {
        self.streams().find(|v| v.key == key)
    }

    /// A uniform sample of the raw inputs this stream has seen (for retraining).
    pub fn reservoir(&self, key: &StreamKey) -> Option<(&Arc<Baseline>, &[Row])> {
        self.streams
            .get(key)
            .map(|s| (&s.baseline, s.reservoir.rows.as_slice()))
    }
}

impl Stream {
    /// Adds a message to the window and the reservoir; returns how many parts did not fit.
    fn add(
        &mut self,
        tel: &Telemetry,
        device: &str,
        now_ms: u64,
        reservoir: usize,
        draws: &[u64],
    ) -> u64 {
        let mut mismatched = 0;
        let features = &self.baseline.features;
        for (sample, draw) in tel.samples.iter().zip(draws) {
            if sample.values.len() != features.len() {
                mismatched += 1;
                continue;
            }
            for ((fw, fb), &v) in self
                .window
                .features
                .iter_mut()
                .zip(features)
                .zip(&sample.values)
            {
                let v = f64::from(v);
                fw.counts[bin_of(&fb.edges, v)] += 1;
                fw.n += 1;
                fw.min = fw.min.min(v);
                fw.max = fw.max.max(v);
            }
            // Algorithm R: every row seen so far is in the sample with the same probability.
            let r = &mut self.reservoir;
            r.seen += 1;
            let row = Row {
                device: device.to_owned(),
                received_ms: now_ms,
                values: sample.values.clone(),
                prediction: sample.prediction,
                confidence: sample.confidence,
            };
            if r.rows.len() < reservoir {
                r.rows.push(row);
            } else if let Some(slot) = r.rows.get_mut((draw % r.seen) as usize) {
                *slot = row;
            }
        }
        for bins in &tel.bins {
            match self.window.features.get_mut(usize::from(bins.feature)) {
                Some(fw) if fw.counts.len() == bins.counts.len() => {
                    for (c, &b) in fw.counts.iter_mut().zip(&bins.counts) {
                        *c += u64::from(b);
                    }
                    fw.n += bins.counts.iter().map(|&b| u64::from(b)).sum::<u64>();
                }
                _ => mismatched += 1,
            }
        }
        if let Some(m) = &tel.model {
            if self.window.classes.len() < m.class_counts.len() {
                self.window.classes.resize(m.class_counts.len(), 0);
            }
            for (c, &k) in self.window.classes.iter_mut().zip(&m.class_counts) {
                *c += u64::from(k);
            }
            if let Some(mc) = m.mean_confidence {
                let n = u64::from(m.inferences.max(1));
                self.window.confidence_sum += f64::from(mc) * n as f64;
                self.window.confidence_n += n;
            }
        }
        mismatched
    }

    fn evaluate(&self, s: &Settings, chi2: &metrics::Chi2Table, now_ms: u64) -> Evaluation {
        let features = self
            .baseline
            .features
            .iter()
            .zip(&self.window.features)
            .enumerate()
            .map(|(i, (fb, fw))| {
                let current = metrics::shares(&fw.counts);
                let warn = chi2.psi_noise(fb.reference.len(), fb.n, fw.n, s.psi_warn_floor);
                let alert = s.psi_alert.max(warn);
                let (psi, js, (ks, ks_bound), w) = if fw.n == 0 {
                    (0.0, 0.0, (0.0, 0.0), 0.0)
                } else {
                    let (lo, hi) = (fb.min.min(fw.min), fb.max.max(fw.max));
                    (
                        metrics::psi(&fb.reference, &current),
                        metrics::js_distance(&fb.reference, &current),
                        metrics::ks(&fb.reference, &current),
                        metrics::wasserstein(&fb.reference, &current, &fb.edges, lo, hi, fb.std),
                    )
                };
                let verdict = if fw.n < s.min_samples {
                    Verdict::Insufficient
                } else if psi >= alert {
                    Verdict::Over
                } else if psi >= warn {
                    Verdict::Warn
                } else {
                    Verdict::Ok
                };
                FeatureEval {
                    feature: i as u16,
                    n: fw.n,
                    psi,
                    js,
                    ks,
                    ks_bound,
                    wasserstein: w,
                    warn_threshold: warn,
                    alert_threshold: alert,
                    verdict,
                }
            })
            .collect();
        let prediction = self.baseline.prediction.as_ref().map(|pb| {
            let n: u64 = self.window.classes.iter().sum();
            let width = pb.classes.len().max(self.window.classes.len());
            let mut reference = pb.classes.clone();
            reference.resize(width, 0.0);
            let mut counts = self.window.classes.clone();
            counts.resize(width, 0);
            let current = metrics::shares(&counts);
            let noise = chi2.js_noise(width, pb.n, n, 0.0);
            let js_threshold = s.prediction_js_alert.max(noise);
            let js = if n == 0 {
                0.0
            } else {
                metrics::js_distance(&reference, &current)
            };
            let mean_confidence = (self.window.confidence_n > 0)
                .then(|| self.window.confidence_sum / self.window.confidence_n as f64);
            let confidence_change = mean_confidence.zip(pb.mean_confidence).map(|(c, r)| c - r);
            let dropped = confidence_change.is_some_and(|d| d <= -s.confidence_drop_alert);
            let verdict = if n < s.min_samples {
                Verdict::Insufficient
            } else if js >= js_threshold || dropped {
                Verdict::Over
            } else if js >= noise {
                Verdict::Warn
            } else {
                Verdict::Ok
            };
            PredictionEval {
                n,
                js,
                l_inf: if n == 0 {
                    0.0
                } else {
                    metrics::l_inf(&reference, &current)
                },
                mean_confidence,
                confidence_change,
                js_threshold,
                verdict,
            }
        });
        Evaluation {
            opened_ms: self.opened_ms,
            closed_ms: now_ms,
            features,
            prediction,
        }
    }
}

#[cfg(test)]
mod tests;
