//! Registry and update endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use fleetgate_protocol::ArtifactKind;
use serde::Deserialize;
use serde_json::{Value, json};

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
    let aliases = read(state, move |s| s.aliases(k, &n)).await?;
    let names = aliases
        .into_iter()
        .filter(|(_, c)| *c == counter)
        .map(|(a, _)| a)
        .collect();
    Ok(ReleaseView::new(r, names))
}

/// `POST /registry/bundles`: the body is a bundle file from `fleetgate bundle sign`.
pub async fn upload(
    State(state): AppState,
    caller: Caller,
    ApiBytes(body): ApiBytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
        Json(json!({ "created": registered.created, "release": release })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseQuery {
    kind: Option<String>,
    name: Option<String>,
}

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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Annotations {
    lineage: Option<BTreeMap<String, Option<String>>>,
    tags: Option<Vec<String>>,
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasBody {
    version: String,
}

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

pub async fn remove_alias(
    State(state): AppState,
    ApiPath((k, name, alias)): ApiPath<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let k = kind(&k)?;
    let registry = state.registry.clone();
    tokio::task::spawn_blocking(move || registry.remove_alias(k, &name, &alias)).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    kind: String,
    name: String,
    /// A version or an alias.
    version: String,
    devices: Option<Vec<String>>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    allow_downgrade: bool,
}

pub async fn start(
    State(state): AppState,
    caller: Caller,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    let started: Vec<Value> = plan
        .started
        .iter()
        .map(|(d, t)| json!({ "device": d, "transfer": t }))
        .collect();
    let skipped: Vec<Value> = plan
        .skipped
        .iter()
        .map(|(d, why)| json!({ "device": d, "reason": why }))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(
            json!({ "version": plan.version.to_string(), "release": plan.release, "started": started, "skipped": skipped }),
        ),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferQuery {
    device: Option<String>,
    limit: Option<usize>,
}

pub async fn transfers(
    State(state): AppState,
    ApiQuery(q): ApiQuery<TransferQuery>,
) -> Result<Json<Vec<TransferView>>, ApiError> {
    let limit = limit(q.limit)?;
    let rows = read(&state, move |s| s.transfers(q.device.as_deref(), limit)).await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

pub async fn transfer(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<TransferView>, ApiError> {
    match read(&state, move |s| s.transfer(id)).await? {
        Some(t) => Ok(Json(t.into())),
        None => Err(ApiError::NotFound(format!("transfer {id} not found"))),
    }
}

pub async fn cancel(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    _: OptionalJson<NoBody>,
) -> Result<Json<TransferView>, ApiError> {
    let t = state.control.cancel_update(id, caller.name).await?;
    Ok(Json(t.into()))
}
