//! One established device session: reads the device's packets, checks every topic against the
//! policy, queues what the device may publish for the router, answers the device's
//! subscriptions itself, and writes what the gateway sends the device.
//!
//! Invariants:
//! - Every topic a device publishes or subscribes to passes `policy` before anything else sees
//!   it; refusals are answered (v5 reason codes, v3.1.1 acknowledgements) and counted, and the
//!   connection stays up.
//! - A publish passes, in this order, the topic policy, its channel's size limit
//!   (`limits.max_message_bytes`) and the device's token bucket (`limits.device_*`) before it is
//!   queued; a refused one is dropped, answered (v5 PUBACK 0x87, 0x83, 0x97) and counted by
//!   reason and per device. The bucket outlives the session (see `Front::parked`).
//! - The session reads and writes any byte stream: plain TCP and TLS share all of this.
//! - A QoS 1 publish is acknowledged once it is in the broker's uplink queue, behind every
//!   earlier message of every device; a flush marker queued later is seen by the storage
//!   writer after it. QoS 2 is delivered once per packet id until the device releases it.
//! - The device's subscriptions live in its session only: a reconnect starts without any.
//! - MQTT 3.1.1 devices never receive v5-only packets or properties (rumqttd's v4 encoder
//!   panics on them).

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use fleetgate_config::MaxMessageBytes;
use fleetgate_protocol::{Channel, Downlink, Encoding, Uplink, topic};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PingResp, Protocol, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck,
    UnsubAckReason,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::front::{Claim, Direct, Front, Kick};
use super::limit::{Rate, TokenBucket};
use super::{UplinkTx, policy};
use crate::ingest::{WriterMsg, WriterTx};
use crate::metrics::{Metrics, Reject};

