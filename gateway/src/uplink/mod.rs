//! The site and the world beyond it: the bridge to an upstream MQTT cluster (events up through
//! a durable outbox, the site's status and heartbeat, signed requests down) and alert
//! notifications to webhooks. docs/uplink.md describes both for their users.
//!
//! The writer records what goes out in the same transaction as its cause (`ingest::outbox`,
//! `storage::outbox`); the tasks started here only read storage snapshots, send, and hand the
//! destinations' acknowledgements back to the writer. They never hold up ingest: a broker or
//! webhook that is down makes the outbox grow (to its bound), nothing else.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use fleetgate_config::Config;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{now_ms, rfc3339};
use crate::ingest::ControlTx;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::storage::Store;
use crate::storage::outbox::Stream;

pub mod alertmanager;
pub mod down;
pub mod event;
pub mod heartbeat;
pub mod metrics;
pub mod tls;
pub mod upstream;
pub mod webhook;
pub mod window;

/// Wakes the senders when the writer (or the down path) committed new outbox entries.
#[derive(Debug)]
pub struct Signals {
    upstream: watch::Sender<u64>,
    webhooks: watch::Sender<u64>,
}

impl Signals {
    pub fn new() -> Arc<Signals> {
        Arc::new(Signals {
            upstream: watch::channel(0).0,
            webhooks: watch::channel(0).0,
        })
    }

    fn sender(&self, stream: Stream) -> &watch::Sender<u64> {
        match stream {
            Stream::Upstream => &self.upstream,
            Stream::Webhooks => &self.webhooks,
        }
    }

    /// Entries of `stream` were committed.
    pub fn notify(&self, stream: Stream) {
        self.sender(stream).send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self, stream: Stream) -> watch::Receiver<u64> {
        self.sender(stream).subscribe()
    }
}

/// Where the upstream connection stands, for the API.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<StatusView>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StatusView {
    /// `off`, `connecting`, `connected` or `disconnected`.
    pub state: &'static str,
    pub broker: Option<String>,
    /// Since when it is in this state.
    pub since: Option<String>,
    pub last_error: Option<String>,
}

impl Status {
    fn set(&self, f: impl FnOnce(&mut StatusView)) {
        if let Ok(mut s) = self.inner.lock() {
            f(&mut s);
        }
    }

    /// Trying `broker`; after a lost connection the state stays `disconnected` (since the
    /// loss) until a connection succeeds.
    pub fn connecting(&self, broker: &fleetgate_config::Broker) {
        self.set(|s| {
            s.broker = Some(broker.to_string());
            if s.state != "disconnected" {
                s.state = "connecting";
                s.since = Some(rfc3339(now_ms()));
            }
        });
    }

    pub fn connected(&self, broker: &fleetgate_config::Broker) {
        self.set(|s| {
            s.state = "connected";
            s.broker = Some(broker.to_string());
            s.since = Some(rfc3339(now_ms()));
        });
    }

    pub fn disconnected(&self, why: &str) {
        self.set(|s| {
            if s.state != "disconnected" {
                s.since = Some(rfc3339(now_ms()));
            }
            s.state = "disconnected";
            s.last_error = Some(why.to_owned());
        });
    }

