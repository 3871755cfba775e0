//! The operator HTTP API: JSON under `/api/v1` behind bearer tokens with roles (see
//! `access`), `/healthz` and `/metrics` open. Reads go straight to storage snapshots; every change goes through the
//! ingest writer and is answered after it is committed.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleetgate_protocol::{Action, Severity};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::auth::{Caller, Tokens};
use crate::clock::now_ms;
use crate::ingest::{AlertAction, ControlTx};
use crate::metrics::Metrics;
use crate::model::AlertState;
use crate::storage::{AlertFilter, Store};

pub mod access;
mod drift;
pub mod error;
pub mod listener;
mod rollouts;
mod updates;
pub mod views;

pub use error::ApiError;
use views::{AlertView, CommandView, DeviceView, LogView, TelemetryView};

/// Largest `limit` a list request may ask for.
const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 100;
/// Longest an authenticated request may take, reading its body included. A change that
/// reached the writer before the deadline is still carried out.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest request body other than a bundle upload or a baseline CSV.
pub const MAX_JSON_BODY: usize = 1 << 20;

#[derive(Debug)]
pub struct ApiState {
    pub store: Store,
    pub registry: crate::registry::Registry,
    pub control: ControlTx,
    pub metrics: Arc<Metrics>,
    /// Valid operator tokens and their roles.
    pub tokens: Arc<Tokens>,
    /// Where backup snapshots of the database are written.
    pub data_dir: std::path::PathBuf,
    /// Largest bundle upload; other bodies are small JSON (at most [`MAX_JSON_BODY`]).
    pub max_body_bytes: usize,
    /// The rollout policy rollouts start from, with the rules for their overrides.
    pub rollouts: fleetgate_config::Rollouts,
    /// The public key devices must trust for rollback directives.
    pub rollback_public: [u8; 32],
}

type AppState = State<Arc<ApiState>>;

pub fn router(state: Arc<ApiState>) -> Router {
    let v1 = Router::new()
        .route("/devices", get(list_devices).post(enroll))
        .route("/devices/{id}", get(get_device).delete(revoke))
        .route("/devices/{id}/credential", post(rotate_credential))
        .route("/devices/{id}/telemetry", get(telemetry))
        .route("/devices/{id}/logs", get(logs))
        .route("/devices/{id}/commands", post(send_command))
        .route("/devices/{id}/refusals", get(refusals))
        .route("/commands/{id}", get(get_command))
        .route("/alerts", get(list_alerts))
        .route("/alerts/{id}", get(get_alert))
        .route("/alerts/{id}/ack", post(ack_alert))
        .route("/alerts/{id}/resolve", post(resolve_alert))
        .route("/ingest", get(ingest_counts))
        .route("/registry", get(updates::list))
        .route(
            "/registry/bundles",
            post(updates::upload).layer(DefaultBodyLimit::max(state.max_body_bytes)),
        )
        .route(
            "/registry/{kind}/{name}/{version}",
            get(updates::get).patch(updates::annotate),
        )
        .route(
            "/registry/{kind}/{name}/aliases/{alias}",
            axum::routing::put(updates::set_alias).delete(updates::remove_alias),
        )
        .route(
            "/registry/model/{name}/{version}/baseline",
            get(drift::get_baseline).put(drift::put_baseline),
        )
        .route(
            "/registry/model/{name}/{version}/baseline.csv",
            post(drift::post_baseline_csv).layer(DefaultBodyLimit::max(state.max_body_bytes)),
        )
        .route("/drift", get(drift::summary))
        .route("/drift/{model}/{version}", get(drift::current))
        .route("/drift/{model}/{version}/history", get(drift::history))
        .route("/drift/{model}/{version}/samples.csv", get(drift::samples))
        .route("/rollouts", get(rollouts::list).post(rollouts::create))
        .route("/rollouts/signing-key", get(rollouts::signing_key))
        .route("/rollouts/{id}", get(rollouts::get))
        .route("/rollouts/{id}/pause", post(rollouts::pause))
        .route("/rollouts/{id}/resume", post(rollouts::resume))
        .route("/rollouts/{id}/abort", post(rollouts::abort))
        .route("/rollouts/{id}/rollback", post(rollouts::rollback))
        .route("/rollouts/{id}/devices", get(rollouts::devices))
        .route("/rollouts/{id}/audit", get(rollouts::audit))
        .route("/updates", get(updates::transfers).post(updates::start))
        .route("/updates/{id}", get(updates::transfer))
        .route("/updates/{id}/cancel", post(updates::cancel))
        .route("/tokens", get(access::list).post(access::create))
        .route("/tokens/{name}", axum::routing::delete(access::revoke))
        .route("/audit", get(access::audit))
        .route("/backup/snapshot", post(backup_snapshot))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_body))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            access::require_token,
        ))
        .route_layer(middleware::from_fn(note_route))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY));
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route("/metrics", get(metrics))
        .nest("/api/v1", v1)
        .fallback(|| async { ApiError::NotFound("no such endpoint".to_owned()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("method not allowed on this endpoint".to_owned())
        })
        .route_layer(middleware::from_fn(note_route))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// The most bytes a route's request body may hold, put in the request by [`limit_body`].
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Refuses a body over the route's limit from its `Content-Length` alone, before a byte of it
/// is read (a client announcing 10 GiB is answered at once), and tells the body extractors
/// the limit; bodies without a length are cut off at it while they stream
/// (`DefaultBodyLimit`), answered the same way.
async fn limit_body(
    State(state): AppState,
    mut req: Request,
    next: middleware::Next,
) -> Result<Response, ApiError> {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let limit = if route.ends_with("/registry/bundles") || route.ends_with("/baseline.csv") {
        state.max_body_bytes
    } else {
        MAX_JSON_BODY
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = announced
        && n > limit as u64
    {
        return Err(too_large(limit, Some(n)));
    }
    req.extensions_mut().insert(BodyLimit(limit));
    Ok(next.run(req).await)
}

fn too_large(limit: usize, announced: Option<u64>) -> ApiError {
    let what = match announced {
        Some(n) => format!("the request body is {n} bytes"),
        None => "the request body is too large".to_owned(),
    };
    ApiError::PayloadTooLarge(format!("{what}; this endpoint takes at most {limit} bytes"))
}

/// The whole body, with JSON rejections: 413 over the route's limit, 400 for a broken stream.
async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let limit = req
        .extensions()
        .get::<BodyLimit>()
        .map_or(MAX_JSON_BODY, |l| l.0);
    Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(limit, None)
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })
}

