//! The embedded MQTT broker (rumqttd's router) and everything that touches rumqttd types.
//!
//! Invariants:
//! - rumqttd has no shutdown. The router thread and the threads of the gateway's three router
//!   connections live as long as the process; nothing ever waits for them. The gateway stops by
//!   closing devices' sessions, publishing a flush marker and stopping the storage writer when
//!   the marker arrives (see `app`).
//! - No rumqttd listener is started and devices hold no router connection of their own: they
//!   reach the router only through the gateway's front (`front`, `session`), which
//!   authenticates them and checks every topic. A router connection costs ~40 KiB of queues
//!   whether the device talks or not; a session costs a few KiB.
//! - The gateway has three router connections: "fleetgate-uplink" publishes what devices send
//!   (one bounded queue, in arrival order, flush markers included, so a marker is always behind
//!   every message acknowledged before it); "fleetgate" subscribes to the ingest filter
//!   ([`policy::INGEST_FILTER`]) for the storage writer and publishes commands to devices;
//!   "fleetgate-dispatch" subscribes to every device's downlink topics
//!   ([`policy::DOWNLINK_FILTER`]) and hands what arrives to the device's session. Every router
//!   call that blocks runs on a dedicated thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_config::Mqtt;
use fleetgate_protocol::{Downlink, Encoding};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};

use crate::clock::now_us;
use crate::ingest::{UplinkMsg, WriterMsg, WriterTx};

pub mod front;
pub mod limit;
pub mod policy;
mod session;
pub mod tls;

use front::{Direct, Sessions};

/// Router id of the embedded broker.
const ROUTER_ID: usize = 0;
/// Client ids of the gateway's router connections.
const GATEWAY_CLIENT_ID: &str = "fleetgate";
const UPLINK_CLIENT_ID: &str = "fleetgate-uplink";
const DISPATCH_CLIENT_ID: &str = "fleetgate-dispatch";
/// Router connections: the gateway's three and a few spare.
const ROUTER_CONNECTIONS: usize = 8;
/// Messages from devices waiting for the router. A full queue makes sessions wait (and stop
/// reading their sockets), so a burst slows devices down instead of growing memory.
const UPLINK_QUEUE: usize = 8192;
/// Most messages handed to the router in one event.
const UPLINK_BATCH: usize = 256;

/// Handles to the running broker.
#[derive(Clone, Debug)]
pub struct Broker {
    uplink: UplinkTx,
    downlink: DownlinkTx,
}

/// Sends device -> gateway messages (already checked and on their internal topics) into the
/// router, in order. Cloneable.
#[derive(Clone, Debug)]
pub struct UplinkTx {
    tx: flume::Sender<(Bytes, Bytes)>,
}

/// Sends gateway -> device messages through the router. Cloneable; usable from any thread.
#[derive(Clone, Debug)]
pub struct DownlinkTx {
    tx: flume::Sender<(String, Bytes)>,
}

#[derive(Debug, thiserror::Error)]
#[error("the broker's queue has stopped")]
pub struct DownlinkClosed;

impl UplinkTx {
    /// Queues a device's message; waits while the queue is full.
    pub(crate) async fn send(
        &self,
        internal_topic: Bytes,
        payload: Bytes,
    ) -> Result<(), DownlinkClosed> {
        self.tx
            .send_async((internal_topic, payload))
            .await
            .map_err(|_| DownlinkClosed)
    }

    /// Publishes flush marker `n` behind every device message queued before it; the ingest
    /// writer sees it after all of them.
    pub async fn flush_marker(&self, n: u64) -> Result<(), DownlinkClosed> {
        let topic = Bytes::from(policy::flush_marker_topic());
        let payload = Bytes::copy_from_slice(&n.to_be_bytes());
        self.send(topic, payload).await
    }
}

impl DownlinkTx {
    /// A downlink whose messages land in the returned receiver instead of the broker (tests).
    #[doc(hidden)]
    pub fn detached(capacity: usize) -> (DownlinkTx, flume::Receiver<(String, Bytes)>) {
        let (tx, rx) = flume::bounded(capacity);
        (DownlinkTx { tx }, rx)
    }

    /// Queues `payload` for `device`'s `channel` topic in `encoding`. Blocks while the queue is
    /// full; call from a thread, or use [`DownlinkTx::send_async`].
    pub fn send(
        &self,
        device: &str,
        channel: Downlink,
        encoding: Encoding,
        payload: Vec<u8>,
    ) -> Result<(), DownlinkClosed> {
        let topic = policy::downlink(device, channel, encoding);
        self.tx
            .send((topic, payload.into()))
            .map_err(|_| DownlinkClosed)
    }

