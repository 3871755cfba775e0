//! Issue 17, end to end: releases signed with requirements and a golden set, rolled out with a
//! validate stage to a simulated fleet of two hardware classes, each with two bench devices
//! (label `role=bench`) that install the release in their spare slot and measure it. A release
//! that meets its requirements on every class passes validation and rolls out to the
//! production devices only; one that misses a latency requirement on one class, or an
//! accuracy requirement on the other, ends before its first production stage with the numbers
//! in its audit log, and no production device is offered it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use fleetgate::registry::bundle::BundleFile;
use fleetgate_config::StageSize;
use fleetgate_protocol::manifest::{ManifestSpec, RuntimeReq};
use fleetgate_protocol::validation::Requirement;
use fleetgate_protocol::{ArtifactKind, Compat, GoldenCase, GoldenSet};
use fleetgate_sim::FleetSpec;
use fleetgate_sim::behaviour::DataShape;
use fleetgate_sim::bench::{Bench, Figures, VersionFigures};
use fleetgate_sim::fleet::Fleet;
use fleetgate_sim::updater::{DeviceProfile, Trust};
use serde_json::{Value, json};
use tests::release::{artifact, key, public};
use tests::{TestGateway, config};
use tokio_util::sync::CancellationToken;

const A: &str = "sim-mcu";
const B: &str = "sim-mcu-b";
/// Production devices (half of each class) and bench devices (two of each class).
const PRODUCTION: usize = 8;
const BENCH: usize = 4;

/// The requirements every release here is signed with (the example).
const RULES: [&str; 4] = [
    "latency_p95_us<=15000",
    "peak_ram_bytes<=200000",
    "energy_per_inference_uj<=900",
    "accuracy>=0.93",
];

/// Twenty golden cases: accuracy is measured in twentieths.
fn golden() -> GoldenSet {
    GoldenSet {
        cases: (0..20u16)
            .map(|i| GoldenCase {
                values: vec![f32::from(i) / 20.0, 1.0 - f32::from(i) / 20.0],
                expected: i % 3,
            })
            .collect(),
    }
}

/// sim-model `version` (release `release`) for both classes, with the requirements and the
/// golden set signed by release key 1.
fn release(version: &str, release: u64) -> Vec<u8> {
    let now = fleetgate::clock::now_ms();
    let spec = ManifestSpec {
        kind: ArtifactKind::Model,
        name: "sim-model".into(),
        version: semver::Version::parse(version).unwrap(),
        release,
        compat: Compat {
            classes: vec![A.into(), B.into()],
            runtime: Some(RuntimeReq {
                name: "tflm".into(),
                min_version: semver::Version::new(2, 0, 0),
            }),
            ..Compat::default()
        },
        chunk_size: 16 * 1024,
        created_ms: now,
        expires_ms: now + 86_400_000,
    };
    let keys = [key(1)];
    let mut bundle = BundleFile::sign(
        artifact(20_000, release as u8),
        spec,
        &keys,
        BTreeMap::from([("run".into(), format!("run-{release}"))]),
        vec![],
    );
    let rules = RULES
        .iter()
        .map(|r| Requirement::parse(r).unwrap())
        .collect();
    bundle.require(rules, Some(&golden()), &keys).unwrap();
    bundle.encode()
}

fn version(v: &str) -> semver::Version {
    semver::Version::parse(v).unwrap()
}

/// What bench devices of `class` measure: every version within the requirements (p95 about
/// 11,800 us, 150,000 bytes, 600 uJ, 0.95), except 2.1.0 on class B (18,000 us, no jitter)
/// and 2.2.0 on class A (17 of the 20 golden cases right: 0.85).
fn bench(class: &str) -> Bench {
    let default = Figures {
        accuracy: 0.95,
        ..Figures::default()
    };
    let versions = match class {
        B => vec![VersionFigures {
            model: "sim-model".into(),
            version: version("2.1.0"),
            figures: Figures {
                latency_us: 18_000,
                jitter: 0.0,
                // Slower but frugal: 40 mW x 18 ms = 720 uJ, within its bound.
                power_mw: 40.0,
                ..default.clone()
            },
        }],
        _ => vec![VersionFigures {
            model: "sim-model".into(),
            version: version("2.2.0"),
            figures: Figures {
                accuracy: 0.85,
                ..default.clone()
            },
        }],
    };
    Bench { default, versions }
}

