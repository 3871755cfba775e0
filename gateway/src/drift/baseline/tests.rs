use super::*;

#[test]
fn edges_are_numpys_linear_quantiles() {
    // numpy.quantile(range(1, 11), [0.25, 0.5, 0.75]) == [3.25, 5.5, 7.75]
    let values: Vec<f64> = (1..=10).map(f64::from).collect();
    let f = FeatureBaseline::build("x", &values, 4).unwrap();
    assert_eq!(f.edges, [3.25, 5.5, 7.75]);
    assert_eq!(f.reference, [0.3, 0.2, 0.2, 0.3]);
    assert_eq!((f.n, f.mean, f.min, f.max), (10, 5.5, 1.0, 10.0));
    assert!((f.std - 8.25f64.sqrt()).abs() < 1e-12);
    assert_eq!(
        (
            bin_of(&f.edges, 3.25),
            bin_of(&f.edges, 3.24),
            bin_of(&f.edges, 100.0)
        ),
        (1, 0, 3)
    );
}

#[test]
fn ties_merge_edges() {
    let values = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0];
    let f = FeatureBaseline::build("x", &values, 4).unwrap();
    assert_eq!(f.edges, [1.0, 1.25]);
    assert_eq!(f.reference.iter().sum::<f64>(), 1.0);
}

#[test]
fn a_csv_with_predictions_and_confidence() {
    let csv = "a, b, pred, conf\n1, 10, 0, 0.9\n2, 20, 1, 0.8\n3, 30, 1, 0.7\n4, 40, 2, 0.6\n";
    let b = Baseline::from_csv(csv, Some("pred"), Some("conf"), 2).unwrap();
    assert_eq!(
        b.features
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(b.features[1].edges, [25.0]);
    let p = b.prediction.clone().unwrap();
    assert_eq!((p.classes, p.n), (vec![0.25, 0.5, 0.25], 4));
    assert!((p.mean_confidence.unwrap() - 0.75).abs() < 1e-12);
    assert_eq!(b.edges(), vec![vec![2.5f32], vec![25.0f32]]);
}

#[test]
fn bad_input_says_what_is_wrong() {
    let cases: &[(&str, Option<&str>, &str)] = &[
        (
            "a\n1\nx\n",
            None,
            "reference CSV: row 3: column \"a\": \"x\" is not a number",
        ),
        (
            "a,p\n1,0\n2,1.5\n",
            Some("p"),
            "reference CSV: row 3: prediction must be a class id 0..255",
        ),
        (
            "a\n1\n",
            None,
            "feature a: at least 2 reference values needed",
        ),
        (
            "a\n1\n2\n",
            Some("nope"),
            "reference CSV: no column \"nope\"",
        ),
    ];
    for (csv, pred, want) in cases {
        assert_eq!(
            Baseline::from_csv(csv, *pred, None, 10)
                .unwrap_err()
                .to_string(),
            *want,
            "{csv:?}"
        );
    }
    assert!(Baseline::from_csv("a\n1\n2\n", None, None, 1).is_err());
    let mut b = Baseline::from_csv("a\n1\n2\n3\n", None, None, 2).unwrap();
    b.features[0].reference = vec![0.9, 0.9];
    assert!(b.validate().unwrap_err().to_string().contains("sum to 1"));
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
