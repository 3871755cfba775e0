//! Rollout endpoints: create, list, inspect (stage, counts, each gate's latest numbers), act on
//! (pause, resume, abort, roll back), per-device states and the audit log.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use fleetgate_config::RolloutPolicy;
use fleetgate_protocol::ArtifactKind;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, ApiPath, ApiQuery, ApiState, OptionalJson, limit, read};
use crate::auth::Caller;
use crate::clock::rfc3339;
use crate::ingest::RolloutRequest;
use crate::registry::keys::hex;
use crate::rollouts::model::{GateEval, RolloutDevice, RolloutRecord, RolloutState, Target};
use crate::rollouts::{OperatorAction, View, plan};

type AppState = State<Arc<ApiState>>;

fn duration(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn policy_view(p: &RolloutPolicy) -> Value {
    let threshold = |t: fleetgate_config::Threshold| json!({ "count": (t.count != u64::MAX).then_some(t.count), "pct": t.pct });
    json!({
        "stages": p.stages.iter().map(|s| json!({
            "size": s.size.to_string(),
            "min_reporting": s.min_reporting,
            "success_pct": s.success_pct,
            "bake": duration(s.bake),
            "max_concurrent": s.max_concurrent,
            "device_timeout": duration(s.device_timeout),
            "retries": s.retries,
            "abort": {
                "failed": threshold(s.abort.failed),
                "rejected": threshold(s.abort.rejected),
                "timed_out": threshold(s.abort.timed_out),
            },
        })).collect::<Vec<_>>(),
        "stratify": p.stratify,
        "gates": {
            "window": duration(p.gates.window),
            "confirm": duration(p.gates.confirm),
            "wait": duration(p.gates.wait),
            "min_devices": p.gates.min_devices,
            "min_samples": p.gates.min_samples,
            "alert_rate": p.gates.alert_rate,
            "min_alerts": p.gates.min_alerts,
            "latency_p95": p.gates.latency_p95,
            "free_mem": p.gates.free_mem,
            "temp": p.gates.temp,
            "power": p.gates.power,
            "prediction_js": p.gates.prediction_js,
            "confidence_drop": p.gates.confidence_drop,
            "drift": p.gates.drift,
        },
    })
}

fn target_view(t: &Target) -> Value {
    match t {
        Target::All => json!({ "all": true }),
        Target::Labels(l) => json!({ "labels": l }),
        Target::Devices(d) => json!({ "devices": d }),
    }
}

fn gate_view(e: &GateEval) -> Value {
    json!({
        "gate": e.gate.name(),
        "verdict": serde_json::to_value(e.verdict).unwrap_or(Value::Null),
        "updated": e.updated,
        "control": e.control,
        "threshold": e.threshold,
        "updated_samples": e.updated_n,
        "control_samples": e.control_n,
        "updated_devices": e.updated_devices,
        "control_devices": e.control_devices,
        "at": rfc3339(e.at_ms),
    })
}

fn state_view(s: &RolloutState) -> (Option<&str>, Option<&str>) {
    match s {
        RolloutState::Paused { reason, by }
        | RolloutState::Aborted { reason, by }
        | RolloutState::RolledBack { reason, by } => (Some(reason), Some(by)),
        RolloutState::Running | RolloutState::Completed => (None, None),
    }
}

/// A rollout with its numbers; `counts` per device state overall and per stage.
fn rollout_view(
    r: &RolloutRecord,
    sizes: &[u64],
    counts: &BTreeMap<&'static str, u64>,
    stage_counts: &[BTreeMap<&'static str, u64>],
) -> Value {
    let (reason, by) = state_view(&r.state);
    let k = r.stage.min(r.policy.stages.len().saturating_sub(1));
    let bake = r.policy.stages.get(k).map(|s| s.bake.as_millis() as u64);
    json!({
        "id": r.id,
        "kind": r.kind.name(),
        "name": r.name,
        "version": r.version.to_string(),
        "release": r.release,
        "target": target_view(&r.target),
        "state": r.state.name(),
        "reason": reason,
        "by": by,
        "planned": r.planned,
        "stage": {
            "number": k + 1,
            "of": r.policy.stages.len(),
            "size": r.policy.stages.get(k).map(|s| s.size.to_string()),
            "devices": sizes.get(k),
            "started_at": rfc3339(r.stage_started_ms),
            "baking_since": r.baking_since_ms.map(rfc3339),
            "bake_ends_at": r.baking_since_ms.zip(bake).map(|(s, b)| rfc3339(s + b)),
        },
        "counts": counts,
        "stages": r.policy.stages.iter().enumerate().map(|(i, s)| json!({
            "number": i + 1,
            "size": s.size.to_string(),
            "devices": sizes.get(i),
            "counts": stage_counts.get(i),
        })).collect::<Vec<_>>(),
        "gates": r.gates.iter().map(gate_view).collect::<Vec<_>>(),
        "policy": policy_view(&r.policy),
        "created": { "at": rfc3339(r.created.at_ms), "by": r.created.by },
        "finished_at": r.finished_ms.map(rfc3339),
        "audit_entries": r.audit_len,
    })
}

fn from_live(v: &View) -> Value {
    rollout_view(&v.record, &v.sizes, &v.counts, &v.stage_counts)
}

/// A rollout the engine no longer holds, from storage.
fn from_stored(r: &RolloutRecord, devices: &[RolloutDevice]) -> Value {
    let sizes = plan::sizes(&r.policy.stages, r.planned);
    let mut counts = BTreeMap::new();
    let mut stage_counts = vec![BTreeMap::new(); sizes.len()];
    for d in devices {
        *counts.entry(d.state.name()).or_insert(0) += 1;
        if let Some(s) = stage_counts.get_mut(d.stage) {
            *s.entry(d.state.name()).or_insert(0) += 1;
        }
    }
    rollout_view(r, &sizes, &counts, &stage_counts)
}

async fn one(state: &Arc<ApiState>, id: u64) -> Result<Value, ApiError> {
    if let Some(v) = state.control.rollout_views(Some(id)).await?.first() {
        return Ok(from_live(v));
    }
    let stored = read(state, move |s| {
        let r = s.rollout(id)?;
        let devices = match &r {
            Some(_) => s.rollout_devices(id)?,
            None => Vec::new(),
        };
        Ok(r.map(|r| (r, devices)))
    })
    .await?;
    match stored {
        Some((r, devices)) => Ok(from_stored(&r, &devices)),
        None => Err(ApiError::NotFound(format!("rollout {id} not found"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    kind: String,
    name: String,
    /// A version or an alias.
    version: String,
    #[serde(default)]
    all: bool,
    labels: Option<BTreeMap<String, String>>,
    devices: Option<Vec<String>>,
    /// Overrides of the configured `[rollouts.policy]`, with the same keys.
    policy: Option<serde_json::Map<String, Value>>,
}

/// `POST /rollouts`.
pub async fn create(
    State(state): AppState,
    caller: Caller,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let target = match (body.all, body.labels, body.devices) {
        (true, None, None) => Target::All,
        (false, Some(l), None) if !l.is_empty() => Target::Labels(l),
        (false, None, Some(d)) if !d.is_empty() => Target::Devices(d),
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one target: \"all\": true, \"labels\": {...} or \"devices\": [...]"
                    .to_owned(),
            ));
        }
    };
    let kind = ArtifactKind::from_name(&body.kind).ok_or_else(|| {
        ApiError::BadRequest(format!("kind {:?}: one of model, firmware", body.kind))
    })?;
    let policy = match &body.policy {
        None => state.rollouts.policy.clone(),
        Some(overrides) => state
            .rollouts
            .policy_with_value(overrides)
            .map_err(|errors| {
                let listed: Vec<String> = errors.iter().map(|e| format!("policy.{e}")).collect();
                ApiError::BadRequest(listed.join("; "))
            })?,
    };
    let request = RolloutRequest {
        kind,
        name: body.name,
        version: body.version,
        target,
        policy,
    };
    let created = state.control.create_rollout(request, caller.name).await?;
    let id = created.record.id;
    let view = one(&state, id).await?;
    let skipped: Vec<Value> = created
        .skipped
        .iter()
        .map(|(d, why)| json!({ "device": d, "reason": why }))
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({ "rollout": view, "skipped": skipped })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<String>,
    limit: Option<usize>,
}

/// `GET /rollouts`: newest first.
pub async fn list(
    State(state): AppState,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    const STATES: [&str; 5] = ["running", "paused", "completed", "aborted", "rolled_back"];
    if let Some(s) = &q.state
        && !STATES.contains(&s.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "state {s:?}: one of {}",
            STATES.join(", ")
        )));
    }
    let limit = limit(q.limit)?;
    let live: BTreeMap<u64, Value> = state
        .control
        .rollout_views(None)
        .await?
        .iter()
        .map(|v| (v.record.id, from_live(v)))
        .collect();
    let records = read(&state, move |s| s.rollouts(limit)).await?;
    let mut out = Vec::new();
    for r in records {
        if q.state.as_deref().is_some_and(|s| s != r.state.name()) {
            continue;
        }
        let view = match live.get(&r.id) {
            Some(v) => v.clone(),
            None => {
                let id = r.id;
                let devices = read(&state, move |s| s.rollout_devices(id)).await?;
                from_stored(&r, &devices)
            }
        };
        out.push(view);
    }
    Ok(Json(out))
}

