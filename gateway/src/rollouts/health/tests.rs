use fleetgate_config::Config;

use super::*;

fn gates() -> Gates {
    let mut g = Config::default().rollouts.policy.gates;
    g.window = Duration::from_secs(10);
    g.min_devices = 3;
    g.min_samples = 30;
    g
}

fn sample(latency: u32, classes: [u32; 3], confidence: f32) -> Sample {
    Sample {
        latency_us: Some(latency),
        free_mem_bytes: Some(160_000),
        temp_c: Some(42.0),
        power_mw: Some(180.0),
        class_counts: classes.to_vec(),
        inferences: classes.iter().sum(),
        mean_confidence: Some(confidence),
    }
}

/// 5 devices per cohort, 10 messages each, over the first second; `updated` and `control`
/// make each message.
fn feed(h: &mut Health, updated: impl Fn(u32) -> Sample, control: impl Fn(u32) -> Sample) {
    for m in 0..10u32 {
        for d in 0..5u32 {
            let at = u64::from(m * 100 + d);
            h.telemetry(&format!("u{d}"), Cohort::Updated, &updated(m * 5 + d), at);
            h.telemetry(&format!("c{d}"), Cohort::Control, &control(m * 5 + d), at);
        }
    }
}

fn verdict(evals: &[GateEval], gate: Gate) -> Verdict {
    evals.iter().find(|e| e.gate == gate).unwrap().verdict
}

fn normal(i: u32) -> Sample {
    // Latency spread 11.0 to 13.9 ms; classes 14/4/2 of 20.
    sample(11_000 + (i % 30) * 100, [14, 4, 2], 0.9)
}

#[test]
fn like_cohorts_pass_every_gate() {
    let mut h = Health::new(Duration::from_secs(10));
    feed(&mut h, normal, normal);
    let e = h.evaluate(&gates(), 1_000, true, &DriftInput::Off);
    for gate in [
        Gate::AlertRate,
        Gate::LatencyP95,
        Gate::FreeMemory,
        Gate::Temperature,
        Gate::Power,
        Gate::Predictions,
        Gate::Confidence,
    ] {
        assert_eq!(verdict(&e, gate), Verdict::Pass, "{gate:?}: {e:#?}");
    }
    assert_eq!(verdict(&e, Gate::Drift), Verdict::Off);
    let l = e.iter().find(|e| e.gate == Gate::LatencyP95).unwrap();
    assert_eq!((l.updated_n, l.control_n), (50, 50));
    assert_eq!((l.updated_devices, l.control_devices), (5, 5));
    // p95 of 11.0..13.9 ms, to the histogram's 1 % precision.
    let p95 = l.updated.unwrap();
    assert!((13_600.0..=13_900.0).contains(&p95), "{p95}");
}

#[test]
fn doubled_latency_fails_that_gate_only() {
    let mut h = Health::new(Duration::from_secs(10));
    feed(
        &mut h,
        |i| {
            let mut s = normal(i);
            s.latency_us = s.latency_us.map(|l| l * 2);
            s
        },
        normal,
    );
    let e = h.evaluate(&gates(), 1_000, true, &DriftInput::Off);
    assert_eq!(verdict(&e, Gate::LatencyP95), Verdict::Failing);
    assert_eq!(verdict(&e, Gate::AlertRate), Verdict::Pass);
    assert_eq!(verdict(&e, Gate::Predictions), Verdict::Pass);
}

#[test]
fn alerts_on_the_updated_side_fail_the_alert_gate() {
    let mut h = Health::new(Duration::from_secs(10));
    feed(&mut h, normal, normal);
    for d in 0..5 {
        h.alert(&format!("u{d}"), Cohort::Updated, 500);
    }
    h.alert("c0", Cohort::Control, 500);
    let e = h.evaluate(&gates(), 1_000, true, &DriftInput::Off);
    let a = e.iter().find(|e| e.gate == Gate::AlertRate).unwrap();
    assert_eq!(a.verdict, Verdict::Failing, "{a:?}");
    assert_eq!(a.updated, Some(0.1));
    assert_eq!(a.control, Some(0.02));
    // 2 x (1 + 1) / 50.
    assert!((a.threshold - 0.08).abs() < 1e-12);
    // Two alerts against one is within the allowed ratio (and under min_alerts).
    let mut h = Health::new(Duration::from_secs(10));
    feed(&mut h, normal, normal);
    h.alert("u0", Cohort::Updated, 500);
    h.alert("u1", Cohort::Updated, 500);
    h.alert("c0", Cohort::Control, 500);
    let e = h.evaluate(&gates(), 1_000, true, &DriftInput::Off);
    assert_eq!(verdict(&e, Gate::AlertRate), Verdict::Pass);
}

