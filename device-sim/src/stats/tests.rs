//! Tests of the report arithmetic: percentiles on known data, rates, deltas, the `-` figure.

use super::*;

#[test]
fn percentiles_of_one_to_a_thousand_microseconds() {
    let mut h = histogram();
    for us in 1..=1000 {
        record_us(&mut h, us);
    }
    let p = Percentiles::of(&h).unwrap();
    assert_eq!(
        p,
        Percentiles {
            count: 1000,
            p50_ms: 0.5,
            p99_ms: 0.99,
            p999_ms: 0.999,
            max_ms: 1.0,
        }
    );
}

#[test]
fn percentiles_see_a_slow_tail() {
    // 990 fast (1 ms), 9 slow (50 ms), 1 very slow (2 s).
    let mut h = histogram();
    for _ in 0..990 {
        record(&mut h, Duration::from_millis(1));
    }
    for _ in 0..9 {
        record(&mut h, Duration::from_millis(50));
    }
    record(&mut h, Duration::from_secs(2));
    let p = Percentiles::of(&h).unwrap();
    // Three significant digits: a value reads as the top of its bucket (50 ms as 50.015 ms).
    assert_eq!(
        p,
        Percentiles {
            count: 1000,
            p50_ms: 1.0,
            p99_ms: 1.0,
            p999_ms: 50.015,
            max_ms: 2000.895,
        }
    );
}

#[test]
fn an_empty_histogram_has_no_percentiles_and_extremes_are_clamped() {
    let mut h = histogram();
    assert_eq!(Percentiles::of(&h), None);
    record(&mut h, Duration::ZERO);
    record(&mut h, Duration::from_secs(100_000));
    let p = Percentiles::of(&h).unwrap();
    // 0 counts as 1 us, 100000 s as an hour (the top of its bucket).
    assert_eq!(
        p,
        Percentiles {
            count: 2,
            p50_ms: 0.001,
            p99_ms: 3_600_809.983,
            p999_ms: 3_600_809.983,
            max_ms: 3_600_809.983,
        }
    );
}

#[test]
fn rates_over_a_phase() {
    assert_eq!(per_second(1500, Duration::from_secs(3)), 500.0);
    assert_eq!(per_second(1, Duration::from_millis(250)), 4.0);
    assert_eq!(per_second(10, Duration::ZERO), 0.0);
    assert_eq!(delta(10, 25), 15);
    assert_eq!(
        delta(25, 10),
        0,
        "a counter that went back (a restart) gives 0"
    );
}

#[test]
fn missing_figures_print_as_a_dash() {
    assert_eq!(Opt::<u64>(None).to_string(), "-");
    assert_eq!(Opt(Some(Rate(12.345))).to_string(), "12.3/s");
    assert_eq!(Mib(3 * 1024 * 1024 / 2).to_string(), "1.5 MiB");
}

#[test]
fn acknowledged_but_lost_by_counts() {
    // All 4000 acknowledged were stored once each.
    assert_eq!(acked_lost(4000, 4000, 0), 0);
    // 3 of them never stored.
    assert_eq!(acked_lost(4000, 3997, 0), 3);
    // A repeat is stored twice but is one message.
    assert_eq!(acked_lost(4000, 4000, 2), 2);
    // More stored than acknowledged (unacknowledged ones that got in) hides nothing here.
    assert_eq!(acked_lost(4000, 4100, 0), 0);
    assert_eq!(acked_lost(0, 0, 5), 0);
}
