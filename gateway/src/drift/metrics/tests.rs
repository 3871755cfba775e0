//! Every metric against the numpy/scipy reference values in `fixtures.json`, on the same bins.

use serde_json::Value;

use super::*;

const TOL: f64 = 1e-9;

fn fixtures() -> Value {
    serde_json::from_str(include_str!("../fixtures.json")).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn counts(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn close(got: f64, want: f64, what: &str) {
    let err = (got - want).abs() / want.abs().max(1.0);
    assert!(
        err <= TOL,
        "{what}: got {got}, want {want} (relative error {err:e})"
    );
}

#[test]
fn feature_metrics_match_the_reference() {
    let f = fixtures();
    assert_eq!(f["eps"].as_f64(), Some(EPSILON));
    for (i, case) in f["cases"].as_array().unwrap().iter().enumerate() {
        let r = floats(&case["reference"]);
        let c = shares(&counts(&case["counts"]));
        let edges = floats(&case["edges"]);
        close(
            psi(&r, &c),
            case["psi"].as_f64().unwrap(),
            &format!("case {i} psi"),
        );
        close(
            js_distance(&r, &c),
            case["js"].as_f64().unwrap(),
            &format!("case {i} js"),
        );
        let (d, bound) = ks(&r, &c);
        close(d, case["ks"].as_f64().unwrap(), &format!("case {i} ks"));
        close(
            bound,
            case["ks_bound"].as_f64().unwrap(),
            &format!("case {i} ks bound"),
        );
        let exact = case["ks_exact_raw"].as_f64().unwrap();
        assert!(
            d <= exact + TOL && exact <= d + bound + TOL,
            "case {i}: exact KS {exact} outside [{d}, {}]",
            d + bound
        );
        let lo = case["ref_min"]
            .as_f64()
            .unwrap()
            .min(case["cur_min"].as_f64().unwrap());
        let hi = case["ref_max"]
            .as_f64()
            .unwrap()
            .max(case["cur_max"].as_f64().unwrap());
        let w = wasserstein(&r, &c, &edges, lo, hi, case["ref_std"].as_f64().unwrap());
        close(
            w,
            case["wasserstein"].as_f64().unwrap(),
            &format!("case {i} wasserstein"),
        );
        let k = case["k"].as_u64().unwrap() as usize;
        let floor = Chi2Table::default().psi_noise(
            k,
            case["n_ref"].as_u64().unwrap(),
            case["m"].as_u64().unwrap(),
            0.1,
        );
        close(
            floor,
            case["psi_noise_floor"].as_f64().unwrap(),
            &format!("case {i} psi noise floor"),
        );
    }
}

#[test]
fn prediction_metrics_match_the_reference() {
    for (i, case) in fixtures()["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let r = floats(&case["reference"]);
        let c = shares(&counts(&case["counts"]));
        close(
            js_distance(&r, &c),
            case["js"].as_f64().unwrap(),
            &format!("prediction {i} js"),
        );
        close(
            l_inf(&r, &c),
            case["l_inf"].as_f64().unwrap(),
            &format!("prediction {i} l_inf"),
        );
    }
}

#[test]
fn chi2_quantiles_match_scipy() {
    for q in fixtures()["chi2"].as_array().unwrap() {
        let (p, dof) = (q["p"].as_f64().unwrap(), q["dof"].as_f64().unwrap());
        close(
            chi2_quantile(p, dof),
            q["quantile"].as_f64().unwrap(),
            &format!("chi2.ppf({p}, {dof})"),
        );
    }
}

#[test]
fn degenerate_inputs() {
    assert_eq!(shares(&[0, 0]), [0.0, 0.0]);
    assert_eq!(js_distance(&[0.5, 0.5], &[0.0, 0.0]), 0.0);
    assert!(
        js_distance(&[1.0, 0.0], &[0.0, 1.0]) > 1.0 - 1e-12,
        "disjoint distributions are 1 apart"
    );
    assert_eq!(psi(&[0.5, 0.5], &[0.5, 0.5]), 0.0);
    assert_eq!(ks(&[1.0], &[1.0]), (0.0, 1.0));
}
