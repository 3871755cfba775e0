//! What the tests of the real `fleetgate` binary share: free loopback ports, the release key,
//! and a gateway process on its own config, started, stopped and asked through its API.

// Each test crate that includes this module uses its own part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use fleetgate::cli::ApiClient;
use fleetgate::registry::keys::hex;
use serde_json::Value;

pub const TOKEN: &str = "process-test-token-0123456789abcdef";

pub fn release_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sends SIGTERM to a process (by its pid) and waits (30 s at most, then SIGKILL) for it.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `fleetgate` binary serving a config of its own in `dir`: MQTT and HTTP on free
/// loopback ports, data in `dir/data`, the release key trusted, then `extra` TOML. Killed when
/// dropped.
pub struct GatewayProcess {
    pub config: PathBuf,
    pub log: PathBuf,
    pub mqtt: u16,
    pub http: u16,
    child: Option<Child>,
}

impl GatewayProcess {
    pub fn new(dir: &Path, extra: &str) -> GatewayProcess {
        std::fs::create_dir_all(dir).unwrap();
        let (mqtt, http) = (free_port(), free_port());
        let config = dir.join("gateway.toml");
        let public = hex(release_key().verifying_key().as_bytes());
        std::fs::write(
            &config,
            format!(
                r#"
[mqtt]
listen = "127.0.0.1:{mqtt}"
[http]
listen = "127.0.0.1:{http}"
token = "{TOKEN}"
[storage]
data_dir = "{data}"
[registry]
trusted_keys = ["{public}"]
{extra}
"#,
                data = dir.join("data").display()
            ),
        )
        .unwrap();
        GatewayProcess {
            config,
            log: dir.join("gateway.log"),
            mqtt,
            http,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    pub fn api(&self) -> ApiClient {
        ApiClient::new(&self.url(), TOKEN)
    }

    /// Starts the process and waits (30 s at most) until its API answers.
    pub async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("FLEETGATE_LOG", "info")
            .env_remove("FLEETGATE_API_TOKEN")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("fleetgate starts");
        self.child = Some(child);
        let url = format!("{}/healthz", self.url());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let u = url.clone();
            let up = tokio::task::spawn_blocking(move || ureq::get(&u).call().is_ok())
                .await
                .unwrap();
            if up {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway did not start: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM: the gateway shuts down cleanly.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            tokio::task::spawn_blocking(move || terminate(&mut child))
                .await
                .unwrap();
        }
    }

    /// `GET /api/v1{path}`, which must succeed.
    pub async fn get(&self, path: &str) -> Value {
        let (api, path) = (self.api(), path.to_owned());
        tokio::task::spawn_blocking(move || api.get(&path))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("GET: {e}"))
    }

    /// `POST /api/v1{path}`, which must succeed.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (api, path) = (self.api(), path.to_owned());
        tokio::task::spawn_blocking(move || api.post(&path, &body))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("POST: {e}"))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
