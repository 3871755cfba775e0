//! Tests of a burst's report arithmetic on known measurements: rates from the first publish,
//! when ingest reached its total, acknowledged-but-lost by number and by count, the checks of
//! a spec, and the summary of a known report.

use std::collections::BTreeMap;

use super::*;
use crate::enroll::Credential;
use crate::ingest::Api;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pct(p50_ms: f64, p99_ms: f64, max_ms: f64, count: u64) -> Percentiles {
    Percentiles {
        count,
        p50_ms,
        p99_ms,
        p999_ms: max_ms,
        max_ms,
    }
}

#[test]
fn ingest_reaches_its_total_between_two_samples() {
    let samples = [
        (ms(0), 0),
        (ms(100), 1000),
        (ms(200), 3000),
        (ms(300), 4000),
    ];
    // 2000 lies halfway from 1000 (100 ms) to 3000 (200 ms).
    assert_eq!(reached(&samples, 2000), Some((ms(150), true)));
    assert_eq!(reached(&samples, 4000), Some((ms(300), true)));
    assert_eq!(reached(&samples, 1000), Some((ms(100), true)));
    assert_eq!(reached(&samples, 0), Some((ms(0), true)));
    // Never reached: when it last moved (the first sample with the final count).
    let stalled = [
        (ms(0), 0),
        (ms(100), 1000),
        (ms(200), 1500),
        (ms(300), 1500),
    ];
    assert_eq!(reached(&stalled, 4000), Some((ms(200), false)));
    assert_eq!(reached(&[], 10), None);
}

/// 20 devices x 200 messages at a gateway: all 4000 acknowledged between 20 ms (the first
/// publish) and 520 ms (the last PUBACK), stored as sampled below.
fn gateway_raw() -> BurstRaw {
    BurstRaw {
        devices: 20,
        messages: 200,
        offered: 4000,
        acked: Some(4000),
        first_sent: Some(ms(20)),
        last_sent: Some(ms(420)),
        last_ack: Some(ms(520)),
        ack_latency: Some(pct(2.5, 9.0, 12.0, 4000)),
        payload_bytes: 131,
        connection_errors: 0,
        broker: None,
        clients_cpu_pct: Some(88.0),
        ingest: Some(BurstIngestRaw {
            source: "gateway_api",
            samples: vec![
                (ms(0), 0),
                (ms(270), 1500),
                (ms(520), 3500),
                (ms(570), 4000),
            ],
            last_new: None,
            ingested: 4000,
            duplicates: 0,
            lost: 0,
            counts_inexact: false,
            acked_lost: None,
            resident_peak: Some(60 * 1024 * 1024),
            resident_end: Some(58 * 1024 * 1024),
            cpu_pct: Some(95.0),
            backpressure: Some(Backpressure {
                queue_full: 12,
                publishes_delayed: 0,
            }),
        }),
    }
}

#[test]
fn gateway_figures_run_from_the_first_publish() {
    let f = BurstFigures::of(&gateway_raw());
    assert_eq!(f.unsent, 0);
    assert_eq!(f.send_s, Some(0.4));
    assert_eq!((f.acked, f.unacked), (Some(4000), Some(0)));
    assert_eq!(f.acked_s, Some(0.5));
    assert_eq!(f.acked_per_s, Some(8000.0));
    let i = f.ingest.unwrap();
    // 4000 reached at the sample of 570 ms: 550 ms after the first publish.
    assert_eq!((i.ingested, i.expected), (4000, 4000));
    assert_eq!(i.ingested_s, Some(0.55));
    assert_eq!(i.ingested_per_s.map(|r| r.round()), Some(7273.0));
    assert_eq!((i.acked_lost, i.acked_lost_by), (Some(0), "by_count"));
    assert_eq!((i.queue_full, i.publishes_delayed), (Some(12), Some(0)));
    assert_eq!(i.resident_peak_bytes, Some(60 * 1024 * 1024));
}

#[test]
fn a_gateway_that_stored_less_than_it_acknowledged_lost_the_difference() {
    let mut raw = gateway_raw();
    let i = raw.ingest.as_mut().unwrap();
    i.samples = vec![
        (ms(0), 0),
        (ms(270), 1500),
        (ms(520), 3990),
        (ms(570), 3990),
    ];
    i.ingested = 3990;
    i.duplicates = 4;
    let f = BurstFigures::of(&raw);
    let i = f.ingest.unwrap();
    // 3990 stored, 4 of them repeats: 3986 distinct of 4000 acknowledged.
    assert_eq!(i.acked_lost, Some(14));
    // Never reached 4000: timed to when it last moved (520 ms).
    assert_eq!(i.ingested_s, Some(0.5));
    assert_eq!(i.ingested_per_s, Some(7980.0));
}

