//! The uplink's and the webhooks' metrics, registered in the gateway's registry (`/metrics`).
//! Outbox depths, ages and drop counts come from storage at each scrape ([`refresh`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::storage::outbox::Stream;
use crate::storage::{Store, records::Record};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub stream: &'static str,
    /// `upstream`, or a webhook's name.
    pub destination: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    pub webhook: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhatLabel {
    /// `bundle` or `rollout`.
    pub what: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Why a request from central operations was refused.
pub const DOWN_REFUSALS: [&str; 10] = [
    "not_permitted",
    "unsigned",
    "bad_signature",
    "invalid",
    "expired",
    "conflict",
    "not_found",
    "bad_topic",
    "busy",
    "failed",
];

#[derive(Debug)]
pub struct UplinkMetrics {
    /// 1 while connected to the upstream broker.
    pub connected: Gauge,
    pub connects: Counter,
    pub connect_failures: Counter,
    /// Outbox entries the upstream broker acknowledged (PUBACK).
    pub forwarded: Counter,
    /// Requests from central operations carried out, and refused.
    pub down_accepted: Family<WhatLabel, Counter>,
    pub down_refused: Family<ReasonLabel, Counter>,
    pub webhook_delivered: Family<WebhookLabel, Counter>,
    /// Attempts that failed (no answer, 5xx, 408, 429): retried.
    pub webhook_failures: Family<WebhookLabel, Counter>,
    /// Alerts a webhook refused (another 4xx): not retried.
    pub webhook_rejected: Family<WebhookLabel, Counter>,
    /// 1 while the webhook's last attempt succeeded (or none failed yet).
    pub webhook_up: Family<WebhookLabel, Gauge>,
    outbox_depth: Family<DestinationLabels, Gauge>,
    outbox_oldest: Family<DestinationLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    outbox_bytes: Family<StreamLabel, Gauge>,
    outbox_dropped: Family<StreamLabel, Counter>,
}

impl UplinkMetrics {
    pub fn register(r: &mut Registry) -> UplinkMetrics {
        fn add<M: prometheus_client::registry::Metric + Clone>(
            r: &mut Registry,
            name: &str,
            help: &str,
            m: M,
        ) -> M {
            r.register(name, help, m.clone());
            m
        }
        let m = UplinkMetrics {
            connected: add(
                r,
                "uplink_connected",
                "1 while connected to the upstream broker, else 0",
                Gauge::default(),
            ),
            connects: add(
                r,
                "uplink_connects",
                "Connections made to the upstream broker",
                Counter::default(),
            ),
            connect_failures: add(
                r,
                "uplink_connect_failures",
                "Connection attempts to the upstream broker that failed, and connections lost",
                Counter::default(),
            ),
            forwarded: add(
                r,
                "uplink_forwarded",
                "Outbox messages the upstream broker acknowledged (PUBACK)",
                Counter::default(),
            ),
            down_accepted: add(
                r,
                "uplink_requests_accepted",
                "Requests from central operations carried out, by what they were about",
                Family::default(),
            ),
            down_refused: add(
                r,
                "uplink_requests_refused",
                "Requests from central operations refused, by reason",
                Family::default(),
            ),
            webhook_delivered: add(
                r,
                "webhook_delivered",
                "Alert notifications a webhook accepted (2xx)",
                Family::default(),
            ),
            webhook_failures: add(
                r,
                "webhook_failures",
                "Delivery attempts that failed and are retried (no answer, 5xx, 408, 429)",
                Family::default(),
            ),
            webhook_rejected: add(
                r,
                "webhook_rejected",
                "Alert notifications a webhook refused with another 4xx (not retried)",
                Family::default(),
            ),
            webhook_up: add(
                r,
                "webhook_up",
                "1 while the webhook's last delivery attempt succeeded, else 0",
                Family::default(),
            ),
            outbox_depth: add(
                r,
                "outbox_depth",
                "Outbox messages a destination has not acknowledged yet",
                Family::default(),
            ),
            outbox_oldest: add(
                r,
                "outbox_oldest_unsent_seconds",
                "Age of the oldest outbox message a destination has not acknowledged (0: none)",
                Family::default(),
            ),
            outbox_bytes: add(
                r,
                "outbox_bytes",
                "Bytes of the messages an outbox stream holds",
                Family::default(),
            ),
            outbox_dropped: add(
                r,
                "outbox_dropped",
                "Outbox messages dropped, oldest first, because the outbox was full (since the stream began)",
                Family::default(),
            ),
        };
        for reason in DOWN_REFUSALS {
            let _ = m.down_refused.get_or_create(&ReasonLabel { reason });
        }
        for what in ["bundle", "rollout"] {
            let _ = m.down_accepted.get_or_create(&WhatLabel { what });
        }
        for stream in Stream::ALL {
            let label = StreamLabel {
                stream: stream.name(),
            };
            let _ = m.outbox_bytes.get_or_create(&label);
            let _ = m.outbox_dropped.get_or_create(&label);
        }
        m
    }

    /// Makes a webhook's series exist from the start (0 until something happens).
    pub fn webhook(&self, name: &str) {
        let l = WebhookLabel {
            webhook: name.to_owned(),
        };
        let _ = self.webhook_delivered.get_or_create(&l);
        let _ = self.webhook_failures.get_or_create(&l);
        let _ = self.webhook_rejected.get_or_create(&l);
        self.webhook_up.get_or_create(&l).set(1);
    }

    pub fn refused(&self, reason: &'static str) {
        self.down_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn accepted(&self, what: &'static str) {
        self.down_accepted.get_or_create(&WhatLabel { what }).inc();
    }

    pub fn refused_count(&self, reason: &'static str) -> u64 {
        self.down_refused
            .get_or_create(&ReasonLabel { reason })
            .get()
    }
}

/// One destination's backlog, as of one snapshot.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Backlog {
    pub stream: &'static str,
    pub destination: String,
    /// The newest message it acknowledged.
    pub acknowledged: u64,
    /// Messages not acknowledged yet.
    pub depth: u64,
    /// Age of the oldest of them, in seconds (0 when there is none).
    pub oldest_unsent_seconds: f64,
}

/// An outbox stream's totals.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamTotals {
    pub stream: &'static str,
    /// The last sequence number given.
    pub head: u64,
    pub messages: u64,
    pub bytes: u64,
    pub dropped: u64,
}

