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
use axum::routing::get;
use axum::{Json, Router};
use fleetgate_protocol::{Action, Severity};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
pub mod schema;
mod updates;
mod uplink;
pub mod validation;
pub mod views;

pub(crate) use drift::evaluation as drift_window_view;
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
    /// The upstream connection and the webhooks.
    pub uplink: Arc<crate::uplink::Uplink>,
}

type AppState = State<Arc<ApiState>>;

/// The parts of the OpenAPI document the handlers' annotations do not give.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "fleetgate",
        description = "The operator API of a fleetgate gateway: devices, telemetry, alerts, commands, the registry of signed releases, updates, staged rollouts, drift, tokens and the audit log. Every endpoint under /api/v1 needs a bearer token; the role each needs is in ARCHITECTURE.md.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "devices", description = "Enrollment, presence, telemetry, logs, refusals"),
        (name = "commands", description = "Commands to devices"),
        (name = "alerts", description = "Hardware and drift alerts"),
        (name = "registry", description = "Signed model and firmware releases"),
        (name = "updates", description = "Updates to given devices, without stages"),
        (name = "rollouts", description = "Staged rollouts with health gates and rollback"),
        (name = "drift", description = "Baselines and drift of model versions"),
        (name = "validation", description = "Releases run on bench devices against their signed requirements"),
        (name = "access", description = "Operator tokens and the audit log"),
        (name = "ingest", description = "Ingest counters"),
        (name = "backup", description = "Backups"),
        (name = "uplink", description = "The bridge to the upstream MQTT cluster, and alert webhooks"),
        (name = "monitoring", description = "Health and Prometheus metrics, without a token"),
    )
)]
struct ApiDoc;

#[derive(Debug)]
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An operator token (fleetgate tokens create), or the bootstrap token",
                    ))
                    .build(),
            ),
        );
    }
}

/// The routes under `/api/v1` and their OpenAPI description, from the same annotations.
fn v1_routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(list_devices, enroll))
        .routes(routes!(get_device, revoke))
        .routes(routes!(rotate_credential))
        .routes(routes!(telemetry))
        .routes(routes!(logs))
        .routes(routes!(send_command))
        .routes(routes!(refusals))
        .routes(routes!(get_command))
        .routes(routes!(list_alerts))
        .routes(routes!(get_alert))
        .routes(routes!(ack_alert))
        .routes(routes!(resolve_alert))
        .routes(routes!(ingest_counts))
        .routes(routes!(updates::list))
        .routes(routes!(updates::upload))
        .routes(routes!(updates::get, updates::annotate))
        .routes(routes!(updates::set_alias, updates::remove_alias))
        .routes(routes!(drift::get_baseline, drift::put_baseline))
        .routes(routes!(drift::post_baseline_csv))
        .routes(routes!(drift::summary))
        .routes(routes!(drift::current))
        .routes(routes!(drift::history))
        .routes(routes!(drift::samples))
        .routes(routes!(rollouts::list, rollouts::create))
        .routes(routes!(rollouts::signing_key))
        .routes(routes!(rollouts::get))
        .routes(routes!(rollouts::pause))
        .routes(routes!(rollouts::resume))
        .routes(routes!(rollouts::abort))
        .routes(routes!(rollouts::rollback))
        .routes(routes!(rollouts::devices))
        .routes(routes!(rollouts::audit))
        .routes(routes!(updates::transfers, updates::start))
        .routes(routes!(updates::transfer))
        .routes(routes!(updates::cancel))
        .routes(routes!(validation::start))
        .routes(routes!(validation::show))
        .routes(routes!(validation::compare))
        .routes(routes!(access::list, access::create))
        .routes(routes!(access::revoke))
        .routes(routes!(access::audit))
        .routes(routes!(access::me))
        .routes(routes!(backup_snapshot))
        .routes(routes!(uplink::status))
}

/// Everything the OpenAPI document describes: `/healthz`, `/metrics` and `v1` under
/// `/api/v1`.
fn with_v1(v1: OpenApiRouter<Arc<ApiState>>) -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .nest("/api/v1", v1)
}

/// The OpenAPI 3.1 document of the API, as `/api/v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    with_v1(v1_routes()).split_for_parts().1
}

