//! The drift engine: streaming windows per (model version, cohort), evaluated against the model
//! version's baseline. A pure state machine: telemetry and time go in, events come out
//! (a window closed, an alert rises or resolves); no I/O, no clock.
//!
//! - Every subject (each feature, and the predictions) has its own window, which closes on its
//!   own count (`window_samples`) or after `window` time: a feature fed by a few raw samples is
//!   judged on its own samples, not cut short by the far more numerous predictions.
//! - No device holds more than `device_share` of a window ([`super::capped`]), and a class the
//!   baseline lacks counts only when two devices report it: one device cannot move a verdict.
//! - Verdicts are honest: no verdict below `min_samples`; a window is "over" when its statistic
//!   reaches the practical floor and the `1 - false_alarm` quantile of its null distribution,
//!   simulated for the actual bins, n and m ([`super::null`]). p-values are never used.
//! - Alerts have hysteresis: one per drift episode. It rises when 2 of the last 3 judged
//!   windows are over, or (sequential option) when a CUSUM of the statistic's excess over its
//!   null mean reaches its limit, and resolves after `resolve_after` clean windows in a row.
//! - Every cohort's data also feeds the cohort `all`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use fleetgate_protocol::Telemetry;
use semver::Version;
use serde::{Deserialize, Serialize};

use super::baseline::{Baseline, bin_of};
use super::capped::{Capped, Dev, Quota, water_level};
use super::metrics;
use super::null::{NullTable, Statistic};

/// The cohort every device belongs to.
pub const ALL: &str = "all";
/// Judged windows the alert rule looks back over, and how many of them must be over.
const LOOKBACK: usize = 3;
const OVER_NEEDED: usize = 2;
/// Version of [`Engine::save`]'s encoding.
const STATE_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub window_samples: u64,
    pub window_ms: u64,
    pub min_samples: u64,
    pub psi_alert: f64,
    pub psi_warn_floor: f64,
    pub prediction_js_alert: f64,
    pub confidence_drop_alert: f64,
    /// Share of windows drawn like the baseline allowed to be "over" by chance.
    pub false_alarm: f64,
    /// Clean windows in a row that resolve an alert.
    pub resolve_after: u32,
    /// Also raise on a CUSUM of the per-window statistic (small lasting drifts).
    pub sequential: bool,
    /// CUSUM allowance and limit, as multiples of the alert floor (`psi_alert`,
    /// `prediction_js_alert`).
    pub cusum_k: f64,
    pub cusum_h: f64,
    /// Most of a window one device may hold (1: no cap).
    pub device_share: f64,
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
            false_alarm: c.false_alarm,
            resolve_after: c.resolve_after,
            sequential: c.sequential,
            cusum_k: c.cusum_k,
            cusum_h: c.cusum_h,
            device_share: c.device_share,
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

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Insufficient => "insufficient",
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Over => "over",
        }
    }
}

/// One feature's closed window. Stored (drift window record version 1): never reorder.
/// Metrics that cannot be computed are NaN here and `null` in the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureEval {
    pub feature: u16,
    /// Samples after the per-device cap (rounded).
    pub n: u64,
    pub psi: f64,
    pub js: f64,
    pub ks: f64,
    pub ks_bound: f64,
    /// In robust reference standard deviations; NaN for a constant reference.
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

/// The subjects that closed at one moment (features close on their own counts, so a closing
/// need not hold every feature).
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
    /// No judged window yet, or the last window had too few samples.
    Insufficient,
    Ok,
    Warn,
    Alert,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Insufficient => "insufficient",
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Alert => "alert",
        }
    }

    /// For `/metrics`: -1 insufficient, 0 ok, 1 warn, 2 alert.
    pub fn gauge(self) -> i64 {
        match self {
            Status::Insufficient => -1,
            Status::Ok => 0,
            Status::Warn => 1,
            Status::Alert => 2,
        }
    }

    /// Severity order for "the worst of a stream": alert, warn, ok, insufficient.
    pub fn rank(self) -> u8 {
        match self {
            Status::Insufficient => 0,
            Status::Ok => 1,
            Status::Warn => 2,
            Status::Alert => 3,
        }
    }
}

/// Which part of a stream an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Feature(u16),
    Prediction,
}

/// What raised an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// 2 of the last 3 judged windows over.
    Windows,
    /// The CUSUM reached its limit.
    Cusum,
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
        trigger: Trigger,
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

/// Over/not-over verdicts of one subject, its alert episode and its CUSUM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Track {
    recent: VecDeque<bool>,
    alerting: bool,
    /// Clean judged windows in a row (while alerting).
    clean: u32,
    cusum: f64,
    last: Option<Verdict>,
}

/// What the CUSUM adds from one window: the statistic's excess over its null mean, less the
/// allowance `k`; one window adds at most half the limit `h`, so no single window raises.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Excess {
    excess: f64,
    k: f64,
    h: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    Raise(Trigger),
    Resolve,
}

