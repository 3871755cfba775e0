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
            "older than the window is a duplicate",
            &[(0, 0), (0, 100), (0, 30)],
            &[Started, Next { lost: 99 }, Duplicate],
        ),
        (
            "edge of the window",
            &[(0, 0), (0, 64), (0, 1), (0, 0)],
            &[Started, Next { lost: 63 }, Late, Duplicate],
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
                Started | Next { lost: 0 } => stored += 1,
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
fn survives_a_serde_round_trip() {
    let mut t = SeqTracker::default();
    t.observe(1, 10);
    t.observe(1, 12);
    let bytes = postcard::to_allocvec(&t).unwrap();
    let mut back: SeqTracker = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back.observe(1, 11), Late);
    assert_eq!(back.observe(1, 12), Duplicate);
}
