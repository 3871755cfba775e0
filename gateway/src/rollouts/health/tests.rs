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
    // Every updated device: 1 alert in 10 messages. The control's one alerting device is
    // trimmed (one device of 5 at each end), so its rate is 0.
    assert!((a.updated.unwrap() - 0.1).abs() < 1e-12, "{a:?}");
    assert_eq!(a.control, Some(0.0));
    // 2 x (0 + 1 / 50).
    assert!((a.threshold - 0.04).abs() < 1e-12);
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

/// 25 devices a side over 20 seconds; `updated` and `control` make each message, and
/// `mallory` (if any) is one more device on `side` sending what `hostile` makes, 50 times as
/// often as the others.
fn fleet(
    updated: impl Fn(u32) -> Sample,
    control: impl Fn(u32) -> Sample,
    mallory: Option<(Cohort, &dyn Fn(u32) -> Sample)>,
) -> Vec<GateEval> {
    let mut h = Health::new(Duration::from_secs(60));
    let mut g = gates();
    g.window = Duration::from_secs(60);
    for m in 0..20u32 {
        for d in 0..25u32 {
            let at = u64::from(m * 1000 + d);
            let i = m * 25 + d;
            h.telemetry(&format!("u{d}"), Cohort::Updated, &updated(i), at);
            h.telemetry(&format!("c{d}"), Cohort::Control, &control(i), at);
        }
        if let Some((side, hostile)) = mallory {
            for k in 0..50 {
                h.telemetry(
                    "mallory",
                    side,
                    &hostile(m * 50 + k),
                    u64::from(m * 1000 + 30),
                );
            }
        }
    }
    h.evaluate(&g, 20_000, true, &DriftInput::Off)
}

fn verdicts(e: &[GateEval]) -> Vec<(Gate, Verdict)> {
    e.iter().map(|e| (e.gate, e.verdict)).collect()
}

/// Issue 13: one device of 50 sending extreme values (a temperature of -1e30, a latency of 0,
/// counts for 256 classes, a confidence of -3, or the most extreme values the protocol lets
/// through) changes no gate's verdict, on either side, for a good release or a bad one.
#[test]
fn one_hostile_device_of_fifty_changes_no_gate_verdict() {
    let hostile: [&dyn Fn(u32) -> Sample; 2] = [
        &|_| Sample {
            latency_us: Some(0),
            free_mem_bytes: Some(u64::MAX),
            temp_c: Some(-1e30),
            power_mw: Some(f32::INFINITY),
            class_counts: vec![5000; 256],
            inferences: 5000 * 256,
            mean_confidence: Some(-3.0),
        },
        // Within every plausible range, at the far end.
        &|_| Sample {
            latency_us: Some(1),
            free_mem_bytes: Some(1 << 40),
            temp_c: Some(-100.0),
            power_mw: Some(0.0),
            class_counts: (0..256)
                .map(|c| if c == 255 { 100_000 } else { 0 })
                .collect(),
            inferences: 100_000,
            mean_confidence: Some(0.0),
        },
    ];
    let bad = |i: u32| {
        let mut s = normal(i);
        s.latency_us = s.latency_us.map(|l| l * 2);
        s.temp_c = Some(60.0);
        s.power_mw = Some(300.0);
        s.free_mem_bytes = Some(60_000);
        s.class_counts = vec![6, 8, 6];
        s.mean_confidence = Some(0.7);
        s
    };
    let good_run = fleet(normal, normal, None);
    let bad_run = fleet(bad, normal, None);
    let moving = [
        Gate::LatencyP95,
        Gate::FreeMemory,
        Gate::Temperature,
        Gate::Power,
        Gate::Predictions,
        Gate::Confidence,
    ];
    for gate in moving {
        assert_eq!(verdict(&good_run, gate), Verdict::Pass, "{gate:?}");
        assert_eq!(verdict(&bad_run, gate), Verdict::Failing, "{gate:?}");
    }
    for (i, h) in hostile.iter().enumerate() {
        for side in [Cohort::Updated, Cohort::Control] {
            let good = fleet(normal, normal, Some((side, *h)));
            let bad = fleet(bad, normal, Some((side, *h)));
            assert_eq!(
                verdicts(&good),
                verdicts(&good_run),
                "{i} {side:?}: {good:#?}"
            );
            assert_eq!(verdicts(&bad), verdicts(&bad_run), "{i} {side:?}: {bad:#?}");
        }
    }
}

#[test]
fn without_trimming_one_device_does_move_a_gate() {
    // What the trim is for: with device_trim = 0, one device at -100 C among 10 at 42 C pulls
    // the control's mean temperature down far enough to fail a good release.
    let mut h = Health::new(Duration::from_secs(60));
    let mut g = gates();
    g.device_trim = 0.0;
    for m in 0..20u32 {
        for d in 0..10u32 {
            let at = u64::from(m * 100 + d);
            h.telemetry(&format!("u{d}"), Cohort::Updated, &normal(m), at);
            h.telemetry(&format!("c{d}"), Cohort::Control, &normal(m), at);
        }
        let mut cold = normal(m);
        cold.temp_c = Some(-100.0);
        h.telemetry("mallory", Cohort::Control, &cold, u64::from(m * 100 + 30));
    }
    let e = h.evaluate(&g, 2_000, true, &DriftInput::Off);
    assert_eq!(verdict(&e, Gate::Temperature), Verdict::Failing);
    g.device_trim = 0.1;
    let e = h.evaluate(&g, 2_000, true, &DriftInput::Off);
    assert_eq!(verdict(&e, Gate::Temperature), Verdict::Pass);
}
