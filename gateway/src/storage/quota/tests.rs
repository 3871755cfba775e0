use super::*;

#[test]
fn without_a_quota_nothing_is_deleted() {
    let mut none = Quota::new(0, 0);
    assert_eq!(none.excess(u64::MAX, u64::MAX), 0);
    assert_eq!(none.cap(), 0);
}

#[test]
fn the_ratio_is_learned_when_the_file_grows_and_the_cap_follows_the_room() {
    let mut q = Quota::new(1000, 0);
    // First look: 200 bytes of file per 100 of rows, at most; the file may still double.
    assert_eq!(q.excess(200, 100), 0);
    assert_eq!(q.cap(), 400); // 1000 x 0.8 / 2
    // The file grew from 200 to 400 with 160 bytes of rows: 1.25 file bytes per row byte.
    assert_eq!(q.excess(400, 160), 0);
    assert_eq!(q.stored_ratio(), 1_250_000);
    assert_eq!(q.cap(), 640);
    // At 600 the file may not double again (1200 > 1100): the room is the file itself, and
    // the ratio is learned again (400 / 320).
    assert_eq!(q.excess(600, 320), 0);
    assert_eq!(q.cap(), 384); // 600 x 0.8 / 1.25
    // It stays there: the cap holds while the rows come and go.
    assert_eq!(q.excess(600, 400), 16);
    assert_eq!(q.excess(600, 384), 0);
    assert_eq!(q.cap(), 384);
}

#[test]
fn a_stored_ratio_carries_over_a_restart_and_a_raised_limit_gives_room() {
    let mut q = Quota::new(1000, 2_000_000);
    assert_eq!(
        q.excess(900, 400),
        400 - 360,
        "the stored ratio holds after a start"
    );
    let mut raised = Quota::new(4000, 2_000_000);
    assert_eq!(raised.excess(900, 400), 0);
    assert_eq!(raised.cap(), 1600);
}

/// A model of redb under a flood: each batch adds rows, the pages they need are the rows at a
/// fill that degrades as trimming goes on, plus what a commit copies and frees; when the file
/// has too few pages it doubles (as redb does below 4 GiB), and it never shrinks. For quotas
/// of several sizes and batch sizes, the file stays within 1.1 x the quota and keeps at least
/// a third of it in rows.
#[test]
fn a_simulated_flood_keeps_the_file_within_a_tenth_over_the_quota() {
    for (max, batch) in [
        (4u64 << 20, 20_000u64),
        (16 << 20, 60_000),
        (100 << 20, 200_000),
    ] {
        let mut q = Quota::new(max, 0);
        let (mut rows, mut file, mut trimmed) = (0u64, 64u64 << 10, 0u64);
        let mut kept = 0u64;
        for n in 0..20_000u64 {
            rows += batch;
            // Pages fill to 70 %, down to 60 % once trimming has gone on for a while.
            let fill = if trimmed > 10 * max { 0.6 } else { 0.7 };
            let needed = (rows as f64 / fill) as u64 + 4 * batch + (64 << 10);
            while file < needed {
                file *= 2;
            }
            let excess = q.excess(file, rows);
            rows -= excess.min(rows);
            trimmed += excess;
            assert!(
                file as f64 <= max as f64 * 1.1,
                "quota {max}, batch {n}: file {file} over 1.1 x"
            );
            kept = rows;
        }
        assert!(
            trimmed > 10 * max,
            "quota {max}: the flood went on long enough"
        );
        assert!(
            kept * 3 >= max,
            "quota {max}: only {kept} bytes of rows kept"
        );
    }
}
