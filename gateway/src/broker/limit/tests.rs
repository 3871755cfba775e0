use std::net::IpAddr;
use std::time::Duration;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn a_bucket_gives_its_burst_then_its_rate() {
    let t0 = Instant::now();
    // 4 per second: one token every 250 ms (exact in binary floating point).
    let rate = Rate::new(4.0, 3);
    let mut b = TokenBucket::full(rate, t0);
    let taken = (0..10).filter(|_| b.try_take(rate, t0)).count();
    assert_eq!(taken, 3, "the burst, then nothing at the same instant");
    assert!(!b.try_take(rate, t0 + ms(249)));
    assert!(b.try_take(rate, t0 + ms(250)));
    assert!(!b.try_take(rate, t0 + ms(250)));
    // A long pause refills to the burst, not beyond it.
    let later = t0 + Duration::from_secs(60);
    assert!(b.is_full(rate, later));
    let taken = (0..10).filter(|_| b.try_take(rate, later)).count();
    assert_eq!(taken, 3);
}

#[test]
fn a_steady_sender_over_the_rate_gets_exactly_burst_plus_rate_times_time() {
    let t0 = Instant::now();
    let rate = Rate::new(20.0, 40);
    let mut b = TokenBucket::full(rate, t0);
    // 2000 tries per second for 5 s: 40 + 20 x 5 = 140 get through.
    let passed = (0..10_000)
        .filter(|i| b.try_take(rate, t0 + Duration::from_micros(500 * i)))
        .count();
    // The last try is at 4.9995 s: the token due at exactly 5 s has not arrived.
    assert_eq!(passed, 40 + 99);
}

#[test]
fn a_clock_going_backwards_adds_nothing() {
    let t0 = Instant::now() + Duration::from_secs(10);
    let rate = Rate::new(1.0, 1);
    let mut b = TokenBucket::full(rate, t0);
    assert!(b.try_take(rate, t0));
    assert!(!b.try_take(rate, t0 - Duration::from_secs(5)));
    assert!(
        !b.try_take(rate, t0 + ms(999)),
        "the earlier time did not move the bucket back"
    );
    assert!(b.try_take(rate, t0 + ms(1000)));
}

#[test]
fn sources_have_their_own_buckets() {
    let t0 = Instant::now();
    let mut table = Table::new(Rate::new(0.001, 5), 100);
    let a: IpAddr = "10.0.0.1".parse().unwrap();
    let b: IpAddr = "10.0.0.2".parse().unwrap();
    let from_a = (0..8).filter(|_| table.try_take(a, t0)).count();
    let from_b = (0..2).filter(|_| table.try_take(b, t0)).count();
    assert_eq!((from_a, from_b), (5, 2));
    assert!(!table.try_take(a, t0 + Duration::from_secs(1)));
    assert_eq!(table.len(), 2);
}

#[test]
fn a_full_table_forgets_idle_sources_first_then_the_least_limited() {
    let t0 = Instant::now();
    // 1 per second, burst 2: a bucket is full again 2 s after its last use.
    let mut table = Table::new(Rate::new(1.0, 2), 3);
    for n in 0..3u8 {
        assert!(table.try_take(n, t0));
    }
    assert!(table.try_take(0, t0), "key 0 used its whole burst");
    assert_eq!(table.len(), 3);
    // Nothing is idle yet: the newcomer replaces the fullest (1 or 2, one token each; not 0).
    assert!(table.try_take(3, t0));
    assert_eq!(table.len(), 3);
    assert!(
        !table.try_take(0, t0),
        "key 0 is still limited: it was not forgotten"
    );
    // 10 s later everything has refilled: one sweep forgets all of it.
    assert!(table.try_take(4, t0 + Duration::from_secs(10)));
    assert_eq!(table.len(), 1);
    assert!(table.try_take(0, t0 + Duration::from_secs(10)));
    assert!(table.len() <= 3);
}

#[test]
fn a_parked_bucket_is_handed_back_and_a_full_one_is_not_kept() {
    let t0 = Instant::now();
    let rate = Rate::new(10.0, 5);
    let mut parked: Table<String> = Table::new(rate, 10);
    let mut b = parked.take(&"d1".to_owned(), t0);
    for _ in 0..5 {
        assert!(b.try_take(rate, t0));
    }
    parked.put("d1".to_owned(), b, t0);
    assert_eq!(parked.len(), 1);
    // A reconnect 100 ms later gets the same bucket back: one token, not a new burst.
    let mut again = parked.take(&"d1".to_owned(), t0 + ms(100));
    assert!(parked.is_empty());
    assert!(again.try_take(rate, t0 + ms(100)));
    assert!(!again.try_take(rate, t0 + ms(100)));
    // Put back full, it is simply dropped.
    parked.put("d1".to_owned(), again, t0 + Duration::from_secs(5));
    assert!(parked.is_empty());
}
