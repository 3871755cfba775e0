//! The drift engine's power and false-alarm table (docs/drift.md), measured by running the
//! engine itself (default settings) on generated data: a standard normal reference of 20,000
//! rows per feature; windows of m samples from 10 devices in turn; a mean shift of delta
//! standard deviations from the first window on. Everything is seeded, so a run reproduces its
//! table exactly.
//!
//!     scripts/drift_power.sh            # or: cargo run --release -p fleetgate --example drift_power
//!     cargo run --release -p fleetgate --example drift_power -- --runs 50 --windows 500
//!
//! `--runs`: runs per detection cell (default 200); `--windows`: windows per false-alarm cell
//! (default 2000).

use std::sync::Arc;

use fleetgate::drift::baseline::{Baseline, FeatureBaseline, PredictionBaseline};
use fleetgate::drift::engine::{ALL, Engine, Event, Settings, Subject, Verdict};
use fleetgate::drift::null::Rng;
use fleetgate_protocol::{InputSample, ModelMetrics, Telemetry};
use semver::Version;

const DEVICES: usize = 10;
const PER_MESSAGE: usize = 50;
const REFERENCE: usize = 20_000;

fn settings(m: u64) -> Settings {
    let mut s: Settings = (&fleetgate_config::Config::default().drift).into();
    s.window_samples = m;
    s.min_samples = s.min_samples.min(m);
    s.window_ms = u64::MAX;
    s.reservoir = 0;
    s
}

fn version() -> Version {
    Version::new(1, 0, 0)
}

fn feature_baseline(bins: usize, seed: u64) -> Arc<Baseline> {
    let mut rng = Rng::new(seed);
    let values: Vec<f64> = (0..REFERENCE).map(|_| rng.normal()).collect();
    Arc::new(Baseline {
        features: vec![FeatureBaseline::build("x", &values, bins).unwrap()],
        prediction: None,
    })
}

fn class_baseline(shares: &[f64]) -> Arc<Baseline> {
    let values: Vec<f64> = (0..REFERENCE).map(|i| i as f64).collect();
    Arc::new(Baseline {
        features: vec![FeatureBaseline::build("x", &values, 10).unwrap()],
        prediction: Some(PredictionBaseline {
            classes: shares.to_vec(),
            n: REFERENCE as u64,
            mean_confidence: None,
        }),
    })
}

fn message(samples: Vec<InputSample>, class_counts: Vec<u32>) -> Telemetry {
    Telemetry {
        boot: 0,
        seq: 0,
        time_ms: 0,
        hw: Default::default(),
        model: Some(ModelMetrics {
            name: "m".into(),
            version: version(),
            inferences: class_counts.iter().sum(),
            class_counts,
            mean_confidence: None,
        }),
        samples,
        bins: vec![],
    }
}

/// What happened in one window: the verdict of the subject, and whether an alert rose.
struct Window {
    verdict: Verdict,
    raised: bool,
}

/// Feeds windows of `m` samples of one feature shifted by `delta` until `windows` closed.
fn feature_windows(
    e: &mut Engine,
    rng: &mut Rng,
    m: usize,
    delta: f64,
    windows: usize,
    mut stop: impl FnMut(&Window) -> bool,
) {
    let mut closed = 0;
    let mut device = 0;
    while closed < windows {
        let samples = (0..PER_MESSAGE.min(m))
            .map(|_| InputSample {
                values: vec![(rng.normal() + delta) as f32],
                prediction: None,
                confidence: None,
            })
            .collect();
        device = (device + 1) % DEVICES;
        let (events, _) = e.observe(ALL, &format!("d{device}"), &message(samples, vec![]), 0);
        let mut window = None;
        for ev in events {
            match ev {
                Event::Closed { evaluation, .. } => {
                    if let Some(f) = evaluation.features.first() {
                        window = Some(Window {
                            verdict: f.verdict,
                            raised: false,
                        });
                    }
                }
                Event::Raise {
                    subject: Subject::Feature(0),
                    ..
                } => {
                    if let Some(w) = &mut window {
                        w.raised = true;
                    }
                }
                _ => {}
            }
        }
        if let Some(w) = window {
            closed += 1;
            if stop(&w) {
                return;
            }
        }
    }
}

