//! The writer's side of drift: feeding telemetry to the drift engine, storing closed windows
//! and the streams' state, raising and resolving drift alerts, sending devices their bin
//! edges, and answering queries.
//!
//! Baselines are looked up in the registry the first time a (model, version) is seen, and the
//! answer is kept. A version without a baseline is kept as "none" too, so a device naming
//! versions nobody registered costs one registry lookup per version, and at most
//! [`MAX_UNKNOWN_VERSIONS`] of those answers are kept (names and versions are at most 64 bytes
//! each, `protocol::limits`); past that they are forgotten and looked up again when seen.

use std::sync::Arc;

use fleetgate_protocol::{
    Action, AlertKind, ArtifactKind, Command, Downlink, DriftBins, Hello, Severity, Telemetry,
    encode,
};
use semver::Version;

use super::{Effects, Writer};
use crate::drift::baseline::Baseline;
use crate::drift::engine::{
    ALL, Evaluation, Event, FeatureEval, PredictionEval, Row, StreamKey, Subject, SubjectView,
    Trigger,
};
use crate::metrics::DriftLabels;
use crate::model::{AlertSource, DriftSubject};
use crate::storage::{self, Tables};

/// Answers "no baseline" kept before they are forgotten (see the module docs).
pub const MAX_UNKNOWN_VERSIONS: usize = 256;

/// A copy of one drift stream's state, for the API.
#[derive(Debug, Clone)]
pub struct DriftStream {
    pub key: StreamKey,
    pub baseline: Arc<Baseline>,
    pub features: Vec<SubjectView>,
    pub prediction: Option<SubjectView>,
    pub last_features: Vec<Option<FeatureEval>>,
    pub last_prediction: Option<PredictionEval>,
    pub last: Option<Evaluation>,
}

/// What the API can ask the writer about drift.
#[derive(Debug)]
pub enum DriftQuery {
    Streams,
    Reservoir(StreamKey),
}

#[derive(Debug)]
pub enum DriftAnswer {
    Streams(Vec<DriftStream>),
    Reservoir(Option<(Arc<Baseline>, Vec<Row>)>),
}

impl Writer {
    /// The cohort of a device: the value of the configured label, else `all`.
    fn cohort(&self, device: &str) -> String {
        self.drift_label
            .as_ref()
            .and_then(|label| {
                self.devices
                    .get(device)
                    .and_then(|s| s.device.labels.get(label))
            })
            .cloned()
            .unwrap_or_else(|| ALL.to_owned())
    }

    /// A model version's baseline, looked up in the registry the first time.
    pub(super) fn baseline(&mut self, model: &str, version: &Version) -> Option<Arc<Baseline>> {
        if !self.drift.knows(model, version) {
            if self.drift.known_versions() >= MAX_UNKNOWN_VERSIONS {
                let forgotten = self.drift.forget_unknown_versions();
                tracing::debug!(forgotten, "drift: forgot model versions without a baseline");
            }
            self.load_baseline(model, version);
        }
        self.drift.baseline(model, version)
    }

    /// Reads a model version's baseline from the registry into the engine (its windows
    /// restart).
    fn load_baseline(&mut self, model: &str, version: &Version) -> Option<Arc<Baseline>> {
        let found = self
            .store
            .release(ArtifactKind::Model, model, &version.to_string())
            .ok()
            .flatten();
        let baseline = found.and_then(|r| r.baseline).map(Arc::new);
        self.drift.set_baseline(model, version, baseline.clone());
        baseline
    }

    /// A model version's baseline was set: its windows start over, and the online devices
    /// running it get the new edges at once (bins counted on old edges would not fit).
    pub(super) fn baseline_changed(&mut self, model: &str, version: &Version, fx: &mut Effects) {
        let Some(baseline) = self.load_baseline(model, version) else {
            return;
        };
        let running: Vec<String> = self
            .devices
            .values()
            .filter(|s| s.device.presence.online)
            .filter(|s| {
                s.device.hello.as_ref().is_some_and(|h| {
                    h.models
                        .iter()
                        .any(|m| m.name == model && m.version == *version)
                })
            })
            .map(|s| s.device.id.clone())
            .collect();
        for device in running {
            self.send_edges(&device, model, version, &baseline, fx);
        }
    }

