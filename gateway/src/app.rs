//! Assembles a running gateway and takes it down again.
//!
//! Startup: storage, then the writer, then the broker (whose dispatch subscription is active
//! before any command can be sent), then the listeners. Shutdown is one tree under a
//! `CancellationToken`: stop accepting, end device sessions (each acknowledges what gets
//! committed meanwhile, then closes), let in-flight HTTP requests finish, queue a flush marker
//! for the writer, and stop the writer once the marker is committed.
//!
//! The writer is the gateway: if its thread ends (a panic, storage it cannot reload) or stops
//! making progress while the gateway runs, [`Gateway::failed`] resolves and the binary exits
//! non-zero (systemd restarts it); `/healthz` fails meanwhile.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleetgate_config::Config;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::auth::{self, Credentials, TokenSource};
use crate::broker::Broker;
use crate::broker::front::{Front, Kick, Sessions};
use crate::bus::{Uplinks, WriterMsg, WriterTx};
use crate::ingest::{self, ControlTx, Writer};
use crate::metrics::Metrics;
use crate::storage::Store;

/// Tells the gateway (and `/healthz`) when the writer's thread ends, however it ends.
struct WriterGone(CancellationToken, Arc<Metrics>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        self.1.writer_stopped();
        self.0.cancel();
    }
}

/// The storage writer's thread.
pub const WRITER_THREAD: &str = "fg-writer";

/// A writer that has not gone round its loop for this long is stuck (its loop wakes at least
/// once a second; a commit on a slow SD card can take seconds, not a minute).
pub const WRITER_STUCK: Duration = Duration::from_secs(60);

/// A running gateway. Dropping it without [`Gateway::shutdown`] leaves its tasks running.
#[derive(Debug)]
pub struct Gateway {
    /// The plain MQTT listener's address, or the TLS listener's when the plain one is off.
    pub mqtt_addr: SocketAddr,
    /// The MQTT-over-TLS listener's address, when it is on.
    pub mqtt_tls_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    /// The operator API token and where it came from.
    pub token: String,
    pub token_source: TokenSource,
    pub data_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    sessions: Arc<Sessions>,
    control: ControlTx,
    /// Flush markers go behind every device message queued for the writer.
    writer_tx: WriterTx,
    writer: std::thread::JoinHandle<()>,
    /// Resolves when the writer has stopped on its own (see [`Gateway::failed`]).
    writer_gone: CancellationToken,
    http: tokio::task::JoinHandle<()>,
    markers: std::sync::atomic::AtomicU64,
    store: Store,
}

impl Gateway {
    /// Starts a gateway on `config`. Listen addresses with port 0 get a free port; the bound
    /// addresses are in the returned handle.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let data_dir = config.storage.data_dir.clone();
        let env_token = std::env::var(auth::TOKEN_ENV).ok();
        let (token, token_source) =
            auth::operator_token(config.http.token.as_deref(), env_token, &data_dir)
                .with_context(|| format!("setting up the API token in {}", data_dir.display()))?;

        let (dir, cache) = (data_dir.clone(), config.storage.cache_bytes);
        let store = tokio::task::spawn_blocking(move || Store::open_with_cache(&dir, cache))
            .await?
            .with_context(|| format!("opening the database in {}", data_dir.display()))?;

        let metrics = Arc::new(Metrics::new(config.ingest.reject_log_interval));
        let credentials = Arc::new(Credentials::default());
        // A session's direct queue holds at least two update windows of chunks.
        let sessions = Arc::new(Sessions::new(2 * config.updates.window as usize + 8));
        let (writer_tx, writer_rx, control, control_rx) = ingest::channels(&config);

        let mqtt_cfg = config.mqtt.clone();
        let broker_sessions = sessions.clone();
        let broker = tokio::task::spawn_blocking(move || Broker::start(&mqtt_cfg, broker_sessions))
            .await?
            .context("starting the embedded broker")?;

        // The gateway's own key for rollback directives: configured, or made on first start.
        let rollback_key = {
            let (configured, dir) = (config.rollouts.signing_key.clone(), data_dir.clone());
            tokio::task::spawn_blocking(move || match configured {
                Some(path) => crate::registry::keys::read(&path),
                None => crate::registry::keys::load_or_create(&dir.join("rollback")),
            })
            .await?
            .context("loading the rollback signing key (rollouts.signing_key)")?
        };
        let rollback_public = rollback_key.verifying_key().to_bytes();