/// Short stages and windows, bench devices labelled `role=bench`, three golden-set runs.
async fn gateway() -> TestGateway {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.registry.trusted_keys = vec![public(1)];
    let p = &mut c.rollouts.policy;
    // Two stages: 4 devices, then all 8.
    let mut stage = p.stages[0].clone();
    stage.bake = Duration::from_secs(2);
    stage.size = StageSize::Count(4);
    let mut last = stage.clone();
    last.size = StageSize::Percent(100.0);
    p.stages = vec![stage, last];
    p.gates.window = Duration::from_secs(3);
    p.gates.confirm = Duration::from_secs(1);
    p.gates.wait = Duration::from_secs(20);
    p.gates.min_devices = 3;
    p.gates.min_samples = 20;
    c.validation.bench_labels = BTreeMap::from([("role".into(), "bench".into())]);
    c.validation.repeat = 3;
    let gw = TestGateway::start_with(c, Some(tmp)).await;
    for (v, r) in [("2.0.0", 2), ("2.1.0", 3), ("2.2.0", 4)] {
        gw.upload(release(v, r)).await.unwrap();
    }
    gw
}

/// Bench devices `bench-a-0`, `bench-a-1`, `bench-b-0`, `bench-b-1` then production devices
/// `prod-0`... (even: class A, odd: class B), connected and having said hello.
async fn fleet(gw: &TestGateway) -> (Fleet, CancellationToken) {
    let key = gw.get("/rollouts/signing-key").await;
    let rollback = fleetgate_config::parse_key(key["public_key"].as_str().unwrap()).unwrap();
    let trust = Trust {
        keys: vec![public(1)],
        threshold: 1,
        rollback_keys: vec![rollback],
    };
    let mut creds = Vec::new();
    let mut profiles = Vec::new();
    for (class, tag) in [(A, "a"), (B, "b"), (A, "a"), (B, "b")]
        .into_iter()
        .take(BENCH)
    {
        let id = format!("bench-{tag}-{}", creds.len() / 2);
        let answer = gw
            .post(
                "/devices",
                json!({ "id": id, "labels": { "role": "bench" } }),
            )
            .await
            .unwrap();
        creds.push(fleetgate_sim::Credential {
            id,
            secret: answer["credential"].as_str().unwrap().to_owned(),
        });
        profiles.push(DeviceProfile {
            trust: trust.clone(),
            class: Some(class.into()),
            bench: Some(bench(class)),
            ..DeviceProfile::default()
        });
    }
    for i in 0..PRODUCTION {
        creds.push(gw.enroll(&format!("prod-{i}")).await);
        profiles.push(DeviceProfile {
            trust: trust.clone(),
            class: Some(if i % 2 == 0 { A } else { B }.into()),
            ..DeviceProfile::default()
        });
    }
    let n = creds.len() as u64;
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt_port(), creds);
    spec.interval = Duration::from_millis(100);
    spec.duration = Some(Duration::from_secs(240));
    spec.profiles = profiles;
    spec.shape = DataShape::default();
    let stop = CancellationToken::new();
    let fleet = Fleet::start(spec, stop.clone());
    assert!(
        fleet.wait_connected(n, Duration::from_secs(60)).await,
        "devices did not connect"
    );
    let said = fleet
        .counters()
        .wait_until(Duration::from_secs(30), |c| c.hello.load(Relaxed) >= n)
        .await;
    assert!(said, "devices did not say hello");
    gw.sync().await;
    (fleet, stop)
}