fn subscriber_raw() -> BurstRaw {
    let mut raw = gateway_raw();
    raw.ingest = Some(BurstIngestRaw {
        source: "subscriber",
        samples: vec![(ms(0), 0), (ms(300), 2000), (ms(600), 3900)],
        last_new: Some(ms(620)),
        ingested: 3900,
        duplicates: 0,
        lost: 100,
        counts_inexact: false,
        acked_lost: Some(100),
        resident_peak: None,
        resident_end: None,
        cpu_pct: None,
        backpressure: None,
    });
    raw
}

#[test]
fn counts_that_cannot_tell_loss_give_none() {
    let mut raw = gateway_raw();
    let i = raw.ingest.as_mut().unwrap();
    i.counts_inexact = true;
    i.ingested = 1200;
    let f = BurstFigures::of(&raw);
    assert_eq!(f.ingest.unwrap().acked_lost, None);
}

#[test]
fn a_subscriber_times_its_last_new_message_and_looks_up_each_number() {
    let f = BurstFigures::of(&subscriber_raw());
    let i = f.ingest.unwrap();
    assert_eq!(i.ingested_s, Some(0.6));
    assert_eq!(i.ingested_per_s, Some(6500.0));
    assert_eq!((i.acked_lost, i.acked_lost_by), (Some(100), "by_number"));
    assert_eq!((i.queue_full, i.resident_peak_bytes), (None, None));
}

#[test]
fn qos_0_has_no_acknowledgements_and_expects_what_was_sent() {
    let mut raw = subscriber_raw();
    raw.acked = None;
    raw.ack_latency = None;
    raw.last_ack = None;
    raw.offered = 3950;
    raw.ingest.as_mut().unwrap().acked_lost = None;
    let f = BurstFigures::of(&raw);
    assert_eq!(
        (f.acked, f.unacked, f.acked_s, f.acked_per_s),
        (None, None, None, None)
    );
    assert_eq!(f.unsent, 50);
    let i = f.ingest.unwrap();
    assert_eq!((i.expected, i.acked_lost), (3950, None));
}

fn connect() -> ConnectReport {
    ConnectReport {
        devices: 20,
        connected: 20,
        elapsed_s: 0.1,
        rate_per_s: 200.0,
        connack: Some(pct(1.0, 2.0, 2.0, 20)),
        refused: 0,
        refused_by: BTreeMap::new(),
        errors: 0,
    }
}

fn report(raw: &BurstRaw) -> BurstReport {
    BurstReport {
        target: "gateway",
        broker: "127.0.0.1:1883".into(),
        devices: 20,
        messages: 200,
        qos: 1,
        inflight: 100,
        encoding: "json",
        samples: 0,
        features: 4,
        connect: connect(),
        burst: BurstFigures::of(raw),
        verify: None,
        notes: Vec::new(),
        elapsed_s: 2.0,
    }
}

#[test]
fn the_summary_shows_every_figure() {
    let mut r = report(&gateway_raw());
    r.verify = Some(VerifyReport {
        devices: 20,
        unreadable: 0,
        acked: 4000,
        stored: 4000,
        missing: 0,
        examples: Vec::new(),
        errors: Vec::new(),
    });
    r.burst.broker = Some(BrokerUse {
        pid: 4242,
        cpu_pct: Some(97.5),
        resident_bytes: Some(58 * 1024 * 1024),
        resident_peak_bytes: Some(61 * 1024 * 1024),
    });
    let want = "\
target:    gateway at 127.0.0.1:1883, 20 devices x 200 messages, QoS 1, window 100, json, 0 samples x 4 features
connect:   20/20 connected in 0.10 s (200.0/s); CONNACK p50 1.00 ms, p99 2.00 ms, p99.9 2.00 ms, max 2.00 ms (20 samples); 0 refused, 0 other errors
burst:     20 devices sent 4000 (0 unsent) in 0.400 s; 131 B payloads
acked:     4000 (0 unacknowledged) in 0.500 s (8000.0/s); publish->PUBACK p50 2.50 ms, p99 9.00 ms, p99.9 12.00 ms, max 12.00 ms (4000 samples)
stored:    4000 of 4000 in 0.550 s (7272.7/s) by the gateway
lost:      0 acknowledged but not stored (acknowledged minus newly stored); 0 missing by sequence numbers, 0 duplicates
gateway:   RSS peak 60.0 MiB, at the end 58.0 MiB, CPU 95.0 %; writer queue full 12 times, 0 publishes delayed
verified:  4000 acknowledged sequence numbers of 20 devices read back: 4000 stored, 0 missing
broker:    pid 4242: CPU 97.5 % of a core, RSS 58.0 MiB (highest sampled 61.0 MiB)
errors:    0 connection errors; simulator CPU 88.0 % of a core";
    assert_eq!(r.to_string(), want);
    assert!(r.clean());
}

