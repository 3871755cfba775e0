//! Baselines and drift: upload a model version's baseline, read current drift, history and the
//! recent inputs a model saw (CSV, for retraining).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use fleetgate_protocol::ArtifactKind;
use semver::Version;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::schema::ErrorBody;
use super::{ApiBytes, ApiError, ApiJson, ApiPath, ApiQuery, ApiState, limit, read};
use crate::clock::rfc3339;
use crate::drift::baseline::Baseline;
use crate::drift::engine::{
    ALL, Evaluation, FeatureEval, PredictionEval, Status, StreamKey, SubjectView,
};
use crate::ingest::{DriftAnswer, DriftQuery, DriftStream};

type AppState = State<Arc<ApiState>>;

fn version(v: &str) -> Result<Version, ApiError> {
    Version::parse(v).map_err(|e| ApiError::BadRequest(format!("version {v:?}: {e}")))
}

/// A feature of a baseline just set.
#[derive(Debug, Serialize, ToSchema)]
pub struct BaselineFeature {
    pub name: String,
    pub bins: usize,
    /// Reference values behind it.
    pub n: u64,
}

/// What a model version's baseline now is.
#[derive(Debug, Serialize, ToSchema)]
pub struct BaselineSet {
    pub model: String,
    pub version: String,
    pub features: Vec<BaselineFeature>,
    pub prediction_classes: Option<usize>,
}

async fn set(
    state: &Arc<ApiState>,
    name: String,
    v: String,
    baseline: Baseline,
) -> Result<Json<BaselineSet>, ApiError> {
    let registry = state.registry.clone();
    let b = baseline.clone();
    let release =
        tokio::task::spawn_blocking(move || registry.set_baseline(&name, &v, b)).await??;
    state
        .control
        .baseline_changed(release.name.clone(), release.version.clone())
        .await;
    Ok(Json(BaselineSet {
        model: release.name,
        version: release.version.to_string(),
        features: baseline
            .features
            .iter()
            .map(|f| BaselineFeature {
                name: f.name.clone(),
                bins: f.edges.len() + 1,
                n: f.n,
            })
            .collect(),
        prediction_classes: baseline.prediction.as_ref().map(|p| p.classes.len()),
    }))
}

