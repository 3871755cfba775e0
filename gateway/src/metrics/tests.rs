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

#[test]
fn the_classic_text_names_counters_by_their_samples() {
    let open = "# HELP fleetgate_connects Accepted device connections.\n\
                # TYPE fleetgate_connects counter\n\
                fleetgate_connects_total 3\n\
                # HELP fleetgate_build The gateway's version.\n\
                # TYPE fleetgate_build info\n\
                fleetgate_build_info{version=\"0.1.0\"} 1\n\
                # HELP fleetgate_storage_bytes Size.\n\
                # TYPE fleetgate_storage_bytes gauge\n\
                # UNIT fleetgate_storage_bytes bytes\n\
                fleetgate_storage_bytes 7\n\
                # EOF\n";
    assert_eq!(
        openmetrics_to_text(open),
        "# HELP fleetgate_connects_total Accepted device connections.\n\
         # TYPE fleetgate_connects_total counter\n\
         fleetgate_connects_total 3\n\
         # HELP fleetgate_build_info The gateway's version.\n\
         # TYPE fleetgate_build_info gauge\n\
         fleetgate_build_info{version=\"0.1.0\"} 1\n\
         # HELP fleetgate_storage_bytes Size.\n\
         # TYPE fleetgate_storage_bytes gauge\n\
         fleetgate_storage_bytes 7\n"
    );
}

fn drift_labels(model: &str, version: &str, subject: &str) -> DriftLabels {
    DriftLabels {
        model: model.into(),
        version: version.into(),
        cohort: "all".into(),
        subject: subject.into(),
    }
}

#[test]
fn drift_is_rendered_per_measure_and_retired_versions_go() {
    let m = Metrics::new(Duration::from_secs(60));
    m.drift_value
        .get_or_create(&drift_labels("kws", "1.0.0", "temp"))
        .set(0.25);
    m.drift_value
        .get_or_create(&drift_labels("kws", "1.0.0", PREDICTION_SUBJECT))
        .set(0.125);
    m.drift_status
        .get_or_create(&drift_labels("kws", "1.0.0", "temp"))
        .set(2);
    m.drift_value
        .get_or_create(&drift_labels("kws", "2.0.0", "temp"))
        .set(0.5);
    let text = m.render_text(0);
    for line in [
        "# TYPE fleetgate_drift_psi gauge",
        "fleetgate_drift_psi{model=\"kws\",version=\"1.0.0\",cohort=\"all\",feature=\"temp\"} 0.25",
        "fleetgate_drift_psi{model=\"kws\",version=\"2.0.0\",cohort=\"all\",feature=\"temp\"} 0.5",
        "# TYPE fleetgate_drift_prediction_js gauge",
        "fleetgate_drift_prediction_js{model=\"kws\",version=\"1.0.0\",cohort=\"all\"} 0.125",
        "fleetgate_drift_status{model=\"kws\",version=\"1.0.0\",cohort=\"all\",subject=\"temp\"} 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(!text.contains("drift_value"), "{text}");

    // No device runs 1.0.0 any more: its series go, 2.0.0's stay.
    m.retain_drift(|model, version| model == "kws" && version == "2.0.0");
    let text = m.render_text(0);
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("fleetgate_drift_")
                && !l.starts_with("fleetgate_drift_mismatched"))
            .collect::<Vec<_>>(),
        [
            "fleetgate_drift_psi{model=\"kws\",version=\"2.0.0\",cohort=\"all\",feature=\"temp\"} 0.5"
        ]
    );
}

#[test]
fn process_build_http_alert_and_latency_figures_are_rendered() {
    let m = Metrics::new(Duration::from_secs(60));
    m.set_unresolved_alerts(0, 2, 1);
    m.http_request("GET", "/api/v1/devices", 200, 0.003);
    m.http_request("GET", "/api/v1/devices", 200, 0.004);
    m.http_request("POST", "/api/v1/devices", 401, 0.0001);
    let now = 1_800_000_000_000;
    m.ingested(now, &[now - 20, now - 3000]);
    let text = m.render_text(0);
    for line in [
        "fleetgate_alerts_unresolved{severity=\"info\"} 0",
        "fleetgate_alerts_unresolved{severity=\"warning\"} 2",
        "fleetgate_alerts_unresolved{severity=\"critical\"} 1",
        "fleetgate_http_requests_total{method=\"GET\",route=\"/api/v1/devices\",status=\"200\"} 2",
        "fleetgate_http_requests_total{method=\"POST\",route=\"/api/v1/devices\",status=\"401\"} 1",
        "fleetgate_http_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/devices\"} 2",
        "fleetgate_ingest_latency_seconds_count 2",
        "fleetgate_ingest_latency_seconds_bucket{le=\"0.025\"} 1",
        "fleetgate_ingest_latency_seconds_bucket{le=\"2.5\"} 1",
        "fleetgate_ingest_latency_seconds_bucket{le=\"5.0\"} 2",
        "# TYPE fleetgate_build_info gauge",
        "# TYPE fleetgate_process_cpu_seconds_total counter",
        "# TYPE fleetgate_process_start_time_seconds gauge",
        "# TYPE fleetgate_process_open_fds gauge",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        text.lines().any(|l| l
            == format!(
                "fleetgate_build_info{{version=\"{}\",arch=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::ARCH
            )),
        "{text}"
    );
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}"))
            .parse()
            .unwrap()
    };
    assert!(value("fleetgate_process_open_fds") >= 1.0);
    let started = value("fleetgate_process_start_time_seconds");
    assert!(
        (started - now_ms() as f64 / 1000.0).abs() < 3600.0,
        "{started}"
    );
}

