//! A simulated fleet sends a known number of messages; the API shows exactly those.

use std::time::Duration;

use fleetgate_sim::FleetSpec;
use tests::TestGateway;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_devices_show_up_with_exact_counts() {
    let gw = TestGateway::start().await;
    let creds = gw.enroll_fleet("fleet", 50).await;
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt_port(), creds);
    spec.interval = Duration::from_millis(20);
    spec.messages = Some(20);
    spec.alert_every = 10;
    let report = fleetgate_sim::run(spec, CancellationToken::new()).await;
    assert_eq!(report.connected, 50, "{report}");
    assert_eq!(
        (report.sent.hello, report.sent.telemetry, report.sent.alerts),
        (50, 1000, 100)
    );
    assert_eq!(report.unacked(), 0, "{report}");
    assert_eq!(report.errors, 0, "{report}");
    gw.sync().await;

    let devices = gw.get("/devices").await;
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), 50);
    for d in devices {
        let c = &d["counters"];
        let id = d["id"].as_str().unwrap();
        assert!(id.starts_with("fleet-"), "{id}");
        assert_eq!(
            (
                c["hellos"].as_u64(),
                c["telemetry"].as_u64(),
                c["alerts"].as_u64()
            ),
            (Some(1), Some(20), Some(2)),
            "{id}"
        );
        assert_eq!(
            (
                c["lost"].as_u64(),
                c["duplicates"].as_u64(),
                c["rejected"].as_u64()
            ),
            (Some(0), Some(0), Some(0)),
            "{id}"
        );
        assert_eq!(d["stored"]["telemetry"], 20);
        assert_eq!(d["firmware"]["version"], "1.0.0");
        assert_eq!(d["hardware"]["class"], "sim-mcu");
        assert_eq!(d["online"], false, "the devices disconnected after sending");
        assert_eq!(d["disconnect_reason"], "disconnect");
    }
    let ingest = gw.get("/ingest").await;
    assert_eq!(ingest["stored"]["telemetry"], 1000);
    assert_eq!(ingest["stored"]["hello"], 50);
    assert_eq!(ingest["stored"]["alert"], 100);
    assert_eq!(ingest["storage"]["telemetry_rows"], 1000);
    assert_eq!(ingest["mqtt"]["connects"], 50);
    assert_eq!(ingest["telemetry_lost"], 0);
    let rejected: u64 = ingest["rejected"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(rejected, 0);

    // One device's telemetry, newest first, exactly its 20 messages.
    let rows = gw.get("/devices/fleet-00007/telemetry?limit=1000").await;
    let seqs: Vec<u64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..20).rev().collect::<Vec<_>>());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_the_device_and_its_ack_is_visible() {
    let gw = TestGateway::start().await;
    let creds = gw.enroll_fleet("cmd", 2).await;
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt_port(), creds);
    // Quiet devices: hello only, so every acknowledgement below is accounted for.
    spec.interval = Duration::from_secs(3600);
    let stop = CancellationToken::new();
    let fleet = fleetgate_sim::fleet::Fleet::start(spec, stop.clone());
    assert!(
        fleet.wait_connected(2, Duration::from_secs(20)).await,
        "devices did not connect"
    );
    gw.sync().await;
    assert_eq!(
        gw.get("/devices?online=true")
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let ping = gw
        .post(
            "/devices/cmd-00001/commands",
            serde_json::json!({ "action": "ping" }),
        )
        .await
        .unwrap();
    assert_eq!(ping["state"], "sent");
    let interval =
        serde_json::json!({ "action": { "set_telemetry_interval": { "interval_ms": 500 } } });
    let set = gw
        .post("/devices/cmd-00001/commands", interval)
        .await
        .unwrap();
    let other = gw
        .post(
            "/devices/cmd-00000/commands",
            serde_json::json!({ "action": "ping" }),
        )
        .await
        .unwrap();

    // Wait until the devices answered all three and the gateway acknowledged the answers.
    let counters = fleet.counters();
    let answered = counters
        .wait_until(Duration::from_secs(20), |c| {
            use std::sync::atomic::Ordering::Relaxed;
            c.command_acks.load(Relaxed) == 3 && c.acked.load(Relaxed) == c.published()
        })
        .await;
    assert!(answered, "devices did not answer");
    gw.sync().await;
    for (cmd, device) in [
        (&ping, "cmd-00001"),
        (&set, "cmd-00001"),
        (&other, "cmd-00000"),
    ] {
        let stored = gw.get(&format!("/commands/{}", cmd["id"])).await;
        assert_eq!(stored["state"], "done", "{stored}");
        assert_eq!(stored["device"], device);
        assert!(stored["answered_at"].is_string());
    }
    stop.cancel();
    let report = fleet.finish().await;
    assert_eq!(report.commands_received, 3, "{report}");
    gw.sync().await;
    assert_eq!(gw.get("/devices/cmd-00001").await["counters"]["acks"], 2);
    assert_eq!(gw.get("/devices/cmd-00000").await["counters"]["acks"], 1);
    gw.stop().await;
}
