//! Hostile load on the MQTT front: stalled connections, a flooding device, oversize messages,
//! TLS clients and connection storms from one address. Each is refused or slowed down where it
//! comes from, counted exactly, and the other devices go on as if nothing happened.

use std::time::Duration;

use fleetgate_config::Config;
use rumqttc::QoS;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};
use serde_json::{Value, json};
use tests::device::{await_acks, connect, connect_tls, tls_transport};
use tests::{TestGateway, config, with_tls};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Starts a gateway on the test config as changed by `change`.
async fn start(change: impl FnOnce(&mut Config)) -> TestGateway {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    change(&mut c);
    TestGateway::start_with(c, Some(tmp)).await
}

/// An MQTT 5 client for `id` (over TLS when `tls` names the CA file to trust); its incoming
/// packets arrive on the returned channel.
pub(crate) async fn connect_v5(
    port: u16,
    id: &str,
    secret: &str,
    tls: Option<&std::path::Path>,
) -> (Client5, mpsc::UnboundedReceiver<P5>) {
    let mut opts = Options5::new(id, "127.0.0.1", port);
    opts.set_credentials(id, secret);
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some(ca) = tls {
        opts.set_transport(tls_transport(ca));
    }
    let (client, mut events) = Client5::new(opts, 256);
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event5::Incoming(p) = event
                && tx.send(p).is_err()
            {
                break;
            }
        }
    });
    let connack = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    assert!(
        matches!(connack, Ok(Some(P5::ConnAck(_)))),
        "{id}: {connack:?}"
    );
    (client, rx)
}

/// The reason codes of the next `n` PUBACKs.
pub(crate) async fn pubacks(rx: &mut mpsc::UnboundedReceiver<P5>, n: usize) -> Vec<PubAckReason> {
    let mut reasons = Vec::with_capacity(n);
    while reasons.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(P5::PubAck(ack))) => reasons.push(ack.reason),
            Ok(Some(_)) => {}
            _ => panic!("{} of {n} PUBACKs", reasons.len()),
        }
    }
    reasons
}

