//! One alert webhook: takes the webhooks' outbox in order, posts each alert it wants as
//! Alertmanager JSON ([`super::alertmanager`]) and moves its cursor once the endpoint answered
//! 2xx. A failed attempt (no answer, 5xx, 408, 429, a redirect) is retried with backoff until
//! it succeeds: the next alert waits, so alerts arrive in order and none is skipped. Another
//! 4xx means the endpoint refuses that alert: it is counted and logged, and the next follows.
//!
//! Invariants:
//! - The cursor moves only past alerts the endpoint accepted (or refused), and is handed to
//!   the writer at least every second while it moves, when the webhook is idle and when the
//!   gateway stops; so after a restart delivery resumes with the first alert not delivered.
//!   A gateway killed in between sends the alerts of that last second again; each carries
//!   its (site, sequence) id (`Idempotency-Key`) for the receiver to deduplicate.
//! - HTTP calls block: they run on the blocking pool, one at a time, each within `timeout`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::alertmanager::{Notification, render};
use super::event::Entry;
use super::metrics::WebhookLabel;
use super::upstream::backoff;
use crate::clock::{now_ms, rfc3339};
use crate::ingest::ControlTx;
use crate::metrics::Metrics;
use crate::storage::Store;
use crate::storage::outbox::Stream;
use crate::storage::records::Record;

/// Entries read from the outbox at once.
const READ: usize = 64;
/// How long the cursor may move before the writer hears of it.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How often the outbox is looked at without a signal (a safety net).
const POLL_EVERY: Duration = Duration::from_secs(1);

/// What the API shows of a webhook.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HookState {
    pub name: String,
    pub url: String,
    /// `ok`, `failing` (retrying the alert in `retrying`) or `idle` (nothing sent yet).
    pub state: &'static str,
    pub last_error: Option<String>,
    pub last_delivered_at: Option<String>,
    /// The (site, sequence) id of the alert being retried.
    pub retrying: Option<String>,
    pub attempts: u64,
}

#[derive(Debug)]
pub struct Webhook {
    pub hook: fleetgate_config::Webhook,
    pub site: String,
    pub external_url: String,
    pub store: Store,
    pub signal: watch::Receiver<u64>,
    pub control: ControlTx,
    pub metrics: Arc<Metrics>,
    pub state: Arc<Mutex<HookState>>,
    pub agent: ureq::Agent,
    pub shutdown: CancellationToken,
}

/// How one attempt went.
enum Attempt {
    Delivered,
    Refused(String),
    Failed(String),
}

/// The HTTP agent of a webhook: its timeout, no redirects, and for https the roots of its
/// `ca` (or the system's). Reads files: call it off the async workers.
pub fn agent(hook: &fleetgate_config::Webhook) -> Result<ureq::Agent, super::tls::ClientTlsError> {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(hook.timeout))
        .user_agent(format!("fleetgate/{}", env!("CARGO_PKG_VERSION")));
    if hook.url.starts_with("https://") {
        let roots: Vec<ureq::tls::Certificate<'static>> = super::tls::roots(hook.ca.as_deref())?
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        config = config.tls_config(tls);
    }
    Ok(config.build().into())
}

impl Webhook {
    fn label(&self) -> WebhookLabel {
        WebhookLabel {
            webhook: self.hook.name.clone(),
        }
    }