pub fn router(state: Arc<ApiState>) -> Router {
    let v1 = v1_routes()
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_body))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            access::require_token,
        ))
        .route_layer(middleware::from_fn(note_route));
    let (api_routes, doc) = with_v1(v1).split_for_parts();
    let doc = Arc::new(doc.to_pretty_json().unwrap_or_default());
    api_routes
        .merge(crate::ui::router())
        .route(
            "/api/v1/openapi.json",
            get(move || async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    doc.to_string(),
                )
            }),
        )
        .fallback(|| async { ApiError::NotFound("no such endpoint".to_owned()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("method not allowed on this endpoint".to_owned())
        })
        .route_layer(middleware::from_fn(note_route))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        // Bodies are read through `body_bytes`, which applies each route's own limit.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// A storage writer without progress for this long makes `/healthz` fail (its loop runs at
/// least once a second; a slow commit takes seconds).
const WRITER_UNHEALTHY: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, serde::Serialize, ToSchema)]
struct Health {
    /// `ok` while the gateway serves; `failing` while its storage writer is not running.
    status: String,
    /// Why it is failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// `200 {"status": "ok"}`, or `503` with the reason while the storage writer is not running
/// (nothing a device sends can be stored, and the gateway is about to stop).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "monitoring",
    security(()),
    responses(
        (status = 200, description = "The gateway serves", body = Health),
        (status = 503, description = "The storage writer is not running: nothing a device sends can be stored", body = Health),
    )
)]
async fn healthz(State(s): State<Arc<ApiState>>) -> (StatusCode, Json<Health>) {
    match s.metrics.writer_trouble(WRITER_UNHEALTHY) {
        None => (
            StatusCode::OK,
            Json(Health {
                status: "ok".to_owned(),
                reason: None,
            }),
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "failing".to_owned(),
                reason: Some(reason),
            }),
        ),
    }
}

/// A device's credential, shown once.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct Credential {
    pub id: String,
    /// The device's MQTT password: 64 hex characters. Only its SHA-256 is stored.
    pub credential: String,
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
async fn body_bytes(req: Request) -> Result<Bytes, ApiError> {
    let limit = req
        .extensions()
        .get::<BodyLimit>()
        .map_or(MAX_JSON_BODY, |l| l.0);
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                too_large(limit, None)
            } else {
                ApiError::BadRequest(format!("reading the request body: {e}"))
            }
        })
}

/// A raw body (bundle uploads, CSV) whose rejections are JSON [`ApiError`]s.
#[derive(Debug)]
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        body_bytes(req).await.map(ApiBytes)
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

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
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
        let bytes = body_bytes(req).await?;
        json_object(&bytes).map(ApiJson)
    }
}

/// An optional JSON object body (actions that take none, or a few options): empty, or one
/// JSON object; anything else is refused.
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        json_object(&bytes).map(|v| OptionalJson(Some(v)))
    }
}

