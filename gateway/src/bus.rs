//! What passes between the MQTT front (`broker`) and the storage writer (`ingest`): device
//! messages and presence going in; receipts, commands, chunks and kicks coming out. Both sides
//! name these types and neither names the other's, so the broker knows nothing of storage and
//! the writer nothing of sockets or rumqttd.
//!
//! Invariants:
//! - Everything one session tells the writer (its presence, its messages, its will, its
//!   refusal counts) goes through the one bounded writer queue, in the order the session sent
//!   it. A session's "offline" therefore always comes after its last message, and the next
//!   session of the same device (which starts only after the previous one has ended) comes
//!   after that.
//! - A message's [`Receipts`] say "committed" only after the transaction holding it has
//!   committed; a session acknowledges a QoS 1/2 publish only then (unless the operator chose
//!   acknowledgement on receipt, `ingest.ack = "receipt"`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use fleetgate_protocol::{Downlink, Encoding, FeatureBins, InputSample, Telemetry, Uplink};

/// The writer's queue of device messages and presence (bounded by `ingest.queue`).
pub type WriterTx = flume::Sender<WriterMsg>;

/// Each queued message also holds this many bytes of the queue's byte budget beyond its
/// payload and device id (its share of the queue entry, the message struct, the receipt).
const MESSAGE_OVERHEAD: usize = 160;

/// How sessions queue device messages for the writer: bounded in messages (`ingest.queue`)
/// and in bytes (`ingest.queue_bytes`), so that large messages cannot fill memory within the
/// message bound. A message holds its bytes until the writer has finished with it.
#[derive(Clone, Debug)]
pub struct Uplinks {
    tx: WriterTx,
    room: std::sync::Arc<tokio::sync::Semaphore>,
    max: usize,
}

/// Why a message could not be queued now.
#[derive(Debug)]
pub enum QueueError {
    /// No room (in messages or bytes): wait with [`Uplinks::send`].
    Full(Box<UplinkMsg>),
    /// The writer is gone.
    Closed,
}

impl Uplinks {
    pub fn new(tx: WriterTx, bytes: usize) -> Uplinks {
        let max = bytes.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Uplinks {
            tx,
            room: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
            max,
        }
    }

    /// The writer's queue, for what is not a device message (presence, counts, markers).
    pub fn writer(&self) -> &WriterTx {
        &self.tx
    }

    /// Bytes of the budget taken by queued messages now.
    pub fn bytes_used(&self) -> usize {
        self.max - self.room.available_permits()
    }

    fn cost(&self, m: &UplinkMsg) -> u32 {
        let decoded = m.telemetry.as_deref().map_or(0, decoded_bytes);
        let bytes = m.payload.len() + m.device.len() + MESSAGE_OVERHEAD + decoded;
        // A message larger than the whole budget waits for all of it.
        bytes.min(self.max) as u32
    }

    /// Queues `m` if there is room now.
    pub fn try_send(&self, mut m: UplinkMsg) -> Result<(), QueueError> {
        if self.tx.is_disconnected() {
            return Err(QueueError::Closed);
        }
        let Ok(permit) = self.room.clone().try_acquire_many_owned(self.cost(&m)) else {
            return Err(QueueError::Full(Box::new(m)));
        };
        m.room = Some(permit);
        match self.tx.try_send(WriterMsg::Uplink(m)) {
            Ok(()) => Ok(()),
            Err(flume::TrySendError::Full(WriterMsg::Uplink(mut m))) => {
                m.room = None;
                Err(QueueError::Full(Box::new(m)))
            }
            Err(_) => Err(QueueError::Closed),
        }
    }

    /// Queues `m`, waiting for room.
    pub async fn send(&self, mut m: UplinkMsg) -> Result<(), QueueError> {
        let cost = self.cost(&m);
        let permit = self
            .room
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(|_| QueueError::Closed)?;
        m.room = Some(permit);
        self.tx
            .send_async(WriterMsg::Uplink(m))
            .await
            .map_err(|_| QueueError::Closed)
    }
}