/// `PUT /registry/model/{name}/{version}/baseline`: a baseline as JSON (`fleetgate baseline build`).
#[utoipa::path(
    put,
    path = "/registry/model/{name}/{version}/baseline",
    tag = "registry",
    params(("name" = String, Path, description = "Model name", example = "kws"), ("version" = String, Path, description = "Model version", example = "1.0.0")),
    request_body(content = serde_json::Value, description = "A baseline as `fleetgate baseline build` writes it"),
    responses(
        (status = 200, description = "The baseline is set", body = BaselineSet),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn put_baseline(
    State(state): AppState,
    ApiPath((name, v)): ApiPath<(String, String)>,
    ApiJson(baseline): ApiJson<Baseline>,
) -> Result<Json<BaselineSet>, ApiError> {
    set(&state, name, v, baseline).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CsvQuery {
    /// Bins per feature, at reference quantiles (default 10).
    bins: Option<usize>,
    /// The column holding the predicted class.
    prediction: Option<String>,
    /// The column holding the prediction's confidence.
    confidence: Option<String>,
}

/// `POST /registry/model/{name}/{version}/baseline.csv`: builds the baseline from a reference CSV.
#[utoipa::path(
    post,
    path = "/registry/model/{name}/{version}/baseline.csv",
    tag = "registry",
    params(("name" = String, Path, description = "Model name", example = "kws"), ("version" = String, Path, description = "Model version", example = "1.0.0"), CsvQuery),
    request_body(content = String, content_type = "text/csv", description = "Reference data: a header, one column per feature in the model's input order"),
    responses(
        (status = 200, description = "The baseline is set", body = BaselineSet),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn post_baseline_csv(
    State(state): AppState,
    ApiPath((name, v)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<CsvQuery>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<BaselineSet>, ApiError> {
    let body = String::from_utf8(body.to_vec())
        .map_err(|e| ApiError::BadRequest(format!("the CSV is not UTF-8: {e}")))?;
    let bins = q.bins.unwrap_or(10);
    let baseline = tokio::task::spawn_blocking(move || {
        Baseline::from_csv(
            &body,
            q.prediction.as_deref(),
            q.confidence.as_deref(),
            bins,
        )
    })
    .await?
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    set(&state, name, v, baseline).await
}

#[utoipa::path(
    get,
    path = "/registry/model/{name}/{version}/baseline",
    tag = "registry",
    params(("name" = String, Path, description = "Model name", example = "kws"), ("version" = String, Path, description = "Model version", example = "1.0.0")),
    responses(
        (status = 200, description = "The baseline", body = serde_json::Value),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn get_baseline(
    State(state): AppState,
    ApiPath((name, v)): ApiPath<(String, String)>,
) -> Result<Json<Baseline>, ApiError> {
    let (n, ver) = (name.clone(), v.clone());
    let release = read(&state, move |s| s.release(ArtifactKind::Model, &n, &ver)).await?;
    match release.and_then(|r| r.baseline) {
        Some(b) => Ok(Json(b)),
        None => Err(ApiError::NotFound(format!(
            "model {name} {v} has no baseline"
        ))),
    }
}

async fn streams(state: &Arc<ApiState>) -> Result<Vec<DriftStream>, ApiError> {
    match state.control.drift(DriftQuery::Streams).await? {
        DriftAnswer::Streams(s) => Ok(s),
        DriftAnswer::Reservoir(_) => Err(ApiError::Internal("unexpected drift answer".into())),
    }
}

/// A feature's numbers in one closed window. A metric without meaning (the Wasserstein distance
/// against a constant reference) is null.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeatureWindow {
    pub feature: Option<String>,
    pub n: u64,
    pub psi: f64,
    pub js: f64,
    pub ks: f64,
    pub ks_error_bound: f64,
    pub wasserstein: Option<f64>,
    pub warn_threshold: f64,
    pub alert_threshold: f64,
    /// insufficient, ok, warn or over.
    pub verdict: &'static str,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn feature_window(f: &FeatureEval, b: &Baseline) -> FeatureWindow {
    FeatureWindow {
        feature: b
            .features
            .get(usize::from(f.feature))
            .map(|x| x.name.clone()),
        n: f.n,
        psi: f.psi,
        js: f.js,
        ks: f.ks,
        ks_error_bound: f.ks_bound,
        wasserstein: finite(f.wasserstein),
        warn_threshold: f.warn_threshold,
        alert_threshold: f.alert_threshold,
        verdict: f.verdict.name(),
    }
}

/// The predictions' numbers in one closed window.
#[derive(Debug, Serialize, ToSchema)]
pub struct PredictionWindow {
    pub n: u64,
    pub js: f64,
    pub l_inf: f64,
    pub mean_confidence: Option<f64>,
    pub confidence_change: Option<f64>,
    pub js_threshold: f64,
    /// insufficient, ok, warn or over.
    pub verdict: &'static str,
}

fn prediction_window(p: &PredictionEval) -> PredictionWindow {
    PredictionWindow {
        n: p.n,
        js: p.js,
        l_inf: p.l_inf,
        mean_confidence: p.mean_confidence,
        confidence_change: p.confidence_change,
        js_threshold: p.js_threshold,
        verdict: p.verdict.name(),
    }
}

/// One closed window of a model version in a cohort.
#[derive(Debug, Serialize, ToSchema)]
pub struct EvaluationView {
    pub opened_at: String,
    pub closed_at: String,
    pub features: Vec<FeatureWindow>,
    pub prediction: Option<PredictionWindow>,
}

pub(crate) fn evaluation(e: &Evaluation, b: &Baseline) -> EvaluationView {
    EvaluationView {
        opened_at: rfc3339(e.opened_ms),
        closed_at: rfc3339(e.closed_ms),
        features: e.features.iter().map(|f| feature_window(f, b)).collect(),
        prediction: e.prediction.as_ref().map(prediction_window),
    }
}

/// A model version in a cohort, at a glance.
#[derive(Debug, Serialize, ToSchema)]
pub struct DriftSummary {
    pub model: String,
    pub version: String,
    pub cohort: String,
    /// The worst of its features and predictions: insufficient, ok, warn or alert.
    pub status: &'static str,
    pub features_alerting: Vec<String>,
    pub features_warning: Vec<String>,
    /// Features without enough samples to judge yet.
    pub features_insufficient: Vec<String>,
    /// Null when the baseline has no predictions.
    pub prediction_status: Option<&'static str>,
    pub open_window_samples: Option<u64>,
    pub last_window_closed_at: Option<String>,
}

/// `GET /drift`: every model version and cohort with its status.
#[utoipa::path(
    get,
    path = "/drift",
    tag = "drift",
    responses(
        (status = 200, description = "Every model version and cohort with its status", body = Vec<DriftSummary>),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn summary(State(state): AppState) -> Result<Json<Vec<DriftSummary>>, ApiError> {
    let out = streams(&state)
        .await?
        .iter()
        .map(|s| {
            let names = |want: Status| -> Vec<String> {
                s.features
                    .iter()
                    .zip(&s.baseline.features)
                    .filter(|(v, _)| v.status == want)
                    .map(|(_, f)| f.name.clone())
                    .collect()
            };
            let prediction = s.prediction.as_ref().map(|p| p.status);
            let worst = s
                .features
                .iter()
                .map(|v| v.status)
                .chain(prediction)
                .max_by_key(|st| st.rank())
                .unwrap_or(Status::Insufficient);
            DriftSummary {
                model: s.key.model.clone(),
                version: s.key.version.to_string(),
                cohort: s.key.cohort.clone(),
                status: worst.name(),
                features_alerting: names(Status::Alert),
                features_warning: names(Status::Warn),
                features_insufficient: names(Status::Insufficient),
                prediction_status: prediction.map(Status::name),
                open_window_samples: s
                    .features
                    .iter()
                    .chain(&s.prediction)
                    .map(|v| v.open_samples)
                    .max(),
                last_window_closed_at: s.last.as_ref().map(|e| rfc3339(e.closed_ms)),
            }
        })
        .collect();
    Ok(Json(out))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CohortQuery {
    /// The cohort (a value of `drift.cohort_label`); default `all`.
    cohort: Option<String>,
    /// At most this many, 1 to 10,000 (default 100).
    limit: Option<usize>,
}

fn key(model: String, v: &str, cohort: Option<String>) -> Result<StreamKey, ApiError> {
    Ok(StreamKey {
        model,
        version: version(v)?,
        cohort: cohort.unwrap_or_else(|| ALL.to_owned()),
    })
}

/// The window being filled.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenWindow {
    pub samples: u64,
    pub opened_at: String,
}

fn open_window(v: &SubjectView) -> OpenWindow {
    OpenWindow {
        samples: v.open_samples,
        opened_at: rfc3339(v.opened_ms),
    }
}

/// A feature's status, its open window and its last closed window.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeatureDrift {
    pub feature: String,
    /// insufficient, ok, warn or alert.
    pub status: &'static str,
    pub bins: usize,
    pub open_window: OpenWindow,
    /// The CUSUM statistic (0 when `drift.sequential` is off).
    pub cusum: f64,
    /// Clean windows in a row while an alert is open.
    pub clean_windows: u32,
    pub last_window: Option<FeatureWindow>,
}

/// The predictions' status, open window and last closed window.
#[derive(Debug, Serialize, ToSchema)]
pub struct PredictionDrift {
    pub status: &'static str,
    pub open_window: OpenWindow,
    pub cusum: f64,
    pub clean_windows: u32,
    pub last_window: Option<PredictionWindow>,
}

/// Drift of a model version in a cohort.
#[derive(Debug, Serialize, ToSchema)]
pub struct DriftCurrent {
    pub model: String,
    pub version: String,
    pub cohort: String,
    pub features: Vec<FeatureDrift>,
    /// Null when the baseline has no predictions.
    pub prediction: Option<PredictionDrift>,
    /// Where the recent raw inputs are, as CSV.
    pub samples: String,
}

/// `GET /drift/{model}/{version}?cohort=`: current drift per feature, with thresholds.
#[utoipa::path(
    get,
    path = "/drift/{model}/{version}",
    tag = "drift",
    params(("model" = String, Path, description = "Model name", example = "kws"), ("version" = String, Path, description = "Model version", example = "1.0.0"), CohortQuery),
    responses(
        (status = 200, description = "Per feature: the last window's metrics, thresholds and verdict", body = DriftCurrent),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn current(
    State(state): AppState,
    ApiPath((model, v)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<CohortQuery>,
) -> Result<Json<DriftCurrent>, ApiError> {
    let key = key(model, &v, q.cohort)?;
    let stream = streams(&state).await?.into_iter().find(|s| s.key == key);
    let Some(s) = stream else {
        return Err(ApiError::NotFound(format!(
            "no drift data for {key} (no baseline, or no telemetry yet)"
        )));
    };
    let features = s
        .baseline
        .features
        .iter()
        .zip(&s.features)
        .zip(&s.last_features)
        .map(|((f, v), last)| FeatureDrift {
            feature: f.name.clone(),
            status: v.status.name(),
            bins: f.edges.len() + 1,
            open_window: open_window(v),
            cusum: v.cusum,
            clean_windows: v.clean_windows,
            last_window: last.as_ref().map(|l| feature_window(l, &s.baseline)),
        })
        .collect();
    Ok(Json(DriftCurrent {
        model: s.key.model.clone(),
        version: s.key.version.to_string(),
        cohort: s.key.cohort.clone(),
        features,
        prediction: s.prediction.as_ref().map(|v| PredictionDrift {
            status: v.status.name(),
            open_window: open_window(v),
            cusum: v.cusum,
            clean_windows: v.clean_windows,
            last_window: s.last_prediction.as_ref().map(prediction_window),
        }),
        samples: format!(
            "/api/v1/drift/{}/{}/samples.csv?cohort={}",
            s.key.model, s.key.version, s.key.cohort
        ),
    }))
}

/// `GET /drift/{model}/{version}/history?cohort=&limit=`: closed windows, newest first.
#[utoipa::path(
    get,
    path = "/drift/{model}/{version}/history",
    tag = "drift",
    params(("model" = String, Path, description = "Model name", example = "kws"), ("version" = String, Path, description = "Model version", example = "1.0.0"), CohortQuery),
    responses(
        (status = 200, description = "Closed windows, newest first", body = Vec<EvaluationView>),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn history(
    State(state): AppState,
    ApiPath((model, v)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<CohortQuery>,
) -> Result<Json<Vec<EvaluationView>>, ApiError> {
    let limit = limit(q.limit)?;
    let key = key(model, &v, q.cohort)?;
    let (k, name, ver) = (key.clone(), key.model.clone(), key.version.to_string());
    let baseline = read(&state, move |s| s.release(ArtifactKind::Model, &name, &ver))
        .await?
        .and_then(|r| r.baseline);
    let Some(baseline) = baseline else {
        return Err(ApiError::NotFound(format!(
            "model {} {} has no baseline",
            key.model, key.version
        )));
    };
    let windows = read(&state, move |s| s.drift_history(&k, limit)).await?;
    Ok(Json(
        windows.iter().map(|e| evaluation(e, &baseline)).collect(),
    ))
}

/// `GET /drift/{model}/{version}/samples.csv?cohort=`: a uniform sample of recent raw inputs.
#[utoipa::path(
    get,
    path = "/drift/{model}/{version}/samples.csv",
    tag = "drift",
    params(("model" = String, Path, description = "Model name", example = "kws"), ("version" = String, Path, description = "Model version", example = "1.0.0"), CohortQuery),
    responses(
        (status = 200, description = "A uniform sample of the recent raw inputs: device, time, one column per feature, prediction, confidence", content_type = "text/csv", body = String),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn samples(
    State(state): AppState,
    ApiPath((model, v)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<CohortQuery>,
) -> Result<Response, ApiError> {
    let key = key(model, &v, q.cohort)?;
    let answer = state
        .control
        .drift(DriftQuery::Reservoir(key.clone()))
        .await?;
    let DriftAnswer::Reservoir(Some((baseline, rows))) = answer else {
        return Err(ApiError::NotFound(format!("no inputs kept for {key}")));
    };
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = vec!["device".into(), "received_at".into()];
    header.extend(baseline.features.iter().map(|f| f.name.clone()));
    header.extend(["prediction".into(), "confidence".into()]);
    let write = |w: &mut csv::Writer<Vec<u8>>, rec: Vec<String>| {
        w.write_record(rec)
            .map_err(|e| ApiError::Internal(e.to_string()))
    };
    write(&mut w, header)?;
    for r in rows {
        let mut rec = vec![r.device.clone(), rfc3339(r.received_ms)];
        rec.extend(r.values.iter().map(f32::to_string));
        rec.push(r.prediction.map(|p| p.to_string()).unwrap_or_default());
        rec.push(r.confidence.map(|c| c.to_string()).unwrap_or_default());
        write(&mut w, rec)?;
    }
    let body = w
        .into_inner()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response())
}
