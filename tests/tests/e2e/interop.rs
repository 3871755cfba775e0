//! Stock MQTT clients (Eclipse Mosquitto's mosquitto_pub/mosquitto_sub) speaking JSON.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::json;
use tests::TestGateway;

/// The next line starting with `prefix`, within 10 s.
async fn until(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    prefix: &str,
) -> Option<String> {
    let next = async {
        while let Some(line) = lines.recv().await {
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
        None
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), next)
        .await
        .ok()
        .flatten()
}

fn mosquitto_pub(port: u16, id: &str, secret: &str, version: &str, topic: &str, message: &str) {
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            version,
            "-i",
            id,
            "-u",
            id,
            "-P",
            secret,
        ])
        .args(["-q", "1", "-t", topic, "-m", message])
        .output()
        .expect("mosquitto_pub runs (apt-get install mosquitto-clients; .ci/run installs it)");
    assert!(
        out.status.success(),
        "mosquitto_pub {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_from_mosquitto_pub_is_ingested_and_commands_reach_mosquitto_sub() {
    let gw = TestGateway::start().await;
    let cred = gw.enroll("mq-1").await;
    let port = gw.mqtt_port();
    let secret = cred.secret.clone();
    tokio::task::spawn_blocking(move || {
        let hello = r#"{"firmware": {"name": "fw", "version": "1.4.2"}, "hardware": {"arch": "armv7em", "class": "nrf53", "ram_bytes": 262144, "flash_bytes": 1048576}}"#;
        mosquitto_pub(port, "mq-1", &secret, "mqttv311", "fg/mq-1/hello/json", hello);
        mosquitto_pub(port, "mq-1", &secret, "mqttv311", "fg/mq-1/telemetry/json", r#"{"seq": 1, "hw": {"temp_c": 41.5, "cpu_pct": 12}}"#);
        mosquitto_pub(port, "mq-1", &secret, "mqttv5", "fg/mq-1/telemetry/json", r#"{"seq": 2, "hw": {"temp_c": 42.25}}"#);
        mosquitto_pub(port, "mq-1", &secret, "mqttv5", "fg/mq-1/log/json", r#"{"level": "warn", "text": "I2C retry"}"#);
    })
    .await
    .unwrap();
    gw.sync().await;

    let d = gw.get("/devices/mq-1").await;
    assert_eq!(d["firmware"]["version"], "1.4.2");
    assert_eq!(d["hardware"]["class"], "nrf53");
    assert_eq!(d["encoding"], "json");
    assert_eq!(d["protocol"], "mqtt-5", "the last connection was MQTT 5");
    assert_eq!(
        (
            d["counters"]["telemetry"].as_u64(),
            d["counters"]["lost"].as_u64()
        ),
        (Some(2), Some(0))
    );
    let rows = gw.get("/devices/mq-1/telemetry").await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0]["seq"].as_u64(), rows[0]["hw"]["temp_c"].as_f64()),
        (Some(2), Some(42.25))
    );
    assert_eq!(
        (
            rows[1]["seq"].as_u64(),
            rows[1]["hw"]["temp_c"].as_f64(),
            rows[1]["hw"]["cpu_pct"].as_f64()
        ),
        (Some(1), Some(41.5), Some(12.0))
    );
    let logs = gw.get("/devices/mq-1/logs").await;
    assert_eq!(logs[0]["text"], "I2C retry");
    assert_eq!(logs[0]["level"], "warn");

    // A stock subscriber receives a command in JSON, because the device said hello in JSON.
    // stdbuf: mosquitto_sub's stdout is block-buffered on a pipe; lines are needed as they come.
    let mut sub = Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-i",
            "mq-1",
            "-u",
            "mq-1",
            "-P",
            &cred.secret,
        ])
        .args(["-q", "1", "-t", "fg/mq-1/cmd/json", "-C", "1", "-d"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub runs");
    let stdout = sub.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    until(&mut lines, "Subscribed")
        .await
        .expect("mosquitto_sub subscribed");
    let cmd = gw
        .post("/devices/mq-1/commands", json!({ "action": "reboot" }))
        .await
        .unwrap();
    let line = until(&mut lines, "{").await.expect("command arrives");
    let got: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(got, json!({ "id": cmd["id"], "action": "reboot" }));
    let status = tokio::task::spawn_blocking(move || sub.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    gw.stop().await;
}
