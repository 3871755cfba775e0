use std::collections::HashMap;

use fleetgate_config::Config;

use super::*;

fn candidates(strata: &[(&str, usize)]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (stratum, n) in strata {
        for i in 0..*n {
            out.push(Candidate {
                device: format!("{stratum}-{i:03}"),
                stratum: (*stratum).to_owned(),
                running: None,
            });
        }
    }
    out
}

#[test]
fn the_order_is_a_permutation_and_the_same_every_time() {
    let c = candidates(&[("a", 50), ("b", 30), ("c", 20)]);
    let o = order(7, &c);
    let mut sorted = o.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert_eq!(o, order(7, &c));
    assert_ne!(o, order(8, &c), "another rollout, another order");
}

#[test]
fn every_prefix_spreads_over_the_strata_in_proportion() {
    // 60 % of one board revision at one site, 30 % and 10 % of others.
    let c = candidates(&[
        ("nrf53|site=a", 120),
        ("nrf53|site=b", 60),
        ("esp32|site=a", 20),
    ]);
    let o = order(1, &c);
    for (prefix, expect) in [
        (5usize, [3usize, 2, 0]),
        (20, [12, 6, 2]),
        (100, [60, 30, 10]),
    ] {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for &i in &o[..prefix] {
            *counts.entry(c[i].stratum.as_str()).or_default() += 1;
        }
        let got = [
            counts.get("nrf53|site=a").copied().unwrap_or(0),
            counts.get("nrf53|site=b").copied().unwrap_or(0),
            counts.get("esp32|site=a").copied().unwrap_or(0),
        ];
        assert_eq!(got, expect, "first {prefix}");
    }
}

#[test]
fn default_stages_of_200_devices() {
    let policy = Config::default().rollouts.policy;
    let s = sizes(&policy.stages, 200);
    assert_eq!(s, [5, 20, 100, 200]);
    assert_eq!(stage_of(0, &s), 0);
    assert_eq!(stage_of(4, &s), 0);
    assert_eq!(stage_of(5, &s), 1);
    assert_eq!(stage_of(19, &s), 1);
    assert_eq!(stage_of(99, &s), 2);
    assert_eq!(stage_of(199, &s), 3);
    // A small target: the canary is the whole of it and later stages add nobody.
    assert_eq!(sizes(&policy.stages, 3), [3, 3, 3, 3]);
    assert_eq!(sizes(&policy.stages, 0), [0, 0, 0, 0]);
}

#[test]
fn late_joiners_spread_like_the_plan() {
    let policy = Config::default().rollouts.policy;
    let s = sizes(&policy.stages, 200);
    let mut per_stage = [0usize; 4];
    for i in 0..10_000 {
        per_stage[late_stage(3, &format!("late-{i}"), &s)] += 1;
    }
    // Shares 2.5 %, 7.5 %, 40 %, 50 % of 10,000 joiners, within sampling noise.
    for (got, want) in per_stage.iter().zip([250.0f64, 750.0, 4000.0, 5000.0]) {
        let sd = (want * (1.0 - want / 10_000.0)).sqrt();
        assert!((*got as f64 - want).abs() < 4.0 * sd, "{per_stage:?}");
    }
    assert_eq!(late_stage(3, "x", &[0, 0, 0, 0]), 0);
}
