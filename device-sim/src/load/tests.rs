//! Tests of load runs' pure parts: the checks of a spec, the client identities of each target,
//! and the human summary of a known report.

use std::collections::BTreeMap;

use super::*;
use crate::stats::Percentiles;

fn creds(n: usize) -> Vec<Credential> {
    (0..n)
        .map(|i| Credential {
            id: format!("d-{i:05}"),
            secret: format!("s{i}"),
        })
        .collect()
}

#[test]
fn a_default_spec_is_valid_and_every_bad_setting_is_named() {
    let good = LoadSpec::gateway("127.0.0.1", 1883, creds(3), None);
    assert!(good.validate().is_ok());

    let mut bad = LoadSpec::mqtt("127.0.0.1", 1883, "m", 0);
    bad.rate = 0.0;
    bad.connect_rate = f64::INFINITY;
    bad.duration = Duration::ZERO;
    bad.drain = Duration::from_secs(25 * 3600);
    bad.payload_bytes = Some(MAX_PAYLOAD + 1);
    bad.features = 0;
    bad.qos = QoS::ExactlyOnce;
    let LoadError::Invalid(problems) = bad.validate().unwrap_err() else {
        panic!("expected problems");
    };
    assert_eq!(
        problems,
        [
            "devices must be within 1..=100000",
            "rate must be within (0, 10000] per device",
            "connect rate must be above 0",
            "drain is limited to 24h",
            "duration must be above 0",
            "payload bytes must be at most 60000",
            "features must be within 1..=64",
            "QoS must be 0 or 1",
        ]
    );
}

#[test]
fn each_target_names_its_clients() {
    let gw = Target::Gateway {
        credentials: creds(4),
        api: None,
    };
    let ids: Vec<(String, Option<(String, String)>)> = gw
        .idents(1..3)
        .into_iter()
        .map(|i| (i.id, i.login))
        .collect();
    assert_eq!(
        ids,
        [
            (
                "d-00001".to_owned(),
                Some(("d-00001".to_owned(), "s1".to_owned()))
            ),
            (
                "d-00002".to_owned(),
                Some(("d-00002".to_owned(), "s2".to_owned()))
            ),
        ]
    );
    let mqtt = Target::Mqtt {
        prefix: "bench".into(),
        devices: 3,
    };
    let ids: Vec<(String, Option<(String, String)>)> = mqtt
        .idents(0..3)
        .into_iter()
        .map(|i| (i.id, i.login))
        .collect();
    assert_eq!(
        ids,
        [
            ("bench-00000".to_owned(), None),
            ("bench-00001".to_owned(), None),
            ("bench-00002".to_owned(), None),
        ]
    );
    assert_eq!((gw.name(), gw.devices()), ("gateway", 4));
    assert_eq!((mqtt.name(), mqtt.devices()), ("mqtt", 3));
}

fn percentiles(p50_ms: f64, p99_ms: f64, p999_ms: f64, max_ms: f64, count: u64) -> Percentiles {
    Percentiles {
        count,
        p50_ms,
        p99_ms,
        p999_ms,
        max_ms,
    }
}

/// A report of 20 devices sending 400 messages in 2 s, 2 lost on the way.
fn report() -> LoadReport {
    LoadReport {
        target: "gateway",
        broker: "127.0.0.1:1883".into(),
        devices: 20,
        qos: 1,
        encoding: "postcard",
        samples: 0,
        features: 4,
        connect: ConnectReport {
            devices: 20,
            connected: 20,
            elapsed_s: 0.5,
            rate_per_s: 40.0,
            connack: Some(percentiles(1.5, 3.0, 3.0, 3.0, 20)),
            refused: 0,
            refused_by: BTreeMap::new(),
            errors: 0,
        },
        steady: PhaseReport {
            devices: 20,
            rate_per_device: 10.0,
            duration_s: 2.0,
            target_per_s: 200.0,
            offered: 400,
            offered_per_s: 200.0,
            skipped: 0,
            acked: Some(400),
            acked_per_s: Some(200.0),
            unacked: Some(0),
            ack_latency: Some(percentiles(0.8, 2.5, 4.0, 4.5, 400)),
            ingest: Some(IngestReport {
                source: "gateway_api",
                ingested: 398,
                ingested_per_s: 199.0,
                lost: 2,
                duplicates: 0,
                acked_lost: Some(2),
                latency: Some(percentiles(1.0, 3.0, 5.0, 6.0, 398)),
                resident_bytes: Some(48 * 1024 * 1024),
                cpu_pct: Some(12.5),
                undecodable: 0,
            }),
            payload_bytes: 57,
            connection_errors: 0,
            broker: Some(BrokerUse {
                pid: 77,
                cpu_pct: Some(12.5),
                resident_bytes: Some(48 * 1024 * 1024),
                resident_peak_bytes: Some(50 * 1024 * 1024),
            }),
            clients_cpu_pct: Some(30.0),
        },
        verify: None,
        notes: vec!["ingest counters unavailable: GET x: refused".into()],
        elapsed_s: 5.0,
    }
}