impl Track {
    fn status(&self) -> Status {
        if self.alerting {
            return Status::Alert;
        }
        match self.last {
            None | Some(Verdict::Insufficient) => Status::Insufficient,
            Some(Verdict::Ok) => Status::Ok,
            Some(Verdict::Warn | Verdict::Over) => Status::Warn,
        }
    }

    fn judge(&mut self, verdict: Verdict, cusum: Option<Excess>, s: &Settings) -> Option<Change> {
        self.last = Some(verdict);
        if verdict == Verdict::Insufficient {
            return None;
        }
        if self.recent.len() == LOOKBACK {
            self.recent.pop_front();
        }
        self.recent.push_back(verdict == Verdict::Over);
        let adds = match cusum.filter(|_| s.sequential) {
            Some(c) => {
                self.cusum = (self.cusum + (c.excess - c.k).min(c.h / 2.0)).max(0.0);
                c.excess > c.k
            }
            None => false,
        };
        let clean = verdict == Verdict::Ok && !adds;
        if self.alerting {
            self.clean = if clean { self.clean + 1 } else { 0 };
            if self.clean >= s.resolve_after {
                *self = Track {
                    last: Some(verdict),
                    ..Track::default()
                };
                return Some(Change::Resolve);
            }
            return None;
        }
        let by_windows = self.recent.iter().filter(|o| **o).count() >= OVER_NEEDED;
        let by_cusum = cusum.is_some_and(|c| s.sequential && self.cusum >= c.h);
        if by_windows || by_cusum {
            self.alerting = true;
            self.clean = 0;
            self.cusum = 0.0;
            return Some(Change::Raise(if by_windows {
                Trigger::Windows
            } else {
                Trigger::Cusum
            }));
        }
        None
    }
}

/// One subject's open window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Window {
    opened_ms: u64,
    counts: Capped,
    /// Predictions only: each device's confidence sum and count in this window.
    confidence: HashMap<Dev, (f64, u64)>,
    /// Predictions only: classes the baseline lacks, with the first device that reported
    /// each and whether another did too.
    new_classes: HashMap<u16, (Dev, bool)>,
    track: Track,
}

impl Window {
    fn new(len: usize, now_ms: u64) -> Window {
        Window {
            opened_ms: now_ms,
            counts: Capped::new(len),
            confidence: HashMap::new(),
            new_classes: HashMap::new(),
            track: Track::default(),
        }
    }

    fn clear(&mut self, now_ms: u64) {
        self.counts.clear();
        self.confidence.clear();
        self.new_classes.clear();
        self.opened_ms = now_ms;
    }

    fn due(&self, s: &Settings, now_ms: u64) -> bool {
        !self.counts.is_empty()
            && (self.counts.capped_total >= s.window_samples
                || now_ms.saturating_sub(self.opened_ms) >= s.window_ms)
    }
}

#[derive(Debug, Clone, Default)]
struct Reservoir {
    rows: Vec<Row>,
    seen: u64,
}

#[derive(Debug)]
struct Stream {
    baseline: Arc<Baseline>,
    features: Vec<Window>,
    prediction: Option<Window>,
    /// The last closed window of each feature, and of the predictions.
    last_features: Vec<Option<FeatureEval>>,
    last_prediction: Option<PredictionEval>,
    /// The last closing (any subjects).
    last: Option<Evaluation>,
    /// When each device last sent to this stream, kept for `window` time: the share cap relaxes
    /// to 1/k for k devices, and k counts the devices of the recent past, not only those of the
    /// open window, so a device that sends first cannot fill (or close) a window alone.
    seen: HashMap<Dev, u64>,
    reservoir: Reservoir,
    /// Changed since the last [`Engine::save`].
    dirty: bool,
}

/// A read-only view of one subject for the API.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectView {
    pub status: Status,
    /// Samples in the open window (before the cap), and when it opened.
    pub open_samples: u64,
    pub opened_ms: u64,
    /// The CUSUM statistic (0 when the sequential option is off).
    pub cusum: f64,
    /// Clean windows in a row while an alert is open.
    pub clean_windows: u32,
}

/// A read-only view of a stream for the API.
#[derive(Debug, Clone)]
pub struct StreamView<'a> {
    pub key: &'a StreamKey,
    pub baseline: &'a Arc<Baseline>,
    pub features: Vec<SubjectView>,
    pub prediction: Option<SubjectView>,
    pub last_features: &'a [Option<FeatureEval>],
    pub last_prediction: Option<&'a PredictionEval>,
    pub last: Option<&'a Evaluation>,
}

impl StreamView<'_> {
    /// The feature statuses, in the baseline's order.
    pub fn feature_status(&self) -> Vec<Status> {
        self.features.iter().map(|f| f.status).collect()
    }

    pub fn prediction_status(&self) -> Status {
        self.prediction
            .as_ref()
            .map_or(Status::Insufficient, |p| p.status)
    }
}

