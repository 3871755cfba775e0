//! The writer's side of drift: feeding telemetry to the drift engine, storing closed windows,
//! raising and resolving drift alerts, sending devices their bin edges, and answering queries.

use std::sync::Arc;

use fleetgate_protocol::{
    Action, AlertKind, ArtifactKind, Command, Downlink, DriftBins, Hello, Severity, Telemetry,
    encode,
};
use semver::Version;

use super::{Effects, Writer};
use crate::drift::baseline::Baseline;
use crate::drift::engine::{ALL, Evaluation, Event, Row, Status, StreamKey, Subject};
use crate::metrics::DriftLabels;
use crate::model::{AlertSource, DriftSubject};
use crate::storage::{self, Tables};

/// A copy of one drift stream's state, for the API.
#[derive(Debug, Clone)]
pub struct DriftStream {
    pub key: StreamKey,
    pub baseline: Arc<Baseline>,
    pub window_samples: u64,
    pub opened_ms: u64,
    pub feature_status: Vec<Status>,
    pub prediction_status: Status,
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
        if self
            .baseline(&model.name.clone(), &model.version.clone())
            .is_none()
        {
            return Ok(());
        }
        let cohort = self.cohort(device);
        let (events, observed) = self.drift.observe(&cohort, device, tel, now);
        self.metrics.drift_mismatched.inc_by(observed.mismatched);
        self.drift_events(t, events, now)
    }

    pub(super) fn drift_tick(&mut self, t: &mut Tables<'_>, now: u64) -> storage::Result<()> {
        let events = self.drift.tick(now);
        self.drift_events(t, events, now)
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
                    self.drift_gauges(&key, &evaluation);
                }
                Event::Raise {
                    key,
                    subject,
                    evaluation,
                } => {
                    let (name, kind, value, message) =
                        describe(&key, subject, &evaluation, self.baseline_names(&key));
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
        let status = |s: Status| match s {
            Status::Ok => 0,
            Status::Warn => 1,
            Status::Alert => 2,
        };
        for f in &e.features {
            let Some(fb) = stream.baseline.features.get(usize::from(f.feature)) else {
                continue;
            };
            self.metrics
                .drift_value
                .get_or_create(&labels(&fb.name))
                .set(f.psi);
            let s = stream
                .feature_status
                .get(usize::from(f.feature))
                .copied()
                .unwrap_or(Status::Ok);
            self.metrics
                .drift_status
                .get_or_create(&labels(&fb.name))
                .set(status(s));
        }
        if let Some(p) = &e.prediction {
            self.metrics
                .drift_value
                .get_or_create(&labels("prediction"))
                .set(p.js);
            self.metrics
                .drift_status
                .get_or_create(&labels("prediction"))
                .set(status(stream.prediction_status));
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
                        window_samples: s.window_samples,
                        opened_ms: s.opened_ms,
                        feature_status: s.feature_status,
                        prediction_status: s.prediction_status,
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
    e: &Evaluation,
    names: Vec<String>,
) -> (Option<String>, AlertKind, Option<f64>, String) {
    let samples = format!(
        "recent inputs: /api/v1/drift/{}/{}/samples.csv?cohort={}",
        key.model, key.version, key.cohort
    );
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
                        "PSI {:.3} (alert at {:.3}) in 2 of the last 3 windows; last window {} samples, JS {:.3}, KS {:.3} (+{:.3}), W1 {:.2} sd",
                        f.psi, f.alert_threshold, f.n, f.js, f.ks, f.ks_bound, f.wasserstein
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
                    "JS {:.3} (alert at {:.3}), L-inf {:.3}{conf} over {} predictions",
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
