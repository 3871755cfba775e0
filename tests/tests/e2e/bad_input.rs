//! Malformed input is rejected, counted per reason, and ingest goes on.

use std::time::Duration;

use rumqttc::{Packet, QoS};
use tests::TestGateway;
use tests::device::{await_acks, connect, next_incoming};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_counted_and_do_not_stop_ingest() {
    let gw = TestGateway::start().await;
    let cred = gw.enroll("bad-1").await;
    let (client, mut events) = connect(gw.mqtt_port(), "bad-1", &cred.secret)
        .await
        .unwrap();
    let sends: [(&str, &[u8]); 10] = [
        ("fg/bad-1/telemetry/json", br#"{"seq": 1}"#),
        (
            "fg/bad-1/telemetry",
            &[0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ),
        ("fg/bad-1/telemetry", &[0x09, 0x01]),
        ("fg/bad-1/telemetry/json", br#"{"seq": "one"}"#),
        (
            "fg/bad-1/telemetry/json",
            br#"{"seq": 3, "hw": {"cpu_pct": 400}}"#,
        ),
        ("fg/bad-1/whatever", br#"{"seq": 9}"#),
        ("devices/bad-1/telemetry", br#"{"seq": 9}"#),
        ("fg/bad-1/telemetry/json", br#"{"seq": 2}"#),
        (
            "fg/bad-1/log/json",
            b"{\"level\": \"info\", \"text\": \"bell \\u0007\"}",
        ),
        ("fg/bad-1/telemetry/json", br#"{"seq": 3}"#),
    ];
    for (topic, payload) in sends {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
    }
    // All acknowledged on one connection: bad input does not end it.
    await_acks(&mut events, sends.len()).await;

    // A packet over mqtt.max_packet_bytes ends that connection; the device reconnects and
    // carries on.
    let (big, mut big_events) = connect(gw.mqtt_port(), "bad-1", &cred.secret)
        .await
        .unwrap();
    big.publish(
        "fg/bad-1/telemetry",
        QoS::AtLeastOnce,
        false,
        vec![0u8; 100_000],
    )
    .await
    .unwrap();
    loop {
        match next_incoming(&mut big_events, Duration::from_secs(10)).await {
            Some(Packet::PubAck(_)) => panic!("an oversized publish was acknowledged"),
            Some(_) => {}
            None => break,
        }
    }
    let (again, mut again_events) = connect(gw.mqtt_port(), "bad-1", &cred.secret)
        .await
        .unwrap();
    again
        .publish(
            "fg/bad-1/telemetry/json",
            QoS::AtLeastOnce,
            false,
            br#"{"seq": 4}"#.to_vec(),
        )
        .await
        .unwrap();
    await_acks(&mut again_events, 1).await;
    gw.sync().await;

    let ingest = gw.get("/ingest").await;
    let r = &ingest["rejected"];
    assert_eq!(
        (
            r["undecodable"].as_u64(),
            r["invalid"].as_u64(),
            r["bad_topic"].as_u64(),
            r["oversized"].as_u64()
        ),
        (Some(3), Some(2), Some(2), Some(1)),
        "{ingest}"
    );
    assert_eq!(
        (
            r["not_permitted"].as_u64(),
            r["malformed"].as_u64(),
            r["unknown_device"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(ingest["stored"]["telemetry"], 4);
    let d = gw.get("/devices/bad-1").await;
    assert_eq!(d["counters"]["telemetry"], 4);
    assert_eq!(d["counters"]["rejected"], 8);
    assert_eq!(d["counters"]["lost"], 0, "seq 1..4 all arrived");
    let seqs: Vec<u64> = gw
        .get("/devices/bad-1/telemetry")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [4, 3, 2, 1]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_wrong_and_silent_clients_are_refused() {
    let gw = TestGateway::start().await;
    let cred = gw.enroll("ok-1").await;
    assert!(connect(gw.mqtt_port(), "ghost", "whatever").await.is_err());
    assert!(connect(gw.mqtt_port(), "ok-1", "wrong").await.is_err());
    // Not MQTT at all, and a connection that never sends CONNECT.
    let mut http = tokio::net::TcpStream::connect(("127.0.0.1", gw.mqtt_port()))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut http, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let silent = tokio::net::TcpStream::connect(("127.0.0.1", gw.mqtt_port()))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    // The gateway closes both: the first at once, the silent one after connect_timeout (2 s).
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut http, &mut buf),
    )
    .await
    .unwrap()
    .unwrap_or(0);
    assert_eq!(n, 0);
    let mut silent = silent;
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .unwrap()
    .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(connect(gw.mqtt_port(), "ok-1", &cred.secret).await.is_ok());
    let refused = gw.get("/ingest").await["mqtt"]["refused"].clone();
    assert_eq!(
        (
            refused["bad_credentials"].as_u64(),
            refused["protocol"].as_u64(),
            refused["connect_timeout"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{refused}"
    );
    gw.stop().await;
}
