//! One established device session: moves packets between the device's socket and its router
//! link, applying the topic policy to everything the device sends.
//!
//! Invariants:
//! - Every topic a device publishes or subscribes to passes `policy` before the router sees it;
//!   refusals are answered (v5 reason codes, v3.1.1 acknowledgements) and counted, and the
//!   connection stays up.
//! - The router link is released with a DISCONNECT exactly once, unless the router has already
//!   dropped it: the router reuses connection ids, so a late DISCONNECT could end another
//!   device's session.
//! - MQTT 3.1.1 devices never receive v5-only packets or properties (rumqttd's v4 encoder
//!   panics on them).

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttd::Notification;
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PingResp, Protocol, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, Publish, SubAck, SubscribeReasonCode, UnsubAck,
    UnsubAckReason,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use fleetgate_protocol::{Channel, Downlink, Encoding, topic};
use tokio::sync::mpsc;

use super::front::{Claim, Direct, Front, Kick};
use super::{Broker, DeviceLink, policy};
use crate::ingest::{WriterMsg, WriterTx};
use crate::metrics::{Metrics, Reject};

/// A device that does not read what it is sent for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most router notifications handled before the session writes and yields.
const NOTIFY_BATCH: usize = 256;

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
    /// The router dropped the link (its own checks); it must not be told again.
    RouterGone,
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
            End::RouterGone => "dropped by the broker",
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

