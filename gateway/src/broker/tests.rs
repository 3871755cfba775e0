use std::time::Duration;

use fleetgate_protocol::{Downlink, Encoding};

use super::*;

/// The broker's plumbing: a command published for a device through the router reaches that
/// device's session, and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_flow_through_the_router_to_their_device_only() {
    let cfg = fleetgate_config::Config::default();
    let sessions = Arc::new(Sessions::default());
    let mut d1 = sessions.claim("d1").await.unwrap();
    let mut d2 = sessions.claim("d2").await.unwrap();
    let (mut d1_rx, mut d2_rx) = (d1.direct.take().unwrap(), d2.direct.take().unwrap());
    let mqtt = cfg.mqtt.clone();
    let s = sessions.clone();
    let broker = tokio::task::spawn_blocking(move || Broker::start(&mqtt, s))
        .await
        .unwrap()
        .unwrap();

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
