//! The end-to-end test harness: a real gateway on free loopback ports with its own temp dir,
//! and helpers to talk to its API and to devices.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetgate::Gateway;
use fleetgate::cli::{ApiClient, ClientError};
use fleetgate_config::Config;
use fleetgate_sim::Credential;
use serde_json::Value;

/// Operator token of every test gateway.
pub const TOKEN: &str = "e2e-operator-token-0123456789";

/// A gateway started by a test. Stop it with [`TestGateway::stop`] to reuse its data dir.
#[derive(Debug)]
pub struct TestGateway {
    gateway: Option<Gateway>,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    client: ApiClient,
}

/// A test config: loopback, free ports, the given data dir, short timeouts.
pub fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.mqtt.listen = "127.0.0.1:0".parse().expect("address");
    c.http.listen = "127.0.0.1:0".parse().expect("address");
    c.http.token = Some(TOKEN.to_owned());
    c.storage.data_dir = dir.to_owned();
    c.mqtt.connect_timeout = Duration::from_secs(2);
    c
}

/// Turns on the MQTT TLS listener on a free loopback port, with the self-signed certificate the
/// gateway generates in its data dir (see [`TestGateway::tls_cert`]).
pub fn with_tls(config: &mut Config) {
    config.mqtt.tls = Some(fleetgate_config::MqttTls {
        listen: "127.0.0.1:0".parse().expect("address"),
        cert: None,
        key: None,
        names: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        client_ca: None,
    });
}

impl TestGateway {
    /// Starts a gateway in a new temp dir.
    pub async fn start() -> TestGateway {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_owned();
        TestGateway::start_with(config(&dir), Some(tmp)).await
    }

    /// Starts a gateway on `config` (its data dir is kept by the caller).
    pub async fn start_with(config: Config, tmp: Option<tempfile::TempDir>) -> TestGateway {
        // FLEETGATE_TEST_LOG=debug shows the gateway's log while debugging a test.
        if let Ok(filter) = std::env::var("FLEETGATE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let dir = config.storage.data_dir.clone();
        let gateway = Gateway::start(config).await.expect("gateway starts");
        let client = ApiClient::new(&format!("http://{}", gateway.http_addr), TOKEN);
        TestGateway {
            gateway: Some(gateway),
            dir,
            _tmp: tmp,
            client,
        }
    }

    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("running")
    }

    pub fn mqtt_port(&self) -> u16 {
        self.gateway().mqtt_addr.port()
    }

    /// Port of the TLS listener (see [`with_tls`]).
    pub fn mqtt_tls_port(&self) -> u16 {
        self.gateway()
            .mqtt_tls_addr
            .expect("TLS listener on")
            .port()
    }

    /// The certificate the gateway generated for its TLS listener (PEM).
    pub fn tls_cert(&self) -> PathBuf {
        use fleetgate::broker::tls;
        self.dir.join(tls::DIR).join(tls::CERT_FILE)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.gateway().http_addr)
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until everything devices got acknowledged so far is committed.
    pub async fn sync(&self) {
        self.gateway().sync().await.expect("sync");
    }

    /// Stops the gateway (flushing everything); returns the temp dir so a restart can reuse it.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        let gateway = self.gateway.take().expect("running");
        gateway
            .shutdown(Duration::from_secs(10))
            .await
            .expect("clean shutdown");
        self._tmp.take()
    }

    async fn call(
        &self,
        f: impl FnOnce(&ApiClient) -> Result<Value, ClientError> + Send + 'static,
    ) -> Result<Value, ClientError> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || f(&client))
            .await
            .expect("api call")
    }

    /// GET `/api/v1{path}`, which must succeed.
    pub async fn get(&self, path: &str) -> Value {
        let p = path.to_owned();
        self.call(move |c| c.get(&p))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// POST `/api/v1{path}`; the caller decides what an error means.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, ClientError> {
        let p = path.to_owned();
        self.call(move |c| c.post(&p, &body)).await
    }

    /// DELETE `/api/v1{path}`, which must succeed.
    pub async fn delete(&self, path: &str) -> Value {
        let p = path.to_owned();
        self.call(move |c| c.delete(&p))
            .await
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}"))
    }

    /// Uploads a bundle file.
    pub async fn upload(&self, bundle: Vec<u8>) -> Result<Value, ClientError> {
        self.call(move |c| c.post_bytes("/registry/bundles", &bundle))
            .await
    }

    /// Enrolls a device and returns its credential.
    pub async fn enroll(&self, id: &str) -> Credential {
        let answer = self
            .post("/devices", serde_json::json!({ "id": id }))
            .await
            .expect("enroll");
        Credential {
            id: id.to_owned(),
            secret: answer["credential"]
                .as_str()
                .expect("credential")
                .to_owned(),
        }
    }

    /// Enrolls `n` devices `<prefix>-00000`, ... through the simulator's enrollment.
    pub async fn enroll_fleet(&self, prefix: &str, n: usize) -> Vec<Credential> {
        let ids = fleetgate_sim::enroll::ids(prefix, n);
        let url = self.http_url();
        tokio::task::spawn_blocking(move || {
            fleetgate_sim::enroll::enroll(&url, TOKEN, &ids, None, 4)
        })
        .await
        .expect("enroll task")
        .expect("enroll fleet")
    }
}

