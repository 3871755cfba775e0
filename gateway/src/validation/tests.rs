//! Judging results, summaries per class (worst device) and comparisons of two versions.

use fleetgate_protocol::validation::LatencyStats;

use super::*;

fn result(p95: u32, correct: Option<u32>) -> ValidationResult {
    ValidationResult {
        inferences: 100,
        correct,
        latency: LatencyStats {
            p50_us: p95 / 2,
            p90_us: p95 - 10,
            p95_us: p95,
            p99_us: p95 + 10,
            max_us: p95 + 20,
        },
        peak_ram_bytes: 150_000,
        energy_uj: 80_000,
    }
}

fn rules(texts: &[&str]) -> Vec<Requirement> {
    texts
        .iter()
        .map(|t| Requirement::parse(t).unwrap())
        .collect()
}

fn record(
    version: &str,
    class: &str,
    device: &str,
    r: ValidationResult,
    rs: &[Requirement],
) -> ValidationRecord {
    ValidationRecord {
        kind: ArtifactKind::Model,
        name: "kws".into(),
        version: Version::parse(version).unwrap(),
        release: 1,
        class: class.into(),
        device: device.into(),
        transfer: 1,
        outcome: Outcome::Measured {
            checks: judge(rs, &r),
            result: r,
        },
        started: Stamp {
            at_ms: 0,
            by: "op".into(),
        },
        finished_ms: 1,
    }
}

#[test]
fn a_result_passes_only_when_every_requirement_is_met_and_measured() {
    let rs = rules(&["latency_p95_us<=15000", "accuracy>=0.93"]);
    let pass = record("2.1.0", "a", "d1", result(12000, Some(95)), &rs);
    assert_eq!(pass.verdict(), Verdict::Pass);
    assert!(pass.misses().is_empty());
    let slow = record("2.1.0", "a", "d1", result(18000, Some(95)), &rs);
    assert_eq!(slow.verdict(), Verdict::Fail);
    assert_eq!(
        slow.misses(),
        vec!["latency_p95_us 18000 (required <=15000)"]
    );
    let unmeasured = record("2.1.0", "a", "d1", result(12000, None), &rs);
    assert_eq!(unmeasured.verdict(), Verdict::Fail);
    assert_eq!(
        unmeasured.misses(),
        vec!["accuracy not measured (required >=0.9300)"]
    );
    let inaccurate = record("2.1.0", "a", "d1", result(12000, Some(90)), &rs);
    assert_eq!(
        inaccurate.misses(),
        vec!["accuracy 0.9000 (required >=0.9300)"]
    );
    let mut error = pass.clone();
    error.outcome = Outcome::Error {
        reason: "rejected: expired".into(),
    };
    assert_eq!(error.verdict(), Verdict::Error);
}

#[test]
fn a_class_shows_its_worst_device() {
    let rs = rules(&["latency_p95_us<=15000", "accuracy>=0.93"]);
    let records = vec![
        record("2.1.0", "a", "d1", result(12000, Some(97)), &rs),
        record("2.1.0", "a", "d2", result(14000, Some(94)), &rs),
        record("2.1.0", "a", "d3", result(16000, Some(99)), &rs),
        record("2.1.0", "b", "d4", result(5000, Some(95)), &rs),
    ];
    let s = summarize(&records);
    let a = &s["a"];
    assert_eq!((a.devices, a.passed, a.failed, a.errors), (3, 2, 1, 0));
    assert_eq!(a.worst[&Measure::LatencyP95Us], 16000.0);
    assert_eq!(a.worst[&Measure::Accuracy], 0.94);
    assert_eq!(a.worst[&Measure::EnergyPerInferenceUj], 800.0);
    assert_eq!(s["b"].worst[&Measure::LatencyP95Us], 5000.0);
}

#[test]
fn compare_prints_each_requirement_per_class_with_the_difference() {
    let rs = rules(&["latency_p95_us<=15000", "accuracy>=0.93"]);
    let old = vec![
        record("2.0.0", "a", "d1", result(10000, Some(95)), &rs),
        record("2.0.0", "b", "d2", result(8000, Some(96)), &rs),
    ];
    let new = vec![
        record("2.1.0", "a", "d1", result(16000, Some(95)), &rs),
        record("2.1.0", "b", "d2", result(7000, Some(97)), &rs),
    ];
    let by_class: BTreeMap<String, Vec<Requirement>> = [("*".to_owned(), rs.clone())].into();
    let rows = compare(&old, &new, &BTreeMap::new(), &by_class);
    // class, measure, old, new, difference, met
    type Row<'a> = (
        String,
        &'a str,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<bool>,
    );
    let got: Vec<Row<'_>> = rows
        .iter()
        .map(|r| {
            (
                r.class.clone(),
                r.measure.name(),
                r.old,
                r.new,
                r.difference.map(|d| (d * 1e6).round() / 1e6),
                r.met,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "a".into(),
                "latency_p95_us",
                Some(10000.0),
                Some(16000.0),
                Some(6000.0),
                Some(false)
            ),
            (
                "a".into(),
                "accuracy",
                Some(0.95),
                Some(0.95),
                Some(0.0),
                Some(true)
            ),
            (
                "b".into(),
                "latency_p95_us",
                Some(8000.0),
                Some(7000.0),
                Some(-1000.0),
                Some(true)
            ),
            (
                "b".into(),
                "accuracy",
                Some(0.96),
                Some(0.97),
                Some(0.01),
                Some(true)
            ),
        ]
    );
    assert_eq!(
        rows[0].requirement.as_deref(),
        Some("latency_p95_us<=15000")
    );
    // Without requirements every measure is compared.
    let all = compare(&old, &new, &BTreeMap::new(), &BTreeMap::new());
    assert_eq!(all.len(), 2 * Measure::ALL.len());
}
