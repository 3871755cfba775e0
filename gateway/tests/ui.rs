//! The dashboard in a real browser: headless Chromium (Debian's `chromium`; `.ci/run`
//! installs it) loads every page from a live gateway that simulated devices have filled
//! (telemetry, alerts, drift windows, a rollout), and the test reads what was rendered.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use fleetgate::cli::ApiClient;
use fleetgate::registry::bundle::BundleFile;
use fleetgate::{Config, Gateway};
use fleetgate_protocol::manifest::ManifestSpec;
use fleetgate_protocol::{ArtifactKind, Compat};
use fleetgate_sim::FleetSpec;
use fleetgate_sim::behaviour::DataShape;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "ui-test-token-0123456789abcdef";
const DEVICES: usize = 4;
const MESSAGES: u64 = 12;

/// The DOM of `url` once its scripts ran and their requests were answered.
async fn render(url: String) -> String {
    let profile = tempfile::tempdir().unwrap();
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                &profile_arg,
                // Virtual time waits for the page's fetches; a budget under the page's
                // 15 s refresh, so what is read is the first rendering.
                "--virtual-time-budget=5000",
                "--dump-dom",
                &url,
            ])
            .output()
            .expect("chromium runs (apt-get install chromium; .ci/run installs it)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A page of the dashboard with `token`, checked to have finished rendering `page`.
async fn page(base: &str, path: &str, token: &str, page: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    let dom = render(format!("{base}/ui/#/{path}{sep}token={token}")).await;
    assert!(
        dom.contains(&format!("data-ready=\"{page}\"")),
        "#/{path} did not finish rendering:\n{dom}"
    );
    assert!(
        !dom.contains("class=\"error\""),
        "#/{path} shows an error:\n{dom}"
    );
    assert!(
        !dom.contains(">null<") && !dom.contains(">undefined<"),
        "#/{path} shows a missing value:\n{dom}"
    );
    dom
}

fn assert_has(dom: &str, what: &str, needles: &[&str]) {
    for n in needles {
        assert!(dom.contains(n), "{what} lacks {n:?}:\n{dom}");
    }
}

/// Runs a blocking API call off the async executor.
async fn call<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn bundle(version: &str, release: u64, key: &ed25519_dalek::SigningKey) -> Vec<u8> {
    let now = fleetgate::clock::now_ms();
    BundleFile::sign(
        vec![release as u8; 4096],
        ManifestSpec {
            kind: ArtifactKind::Model,
            name: "sim-model".into(),
            version: semver::Version::parse(version).unwrap(),
            release,
            compat: Compat {
                classes: vec!["sim-mcu".into()],
                ..Compat::default()
            },
            chunk_size: 1024,
            created_ms: now,
            expires_ms: now + 86_400_000,
        },
        std::slice::from_ref(key),
        BTreeMap::from([("dataset".to_owned(), "ui-test".to_owned())]),
        vec![],
    )
    .encode()
}

/// 1,000 reference rows of 4 standard normal features (as the simulator sends) and a class.
fn reference_csv() -> String {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = String::from("vibration,temperature,pressure,flow,label\n");
    for i in 0..1000 {
        let row: Vec<String> = (0..4)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
                format!("{z:.5}")
            })
            .collect();
        out.push_str(&format!(
            "{},{}\n",
            row.join(","),
            [0, 0, 0, 0, 0, 0, 0, 1, 1, 2][i % 10]
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_page_renders_the_fleet_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let mut config = Config::default();
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.http.token = Some(TOKEN.to_owned());
    config.storage.data_dir = dir.path().join("data");
    config.registry.trusted_keys = vec![key.verifying_key().to_bytes()];
    config.drift.window_samples = 200;
    config.drift.min_samples = 100;
    let gateway = Gateway::start(config).await.unwrap();
    let base = format!("http://{}", gateway.http_addr);
    let api = ApiClient::new(&base, TOKEN);

    // Two releases of the simulator's model, a baseline for the one the devices run.
    for (version, release) in [("1.0.0", 1), ("2.0.0", 2)] {
        let (api, b) = (api.clone(), bundle(version, release, &key));
        call(move || api.post_bytes("/registry/bundles", &b))
            .await
            .unwrap();
    }
    let a = api.clone();
    call(move || {
        a.post_bytes(
            "/registry/model/sim-model/1.0.0/baseline.csv?prediction=label",
            reference_csv().as_bytes(),
        )
    })
    .await
    .unwrap();

    // Four devices send telemetry with model inputs, and an alert now and then.
    let enroll_url = base.clone();
    let creds = call(move || {
        let ids = fleetgate_sim::enroll::ids("ui", DEVICES);
        fleetgate_sim::enroll::enroll(&enroll_url, TOKEN, &ids, None, 2)
    })
    .await
    .unwrap();
    let mut spec = FleetSpec::new("127.0.0.1", gateway.mqtt_addr.port(), creds);
    spec.interval = Duration::from_millis(5);
    spec.messages = Some(MESSAGES);
    spec.alert_every = 6;
    spec.shape = DataShape {
        samples: 25,
        features: 4,
        ..DataShape::default()
    };
    let report = fleetgate_sim::run(spec, CancellationToken::new()).await;
    assert_eq!((report.unacked(), report.errors), (0, 0), "{report}");
    gateway.sync().await.unwrap();

    // A rollout of 2.0.0 to the four, in two stages.
    let a = api.clone();
    let created = call(move || {
        a.post(
            "/rollouts",
            &json!({ "kind": "model", "name": "sim-model", "version": "2.0.0", "all": true,
                     "policy": { "stages": ["2", "100%"] } }),
        )
    })
    .await
    .unwrap();
    assert_eq!(created["rollout"]["planned"], DEVICES as u64);
    let a = api.clone();
    let alerts: Value = call(move || a.get("/alerts")).await.unwrap();
    let first_alert = alerts[0]["id"].as_u64().expect("the devices raised alerts");
    let a = api.clone();
    let drift: Value = call(move || a.get("/drift")).await.unwrap();
    assert_eq!(drift[0]["model"], "sim-model", "{drift}");

    // Fleet: every device with its versions and hardware, and the counts.
    let dom = page(&base, "fleet", TOKEN, "fleet").await;
    assert_has(
        &dom,
        "fleet",
        &[
            "href=\"#/devices/ui-00000\"",
            "href=\"#/devices/ui-00003\"",
            "sim-fw 1.0.0",
            "sim-model 1.0.0",
            "<div class=\"n\">4</div><div class=\"l\">devices</div>",
            "<div class=\"n\">1</div><div class=\"l\">rollouts running</div>",
            "sim-mcu (armv7em)",
        ],
    );
    assert!(
        dom.contains("bootstrap (admin)"),
        "the signed-in token is shown"
    );

    // A device: its telemetry drawn as a line of one point per message.
    let dom = page(&base, "devices/ui-00001", TOKEN, "devices").await;
    assert_has(
        &dom,
        "device",
        &[
            "Device ui-00001",
            &format!("data-points=\"{MESSAGES}\""),
            "<polyline points=",
            "Latest refusals",
            "sim-mcu, armv7em",
        ],
    );

    // Alerts, with the actions an admin may take.
    let dom = page(&base, "alerts", TOKEN, "alerts").await;
    assert_has(
        &dom,
        "alerts",
        &[
            &format!("<td>{first_alert}</td>"),
            "href=\"#/devices/ui-0000",
            "Acknowledge</button>",
            "Resolve</button>",
        ],
    );

    // Rollouts: the list, then one with its stages, gates and audit timeline.
    let dom = page(&base, "rollouts", TOKEN, "rollouts").await;
    assert_has(
        &dom,
        "rollouts",
        &["href=\"#/rollouts/1\"", "model sim-model 2.0.0", "1 of 2"],
    );
    let dom = page(&base, "rollouts/1", TOKEN, "rollouts").await;
    assert_has(
        &dom,
        "rollout",
        &[
            "Rollout 1: model sim-model 2.0.0",
            "aria-label=\"stages\"",
            "Health gates",
            "<ol class=\"timeline\"><li>",
            "Pause</button>",
            "Roll back</button>",
            "href=\"#/devices/ui-00002\"",
        ],
    );

    // Drift: every model version, then one with a bar per feature and its history.
    let dom = page(&base, "drift", TOKEN, "drift").await;
    assert_has(
        &dom,
        "drift",
        &[
            "href=\"#/drift/sim-model/1.0.0?cohort=all\"",
            "<td>1.0.0</td>",
        ],
    );
    let dom = page(&base, "drift/sim-model/1.0.0?cohort=all", TOKEN, "drift").await;
    assert_has(
        &dom,
        "drift detail",
        &[
            "Drift: sim-model 1.0.0",
            "data-bars=\"4\"",
            "data-feature=\"vibration\"",
            "data-feature=\"flow\"",
            "aria-label=\"PSI per feature over time\"",
        ],
    );

    // A read-only token sees the same, without the actions.
    let a = api.clone();
    let viewer = call(move || a.post("/tokens", &json!({ "name": "wall", "role": "read-only" })))
        .await
        .unwrap();
    let viewer = viewer["token"].as_str().unwrap();
    let dom = page(&base, "alerts", viewer, "alerts").await;
    assert!(dom.contains("wall (read-only)"), "{dom}");
    assert!(!dom.contains("Acknowledge</button>"), "{dom}");
    let dom = page(&base, "rollouts/1", viewer, "rollouts").await;
    assert!(!dom.contains("Pause</button>"), "{dom}");

    // A wrong token gets the sign-in form, saying so.
    let dom = render(format!("{base}/ui/#/fleet?token=wrong")).await;
    assert_has(
        &dom,
        "sign-in",
        &["data-ready=\"login\"", "That token was not accepted."],
    );

    gateway.shutdown(Duration::from_secs(5)).await.unwrap();
}
