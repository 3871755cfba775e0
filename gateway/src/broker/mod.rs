//! The embedded MQTT broker (rumqttd's router) and everything that touches rumqttd types.
//!
//! Invariants:
//! - rumqttd has no shutdown. The router thread, the link-builder thread and the ingest thread
//!   live as long as the process; nothing ever waits for them. The gateway stops by closing
//!   devices' sessions, publishing a flush marker and stopping the storage writer when the
//!   marker arrives (see `app`).
//! - No rumqttd listener is started: devices reach the router only through the gateway's own
//!   front (`front`, `session`), which authenticates them and checks every topic.
//! - The gateway has exactly one router connection of its own ("fleetgate"): its receiving half
//!   is the ingest subscription ([`policy::INGEST_FILTER`]), its sending half publishes commands
//!   to devices. Every router call that blocks runs on a dedicated thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_config::Mqtt;
use fleetgate_protocol::{Downlink, Encoding};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};
use tokio::sync::oneshot;

use crate::clock::now_us;
use crate::ingest::{UplinkMsg, WriterMsg, WriterTx};

pub mod front;
pub mod policy;
mod session;

/// Router id of the embedded broker.
const ROUTER_ID: usize = 0;
/// Client id of the gateway's own router connection.
const GATEWAY_CLIENT_ID: &str = "fleetgate";
/// Router connections beyond the device budget: the gateway's own link plus headroom for
/// sessions that are closing while their replacements connect.
const EXTRA_CONNECTIONS: usize = 16;
/// The router's event channel holds 1000 events; above this many the front backs off before
/// sending, so that no async task blocks on a full channel.
const ROUTER_BUSY: usize = 900;

/// Handles to the running broker.
#[derive(Clone)]
pub struct Broker {
    links: flume::Sender<LinkRequest>,
    router_busy: Arc<dyn Fn() -> bool + Send + Sync>,
    downlink: DownlinkTx,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

/// A device's router connection, as built for the front.
pub(crate) struct DeviceLink {
    pub tx: LinkTx,
    pub rx: LinkRx,
    pub session_present: bool,
}

struct LinkRequest {
    device: String,
    clean_session: bool,
    reply: oneshot::Sender<Result<DeviceLink, String>>,
}

/// Sends gateway -> device messages through the router. Cloneable; usable from any thread.
#[derive(Clone, Debug)]
pub struct DownlinkTx {
    tx: flume::Sender<(String, Bytes)>,
}

#[derive(Debug, thiserror::Error)]
#[error("the broker's downlink thread has stopped")]
pub struct DownlinkClosed;

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

    /// Publishes flush marker `n` through the router; the ingest writer sees it after
    /// everything devices published before now.
    pub async fn flush_marker(&self, n: u64) -> Result<(), DownlinkClosed> {
        let topic = policy::flush_marker_topic();
        let payload = Bytes::copy_from_slice(&n.to_be_bytes());
        self.tx
            .send_async((topic, payload))
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
        max_connections: cfg.max_connections + EXTRA_CONNECTIONS,
        max_outgoing_packet_count: cfg.router.max_outgoing_packet_count,
        max_segment_size: cfg.router.device_segment_bytes,
        max_segment_count: cfg.router.device_segment_count,
        custom_segment: Some(HashMap::from([(policy::INGEST_FILTER.to_owned(), ingest)])),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

impl Broker {
    /// Starts the router, the gateway's own link (ingest and downlink threads) and the
    /// link-builder thread. Returns once the ingest subscription is active, so no device
    /// message can be published before the gateway is subscribed.
    pub fn start(cfg: &Mqtt, writer: WriterTx) -> std::io::Result<Broker> {
        let router_tx = Router::new(ROUTER_ID, router_config(cfg)).spawn();

        let (gw_tx, mut gw_rx, _ack) = LinkBuilder::new(GATEWAY_CLIENT_ID, router_tx.clone())
            .build()
            .map_err(|e| std::io::Error::other(format!("gateway link: {e}")))?;
        let (mut gw_tx, subscribed) = subscribe_ingest(gw_tx, &mut gw_rx)?;
        if !subscribed {
            return Err(std::io::Error::other(
                "router did not acknowledge the ingest subscription",
            ));
        }

        std::thread::Builder::new()
            .name("fg-ingest-link".into())
            .spawn(move || ingest_thread(gw_rx, writer))?;

        let (down_tx, down_rx) = flume::bounded::<(String, Bytes)>(1024);
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

        let (links_tx, links_rx) = flume::bounded::<LinkRequest>(256);
        let runtime = tokio::runtime::Handle::current();
        let builder_router = router_tx.clone();
        std::thread::Builder::new()
            .name("fg-link-builder".into())
            .spawn(move || {
                for req in links_rx.iter() {
                    let built = LinkBuilder::new(&req.device, builder_router.clone())
                        .tenant_id(Some(req.device.clone()))
                        .clean_session(req.clean_session)
                        .build()
                        .map_err(|e| e.to_string())
                        .map(|(tx, rx, ack)| DeviceLink {
                            tx,
                            rx,
                            session_present: session_present(ack),
                        });
                    // The requester may have gone (shutdown, kicked while connecting); the link
                    // must then be released, or the router keeps its slot and client id.
                    if let Err(Ok(unused)) = req.reply.send(built) {
                        runtime.spawn(disconnect(unused.tx));
                    }
                }
            })?;

        let busy_tx = router_tx;
        Ok(Broker {
            links: links_tx,
            router_busy: Arc::new(move || busy_tx.len() >= ROUTER_BUSY),
            downlink: DownlinkTx { tx: down_tx },
        })
    }

    pub fn downlink(&self) -> DownlinkTx {
        self.downlink.clone()
    }

    /// Builds a router connection for an authenticated device, bound to its tenant.
    pub(crate) async fn link(
        &self,
        device: &str,
        clean_session: bool,
    ) -> Result<DeviceLink, String> {
        let (reply, rx) = oneshot::channel();
        let req = LinkRequest {
            device: device.to_owned(),
            clean_session,
            reply,
        };
        self.links
            .send_async(req)
            .await
            .map_err(|_| "link builder stopped".to_owned())?;
        rx.await.map_err(|_| "link builder stopped".to_owned())?
    }

    /// Waits while the router's event channel is nearly full.
    pub(crate) async fn wait_router(&self) {
        let mut pause = Duration::from_micros(200);
        while (self.router_busy)() {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// Tells the router a link is gone, so it frees the slot and the client id.
pub(crate) async fn disconnect(mut tx: LinkTx) {
    let bye = rumqttd::protocol::Packet::Disconnect(
        rumqttd::protocol::Disconnect {
            reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    let _ = tx.send(bye).await;
}

fn session_present(ack: Notification) -> bool {
    match Option::<rumqttd::protocol::Packet>::from(ack) {
        Some(rumqttd::protocol::Packet::ConnAck(ack, _)) => ack.session_present,
        _ => false,
    }
}

/// Subscribes the gateway link to the ingest filter and waits for the router's SubAck.
fn subscribe_ingest(mut tx: LinkTx, rx: &mut LinkRx) -> std::io::Result<(LinkTx, bool)> {
    tx.subscribe(policy::INGEST_FILTER)
        .map_err(|e| std::io::Error::other(format!("ingest subscribe: {e}")))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_deadline(deadline) {
            Ok(Some(n)) => {
                if let Some(rumqttd::protocol::Packet::SubAck(..)) = Option::from(n) {
                    return Ok((tx, true));
                }
            }
            Ok(None) => {}
            Err(_) => return Ok((tx, false)),
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