        let writer = {
            let (store, config, credentials, sessions) = (
                store.clone(),
                config.clone(),
                credentials.clone(),
                sessions.clone(),
            );
            let (downlink, metrics) = (broker.downlink(), metrics.clone());
            let mut writer = tokio::task::spawn_blocking(move || {
                Writer::new(store, &config, credentials, sessions, downlink, metrics)
            })
            .await?
            .context("loading state from the database")?;
            writer.set_rollback_key(rollback_key);
            writer
        };
        let outbox_signals = writer.outbox_signals();
        let writer_gone = CancellationToken::new();
        let writer = {
            let gone = WriterGone(writer_gone.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(WRITER_THREAD.into())
                .spawn(move || {
                    // Whatever ends the writer (a panic unwinds through this guard too), the
                    // gateway learns of it.
                    let _gone = gone;
                    if let Err(e) = writer.run(writer_rx, control_rx) {
                        tracing::error!(error = %e, "the storage writer cannot go on; the gateway stops");
                    }
                })
                .context("starting the storage writer")?
        };

        let mqtt = match config.mqtt.plain {
            true => Some(
                TcpListener::bind(config.mqtt.listen)
                    .await
                    .with_context(|| {
                        format!("binding the MQTT listener on {}", config.mqtt.listen)
                    })?,
            ),
            false => None,
        };
        let mqtt_tls = match config.mqtt.tls.clone() {
            Some(tls) => {
                let (listen, dir) = (tls.listen, data_dir.clone());
                let acceptor =
                    tokio::task::spawn_blocking(move || crate::broker::tls::acceptor(&tls, &dir))
                        .await?
                        .context("setting up TLS for MQTT ([mqtt.tls])")?;
                let listener = TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding the MQTT TLS listener on {listen}"))?;
                Some((listener, acceptor))
            }
            None => None,
        };
        let http = TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("binding the HTTP listener on {}", config.http.listen))?;
        let mqtt_tls_addr = mqtt_tls.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
        let mqtt_addr = match (&mqtt, mqtt_tls_addr) {
            (Some(plain), _) => plain.local_addr()?,
            (None, Some(tls)) => tls,
            (None, None) => anyhow::bail!("no MQTT listener: set mqtt.listen or mqtt.tls.listen"),
        };
        let http_addr = http.local_addr()?;

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let front = Arc::new(Front::new(
            &config,
            credentials,
            metrics.clone(),
            sessions.clone(),
            Uplinks::new(writer_tx.clone(), config.ingest.queue_bytes),
            shutdown.clone(),
        ));
        if let Some(mqtt) = mqtt {
            tracker.spawn(front.clone().serve(mqtt, tracker.clone()));
        }
        if let Some((listener, acceptor)) = mqtt_tls {
            tracker.spawn(front.serve_tls(listener, acceptor, tracker.clone()));
        }

        let registry = crate::registry::Registry::new(store.clone(), &data_dir, &config.registry);
        let uplink = crate::uplink::start(
            &config,
            crate::uplink::Parts {
                store: store.clone(),
                control: control.clone(),
                registry: registry.clone(),
                metrics: metrics.clone(),
                signals: outbox_signals,
            },
            &tracker,
            shutdown.clone(),
        )
        .await
        .context("starting the uplink and webhooks")?;
        let tokens = api::access::load_tokens(&store, &token).context("loading API tokens")?;
        let api_state = Arc::new(ApiState {
            store: store.clone(),
            registry,
            control: control.clone(),
            metrics: metrics.clone(),
            tokens: Arc::new(tokens),
            data_dir: data_dir.clone(),
            max_body_bytes: config.registry.max_bundle_bytes,
            rollouts: config.rollouts.clone(),
            rollback_public,
            uplink,
        });
        let app = api::router(api_state);
        let http_shutdown = shutdown.clone();
        let http = tokio::spawn(async move {
            let serve = axum::serve(api::listener::HttpListener(http), app)
                .with_graceful_shutdown(http_shutdown.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });

        Ok(Gateway {
            mqtt_addr,
            mqtt_tls_addr,
            http_addr,
            token,
            token_source,
            data_dir,
            metrics,
            shutdown,
            tracker,
            sessions,
            control,
            writer_tx,
            writer,
            writer_gone,
            http,
            markers: std::sync::atomic::AtomicU64::new(0),
            store,
        })
    }

    fn next_marker(&self) -> u64 {
        self.markers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// Returns once every device message queued for the writer before this call (every one
    /// a device got an acknowledgement for, and more), and every connect and disconnect before
    /// it, is committed to storage.
    pub async fn sync(&self) -> anyhow::Result<()> {
        let n = self.next_marker();
        let done = self.control.sync(n).await?;
        self.writer_tx
            .send_async(WriterMsg::FlushMarker(n))
            .await
            .context("the storage writer stopped")?;
        done.await.context("the storage writer stopped")
    }

    /// Makes the storage writer panic at its next write, as a bug would (for tests of what a
    /// crashed writer does to the gateway).
    #[doc(hidden)]
    pub fn crash_writer_at_next_write(&self) {
        self.store.panic_next_write_on(WRITER_THREAD);
    }

    /// Resolves when the storage writer has stopped on its own, or has made no progress for
    /// [`WRITER_STUCK`]. Nothing is acknowledged without the writer: the gateway must stop.
    pub async fn failed(&self) -> &'static str {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.writer_gone.cancelled() => return "the storage writer stopped",
                _ = every.tick() => {
                    if self.metrics.writer_stalled_for() > WRITER_STUCK {
                        return "the storage writer is stuck";
                    }
                }
            }
        }
    }

    /// Stops the gateway: every device message acknowledged before this call is committed when
    /// it returns. Each phase waits at most `grace`.
    pub async fn shutdown(self, grace: Duration) -> anyhow::Result<()> {
        let n = self.next_marker();
        self.shutdown.cancel();
        self.sessions.kick_all(Kick::ShuttingDown);
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.sessions.len(),
                "device sessions still open after the grace period"
            );
        }
        if tokio::time::timeout(grace, self.http).await.is_err() {
            tracing::warn!("HTTP requests still running after the grace period");
        }
        let stopped = self.control.stop(n, grace).await;
        if self
            .writer_tx
            .send_async(WriterMsg::FlushMarker(n))
            .await
            .is_err()
        {
            tracing::warn!("the storage writer was gone before the flush marker");
        }
        if let Some(stopped) = stopped {
            let _ = stopped.await;
        }
        tokio::task::spawn_blocking(move || self.writer.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the storage writer panicked"))?;
        Ok(())
    }
}
