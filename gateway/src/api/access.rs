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
use utoipa::ToSchema;

use super::schema::ErrorBody;
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

/// An operator token, without its secret.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct TokenView {
    pub name: String,
    /// `read-only`, `operator` or `admin`.
    #[schema(value_type = String)]
    pub role: Role,
    pub created: String,
    pub created_by: String,
}

fn token_view(t: &TokenRecord) -> TokenView {
    TokenView {
        name: t.name.clone(),
        role: t.role,
        created: rfc3339(t.created_ms),
        created_by: t.created_by.clone(),
    }
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// `GET /tokens`: the tokens created through the API (the bootstrap token is not stored).
#[utoipa::path(
    get,
    path = "/tokens",
    tag = "access",
    responses(
        (status = 200, description = "Tokens created through the API (never their secrets)", body = TokenList),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn list(State(state): AppState) -> Result<Json<TokenList>, ApiError> {
    let tokens = read(&state, |s| s.tokens()).await?;
    Ok(Json(TokenList {
        tokens: tokens.iter().map(token_view).collect(),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// 1 to 64 of `a-z 0-9 - _ .`.
    name: String,
    /// `read-only`, `operator` or `admin`.
    role: String,
}

/// A new token: shown this once.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct NewToken {
    #[serde(flatten)]
    pub view: TokenView,
    /// The secret to send as `Authorization: Bearer <token>`; only its SHA-256 is kept.
    pub token: String,
}

/// `POST /tokens`: a new token; the answer holds the secret, which is never shown again.
#[utoipa::path(
    post,
    path = "/tokens",
    tag = "access",
    request_body = CreateBody,
    responses(
        (status = 201, description = "Created; the secret is shown only now", body = NewToken),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): AppState,
    caller: Caller,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
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
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            view: token_view(&record),
            token: secret,
        }),
    ))
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct Revoked {
    pub revoked: String,
}

/// `DELETE /tokens/{name}`: the token stops working at once.
#[utoipa::path(
    delete,
    path = "/tokens/{name}",
    tag = "access",
    params(("name" = String, Path, description = "Token name")),
    responses(
        (status = 200, description = "Revoked; it stops working at once", body = Revoked),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn revoke(
    State(state): AppState,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Revoked>, ApiError> {
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
    Ok(Json(Revoked { revoked: name }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Entries numbered below this (for paging back); default: from the newest.
    before: Option<u64>,
    /// At most this many, 1 to 10,000 (default 100).
    limit: Option<usize>,
}

/// A change made through the API.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct AuditEntry {
    pub id: u64,
    pub at: String,
    /// The token's name.
    pub by: String,
    #[schema(value_type = String)]
    pub role: Role,
    pub method: String,
    pub path: String,
    /// The answer's HTTP status.
    pub status: u16,
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
}

/// `GET /audit`: changes made through the API, newest first.
#[utoipa::path(
    get,
    path = "/audit",
    tag = "access",
    params(AuditQuery),
    responses(
        (status = 200, description = "Changes made through the API, newest first", body = AuditList),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn audit(
    State(state): AppState,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditList>, ApiError> {
    let n = limit(q.limit)?;
    let before = q.before.unwrap_or(u64::MAX);
    let entries = read(&state, move |s| s.audit(before, n)).await?;
    Ok(Json(AuditList {
        entries: entries
            .into_iter()
            .map(|(id, e)| AuditEntry {
                id,
                at: rfc3339(e.at_ms),
                by: e.by,
                role: e.role,
                method: e.method,
                path: e.path,
                status: e.status,
            })
            .collect(),
    }))
}

/// Who a token is: what the dashboard shows, and how it knows which actions to offer.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct Me {
    /// The token's name (`bootstrap` for the configured token).
    pub name: String,
    /// `read-only`, `operator` or `admin`.
    #[schema(value_type = String)]
    pub role: Role,
}

/// `GET /me`: the name and role of the token the request came with.
#[utoipa::path(
    get,
    path = "/me",
    tag = "access",
    responses(
        (status = 200, description = "The token's name and role", body = Me),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn me(caller: Caller) -> Json<Me> {
    Json(Me {
        name: caller.name,
        role: caller.role,
    })
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