/// The body of an action that takes no options: empty or `{}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
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
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "monitoring",
    security(()),
    responses(
        (status = 200, description = "Prometheus text format (OpenMetrics when asked for in Accept)", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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
    let (store, metrics) = (state.store.clone(), state.metrics.clone());
    tokio::task::spawn_blocking(move || {
        crate::uplink::metrics::refresh(&store, &metrics.uplink, now_ms())
    })
    .await??;
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeviceListQuery {
    /// Only devices connected now (true) or not (false).
    online: Option<bool>,
    /// `key=value`: only devices with this label.
    label: Option<String>,
}

#[utoipa::path(
    get,
    path = "/devices",
    tag = "devices",
    params(DeviceListQuery),
    responses(
        (status = 200, description = "Devices with presence, versions, hardware and counters", body = Vec<DeviceView>),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    /// 1-64 of `A-Z a-z 0-9 - _ . :`, starting alphanumeric.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", example = "pump-2")]
    id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[utoipa::path(
    post,
    path = "/devices",
    tag = "devices",
    request_body = EnrollRequest,
    responses(
        (status = 201, description = "Enrolled; the credential is shown only now", body = Credential),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
async fn enroll(
    State(state): AppState,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<(StatusCode, Json<Credential>), ApiError> {
    let credential = state.control.enroll(req.id.clone(), req.labels).await?;
    Ok((
        StatusCode::CREATED,
        Json(Credential {
            id: req.id,
            credential,
        }),
    ))
}

/// A database snapshot in the data dir.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct Snapshot {
    pub path: String,
    pub bytes: u64,
}

#[utoipa::path(
    get,
    path = "/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", example = "pump-1")),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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

#[derive(Debug, serde::Serialize, ToSchema)]
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

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct RefusalsView {
    pub device: String,
    /// Messages of this device refused since the gateway started.
    pub total: u64,
    /// The latest refusals, newest first (at most 10; repeats folded).
    pub refusals: Vec<RefusalView>,
}

/// `GET /devices/{id}/refusals`: why the device's latest messages were refused.
#[utoipa::path(
    get,
    path = "/devices/{id}/refusals",
    tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", example = "pump-1")),
    responses(
        (status = 200, description = "Why the device's latest messages were refused, newest first", body = RefusalsView),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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

#[utoipa::path(
    delete,
    path = "/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", example = "pump-1")),
    responses(
        (status = 204, description = "Revoked and disconnected; its history is kept"),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
async fn revoke(
    State(state): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.control.revoke(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/devices/{id}/credential",
    tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", example = "pump-1")),
    request_body(content = Option<NoBody>, description = "Empty, or {}"),
    responses(
        (status = 200, description = "A new credential; the old one stops working", body = Credential),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
async fn rotate_credential(
    State(state): AppState,
    ApiPath(id): ApiPath<String>,
    _: OptionalJson<NoBody>,
) -> Result<Json<Credential>, ApiError> {
    let credential = state.control.rotate_credential(id.clone()).await?;
    Ok(Json(Credential { id, credential }))
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RangeQuery {
    /// From this time on (RFC 3339 or Unix milliseconds).
    from: Option<String>,
    /// Before this time (RFC 3339 or Unix milliseconds).
    to: Option<String>,
    /// At most this many rows, 1 to 10,000 (default 100).
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/devices/{id}/telemetry",
    tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", example = "pump-1"), RangeQuery),
    responses(
        (status = 200, description = "Telemetry, newest first", body = Vec<TelemetryView>),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LimitQuery {
    /// At most this many, 1 to 10,000 (default 100).
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/devices/{id}/logs",
    tag = "devices",
    params(("id" = String, Path, description = "Device id", pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", example = "pump-1"), LimitQuery),
    responses(
        (status = 200, description = "Log lines, newest first", body = Vec<LogView>),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CommandRequest {
    /// `"ping"`, `"reboot"` or `{"set_telemetry_interval": {"interval_ms": 5000}}`.
    #[schema(value_type = schema::Action)]
    action: Action,
}

#[utoipa::path(
    post,
    path = "/devices/{id}/commands",
    tag = "commands",
    params(("id" = String, Path, description = "Device id", pattern = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$", example = "pump-1")),
    request_body = CommandRequest,
    responses(
        (status = 202, description = "Sent; its state changes when the device answers", body = CommandView),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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
        Action::Validate(_) => {
            return Err(engine_action(
                "validate",
                "POST /api/v1/validations or a rollout's validate stage",
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

#[utoipa::path(
    get,
    path = "/commands/{id}",
    tag = "commands",
    params(("id" = u64, Path, description = "Command id")),
    responses(
        (status = 200, description = "The command and its state", body = CommandView),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
async fn get_command(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<CommandView>, ApiError> {
    match read(&state, move |s| s.command(id)).await? {
        Some(c) => Ok(Json(c.into())),
        None => Err(ApiError::NotFound(format!("command {id} not found"))),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AlertQuery {
    /// `open`, `acknowledged` or `resolved`.
    state: Option<String>,
    /// `info`, `warning` or `critical`.
    severity: Option<String>,
    /// Only this device's alerts.
    device: Option<String>,
    /// At most this many, 1 to 10,000 (default 100).
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/alerts",
    tag = "alerts",
    params(AlertQuery),
    responses(
        (status = 200, description = "Alerts, newest first", body = Vec<AlertView>),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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

#[utoipa::path(
    get,
    path = "/alerts/{id}",
    tag = "alerts",
    params(("id" = u64, Path, description = "Alert id")),
    responses(
        (status = 200, description = "The alert", body = AlertView),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
async fn get_alert(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<AlertView>, ApiError> {
    match read(&state, move |s| s.alert(id)).await? {
        Some(a) => Ok(Json(a.into())),
        None => Err(ApiError::NotFound(format!("alert {id} not found"))),
    }
}

#[utoipa::path(
    post,
    path = "/alerts/{id}/ack",
    tag = "alerts",
    params(("id" = u64, Path, description = "Alert id")),
    request_body(content = Option<NoBody>, description = "Empty, or {}"),
    responses(
        (status = 200, description = "Acknowledged (it stays open until resolved)", body = AlertView),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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

#[utoipa::path(
    post,
    path = "/alerts/{id}/resolve",
    tag = "alerts",
    params(("id" = u64, Path, description = "Alert id")),
    request_body(content = Option<NoBody>, description = "Empty, or {}"),
    responses(
        (status = 200, description = "Resolved", body = AlertView),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
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
#[utoipa::path(
    post,
    path = "/backup/snapshot",
    tag = "backup",
    request_body(content = Option<NoBody>, description = "Empty, or {}"),
    responses(
        (status = 200, description = "A snapshot of the database, written into the data dir for `fleetgate backup`", body = Snapshot),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
async fn backup_snapshot(
    State(state): AppState,
    _: OptionalJson<NoBody>,
) -> Result<Json<Snapshot>, ApiError> {
    let name = format!("{}{}.redb", crate::backup::SNAPSHOT_PREFIX, now_ms());
    let path = state.data_dir.join(name);
    let dest = path.clone();
    read(&state, move |s| s.snapshot(&dest)).await?;
    let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
    Ok(Json(Snapshot {
        path: path.display().to_string(),
        bytes,
    }))
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct IngestView {
    /// When these figures were read.
    pub at: String,
    pub mqtt: MqttCounts,
    /// Device messages committed to storage, by channel.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub stored: BTreeMap<&'static str, u64>,
    /// Device messages refused, by reason.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub rejected: BTreeMap<&'static str, u64>,
    /// Telemetry sequence numbers missing since start (late arrivals subtract).
    pub telemetry_lost: i64,
    pub latency: LatencyView,
    pub process: ProcessView,
    pub telemetry_duplicates: u64,
    pub write_batches: u64,
    pub queue_depth: i64,
    pub storage: StorageView,
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct MqttCounts {
    pub connected_devices: i64,
    pub connects: u64,
    /// Connections refused before CONNACK, by reason.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub refused: BTreeMap<&'static str, u64>,
}

/// Telemetry from its device timestamp to its commit, since the gateway started.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct LatencyView {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ProcessView {
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct StorageView {
    pub bytes: u64,
    pub devices: u64,
    pub telemetry_rows: u64,
    pub log_rows: u64,
    pub alerts: u64,
    pub commands: u64,
}

#[utoipa::path(
    get,
    path = "/ingest",
    tag = "ingest",
    responses(
        (status = 200, description = "Ingest counters, latency, process and storage figures", body = IngestView),
        (status = "4XX", description = "The request was refused; the body says why", body = schema::ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = schema::ErrorBody),
    )
)]
async fn ingest_counts(State(state): AppState) -> Result<Json<IngestView>, ApiError> {
    let counts = state.metrics.counts();
    let latency = state.metrics.ingest_latency();
    let tables = read(&state, |s| s.counts()).await?;
    Ok(Json(IngestView {
        at: crate::clock::rfc3339(now_ms()),
        mqtt: MqttCounts {
            connected_devices: counts.connected_devices,
            connects: counts.connects,
            refused: counts.refused,
        },
        stored: counts.stored,
        rejected: counts.rejected,
        telemetry_lost: counts.lost,
        latency: LatencyView {
            count: latency.count,
            p50_ms: latency.p50_ms,
            p99_ms: latency.p99_ms,
            p999_ms: latency.p999_ms,
            max_ms: latency.max_ms,
        },
        process: ProcessView {
            resident_bytes: crate::metrics::resident_memory_bytes(),
            cpu_seconds: crate::metrics::cpu_seconds(),
        },
        telemetry_duplicates: counts.duplicates,
        write_batches: counts.batches,
        queue_depth: counts.queue_depth,
        storage: StorageView {
            bytes: state.store.file_size(),
            devices: tables.devices,
            telemetry_rows: tables.telemetry,
            log_rows: tables.logs,
            alerts: tables.alerts,
            commands: tables.commands,
        },
    }))
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
