//! Requests from central operations, through the upstream broker: signed bundles to register
//! and signed rollout requests, on this site's topics or the fleet-wide ones.
//!
//! Invariants:
//! - A request passes the same checks as the same change through the API: a bundle the
//!   registry's (signatures by `registry.trusted_keys`, hashes, Merkle root, release order), a
//!   rollout the policy's and the writer's.
//! - Nothing is done that `[uplink.down]` does not allow; a rollout request must carry a valid
//!   signature of one of `uplink.down.operator_keys` over its exact bytes (domain
//!   `fleetgate/site-request/v1`) and must not have expired. Refusals are counted by reason.
//! - Every request addressed to this site is recorded in the audit log with the upstream
//!   identity (the broker, and for rollout requests the signing key), and answered upstream by
//!   a `reply` message through the outbox, in the same transaction.
//! - A rollout request is carried out at most once: its id is recorded (pending, then with its
//!   result) before and after; a copy (MQTT delivers at least once) gets the first answer.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetgate_protocol::sign::SigError;
use fleetgate_protocol::{ArtifactKind, Domain, Signed};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Signals;
use super::event::{Entry, Kind, Reply};
use crate::auth::Role;
use crate::clock::now_ms;
use crate::ingest::{ControlError, ControlTx, RolloutRequest};
use crate::metrics::Metrics;
use crate::model::AuditRecord;
use crate::registry::{RegisterError, Registry};
use crate::rollouts::OperatorAction;
use crate::rollouts::model::Target;
use crate::storage::Store;
use crate::storage::outbox::{Limits, Stream};
use crate::storage::records::Record;

/// Longest a rollout request may be valid for.
pub const MAX_REQUEST_VALIDITY_MS: u64 = 30 * 86_400_000;
/// Most request ids kept (until they expire); more are refused until some expire.
pub const MAX_OPEN_REQUESTS: u64 = 100_000;

/// What a down topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Bundle,
    Rollout,
}

impl What {
    pub fn name(self) -> &'static str {
        match self {
            What::Bundle => "bundle",
            What::Rollout => "rollout",
        }
    }
}

/// The topics a site takes requests on: its own, and with `fleet` the fleet-wide ones.
pub fn topics(prefix: &str, site: &str, fleet: bool) -> Vec<String> {
    let mut out = vec![format!("{prefix}/sites/{site}/down/+")];
    if fleet {
        out.push(format!("{prefix}/fleet/down/+"));
    }
    out
}

/// `(fleet-wide, what)` of a down topic of this site, or `None` for any other topic.
pub fn parse_topic(prefix: &str, site: &str, topic: &str) -> Option<(bool, What)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let (fleet, last) = match rest.strip_prefix("fleet/down/") {
        Some(last) => (true, last),
        None => (
            false,
            rest.strip_prefix("sites/")?
                .strip_prefix(site)?
                .strip_prefix("/down/")?,
        ),
    };
    let what = match last {
        "bundle" => What::Bundle,
        "rollout" => What::Rollout,
        _ => return None,
    };
    Some((fleet, what))
}

/// A rollout request: the body of a signed site request (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRequest {
    /// Unique per request: a copy of a request is answered, not carried out again; other
    /// requests name a rollout by the id of the request that created it.
    pub id: String,
    /// RFC 3339: the request is refused after this (at most 30 days ahead).
    pub expires: String,
    /// The sites that act on it (on the fleet-wide topic); absent: every site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sites: Option<Vec<String>>,
    /// `create`, `pause`, `resume`, `abort` or `rollback`.
    pub action: String,
    /// create: what to roll out (as `POST /api/v1/rollouts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<serde_json::Map<String, Value>>,
    /// create: a validate stage before the first production stage (as `POST /api/v1/rollouts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate: Option<SiteValidate>,
    /// pause, resume, abort, rollback: the id of the request that created the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A rollout's validate stage in a request (unset values: the site's `[validation]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteValidate {
    /// Passing bench devices each targeted class needs, 1..=1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_devices: Option<u32>,
    /// How long to wait for them, e.g. `30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// Signs a request with `key`: the envelope to publish (JSON of [`Signed`]).
pub fn sign_request(body: Vec<u8>, key: &ed25519_dalek::SigningKey) -> Vec<u8> {
    let signed = Signed::sign(Domain::SiteRequest, body, std::slice::from_ref(key));
    serde_json::to_vec_pretty(&signed).unwrap_or_default()
}

