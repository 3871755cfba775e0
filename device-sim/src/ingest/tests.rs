//! Tests of reading the gateway's ingest counters, with and without the optional fields.

use serde_json::json;

use super::*;

#[test]
fn a_sample_with_latency_and_process() {
    let at = Instant::now();
    let v = json!({
        "stored": {"telemetry": 1500, "hello": 3},
        "telemetry_lost": 2,
        "telemetry_duplicates": 1,
        "latency": {"count": 1500, "p50_ms": 1.5, "p99_ms": 4.0, "p999_ms": 9.0, "max_ms": 12.0},
        "process": {"resident_bytes": 52428800, "cpu_seconds": 3.25},
    });
    let s = IngestSample::parse(&v, at).unwrap();
    assert_eq!((s.telemetry, s.lost, s.duplicates), (1500, 2, 1));
    assert_eq!(s.latency.unwrap().p99_ms, 4.0);
    assert_eq!(
        s.process,
        Some(Process {
            resident_bytes: Some(52_428_800),
            cpu_seconds: Some(3.25)
        })
    );
}

#[test]
fn a_gateway_without_latency_or_process_gives_none() {
    let v = json!({"stored": {"telemetry": 0}, "telemetry_lost": 0, "telemetry_duplicates": 0});
    let s = IngestSample::parse(&v, Instant::now()).unwrap();
    assert_eq!((s.latency, s.process), (None, None));
    // A gateway that has stored nothing yet has no latency to speak of.
    let fresh = json!({
        "stored": {"telemetry": 0}, "telemetry_lost": 0, "telemetry_duplicates": 0,
        "latency": {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0, "max_ms": 0.0},
        "process": {"resident_bytes": null, "cpu_seconds": 0.5},
    });
    let s = IngestSample::parse(&fresh, Instant::now()).unwrap();
    assert_eq!(s.latency, None);
    assert_eq!(
        s.process,
        Some(Process {
            resident_bytes: None,
            cpu_seconds: Some(0.5)
        })
    );
    let bad = json!({"stored": {}, "telemetry_lost": 0, "telemetry_duplicates": 0});
    assert!(matches!(
        IngestSample::parse(&bad, Instant::now()),
        Err(IngestError::Missing("stored.telemetry"))
    ));
}

#[test]
fn deltas_cover_the_time_between_two_samples() {
    let t0 = Instant::now();
    let sample = |at, telemetry, lost, duplicates, cpu: Option<f64>| IngestSample {
        at,
        telemetry,
        lost,
        duplicates,
        latency: None,
        process: cpu.map(|cpu_seconds| Process {
            resident_bytes: Some(1),
            cpu_seconds: Some(cpu_seconds),
        }),
    };
    let before = sample(t0, 100, 5, 2, Some(10.0));
    let after = sample(t0 + Duration::from_secs(4), 2100, 3, 2, Some(11.0));
    let d = IngestDelta::between(&before, &after);
    assert_eq!(d.stored, 2000);
    assert_eq!(d.per_second, 500.0);
    assert_eq!(d.lost, -2, "late arrivals filled two gaps");
    assert_eq!(d.duplicates, 0);
    assert_eq!(d.cpu_pct, Some(25.0));
    let no_cpu = sample(t0 + Duration::from_secs(4), 2100, 3, 2, None);
    assert_eq!(IngestDelta::between(&before, &no_cpu).cpu_pct, None);
}

fn row(boot: u32, seq: u32, received_ms: u64) -> StoredRow {
    StoredRow {
        boot,
        seq,
        received_ms,
    }
}

#[test]
fn telemetry_rows_give_their_numbers_and_arrival() {
    let v = json!([
        {"received_at": "2026-12-03T08:04:38.125Z", "boot": 7, "seq": 12, "samples": 0},
        {"received_at": "2026-12-03T08:04:38.124Z", "boot": 7, "seq": 11},
    ]);
    let rows = parse_rows(&v).unwrap();
    assert_eq!(
        rows,
        [row(7, 12, 1_796_285_078_125), row(7, 11, 1_796_285_078_124)]
    );
    assert_eq!(
        parse_rows(&json!([{"received_at": "2026-12-03T08:04:38Z", "boot": 1}])).unwrap_err(),
        "row 0 has no seq"
    );
    assert_eq!(
        parse_rows(&json!({"error": "no"})).unwrap_err(),
        "the answer is not a list"
    );
    assert!(
        parse_rows(&json!([{"received_at": "yesterday", "boot": 1, "seq": 1}]))
            .unwrap_err()
            .starts_with("row 0: received_at \"yesterday\"")
    );
}

#[test]
fn pages_go_back_in_time_overlapping_one_millisecond() {
    // A short page is the last.
    assert_eq!(next_page(&[row(1, 5, 900)], 3, None), Ok(None));
    assert_eq!(next_page(&[], 3, Some(1000)), Ok(None));
    // A full page: the next one ends after its oldest millisecond (`to` is exclusive).
    let full = [row(1, 9, 1000), row(1, 8, 990), row(1, 7, 980)];
    assert_eq!(next_page(&full, 3, None), Ok(Some(981)));
    assert_eq!(next_page(&full, 3, Some(1001)), Ok(Some(981)));
    // A full page within one millisecond cannot move on.
    let stuck = [row(1, 9, 980), row(1, 8, 980), row(1, 7, 980)];
    assert_eq!(
        next_page(&stuck, 3, Some(981)),
        Err("more than 3 rows within the millisecond 980".to_owned())
    );
}

#[test]
fn stored_numbers_are_looked_up_by_boot() {
    let mut s = Stored::default();
    s.boots.entry(7).or_default().insert(3);
    assert!(s.contains(7, 3));
    assert!(!s.contains(7, 4) && !s.contains(8, 3));
}

#[test]
fn backpressure_counters_come_from_the_metrics_text() {
    let text = "\
# HELP fleetgate_ingest_queue_full Times a device session found the queue full.
# TYPE fleetgate_ingest_queue_full counter
fleetgate_ingest_queue_full_total 12
fleetgate_ingest_queue_full_total_other 99
fleetgate_mqtt_publishes_delayed_total 3
# EOF
";
    let b = Backpressure::parse(text);
    assert_eq!(
        b,
        Backpressure {
            queue_full: 12,
            publishes_delayed: 3
        }
    );
    assert_eq!(Backpressure::parse(""), Backpressure::default());
    let later = Backpressure {
        queue_full: 20,
        publishes_delayed: 3,
    };
    assert_eq!(
        later.since(&b),
        Backpressure {
            queue_full: 8,
            publishes_delayed: 0
        }
    );
}

#[test]
fn a_process_is_read_from_its_proc_files() {
    let at = Instant::now();
    // utime 250 and stime 50 ticks (fields 14 and 15); a command name with a space and a ')'.
    let stat = "4242 (bare rumqttd)) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0";
    let status = "Name:\tbare-rumqttd\nVmHWM:\t  90000 kB\nVmRSS:\t   51200 kB\nThreads:\t9\n";
    let s = ProcSample::parse(stat, status, at).unwrap();
    assert_eq!((s.cpu_seconds, s.resident_bytes), (3.0, 50 * 1024 * 1024));
    assert_eq!(ProcSample::parse("4242 (x) S 1", status, at), None);
    assert_eq!(ProcSample::parse(stat, "Name:\tx\n", at), None);
    let later = ProcSample {
        at: at + Duration::from_secs(2),
        cpu_seconds: 4.5,
        resident_bytes: 0,
    };
    assert_eq!(later.cpu_pct_since(&s), Some(75.0));
    assert_eq!(s.cpu_pct_since(&s), None);
}
