//! Rollout endpoints: create, list, inspect (stage, counts, each gate's latest numbers), act on
//! (pause, resume, abort, roll back), per-device states and the audit log.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use fleetgate_config::RolloutPolicy;
use fleetgate_protocol::ArtifactKind;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::schema::ErrorBody;
use super::views::StampView;
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

/// A health gate's latest numbers.
#[derive(Debug, Serialize, ToSchema)]
pub struct GateView {
    /// alert_rate, latency_p95, free_memory, temperature, power, predictions, confidence, drift.
    pub gate: &'static str,
    /// pass, failing, fail, insufficient, no_control or off.
    #[schema(value_type = String)]
    pub verdict: crate::rollouts::model::Verdict,
    /// The updated devices' value, the control devices', and the threshold they were judged by.
    pub updated: Option<f64>,
    pub control: Option<f64>,
    pub threshold: f64,
    pub updated_samples: u64,
    pub control_samples: u64,
    pub updated_devices: u64,
    pub control_devices: u64,
    pub at: String,
}

fn gate_view(e: &GateEval) -> GateView {
    GateView {
        gate: e.gate.name(),
        verdict: e.verdict,
        updated: e.updated,
        control: e.control,
        threshold: e.threshold,
        updated_samples: e.updated_n,
        control_samples: e.control_n,
        updated_devices: e.updated_devices,
        control_devices: e.control_devices,
        at: rfc3339(e.at_ms),
    }
}

fn state_view(s: &RolloutState) -> (Option<&str>, Option<&str>) {
    match s {
        RolloutState::Paused { reason, by }
        | RolloutState::Aborted { reason, by }
        | RolloutState::RolledBack { reason, by } => (Some(reason), Some(by)),
        RolloutState::Running | RolloutState::Completed => (None, None),
    }
}

/// Where a rollout is.
#[derive(Debug, Serialize, ToSchema)]
pub struct StageNow {
    /// 1-based.
    pub number: usize,
    pub of: usize,
    /// As configured: a count or a percentage, cumulative.
    pub size: Option<String>,
    /// Devices the stage holds, cumulative.
    pub devices: Option<u64>,
    pub started_at: String,
    pub baking_since: Option<String>,
    pub bake_ends_at: Option<String>,
}

/// One stage of a rollout and its devices per state.
#[derive(Debug, Serialize, ToSchema)]
pub struct StageView {
    pub number: usize,
    pub size: String,
    pub devices: Option<u64>,
    pub counts: Option<BTreeMap<String, u64>>,
}

/// A rollout with its numbers.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolloutView {
    pub id: u64,
    pub kind: &'static str,
    pub name: String,
    pub version: String,
    pub release: u64,
    /// `{"all": true}`, `{"labels": {...}}` or `{"devices": [...]}`.
    #[schema(value_type = Object)]
    pub target: Value,
    /// running, paused, completed, aborted or rolled_back.
    pub state: &'static str,
    /// Why it was paused, aborted or rolled back, and by whom.
    pub reason: Option<String>,
    pub by: Option<String>,
    /// Devices the rollout updates.
    pub planned: u64,
    pub stage: StageNow,
    /// Devices per state.
    pub counts: BTreeMap<String, u64>,
    pub stages: Vec<StageView>,
    /// Each gate's latest verdict and numbers.
    pub gates: Vec<GateView>,
    /// The policy it runs by: the configured one with this rollout's overrides.
    #[schema(value_type = Object)]
    pub policy: Value,
    pub created: StampView,
    pub finished_at: Option<String>,
    pub audit_entries: u64,
    /// Its validate stage, if it has one.
    pub validation: Option<ValidateStageView>,
}

/// A rollout's validate stage: bench devices of each targeted class must pass before stage 1.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidateStageView {
    /// waiting, passed or failed.
    pub state: &'static str,
    /// Passing bench devices each class needs.
    pub min_devices: u32,
    pub timeout: String,
    pub started_at: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// Targeted hardware class -> its bench devices by verdict (latest result of each).
    pub classes: BTreeMap<String, crate::rollouts::validate::ClassCounts>,
}

