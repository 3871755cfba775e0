//! One established device session: reads the device's packets, checks every topic against the
//! policy, hands what the device may publish to the storage writer, answers the device's
//! subscriptions itself, and writes what the gateway sends the device.
//!
//! Invariants:
//! - Every topic a device publishes or subscribes to passes `policy` before anything else sees
//!   it; refusals are answered (v5 reason codes, v3.1.1 acknowledgements) and counted, and the
//!   connection stays up.
//! - Every publish first takes a token from the device's bucket (`limits.device_*`), refused
//!   ones included. A device over its rate is slowed, never refused: the session holds the
//!   publish, reads nothing more until the bucket has a token, then goes on. The bucket
//!   outlives the session (see `Front::parked`).
//! - A publish then passes the topic policy and its channel's size limit
//!   (`limits.max_message_bytes`); a refused one is answered (v5 PUBACK 0x87, 0x83) and counted
//!   by reason and per device.
//! - An accepted publish goes to the writer's bounded queue (telemetry that decodes within the
//!   protocol's bounds goes decoded, see `predecode`). A QoS 1 PUBACK (QoS 2 PUBREC) is
//!   written only once the writer has committed the message (`bus::Receipts`), with the
//!   writer's verdict as its v5 reason code, and in the order the publishes arrived. With
//!   `ingest.ack = "receipt"` it is written once the message is in the writer's queue.
//! - The session never buffers without bound: it stops reading its socket while
//!   `mqtt.max_inflight` publishes wait for their acknowledgement, while the writer's queue is
//!   full, or while a publish waits for a token. TCP flow control then slows the device.
//! - A kick ends the session within seconds whatever the device does: every write is raced
//!   against the kick and bounded by [`WRITE_TIMEOUT`], and the close by [`CLOSE_TIMEOUT`].
//! - The session reads and writes any byte stream: plain TCP and TLS share all of this.
//! - The device's subscriptions live in its session only: a reconnect starts without any.
//! - MQTT 3.1.1 devices never receive v5-only packets or properties (rumqttd's v4 encoder
//!   panics on them).

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fleetgate_config::MaxMessageBytes;
use fleetgate_protocol::{Channel, Downlink, Encoding, Telemetry, Uplink, topic};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PingResp, Protocol, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck,
    UnsubAckReason,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::front::{Claim, Front};
use super::limit::{Rate, TokenBucket};
use super::policy;
use crate::bus::{
    Direct, Kick, QueueError, Receipts, Refusal, UplinkMsg, Uplinks, WriterMsg, WriterTx,
};
use crate::clock::now_us;
use crate::metrics::{Metrics, Reject};

/// Decodes a telemetry payload here, in the session, rather than in the writer, which every
/// message passes one at a time: what decodes and passes the protocol's bounds goes on decoded
/// (and its bytes are let go); anything else goes on as it came, for the writer to decode and
/// refuse with its reason.
fn predecode(
    channel: Uplink,
    encoding: Encoding,
    payload: Bytes,
) -> (Bytes, Option<Box<Telemetry>>) {
    if channel != Uplink::Telemetry {
        return (payload, None);
    }
    match fleetgate_protocol::decode::<Telemetry>(&payload, encoding) {
        Ok(t) => (Bytes::new(), Some(Box::new(t))),
        Err(_) => (payload, None),
    }
}

/// A device that does not read what it is sent for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// What an ending session still writes (its last acknowledgements, a DISCONNECT) and the close
/// itself (a TLS close_notify) get this long each.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// At shutdown, how long a session keeps waiting for the commit of what the device sent, so
/// that it can still acknowledge it.
const SHUTDOWN_ACKS: Duration = Duration::from_secs(2);
/// Per-device refusal counts ride on the device's next message; without one they reach the
/// writer on their own after this long (they are in the metrics at once).
const REJECTS_EVERY: Duration = Duration::from_secs(1);
/// QoS 1 messages to a device not yet acknowledged by it; beyond this, new ones are dropped
/// (and counted): the device is not reading.
const MAX_INFLIGHT: usize = 256;

/// A device's connection: plain TCP, or TLS over it.
pub(crate) trait DeviceStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> DeviceStream for T {}

/// Writes all of `bytes` and flushes them (a TLS stream holds them back until flushed).
pub(crate) async fn send<S: DeviceStream>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Writes `buf` out, taking from its front what each write took, then flushes. Cancelled (a
/// kick, a timeout), `buf` holds exactly the bytes still to go, so whatever is written later
/// continues the same packet instead of repeating its start.
async fn write_out<S: DeviceStream>(stream: &mut S, buf: &mut BytesMut) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = stream.write(buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf.advance(n);
    }
    stream.flush().await
}

/// A device's will, checked at CONNECT: sent to the writer if the session ends without a clean
/// DISCONNECT.
#[derive(Debug)]
pub(crate) struct Will {
    pub channel: Uplink,
    pub encoding: Encoding,
    pub payload: Bytes,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// DISCONNECT from the device (v5 may ask for the will to be sent anyway).
    Disconnected {
        send_will: bool,
    },
    /// The socket closed without DISCONNECT.
    Closed,
    KeepAlive,
    WriteTimeout,
    Oversized,
    Malformed,
    ProtocolViolation,
    Kicked(Kick),
    /// A batch holding some of the device's messages failed to commit: they were never
    /// acknowledged, and the device sends them again after it reconnects.
    StorageFailed,
    /// The storage writer's queue closed: the gateway is stopping (or its writer died).
    WriterGone,
}