/// A rollout of `version` to every device, with a validate stage needing two passing bench
/// devices per class.
async fn create(gw: &TestGateway, version: &str) -> Value {
    gw.post(
        "/rollouts",
        json!({
            "kind": "model", "name": "sim-model", "version": version, "all": true,
            "validate": { "min_devices": 2, "timeout": "2m" },
        }),
    )
    .await
    .expect("create rollout")
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

/// Polls until every bench device has a result for `version` (at most 60 s).
async fn wait_results(gw: &TestGateway, version: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = gw
            .get(&format!("/validations/model/sim-model/{version}"))
            .await;
        if v["results"].as_array().map_or(0, Vec::len) == BENCH {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bench results of {version}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn audit(gw: &TestGateway, id: u64) -> Vec<Value> {
    gw.get(&format!("/rollouts/{id}/audit?limit=1000"))
        .await
        .as_array()
        .unwrap()
        .clone()
}

fn events(audit: &[Value]) -> Vec<&str> {
    audit.iter().map(|e| e["event"].as_str().unwrap()).collect()
}

/// Devices by the sim-model version they run (from their hellos).
async fn versions(gw: &TestGateway) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in gw.get("/devices").await.as_array().unwrap() {
        let v = d["models"][0]["version"].as_str().unwrap_or("none");
        out.entry(v.to_owned())
            .or_default()
            .push(d["id"].as_str().unwrap().to_owned());
    }
    for ids in out.values_mut() {
        ids.sort();
    }
    out
}

/// The rollout's devices that were ever offered the release.
async fn offered(gw: &TestGateway, id: u64) -> Vec<Value> {
    let devices = gw.get(&format!("/rollouts/{id}/devices?limit=1000")).await;
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), PRODUCTION, "bench devices are not in it");
    devices
        .iter()
        .filter(|d| !d["transfer"].is_null() || d["state"] != "not_updated")
        .cloned()
        .collect()
}

