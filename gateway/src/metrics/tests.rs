use super::*;

#[test]
fn counts_and_renders_every_reason() {
    let m = Metrics::new(Duration::from_secs(3600));
    m.reject(Reject::Undecodable, "d1", &"bad");
    m.reject(Reject::Undecodable, "d1", &"bad");
    m.reject(Reject::NotPermitted, "d2", &"x");
    m.refuse(Refusal::BadCredentials, &"127.0.0.1:1", "wrong password");
    m.stored(Uplink::Telemetry, 5);
    let c = m.counts();
    assert_eq!(c.rejected["undecodable"], 2);
    assert_eq!(c.rejected["not_permitted"], 1);
    assert_eq!(c.rejected["bad_topic"], 0);
    assert_eq!(c.refused["bad_credentials"], 1);
    assert_eq!(c.stored["telemetry"], 5);
    assert_eq!(c.stored["hello"], 0);

    let text = m.render(4096);
    for line in [
        "fleetgate_ingest_rejected_total{reason=\"undecodable\"} 2",
        "fleetgate_ingest_rejected_total{reason=\"oversized\"} 0",
        "fleetgate_mqtt_refused_total{reason=\"bad_credentials\"} 1",
        "fleetgate_ingest_stored_total{channel=\"telemetry\"} 5",
        "fleetgate_storage_bytes 4096",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    let rss_line = text
        .lines()
        .find(|l| l.starts_with("fleetgate_process_resident_memory_bytes "))
        .unwrap();
    let rss: u64 = rss_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(rss > 1 << 20, "{rss_line}");
}

#[test]
fn log_limit_allows_one_line_per_interval_and_counts_the_rest() {
    let limit = LogLimit::new(Duration::from_secs(3600));
    assert_eq!(limit.allow(0), Some(0));
    assert_eq!(limit.allow(0), None);
    assert_eq!(limit.allow(0), None);
    assert_eq!(limit.allow(1), Some(0), "slots are independent");
    let always = LogLimit::new(Duration::ZERO);
    assert_eq!(always.allow(0), Some(0));
    assert_eq!(always.allow(0), Some(0));
}

#[test]
fn ingest_latency_counts_wall_clock_timestamps_only() {
    let m = Metrics::new(Duration::from_secs(60));
    assert_eq!(m.ingest_latency(), Latency::default());
    let now = 1_800_000_000_000;
    // 99 messages 10 ms old, one 1 s old, one from a device counting from its boot, one from a
    // device whose clock runs 2 ms ahead.
    let mut times = vec![now - 10; 99];
    times.extend([now - 1000, 42_000, now + 2]);
    m.ingested(now, &times);
    let l = m.ingest_latency();
    assert_eq!(l.count, 101);
    // To the histogram's precision: 3 significant digits.
    let near = |got: f64, want: f64| (got - want).abs() <= want * 1e-3;
    assert!(near(l.p50_ms, 10.0) && near(l.p99_ms, 10.0), "{l:?}");
    assert!(near(l.max_ms, 1000.0), "{l:?}");
    // The device ahead of the gateway counts as (almost) no delay.
    assert!(l.p999_ms >= 999.0, "{l:?}");
}

#[test]
fn cpu_time_and_memory_of_this_process_are_read() {
    assert!(cpu_seconds().is_some_and(|s| s >= 0.0));
    assert!(resident_memory_bytes().is_some_and(|b| b > 1 << 20));
}

#[test]
fn limit_reasons_are_counted_rendered_and_logged_on_their_own_slots() {
    let m = Metrics::new(Duration::from_secs(3600));
    for _ in 0..3 {
        m.reject(Reject::RateLimited, "d1", &"fg/d1/telemetry");
    }
    m.reject(Reject::TooLarge, "d1", &"fg/d1/log: 5000 bytes");
    m.refuse(Refusal::RateLimited, &"10.0.0.1:5", "too many connections");
    m.refuse(Refusal::Tls, &"10.0.0.2:6", "bad record");
    m.refuse(Refusal::Tls, &"10.0.0.2:7", "bad record");
    let c = m.counts();
    assert_eq!(
        (c.rejected["rate_limited"], c.rejected["too_large"]),
        (3, 1)
    );
    assert_eq!(
        (c.refused["rate_limited"], c.refused["tls_handshake"]),
        (1, 2)
    );
    assert_eq!(m.refused_count(Refusal::Tls), 2);
    assert_eq!(m.rejected_count(Reject::RateLimited), 3);
    let text = m.render(0);
    for line in [
        "fleetgate_ingest_rejected_total{reason=\"rate_limited\"} 3",
        "fleetgate_ingest_rejected_total{reason=\"too_large\"} 1",
        "fleetgate_mqtt_refused_total{reason=\"rate_limited\"} 1",
        "fleetgate_mqtt_refused_total{reason=\"tls_handshake\"} 2",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}");
    }
    // Each reason has its own log slot: one line each, the repeats held back and counted.
    let slot = |r: Reject| r.index();
    assert_eq!(m.log_limit.allow(slot(Reject::RateLimited)), None);
    assert_eq!(
        m.log_limit.allow(Reject::ALL.len() + Refusal::Tls.index()),
        None
    );
    let names: std::collections::HashSet<_> = Reject::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(names.len(), Reject::ALL.len(), "reject names are distinct");
    let names: std::collections::HashSet<_> = Refusal::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(
        names.len(),
        Refusal::ALL.len(),
        "refusal names are distinct"
    );
}