#[test]
fn a_devices_latest_refusals_are_kept_folded_and_bounded() {
    let m = Metrics::new(Duration::from_secs(3600));
    m.reject(Reject::Invalid, "d1", &"telemetry: unknown field `tmp_c`");
    m.reject(Reject::Invalid, "d1", &"telemetry: unknown field `tmp_c`");
    m.reject(Reject::TooLarge, "d1", &"x".repeat(500));
    let (total, recent) = m.refusals("d1");
    assert_eq!(total, 3);
    assert_eq!(recent.len(), 2);
    assert_eq!(
        (recent[0].reason, recent[0].count, recent[0].detail.len()),
        ("too_large", 1, 203)
    );
    assert_eq!(
        (recent[1].reason, recent[1].count, recent[1].detail.as_str()),
        ("invalid", 2, "telemetry: unknown field `tmp_c`")
    );
    assert_eq!(m.refusals("d2"), (0, vec![]));
    // At most REFUSALS_PER_DEVICE entries: the oldest go first.
    for i in 0..25 {
        m.reject(Reject::Undecodable, "d1", &format!("message {i}"));
    }
    let (total, recent) = m.refusals("d1");
    assert_eq!(total, 28);
    assert_eq!(recent.len(), REFUSALS_PER_DEVICE);
    assert_eq!(recent[0].detail, "message 24");
    assert_eq!(recent[9].detail, "message 15");
}

#[test]
fn refusals_are_kept_for_a_bounded_number_of_devices() {
    let mut log = RefusalLog::default();
    for i in 0..(REFUSAL_DEVICES as u64 + 10) {
        log.record(&format!("d{i}"), Reject::Invalid, &"bad", i);
    }
    assert_eq!(log.by_device.len(), REFUSAL_DEVICES);
    // The devices refused longest ago were forgotten.
    assert!(!log.by_device.contains_key("d0") && !log.by_device.contains_key("d9"));
    assert!(log.by_device.contains_key("d10"));
}

/// The names in `text` that start with `prefix` (metric names: `a-z 0-9 _ :`).
fn names_with(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].trim_end_matches(':').to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    out
}

/// The Grafana dashboard and the Prometheus rules name only series this gateway serves, and
/// the dashboard only recording rules the rules file defines.
#[test]
fn the_dashboard_and_the_rules_name_only_metrics_the_gateway_serves() {
    let dashboard = include_str!("../../../packaging/grafana/fleetgate.json");
    let rules = include_str!("../../../packaging/prometheus/fleetgate.rules.yml");
    let m = Metrics::new(Duration::from_secs(60));
    m.drift_value
        .get_or_create(&drift_labels("kws", "1.0.0", "temp"))
        .set(0.1);
    m.drift_value
        .get_or_create(&drift_labels("kws", "1.0.0", PREDICTION_SUBJECT))
        .set(0.1);
    m.drift_status
        .get_or_create(&drift_labels("kws", "1.0.0", "temp"))
        .set(1);
    m.http_request("GET", "/healthz", 200, 0.001);
    let served: std::collections::BTreeSet<String> = m
        .render_text(1)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    let recorded: std::collections::BTreeSet<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_owned)
        .collect();
    assert_eq!(recorded.len(), 11, "{recorded:?}");
    for (what, text) in [("dashboard", dashboard), ("rules", rules)] {
        let used = names_with(text, "fleetgate_");
        assert!(used.len() > 10, "{what}: {used:?}");
        for name in used {
            assert!(
                served.contains(&name),
                "{what} uses {name}, which /metrics does not serve"
            );
        }
        for name in names_with(text, "fleetgate:") {
            assert!(
                recorded.contains(&name),
                "{what} uses {name}, which no rule records"
            );
        }
    }
    let panels: serde_json::Value = serde_json::from_str(dashboard).unwrap();
    assert_eq!(panels["uid"], "fleetgate");
}