impl End {
    pub fn describe(self) -> &'static str {
        match self {
            End::Disconnected { .. } => "disconnect",
            End::Closed => "connection closed",
            End::KeepAlive => "keep alive timeout",
            End::WriteTimeout => "device stopped reading",
            End::Oversized => "packet too large",
            End::Malformed => "malformed packet",
            End::ProtocolViolation => "protocol violation",
            End::Kicked(Kick::TakenOver) => "replaced by a new connection",
            End::Kicked(Kick::Revoked) => "enrollment revoked",
            End::Kicked(Kick::ShuttingDown) => "gateway shutting down",
            End::StorageFailed => "storage failed",
            End::WriterGone => "storage writer stopped",
        }
    }

    fn sends_will(self) -> bool {
        match self {
            End::Disconnected { send_will } => send_will,
            End::WriterGone => false,
            _ => true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("packet of {0} bytes is over the limit")]
    Oversized(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// The outcome of parsing the front of the read buffer.
#[expect(
    clippy::large_enum_variant,
    reason = "lives on the stack for one call, never stored"
)]
pub(super) enum Parsed {
    Packet(Packet, Option<(u8, u16)>),
    NeedMore,
    Oversized(usize),
    Malformed(String),
    /// A packet type only a server may send (or a reserved one): a protocol violation.
    Forbidden(&'static str),
}

/// Parses one packet from `buf`. A packet whose fixed header announces more than `max` bytes is
/// refused as soon as the header is in, without waiting for the rest. rumqttd's decoder is
/// third-party code fed with hostile bytes: a panic in it is treated as a malformed packet
/// rather than taking the task down (and is not printed: see [`quiet_panics`]).
pub(super) fn next_packet<P: Protocol>(proto: &mut P, buf: &mut BytesMut, max: usize) -> Parsed {
    if buf.is_empty() {
        return Parsed::NeedMore;
    }
    if let Some(announced) = announced_len(buf)
        && announced > max
    {
        return Parsed::Oversized(announced);
    }
    // Server-only packets never reach rumqttd's decoder (its MQTT 5 decoder panics on some).
    match buf[0] >> 4 {
        0 => return Parsed::Forbidden("reserved packet type 0"),
        2 => return Parsed::Forbidden("CONNACK"),
        9 => return Parsed::Forbidden("SUBACK"),
        11 => return Parsed::Forbidden("UNSUBACK"),
        13 => return Parsed::Forbidden("PINGRESP"),
        _ => {}
    }
    let peek = peek_publish(buf);
    match guarded(|| proto.read_mut(buf, max)) {
        Ok(Ok(packet)) => Parsed::Packet(packet, peek),
        Ok(Err(rumqttd::protocol::Error::InsufficientBytes(_))) => Parsed::NeedMore,
        Ok(Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(n))) => Parsed::Oversized(n),
        Ok(Err(e)) => Parsed::Malformed(e.to_string()),
        Err(()) => Parsed::Malformed("decoder panicked".to_owned()),
    }
}

/// The size of the packet at the front of `buf` as its fixed header announces it (header
/// included), once the header is complete.
pub(crate) fn announced_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(1 + i + 1 + len);
        }
    }
    // A fifth length byte is malformed; the decoder says so.
    None
}

std::thread_local! {
    /// Set while rumqttd's codec runs on this thread under [`guarded`].
    static IN_CODEC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs rumqttd's codec, turning a panic into `Err`. The panic is not printed: hostile bytes
/// can make it panic at will, and each one is already counted as a malformed packet.
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    quiet_panics();
    IN_CODEC.set(true);
    let out = std::panic::catch_unwind(AssertUnwindSafe(f));
    IN_CODEC.set(false);
    out.map_err(|_| ())
}

/// Installs (once) a panic hook that stays silent for panics inside [`guarded`] and hands every
/// other panic to the hook that was there before.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_CODEC.get() {
                previous(info);
            }
        }));
    });
}

/// Parses every packet in `bytes` as MQTT 3.1.1 and as MQTT 5, the way a session does, and
/// returns how many packets each version found. For the fuzz target `mqtt_packets`.
pub(crate) fn parse_all(bytes: &[u8], max: usize) -> (usize, usize) {
    fn count<P: Protocol>(mut proto: P, bytes: &[u8], max: usize) -> usize {
        let mut buf = BytesMut::from(bytes);
        let mut n = 0;
        while let Parsed::Packet(..) = next_packet(&mut proto, &mut buf, max) {
            n += 1;
        }
        n
    }
    (
        count(rumqttd::protocol::v4::V4, bytes, max),
        count(rumqttd::protocol::v5::V5, bytes, max),
    )
}

