//! Registry and update endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use fleetgate_protocol::ArtifactKind;
use serde::Deserialize;
use utoipa::ToSchema;

use super::schema::ErrorBody;
use super::views::{ReleaseView, TransferView};
use super::{
    ApiBytes, ApiError, ApiJson, ApiPath, ApiQuery, ApiState, NoBody, OptionalJson, limit, read,
};
use crate::auth::Caller;
use crate::clock::now_ms;
use crate::ingest::UpdateRequest;
use crate::registry::RegisterError;

type AppState = State<Arc<ApiState>>;

impl From<RegisterError> for ApiError {
    fn from(e: RegisterError) -> Self {
        match e {
            RegisterError::Storage(e) => ApiError::Internal(e.to_string()),
            RegisterError::Io(e) => ApiError::Internal(e.to_string()),
            RegisterError::Conflict(m) => ApiError::Conflict(m),
            RegisterError::NotFound(m) => ApiError::NotFound(m),
            other => ApiError::BadRequest(other.to_string()),
        }
    }
}

fn kind(name: &str) -> Result<ArtifactKind, ApiError> {
    ArtifactKind::from_name(name)
        .ok_or_else(|| ApiError::BadRequest(format!("kind {name:?}: one of model, firmware")))
}

async fn view(
    state: &Arc<ApiState>,
    r: crate::model::ReleaseRecord,
) -> Result<ReleaseView, ApiError> {
    let (k, n, counter) = (r.kind, r.name.clone(), r.release);
    let (aliases, reqs, results) = read(state, move |s| {
        Ok((
            s.aliases(k, &n)?,
            s.requirements(k, &n, counter)?,
            s.validation_results(k, &n, counter)?,
        ))
    })
    .await?;
    let names = aliases
        .into_iter()
        .filter(|(_, c)| *c == counter)
        .map(|(a, _)| a)
        .collect();
    let mut v = ReleaseView::new(r, names);
    v.requirements = reqs
        .map(|r| super::validation::requirements_view(&r))
        .unwrap_or_default();
    v.validation = super::validation::classes_view(&results);
    Ok(v)
}

/// `POST /registry/bundles`: the body is a bundle file from `fleetgate bundle sign`.
#[utoipa::path(
    post,
    path = "/registry/bundles",
    tag = "registry",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A bundle file from `fleetgate bundle sign`"),
    responses(
        (status = 201, description = "Registered", body = Registered),
        (status = 200, description = "Exactly this artifact was registered before", body = Registered),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn upload(
    State(state): AppState,
    caller: Caller,
    ApiBytes(body): ApiBytes,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    let registry = state.registry.clone();
    let registered =
        tokio::task::spawn_blocking(move || registry.register(&body, now_ms(), &caller.name))
            .await??;
    let status = if registered.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let release = view(&state, registered.release).await?;
    Ok((
        status,
        Json(Registered {
            created: registered.created,
            release,
        }),
    ))
}

/// What an upload did.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct Registered {
    /// False when exactly this artifact was registered before (uploads are idempotent).
    pub created: bool,
    pub release: ReleaseView,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReleaseQuery {
    /// `model` or `firmware`.
    kind: Option<String>,
    name: Option<String>,
}

#[utoipa::path(
    get,
    path = "/registry",
    tag = "registry",
    params(ReleaseQuery),
    responses(
        (status = 200, description = "Releases with their artifacts, aliases and annotations", body = Vec<ReleaseView>),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): AppState,
    ApiQuery(q): ApiQuery<ReleaseQuery>,
) -> Result<Json<Vec<ReleaseView>>, ApiError> {
    let k = q.kind.as_deref().map(kind).transpose()?;
    let releases = read(&state, move |s| s.releases(k, q.name.as_deref())).await?;
    let mut out = Vec::with_capacity(releases.len());
    for r in releases {
        out.push(view(&state, r).await?);
    }
    Ok(Json(out))
}

#[utoipa::path(
    get,
    path = "/registry/{kind}/{name}/{version}",
    tag = "registry",
    params(
        ("kind" = String, Path, description = "model or firmware", example = "model"),
        ("name" = String, Path, example = "kws"),
        ("version" = String, Path, description = "A version, or an alias", example = "1.0.0"),
    ),
    responses(
        (status = 200, description = "The release", body = ReleaseView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): AppState,
    ApiPath((k, name, version)): ApiPath<(String, String, String)>,
) -> Result<Json<ReleaseView>, ApiError> {
    let k = kind(&k)?;
    let (n, v) = (name.clone(), version.clone());
    match read(&state, move |s| s.release(k, &n, &v)).await? {
        Some(r) => Ok(Json(view(&state, r).await?)),
        None => Err(ApiError::NotFound(format!(
            "{} {name} {version} not found",
            k.name()
        ))),
    }
}

/// A merge patch of a release's annotations: lineage keys given are set (null removes one),
/// the others kept; `tags` replaces the list.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Annotations {
    /// Keys to set; a key set to null is removed; keys not given are kept.
    lineage: Option<BTreeMap<String, Option<String>>>,
    /// Replaces the tags.
    tags: Option<Vec<String>>,
}

