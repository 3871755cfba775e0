//! Who may call what: bearer tokens with roles, the role each endpoint needs, the audit log of
//! every change, and the token endpoints.
//!
//! Reads need `read-only`; changes to rollouts, updates, commands and alerts need `operator`;
//! enrollment and credentials, the registry, tokens, the audit log and backups need `admin`. The token
//! from the config (or the environment, or the generated token file) is the admin token
//! `bootstrap`; further tokens are created through the API, shown once and stored as SHA-256
//! digests. Every request other than GET that passed the token check is recorded in the
//! `audit` table with the token's name and the answer's status, refused ones (403) included.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, MatchedPath, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiState, limit, read};
use crate::auth::{self, Caller, Role};
use crate::clock::{now_ms, rfc3339};
use crate::model::{AuditRecord, TokenRecord};
use crate::storage::StorageError;

type AppState = State<Arc<ApiState>>;

/// The role a request needs: `path` is the route pattern under `/api/v1`.
pub fn required_role(method: &Method, path: &str) -> Role {
    let admin_only = ["/tokens", "/audit", "/backup"]
        .iter()
        .any(|p| path.starts_with(p));
    let admin_area = path.starts_with("/registry")
        || (path.starts_with("/devices") && path != "/devices/{id}/commands");
    let reads = method == Method::GET || method == Method::HEAD;
    if admin_only {
        Role::Admin
    } else if reads {
        Role::ReadOnly
    } else if admin_area {
        Role::Admin
    } else {
        Role::Operator
    }
}

/// Checks the bearer token and the role the endpoint needs, hands the [`Caller`] to the
/// handler, and records every change in the audit log.
pub async fn require_token(
    State(state): AppState,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| state.tokens.check(t.trim()));
    let Some(caller) = caller else {
        return Err(ApiError::Unauthorized);
    };
    let method = req.method().clone();
    let path = req
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| req.uri().path().to_owned(), |u| u.path().to_owned());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().trim_start_matches("/api/v1").to_owned())
        .unwrap_or_default();
    let needed = required_role(&method, &route);
    let response = if caller.role < needed {
        Err(ApiError::Forbidden(format!(
            "token `{}` has role {}; {method} {route} needs {needed}",
            caller.name, caller.role
        )))
    } else {
        req.extensions_mut().insert(caller.clone());
        tokio::time::timeout(super::REQUEST_TIMEOUT, next.run(req))
            .await
            .map_err(|_| ApiError::Timeout)
    };
    if method != Method::GET && method != Method::HEAD {
        let status = match &response {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status().as_u16(),
        };
        let entry = AuditRecord {
            at_ms: now_ms(),
            by: caller.name,
            role: caller.role,
            method: method.to_string(),
            path,
            status,
        };
        let store = state.store.clone();
        let written = tokio::task::spawn_blocking(move || store.write(|t| t.append_audit(&entry)));
        match written.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not write the audit log"),
            Err(e) => tracing::error!(error = %e, "could not write the audit log"),
        }
    }
    response
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Internal("no caller on an authenticated route".to_owned()))
    }
}

fn token_view(t: &TokenRecord) -> Value {
    json!({
        "name": t.name,
        "role": t.role,
        "created": rfc3339(t.created_ms),
        "created_by": t.created_by,
    })
}

/// `GET /tokens`: the tokens created through the API (the bootstrap token is not stored).
pub async fn list(State(state): AppState) -> Result<Json<Value>, ApiError> {
    let tokens = read(&state, |s| s.tokens()).await?;
    let list: Vec<Value> = tokens.iter().map(token_view).collect();
    Ok(Json(json!({ "tokens": list })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    role: String,
}

/// `POST /tokens`: a new token; the answer holds the secret, which is never shown again.
pub async fn create(
    State(state): AppState,
    caller: Caller,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    auth::check_token_name(&body.name).map_err(ApiError::BadRequest)?;
    let role: Role = body.role.parse().map_err(ApiError::BadRequest)?;
    let secret = auth::new_secret().map_err(|e| ApiError::Internal(e.to_string()))?;
    let record = TokenRecord {
        name: body.name,
        digest: auth::digest(&secret),
        role,
        created_ms: now_ms(),
        created_by: caller.name,
    };
    let stored = record.clone();
    let created = read(&state, move |s| s.write(|t| t.insert_token(&stored))).await?;
    if !created {
        return Err(ApiError::Conflict(format!(
            "a token named `{}` exists; revoke it first",
            record.name
        )));
    }
    state.tokens.insert(
        record.digest,
        Caller {
            name: record.name.clone(),
            role,
        },
    );
    let mut view = token_view(&record);
    view["token"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(view)))
}

/// `DELETE /tokens/{name}`: the token stops working at once.
pub async fn revoke(
    State(state): AppState,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    if name == auth::BOOTSTRAP_TOKEN {
        return Err(ApiError::BadRequest(format!(
            "`{name}` is the configured admin token (http.token, ${}, or <data_dir>/{}): change it there and restart",
            auth::TOKEN_ENV,
            auth::TOKEN_FILE
        )));
    }
    let key = name.clone();
    let removed = read(&state, move |s| s.write(|t| t.remove_token(&key))).await?;
    if !removed {
        return Err(ApiError::NotFound(format!("no token named `{name}`")));
    }
    // Only a stored token is forgotten: the name of one that is not stored may still be
    // the bootstrap token's, held in memory only.
    state.tokens.remove(&name);
    Ok(Json(json!({ "revoked": name })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Entries numbered below this (for paging back); default: from the newest.
    before: Option<u64>,
    limit: Option<usize>,
}

/// `GET /audit`: changes made through the API, newest first.
pub async fn audit(
    State(state): AppState,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let n = limit(q.limit)?;
    let before = q.before.unwrap_or(u64::MAX);
    let entries = read(&state, move |s| s.audit(before, n)).await?;
    let list: Vec<Value> = entries
        .iter()
        .map(|(id, e)| {
            json!({
                "id": id,
                "at": rfc3339(e.at_ms),
                "by": e.by,
                "role": e.role,
                "method": e.method,
                "path": e.path,
                "status": e.status,
            })
        })
        .collect();
    Ok(Json(json!({ "entries": list })))
}

/// Loads the stored tokens and adds the bootstrap token, for the API's token check.
pub fn load_tokens(
    store: &crate::storage::Store,
    bootstrap: &str,
) -> Result<auth::Tokens, StorageError> {
    let tokens = auth::Tokens::default();
    for t in store.tokens()? {
        tokens.insert(
            t.digest,
            Caller {
                name: t.name,
                role: t.role,
            },
        );
    }
    tokens.insert(
        auth::digest(bootstrap),
        Caller {
            name: auth::BOOTSTRAP_TOKEN.to_owned(),
            role: Role::Admin,
        },
    );
    Ok(tokens)
}