/// A raw body (bundle uploads, CSV) whose rejections are JSON [`ApiError`]s.
#[derive(Debug)]
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        body_bytes(req, state).await.map(ApiBytes)
    }
}

/// Parses a body that must be one JSON object: serde's derive would also take an array for a
/// struct (`["d1"]` as `{"id": "d1"}`), which the API refuses.
fn json_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => {
            return Err(ApiError::BadRequest(
                "the request body is empty; it must be a JSON object".to_owned(),
            ));
        }
        Some(_) => {
            return Err(ApiError::BadRequest(
                "the request body must be a JSON object ({...})".to_owned(),
            ));
        }
    }
    Json::<T>::from_bytes(bytes)
        .map(|Json(v)| v)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// A JSON object body (`Content-Type: application/json`) whose rejections are JSON
/// [`ApiError`]s.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<mime_type::Essence>().ok())
            .is_some_and(|m| m.is_json());
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "the request body must be JSON: send `Content-Type: application/json`".to_owned(),
            ));
        }
        let bytes = body_bytes(req, state).await?;
        json_object(&bytes).map(ApiJson)
    }
}

/// An optional JSON object body (actions that take none, or a few options): empty, or one
/// JSON object; anything else is refused.
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        json_object(&bytes).map(|v| OptionalJson(Some(v)))
    }
}

/// The body of an action that takes no options: empty or `{}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoBody {}

/// The essence of a media type (`type/subtype`), enough to tell JSON from the rest.
mod mime_type {
    #[derive(Debug)]
    pub struct Essence(String);

    impl std::str::FromStr for Essence {
        type Err = ();

        fn from_str(s: &str) -> Result<Essence, ()> {
            let essence = s
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if essence.contains('/') {
                Ok(Essence(essence))
            } else {
                Err(())
            }
        }
    }

    impl Essence {
        /// `application/json` or `application/<anything>+json`.
        pub fn is_json(&self) -> bool {
            self.0 == "application/json"
                || (self.0.starts_with("application/") && self.0.ends_with("+json"))
        }
    }
}

/// `Query` whose rejections are JSON [`ApiError`]s.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// `Path` whose rejections are JSON [`ApiError`]s.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// Runs a blocking storage read off the async executor.
pub(crate) async fn read<T: Send + 'static>(
    state: &Arc<ApiState>,
    f: impl FnOnce(&Store) -> crate::storage::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
}

pub(crate) fn limit(requested: Option<usize>) -> Result<usize, ApiError> {
    match requested {
        None => Ok(DEFAULT_LIMIT),
        Some(0) => Err(ApiError::BadRequest("limit must be at least 1".to_owned())),
        Some(n) if n > MAX_LIMIT => Err(ApiError::BadRequest(format!(
            "limit must be at most {MAX_LIMIT}"
        ))),
        Some(n) => Ok(n),
    }
}

