//! Alert notifications in the JSON of Alertmanager's webhook receiver (version 4), so that
//! whatever takes Alertmanager's webhooks (incident tools, chat bridges, a retraining
//! pipeline) takes the gateway's: one alert per notification, with labels that identify it,
//! annotations that explain it, and `fleetgate` with the (site, sequence) id to deduplicate
//! on. A drift alert links to the recent inputs of its model version and cohort (CSV), the
//! data to retrain on.

use std::collections::BTreeMap;

use fleetgate_config::Webhook;
use fleetgate_protocol::Severity;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::event::{Entry, Kind};

/// `endsAt` of a firing alert, as Alertmanager writes it.
pub const NO_END: &str = "0001-01-01T00:00:00Z";

/// Which alerts a webhook takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Hardware,
    Drift,
    Rollout,
}

/// A notification: the body, and the id to deduplicate on (also the `Idempotency-Key`).
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub body: Value,
    pub key: String,
}

/// Percent-encodes one URL path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Alertmanager's fingerprint is a hash of the label set; this is the first 8 bytes of the
/// SHA-256 of the sorted `name=value` lines, in hex.
fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in labels {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.as_bytes());
        h.update(b"\n");
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

struct Alert {
    class: Class,
    severity: Severity,
    resolved: bool,
    event: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    starts_at: String,
    ends_at: String,
}

/// The notification of outbox entry `seq` for `hook`, or `None` when the hook does not take
/// it (its class or severity) or it is nothing to notify about.
pub fn render(
    entry: &Entry,
    seq: u64,
    site: &str,
    hook: &Webhook,
    external_url: &str,
) -> Option<Notification> {
    let data = entry.value();
    let at = crate::clock::rfc3339(entry.at_ms);
    let alert = match Kind::from_name(&entry.kind)? {
        Kind::Alert => alert(&data, site, external_url)?,
        Kind::Rollout => rollout(&data, site, &at, external_url)?,
        _ => return None,
    };
    let wanted = match alert.class {
        Class::Hardware => hook.hardware,
        Class::Drift => hook.drift,
        Class::Rollout => hook.rollout,
    };
    if !wanted || alert.severity < hook.min_severity {
        return None;
    }
    let status = if alert.resolved { "resolved" } else { "firing" };
    let alertname = alert.labels.get("alertname").cloned().unwrap_or_default();
    let group = BTreeMap::from([
        ("alertname".to_owned(), alertname.clone()),
        ("site".to_owned(), site.to_owned()),
    ]);
    let key = format!("{site}:{seq}");
    let body = json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{alertname}\", site=\"{site}\"}}"),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": hook.name,
        "groupLabels": group,
        "commonLabels": alert.labels,
        "commonAnnotations": alert.annotations,
        "externalURL": external_url,
        "alerts": [{
            "status": status,
            "labels": alert.labels,
            "annotations": alert.annotations,
            "startsAt": alert.starts_at,
            "endsAt": alert.ends_at,
            "generatorURL": format!("{external_url}/ui/#/alerts"),
            "fingerprint": fingerprint(&alert.labels),
        }],
        "fleetgate": { "site": site, "seq": seq, "id": key, "event": alert.event },
    });
    Some(Notification { body, key })
}

