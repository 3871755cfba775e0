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