/// Reads one whole packet (used for CONNECT, before the session loop).
pub(crate) async fn read_packet<P: Protocol, S: AsyncRead + Unpin>(
    proto: &mut P,
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Packet, ReadError> {
    loop {
        match next_packet(proto, buf, max) {
            Parsed::Packet(p, _) => return Ok(p),
            Parsed::Oversized(n) => return Err(ReadError::Oversized(n)),
            Parsed::Forbidden(what) => {
                return Err(ReadError::Malformed(format!("{what} from a client")));
            }
            Parsed::Malformed(e) => return Err(ReadError::Malformed(e)),
            Parsed::NeedMore => {
                if stream.read_buf(buf).await? == 0 {
                    return Err(ReadError::Closed);
                }
            }
        }
    }
}

/// QoS and packet id of a PUBLISH at the front of `buf`. rumqttd's `Publish` keeps both
/// private, but the front needs them to answer a refused publish itself.
pub(crate) fn peek_publish(buf: &[u8]) -> Option<(u8, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    if qos == 0 {
        return Some((0, 0));
    }
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    let at = i + 2 + topic_len;
    Some((qos, u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?])))
}

/// A QoS 1/2 publish waiting for its acknowledgement.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Acknowledged once the writer has committed (or, on receipt, queued) every message up
    /// to this number.
    n: u64,
    qos: u8,
    pkid: u16,
    /// Refused by the session itself.
    refused: Option<PubAckReason>,
}

/// A publish waiting for a token from the device's bucket.
#[derive(Debug)]
struct Held {
    publish: Publish,
    qos: u8,
    pkid: u16,
    until: Instant,
}

/// A message waiting for room in the writer's queue, and its number.
type Stalled = (
    Pin<Box<dyn Future<Output = Result<(), QueueError>> + Send>>,
    u64,
);

pub(crate) struct Session<P, S> {
    proto: P,
    v5: bool,
    device: String,
    /// This connection's epoch (see `bus::PresenceEvent::session`).
    epoch: u64,
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    will: Option<Will>,
    keep_alive: Duration,
    max_packet: usize,
    max_message: MaxMessageBytes,
    /// The device's publishes: taken over from its last session, handed back at the end.
    rate: Rate,
    bucket: TokenBucket,
    metrics: Arc<Metrics>,
    uplinks: Uplinks,
    writer: WriterTx,
    /// QoS 2 packet ids received and not yet released by the device's PUBREL: a repeat of one
    /// is acknowledged again but not delivered again.
    qos2: HashSet<u16>,
    /// Messages for this device (see `Direct`), and what it subscribed to: channel, encoding and
    /// the QoS granted.
    direct: mpsc::Receiver<Direct>,
    subs: Vec<(Downlink, Encoding, u8)>,
    /// Packet ids of QoS 1 messages sent to the device and not yet acknowledged.
    inflight: HashSet<u16>,
    next_pkid: u16,

    // Uplink flow: see the module's invariants.
    receipts: Arc<Receipts>,
    ack_after_commit: bool,
    /// Number of the last message handed to the writer, and of the last one in its queue.
    sent: u64,
    queued: u64,
    pending: VecDeque<Pending>,
    max_pending: usize,
    /// Refusals the writer reported, not yet matched with their pending publish.
    refused: VecDeque<(u64, Refusal)>,
    held: Option<Held>,
    stalled: Option<Stalled>,
    /// Refusals not yet reported to the writer (the next message carries them), and since when
    /// (after [`REJECTS_EVERY`] without a message they are sent on their own).
    unreported: u64,
    reported_at: Instant,
    /// Kicked for shutdown: acknowledging what gets committed until then, reading nothing.
    closing: Option<Instant>,
}

/// What woke the session up.
enum Wake {
    Kicked,
    Closed,
    KeepAlive,
    Read(std::io::Result<usize>),
    Receipts,
    Queued(Result<(), QueueError>),
    Token,
    ReportRejects,
    Direct(Direct),
}

enum Step {
    Continue,
    End(End),
}