#[utoipa::path(
    patch,
    path = "/registry/{kind}/{name}/{version}",
    tag = "registry",
    params(
        ("kind" = String, Path, description = "model or firmware", example = "model"),
        ("name" = String, Path, example = "kws"),
        ("version" = String, Path, description = "A version, or an alias", example = "1.0.0"),
    ),
    request_body = Annotations,
    responses(
        (status = 200, description = "The release with its annotations merged", body = ReleaseView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn annotate(
    State(state): AppState,
    ApiPath((k, name, version)): ApiPath<(String, String, String)>,
    ApiJson(body): ApiJson<Annotations>,
) -> Result<Json<ReleaseView>, ApiError> {
    let k = kind(&k)?;
    let registry = state.registry.clone();
    let r = tokio::task::spawn_blocking(move || {
        registry.annotate(k, &name, &version, body.lineage, body.tags)
    })
    .await??;
    Ok(Json(view(&state, r).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AliasBody {
    /// The version the alias names.
    version: String,
}

#[utoipa::path(
    put,
    path = "/registry/{kind}/{name}/aliases/{alias}",
    tag = "registry",
    params(
        ("kind" = String, Path, description = "model or firmware", example = "model"),
        ("name" = String, Path, example = "kws"),
        ("alias" = String, Path, description = "1-32 of a-z 0-9 - _, starting with a letter", example = "production"),
    ),
    request_body = AliasBody,
    responses(
        (status = 200, description = "The release the alias now names", body = ReleaseView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn set_alias(
    State(state): AppState,
    ApiPath((k, name, alias)): ApiPath<(String, String, String)>,
    ApiJson(body): ApiJson<AliasBody>,
) -> Result<Json<ReleaseView>, ApiError> {
    let k = kind(&k)?;
    let registry = state.registry.clone();
    let r =
        tokio::task::spawn_blocking(move || registry.set_alias(k, &name, &alias, &body.version))
            .await??;
    Ok(Json(view(&state, r).await?))
}

#[utoipa::path(
    delete,
    path = "/registry/{kind}/{name}/aliases/{alias}",
    tag = "registry",
    params(
        ("kind" = String, Path, description = "model or firmware", example = "model"),
        ("name" = String, Path, example = "kws"),
        ("alias" = String, Path, description = "1-32 of a-z 0-9 - _, starting with a letter", example = "production"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn remove_alias(
    State(state): AppState,
    ApiPath((k, name, alias)): ApiPath<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let k = kind(&k)?;
    let registry = state.registry.clone();
    tokio::task::spawn_blocking(move || registry.remove_alias(k, &name, &alias)).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// `model` or `firmware`.
    kind: String,
    name: String,
    /// A version or an alias.
    version: String,
    /// These devices; or
    devices: Option<Vec<String>>,
    /// every enrolled device.
    #[serde(default)]
    all: bool,
    /// Offer a release older than the one a device runs.
    #[serde(default)]
    allow_downgrade: bool,
}

/// A device an update started on, with its transfer.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct Started {
    pub device: String,
    pub transfer: u64,
}

/// A device left out, and why.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct Skipped {
    pub device: String,
    pub reason: String,
}

/// What `POST /updates` did.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct StartPlan {
    pub version: String,
    pub release: u64,
    pub started: Vec<Started>,
    pub skipped: Vec<Skipped>,
}

#[utoipa::path(
    post,
    path = "/updates",
    tag = "updates",
    request_body = StartBody,
    responses(
        (status = 202, description = "Which devices started and which were skipped, and why", body = StartPlan),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn start(
    State(state): AppState,
    caller: Caller,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<(StatusCode, Json<StartPlan>), ApiError> {
    let devices = match (body.devices, body.all) {
        (Some(d), false) if !d.is_empty() => Some(d),
        (None, true) => None,
        _ => {
            return Err(ApiError::BadRequest(
                "give either \"devices\": [...] or \"all\": true".to_owned(),
            ));
        }
    };
    let request = UpdateRequest {
        kind: kind(&body.kind)?,
        name: body.name,
        version: body.version,
        devices,
        allow_downgrade: body.allow_downgrade,
    };
    let plan = state.control.start_updates(request, caller.name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(StartPlan {
            version: plan.version.to_string(),
            release: plan.release,
            started: plan
                .started
                .iter()
                .map(|(d, t)| Started {
                    device: d.clone(),
                    transfer: *t,
                })
                .collect(),
            skipped: plan
                .skipped
                .iter()
                .map(|(d, why)| Skipped {
                    device: d.clone(),
                    reason: why.to_string(),
                })
                .collect(),
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TransferQuery {
    /// Only this device's transfers.
    device: Option<String>,
    /// At most this many, 1 to 10,000 (default 100).
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/updates",
    tag = "updates",
    params(TransferQuery),
    responses(
        (status = 200, description = "Transfers, newest first", body = Vec<TransferView>),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn transfers(
    State(state): AppState,
    ApiQuery(q): ApiQuery<TransferQuery>,
) -> Result<Json<Vec<TransferView>>, ApiError> {
    let limit = limit(q.limit)?;
    let rows = read(&state, move |s| s.transfers(q.device.as_deref(), limit)).await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

#[utoipa::path(
    get,
    path = "/updates/{id}",
    tag = "updates",
    params(("id" = u64, Path, description = "Transfer id")),
    responses(
        (status = 200, description = "The transfer", body = TransferView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn transfer(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<TransferView>, ApiError> {
    match read(&state, move |s| s.transfer(id)).await? {
        Some(t) => Ok(Json(t.into())),
        None => Err(ApiError::NotFound(format!("transfer {id} not found"))),
    }
}

#[utoipa::path(
    post,
    path = "/updates/{id}/cancel",
    tag = "updates",
    params(("id" = u64, Path, description = "Transfer id")),
    request_body(content = Option<NoBody>, description = "Empty, or {}"),
    responses(
        (status = 200, description = "The transfer, cancelled", body = TransferView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    _: OptionalJson<NoBody>,
) -> Result<Json<TransferView>, ApiError> {
    let t = state.control.cancel_update(id, caller.name).await?;
    Ok(Json(t.into()))
}