    pub async fn send_async(
        &self,
        device: &str,
        channel: Downlink,
        encoding: Encoding,
        payload: Vec<u8>,
    ) -> Result<(), DownlinkClosed> {
        let topic = policy::downlink(device, channel, encoding);
        self.tx
            .send_async((topic, payload.into()))
            .await
            .map_err(|_| DownlinkClosed)
    }
}

/// The router's sizing from the gateway config (see ARCHITECTURE.md, "Memory budget").
fn router_config(cfg: &Mqtt) -> RouterConfig {
    let ingest = rumqttd::SegmentConfig {
        max_segment_size: cfg.router.ingest_segment_bytes,
        max_segment_count: cfg.router.ingest_segment_count,
    };
    RouterConfig {
        max_connections: ROUTER_CONNECTIONS,
        max_outgoing_packet_count: cfg.router.max_outgoing_packet_count,
        max_segment_size: cfg.router.downlink_segment_bytes,
        max_segment_count: cfg.router.downlink_segment_count,
        custom_segment: Some(HashMap::from([(policy::INGEST_FILTER.to_owned(), ingest)])),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

impl Broker {
    /// Starts the router and the gateway's three connections with their threads. Returns once
    /// the ingest and dispatch subscriptions are active, so nothing a device publishes or the
    /// gateway sends can be routed before its consumer exists.
    pub fn start(cfg: &Mqtt, writer: WriterTx, sessions: Arc<Sessions>) -> std::io::Result<Broker> {
        let router_tx = Router::new(ROUTER_ID, router_config(cfg)).spawn();
        let link = |id: &str| {
            LinkBuilder::new(id, router_tx.clone())
                .build()
                .map(|(tx, rx, _ack)| (tx, rx))
                .map_err(|e| std::io::Error::other(format!("router connection {id}: {e}")))
        };

        let (gw_tx, mut gw_rx) = link(GATEWAY_CLIENT_ID)?;
        let gw_tx = subscribe(gw_tx, &mut gw_rx, policy::INGEST_FILTER)?;
        std::thread::Builder::new()
            .name("fg-ingest-link".into())
            .spawn(move || ingest_thread(gw_rx, writer))?;

        let (dispatch_tx, mut dispatch_rx) = link(DISPATCH_CLIENT_ID)?;
        // The sending half must live as long as the receiving half: dropping it would look like
        // a disconnect to nobody, but keep the connection's state consistent.
        let dispatch_tx = subscribe(dispatch_tx, &mut dispatch_rx, policy::DOWNLINK_FILTER)?;
        std::thread::Builder::new()
            .name("fg-dispatch".into())
            .spawn(move || {
                let _keep = dispatch_tx;
                dispatch_thread(dispatch_rx, &sessions)
            })?;

        let (down_tx, down_rx) = flume::bounded::<(String, Bytes)>(1024);
        let mut gw_tx = gw_tx;
        std::thread::Builder::new()
            .name("fg-downlink".into())
            .spawn(move || {
                for (topic, payload) in down_rx.iter() {
                    if let Err(e) = gw_tx.publish(topic, payload) {
                        tracing::error!(error = %e, "downlink publish failed; downlink stopped");
                        return;
                    }
                }
            })?;

        let (up_tx, up_rx) = flume::bounded::<(Bytes, Bytes)>(UPLINK_QUEUE);
        let (uplink, uplink_rx) = link(UPLINK_CLIENT_ID)?;
        std::thread::Builder::new()
            .name("fg-uplink".into())
            .spawn(move || uplink_thread(uplink, uplink_rx, up_rx))?;

        Ok(Broker {
            uplink: UplinkTx { tx: up_tx },
            downlink: DownlinkTx { tx: down_tx },
        })
    }

    pub fn downlink(&self) -> DownlinkTx {
        self.downlink.clone()
    }

    pub fn uplink(&self) -> UplinkTx {
        self.uplink.clone()
    }
}

/// Hands device messages to the router in batches: the queue's contents go into the
/// connection's buffer, then one event tells the router.
fn uplink_thread(mut tx: LinkTx, mut rx: LinkRx, queue: flume::Receiver<(Bytes, Bytes)>) {
    // The router sends this connection nothing but scheduling notifications; answer them so it
    // is never stalled.
    std::thread::Builder::new()
        .name("fg-uplink-rx".into())
        .spawn(move || {
            loop {
                match rx.recv() {
                    Ok(Some(Notification::Unschedule)) => {
                        if rx.ready().is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })
        .ok();
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(UPLINK_BATCH);
        batch.push(first);
        batch.extend(queue.try_iter().take(UPLINK_BATCH - 1));
        let Some((topic, payload)) = batch.pop() else {
            continue;
        };
        tx.buffer().extend(batch.into_iter().map(|(t, p)| {
            rumqttd::protocol::Packet::Publish(rumqttd::protocol::Publish::new(t, p, false), None)
        }));
        if let Err(e) = tx.publish(topic, payload) {
            tracing::error!(error = %e, "uplink publish failed; uplink stopped");
            return;
        }
    }
}

/// Delivers what the router routes to devices' downlink topics to their sessions.
fn dispatch_thread(mut rx: LinkRx, sessions: &Sessions) {
    loop {
        match rx.recv() {
            Ok(Some(Notification::Forward(forward))) => {
                let Ok(topic) = std::str::from_utf8(&forward.publish.topic) else {
                    continue;
                };
                let Some((device, channel, encoding)) = policy::downlink_of(topic) else {
                    tracing::error!(topic, "unexpected topic on the dispatch subscription");
                    continue;
                };
                let msg = Direct {
                    channel,
                    encoding,
                    payload: forward.publish.payload,
                    qos: 1,
                };
                if let Err(e) = sessions.send_direct(device, msg) {
                    tracing::debug!(device, error = %e, "downlink message not delivered");
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if rx.ready().is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Subscribes a connection to `filter` and waits (bounded) for the router's SubAck.
fn subscribe(mut tx: LinkTx, rx: &mut LinkRx, filter: &str) -> std::io::Result<LinkTx> {
    tx.subscribe(filter)
        .map_err(|e| std::io::Error::other(format!("subscribing to {filter}: {e}")))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_deadline(deadline) {
            Ok(Some(n)) => {
                if let Some(rumqttd::protocol::Packet::SubAck(..)) = Option::from(n) {
                    return Ok(tx);
                }
            }
            Ok(None) => {}
            Err(_) => {
                return Err(std::io::Error::other(format!(
                    "the router did not acknowledge the subscription to {filter}"
                )));
            }
        }
    }
}

/// Moves every message devices publish from the router to the storage writer. Blocks on the
/// writer's bounded queue: while the writer is behind, the router's ingest log buffers.
fn ingest_thread(mut rx: LinkRx, writer: WriterTx) {
    loop {
        let notification = match rx.recv() {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(_) => return,
        };
        let msg = match notification {
            Notification::Forward(forward) => {
                let Ok(topic) = std::str::from_utf8(&forward.publish.topic) else {
                    continue;
                };
                match policy::ingested(topic) {
                    Some(policy::Ingested::Uplink {
                        device,
                        channel,
                        encoding,
                    }) => WriterMsg::Uplink(UplinkMsg {
                        device: device.to_owned(),
                        channel,
                        encoding,
                        payload: forward.publish.payload,
                        received_us: now_us(),
                    }),
                    Some(policy::Ingested::FlushMarker) => {
                        let bytes = forward
                            .publish
                            .payload
                            .as_ref()
                            .try_into()
                            .unwrap_or([0; 8]);
                        WriterMsg::FlushMarker(u64::from_be_bytes(bytes))
                    }
                    None => {
                        tracing::error!(topic, "unexpected topic on the ingest subscription");
                        continue;
                    }
                }
            }
            Notification::Unschedule => {
                if rx.ready().is_err() {
                    return;
                }
                continue;
            }
            _ => continue,
        };
        if writer.send(msg).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;

/// For the cargo-fuzz target `mqtt_packets` (`fuzz/`): the packet readers are private to this
/// module.
#[doc(hidden)]
pub mod fuzzing {
    /// Runs the front's and the sessions' readers of device bytes over `bytes`: the protocol
    /// level of a CONNECT, the QoS and packet id of a PUBLISH, and every packet as MQTT 3.1.1
    /// and 5. Returns the packets found per version; it must never panic (rumqttd's decoder is
    /// guarded, but the fuzzer reports a caught panic too, which is what we want to know).
    pub fn mqtt_packets(bytes: &[u8], max: usize) -> (usize, usize) {
        let _ = super::front::connect_level(bytes);
        let _ = super::session::peek_publish(bytes);
        super::session::parse_all(bytes, max)
    }
}
