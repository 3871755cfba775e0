//! Drift against a registered baseline, end to end: devices sending raw samples and devices
//! sending counts per bin; a long run drawn like the baseline raises nothing; a shift of one
//! feature raises an alert on that feature only, naming the model version; going back resolves it.

use std::time::Duration;

use fleetgate_sim::FleetSpec;
use fleetgate_sim::behaviour::DataShape;
use rumqttc::{Packet, QoS};
use serde_json::{Value, json};
use tests::release::{model, public};
use tests::{TestGateway, config, device};
use tokio_util::sync::CancellationToken;

/// 20,000 reference rows of what the simulator's devices send by default.
pub(crate) fn reference_csv() -> String {
    fleetgate_sim::behaviour::reference_csv(20_000)
}

async fn send(
    gw: &TestGateway,
    creds: &[fleetgate_sim::Credential],
    messages: u64,
    shift: Vec<f32>,
    bins: bool,
) {
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt_port(), creds.to_vec());
    spec.interval = Duration::from_millis(5);
    spec.messages = Some(messages);
    spec.shape = DataShape {
        samples: 25,
        features: 4,
        shift,
        bins,
        ..DataShape::default()
    };
    let report = fleetgate_sim::run(spec, CancellationToken::new()).await;
    assert_eq!((report.unacked(), report.errors), (0, 0), "{report}");
}

/// Both halves of the fleet send `messages` each, with `shift` per feature.
async fn phase(
    gw: &TestGateway,
    raw: &[fleetgate_sim::Credential],
    binned: &[fleetgate_sim::Credential],
    messages: u64,
    shift: Vec<f32>,
) {
    tokio::join!(
        send(gw, raw, messages, shift.clone(), false),
        send(gw, binned, messages, shift, true)
    );
    gw.sync().await;
}

/// Builds sim-model 1.0.0's baseline on the gateway from [`reference_csv`].
pub(crate) async fn post_baseline(gw: &TestGateway) -> Value {
    let url = format!(
        "{}/api/v1/registry/model/sim-model/1.0.0/baseline.csv?bins=10&prediction=prediction&confidence=confidence",
        gw.http_url()
    );
    let csv = reference_csv();
    tokio::task::spawn_blocking(move || {
        ureq::post(&url)
            .header("Authorization", &format!("Bearer {}", tests::TOKEN))
            .send(csv.as_bytes())
            .unwrap()
            .into_body()
            .read_json::<Value>()
            .unwrap()
    })
    .await
    .unwrap()
}

