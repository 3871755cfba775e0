//! The embedded MQTT broker (rumqttd's router and protocol codecs) and the device-facing front
//! before it. The only module that names rumqttd types.
//!
//! Invariants:
//! - rumqttd has no shutdown. The router thread and the threads of the gateway's two router
//!   connections live as long as the process; nothing ever waits for them.
//! - No rumqttd listener is started and devices hold no router connection of their own: they
//!   reach the gateway only through its front (`front`, `session`), which authenticates them
//!   and checks every topic. A router connection costs ~40 KiB of queues whether the device
//!   talks or not; a session costs a few KiB.
//! - What devices publish does not pass the router: a session hands each checked message to
//!   the storage writer's bounded queue itself (`bus`), and waits when it is full. The router's
//!   logs drop the oldest messages when a reader falls behind, silently; the writer's queue
//!   makes the session stop reading its socket instead, so TCP slows the device down.
//! - Commands to devices do pass the router: "fleetgate" publishes them on the devices'
//!   internal downlink topics; "fleetgate-dispatch" subscribes to every device's downlink
//!   topics ([`policy::DOWNLINK_FILTER`]) and hands what arrives to the device's session. Every
//!   router call that blocks runs on a dedicated thread.

use std::sync::Arc;
use std::time::Duration;

use fleetgate_config::Mqtt;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};

use crate::bus::{Direct, Downlinked, Links};
pub use crate::bus::{DownlinkClosed, DownlinkTx};

pub mod front;
pub mod limit;
pub mod policy;
mod session;
pub mod tls;

use front::Sessions;

/// Router id of the embedded broker.
const ROUTER_ID: usize = 0;
/// Client ids of the gateway's router connections.
const GATEWAY_CLIENT_ID: &str = "fleetgate";
const DISPATCH_CLIENT_ID: &str = "fleetgate-dispatch";
/// Router connections: the gateway's two and a few spare.
const ROUTER_CONNECTIONS: usize = 8;
/// Commands waiting for the router.
const DOWNLINK_QUEUE: usize = 1024;

/// Handles to the running broker.
#[derive(Clone, Debug)]
pub struct Broker {
    downlink: DownlinkTx,
}

/// The router's sizing from the gateway config (see ARCHITECTURE.md, "Memory budget").
fn router_config(cfg: &Mqtt) -> RouterConfig {
    RouterConfig {
        max_connections: ROUTER_CONNECTIONS,
        max_outgoing_packet_count: cfg.router.max_outgoing_packet_count,
        max_segment_size: cfg.router.downlink_segment_bytes,
        max_segment_count: cfg.router.downlink_segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

impl Broker {
    /// Starts the router and the gateway's two connections with their threads. Returns once
    /// the dispatch subscription is active, so no command can be routed before its consumer
    /// exists.
    pub fn start(cfg: &Mqtt, sessions: Arc<Sessions>) -> std::io::Result<Broker> {
        let router_tx = Router::new(ROUTER_ID, router_config(cfg)).spawn();
        let link = |id: &str| {
            LinkBuilder::new(id, router_tx.clone())
                .build()
                .map(|(tx, rx, _ack)| (tx, rx))
                .map_err(|e| std::io::Error::other(format!("router connection {id}: {e}")))
        };

        let (dispatch_tx, mut dispatch_rx) = link(DISPATCH_CLIENT_ID)?;
        // The sending half must live as long as the receiving half: dropping it would look like
        // a disconnect to nobody, but keep the connection's state consistent.
        let dispatch_tx = subscribe(dispatch_tx, &mut dispatch_rx, policy::DOWNLINK_FILTER)?;
        std::thread::Builder::new()
            .name("fg-dispatch".into())
            .spawn(move || {
                let _keep = dispatch_tx;
                dispatch_thread(dispatch_rx, &*sessions)
            })?;

        let (gw_tx, gw_rx) = link(GATEWAY_CLIENT_ID)?;
        let (downlink, down_rx) = DownlinkTx::bounded(DOWNLINK_QUEUE);
        std::thread::Builder::new()
            .name("fg-downlink".into())
            .spawn(move || downlink_thread(gw_tx, gw_rx, down_rx))?;

        Ok(Broker { downlink })
    }

    pub fn downlink(&self) -> DownlinkTx {
        self.downlink.clone()
    }
}

/// Publishes commands into the router, on each device's internal downlink topic.
fn downlink_thread(mut tx: LinkTx, mut rx: LinkRx, queue: flume::Receiver<Downlinked>) {
    // The router sends this connection nothing but scheduling notifications; answer them so it
    // is never stalled.
    std::thread::Builder::new()
        .name("fg-downlink-rx".into())
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
    for m in queue.iter() {
        let topic = policy::downlink(&m.device, m.channel, m.encoding);
        if let Err(e) = tx.publish(topic, m.payload) {
            tracing::error!(error = %e, "downlink publish failed; downlink stopped");
            return;
        }
    }
}

/// Delivers what the router routes to devices' downlink topics to their sessions.
fn dispatch_thread(mut rx: LinkRx, sessions: &dyn Links) {
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

#[cfg(test)]
mod tests;

/// For the cargo-fuzz targets (`fuzz/`): ways in to what is private to this module.
#[doc(hidden)]
pub mod fuzzing;
