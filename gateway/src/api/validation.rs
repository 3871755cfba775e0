//! Validation endpoints: run a release on bench devices, show its results per hardware class
//! and device, compare two versions requirement by requirement. Also the views the registry
//! and rollouts embed.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use fleetgate_protocol::ArtifactKind;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::schema::ErrorBody;
use super::views::StampView;
use super::{ApiError, ApiJson, ApiPath, ApiState, read};
use crate::auth::Caller;
use crate::clock::rfc3339;
use crate::ingest::ValidationRequest;
use crate::registry::keys::hex;
use crate::storage::Store;
use crate::validation::{
    self, ClassSummary, Outcome, ReleaseRequirements, ValidationRecord, rules_by_class,
};

type AppState = State<Arc<ApiState>>;

fn kind(name: &str) -> Result<ArtifactKind, ApiError> {
    ArtifactKind::from_name(name)
        .ok_or_else(|| ApiError::BadRequest(format!("kind {name:?}: one of model, firmware")))
}

/// The signed requirements of one artifact of a release.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequirementsView {
    /// The artifact they belong to.
    pub sha256: String,
    /// Its device classes (empty: any).
    pub classes: Vec<String>,
    /// Each requirement, e.g. `latency_p95_us<=15000`.
    pub rules: Vec<String>,
    /// Cases in the golden set (0: none).
    pub golden_cases: usize,
    /// Ids of the release keys that signed them (hex).
    pub signed_by: Vec<String>,
    pub registered: StampView,
}

/// A hardware class's results: devices by verdict and the worst device's value per measure.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassView {
    pub devices: u64,
    pub passed: u64,
    pub failed: u64,
    pub errors: u64,
    /// Measure name -> the worst device's value.
    pub worst: BTreeMap<String, f64>,
}

impl From<&ClassSummary> for ClassView {
    fn from(s: &ClassSummary) -> Self {
        ClassView {
            devices: s.devices,
            passed: s.passed,
            failed: s.failed,
            errors: s.errors,
            worst: s
                .worst
                .iter()
                .map(|(m, v)| (m.name().to_owned(), *v))
                .collect(),
        }
    }
}

/// One requirement as a run measured it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CheckView {
    pub requirement: String,
    /// Null: not measured.
    pub value: Option<f64>,
    pub met: bool,
}

/// One bench device's latest validation of the release.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResultView {
    pub device: String,
    pub class: String,
    /// pass, fail or error.
    pub verdict: &'static str,
    pub transfer: u64,
    pub started: StampView,
    pub finished_at: String,
    /// Inferences run (golden cases times repeats).
    pub inferences: Option<u32>,
    /// Golden cases predicted right; null without a golden set.
    pub correct: Option<u32>,
    /// Measure name -> value (latency percentiles, peak RAM, energy per inference, accuracy).
    pub values: BTreeMap<String, f64>,
    pub energy_uj: Option<u64>,
    pub checks: Vec<CheckView>,
    /// Why the run never measured (error only).
    pub error: Option<String>,
}

impl From<&ValidationRecord> for ResultView {
    fn from(r: &ValidationRecord) -> Self {
        let mut v = ResultView {
            device: r.device.clone(),
            class: r.class.clone(),
            verdict: r.verdict().name(),
            transfer: r.transfer,
            started: r.started.clone().into(),
            finished_at: rfc3339(r.finished_ms),
            inferences: None,
            correct: None,
            values: BTreeMap::new(),
            energy_uj: None,
            checks: Vec::new(),
            error: None,
        };
        match &r.outcome {
            Outcome::Measured { result, checks } => {
                v.inferences = Some(result.inferences);
                v.correct = result.correct;
                v.energy_uj = Some(result.energy_uj);
                v.values = fleetgate_protocol::Measure::ALL
                    .iter()
                    .filter_map(|m| result.value(*m).map(|x| (m.name().to_owned(), x)))
                    .collect();
                v.checks = checks
                    .iter()
                    .map(|c| CheckView {
                        requirement: c.requirement.to_string(),
                        value: c.value,
                        met: c.met,
                    })
                    .collect();
            }
            Outcome::Error { reason } => v.error = Some(reason.clone()),
        }
        v
    }
}

/// A release's validation: its requirements, results per class and per device.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationView {
    pub kind: &'static str,
    pub name: String,
    pub version: String,
    pub release: u64,
    pub requirements: Vec<RequirementsView>,
    /// Hardware class -> its results.
    pub classes: BTreeMap<String, ClassView>,
    pub results: Vec<ResultView>,
}

pub fn requirements_view(r: &ReleaseRequirements) -> Vec<RequirementsView> {
    r.artifacts
        .iter()
        .map(|a| RequirementsView {
            sha256: hex(&a.sha256),
            classes: a.classes.clone(),
            rules: a
                .requirements
                .rules
                .iter()
                .map(ToString::to_string)
                .collect(),
            golden_cases: a.golden.as_ref().map_or(0, |g| g.cases.len()),
            signed_by: a.signed.signatures.iter().map(|s| hex(&s.key_id)).collect(),
            registered: a.registered.clone().into(),
        })
        .collect()
}

pub fn classes_view(records: &[ValidationRecord]) -> BTreeMap<String, ClassView> {
    validation::summarize(records)
        .iter()
        .map(|(c, s)| (c.clone(), ClassView::from(s)))
        .collect()
}

/// The release (by version or alias) with its requirements and results, from storage.
fn load(
    s: &Store,
    k: ArtifactKind,
    name: &str,
    version: &str,
) -> crate::storage::Result<
    Option<(
        crate::model::ReleaseRecord,
        ReleaseRequirements,
        Vec<ValidationRecord>,
    )>,
