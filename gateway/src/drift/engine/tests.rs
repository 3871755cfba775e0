use fleetgate_protocol::{FeatureBins, InputSample, ModelMetrics};

use super::*;
use crate::drift::baseline::{FeatureBaseline, PredictionBaseline};

/// Deterministic normal samples (xorshift + Box-Muller), independent of any RNG crate.
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

const FEATURES: usize = 3;

fn baseline() -> Arc<Baseline> {
    let mut g = Normal(7);
    let features = (0..FEATURES)
        .map(|i| {
            let values: Vec<f64> = (0..20_000).map(|_| g.next()).collect();
            FeatureBaseline::build(&format!("f{i}"), &values, 10).unwrap()
        })
        .collect();
    Arc::new(Baseline {
        features,
        prediction: Some(PredictionBaseline {
            classes: vec![0.7, 0.2, 0.1],
            n: 20_000,
            mean_confidence: Some(0.9),
        }),
    })
}

fn settings() -> Settings {
    Settings {
        window_samples: 1000,
        window_ms: 3_600_000,
        min_samples: 500,
        psi_alert: 0.25,
        psi_warn_floor: 0.1,
        prediction_js_alert: 0.1,
        confidence_drop_alert: 0.1,
        reservoir: 50,
    }
}

fn version() -> Version {
    Version::new(1, 0, 0)
}

fn engine() -> Engine {
    let mut e = Engine::new(settings(), 42);
    e.set_baseline("kws", &version(), Some(baseline()));
    e
}

/// A telemetry message of `rows` samples, `shift` added to feature `shifted`, and class counts.
fn telemetry(
    g: &mut Normal,
    rows: usize,
    shifted: Option<(usize, f64)>,
    classes: Vec<u32>,
) -> Telemetry {
    let samples = (0..rows)
        .map(|_| InputSample {
            values: (0..FEATURES)
                .map(|f| (g.next() + shifted.filter(|s| s.0 == f).map_or(0.0, |s| s.1)) as f32)
                .collect(),
            prediction: Some(0),
            confidence: Some(0.9),
        })
        .collect();
    let inferences = classes.iter().sum();
    Telemetry {
        boot: 0,
        seq: 0,
        time_ms: 0,
        hw: Default::default(),
        model: Some(ModelMetrics {
            name: "kws".into(),
            version: version(),
            inferences,
            class_counts: classes,
            mean_confidence: Some(0.9),
        }),
        samples,
        bins: vec![],
    }
}

/// Runs `windows` windows of 1000 samples and returns the raise/resolve events.
fn run(
    e: &mut Engine,
    g: &mut Normal,
    windows: usize,
    shifted: Option<(usize, f64)>,
    classes: [u32; 3],
) -> Vec<(Subject, bool)> {
    let mut out = Vec::new();
    for _ in 0..windows * 10 {
        let (events, _) = e.observe(ALL, "d1", &telemetry(g, 100, shifted, classes.to_vec()), 0);
        for ev in events {
            match ev {
                Event::Raise { subject, .. } => out.push((subject, true)),
                Event::Resolve { subject, .. } => out.push((subject, false)),
                Event::Closed { .. } => {}
            }
        }
    }
    out
}

#[test]
fn no_false_alarms_over_a_long_quiet_run() {
    let mut e = engine();
    let mut g = Normal(99);
    // 100 windows of 1000 samples drawn like the baseline; classes as in the reference.
    assert_eq!(run(&mut e, &mut g, 100, None, [70, 20, 10]), vec![]);
    let last = e
        .stream(&StreamKey {
            model: "kws".into(),
            version: version(),
            cohort: ALL.into(),
        })
        .unwrap();
    assert!(last.feature_status.iter().all(|s| *s != Status::Alert));
}