/// A release missing one requirement on one class: aborted by the gateway before stage 1,
/// with the measured value and the bound in its reason and its audit log.
async fn fails_before_production(
    gw: &TestGateway,
    version: &str,
    class: &str,
    miss: &str,
) -> Value {
    let created = create(gw, version).await;
    assert_eq!(created["rollout"]["planned"], PRODUCTION, "{created}");
    let id = created["rollout"]["id"].as_u64().unwrap();
    let r = wait_state(gw, id, &["aborted"], Duration::from_secs(90)).await;
    assert_eq!(r["by"], "gateway", "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("validation failed on bench device bench-")
            && reason.contains(&format!("({class}): {miss}")),
        "{reason}"
    );
    assert_eq!(r["validation"]["state"], "failed", "{r}");
    assert!(offered(gw, id).await.is_empty(), "{r}");

    let log = audit(gw, id).await;
    assert_eq!(
        events(&log),
        ["created", "validation_started", "validation_failed"],
        "{log:?}"
    );
    let failed = &log[2];
    assert_eq!(failed["by"], "gateway");
    assert_eq!(failed["message"], reason);
    assert_eq!(failed["detail"]["class"], class);
    assert_eq!(failed["detail"]["misses"], json!([miss]), "{failed}");
    failed.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_release_meeting_its_requirements_on_every_class_reaches_production() {
    let gw = gateway().await;
    let (fleet, stop) = fleet(&gw).await;
    let before = versions(&gw).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before["1.0.0"].len(), PRODUCTION + BENCH);

    // 2.1.0: 18,000 us at p95 on class B's bench devices.
    let failed =
        fails_before_production(&gw, "2.1.0", B, "latency_p95_us 18000 (required <=15000)").await;
    let result = &failed["detail"]["result"];
    assert_eq!(
        result["values"]["latency_p95_us"],
        json!(18000.0),
        "{failed}"
    );
    assert_eq!(result["inferences"], 60, "{failed}");
    // Every bench device measured it: class A passes, class B fails, as the registry says.
    let v = wait_results(&gw, "2.1.0").await;
    assert_eq!(
        (
            &v["classes"][A]["passed"],
            &v["classes"][B]["failed"],
            &v["classes"][B]["worst"]["latency_p95_us"]
        ),
        (&json!(2), &json!(2), &json!(18000.0)),
        "{v}"
    );

    // 2.2.0: 17 of the 20 golden cases right on class A's bench devices.
    fails_before_production(&gw, "2.2.0", A, "accuracy 0.8500 (required >=0.9300)").await;
    let v = wait_results(&gw, "2.2.0").await;
    assert_eq!(
        (
            &v["classes"][A]["failed"],
            &v["classes"][A]["worst"]["accuracy"],
            &v["classes"][B]["passed"]
        ),
        (&json!(2), &json!(0.85), &json!(2)),
        "{v}"
    );

    // 2.0.0 meets every requirement on both classes: validated, then every stage.
    let created = create(&gw, "2.0.0").await;
    let id = created["rollout"]["id"].as_u64().unwrap();
    let r = wait_state(
        &gw,
        id,
        &["completed", "aborted", "rolled_back", "paused"],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["counts"], json!({ "healthy": PRODUCTION }), "{r}");
    assert_eq!(r["validation"]["state"], "passed", "{r}");
    let log = audit(&gw, id).await;
    let ev = events(&log);
    assert_eq!(
        &ev[..4],
        [
            "created",
            "validation_started",
            "validation_passed",
            "stage_started"
        ],
        "{ev:?}"
    );
    assert_eq!(ev.last(), Some(&"completed"), "{ev:?}");
    assert_eq!(
        log[2]["detail"]["classes"][B]["passed"].as_u64(),
        Some(2),
        "{}",
        log[2]
    );

    // Production devices run 2.0.0; bench devices validated in their spare slot and still
    // run 1.0.0 (eventually: each device says hello after its reboot).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let want_bench: Vec<String> = ["bench-a-0", "bench-a-1", "bench-b-0", "bench-b-1"]
        .map(String::from)
        .to_vec();
    loop {
        let now = versions(&gw).await;
        if now.get("2.0.0").map_or(0, Vec::len) == PRODUCTION {
            assert_eq!(now.len(), 2, "{now:?}");
            assert_eq!(now["1.0.0"], want_bench, "{now:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The registry's view of each version carries its signed requirements and its results;
    // /metrics has the worst value per class.
    let view = gw.get("/registry/model/sim-model/2.1.0").await;
    assert_eq!(view["requirements"][0]["rules"], json!(RULES), "{view}");
    assert_eq!(view["requirements"][0]["golden_cases"], 20, "{view}");
    assert_eq!(view["validation"][B]["failed"], 2, "{view}");
    let compare = gw
        .get("/validations/model/sim-model/compare/2.0.0/2.1.0")
        .await;
    let row = compare["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["class"] == B && r["measure"] == "latency_p95_us")
        .cloned()
        .unwrap_or_else(|| panic!("{compare}"));
    assert_eq!(row["new"], json!(18000.0), "{row}");
    assert_eq!(row["met"], false, "{row}");
    let url = format!("{}/metrics", gw.http_url());
    let metrics = tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap();
    let series = format!(
        "fleetgate_validation_value{{kind=\"model\",name=\"sim-model\",version=\"2.1.0\",class=\"{B}\",measure=\"latency_p95_us\"}} "
    );
    let value: Option<f64> = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok());
    assert_eq!(value, Some(18000.0), "{series} in /metrics");

    stop.cancel();
    let report = fleet.finish().await;
    assert_eq!(report.updates.installed, PRODUCTION as u64, "{report}");
    assert_eq!((report.updates.rejected, report.updates.failed), (0, 0));
    gw.stop().await;
}