/// What is kept of a rollout request, until it expires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub at_ms: u64,
    pub expires_ms: u64,
    /// Carried out now (the site may have stopped while it was).
    pub pending: bool,
    pub status: u16,
    pub outcome: String,
    pub message: String,
    pub rollout: Option<u64>,
}

/// A refusal: reason (counter label), status, message.
type Refusal = (&'static str, u16, String);

fn refusal(reason: &'static str, status: u16, message: impl Into<String>) -> Refusal {
    (reason, status, message.into())
}

/// Why a signed request does not verify, as a refusal.
fn signature_refusal(e: SigError) -> Refusal {
    match e {
        SigError::NoTrustedSignature | SigError::BelowThreshold { .. } => {
            refusal("unsigned", 403, format!("{e} (uplink.down.operator_keys)"))
        }
        SigError::BadSignature | SigError::TooManySignatures => {
            refusal("bad_signature", 403, e.to_string())
        }
    }
}

fn control_refusal(e: ControlError) -> Refusal {
    match e {
        ControlError::BadRequest(m) => refusal("invalid", 400, m),
        ControlError::NotFound(what) => refusal("not_found", 404, format!("{what} not found")),
        ControlError::Conflict(m) => refusal("conflict", 409, m),
        ControlError::Storage(m) => refusal("failed", 500, m),
        ControlError::Stopped => refusal("failed", 503, "the gateway is shutting down"),
    }
}

fn register_refusal(e: RegisterError) -> Refusal {
    match e {
        RegisterError::Signature(s) => signature_refusal(s),
        RegisterError::NoTrustedKeys => refusal("not_permitted", 403, e.to_string()),
        RegisterError::Size { .. } | RegisterError::Hash | RegisterError::Merkle => {
            refusal("tampered", 400, e.to_string())
        }
        RegisterError::Expired(_) => refusal("expired", 400, e.to_string()),
        RegisterError::Conflict(m) => refusal("conflict", 409, m),
        RegisterError::NotFound(m) => refusal("not_found", 404, m),
        RegisterError::Storage(_) | RegisterError::Io(_) => refusal("failed", 500, e.to_string()),
        other => refusal("invalid", 400, other.to_string()),
    }
}

/// Checks a signed request and decodes it: the request and the id of the key that signed it.
pub fn open_request(
    payload: &[u8],
    operator_keys: &[[u8; 32]],
) -> Result<(SiteRequest, String), Refusal> {
    let signed: Signed = serde_json::from_slice(payload).map_err(|e| {
        refusal(
            "invalid",
            400,
            format!("not a signed request (JSON with body and signatures): {e}"),
        )
    })?;
    let body = signed
        .verify(Domain::SiteRequest, operator_keys, 1)
        .map_err(signature_refusal)?;
    let signer = operator_keys
        .iter()
        .find(|k| signed.verify(Domain::SiteRequest, &[**k], 1).is_ok())
        .map(|k| crate::registry::keys::hex(&fleetgate_protocol::sign::key_id(k)))
        .unwrap_or_default();
    let request: SiteRequest = serde_json::from_slice(body)
        .map_err(|e| refusal("invalid", 400, format!("request: {e}")))?;
    let id_ok = !request.id.is_empty()
        && request.id.len() <= 128
        && request.id.chars().all(|c| !c.is_control());
    if !id_ok {
        return Err(refusal(
            "invalid",
            400,
            "request id: 1 to 128 characters, no control characters",
        ));
    }
    Ok((request, signer))
}

/// The expiry of a request as ms since the epoch; refused when past or too far ahead.
pub fn expiry(request: &SiteRequest, now_ms: u64) -> Result<u64, Refusal> {
    let t = humantime::parse_rfc3339_weak(&request.expires).map_err(|e| {
        refusal(
            "invalid",
            400,
            format!("expires {:?}: not an RFC 3339 time ({e})", request.expires),
        )
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if ms <= now_ms {
        return Err(refusal(
            "expired",
            400,
            format!("the request expired at {}", request.expires),
        ));
    }
    if ms > now_ms + MAX_REQUEST_VALIDITY_MS {
        return Err(refusal(
            "invalid",
            400,
            "expires is more than 30 days ahead",
        ));
    }
    Ok(ms)
}

/// The handler of requests from central operations; one per gateway, used by one task.
#[derive(Debug)]
pub struct Down {
    pub site: String,
    pub prefix: String,
    pub perms: fleetgate_config::Down,
    pub registry: Registry,
    pub control: ControlTx,
    pub store: Store,
    pub rollouts: fleetgate_config::Rollouts,
    pub metrics: Arc<Metrics>,
    pub signals: Arc<Signals>,
    pub limits: Limits,
}

/// One request's answer and what to keep of it.
struct Done {
    reply: Reply,
    by: String,
    role: Role,
    record: Option<(String, RequestRecord)>,
}

impl Down {
    /// Carries out (or refuses) one message from the upstream, records it and queues its
    /// answer. `None`: not addressed to this site (a fleet-wide request naming other sites).
    pub async fn handle(&self, topic: &str, payload: &[u8], broker: &str) -> Option<Reply> {
        let now = now_ms();
        let via = format!("upstream:{broker}");
        let done = match parse_topic(&self.prefix, &self.site, topic) {
            None => self.refused(
                topic,
                "?",
                None,
                &via,
                Role::ReadOnly,
                None,
                refusal(
                    "bad_topic",
                    404,
                    format!("{topic}: not a request topic of this site"),
                ),
            ),
            Some((true, what)) if !self.perms.fleet => self.refused(
                topic,
                what.name(),
                None,
                &via,
                Role::ReadOnly,
                None,
                refusal(
                    "not_permitted",
                    403,
                    "this site takes no fleet-wide requests (uplink.down.fleet)",
                ),
            ),
            Some((_, What::Bundle)) => self.bundle(topic, payload, &via, now).await,
            Some((_, What::Rollout)) => self.rollout(topic, payload, &via, now).await?,
        };
        Some(self.finish(topic, done, now).await)
    }

    #[allow(clippy::too_many_arguments)]
    fn refused(
        &self,
        topic: &str,
        what: &str,
        request: Option<String>,
        by: &str,
        role: Role,
        record: Option<(String, RequestRecord)>,
        (reason, status, message): Refusal,
    ) -> Done {
        self.metrics.uplink.refused(reason);
        tracing::warn!(topic, reason, message, "request from the upstream refused");
        Done {
            reply: Reply {
                request,
                topic: topic.to_owned(),
                what: what.to_owned(),
                outcome: "refused",
                status,
                reason: Some(reason),
                message,
                release: None,
                rollout: None,
            },
            by: by.to_owned(),
            role,
            record,
        }
    }

    async fn bundle(&self, topic: &str, payload: &[u8], by: &str, now: u64) -> Done {
        let refused = |r: Refusal| self.refused(topic, "bundle", None, by, Role::Admin, None, r);
        if !self.perms.bundles {
            return refused(refusal(
                "not_permitted",
                403,
                "this site takes no bundles from the upstream (uplink.down.allow)",
            ));
        }
        let (registry, bytes, who) = (self.registry.clone(), payload.to_vec(), by.to_owned());
        let result =
            tokio::task::spawn_blocking(move || registry.register(&bytes, now, &who)).await;
        match result {
            Err(e) => refused(refusal("failed", 500, e.to_string())),
            Ok(Err(e)) => refused(register_refusal(e)),
            Ok(Ok(registered)) => {
                self.metrics.uplink.accepted("bundle");
                let r = &registered.release;
                let release = format!("{} {} {}", r.kind.name(), r.name, r.version);
                tracing::info!(
                    topic,
                    release,
                    created = registered.created,
                    "bundle from the upstream registered"
                );
                Done {
                    reply: Reply {
                        request: None,
                        topic: topic.to_owned(),
                        what: "bundle".to_owned(),
                        outcome: if registered.created {
                            "done"
                        } else {
                            "unchanged"
                        },
                        status: if registered.created { 201 } else { 200 },
                        reason: None,
                        message: if registered.created {
                            format!("{release} registered")
                        } else {
                            format!("{release} was registered before")
                        },
                        release: Some(release),
                        rollout: None,
                    },
                    by: by.to_owned(),
                    role: Role::Admin,
                    record: None,
                }
            }
        }
    }

    /// `None` when the request is for other sites.
    async fn rollout(&self, topic: &str, payload: &[u8], via: &str, now: u64) -> Option<Done> {
        let refused = |request: Option<String>, by: &str, r: Refusal| {
            self.refused(topic, "rollout", request, by, Role::Operator, None, r)
        };
        if !self.perms.rollouts {
            return Some(refused(
                None,
                via,
                refusal(
                    "not_permitted",
                    403,
                    "this site takes no rollout requests from the upstream (uplink.down.allow)",
                ),
            ));
        }
        let (request, signer) = match open_request(payload, &self.perms.operator_keys) {
            Ok(r) => r,
            Err(r) => return Some(refused(None, via, r)),
        };
        if request
            .sites
            .as_ref()
            .is_some_and(|sites| !sites.contains(&self.site))
        {
            tracing::debug!(
                topic,
                request = request.id,
                "rollout request for other sites"
            );
            return None;
        }
        let by = format!("{via} key {signer}");
        let id = request.id.clone();
        let expires_ms = match expiry(&request, now) {
            Ok(ms) => ms,
            Err(r) => return Some(refused(Some(id), &by, r)),
        };
        let (store, key) = (self.store.clone(), id.clone());
        let seen = tokio::task::spawn_blocking(move || store.site_request(&key)).await;
        let seen = match seen {
            Ok(Ok(seen)) => seen,
            Ok(Err(e)) => {
                return Some(refused(
                    Some(id),
                    &by,
                    refusal("failed", 500, e.to_string()),
                ));
            }
            Err(e) => {
                return Some(refused(
                    Some(id),
                    &by,
                    refusal("failed", 500, e.to_string()),
                ));
            }
        };
        if let Some(first) = seen {
            let (status, message) = if first.pending {
                (
                    409,
                    "this request was being carried out when the site stopped; its outcome is \
                     unknown: check the site's rollouts"
                        .to_owned(),
                )
            } else {
                (first.status, format!("seen before: {}", first.message))
            };
            return Some(Done {
                reply: Reply {
                    request: Some(id),
                    topic: topic.to_owned(),
                    what: "rollout".to_owned(),
                    outcome: "unchanged",
                    status,
                    reason: None,
                    message,
                    release: None,
                    rollout: first.rollout,
                },
                by,
                role: Role::Operator,
                record: None,
            });
        }
        // Pending first: a site that stops while acting does not act again on a copy.
        let pending = RequestRecord {
            at_ms: now,
            expires_ms,
            pending: true,
            status: 0,
            outcome: String::new(),
            message: String::new(),
            rollout: None,
        };
        let (store, key, rec) = (self.store.clone(), id.clone(), pending.clone());
        let written = tokio::task::spawn_blocking(move || {
            store.write(|t| t.put_site_request(&key, &rec, now, MAX_OPEN_REQUESTS))
        })
        .await;
        match written {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                return Some(refused(
                    Some(id),
                    &by,
                    refusal(
                        "conflict",
                        409,
                        format!(
                            "{MAX_OPEN_REQUESTS} requests are kept until they expire; try later"
                        ),
                    ),
                ));
            }
            Ok(Err(e)) => {
                return Some(refused(
                    Some(id),
                    &by,
                    refusal("failed", 500, e.to_string()),
                ));
            }
            Err(e) => {
                return Some(refused(
                    Some(id),
                    &by,
                    refusal("failed", 500, e.to_string()),
                ));
            }
        }
        let reply = match self.act(&request, &by).await {
            Ok((status, message, rollout)) => {
                self.metrics.uplink.accepted("rollout");
                tracing::info!(
                    topic,
                    request = id,
                    action = request.action,
                    rollout,
                    "rollout request from the upstream carried out"
                );
                Reply {
                    request: Some(id.clone()),
                    topic: topic.to_owned(),
                    what: "rollout".to_owned(),
                    outcome: "done",
                    status,
                    reason: None,
                    message,
                    release: None,
                    rollout,
                }
            }
            Err(r) => refused(Some(id.clone()), &by, r).reply,
        };
        let kept = RequestRecord {
            pending: false,
            status: reply.status,
            outcome: reply.outcome.to_owned(),
            message: reply.message.clone(),
            rollout: reply.rollout,
            ..pending
        };
        Some(Done {
            reply,
            by,
            role: Role::Operator,
            record: Some((id, kept)),
        })
    }

    /// Carries out a checked request: (status, message, rollout id).
    async fn act(&self, r: &SiteRequest, by: &str) -> Result<(u16, String, Option<u64>), Refusal> {
        let bad = |m: &str| refusal("invalid", 400, m.to_owned());
        if r.action == "create" {
            if r.rollout.is_some() || r.reason.is_some() {
                return Err(bad("create takes no rollout or reason"));
            }
            let target = match (r.all, r.labels.clone(), r.devices.clone()) {
                (true, None, None) => Target::All,
                (false, Some(l), None) if !l.is_empty() => Target::Labels(l),
                (false, None, Some(d)) if !d.is_empty() => Target::Devices(d),
                _ => {
                    return Err(bad(
                        "give exactly one target: \"all\": true, \"labels\": {...} or \"devices\": [...]",
                    ));
                }
            };
            let kind = r
                .kind
                .as_deref()
                .and_then(ArtifactKind::from_name)
                .ok_or_else(|| bad("kind: one of model, firmware"))?;
            let (Some(name), Some(version)) = (r.name.clone(), r.version.clone()) else {
                return Err(bad("create needs name and version"));
            };
            let policy = match &r.policy {
                None => self.rollouts.policy.clone(),
                Some(overrides) => {
                    self.rollouts
                        .policy_with_value(overrides)
                        .map_err(|errors| {
                            let listed: Vec<String> =
                                errors.iter().map(|e| format!("policy.{e}")).collect();
                            refusal("invalid", 400, listed.join("; "))
                        })?
                }
            };
            let validate = r
                .validate
                .as_ref()
                .map(|v| {
                    crate::ingest::ValidateRequest::parse(v.min_devices, v.timeout.as_deref())
                        .map_err(|m| refusal("invalid", 400, m))
                })
                .transpose()?;
            let request = RolloutRequest {
                kind,
                name,
                version,
                target,
                policy,
                validate,
            };
            let created = self
                .control
                .create_rollout(request, by.to_owned())
                .await
                .map_err(control_refusal)?;
            let rec = &created.record;
            let mut message = format!(
                "rollout {} of {} {} {} started on {} devices",
                rec.id,
                rec.kind.name(),
                rec.name,
                rec.version,
                rec.planned
            );
            if !created.skipped.is_empty() {
                message.push_str(&format!("; {} left out", created.skipped.len()));
            }
            return Ok((201, message, Some(rec.id)));
        }
        let action = match r.action.as_str() {
            "pause" => OperatorAction::Pause,
            "resume" => OperatorAction::Resume,
            "abort" => OperatorAction::Abort,
            "rollback" => OperatorAction::Rollback,
            other => {
                return Err(bad(&format!(
                    "action {other:?}: one of create, pause, resume, abort, rollback"
                )));
            }
        };
        if r.kind.is_some()
            || r.name.is_some()
            || r.version.is_some()
            || r.all
            || r.labels.is_some()
            || r.devices.is_some()
            || r.policy.is_some()
            || r.validate.is_some()
        {
            return Err(bad(&format!("{} takes only rollout and reason", r.action)));
        }
        let creator = r
            .rollout
            .clone()
            .ok_or_else(|| bad("rollout: the id of the request that created the rollout"))?;
        let (store, key) = (self.store.clone(), creator.clone());
        let found = tokio::task::spawn_blocking(move || store.site_request(&key))
            .await
            .map_err(|e| refusal("failed", 500, e.to_string()))?
            .map_err(|e| refusal("failed", 500, e.to_string()))?;
        let Some(id) = found.and_then(|f| f.rollout) else {
            return Err(refusal(
                "not_found",
                404,
                format!("no rollout was created here by request {creator:?}"),
            ));
        };
        let record = self
            .control
            .rollout(id, action, by.to_owned(), r.reason.clone())
            .await
            .map_err(control_refusal)?;
        Ok((
            200,
            format!("rollout {id}: {}", record.state.name()),
            Some(id),
        ))
    }

    /// Records the request in the audit log (and its id), queues the reply; one transaction.
    async fn finish(&self, topic: &str, done: Done, now: u64) -> Reply {
        let entry = Entry::new(
            Kind::Reply,
            now,
            &serde_json::to_value(&done.reply).unwrap_or(Value::Null),
        );
        let audit = AuditRecord {
            at_ms: now,
            by: done.by.clone(),
            role: done.role,
            method: "MQTT".to_owned(),
            path: topic.to_owned(),
            status: done.reply.status,
        };
        let (store, limits, record) = (self.store.clone(), self.limits, done.record.clone());
        let written = tokio::task::spawn_blocking(move || {
            store.write(|t| {
                t.append_audit(&audit)?;
                if let Some((id, rec)) = &record {
                    t.put_site_request(id, rec, now, u64::MAX)?;
                }
                t.outbox_push(Stream::Upstream, &entry.encode(), limits)
            })
        })
        .await;
        match written {
            Ok(Ok(_)) => self.signals.notify(Stream::Upstream),
            Ok(Err(e)) => {
                tracing::error!(error = %e, topic, "could not record a request from the upstream")
            }
            Err(e) => {
                tracing::error!(error = %e, topic, "could not record a request from the upstream")
            }
        }
        done.reply
    }
}

#[cfg(test)]
mod tests;
