//! Drift engine costs: one sample-feature update, and evaluating 10,000 open windows.
//! Run with `cargo bench -p fleetgate --bench drift`; figures go to BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use fleetgate::drift::baseline::{Baseline, FeatureBaseline, PredictionBaseline};
use fleetgate::drift::engine::{ALL, Engine, Event, Settings};
use fleetgate_protocol::{InputSample, ModelMetrics, Telemetry};
use semver::Version;

const FEATURES: usize = 16;

fn settings(window_samples: u64, window_ms: u64) -> Settings {
    Settings {
        window_samples,
        window_ms,
        min_samples: 500,
        psi_alert: 0.1,
        psi_warn_floor: 0.05,
        prediction_js_alert: 0.07,
        confidence_drop_alert: 0.1,
        false_alarm: 0.005,
        resolve_after: 3,
        sequential: true,
        cusum_k: 0.25,
        cusum_h: 1.0,
        device_share: 0.02,
        reservoir: 1000,
    }
}

fn baseline() -> Arc<Baseline> {
    let values: Vec<f64> = (0..10_000)
        .map(|i| ((i * 7919) % 10_000) as f64 / 1000.0 - 5.0)
        .collect();
    Arc::new(Baseline {
        features: (0..FEATURES)
            .map(|i| FeatureBaseline::build(&format!("f{i}"), &values, 10).unwrap())
            .collect(),
        prediction: Some(PredictionBaseline {
            classes: vec![0.7, 0.2, 0.1],
            n: 10_000,
            mean_confidence: Some(0.9),
        }),
    })
}

fn telemetry(rows: usize, salt: u32) -> Telemetry {
    Telemetry {
        boot: 0,
        seq: 0,
        time_ms: 0,
        hw: Default::default(),
        model: Some(ModelMetrics {
            name: "m".into(),
            version: Version::new(1, 0, 0),
            inferences: rows as u32,
            class_counts: vec![7, 2, 1],
            mean_confidence: Some(0.9),
        }),
        samples: (0..rows)
            .map(|r| InputSample {
                values: (0..FEATURES)
                    .map(|f| (((r as u32 * 31 + f as u32 * 17 + salt) % 1000) as f32) / 100.0 - 5.0)
                    .collect(),
                prediction: Some(0),
                confidence: Some(0.9),
            })
            .collect(),
        bins: vec![],
    }
}

fn main() {
    let version = Version::new(1, 0, 0);

    // 1. Cost of one sample-feature update: a device message of 100 samples x 16 features into
    //    one cohort and `all`. Windows never close here, so this is the streaming cost alone.
    let mut e = Engine::new(settings(u64::MAX, u64::MAX), 1);
    e.set_baseline("m", &version, Some(baseline()));
    let messages: Vec<Telemetry> = (0..64).map(|i| telemetry(100, i)).collect();
    for m in &messages {
        e.observe("site-a", "d", m, 0);
    }
    let rounds = 4_000;
    let start = Instant::now();
    for i in 0..rounds {
        black_box(e.observe("site-a", "d", &messages[i % messages.len()], 0));
    }
    let elapsed = start.elapsed();
    // Each message updates two windows (the cohort and `all`).
    let updates = rounds as f64 * 100.0 * FEATURES as f64 * 2.0;
    println!(
        "sample-feature update: {:.1} ns (window counts and reservoir, 2 windows per message)",
        elapsed.as_nanos() as f64 / updates
    );

    // 2. Evaluating open windows, all closing on one timer tick. A window is one feature of one
    //    model version and cohort: 625 cohorts x 16 features = 10,000 windows. Also 10,000
    //    cohorts x 16 features, for a sense of scale.
    for cohorts in [625usize, 10_000] {
        let mut e = Engine::new(settings(u64::MAX, 1_000), 2);
        e.set_baseline("m", &version, Some(baseline()));
        let small = telemetry(10, 3);
        for c in 0..cohorts - 1 {
            e.observe(&format!("c{c}"), "d", &small, 0);
        }
        let start = Instant::now();
        let events = e.tick(10_000);
        let elapsed = start.elapsed();
        println!(
            "evaluate {} feature windows ({} cohorts x {FEATURES} features, with predictions): {:.1} ms",
            events.len() * FEATURES,
            events.len(),
            elapsed.as_secs_f64() * 1000.0
        );
    }

    // 3. Judging windows big enough for a verdict: the first window of a (bins, n, m) draws
    //    its null distribution (4000 simulated windows); later ones find it cached.
    for bins in [10usize, 100] {
        let values: Vec<f64> = (0..20_000)
            .map(|i| ((i * 7919) % 20_000) as f64 / 2000.0 - 5.0)
            .collect();
        let b = Arc::new(Baseline {
            features: (0..FEATURES)
                .map(|i| FeatureBaseline::build(&format!("f{i}"), &values, bins).unwrap())
                .collect(),
            prediction: None,
        });
        let mut e = Engine::new(settings(1000, u64::MAX), 3);
        e.set_baseline("m", &version, Some(b));
        let message = telemetry(100, 5);
        let mut times = Vec::new();
        for w in 0..3 {
            for _ in 0..9 {
                e.observe(ALL, "d", &message, 0);
            }
            let start = Instant::now();
            let (events, _) = e.observe(ALL, "d", &message, 0);
            times.push(start.elapsed());
            assert!(
                matches!(events.first(), Some(Event::Closed { .. })),
                "window {w}"
            );
        }
        println!(
            "close and judge {FEATURES} features of {bins} bins (1000 samples): first {:.1} ms (null simulated, {} cached), then {:.3} ms",
            times[0].as_secs_f64() * 1000.0,
            e.nulls_cached(),
            times[2].as_secs_f64() * 1000.0
        );
    }
}