#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    /// Baselines looked up, by model and version (`None`: the version has none). Nested, so
    /// that the lookup for every message needs no key of its own.
    baselines: HashMap<String, HashMap<Version, Option<Arc<Baseline>>>>,
    streams: BTreeMap<StreamKey, Stream>,
    /// Verdict history from before a restart, for streams not created yet.
    restored: HashMap<StreamKey, Vec<Evaluation>>,
    /// Saved state from before a restart, for streams not created yet.
    saved: HashMap<StreamKey, Vec<u8>>,
    devs: HashMap<String, Dev>,
    names: Vec<String>,
    rng: u64,
    chi2: metrics::Chi2Table,
    nulls: NullTable,
}

/// What one telemetry message did, beyond events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Samples whose length, or bin counts whose shape, did not match the baseline (once per
    /// message, however many cohorts it feeds).
    pub mismatched: u64,
}

/// One message, binned once for every cohort it feeds.
#[derive(Debug, Default)]
struct Contribution {
    features: Vec<Option<Vec<u64>>>,
    classes: Vec<u64>,
    confidence: Option<(f64, u64)>,
    rows: Vec<usize>,
}

impl Engine {
    pub fn new(settings: Settings, seed: u64) -> Engine {
        Engine {
            settings,
            baselines: HashMap::new(),
            streams: BTreeMap::new(),
            restored: HashMap::new(),
            saved: HashMap::new(),
            devs: HashMap::new(),
            names: Vec::new(),
            rng: seed | 1,
            chi2: metrics::Chi2Table::default(),
            nulls: NullTable::default(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether the baseline of this model version has been looked up.
    pub fn knows(&self, model: &str, version: &Version) -> bool {
        self.cached(model, version).is_some()
    }

    fn cached(&self, model: &str, version: &Version) -> Option<&Option<Arc<Baseline>>> {
        self.baselines.get(model)?.get(version)
    }

    /// Model versions whose baseline lookup is cached.
    pub fn known_versions(&self) -> usize {
        self.baselines.values().map(HashMap::len).sum()
    }

    /// A model version's baseline, if it has one and it was set.
    pub fn baseline(&self, model: &str, version: &Version) -> Option<Arc<Baseline>> {
        self.cached(model, version).cloned().flatten()
    }

    /// Sets (or clears) a model version's baseline; its windows start over.
    pub fn set_baseline(
        &mut self,
        model: &str,
        version: &Version,
        baseline: Option<Arc<Baseline>>,
    ) {
        // A saved state waiting for its stream stays: the baseline is looked up again after a
        // restart, and a state counted on another baseline is refused by its fingerprint.
        self.streams
            .retain(|k, _| !(k.model == model && k.version == *version));
        self.baselines
            .entry(model.to_owned())
            .or_default()
            .insert(version.clone(), baseline);
    }

    /// Forgets every model version looked up without a baseline (they are looked up again
    /// when seen); returns how many. Versions with a baseline stay: the registry bounds them.
    pub fn forget_unknown_versions(&mut self) -> usize {
        let before = self.known_versions();
        for versions in self.baselines.values_mut() {
            versions.retain(|_, b| b.is_some());
        }
        self.baselines.retain(|_, versions| !versions.is_empty());
        before - self.known_versions()
    }

    /// Verdict history loaded from storage after a restart (oldest first): used for streams
    /// that have no saved state (a database written before states were saved).
    pub fn restore(&mut self, key: StreamKey, evaluations: Vec<Evaluation>) {
        self.restored.insert(key, evaluations);
    }

    /// A stream's saved state (see [`Engine::save`]), applied when the stream is created.
    pub fn restore_state(&mut self, key: StreamKey, state: Vec<u8>) {
        self.saved.insert(key, state);
    }

    fn dev(&mut self, device: &str) -> Dev {
        if let Some(d) = self.devs.get(device) {
            return *d;
        }
        let d = self.names.len() as Dev;
        self.names.push(device.to_owned());
        self.devs.insert(device.to_owned(), d);
        d
    }

    fn random(&mut self) -> u64 {
        // SplitMix64: deterministic for a seed, good enough for reservoir sampling.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Bins a message once: per feature its counts, the predicted classes (the class counts,
    /// or the samples' predictions when the message has none) and the confidence.
    fn contribution(baseline: &Baseline, tel: &Telemetry, observed: &mut Observed) -> Contribution {
        let features = &baseline.features;
        let mut c = Contribution {
            features: vec![None; features.len()],
            ..Contribution::default()
        };
        for (i, sample) in tel.samples.iter().enumerate() {
            if sample.values.len() != features.len() {
                observed.mismatched += 1;
                continue;
            }
            for ((slot, fb), &v) in c.features.iter_mut().zip(features).zip(&sample.values) {
                let counts = slot.get_or_insert_with(|| vec![0; fb.edges.len() + 1]);
                counts[bin_of(&fb.edges, f64::from(v))] += 1;
            }
            c.rows.push(i);
        }
        for bins in &tel.bins {
            match features.get(usize::from(bins.feature)) {
                Some(fb) if fb.edges.len() + 1 == bins.counts.len() => {
                    let slot = &mut c.features[usize::from(bins.feature)];
                    let counts = slot.get_or_insert_with(|| vec![0; bins.counts.len()]);
                    for (a, &b) in counts.iter_mut().zip(&bins.counts) {
                        *a += u64::from(b);
                    }
                }
                _ => observed.mismatched += 1,
            }
        }
        let model = tel.model.as_ref();
        match model.filter(|m| !m.class_counts.is_empty()) {
            Some(m) => c.classes = m.class_counts.iter().map(|&k| u64::from(k)).collect(),
            None => {
                for p in tel.samples.iter().filter_map(|s| s.prediction) {
                    let p = usize::from(p);
                    if c.classes.len() <= p {
                        c.classes.resize(p + 1, 0);
                    }
                    c.classes[p] += 1;
                }
            }
        }
        // Confidences outside 0..=1 are refused at decoding; one that gets here is left out.
        let plausible = |c: &f32| (0.0..=1.0).contains(c);
        c.confidence =
            match model.and_then(|m| m.mean_confidence.filter(plausible).map(|mc| (m, mc))) {
                Some((m, mc)) => {
                    let n = u64::from(m.inferences.max(1));
                    Some((f64::from(mc) * n as f64, n))
                }
                None => {
                    let conf: Vec<f64> = tel
                        .samples
                        .iter()
                        .filter_map(|s| s.confidence.filter(plausible).map(f64::from))
                        .collect();
                    (!conf.is_empty()).then(|| (conf.iter().sum(), conf.len() as u64))
                }
            };
        c
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
        let Some(Some(baseline)) = self.cached(&model.name, &model.version).cloned() else {
            return (events, observed);
        };
        let contribution = Self::contribution(&baseline, tel, &mut observed);
        let dev = self.dev(device);
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
            let draws: Vec<u64> = contribution.rows.iter().map(|_| self.random()).collect();
            let Some(stream) = self.streams.get_mut(&key) else {
                continue;
            };
            stream.add(
                &self.settings,
                &contribution,
                dev,
                tel,
                device,
                now_ms,
                &draws,
            );
            let due = stream.due(&self.settings, now_ms, false);
            if !due.is_empty() {
                events.extend(Self::close(
                    &self.settings,
                    &self.chi2,
                    &mut self.nulls,
                    &key,
                    stream,
                    &due,
                    now_ms,
                ));
            }
        }
        (events, observed)
    }

    fn new_stream(&mut self, key: &StreamKey, baseline: Arc<Baseline>, now_ms: u64) -> Stream {
        let classes = baseline.prediction.as_ref().map(|p| p.classes.len());
        let mut stream = Stream {
            features: baseline
                .features
                .iter()
                .map(|f| Window::new(f.edges.len() + 1, now_ms))
                .collect(),
            prediction: classes.map(|c| Window::new(c, now_ms)),
            last_features: vec![None; baseline.features.len()],
            last_prediction: None,
            last: None,
            seen: HashMap::new(),
            reservoir: Reservoir::default(),
            dirty: false,
            baseline,
        };
        if let Some(bytes) = self.saved.remove(key) {
            match self.load(&mut stream, &bytes) {
                Ok(()) => {
                    self.restored.remove(key);
                    return stream;
                }
                Err(e) => tracing::warn!(stream = %key, error = %e, "saved drift state not used"),
            }
        }
        for evaluation in self.restored.remove(key).unwrap_or_default() {
            for f in &evaluation.features {
                let i = usize::from(f.feature);
                if let Some(subject) = stream.features.get_mut(i) {
                    subject.track.judge(f.verdict, None, &self.settings);
                    stream.last_features[i] = Some(f.clone());
                }
            }
            if let (Some(p), Some(subject)) = (&evaluation.prediction, &mut stream.prediction) {
                subject.track.judge(p.verdict, None, &self.settings);
                stream.last_prediction = Some(p.clone());
            }
            stream.last = Some(evaluation);
        }
        stream
    }

    /// Closes windows that have been open for `window` time.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Event> {
        let mut events = Vec::new();
        for (key, stream) in &mut self.streams {
            let due = stream.due(&self.settings, now_ms, true);
            if !due.is_empty() {
                events.extend(Self::close(
                    &self.settings,
                    &self.chi2,
                    &mut self.nulls,
                    key,
                    stream,
                    &due,
                    now_ms,
                ));
            }
        }
        events
    }

    fn close(
        settings: &Settings,
        chi2: &metrics::Chi2Table,
        nulls: &mut NullTable,
        key: &StreamKey,
        stream: &mut Stream,
        due: &[Subject],
        now_ms: u64,
    ) -> Vec<Event> {
        let mut evaluation = Evaluation {
            opened_ms: now_ms,
            closed_ms: now_ms,
            features: Vec::new(),
            prediction: None,
        };
        let mut changes = Vec::new();
        for &subject in due {
            match subject {
                Subject::Feature(i) => {
                    let idx = usize::from(i);
                    let (eval, excess, opened) =
                        stream.evaluate_feature(settings, chi2, nulls, idx);
                    let s = &mut stream.features[idx];
                    if let Some(change) = s.track.judge(eval.verdict, excess, settings) {
                        changes.push((subject, change));
                    }
                    s.clear(now_ms);
                    evaluation.opened_ms = evaluation.opened_ms.min(opened);
                    stream.last_features[idx] = Some(eval.clone());
                    evaluation.features.push(eval);
                }
                Subject::Prediction => {
                    let Some((eval, excess, opened)) =
                        stream.evaluate_prediction(settings, chi2, nulls)
                    else {
                        continue;
                    };
                    if let Some(s) = &mut stream.prediction {
                        if let Some(change) = s.track.judge(eval.verdict, excess, settings) {
                            changes.push((subject, change));
                        }
                        s.clear(now_ms);
                    }
                    evaluation.opened_ms = evaluation.opened_ms.min(opened);
                    stream.last_prediction = Some(eval.clone());
                    evaluation.prediction = Some(eval);
                }
            }
        }
        let oldest = now_ms.saturating_sub(settings.window_ms);
        stream.seen.retain(|_, at| *at >= oldest);
        stream.dirty = true;
        let mut events = vec![Event::Closed {
            key: key.clone(),
            evaluation: evaluation.clone(),
        }];
        for (subject, change) in changes {
            let (key, evaluation) = (key.clone(), evaluation.clone());
            events.push(match change {
                Change::Raise(trigger) => Event::Raise {
                    key,
                    subject,
                    trigger,
                    evaluation,
                },
                Change::Resolve => Event::Resolve {
                    key,
                    subject,
                    evaluation,
                },
            });
        }
        stream.last = Some(evaluation);
        events
    }

    /// Whether cohort `a` looks worse than cohort `b` of the same model version in their
    /// latest closed windows: for some feature (or for the predictions) `a` is over its alert
    /// threshold while `b` is not, and `a`'s value exceeds `b`'s by more than `a`'s noise
    /// threshold. A drift both cohorts share (the environment changed for everyone) does not
    /// make one worse than the other. `None` while either cohort has no judged window.
    pub fn worse(&self, a: &StreamKey, b: &StreamKey) -> Option<Comparison> {
        let (sa, sb) = (self.streams.get(a)?, self.streams.get(b)?);
        let judged = |v: Verdict| v != Verdict::Insufficient;
        let mut features = Vec::new();
        let mut judged_any = false;
        for (fa, fb) in sa.last_features.iter().zip(&sb.last_features) {
            let (Some(fa), Some(fb)) = (fa, fb) else {
                continue;
            };
            if !judged(fa.verdict) || !judged(fb.verdict) {
                continue;
            }
            judged_any = true;
            if fa.verdict == Verdict::Over
                && fb.verdict != Verdict::Over
                && fa.psi - fb.psi >= fa.warn_threshold
            {
                features.push(fa.feature);
            }
        }
        let prediction = match (&sa.last_prediction, &sb.last_prediction) {
            (Some(pa), Some(pb)) if judged(pa.verdict) && judged(pb.verdict) => {
                judged_any = true;
                pa.verdict == Verdict::Over && pb.verdict != Verdict::Over
            }
            _ => false,
        };
        judged_any.then_some(Comparison {
            features,
            prediction,
        })
    }

    pub fn streams(&self) -> impl Iterator<Item = StreamView<'_>> {
        self.streams
            .iter()
            .map(|(key, s)| s.view(key, &self.settings))
    }

    pub fn stream(&self, key: &StreamKey) -> Option<StreamView<'_>> {
        self.streams
            .get_key_value(key)
            .map(|(k, s)| s.view(k, &self.settings))
    }

