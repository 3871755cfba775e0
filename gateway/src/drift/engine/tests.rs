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
        reservoir: 50,
    }
}

fn version() -> Version {
    Version::new(1, 0, 0)
}

fn key() -> StreamKey {
    StreamKey {
        model: "kws".into(),
        version: version(),
        cohort: ALL.into(),
    }
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
    let last = e.stream(&key()).unwrap();
    assert!(
        last.feature_status()
            .iter()
            .all(|s| *s == Status::Ok || *s == Status::Warn)
    );
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
    // Back to normal: resolved after 3 clean windows in a row (hysteresis), not before.
    assert_eq!(run(&mut e, &mut g, 2, None, [70, 20, 10]), vec![]);
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
    let f1 = view.last_features[1].as_ref().unwrap();
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
    let p = e.stream(&key).unwrap().last_prediction.unwrap().clone();
    assert_eq!(p.n, 1000);
    assert!(p.js > p.js_threshold && p.l_inf > 0.39, "{p:?}");
    assert_eq!(
        run(&mut e, &mut g, 3, None, [70, 20, 10]),
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
    assert_eq!(run(&mut e, &mut g, 2, None, [70, 20, 10]), vec![]);
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

/// Runs `windows` windows with a `shift` on feature 0 and returns the window index (1-based)
/// of the first raise on it, if any.
fn first_raise(e: &mut Engine, g: &mut Normal, windows: usize, shift: f64) -> Option<usize> {
    for w in 1..=windows {
        let raised = run(e, g, 1, Some((0, shift)), [70, 20, 10]);
        if raised.contains(&(Subject::Feature(0), true)) {
            return Some(w);
        }
    }
    None
}

#[test]
fn half_a_standard_deviation_is_caught_within_two_windows() {
    // Issue 14: the fixed floors (PSI 0.25) let 11 of 24 runs miss it. 20 seeded runs.
    for seed in 0..20 {
        let mut e = engine();
        let mut g = Normal(1000 + seed);
        assert_eq!(first_raise(&mut e, &mut g, 2, 0.5), Some(2), "seed {seed}");
    }
}

#[test]
fn a_quarter_standard_deviation_is_caught_by_the_cusum_and_not_without_it() {
    for seed in 0..10 {
        let mut e = engine();
        let mut g = Normal(2000 + seed);
        let at = first_raise(&mut e, &mut g, 10, 0.25);
        assert!(at.is_some_and(|w| w <= 10), "seed {seed}: {at:?}");
        let key = key();
        let view = e.stream(&key).unwrap();
        assert_eq!(view.features[0].status, Status::Alert);
    }
    let mut s = settings();
    s.sequential = false;
    let mut e = Engine::new(s, 1);
    e.set_baseline("kws", &version(), Some(baseline()));
    let mut g = Normal(2000);
    assert_eq!(first_raise(&mut e, &mut g, 10, 0.25), None);
}

#[test]
fn a_steady_shift_near_the_threshold_opens_one_alert_and_it_resolves_once() {
    // Issue 14: a steady shift opened 5 alerts in 24 windows (over, not over, over...).
    let mut e = engine();
    let mut g = Normal(77);
    let events = run(&mut e, &mut g, 24, Some((0, 0.3)), [70, 20, 10]);
    assert_eq!(events, vec![(Subject::Feature(0), true)]);
    let events = run(&mut e, &mut g, 10, None, [70, 20, 10]);
    assert_eq!(events, vec![(Subject::Feature(0), false)]);
    let view = e.stream(&key()).unwrap();
    assert_eq!(view.features[0].status, Status::Ok);
}

#[test]
fn features_and_predictions_close_on_their_own_counts() {
    // Issue 14: class counts for every inference and a few raw inputs: the prediction window
    // filled first and took the features with it, always "insufficient". A 3 sd shift went
    // unnoticed.
    let mut e = engine();
    let mut g = Normal(41);
    let mut raised = Vec::new();
    let mut closed_features = 0;
    let mut closed_predictions = 0;
    for i in 0..400u64 {
        let tel = telemetry(&mut g, 10, Some((1, 3.0)), vec![700, 200, 100]);
        let (events, _) = e.observe(ALL, "d1", &tel, i);
        for ev in events {
            match ev {
                Event::Closed { evaluation, .. } => {
                    closed_features += usize::from(!evaluation.features.is_empty());
                    closed_predictions += usize::from(evaluation.prediction.is_some());
                    for f in &evaluation.features {
                        assert_eq!((f.n, f.verdict == Verdict::Insufficient), (1000, false));
                    }
                }
                Event::Raise { subject, .. } => raised.push(subject),
                Event::Resolve { .. } => {}
            }
        }
    }
    // 4000 raw samples: 4 feature windows; 400,000 predictions: 400 prediction windows.
    assert_eq!((closed_features, closed_predictions), (4, 400));
    assert_eq!(raised, vec![Subject::Feature(1)]);
}

#[test]
fn insufficient_is_a_status_and_features_without_data_have_no_window() {
    let mut e = engine();
    let mut g = Normal(43);
    // Class counts only: the features never open a window.
    let tel = telemetry(&mut g, 0, None, vec![70, 20, 10]);
    e.observe(ALL, "d1", &tel, 0);
    let view = e.stream(&key()).unwrap();
    assert_eq!(view.features[0].status, Status::Insufficient);
    assert_eq!(view.features[0].open_samples, 0);
    assert!(view.last_features.iter().all(Option::is_none));
    // A window closed by time with too few samples: insufficient, and so is the status.
    e.observe(
        ALL,
        "d1",
        &telemetry(&mut g, 100, None, vec![70, 20, 10]),
        1,
    );
    let events = e.tick(3_600_001);
    assert_eq!(events.len(), 1);
    let view = e.stream(&key()).unwrap();
    let last = view.last_features[0].as_ref().unwrap();
    assert_eq!((last.n, last.verdict), (100, Verdict::Insufficient));
    assert_eq!(view.features[0].status, Status::Insufficient);
    assert_eq!(Status::Insufficient.gauge(), -1);
}

#[test]
fn a_samples_prediction_feeds_the_prediction_window_when_there_are_no_class_counts() {
    let mut e = engine();
    let mut g = Normal(47);
    // Samples predicted as class 0 with confidence 0.9, no class counts: 1000 of them close
    // the prediction window, all class 0 against a 70 % reference.
    let mut tel = telemetry(&mut g, 250, None, vec![]);
    if let Some(m) = &mut tel.model {
        m.mean_confidence = None;
    }
    let mut prediction = None;
    for i in 0..4 {
        let (events, _) = e.observe(ALL, "d1", &tel, i);
        for ev in events {
            if let Event::Closed { evaluation, .. } = ev {
                prediction = evaluation.prediction.or(prediction);
            }
        }
    }
    let p = prediction.unwrap();
    assert_eq!(p.n, 1000);
    assert!((p.l_inf - 0.3).abs() < 1e-12, "{p:?}");
    assert!((p.mean_confidence.unwrap() - 0.9).abs() < 1e-6, "{p:?}");
}

#[test]
fn a_mismatch_is_counted_once_however_many_cohorts_the_message_feeds() {
    let mut e = engine();
    let bad = Telemetry {
        samples: vec![InputSample {
            values: vec![1.0],
            prediction: None,
            confidence: None,
        }],
        ..telemetry(&mut Normal(1), 0, None, vec![1])
    };
    assert_eq!(e.observe("site-a", "d1", &bad, 0).1.mismatched, 1);
}

#[test]
fn open_windows_and_alert_episodes_survive_a_restart() {
    let mut g = Normal(53);
    let messages: Vec<Telemetry> = (0..35)
        .map(|_| telemetry(&mut g, 100, Some((0, 1.0)), vec![70, 20, 10]))
        .collect();
    // Uninterrupted: 35 messages of 100 samples, 3 windows closed and 500 samples open.
    let mut a = engine();
    let mut raised_a = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        for ev in a.observe(ALL, "d1", m, i as u64).0 {
            if let Event::Raise { subject, .. } = ev {
                raised_a.push(subject);
            }
        }
    }
    // Interrupted after 25 messages (an alert is open, a window half full).
    let mut b = engine();
    for (i, m) in messages[..25].iter().enumerate() {
        b.observe(ALL, "d1", m, i as u64);
    }
    let saved = b.save_dirty();
    assert_eq!(saved.len(), 1);
    assert!(b.save_dirty().is_empty(), "nothing changed since");
    let mut c = engine();
    for (key, state) in saved {
        c.restore_state(key, state);
    }
    let mut raised_c = Vec::new();
    for (i, m) in messages[25..].iter().enumerate() {
        for ev in c.observe(ALL, "d1", m, 25 + i as u64).0 {
            if let Event::Raise { subject, .. } = ev {
                raised_c.push(subject);
            }
        }
    }
    // The restarted engine raised nothing again and has the same open window.
    assert_eq!(raised_a, vec![Subject::Feature(0)]);
    assert_eq!(raised_c, vec![]);
    let (va, vc) = (a.stream(&key()).unwrap(), c.stream(&key()).unwrap());
    assert_eq!(va.features, vc.features);
    assert_eq!(va.features[0].open_samples, 500);
    assert_eq!(va.last_features, vc.last_features);
    // A state saved under another baseline is not used.
    let mut d = engine();
    let state = a.save_dirty().remove(0).1;
    let mut other = (*baseline()).clone();
    other.features[0].edges[0] -= 0.01;
    d.set_baseline("kws", &version(), Some(Arc::new(other)));
    d.restore_state(key(), state);
    d.observe(ALL, "d1", &messages[0], 0);
    assert_eq!(d.stream(&key()).unwrap().features[0].open_samples, 100);
}

/// Issue 13: one device of 50 sends extreme inputs (every value 1e30, in the top bin),
/// predictions over 256 classes and a confidence of -3 (refused at decoding; left out here),
/// as much as it may: no window's verdict changes, and no alert rises.
#[test]
fn one_hostile_device_of_fifty_moves_no_drift_verdict() {
    type Closings = Vec<(Vec<Verdict>, Option<Verdict>)>;
    let run_fleet = |hostile: bool, share: f64, first: bool| -> (Closings, Vec<Subject>) {
        let mut s = settings();
        s.device_share = share;
        let mut e = Engine::new(s, 42);
        e.set_baseline("kws", &version(), Some(baseline()));
        let mut g = Normal(61);
        let mut verdicts = Vec::new();
        let mut raised = Vec::new();
        let mut record = |events: Vec<Event>| {
            for ev in events {
                match ev {
                    Event::Closed { evaluation, .. } => verdicts.push((
                        evaluation.features.iter().map(|f| f.verdict).collect(),
                        evaluation.prediction.map(|p| p.verdict),
                    )),
                    Event::Raise { subject, .. } => raised.push(subject),
                    Event::Resolve { .. } => {}
                }
            }
        };
        let mut t = 0;
        let hostile_message = |e: &mut Engine, g: &mut Normal, t: u64| {
            let mut tel = telemetry(g, 256, None, vec![5000; 256]);
            for s in &mut tel.samples {
                s.values = vec![1e30; FEATURES];
                s.confidence = Some(-3.0);
            }
            if let Some(m) = &mut tel.model {
                m.inferences = 5000 * 256;
                m.mean_confidence = Some(-3.0);
            }
            e.observe(ALL, "mallory", &tel, t).0
        };
        for _ in 0..40 {
            if hostile && first {
                record(hostile_message(&mut e, &mut g, t));
            }
            for d in 0..49 {
                t += 1;
                let tel = telemetry(&mut g, 5, None, vec![7, 2, 1]);
                record(e.observe(ALL, &format!("d{d}"), &tel, t).0);
            }
            if hostile && !first {
                record(hostile_message(&mut e, &mut g, t));
            }
        }
        (verdicts, raised)
    };
    let (quiet, quiet_raised) = run_fleet(false, 0.02, false);
    let (attacked, attacked_raised) = run_fleet(true, 0.02, false);
    // What the cap is for: without it the same device raises alerts on every feature.
    let (_, uncapped) = run_fleet(true, 1.0, false);
    assert!(uncapped.contains(&Subject::Feature(0)), "{uncapped:?}");
    assert_eq!(quiet_raised, vec![]);
    assert_eq!(attacked_raised, vec![]);
    // Sending first in every round changes nothing either once the stream has seen the
    // fleet; only the very first window of a new stream, which the device opened alone, can
    // be its own (and one window raises nothing).
    let (first, first_raised) = run_fleet(true, 0.02, true);
    assert_eq!(first_raised, vec![]);
    let over = |v: &[(Vec<Verdict>, Option<Verdict>)]| {
        v.iter()
            .flat_map(|(f, p)| f.iter().copied().chain(*p))
            .filter(|v| *v == Verdict::Over)
            .count()
    };
    assert_eq!(over(&first[1..]), 0, "{first:?}");
    // 49 devices x 5 samples x 40 rounds = 9,800 samples: 9 windows of features.
    let judged = |v: &[(Vec<Verdict>, Option<Verdict>)]| {
        v.iter()
            .flat_map(|(f, p)| f.iter().copied().chain(*p))
            .filter(|v| matches!(v, Verdict::Over))
            .count()
    };
    assert_eq!(judged(&attacked), judged(&quiet));
    assert!(quiet.len() >= 9, "{quiet:?}");
    let over_or_warn = |v: &[(Vec<Verdict>, Option<Verdict>)]| {
        v.iter()
            .flat_map(|(f, p)| f.iter().copied().chain(*p))
            .filter(|v| *v != Verdict::Ok)
            .count()
    };
    assert_eq!(over_or_warn(&quiet), 0, "{quiet:?}");
    assert_eq!(over_or_warn(&attacked), 0, "{attacked:?}");
}

/// Issue 14: W1 in reference standard deviations blew up for a constant reference (2.5e11)
/// and for one outlier.
#[test]
fn w1_is_null_for_a_constant_reference_and_bounded_with_an_outlier() {
    let constant = FeatureBaseline::build("c", &vec![7.5; 1000], 10).unwrap();
    let mut counts = vec![0.0; constant.edges.len() + 1];
    *counts.last_mut().unwrap() = 1.0;
    assert!(w1(&constant, &counts).is_nan());
    // A normal reference with one value at 1e9: a one-sd shift still reads about 1.
    let mut g = Normal(3);
    let mut values: Vec<f64> = (0..20_000).map(|_| g.next()).collect();
    values[0] = 1e9;
    let f = FeatureBaseline::build("x", &values, 10).unwrap();
    let mut counts = vec![0u64; f.edges.len() + 1];
    for _ in 0..5000 {
        counts[bin_of(&f.edges, g.next() + 1.0)] += 1;
    }
    let w = w1(&f, &metrics::shares(&counts));
    assert!((0.6..1.4).contains(&w), "{w}");
}

/// Issue 14: at K = 100 and m = 500, 24 % of windows drawn like the baseline went over the
/// chi-square threshold and false alerts rose. The simulated null keeps it under 1 %
/// (windows of 500 to 1000 samples here).
#[test]
fn a_hundred_bins_and_small_windows_raise_no_false_alarms() {
    let mut g = Normal(71);
    let values: Vec<f64> = (0..20_000).map(|_| g.next()).collect();
    let b = Arc::new(Baseline {
        features: vec![FeatureBaseline::build("x", &values, 100).unwrap()],
        prediction: None,
    });
    let mut s = settings();
    s.window_samples = 500;
    let mut e = Engine::new(s, 5);
    e.set_baseline("kws", &version(), Some(b));
    let (mut over, mut windows, mut raised) = (0, 0, 0);
    for i in 0..3000u64 {
        let samples = (0..100)
            .map(|_| InputSample {
                values: vec![g.next() as f32],
                prediction: None,
                confidence: None,
            })
            .collect();
        let tel = Telemetry {
            samples,
            ..telemetry(&mut g, 0, None, vec![])
        };
        for ev in e.observe(ALL, &format!("d{}", i % 10), &tel, i).0 {
            match ev {
                Event::Closed { evaluation, .. } => {
                    windows += 1;
                    over += usize::from(evaluation.features[0].verdict == Verdict::Over);
                }
                Event::Raise { .. } => raised += 1,
                Event::Resolve { .. } => {}
            }
        }
    }
    // 10 devices: none counts for more than a tenth of a window's 500 towards closing it, so
    // each window takes one message (100 samples) of every device.
    assert_eq!(windows, 300);
    assert!(over <= 3, "{over} of 300 windows over");
    assert_eq!(raised, 0);
}