#[test]
fn the_summary_shows_every_figure() {
    let text = report().to_string();
    let want = "\
target:    gateway at 127.0.0.1:1883, 20 devices, QoS 1, postcard, 0 samples x 4 features
connect:   20/20 connected in 0.50 s (40.0/s); CONNACK p50 1.50 ms, p99 3.00 ms, p99.9 3.00 ms, max 3.00 ms (20 samples); 0 refused, 0 other errors
phase:     2.00 s, 20 devices at 10.0/s each (target 200.0/s)
offered:   400 (200.0/s), 0 skipped; 57 B payloads
acked:     400 (200.0/s), 0 unacknowledged; publish->PUBACK p50 0.80 ms, p99 2.50 ms, p99.9 4.00 ms, max 4.50 ms (400 samples)
ingested:  398 (199.0/s) by gateway_api; lost 2, duplicates 0, acknowledged but lost 2
latency:   device->stored (since the gateway started) p50 1.00 ms, p99 3.00 ms, p99.9 5.00 ms, max 6.00 ms (398 samples)
gateway:   RSS 48.0 MiB, CPU 12.5 %
broker:    pid 77: CPU 12.5 % of a core, RSS 48.0 MiB (highest sampled 50.0 MiB)
errors:    0 connection errors; simulator CPU 30.0 % of a core
note:      ingest counters unavailable: GET x: refused";
    assert_eq!(text, want);
}

#[test]
fn figures_that_were_not_measured_print_as_a_dash() {
    let mut r = report();
    r.qos = 0;
    r.steady.acked = None;
    r.steady.acked_per_s = None;
    r.steady.unacked = None;
    r.steady.ack_latency = None;
    r.steady.ingest = None;
    r.steady.broker = None;
    r.steady.clients_cpu_pct = None;
    r.notes.clear();
    let text = r.to_string();
    assert!(
        text.contains("\nacked:     - (-), - unacknowledged; publish->PUBACK -\n"),
        "{text}"
    );
    assert!(
        text.ends_with("\ningested:  - (no ingest counters)\nerrors:    0 connection errors; simulator CPU - % of a core"),
        "{text}"
    );
}

#[test]
fn a_clean_run_connected_everyone_and_lost_nothing() {
    let mut r = report();
    assert!(!r.clean(), "2 lost");
    r.steady.ingest.as_mut().unwrap().lost = 0;
    assert!(!r.clean(), "2 acknowledged and lost");
    r.steady.ingest.as_mut().unwrap().acked_lost = Some(0);
    assert!(r.clean());
    r.steady.unacked = Some(1);
    assert!(!r.clean(), "one unacknowledged");
    r.steady.unacked = Some(0);
    r.connect.connected = 19;
    assert!(!r.clean(), "one never connected");
    r.connect.connected = 20;
    r.steady.ingest.as_mut().unwrap().duplicates = 1;
    assert!(!r.clean(), "a duplicate");
    r.steady.ingest = None;
    assert!(
        r.clean(),
        "without ingest counters only the clients' figures count"
    );
}

#[test]
fn the_json_report_has_the_figures_by_name() {
    let v = serde_json::to_value(report()).unwrap();
    assert_eq!(v["steady"]["offered"], 400);
    assert_eq!(v["steady"]["acked"], 400);
    assert_eq!(v["steady"]["ingest"]["ingested"], 398);
    assert_eq!(v["steady"]["ingest"]["lost"], 2);
    assert_eq!(v["steady"]["ingest"]["latency"]["p999_ms"], 5.0);
    assert_eq!(v["steady"]["ingest"]["resident_bytes"], 48 * 1024 * 1024);
    assert_eq!(v["connect"]["connack"]["p50_ms"], 1.5);
    assert_eq!(v["qos"], 1);
}
