//! Load, stress, storm and burst runs of the simulator against a real gateway and against a
//! bare Mosquitto broker, small and bounded: every message offered is acknowledged and arrives
//! exactly once, every acknowledged sequence number is found where it should be, and the
//! gateway's own counters agree with the report. Also a scenario run whose faulty devices show
//! up in the gateway's counters exactly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::sync::atomic::Ordering::Relaxed;

use fleetgate_sim::FleetSpec;
use fleetgate_sim::burst::{self, BurstSpec};
use fleetgate_sim::fleet::Fleet;
use fleetgate_sim::ingest::Api;
use fleetgate_sim::load::{self, LoadSpec};
use fleetgate_sim::scenario;
use fleetgate_sim::stress::{self, Ramp, RampSpec, StopRules};
use fleetgate_sim::updater::Trust;
use rumqttc::QoS;
use tests::release::{model, public};
use tests::{TOKEN, TestGateway, config};
use tokio_util::sync::CancellationToken;

/// 20 devices x 20 messages: a rate of 20/s for one second. A client's first message falls
/// somewhere in the first period, so each one sends exactly 20 within the second.
fn twenty_by_twenty(mut spec: LoadSpec) -> LoadSpec {
    spec.rate = 20.0;
    spec.duration = Duration::from_secs(1);
    spec.qos = QoS::AtLeastOnce;
    spec.connect_rate = 200.0;
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_on_the_gateway_is_offered_acked_and_ingested_alike() {
    let gw = TestGateway::start().await;
    let creds = gw.enroll_fleet("load", 20).await;
    let api = Api {
        url: gw.http_url(),
        token: TOKEN.to_owned(),
    };
    let mut spec = twenty_by_twenty(LoadSpec::gateway(
        "127.0.0.1",
        gw.mqtt_port(),
        creds,
        Some(api),
    ));
    spec.verify = true;
    let report = load::run(spec, CancellationToken::new()).await.unwrap();
    let c = &report.connect;
    assert_eq!(
        (c.devices, c.connected, c.refused, c.errors),
        (20, 20, 0, 0),
        "{report}"
    );
    assert_eq!(c.connack.map(|p| p.count), Some(20), "{report}");
    let s = &report.steady;
    assert_eq!(
        (s.offered, s.skipped, s.acked, s.unacked),
        (400, 0, Some(400), Some(0)),
        "{report}"
    );
    assert_eq!(s.ack_latency.map(|p| p.count), Some(400), "{report}");
    let i = s.ingest.as_ref().expect("ingest counters");
    assert_eq!(
        (i.source, i.ingested, i.lost, i.duplicates, i.acked_lost),
        ("gateway_api", 400, 0, 0, Some(0)),
        "{report}"
    );
    // Every acknowledged number, read back from the gateway's telemetry API.
    let v = report.verify.as_ref().expect("verified");
    assert_eq!(
        (v.devices, v.unreadable, v.acked, v.stored, v.missing),
        (20, 0, 400, 400, 0),
        "{report}"
    );
    assert!(
        i.latency.is_some() && i.resident_bytes.is_some(),
        "{report}"
    );
    assert!(report.clean(), "{report}");
    assert!(report.notes.is_empty(), "{report}");

    // The gateway's own view: exactly those 400, nothing lost, repeated or refused.
    gw.sync().await;
    let ingest = gw.get("/ingest").await;
    assert_eq!(ingest["stored"]["telemetry"], 400);
    assert_eq!(ingest["telemetry_lost"], 0);
    assert_eq!(ingest["telemetry_duplicates"], 0);
    assert_eq!(ingest["latency"]["count"], 400);
    assert_eq!(ingest["mqtt"]["connects"], 20);
    let rejected: u64 = ingest["rejected"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_reconnect_storm_on_the_gateway_brings_every_device_back() {
    let gw = TestGateway::start().await;
    let creds = gw.enroll_fleet("storm", 20).await;
    let mut spec = LoadSpec::gateway("127.0.0.1", gw.mqtt_port(), creds, None);
    spec.connect_rate = 200.0;
    let run = stress::storm(spec, Duration::from_secs(30), CancellationToken::new())
        .await
        .unwrap();
    let s = &run.storm;
    assert_eq!(
        (s.dropped, s.back, s.never_back, s.refused),
        (20, 20, 0, 0),
        "{run}"
    );
    assert!(s.all_back_s.is_some(), "{run}");
    assert_eq!(s.connack.map(|p| p.count), Some(20), "{run}");
    assert!(run.clean(), "{run}");
    let ingest = gw.get("/ingest").await;
    assert_eq!(
        ingest["mqtt"]["connects"], 40,
        "each device connected twice"
    );
}

/// A Mosquitto broker on a free loopback port, anonymous, without persistence; killed (by its
/// pid) when dropped.
struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    async fn start() -> Mosquitto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type information\n\
                 max_inflight_messages 0\nmax_queued_messages 100000\n"
            ),
        )
        .expect("write mosquitto.conf");
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto runs (apt-get install mosquitto; .ci/run installs it)");
        // Ready once it says it is running (it opened its listener before that).
        let stderr = child.stderr.take().expect("stderr");
        let ready = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let up = lines
                .by_ref()
                .map_while(Result::ok)
                .any(|l| l.contains(" running"));
            // Keep reading so the broker never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            up
        });
        let mut broker = Mosquitto {
            child,
            port,
            _dir: dir,
        };
        let up = tokio::time::timeout(Duration::from_secs(10), ready).await;
        if !matches!(up, Ok(Ok(true))) {
            let status = broker.child.try_wait();
            panic!("mosquitto on port {port} did not start: {status:?}");
        }
        broker
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_through_mosquitto_arrives_exactly_once() {
    let broker = Mosquitto::start().await;
    let spec = twenty_by_twenty(LoadSpec::mqtt("127.0.0.1", broker.port, "mq", 20));
    let report = load::run(spec, CancellationToken::new()).await.unwrap();
    assert_eq!(
        (report.connect.connected, report.connect.errors),
        (20, 0),
        "{report}"
    );
    let s = &report.steady;
    assert_eq!(
        (s.offered, s.skipped, s.acked, s.unacked),
        (400, 0, Some(400), Some(0)),
        "{report}"
    );
    let i = s.ingest.as_ref().expect("subscriber counts");
    assert_eq!(
        (i.source, i.ingested, i.lost, i.duplicates, i.undecodable),
        ("subscriber", 400, 0, 0, 0),
        "{report}"
    );
    assert_eq!(i.acked_lost, Some(0), "{report}");
    assert_eq!(i.latency.map(|p| p.count), Some(400), "{report}");
    assert_eq!((i.resident_bytes, i.cpu_pct), (None, None), "{report}");
    assert!(report.clean(), "{report}");
}

