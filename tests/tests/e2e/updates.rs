//! Signed bundles reach simulated devices over MQTT; every kind of bad update is refused by
//! the device with its own reason; an interrupted download resumes.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use fleetgate_sim::FleetSpec;
use fleetgate_sim::fleet::Fleet;
use fleetgate_sim::report::Counters;
use fleetgate_sim::updater::{DeviceProfile, Faults, REPORT_EVERY, Trust};
use serde_json::{Value, json};
use tests::release::{model, public};
use tests::{TestGateway, config};
use tokio_util::sync::CancellationToken;

const MIB: usize = 1 << 20;
/// Reports a device sends for a 64-chunk download: accepted, progress every few chunks,
/// verifying, installing, and (from the new image) installed.
const REPORTS: u64 = 1 + 64 / REPORT_EVERY + 3;

/// A gateway that trusts release keys 1 and 2.
async fn gateway() -> TestGateway {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.registry.trusted_keys = vec![public(1), public(2)];
    c.registry.threshold = 1;
    TestGateway::start_with(c, Some(tmp)).await
}

fn trusting(keys: &[u8], threshold: usize) -> DeviceProfile {
    DeviceProfile {
        trust: Trust {
            keys: keys.iter().map(|k| public(*k)).collect(),
            threshold,
            ..Trust::default()
        },
        ..DeviceProfile::default()
    }
}

/// Quiet devices (hello only) with the given profiles.
async fn fleet(
    gw: &TestGateway,
    prefix: &str,
    n: usize,
    profiles: Vec<DeviceProfile>,
) -> (Fleet, CancellationToken) {
    let creds = gw.enroll_fleet(prefix, n).await;
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt_port(), creds);
    spec.interval = Duration::from_secs(3600);
    spec.profiles = profiles;
    let stop = CancellationToken::new();
    let fleet = Fleet::start(spec, stop.clone());
    assert!(
        fleet
            .wait_connected(n as u64, Duration::from_secs(30))
            .await,
        "devices did not connect"
    );
    // Every hello acknowledged, so committed: the gateway knows every device's hardware.
    let said_hello = fleet
        .counters()
        .wait_until(Duration::from_secs(30), move |c: &Counters| {
            c.hello.load(Relaxed) >= n as u64 && c.acked.load(Relaxed) == c.published()
        })
        .await;
    assert!(said_hello, "devices did not say hello");
    (fleet, stop)
}

/// Waits until `done` update outcomes are reported and acknowledged.
async fn wait_outcomes(fleet: &Fleet, done: u64) -> bool {
    fleet
        .counters()
        .wait_until(Duration::from_secs(60), move |c: &Counters| {
            let finished = c.updates_installed.load(Relaxed)
                + c.updates_rejected.load(Relaxed)
                + c.updates_failed.load(Relaxed);
            finished >= done
                && c.acked.load(Relaxed) == c.published()
                && c.update_reports.load(Relaxed) > 0
        })
        .await
}

