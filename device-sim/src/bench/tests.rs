//! Bench figures parse, runs are deterministic and measure what the figures say.

use fleetgate_protocol::{GoldenCase, Measure};

use super::*;

fn golden(n: usize) -> GoldenSet {
    GoldenSet {
        cases: (0..n)
            .map(|i| GoldenCase {
                values: vec![i as f32],
                expected: (i % 3) as u16,
            })
            .collect(),
    }
}

#[test]
fn figures_parse_with_defaults_for_unset_keys() {
    let v: VersionFigures = "sim-model@2.1.0:latency_us=18000,accuracy=0.9"
        .parse()
        .unwrap();
    assert_eq!(v.model, "sim-model");
    assert_eq!(v.figures.latency_us, 18000);
    assert_eq!(v.figures.accuracy, 0.9);
    assert_eq!(v.figures.peak_ram_bytes, Figures::default().peak_ram_bytes);
    assert!(
        "sim-model@2.1.0:speed=3"
            .parse::<VersionFigures>()
            .unwrap_err()
            .contains("unknown key \"speed\"")
    );
    assert!(
        "sim-model@2.1.0:accuracy=2"
            .parse::<VersionFigures>()
            .unwrap_err()
            .contains("within 0..=1")
    );
}

#[test]
fn a_run_measures_the_versions_figures() {
    let bench = Bench {
        default: Figures::default(),
        versions: vec![
            "m@2.1.0:latency_us=20000,jitter=0,accuracy=0.8,ram=190000,power_mw=100"
                .parse()
                .unwrap(),
        ],
    };
    let v = semver::Version::new(2, 1, 0);
    let r = bench.run("m", &v, &golden(50), 4, None);
    assert_eq!(r.inferences, 200);
    assert_eq!(r.correct, Some(160));
    assert_eq!(r.value(Measure::Accuracy), Some(0.8));
    assert_eq!(r.latency.p50_us, 20000);
    assert_eq!(r.latency.max_us, 20000);
    assert_eq!(r.peak_ram_bytes, 190000);
    // 100 mW for 20 ms is 2000 uJ an inference.
    assert_eq!(r.value(Measure::EnergyPerInferenceUj), Some(2000.0));
    assert_eq!(r, bench.run("m", &v, &golden(50), 4, None), "deterministic");

    // Default figures, jittered: the percentiles spread around the median.
    let d = bench.run("m", &semver::Version::new(2, 0, 0), &golden(50), 4, None);
    assert!(d.latency.p50_us > 9000 && d.latency.p50_us < 11000, "{d:?}");
    assert!(d.latency.p95_us > d.latency.p50_us && d.latency.max_us <= 12000);

    // A regression slows it down here too; no golden set measures no accuracy.
    let mut slow = Regression::new("m", semver::Version::new(2, 0, 0));
    slow.latency_factor = 2.0;
    let s = bench.run(
        "m",
        &semver::Version::new(2, 0, 0),
        &GoldenSet::default(),
        30,
        Some(&slow),
    );
    assert_eq!((s.inferences, s.correct), (30, None));
    assert!(s.latency.p50_us > 18000, "{s:?}");
}
