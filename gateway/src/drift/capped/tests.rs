use super::*;

#[test]
fn the_water_level_caps_only_the_devices_over_their_share() {
    // 10 devices of 100 and one of 1000, at most 20 %: the big one is scaled to C = 250
    // (250 = 0.2 x (1000 + 250)).
    let counts = (0..10).map(|_| 100).chain([1000]);
    let c = water_level(counts, 0.2).unwrap();
    assert!((c - 250.0).abs() < 1e-9, "{c}");
    assert_eq!(water_level([100, 100, 100].into_iter(), 0.5), None);
    // Two devices, at most one half each: the larger is brought down to the smaller.
    assert_eq!(water_level([1000, 10].into_iter(), 0.5), Some(10.0));
}

#[test]
fn a_heavy_device_is_scaled_to_its_share_and_the_pool_is_untouched() {
    let q = Quota::new(0.1, 20, 500, 2000);
    assert_eq!((q.light, q.close), (50, 200));
    let mut w = Capped::new(3);
    // 19 devices send 40 counts in bin 0; one sends 5000 in bin 2.
    for d in 0..19 {
        for _ in 0..40 {
            w.add_one(d, 0, q);
        }
    }
    w.add(99, &[0, 0, 5000], q);
    assert_eq!(w.raw(), 19 * 40 + 5000);
    assert_eq!(w.heavy.len(), 1);
    // Closing counts the heavy device's first 200 only.
    assert_eq!(w.capped_total, 19 * 40 + 200);
    let e = w.effective(q);
    // C = 0.1 x (760 + C): C = 84.44.
    let c = 0.1 * 760.0 / 0.9;
    assert!((e.counts[2] - c).abs() < 1e-9, "{e:?}");
    assert_eq!(e.counts[0], 760.0);
    assert!((e.top_share - 0.1).abs() < 1e-9);
    assert_eq!(e.devices, 20);
}

#[test]
fn a_vector_over_the_light_quota_is_split_without_losing_counts() {
    let q = Quota::new(0.1, 20, 500, 2000);
    let mut w = Capped::new(4);
    w.add(1, &[7, 13, 29, 51], q);
    let pooled: u64 = w.pool.iter().sum();
    let heavy: u64 = w.heavy[&1].iter().sum();
    assert_eq!((pooled, pooled + heavy), (50, 100));
    // Alone among 20 known devices it keeps only its share of itself: no cap is possible, so
    // the window has equal weights (and is far below any judged size).
    let e = w.effective(q);
    assert_eq!(e.raw, 100);
}

#[test]
fn a_share_of_one_turns_the_cap_off() {
    let q = Quota::new(1.0, 50, 500, 2000);
    let mut w = Capped::new(2);
    w.add(1, &[5000, 0], q);
    w.add(2, &[0, 10], q);
    assert!(w.heavy.is_empty());
    assert_eq!(w.effective(q).counts, [5000.0, 10.0]);
}
