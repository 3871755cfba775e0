//! Bundle specs round-trip through TOML; golden sets read from CSV with every mistake named.

use super::*;

#[test]
fn a_spec_round_trips_and_refuses_unknown_keys() {
    let spec = BundleSpec {
        kind: "model".into(),
        name: "kws".into(),
        version: "3.0.0".into(),
        release: Some(3),
        artifact: "model.tflite".into(),
        artifact_sha256: Some("ab".repeat(32)),
        lineage: [("metric.accuracy".to_owned(), "0.95".to_owned())].into(),
        ..BundleSpec::default()
    };
    let text = spec.to_toml("written by a test\nsecond line");
    assert!(
        text.starts_with("# written by a test\n# second line\n"),
        "{text}"
    );
    let back: BundleSpec = toml::from_str(&text).unwrap();
    assert_eq!(back, spec);
    let err = toml::from_str::<BundleSpec>(&format!("{text}\nsurprise = 1\n")).unwrap_err();
    assert!(err.to_string().contains("surprise"), "{err}");
}

#[test]
fn golden_sets_from_csv() {
    let set = golden_from_csv("a, b, expected\n0.5, 1, 2\n-1, 2.5, 0\n").unwrap();
    assert_eq!(set.cases.len(), 2);
    assert_eq!(set.cases[0].values, vec![0.5, 1.0]);
    assert_eq!(set.cases[0].expected, 2);
    assert_eq!(set.cases[1].values, vec![-1.0, 2.5]);
    for (text, problem) in [
        ("a,b\n1,2\n", "no column named expected"),
        (
            "a,expected\nx,1\n",
            "row 2, column a: \"x\" is not a number",
        ),
        (
            "a,expected\n1,-1\n",
            "row 2: expected \"-1\" is not a class id",
        ),
        ("a,expected\n", "no rows"),
        ("a,expected\n1,300\n", "golden.cases.expected"),
    ] {
        let err = golden_from_csv(text).unwrap_err();
        assert!(err.contains(problem), "{text:?}: {err}");
    }
}
