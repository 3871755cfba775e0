//! `GET /uplink`: the upstream connection, the outboxes and the webhooks.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::schema::ErrorBody;
use super::{ApiError, ApiState, read};
use crate::clock::now_ms;

/// The connection to the upstream broker.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionView {
    /// off, connecting, connected or disconnected.
    pub state: String,
    /// The broker connected to, or last tried.
    pub broker: Option<String>,
    /// Since when it is in this state.
    pub since: Option<String>,
    /// Why the last connection failed or ended.
    pub last_error: Option<String>,
}

/// What one destination has not acknowledged yet.
#[derive(Debug, Serialize, ToSchema)]
pub struct BacklogView {
    /// upstream or webhooks.
    pub stream: String,
    /// `upstream`, or a webhook's name.
    pub destination: String,
    /// The newest message it acknowledged.
    pub acknowledged: u64,
    /// Messages waiting for it.
    pub depth: u64,
    /// Age of the oldest of them, in seconds (0: none).
    pub oldest_unsent_seconds: f64,
}

/// An outbox stream's totals.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamView {
    pub stream: String,
    /// The last sequence number given.
    pub head: u64,
    /// Messages and bytes held.
    pub messages: u64,
    pub bytes: u64,
    /// Messages dropped, oldest first, because the outbox was full.
    pub dropped: u64,
}

/// One alert webhook.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    pub name: String,
    pub url: String,
    /// idle (nothing sent yet), ok, or failing (retrying one alert).
    pub state: String,
    pub last_error: Option<String>,
    pub last_delivered_at: Option<String>,
    /// The (site, sequence) id of the alert being retried.
    pub retrying: Option<String>,
    /// Delivery attempts since the gateway started.
    pub attempts: u64,
}

/// The uplink and the webhooks.
#[derive(Debug, Serialize, ToSchema)]
pub struct UplinkView {
    /// Whether `[uplink]` is enabled.
    pub enabled: bool,
    /// The site id messages carry (also for webhooks).
    pub site: String,
    pub topic_prefix: String,
    pub brokers: Vec<String>,
    pub connection: ConnectionView,
    pub streams: Vec<StreamView>,
    pub destinations: Vec<BacklogView>,
    pub webhooks: Vec<WebhookView>,
}

/// `GET /uplink`.
#[utoipa::path(
    get,
    path = "/uplink",
    tag = "uplink",
    responses(
        (status = 200, description = "The upstream connection, the outboxes and the webhooks", body = UplinkView),
        (status = "4XX", description = "The request was refused; the body says why", body = ErrorBody),
        (status = "5XX", description = "The gateway failed; its log has the details", body = ErrorBody),
    )
)]
pub async fn status(State(state): State<Arc<ApiState>>) -> Result<Json<UplinkView>, ApiError> {
    let (backlogs, totals) =
        read(&state, |s| crate::uplink::metrics::backlogs(s, now_ms())).await?;
    let u = &state.uplink;
    let c = u.status.view();
    Ok(Json(UplinkView {
        enabled: u.enabled,
        site: u.site.clone(),
        topic_prefix: u.topic_prefix.clone(),
        brokers: u.brokers.clone(),
        connection: ConnectionView {
            state: if c.state.is_empty() { "off" } else { c.state }.to_owned(),
            broker: c.broker,
            since: c.since,
            last_error: c.last_error,
        },
        streams: totals
            .into_iter()
            .map(|t| StreamView {
                stream: t.stream.to_owned(),
                head: t.head,
                messages: t.messages,
                bytes: t.bytes,
                dropped: t.dropped,
            })
            .collect(),
        destinations: backlogs
            .into_iter()
            .map(|b| BacklogView {
                stream: b.stream.to_owned(),
                destination: b.destination,
                acknowledged: b.acknowledged,
                depth: b.depth,
                oldest_unsent_seconds: b.oldest_unsent_seconds,
            })
            .collect(),
        webhooks: u
            .webhooks
            .iter()
            .filter_map(|h| h.lock().ok().map(|h| h.clone()))
            .map(|h| WebhookView {
                name: h.name,
                url: h.url,
                state: h.state.to_owned(),
                last_error: h.last_error,
                last_delivered_at: h.last_delivered_at,
                retrying: h.retrying,
                attempts: h.attempts,
            })
            .collect(),
    }))
}