> {
    let Some(r) = s.release(k, name, version)? else {
        return Ok(None);
    };
    let reqs = s.requirements(k, name, r.release)?.unwrap_or_default();
    let results = s.validation_results(k, name, r.release)?;
    Ok(Some((r, reqs, results)))
}

#[utoipa::path(
    get,
    path = "/validations/{kind}/{name}/{version}",
    tag = "validation",
    params(
        ("kind" = String, Path, description = "model or firmware", example = "model"),
        ("name" = String, Path, example = "kws"),
        ("version" = String, Path, description = "A version, or an alias", example = "2.1.0"),
    ),
    responses(
        (status = 200, description = "The release's requirements and its bench results", body = ValidationView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn show(
    State(state): AppState,
    ApiPath((k, name, version)): ApiPath<(String, String, String)>,
) -> Result<Json<ValidationView>, ApiError> {
    let k = kind(&k)?;
    let (n, v) = (name.clone(), version.clone());
    let Some((r, reqs, results)) = read(&state, move |s| load(s, k, &n, &v)).await? else {
        return Err(ApiError::NotFound(format!(
            "{} {name} {version} not found",
            k.name()
        )));
    };
    Ok(Json(ValidationView {
        kind: k.name(),
        name: r.name,
        version: r.version.to_string(),
        release: r.release,
        requirements: requirements_view(&reqs),
        classes: classes_view(&results),
        results: results.iter().map(ResultView::from).collect(),
    }))
}

/// One requirement (or measure) of one class in two versions.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompareRow {
    pub class: String,
    pub measure: &'static str,
    /// The requirement on it (the newer version's, else the older's).
    pub requirement: Option<String>,
    /// The worst bench device's value in each version.
    pub old: Option<f64>,
    pub new: Option<f64>,
    /// new - old.
    pub difference: Option<f64>,
    /// Whether the new value meets the requirement.
    pub met: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompareView {
    pub kind: &'static str,
    pub name: String,
    pub old: String,
    pub new: String,
    pub rows: Vec<CompareRow>,
}

#[utoipa::path(
    get,
    path = "/validations/{kind}/{name}/compare/{old}/{new}",
    tag = "validation",
    params(
        ("kind" = String, Path, description = "model or firmware", example = "model"),
        ("name" = String, Path, example = "kws"),
        ("old" = String, Path, description = "A version, or an alias", example = "2.0.0"),
        ("new" = String, Path, description = "A version, or an alias", example = "2.1.0"),
    ),
    responses(
        (status = 200, description = "Each requirement per hardware class with both versions' values and the difference", body = CompareView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn compare(
    State(state): AppState,
    ApiPath((k, name, old, new)): ApiPath<(String, String, String, String)>,
) -> Result<Json<CompareView>, ApiError> {
    let k = kind(&k)?;
    let (n, o, w) = (name.clone(), old.clone(), new.clone());
    let (a, b) = read(&state, move |s| {
        Ok((load(s, k, &n, &o)?, load(s, k, &n, &w)?))
    })
    .await?;
    let missing = |v: &str| ApiError::NotFound(format!("{} {name} {v} not found", k.name()));
    let (ra, qa, va) = a.ok_or_else(|| missing(&old))?;
    let (rb, qb, vb) = b.ok_or_else(|| missing(&new))?;
    let rows = validation::compare(&va, &vb, &rules_by_class(&qa), &rules_by_class(&qb))
        .into_iter()
        .map(|c| CompareRow {
            class: c.class,
            measure: c.measure.name(),
            requirement: c.requirement,
            old: c.old,
            new: c.new,
            difference: c.difference,
            met: c.met,
        })
        .collect();
    Ok(Json(CompareView {
        kind: k.name(),
        name: ra.name,
        old: ra.version.to_string(),
        new: rb.version.to_string(),
        rows,
    }))
}

/// What to validate.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// `model` or `firmware`.
    kind: String,
    name: String,
    /// A version or an alias.
    version: String,
    /// Bench devices to run it on (default: every bench device with an artifact for its
    /// class).
    devices: Option<Vec<String>>,
    /// Golden set runs (default `validation.repeat`), 1..=1000.
    repeat: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StartedRun {
    pub device: String,
    pub transfer: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub version: String,
    pub release: u64,
    pub started: Vec<StartedRun>,
    pub skipped: Vec<super::updates::Skipped>,
}

#[utoipa::path(
    post,
    path = "/validations",
    tag = "validation",
    request_body = StartBody,
    responses(
        (status = 202, description = "Validation transfers started on bench devices", body = PlanView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn start(
    State(state): AppState,
    caller: Caller,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<(StatusCode, Json<PlanView>), ApiError> {
    let k = kind(&body.kind)?;
    if let Some(r) = body.repeat
        && !(1..=fleetgate_protocol::validation::MAX_REPEAT).contains(&r)
    {
        return Err(ApiError::BadRequest(
            "repeat must be within 1..=1000".to_owned(),
        ));
    }
    let request = ValidationRequest {
        kind: k,
        name: body.name,
        version: body.version,
        devices: body.devices,
        repeat: body.repeat,
    };
    let plan = state.control.validate(request, caller.name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(PlanView {
            version: plan.version.to_string(),
            release: plan.release,
            started: plan
                .started
                .into_iter()
                .map(|(device, transfer)| StartedRun { device, transfer })
                .collect(),
            skipped: plan
                .skipped
                .into_iter()
                .map(|(device, reason)| super::updates::Skipped { device, reason })
                .collect(),
        }),
    ))
}