#[test]
fn a_bare_brokers_summary_says_delivered() {
    let mut r = report(&subscriber_raw());
    r.target = "mqtt";
    r.notes.push("a note".into());
    let text = r.to_string();
    assert!(
        text.contains(
            "\ndelivered: 3900 of 4000 in 0.600 s (6500.0/s) to the subscriber\n\
             lost:      100 acknowledged but not delivered (each acknowledged number looked up); \
             100 missing by sequence numbers, 0 duplicates\nerrors:"
        ),
        "{text}"
    );
    assert!(
        text.ends_with(
            "\nerrors:    0 connection errors; simulator CPU 88.0 % of a core\nnote:      a note"
        ),
        "{text}"
    );
    assert!(!r.clean(), "100 acknowledged and lost");
}

#[test]
fn a_run_is_clean_only_if_nothing_acknowledged_went_missing() {
    let mut r = report(&gateway_raw());
    assert!(r.clean());
    r.burst.unsent = 1;
    assert!(!r.clean(), "one not sent");
    r.burst.unsent = 0;
    r.burst.unacked = Some(1);
    assert!(!r.clean(), "one unacknowledged");
    r.burst.unacked = Some(0);
    r.connect.connected = 19;
    assert!(!r.clean(), "one never connected");
    r.connect.connected = 20;
    r.verify = Some(VerifyReport {
        devices: 20,
        unreadable: 0,
        acked: 4000,
        stored: 3999,
        missing: 1,
        examples: vec!["d 7 12".into()],
        errors: Vec::new(),
    });
    assert!(!r.clean(), "one missing when read back");
    assert_eq!(
        r.verify.as_ref().unwrap().to_string(),
        "4000 acknowledged sequence numbers of 20 devices read back: 3999 stored, 1 missing \
         (e.g. d 7 12)"
    );
}

#[test]
fn the_json_report_has_the_figures_by_name() {
    let v = serde_json::to_value(report(&gateway_raw())).unwrap();
    assert_eq!(v["burst"]["acked"], 4000);
    assert_eq!(v["burst"]["acked_per_s"], 8000.0);
    assert_eq!(v["burst"]["ack_latency"]["p99_ms"], 9.0);
    assert_eq!(v["burst"]["ingest"]["ingested"], 4000);
    assert_eq!(v["burst"]["ingest"]["acked_lost"], 0);
    assert_eq!(v["burst"]["ingest"]["acked_lost_by"], "by_count");
    assert_eq!(
        v["burst"]["ingest"]["resident_peak_bytes"],
        60 * 1024 * 1024
    );
    assert_eq!(v["messages"], 200);
    assert_eq!(v["verify"], serde_json::Value::Null);
}

fn creds(n: usize) -> Vec<Credential> {
    (0..n)
        .map(|i| Credential {
            id: format!("d-{i:05}"),
            secret: format!("s{i}"),
        })
        .collect()
}

#[test]
fn every_bad_setting_is_named() {
    let api = Api {
        url: "http://127.0.0.1:8080".into(),
        token: "t".into(),
    };
    let mut good = BurstSpec::new(
        LoadSpec::gateway("127.0.0.1", 1883, creds(3), Some(api)),
        1000,
    );
    good.verify = true;
    assert!(good.validate().is_ok());
    assert_eq!(good.load.inflight, 100, "rumqttc's default window");

    let mut bad = BurstSpec::new(LoadSpec::mqtt("127.0.0.1", 1883, "m", 0), 0);
    bad.timeout = Duration::ZERO;
    bad.verify = true;
    let LoadError::Invalid(problems) = bad.validate().unwrap_err() else {
        panic!("expected problems");
    };
    assert_eq!(
        problems,
        [
            "devices must be within 1..=100000",
            "messages must be within 1..=4294967295 per device",
            "timeout must be above 0 and at most 24h",
            "verify reads the gateway's API: a bare broker is checked by its subscriber",
        ]
    );
    let huge = BurstSpec::new(LoadSpec::mqtt("127.0.0.1", 1883, "m", 100_000), 20_000);
    let LoadError::Invalid(problems) = huge.validate().unwrap_err() else {
        panic!("expected problems");
    };
    assert_eq!(
        problems,
        ["devices x messages must be at most 1000000000 (is 2000000000)"]
    );
    let mut no_token = BurstSpec::new(LoadSpec::gateway("127.0.0.1", 1883, creds(1), None), 1);
    no_token.verify = true;
    let LoadError::Invalid(problems) = no_token.validate().unwrap_err() else {
        panic!("expected problems");
    };
    assert_eq!(problems, ["verify reads the gateway's API: give its token"]);
}
