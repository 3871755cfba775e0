//! Stopping the gateway flushes everything devices got acknowledged; a restart on the same
//! data dir shows the same fleet, and devices carry on.

use rumqttc::QoS;
use tests::device::{await_acks, connect};
use tests::{TestGateway, config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_restart_on_the_same_dir() {
    let gw = TestGateway::start().await;
    let cred = gw.enroll("keep-1").await;
    let (client, mut events) = connect(gw.mqtt_port(), "keep-1", &cred.secret)
        .await
        .unwrap();
    for seq in 0..5 {
        let temp = if seq == 4 { 95.0 } else { 40.0 };
        let body = format!(r#"{{"boot": 7, "seq": {seq}, "hw": {{"temp_c": {temp}}}}}"#);
        client
            .publish("fg/keep-1/telemetry/json", QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
    }
    await_acks(&mut events, 5).await;
    // No sync: shutdown itself must flush what was acknowledged.
    let tmp = gw.stop().await.expect("temp dir");
    drop(client);

    let gw = TestGateway::start_with(config(tmp.path()), Some(tmp)).await;
    let d = gw.get("/devices/keep-1").await;
    assert_eq!(d["counters"]["telemetry"], 5);
    assert_eq!(d["stored"]["telemetry"], 5);
    assert_eq!(d["online"], false);
    assert_eq!(d["disconnect_reason"], "gateway shutting down");
    let alerts = gw.get("/alerts").await;
    assert_eq!(alerts.as_array().unwrap().len(), 1);
    assert_eq!(
        (alerts[0]["kind"].as_str(), alerts[0]["state"].as_str()),
        (Some("thermal"), Some("open"))
    );

    // The same credential works on the new gateway and the sequence carries on without loss.
    let (client, mut events) = connect(gw.mqtt_port(), "keep-1", &cred.secret)
        .await
        .unwrap();
    client
        .publish(
            "fg/keep-1/telemetry/json",
            QoS::AtLeastOnce,
            false,
            r#"{"boot": 7, "seq": 5, "hw": {"temp_c": 70}}"#,
        )
        .await
        .unwrap();
    await_acks(&mut events, 1).await;
    gw.sync().await;
    let d = gw.get("/devices/keep-1").await;
    assert_eq!(
        (
            d["counters"]["telemetry"].as_u64(),
            d["counters"]["lost"].as_u64(),
            d["counters"]["duplicates"].as_u64()
        ),
        (Some(6), Some(0), Some(0))
    );
    assert_eq!(d["online"], true);
    let alerts = gw.get("/alerts").await;
    assert_eq!(
        alerts[0]["state"], "resolved",
        "70 C is below the rule's clear value"
    );
    gw.stop().await;
}
