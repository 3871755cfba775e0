use super::*;
use crate::Config;

fn policy(text: &str) -> Result<RolloutPolicy, Vec<String>> {
    Config::from_toml_str(text, "test.toml")
        .map(|c| c.rollouts.policy)
        .map_err(|e| e.errors.iter().map(ToString::to_string).collect())
}

fn overrides(json: &str) -> Table {
    json.parse().unwrap()
}

#[test]
fn the_default_policy_is_canary_then_shares() {
    let c = Config::default();
    let p = &c.rollouts.policy;
    let sizes: Vec<StageSize> = p.stages.iter().map(|s| s.size).collect();
    assert_eq!(
        sizes,
        [
            StageSize::Count(5),
            StageSize::Percent(10.0),
            StageSize::Percent(50.0),
            StageSize::Percent(100.0)
        ]
    );
    let s = &p.stages[1];
    assert_eq!(
        (
            s.min_reporting,
            s.success_pct,
            s.bake,
            s.max_concurrent,
            s.retries
        ),
        (5, 90.0, secs(600), 50, 2)
    );
    assert_eq!(
        s.abort.failed,
        Threshold {
            count: 10,
            pct: 10.0
        }
    );
    assert_eq!(p.gates.window, secs(300));
    assert!(p.gates.drift);
    assert_eq!(c.rollouts.signing_key, None);
    assert_eq!(c.rollouts.directive_ttl, secs(3600));
}

#[test]
fn stage_sizes_resolve_against_the_target() {
    assert_eq!(StageSize::Count(5).of(200), 5);
    assert_eq!(StageSize::Count(5).of(3), 3);
    assert_eq!(StageSize::Percent(10.0).of(200), 20);
    assert_eq!(StageSize::Percent(10.0).of(7), 1, "rounds up");
    assert_eq!(StageSize::Percent(0.1).of(5), 1, "at least one device");
    assert_eq!(StageSize::Percent(100.0).of(0), 0);
    assert_eq!(StageSize::Count(5).share(200), 0.025);
}

#[test]
fn a_stage_table_overrides_only_what_it_names() {
    let p = policy(
        "[rollouts.policy]\nstages = [\"2\", { size = \"50%\", bake = \"1h\", abort = { failed = { count = 1 } } }, \"100%\"]\nbake = \"30s\"\n",
    )
    .unwrap();
    assert_eq!(p.stages[0].bake, secs(30));
    assert_eq!(p.stages[1].bake, secs(3600));
    assert_eq!(p.stages[1].abort.failed.count, 1);
    assert_eq!(
        p.stages[1].abort.failed.pct, 10.0,
        "pct kept from the policy"
    );
    assert_eq!(p.stages[1].abort.rejected.count, 20);
    assert_eq!(p.stages[2].bake, secs(30));
}

#[test]
fn bad_stages_name_each_problem() {
    let errors = policy(
        "[rollouts.policy]\nstages = [\"0\", \"ten\", \"150%\", { size = \"20%\", bak = \"1m\" }, 3]\n[rollouts.policy.gates]\nfree_mem = 2.0\n",
    )
    .unwrap_err();
    let expect = [
        "rollouts.policy.stages[0]",
        "rollouts.policy.stages[1]",
        "rollouts.policy.stages[2]",
        "rollouts.policy.stages[3].bak: unknown key",
        "rollouts.policy.stages[4]",
        "rollouts.policy.gates.free_mem",
    ];
    for e in expect {
        assert!(
            errors.iter().any(|x| x.contains(e)),
            "{e} missing from {errors:#?}"
        );
    }
    let errors = policy("[rollouts.policy]\nstages = [\"10%\", \"5%\", \"50%\"]\n").unwrap_err();
    assert!(
        errors
            .iter()
            .any(|x| x.contains("stages[1]") && x.contains("cumulative")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|x| x.contains("last stage must be")),
        "{errors:?}"
    );
}

#[test]
fn overrides_merge_over_the_configured_policy_and_are_checked_the_same_way() {
    let c = Config::from_toml_str("[rollouts.policy]\nbake = \"20m\"\n", "x").unwrap();
    let p = c
        .rollouts
        .policy_with(overrides(
            "stages = [\"10\", \"100%\"]\ngates = { latency_p95 = 2.0 }\n",
        ))
        .unwrap();
    assert_eq!(p.stages.len(), 2);
    assert_eq!(p.stages[0].size, StageSize::Count(10));
    assert_eq!(p.stages[0].bake, secs(1200), "from the file");
    assert_eq!(p.gates.latency_p95, 2.0);
    assert_eq!(p.gates.temp, 1.15, "from the default");

    let errors: Vec<String> = c
        .rollouts
        .policy_with(overrides("bake = 5\ncolour = \"red\"\n"))
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("bake:"), "{errors:?}");
    assert!(errors[1].starts_with("colour: unknown key"), "{errors:?}");
}