/// A device that does not read what it is sent for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// The broker's uplink queue closed: the gateway is stopping.
    BrokerGone,
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
            End::BrokerGone => "broker stopped",
        }
    }

    fn sends_will(self) -> bool {
        match self {
            End::Disconnected { send_will } => send_will,
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
enum Parsed {
    Packet(Packet, Option<(u8, u16)>),
    NeedMore,
    Oversized(usize),
    Malformed(String),
}

/// Parses one packet from `buf`. rumqttd's decoder is third-party code fed with hostile bytes:
/// a panic in it is treated as a malformed packet rather than taking the task down.
fn next_packet<P: Protocol>(proto: &mut P, buf: &mut BytesMut, max: usize) -> Parsed {
    if buf.is_empty() {
        return Parsed::NeedMore;
    }
    let peek = peek_publish(buf);
    match std::panic::catch_unwind(AssertUnwindSafe(|| proto.read_mut(buf, max))) {
        Ok(Ok(packet)) => Parsed::Packet(packet, peek),
        Ok(Err(rumqttd::protocol::Error::InsufficientBytes(_))) => Parsed::NeedMore,
        Ok(Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(n))) => Parsed::Oversized(n),
        Ok(Err(e)) => Parsed::Malformed(e.to_string()),
        Err(_) => Parsed::Malformed("decoder panicked".to_owned()),
    }
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

pub(crate) struct Session<P, S> {
    proto: P,
    v5: bool,
    device: String,
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    will: Option<(Uplink, Publish)>,
    keep_alive: Duration,
    max_packet: usize,
    max_message: MaxMessageBytes,
    /// The device's publishes: taken over from its last session, handed back at the end.
    rate: Rate,
    bucket: TokenBucket,
    uplink: UplinkTx,
    metrics: std::sync::Arc<Metrics>,
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
        stream: S,
        rbuf: BytesMut,
        will: Option<(Uplink, Publish)>,
        keep_alive: Duration,
        direct: mpsc::Receiver<Direct>,
        bucket: TokenBucket,
        front: &Front,
    ) -> Self {
        Session {
            proto,
            v5,
            device,
            stream,
            rbuf,
            wbuf: BytesMut::new(),
            will,
            keep_alive,
            max_packet: front.max_packet,
            max_message: front.max_message.clone(),
            rate: front.device_rate,
            bucket,
            uplink: front.broker.uplink(),
            metrics: front.metrics.clone(),
            writer: front.writer.clone(),
            qos2: HashSet::new(),
            direct,
            subs: Vec::new(),
            inflight: HashSet::new(),
            next_pkid: 1,
        }
    }

    /// Runs the session to its end; returns why it ended and the device's message bucket.
    pub(crate) async fn run(mut self, claim: &Claim) -> (End, TokenBucket) {
        let end = self.pump(claim).await;
        let bucket = self.bucket;
        self.finish(end).await;
        (end, bucket)
    }

    async fn pump(&mut self, claim: &Claim) -> End {
        // Packets that arrived together with the CONNECT.
        if let Step::End(end) = self.parse_packets().await {
            return end;
        }
        if let Err(end) = self.flush().await {
            return end;
        }
        let idle = self.keep_alive + self.keep_alive / 2;
        let deadline = tokio::time::sleep(idle);
        tokio::pin!(deadline);
        loop {
            let step = tokio::select! {
                biased;
                _ = claim.kick.cancelled() => {
                    let why = claim.reason.get().copied().unwrap_or(Kick::ShuttingDown);
                    let code = match why {
                        Kick::TakenOver => DisconnectReasonCode::SessionTakenOver,
                        Kick::Revoked => DisconnectReasonCode::NotAuthorized,
                        Kick::ShuttingDown => DisconnectReasonCode::ServerShuttingDown,
                    };
                    self.disconnect_device(code);
                    Step::End(End::Kicked(why))
                }
                _ = &mut deadline => {
                    self.disconnect_device(DisconnectReasonCode::KeepAliveTimeout);
                    Step::End(End::KeepAlive)
                }
                read = self.stream.read_buf(&mut self.rbuf) => match read {
                    Ok(0) | Err(_) => Step::End(End::Closed),
                    Ok(_) => {
                        deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                        self.parse_packets().await
                    }
                },
                Some(msg) = self.direct.recv() => {
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
            if let Err(end) = self.flush().await {
                return end;
            }
            if self.rbuf.capacity() - self.rbuf.len() < 512 {
                self.rbuf.reserve(4096.min(self.max_packet + 8));
            }
        }
    }

    async fn parse_packets(&mut self) -> Step {
        loop {
            match next_packet(&mut self.proto, &mut self.rbuf, self.max_packet) {
                Parsed::NeedMore => return Step::Continue,
                Parsed::Packet(packet, peek) => {
                    if let Step::End(end) = self.on_device_packet(packet, peek).await {
                        return Step::End(end);
                    }
                }
                Parsed::Oversized(n) => {
                    self.metrics
                        .reject(Reject::Oversized, &self.device, &format!("{n} bytes"));
                    self.count_device_reject().await;
                    self.disconnect_device(DisconnectReasonCode::PacketTooLarge);
                    return Step::End(End::Oversized);
                }
                Parsed::Malformed(e) => {
                    self.metrics.reject(Reject::Malformed, &self.device, &e);
                    self.count_device_reject().await;
                    self.disconnect_device(DisconnectReasonCode::MalformedPacket);
                    return Step::End(End::Malformed);
                }
            }
        }
    }

    async fn on_device_packet(&mut self, packet: Packet, peek: Option<(u8, u16)>) -> Step {
        match packet {
            Packet::Publish(publish, _props) => {
                let (qos, pkid) = peek.unwrap_or((0, 0));
                self.publish(publish, qos, pkid).await
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
                            self.refused(denied, &filter.path).await;
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
            _ => {
                // A second CONNECT, or a packet only a server may send.
                self.disconnect_device(DisconnectReasonCode::ProtocolError);
                Step::End(End::ProtocolViolation)
            }
        }
    }

    async fn publish(&mut self, publish: Publish, qos: u8, pkid: u16) -> Step {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let (channel, internal) = match policy::uplink(&self.device, &topic) {
            Ok(allowed) => allowed,
            Err(denied) => {
                self.refused(denied, &topic).await;
                self.refuse_publish(qos, pkid, PubAckReason::NotAuthorized);
                return Step::Continue;
            }
        };
        // A QoS 2 repeat (the device did not see our PUBREC) is not delivered twice, and was
        // measured against the limits the first time.
        let repeat = qos == 2 && self.qos2.contains(&pkid);
        if !repeat {
            let limit = self.max_message.of(channel);
            let size = publish.payload.len();
            if size > limit {
                let detail = format!("{topic}: {size} bytes, over {limit}");
                self.metrics.reject(Reject::TooLarge, &self.device, &detail);
                self.count_device_reject().await;
                // No v5 PUBACK code says "too large" (0x95 exists for DISCONNECT only).
                self.refuse_publish(qos, pkid, PubAckReason::ImplementationSpecificError);
                return Step::Continue;
            }
            let now = tokio::time::Instant::now().into_std();
            if !self.bucket.try_take(self.rate, now) {
                self.metrics
                    .reject(Reject::RateLimited, &self.device, &topic);
                self.count_device_reject().await;
                self.refuse_publish(qos, pkid, PubAckReason::QuotaExceeded);
                return Step::Continue;
            }
            if qos == 2 {
                self.qos2.insert(pkid);
            }
        }
        if !repeat
            && self
                .uplink
                .send(Bytes::from(internal), publish.payload)
                .await
                .is_err()
        {
            return Step::End(End::BrokerGone);
        }
        match qos {
            1 => self.write(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )),
            2 => self.write(Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            )),
            _ => {}
        }
        Step::Continue
    }

    /// Answers a publish that was dropped. v5 can say no; v3.1.1 cannot, and must acknowledge
    /// or disconnect. Acknowledging keeps a misconfigured stock client from reconnecting in a
    /// loop (and a rate-limited one from reconnecting to get around its limit).
    fn refuse_publish(&mut self, qos: u8, pkid: u16, v5_reason: PubAckReason) {
        match qos {
            1 => {
                let reason = if self.v5 {
                    v5_reason
                } else {
                    PubAckReason::Success
                };
                self.write(Packet::PubAck(PubAck { pkid, reason }, None));
            }
            2 => {
                let reason = if self.v5 {
                    match v5_reason {
                        PubAckReason::NotAuthorized => PubRecReason::NotAuthorized,
                        PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
                        _ => PubRecReason::ImplementationSpecificError,
                    }
                } else {
                    // Its PUBREL must find the id, like an accepted one's.
                    self.qos2.insert(pkid);
                    PubRecReason::Success
                };
                self.write(Packet::PubRec(PubRec { pkid, reason }, None));
            }
            _ => {}
        }
    }

    async fn refused(&mut self, denied: policy::Denied, topic: &str) {
        let reason = match denied {
            policy::Denied::BadTopic(_) => Reject::BadTopic,
            policy::Denied::NotPermitted => Reject::NotPermitted,
        };
        self.metrics.reject(reason, &self.device, &topic);
        self.count_device_reject().await;
    }

    async fn count_device_reject(&self) {
        let msg = WriterMsg::Rejected {
            device: self.device.clone(),
        };
        let _ = self.writer.send_async(msg).await;
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
        let written = std::panic::catch_unwind(AssertUnwindSafe(|| proto.write(packet, wbuf)));
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

    async fn flush(&mut self) -> Result<(), End> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(WRITE_TIMEOUT, send(&mut self.stream, &self.wbuf)).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
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
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
        let _ = self.stream.shutdown().await;
        if end.sends_will()
            && end != End::BrokerGone
            && let Some((channel, will)) = self.will.take()
        {
            // The will passed the policy at CONNECT; its size is checked now, like any
            // publish's. It does not count against the rate: there is one per session.
            if will.payload.len() > self.max_message.of(channel) {
                let detail = format!("will: {} bytes", will.payload.len());
                self.metrics.reject(Reject::TooLarge, &self.device, &detail);
                self.count_device_reject().await;
            } else {
                let _ = self.uplink.send(will.topic, will.payload).await;
            }
        }
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