pub(crate) fn drift_alerts(alerts: &Value) -> Vec<Value> {
    alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["source"] == "drift")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_on_one_feature_is_raised_and_resolved_and_a_quiet_run_raises_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.registry.trusted_keys = vec![public(1)];
    c.drift.window_samples = 1000;
    c.drift.min_samples = 500;
    c.drift.window = Duration::from_secs(3600);
    // Two simulated fleets racing each other send unevenly; the per-device cap (unit-tested in
    // the drift engine) would make the window count depend on that timing.
    c.drift.device_share = 1.0;
    let gw = TestGateway::start_with(c, Some(tmp)).await;

    // The devices run sim-model 1.0.0: register it and give it a baseline built from a CSV.
    gw.upload(model("1.0.0", 1, "sim-mcu", 4096, &[1]))
        .await
        .unwrap();
    let answer = post_baseline(&gw).await;
    assert_eq!(answer["features"].as_array().unwrap().len(), 4);
    assert_eq!(answer["prediction_classes"], 3);
    let baseline = gw.get("/registry/model/sim-model/1.0.0/baseline").await;
    assert_eq!(baseline["features"][2]["name"], "f2");
    assert_eq!(
        baseline["features"][2]["edges"].as_array().unwrap().len(),
        9
    );

    let raw = gw.enroll_fleet("raw", 10).await;
    let binned = gw.enroll_fleet("bin", 10).await;

    // 1. 60 messages x 20 devices, each with 25 samples and 20 predictions: 30,000 samples
    //    (30 feature windows) and 24,000 predictions (24 prediction windows), each subject
    //    closing on its own count, all like the baseline.
    phase(&gw, &raw, &binned, 60, vec![]).await;
    let alerts = gw.get("/alerts").await;
    assert_eq!(
        drift_alerts(&alerts),
        Vec::<Value>::new(),
        "false alarm on data drawn like the baseline"
    );
    let history = gw.get("/drift/sim-model/1.0.0/history?limit=1000").await;
    let history = history.as_array().unwrap();
    let current = gw.get("/drift/sim-model/1.0.0").await;
    let feature_windows = history
        .iter()
        .filter(|h| !h["features"].as_array().unwrap().is_empty())
        .count();
    let prediction_windows: Vec<&str> = history
        .iter()
        .filter_map(|h| h["prediction"]["verdict"].as_str())
        .collect();
    assert_eq!(
        (feature_windows, prediction_windows.len()),
        (30, 24),
        "{current}"
    );
    for f in current["features"].as_array().unwrap() {
        assert_eq!(f["status"], "ok", "{f}");
        let w = &f["last_window"];
        assert_eq!(w["n"], 1000);
        assert!(
            w["psi"].as_f64().unwrap() < w["warn_threshold"].as_f64().unwrap(),
            "{w}"
        );
        assert_eq!(f["open_window"]["samples"], 0, "{f}");
    }
    // Predictions have no floor under their warning level (the noise's 99 % quantile), so a
    // window drawn like the baseline is "warn" by chance 1 % of the time: none may be "over",
    // and more than 3 warnings in 24 windows (p < 1e-4 by chance) means the threshold is wrong.
    let count = |v: &str| prediction_windows.iter().filter(|x| **x == v).count();
    assert_eq!(count("over"), 0, "{history:?}");
    assert!(count("warn") <= 3, "{history:?}");
    assert_eq!(count("ok") + count("warn"), 24, "{prediction_windows:?}");
    assert_ne!(current["prediction"]["status"], "alert");
    assert!(
        gw.get("/ingest").await["stored"]["telemetry"]
            .as_u64()
            .unwrap()
            >= 1200
    );

    // 2. Feature f2 shifted by one standard deviation: an alert on f2 only.
    phase(&gw, &raw, &binned, 10, vec![0.0, 0.0, 1.0, 0.0]).await;
    let alerts = drift_alerts(&gw.get("/alerts").await);
    assert_eq!(
        alerts.len(),
        1,
        "{alerts:?} {}",
        gw.get("/drift/sim-model/1.0.0/history?limit=6").await
    );
    let a = &alerts[0];
    assert_eq!(
        (a["kind"].as_str(), a["state"].as_str()),
        (Some("data_drift"), Some("open"))
    );
    assert_eq!(
        a["drift"],
        json!({ "model": "sim-model", "version": "1.0.0", "cohort": "all", "feature": "f2" })
    );
    let message = a["message"].as_str().unwrap();
    assert!(
        message.contains("sim-model 1.0.0") && message.contains("feature f2"),
        "{message}"
    );
    assert!(
        message.contains("/api/v1/drift/sim-model/1.0.0/samples.csv?cohort=all"),
        "{message}"
    );
    let current = gw.get("/drift/sim-model/1.0.0").await;
    let status: Vec<&str> = current["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["status"].as_str().unwrap())
        .collect();
    assert_eq!(status, ["ok", "ok", "alert", "ok"]);
    let metrics = tokio::task::spawn_blocking({
        let url = format!("{}/metrics", gw.http_url());
        move || {
            ureq::get(&url)
                .call()
                .unwrap()
                .into_body()
                .read_to_string()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(metrics.contains("fleetgate_drift_status{model=\"sim-model\",version=\"1.0.0\",cohort=\"all\",subject=\"f2\"} 2"), "{metrics}");

    // The inputs the drifted model saw, for retraining.
    let samples = tokio::task::spawn_blocking({
        let url = format!("{}/api/v1/drift/sim-model/1.0.0/samples.csv", gw.http_url());
        move || {
            ureq::get(&url)
                .header("Authorization", &format!("Bearer {}", tests::TOKEN))
                .call()
                .unwrap()
                .into_body()
                .read_to_string()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let mut lines = samples.lines();
    assert_eq!(
        lines.next(),
        Some("device,received_at,f0,f1,f2,f3,prediction,confidence")
    );
    assert_eq!(lines.count(), 1000, "the reservoir is full");

    // 3. Back to normal: resolved, and still the only drift alert there ever was.
    phase(&gw, &raw, &binned, 10, vec![]).await;
    let alerts = drift_alerts(&gw.get("/alerts").await);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["state"], "resolved");
    assert_eq!(alerts[0]["resolved"]["by"], "drift");
    assert_eq!(gw.get("/ingest").await["rejected"]["invalid"], 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baseline_set_while_devices_are_online_reaches_the_devices_running_that_version() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.registry.trusted_keys = vec![public(1)];
    let gw = TestGateway::start_with(c, Some(tmp)).await;
    gw.upload(model("1.0.0", 1, "sim-mcu", 4096, &[1]))
        .await
        .unwrap();

    // Two devices online before the baseline exists: one runs sim-model 1.0.0, one 0.9.0.
    let mut devices = Vec::new();
    for (id, version) in [("edge-1", "1.0.0"), ("edge-2", "0.9.0")] {
        let cred = gw.enroll(id).await;
        let (client, mut rx) = device::connect(gw.mqtt_port(), id, &cred.secret)
            .await
            .unwrap();
        client
            .subscribe(format!("fg/{id}/cmd/json"), QoS::AtLeastOnce)
            .await
            .unwrap();
        let hello = json!({
            "firmware": { "name": "fw", "version": "1.0.0" },
            "models": [ { "name": "sim-model", "version": version } ],
            "hardware": { "arch": "armv7em", "class": "sim-mcu", "ram_bytes": 1, "flash_bytes": 1 },
        });
        client
            .publish(
                format!("fg/{id}/hello/json"),
                QoS::AtLeastOnce,
                false,
                hello.to_string(),
            )
            .await
            .unwrap();
        device::await_acks(&mut rx, 1).await;
        devices.push((client, rx));
    }
    gw.sync().await;

    post_baseline(&gw).await;
    let baseline = gw.get("/registry/model/sim-model/1.0.0/baseline").await;
    let edges: Vec<Vec<f32>> = baseline["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            f["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();

    let (_, rx) = &mut devices[0];
    let command = loop {
        match device::next_incoming(rx, Duration::from_secs(10)).await {
            Some(Packet::Publish(p)) => break p,
            Some(_) => continue,
            None => panic!("edge-1 got no drift bins"),
        }
    };
    assert_eq!(command.topic, "fg/edge-1/cmd/json");
    let command: Value = serde_json::from_slice(&command.payload).unwrap();
    let bins = &command["action"]["drift_bins"];
    assert_eq!(
        (&bins["model"], &bins["version"]),
        (&json!("sim-model"), &json!("1.0.0"))
    );
    let sent: Vec<Vec<f32>> = serde_json::from_value(bins["edges"].clone()).unwrap();
    assert_eq!(sent, edges);
    assert_eq!(sent.iter().map(Vec::len).collect::<Vec<_>>(), [9, 9, 9, 9]);

    // The device running another version is sent nothing: the first command it sees is a
    // ping sent after the baseline.
    gw.post("/devices/edge-2/commands", json!({ "action": "ping" }))
        .await
        .unwrap();
    let (_, rx) = &mut devices[1];
    let first = loop {
        match device::next_incoming(rx, Duration::from_secs(10)).await {
            Some(Packet::Publish(p)) => break p,
            Some(_) => continue,
            None => panic!("edge-2 got no ping"),
        }
    };
    let first: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(first["action"], "ping", "{first}");
    gw.stop().await;
}

/// Issue 14: a feature no device sends samples of shows `insufficient` (API and /metrics) and
/// `null` metrics, never `ok` and 0.0, while the predictions are judged on their own windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_without_samples_are_insufficient_and_null_while_predictions_are_judged() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.registry.trusted_keys = vec![public(1)];
    c.drift.window_samples = 1000;
    c.drift.min_samples = 500;
    c.drift.window = Duration::from_secs(3600);
    // Exact window counts: without the per-device cap, which makes them depend on how the
    // simulated devices interleave.
    c.drift.device_share = 1.0;
    let gw = TestGateway::start_with(c, Some(tmp)).await;
    gw.upload(model("1.0.0", 1, "sim-mcu", 4096, &[1]))
        .await
        .unwrap();
    post_baseline(&gw).await;
    let fleet = gw.enroll_fleet("counts", 10).await;
    // 10 devices x 60 messages x 20 predictions, no raw samples: 12 prediction windows.
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt_port(), fleet);
    spec.interval = Duration::from_millis(5);
    spec.messages = Some(60);
    spec.shape = DataShape {
        samples: 0,
        features: 4,
        ..DataShape::default()
    };
    let report = fleetgate_sim::run(spec, CancellationToken::new()).await;
    assert_eq!((report.unacked(), report.errors), (0, 0), "{report}");
    gw.sync().await;

    let current = gw.get("/drift/sim-model/1.0.0").await;
    for f in current["features"].as_array().unwrap() {
        assert_eq!(f["status"], "insufficient", "{f}");
        assert_eq!(f["last_window"], Value::Null, "{f}");
        assert_eq!(f["open_window"]["samples"], 0, "{f}");
    }
    let p = &current["prediction"];
    assert_eq!(p["last_window"]["n"], 1000, "{p}");
    assert!(
        ["ok", "warn"].contains(&p["status"].as_str().unwrap()),
        "{p}"
    );
    let history = gw.get("/drift/sim-model/1.0.0/history?limit=100").await;
    assert_eq!(history.as_array().unwrap().len(), 12);
    let summary = gw.get("/drift").await;
    assert_eq!(
        summary[0]["features_insufficient"],
        json!(["f0", "f1", "f2", "f3"])
    );
    let metrics = tokio::task::spawn_blocking({
        let url = format!("{}/metrics", gw.http_url());
        move || {
            ureq::get(&url)
                .call()
                .unwrap()
                .into_body()
                .read_to_string()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let line = |subject: &str| {
        format!(
            "fleetgate_drift_status{{model=\"sim-model\",version=\"1.0.0\",cohort=\"all\",subject=\"{subject}\"}}"
        )
    };
    assert!(metrics.contains(&format!("{} -1", line("f0"))), "{metrics}");
    assert!(
        metrics.contains(
            "fleetgate_drift_window_samples{model=\"sim-model\",version=\"1.0.0\",cohort=\"all\",subject=\"prediction\"} 1000"
        ),
        "{metrics}"
    );
    gw.stop().await;
}
