//! What an acknowledgement promises: a PUBACK is sent only once the message is committed, with
//! the writer's verdict as its MQTT 5 reason code; a burst larger than every queue on the way
//! slows the devices down and loses nothing.

use std::time::Duration;

use fleetgate_config::Config;
use rumqttc::QoS;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};
use serde_json::json;
use tests::device::{await_acks, connect};
use tests::{TestGateway, config};
use tokio::sync::mpsc;

async fn start(change: impl FnOnce(&mut Config)) -> TestGateway {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    change(&mut c);
    TestGateway::start_with(c, Some(tmp)).await
}

async fn connect_v5(port: u16, id: &str, secret: &str) -> (Client5, mpsc::UnboundedReceiver<P5>) {
    let mut opts = Options5::new(id, "127.0.0.1", port);
    opts.set_credentials(id, secret);
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

async fn next_puback(rx: &mut mpsc::UnboundedReceiver<P5>) -> PubAckReason {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(P5::PubAck(ack))) => return ack.reason,
            Ok(Some(_)) => {}
            other => panic!("no PUBACK: {other:?}"),
        }
    }
}

fn telemetry(seq: u64) -> String {
    json!({ "seq": seq, "hw": { "temp_c": 40.0 } }).to_string()
}

/// The moment a device holds a PUBACK, the message is in storage: read straight after each
/// acknowledgement, without waiting for anything, it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_message_is_already_stored() {
    let gw = TestGateway::start().await;
    let cred = gw.enroll("acked-1").await;
    let (client, mut rx) = connect_v5(gw.mqtt_port(), "acked-1", &cred.secret).await;
    for seq in 1..=20u64 {
        client
            .publish(
                "fg/acked-1/telemetry/json",
                Q5::AtLeastOnce,
                false,
                telemetry(seq),
            )
            .await
            .unwrap();
        assert_eq!(next_puback(&mut rx).await, PubAckReason::Success);
        let rows = gw.get("/devices/acked-1/telemetry?limit=1").await;
        assert_eq!(
            rows[0]["seq"], seq,
            "PUBACK {seq} came before its commit: {rows}"
        );
    }
    gw.stop().await;
}

/// A payload the gateway cannot take is refused in the PUBACK (MQTT 5 0x99, "payload format
/// invalid"), so that the device maker sees it; the next good one is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_payload_is_refused_in_its_puback() {
    let gw = TestGateway::start().await;
    let cred = gw.enroll("typo-1").await;
    let (client, mut rx) = connect_v5(gw.mqtt_port(), "typo-1", &cred.secret).await;
    let topic = "fg/typo-1/telemetry/json";
    for (payload, want) in [
        (
            r#"{"seq": 1, "hw": {"temp": 40}}"#,
            PubAckReason::PayloadFormatInvalid,
        ),
        ("not json", PubAckReason::PayloadFormatInvalid),
        (r#"[{"seq": 2}]"#, PubAckReason::PayloadFormatInvalid),
        (r#"{"seq": 3, "hw": {"temp_c": 40}}"#, PubAckReason::Success),
    ] {
        client
            .publish(topic, Q5::AtLeastOnce, false, payload)
            .await
            .unwrap();
        assert_eq!(next_puback(&mut rx).await, want, "{payload}");
    }
    let d = gw.get("/devices/typo-1").await;
    assert_eq!(
        (&d["counters"]["telemetry"], &d["counters"]["rejected"]),
        (&json!(1), &json!(3)),
        "{d}"
    );
    gw.stop().await;
}

/// Devices flushing what they buffered while the site was offline: far more than the writer's
/// queue holds, in messages and in bytes. The sessions stop reading while the queue is full;
/// every message, acknowledged (QoS 1) or not (QoS 0), is stored, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_every_queue_is_slowed_and_stored_whole() {
    const DEVICES: usize = 20;
    const EACH: u64 = 300;
    let gw = start(|c| {
        c.ingest.queue = 16;
        c.ingest.queue_bytes = 64 << 10;
        c.ingest.batch = 8;
        c.limits.device_messages_per_second = 1e6;
        c.limits.device_burst = 1_000_000;
    })
    .await;
    let fleet = gw.enroll_fleet("burst", DEVICES).await;
    let port = gw.mqtt_port();
    let devices: Vec<_> = fleet
        .into_iter()
        .enumerate()
        .map(|(i, cred)| {
            tokio::spawn(async move {
                let (client, mut events) = connect(port, &cred.id, &cred.secret).await.unwrap();
                let topic = format!("fg/{}/telemetry/json", cred.id);
                // A quarter of the devices send at QoS 0: nothing to wait for, and still
                // nothing may be dropped.
                let qos = if i % 4 == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                let publish = async {
                    for seq in 1..=EACH {
                        client
                            .publish(&topic, qos, false, telemetry(seq))
                            .await
                            .unwrap();
                    }
                };
                if qos == QoS::AtLeastOnce {
                    tokio::join!(publish, await_acks(&mut events, EACH as usize));
                } else {
                    publish.await;
                    // A QoS 1 marker behind the QoS 0 burst: its PUBACK means all were read.
                    client
                        .publish(&topic, QoS::AtLeastOnce, false, telemetry(EACH + 1))
                        .await
                        .unwrap();
                    await_acks(&mut events, 1).await;
                }
            })
        })
        .collect();
    for d in devices {
        d.await.unwrap();
    }
    gw.sync().await;
    let qos0 = DEVICES.div_ceil(4) as u64;
    let ingest = gw.get("/ingest").await;
    assert_eq!(
        (
            ingest["stored"]["telemetry"].as_u64(),
            ingest["telemetry_lost"].as_i64()
        ),
        (Some(DEVICES as u64 * EACH + qos0), Some(0)),
        "{ingest}"
    );
    let full = gw.gateway().metrics.writer_queue_full.get();
    assert!(full > 0, "the burst never filled the writer's queue");
    gw.stop().await;
}