/// Memory a decoded telemetry message holds, its heap included.
pub fn decoded_bytes(t: &Telemetry) -> usize {
    use std::mem::size_of;
    let model = t.model.as_ref().map_or(0, |m| {
        m.name.capacity()
            + m.version.pre.len()
            + m.version.build.len()
            + m.class_counts.capacity() * size_of::<u32>()
    });
    let samples = t.samples.capacity() * size_of::<InputSample>()
        + t.samples
            .iter()
            .map(|s| s.values.capacity() * size_of::<f32>())
            .sum::<usize>();
    let bins = t.bins.capacity() * size_of::<FeatureBins>()
        + t.bins
            .iter()
            .map(|b| b.counts.capacity() * size_of::<u32>())
            .sum::<usize>();
    size_of::<Telemetry>() + model + samples + bins
}

/// What sessions send the writer.
#[derive(Debug)]
pub enum WriterMsg {
    Uplink(UplinkMsg),
    Presence(PresenceEvent),
    /// The session refused `count` packets of this device since it last said so (counted per
    /// device; the global counts are in the metrics already). Sent only when no message of the
    /// device carried the count for a while (see [`UplinkMsg::rejected`]).
    Rejected {
        device: String,
        count: u64,
    },
    /// Flush marker `n`: everything queued before it has been taken by the writer once it
    /// arrives, and is committed once the batch holding it commits.
    FlushMarker(u64),
}

/// A message a device published, as its session queued it.
#[derive(Debug)]
pub struct UplinkMsg {
    pub device: String,
    /// The session that received it (see [`PresenceEvent::session`]).
    pub session: u64,
    pub channel: Uplink,
    pub encoding: Encoding,
    /// The payload as published; empty once the session has decoded it (`telemetry`).
    pub payload: Bytes,
    /// A telemetry payload the session decoded and found within the protocol's bounds, so
    /// that the writer, the one thread every message passes, does not spend its time on it.
    /// `None` for other channels, and for a payload that did not decode (the writer decodes
    /// it again and refuses it with its reason).
    pub telemetry: Option<Box<Telemetry>>,
    pub received_us: u64,
    /// Where to report what became of the message, and its number in its session: `None` for
    /// messages nobody waits for (a will).
    pub receipt: Option<(std::sync::Arc<Receipts>, u64)>,
    /// The queue bytes the message holds (see [`Uplinks`]); given back when it is dropped.
    pub room: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Packets of this device the session refused since its last message (counted per
    /// device along with this one, so refusals cost the writer's queue nothing of their own).
    pub rejected: u64,
}

/// A device's connection started or ended.
#[derive(Debug)]
pub struct PresenceEvent {
    pub device: String,
    /// The connection's epoch: unique and increasing within a gateway process. A replaced
    /// session's late events (its "offline", its hello) must not touch the new one.
    pub session: u64,
    pub online: bool,
    pub at_ms: u64,
    pub protocol: u8,
    pub peer: String,
    pub reason: Option<&'static str>,
}

/// Why the writer refused a device's message (it is counted and logged by the writer; the
/// device learns the reason through its v5 PUBACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not decodable, or decoded but outside the protocol's bounds.
    Invalid,
    /// It names something the gateway does not know (a transfer, a command).
    Unknown,
    /// The device's enrollment is gone.
    NotAuthorized,
}

