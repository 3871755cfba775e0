//! Tests of stress runs' pure parts: which step runs what, when a step counts as saturated,
//! and the checks of a ramp.

use super::*;
use crate::enroll::Credential;
use crate::load::IngestReport;
use crate::stats::Percentiles;

fn ramp(ramp: Ramp, devices: usize, rate: f64, factor: f64, steps: usize) -> RampSpec {
    let mut load = LoadSpec::mqtt("127.0.0.1", 1883, "s", devices);
    load.rate = rate;
    load.duration = Duration::from_secs(10);
    RampSpec {
        load,
        ramp,
        factor,
        steps,
        start_devices: 10,
        rules: StopRules::default(),
    }
}

#[test]
fn a_rate_ramp_multiplies_the_rate_of_every_device() {
    let spec = ramp(Ramp::Rate, 100, 1.0, 2.0, 5);
    let plan: Vec<(usize, f64)> = (0..5).map(|k| plan_step(&spec, k)).collect();
    assert_eq!(
        plan,
        [(100, 1.0), (100, 2.0), (100, 4.0), (100, 8.0), (100, 16.0)]
    );
    let spec = ramp(Ramp::Rate, 3, 10.0, 1.5, 3);
    let plan: Vec<(usize, f64)> = (0..3).map(|k| plan_step(&spec, k)).collect();
    assert_eq!(plan, [(3, 10.0), (3, 15.0), (3, 22.5)]);
}

#[test]
fn a_devices_ramp_adds_devices_up_to_all_of_them() {
    let spec = ramp(Ramp::Devices, 100, 5.0, 3.0, 5);
    let plan: Vec<(usize, f64)> = (0..5).map(|k| plan_step(&spec, k)).collect();
    // 10, 30, 90, then every one of the 100 (270 and 810 are capped).
    assert_eq!(
        plan,
        [(10, 5.0), (30, 5.0), (90, 5.0), (100, 5.0), (100, 5.0)]
    );
    // Fractions round up, so every step adds at least one device.
    let mut spec = ramp(Ramp::Devices, 10, 1.0, 1.5, 4);
    spec.start_devices = 1;
    let plan: Vec<usize> = (0..4).map(|k| plan_step(&spec, k).0).collect();
    assert_eq!(plan, [1, 2, 3, 4]);
}

#[test]
fn a_ramp_is_checked_whole() {
    assert!(ramp(Ramp::Rate, 10, 1.0, 2.0, 8).validate().is_ok());
    let problems = |spec: RampSpec| match spec.validate() {
        Err(LoadError::Invalid(p)) => p,
        other => panic!("{other:?}"),
    };
    let mut bad = ramp(Ramp::Devices, 5, 1.0, 1.0, 0);
    bad.rules.tolerance = 1.0;
    bad.steps = 1;
    assert_eq!(
        problems(bad),
        [
            "factor must be within (1, 100]",
            "start devices must be within 1..=devices",
            "tolerance must be within 0..1",
        ]
    );
    let too_many = ramp(Ramp::Rate, 10, 1.0, 2.0, MAX_STEPS + 1);
    assert_eq!(
        problems(too_many),
        [
            "steps must be within 1..=64",
            "the last step's rate (18446744073709551616.0/s) is over 10000 per device: fewer steps or a smaller factor",
        ]
    );
    let mut long = ramp(Ramp::Rate, 10, 1.0, 2.0, 10);
    long.load.duration = Duration::from_secs(3 * 3600);
    assert_eq!(problems(long), ["steps x step duration is limited to 24h"]);
    let mut zero = ramp(Ramp::Rate, 0, 1.0, 2.0, 2);
    zero.load.rate = -1.0;
    assert_eq!(
        problems(zero),
        [
            "devices must be within 1..=100000",
            "rate must be within (0, 10000] per device",
        ]
    );
}

fn ms(p50_ms: f64, p99_ms: f64) -> Percentiles {
    Percentiles {
        count: 100,
        p50_ms,
        p99_ms,
        p999_ms: p99_ms,
        max_ms: p99_ms,
    }
}

