use std::collections::HashSet;

use super::*;
use SeqOutcome::*;

fn run(events: &[(u32, u32)]) -> Vec<SeqOutcome> {
    let mut t = SeqTracker::default();
    events
        .iter()
        .map(|&(boot, seq)| t.observe(boot, seq))
        .collect()
}

/// (name, (boot, seq) events, outcomes)
type Case = (&'static str, &'static [(u32, u32)], &'static [SeqOutcome]);

#[test]
fn table_of_sequences() {
    let cases: &[Case] = &[
        (
            "in order",
            &[(0, 5), (0, 6), (0, 7)],
            &[Started, Next { lost: 0 }, Next { lost: 0 }],
        ),
        (
            "gap of two",
            &[(0, 1), (0, 4)],
            &[Started, Next { lost: 2 }],
        ),
        (
            "late arrival fills the gap once",
            &[(0, 1), (0, 4), (0, 2), (0, 2), (0, 3)],
            &[Started, Next { lost: 2 }, Late, Duplicate, Late],
        ),
        (
            "redelivery of the newest",
            &[(0, 1), (0, 2), (0, 2)],
            &[Started, Next { lost: 0 }, Duplicate],
        ),
        (
            "new boot restarts without loss",
            &[(0, 100), (1, 0), (1, 1)],
            &[Started, Started, Next { lost: 0 }],
        ),
        (
            "more than the window behind is old, not a duplicate",
            &[(0, 0), (0, 300), (0, 30), (0, 30)],
            &[Started, Next { lost: 299 }, Old, Old],
        ),
        (
            "edge of the window",
            &[(0, 0), (0, 256), (0, 1), (0, 1), (0, 0)],
            &[Started, Next { lost: 255 }, Late, Duplicate, Old],
        ),
        (
            "window across words",
            &[(0, 0), (0, 70), (0, 5), (0, 5), (0, 69), (0, 0)],
            &[Started, Next { lost: 69 }, Late, Duplicate, Late, Duplicate],
        ),
        (
            "a stray of the previous boot does not reset the current one",
            &[(1, 10), (2, 0), (1, 11), (2, 1), (2, 5)],
            &[
                Started,
                Started,
                Next { lost: 0 },
                Next { lost: 0 },
                Next { lost: 3 },
            ],
        ),
        (
            "a repeat of the previous boot is still a duplicate",
            &[(1, 10), (1, 11), (2, 0), (1, 11), (2, 1)],
            &[
                Started,
                Next { lost: 0 },
                Started,
                Duplicate,
                Next { lost: 0 },
            ],
        ),
        (
            "a stray of an older boot does not hide a later gap",
            &[(3, 0), (3, 1), (1, 99), (3, 5)],
            &[Started, Next { lost: 0 }, Started, Next { lost: 3 }],
        ),
    ];
    for (name, events, want) in cases {
        assert_eq!(run(events), *want, "{name}");
    }
}

#[test]
fn counts_over_a_long_lossy_stream() {
    // Send 0..10_000, dropping every 10th and repeating every 7th.
    let mut t = SeqTracker::default();
    let (mut lost, mut dups, mut stored) = (0i64, 0, 0);
    for seq in 0..10_000u32 {
        if seq % 10 == 3 {
            continue;
        }
        let reps = if seq % 7 == 0 { 2 } else { 1 };
        for _ in 0..reps {
            match t.observe(9, seq) {
                Started | Next { lost: 0 } | Old => stored += 1,
                Next { lost: n } => {
                    stored += 1;
                    lost += i64::from(n)
                }
                Late => {
                    stored += 1;
                    lost -= 1
                }
                Duplicate => dups += 1,
            }
        }
    }
    assert_eq!(lost, 1000);
    assert_eq!(stored, 9000);
    // Multiples of 7 below 10_000 that were not dropped.
    let sevens = (0..10_000u32).filter(|s| s % 7 == 0 && s % 10 != 3).count();
    assert_eq!(dups, sevens);
}

#[test]
fn reads_a_v1_tracker() {
    // Boot 4 seen up to 20, with 19 missing (bit 1 clear) and 18 present (bit 2).
    let mut t = SeqTracker::from_v1(Some(4), 21, 0b101);
    assert_eq!(t.observe(4, 19), Late);
    assert_eq!(t.observe(4, 18), Duplicate);
    assert_eq!(t.observe(4, 21), Next { lost: 0 });
    assert_eq!(SeqTracker::from_v1(None, 0, 0), SeqTracker::default());
}

#[test]
fn survives_a_serde_round_trip() {
    let mut t = SeqTracker::default();
    t.observe(1, 10);
    t.observe(1, 12);
    let bytes = postcard::to_allocvec(&t).unwrap();
    let mut back: SeqTracker = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back.observe(1, 11), Late);
    assert_eq!(back.observe(1, 12), Duplicate);
}

proptest::proptest! {
    /// Against a model that remembers every number: a duplicate was seen before, a late one
    /// was not and lies within the window, and the lost count equals the numbers never seen
    /// below the newest (when nothing falls out of the window).
    #[test]
    fn agrees_with_a_model_that_remembers_everything(
        steps in proptest::collection::vec((0u32..2, 0u32..200), 1..400)
    ) {
        let mut t = SeqTracker::default();
        let mut seen: HashSet<(u32, u32)> = HashSet::new();
        for (boot, seq) in steps {
            let outcome = t.observe(boot, seq);
            let was_seen = !seen.insert((boot, seq));
            match outcome {
                Duplicate => proptest::prop_assert!(was_seen, "{boot}/{seq}: duplicate never seen"),
                Late | Next { .. } | Started => proptest::prop_assert!(!was_seen, "{boot}/{seq}: {outcome:?} but seen"),
                Old => {}
            }
        }
    }
}