#[test]
fn a_prediction_shift_on_one_side_fails_but_a_fleet_wide_one_does_not() {
    let shifted = |i| {
        let mut s = normal(i);
        s.class_counts = vec![6, 8, 6];
        s
    };
    let mut h = Health::new(Duration::from_secs(10));
    feed(&mut h, shifted, normal);
    let e = h.evaluate(&gates(), 1_000, true, &DriftInput::Off);
    assert_eq!(verdict(&e, Gate::Predictions), Verdict::Failing);

    let mut h = Health::new(Duration::from_secs(10));
    feed(&mut h, shifted, shifted);
    let e = h.evaluate(&gates(), 1_000, true, &DriftInput::Off);
    assert_eq!(verdict(&e, Gate::Predictions), Verdict::Pass);
}

#[test]
fn a_confidence_drop_fails_the_confidence_gate() {
    let mut h = Health::new(Duration::from_secs(10));
    feed(&mut h, |_| sample(12_000, [14, 4, 2], 0.8), normal);
    let e = h.evaluate(&gates(), 1_000, true, &DriftInput::Off);
    let c = e.iter().find(|e| e.gate == Gate::Confidence).unwrap();
    assert_eq!(c.verdict, Verdict::Failing);
    assert!((c.threshold - 0.85).abs() < 1e-6, "{c:?}");
}

#[test]
fn few_devices_is_insufficient_and_no_control_is_said_so() {
    let mut h = Health::new(Duration::from_secs(10));
    for m in 0..40 {
        h.telemetry("u0", Cohort::Updated, &normal(m), u64::from(m));
        h.telemetry("c0", Cohort::Control, &normal(m), u64::from(m));
    }
    let e = h.evaluate(&gates(), 100, true, &DriftInput::Off);
    assert_eq!(verdict(&e, Gate::LatencyP95), Verdict::Insufficient);
    let e = h.evaluate(&gates(), 100, false, &DriftInput::Off);
    assert_eq!(verdict(&e, Gate::LatencyP95), Verdict::NoControl);
}

#[test]
fn data_leaves_the_window() {
    let mut h = Health::new(Duration::from_secs(10));
    feed(
        &mut h,
        |i| {
            let mut s = normal(i);
            s.latency_us = s.latency_us.map(|l| l * 3);
            s
        },
        normal,
    );
    assert_eq!(
        verdict(
            &h.evaluate(&gates(), 1_000, true, &DriftInput::Off),
            Gate::LatencyP95
        ),
        Verdict::Failing
    );
    // 11 s later the slow second is gone: nobody left on either side.
    let e = h.evaluate(&gates(), 12_000, true, &DriftInput::Off);
    let l = e.iter().find(|e| e.gate == Gate::LatencyP95).unwrap();
    assert_eq!(l.verdict, Verdict::Off);
    assert_eq!((l.updated_devices, l.control_devices), (0, 0));
}

#[test]
fn the_drift_gate_follows_the_drift_engine() {
    let mut h = Health::new(Duration::from_secs(10));
    feed(&mut h, normal, normal);
    let worse = DriftInput::Compared(Comparison {
        features: vec![2],
        prediction: false,
    });
    let same = DriftInput::Compared(Comparison {
        features: vec![],
        prediction: false,
    });
    let e = h.evaluate(&gates(), 1_000, true, &worse);
    assert_eq!(verdict(&e, Gate::Drift), Verdict::Failing);
    let e = h.evaluate(&gates(), 1_000, true, &same);
    assert_eq!(verdict(&e, Gate::Drift), Verdict::Pass);
    let e = h.evaluate(&gates(), 1_000, true, &DriftInput::Unknown);
    assert_eq!(verdict(&e, Gate::Drift), Verdict::Off);
}
