use std::time::Duration;

use super::*;
use crate::ingest::WriterMsg;

/// The broker's plumbing: a device message queued on the uplink reaches the storage writer's
/// queue through the router, behind it a flush marker; a command published for a device
/// reaches that device's session (and no other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_through_the_router_both_ways() {
    let cfg = fleetgate_config::Config::default();
    let (writer_tx, writer_rx, _control, _control_rx) = crate::ingest::channels(&cfg);
    let sessions = Arc::new(Sessions::default());
    let mut d1 = sessions.claim("d1").await;
    let mut d2 = sessions.claim("d2").await;
    let (mut d1_rx, mut d2_rx) = (d1.direct.take().unwrap(), d2.direct.take().unwrap());
    let mqtt = cfg.mqtt.clone();
    let s = sessions.clone();
    let broker = tokio::task::spawn_blocking(move || Broker::start(&mqtt, writer_tx, s))
        .await
        .unwrap()
        .unwrap();

    broker
        .uplink()
        .send(
            Bytes::from(policy::uplink("d1", "fg/d1/telemetry").unwrap().1),
            Bytes::from_static(b"reading"),
        )
        .await
        .unwrap();
    broker.uplink().flush_marker(7).await.unwrap();
    let recv = |rx: flume::Receiver<WriterMsg>| async move {
        tokio::time::timeout(Duration::from_secs(5), rx.recv_async())
            .await
            .expect("in time")
            .expect("open")
    };
    match recv(writer_rx.clone()).await {
        WriterMsg::Uplink(m) => {
            assert_eq!(
                (m.device.as_str(), m.channel, &m.payload[..]),
                ("d1", fleetgate_protocol::Uplink::Telemetry, &b"reading"[..])
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(recv(writer_rx).await, WriterMsg::FlushMarker(7)));

    broker
        .downlink()
        .send_async("d2", Downlink::Command, Encoding::Json, b"{}".to_vec())
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), d2_rx.recv())
        .await
        .expect("in time")
        .expect("open");
    assert_eq!(
        (msg.channel, msg.encoding, &msg.payload[..], msg.qos),
        (Downlink::Command, Encoding::Json, &b"{}"[..], 1)
    );
    assert!(d1_rx.try_recv().is_err(), "d1 got nothing");
}