    fn set_state(&self, f: impl FnOnce(&mut HookState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }

    /// Runs until the gateway stops.
    pub async fn run(mut self) {
        let (store, name) = (self.store.clone(), self.hook.name.clone());
        let mut acked =
            tokio::task::spawn_blocking(move || store.outbox_snapshot(Stream::Webhooks))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|s| s.cursor(&name))
                .unwrap_or(0);
        let mut reported = acked;
        let mut last_report = Instant::now();
        'run: loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            drop(self.signal.borrow_and_update());
            let store = self.store.clone();
            let read = tokio::task::spawn_blocking(move || {
                store.outbox_read(Stream::Webhooks, acked, READ, usize::MAX)
            })
            .await;
            let entries = match read {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => {
                    tracing::error!(webhook = self.hook.name, error = %e, "reading the webhooks' outbox");
                    Vec::new()
                }
                Err(_) => break,
            };
            if entries.is_empty() {
                self.report(&mut reported, acked).await;
                last_report = Instant::now();
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = self.signal.changed() => {}
                    _ = tokio::time::sleep(POLL_EVERY) => {}
                }
                continue;
            }
            for (seq, bytes) in entries {
                if seq > acked + 1 {
                    tracing::warn!(
                        webhook = self.hook.name,
                        from = acked + 1,
                        to = seq - 1,
                        "alerts dropped from a full outbox before this webhook had them"
                    );
                }
                let notification = match Entry::decode(&bytes) {
                    Ok(entry) => render(&entry, seq, &self.site, &self.hook, &self.external_url),
                    Err(e) => {
                        tracing::error!(webhook = self.hook.name, seq, error = %e, "an outbox entry does not decode; skipped");
                        None
                    }
                };
                if let Some(n) = notification
                    && !self.deliver(&n).await
                {
                    break 'run;
                }
                acked = seq;
                if last_report.elapsed() >= REPORT_EVERY {
                    self.report(&mut reported, acked).await;
                    last_report = Instant::now();
                }
            }
        }
        self.report(&mut reported, acked).await;
    }

    async fn report(&self, reported: &mut u64, acked: u64) {
        if acked > *reported
            && self
                .control
                .outbox_ack(Stream::Webhooks, self.hook.name.clone(), acked)
                .await
                .is_ok()
        {
            *reported = acked;
        }
    }

    /// Posts until the endpoint accepts or refuses; false if the gateway stops first.
    async fn deliver(&self, n: &Notification) -> bool {
        let body = serde_json::to_vec(&n.body).unwrap_or_default();
        let mut failures = 0u32;
        loop {
            let (agent, url, headers, key, body) = (
                self.agent.clone(),
                self.hook.url.clone(),
                self.hook.headers.clone(),
                n.key.clone(),
                body.clone(),
            );
            let attempt =
                tokio::task::spawn_blocking(move || post(&agent, &url, &headers, &key, &body))
                    .await
                    .unwrap_or_else(|e| Attempt::Failed(e.to_string()));
            self.set_state(|s| s.attempts += 1);
            match attempt {
                Attempt::Delivered => {
                    self.metrics
                        .uplink
                        .webhook_delivered
                        .get_or_create(&self.label())
                        .inc();
                    self.metrics
                        .uplink
                        .webhook_up
                        .get_or_create(&self.label())
                        .set(1);
                    self.set_state(|s| {
                        s.state = "ok";
                        s.retrying = None;
                        s.last_delivered_at = Some(rfc3339(now_ms()));
                    });
                    return true;
                }
                Attempt::Refused(why) => {
                    self.metrics
                        .uplink
                        .webhook_rejected
                        .get_or_create(&self.label())
                        .inc();
                    tracing::warn!(
                        webhook = self.hook.name,
                        id = n.key,
                        reason = why,
                        "the webhook refused an alert; not sent again"
                    );
                    self.set_state(|s| {
                        s.state = "ok";
                        s.retrying = None;
                        s.last_error = Some(why);
                    });
                    return true;
                }
                Attempt::Failed(why) => {
                    failures += 1;
                    self.metrics
                        .uplink
                        .webhook_failures
                        .get_or_create(&self.label())
                        .inc();
                    self.metrics
                        .uplink
                        .webhook_up
                        .get_or_create(&self.label())
                        .set(0);
                    let wait = backoff(failures, self.hook.backoff_min, self.hook.backoff_max);
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(
                            webhook = self.hook.name,
                            id = n.key,
                            attempt = failures,
                            reason = why,
                            retry_in_ms = wait.as_millis() as u64,
                            "webhook delivery failed; retrying"
                        );
                    }
                    self.set_state(|s| {
                        s.state = "failing";
                        s.retrying = Some(n.key.clone());
                        s.last_error = Some(why);
                    });
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

/// One POST of a notification.
fn post(
    agent: &ureq::Agent,
    url: &str,
    headers: &[(String, String)],
    key: &str,
    body: &[u8],
) -> Attempt {
    let mut request = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", key);
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    match request.send(body) {
        Err(e) => Attempt::Failed(e.to_string()),
        Ok(response) => {
            let status = response.status().as_u16();
            match status {
                200..=299 => Attempt::Delivered,
                408 | 429 => Attempt::Failed(format!("HTTP {status}")),
                400..=499 => {
                    let text = response
                        .into_body()
                        .with_config()
                        .limit(512)
                        .read_to_string()
                        .unwrap_or_default();
                    Attempt::Refused(format!("HTTP {status}: {}", text.trim()))
                }
                300..=399 => Attempt::Failed(format!(
                    "HTTP {status} (a redirect to {}: set the url to where it points)",
                    response
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?")
                )),
                _ => Attempt::Failed(format!("HTTP {status}")),
            }
        }
    }
}
