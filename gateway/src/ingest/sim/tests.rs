use super::*;

/// Seeds to run: `FLEETGATE_SIM_SEED` replays one; `FLEETGATE_SIM_SEEDS` (from
/// `FLEETGATE_SIM_FIRST`) runs more than the default.
fn seeds(default: u64, offset: u64) -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(seed) = var("FLEETGATE_SIM_SEED") {
        return vec![seed];
    }
    let n = var("FLEETGATE_SIM_SEEDS").unwrap_or(default);
    let first = var("FLEETGATE_SIM_FIRST").unwrap_or(0) + offset;
    (first..first + n).collect()
}

/// A regression is rolled back once a gate could compare; a release that does not regress
/// completes (a rollout never judged, all of it in stages with no control, completes too).
fn deserved(e: &Ending) -> &'static str {
    if e.regressed && e.judged {
        "rolled_back"
    } else {
        "completed"
    }
}

/// Random fleets, event orders, restarts and failed commits: every invariant holds after
/// every step, and every rollout ends as its release deserves.
#[test]
fn random_runs_with_restarts_and_failed_commits_hold_every_invariant() {
    let seeds = seeds(32, 0);
    let mut judged = 0;
    for &seed in &seeds {
        let ending = run(seed, Chaos::ALL, 600);
        assert_eq!(
            ending.state,
            deserved(&ending),
            "seed {seed}: {:#?}",
            ending.audit
        );
        judged += usize::from(ending.judged);
    }
    // Most runs put the gates to work (else the runs check little); one replayed seed may not.
    assert!(
        seeds.len() < 8 || judged * 4 >= seeds.len() * 3,
        "{judged} of {} runs judged",
        seeds.len()
    );
}

/// The same fleets without restarts, failures or stale events end as deserved too, and the
/// same way whenever both runs judged.
#[test]
fn a_rollout_decides_the_same_with_and_without_restarts() {
    for seed in seeds(16, 1_000_000) {
        let calm = run(seed, Chaos::NONE, 600);
        let chaotic = run(seed, Chaos::ALL, 600);
        assert_eq!(
            calm.state,
            deserved(&calm),
            "seed {seed}, no chaos: {:#?}",
            calm.audit
        );
        assert_eq!(
            chaotic.state,
            deserved(&chaotic),
            "seed {seed}: {:#?}",
            chaotic.audit
        );
        if calm.judged && chaotic.judged {
            assert_eq!(
                chaotic.state, calm.state,
                "seed {seed}: restarts changed the decision"
            );
        }
    }
}
