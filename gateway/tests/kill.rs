//! A gateway killed with SIGKILL in the middle of a rollout, and started again on the same data
//! directory, finishes the rollout with the outcome it would have had, and no device gets an
//! instruction it cannot handle; killed while devices stream, it keeps every message it
//! acknowledged. These run the `fleetgate` binary (a real process to kill) against a simulated
//! fleet in this process.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use fleetgate::registry::bundle::BundleFile;
use fleetgate_protocol::manifest::{ManifestSpec, RuntimeReq};
use fleetgate_protocol::{ArtifactKind, Compat};
use fleetgate_sim::FleetSpec;
use fleetgate_sim::fleet::Fleet;
use fleetgate_sim::updater::{DeviceProfile, Faults, Trust};
use serde_json::{Value, json};
use support::{GatewayProcess as Gateway, TOKEN, release_key};
use tokio_util::sync::CancellationToken;

/// sim-model 2.0.0 (release 2) for the simulator's hardware, signed by the release key.
fn bundle() -> Vec<u8> {
    let now = fleetgate::clock::now_ms();
    let spec = ManifestSpec {
        kind: ArtifactKind::Model,
        name: "sim-model".into(),
        version: semver::Version::new(2, 0, 0),
        release: 2,
        compat: Compat {
            classes: vec!["sim-mcu".into()],
            runtime: Some(RuntimeReq {
                name: "tflm".into(),
                min_version: semver::Version::new(2, 0, 0),
            }),
            ..Compat::default()
        },
        chunk_size: 4096,
        created_ms: now,
        expires_ms: now + 86_400_000,
    };
    let artifact: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    BundleFile::sign(artifact, spec, &[release_key()], BTreeMap::new(), vec![]).encode()
}

/// A gateway process whose rollout policy has `stages`, short bakes and gate windows; its
/// ports and data directory outlive it.
fn gateway(dir: &Path, stages: &str) -> Gateway {
    Gateway::new(
        dir,
        &format!(
            r#"
[rollouts.policy]
stages = {stages}
bake = "3s"
[rollouts.policy.gates]
window = "3s"
confirm = "1s"
wait = "30s"
min_samples = 20
"#
        ),
    )
}

