//! `fleetgate backup` of a gateway under load and `fleetgate restore` onto a fresh data dir,
//! with the real binary: the restored gateway holds a consistent state (every device's stored
//! rows match its counters), the same tokens and keys, and its devices connect with the
//! credentials they had.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use fleetgate::cli::ApiClient;
use fleetgate::{Config, Gateway};
use fleetgate_sim::FleetSpec;
use fleetgate_sim::fleet::Fleet;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "backup-test-token-0123456789abcdef";
const DEVICES: usize = 4;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn fleetgate(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let args: Vec<std::ffi::OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(&args)
            .env_remove("FLEETGATE_API_TOKEN")
            .env_remove("FLEETGATE_URL")
            .output()
            .expect("fleetgate runs")
    })
    .await
    .unwrap()
}

fn config_file(path: &Path, data: &Path) -> Config {
    let text = format!(
        "[mqtt]\nlisten = \"127.0.0.1:{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\ntoken = \"{TOKEN}\"\n\
         [storage]\ndata_dir = \"{}\"\n",
        free_port(),
        free_port(),
        data.display()
    );
    std::fs::write(path, text).unwrap();
    Config::load(path).unwrap()
}

async fn get(api: &ApiClient, path: &str) -> Value {
    let (api, path) = (api.clone(), path.to_owned());
    tokio::task::spawn_blocking(move || api.get(&path))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("GET: {e}"))
}

/// Per device: (stored telemetry rows, rows the API lists, telemetry counter).
async fn telemetry_state(api: &ApiClient) -> Vec<(String, u64, usize, u64)> {
    let mut out = Vec::new();
    for d in get(api, "/devices").await.as_array().unwrap() {
        let id = d["id"].as_str().unwrap().to_owned();
        let rows = get(api, &format!("/devices/{id}/telemetry?limit=10000")).await;
        out.push((
            id,
            d["stored"]["telemetry"].as_u64().unwrap(),
            rows.as_array().unwrap().len(),
            d["counters"]["telemetry"].as_u64().unwrap(),
        ));
    }
    out
}

#[tokio::test]
async fn a_backup_taken_under_load_restores_a_consistent_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.toml");
    let config = config_file(&config_path, &dir.path().join("data"));
    let gateway = Gateway::start(config).await.unwrap();
    let url = format!("http://{}", gateway.http_addr);
    let api = ApiClient::new(&url, TOKEN);

    let enroll_url = url.clone();
    let creds = tokio::task::spawn_blocking(move || {
        let ids = fleetgate_sim::enroll::ids("bk", DEVICES);
        fleetgate_sim::enroll::enroll(&enroll_url, TOKEN, &ids, None, 2)
    })
    .await
    .unwrap()
    .unwrap();
    let token_api = api.clone();
    let ci = tokio::task::spawn_blocking(move || {
        token_api.post("/tokens", &json!({ "name": "ci", "role": "read-only" }))
    })
    .await
    .unwrap()
    .unwrap();
    let ci = ci["token"].as_str().unwrap().to_owned();
    let key_before = get(&api, "/rollouts/signing-key").await;

    let mut spec = FleetSpec::new("127.0.0.1", gateway.mqtt_addr.port(), creds.clone());
    spec.interval = Duration::from_millis(10);
    spec.duration = Some(Duration::from_secs(60));
    let stop = CancellationToken::new();
    let fleet = Fleet::start(spec, stop.clone());
    assert!(
        fleet
            .wait_connected(DEVICES as u64, Duration::from_secs(30))
            .await
    );
    let sending = fleet
        .counters()
        .wait_until(Duration::from_secs(30), |c| {
            c.telemetry.load(Relaxed) >= 200
        })
        .await;
    assert!(sending);

    // The backup, while the devices keep sending.
    let archive = dir.path().join("site.tar");
    // Signed with a key kept outside the data dir, so the restore can tell it was not changed.
    let key_stem = dir.path().join("backup");
    let o = fleetgate(&[&"keys", &"generate", &"--out", &key_stem]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fleetgate(&[
        &"backup",
        &archive,
        &"--config",
        &config_path,
        &"--sign-key",
        &key_stem.with_extension("key"),
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.starts_with(&format!("wrote {}: ", archive.display()))
            && said.contains(", manifest signed"),
        "{said}"
    );
    let still_sending = fleet.counters().telemetry.load(Relaxed);
    stop.cancel();
    fleet.finish().await;
    gateway.shutdown(Duration::from_secs(5)).await.unwrap();
    // No snapshot is left behind in the data dir.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("backup-snapshot-")
        })
        .collect();
    assert!(leftovers.is_empty());

    // Restore onto a fresh data dir and run a gateway on it.
    let fresh = dir.path().join("restored");
    let restored_config = dir.path().join("restored.toml");
    let o = fleetgate(&[
        &"restore",
        &archive,
        &"--data-dir",
        &fresh,
        &"--config-out",
        &restored_config,
        &"--trust-key",
        &key_stem.with_extension("pub"),
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("the manifest is signed by the trusted key"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // The restored config runs on the restored data, and is the backed-up one otherwise.
    let mut config = Config::load(&restored_config).unwrap();
    let original = Config::load(&config_path).unwrap();
    assert_eq!(config.storage.data_dir, fresh);
    assert_eq!(
        (&config.http, &config.mqtt),
        (&original.http, &original.mqtt)
    );
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    let gateway = Gateway::start(config).await.unwrap();
    let api = ApiClient::new(&format!("http://{}", gateway.http_addr), TOKEN);

    let state = telemetry_state(&api).await;
    assert_eq!(state.len(), DEVICES);
    let mut total = 0;
    for (id, stored, listed, counted) in &state {
        // One snapshot: the rows and the counters written in the same commits agree.
        assert_eq!((*stored, *listed as u64), (*counted, *counted), "{id}");
        total += counted;
    }
    assert!(
        total > 0 && total <= still_sending,
        "{total} of {still_sending}"
    );
    assert_eq!(get(&api, "/rollouts/signing-key").await, key_before);
    let reader = ApiClient::new(&format!("http://{}", gateway.http_addr), &ci);
    assert_eq!(
        get(&reader, "/devices").await.as_array().unwrap().len(),
        DEVICES
    );

    // The devices come back with the credentials they had.
    let spec = FleetSpec::new("127.0.0.1", gateway.mqtt_addr.port(), creds);
    let stop = CancellationToken::new();
    let fleet = Fleet::start(spec, stop.clone());
    assert!(
        fleet
            .wait_connected(DEVICES as u64, Duration::from_secs(30))
            .await
    );
    assert_eq!(fleet.counters().connect_errors.load(Relaxed), 0);
    stop.cancel();
    fleet.finish().await;
    gateway.shutdown(Duration::from_secs(5)).await.unwrap();

    // A second restore onto the same dir is refused.
    let o = fleetgate(&[&"restore", &archive, &"--data-dir", &fresh]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already holds a database"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
