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