/// Feeds windows of `m` predictions drawn from `shares` until `windows` closed.
fn class_windows(
    e: &mut Engine,
    rng: &mut Rng,
    m: usize,
    shares: &[f64],
    windows: usize,
    mut stop: impl FnMut(&Window) -> bool,
) {
    let mut closed = 0;
    let mut device = 0;
    let mut counts = vec![0u64; shares.len()];
    while closed < windows {
        rng.multinomial(PER_MESSAGE.min(m) as u64, shares, &mut counts);
        device = (device + 1) % DEVICES;
        let tel = message(vec![], counts.iter().map(|&c| c as u32).collect());
        let (events, _) = e.observe(ALL, &format!("d{device}"), &tel, 0);
        let mut window = None;
        for ev in events {
            match ev {
                Event::Closed { evaluation, .. } => {
                    if let Some(p) = evaluation.prediction {
                        window = Some(Window {
                            verdict: p.verdict,
                            raised: false,
                        });
                    }
                }
                Event::Raise {
                    subject: Subject::Prediction,
                    ..
                } => {
                    if let Some(w) = &mut window {
                        w.raised = true;
                    }
                }
                _ => {}
            }
        }
        if let Some(w) = window {
            closed += 1;
            if stop(&w) {
                return;
            }
        }
    }
}

/// The window (1-based) of the first alert, if one rose within `windows`.
fn detect(
    s: &Settings,
    baseline: &Arc<Baseline>,
    run: u64,
    m: usize,
    delta: f64,
    windows: usize,
) -> Option<usize> {
    let mut e = Engine::new(s.clone(), run);
    e.set_baseline("m", &version(), Some(baseline.clone()));
    let mut rng = Rng::new(0xd1f7 + run);
    let mut at = None;
    let mut n = 0;
    feature_windows(&mut e, &mut rng, m, delta, windows, |w| {
        n += 1;
        if w.raised {
            at = Some(n);
        }
        w.raised
    });
    at
}