impl<P: Protocol + Send, S: DeviceStream> Session<P, S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        proto: P,
        v5: bool,
        device: String,
        epoch: u64,
        stream: S,
        rbuf: BytesMut,
        will: Option<Will>,
        keep_alive: Duration,
        direct: mpsc::Receiver<Direct>,
        bucket: TokenBucket,
        front: &Front,
    ) -> Self {
        Session {
            proto,
            v5,
            device,
            epoch,
            stream,
            rbuf,
            wbuf: BytesMut::new(),
            will,
            keep_alive,
            max_packet: front.max_packet,
            max_message: front.max_message.clone(),
            rate: front.device_rate,
            bucket,
            metrics: front.metrics.clone(),
            uplinks: front.uplinks.clone(),
            writer: front.uplinks.writer().clone(),
            qos2: HashSet::new(),
            direct,
            subs: Vec::new(),
            inflight: HashSet::new(),
            next_pkid: 1,
            receipts: Arc::new(Receipts::default()),
            ack_after_commit: front.ack_after_commit,
            sent: 0,
            queued: 0,
            pending: VecDeque::new(),
            max_pending: usize::from(front.max_inflight.max(1)),
            refused: VecDeque::new(),
            held: None,
            stalled: None,
            unreported: 0,
            reported_at: Instant::now(),
            closing: None,
        }
    }

    /// Runs the session to its end; returns why it ended and the device's message bucket.
    pub(crate) async fn run(mut self, claim: &Claim) -> (End, TokenBucket) {
        let end = self.pump(claim).await;
        let bucket = self.bucket;
        self.finish(end).await;
        (end, bucket)
    }

    /// Whether the next packet may be taken from the read buffer (and so more read).
    fn taking(&self) -> bool {
        self.held.is_none()
            && self.stalled.is_none()
            && self.pending.len() < self.max_pending
            && self.closing.is_none()
    }

    async fn pump(&mut self, claim: &Claim) -> End {
        let kick = &claim.kick;
        let idle = self.keep_alive + self.keep_alive / 2;
        let deadline = tokio::time::sleep(idle);
        tokio::pin!(deadline);
        // Packets that arrived together with the CONNECT.
        if let Step::End(end) = self.parse_packets() {
            return end;
        }
        let mut was_reading = true;
        loop {
            if let Err(end) = self.flush(claim).await {
                return end;
            }
            if self.closing.is_some() && self.pending.is_empty() && self.stalled.is_none() {
                return End::Kicked(Kick::ShuttingDown);
            }
            let reading = self.taking();
            if reading && !was_reading {
                // Time spent not reading (the gateway's choice) does not count against the
                // device's keep alive.
                deadline.as_mut().reset(Instant::now() + idle);
            }
            was_reading = reading;
            if self.rbuf.capacity() - self.rbuf.len() < 512 {
                self.rbuf.reserve(4096.min(self.max_packet + 8));
            }
            let wake = {
                let Session {
                    stream,
                    rbuf,
                    receipts,
                    stalled,
                    held,
                    direct,
                    pending,
                    unreported,
                    reported_at,
                    closing,
                    sent,
                    ..
                } = &mut *self;
                // Receipts also tell of a failed commit, which ends the session in either
                // acknowledgement mode (see `release`).
                let waiting = !pending.is_empty() || *sent > 0;
                let token_at = held.as_ref().map(|h| h.until);
                let report_at = (*unreported > 0).then(|| *reported_at + REJECTS_EVERY);
                let closing_at = *closing;
                tokio::select! {
                    biased;
                    _ = kick.cancelled(), if closing_at.is_none() => Wake::Kicked,
                    _ = sleep_until(closing_at), if closing_at.is_some() => Wake::Closed,
                    _ = receipts.changed(), if waiting => Wake::Receipts,
                    q = queued(stalled), if stalled.is_some() => Wake::Queued(q),
                    _ = sleep_until(token_at), if token_at.is_some() => Wake::Token,
                    Some(msg) = direct.recv() => Wake::Direct(msg),
                    _ = &mut deadline, if reading => Wake::KeepAlive,
                    read = stream.read_buf(rbuf), if reading => Wake::Read(read),
                    _ = sleep_until(report_at), if report_at.is_some() => Wake::ReportRejects,
                }
            };
            let step = match wake {
                Wake::Kicked => {
                    let why = claim.reason.get().copied().unwrap_or(Kick::ShuttingDown);
                    if why == Kick::ShuttingDown && self.ack_after_commit {
                        // Acknowledge what is committed before the gateway stops, then close.
                        self.closing = Some(Instant::now() + SHUTDOWN_ACKS);
                        self.held = None;
                        Step::Continue
                    } else {
                        self.disconnect_device(kick_code(why));
                        Step::End(End::Kicked(why))
                    }
                }
                Wake::Closed => {
                    self.disconnect_device(kick_code(Kick::ShuttingDown));
                    Step::End(End::Kicked(Kick::ShuttingDown))
                }
                Wake::KeepAlive => {
                    self.disconnect_device(DisconnectReasonCode::KeepAliveTimeout);
                    Step::End(End::KeepAlive)
                }
                Wake::Read(Ok(0) | Err(_)) => Step::End(End::Closed),
                Wake::Read(Ok(_)) => {
                    deadline.as_mut().reset(Instant::now() + idle);
                    Step::Continue
                }
                Wake::Receipts => Step::Continue,
                Wake::Queued(Ok(())) => {
                    if let Some((_, n)) = self.stalled.take() {
                        self.queued = n;
                    }
                    Step::Continue
                }
                Wake::Queued(Err(_)) => Step::End(End::WriterGone),
                Wake::Token => self.resume_held(),
                Wake::ReportRejects => {
                    self.report_rejects();
                    Step::Continue
                }
                Wake::Direct(msg) => {
                    self.on_direct(msg);
                    while let Ok(msg) = self.direct.try_recv() {
                        self.on_direct(msg);
                    }
                    Step::Continue
                }
            };
            if let Step::End(end) = step {
                return end;
            }
            if let Err(end) = self.release() {
                self.disconnect_device(DisconnectReasonCode::UnspecifiedError);
                return end;
            }
            // Take what is read already before reading again: the next read may be the end
            // of the stream, which must not pass over packets before it. Acknowledging a
            // publish refused here (nothing to wait for) can make room for the next one.
            loop {
                if let Step::End(end) = self.parse_packets() {
                    return end;
                }
                let full = !self.taking();
                if let Err(end) = self.release() {
                    self.disconnect_device(DisconnectReasonCode::UnspecifiedError);
                    return end;
                }
                if !(full && self.taking()) {
                    break;
                }
            }
        }
    }

    fn parse_packets(&mut self) -> Step {
        while self.taking() {
            match next_packet(&mut self.proto, &mut self.rbuf, self.max_packet) {
                Parsed::NeedMore => return Step::Continue,
                Parsed::Packet(packet, peek) => {
                    if let Step::End(end) = self.on_device_packet(packet, peek) {
                        return Step::End(end);
                    }
                }
                Parsed::Oversized(n) => {
                    self.reject(Reject::Oversized, &format!("{n} bytes"));
                    self.disconnect_device(DisconnectReasonCode::PacketTooLarge);
                    return Step::End(End::Oversized);
                }
                Parsed::Malformed(e) => {
                    self.reject(Reject::Malformed, &e);
                    self.disconnect_device(DisconnectReasonCode::MalformedPacket);
                    return Step::End(End::Malformed);
                }
                Parsed::Forbidden(what) => {
                    self.reject(Reject::ProtocolViolation, &format!("{what} from a client"));
                    self.disconnect_device(DisconnectReasonCode::ProtocolError);
                    return Step::End(End::ProtocolViolation);
                }
            }
        }
        Step::Continue
    }

    fn on_device_packet(&mut self, packet: Packet, peek: Option<(u8, u16)>) -> Step {
        match packet {
            Packet::Publish(publish, _props) => {
                let (qos, pkid) = peek.unwrap_or((0, 0));
                self.publish(publish, qos, pkid)
            }
            Packet::Subscribe(sub, _props) => {
                let mut codes = Vec::with_capacity(sub.filters.len());
                for filter in sub.filters {
                    match policy::subscribe(&self.device, &filter.path) {
                        Ok(s) => {
                            // Commands go at QoS 1 at most; chunks at QoS 0 (see `Direct`).
                            let most = if s.channel == Downlink::Chunk { 0 } else { 1 };
                            let qos = (filter.qos as u8).min(most);
                            self.subs
                                .retain(|(c, e, _)| (*c, *e) != (s.channel, s.encoding));
                            self.subs.push((s.channel, s.encoding, qos));
                            codes.push(SubscribeReasonCode::Success(if qos == 0 {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            }));
                        }
                        Err(denied) => {
                            self.refused_topic(denied, &filter.path);
                            codes.push(self.refused_suback_code());
                        }
                    }
                }
                self.write(Packet::SubAck(
                    SubAck {
                        pkid: sub.pkid,
                        return_codes: codes,
                    },
                    None,
                ));
                Step::Continue
            }
            Packet::Unsubscribe(unsub, _props) => {
                let reasons = unsub
                    .filters
                    .iter()
                    .map(|filter| match policy::subscribe(&self.device, filter) {
                        Ok(s) => {
                            let had = self
                                .subs
                                .iter()
                                .any(|(c, e, _)| (*c, *e) == (s.channel, s.encoding));
                            self.subs
                                .retain(|(c, e, _)| (*c, *e) != (s.channel, s.encoding));
                            if had {
                                UnsubAckReason::Success
                            } else {
                                UnsubAckReason::NoSubscriptionExisted
                            }
                        }
                        Err(_) => UnsubAckReason::NoSubscriptionExisted,
                    })
                    .collect();
                self.write(Packet::UnsubAck(
                    UnsubAck {
                        pkid: unsub.pkid,
                        reasons,
                    },
                    None,
                ));
                Step::Continue
            }
            Packet::PubRel(rel, _) => {
                let reason = if self.qos2.remove(&rel.pkid) || !self.v5 {
                    PubCompReason::Success
                } else {
                    PubCompReason::PacketIdentifierNotFound
                };
                let comp = PubComp {
                    pkid: rel.pkid,
                    reason,
                };
                self.write(Packet::PubComp(comp, None));
                Step::Continue
            }
            Packet::PubAck(ack, _) => {
                self.inflight.remove(&ack.pkid);
                Step::Continue
            }
            // The gateway never sends QoS 2: nothing to answer.
            Packet::PubRec(..) | Packet::PubComp(..) => Step::Continue,
            Packet::PingReq(_) => {
                self.write(Packet::PingResp(PingResp));
                Step::Continue
            }
            Packet::Disconnect(d, _) => {
                let send_will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                Step::End(End::Disconnected { send_will })
            }
            other => {
                // A second CONNECT, or a packet only a server may send.
                let what = format!("{:?} from a client", packet_kind(&other));
                self.reject(Reject::ProtocolViolation, &what);
                self.disconnect_device(DisconnectReasonCode::ProtocolError);
                Step::End(End::ProtocolViolation)
            }
        }
    }

    fn publish(&mut self, publish: Publish, qos: u8, pkid: u16) -> Step {
        // A QoS 2 repeat (the device did not see our PUBREC) is not delivered again and was
        // counted against the rate the first time; it is answered once the first one is.
        if qos == 2 && self.qos2.contains(&pkid) {
            self.pending.push_back(Pending {
                n: self.sent,
                qos,
                pkid,
                refused: None,
            });
            return Step::Continue;
        }
        let now = Instant::now();
        if !self.bucket.try_take(self.rate, now.into_std()) {
            let wait = self.bucket.until_token(self.rate, now.into_std());
            self.metrics.publishes_delayed.inc();
            self.held = Some(Held {
                publish,
                qos,
                pkid,
                until: now + wait,
            });
            return Step::Continue;
        }
        self.admit(publish, qos, pkid)
    }

    /// The held publish's token is due.
    fn resume_held(&mut self) -> Step {
        let Some(held) = self.held.take() else {
            return Step::Continue;
        };
        let now = Instant::now();
        if !self.bucket.try_take(self.rate, now.into_std()) {
            // Woken a hair early (rounding): wait for the rest.
            let wait = self.bucket.until_token(self.rate, now.into_std());
            self.held = Some(Held {
                until: now + wait,
                ..held
            });
            return Step::Continue;
        }
        self.admit(held.publish, held.qos, held.pkid)
    }

    /// A publish with its token: checked, then queued for the writer (or refused).
    fn admit(&mut self, publish: Publish, qos: u8, pkid: u16) -> Step {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let (channel, encoding) = match policy::uplink(&self.device, &topic) {
            Ok(allowed) => allowed,
            Err(denied) => {
                self.refused_topic(denied, &topic);
                self.refuse_publish(qos, pkid, PubAckReason::NotAuthorized);
                return Step::Continue;
            }
        };
        let limit = self.max_message.of(channel);
        let size = publish.payload.len();
        if size > limit {
            let detail = format!("{topic}: {size} bytes, over {limit}");
            self.reject(Reject::TooLarge, &detail);
            // No v5 PUBACK code says "too large" (0x95 exists for DISCONNECT only).
            self.refuse_publish(qos, pkid, PubAckReason::ImplementationSpecificError);
            return Step::Continue;
        }
        if qos == 2 {
            self.qos2.insert(pkid);
        }
        let n = self.sent + 1;
        self.sent = n;
        let (payload, telemetry) = predecode(channel, encoding, publish.payload);
        let msg = UplinkMsg {
            device: self.device.clone(),
            session: self.epoch,
            channel,
            encoding,
            payload,
            telemetry,
            received_us: now_us(),
            receipt: Some((self.receipts.clone(), n)),
            room: None,
            rejected: std::mem::take(&mut self.unreported),
        };
        match self.uplinks.try_send(msg) {
            Ok(()) => self.queued = n,
            Err(QueueError::Full(msg)) => {
                self.metrics.writer_queue_full.inc();
                let uplinks = self.uplinks.clone();
                self.stalled = Some((Box::pin(async move { uplinks.send(*msg).await }), n));
            }
            Err(QueueError::Closed) => return Step::End(End::WriterGone),
        }
        if qos > 0 {
            self.pending.push_back(Pending {
                n,
                qos,
                pkid,
                refused: None,
            });
        }
        Step::Continue
    }

    /// Answers a refused publish, in its turn. v5 can say no; v3.1.1 cannot, and must
    /// acknowledge or disconnect. Acknowledging keeps a misconfigured stock client from
    /// reconnecting in a loop.
    fn refuse_publish(&mut self, qos: u8, pkid: u16, reason: PubAckReason) {
        if qos == 0 {
            return;
        }
        if qos == 2 && !self.v5 {
            // Its PUBREL must find the id, like an accepted one's.
            self.qos2.insert(pkid);
        }
        self.pending.push_back(Pending {
            n: self.sent,
            qos,
            pkid,
            refused: Some(reason),
        });
    }

    /// Writes the acknowledgements that are due, in order. Fails when the writer lost a batch
    /// of this session's messages.
    fn release(&mut self) -> Result<(), End> {
        // A failed commit ends the session even when it held only QoS 0 messages (none of
        // them waits for an acknowledgement): the device is disconnected now, not at its next
        // QoS 1 publish. So it does with `ingest.ack = "receipt"`, where the batch's messages
        // were acknowledged already: the device learns that something is wrong, and goes on
        // over a fresh session once the writer has reloaded.
        if self.receipts.is_failed() {
            return Err(End::StorageFailed);
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let upto = if self.ack_after_commit {
            let upto = self.receipts.upto();
            self.receipts.take_refused(upto, &mut self.refused);
            upto
        } else {
            self.queued
        };
        while let Some(p) = self.pending.front().copied() {
            if p.n > upto {
                break;
            }
            self.pending.pop_front();
            let mut reason = p.refused.unwrap_or(PubAckReason::Success);
            while self.refused.front().is_some_and(|(n, _)| *n < p.n) {
                self.refused.pop_front();
            }
            if p.refused.is_none()
                && let Some(&(n, why)) = self.refused.front()
                && n == p.n
            {
                self.refused.pop_front();
                reason = match why {
                    Refusal::Invalid => PubAckReason::PayloadFormatInvalid,
                    Refusal::Unknown => PubAckReason::UnspecifiedError,
                    Refusal::NotAuthorized => PubAckReason::NotAuthorized,
                };
            }
            self.acknowledge(p.qos, p.pkid, reason);
        }
        Ok(())
    }

    fn acknowledge(&mut self, qos: u8, pkid: u16, reason: PubAckReason) {
        match qos {
            1 => self.write(Packet::PubAck(PubAck { pkid, reason }, None)),
            2 => {
                // The same code a QoS 1 publish gets (docs/protocol.md has one table for both).
                let reason = match reason {
                    PubAckReason::Success => PubRecReason::Success,
                    PubAckReason::NoMatchingSubscribers => PubRecReason::NoMatchingSubscribers,
                    PubAckReason::UnspecifiedError => PubRecReason::UnspecifiedError,
                    PubAckReason::ImplementationSpecificError => {
                        PubRecReason::ImplementationSpecificError
                    }
                    PubAckReason::NotAuthorized => PubRecReason::NotAuthorized,
                    PubAckReason::TopicNameInvalid => PubRecReason::TopicNameInvalid,
                    PubAckReason::PacketIdentifierInUse => PubRecReason::PacketIdentifierInUse,
                    PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
                    PubAckReason::PayloadFormatInvalid => PubRecReason::PayloadFormatInvalid,
                };
                if reason != PubRecReason::Success && self.v5 {
                    // A refused QoS 2 publish is over: no PUBREL follows a failure code.
                    self.qos2.remove(&pkid);
                }
                self.write(Packet::PubRec(PubRec { pkid, reason }, None));
            }
            _ => {}
        }
    }

    /// Counts a refusal of this device's (globally at once, per device through the writer).
    fn reject(&mut self, reason: Reject, detail: &dyn std::fmt::Display) {
        self.metrics.reject(reason, &self.device, detail);
        if self.unreported == 0 {
            self.reported_at = Instant::now();
        }
        self.unreported += 1;
    }

    fn refused_topic(&mut self, denied: policy::Denied, topic: &str) {
        let reason = match denied {
            policy::Denied::BadTopic(_) => Reject::BadTopic,
            policy::Denied::NotPermitted => Reject::NotPermitted,
        };
        self.reject(reason, &topic);
    }

    /// Tells the writer how many packets of this device were refused, without waiting.
    fn report_rejects(&mut self) {
        if self.unreported == 0 {
            return;
        }
        let msg = WriterMsg::Rejected {
            device: self.device.clone(),
            count: self.unreported,
        };
        // A full queue keeps the count for the next try: refusals never wait for the writer.
        if self.writer.try_send(msg).is_ok() {
            self.unreported = 0;
        }
        self.reported_at = Instant::now();
    }

    fn refused_suback_code(&self) -> SubscribeReasonCode {
        if self.v5 {
            SubscribeReasonCode::NotAuthorized
        } else {
            SubscribeReasonCode::Failure
        }
    }

    /// Writes a message for the device if it subscribed to its channel in its encoding, at the
    /// lower of the message's and the subscription's QoS.
    fn on_direct(&mut self, msg: Direct) {
        let Some(&(_, _, sub_qos)) = self
            .subs
            .iter()
            .find(|(c, e, _)| (*c, *e) == (msg.channel, msg.encoding))
        else {
            self.metrics.direct_dropped.inc();
            return;
        };
        let topic = topic::format(&self.device, Channel::Down(msg.channel), msg.encoding);
        if msg.qos.min(sub_qos) == 0 {
            self.write(Packet::Publish(
                Publish::new(Bytes::from(topic), msg.payload, false),
                None,
            ));
            return;
        }
        if self.inflight.len() >= MAX_INFLIGHT {
            self.metrics.direct_dropped.inc();
            return;
        }
        let pkid = self.take_pkid();
        write_qos1_publish(
            &mut self.wbuf,
            self.v5,
            topic.as_bytes(),
            pkid,
            &msg.payload,
        );
    }

    /// A packet id not in flight (they run 1..=65535).
    fn take_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if self.inflight.insert(pkid) {
                return pkid;
            }
        }
    }

    /// Encodes a packet for the device, in its protocol version.
    fn write(&mut self, packet: Packet) {
        let Some(packet) = (if self.v5 { Some(packet) } else { to_v4(packet) }) else {
            return;
        };
        let proto = &self.proto;
        let wbuf = &mut self.wbuf;
        let written = guarded(|| proto.write(packet, wbuf));
        if !matches!(written, Ok(Ok(_))) {
            tracing::error!(device = %self.device, "could not encode a packet for the device");
        }
    }

    /// v5 tells the device why it is being disconnected; v3.1.1 has no server DISCONNECT.
    fn disconnect_device(&mut self, reason_code: DisconnectReasonCode) {
        if self.v5 {
            self.write(Packet::Disconnect(Disconnect { reason_code }, None));
        }
    }

    /// Writes what is buffered. A device that stops reading is cut off after
    /// [`WRITE_TIMEOUT`]; a kick (but the shutdown kick, which lets the last acknowledgements
    /// out) interrupts the wait at once.
    async fn flush(&mut self, claim: &Claim) -> Result<(), End> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let closing = self.closing.is_some();
        let write =
            tokio::time::timeout(WRITE_TIMEOUT, write_out(&mut self.stream, &mut self.wbuf));
        let written = tokio::select! {
            biased;
            _ = claim.kick.cancelled(), if !closing => {
                let why = claim.reason.get().copied().unwrap_or(Kick::TakenOver);
                return Err(End::Kicked(why));
            }
            w = write => w,
        };
        match written {
            Ok(Ok(())) => {
                if self.wbuf.capacity() > 64 * 1024 {
                    self.wbuf = BytesMut::new();
                }
                Ok(())
            }
            Ok(Err(_)) => Err(End::Closed),
            Err(_) => Err(End::WriteTimeout),
        }
    }

    async fn finish(mut self, end: End) {
        if !self.wbuf.is_empty() {
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                send(&mut self.stream, &std::mem::take(&mut self.wbuf)),
            )
            .await;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.stream.shutdown()).await;
        // A message waiting for room in the queue goes in before the will.
        if let Some((send, _)) = self.stalled.take() {
            let _ = send.await;
        }
        if end.sends_will()
            && let Some(will) = self.will.take()
        {
            // The will passed the policy at CONNECT; its size is checked now, like any
            // publish's. It does not count against the rate: there is one per session.
            if will.payload.len() > self.max_message.of(will.channel) {
                let detail = format!("will: {} bytes", will.payload.len());
                self.reject(Reject::TooLarge, &detail);
            } else {
                let msg = UplinkMsg {
                    device: self.device.clone(),
                    session: self.epoch,
                    channel: will.channel,
                    encoding: will.encoding,
                    payload: will.payload,
                    telemetry: None,
                    received_us: now_us(),
                    receipt: None,
                    room: None,
                    rejected: std::mem::take(&mut self.unreported),
                };
                let _ = self.uplinks.send(msg).await;
            }
        }
        if self.unreported > 0 {
            let msg = WriterMsg::Rejected {
                device: self.device.clone(),
                count: self.unreported,
            };
            let _ = self.writer.send_async(msg).await;
        }
    }
}

