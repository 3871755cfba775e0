use std::collections::HashMap;

use fleetgate_config::{Config, StageSize};

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
    // 200 planned: 5, 15, 80 and 100 per stage.
    let mut per_stage = vec![5u64, 15, 80, 100];
    let mut joined = [0u64; 4];
    for i in 0..10_000 {
        let k = late_stage(3, &format!("late-{i}"), &policy.stages, &per_stage);
        per_stage[k] += 1;
        joined[k] += 1;
    }
    // The canary is a count (5) and stays 5; the other stages take their shares of the
    // 10,200 (10 %, 50 %, 100 % cumulative), within sampling noise.
    assert_eq!(per_stage[0], 5);
    let total = 10_200.0;
    for (got, share) in per_stage[1..].iter().zip([0.1f64 - 5.0 / total, 0.4, 0.5]) {
        let want = share * total;
        let sd = (want * (1.0 - share)).sqrt();
        assert!((*got as f64 - want).abs() < 4.0 * sd, "{per_stage:?}");
    }
    assert!(joined[1..].iter().all(|j| *j > 0), "{joined:?}");
    assert_eq!(late_stage(3, "x", &policy.stages, &[0, 0, 0, 0]), 0);
}

/// A canary set as a count stays that count: when only 3 devices were known at creation (the
/// canary was all of them), the devices that join later go to the next stage, not into the
/// canary (where they would have left no control to compare with).
#[test]
fn late_joiners_do_not_swell_a_canary_of_a_fixed_count() {
    let mut policy = Config::default().rollouts.policy;
    policy.stages.truncate(2);
    policy.stages[0].size = StageSize::Count(3);
    policy.stages[1].size = StageSize::Percent(100.0);
    let mut per_stage = vec![3u64, 0];
    for i in 0..20 {
        let k = late_stage(1, &format!("j{i}"), &policy.stages, &per_stage);
        per_stage[k] += 1;
    }
    assert_eq!(per_stage, [3, 20]);
}