    /// A uniform sample of the raw inputs this stream has seen (for retraining).
    pub fn reservoir(&self, key: &StreamKey) -> Option<(&Arc<Baseline>, &[Row])> {
        self.streams
            .get(key)
            .map(|s| (&s.baseline, s.reservoir.rows.as_slice()))
    }

    /// Simulated null distributions kept (for tests and benchmarks).
    pub fn nulls_cached(&self) -> usize {
        self.nulls.len()
    }

    /// The streams changed since their last save, each with its state (open windows, alert
    /// episodes, CUSUMs, last windows), to store so that a restart continues where it stopped.
    pub fn save_dirty(&mut self) -> Vec<(StreamKey, Vec<u8>)> {
        let mut out = Vec::new();
        for (key, stream) in &mut self.streams {
            if !stream.dirty {
                continue;
            }
            stream.dirty = false;
            out.push((key.clone(), save(stream, &self.names)));
        }
        out
    }

    fn load(&mut self, stream: &mut Stream, bytes: &[u8]) -> Result<(), String> {
        let (&version, body) = bytes.split_first().ok_or("empty state")?;
        if version != STATE_VERSION {
            return Err(format!("unknown state version {version}"));
        }
        let state: SavedStream = postcard::from_bytes(body).map_err(|e| e.to_string())?;
        let fits = state.fingerprint == fingerprint(&stream.baseline)
            && state.features.len() == stream.features.len()
            && state
                .features
                .iter()
                .zip(&stream.baseline.features)
                .all(|(s, f)| s.counts.pool.len() == f.edges.len() + 1)
            && state.prediction.is_some() == stream.prediction.is_some();
        if !fits {
            return Err("the state does not fit the baseline".into());
        }
        let map: Vec<Dev> = state.names.iter().map(|n| self.dev(n)).collect();
        let remap = |mut s: Window| -> Result<Window, String> {
            let id = |d: Dev| map.get(d as usize).copied().ok_or("bad device id");
            s.counts.devices = s
                .counts
                .devices
                .into_iter()
                .map(|(d, n)| Ok((id(d)?, n)))
                .collect::<Result<_, &str>>()?;
            s.counts.heavy = s
                .counts
                .heavy
                .into_iter()
                .map(|(d, h)| Ok((id(d)?, h)))
                .collect::<Result<_, &str>>()?;
            s.confidence = s
                .confidence
                .into_iter()
                .map(|(d, c)| Ok((id(d)?, c)))
                .collect::<Result<_, &str>>()?;
            s.new_classes = s
                .new_classes
                .into_iter()
                .map(|(c, (d, multi))| Ok((c, (id(d)?, multi))))
                .collect::<Result<_, &str>>()?;
            Ok(s)
        };
        stream.features = state
            .features
            .into_iter()
            .map(remap)
            .collect::<Result<_, _>>()?;
        stream.prediction = state.prediction.map(remap).transpose()?;
        stream.last_features = state.last_features;
        stream.last_features.resize(stream.features.len(), None);
        stream.last_prediction = state.last_prediction;
        stream.last = state.last;
        stream.seen = state
            .seen
            .into_iter()
            .map(|(d, at)| Ok((map.get(d as usize).copied().ok_or("bad device id")?, at)))
            .collect::<Result<_, &str>>()?;
        Ok(())
    }
}