/// An MQTT 3.1.1 client for one device, with its event loop polled in the background; the
/// events it receives arrive on the returned channel.
pub mod device {
    use std::time::Duration;

    use rumqttc::{AsyncClient, Event, MqttOptions};
    use tokio::sync::mpsc;

    /// Connects `id` with `password`; returns the client, its events, and whether the first
    /// connect attempt got CONNACK success (`Err` holds what went wrong otherwise).
    pub async fn connect(
        port: u16,
        id: &str,
        password: &str,
    ) -> Result<(AsyncClient, mpsc::UnboundedReceiver<Event>), String> {
        connect_with(options(port, id, password)).await
    }

    fn options(port: u16, id: &str, password: &str) -> MqttOptions {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_credentials(id, password);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts
    }

    /// Connects, waits (10 s at most) for the CONNACK, then hands every event to the receiver.
    async fn connect_with(
        opts: MqttOptions,
    ) -> Result<(AsyncClient, mpsc::UnboundedReceiver<Event>), String> {
        let (client, mut events) = AsyncClient::new(opts, 64);
        let first = tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .map_err(|_| "connect timed out".to_owned())?;
        match first {
            Ok(Event::Incoming(rumqttc::Packet::ConnAck(_))) => {}
            Ok(other) => return Err(format!("expected CONNACK, got {other:?}")),
            Err(e) => return Err(e.to_string()),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        Ok((client, rx))
    }

    /// A TLS transport (ring provider) that trusts only the certificates in the PEM file `ca`.
    pub fn tls_transport(ca: &std::path::Path) -> rumqttc::Transport {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;

        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
            roots
                .add(cert.expect("PEM certificate"))
                .expect("usable CA");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(
            config,
        )))
    }

    /// Like [`connect`], over TLS to `127.0.0.1:port`, trusting only the certificates in `ca`.
    pub async fn connect_tls(
        port: u16,
        id: &str,
        password: &str,
        ca: &std::path::Path,
    ) -> Result<(AsyncClient, mpsc::UnboundedReceiver<Event>), String> {
        let mut opts = options(port, id, password);
        opts.set_transport(tls_transport(ca));
        connect_with(opts).await
    }

    /// Waits for `n` PUBACKs (10 s at most); panics with how many came otherwise.
    pub async fn await_acks(rx: &mut mpsc::UnboundedReceiver<Event>, n: usize) {
        let mut acks = 0;
        while acks < n {
            match next_incoming(rx, Duration::from_secs(10)).await {
                Some(rumqttc::Packet::PubAck(_)) => acks += 1,
                Some(_) => {}
                None => panic!("{acks} of {n} publishes acknowledged"),
            }
        }
    }

    /// The next incoming packet (skipping outgoing events), within `wait`.
    pub async fn next_incoming(
        rx: &mut mpsc::UnboundedReceiver<Event>,
        wait: Duration,
    ) -> Option<rumqttc::Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Incoming(p))) => return Some(p),
                Ok(Some(Event::Outgoing(_))) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

/// Release keys and signed bundles for tests.
pub mod release {
    use std::collections::BTreeMap;

    use ed25519_dalek::SigningKey;
    use fleetgate::registry::bundle::BundleFile;
    use fleetgate_protocol::manifest::{ManifestSpec, RuntimeReq};
    use fleetgate_protocol::{ArtifactKind, Compat};

    /// A deterministic test key.
    pub fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    pub fn public(n: u8) -> [u8; 32] {
        key(n).verifying_key().to_bytes()
    }

    /// A pseudo-random artifact of `size` bytes.
    pub fn artifact(size: usize, seed: u8) -> Vec<u8> {
        let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
        (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// A model bundle for the simulator's hardware (`class`), valid for a day.
    pub fn model(version: &str, release: u64, class: &str, size: usize, signers: &[u8]) -> Vec<u8> {
        let now = fleetgate::clock::now_ms();
        let spec = ManifestSpec {
            kind: ArtifactKind::Model,
            name: "sim-model".into(),
            version: semver::Version::parse(version).expect("version"),
            release,
            compat: Compat {
                classes: vec![class.into()],
                runtime: Some(RuntimeReq {
                    name: "tflm".into(),
                    min_version: semver::Version::new(2, 0, 0),
                }),
                ..Compat::default()
            },
            chunk_size: 16 * 1024,
            created_ms: now,
            expires_ms: now + 86_400_000,
        };
        let keys: Vec<SigningKey> = signers.iter().map(|n| key(*n)).collect();
        BundleFile::sign(
            artifact(size, release as u8),
            spec,
            &keys,
            BTreeMap::from([("run".into(), format!("run-{release}"))]),
            vec![],
        )
        .encode()
    }
}