/// A step of 100 devices at 10/s for 10 s: 1000/s offered, with `ingested_per_s` and `lost`.
fn step(offered_per_s: f64, ingested_per_s: f64, lost: i64, p99_ms: f64) -> PhaseReport {
    PhaseReport {
        devices: 100,
        rate_per_device: 10.0,
        duration_s: 10.0,
        target_per_s: 1000.0,
        offered: (offered_per_s * 10.0) as u64,
        offered_per_s,
        skipped: 0,
        acked: Some((offered_per_s * 10.0) as u64),
        acked_per_s: Some(offered_per_s),
        unacked: Some(0),
        ack_latency: Some(ms(1.0, p99_ms)),
        ingest: Some(IngestReport {
            source: "subscriber",
            ingested: (ingested_per_s * 10.0) as u64,
            ingested_per_s,
            lost,
            duplicates: 0,
            acked_lost: None,
            latency: None,
            resident_bytes: None,
            cpu_pct: None,
            undecodable: 0,
        }),
        payload_bytes: 57,
        connection_errors: 0,
        broker: None,
        clients_cpu_pct: None,
    }
}

#[test]
fn a_step_is_judged_by_each_stop_rule() {
    let rules = StopRules::default();
    // Within the 5 % tolerance: good.
    assert_eq!(judge(&step(1000.0, 1000.0, 0, 5.0), &rules), []);
    assert_eq!(judge(&step(951.0, 904.0, 0, 999.0), &rules), []);
    assert_eq!(
        judge(&step(1000.0, 940.0, 0, 5.0), &rules),
        [StopReason::IngestBehind {
            ingested_per_s: 940.0,
            offered_per_s: 1000.0
        }]
    );
    assert_eq!(
        judge(&step(1000.0, 1000.0, 1, 5.0), &rules),
        [StopReason::Loss { lost: 1 }]
    );
    assert_eq!(
        judge(&step(1000.0, 1000.0, 0, 1000.5), &rules),
        [StopReason::AckLatency {
            p99_ms: 1000.5,
            limit_ms: 1000.0
        }]
    );
    // Every rule at once, in a fixed order.
    assert_eq!(
        judge(&step(900.0, 800.0, 3, 2000.0), &rules),
        [
            StopReason::OfferedBehind {
                offered_per_s: 900.0,
                target_per_s: 1000.0
            },
            StopReason::IngestBehind {
                ingested_per_s: 800.0,
                offered_per_s: 900.0
            },
            StopReason::Loss { lost: 3 },
            StopReason::AckLatency {
                p99_ms: 2000.0,
                limit_ms: 1000.0
            },
        ]
    );
}

#[test]
fn rules_without_figures_do_not_apply() {
    // QoS 0 and no ingest counters: only the offered rate can be judged.
    let mut s = step(1000.0, 0.0, 9, 5000.0);
    s.ingest = None;
    s.ack_latency = None;
    assert_eq!(judge(&s, &StopRules::default()), []);
    // No latency limit, a loose tolerance.
    let rules = StopRules {
        tolerance: 0.5,
        p99_limit: None,
    };
    assert_eq!(judge(&step(600.0, 300.0, 0, 5000.0), &rules), []);
    // Late arrivals that filled earlier gaps (negative loss) are not loss.
    assert_eq!(judge(&step(1000.0, 1000.0, -2, 1.0), &rules), []);
}

#[test]
fn stop_reasons_read_as_sentences() {
    let reasons = [
        StopReason::IngestBehind {
            ingested_per_s: 940.0,
            offered_per_s: 1000.0,
        },
        StopReason::Loss { lost: 3 },
        StopReason::AckLatency {
            p99_ms: 1200.0,
            limit_ms: 1000.0,
        },
        StopReason::OfferedBehind {
            offered_per_s: 900.0,
            target_per_s: 1000.0,
        },
    ];
    let text: Vec<String> = reasons.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "ingested 940.0/s < offered 1000.0/s",
            "3 lost",
            "PUBACK p99 1200.00 ms > 1000.00 ms",
            "offered 900.0/s < target 1000.0/s",
        ]
    );
    let json = serde_json::to_value(&reasons[2]).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"rule": "ack_latency", "p99_ms": 1200.0, "limit_ms": 1000.0})
    );
}

#[test]
fn a_gateway_ramp_takes_its_devices_from_the_credentials() {
    let creds: Vec<Credential> = (0..7)
        .map(|i| Credential {
            id: format!("g-{i:05}"),
            secret: "x".into(),
        })
        .collect();
    let mut load = LoadSpec::gateway("127.0.0.1", 1883, creds, None);
    load.rate = 2.0;
    let spec = RampSpec {
        load,
        ramp: Ramp::Devices,
        factor: 2.0,
        steps: 4,
        start_devices: 2,
        rules: StopRules::default(),
    };
    let plan: Vec<(usize, f64)> = (0..4).map(|k| plan_step(&spec, k)).collect();
    assert_eq!(plan, [(2, 2.0), (4, 2.0), (7, 2.0), (7, 2.0)]);
}
