//! Baselines and drift: upload a model version's baseline, read current drift, history and the
//! recent inputs a model saw (CSV, for retraining).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use fleetgate_protocol::ArtifactKind;
use semver::Version;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiBytes, ApiError, ApiJson, ApiPath, ApiQuery, ApiState, limit, read};
use crate::clock::rfc3339;
use crate::drift::baseline::Baseline;
use crate::drift::engine::{ALL, Evaluation, Status, StreamKey};
use crate::ingest::{DriftAnswer, DriftQuery, DriftStream};

type AppState = State<Arc<ApiState>>;

fn version(v: &str) -> Result<Version, ApiError> {
    Version::parse(v).map_err(|e| ApiError::BadRequest(format!("version {v:?}: {e}")))
}

async fn set(
    state: &Arc<ApiState>,
    name: String,
    v: String,
    baseline: Baseline,
) -> Result<Json<Value>, ApiError> {
    let registry = state.registry.clone();
    let b = baseline.clone();
    let release =
        tokio::task::spawn_blocking(move || registry.set_baseline(&name, &v, b)).await??;
    state
        .control
        .baseline_changed(release.name.clone(), release.version.clone())
        .await;
    Ok(Json(json!({
        "model": release.name, "version": release.version.to_string(),
        "features": baseline.features.iter().map(|f| json!({ "name": f.name, "bins": f.edges.len() + 1, "n": f.n })).collect::<Vec<_>>(),
        "prediction_classes": baseline.prediction.as_ref().map(|p| p.classes.len()),
    })))
}

/// `PUT /registry/model/{name}/{version}/baseline`: a baseline as JSON (`fleetgate baseline build`).
pub async fn put_baseline(
    State(state): AppState,
    ApiPath((name, v)): ApiPath<(String, String)>,
    ApiJson(baseline): ApiJson<Baseline>,
) -> Result<Json<Value>, ApiError> {
    set(&state, name, v, baseline).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvQuery {
    bins: Option<usize>,
    prediction: Option<String>,
    confidence: Option<String>,
}

/// `POST /registry/model/{name}/{version}/baseline.csv`: builds the baseline from a reference CSV.
pub async fn post_baseline_csv(
    State(state): AppState,
    ApiPath((name, v)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<CsvQuery>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>, ApiError> {
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

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Warn => "warn",
        Status::Alert => "alert",
    }
}

fn evaluation(e: &Evaluation, b: &Baseline) -> Value {
    json!({
        "opened_at": rfc3339(e.opened_ms),
        "closed_at": rfc3339(e.closed_ms),
        "features": e.features.iter().map(|f| json!({
            "feature": b.features.get(usize::from(f.feature)).map(|x| x.name.as_str()),
            "n": f.n, "psi": f.psi, "js": f.js, "ks": f.ks, "ks_error_bound": f.ks_bound,
            "wasserstein": f.wasserstein, "warn_threshold": f.warn_threshold,
            "alert_threshold": f.alert_threshold, "verdict": format!("{:?}", f.verdict).to_lowercase(),
        })).collect::<Vec<_>>(),
        "prediction": e.prediction.as_ref().map(|p| json!({
            "n": p.n, "js": p.js, "l_inf": p.l_inf, "mean_confidence": p.mean_confidence,
            "confidence_change": p.confidence_change, "js_threshold": p.js_threshold,
            "verdict": format!("{:?}", p.verdict).to_lowercase(),
        })),
    })
}

/// `GET /drift`: every model version and cohort with its status.
pub async fn summary(State(state): AppState) -> Result<Json<Vec<Value>>, ApiError> {
    let out = streams(&state)
        .await?
        .iter()
        .map(|s| {
            let names = |want: Status| -> Vec<&str> {
                s.feature_status
                    .iter()
                    .zip(&s.baseline.features)
                    .filter(|(st, _)| **st == want)
                    .map(|(_, f)| f.name.as_str())
                    .collect()
            };
            let worst = s
                .feature_status
                .iter()
                .copied()
                .chain([s.prediction_status])
                .max_by_key(|st| *st as u8)
                .unwrap_or(Status::Ok);
            json!({
                "model": s.key.model, "version": s.key.version.to_string(), "cohort": s.key.cohort,
                "status": status_name(worst),
                "features_alerting": names(Status::Alert), "features_warning": names(Status::Warn),
                "prediction_status": status_name(s.prediction_status),
                "open_window_samples": s.window_samples,
                "last_window_closed_at": s.last.as_ref().map(|e| rfc3339(e.closed_ms)),
            })
        })
        .collect();
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortQuery {
    cohort: Option<String>,
    limit: Option<usize>,
}

fn key(model: String, v: &str, cohort: Option<String>) -> Result<StreamKey, ApiError> {
    Ok(StreamKey {
        model,
        version: version(v)?,
        cohort: cohort.unwrap_or_else(|| ALL.to_owned()),
    })
}

/// `GET /drift/{model}/{version}?cohort=`: current drift per feature, with thresholds.
pub async fn current(
    State(state): AppState,
    ApiPath((model, v)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<CohortQuery>,
) -> Result<Json<Value>, ApiError> {
    let key = key(model, &v, q.cohort)?;
    let stream = streams(&state).await?.into_iter().find(|s| s.key == key);
    let Some(s) = stream else {
        return Err(ApiError::NotFound(format!(
            "no drift data for {key} (no baseline, or no telemetry yet)"
        )));
    };
    let features: Vec<Value> = s
        .baseline
        .features
        .iter()
        .zip(&s.feature_status)
        .enumerate()
        .map(|(i, (f, st))| {
            let last = s.last.as_ref().and_then(|e| e.features.iter().find(|x| usize::from(x.feature) == i));
            json!({
                "feature": f.name, "status": status_name(*st), "bins": f.edges.len() + 1,
                "last_window": last.map(|l| json!({
                    "n": l.n, "psi": l.psi, "js": l.js, "ks": l.ks, "ks_error_bound": l.ks_bound,
                    "wasserstein": l.wasserstein, "warn_threshold": l.warn_threshold, "alert_threshold": l.alert_threshold,
                    "verdict": format!("{:?}", l.verdict).to_lowercase(),
                })),
            })
        })
        .collect();
    Ok(Json(json!({
        "model": s.key.model, "version": s.key.version.to_string(), "cohort": s.key.cohort,
        "open_window": { "samples": s.window_samples, "opened_at": rfc3339(s.opened_ms) },
        "features": features,
        "prediction": {
            "status": status_name(s.prediction_status),
            "last_window": s.last.as_ref().and_then(|e| e.prediction.as_ref()).map(|p| json!({
                "n": p.n, "js": p.js, "l_inf": p.l_inf, "mean_confidence": p.mean_confidence,
                "confidence_change": p.confidence_change, "js_threshold": p.js_threshold,
            })),
        },
        "samples": format!("/api/v1/drift/{}/{}/samples.csv?cohort={}", s.key.model, s.key.version, s.key.cohort),
    })))
}

/// `GET /drift/{model}/{version}/history?cohort=&limit=`: closed windows, newest first.
pub async fn history(
    State(state): AppState,
    ApiPath((model, v)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<CohortQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
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