    pub(super) fn drift_observe(
        &mut self,
        t: &mut Tables<'_>,
        device: &str,
        tel: &Telemetry,
        now: u64,
    ) -> storage::Result<()> {
        let Some(model) = &tel.model else {
            return Ok(());
        };
        if tel.samples.is_empty() && tel.bins.is_empty() && model.class_counts.is_empty() {
            return Ok(());
        }
        if self.baseline(&model.name, &model.version).is_none() {
            return Ok(());
        }
        let cohort = self.cohort(device);
        let (events, observed) = self.drift.observe(&cohort, device, tel, now);
        // Counted once per message, however many cohorts it fed.
        self.metrics.drift_mismatched.inc_by(observed.mismatched);
        self.drift_events(t, events, now)
    }

    /// Closes windows open for `drift.window`, then saves the streams that changed (each tick,
    /// so a restart loses at most a second of drift data).
    pub(super) fn drift_tick(&mut self, t: &mut Tables<'_>, now: u64) -> storage::Result<()> {
        let events = self.drift.tick(now);
        self.drift_events(t, events, now)?;
        for (key, state) in self.drift.save_dirty() {
            t.put_drift_state(&key, &state)?;
        }
        Ok(())
    }

    /// After a restart: each stream continues from its saved state (open windows, alert
    /// episodes); a stream without one (a database from before states were saved) continues
    /// its verdicts from its last stored windows.
    pub(super) fn drift_restore(&mut self) -> storage::Result<()> {
        self.drift =
            crate::drift::engine::Engine::new(self.drift_settings.clone(), super::DRIFT_SEED);
        for (key, evaluations) in self.store.drift_recent(3)? {
            self.drift.restore(key, evaluations);
        }
        for (key, state) in self.store.drift_states()? {
            self.drift.restore_state(key, state);
        }
        Ok(())
    }

    fn drift_events(
        &mut self,
        t: &mut Tables<'_>,
        events: Vec<Event>,
        now: u64,
    ) -> storage::Result<()> {
        for event in events {
            match event {
                Event::Closed { key, evaluation } => {
                    t.put_drift_window(&key, &evaluation, self.drift_history)?;
                    self.record_drift_window(t, &key, &evaluation)?;
                    self.drift_gauges(&key, &evaluation);
                }
                Event::Raise {
                    key,
                    subject,
                    trigger,
                    evaluation,
                } => {
                    let (name, kind, value, message) = describe(
                        &key,
                        subject,
                        trigger,
                        &evaluation,
                        self.baseline_names(&key),
                    );
                    let source = AlertSource::Drift(DriftSubject {
                        model: key.model.clone(),
                        version: key.version.clone(),
                        cohort: key.cohort.clone(),
                        feature: name,
                    });
                    tracing::warn!(stream = %key, message, "drift");
                    self.raise(t, "", kind, Severity::Warning, value, message, source, now)?;
                }
                Event::Resolve { key, subject, .. } => {
                    let name = match subject {
                        Subject::Feature(i) => {
                            self.baseline_names(&key).get(usize::from(i)).cloned()
                        }
                        Subject::Prediction => None,
                    };
                    let subject = DriftSubject {
                        model: key.model.clone(),
                        version: key.version.clone(),
                        cohort: key.cohort.clone(),
                        feature: name,
                    };
                    let id = self
                        .unresolved
                        .values()
                        .find(|a| a.source == AlertSource::Drift(subject.clone()))
                        .map(|a| a.id);
                    if let Some(id) = id {
                        tracing::info!(stream = %key, "drift resolved");
                        self.resolve(t, id, now, "drift")?;
                    }
                }
            }
        }
        Ok(())
    }

