//! Tests of loss and duplicate counting: gaps, repeats, reboots, late arrivals, and a model
//! check that any sequence of `(boot, seq)` is counted exactly (and never panics).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

/// Feeds `(boot, seq)` pairs of one device; returns what each meant and the totals.
fn feed(pairs: &[(u32, u32)]) -> (Vec<Seen>, SeqTotals) {
    let mut c = SeqCounter::new();
    let seen = pairs.iter().map(|(b, s)| c.observe("d", *b, *s)).collect();
    (seen, c.totals())
}

fn totals(received: u64, unique: u64, duplicates: u64, gaps: u64, late: u64) -> SeqTotals {
    SeqTotals {
        received,
        unique,
        duplicates,
        gaps,
        late,
    }
}

/// A case: its name, the `(boot, seq)` pairs fed, what each meant, and the totals.
type Case = (
    &'static str,
    &'static [(u32, u32)],
    &'static [Seen],
    SeqTotals,
);

#[test]
fn cases() {
    use Seen::*;
    let cases: &[Case] = &[
        (
            "in order",
            &[(1, 0), (1, 1), (1, 2)],
            &[First, Next { skipped: 0 }, Next { skipped: 0 }],
            totals(3, 3, 0, 0, 0),
        ),
        (
            "a gap of two",
            &[(1, 0), (1, 3)],
            &[First, Next { skipped: 2 }],
            totals(2, 2, 0, 2, 0),
        ),
        (
            "repeats",
            &[(1, 0), (1, 1), (1, 1), (1, 0)],
            &[First, Next { skipped: 0 }, Duplicate, Duplicate],
            totals(4, 2, 2, 0, 0),
        ),
        (
            "a late arrival fills its gap, a second copy is a duplicate",
            &[(1, 0), (1, 3), (1, 2), (1, 2), (1, 1)],
            &[First, Next { skipped: 2 }, Late, Duplicate, Late],
            totals(5, 4, 1, 0, 2),
        ),
        (
            "late in the middle of a long gap splits it",
            &[(1, 0), (1, 10), (1, 5)],
            &[First, Next { skipped: 9 }, Late],
            totals(3, 3, 0, 8, 1),
        ),
        (
            "a reboot starts a new sequence, not a gap",
            &[(1, 0), (1, 1), (2, 0), (2, 1)],
            &[First, Next { skipped: 0 }, First, Next { skipped: 0 }],
            totals(4, 4, 0, 0, 0),
        ),
        (
            "the old boot's late message after a reboot counts against the old boot",
            &[(1, 0), (1, 2), (2, 0), (1, 1), (2, 1)],
            &[First, Next { skipped: 1 }, First, Late, Next { skipped: 0 }],
            totals(5, 5, 0, 0, 1),
        ),
        (
            "an earlier number than the first opens a gap below",
            &[(1, 5), (1, 2)],
            &[First, Late],
            totals(2, 2, 0, 2, 1),
        ),
        (
            "the largest sequence number",
            &[(0, u32::MAX), (0, u32::MAX), (0, 0)],
            &[First, Duplicate, Late],
            totals(3, 2, 1, u64::from(u32::MAX) - 1, 1),
        ),
    ];
    for (name, pairs, want_seen, want) in cases {
        let (seen, got) = feed(pairs);
        assert_eq!(&seen, want_seen, "{name}");
        assert_eq!(&got, want, "{name}");
    }
}

#[test]
fn unseen_counts_head_gaps_and_tail_against_what_was_sent() {
    let mut c = SeqCounter::new();
    for s in [1, 2, 4, 5, 5] {
        c.observe("a", 7, s);
    }
    // Sent 0..8: 0 (head), 3 (gap), 6 and 7 (tail) never arrived.
    assert_eq!(c.unseen("a", 7, 8), 4);
    assert_eq!(c.unseen("a", 8, 3), 3, "a boot never seen lost everything");
    assert_eq!(
        c.unseen("b", 7, 2),
        2,
        "a device never seen lost everything"
    );
    assert_eq!(c.unseen("a", 7, 2), 0, "never below zero");
    assert_eq!(
        c.totals().gaps,
        1,
        "only the gap is visible without the sender"
    );
}

#[test]
fn devices_are_counted_apart() {
    let mut c = SeqCounter::new();
    assert_eq!(c.observe("a", 1, 0), Seen::First);
    assert_eq!(c.observe("b", 1, 0), Seen::First);
    assert_eq!(c.observe("b", 1, 0), Seen::Duplicate);
    assert_eq!(c.totals(), totals(3, 2, 1, 0, 0));
}

