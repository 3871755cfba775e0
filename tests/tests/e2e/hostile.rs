//! Hostile devices. One holding valid credentials tries to act as another device: publish on
//! its topics, read its commands, take over its identity. One among 50 tries every trick on
//! the payloads, the sequence numbers, the protocol and the drift windows. None of it gets
//! through or moves a verdict, every attempt is refused with a proper MQTT code and counted,
//! and the other devices are unaffected.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};
use rumqttc::{Packet, QoS};
use serde_json::json;
use tests::TestGateway;
use tests::device::{await_acks, connect, next_incoming};
use tokio::sync::mpsc;

/// An MQTT 5 client for device `id`, so refusals come with reason codes.
async fn connect_v5(port: u16, id: &str, secret: &str) -> (Client5, mpsc::UnboundedReceiver<P5>) {
    let mut opts = Options5::new(id, "127.0.0.1", port);
    opts.set_credentials(id, secret);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = Client5::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event5::Incoming(p) = event
                && tx.send(p).is_err()
            {
                break;
            }
        }
    });
    (client, rx)
}

async fn next5(rx: &mut mpsc::UnboundedReceiver<P5>) -> P5 {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a packet in time")
        .expect("connection open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_device_cannot_act_as_another() {
    let gw = TestGateway::start().await;
    let mallory = gw.enroll("mallory").await;
    let victim = gw.enroll("victim").await;
    let port = gw.mqtt_port();

    // The victim, a plain 3.1.1 device, listens for its commands.
    let (v, mut v_events) = connect(port, "victim", &victim.secret).await.unwrap();
    v.subscribe("fg/victim/cmd/json", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(
        next_incoming(&mut v_events, Duration::from_secs(10)).await,
        Some(Packet::SubAck(_))
    ));

    let (m, mut m_rx) = connect_v5(port, "mallory", &mallory.secret).await;
    assert!(matches!(next5(&mut m_rx).await, P5::ConnAck(_)));

    // Publishing as the victim, on a downlink channel, or on the broker's internal topics.
    for topic in [
        "fg/victim/telemetry/json",
        "fg/mallory/cmd/json",
        "/tenants/victim/up/telemetry/json",
    ] {
        m.publish(
            topic,
            Q5::AtLeastOnce,
            false,
            r#"{"seq": 1, "hw": {"temp_c": 99}}"#,
        )
        .await
        .unwrap();
        match next5(&mut m_rx).await {
            P5::PubAck(ack) => assert_eq!(ack.reason, PubAckReason::NotAuthorized, "{topic}"),
            other => panic!("{topic}: expected PUBACK, got {other:?}"),
        }
    }
    // Reading everything, or the victim's commands; only its own command topic is granted.
    let filters = [
        "#",
        "fg/+/cmd/json",
        "fg/victim/cmd/json",
        "/tenants/victim/down/cmd/json",
        "fg/mallory/cmd/json",
    ];
    for f in filters {
        m.subscribe(f, Q5::AtLeastOnce).await.unwrap();
    }
    for f in filters {
        let P5::SubAck(ack) = next5(&mut m_rx).await else {
            panic!("expected SUBACK for {f}")
        };
        let want = if f == "fg/mallory/cmd/json" {
            SubscribeReasonCode::Success(Q5::AtLeastOnce)
        } else {
            SubscribeReasonCode::NotAuthorized
        };
        assert_eq!(ack.return_codes, vec![want], "{f}");
    }

    // A command for the victim reaches the victim only. The command for mallory, sent after
    // it, proves mallory's link got nothing before: the broker delivers in order.
    let v_hello = json!({"firmware": {"name": "fw", "version": "1.0.0"}, "hardware": {"arch": "a", "class": "c", "ram_bytes": 1, "flash_bytes": 1}});
    v.publish(
        "fg/victim/hello/json",
        QoS::AtLeastOnce,
        false,
        v_hello.to_string(),
    )
    .await
    .unwrap();
    m.publish(
        "fg/mallory/hello/json",
        Q5::AtLeastOnce,
        false,
        v_hello.to_string(),
    )
    .await
    .unwrap();
    assert!(
        matches!(next5(&mut m_rx).await, P5::PubAck(ack) if ack.reason == PubAckReason::Success)
    );
    await_acks(&mut v_events, 1).await;
    gw.sync().await;
    let for_victim = gw
        .post("/devices/victim/commands", json!({"action": "ping"}))
        .await
        .unwrap();
    let for_mallory = gw
        .post("/devices/mallory/commands", json!({"action": "reboot"}))
        .await
        .unwrap();
    match next_incoming(&mut v_events, Duration::from_secs(10)).await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.topic, "fg/victim/cmd/json");
            let cmd: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(cmd["id"], for_victim["id"]);
        }
        other => panic!("victim got {other:?}"),
    }
    match next5(&mut m_rx).await {
        P5::Publish(p) => {
            let cmd: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(
                cmd["id"], for_mallory["id"],
                "mallory must see only its own command"
            );
        }
        other => panic!("mallory got {other:?}"),
    }

    // Taking over the victim's identity: its client id with mallory's login, or its username
    // with mallory's password.
    let as_victim_id = {
        let mut opts = rumqttc::MqttOptions::new("victim", "127.0.0.1", port);
        opts.set_credentials("mallory", &mallory.secret);
        let (_c, mut ev) = rumqttc::AsyncClient::new(opts, 8);
        ev.poll().await
    };
    assert!(
        matches!(
            as_victim_id,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::BadClientId
            ))
        ),
        "{as_victim_id:?}"
    );
    assert!(connect(port, "victim", &mallory.secret).await.is_err());
    // The victim's session was not replaced by either attempt.
    v.publish(
        "fg/victim/telemetry/json",
        QoS::AtLeastOnce,
        false,
        r#"{"seq": 1}"#,
    )
    .await
    .unwrap();
    await_acks(&mut v_events, 1).await;
    gw.sync().await;

    let ingest = gw.get("/ingest").await;
    assert_eq!(
        (
            ingest["rejected"]["not_permitted"].as_u64(),
            ingest["rejected"]["bad_topic"].as_u64()
        ),
        (Some(3), Some(4)),
        "{ingest}"
    );
    assert_eq!(
        (
            ingest["mqtt"]["refused"]["client_id"].as_u64(),
            ingest["mqtt"]["refused"]["bad_credentials"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let mallory = gw.get("/devices/mallory").await;
    assert_eq!(mallory["counters"]["rejected"], 7);
    let victim = gw.get("/devices/victim").await;
    assert_eq!(victim["counters"]["rejected"], 0);
    assert_eq!(
        victim["counters"]["telemetry"], 1,
        "only the victim's own message"
    );
    let rows = gw.get("/devices/victim/telemetry").await;
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(
        rows[0]["hw"]["temp_c"],
        serde_json::Value::Null,
        "mallory's temp_c 99 never landed"
    );
    assert_eq!(
        gw.get("/alerts").await,
        json!([]),
        "mallory's 99 C would have opened a thermal alert"
    );
    gw.stop().await;
}

/// The process's resident memory, in bytes (the gateway runs in this process).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A telemetry message of sim-model 1.0.0 with `samples` inputs, every one at `f0` on the first
/// feature and at the mean on the others.
fn poison(seq: u64, samples: usize, f0: f32) -> Vec<u8> {
    let sample = json!({ "values": [f0, 0.0, 0.0, 0.0], "prediction": 0, "confidence": 0.9 });
    json!({
        "seq": seq,
        "model": { "name": "sim-model", "version": "1.0.0", "inferences": 20, "class_counts": [14, 4, 2], "mean_confidence": 0.9 },
        "samples": vec![sample; samples],
    })
    .to_string()
    .into_bytes()
}

/// Publishes `payloads` on `topic` at QoS 1 and returns their PUBACK reason codes.
async fn publish_all(
    client: &Client5,
    rx: &mut mpsc::UnboundedReceiver<P5>,
    topic: &str,
    payloads: Vec<Vec<u8>>,
) -> Vec<PubAckReason> {
    let n = payloads.len();
    let publish = async {
        for p in payloads {
            client
                .publish(topic, Q5::AtLeastOnce, false, p)
                .await
                .unwrap();
        }
    };
    let (reasons, ()) = tokio::join!(crate::limits::pubacks(rx, n), publish);
    reasons
}

/// Opens a TCP connection, writes `bytes`, and reads until the gateway closes it (10 s at most:
/// the connect timeout is 30 s, so a close within 10 s is the gateway's own decision).
async fn closed_after(port: u16, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "still open after 10 s, having read {got:?}");
    got
}

/// A CONNECT (MQTT 3.1.1, clean session, keep alive 30 s) for `id` with its credential.
fn connect_packet(id: &str, secret: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 30];
    for field in [id, id, secret] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

/// Issue 13's target: one attacker among 50 devices tries every trick in turn while 49 honest
/// devices report. Every trick is refused with a reason code and counted, the drift verdict of
/// the model the attacker reports on stays what the honest devices make it, the gateway's
/// memory grows less than 5 MiB, and the honest devices lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_attacker_among_fifty_is_refused_counted_and_changes_nothing() {
    const HONEST: usize = 49;
    const MESSAGES: u64 = 40;
    const POISON: u64 = 600;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = tests::config(tmp.path());
    c.mqtt.connect_timeout = Duration::from_secs(30);
    c.registry.trusted_keys = vec![tests::release::public(1)];
    let gw = TestGateway::start_with(c, Some(tmp)).await;
    gw.upload(tests::release::model("1.0.0", 1, "sim-mcu", 4096, &[1]))
        .await
        .unwrap();
    crate::drift::post_baseline(&gw).await;
    let honest = gw.enroll_fleet("h", HONEST).await;
    let mallory = gw.enroll("mallory").await;
    let port = gw.mqtt_port();

    // The honest fleet: a message a second each, 25 raw inputs drawn like the baseline.
    let mut spec = fleetgate_sim::FleetSpec::new("127.0.0.1", port, honest.clone());
    spec.interval = Duration::from_secs(1);
    spec.messages = Some(MESSAGES);
    spec.shape = fleetgate_sim::behaviour::DataShape {
        samples: 25,
        features: 4,
        ..Default::default()
    };
    let fleet = tokio::spawn(fleetgate_sim::run(
        spec,
        tokio_util::sync::CancellationToken::new(),
    ));

    let (m, mut m_rx) = crate::limits::connect_v5(port, "mallory", &mallory.secret, None).await;
    let hello = json!({
        "firmware": { "name": "fw", "version": "1.0.0" },
        "hardware": { "arch": "a", "class": "sim-mcu", "ram_bytes": 1, "flash_bytes": 1 },
        "models": [{ "name": "sim-model", "version": "1.0.0" }],
    });
    let ok = publish_all(
        &m,
        &mut m_rx,
        "fg/mallory/hello/json",
        vec![hello.to_string().into_bytes()],
    )
    .await;
    assert_eq!(ok, vec![PubAckReason::Success]);
    // Memory is measured from when every honest device has sent twice (connected, caches warm).
    let warm = HONEST as u64 * 2;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gw.get("/ingest").await["stored"]["telemetry"].as_u64() < Some(warm) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fleet did not report"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_before = rss();

    // 1. Model versions of 40 KiB: each would be a new cache entry and registry lookup.
    let long = format!("1.0.0-{}", "a".repeat(40 * 1024));
    let versions: Vec<Vec<u8>> = (0..100)
        .map(|i| {
            json!({ "seq": 10_000 + i, "model": { "name": "sim-model", "version": long } })
                .to_string()
                .into_bytes()
        })
        .collect();
    let topic = "fg/mallory/telemetry/json";
    let reasons = publish_all(&m, &mut m_rx, topic, versions).await;
    assert!(
        reasons
            .iter()
            .all(|r| *r == PubAckReason::PayloadFormatInvalid),
        "{reasons:?}"
    );

    // 2. Numbers out of any plausible range, or too many of them.
    let bad = [
        json!({ "seq": 20_000, "hw": { "temp_c": -1e30 } }),
        json!({ "seq": 20_001, "hw": { "inference_latency_us": 0 } }),
        json!({ "seq": 20_002, "model": { "name": "sim-model", "version": "1.0.0", "mean_confidence": -3.0 } }),
        json!({ "seq": 20_003, "model": { "name": "sim-model", "version": "1.0.0", "class_counts": vec![1; 257] } }),
        json!({ "seq": 20_004, "bins": [{ "feature": 0, "counts": [4_000_000_000u64, 1] }] }),
        json!({ "seq": 20_005, "samples": [{ "values": [1e39, 0.0, 0.0, 0.0] }] }),
    ];
    let n_bad = bad.len();
    let reasons = publish_all(
        &m,
        &mut m_rx,
        topic,
        bad.iter().map(|b| b.to_string().into_bytes()).collect(),
    )
    .await;
    assert!(
        reasons
            .iter()
            .all(|r| *r == PubAckReason::PayloadFormatInvalid),
        "{reasons:?}"
    );

    // 3. JSON arrays where objects belong, on every uplink channel.
    let mut arrays = Vec::new();
    for channel in ["telemetry", "log", "alert", "hello"] {
        let r = publish_all(
            &m,
            &mut m_rx,
            &format!("fg/mallory/{channel}/json"),
            vec![b"[1, 2, 3]".to_vec()],
        )
        .await;
        arrays.extend(r);
    }
    assert!(
        arrays
            .iter()
            .all(|r| *r == PubAckReason::PayloadFormatInvalid),
        "{arrays:?}"
    );

    // 4. Plausible inputs, every one far in the first feature's tail, as fast as the gateway
    // takes them: without a cap on one device's share of a window they would be half of every
    // window and raise a drift alert.
    // Seq 500 is held back, to come late below.
    let poison_msgs: Vec<Vec<u8>> = (1..=POISON)
        .filter(|seq| *seq != 500)
        .map(|seq| poison(seq, 25, 4.5))
        .collect();
    let reasons = publish_all(&m, &mut m_rx, topic, poison_msgs).await;
    assert!(
        reasons.iter().all(|r| *r == PubAckReason::Success),
        "{reasons:?}"
    );
    // A repeat is a duplicate; seq 500, 100 behind, is late, not a duplicate, and fills its
    // gap; neither resets the tracking.
    let reasons = publish_all(
        &m,
        &mut m_rx,
        topic,
        vec![poison(POISON, 1, 0.0), poison(500, 1, 0.0)],
    )
    .await;
    assert_eq!(reasons, vec![PubAckReason::Success; 2]);

    // 5. Protocol violations: a second CONNECT, a SUBACK from a client, and a CONNECT
    // announcing 256 MiB. Each connection is closed at once.
    let connect = connect_packet("mallory", &mallory.secret);
    let mut twice = connect.clone();
    twice.extend(&connect);
    let got = closed_after(port, &twice).await;
    assert_eq!(&got[..2], &[0x20, 2], "a CONNACK, then the close: {got:?}");
    let mut suback = connect.clone();
    suback.extend([0x90, 3, 0, 1, 0]);
    closed_after(port, &suback).await;
    closed_after(port, &[0x10, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x04]).await;
    let rss_after = rss();

    let report = fleet.await.unwrap();
    assert_eq!((report.unacked(), report.errors), (0, 0), "{report}");
    gw.sync().await;

    // Every refusal counted, on the gateway and on the attacker.
    let ingest = gw.get("/ingest").await;
    let invalid = 100 + n_bad as u64;
    assert_eq!(
        crate::limits::rejected(&ingest, "invalid"),
        invalid,
        "{ingest}"
    );
    assert_eq!(
        crate::limits::rejected(&ingest, "undecodable"),
        4,
        "{ingest}"
    );
    assert_eq!(
        crate::limits::rejected(&ingest, "protocol_violation"),
        2,
        "{ingest}"
    );
    // The 256 MiB CONNECT never named a device: a refused connection.
    assert_eq!(crate::limits::refused(&ingest, "protocol"), 1, "{ingest}");
    let attacker = gw.get("/devices/mallory").await;
    // Its refused messages and its two closed connections.
    assert_eq!(
        attacker["counters"]["rejected"],
        invalid + 4 + 2,
        "{attacker}"
    );
    assert_eq!(attacker["counters"]["telemetry"], POISON, "{attacker}");
    assert_eq!(attacker["counters"]["duplicates"], 1, "{attacker}");
    assert_eq!(attacker["counters"]["lost"], 0, "{attacker}");

    // The honest devices lost nothing and were refused nothing.
    for c in &honest {
        let d = gw.get(&format!("/devices/{}", c.id)).await;
        assert_eq!(
            (
                d["counters"]["telemetry"].as_u64(),
                d["counters"]["rejected"].as_u64(),
                d["counters"]["lost"].as_u64()
            ),
            (Some(MESSAGES), Some(0), Some(0)),
            "{d}"
        );
    }

    // The attacker held at most its share of each window: no drift, on any feature.
    let drift = gw.get("/drift/sim-model/1.0.0").await;
    let history = gw.get("/drift/sim-model/1.0.0/history?limit=1000").await;
    assert!(history.as_array().unwrap().len() >= 5, "{history}");
    for f in drift["features"].as_array().unwrap() {
        assert_ne!(f["status"], "alert", "{drift}");
    }
    assert_eq!(
        crate::drift::drift_alerts(&gw.get("/alerts").await),
        Vec::<serde_json::Value>::new()
    );
    let mut judged = 0;
    for w in history.as_array().unwrap() {
        for f in w["features"].as_array().unwrap() {
            if f["verdict"] == "insufficient" {
                continue;
            }
            judged += 1;
            assert!(f["psi"].as_f64().unwrap() < 0.1, "{w}");
        }
    }
    assert!(judged >= 10, "{history}");

    let grown = rss_after.saturating_sub(rss_before);
    assert!(
        grown < 5 << 20,
        "resident memory grew {} KiB during the attack",
        grown >> 10
    );
    gw.stop().await;
}