/// A stream's state as saved (device ids are indices into `names`).
#[derive(Debug, Serialize, Deserialize)]
struct SavedStream {
    /// Of the baseline the windows were counted on: a state saved under another baseline is
    /// not used.
    fingerprint: u64,
    names: Vec<String>,
    features: Vec<Window>,
    prediction: Option<Window>,
    last_features: Vec<Option<FeatureEval>>,
    last_prediction: Option<PredictionEval>,
    last: Option<Evaluation>,
    seen: Vec<(Dev, u64)>,
}

/// FNV-1a over a baseline's encoding.
fn fingerprint(b: &Baseline) -> u64 {
    let bytes = postcard::to_allocvec(b).unwrap_or_default();
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn save(stream: &Stream, names: &[String]) -> Vec<u8> {
    // Only the devices this stream's windows name, renumbered from 0.
    let mut local: HashMap<Dev, Dev> = HashMap::new();
    let mut local_names = Vec::new();
    let mut id = |d: Dev| -> Dev {
        *local.entry(d).or_insert_with(|| {
            local_names.push(names.get(d as usize).cloned().unwrap_or_default());
            (local_names.len() - 1) as Dev
        })
    };
    let mut renumber = |s: &Window| -> Window {
        let mut s = s.clone();
        s.counts.devices = s
            .counts
            .devices
            .into_iter()
            .map(|(d, n)| (id(d), n))
            .collect();
        s.counts.heavy = s
            .counts
            .heavy
            .into_iter()
            .map(|(d, h)| (id(d), h))
            .collect();
        s.confidence = s.confidence.into_iter().map(|(d, c)| (id(d), c)).collect();
        s.new_classes = s
            .new_classes
            .into_iter()
            .map(|(c, (d, m))| (c, (id(d), m)))
            .collect();
        s
    };
    let features: Vec<Window> = stream.features.iter().map(&mut renumber).collect();
    let prediction = stream.prediction.as_ref().map(&mut renumber);
    let seen: Vec<(Dev, u64)> = stream.seen.iter().map(|(d, at)| (id(*d), *at)).collect();
    let state = SavedStream {
        fingerprint: fingerprint(&stream.baseline),
        names: local_names,
        features,
        prediction,
        last_features: stream.last_features.clone(),
        last_prediction: stream.last_prediction.clone(),
        last: stream.last.clone(),
        seen,
    };
    let mut out = vec![STATE_VERSION];
    // Serializing plain structs into a Vec cannot fail.
    out.extend(postcard::to_allocvec(&state).expect("postcard encoding of a drift state"));
    out
}

impl Stream {
    fn quota(&self, s: &Settings, devices_now: usize) -> Quota {
        let k = self.seen.len().max(devices_now).max(1);
        let mut q = Quota::new(s.device_share, k, s.min_samples, s.window_samples);
        // The pool takes what no judged window can have too much of (see `capped`).
        if s.device_share < 1.0 {
            q.light = ((s.device_share * s.min_samples as f64).floor() as u64).max(1);
        }
        q
    }

    /// Adds a message's contribution to the windows and its rows to the reservoir.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        s: &Settings,
        c: &Contribution,
        dev: Dev,
        tel: &Telemetry,
        device: &str,
        now_ms: u64,
        draws: &[u64],
    ) {
        let mut touched = false;
        self.seen.insert(dev, now_ms);
        for (i, counts) in c.features.iter().enumerate() {
            let Some(counts) = counts else {
                continue;
            };
            let w = &self.features[i].counts;
            let devices_now = w.devices.len() + usize::from(!w.devices.contains_key(&dev));
            let q = self.quota(s, devices_now);
            let subject = &mut self.features[i];
            if subject.counts.is_empty() {
                subject.opened_ms = now_ms;
            }
            subject.counts.add(dev, counts, q);
            touched = true;
        }
        let baseline_classes = self
            .baseline
            .prediction
            .as_ref()
            .map_or(0, |p| p.classes.len());
        if let Some(p) = &self.prediction {
            let known = p.counts.devices.contains_key(&dev);
            let q = self.quota(s, p.counts.devices.len() + usize::from(!known));
            let p = self.prediction.as_mut().expect("checked above");
            if !c.classes.is_empty() || c.confidence.is_some() {
                if p.counts.is_empty() && p.confidence.is_empty() {
                    p.opened_ms = now_ms;
                }
                p.counts.add(dev, &c.classes, q);
                for (class, _) in c
                    .classes
                    .iter()
                    .enumerate()
                    .skip(baseline_classes)
                    .filter(|(_, k)| **k > 0)
                {
                    let e = p.new_classes.entry(class as u16).or_insert((dev, false));
                    if e.0 != dev {
                        e.1 = true;
                    }
                }
                if let Some((sum, n)) = c.confidence {
                    let e = p.confidence.entry(dev).or_insert((0.0, 0));
                    e.0 += sum;
                    e.1 += n;
                }
                touched = true;
            }
        }
        // Algorithm R: every row seen so far is in the sample with the same probability.
        for (&i, draw) in c.rows.iter().zip(draws) {
            let sample = &tel.samples[i];
            let r = &mut self.reservoir;
            r.seen += 1;
            let row = Row {
                device: device.to_owned(),
                received_ms: now_ms,
                values: sample.values.clone(),
                prediction: sample.prediction,
                confidence: sample.confidence,
            };
            if r.rows.len() < s.reservoir {
                r.rows.push(row);
            } else if let Some(slot) = r.rows.get_mut((draw % r.seen) as usize) {
                *slot = row;
            }
        }
        self.dirty |= touched;
    }

    /// The subjects whose window is due: full, or (on a tick) open for `window` time.
    fn due(&self, s: &Settings, now_ms: u64, by_time: bool) -> Vec<Subject> {
        let full = |w: &Window| {
            !w.counts.is_empty()
                && if by_time {
                    w.due(s, now_ms)
                } else {
                    w.counts.capped_total >= s.window_samples
                }
        };
        let mut due: Vec<Subject> = self
            .features
            .iter()
            .enumerate()
            .filter(|(_, w)| full(w))
            .map(|(i, _)| Subject::Feature(i as u16))
            .collect();
        if self.prediction.as_ref().is_some_and(full) {
            due.push(Subject::Prediction);
        }
        due
    }

    fn evaluate_feature(
        &mut self,
        s: &Settings,
        chi2: &metrics::Chi2Table,
        nulls: &mut NullTable,
        i: usize,
    ) -> (FeatureEval, Option<Excess>, u64) {
        let devices_now = self.features[i].counts.devices.len();
        let q = self.quota(s, devices_now);
        let fb = &self.baseline.features[i];
        let w = &self.features[i];
        let eff = w.counts.effective(q);
        let m = eff.n.round() as u64;
        let current: Vec<f64> = eff
            .counts
            .iter()
            .map(|c| c / eff.n.max(f64::MIN_POSITIVE))
            .collect();
        let psi = metrics::psi(&fb.reference, &current);
        let js = metrics::js_distance(&fb.reference, &current);
        let (ks, ks_bound) = metrics::ks(&fb.reference, &current);
        let wasserstein = w1(fb, &current);
        let judged = m >= s.min_samples;
        let (warn, alert, excess) = if judged {
            let null = nulls.get(Statistic::Psi, &fb.reference, fb.n, m, 1.0 - s.false_alarm);
            let warn = s.psi_warn_floor.max(null.q99);
            let alert = s.psi_alert.max(warn).max(null.q_over);
            let excess = Excess {
                excess: psi - null.mean,
                k: (s.cusum_k * s.psi_alert).max(null.q_over - null.mean),
                h: s.cusum_h * s.psi_alert,
            };
            (warn, alert, Some(excess))
        } else {
            // Not judged: the chi-square approximation shows the scale without a simulation.
            let warn = chi2.psi_noise(fb.reference.len(), fb.n, m.max(1), s.psi_warn_floor);
            (warn, s.psi_alert.max(warn), None)
        };
        let verdict = if !judged {
            Verdict::Insufficient
        } else if psi >= alert {
            Verdict::Over
        } else if psi >= warn {
            Verdict::Warn
        } else {
            Verdict::Ok
        };
        let eval = FeatureEval {
            feature: i as u16,
            n: m,
            psi,
            js,
            ks,
            ks_bound,
            wasserstein,
            warn_threshold: warn,
            alert_threshold: alert,
            verdict,
        };
        (eval, excess, w.opened_ms)
    }

    fn evaluate_prediction(
        &mut self,
        s: &Settings,
        chi2: &metrics::Chi2Table,
        nulls: &mut NullTable,
    ) -> Option<(PredictionEval, Option<Excess>, u64)> {
        let pb = self.baseline.prediction.as_ref()?;
        let w = self.prediction.as_ref()?;
        let q = self.quota(s, w.counts.devices.len());
        let mut eff = w.counts.effective(q);
        // A class the baseline lacks is evidence only when two devices report it.
        for (class, (_, multi)) in &w.new_classes {
            if !*multi && let Some(c) = eff.counts.get_mut(usize::from(*class)) {
                *c = 0.0;
            }
        }
        let width = pb.classes.len().max(eff.counts.len());
        let mut counts = eff.counts.clone();
        counts.resize(width, 0.0);
        let n_eff: f64 = counts.iter().sum();
        eff.n = n_eff;
        let n = n_eff.round() as u64;
        let mut reference = pb.classes.clone();
        reference.resize(width, 0.0);
        let current: Vec<f64> = counts
            .iter()
            .map(|c| c / n_eff.max(f64::MIN_POSITIVE))
            .collect();
        let (js, l_inf) = if n == 0 {
            (f64::NAN, f64::NAN)
        } else {
            (
                metrics::js_distance(&reference, &current),
                metrics::l_inf(&reference, &current),
            )
        };
        // Confidence: each device's mean, weighted by its inferences under the same cap.
        let cap = water_level(w.confidence.values().map(|c| c.1), q.share);
        let (mut sum, mut weight) = (0.0, 0.0);
        for &(s_d, n_d) in w.confidence.values() {
            if n_d == 0 {
                continue;
            }
            let wd = cap.map_or(n_d as f64, |c| (n_d as f64).min(c));
            sum += wd * s_d / n_d as f64;
            weight += wd;
        }
        let mean_confidence = (weight > 0.0).then(|| sum / weight);
        let confidence_change = mean_confidence.zip(pb.mean_confidence).map(|(c, r)| c - r);
        let dropped = confidence_change.is_some_and(|d| d <= -s.confidence_drop_alert);
        let judged = n >= s.min_samples;
        let (warn, js_threshold, excess) = if judged {
            let null = nulls.get(Statistic::Js, &pb.classes, pb.n, n, 1.0 - s.false_alarm);
            let threshold = s.prediction_js_alert.max(null.q_over);
            let excess = Excess {
                excess: js - null.mean,
                k: (s.cusum_k * s.prediction_js_alert).max(null.q_over - null.mean),
                h: s.cusum_h * s.prediction_js_alert,
            };
            (null.q99, threshold, Some(excess))
        } else {
            let noise = chi2.js_noise(width, pb.n, n.max(1), 0.0);
            (noise, s.prediction_js_alert.max(noise), None)
        };
        let verdict = if !judged {
            Verdict::Insufficient
        } else if js >= js_threshold || dropped {
            Verdict::Over
        } else if js >= warn {
            Verdict::Warn
        } else {
            Verdict::Ok
        };
        let eval = PredictionEval {
            n,
            js,
            l_inf,
            mean_confidence,
            confidence_change,
            js_threshold,
            verdict,
        };
        Some((eval, excess, w.opened_ms))
    }

    fn view<'a>(&'a self, key: &'a StreamKey, s: &Settings) -> StreamView<'a> {
        let subject = |w: &Window| SubjectView {
            status: w.track.status(),
            open_samples: w.counts.raw(),
            opened_ms: w.opened_ms,
            cusum: if s.sequential { w.track.cusum } else { 0.0 },
            clean_windows: w.track.clean,
        };
        StreamView {
            key,
            baseline: &self.baseline,
            features: self.features.iter().map(subject).collect(),
            prediction: self.prediction.as_ref().map(subject),
            last_features: &self.last_features,
            last_prediction: self.last_prediction.as_ref(),
            last: self.last.as_ref(),
        }
    }
}

/// Wasserstein-1 of a feature's window against its reference, in robust reference standard
/// deviations (see [`super::baseline::FeatureBaseline::scale`]). The open outer bins are closed
/// half the edges' span beyond the outer edges (never beyond the reference's own range), so one
/// far outlier, in the reference or the window, cannot blow the estimate up. NaN when the
/// reference is constant: there is no scale to measure in.
fn w1(fb: &super::baseline::FeatureBaseline, current: &[f64]) -> f64 {
    let Some(scale) = fb.scale() else {
        return f64::NAN;
    };
    let (first, last) = match (fb.edges.first(), fb.edges.last()) {
        (Some(&a), Some(&b)) => (a, b),
        _ => return f64::NAN,
    };
    let half = ((last - first) / 2.0).max(scale);
    let lo = fb.min.max(first - half).min(first);
    let hi = fb.max.min(last + half).max(last);
    metrics::wasserstein(&fb.reference, current, &fb.edges, lo, hi, scale)
}

#[cfg(test)]
mod tests;