/// `GET /healthz`: status code and body.
async fn health(gw: &TestGateway) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = gw.http_url().trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// A crashed writer is a crashed gateway: once the storage writer's thread panics, the message
/// it was storing is never acknowledged, nor is anything a device sends afterwards, /healthz
/// answers 503 with the reason, and `Gateway::failed` resolves (on which `fleetgate serve`
/// exits non-zero, for systemd to restart it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_panics_acknowledges_nothing_more_fails_health_and_stops_the_gateway() {
    let gw = TestGateway::start().await;
    let one = gw.enroll("crash-1").await;
    let two = gw.enroll("crash-2").await;
    let (client, mut events) = connect(gw.mqtt_port(), "crash-1", &one.secret)
        .await
        .unwrap();
    let topic = "fg/crash-1/telemetry/json";
    client
        .publish(topic, QoS::AtLeastOnce, false, telemetry(1))
        .await
        .unwrap();
    await_acks(&mut events, 1).await;
    assert_eq!(
        health(&gw).await,
        (200, json!({ "status": "ok" })),
        "healthy before the crash"
    );

    gw.gateway().crash_writer_at_next_write();
    client
        .publish(topic, QoS::AtLeastOnce, false, telemetry(2))
        .await
        .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(10), gw.gateway().failed())
        .await
        .expect("the gateway notices within 10 s");
    assert_eq!(why, "the storage writer stopped");
    assert_eq!(
        health(&gw).await,
        (
            503,
            json!({ "status": "failing", "reason": "the storage writer has stopped" })
        )
    );
    // The writer is gone: no acknowledgement can come any more. None came for message 2.
    while let Some(p) = tests::device::next_incoming(&mut events, Duration::from_millis(500)).await
    {
        assert!(
            !matches!(p, rumqttc::Packet::PubAck(_)),
            "message 2 was acknowledged without a writer"
        );
    }
    // A device that connects now is not acknowledged either: its session ends at its publish.
    if let Ok((late, mut late_events)) = connect(gw.mqtt_port(), "crash-2", &two.secret).await {
        late.publish(
            "fg/crash-2/telemetry/json",
            QoS::AtLeastOnce,
            false,
            telemetry(1),
        )
        .await
        .unwrap();
        while let Some(p) =
            tests::device::next_incoming(&mut late_events, Duration::from_secs(2)).await
        {
            assert!(
                !matches!(p, rumqttc::Packet::PubAck(_)),
                "a publish after the crash was acknowledged"
            );
        }
    }
}
