//! Sites bridged to an upstream MQTT cluster (a real Mosquitto, started here on a free port)
//! and alert webhooks (a local HTTP receiver), end to end with `fleetgate` processes:
//! - two sites with simulated devices forward alerts, drift windows, telemetry and more; the
//!   upstream is stopped and started again, and one gateway is SIGKILLed while it is down:
//!   a consumer on the upstream sees every message of both sites, each site's in order;
//! - signed bundles and rollout requests published upstream reach the sites that allow them
//!   and are refused (and counted, and answered) where they are tampered, unsigned or not
//!   allowed;
//! - a webhook that fails its first deliveries gets every alert exactly once, in order,
//!   across a restart of the gateway.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use fleetgate::registry::bundle::BundleFile;
use fleetgate::registry::keys::hex;
use fleetgate_protocol::manifest::{ManifestSpec, RuntimeReq};
use fleetgate_protocol::{ArtifactKind, Compat};
use fleetgate_sim::FleetSpec;
use fleetgate_sim::behaviour::DataShape;
use fleetgate_sim::fleet::Fleet;
use serde_json::{Value, json};
use support::{GatewayProcess, TOKEN, free_port, release_key, terminate};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "fleetgate";

fn operator_key() -> SigningKey {
    SigningKey::from_bytes(&[21; 32])
}

/// Polls `check` (a blocking call) every 100 ms until it returns `Some`, for at most `limit`.
async fn until<T: Send + 'static>(
    what: &str,
    limit: Duration,
    check: impl Fn() -> Option<T> + Send + Sync + 'static,
) -> T {
    let check = Arc::new(check);
    let deadline = Instant::now() + limit;
    loop {
        let c = check.clone();
        if let Some(v) = tokio::task::spawn_blocking(move || c()).await.unwrap() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Mosquitto broker on a fixed free port, with persistence, so that a stop (SIGTERM) and a
/// start keep the consumer's session and what was queued for it.
struct Upstream {
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Upstream {
    fn new(dir: &Path) -> Upstream {
        let port = free_port();
        let data = dir.join("mosquitto");
        std::fs::create_dir_all(&data).unwrap();
        let conf = dir.join("mosquitto.conf");
        // `user root`: started as root, Mosquitto would switch to user `mosquitto`, which
        // cannot write its persistence file into our temporary directory, and a restart would
        // lose the consumer's session (and what was queued for it). Run as anyone else, the
        // line has no effect.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\n\
                 persistence_location {}/\nautosave_interval 1\nmax_queued_messages 1000000\n\
                 max_inflight_messages 0\nmessage_size_limit 0\nlog_type error\nlog_type warning\n\
                 log_type notice\n",
                data.display()
            ),
        )
        .unwrap();
        Upstream {
            port,
            conf,
            log: dir.join("mosquitto.log"),
            child: None,
        }
    }

    async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto runs (apt-get install mosquitto; .ci/run installs it)");
        self.child = Some(child);
        let port = self.port;
        until("mosquitto listening", Duration::from_secs(10), move || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        })
        .await;
    }

    /// A clean stop: Mosquitto saves its sessions on SIGTERM.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            tokio::task::spawn_blocking(move || terminate(&mut child))
                .await
                .unwrap();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One message a consumer got from the upstream.
#[derive(Debug, Clone)]
struct Got {
    topic: String,
    body: Value,
}

/// A consumer on the upstream: a persistent session subscribed to every site's messages.
struct Consumer {
    got: Arc<Mutex<Vec<Got>>>,
    stop: CancellationToken,
}