/// The writer's answers to one session: how far its messages are committed, which of them
/// were refused, and whether a commit holding some of them failed.
///
/// Message numbers start at 1 and increase by one per message the session queues; the writer
/// takes a session's messages in that order and commits them in that order, so "committed up
/// to n" covers every message numbered n or lower.
#[derive(Debug, Default)]
pub struct Receipts {
    committed: AtomicU64,
    /// Refused messages not yet collected by the session, in increasing number. Written before
    /// the batch commits, so they are in place when `committed` passes them.
    refused: Mutex<Vec<(u64, Refusal)>>,
    failed: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Receipts {
    /// Writer: message `n` was refused (it still counts as handled once its batch commits).
    pub fn refuse(&self, n: u64, why: Refusal) {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((n, why));
    }

    /// Writer: every message up to `n` is committed.
    pub fn committed(&self, n: u64) {
        self.committed.fetch_max(n, Ordering::Release);
        self.changed.notify_one();
    }

    /// Writer: a batch holding messages of this session failed to commit. The session must
    /// not acknowledge anything more; it disconnects the device, which sends again what was
    /// not acknowledged.
    pub fn failed(&self) {
        self.failed.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Session: the highest message number committed.
    pub fn upto(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Session: takes the refusals of messages numbered up to `n`.
    pub fn take_refused(&self, n: u64, into: &mut std::collections::VecDeque<(u64, Refusal)>) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let split = refused.partition_point(|(m, _)| *m <= n);
        into.extend(refused.drain(..split));
    }

    /// Session: waits until the writer has said something new.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Why the gateway ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// The same device connected again.
    TakenOver,
    /// The device's enrollment was revoked (or its credential rotated).
    Revoked,
    ShuttingDown,
}

/// A message for a device's session to write: commands the dispatcher took from the router
/// (QoS 1), and bulk update chunks the writer sends straight there (QoS 0: the update
/// protocol's acknowledgements make their delivery reliable, and they would otherwise sit in
/// the router's log).
#[derive(Debug)]
pub struct Direct {
    pub channel: Downlink,
    pub encoding: Encoding,
    pub payload: Bytes,
    /// The highest QoS to deliver it with (the device's subscription may lower it).
    pub qos: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DirectError {
    #[error("device is not connected")]
    NotConnected,
    #[error("device's session queue is full")]
    Full,
}

/// The device sessions, as the writer sees them: something to hand messages to and to end.
pub trait Links: Send + Sync + std::fmt::Debug {
    /// Queues a message for `device`'s session without blocking.
    fn send_direct(&self, device: &str, msg: Direct) -> Result<(), DirectError>;
    /// Ends `device`'s session, if it has one.
    fn kick(&self, device: &str, why: Kick) -> bool;
}

/// Sends gateway -> device messages (commands) through the broker. Cloneable; usable from any
/// thread.
#[derive(Clone, Debug)]
pub struct DownlinkTx {
    tx: flume::Sender<Downlinked>,
}

/// A message for one device's downlink channel.
#[derive(Debug)]
pub struct Downlinked {
    pub device: String,
    pub channel: Downlink,
    pub encoding: Encoding,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
#[error("the broker's queue has stopped")]
pub struct DownlinkClosed;

impl DownlinkTx {
    /// A downlink queue of `capacity` messages and its receiving end (the broker's, or a test's).
    pub fn bounded(capacity: usize) -> (DownlinkTx, flume::Receiver<Downlinked>) {
        let (tx, rx) = flume::bounded(capacity);
        (DownlinkTx { tx }, rx)
    }

    /// Same as [`DownlinkTx::bounded`]; the name tests use for a downlink no broker reads.
    #[doc(hidden)]
    pub fn detached(capacity: usize) -> (DownlinkTx, flume::Receiver<Downlinked>) {
        DownlinkTx::bounded(capacity)
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
        self.tx
            .send(Downlinked {
                device: device.to_owned(),
                channel,
                encoding,
                payload: payload.into(),
            })
            .map_err(|_| DownlinkClosed)
    }

    pub async fn send_async(
        &self,
        device: &str,
        channel: Downlink,
        encoding: Encoding,
        payload: Vec<u8>,
    ) -> Result<(), DownlinkClosed> {
        self.tx
            .send_async(Downlinked {
                device: device.to_owned(),
                channel,
                encoding,
                payload: payload.into(),
            })
            .await
            .map_err(|_| DownlinkClosed)
    }
}

#[cfg(test)]
mod tests;