#[test]
fn a_shifted_feature_alerts_after_two_of_three_windows_and_resolves() {
    let mut e = engine();
    let mut g = Normal(5);
    assert_eq!(run(&mut e, &mut g, 3, None, [70, 20, 10]), vec![]);
    // One shifted window is not enough; the second raises, on feature 1 only.
    assert_eq!(run(&mut e, &mut g, 1, Some((1, 1.0)), [70, 20, 10]), vec![]);
    assert_eq!(
        run(&mut e, &mut g, 1, Some((1, 1.0)), [70, 20, 10]),
        vec![(Subject::Feature(1), true)]
    );
    assert_eq!(run(&mut e, &mut g, 3, Some((1, 1.0)), [70, 20, 10]), vec![]);
    // Back to normal: still 2 of the last 3 over after one window, resolved after the second.
    assert_eq!(run(&mut e, &mut g, 1, None, [70, 20, 10]), vec![]);
    assert_eq!(
        run(&mut e, &mut g, 1, None, [70, 20, 10]),
        vec![(Subject::Feature(1), false)]
    );
    let key = StreamKey {
        model: "kws".into(),
        version: version(),
        cohort: ALL.into(),
    };
    let view = e.stream(&key).unwrap();
    let last = view.last.unwrap();
    let f1 = &last.features[1];
    assert_eq!((f1.n, f1.verdict), (1000, Verdict::Ok));
    assert!(f1.psi < f1.warn_threshold, "{f1:?}");
}

#[test]
fn a_prediction_shift_or_a_confidence_drop_alerts_on_predictions() {
    let mut e = engine();
    let mut g = Normal(11);
    assert_eq!(
        run(&mut e, &mut g, 2, None, [30, 40, 30]),
        vec![(Subject::Prediction, true)]
    );
    let key = StreamKey {
        model: "kws".into(),
        version: version(),
        cohort: ALL.into(),
    };
    let p = e
        .stream(&key)
        .unwrap()
        .last
        .unwrap()
        .prediction
        .clone()
        .unwrap();
    assert_eq!(p.n, 1000);
    assert!(p.js > p.js_threshold && p.l_inf > 0.39, "{p:?}");
    assert_eq!(
        run(&mut e, &mut g, 2, None, [70, 20, 10]),
        vec![(Subject::Prediction, false)]
    );
}

#[test]
fn windows_below_the_minimum_get_no_verdict() {
    let mut e = engine();
    let mut g = Normal(3);
    // Heavily shifted but tiny windows, closed by time: never judged, never alerted.
    for i in 0..10u64 {
        let (events, _) = e.observe(
            ALL,
            "d1",
            &telemetry(&mut g, 100, Some((0, 5.0)), vec![70, 20, 10]),
            i * 3_600_000,
        );
        assert!(events.is_empty());
        let closed = e.tick((i + 1) * 3_600_000);
        assert!(
            matches!(&closed[..], [Event::Closed { evaluation, .. }] if evaluation.features[0].verdict == Verdict::Insufficient && evaluation.features[0].psi > 1.0)
        );
    }
}