/// Polls `/ingest` until `done` holds for it (20 s at most) and returns it.
async fn ingest_when(gw: &TestGateway, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ingest = gw.get("/ingest").await;
        if done(&ingest) || Instant::now() > deadline {
            return ingest;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn refused(ingest: &Value, reason: &str) -> u64 {
    ingest["mqtt"]["refused"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no refusal count {reason:?} in {ingest}"))
}

pub(crate) fn rejected(ingest: &Value, reason: &str) -> u64 {
    ingest["rejected"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no reject count {reason:?} in {ingest}"))
}

fn telemetry(seq: u64) -> Vec<u8> {
    json!({ "seq": seq, "hw": { "temp_c": 40.0 } })
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_do_not_delay_a_device_and_time_out_on_their_own() {
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    let gw = start(|c| {
        c.mqtt.connect_timeout = CONNECT_TIMEOUT;
        with_tls(c);
    })
    .await;
    let cred = gw.enroll("steady-1").await;
    let tls_cred = gw.enroll("steady-tls").await;

    // 100 connections that never send CONNECT, and 20 that never send a TLS ClientHello.
    let opened = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..100 {
        stalled.push(
            TcpStream::connect(("127.0.0.1", gw.mqtt_port()))
                .await
                .unwrap(),
        );
    }
    for _ in 0..20 {
        stalled.push(
            TcpStream::connect(("127.0.0.1", gw.mqtt_tls_port()))
                .await
                .unwrap(),
        );
    }

    // A device gets its CONNACK long before the stalled ones time out, on either listener.
    let fast = Duration::from_secs(2);
    let (client, mut events) =
        tokio::time::timeout(fast, connect(gw.mqtt_port(), "steady-1", &cred.secret))
            .await
            .expect("CONNACK within 2 s while 120 connections stall")
            .unwrap();
    let (tls_client, mut tls_events) = tokio::time::timeout(
        fast,
        connect_tls(
            gw.mqtt_tls_port(),
            "steady-tls",
            &tls_cred.secret,
            &gw.tls_cert(),
        ),
    )
    .await
    .expect("TLS CONNACK within 2 s while 120 connections stall")
    .unwrap();
    client
        .publish(
            "fg/steady-1/telemetry/json",
            QoS::AtLeastOnce,
            false,
            telemetry(1),
        )
        .await
        .unwrap();
    tls_client
        .publish(
            "fg/steady-tls/telemetry/json",
            QoS::AtLeastOnce,
            false,
            telemetry(1),
        )
        .await
        .unwrap();
    await_acks(&mut events, 1).await;
    await_acks(&mut tls_events, 1).await;
    assert!(
        opened.elapsed() < CONNECT_TIMEOUT,
        "the devices were served while the stalled connections were all open"
    );
    assert_eq!(refused(&gw.get("/ingest").await, "connect_timeout"), 0);

    // Each stalled connection is closed by the gateway, not before its timeout.
    for mut s in stalled {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout_at(
            opened + CONNECT_TIMEOUT + Duration::from_secs(20),
            s.read(&mut buf),
        )
        .await
        .expect("the gateway closes a stalled connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(opened.elapsed() >= CONNECT_TIMEOUT);
    let ingest = ingest_when(&gw, |i| refused(i, "connect_timeout") >= 120).await;
    assert_eq!(
        (
            refused(&ingest, "connect_timeout"),
            refused(&ingest, "tls_handshake"),
            refused(&ingest, "protocol"),
            refused(&ingest, "rate_limited"),
        ),
        (120, 0, 0, 0),
        "{ingest}"
    );
    gw.sync().await;
    let ingest = gw.get("/ingest").await;
    assert_eq!(ingest["stored"]["telemetry"], 2, "{ingest}");
    assert_eq!(ingest["mqtt"]["connects"], 2, "{ingest}");
    gw.stop().await;
}

/// Publishes `n` QoS 1 telemetry messages as fast as the client's in-flight window allows and
/// returns the reason codes of their PUBACKs and the time until the last one.
async fn burst_v5(
    client: &Client5,
    rx: &mut mpsc::UnboundedReceiver<P5>,
    id: &str,
    seqs: std::ops::RangeInclusive<u64>,
) -> (Vec<PubAckReason>, Duration) {
    let start = Instant::now();
    let topic = format!("fg/{id}/telemetry/json");
    let n = seqs.clone().count();
    let publish = async {
        for seq in seqs {
            client
                .publish(&topic, Q5::AtLeastOnce, false, telemetry(seq))
                .await
                .unwrap();
        }
    };
    let (reasons, ()) = tokio::join!(pubacks(rx, n), publish);
    (reasons, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_slowed_to_its_rate_and_nobody_loses_anything() {
    const RATE: f64 = 200.0;
    const BURST: u64 = 50;
    const N: u64 = 450;
    const GOOD: u64 = 30;
    let gw = start(|c| {
        c.limits.device_messages_per_second = RATE;
        c.limits.device_burst = BURST as u32;
    })
    .await;
    let v5 = gw.enroll("flood-5").await;
    let v3 = gw.enroll("flood-3").await;
    let mut good = Vec::new();
    for i in 0..5 {
        good.push(gw.enroll(&format!("good-{i}")).await);
    }
    let port = gw.mqtt_port();

    let flood_v5 = async {
        let (client, mut rx) = connect_v5(port, "flood-5", &v5.secret, None).await;
        burst_v5(&client, &mut rx, "flood-5", 1..=N).await
    };
    // MQTT 3.1.1 has no way to refuse a publish; it is slowed exactly the same.
    let flood_v3 = async {
        let (client, mut events) = connect(port, "flood-3", &v3.secret).await.unwrap();
        let start = Instant::now();
        let publish = async {
            for seq in 1..=N {
                client
                    .publish(
                        "fg/flood-3/telemetry/json",
                        QoS::AtLeastOnce,
                        false,
                        telemetry(seq),
                    )
                    .await
                    .unwrap();
            }
        };
        tokio::join!(await_acks(&mut events, N as usize), publish);
        start.elapsed()
    };
    let well_behaved: Vec<_> = good
        .iter()
        .cloned()
        .map(|cred| {
            tokio::spawn(async move {
                let (client, mut events) = connect(port, &cred.id, &cred.secret).await.unwrap();
                let topic = format!("fg/{}/telemetry/json", cred.id);
                // 10 per second, a twentieth of the limit.
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                for seq in 1..=GOOD {
                    tick.tick().await;
                    client
                        .publish(&topic, QoS::AtLeastOnce, false, telemetry(seq))
                        .await
                        .unwrap();
                }
                await_acks(&mut events, GOOD as usize).await;
            })
        })
        .collect();
    let ((reasons, took_v5), took_v3) = tokio::join!(flood_v5, flood_v3);
    for device in well_behaved {
        device.await.unwrap();
    }
    gw.sync().await;

    assert_eq!(
        reasons,
        vec![PubAckReason::Success; N as usize],
        "every publish was taken"
    );
    // The bucket allows BURST at once and RATE a second after: no faster than that.
    let least = Duration::from_secs_f64((N - BURST - 1) as f64 / RATE);
    for (version, took) in [("v5", took_v5), ("v3.1.1", took_v3)] {
        assert!(
            took >= least,
            "{version}: {N} acknowledged in {took:?}, under {least:?}"
        );
    }
    for id in ["flood-5", "flood-3"] {
        let d = gw.get(&format!("/devices/{id}")).await;
        assert_eq!(
            (
                &d["counters"]["telemetry"],
                &d["counters"]["lost"],
                &d["counters"]["rejected"]
            ),
            (&json!(N), &json!(0), &json!(0)),
            "{id}: {d}"
        );
    }
    for cred in &good {
        let d = gw.get(&format!("/devices/{}", cred.id)).await;
        assert_eq!(
            (&d["counters"]["telemetry"], &d["counters"]["rejected"]),
            (&json!(GOOD), &json!(0)),
            "{}: {d}",
            cred.id
        );
    }
    let ingest = gw.get("/ingest").await;
    assert_eq!(
        ingest["stored"]["telemetry"].as_u64(),
        Some(2 * N + 5 * GOOD),
        "{ingest}"
    );
    let delayed = gw.gateway().metrics.publishes_delayed.get();
    assert!(delayed >= 2 * (N - BURST) / 2, "held back {delayed} times");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_refused_on_every_channel_and_the_next_one_is_stored() {
    let gw = start(|c| {
        let max = &mut c.limits.max_message_bytes;
        (
            max.hello,
            max.telemetry,
            max.alert,
            max.log,
            max.ack,
            max.report,
        ) = (200, 100, 120, 80, 64, 80);
    })
    .await;
    let cred = gw.enroll("big-1").await;
    let (client, mut rx) = connect_v5(gw.mqtt_port(), "big-1", &cred.secret, None).await;

    // A telemetry message of exactly the limit is fine; one byte more is not.
    let mut at_limit = br#"{"seq": 1}"#.to_vec();
    at_limit.splice(9..9, std::iter::repeat_n(b' ', 100 - at_limit.len()));
    assert_eq!(at_limit.len(), 100);
    let normal: [(&str, Vec<u8>, usize); 6] = [
        (
            "hello",
            br#"{"firmware": {"name": "fw", "version": "1.0.0"}, "hardware": {"arch": "a", "class": "c", "ram_bytes": 1, "flash_bytes": 1}}"#.to_vec(),
            200,
        ),
        ("telemetry", at_limit, 100),
        ("alert", br#"{"kind": "thermal", "severity": "critical", "value": 91.5}"#.to_vec(), 120),
        ("log", br#"{"level": "warn", "text": "I2C retry"}"#.to_vec(), 80),
        ("ack", br#"{"id": 999, "status": "done"}"#.to_vec(), 64),
        ("report", br#"{"transfer": 999, "state": {"downloading": {"next_chunk": 1}}}"#.to_vec(), 80),
    ];
    for (channel, payload, limit) in &normal {
        let topic = format!("fg/big-1/{channel}/json");
        assert!(payload.len() <= *limit, "{channel}");
        client
            .publish(&topic, Q5::AtLeastOnce, false, vec![b' '; limit + 1])
            .await
            .unwrap();
        client
            .publish(&topic, Q5::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        // The ack and report name a command and a transfer that do not exist: past the front,
        // the writer refuses them.
        let second = match *channel {
            "ack" | "report" => PubAckReason::UnspecifiedError,
            _ => PubAckReason::Success,
        };
        assert_eq!(
            pubacks(&mut rx, 2).await,
            [PubAckReason::ImplementationSpecificError, second],
            "{channel}"
        );
    }

    // MQTT 3.1.1 cannot refuse a publish: the oversize one is acknowledged (QoS 1) or not
    // (QoS 0), and dropped all the same.
    let cred3 = gw.enroll("big-3").await;
    let (c3, mut e3) = connect(gw.mqtt_port(), "big-3", &cred3.secret)
        .await
        .unwrap();
    let topic = "fg/big-3/telemetry/json";
    c3.publish(topic, QoS::AtLeastOnce, false, vec![b' '; 101])
        .await
        .unwrap();
    c3.publish(topic, QoS::AtMostOnce, false, vec![b' '; 500])
        .await
        .unwrap();
    c3.publish(topic, QoS::AtLeastOnce, false, telemetry(1))
        .await
        .unwrap();
    await_acks(&mut e3, 2).await;
    gw.sync().await;

    let ingest = gw.get("/ingest").await;
    assert_eq!(rejected(&ingest, "too_large"), 6 + 2, "{ingest}");
    assert_eq!(
        (
            rejected(&ingest, "unknown_command"),
            rejected(&ingest, "unknown_transfer"),
            rejected(&ingest, "undecodable"),
            rejected(&ingest, "oversized"),
        ),
        (1, 1, 0, 0),
        "the normal ack and report got past the front: {ingest}"
    );
    let stored = &ingest["stored"];
    assert_eq!(
        [
            &stored["hello"],
            &stored["telemetry"],
            &stored["alert"],
            &stored["log"]
        ],
        [&json!(1), &json!(2), &json!(1), &json!(1)],
        "{ingest}"
    );
    assert_eq!(
        gw.get("/devices/big-1").await["counters"]["rejected"],
        6 + 2
    );
    let big3 = gw.get("/devices/big-3").await;
    assert_eq!(
        (
            &big3["counters"]["rejected"],
            &big3["counters"]["telemetry"]
        ),
        (&json!(2), &json!(1)),
        "{big3}"
    );
    assert_eq!(ingest["mqtt"]["connects"], 2, "the connections stayed up");
    gw.stop().await;
}

/// Connects `tls-1` over TLS, trusting `ca`, and publishes telemetry `seq` at QoS 1 (acked).
async fn tls_telemetry(gw: &TestGateway, secret: &str, ca: &std::path::Path, seq: u64) {
    let (client, mut events) = connect_tls(gw.mqtt_tls_port(), "tls-1", secret, ca)
        .await
        .unwrap();
    client
        .publish(
            "fg/tls-1/telemetry/json",
            QoS::AtLeastOnce,
            false,
            telemetry(seq),
        )
        .await
        .unwrap();
    await_acks(&mut events, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_device_publishes_with_its_credential_and_the_certificate_is_kept() {
    let gw = start(with_tls).await;
    let cred = gw.enroll("tls-1").await;
    let ca = gw.tls_cert();
    let pem = std::fs::read(&ca).unwrap();

    tls_telemetry(&gw, &cred.secret, &ca, 1).await;
    // An MQTT 5 device over TLS too.
    let (c5, mut rx5) = connect_v5(gw.mqtt_tls_port(), "tls-1", &cred.secret, Some(&ca)).await;
    c5.publish(
        "fg/tls-1/telemetry/json",
        Q5::AtLeastOnce,
        false,
        telemetry(2),
    )
    .await
    .unwrap();
    assert_eq!(pubacks(&mut rx5, 1).await, [PubAckReason::Success]);

    // TLS is no credential: a wrong one is refused like on the plain listener.
    let wrong = connect_tls(gw.mqtt_tls_port(), "tls-1", "wrong", &ca).await;
    assert!(wrong.is_err(), "{:?}", wrong.map(|_| ()));
    // A client that does not trust the gateway's certificate gives up in the handshake.
    let other = tempfile::tempdir().unwrap();
    let stranger = other.path().join("stranger.pem");
    std::fs::write(&stranger, another_gateways_cert()).unwrap();
    assert!(
        connect_tls(gw.mqtt_tls_port(), "tls-1", &cred.secret, &stranger)
            .await
            .is_err()
    );
    gw.sync().await;
    let ingest = ingest_when(&gw, |i| refused(i, "tls_handshake") >= 1).await;
    assert_eq!(
        (
            refused(&ingest, "bad_credentials"),
            refused(&ingest, "tls_handshake"),
        ),
        (1, 1),
        "{ingest}"
    );
    let d = gw.get("/devices/tls-1").await;
    assert_eq!(d["counters"]["telemetry"], 2, "{d}");

    // A restart reuses the generated certificate, so devices keep trusting it.
    let dir = gw.stop().await.expect("temp dir");
    let mut c = config(dir.path());
    with_tls(&mut c);
    let gw = TestGateway::start_with(c, Some(dir)).await;
    assert_eq!(std::fs::read(gw.tls_cert()).unwrap(), pem);
    tls_telemetry(&gw, &cred.secret, &ca, 3).await;
    gw.sync().await;
    assert_eq!(gw.get("/devices/tls-1").await["counters"]["telemetry"], 3);
    gw.stop().await;
}

/// The self-signed certificate another gateway would generate: valid, but not the one under test.
fn another_gateways_cert() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    with_tls(&mut c);
    let tls = c.mqtt.tls.unwrap();
    fleetgate::broker::tls::acceptor(&tls, dir.path()).expect("a second certificate");
    std::fs::read(
        dir.path()
            .join(fleetgate::broker::tls::DIR)
            .join(fleetgate::broker::tls::CERT_FILE),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_its_burst_of_connections_and_no_more() {
    let gw = start(|c| {
        // One new connection per 1000 s: nothing refills while the test runs.
        c.mqtt.per_source_connects_per_second = 0.001;
        c.mqtt.per_source_burst = 5;
        with_tls(c);
    })
    .await;
    let mut creds = Vec::new();
    for i in 0..8 {
        creds.push(gw.enroll(&format!("src-{i}")).await);
    }
    let (port, tls_port, ca) = (gw.mqtt_port(), gw.mqtt_tls_port(), gw.tls_cert());
    // The burst, shared by both listeners: four plain connections and one over TLS.
    let mut kept = Vec::new();
    for c in &creds[..4] {
        kept.push(
            connect(port, &c.id, &c.secret)
                .await
                .expect("within the burst"),
        );
    }
    kept.push(
        connect_tls(tls_port, &creds[4].id, &creds[4].secret, &ca)
            .await
            .expect("within the burst"),
    );
    // Beyond it, closed before the CONNECT is read, on either listener.
    for c in &creds[5..7] {
        assert!(connect(port, &c.id, &c.secret).await.is_err(), "{}", c.id);
    }
    assert!(
        connect_tls(tls_port, &creds[7].id, &creds[7].secret, &ca)
            .await
            .is_err()
    );
    // The five admitted devices are unaffected.
    for ((client, events), cred) in kept.iter_mut().zip(&creds) {
        let topic = format!("fg/{}/telemetry/json", cred.id);
        client
            .publish(topic, QoS::AtLeastOnce, false, telemetry(1))
            .await
            .unwrap();
        await_acks(events, 1).await;
    }
    gw.sync().await;
    let ingest = gw.get("/ingest").await;
    assert_eq!(
        (
            refused(&ingest, "rate_limited"),
            ingest["mqtt"]["connects"].as_u64(),
            ingest["mqtt"]["connected_devices"].as_u64(),
            ingest["stored"]["telemetry"].as_u64(),
        ),
        (3, Some(5), Some(5), Some(5)),
        "{ingest}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_buy_a_device_a_new_burst() {
    const RATE: f64 = 4.0;
    const BURST: u64 = 5;
    let gw = start(|c| {
        c.limits.device_messages_per_second = RATE;
        c.limits.device_burst = BURST as u32;
    })
    .await;
    let cred = gw.enroll("again-1").await;
    let (client, mut rx) = connect_v5(gw.mqtt_port(), "again-1", &cred.secret, None).await;
    let (reasons, _) = burst_v5(&client, &mut rx, "again-1", 1..=BURST).await;
    assert_eq!(reasons, vec![PubAckReason::Success; BURST as usize]);
    // The bucket is empty from here.
    let emptied = Instant::now();
    assert_eq!(gw.gateway().metrics.publishes_delayed.get(), 0);
    client.disconnect().await.unwrap();

    // The next session starts with the bucket the last one left: its burst is paced at RATE,
    // from the moment the first session emptied the bucket.
    let (client, mut rx) = connect_v5(gw.mqtt_port(), "again-1", &cred.secret, None).await;
    let (reasons, _) = burst_v5(&client, &mut rx, "again-1", BURST + 1..=2 * BURST).await;
    let took = emptied.elapsed();
    assert_eq!(reasons, vec![PubAckReason::Success; BURST as usize]);
    // BURST tokens take BURST / RATE to come back; the first may have come back before the
    // last PUBACK of the first session reached the client.
    let least = Duration::from_secs_f64((BURST - 1) as f64 / RATE);
    assert!(took >= least, "a second burst of {BURST} in {took:?}");
    assert!(gw.gateway().metrics.publishes_delayed.get() > 0);
    gw.sync().await;
    let d = gw.get("/devices/again-1").await;
    assert_eq!(
        (&d["counters"]["telemetry"], &d["counters"]["rejected"]),
        (&json!(2 * BURST), &json!(0)),
        "{d}"
    );
    gw.stop().await;
}

/// The send queue of the TCP connection from local port `local` to remote port `remote`, as
/// the kernel reports it (`/proc/net/tcp`): bytes written and not yet taken by the peer.
fn tcp_send_queue(local: u16, remote: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if port(f.get(1)?)? != local || port(f.get(2)?)? != remote {
            return None;
        }
        u64::from_str_radix(f.get(4)?.split(':').next()?, 16).ok()
    })
}

type TlsRead = tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>;

/// A device over TLS that connects, says hello, and then never reads again while it sends
/// PINGREQs as fast as it can: a socket with a tiny receive buffer, so the gateway's answers
/// soon have nowhere to go. Returns the read half (never read until the end) and the local port.
async fn stuck_tls_device(gw: &TestGateway, id: &str, secret: &str) -> (TlsRead, u16) {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::AsyncWriteExt;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(gw.tls_cert()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket
        .connect(([127, 0, 0, 1], gw.mqtt_tls_port()).into())
        .await
        .unwrap();
    let local = tcp.local_addr().unwrap().port();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    // CONNECT (3.1.1, clean session, keep alive 300 s).
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 1, 44];
    for field in [id, id, secret] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    stream.write_all(&out).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let (read, mut write) = tokio::io::split(stream);
    // PINGREQs, 4 MB of them: the answers fill the device's window and then the gateway's send
    // buffer, the session blocks writing and stops reading, and these stop going out. The write
    // fails when the gateway closes the connection.
    tokio::spawn(async move {
        let pings = [0xc0u8, 0].repeat(2_000_000);
        let _ = write.write_all(&pings).await;
    });
    (read, local)
}

/// Waits (30 s at most) until the device's own PINGREQs pile up unread in its send queue: the
/// gateway stopped reading because its session is blocked writing answers the device does not
/// read.
async fn stuck(gw: &TestGateway, id: &str, device_port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tcp_send_queue(device_port, gw.mqtt_tls_port()).unwrap_or(0) < 256 * 1024 {
        assert!(
            Instant::now() < deadline,
            "{id}: {:?} bytes unread by the gateway, {:?} unread by the device",
            tcp_send_queue(device_port, gw.mqtt_tls_port()),
            tcp_send_queue(gw.mqtt_tls_port(), device_port)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads what the gateway had sent until it closes the connection (10 s at most: sessions give
/// up on a device that does not read after 30 s, so this is the kick at work).
async fn closed_by_gateway(stream: &mut TlsRead) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "still open after 10 s ({} bytes read)",
        rest.len()
    );
}

/// Issue 12, defect 9: a TLS session whose device stopped reading was never closed (no timeout
/// on the close); the takeover fallback then dropped the map entry of whichever session held
/// it, leaving two sessions for one id, and the orphan could not be kicked on revoke. Here two
/// devices shut their TCP window and flood PINGREQs until the gateway stops reading them: a
/// new connection of one takes over within seconds, a revoke ends the other at once, and the
/// gateway never counts two sessions of one device. (The in-memory guarantees are unit-tested:
/// `a_session_that_does_not_end_is_never_run_beside_a_new_one`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_device_that_stops_reading_is_taken_over_and_revoked_in_bounded_time() {
    let gw = start(with_tls).await;
    let a = gw.enroll("stuck-a").await;
    let b = gw.enroll("stuck-b").await;
    let (mut stream_a, port_a) = stuck_tls_device(&gw, "stuck-a", &a.secret).await;
    let (mut stream_b, port_b) = stuck_tls_device(&gw, "stuck-b", &b.secret).await;
    stuck(&gw, "stuck-a", port_a).await;
    stuck(&gw, "stuck-b", port_b).await;
    assert_eq!(gw.get("/ingest").await["mqtt"]["connected_devices"], 2);

    // The device comes back on a new connection: the stuck session is closed and the new one
    // accepted; one session for the device, never two.
    let (c, mut events) = tokio::time::timeout(
        Duration::from_secs(10),
        connect_tls(gw.mqtt_tls_port(), "stuck-a", &a.secret, &gw.tls_cert()),
    )
    .await
    .expect("a CONNACK within 10 s")
    .expect("accepted");
    closed_by_gateway(&mut stream_a).await;
    c.publish(
        "fg/stuck-a/telemetry/json",
        QoS::AtLeastOnce,
        false,
        telemetry(1),
    )
    .await
    .unwrap();
    await_acks(&mut events, 1).await;
    assert_eq!(gw.get("/ingest").await["mqtt"]["connected_devices"], 2);

    // Revoking the other, still stuck, ends its session at once.
    gw.delete("/devices/stuck-b").await;
    closed_by_gateway(&mut stream_b).await;
    let ingest = ingest_when(&gw, |i| i["mqtt"]["connected_devices"] == 1).await;
    assert_eq!(ingest["mqtt"]["connected_devices"], 1, "{ingest}");
    assert_eq!(refused(&ingest, "takeover_timeout"), 0, "{ingest}");
    gw.stop().await;
}