/// Reads one whole packet (used for CONNECT, before the session loop).
pub(crate) async fn read_packet<P: Protocol>(
    proto: &mut P,
    stream: &mut TcpStream,
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

pub(crate) struct Session<P> {
    proto: P,
    v5: bool,
    device: String,
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    link: DeviceLink,
    will: Option<Publish>,
    keep_alive: Duration,
    max_packet: usize,
    broker: Broker,
    metrics: std::sync::Arc<Metrics>,
    writer: WriterTx,
    /// Subscribe/unsubscribe packet ids whose refused filters must be merged into the
    /// router's answer: `None` slots are filled from the router, in order.
    pending_suback: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    pending_unsuback: HashMap<u16, Vec<Option<UnsubAckReason>>>,
    /// QoS 2 publishes refused under v3.1.1 (which must be PUBREC'd): their PUBREL is answered
    /// here, not by the router, which never saw them.
    refused_qos2: HashSet<u16>,
    unscheduled: bool,
    /// Messages the gateway sends straight to this device (see `Direct`), and the direct
    /// channels the device subscribed to.
    direct: mpsc::Receiver<Direct>,
    direct_subs: Vec<(Downlink, Encoding)>,
    /// Packets for the router from the current read, handed over in one go.
    outbox: Vec<Packet>,
}

enum Step {
    Continue,
    End(End),
}

impl<P: Protocol + Send> Session<P> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        proto: P,
        v5: bool,
        device: String,
        stream: TcpStream,
        rbuf: BytesMut,
        link: DeviceLink,
        will: Option<Publish>,
        keep_alive: Duration,
        direct: mpsc::Receiver<Direct>,
        front: &Front,
    ) -> Self {
        Session {
            proto,
            v5,
            device,
            stream,
            rbuf,
            wbuf: BytesMut::new(),
            link,
            will,
            keep_alive,
            max_packet: front.max_packet,
            broker: front.broker.clone(),
            metrics: front.metrics.clone(),
            writer: front.writer.clone(),
            pending_suback: HashMap::new(),
            pending_unsuback: HashMap::new(),
            refused_qos2: HashSet::new(),
            unscheduled: false,
            direct,
            direct_subs: Vec::new(),
            outbox: Vec::new(),
        }
    }

    pub(crate) async fn run(mut self, claim: &Claim) -> End {
        let end = self.pump(claim).await;
        self.finish(end).await;
        end
    }

    async fn pump(&mut self, claim: &Claim) -> End {
        // Packets that arrived together with the CONNECT.
        if let Step::End(end) = self.parse_buffered().await {
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
                        self.parse_buffered().await
                    }
                },
                notification = self.link.rx.next() => match notification {
                    Ok(Some(n)) => self.on_router(n),
                    Ok(None) => Step::Continue,
                    Err(_) => Step::End(End::RouterGone),
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
            if let Step::End(end) = self.drain_router() {
                return end;
            }
            if let Err(end) = self.flush().await {
                return end;
            }
            if std::mem::take(&mut self.unscheduled) && self.link.rx.wake().await.is_err() {
                return End::RouterGone;
            }
            if self.rbuf.capacity() - self.rbuf.len() < 512 {
                self.rbuf.reserve(4096.min(self.max_packet + 8));
            }
        }
    }

    /// Handles the router notifications already waiting, without blocking.
    fn drain_router(&mut self) -> Step {
        for _ in 0..NOTIFY_BATCH {
            match self.link.rx.recv_deadline(Instant::now()) {
                Ok(Some(n)) => {
                    if let Step::End(end) = self.on_router(n) {
                        return Step::End(end);
                    }
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
        Step::Continue
    }

    async fn parse_buffered(&mut self) -> Step {
        let step = self.parse_packets().await;
        match self.flush_outbox().await {
            Step::Continue => step,
            end => end,
        }
    }

    /// Hands the packets of one read to the router with one router event.
    async fn flush_outbox(&mut self) -> Step {
        let Some(last) = self.outbox.pop() else {
            return Step::Continue;
        };
        self.link.tx.buffer().extend(self.outbox.drain(..));
        self.send_to_router(last).await
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
            Packet::Publish(publish, props) => {
                let (qos, pkid) = peek.unwrap_or((0, 0));
                self.publish(publish, props, qos, pkid).await
            }
            Packet::Subscribe(sub, props) => {
                let mut allowed = Vec::new();
                let mut codes = Vec::new();
                for mut filter in sub.filters {
                    match policy::subscribe(&self.device, &filter.path) {
                        Ok(s) if s.channel == Downlink::Chunk => {
                            // Served by the session itself (see `Direct`), at QoS 0.
                            if !self.direct_subs.contains(&(s.channel, s.encoding)) {
                                self.direct_subs.push((s.channel, s.encoding));
                            }
                            let qos0 =
                                SubscribeReasonCode::Success(rumqttd::protocol::QoS::AtMostOnce);
                            codes.push(Some(qos0));
                        }
                        Ok(s) => {
                            filter.path = s.internal;
                            allowed.push(filter);
                            codes.push(None);
                        }
                        Err(denied) => {
                            self.refused(denied, &filter.path).await;
                            codes.push(Some(self.refused_suback_code()));
                        }
                    }
                }
                if allowed.is_empty() {
                    let codes = codes.into_iter().flatten().collect();
                    self.write(Packet::SubAck(
                        SubAck {
                            pkid: sub.pkid,
                            return_codes: codes,
                        },
                        None,
                    ));
                    return Step::Continue;
                }
                if codes.iter().any(Option::is_some) {
                    self.pending_suback.insert(sub.pkid, codes);
                }
                let sub = rumqttd::protocol::Subscribe {
                    pkid: sub.pkid,
                    filters: allowed,
                };
                self.queue(Packet::Subscribe(sub, props))
            }
            Packet::Unsubscribe(unsub, props) => {
                let mut allowed = Vec::new();
                let mut codes = Vec::new();
                for filter in unsub.filters {
                    match policy::subscribe(&self.device, &filter) {
                        Ok(s) if s.channel == Downlink::Chunk => {
                            let had = self.direct_subs.contains(&(s.channel, s.encoding));
                            self.direct_subs.retain(|d| *d != (s.channel, s.encoding));
                            codes.push(Some(if had {
                                UnsubAckReason::Success
                            } else {
                                UnsubAckReason::NoSubscriptionExisted
                            }));
                        }
                        Ok(s) => {
                            allowed.push(s.internal);
                            codes.push(None);
                        }
                        Err(_) => codes.push(Some(UnsubAckReason::NoSubscriptionExisted)),
                    }
                }
                if allowed.is_empty() {
                    let reasons = codes.into_iter().flatten().collect();
                    self.write(Packet::UnsubAck(
                        UnsubAck {
                            pkid: unsub.pkid,
                            reasons,
                        },
                        None,
                    ));
                    return Step::Continue;
                }
                if codes.iter().any(Option::is_some) {
                    self.pending_unsuback.insert(unsub.pkid, codes);
                }
                let unsub = rumqttd::protocol::Unsubscribe {
                    pkid: unsub.pkid,
                    filters: allowed,
                };
                self.queue(Packet::Unsubscribe(unsub, props))
            }
            Packet::PubRel(rel, props) => {
                if self.refused_qos2.remove(&rel.pkid) {
                    let comp = PubComp {
                        pkid: rel.pkid,
                        reason: PubCompReason::Success,
                    };
                    self.write(Packet::PubComp(comp, None));
                    return Step::Continue;
                }
                self.queue(Packet::PubRel(rel, props))
            }
            p @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => self.queue(p),
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

    async fn publish(
        &mut self,
        mut publish: Publish,
        props: Option<rumqttd::protocol::PublishProperties>,
        qos: u8,
        pkid: u16,
    ) -> Step {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        match policy::uplink(&self.device, &topic) {
            Ok((_, internal)) => {
                publish.topic = Bytes::from(internal);
                publish.retain = false;
                self.queue(Packet::Publish(publish, props))
            }
            Err(denied) => {
                self.refused(denied, &topic).await;
                // v5 can say no; v3.1.1 cannot, and must acknowledge or disconnect. Acknowledging
                // keeps a misconfigured stock client from reconnecting in a loop.
                match qos {
                    1 => {
                        let reason = if self.v5 {
                            PubAckReason::NotAuthorized
                        } else {
                            PubAckReason::Success
                        };
                        self.write(Packet::PubAck(PubAck { pkid, reason }, None));
                    }
                    2 => {
                        let reason = if self.v5 {
                            PubRecReason::NotAuthorized
                        } else {
                            PubRecReason::Success
                        };
                        if !self.v5 {
                            self.refused_qos2.insert(pkid);
                        }
                        self.write(Packet::PubRec(PubRec { pkid, reason }, None));
                    }
                    _ => {}
                }
                Step::Continue
            }
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

    /// Queues a packet for the router; [`Session::flush_outbox`] sends the read's batch.
    fn queue(&mut self, packet: Packet) -> Step {
        self.outbox.push(packet);
        Step::Continue
    }

    async fn send_to_router(&mut self, packet: Packet) -> Step {
        self.broker.wait_router().await;
        match self.link.tx.send(packet).await {
            Ok(_) => Step::Continue,
            Err(_) => Step::End(End::RouterGone),
        }
    }

    fn on_router(&mut self, notification: Notification) -> Step {
        match notification {
            Notification::Forward(mut forward) => {
                let topic = String::from_utf8_lossy(&forward.publish.topic).into_owned();
                match policy::to_device(&self.device, &topic) {
                    Some(device_topic) => {
                        forward.publish.topic = Bytes::from(device_topic);
                        self.write(Packet::Publish(forward.publish, forward.properties));
                    }
                    None => {
                        tracing::error!(device = %self.device, topic, "router delivered a foreign topic; dropped")
                    }
                }
                Step::Continue
            }
            Notification::Unschedule => {
                self.unscheduled = true;
                Step::Continue
            }
            Notification::Disconnect(d, props) => {
                if self.v5 {
                    self.write(Packet::Disconnect(d, props));
                }
                Step::End(End::RouterGone)
            }
            other => {
                match Option::<Packet>::from(other) {
                    Some(Packet::SubAck(mut ack, props)) => {
                        if let Some(slots) = self.pending_suback.remove(&ack.pkid) {
                            let mut from_router = ack.return_codes.into_iter();
                            ack.return_codes = slots
                                .into_iter()
                                .map(|s| {
                                    s.or_else(|| from_router.next())
                                        .unwrap_or(SubscribeReasonCode::Failure)
                                })
                                .collect();
                        }
                        self.write(Packet::SubAck(ack, props));
                    }
                    Some(Packet::UnsubAck(mut ack, props)) => {
                        if let Some(slots) = self.pending_unsuback.remove(&ack.pkid) {
                            let mut from_router = ack.reasons.into_iter();
                            ack.reasons = slots
                                .into_iter()
                                .map(|s| {
                                    s.or_else(|| from_router.next())
                                        .unwrap_or(UnsubAckReason::Success)
                                })
                                .collect();
                        }
                        self.write(Packet::UnsubAck(ack, props));
                    }
                    Some(packet) => self.write(packet),
                    None => {}
                }
                Step::Continue
            }
        }
    }

    /// Writes a direct message if the device subscribed to its channel in its encoding.
    fn on_direct(&mut self, msg: Direct) {
        if !self.direct_subs.contains(&(msg.channel, msg.encoding)) {
            self.metrics.direct_dropped.inc();
            return;
        }
        let topic = topic::format(&self.device, Channel::Down(msg.channel), msg.encoding);
        self.write(Packet::Publish(
            Publish::new(Bytes::from(topic), msg.payload, false),
            None,
        ));
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
        match tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&self.wbuf)).await {
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
        if end == End::RouterGone {
            return;
        }
        if end.sends_will()
            && let Some(will) = self.will.take()
        {
            let _ = self.send_to_router(Packet::Publish(will, None)).await;
        }
        self.broker.wait_router().await;
        super::disconnect(self.link.tx).await;
    }
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
