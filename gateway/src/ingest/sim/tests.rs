use super::*;

/// Seeds run by each test run, split into shards (tests of their own, which the test runner
/// runs side by side): seeds with chaos for `random_runs`, and pairs (without and with chaos)
/// for `decides_the_same`.
const CHAOS_SEEDS: u64 = 1600;
const CHAOS_SHARDS: u64 = 4;
const PAIRED_SEEDS: u64 = 400;
const PAIRED_SHARDS: u64 = 2;

/// The seeds of shard `shard` of `shards`: `FLEETGATE_SIM_SEED` replays one (in the first shard
/// only); `FLEETGATE_SIM_SEEDS` (from `FLEETGATE_SIM_FIRST`) runs another number of seeds
/// than `default`. `offset` keeps the two tests' seeds apart.
fn seeds(default: u64, offset: u64, shard: u64, shards: u64) -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(seed) = var("FLEETGATE_SIM_SEED") {
        return if shard == 0 { vec![seed] } else { Vec::new() };
    }
    let n = var("FLEETGATE_SIM_SEEDS").unwrap_or(default);
    let first = var("FLEETGATE_SIM_FIRST").unwrap_or(0) + offset;
    (first..first + n)
        .filter(|s| (s - first) % shards == shard)
        .collect()
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
fn random_runs(shard: u64) {
    let seeds = seeds(CHAOS_SEEDS, 0, shard, CHAOS_SHARDS);
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

#[test]
fn random_runs_with_restarts_and_failed_commits_hold_every_invariant_1() {
    random_runs(0);
}

#[test]
fn random_runs_with_restarts_and_failed_commits_hold_every_invariant_2() {
    random_runs(1);
}

#[test]
fn random_runs_with_restarts_and_failed_commits_hold_every_invariant_3() {
    random_runs(2);
}

#[test]
fn random_runs_with_restarts_and_failed_commits_hold_every_invariant_4() {
    random_runs(3);
}

/// The same fleets without restarts, failures or stale events end as deserved too, and the
/// same way whenever both runs judged.
fn decides_the_same(shard: u64) {
    for seed in seeds(PAIRED_SEEDS, 1_000_000, shard, PAIRED_SHARDS) {
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

#[test]
fn a_rollout_decides_the_same_with_and_without_restarts_1() {
    decides_the_same(0);
}

#[test]
fn a_rollout_decides_the_same_with_and_without_restarts_2() {
    decides_the_same(1);
}

/// Found by a sweep: without chaos, a release that does not regress failed the confidence gate
/// on 40 samples from 2 devices (sampling noise at the default threshold of 0.05, which these
/// runs now set above the noise).
#[test]
fn seed_1002621_does_not_fail_a_good_release_on_sampling_noise() {
    let ending = run(1_002_621, Chaos::NONE, 600);
    assert!(!ending.regressed);
    assert_eq!(ending.state, "completed", "{:#?}", ending.audit);
}
