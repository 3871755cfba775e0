use fleetgate_protocol::{AlertKind, Severity};
use serde_json::{Value, json};

use super::*;
use crate::model::{AlertRecord, AlertSource, AlertState, DriftSubject, Stamp};
use crate::uplink::event::{self, AlertEvent};

const URL: &str = "https://gw.site-a.example.com";

fn hook() -> Webhook {
    let text = "[[alerts.webhooks]]\nname = \"ops\"\nurl = \"https://hooks.example.com/x\"\n";
    fleetgate_config::Config::from_toml_str(text, "x")
        .unwrap()
        .alerts
        .webhooks[0]
        .clone()
}

fn thermal() -> AlertRecord {
    AlertRecord {
        id: 7,
        device: "pump-1".into(),
        kind: AlertKind::Thermal,
        severity: Severity::Critical,
        state: AlertState::Open,
        source: AlertSource::Rule {
            metric: fleetgate_protocol::HwMetric::TempC,
        },
        opened_ms: 1_700_000_000_000,
        last_ms: 1_700_000_000_000,
        count: 1,
        value: Some(91.5),
        message: "temp_c 91.5 above 85".into(),
        acknowledged: None,
        resolved: None,
    }
}

fn drift() -> AlertRecord {
    AlertRecord {
        id: 8,
        device: String::new(),
        kind: AlertKind::Custom("data_drift".into()),
        severity: Severity::Warning,
        source: AlertSource::Drift(DriftSubject {
            model: "kws".into(),
            version: "2.0.0".parse().unwrap(),
            cohort: "north site".into(),
            feature: Some("f1".into()),
        }),
        message: "data drift".into(),
        ..thermal()
    }
}

fn entry(kind: Kind, data: Value) -> Entry {
    Entry::new(kind, 1_700_000_100_000, &data)
}