fn kick_code(why: Kick) -> DisconnectReasonCode {
    match why {
        Kick::TakenOver => DisconnectReasonCode::SessionTakenOver,
        Kick::Revoked => DisconnectReasonCode::NotAuthorized,
        Kick::ShuttingDown => DisconnectReasonCode::ServerShuttingDown,
    }
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits until the stalled message is in the writer's queue.
async fn queued(stalled: &mut Option<Stalled>) -> Result<(), QueueError> {
    match stalled {
        Some((send, _)) => send.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The name of a packet a client may not send, for the refusal's log line.
fn packet_kind(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(..) => "second CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::SubAck(..) => "SUBACK",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::PingResp(..) => "PINGRESP",
        _ => "packet",
    }
}

/// Encodes a QoS 1 PUBLISH (rumqttd's `Publish` keeps QoS and packet id private, so the gateway
/// writes its own): fixed header, topic, packet id, (v5: empty properties), payload.
fn write_qos1_publish(out: &mut BytesMut, v5: bool, topic: &[u8], pkid: u16, payload: &[u8]) {
    let len = 2 + topic.len() + 2 + usize::from(v5) + payload.len();
    out.reserve(5 + len);
    out.put_u8(0x32);
    let mut rest = len;
    loop {
        let mut byte = (rest % 128) as u8;
        rest /= 128;
        if rest > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if rest == 0 {
            break;
        }
    }
    out.put_u16(topic.len() as u16);
    out.put_slice(topic);
    out.put_u16(pkid);
    if v5 {
        out.put_u8(0);
    }
    out.put_slice(payload);
}

/// The v3.1.1 form of a packet: no properties, only v3.1.1 codes; `None` for packets v3.1.1
/// has no server form of (DISCONNECT).
fn to_v4(packet: Packet) -> Option<Packet> {
    Some(match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(mut p, _) => {
            p.reason = PubAckReason::Success;
            Packet::PubAck(p, None)
        }
        Packet::PubRec(mut p, _) => {
            p.reason = PubRecReason::Success;
            Packet::PubRec(p, None)
        }
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(mut s, _) => {
            for code in &mut s.return_codes {
                *code = match *code {
                    c @ (SubscribeReasonCode::QoS0
                    | SubscribeReasonCode::QoS1
                    | SubscribeReasonCode::QoS2
                    | SubscribeReasonCode::Success(_)) => c,
                    _ => SubscribeReasonCode::Failure,
                };
            }
            Packet::SubAck(s, None)
        }
        Packet::UnsubAck(u, _) => Packet::UnsubAck(u, None),
        Packet::ConnAck(c, _) => Packet::ConnAck(c, None),
        p @ (Packet::PingResp(_) | Packet::PingReq(_)) => p,
        Packet::Disconnect(..) => return None,
        other => other,
    })
}

#[cfg(test)]
mod tests;