    pub fn view(&self) -> StatusView {
        self.inner.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The running uplink and webhooks, as the API sees them.
#[derive(Debug)]
pub struct Uplink {
    pub enabled: bool,
    pub site: String,
    pub topic_prefix: String,
    pub brokers: Vec<String>,
    pub status: Arc<Status>,
    pub webhooks: Vec<Arc<Mutex<webhook::HookState>>>,
}

impl Uplink {
    /// An uplink that is off, with no webhooks.
    pub fn off() -> Uplink {
        Uplink {
            enabled: false,
            site: String::new(),
            topic_prefix: String::new(),
            brokers: Vec::new(),
            status: Arc::new(Status::default()),
            webhooks: Vec::new(),
        }
    }
}

/// The site id of webhook notifications: `uplink.site`, or the host's name.
pub fn site_id(config: &Config) -> String {
    if !config.uplink.site.is_empty() {
        return config.uplink.site.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| fleetgate_config::check_site(h).is_ok())
        .unwrap_or_else(|| "fleetgate".to_owned())
}

/// A URL without its path and query, which may hold a secret (a chat webhook's token).
pub fn origin(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find(['/', '?']) {
        Some(i) => format!("{}/...", &url[..after_scheme + i]),
        None => url.to_owned(),
    }
}

/// What the uplink needs from the rest of the gateway.
#[derive(Debug)]
pub struct Parts {
    pub store: Store,
    pub control: ControlTx,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub signals: Arc<Signals>,
}

/// Starts the upstream connection (if `[uplink]` is enabled) and one task per webhook, on
/// `tracker`; they stop with `shutdown`. A TLS file or password file that cannot be read
/// stops the start.
pub async fn start(
    config: &Config,
    parts: Parts,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Uplink>> {
    let cfg = &config.uplink;
    let site = site_id(config);
    let status = Arc::new(Status::default());
    status.set(|s| s.state = if cfg.enabled { "connecting" } else { "off" });
    if cfg.enabled {
        let tls = match cfg.tls.clone() {
            None => None,
            Some(t) => Some(
                tokio::task::spawn_blocking(move || {
                    let pair = t.cert.as_deref().zip(t.key.as_deref());
                    tls::client_config(t.ca.as_deref(), pair, t.server_name.as_deref())
                })
                .await?
                .context("setting up TLS to the upstream broker ([uplink.tls])")?,
            ),
        };
        let password = match &cfg.password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading uplink.password_file {}", path.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            None => cfg.password.clone(),
        };
        let down = Arc::new(down::Down {
            site: cfg.site.clone(),
            prefix: cfg.topic_prefix.clone(),
            perms: cfg.down.clone(),
            registry: parts.registry.clone(),
            control: parts.control.clone(),
            store: parts.store.clone(),
            rollouts: config.rollouts.clone(),
            metrics: parts.metrics.clone(),
            signals: parts.signals.clone(),
            limits: cfg.outbox.into(),
        });
        let upstream = upstream::Upstream {
            cfg: Arc::new(cfg.clone()),
            store: parts.store.clone(),
            signal: parts.signals.subscribe(Stream::Upstream),
            control: parts.control.clone(),
            status: status.clone(),
            metrics: parts.metrics.clone(),
            down,
            tls,
            password,
            shutdown: shutdown.clone(),
        };
        tracker.spawn(upstream.run());
        tracing::info!(site, brokers = cfg.brokers.len(), "uplink on");
    }
    let mut webhooks = Vec::new();
    for (i, hook) in config.alerts.webhooks.iter().enumerate() {
        let h = hook.clone();
        let agent = tokio::task::spawn_blocking(move || webhook::agent(&h))
            .await?
            .with_context(|| format!("alerts.webhooks[{i}] ({}): TLS", hook.name))?;
        parts.metrics.uplink.webhook(&hook.name);
        let state = Arc::new(Mutex::new(webhook::HookState {
            name: hook.name.clone(),
            url: origin(&hook.url),
            state: "idle",
            ..webhook::HookState::default()
        }));
        webhooks.push(state.clone());
        let task = webhook::Webhook {
            hook: hook.clone(),
            site: site.clone(),
            external_url: config.http.external_url.clone(),
            store: parts.store.clone(),
            signal: parts.signals.subscribe(Stream::Webhooks),
            control: parts.control.clone(),
            metrics: parts.metrics.clone(),
            state,
            agent,
            shutdown: shutdown.clone(),
        };
        tracker.spawn(task.run());
    }
    Ok(Arc::new(Uplink {
        enabled: cfg.enabled,
        site,
        topic_prefix: cfg.topic_prefix.clone(),
        brokers: cfg.brokers.iter().map(ToString::to_string).collect(),
        status,
        webhooks,
    }))
}