/// Every destination's backlog and every stream's totals, from storage. Blocking.
pub fn backlogs(
    store: &Store,
    now_ms: u64,
) -> crate::storage::Result<(Vec<Backlog>, Vec<StreamTotals>)> {
    let mut out = Vec::new();
    let mut totals = Vec::new();
    for stream in Stream::ALL {
        let snap = store.outbox_snapshot(stream)?;
        let s = snap.state;
        totals.push(StreamTotals {
            stream: stream.name(),
            head: s.head,
            messages: s.len(),
            bytes: s.bytes,
            dropped: s.dropped,
        });
        for (destination, cursor) in snap.cursors {
            let oldest = store
                .outbox_read(stream, cursor, 1, 1)?
                .first()
                .and_then(|(_, v)| crate::uplink::event::Entry::decode(v).ok())
                .map_or(0.0, |e| now_ms.saturating_sub(e.at_ms) as f64 / 1000.0);
            out.push(Backlog {
                stream: stream.name(),
                destination,
                acknowledged: cursor,
                depth: s.head.saturating_sub(cursor.max(s.tail - 1)),
                oldest_unsent_seconds: oldest,
            });
        }
    }
    Ok((out, totals))
}

/// Sets the outbox gauges from storage (at each scrape). Blocking.
pub fn refresh(store: &Store, m: &UplinkMetrics, now_ms: u64) -> crate::storage::Result<()> {
    let (backlogs, totals) = backlogs(store, now_ms)?;
    m.outbox_depth.clear();
    m.outbox_oldest.clear();
    for b in backlogs {
        let l = DestinationLabels {
            stream: b.stream,
            destination: b.destination,
        };
        m.outbox_depth
            .get_or_create(&l)
            .set(i64::try_from(b.depth).unwrap_or(i64::MAX));
        m.outbox_oldest
            .get_or_create(&l)
            .set(b.oldest_unsent_seconds);
    }
    for t in totals {
        let l = StreamLabel { stream: t.stream };
        m.outbox_bytes
            .get_or_create(&l)
            .set(i64::try_from(t.bytes).unwrap_or(i64::MAX));
        // The stored count only grows; the counter catches up with it.
        let counter = m.outbox_dropped.get_or_create(&l);
        let seen = counter.get();
        if t.dropped > seen {
            counter.inc_by(t.dropped - seen);
        }
    }
    Ok(())
}
