use std::time::{Duration, Instant};

use rumqttd::protocol::Packet;

use super::*;

/// The second line of defence: a device link bound to its tenant cannot get a publish outside
/// `/tenants/<id>/` into the router, even if the front let one through.
#[test]
fn the_router_drops_a_tenant_link_that_publishes_outside_its_prefix() {
    let cfg = fleetgate_config::Config::default();
    let router = Router::new(7, router_config(&cfg.mqtt)).spawn();
    let (mut gw_tx, mut gw_rx, _) = LinkBuilder::new("gw", router.clone()).build().unwrap();
    gw_tx.subscribe(policy::INGEST_FILTER).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    assert!(matches!(
        Option::<Packet>::from(gw_rx.recv_deadline(deadline).unwrap().unwrap()),
        Some(Packet::SubAck(..))
    ));

    let (mut dev7, mut dev7_rx, _) = LinkBuilder::new("dev7", router.clone())
        .tenant_id(Some("dev7".into()))
        .build()
        .unwrap();
    dev7.publish("/tenants/dev8/up/telemetry", &b"forged"[..])
        .unwrap();
    // The router drops the link: its receiver reports the disconnect.
    let dropped = loop {
        match dev7_rx.recv_deadline(Instant::now() + Duration::from_secs(5)) {
            Ok(Some(_)) | Ok(None) => continue,
            Err(_) => break true,
        }
    };
    assert!(dropped);

    // A legitimate device still gets through, and the gateway receives only that.
    let (mut dev8, _dev8_rx, _) = LinkBuilder::new("dev8", router)
        .tenant_id(Some("dev8".into()))
        .build()
        .unwrap();
    dev8.publish("/tenants/dev8/up/telemetry", &b"real"[..])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let forward = loop {
        match gw_rx.recv_deadline(deadline).unwrap() {
            Some(Notification::Forward(f)) => break f,
            Some(_) | None => continue,
        }
    };
    assert_eq!(&forward.publish.payload[..], b"real");
}