/// 20 devices flush 200 messages each at once: 4000, QoS 1, rumqttc's window of 100.
fn twenty_flush_two_hundred(load: LoadSpec, verify: bool) -> BurstSpec {
    let mut spec = BurstSpec::new(load, 200);
    spec.load.connect_rate = 200.0;
    spec.timeout = Duration::from_secs(60);
    spec.verify = verify;
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_burst_on_the_gateway_stores_everything_it_acknowledged() {
    let gw = TestGateway::start().await;
    let creds = gw.enroll_fleet("burst", 20).await;
    let api = Api {
        url: gw.http_url(),
        token: TOKEN.to_owned(),
    };
    let load = LoadSpec::gateway("127.0.0.1", gw.mqtt_port(), creds, Some(api));
    let report = burst::run(
        twenty_flush_two_hundred(load, true),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (report.connect.connected, report.connect.errors),
        (20, 0),
        "{report}"
    );
    let b = &report.burst;
    assert_eq!(
        (b.devices, b.offered, b.unsent, b.acked, b.unacked),
        (20, 4000, 0, Some(4000), Some(0)),
        "{report}"
    );
    assert_eq!(b.ack_latency.map(|p| p.count), Some(4000), "{report}");
    assert!(b.acked_per_s.is_some_and(|r| r > 0.0), "{report}");
    let i = b.ingest.as_ref().expect("ingest counters");
    assert_eq!(
        (i.source, i.ingested, i.expected, i.lost, i.duplicates),
        ("gateway_api", 4000, 4000, 0, 0),
        "{report}"
    );
    assert_eq!(
        (i.acked_lost, i.acked_lost_by),
        (Some(0), "by_count"),
        "{report}"
    );
    assert!(
        i.ingested_per_s.is_some() && i.resident_peak_bytes.is_some() && i.queue_full.is_some(),
        "{report}"
    );
    let v = report.verify.as_ref().expect("verified");
    assert_eq!(
        (v.devices, v.unreadable, v.acked, v.stored, v.missing),
        (20, 0, 4000, 4000, 0),
        "{report}"
    );
    assert!(report.clean(), "{report}");
    assert!(report.notes.is_empty(), "{report}");

    gw.sync().await;
    let ingest = gw.get("/ingest").await;
    assert_eq!(ingest["stored"]["telemetry"], 4000);
    assert_eq!(ingest["telemetry_lost"], 0);
    assert_eq!(ingest["telemetry_duplicates"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_burst_verification_names_what_the_gateway_no_longer_holds() {
    // Retention keeps the newest 150 of each device's 200: the 50 oldest of every device are
    // acknowledged (and were stored) but are not there to be read back. Retention trims whole
    // blocks (one per device and commit), so each device has one message in flight: every block
    // holds one row and the trim is exact, whatever the commits' timing.
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.retention.telemetry_per_device = 150;
    let gw = TestGateway::start_with(c, Some(tmp)).await;
    let creds = gw.enroll_fleet("trim", 20).await;
    let api = Api {
        url: gw.http_url(),
        token: TOKEN.to_owned(),
    };
    let load = LoadSpec::gateway("127.0.0.1", gw.mqtt_port(), creds, Some(api));
    let mut spec = twenty_flush_two_hundred(load, true);
    spec.load.inflight = 1;
    let report = burst::run(spec, CancellationToken::new()).await.unwrap();
    assert_eq!(report.burst.acked, Some(4000), "{report}");
    let v = report.verify.as_ref().expect("verified");
    assert_eq!(
        (v.devices, v.unreadable, v.acked, v.stored, v.missing),
        (20, 0, 4000, 3000, 1000),
        "{report}"
    );
    // The examples are the first device's oldest numbers.
    assert_eq!(v.examples.len(), 10, "{report}");
    for (n, e) in v.examples.iter().enumerate() {
        let fields: Vec<&str> = e.split(' ').collect();
        assert_eq!(
            (fields[0], fields[2]),
            ("trim-00000", n.to_string().as_str()),
            "{report}"
        );
    }
    assert!(!report.clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_burst_through_mosquitto_delivers_everything_it_acknowledged() {
    let broker = Mosquitto::start().await;
    let mut load = LoadSpec::mqtt("127.0.0.1", broker.port, "mqb", 20);
    load.broker_pid = Some(broker.child.id());
    let report = burst::run(
        twenty_flush_two_hundred(load, false),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let b = &report.burst;
    assert_eq!(
        (b.offered, b.unsent, b.acked, b.unacked),
        (4000, 0, Some(4000), Some(0)),
        "{report}"
    );
    let i = b.ingest.as_ref().expect("subscriber counts");
    assert_eq!(
        (i.source, i.ingested, i.expected, i.lost, i.duplicates),
        ("subscriber", 4000, 4000, 0, 0),
        "{report}"
    );
    assert_eq!(
        (i.acked_lost, i.acked_lost_by),
        (Some(0), "by_number"),
        "{report}"
    );
    assert_eq!(
        (i.resident_peak_bytes, i.queue_full),
        (None, None),
        "{report}"
    );
    // Mosquitto's own CPU and memory, from /proc.
    let u = b.broker.expect("broker use");
    assert_eq!(u.pid, broker.child.id(), "{report}");
    assert!(
        u.cpu_pct.is_some() && u.resident_bytes.is_some_and(|r| r > 0),
        "{report}"
    );
    assert!(report.verify.is_none() && report.clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_ramp_through_mosquitto_reports_every_step() {
    let broker = Mosquitto::start().await;
    let mut load = LoadSpec::mqtt("127.0.0.1", broker.port, "ramp", 5);
    load.rate = 10.0;
    load.duration = Duration::from_secs(1);
    let spec = RampSpec {
        load,
        ramp: Ramp::Rate,
        factor: 2.0,
        steps: 2,
        start_devices: 1,
        rules: StopRules::default(),
    };
    let report = stress::ramp(spec, CancellationToken::new()).await.unwrap();
    // Step, devices, rate per device, offered, received, verdict.
    let steps: Vec<String> = report
        .steps
        .iter()
        .map(|s| {
            format!(
                "{} {} {} {} {:?} {}",
                s.step,
                s.devices,
                s.rate_per_device,
                s.phase.offered,
                s.phase.ingest.as_ref().map(|i| i.ingested),
                s.verdict
            )
        })
        .collect();
    assert_eq!(
        steps,
        ["0 5 10 50 Some(50) good", "1 5 20 100 Some(100) good"],
        "{report}"
    );
    let last = report.last_good.as_ref().expect("a good step");
    assert_eq!(
        (last.step, last.devices, last.rate_per_device),
        (1, 5, 20.0)
    );
    assert!(!report.saturated, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_of_a_scenario_counts_its_faults_exactly() {
    let gw = TestGateway::start().await;
    let text = r#"
        [[group]]
        prefix = "plain"
        count = 3
        rate = 20.0

        [[group]]
        prefix = "rogue"
        count = 2
        rate = 20.0
        hardware = { class = "sim-mpu" }
        faults = { malformed_every = 5, impersonate_every = 4 }
    "#;
    let s = scenario::parse(text, "test").unwrap();
    let mut creds = gw.enroll_fleet("plain", 3).await;
    creds.extend(gw.enroll_fleet("rogue", 2).await);
    assert_eq!(
        creds.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        s.ids()
    );
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt_port(), creds);
    spec.groups = s.groups;
    spec.messages = Some(20);
    let report = fleetgate_sim::run(spec, CancellationToken::new()).await;
    // A rogue device's 20 messages: garbage at 5, 10, 15 and 20; telemetry at the other 16,
    // of which 4, 8, 12 and 16 also go out as the next device.
    assert_eq!(report.sent.telemetry, 3 * 20 + 2 * 16, "{report}");
    let f = &report.faults;
    assert_eq!(
        (f.malformed, f.impersonated, f.flaps, f.crashes, f.discarded),
        (8, 8, 0, 0, 0),
        "{report}"
    );
    assert_eq!((report.unacked(), report.errors), (0, 0), "{report}");

    gw.sync().await;
    let ingest = gw.get("/ingest").await;
    assert_eq!(ingest["stored"]["telemetry"], 92);
    assert_eq!(ingest["rejected"]["undecodable"], 8);
    assert_eq!(ingest["rejected"]["not_permitted"], 8);
    assert_eq!(ingest["telemetry_lost"], 0);
    assert_eq!(ingest["telemetry_duplicates"], 0);
    let rogue = gw.get("/devices/rogue-00001").await;
    assert_eq!(rogue["hardware"]["class"], "sim-mpu");
    assert_eq!(rogue["stored"]["telemetry"], 16);
    let plain = gw.get("/devices/plain-00000").await;
    assert_eq!(plain["hardware"]["class"], "sim-mcu");
    assert_eq!(plain["stored"]["telemetry"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_of_a_scenario_crash_after_update_comes_back_on_the_new_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path());
    c.registry.trusted_keys = vec![public(1)];
    c.registry.threshold = 1;
    let gw = TestGateway::start_with(c, Some(tmp)).await;
    gw.upload(model("2.0.0", 2, "sim-mcu", 64 * 1024, &[1]))
        .await
        .unwrap();
    let text = r#"
        [[group]]
        prefix = "crash"
        count = 2
        rate = 0.001
        faults = { crash_after_update = "200ms" }
    "#;
    let mut s = scenario::parse(text, "test").unwrap();
    s.groups[0].profile.trust = Trust {
        keys: vec![public(1)],
        threshold: 1,
        ..Trust::default()
    };
    let creds = gw.enroll_fleet("crash", 2).await;
    let mut spec = FleetSpec::new("127.0.0.1", gw.mqtt_port(), creds);
    spec.groups = s.groups;
    let stop = CancellationToken::new();
    let fleet = Fleet::start(spec, stop.clone());
    assert!(fleet.wait_connected(2, Duration::from_secs(30)).await);
    gw.sync().await;
    let body = serde_json::json!({ "kind": "model", "name": "sim-model", "version": "2.0.0", "all": true });
    gw.post("/updates", body).await.unwrap();

    // Each device installs, crashes at once, and comes back to report from the new image.
    let back = fleet
        .counters()
        .wait_until(Duration::from_secs(60), |c| {
            c.crashes.load(Relaxed) == 2
                && c.hello.load(Relaxed) == 4
                && c.acked.load(Relaxed) + c.discarded.load(Relaxed) == c.published()
        })
        .await;
    assert!(back, "{:?}", fleet.counters());
    gw.sync().await;
    let transfers = gw.get("/updates?limit=10").await;
    for t in transfers.as_array().unwrap() {
        assert_eq!(t["state"], "installed", "{t}");
    }
    for d in gw.get("/devices").await.as_array().unwrap() {
        assert_eq!(d["models"][0]["version"], "2.0.0", "{d}");
    }
    stop.cancel();
    let report = fleet.finish().await;
    assert_eq!(
        (
            report.updates.installed,
            report.faults.crashes,
            report.errors
        ),
        (2, 2, 0),
        "{report}"
    );
}
