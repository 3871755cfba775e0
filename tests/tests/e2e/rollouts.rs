//! Staged rollouts to simulated fleets over MQTT: a healthy release goes through every stage; a
//! release that fails to install, raises alerts, slows inference or shifts predictions on the
//! updated devices is stopped and rolled back by the right rule; a change that hits the whole
//! fleet is not; offline devices and late joiners are handled.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use fleetgate_config::Config;
use fleetgate_sim::FleetSpec;
use fleetgate_sim::behaviour::{DataShape, Regression};
use fleetgate_sim::fleet::Fleet;
use fleetgate_sim::updater::{DeviceProfile, Faults, Trust};
use serde_json::{Value, json};
use tests::release::{model, public};
use tests::{TestGateway, config};
use tokio_util::sync::CancellationToken;

/// Short stages and windows, so a rollout takes seconds.
fn fast(c: &mut Config) {
    let p = &mut c.rollouts.policy;
    for s in &mut p.stages {
        s.bake = Duration::from_secs(2);
    }
    p.gates.window = Duration::from_secs(3);
    p.gates.confirm = Duration::from_secs(1);
    p.gates.wait = Duration::from_secs(20);
    p.gates.min_devices = 3;
    p.gates.min_samples = 20;
}

/// A gateway trusting release key 1 with sim-model 2.0.0 (release 2) registered.
async fn gateway() -> TestGateway {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.registry.trusted_keys = vec![public(1)];
    fast(&mut c);
    let gw = TestGateway::start_with(c, Some(tmp)).await;
    gw.upload(model("2.0.0", 2, "sim-mcu", 20_000, &[1]))
        .await
        .unwrap();
    gw
}

/// Devices trusting the release key and the gateway's rollback key.
async fn trust(gw: &TestGateway) -> Trust {
    let key = gw.get("/rollouts/signing-key").await;
    let rollback = fleetgate_config::parse_key(key["public_key"].as_str().unwrap()).unwrap();
    Trust {
        keys: vec![public(1)],
        threshold: 1,
        rollback_keys: vec![rollback],
    }
}

fn v2() -> semver::Version {
    semver::Version::new(2, 0, 0)
}

/// A fleet sending telemetry every 100 ms until stopped; every device has said hello when
/// this returns.
async fn fleet(
    gw: &TestGateway,
    creds: Vec<fleetgate_sim::Credential>,
    profiles: Vec<DeviceProfile>,
    shape: DataShape,
) -> (Fleet, CancellationToken) {
    let n = creds.len();
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt_port(), creds);
    spec.interval = Duration::from_millis(100);
    spec.duration = Some(Duration::from_secs(240));
    spec.profiles = profiles;
    spec.shape = shape;
    let stop = CancellationToken::new();
    let fleet = Fleet::start(spec, stop.clone());
    assert!(
        fleet
            .wait_connected(n as u64, Duration::from_secs(60))
            .await,
        "devices did not connect"
    );
    let said = fleet
        .counters()
        .wait_until(Duration::from_secs(30), |c| {
            c.hello.load(Relaxed) >= n as u64
        })
        .await;
    assert!(said, "devices did not say hello");
    gw.sync().await;
    (fleet, stop)
}

async fn create(gw: &TestGateway, body: Value) -> Value {
    gw.post("/rollouts", body).await.expect("create rollout")
}

/// Rolls sim-model 2.0.0 out to every device; the answer to the request.
async fn create_all(gw: &TestGateway) -> Value {
    create(
        gw,
        json!({ "kind": "model", "name": "sim-model", "version": "2.0.0", "all": true }),
    )
    .await
}

/// Polls the rollout until it no longer runs (at most `limit`).
async fn wait_settled(gw: &TestGateway, id: u64, limit: Duration) -> Value {
    wait_state(
        gw,
        id,
        &["completed", "rolled_back", "aborted", "paused"],
        limit,
    )
    .await
}