/// Adds the rollout's validate stage (from storage) to its view.
async fn with_validation(
    state: &Arc<ApiState>,
    mut v: RolloutView,
    r: (ArtifactKind, String, u64),
) -> Result<RolloutView, ApiError> {
    let id = v.id;
    let (kind, name, release) = r;
    let found = read(state, move |s| {
        let Some(stage) = s.rollout_validation(id)? else {
            return Ok(None);
        };
        Ok(Some((stage, s.validation_results(kind, &name, release)?)))
    })
    .await?;
    v.validation = found.map(|(stage, results)| {
        use crate::rollouts::validate::{ClassCounts, StageState};
        use crate::validation::Verdict;
        let mut classes: BTreeMap<String, ClassCounts> = stage
            .classes
            .iter()
            .map(|c| (c.clone(), ClassCounts::default()))
            .collect();
        for r in &results {
            if let Some(n) = classes.get_mut(&r.class) {
                match r.verdict() {
                    Verdict::Pass => n.passed += 1,
                    Verdict::Fail => n.failed += 1,
                    Verdict::Error => n.errors += 1,
                }
            }
        }
        ValidateStageView {
            state: stage.state.name(),
            min_devices: stage.min_devices,
            timeout: humantime::format_duration(std::time::Duration::from_millis(stage.timeout_ms))
                .to_string(),
            started_at: rfc3339(stage.started_ms),
            reason: match &stage.state {
                StageState::Failed { reason, .. } => Some(reason.clone()),
                _ => None,
            },
            classes,
        }
    });
    Ok(v)
}

fn key_of(v: &RolloutView) -> (ArtifactKind, String, u64) {
    (
        ArtifactKind::from_name(v.kind).unwrap_or(ArtifactKind::Model),
        v.name.clone(),
        v.release,
    )
}