impl Gateway {
    /// Polls a rollout until `done` holds for it (at most `limit`).
    async fn wait(&self, id: u64, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let r = self.get(&format!("/rollouts/{id}")).await;
            if done(&r) {
                return r;
            }
            assert!(tokio::time::Instant::now() < deadline, "rollout {id}: {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Enrolls `n` devices, registers the release and starts a fleet trusting both keys; every
/// device has said hello when this returns.
async fn setup(
    gw: &Gateway,
    n: usize,
    faults: impl Fn(usize) -> Faults,
) -> (Fleet, CancellationToken) {
    let url = format!("http://127.0.0.1:{}", gw.http);
    let creds = tokio::task::spawn_blocking(move || {
        fleetgate_sim::enroll::enroll(&url, TOKEN, &fleetgate_sim::enroll::ids("k", n), None, 4)
    })
    .await
    .unwrap()
    .unwrap();
    let api = gw.api();
    tokio::task::spawn_blocking(move || api.post_bytes("/registry/bundles", &bundle()))
        .await
        .unwrap()
        .unwrap();
    let key = gw.get("/rollouts/signing-key").await;
    let rollback = fleetgate_config::parse_key(key["public_key"].as_str().unwrap()).unwrap();
    let profiles = (0..10)
        .map(|i| DeviceProfile {
            trust: Trust {
                keys: vec![release_key().verifying_key().to_bytes()],
                threshold: 1,
                rollback_keys: vec![rollback],
            },
            faults: faults(i),
            ..DeviceProfile::default()
        })
        .collect();
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt, creds);
    spec.interval = Duration::from_millis(100);
    spec.duration = Some(Duration::from_secs(240));
    spec.profiles = profiles;
    let stop = CancellationToken::new();
    let fleet = Fleet::start(spec, stop.clone());
    assert!(
        fleet
            .wait_connected(n as u64, Duration::from_secs(30))
            .await
    );
    let said = fleet
        .counters()
        .wait_until(Duration::from_secs(30), |c| {
            c.hello.load(Relaxed) >= n as u64
        })
        .await;
    assert!(said);
    // The hellos are stored before the rollout picks its devices.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gw
        .get("/devices")
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| !d["models"].is_null())
        .count()
        < n
    {
        assert!(tokio::time::Instant::now() < deadline, "hellos not stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (fleet, stop)
}

/// Devices per model version, by their last hello; and transfers per device.
async fn fleet_state(gw: &Gateway) -> (BTreeMap<String, u64>, BTreeMap<u64, u64>) {
    let mut versions = BTreeMap::new();
    let mut transfers = BTreeMap::new();
    for d in gw.get("/devices").await.as_array().unwrap() {
        let v = d["models"][0]["version"]
            .as_str()
            .unwrap_or("none")
            .to_owned();
        *versions.entry(v).or_insert(0) += 1;
        let id = d["id"].as_str().unwrap();
        let n = gw
            .get(&format!("/updates?device={id}"))
            .await
            .as_array()
            .unwrap()
            .len() as u64;
        *transfers.entry(n).or_insert(0) += 1;
    }
    (versions, transfers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_killed_mid_stage_finishes_the_same_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), r#"["10", "50%", "100%"]"#);
    gw.start().await;
    let (fleet, stop) = setup(&gw, 60, |_| Faults::default()).await;
    let created = gw
        .post(
            "/rollouts",
            json!({ "kind": "model", "name": "sim-model", "version": "2.0.0", "all": true }),
        )
        .await;
    let id = created["rollout"]["id"].as_u64().unwrap();
    // Kill it while stage 2 updates devices.
    gw.wait(id, Duration::from_secs(60), |r| {
        r["stage"]["number"] == 2 && r["counts"]["updating"].as_u64().unwrap_or(0) > 0
    })
    .await;
    gw.kill();
    gw.start().await;
    let r = gw
        .wait(id, Duration::from_secs(120), |r| r["state"] != "running")
        .await;
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["counts"], json!({ "healthy": 60 }), "{r}");
    // Every stage started once, passed once.
    let audit = gw.get(&format!("/rollouts/{id}/audit?limit=1000")).await;
    let events: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for e in ["stage_started", "stage_installed", "stage_passed"] {
        assert_eq!(
            events.iter().filter(|x| **x == e).count(),
            3,
            "{e}: {events:?}"
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (versions, transfers) = loop {
        let state = fleet_state(&gw).await;
        if state.0.get("2.0.0") == Some(&60) || tokio::time::Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(versions, [("2.0.0".to_owned(), 60)].into());
    // One transfer per device: the kill made nobody start over.
    assert_eq!(transfers, [(1, 60)].into());
    stop.cancel();
    let report = fleet.finish().await;
    assert_eq!(report.updates.installed, 60, "{report}");
    assert_eq!(
        (
            report.updates.rejected,
            report.updates.failed,
            report.rollbacks.done
        ),
        (0, 0, 0),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_killed_as_it_starts_reaches_every_device_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), r#"["40", "100%"]"#);
    gw.start().await;
    // One device in ten fails to install: more than the 10 % the first stage allows.
    let (fleet, stop) = setup(&gw, 60, |i| Faults {
        fail_install: i == 0,
        ..Faults::default()
    })
    .await;
    let id = gw
        .post(
            "/rollouts",
            json!({ "kind": "model", "name": "sim-model", "version": "2.0.0", "all": true, "policy": { "min_reporting": 40 } }),
        )
        .await["rollout"]["id"]
        .as_u64()
        .unwrap();
    // The moment it decides to roll back, the gateway dies: some directives went out, some
    // did not, some acks are lost.
    gw.wait(id, Duration::from_secs(60), |r| r["state"] == "rolled_back")
        .await;
    gw.kill();
    gw.start().await;
    let r = gw
        .wait(id, Duration::from_secs(60), |r| {
            r["counts"]["rollback_sent"].is_null()
        })
        .await;
    assert_eq!(r["state"], "rolled_back", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("failed"), "{r}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (versions, _) = loop {
        let state = fleet_state(&gw).await;
        if state.0.get("1.0.0") == Some(&60) || tokio::time::Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(versions, [("1.0.0".to_owned(), 60)].into());
    stop.cancel();
    let report = fleet.finish().await;
    // Every device of the 40-device stage finished once, installed or failed as the gateway
    // recorded it (which of them the stage took, and so how many of the failing devices, depends
    // on who was online and when), and the failures were the 10 % that roll it back.
    let failed = r["counts"]["failed"].as_u64().unwrap_or(0);
    assert!(failed >= 4, "{r}");
    assert_eq!(
        (report.updates.installed, report.updates.failed),
        (40 - failed, failed),
        "{report}\n{r}"
    );
    // Each device that installed went back exactly once, and refused nothing.
    assert_eq!(report.rollbacks.done, report.updates.installed, "{report}");
    assert_eq!(report.rollbacks.rejected, 0, "{report}");
    assert_eq!(
        r["counts"]["rolled_back"].as_u64().unwrap(),
        report.rollbacks.done,
        "{r}"
    );
}

/// Power cuts under load: a gateway taking telemetry from 20 devices and enrollments from an
/// operator is SIGKILLed five times. Each time, the database opens again, every enrollment the
/// API answered 201 is there, and every device's stored rows match its counters (they are
/// written in the same commits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kills_under_load_lose_nothing_the_api_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), r#"["100%"]"#);
    gw.start().await;
    let url = format!("http://127.0.0.1:{}", gw.http);
    let creds = tokio::task::spawn_blocking(move || {
        fleetgate_sim::enroll::enroll(&url, TOKEN, &fleetgate_sim::enroll::ids("p", 20), None, 4)
    })
    .await
    .unwrap()
    .unwrap();
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt, creds);
    spec.interval = Duration::from_millis(20);
    spec.duration = Some(Duration::from_secs(240));
    let stop = CancellationToken::new();
    let fleet = Fleet::start(spec, stop.clone());
    assert!(fleet.wait_connected(20, Duration::from_secs(30)).await);

    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..5u64 {
        // An operator enrolls devices one after another until the gateway dies under it.
        let api = gw.api();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = done.clone();
        let enrolling = tokio::task::spawn_blocking(move || {
            let mut acked = Vec::new();
            for i in 0..10_000 {
                let id = format!("late-{round}-{i}");
                match api.post("/devices", &json!({ "id": id })) {
                    Ok(_) => {
                        acked.push(id);
                        counter.fetch_add(1, Relaxed);
                    }
                    Err(_) => break,
                }
            }
            acked
        });
        let sent_before = fleet.counters().telemetry.load(Relaxed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while done.load(Relaxed) < 3 + 2 * round
            || fleet.counters().telemetry.load(Relaxed) < sent_before + 200
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no load in round {round}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        gw.kill();
        acknowledged.extend(enrolling.await.unwrap());
        gw.start().await;

        let devices = gw.get("/devices").await;
        let devices = devices.as_array().unwrap();
        let ids: std::collections::BTreeSet<&str> =
            devices.iter().map(|d| d["id"].as_str().unwrap()).collect();
        for id in &acknowledged {
            assert!(
                ids.contains(id.as_str()),
                "round {round}: {id} was acknowledged but is gone"
            );
        }
        for d in devices {
            assert_eq!(
                d["stored"]["telemetry"], d["counters"]["telemetry"],
                "round {round}: {}",
                d["id"]
            );
        }
    }
    assert!(
        acknowledged.len() >= 3 + 5 + 7 + 9 + 11,
        "{}",
        acknowledged.len()
    );
    // The fleet comes back after the last restart.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let online = gw
            .get("/devices?online=true")
            .await
            .as_array()
            .unwrap()
            .len();
        if online == 20 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{online} of 20 back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    fleet.finish().await;
}

/// Streams QoS 1 telemetry from `id` one message at a time (the next only after the PUBACK of
/// the last), through every kill and restart, until `stop`; returns the highest sequence
/// number acknowledged: every number up to it was acknowledged.
async fn stream_acknowledged(
    port: u16,
    id: String,
    secret: String,
    stop: CancellationToken,
    progress: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> u64 {
    let mut opts = rumqttc::MqttOptions::new(&id, "127.0.0.1", port);
    opts.set_credentials(&id, &secret);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 16);
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    let polling = stop.clone();
    tokio::spawn(async move {
        while !polling.is_cancelled() {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    let _ = acks_tx.send(());
                }
                Ok(_) => {}
                // The gateway is down: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let topic = format!("fg/{id}/telemetry/json");
    let mut acked = 0;
    while !stop.is_cancelled() {
        let seq = acked + 1;
        let payload = json!({ "boot": 1, "seq": seq }).to_string();
        if client
            .publish(&topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            break;
        }
        // The one message in flight is acknowledged, or sent again after a while (a copy the
        // gateway already stored is a duplicate it does not store twice).
        tokio::select! {
            got = acks.recv() => match got {
                Some(()) => {
                    acked = seq;
                    progress.fetch_add(1, Relaxed);
                }
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.cancelled() => {}
        }
        // A late PUBACK of an earlier copy of this message still means it is stored.
        while acks.try_recv().is_ok() {}
    }
    acked
}

/// Devices stream while the gateway is SIGKILLed at random moments and started again; every
/// sequence number a device got a PUBACK for is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_stream_keeps_every_acknowledged_message() {
    const DEVICES: usize = 8;
    const KILLS: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), r#"["100%"]"#);
    gw.start().await;
    let url = format!("http://127.0.0.1:{}", gw.http);
    let creds = tokio::task::spawn_blocking(move || {
        fleetgate_sim::enroll::enroll(
            &url,
            TOKEN,
            &fleetgate_sim::enroll::ids("s", DEVICES),
            None,
            4,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let stop = CancellationToken::new();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let streams: Vec<_> = creds
        .iter()
        .map(|c| {
            tokio::spawn(stream_acknowledged(
                gw.mqtt,
                c.id.clone(),
                c.secret.clone(),
                stop.clone(),
                progress.clone(),
            ))
        })
        .collect();
    // Each kill comes once the devices have had 100 messages acknowledged since the last start
    // (however fast the machine is), then after a random 0 to 0.8 s more, from a seed the
    // failure message names: every kill falls into a running stream.
    let seed = fleetgate::clock::now_ms();
    let mut x = seed;
    let streamed = async |since: u64| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while progress.load(Relaxed) < since + 100 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the devices stopped streaming (seed {seed})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    for _ in 0..KILLS {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        streamed(progress.load(Relaxed)).await;
        tokio::time::sleep(Duration::from_millis((x >> 33) % 800)).await;
        gw.kill();
        gw.start().await;
    }
    // And a stream after the last start too.
    streamed(progress.load(Relaxed)).await;
    stop.cancel();
    let mut total = 0;
    for (c, stream) in creds.iter().zip(streams) {
        let acked = stream.await.unwrap();
        assert!(acked > 0, "{}: nothing acknowledged (seed {seed})", c.id);
        total += acked;
        let rows = gw
            .get(&format!("/devices/{}/telemetry?limit=10000", c.id))
            .await;
        let stored: std::collections::BTreeSet<u64> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        let missing: Vec<u64> = (1..=acked).filter(|s| !stored.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "{}: acknowledged but not stored: {missing:?} (seed {seed})",
            c.id
        );
    }
    assert_eq!(total, progress.load(Relaxed), "seed {seed}");
    assert!(
        total >= 100 * (KILLS + 1),
        "only {total} messages in the run"
    );
}