/// Polls the rollout until its state is one of `states` (at most `limit`).
async fn wait_state(gw: &TestGateway, id: u64, states: &[&str], limit: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let r = gw.get(&format!("/rollouts/{id}")).await;
        if states.contains(&r["state"].as_str().unwrap_or("")) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollout {id} still {} after {limit:?}: {r}",
            r["state"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls the rollout until no device has a rollback outstanding.
async fn wait_rolled_back(gw: &TestGateway, id: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = gw.get(&format!("/rollouts/{id}")).await;
        if r["counts"]["rollback_sent"].is_null() {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollback of {id} not done: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn audit_events(gw: &TestGateway, id: u64) -> Vec<String> {
    gw.get(&format!("/rollouts/{id}/audit?limit=1000"))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls until the devices' hellos report `want` (version -> devices), at most 60 s.
async fn wait_versions(gw: &TestGateway, want: &[(&str, u64)]) {
    let want: std::collections::BTreeMap<String, u64> =
        want.iter().map(|(v, n)| ((*v).to_owned(), *n)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = versions(gw).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "versions {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many enrolled devices report running each sim-model version.
async fn versions(gw: &TestGateway) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for d in gw.get("/devices").await.as_array().unwrap() {
        let v = d["models"][0]["version"]
            .as_str()
            .unwrap_or("none")
            .to_owned();
        *out.entry(v).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_go_through_every_default_stage() {
    let gw = gateway().await;
    let trust = trust(&gw).await;
    let creds = gw.enroll_fleet("happy", 200).await;
    let profile = DeviceProfile {
        trust,
        ..DeviceProfile::default()
    };
    let (fleet, stop) = fleet(&gw, creds, vec![profile], DataShape::default()).await;

    let created = create_all(&gw).await;
    assert_eq!(created["skipped"], json!([]));
    let id = created["rollout"]["id"].as_u64().unwrap();
    assert_eq!(created["rollout"]["planned"], 200);
    let stage_sizes: Vec<&Value> = created["rollout"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["devices"])
        .collect();
    assert_eq!(
        stage_sizes,
        [&json!(5), &json!(20), &json!(100), &json!(200)]
    );

    let r = wait_settled(&gw, id, Duration::from_secs(180)).await;
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["counts"], json!({ "healthy": 200 }));
    let per_stage: Vec<&Value> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["counts"]["healthy"])
        .collect();
    assert_eq!(per_stage, [&json!(5), &json!(15), &json!(80), &json!(100)]);
    let events = audit_events(&gw, id).await;
    let count = |e: &str| events.iter().filter(|x| *x == e).count();
    assert_eq!(
        (
            count("stage_started"),
            count("stage_installed"),
            count("stage_passed"),
            count("completed")
        ),
        (4, 4, 4, 1),
        "{events:?}"
    );
    assert_eq!(events.first().map(String::as_str), Some("created"));
    assert_eq!(events.last().map(String::as_str), Some("completed"));

    wait_versions(&gw, &[("2.0.0", 200)]).await;
    stop.cancel();
    let report = fleet.finish().await;
    assert_eq!(report.updates.installed, 200, "{report}");
    assert_eq!((report.updates.rejected, report.updates.failed), (0, 0));
    assert_eq!(report.rollbacks.done, 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_on_30_percent_stops_early_and_is_rolled_back() {
    let gw = gateway().await;
    let trust = trust(&gw).await;
    let creds = gw.enroll_fleet("bad", 200).await;
    // Device i gets profile i % 10: three in ten fail to install.
    let profiles = (0..10)
        .map(|i| DeviceProfile {
            trust: trust.clone(),
            faults: Faults {
                fail_install: i % 10 < 3,
                ..Faults::default()
            },
            ..DeviceProfile::default()
        })
        .collect();
    let (fleet, stop) = fleet(&gw, creds, profiles, DataShape::default()).await;
    let id = create_all(&gw).await["rollout"]["id"].as_u64().unwrap();
    let r = wait_settled(&gw, id, Duration::from_secs(120)).await;
    assert_eq!(r["state"], "rolled_back", "{r}");
    assert_eq!(r["by"], "gateway");
    assert!(r["reason"].as_str().unwrap().contains("failed"), "{r}");
    assert!(r["stage"]["number"].as_u64().unwrap() <= 2, "{r}");
    let r = wait_rolled_back(&gw, id).await;

    // No device of a later stage was ever offered the release: it ends not updated.
    let devices = gw.get(&format!("/rollouts/{id}/devices?limit=1000")).await;
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), 200);
    for d in devices {
        if d["stage"].as_u64().unwrap() > 2 {
            assert_eq!(
                (&d["state"], &d["transfer"]),
                (&json!("not_updated"), &Value::Null),
                "{d}"
            );
        }
    }
    // Every device back on 1.0.0 (each says hello after its reboot into the old slot).
    wait_versions(&gw, &[("1.0.0", 200)]).await;
    stop.cancel();
    let report = fleet.finish().await;
    // Every device that installed it went back, and the gateway counted each one.
    let rolled_back = r["counts"]["rolled_back"].as_u64().unwrap_or(0);
    assert_eq!(report.rollbacks.done, rolled_back, "{report} {r}");
    assert_eq!(report.updates.installed, rolled_back, "{report} {r}");
    assert_eq!(report.rollbacks.rejected, 0, "{report}");
    assert_eq!(
        r["counts"]["failed"].as_u64().unwrap(),
        report.updates.failed,
        "{r}"
    );
    gw.stop().await;
}

/// 40 devices; the updated ones run `regression` on 2.0.0 (or everyone runs `shape`).
async fn gate_case(regression: Option<Regression>, shape: DataShape) -> (Value, Vec<String>) {
    gate_case_with(|_| regression.clone(), shape).await
}

/// 40 devices, each with the regression `regression(id)` gives it, in rollout 1.
async fn gate_case_with(
    regression: impl Fn(&str) -> Option<Regression>,
    shape: DataShape,
) -> (Value, Vec<String>) {
    let gw = gateway().await;
    let trust = trust(&gw).await;
    let creds = gw.enroll_fleet("gate", 40).await;
    let profiles = creds
        .iter()
        .map(|c| DeviceProfile {
            trust: trust.clone(),
            regression: regression(&c.id),
            ..DeviceProfile::default()
        })
        .collect();
    let (fleet, stop) = fleet(&gw, creds, profiles, shape).await;
    let id = create_all(&gw).await["rollout"]["id"].as_u64().unwrap();
    assert_eq!(id, 1, "the attackers below pick their place in rollout 1");
    let r = wait_settled(&gw, id, Duration::from_secs(120)).await;
    if r["state"] == "rolled_back" {
        wait_rolled_back(&gw, id).await;
        wait_versions(&gw, &[("1.0.0", 40)]).await;
    }
    let events = audit_events(&gw, id).await;
    stop.cancel();
    let report = fleet.finish().await;
    if r["state"] == "rolled_back" {
        assert_eq!(report.rollbacks.done, report.updates.installed, "{report}");
    }
    // Every message of every device was stored, the attacker's included: its values are all
    // plausible, so nothing refused them on the way in.
    let ingest = gw.get("/ingest").await;
    assert_eq!(ingest["rejected"]["invalid"], 0, "{ingest}");
    gw.stop().await;
    (r, events)
}

/// The device of the fleet that rollout 1 updates first (`first`) or last.
fn place(first: bool) -> String {
    let ids = fleetgate_sim::enroll::ids("gate", 40);
    let key = |id: &&String| fleetgate::rollouts::plan::hash(1, id);
    let pick = if first {
        ids.iter().min_by_key(key)
    } else {
        ids.iter().max_by_key(key)
    };
    pick.unwrap().clone()
}

fn assert_rolled_back_by(r: &Value, events: &[String], gate: &str) {
    assert_eq!(r["state"], "rolled_back", "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("gate {gate} failed")),
        "{reason}"
    );
    assert_eq!(r["stage"]["number"], 1, "caught in the canary: {r}");
    assert!(events.contains(&"gate_failed".to_owned()), "{events:?}");
    let g = r["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["gate"] == gate)
        .unwrap();
    assert_eq!(g["verdict"], "fail", "{g}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardware_alerts_on_the_updated_devices_roll_back_by_the_alert_gate() {
    let mut regression = Regression::new("sim-model", v2());
    regression.alert_every = 2;
    let (r, events) = gate_case(Some(regression), DataShape::default()).await;
    assert_rolled_back_by(&r, &events, "alert_rate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doubled_inference_latency_rolls_back_by_the_latency_gate() {
    let mut regression = Regression::new("sim-model", v2());
    regression.latency_factor = 2.0;
    let (r, events) = gate_case(Some(regression), DataShape::default()).await;
    assert_rolled_back_by(&r, &events, "latency_p95");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifted_predictions_roll_back_by_the_prediction_gate() {
    let mut regression = Regression::new("sim-model", v2());
    regression.classes = Some(vec![0.3, 0.3, 0.4]);
    let (r, events) = gate_case(Some(regression), DataShape::default()).await;
    assert_rolled_back_by(&r, &events, "predictions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shift_that_hits_the_whole_fleet_does_not_roll_back() {
    // Every device, old version or new, sees the same shifted world.
    let shape = DataShape {
        classes: vec![0.3, 0.3, 0.4],
        mean_confidence: 0.7,
        ..DataShape::default()
    };
    let (r, events) = gate_case(None, shape).await;
    assert_eq!(r["state"], "completed", "{r} {events:?}");
    assert_eq!(r["counts"], json!({ "healthy": 40 }));
    assert!(!events.contains(&"gate_failed".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_devices_never_fail_and_late_joiners_are_updated() {
    let gw = gateway().await;
    let trust = trust(&gw).await;
    let profile = DeviceProfile {
        trust,
        ..DeviceProfile::default()
    };
    let online = gw.enroll_fleet("on", 30).await;
    let away = gw.enroll_fleet("away", 5).await;
    let late = gw.enroll_fleet("late", 5).await;
    // The `away` devices said hello once and went offline; the `late` ones never connected.
    let (f, stop) = fleet(
        &gw,
        away.clone(),
        vec![profile.clone()],
        DataShape::default(),
    )
    .await;
    stop.cancel();
    f.finish().await;
    gw.sync().await;
    let (fleet_on, stop_on) = fleet(&gw, online, vec![profile.clone()], DataShape::default()).await;

    let created = create_all(&gw).await;
    let id = created["rollout"]["id"].as_u64().unwrap();
    assert_eq!(created["rollout"]["planned"], 35);
    let skipped: Vec<&str> = created["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["device"].as_str().unwrap())
        .collect();
    assert_eq!(skipped.len(), 5);
    assert!(
        skipped.iter().all(|d| d.starts_with("late-")),
        "{skipped:?}"
    );

    // The late devices arrive during the rollout.
    let (fleet_late, stop_late) =
        fleet(&gw, late, vec![profile.clone()], DataShape::default()).await;
    let r = wait_settled(&gw, id, Duration::from_secs(120)).await;
    assert_eq!(r["state"], "completed", "{r}");
    // The away devices are still pending, never failed; the late ones joined and took it.
    assert_eq!(r["counts"]["pending"], 5, "{r}");
    for bad in ["failed", "rejected", "timed_out"] {
        assert!(r["counts"][bad].is_null(), "{r}");
    }
    let events = audit_events(&gw, id).await;
    assert_eq!(
        events.iter().filter(|e| *e == "late_joiner").count(),
        5,
        "{events:?}"
    );
    let took = r["counts"]["healthy"].as_u64().unwrap_or(0)
        + r["counts"]["installed"].as_u64().unwrap_or(0);
    assert_eq!(took, 35, "{r}");

    // The away devices come back: the completed rollout updates them too.
    let (fleet_away, stop_away) = fleet(&gw, away, vec![profile], DataShape::default()).await;
    let updated = fleet_away
        .counters()
        .wait_until(Duration::from_secs(60), |c| {
            c.updates_installed.load(Relaxed) >= 5
        })
        .await;
    assert!(updated, "the returning devices were not updated");
    wait_versions(&gw, &[("2.0.0", 40)]).await;
    for (f, stop) in [
        (fleet_on, stop_on),
        (fleet_late, stop_late),
        (fleet_away, stop_away),
    ] {
        stop.cancel();
        let report = f.finish().await;
        assert_eq!(
            (report.updates.failed, report.updates.rejected),
            (0, 0),
            "{report}"
        );
    }
    let r = gw.get(&format!("/rollouts/{id}")).await;
    assert!(r["counts"]["pending"].is_null(), "{r}");
    gw.stop().await;
}

/// One device cannot hide a regression: among the 5 canary devices, whose inference on 2.0.0
/// takes 1.8 times as long (the gate fails at 1.5), one reports inference 1,000 times faster
/// than the rest, and the lowest temperature, power and the most memory it can. Averaged as
/// they are, its numbers would bring the canary's latency ratio under 1.5; each gate leaves
/// the extreme devices out, and the regression is caught in the canary as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_cannot_hide_a_regression_from_the_gates() {
    let attacker = place(true);
    let (r, events) = gate_case_with(
        |id| {
            let mut r = Regression::new("sim-model", v2());
            if id == attacker {
                r.latency_factor = 0.001;
                r.temp_delta_c = -130.0;
                r.power_factor = 0.0;
                r.free_mem_factor = 1e6;
                r.confidence_delta = 0.1;
            } else {
                r.latency_factor = 1.8;
            }
            Some(r)
        },
        DataShape::default(),
    )
    .await;
    assert_rolled_back_by(&r, &events, "latency_p95");
}

/// One device cannot fail a healthy release: the device updated last, in the control until
/// the last stage, reports on 1.0.0 a million times the memory of the others, -88 C, no power,
/// inference 1,000 times faster and predictions all of one class, so the updated devices look
/// worse on every gate. Averaged as they are, its memory alone would fail the memory gate
/// (updated under 0.8 of the control); the release goes through every stage as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_cannot_fail_a_healthy_release() {
    let attacker = place(false);
    let (r, events) = gate_case_with(
        |id| {
            (id == attacker).then(|| {
                let mut r = Regression::new("sim-model", semver::Version::new(1, 0, 0));
                r.latency_factor = 0.001;
                r.temp_delta_c = -130.0;
                r.power_factor = 0.0;
                r.free_mem_factor = 1e6;
                r.confidence_delta = 0.1;
                r.classes = Some(vec![0.0, 0.0, 1.0]);
                r
            })
        },
        DataShape::default(),
    )
    .await;
    assert_eq!(r["state"], "completed", "{r} {events:?}");
    assert_eq!(r["counts"], json!({ "healthy": 40 }));
    assert!(!events.contains(&"gate_failed".to_owned()), "{events:?}");
}