fn owned(counts: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    counts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// A rollout with its numbers; `counts` per device state overall and per stage.
fn rollout_view(
    r: &RolloutRecord,
    sizes: &[u64],
    counts: &BTreeMap<&'static str, u64>,
    stage_counts: &[BTreeMap<&'static str, u64>],
) -> RolloutView {
    let (reason, by) = state_view(&r.state);
    let k = r.stage.min(r.policy.stages.len().saturating_sub(1));
    let bake = r.policy.stages.get(k).map(|s| s.bake.as_millis() as u64);
    RolloutView {
        id: r.id,
        kind: r.kind.name(),
        name: r.name.clone(),
        version: r.version.to_string(),
        release: r.release,
        target: target_view(&r.target),
        state: r.state.name(),
        reason: reason.map(str::to_owned),
        by: by.map(str::to_owned),
        planned: r.planned,
        stage: StageNow {
            number: k + 1,
            of: r.policy.stages.len(),
            size: r.policy.stages.get(k).map(|s| s.size.to_string()),
            devices: sizes.get(k).copied(),
            started_at: rfc3339(r.stage_started_ms),
            baking_since: r.baking_since_ms.map(rfc3339),
            bake_ends_at: r.baking_since_ms.zip(bake).map(|(s, b)| rfc3339(s + b)),
        },
        counts: owned(counts),
        stages: r
            .policy
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| StageView {
                number: i + 1,
                size: s.size.to_string(),
                devices: sizes.get(i).copied(),
                counts: stage_counts.get(i).map(owned),
            })
            .collect(),
        gates: r.gates.iter().map(gate_view).collect(),
        policy: policy_view(&r.policy),
        created: StampView {
            at: rfc3339(r.created.at_ms),
            by: r.created.by.clone(),
        },
        finished_at: r.finished_ms.map(rfc3339),
        audit_entries: r.audit_len,
        validation: None,
    }
}

fn from_live(v: &View) -> RolloutView {
    rollout_view(&v.record, &v.sizes, &v.counts, &v.stage_counts)
}

/// A rollout the engine no longer holds, from storage.
fn from_stored(r: &RolloutRecord, devices: &[RolloutDevice]) -> RolloutView {
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

async fn one(state: &Arc<ApiState>, id: u64) -> Result<RolloutView, ApiError> {
    if let Some(v) = state.control.rollout_views(Some(id)).await?.first() {
        let v = from_live(v);
        let key = key_of(&v);
        return with_validation(state, v, key).await;
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
        Some((r, devices)) => {
            let v = from_stored(&r, &devices);
            let key = key_of(&v);
            with_validation(state, v, key).await
        }
        None => Err(ApiError::NotFound(format!("rollout {id} not found"))),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// `model` or `firmware`.
    kind: String,
    name: String,
    /// A version or an alias.
    version: String,
    #[serde(default)]
    all: bool,
    labels: Option<BTreeMap<String, String>>,
    devices: Option<Vec<String>>,
    /// Overrides of the configured `[rollouts.policy]`, with the same keys.
    #[schema(value_type = Option<Object>)]
    policy: Option<serde_json::Map<String, Value>>,
    /// Start with a validate stage: the first production stage waits until every targeted
    /// hardware class has passing results from bench devices.
    validate: Option<ValidateBody>,
}

/// A validate stage's settings (unset: `[validation]`'s).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateBody {
    /// Passing bench devices each targeted class needs, 1..=1000.
    min_devices: Option<u32>,
    /// How long to wait for them, e.g. `30m`.
    timeout: Option<String>,
}

/// A new rollout, and the devices of its target it left out.
#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    pub rollout: RolloutView,
    pub skipped: Vec<super::updates::Skipped>,
}

/// `POST /rollouts`.
#[utoipa::path(
    post,
    path = "/rollouts",
    tag = "rollouts",
    request_body = CreateBody,
    responses(
        (status = 201, description = "Started", body = Created),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): AppState,
    caller: Caller,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
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
        validate: body
            .validate
            .map(|v| {
                crate::ingest::ValidateRequest::parse(v.min_devices, v.timeout.as_deref())
                    .map_err(ApiError::BadRequest)
            })
            .transpose()?,
    };
    let created = state.control.create_rollout(request, caller.name).await?;
    let id = created.record.id;
    let view = one(&state, id).await?;
    Ok((
        StatusCode::CREATED,
        Json(Created {
            rollout: view,
            skipped: created
                .skipped
                .iter()
                .map(|(d, why)| super::updates::Skipped {
                    device: d.clone(),
                    reason: why.clone(),
                })
                .collect(),
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// running, paused, completed, aborted or rolled_back.
    state: Option<String>,
    /// At most this many, 1 to 10,000 (default 100).
    limit: Option<usize>,
}

/// `GET /rollouts`: newest first.
#[utoipa::path(
    get,
    path = "/rollouts",
    tag = "rollouts",
    params(ListQuery),
    responses(
        (status = 200, description = "Rollouts, newest first", body = Vec<RolloutView>),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): AppState,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<RolloutView>>, ApiError> {
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
    let mut live: BTreeMap<u64, RolloutView> = state
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
        let view = match live.remove(&r.id) {
            Some(v) => v,
            None => {
                let id = r.id;
                let devices = read(&state, move |s| s.rollout_devices(id)).await?;
                from_stored(&r, &devices)
            }
        };
        let key = key_of(&view);
        out.push(with_validation(&state, view, key).await?);
    }
    Ok(Json(out))
}

/// `GET /rollouts/{id}`.
#[utoipa::path(
    get,
    path = "/rollouts/{id}",
    tag = "rollouts",
    params(("id" = u64, Path, description = "Rollout id", example = 1)),
    responses(
        (status = 200, description = "The rollout: stage, counts, each gate's latest numbers", body = RolloutView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
) -> Result<Json<RolloutView>, ApiError> {
    Ok(Json(one(&state, id).await?))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// Recorded in the rollout's audit log.
    reason: Option<String>,
}

/// Acts on a rollout; the body is empty or `{"reason": "..."}`.
async fn act(
    state: &Arc<ApiState>,
    caller: Caller,
    id: u64,
    action: OperatorAction,
    body: Option<ActionBody>,
) -> Result<Json<RolloutView>, ApiError> {
    let reason = body.and_then(|b| b.reason);
    state
        .control
        .rollout(id, action, caller.name, reason)
        .await?;
    Ok(Json(one(state, id).await?))
}

#[utoipa::path(
    post,
    path = "/rollouts/{id}/pause",
    tag = "rollouts",
    params(("id" = u64, Path, description = "Rollout id", example = 1)),
    request_body(content = Option<ActionBody>, description = "Empty, or {\"reason\": \"...\"}"),
    responses(
        (status = 200, description = "Paused: no updates start and no stage advances; the gates still watch", body = RolloutView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn pause(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    OptionalJson(body): OptionalJson<ActionBody>,
) -> Result<Json<RolloutView>, ApiError> {
    act(&state, caller, id, OperatorAction::Pause, body).await
}

#[utoipa::path(
    post,
    path = "/rollouts/{id}/resume",
    tag = "rollouts",
    params(("id" = u64, Path, description = "Rollout id", example = 1)),
    request_body(content = Option<ActionBody>, description = "Empty, or {\"reason\": \"...\"}"),
    responses(
        (status = 200, description = "Running again", body = RolloutView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn resume(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    OptionalJson(body): OptionalJson<ActionBody>,
) -> Result<Json<RolloutView>, ApiError> {
    act(&state, caller, id, OperatorAction::Resume, body).await
}

#[utoipa::path(
    post,
    path = "/rollouts/{id}/abort",
    tag = "rollouts",
    params(("id" = u64, Path, description = "Rollout id", example = 1)),
    request_body(content = Option<ActionBody>, description = "Empty, or {\"reason\": \"...\"}"),
    responses(
        (status = 200, description = "Aborted; devices keep what they run", body = RolloutView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn abort(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    OptionalJson(body): OptionalJson<ActionBody>,
) -> Result<Json<RolloutView>, ApiError> {
    act(&state, caller, id, OperatorAction::Abort, body).await
}

#[utoipa::path(
    post,
    path = "/rollouts/{id}/rollback",
    tag = "rollouts",
    params(("id" = u64, Path, description = "Rollout id", example = 1)),
    request_body(content = Option<ActionBody>, description = "Empty, or {\"reason\": \"...\"}"),
    responses(
        (status = 200, description = "Rolling back: every device that took the new version is sent back", body = RolloutView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn rollback(
    State(state): AppState,
    caller: Caller,
    ApiPath(id): ApiPath<u64>,
    OptionalJson(body): OptionalJson<ActionBody>,
) -> Result<Json<RolloutView>, ApiError> {
    act(&state, caller, id, OperatorAction::Rollback, body).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DevicesQuery {
    /// Only devices in this state.
    state: Option<String>,
    /// Only devices of this stage (1-based).
    stage: Option<usize>,
    /// At most this many, 1 to 10,000 (default 100).
    limit: Option<usize>,
}

/// The version a device ran before the rollout, to go back to.
#[derive(Debug, Serialize, ToSchema)]
pub struct FromVersion {
    pub version: String,
    pub release: u64,
}

/// One device of a rollout.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolloutDeviceView {
    pub device: String,
    /// 1-based.
    pub stage: usize,
    pub state: &'static str,
    pub transfer: Option<u64>,
    pub transfer_state: Option<&'static str>,
    /// Why it failed or refused.
    pub reason: Option<String>,
    pub from: Option<FromVersion>,
    pub updated_at: String,
}

/// `GET /rollouts/{id}/devices`: in rollout order.
#[utoipa::path(
    get,
    path = "/rollouts/{id}/devices",
    tag = "rollouts",
    params(("id" = u64, Path, description = "Rollout id", example = 1), DevicesQuery),
    responses(
        (status = 200, description = "The rollout's devices in rollout order", body = Vec<RolloutDeviceView>),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn devices(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<DevicesQuery>,
) -> Result<Json<Vec<RolloutDeviceView>>, ApiError> {
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
                    Some(reason.clone())
                }
                _ => None,
            };
            RolloutDeviceView {
                device: d.device.clone(),
                stage: d.stage + 1,
                state: d.state.name(),
                transfer: d.transfer,
                transfer_state: d.transfer.and_then(|t| live.get(&t).copied()),
                reason: detail,
                from: d.from.as_ref().map(|f| FromVersion {
                    version: f.version.to_string(),
                    release: f.release,
                }),
                updated_at: rfc3339(d.updated_ms),
            }
        })
        .collect();
    Ok(Json(out))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// From this entry number on.
    from: Option<u64>,
    /// At most this many, 1 to 10,000 (default 100).
    limit: Option<usize>,
}

/// A rollout decision or operator action.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolloutAuditEntry {
    /// Its number, from 0.
    pub n: u64,
    pub at: String,
    /// `gateway` for the engine's own decisions, else the operator's token name.
    pub by: String,
    pub event: String,
    pub message: String,
    /// The numbers the decision was made on.
    #[schema(value_type = Object)]
    pub detail: Value,
}

/// `GET /rollouts/{id}/audit`: every decision and operator action, oldest first.
#[utoipa::path(
    get,
    path = "/rollouts/{id}/audit",
    tag = "rollouts",
    params(("id" = u64, Path, description = "Rollout id", example = 1), AuditQuery),
    responses(
        (status = 200, description = "Every decision and operator action, oldest first", body = Vec<RolloutAuditEntry>),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn audit(
    State(state): AppState,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Vec<RolloutAuditEntry>>, ApiError> {
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
            .map(|(n, e)| RolloutAuditEntry {
                n,
                at: rfc3339(e.at_ms),
                by: e.by,
                event: e.event,
                message: e.message,
                detail: serde_json::from_str::<Value>(&e.detail).unwrap_or(Value::Null),
            })
            .collect(),
    ))
}

/// The public key devices must trust for rollback directives.
#[derive(Debug, Serialize, ToSchema)]
pub struct SigningKey {
    /// ed25519, hex.
    pub public_key: String,
    /// The first 8 bytes of its SHA-256, hex: what signatures name.
    pub key_id: String,
}

/// `GET /rollouts/signing-key`: the key devices must trust for rollback directives.
#[utoipa::path(
    get,
    path = "/rollouts/signing-key",
    tag = "rollouts",
    responses(
        (status = 200, description = "The gateway's rollback key", body = SigningKey),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn signing_key(State(state): AppState) -> Json<SigningKey> {
    let public = state.rollback_public;
    Json(SigningKey {
        public_key: hex(&public),
        key_id: hex(&fleetgate_protocol::sign::key_id(&public)),
    })
}
