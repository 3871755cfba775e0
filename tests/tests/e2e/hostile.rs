//! A device holding valid credentials tries to act as another device: publish on its topics,
//! read its commands, take over its identity. None of it gets through, every attempt is
//! refused with a proper MQTT code and counted, and the other device is unaffected.

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
