//! Tests of the load clients' pure parts: payload padding, refusal names, and how a gateway
//! restart shows between two marks.

use super::*;

#[test]
fn padding_reaches_about_the_requested_size() {
    for encoding in [Encoding::Postcard, Encoding::Json] {
        let size = |n, features| {
            encode(&template("pad", 0, n, features), encoding)
                .unwrap()
                .len()
        };
        let bare = size(0, 4);
        // Below the bare message nothing is added.
        assert_eq!(
            padding(bare, 4, encoding).unwrap(),
            (0, 4, bare),
            "{encoding:?}"
        );
        for want in [bare + 1, 1000, 4096, 16_000] {
            let (samples, features, got) = padding(want, 4, encoding).unwrap();
            assert!(samples > 0 && features >= 4, "{encoding:?} {want}");
            assert_eq!(got, size(samples, features), "{encoding:?} {want}");
            // At least the size asked for, with the fewest samples that get there.
            assert!(got >= want, "{encoding:?}: asked {want}, got {got}");
            assert!(size(samples - 1, features) < want, "{encoding:?} {want}");
        }
    }
}

#[test]
fn padding_adds_features_when_samples_run_out_and_refuses_the_impossible() {
    // 256 samples of 4 features hold about 4 KiB in postcard: 40 KB needs more features.
    let (samples, features, got) = padding(40_000, 4, Encoding::Postcard).unwrap();
    assert!(
        features > 4 && samples <= limits::MAX_SAMPLES,
        "{samples} x {features}"
    );
    assert!(got >= 40_000);
    let small = padding(10, 4, Encoding::Postcard).unwrap();
    assert_eq!(
        (small.0, small.1),
        (0, 4),
        "no padding below the bare message"
    );
    let err = padding(10_000_000, 4, Encoding::Postcard).unwrap_err();
    assert!(err.contains("at most about"), "{err}");
}

#[test]
fn refusals_are_named() {
    use rumqttc::ConnectReturnCode as C;
    assert_eq!(
        refusal_name(C::BadUserNamePassword),
        "bad_user_name_or_password"
    );
    assert_eq!(refusal_name(C::ServiceUnavailable), "server_unavailable");
}

fn mark(telemetry: u64, duplicates: u64, cpu_seconds: Option<f64>) -> Mark {
    Mark {
        ingested: telemetry,
        lost: 0,
        duplicates,
        gateway: Some(IngestSample {
            at: std::time::Instant::now(),
            telemetry,
            lost: 0,
            duplicates,
            latency: None,
            process: Some(crate::ingest::Process {
                resident_bytes: None,
                cpu_seconds,
            }),
        }),
        broker: None,
        clients: None,
    }
}

#[test]
fn a_restart_shows_as_counters_or_cpu_time_going_back() {
    let before = mark(1000, 2, Some(5.0));
    assert!(!Mark::restarted_between(&before, &mark(1500, 2, Some(6.0))));
    assert!(Mark::restarted_between(&before, &mark(900, 2, Some(6.0))));
    assert!(Mark::restarted_between(&before, &mark(1500, 0, Some(6.0))));
    assert!(Mark::restarted_between(&before, &mark(1500, 2, Some(0.5))));
    assert!(!Mark::restarted_between(&before, &mark(1500, 2, None)));
    // A subscriber's marks have no gateway to restart.
    let sub = Mark {
        ingested: 10,
        lost: 0,
        duplicates: 0,
        gateway: None,
        broker: None,
        clients: None,
    };
    assert!(!Mark::restarted_between(&sub, &sub.clone()));
}

#[test]
fn the_brokers_use_runs_from_the_first_mark_to_the_last() {
    let t0 = std::time::Instant::now();
    let with = |secs: u64, cpu_seconds: f64, mib: u64| {
        let mut m = mark(0, 0, None);
        m.broker = Some(ProcSample {
            at: t0 + Duration::from_secs(secs),
            cpu_seconds,
            resident_bytes: mib * 1024 * 1024,
        });
        m
    };
    let (first, middle, last) = (with(0, 1.0, 40), with(1, 1.8, 70), with(4, 4.0, 50));
    let u = BrokerUse::of(
        42,
        Some(&first),
        Some(&last),
        [&first, &middle, &last].into_iter(),
    );
    assert_eq!(
        u,
        BrokerUse {
            pid: 42,
            cpu_pct: Some(75.0),
            resident_bytes: Some(50 * 1024 * 1024),
            resident_peak_bytes: Some(70 * 1024 * 1024),
        }
    );
    let gone = BrokerUse::of(42, Some(&first), None, std::iter::empty());
    assert_eq!(
        (gone.cpu_pct, gone.resident_bytes, gone.resident_peak_bytes),
        (None, None, None)
    );
}

#[test]
fn the_subscriber_reads_the_numbers_of_either_encoding() {
    let mut t = template("d", 7, 2, 4);
    t.seq = 12;
    t.time_ms = 1_764_201_600_000;
    let want = Numbered {
        boot: 7,
        seq: 12,
        time_ms: 1_764_201_600_000,
    };
    for encoding in [Encoding::Json, Encoding::Postcard] {
        let bytes = encode(&t, encoding).unwrap();
        assert_eq!(numbered(&bytes, encoding), Some(want), "{encoding:?}");
        assert_eq!(numbered(b"\x00garbage", encoding), None, "{encoding:?}");
    }
    // The smallest valid JSON telemetry: no boot, no time.
    assert_eq!(
        numbered(br#"{ "seq": 1, "hw": { "temp_c": 40.5 } }"#, Encoding::Json),
        Some(Numbered {
            boot: 0,
            seq: 1,
            time_ms: 0
        })
    );
}