fn pct(hits: usize, of: usize) -> String {
    format!("{:.1} %", 100.0 * hits as f64 / of.max(1) as f64)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runs = arg("--runs", 200);
    let windows = arg("--windows", 2000);
    let defaults = fleetgate_config::Config::default().drift;
    println!(
        "Defaults: psi_alert {}, psi_warn_floor {}, prediction_js_alert {}, false_alarm {}, \
         resolve_after {}, sequential {} (cusum_k {}, cusum_h {}), device_share {}; reference \
         n = {REFERENCE}; {DEVICES} devices; {runs} runs per detection cell, {windows} windows \
         per false-alarm cell.\n",
        defaults.psi_alert,
        defaults.psi_warn_floor,
        defaults.prediction_js_alert,
        defaults.false_alarm,
        defaults.resolve_after,
        defaults.sequential,
        defaults.cusum_k,
        defaults.cusum_h,
        defaults.device_share
    );

    // 1. Detection of a mean shift, K = 10: an alert within 2 windows, within 10 windows, and
    //    within 10 without the sequential (CUSUM) option.
    println!("### Detection of a mean shift (K = 10 bins)\n");
    println!(
        "| shift (sd) | m | alert within 2 windows | within 10 | within 10, CUSUM off | median window |"
    );
    println!("|---|---|---|---|---|---|");
    let b10 = feature_baseline(10, 1);
    for m in [500usize, 1000, 2000] {
        for delta in [0.1, 0.25, 0.5, 1.0] {
            let s = settings(m as u64);
            let mut off = s.clone();
            off.sequential = false;
            let mut at: Vec<Option<usize>> = (0..runs as u64)
                .map(|r| detect(&s, &b10, r, m, delta, 10))
                .collect();
            let without = (0..runs as u64)
                .filter(|&r| detect(&off, &b10, 10_000 + r, m, delta, 10).is_some())
                .count();
            let within = |n: usize| at.iter().filter(|a| a.is_some_and(|w| w <= n)).count();
            let (two, ten) = (within(2), within(10));
            at.sort();
            let detected: Vec<usize> = at.iter().flatten().copied().collect();
            let median = if detected.len() * 2 > runs {
                detected[runs / 2 - (runs - detected.len())].to_string()
            } else {
                "-".into()
            };
            println!(
                "| {delta} | {m} | {} | {} | {} | {median} |",
                pct(two, runs),
                pct(ten, runs),
                pct(without, runs)
            );
        }
    }

    // 2. False alarms: windows drawn like the reference, K from 10 to 100.
    println!("\n### False alarms on features (no drift)\n");
    println!("| K | m | windows over | windows warn | alerts per 1000 windows |");
    println!("|---|---|---|---|---|");
    for bins in [10usize, 20, 50, 100] {
        let b = feature_baseline(bins, 2 + bins as u64);
        for m in [500usize, 2000] {
            let s = settings(m as u64);
            let mut e = Engine::new(s, 7);
            e.set_baseline("m", &version(), Some(b.clone()));
            let mut rng = Rng::new(0xfa15e + bins as u64 * 7 + m as u64);
            let (mut over, mut warn, mut alerts) = (0, 0, 0);
            feature_windows(&mut e, &mut rng, m, 0.0, windows, |w| {
                over += usize::from(w.verdict == Verdict::Over);
                warn += usize::from(w.verdict == Verdict::Warn);
                alerts += usize::from(w.raised);
                false
            });
            println!(
                "| {bins} | {m} | {} | {} | {:.2} |",
                pct(over, windows),
                pct(warn, windows),
                1000.0 * alerts as f64 / windows as f64
            );
        }
    }

    // 3. Predictions: false alarms from 3 to 64 classes (Zipf shares), and a 10-point move
    //    of one class's share (0.7/0.2/0.1 to 0.6/0.3/0.1).
    println!("\n### Predictions\n");
    println!("| classes | m | windows over (no drift) | alerts per 1000 windows |");
    println!("|---|---|---|---|");
    for classes in [3usize, 10, 40, 64] {
        let raw: Vec<f64> = (0..classes).map(|i| 1.0 / (i + 1) as f64).collect();
        let total: f64 = raw.iter().sum();
        let shares: Vec<f64> = raw.iter().map(|r| r / total).collect();
        let b = class_baseline(&shares);
        for m in [500usize, 2000] {
            let mut e = Engine::new(settings(m as u64), 9);
            e.set_baseline("m", &version(), Some(b.clone()));
            let mut rng = Rng::new(0xc1a55 + classes as u64 * 7 + m as u64);
            let (mut over, mut alerts) = (0, 0);
            class_windows(&mut e, &mut rng, m, &shares, windows, |w| {
                over += usize::from(w.verdict == Verdict::Over);
                alerts += usize::from(w.raised);
                false
            });
            println!(
                "| {classes} | {m} | {} | {:.2} |",
                pct(over, windows),
                1000.0 * alerts as f64 / windows as f64
            );
        }
    }
    let b = class_baseline(&[0.7, 0.2, 0.1]);
    println!("\n| class-share move | m | alert within 2 windows | within 10 |");
    println!("|---|---|---|---|");
    for m in [500usize, 1000, 2000] {
        for (name, shares) in [
            ("5 points", [0.65, 0.25, 0.1]),
            ("10 points", [0.6, 0.3, 0.1]),
        ] {
            let mut hits = [0usize; 2];
            for run in 0..runs as u64 {
                let mut e = Engine::new(settings(m as u64), run);
                e.set_baseline("m", &version(), Some(b.clone()));
                let mut rng = Rng::new(0x5e1f + run);
                let mut n = 0;
                let mut at = None;
                class_windows(&mut e, &mut rng, m, &shares, 10, |w| {
                    n += 1;
                    if w.raised {
                        at = Some(n);
                    }
                    w.raised
                });
                hits[0] += usize::from(at.is_some_and(|w| w <= 2));
                hits[1] += usize::from(at.is_some());
            }
            println!(
                "| {name} | {m} | {} | {} |",
                pct(hits[0], runs),
                pct(hits[1], runs)
            );
        }
    }
}
