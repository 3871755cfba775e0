use super::*;

/// `n` reference rows of one feature, `value(i)` each.
fn column(n: usize, value: impl Fn(usize) -> f64) -> Vec<f64> {
    (0..n).map(value).collect()
}

#[test]
fn edges_are_numpys_linear_quantiles() {
    // numpy.quantile(range(1, 101), [0.25, 0.5, 0.75]) == [25.75, 50.5, 75.25]
    let values = column(100, |i| (i + 1) as f64);
    let f = FeatureBaseline::build("x", &values, 4).unwrap();
    assert_eq!(f.edges, [25.75, 50.5, 75.25]);
    assert_eq!(f.reference, [0.25, 0.25, 0.25, 0.25]);
    assert_eq!((f.n, f.mean, f.min, f.max), (100, 50.5, 1.0, 100.0));
    assert!((f.std - 833.25f64.sqrt()).abs() < 1e-12);
    assert_eq!(
        (
            bin_of(&f.edges, 25.75),
            bin_of(&f.edges, 25.74),
            bin_of(&f.edges, 1000.0)
        ),
        (1, 0, 3)
    );
}

#[test]
fn a_tied_value_gets_a_bin_of_its_own() {
    // 75 % of the reference is exactly 1.0: the quantile edges merge on it, and the value gets
    // the bin [1.0, 1.0 + one f32 step).
    let values = column(200, |i| if i < 150 { 1.0 } else { 2.0 + i as f64 / 100.0 });
    let f = FeatureBaseline::build("x", &values, 4).unwrap();
    assert_eq!(f.edges[..2], [1.0, above_f32(1.0)]);
    assert_eq!(above_f32(1.0), f64::from(1.0f32.next_up()));
    assert_eq!(f.reference[1], 0.75);
    assert!((f.reference.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    Baseline {
        features: vec![f],
        prediction: None,
    }
    .validate()
    .unwrap();
}

/// Issue 14: on tied features a shift upward smaller than one step was invisible (a constant
/// 7.5 reference against 8.0 gave PSI 0; an integer feature shifted +0.5 sd was never seen while
/// -0.5 sd gave PSI 1.3). Both directions now show.
#[test]
fn a_shift_off_a_tied_value_shows_in_either_direction() {
    let psi_of = |f: &FeatureBaseline, window: &[f64]| {
        let mut counts = vec![0u64; f.edges.len() + 1];
        for &x in window {
            counts[bin_of(&f.edges, f64::from(x as f32))] += 1;
        }
        crate::drift::metrics::psi(&f.reference, &crate::drift::metrics::shares(&counts))
    };
    let constant = FeatureBaseline::build("c", &column(1000, |_| 7.5), 10).unwrap();
    assert!(psi_of(&constant, &[8.0; 500]) > 5.0);
    assert!(psi_of(&constant, &[7.0; 500]) > 5.0);
    assert!(psi_of(&constant, &[7.5; 500]) < 1e-9);
    assert_eq!(constant.scale(), None);
    // Integers 0..=9, uniform: sd 2.87, so half a standard deviation is about 1.4.
    let integer = FeatureBaseline::build("i", &column(1000, |i| (i % 10) as f64), 10).unwrap();
    let window = |shift: f64| column(500, |i| (i % 10) as f64 + shift);
    let (up, down) = (
        psi_of(&integer, &window(1.4)),
        psi_of(&integer, &window(-1.4)),
    );
    assert!(up > 1.0 && down > 1.0, "up {up}, down {down}");
    assert!(psi_of(&integer, &window(0.0)) < 1e-9);
}

#[test]
fn the_scale_is_robust_to_an_outlier() {
    let mut values = column(1000, |i| (i as f64 - 500.0) / 100.0);
    let plain = FeatureBaseline::build("x", &values, 10).unwrap();
    values[0] = 1e9;
    let outlier = FeatureBaseline::build("x", &values, 10).unwrap();
    let (a, b) = (plain.scale().unwrap(), outlier.scale().unwrap());
    assert!((a / b - 1.0).abs() < 0.05, "{a} {b}");
    assert!(outlier.std > 1e6);
}

#[test]
fn a_csv_with_predictions_and_confidence() {
    let mut csv = String::from("a, b, pred, conf\n");
    for i in 0..100 {
        csv.push_str(&format!(
            "{i}, {}, {}, 0.{}\n",
            i * 10,
            i % 4 / 2 + i % 4 % 2,
            6 + i % 4
        ));
    }
    let b = Baseline::from_csv(&csv, Some("pred"), Some("conf"), 2).unwrap();
    assert_eq!(
        b.features
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(b.features[1].edges, [495.0]);
    let p = b.prediction.clone().unwrap();
    // Classes 0, 1, 1, 2 repeating.
    assert_eq!((p.classes, p.n), (vec![0.25, 0.5, 0.25], 100));
    assert!((p.mean_confidence.unwrap() - 0.75).abs() < 1e-12);
    assert_eq!(b.edges(), vec![vec![49.5f32], vec![495.0f32]]);
}

#[test]
fn bad_input_says_what_is_wrong() {
    let hundred = |header: &str, row: &str| {
        let mut s = format!("{header}\n");
        for _ in 0..100 {
            s.push_str(row);
            s.push('\n');
        }
        s
    };
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        (
            "a\n1\nx\n".into(),
            None,
            "reference CSV: row 3: column \"a\": \"x\" is not a number",
        ),
        (
            "a,p\n1,0\n2,1.5\n".into(),
            Some("p"),
            "reference CSV: row 3: prediction must be a class id 0..255",
        ),
        // Issue 14: a 2-row reference was accepted.
        (
            "a\n1\n2\n".into(),
            None,
            "feature a: at least 100 reference values needed, found 2",
        ),
        (
            "a\n1\n2\n".into(),
            Some("nope"),
            "reference CSV: no column \"nope\"",
        ),
        (hundred("a,p", "1,0"), Some("p"), ""),
    ];
    for (csv, pred, want) in &cases[..4] {
        assert_eq!(
            Baseline::from_csv(csv, *pred, None, 10)
                .unwrap_err()
                .to_string(),
            *want,
            "{csv:?}"
        );
    }
    // 100 rows are enough.
    assert!(Baseline::from_csv(&cases[4].0, Some("p"), None, 10).is_ok());
    assert!(Baseline::from_csv(&cases[4].0, None, None, 1).is_err());
    let mut b = Baseline::from_csv(&hundred("a", "1"), None, None, 2).unwrap();
    b.features[0].reference = vec![0.9, 0.9, 0.9];
    assert!(b.validate().unwrap_err().to_string().contains("sum to 1"));
    let mut small = Baseline::from_csv(&hundred("a", "1"), None, None, 2).unwrap();
    small.features[0].n = 2;
    assert_eq!(
        small.validate().unwrap_err().to_string(),
        "feature a: at least 100 reference samples needed (n is 2)"
    );
}

#[test]
fn edges_must_survive_the_trip_to_devices_as_f32() {
    let csv: String = std::iter::once("a".to_owned())
        .chain((0..100).map(|i| i.to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    let good = Baseline::from_csv(&csv, None, None, 4).unwrap();
    assert!(good.validate().is_ok());
    let want = "feature a: edges must be finite and strictly increasing as 32-bit floats (what \
                devices receive)";
    // Finite as f64, infinite as f32.
    let mut huge = good.clone();
    *huge.features[0].edges.last_mut().unwrap() = 1e39;
    assert!(huge.validate().unwrap_err().to_string().ends_with(want));
    // Apart as f64, equal as f32.
    let mut close = good.clone();
    close.features[0].edges[1] = close.features[0].edges[0] + 1e-12;
    assert!(close.validate().unwrap_err().to_string().ends_with(want));
}