async fn start(gw: &TestGateway, version: &str, devices: &[&str], allow_downgrade: bool) -> Value {
    let body = json!({ "kind": "model", "name": "sim-model", "version": version, "devices": devices, "allow_downgrade": allow_downgrade });
    gw.post("/updates", body).await.expect("start updates")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_bundle_reaches_a_hundred_devices() {
    let gw = gateway().await;
    let uploaded = gw
        .upload(model("2.0.0", 2, "sim-mcu", MIB, &[1]))
        .await
        .unwrap();
    assert_eq!(
        (
            uploaded["created"].as_bool(),
            uploaded["release"]["release"].as_u64()
        ),
        (Some(true), Some(2))
    );
    assert_eq!(uploaded["release"]["artifacts"][0]["chunks"], 64);
    let (fleet, stop) = fleet(&gw, "upd", 100, vec![trusting(&[1], 1)]).await;
    gw.sync().await;

    let body = json!({ "kind": "model", "name": "sim-model", "version": "2.0.0", "all": true });
    let plan = gw.post("/updates", body).await.unwrap();
    assert_eq!(plan["started"].as_array().unwrap().len(), 100, "{plan}");
    assert_eq!(plan["skipped"], json!([]));

    // Installed on every device; the last report ("installed") comes from the new image.
    let installed = fleet
        .counters()
        .wait_until(Duration::from_secs(120), |c| {
            c.updates_installed.load(Relaxed) == 100
                && c.update_reports.load(Relaxed) >= 100 * (REPORTS - 1)
                && c.acked.load(Relaxed) == c.published()
        })
        .await;
    assert!(
        installed,
        "installed on {} of 100",
        fleet.counters().updates_installed.load(Relaxed)
    );
    // Wait for every device to be back after its reboot (it says hello, then "installed").
    assert!(fleet.wait_connected(100, Duration::from_secs(30)).await);
    let all_reported = fleet
        .counters()
        .wait_until(Duration::from_secs(30), |c| {
            c.update_reports.load(Relaxed) == 100 * REPORTS
                && c.acked.load(Relaxed) == c.published()
        })
        .await;
    assert!(
        all_reported,
        "{} reports",
        fleet.counters().update_reports.load(Relaxed)
    );
    gw.sync().await;

    let transfers = gw.get("/updates?limit=1000").await;
    let transfers = transfers.as_array().unwrap();
    assert_eq!(transfers.len(), 100);
    for t in transfers {
        assert_eq!(
            (
                t["state"].as_str(),
                t["next_chunk"].as_u64(),
                t["progress"].as_f64()
            ),
            (Some("installed"), Some(64), Some(100.0)),
            "{t}"
        );
        assert_eq!(
            (t["offers"].as_u64(), t["chunks_resent"].as_u64()),
            (Some(1), Some(0)),
            "{t}"
        );
    }
    let devices = gw.get("/devices").await;
    for d in devices.as_array().unwrap() {
        assert_eq!(d["models"][0]["version"], "2.0.0", "{}", d["id"]);
        assert_eq!(d["models"][0]["release"], 2);
    }
    stop.cancel();
    let report = fleet.finish().await;
    assert_eq!(
        (
            report.updates.installed,
            report.updates.rejected,
            report.updates.failed
        ),
        (100, 0, 0)
    );
    assert_eq!(report.updates.chunks_stored, 6400);
    assert_eq!(report.updates.chunks_duplicate, 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_update_is_refused_with_its_own_reason() {
    let gw = gateway().await;
    gw.upload(model("2.0.0", 2, "sim-mcu", 100_000, &[1]))
        .await
        .unwrap();
    gw.upload(model("3.0.0", 3, "sim-mcu", 100_000, &[2]))
        .await
        .unwrap();
    gw.upload(model("4.0.0", 4, "other-mcu", 100_000, &[1]))
        .await
        .unwrap();
    // The gateway itself refuses a truncated artifact and an untrusted signer.
    let mut truncated = fleetgate::registry::bundle::BundleFile::decode(&model(
        "5.0.0",
        5,
        "sim-mcu",
        100_000,
        &[1],
    ))
    .unwrap();
    truncated.artifact.truncate(90_000);
    let refused = gw.upload(truncated.encode()).await.unwrap_err().to_string();
    assert_eq!(
        refused,
        "400: artifact is 90000 bytes but the manifest says 100000 (truncated?)"
    );
    let refused = gw
        .upload(model("6.0.0", 6, "sim-mcu", 1000, &[3]))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        refused,
        "400: bundle signatures: not signed by any trusted key"
    );

    let faults = |f: Faults| DeviceProfile {
        faults: f,
        ..trusting(&[1], 1)
    };
    let cases: Vec<(&str, DeviceProfile, &str, &str, &str)> = vec![
        (
            "tampered chunk",
            faults(Faults {
                corrupt_chunk: Some(3),
                ..Faults::default()
            }),
            "2.0.0",
            "failed",
            "chunk_hash",
        ),
        (
            "wrong key",
            trusting(&[1], 1),
            "3.0.0",
            "rejected",
            "no_trusted_signature",
        ),
        (
            "expired manifest",
            faults(Faults {
                clock_skew_ms: 2 * 86_400_000,
                ..Faults::default()
            }),
            "2.0.0",
            "rejected",
            "expired",
        ),
        (
            "downgrade",
            DeviceProfile {
                model_release: Some(5),
                ..trusting(&[1], 1)
            },
            "2.0.0",
            "rejected",
            "downgrade",
        ),
        (
            "other hardware",
            faults(Faults {
                claim_class: Some("other-mcu".into()),
                ..Faults::default()
            }),
            "4.0.0",
            "rejected",
            "incompatible",
        ),
        (
            "truncated chunk",
            faults(Faults {
                truncate_chunk: Some(5),
                ..Faults::default()
            }),
            "2.0.0",
            "failed",
            "truncated",
        ),
        (
            "below threshold",
            trusting(&[1, 2], 2),
            "2.0.0",
            "rejected",
            "below_threshold",
        ),
        (
            "declined",
            faults(Faults {
                decline: true,
                ..Faults::default()
            }),
            "2.0.0",
            "rejected",
            "declined",
        ),
        (
            "install fails",
            faults(Faults {
                fail_install: true,
                ..Faults::default()
            }),
            "2.0.0",
            "failed",
            "install_failed",
        ),
    ];
    let (fleet, stop) = fleet(
        &gw,
        "bad",
        cases.len(),
        cases.iter().map(|c| c.1.clone()).collect(),
    )
    .await;
    gw.sync().await;
    for (i, (name, _, version, _, _)) in cases.iter().enumerate() {
        let device = format!("bad-{i:05}");
        let plan = start(&gw, version, &[device.as_str()], true).await;
        assert_eq!(
            plan["started"].as_array().unwrap().len(),
            1,
            "{name}: {plan}"
        );
    }
    assert!(
        wait_outcomes(&fleet, cases.len() as u64).await,
        "not every device answered"
    );
    gw.sync().await;
    for (i, (name, _, _, state, reason)) in cases.iter().enumerate() {
        let device = format!("bad-{i:05}");
        let t = &gw.get(&format!("/updates?device={device}")).await[0];
        assert_eq!(
            (t["state"].as_str(), t["reason"].as_str()),
            (Some(*state), Some(*reason)),
            "{name}: {t}"
        );
        let d = gw.get(&format!("/devices/{device}")).await;
        let want_release = if *name == "downgrade" { 5 } else { 1 };
        assert_eq!(
            (
                d["models"][0]["version"].as_str(),
                d["models"][0]["release"].as_u64()
            ),
            (Some("1.0.0"), Some(want_release)),
            "{name}: still on its old version"
        );
    }
    stop.cancel();
    let report = fleet.finish().await;
    assert_eq!(
        (
            report.updates.installed,
            report.updates.rejected,
            report.updates.failed
        ),
        (0, 6, 3),
        "{report}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cut_off_at_half_resumes_and_gets_at_most_one_chunk_twice() {
    let gw = gateway().await;
    gw.upload(model("2.0.0", 2, "sim-mcu", MIB, &[1]))
        .await
        .unwrap();
    let profile = DeviceProfile {
        faults: Faults {
            disconnect_at: Some(0.5),
            ..Faults::default()
        },
        ..trusting(&[1], 1)
    };
    let (fleet, stop) = fleet(&gw, "cut", 1, vec![profile]).await;
    gw.sync().await;
    start(&gw, "2.0.0", &["cut-00000"], false).await;
    let c = fleet.counters();
    assert!(
        wait_outcomes(&fleet, 1).await,
        "acked {} of {}: hello {} reports {} acks {}",
        c.acked.load(Relaxed),
        c.published(),
        c.hello.load(Relaxed),
        c.update_reports.load(Relaxed),
        c.command_acks.load(Relaxed)
    );
    assert!(fleet.wait_connected(1, Duration::from_secs(30)).await);
    let reported = fleet
        .counters()
        .wait_until(Duration::from_secs(30), |c| {
            c.update_reports.load(Relaxed) == REPORTS + 1 && c.acked.load(Relaxed) == c.published()
        })
        .await;
    assert!(reported);
    gw.sync().await;
    let t = &gw.get("/updates?device=cut-00000").await[0];
    assert_eq!(t["state"], "installed", "{t}");
    assert_eq!(t["offers"], 2, "offered again after the reconnect: {t}");
    stop.cancel();
    let report = fleet.finish().await;
    assert_eq!(report.updates.installed, 1);
    assert_eq!(
        report.updates.chunks_stored, 64,
        "every chunk stored exactly once"
    );
    assert!(report.updates.chunks_duplicate <= 1, "{report}");
    assert_eq!(
        report.connects, 3,
        "first connect, the cut, the reboot after install"
    );
    gw.stop().await;
}