    fn baseline_names(&self, key: &StreamKey) -> Vec<String> {
        self.drift
            .stream(key)
            .map(|s| s.baseline.features.iter().map(|f| f.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Every subject's status, and the value and size of the windows that just closed.
    fn drift_gauges(&self, key: &StreamKey, e: &Evaluation) {
        let Some(stream) = self.drift.stream(key) else {
            return;
        };
        let labels = |subject: &str| DriftLabels {
            model: key.model.clone(),
            version: key.version.to_string(),
            cohort: key.cohort.clone(),
            subject: subject.to_owned(),
        };
        let m = &self.metrics;
        for (fb, view) in stream.baseline.features.iter().zip(&stream.features) {
            m.drift_status
                .get_or_create(&labels(&fb.name))
                .set(view.status.gauge());
        }
        if let Some(p) = &stream.prediction {
            m.drift_status
                .get_or_create(&labels("prediction"))
                .set(p.status.gauge());
        }
        for f in &e.features {
            let Some(fb) = stream.baseline.features.get(usize::from(f.feature)) else {
                continue;
            };
            m.drift_value.get_or_create(&labels(&fb.name)).set(f.psi);
            m.drift_window_samples
                .get_or_create(&labels(&fb.name))
                .set(f.n as i64);
        }
        if let Some(p) = &e.prediction {
            let value = if p.js.is_finite() { p.js } else { 0.0 };
            m.drift_value
                .get_or_create(&labels("prediction"))
                .set(value);
            m.drift_window_samples
                .get_or_create(&labels("prediction"))
                .set(p.n as i64);
        }
    }

    /// After a hello: the bin edges of each model the device runs that has a baseline.
    pub(super) fn drift_bins(&mut self, device: &str, hello: &Hello, fx: &mut Effects) {
        for m in &hello.models {
            if let Some(baseline) = self.baseline(&m.name, &m.version) {
                self.send_edges(device, &m.name, &m.version, &baseline, fx);
            }
        }
    }

    fn send_edges(
        &mut self,
        device: &str,
        model: &str,
        version: &Version,
        baseline: &Baseline,
        fx: &mut Effects,
    ) {
        let encoding = self
            .devices
            .get(device)
            .map_or(fleetgate_protocol::Encoding::Postcard, |s| {
                s.device.encoding
            });
        let command = Command {
            id: self.next_command_id,
            action: Action::DriftBins(DriftBins {
                model: model.to_owned(),
                version: version.clone(),
                edges: baseline.edges(),
            }),
        };
        self.next_command_id += 1;
        match encode(&command, encoding) {
            Ok(payload) => {
                fx.downlinks
                    .push((device.to_owned(), Downlink::Command, encoding, payload))
            }
            Err(e) => tracing::warn!(device, model, %version, error = %e, "drift bins not sent"),
        }
    }

    pub(super) fn drift_query(&self, q: DriftQuery) -> DriftAnswer {
        match q {
            DriftQuery::Streams => DriftAnswer::Streams(
                self.drift
                    .streams()
                    .map(|s| DriftStream {
                        key: s.key.clone(),
                        baseline: s.baseline.clone(),
                        features: s.features,
                        prediction: s.prediction,
                        last_features: s.last_features.to_vec(),
                        last_prediction: s.last_prediction.cloned(),
                        last: s.last.cloned(),
                    })
                    .collect(),
            ),
            DriftQuery::Reservoir(key) => DriftAnswer::Reservoir(
                self.drift
                    .reservoir(&key)
                    .map(|(b, rows)| (b.clone(), rows.to_vec())),
            ),
        }
    }
}

/// The alert's feature name, kind, value and message for a drift that started.
fn describe(
    key: &StreamKey,
    subject: Subject,
    trigger: Trigger,
    e: &Evaluation,
    names: Vec<String>,
) -> (Option<String>, AlertKind, Option<f64>, String) {
    let samples = format!(
        "recent inputs: /api/v1/drift/{}/{}/samples.csv?cohort={}",
        key.model, key.version, key.cohort
    );
    let why = match trigger {
        Trigger::Windows => "in 2 of the last 3 windows",
        Trigger::Cusum => "lasting (CUSUM over several windows)",
    };
    match subject {
        Subject::Feature(i) => {
            let name = names
                .get(usize::from(i))
                .cloned()
                .unwrap_or_else(|| format!("#{i}"));
            let f = e.features.iter().find(|f| f.feature == i);
            let (value, detail) = f.map_or((None, String::new()), |f| {
                (
                    Some(f.psi),
                    format!(
                        "PSI {:.3} (alert at {:.3}) {why}; last window {} samples, JS {:.3}, KS {:.3} (+{:.3}), W1 {}",
                        f.psi,
                        f.alert_threshold,
                        f.n,
                        f.js,
                        f.ks,
                        f.ks_bound,
                        if f.wasserstein.is_finite() {
                            format!("{:.2} sd", f.wasserstein)
                        } else {
                            "n/a (constant reference)".to_owned()
                        }
                    ),
                )
            });
            let message = format!("data drift in {key}, feature {name}: {detail}; {samples}");
            (
                Some(name),
                AlertKind::Custom("data_drift".into()),
                value,
                message,
            )
        }
        Subject::Prediction => {
            let p = e.prediction.as_ref();
            let value = p.map(|p| p.js);
            let detail = p.map_or(String::new(), |p| {
                let conf = p
                    .confidence_change
                    .map_or(String::new(), |c| format!(", mean confidence {c:+.3}"));
                format!(
                    "JS {:.3} (alert at {:.3}) {why}, L-inf {:.3}{conf} over {} predictions",
                    p.js, p.js_threshold, p.l_inf, p.n
                )
            });
            let message = format!("prediction drift in {key}: {detail}; {samples}");
            (
                None,
                AlertKind::Custom("prediction_drift".into()),
                value,
                message,
            )
        }
    }
}

#[cfg(test)]
mod tests;