/// A hardware or drift alert (`data` of an `alert` entry).
fn alert(data: &Value, site: &str, external_url: &str) -> Option<Alert> {
    let event = data["event"].as_str()?;
    if event == "acknowledged" {
        return None;
    }
    let a = &data["alert"];
    let id = a["id"].as_u64()?;
    let kind = a["kind"].as_str()?.to_owned();
    let severity = Severity::from_name(a["severity"].as_str()?)?;
    let drift = a["drift"].is_object().then(|| &a["drift"]);
    let mut labels = BTreeMap::from([
        ("alertname".to_owned(), kind.clone()),
        ("severity".to_owned(), severity.name().to_owned()),
        ("site".to_owned(), site.to_owned()),
        ("alert_id".to_owned(), id.to_string()),
    ]);
    let mut annotations = BTreeMap::from([
        ("description".to_owned(), text(&a["message"])),
        ("count".to_owned(), text(&a["count"])),
        (
            "alert_url".to_owned(),
            format!("{external_url}/api/v1/alerts/{id}"),
        ),
    ]);
    if !a["value"].is_null() {
        annotations.insert("value".to_owned(), text(&a["value"]));
    }
    let class = match drift {
        Some(d) => {
            let (model, version, cohort) =
                (text(&d["model"]), text(&d["version"]), text(&d["cohort"]));
            let subject = match d["feature"].as_str() {
                Some(f) => {
                    labels.insert("feature".to_owned(), f.to_owned());
                    format!("feature {f}")
                }
                None => "predictions".to_owned(),
            };
            annotations.insert(
                "summary".to_owned(),
                format!("{kind} in {model} {version} (cohort {cohort}), {subject}"),
            );
            annotations.insert(
                "samples_url".to_owned(),
                format!(
                    "{external_url}/api/v1/drift/{}/{}/samples.csv?cohort={}",
                    encode(&model),
                    encode(&version),
                    encode(&cohort)
                ),
            );
            labels.insert("model".to_owned(), model);
            labels.insert("version".to_owned(), version);
            labels.insert("cohort".to_owned(), cohort);
            Class::Drift
        }
        None => {
            let device = text(&a["device"]);
            annotations.insert("summary".to_owned(), format!("{kind} on {device}"));
            annotations.insert("source".to_owned(), text(&a["source"]));
            labels.insert("device".to_owned(), device);
            Class::Hardware
        }
    };
    let resolved = event == "resolved";
    Some(Alert {
        class,
        severity,
        resolved,
        event: event.to_owned(),
        labels,
        annotations,
        starts_at: text(&a["opened_at"]),
        ends_at: if resolved {
            text(&a["resolved"]["at"])
        } else {
            NO_END.to_owned()
        },
    })
}

/// A rollout paused, rolled back or aborted (firing), or resumed (its pause resolved).
fn rollout(data: &Value, site: &str, at: &str, external_url: &str) -> Option<Alert> {
    let event = data["event"].as_str()?;
    let (alertname, severity, resolved) = match event {
        "paused" => ("rollout_paused", Severity::Warning, false),
        "resumed" => ("rollout_paused", Severity::Warning, true),
        "gate_failed" | "abort_threshold" | "rolled_back" => {
            ("rollout_rolled_back", Severity::Critical, false)
        }
        "aborted" => ("rollout_aborted", Severity::Warning, false),
        _ => return None,
    };
    let id = data["rollout"].as_u64()?;
    let (kind, name, version) = (
        text(&data["kind"]),
        text(&data["name"]),
        text(&data["version"]),
    );
    let labels = BTreeMap::from([
        ("alertname".to_owned(), alertname.to_owned()),
        ("severity".to_owned(), severity.name().to_owned()),
        ("site".to_owned(), site.to_owned()),
        ("rollout".to_owned(), id.to_string()),
        ("kind".to_owned(), kind.clone()),
        ("name".to_owned(), name.clone()),
        ("version".to_owned(), version.clone()),
    ]);
    let annotations = BTreeMap::from([
        (
            "summary".to_owned(),
            format!("rollout {id} of {kind} {name} {version}: {event}"),
        ),
        ("description".to_owned(), text(&data["message"])),
        ("by".to_owned(), text(&data["by"])),
        (
            "stage".to_owned(),
            format!("{} of {}", text(&data["stage"]), text(&data["stages"])),
        ),
        (
            "rollout_url".to_owned(),
            format!("{external_url}/api/v1/rollouts/{id}"),
        ),
    ]);
    Some(Alert {
        class: Class::Rollout,
        severity,
        resolved,
        event: event.to_owned(),
        labels,
        annotations,
        starts_at: at.to_owned(),
        ends_at: if resolved {
            at.to_owned()
        } else {
            NO_END.to_owned()
        },
    })
}

#[cfg(test)]
mod tests;