/// The obvious model: every number seen per boot.
fn model(pairs: &[(u32, u32)]) -> SeqTotals {
    let mut boots: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    let mut t = SeqTotals::default();
    for (b, s) in pairs {
        t.received += 1;
        if !boots.entry(*b).or_default().insert(*s) {
            t.duplicates += 1;
        }
    }
    for seqs in boots.values() {
        t.unique += seqs.len() as u64;
        let (lo, hi) = (*seqs.first().unwrap(), *seqs.last().unwrap());
        t.gaps += u64::from(hi - lo) + 1 - seqs.len() as u64;
    }
    t
}

proptest! {
    #[test]
    fn any_sequence_is_counted_like_the_model(
        pairs in proptest::collection::vec((0u32..3, 0u32..200), 0..300)
    ) {
        let (seen, mut got) = feed(&pairs);
        prop_assert_eq!(seen.len(), pairs.len());
        let late = got.late;
        got.late = 0;
        prop_assert_eq!(got, model(&pairs));
        prop_assert!(late <= got.unique);
    }

    #[test]
    fn counting_never_panics(pairs in proptest::collection::vec((any::<u32>(), any::<u32>()), 0..200)) {
        let mut c = SeqCounter::new();
        for (b, s) in &pairs {
            c.observe("d", *b, *s);
        }
        let t = c.totals();
        prop_assert_eq!(t.unique + t.duplicates, t.received);
        for (b, _) in &pairs {
            let _ = c.unseen("d", *b, u64::MAX);
        }
    }
}

#[test]
fn seen_is_true_exactly_for_what_arrived() {
    let mut c = SeqCounter::new();
    for s in [3, 4, 7, 5, 9] {
        c.observe("d", 1, s);
    }
    c.observe("d", 2, 0);
    let arrived: Vec<u32> = (0..11).filter(|s| c.seen("d", 1, *s)).collect();
    assert_eq!(arrived, [3, 4, 5, 7, 9]);
    assert!(c.seen("d", 2, 0));
    assert!(!c.seen("d", 2, 1), "another boot's numbers are its own");
    assert!(!c.seen("e", 1, 3), "another device's numbers are its own");
}

#[test]
fn a_seq_set_merges_neighbours_into_ranges() {
    let mut s = SeqSet::new();
    for n in [5, 6, 8, 7, 0, 2, 1, u32::MAX] {
        assert!(s.insert(n), "{n} is new");
    }
    assert!(!s.insert(7), "7 is in already");
    assert_eq!(s.len(), 8);
    assert_eq!(
        s.ranges().collect::<Vec<_>>(),
        [(0, 2), (5, 8), (u32::MAX, u32::MAX)]
    );
    assert_eq!(s.iter().take(6).collect::<Vec<_>>(), [0, 1, 2, 5, 6, 7]);
    assert!(s.contains(6) && !s.contains(3) && !s.contains(9));
    s.clear();
    assert!(s.is_empty() && s.ranges().next().is_none());
}

proptest! {
    #[test]
    fn a_seq_set_holds_what_a_btree_set_holds(
        seqs in proptest::collection::vec(0u32..100, 0..300)
    ) {
        let mut s = SeqSet::new();
        let mut model = BTreeSet::new();
        for n in &seqs {
            prop_assert_eq!(s.insert(*n), model.insert(*n));
        }
        prop_assert_eq!(s.len(), model.len() as u64);
        prop_assert_eq!(s.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        for n in 0..101 {
            prop_assert_eq!(s.contains(n), model.contains(&n));
        }
        // Ranges are disjoint and never touch.
        let ranges: Vec<(u32, u32)> = s.ranges().collect();
        for w in ranges.windows(2) {
            prop_assert!(w[0].1 + 1 < w[1].0, "{:?}", ranges);
        }
    }

    #[test]
    fn seen_agrees_with_the_pairs_observed(
        pairs in proptest::collection::vec((0u32..3, 0u32..60), 0..200)
    ) {
        let mut c = SeqCounter::new();
        for (b, s) in &pairs {
            c.observe("d", *b, *s);
        }
        let observed: BTreeSet<(u32, u32)> = pairs.iter().copied().collect();
        for b in 0..3 {
            for s in 0..61 {
                prop_assert_eq!(c.seen("d", b, s), observed.contains(&(b, s)));
            }
        }
    }
}