/// `GET /rollouts/{id}`.
pub async fn get(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(one(&state, id).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    reason: Option<String>,
}

/// Acts on a rollout; the body is empty or `{"reason": "..."}`.
async fn act(
    state: &Arc<ApiState>,
    caller: Caller,
    id: u64,
    action: OperatorAction,
    body: Option<ActionBody>,
) -> Result<Json<Value>, ApiError> {
    let reason = body.and_then(|b| b.reason);
    state
        .control
        .rollout(id, action, caller.name, reason)
        .await?;
    Ok(Json(one(state, id).await?))
}

pub async fn pause(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    OptionalJson(body): OptionalJson<ActionBody>,
) -> Result<Json<Value>, ApiError> {
    act(&state, caller, id, OperatorAction::Pause, body).await
}

pub async fn resume(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    OptionalJson(body): OptionalJson<ActionBody>,
) -> Result<Json<Value>, ApiError> {
    act(&state, caller, id, OperatorAction::Resume, body).await
}

pub async fn abort(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    OptionalJson(body): OptionalJson<ActionBody>,
) -> Result<Json<Value>, ApiError> {
    act(&state, caller, id, OperatorAction::Abort, body).await
}

pub async fn rollback(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    OptionalJson(body): OptionalJson<ActionBody>,
) -> Result<Json<Value>, ApiError> {
    act(&state, caller, id, OperatorAction::Rollback, body).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesQuery {
    state: Option<String>,
    stage: Option<usize>,
    limit: Option<usize>,
}

/// `GET /rollouts/{id}/devices`: in rollout order.
pub async fn devices(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<DevicesQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let limit = limit(q.limit)?;
    let (exists, mut devices) = read(&state, move |s| {
        Ok((s.rollout(id)?.is_some(), s.rollout_devices(id)?))
    })
    .await?;
    if !exists {
        return Err(ApiError::NotFound(format!("rollout {id} not found")));
    }
    devices.sort_by_key(|d| d.order);
    let transfers: Vec<u64> = devices.iter().filter_map(|d| d.transfer).collect();
    let live = read(&state, move |s| {
        let mut out = BTreeMap::new();
        for t in transfers {
            if let Some(r) = s.transfer(t)? {
                out.insert(t, r.state.name());
            }
        }
        Ok(out)
    })
    .await?;
    let out = devices
        .iter()
        .filter(|d| q.state.as_deref().is_none_or(|s| s == d.state.name()))
        .filter(|d| q.stage.is_none_or(|s| s == d.stage + 1))
        .take(limit)
        .map(|d| {
            let detail = match &d.state {
                crate::rollouts::model::DeviceState::Failed { reason }
                | crate::rollouts::model::DeviceState::Rejected { reason }
                | crate::rollouts::model::DeviceState::RollbackFailed { reason } => {
                    Some(reason.as_str())
                }
                _ => None,
            };
            json!({
                "device": d.device,
                "stage": d.stage + 1,
                "state": d.state.name(),
                "transfer": d.transfer,
                "transfer_state": d.transfer.and_then(|t| live.get(&t)),
                "reason": detail,
                "from": d.from.as_ref().map(|f| json!({ "version": f.version.to_string(), "release": f.release })),
                "updated_at": rfc3339(d.updated_ms),
            })
        })
        .collect();
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

/// `GET /rollouts/{id}/audit`: every decision and operator action, oldest first.
pub async fn audit(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let limit = limit(q.limit)?;
    let from = q.from.unwrap_or(0);
    let (exists, entries) = read(&state, move |s| {
        Ok((s.rollout(id)?.is_some(), s.rollout_audit(id, from, limit)?))
    })
    .await?;
    if !exists {
        return Err(ApiError::NotFound(format!("rollout {id} not found")));
    }
    Ok(Json(
        entries
            .into_iter()
            .map(|(n, e)| {
                json!({
                    "n": n,
                    "at": rfc3339(e.at_ms),
                    "by": e.by,
                    "event": e.event,
                    "message": e.message,
                    "detail": serde_json::from_str::<Value>(&e.detail).unwrap_or(Value::Null),
                })
            })
            .collect(),
    ))
}

/// `GET /rollouts/signing-key`: the key devices must trust for rollback directives.
pub async fn signing_key(State(state): AppState) -> Json<Value> {
    let public = state.rollback_public;
    Json(json!({
        "public_key": hex(&public),
        "key_id": hex(&fleetgate_protocol::sign::key_id(&public)),
    }))
}