#[test]
fn device_bin_counts_merge_with_raw_samples() {
    let mut a = engine();
    let mut b = engine();
    let mut g = Normal(17);
    let tel = telemetry(&mut g, 1000, None, vec![700, 200, 100]);
    let (ea, _) = a.observe(ALL, "d1", &tel, 0);
    // The same inputs as counts per bin, from a device that knows the edges.
    let base = baseline();
    let mut counts = vec![vec![0u32; 10]; FEATURES];
    for s in &tel.samples {
        for (f, v) in s.values.iter().enumerate() {
            counts[f][bin_of(&base.features[f].edges, f64::from(*v))] += 1;
        }
    }
    let binned = Telemetry {
        samples: vec![],
        bins: counts
            .into_iter()
            .enumerate()
            .map(|(f, c)| FeatureBins {
                feature: f as u16,
                counts: c,
            })
            .collect(),
        ..tel.clone()
    };
    let (eb, observed) = b.observe(ALL, "d1", &binned, 0);
    assert_eq!(observed.mismatched, 0);
    let psi = |events: &[Event]| match &events[0] {
        Event::Closed { evaluation, .. } => evaluation
            .features
            .iter()
            .map(|f| f.psi)
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(psi(&ea), psi(&eb));
    // Counts of the wrong shape, and samples of the wrong width, are counted and skipped.
    let bad = Telemetry {
        bins: vec![
            FeatureBins {
                feature: 0,
                counts: vec![1; 3],
            },
            FeatureBins {
                feature: 9,
                counts: vec![1; 10],
            },
        ],
        samples: vec![InputSample {
            values: vec![1.0],
            prediction: None,
            confidence: None,
        }],
        ..binned
    };
    assert_eq!(b.observe(ALL, "d1", &bad, 0).1.mismatched, 3);
}

#[test]
fn cohorts_feed_their_own_stream_and_all() {
    let mut e = engine();
    let mut g = Normal(23);
    let (events, _) = e.observe(
        "site-a",
        "d1",
        &telemetry(&mut g, 1000, None, vec![700, 200, 100]),
        0,
    );
    let closed: Vec<&str> = events
        .iter()
        .filter_map(|ev| match ev {
            Event::Closed { key, .. } => Some(key.cohort.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(closed, ["all", "site-a"]);
}

#[test]
fn the_reservoir_is_bounded_and_keeps_late_rows() {
    let mut e = engine();
    let mut g = Normal(29);
    for i in 0..40u64 {
        let mut tel = telemetry(&mut g, 100, None, vec![70, 20, 10]);
        for s in &mut tel.samples {
            s.values[0] = i as f32;
        }
        e.observe(ALL, &format!("d{i}"), &tel, i);
    }
    let key = StreamKey {
        model: "kws".into(),
        version: version(),
        cohort: ALL.into(),
    };
    let (_, rows) = e.reservoir(&key).unwrap();
    assert_eq!(rows.len(), 50);
    let late = rows.iter().filter(|r| r.values[0] >= 20.0).count();
    // Uniform over 4000 rows: about half from the second half (25 expected).
    assert!(
        (15..=35).contains(&late),
        "{late} of 50 rows from the second half"
    );
}

#[test]
fn verdicts_survive_a_restart() {
    let mut e = engine();
    let mut g = Normal(31);
    let key = StreamKey {
        model: "kws".into(),
        version: version(),
        cohort: ALL.into(),
    };
    let mut history = Vec::new();
    for _ in 0..20 {
        let (events, _) = e.observe(
            ALL,
            "d1",
            &telemetry(&mut g, 100, Some((2, 1.0)), vec![70, 20, 10]),
            0,
        );
        for ev in events {
            if let Event::Closed { evaluation, .. } = ev {
                history.push(evaluation);
            }
        }
    }
    assert_eq!(history.len(), 2);
    // A new engine restored from the stored windows resolves without raising again.
    let mut e = engine();
    e.restore(key, history);
    assert_eq!(run(&mut e, &mut g, 1, None, [70, 20, 10]), vec![]);
    assert_eq!(
        run(&mut e, &mut g, 1, None, [70, 20, 10]),
        vec![(Subject::Feature(2), false)]
    );
}

#[test]
fn a_cohort_is_worse_only_when_its_drift_is_its_own() {
    let mut e = engine();
    let mut g = Normal(37);
    let key = |c: &str| StreamKey {
        model: "kws".into(),
        version: version(),
        cohort: c.into(),
    };
    let feed = |e: &mut Engine, g: &mut Normal, cohort: &str, shifted: Option<(usize, f64)>| {
        for _ in 0..10 {
            e.observe(
                cohort,
                "d",
                &telemetry(g, 100, shifted, vec![70, 20, 10]),
                0,
            );
        }
    };
    assert_eq!(
        e.worse(&key("canary"), &key("control")),
        None,
        "nothing judged yet"
    );
    // Only the canary's inputs shifted: it is worse, on feature 0.
    feed(&mut e, &mut g, "canary", Some((0, 1.0)));
    feed(&mut e, &mut g, "control", None);
    let c = e.worse(&key("canary"), &key("control")).unwrap();
    assert_eq!(
        (c.features.clone(), c.prediction, c.is_worse()),
        (vec![0], false, true)
    );
    assert!(!e.worse(&key("control"), &key("canary")).unwrap().is_worse());
    // Everyone shifted the same way: no cohort is worse than the other.
    feed(&mut e, &mut g, "canary", Some((0, 1.0)));
    feed(&mut e, &mut g, "control", Some((0, 1.0)));
    assert!(!e.worse(&key("canary"), &key("control")).unwrap().is_worse());
}