impl Consumer {
    fn start(port: u16) -> Consumer {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let mut opts = rumqttc::MqttOptions::new("central-consumer", "127.0.0.1", port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(16 << 20, 1 << 20);
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
        let (into, stopping) = (got.clone(), stop.clone());
        // Polls only; subscribing never waits (rumqttc deadlocks if the poller awaits a request).
        tokio::spawn(async move {
            while !stopping.is_cancelled() {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        for t in [
                            format!("{PREFIX}/sites/+/up/+"),
                            format!("{PREFIX}/sites/+/status"),
                            format!("{PREFIX}/sites/+/heartbeat"),
                        ] {
                            let _ = client.try_subscribe(t, rumqttc::QoS::AtLeastOnce);
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        into.lock().unwrap().push(Got {
                            topic: p.topic.clone(),
                            body,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Consumer { got, stop }
    }

    fn all(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// The envelopes of `site`'s events, in arrival order.
    fn events(&self, site: &str) -> Vec<Value> {
        let prefix = format!("{PREFIX}/sites/{site}/up/");
        self.all()
            .into_iter()
            .filter(|g| g.topic.starts_with(&prefix))
            .map(|g| g.body)
            .collect()
    }

    /// The replies of `site`, in arrival order.
    fn replies(&self, site: &str) -> Vec<Value> {
        self.events(site)
            .into_iter()
            .filter(|e| e["type"] == "reply")
            .map(|e| e["data"].clone())
            .collect()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A `fleetgate` process named for its site, with its own ports and data directory, which
/// outlive it.
struct Site {
    name: String,
    process: GatewayProcess,
}

impl std::ops::Deref for Site {
    type Target = GatewayProcess;
    fn deref(&self) -> &GatewayProcess {
        &self.process
    }
}

impl std::ops::DerefMut for Site {
    fn deref_mut(&mut self) -> &mut GatewayProcess {
        &mut self.process
    }
}

impl Site {
    fn new(dir: &Path, name: &str, extra: &str) -> Site {
        Site {
            name: name.to_owned(),
            process: GatewayProcess::new(&dir.join(name), extra),
        }
    }

    /// Polls `GET path` until `done` holds (at most `limit`).
    async fn wait(&self, path: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.get(path).await;
            if done(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{} {path}: {v}", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn enroll(&self, n: usize) -> Vec<fleetgate_sim::Credential> {
        let (url, prefix) = (self.url(), format!("{}-d", self.name));
        tokio::task::spawn_blocking(move || {
            fleetgate_sim::enroll::enroll(
                &url,
                TOKEN,
                &fleetgate_sim::enroll::ids(&prefix, n),
                None,
                2,
            )
        })
        .await
        .unwrap()
        .unwrap()
    }

    /// A metric once it has reached `want` (or, after 10 s, as it is): for counters of what
    /// this site handles while the test watches another.
    async fn metric_reaching(&self, line: &str, want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(line).await;
            if v >= want || Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metric(&self, line: &str) -> f64 {
        let url = format!("{}/metrics", self.url());
        let text = tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .unwrap()
                .into_body()
                .read_to_string()
                .unwrap()
        })
        .await
        .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(line).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{line} not in /metrics"))
    }

    /// The upstream outbox: (head, depth).
    async fn outbox(&self) -> (u64, u64) {
        let u = self.get("/uplink").await;
        let head = u["streams"][0]["head"].as_u64().unwrap();
        let depth = u["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["destination"] == "upstream")
            .map_or(0, |d| d["depth"].as_u64().unwrap());
        (head, depth)
    }
}

/// A model bundle of `version` for the simulator's hardware, signed by the release key.
fn bundle(version: &str, release: u64) -> Vec<u8> {
    let now = fleetgate::clock::now_ms();
    let spec = ManifestSpec {
        kind: ArtifactKind::Model,
        name: "sim-model".into(),
        version: version.parse().unwrap(),
        release,
        compat: Compat {
            classes: vec!["sim-mcu".into()],
            runtime: Some(RuntimeReq {
                name: "tflm".into(),
                min_version: semver::Version::new(2, 0, 0),
            }),
            ..Compat::default()
        },
        chunk_size: 4096,
        created_ms: now,
        expires_ms: now + 86_400_000,
    };
    let artifact: Vec<u8> = (0..32 * 1024u32).map(|i| (i * 13 % 251) as u8).collect();
    BundleFile::sign(artifact, spec, &[release_key()], BTreeMap::new(), vec![]).encode()
}

/// Registers sim-model 1.0.0 and its baseline on a site.
async fn model_with_baseline(site: &Site) {
    let api = site.api();
    tokio::task::spawn_blocking(move || api.post_bytes("/registry/bundles", &bundle("1.0.0", 1)))
        .await
        .unwrap()
        .unwrap();
    let url = format!(
        "{}/api/v1/registry/model/sim-model/1.0.0/baseline.csv?bins=10&prediction=prediction&confidence=confidence",
        site.url()
    );
    tokio::task::spawn_blocking(move || {
        ureq::post(&url)
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .send(fleetgate_sim::behaviour::reference_csv(5000).as_bytes())
            .unwrap()
    })
    .await
    .unwrap();
}

fn fleet(site: &Site, creds: Vec<fleetgate_sim::Credential>, stop: &CancellationToken) -> Fleet {
    let mut spec = FleetSpec::new("127.0.0.1", site.mqtt, creds);
    spec.interval = Duration::from_millis(100);
    spec.duration = Some(Duration::from_secs(300));
    spec.alert_every = 25;
    spec.shape = DataShape {
        samples: 5,
        ..DataShape::default()
    };
    // The devices install what the release key signed, so rollouts go on (and do not end).
    spec.profiles = vec![fleetgate_sim::updater::DeviceProfile {
        trust: fleetgate_sim::updater::Trust {
            keys: vec![release_key().verifying_key().to_bytes()],
            threshold: 1,
            rollback_keys: Vec::new(),
        },
        ..Default::default()
    }];
    Fleet::start(spec, stop.clone())
}

fn uplink_config(broker: u16, site: &str, extra: &str) -> String {
    format!(
        r#"
[drift]
window_samples = 100
min_samples = 50
window = "2s"
[uplink]
enabled = true
brokers = ["127.0.0.1:{broker}"]
site = "{site}"
backoff_min = "100ms"
backoff_max = "500ms"
heartbeat = "2s"
[uplink.forward]
telemetry = "all"
{extra}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sites_lose_nothing_through_an_upstream_outage_and_a_sigkill() {
    const DEVICES: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Upstream::new(dir.path());
    upstream.start().await;
    let consumer = Consumer::start(upstream.port);
    let mut sites: Vec<Site> = ["site-a", "site-b"]
        .iter()
        .map(|name| Site::new(dir.path(), name, &uplink_config(upstream.port, name, "")))
        .collect();
    let stop = CancellationToken::new();
    let mut fleets = Vec::new();
    for site in &mut sites {
        site.start().await;
        model_with_baseline(site).await;
        let creds = site.enroll(DEVICES).await;
        fleets.push(fleet(site, creds, &stop));
    }
    for f in &fleets {
        assert!(
            f.wait_connected(DEVICES as u64, Duration::from_secs(30))
                .await
        );
    }
    // Both sites forward: the consumer sees drift windows and alerts of each.
    for site in &sites {
        let name = site.name.clone();
        let seen = consumer.got.clone();
        until(
            &format!("{name}: a drift window and an alert upstream"),
            Duration::from_secs(60),
            move || {
                let got = seen.lock().unwrap();
                let mine = got.iter().filter(|g| g.body["site"] == name.as_str());
                let kinds: BTreeSet<&str> = mine.filter_map(|g| g.body["type"].as_str()).collect();
                (kinds.contains("drift_window") && kinds.contains("alert")).then_some(())
            },
        )
        .await;
        let u = site.get("/uplink").await;
        assert_eq!(u["connection"]["state"], "connected", "{u}");
    }

    // The upstream goes away; the sites keep recording.
    upstream.stop().await;
    for site in &sites {
        site.wait("/uplink", Duration::from_secs(30), |u| {
            u["connection"]["state"] == "disconnected"
        })
        .await;
        assert_eq!(site.metric("fleetgate_uplink_connected ").await, 0.0);
    }
    let (_, depth_a) = sites[0].outbox().await;
    sites[0]
        .wait("/uplink", Duration::from_secs(30), |u| {
            u["destinations"][0]["depth"].as_u64().unwrap() > depth_a + 100
        })
        .await;
    // Site A dies with its backlog and comes back; its devices reconnect.
    sites[0].kill();
    sites[0].start().await;
    let (_, depth_a) = sites[0].outbox().await;
    sites[0]
        .wait("/uplink", Duration::from_secs(60), |u| {
            u["destinations"][0]["depth"].as_u64().unwrap() > depth_a + 100
                && u["destinations"][0]["oldest_unsent_seconds"]
                    .as_f64()
                    .unwrap()
                    > 0.0
        })
        .await;
    assert_eq!(
        sites[0].get("/uplink").await["connection"]["state"],
        "disconnected"
    );

    // The upstream is back: the backlogs drain; then the devices stop.
    upstream.start().await;
    for site in &sites {
        site.wait("/uplink", Duration::from_secs(60), |u| {
            u["connection"]["state"] == "connected"
        })
        .await;
    }
    stop.cancel();
    for f in fleets {
        f.finish().await;
    }
    for site in &sites {
        site.wait("/uplink", Duration::from_secs(120), |u| {
            u["destinations"][0]["depth"] == 0
        })
        .await;
    }

    for site in &sites {
        let (head, _) = site.outbox().await;
        let name = site.name.clone();
        let seen = consumer.got.clone();
        until(
            &format!("{name}: the consumer has seq {head}"),
            Duration::from_secs(60),
            move || {
                let got = seen.lock().unwrap();
                got.iter()
                    .any(|g| g.body["site"] == name.as_str() && g.body["seq"] == head)
                    .then_some(())
            },
        )
        .await;
        let events = consumer.events(&site.name);
        // Nothing lost, order kept: each first sight of a sequence number is the next one;
        // copies (sent again after a reconnect) repeat numbers already seen.
        let mut newest = 0;
        let mut copies = 0;
        for e in &events {
            let seq = e["seq"].as_u64().unwrap();
            assert_eq!(e["site"], site.name.as_str());
            if seq <= newest {
                copies += 1;
                continue;
            }
            assert_eq!(
                seq,
                newest + 1,
                "{}: {seq} came after {newest}; arrivals: {}",
                site.name,
                runs(&events)
            );
            newest = seq;
        }
        assert_eq!(newest, head, "{}", site.name);
        // Every telemetry message the site stored went up once (its outbox entry was written
        // in the same commit), the SIGKILL notwithstanding.
        let mut unique: BTreeMap<u64, &Value> = BTreeMap::new();
        for e in &events {
            unique.insert(e["seq"].as_u64().unwrap(), e);
        }
        let up_telemetry = unique.values().filter(|e| e["type"] == "telemetry").count() as u64;
        let stored: u64 = site
            .get("/devices")
            .await
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["counters"]["telemetry"].as_u64().unwrap())
            .sum();
        assert_eq!(up_telemetry, stored, "{}", site.name);
        // Every drift window the site stored went up too.
        let windows = site
            .get("/drift/sim-model/1.0.0/history?limit=10000")
            .await
            .as_array()
            .map_or(0, Vec::len) as u64;
        let up_windows = unique
            .values()
            .filter(|e| e["type"] == "drift_window")
            .count() as u64;
        assert_eq!(up_windows, windows, "{}", site.name);
        assert!(windows > 0);
        // Every alert the site opened went up.
        let alerts = site
            .get("/alerts?limit=10000")
            .await
            .as_array()
            .unwrap()
            .len();
        let opened = unique
            .values()
            .filter(|e| e["type"] == "alert" && e["data"]["event"] == "opened")
            .count();
        assert_eq!(opened, alerts, "{}", site.name);
        // The heartbeat is retained and lists the site's devices.
        let beat = consumer
            .all()
            .into_iter()
            .rfind(|g| g.topic == format!("{PREFIX}/sites/{}/heartbeat", site.name))
            .expect("a heartbeat");
        assert_eq!(beat.body["devices"]["enrolled"], DEVICES);
        assert_eq!(
            beat.body["classes"]["sim-mcu"]["models"]["sim-model 1.0.0"],
            DEVICES
        );
        assert_eq!(
            site.metric("fleetgate_uplink_connected ").await,
            1.0,
            "{}",
            site.name
        );
        assert_eq!(
            site.metric("fleetgate_outbox_depth{stream=\"upstream\",destination=\"upstream\"} ")
                .await,
            0.0
        );
        eprintln!(
            "{}: {head} messages, {copies} sent again after reconnects",
            site.name
        );
    }
    // Every message is as docs/uplink.md describes it.
    let used = check_against_docs(&consumer.all());
    let want = [
        "alert",
        "drift_window",
        "envelope",
        "heartbeat",
        "inventory",
        "presence",
        "status",
        "telemetry",
    ];
    assert_eq!(
        used,
        want.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>()
    );
}

/// The JSON schemas of docs/uplink.md, by name (`<!-- schema: name -->` before each).
fn documented_schemas() -> BTreeMap<String, Value> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/uplink.md"))
        .expect("docs/uplink.md");
    let mut out = BTreeMap::new();
    for part in doc.split("<!-- schema: ").skip(1) {
        let (name, rest) = part
            .split_once(" -->")
            .expect("a schema marker ends with -->");
        let body = rest
            .split_once("```json\n")
            .and_then(|(_, b)| b.split_once("\n```"))
            .map(|(b, _)| b)
            .unwrap_or_else(|| panic!("schema {name}: no json block"));
        let schema = serde_json::from_str(body).unwrap_or_else(|e| panic!("schema {name}: {e}"));
        out.insert(name.to_owned(), schema);
    }
    out
}

/// Checks `v` against the subset of JSON Schema docs/uplink.md uses (type, required,
/// properties, additionalProperties, items, enum, minimum); collects what does not match.
fn schema_errors(v: &Value, schema: &Value, at: &str, errors: &mut Vec<String>) {
    let type_ok = |t: &str| match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "null" => v.is_null(),
        other => panic!("schema type {other} at {at}"),
    };
    match &schema["type"] {
        Value::String(t) if !type_ok(t) => errors.push(format!("{at}: not {t}: {v}")),
        Value::Array(ts) if !ts.iter().any(|t| type_ok(t.as_str().unwrap())) => {
            errors.push(format!("{at}: not any of {ts:?}: {v}"))
        }
        _ => {}
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(v)
    {
        errors.push(format!("{at}: {v} not in {options:?}"));
    }
    if let (Some(min), Some(x)) = (schema["minimum"].as_f64(), v.as_f64())
        && x < min
    {
        errors.push(format!("{at}: {x} < {min}"));
    }
    if let Some(obj) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            if !obj.contains_key(r.as_str().unwrap()) {
                errors.push(format!("{at}: {r} missing"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => schema_errors(x, sub, &format!("{at}.{k}"), errors),
                None if schema["additionalProperties"].is_object() => schema_errors(
                    x,
                    &schema["additionalProperties"],
                    &format!("{at}.{k}"),
                    errors,
                ),
                None => {}
            }
        }
    }
    if let (Some(items), Some(xs)) = (schema.get("items"), v.as_array()) {
        for (i, x) in xs.iter().enumerate() {
            schema_errors(x, items, &format!("{at}[{i}]"), errors);
        }
    }
}

/// Checks every message the consumer got against the schema of its topic in docs/uplink.md;
/// returns the names of the schemas used.
fn check_against_docs(got: &[Got]) -> BTreeSet<String> {
    let schemas = documented_schemas();
    let mut used = BTreeSet::new();
    let mut errors = Vec::new();
    for g in got {
        let levels: Vec<&str> = g.topic.split('/').collect();
        let last = *levels.last().unwrap();
        let mut check = |name: &str, v: &Value, at: &str| {
            let schema = schemas
                .get(name)
                .unwrap_or_else(|| panic!("no schema {name}"));
            schema_errors(v, schema, at, &mut errors);
            used.insert(name.to_owned());
        };
        if levels[levels.len() - 2] == "up" {
            check("envelope", &g.body, &g.topic);
            assert_eq!(g.body["type"], last, "{}", g.topic);
            check(last, &g.body["data"], &format!("{} data", g.topic));
        } else {
            check(last, &g.body, &g.topic);
        }
    }
    assert!(
        errors.is_empty(),
        "not as docs/uplink.md says:\n{}",
        errors.join("\n")
    );
    used
}

/// The sequence numbers of `events` in arrival order, as runs (`1-129 340-400 130-339`).
fn runs(events: &[Value]) -> String {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for seq in events.iter().filter_map(|e| e["seq"].as_u64()) {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == seq => *end = seq,
            _ => out.push((seq, seq)),
        }
    }
    let text: Vec<String> = out.iter().map(|(a, b)| format!("{a}-{b}")).collect();
    text.join(" ")
}

/// Publishes `payload` with `mosquitto_pub` at QoS 1 (it returns once the broker has it).
async fn publish(port: u16, topic: &str, payload: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload");
    std::fs::write(&file, payload).unwrap();
    let topic = topic.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-q",
                "1",
                "-t",
                &topic,
                "-f",
            ])
            .arg(&file)
            .status()
            .expect("mosquitto_pub runs (apt-get install mosquitto-clients)")
    })
    .await
    .unwrap();
    assert!(status.success());
}

fn signed_request(request: Value, key: &SigningKey) -> Vec<u8> {
    fleetgate::uplink::down::sign_request(serde_json::to_vec(&request).unwrap(), key)
}

/// Waits until `site` answered `n` requests; returns its answers.
async fn replies(consumer: &Consumer, site: &str, n: usize) -> Vec<Value> {
    let seen = consumer.got.clone();
    let topic = format!("{PREFIX}/sites/{site}/up/reply");
    until(
        &format!("{site}: {n} replies"),
        Duration::from_secs(30),
        move || {
            let got = seen.lock().unwrap();
            (got.iter().filter(|g| g.topic == topic).count() >= n).then_some(())
        },
    )
    .await;
    consumer.replies(site)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bundles_and_rollout_requests_come_down_through_the_same_checks() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Upstream::new(dir.path());
    upstream.start().await;
    let consumer = Consumer::start(upstream.port);
    let ops = hex(operator_key().verifying_key().as_bytes());
    let mut a = Site::new(
        dir.path(),
        "site-a",
        &uplink_config(
            upstream.port,
            "site-a",
            &format!(
                "[uplink.down]\nallow = [\"bundles\", \"rollouts\"]\noperator_keys = [\"{ops}\"]\n"
            ),
        ),
    );
    let mut b = Site::new(
        dir.path(),
        "site-b",
        &uplink_config(
            upstream.port,
            "site-b",
            "[uplink.down]\nallow = [\"bundles\"]\n",
        ),
    );
    let stop = CancellationToken::new();
    let mut fleets = Vec::new();
    for site in [&mut a, &mut b] {
        site.start().await;
        site.api();
        let api = site.api();
        tokio::task::spawn_blocking(move || {
            api.post_bytes("/registry/bundles", &bundle("1.0.0", 1))
        })
        .await
        .unwrap()
        .unwrap();
        let creds = site.enroll(3).await;
        let f = fleet(site, creds, &stop);
        assert!(f.wait_connected(3, Duration::from_secs(30)).await);
        let said = f
            .counters()
            .wait_until(Duration::from_secs(30), |c| c.hello.load(Relaxed) >= 3)
            .await;
        assert!(said);
        fleets.push(f);
        site.wait("/uplink", Duration::from_secs(30), |u| {
            u["connection"]["state"] == "connected"
        })
        .await;
    }
    // The sites are subscribed once they said they are online.
    let seen = consumer.got.clone();
    until(
        "both sites online upstream",
        Duration::from_secs(30),
        move || {
            let got = seen.lock().unwrap();
            let online = |s: &str| {
                got.iter().any(|g| {
                    g.topic == format!("{PREFIX}/sites/{s}/status") && g.body["online"] == true
                })
            };
            (online("site-a") && online("site-b")).then_some(())
        },
    )
    .await;

    // A tampered bundle (one artifact byte changed after signing) reaches neither registry.
    let good = bundle("2.0.0", 2);
    let mut file = BundleFile::decode(&good).unwrap();
    file.artifact[100] ^= 0xff;
    let tampered = file.encode();
    let fleet_bundle = format!("{PREFIX}/fleet/down/bundle");
    publish(upstream.port, &fleet_bundle, &tampered).await;
    for site in [&a, &b] {
        let r = &replies(&consumer, &site.name, 1).await[0];
        assert_eq!(
            (
                r["what"].as_str(),
                r["outcome"].as_str(),
                r["reason"].as_str(),
                r["status"].as_u64()
            ),
            (Some("bundle"), Some("refused"), Some("tampered"), Some(400)),
            "{}: {r}",
            site.name
        );
        let releases = site.get("/registry").await;
        assert_eq!(
            releases.as_array().unwrap().len(),
            1,
            "{}: {releases}",
            site.name
        );
        assert_eq!(
            site.metric("fleetgate_uplink_requests_refused_total{reason=\"tampered\"} ")
                .await,
            1.0
        );
    }
    // The bundle as signed reaches both.
    publish(upstream.port, &fleet_bundle, &good).await;
    for site in [&a, &b] {
        let r = &replies(&consumer, &site.name, 2).await[1];
        assert_eq!(r["outcome"], "done", "{}: {r}", site.name);
        assert_eq!(r["status"], 201);
        assert_eq!(r["release"], "model sim-model 2.0.0");
        let release = site.get("/registry/model/sim-model/2.0.0").await;
        assert_eq!(release["version"], "2.0.0", "{}", site.name);
    }

    // A rollout request for the whole fleet: site A starts it, site B may not.
    let expires = fleetgate::clock::rfc3339(fleetgate::clock::now_ms() + 3_600_000);
    let create = json!({
        "id": "central-1", "expires": expires, "action": "create",
        "kind": "model", "name": "sim-model", "version": "2.0.0", "all": true,
        "policy": { "stages": ["1", "100%"], "bake": "1h" },
    });
    let fleet_rollout = format!("{PREFIX}/fleet/down/rollout");
    publish(
        upstream.port,
        &fleet_rollout,
        &signed_request(create.clone(), &operator_key()),
    )
    .await;
    let r = replies(&consumer, "site-a", 3).await[2].clone();
    assert_eq!(
        (r["outcome"].as_str(), r["status"].as_u64()),
        (Some("done"), Some(201)),
        "{r}"
    );
    let rollout = r["rollout"].as_u64().unwrap();
    let r = replies(&consumer, "site-b", 3).await[2].clone();
    assert_eq!(
        (
            r["outcome"].as_str(),
            r["reason"].as_str(),
            r["status"].as_u64()
        ),
        (Some("refused"), Some("not_permitted"), Some(403)),
        "{r}"
    );
    assert_eq!(b.get("/rollouts").await, json!([]));
    // The same request again (MQTT delivers at least once) is answered, not started again.
    publish(
        upstream.port,
        &fleet_rollout,
        &signed_request(create, &operator_key()),
    )
    .await;
    let r = replies(&consumer, "site-a", 4).await[3].clone();
    assert_eq!(
        (r["outcome"].as_str(), r["rollout"].as_u64()),
        (Some("unchanged"), Some(rollout)),
        "{r}"
    );
    assert_eq!(a.get("/rollouts").await.as_array().unwrap().len(), 1);
    // Site A pauses it on request, named by the request that created it.
    let pause = json!({
        "id": "central-2", "expires": expires, "action": "pause",
        "rollout": "central-1", "reason": "central freeze",
    });
    publish(
        upstream.port,
        &format!("{PREFIX}/sites/site-a/down/rollout"),
        &signed_request(pause, &operator_key()),
    )
    .await;
    let r = replies(&consumer, "site-a", 5).await[4].clone();
    assert_eq!(
        (r["outcome"].as_str(), r["status"].as_u64()),
        (Some("done"), Some(200)),
        "{r}"
    );
    let view = a.get(&format!("/rollouts/{rollout}")).await;
    assert_eq!(view["state"], "paused", "{view}");
    assert_eq!(view["reason"], "central freeze");
    // Signed by a key site A does not trust, or not for this site: refused, or not for it.
    let rogue = json!({
        "id": "rogue-1", "expires": expires, "action": "abort", "rollout": "central-1",
    });
    publish(
        upstream.port,
        &fleet_rollout,
        &signed_request(rogue, &SigningKey::from_bytes(&[66; 32])),
    )
    .await;
    let r = replies(&consumer, "site-a", 6).await[5].clone();
    assert_eq!(
        (r["reason"].as_str(), r["status"].as_u64()),
        (Some("unsigned"), Some(403)),
        "{r}"
    );
    let other = json!({
        "id": "central-3", "expires": expires, "sites": ["site-z"], "action": "abort",
        "rollout": "central-1",
    });
    publish(
        upstream.port,
        &fleet_rollout,
        &signed_request(other, &operator_key()),
    )
    .await;
    // Site B refuses everything about rollouts; its answer to this one shows A has seen it.
    let r = replies(&consumer, "site-b", 5).await;
    assert_eq!(r.len(), 5, "{r:?}");
    assert_eq!(
        a.get(&format!("/rollouts/{rollout}")).await["state"],
        "paused"
    );
    assert_eq!(consumer.replies("site-a").len(), 6);

    // The audit log has each request with the upstream identity.
    let audit = a.get("/audit?limit=100").await;
    let by_upstream: Vec<(String, String, u64)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["method"] == "MQTT")
        .map(|e| {
            (
                e["by"].as_str().unwrap().to_owned(),
                e["path"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let broker = format!("upstream:127.0.0.1:{}", upstream.port);
    let key_id = hex(&fleetgate_protocol::sign::key_id(
        operator_key().verifying_key().as_bytes(),
    ));
    let signed_by = format!("{broker} key {key_id}");
    assert_eq!(
        by_upstream,
        [
            (broker.clone(), fleet_rollout.clone(), 403),
            (
                signed_by.clone(),
                format!("{PREFIX}/sites/site-a/down/rollout"),
                200
            ),
            (signed_by.clone(), fleet_rollout.clone(), 201),
            (signed_by.clone(), fleet_rollout.clone(), 201),
            (broker.clone(), fleet_bundle.clone(), 201),
            (broker.clone(), fleet_bundle.clone(), 400),
        ],
        "{audit}"
    );
    let rollout_view = a.get(&format!("/rollouts/{rollout}")).await;
    assert_eq!(rollout_view["created"]["by"], signed_by.as_str());
    assert_eq!(
        a.metric("fleetgate_uplink_requests_accepted_total{what=\"rollout\"} ")
            .await,
        2.0
    );
    assert_eq!(
        a.metric("fleetgate_uplink_requests_accepted_total{what=\"bundle\"} ")
            .await,
        1.0
    );
    assert_eq!(
        a.metric("fleetgate_uplink_requests_refused_total{reason=\"unsigned\"} ")
            .await,
        1.0
    );
    // Site B answers on its own time (the test waited for site A's replies).
    assert_eq!(
        b.metric_reaching(
            "fleetgate_uplink_requests_refused_total{reason=\"not_permitted\"} ",
            4.0
        )
        .await,
        4.0
    );
    // Replies and rollout decisions are as docs/uplink.md describes them.
    let used = check_against_docs(&consumer.all());
    for name in [
        "reply",
        "rollout",
        "status",
        "heartbeat",
        "inventory",
        "presence",
    ] {
        assert!(used.contains(name), "{name} not seen: {used:?}");
    }
    stop.cancel();
    for f in fleets {
        f.finish().await;
    }
}

/// An HTTP receiver of alert notifications that answers 500 to its first `fail` requests.
struct Receiver {
    port: u16,
    /// (Idempotency-Key, status answered, body) of every request, in order.
    seen: Arc<Mutex<Vec<(String, u16, Value)>>>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start(fail: usize) -> Receiver {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        type Seen = Arc<Mutex<Vec<(String, u16, Value)>>>;
        async fn hook(
            State((seen, fail)): State<(Seen, usize)>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> StatusCode {
            let key = headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let mut seen = seen.lock().unwrap();
            let status = if seen.len() < fail { 500 } else { 200 };
            seen.push((
                key,
                status,
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ));
            StatusCode::from_u16(status).unwrap()
        }
        let seen: Seen = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state((seen.clone(), fail));
        let stop = CancellationToken::new();
        let stopping = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopping.cancelled_owned())
                .await
                .unwrap();
        });
        Receiver { port, seen, stop }
    }

    fn delivered(&self) -> Vec<(String, Value)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, status, _)| *status == 200)
            .map(|(k, _, b)| (k.clone(), b.clone()))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Publishes one telemetry message of `device` at QoS 1; returns once the gateway stored it.
async fn telemetry(site: &Site, device: &fleetgate_sim::Credential, seq: u32, temp: f32) {
    let (port, id, secret) = (site.mqtt, device.id.clone(), device.secret.clone());
    let status = tokio::task::spawn_blocking(move || {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-q",
                "1",
                "-u",
                &id,
                "-P",
                &secret,
                "-i",
                &id,
                "-t",
                &format!("fg/{id}/telemetry/json"),
                "-m",
                &json!({ "seq": seq, "hw": { "temp_c": temp } }).to_string(),
            ])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_gets_every_alert_once_in_order_across_a_restart() {
    const FAIL: usize = 5;
    let receiver = Receiver::start(FAIL).await;
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::new(
        dir.path(),
        "site-w",
        &format!(
            r#"
[uplink]
site = "site-w"
[[alerts.webhooks]]
name = "ops"
url = "http://127.0.0.1:{}/hook"
backoff_min = "50ms"
backoff_max = "200ms"
"#,
            receiver.port
        ),
    );
    site.start().await;
    let creds = site.enroll(2).await;
    // Three alerts open and resolve (six notifications) while the receiver fails.
    let mut seq = 0;
    for round in 0..3 {
        let device = &creds[round % 2];
        seq += 1;
        telemetry(&site, device, seq, 95.0).await;
        seq += 1;
        telemetry(&site, device, seq, 20.0).await;
    }
    let seen = receiver.seen.clone();
    until("failed attempts", Duration::from_secs(30), move || {
        (seen.lock().unwrap().len() >= FAIL - 2).then_some(())
    })
    .await;
    // A clean restart in the middle of the retries; what the first process delivered is
    // known once it has exited.
    site.stop().await;
    let before_restart = receiver.delivered().len();
    site.start().await;
    for round in 3..6 {
        let device = &creds[round % 2];
        seq += 1;
        telemetry(&site, device, seq, 95.0).await;
        seq += 1;
        telemetry(&site, device, seq, 20.0).await;
    }
    let seen = receiver.seen.clone();
    until("12 alerts delivered", Duration::from_secs(60), move || {
        let n = seen.lock().unwrap().iter().filter(|s| s.1 == 200).count();
        (n >= 12).then_some(())
    })
    .await;
    // Every alert once, in order: opened and resolved in turn, numbered 1 to 12.
    let delivered = receiver.delivered();
    let keys: Vec<&str> = delivered.iter().map(|(k, _)| k.as_str()).collect();
    let want: Vec<String> = (1..=12).map(|n| format!("site-w:{n}")).collect();
    assert_eq!(keys, want);
    for (i, (_, body)) in delivered.iter().enumerate() {
        let status = if i % 2 == 0 { "firing" } else { "resolved" };
        assert_eq!(body["status"], status, "{body}");
        assert_eq!(body["receiver"], "ops");
        assert_eq!(body["alerts"][0]["labels"]["alertname"], "thermal");
        assert_eq!(
            body["alerts"][0]["labels"]["device"],
            creds[(i / 2) % 2].id.as_str()
        );
        assert_eq!(body["fleetgate"]["seq"], i + 1);
    }
    // The failed attempts were retries of the first alert.
    let failed: Vec<String> = receiver
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.1 == 500)
        .map(|s| s.0.clone())
        .collect();
    assert_eq!(failed, vec!["site-w:1".to_owned(); FAIL]);
    let u = site
        .wait("/uplink", Duration::from_secs(10), |u| {
            u["destinations"][0]["depth"] == 0
        })
        .await;
    assert_eq!(u["webhooks"][0]["state"], "ok", "{u}");
    // The counter counts what this process delivered: the rest.
    let delivered_now = site
        .metric("fleetgate_webhook_delivered_total{webhook=\"ops\"} ")
        .await;
    assert_eq!(delivered_now as usize, 12 - before_restart);
    assert_eq!(
        site.metric("fleetgate_webhook_up{webhook=\"ops\"} ").await,
        1.0
    );
}