/// `GET /metrics`: the classic Prometheus text format, or OpenMetrics when the scraper asks
/// for it (`Accept: application/openmetrics-text`). Figures that storage holds (unresolved
/// alerts per severity, the model versions devices run) are read at each scrape.
async fn metrics(
    State(state): AppState,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let (severities, running) = read(&state, |s| {
        let unresolved = |st| AlertFilter {
            state: Some(st),
            severity: None,
            device: None,
        };
        let mut counts = [0u64; 3];
        for st in [AlertState::Open, AlertState::Acknowledged] {
            for a in s.alerts(&unresolved(st), usize::MAX)? {
                counts[match a.severity {
                    Severity::Info => 0,
                    Severity::Warning => 1,
                    Severity::Critical => 2,
                }] += 1;
            }
        }
        let mut running = std::collections::HashSet::new();
        for d in s.devices()? {
            if d.credential_hash.is_none() {
                continue;
            }
            for m in d.hello.iter().flat_map(|h| &h.models) {
                running.insert((m.name.clone(), m.version.to_string()));
            }
        }
        Ok((counts, running))
    })
    .await?;
    state
        .metrics
        .set_unresolved_alerts(severities[0], severities[1], severities[2]);
    state
        .metrics
        .retain_drift(|model, version| running.contains(&(model.to_owned(), version.to_owned())));
    let size = state.store.file_size();
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (body, content_type) = if openmetrics {
        (
            state.metrics.render(size),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            state.metrics.render_text(size),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// Where the route pattern a request matched is noted, for [`count_requests`]: routing happens
/// inside that layer, so the pattern is only known to layers on the routes themselves.
#[derive(Debug, Clone, Default)]
struct RouteSlot(Arc<std::sync::Mutex<Option<String>>>);

/// Notes the matched route pattern (the innermost router's, which holds the whole path).
async fn note_route(req: Request, next: middleware::Next) -> Response {
    if let (Some(slot), Some(path)) = (
        req.extensions().get::<RouteSlot>(),
        req.extensions().get::<axum::extract::MatchedPath>(),
    ) && let Ok(mut s) = slot.0.lock()
    {
        *s = Some(path.as_str().to_owned());
    }
    next.run(req).await
}

/// Counts every answer by method, route pattern and status, and times it.
async fn count_requests(
    State(state): AppState,
    mut req: Request,
    next: middleware::Next,
) -> Response {
    let method = req.method().as_str().to_owned();
    let slot = RouteSlot::default();
    req.extensions_mut().insert(slot.clone());
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    let route = slot
        .0
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .unwrap_or_else(|| "unmatched".to_owned());
    state.metrics.http_request(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceListQuery {
    online: Option<bool>,
    /// `key=value`: only devices with this label.
    label: Option<String>,
}

async fn list_devices(
    State(state): AppState,
    ApiQuery(q): ApiQuery<DeviceListQuery>,
) -> Result<Json<Vec<DeviceView>>, ApiError> {
    let label = match q.label.as_deref().map(|l| l.split_once('=')) {
        None => None,
        Some(Some((k, v))) => Some((k.to_owned(), v.to_owned())),
        Some(None) => return Err(ApiError::BadRequest("label must be key=value".to_owned())),
    };
    let devices = read(&state, |s| s.devices()).await?;
    let views = devices
        .into_iter()
        .filter(|d| q.online.is_none_or(|o| o == d.presence.online))
        .filter(|d| {
            label
                .as_ref()
                .is_none_or(|(k, v)| d.labels.get(k) == Some(v))
        })
        .map(DeviceView::from)
        .collect();
    Ok(Json(views))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

async fn enroll(
    State(state): AppState,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let credential = state.control.enroll(req.id.clone(), req.labels).await?;
    let body = serde_json::json!({ "id": req.id, "credential": credential });
    Ok((StatusCode::CREATED, Json(body)))
}

async fn get_device(
    State(state): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let lookup = id.clone();
    match read(&state, move |s| s.device(&lookup)).await? {
        Some(d) => Ok(Json(d.into())),
        None => Err(ApiError::NotFound(format!("device {id} not found"))),
    }
}

#[derive(Debug, serde::Serialize)]
pub struct RefusalView {
    /// When it was refused (the first of `count` refusals in a row with the same detail)...
    pub at: String,
    /// ...and the last of them.
    pub last_at: String,
    pub count: u64,
    /// Why: the reason code also counted in `fleetgate_ingest_rejected_total`.
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, serde::Serialize)]
pub struct RefusalsView {
    pub device: String,
    /// Messages of this device refused since the gateway started.
    pub total: u64,
    /// The latest refusals, newest first (at most 10; repeats folded).
    pub refusals: Vec<RefusalView>,
}

/// `GET /devices/{id}/refusals`: why the device's latest messages were refused.
async fn refusals(
    State(state): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RefusalsView>, ApiError> {
    let lookup = id.clone();
    if read(&state, move |s| s.device(&lookup)).await?.is_none() {
        return Err(ApiError::NotFound(format!("device {id} not found")));
    }
    let (total, recent) = state.metrics.refusals(&id);
    Ok(Json(RefusalsView {
        device: id,
        total,
        refusals: recent
            .into_iter()
            .map(|r| RefusalView {
                at: crate::clock::rfc3339(r.first_ms),
                last_at: crate::clock::rfc3339(r.last_ms),
                count: r.count,
                reason: r.reason,
                detail: r.detail,
            })
            .collect(),
    }))
}

async fn revoke(
    State(state): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.control.revoke(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_credential(
    State(state): AppState,
    ApiPath(id): ApiPath<String>,
    _: OptionalJson<NoBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let credential = state.control.rotate_credential(id.clone()).await?;
    Ok(Json(
        serde_json::json!({ "id": id, "credential": credential }),
    ))
}

/// A time given as RFC 3339 or as Unix milliseconds.
fn parse_time(field: &str, text: &str) -> Result<u64, ApiError> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{field}: {text:?} is neither RFC 3339 nor Unix milliseconds"
            ))
        })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeQuery {
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
}

async fn telemetry(
    State(state): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Json<Vec<TelemetryView>>, ApiError> {
    let from_ms = q
        .from
        .as_deref()
        .map(|t| parse_time("from", t))
        .transpose()?
        .unwrap_or(0);
    let to_ms =
        q.to.as_deref()
            .map(|t| parse_time("to", t))
            .transpose()?
            .unwrap_or(u64::MAX / 1000);
    if from_ms > to_ms {
        return Err(ApiError::BadRequest("from is after to".to_owned()));
    }
    let limit = limit(q.limit)?;
    let device = id.clone();
    let rows = read(&state, move |s| {
        if s.device(&device)?.is_none() {
            return Ok(None);
        }
        s.telemetry(&device, from_ms * 1000, to_ms.saturating_mul(1000), limit)
            .map(Some)
    })
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("device {id} not found")))?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn logs(
    State(state): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LimitQuery>,
) -> Result<Json<Vec<LogView>>, ApiError> {
    let limit = limit(q.limit)?;
    let device = id.clone();
    let rows = read(&state, move |s| {
        if s.device(&device)?.is_none() {
            return Ok(None);
        }
        s.logs(&device, limit).map(Some)
    })
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("device {id} not found")))?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRequest {
    action: Action,
}

async fn send_command(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CommandRequest>,
) -> Result<(StatusCode, Json<CommandView>), ApiError> {
    match &req.action {
        Action::Ping | Action::Reboot => {}
        Action::SetTelemetryInterval { interval_ms } => {
            if !(100..=86_400_000).contains(interval_ms) {
                return Err(ApiError::BadRequest(
                    "interval_ms must be within 100..=86400000".to_owned(),
                ));
            }
        }
        // Only the engine that owns one of these may send it: an update offer belongs to a
        // transfer the update engine tracks, a rollback directive to a rollout's decision,
        // bin edges to a baseline. Injected ones would be trusted by devices.
        Action::Update(_) => {
            return Err(engine_action("update", "POST /api/v1/updates or a rollout"));
        }
        Action::Rollback(_) => {
            return Err(engine_action(
                "rollback",
                "POST /api/v1/rollouts/{id}/rollback",
            ));
        }
        Action::DriftBins(_) => {
            return Err(engine_action(
                "drift_bins",
                "a model version's baseline (PUT /api/v1/registry/model/{name}/{version}/baseline)",
            ));
        }
    }
    let record = state.control.command(id, req.action, caller.name).await?;
    Ok((StatusCode::ACCEPTED, Json(record.into())))
}

fn engine_action(action: &str, instead: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "action `{action}` is sent by the gateway itself, not through commands; use {instead}"
    ))
}

async fn get_command(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<CommandView>, ApiError> {
    match read(&state, move |s| s.command(id)).await? {
        Some(c) => Ok(Json(c.into())),
        None => Err(ApiError::NotFound(format!("command {id} not found"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertQuery {
    state: Option<String>,
    severity: Option<String>,
    device: Option<String>,
    limit: Option<usize>,
}

async fn list_alerts(
    State(state): AppState,
    ApiQuery(q): ApiQuery<AlertQuery>,
) -> Result<Json<Vec<AlertView>>, ApiError> {
    let filter = AlertFilter {
        state: q
            .state
            .as_deref()
            .map(|s| {
                AlertState::from_name(s).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "state {s:?}: one of open, acknowledged, resolved"
                    ))
                })
            })
            .transpose()?,
        severity: q
            .severity
            .as_deref()
            .map(|s| {
                Severity::from_name(s).ok_or_else(|| {
                    ApiError::BadRequest(format!("severity {s:?}: one of info, warning, critical"))
                })
            })
            .transpose()?,
        device: q.device,
    };
    let limit = limit(q.limit)?;
    let alerts = read(&state, move |s| s.alerts(&filter, limit)).await?;
    Ok(Json(alerts.into_iter().map(Into::into).collect()))
}

async fn get_alert(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<AlertView>, ApiError> {
    match read(&state, move |s| s.alert(id)).await? {
        Some(a) => Ok(Json(a.into())),
        None => Err(ApiError::NotFound(format!("alert {id} not found"))),
    }
}

async fn ack_alert(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    _: OptionalJson<NoBody>,
) -> Result<Json<AlertView>, ApiError> {
    let alert = state
        .control
        .alert(id, AlertAction::Acknowledge, caller.name)
        .await?;
    Ok(Json(alert.into()))
}

async fn resolve_alert(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    _: OptionalJson<NoBody>,
) -> Result<Json<AlertView>, ApiError> {
    let alert = state
        .control
        .alert(id, AlertAction::Resolve, caller.name)
        .await?;
    Ok(Json(alert.into()))
}

/// `POST /backup/snapshot`: writes a consistent copy of the database into the data dir for
/// `fleetgate backup`, which archives it with the rest of the data dir and deletes it.
async fn backup_snapshot(
    State(state): AppState,
    _: OptionalJson<NoBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = format!("{}{}.redb", crate::backup::SNAPSHOT_PREFIX, now_ms());
    let path = state.data_dir.join(name);
    let dest = path.clone();
    read(&state, move |s| s.snapshot(&dest)).await?;
    let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
    Ok(Json(serde_json::json!({ "path": path, "bytes": bytes })))
}

async fn ingest_counts(State(state): AppState) -> Result<Json<serde_json::Value>, ApiError> {
    let counts = state.metrics.counts();
    let latency = state.metrics.ingest_latency();
    let tables = read(&state, |s| s.counts()).await?;
    Ok(Json(serde_json::json!({
        "at": crate::clock::rfc3339(now_ms()),
        "mqtt": {
            "connected_devices": counts.connected_devices,
            "connects": counts.connects,
            "refused": counts.refused,
        },
        "stored": counts.stored,
        "rejected": counts.rejected,
        "telemetry_lost": counts.lost,
        "latency": {
            "count": latency.count,
            "p50_ms": latency.p50_ms,
            "p99_ms": latency.p99_ms,
            "p999_ms": latency.p999_ms,
            "max_ms": latency.max_ms,
        },
        "process": {
            "resident_bytes": crate::metrics::resident_memory_bytes(),
            "cpu_seconds": crate::metrics::cpu_seconds(),
        },
        "telemetry_duplicates": counts.duplicates,
        "write_batches": counts.batches,
        "queue_depth": counts.queue_depth,
        "storage": {
            "bytes": state.store.file_size(),
            "devices": tables.devices,
            "telemetry_rows": tables.telemetry,
            "log_rows": tables.logs,
            "alerts": tables.alerts,
            "commands": tables.commands,
        },
    })))
}

/// For the cargo-fuzz target `api_bodies` (`fuzz/`): the request body types are private to
/// this module, so this is the one way to reach them from outside the crate.
#[doc(hidden)]
pub mod fuzzing {
    /// Deserializes `bytes` as every JSON request body of the API; it must never panic.
    pub fn api_bodies(bytes: &[u8]) {
        fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
            let _ = serde_json::from_slice::<T>(bytes);
        }
        body::<super::EnrollRequest>(bytes);
        body::<super::CommandRequest>(bytes);
        body::<super::rollouts::CreateBody>(bytes);
        body::<super::rollouts::ActionBody>(bytes);
        body::<super::updates::Annotations>(bytes);
        body::<super::updates::AliasBody>(bytes);
        body::<super::updates::StartBody>(bytes);
        body::<super::access::CreateBody>(bytes);
        body::<crate::drift::baseline::Baseline>(bytes);
    }
}

#[cfg(test)]
mod tests;
