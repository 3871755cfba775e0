use super::*;

#[test]
fn nothing_happens_below_the_limit_or_without_a_quota() {
    let mut q = Quota::new(1000, 0);
    assert_eq!(q.excess(500, 400), 0);
    assert_eq!(q.excess(899, 890), 0);
    assert_eq!(q.cap(), 0);
    let mut none = Quota::new(0, 0);
    assert_eq!(none.excess(u64::MAX, u64::MAX), 0);
}

#[test]
fn near_the_limit_the_rows_are_capped_and_the_cap_tightens_while_the_file_grows() {
    let mut q = Quota::new(1000, 0);
    // The file reaches 90 %: the rows stored then, less 10 %, become the cap.
    assert_eq!(q.excess(900, 600), 60);
    assert_eq!(q.cap(), 540);
    // More rows arrive, the file does not grow: only the rows above the cap go.
    assert_eq!(q.excess(900, 700), 160);
    assert_eq!(q.excess(900, 540), 0);
    // The file grew anyway: the cap comes down another 10 %.
    assert_eq!(q.excess(950, 540), 54);
    assert_eq!(q.cap(), 486);
    // Same size again: the cap holds.
    assert_eq!(q.excess(950, 500), 14);
    assert_eq!(q.cap(), 486);
}

#[test]
fn a_stored_cap_carries_over_a_restart_and_a_raised_limit_lifts_it() {
    let mut q = Quota::new(1000, 486);
    assert_eq!(q.excess(950, 500), 14, "the stored cap holds after a start");
    assert_eq!(q.cap(), 486);
    assert_eq!(q.excess(960, 486), 49, "and tightens when the file grows");
    let mut raised = Quota::new(2000, 486);
    assert_eq!(raised.excess(950, 500), 0);
    assert_eq!(raised.cap(), 0);
}

/// A model of a flood: each batch adds rows, the file grows to hold what is stored plus a
/// fixed overhead share, and never shrinks. The file stays within 1.1 x the quota.
#[test]
fn a_simulated_flood_keeps_the_file_within_a_tenth_over_the_quota() {
    let max = 4 << 20;
    let mut q = Quota::new(max, 0);
    let (mut rows, mut file) = (0u64, 0u64);
    for batch in 0..100_000u64 {
        rows += 20_000;
        // Pages hold rows at 60 % fill, plus a commit's copy-on-write pages.
        let needed = rows * 10 / 6 + 64 * 4096;
        file = file.max(needed);
        let excess = q.excess(file, rows);
        rows -= excess.min(rows);
        assert!(
            file as f64 <= max as f64 * 1.1,
            "batch {batch}: file {file} over 1.1 x {max}"
        );
    }
    assert!(rows > 0, "the newest rows are kept");
}