#[test]
fn a_hardware_alert_fires_as_alertmanager_would_send_it() {
    let e = entry(Kind::Alert, event::alert(AlertEvent::Opened, &thermal()));
    let n = render(&e, 12, "site-a", &hook(), URL).unwrap();
    assert_eq!(n.key, "site-a:12");
    let b = &n.body;
    assert_eq!(b["version"], "4");
    assert_eq!(b["status"], "firing");
    assert_eq!(b["receiver"], "ops");
    assert_eq!(b["externalURL"], URL);
    assert_eq!(b["truncatedAlerts"], 0);
    assert_eq!(
        b["groupLabels"],
        json!({"alertname": "thermal", "site": "site-a"})
    );
    assert_eq!(b["groupKey"], "{}:{alertname=\"thermal\", site=\"site-a\"}");
    let a = &b["alerts"][0];
    assert_eq!(b["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(
        a["labels"],
        json!({
            "alertname": "thermal",
            "severity": "critical",
            "site": "site-a",
            "device": "pump-1",
            "alert_id": "7",
        })
    );
    assert_eq!(b["commonLabels"], a["labels"]);
    assert_eq!(a["annotations"]["summary"], "thermal on pump-1");
    assert_eq!(a["annotations"]["description"], "temp_c 91.5 above 85");
    assert_eq!(a["annotations"]["value"], "91.5");
    assert_eq!(a["annotations"]["source"], "rule:temp_c");
    assert_eq!(
        a["annotations"]["alert_url"],
        format!("{URL}/api/v1/alerts/7")
    );
    assert_eq!(a["startsAt"], "2023-11-14T22:13:20.000Z");
    assert_eq!(a["endsAt"], NO_END);
    assert_eq!(a["generatorURL"], format!("{URL}/ui/#/alerts"));
    assert_eq!(a["fingerprint"].as_str().unwrap().len(), 16);
    assert_eq!(
        b["fleetgate"],
        json!({"site": "site-a", "seq": 12, "id": "site-a:12", "event": "opened"})
    );
}

#[test]
fn resolving_keeps_the_fingerprint_and_sets_the_end() {
    let fired = render(
        &entry(Kind::Alert, event::alert(AlertEvent::Opened, &thermal())),
        1,
        "site-a",
        &hook(),
        URL,
    )
    .unwrap();
    let mut done = thermal();
    done.state = AlertState::Resolved;
    done.resolved = Some(Stamp {
        at_ms: 1_700_000_200_000,
        by: "rule".into(),
    });
    let resolved = render(
        &entry(Kind::Alert, event::alert(AlertEvent::Resolved, &done)),
        2,
        "site-a",
        &hook(),
        URL,
    )
    .unwrap();
    assert_eq!(resolved.body["status"], "resolved");
    let (f, r) = (&fired.body["alerts"][0], &resolved.body["alerts"][0]);
    assert_eq!(r["status"], "resolved");
    assert_eq!(r["endsAt"], "2023-11-14T22:16:40.000Z");
    assert_eq!(f["fingerprint"], r["fingerprint"]);
    assert_eq!(f["labels"], r["labels"]);
    // Acknowledging is not something Alertmanager receivers know.
    let acked = entry(
        Kind::Alert,
        event::alert(AlertEvent::Acknowledged, &thermal()),
    );
    assert_eq!(render(&acked, 3, "site-a", &hook(), URL), None);
}

#[test]
fn a_drift_alert_links_to_the_inputs_to_retrain_on() {
    let e = entry(Kind::Alert, event::alert(AlertEvent::Opened, &drift()));
    let n = render(&e, 3, "site-a", &hook(), URL).unwrap();
    let a = &n.body["alerts"][0];
    assert_eq!(a["labels"]["alertname"], "data_drift");
    assert_eq!(a["labels"]["model"], "kws");
    assert_eq!(a["labels"]["version"], "2.0.0");
    assert_eq!(a["labels"]["cohort"], "north site");
    assert_eq!(a["labels"]["feature"], "f1");
    assert!(a["labels"]["device"].is_null());
    assert_eq!(
        a["annotations"]["samples_url"],
        format!("{URL}/api/v1/drift/kws/2.0.0/samples.csv?cohort=north%20site")
    );
    assert_eq!(
        a["annotations"]["summary"],
        "data_drift in kws 2.0.0 (cohort north site), feature f1"
    );
}

#[test]
fn rollout_trouble_fires_and_a_resume_resolves_the_pause() {
    let data = |event: &str| {
        json!({
            "rollout": 3, "kind": "model", "name": "kws", "version": "2.0.0",
            "state": "paused", "stage": 2, "stages": 4, "event": event,
            "message": "gate latency_p95 cannot judge", "by": "gateway", "detail": {},
        })
    };
    let cases = [
        ("paused", Some(("rollout_paused", "warning", "firing"))),
        ("resumed", Some(("rollout_paused", "warning", "resolved"))),
        (
            "gate_failed",
            Some(("rollout_rolled_back", "critical", "firing")),
        ),
        (
            "abort_threshold",
            Some(("rollout_rolled_back", "critical", "firing")),
        ),
        (
            "rolled_back",
            Some(("rollout_rolled_back", "critical", "firing")),
        ),
        ("aborted", Some(("rollout_aborted", "warning", "firing"))),
        ("stage_passed", None),
        ("completed", None),
    ];
    for (event, want) in cases {
        let n = render(
            &entry(Kind::Rollout, data(event)),
            1,
            "site-a",
            &hook(),
            URL,
        );
        let got = n.as_ref().map(|n| {
            let a = &n.body["alerts"][0];
            (
                a["labels"]["alertname"].as_str().unwrap().to_owned(),
                a["labels"]["severity"].as_str().unwrap().to_owned(),
                a["status"].as_str().unwrap().to_owned(),
            )
        });
        let want = want.map(|(a, s, st)| (a.to_owned(), s.to_owned(), st.to_owned()));
        assert_eq!(got, want, "{event}");
    }
    let n = render(
        &entry(Kind::Rollout, data("paused")),
        1,
        "site-a",
        &hook(),
        URL,
    )
    .unwrap();
    let a = &n.body["alerts"][0];
    assert_eq!(a["labels"]["rollout"], "3");
    assert_eq!(a["annotations"]["stage"], "2 of 4");
    assert_eq!(
        a["annotations"]["rollout_url"],
        format!("{URL}/api/v1/rollouts/3")
    );
}

#[test]
fn a_webhook_takes_only_its_classes_and_severities() {
    let fire = |a: &AlertRecord| entry(Kind::Alert, event::alert(AlertEvent::Opened, a));
    let mut drift_only = hook();
    drift_only.hardware = false;
    drift_only.rollout = false;
    assert_eq!(render(&fire(&thermal()), 1, "s", &drift_only, URL), None);
    assert!(render(&fire(&drift()), 1, "s", &drift_only, URL).is_some());
    let mut critical = hook();
    critical.min_severity = Severity::Critical;
    assert!(render(&fire(&thermal()), 1, "s", &critical, URL).is_some());
    assert_eq!(render(&fire(&drift()), 1, "s", &critical, URL), None);
    // Entries that are no alerts are never notified.
    let tel = entry(Kind::Telemetry, json!({"device": "d"}));
    assert_eq!(render(&tel, 1, "s", &hook(), URL), None);
}
