//! The device-facing MQTT front: the gateway's own accept loops in front of rumqttd's router.
//!
//! rumqttd's listeners have no per-topic authorization, run the TLS handshake inline in the
//! accept loop and end every violation with a bare disconnect. The front instead gives each
//! connection its own task with a CONNECT deadline, authenticates the device against its
//! enrolled credential, answers refusals with proper CONNACK/SUBACK/PUBACK codes, and runs a
//! session that forwards what the device may send into the router (see `policy`, `session`).
//!
//! Invariants:
//! - The accept loops never wait on a connection: the only work they do per connection is the
//!   per-source token bucket (a map lookup) and spawning its task. The TLS handshake and the
//!   CONNECT read run in that task, both within one `mqtt.connect_timeout` from the accept, so
//!   a client that stalls anywhere before CONNACK delays no other and is closed and counted.
//! - A connection over its source's rate is closed before anything is read from it.
//! - Plain TCP and TLS connections run the same code from the first MQTT byte on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use fleetgate_config::{Config, IngestAck, MaxMessageBytes};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, LastWill, Packet, Protocol,
};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::limit::{self, Rate};
use super::policy;
use super::session::{self, DeviceStream, Session, send};
use crate::auth::Credentials;
pub use crate::bus::{Direct, DirectError, Kick};
use crate::bus::{Links, PresenceEvent, Uplinks, WriterMsg};
use crate::clock::now_ms;
use crate::metrics::{Metrics, Refusal};

/// The established device sessions, one per device id.
#[derive(Debug)]
pub struct Sessions {
    by_device: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
    direct_capacity: usize,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(64)
    }
}

#[derive(Debug)]
struct Entry {
    id: u64,
    kick: CancellationToken,
    reason: Arc<OnceLock<Kick>>,
    released: CancellationToken,
    direct: mpsc::Sender<Direct>,
}

/// A device's claim on its session slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Claim {
    sessions: Arc<Sessions>,
    device: String,
    pub id: u64,
    pub kick: CancellationToken,
    pub reason: Arc<OnceLock<Kick>>,
    released: CancellationToken,
    /// Messages for [`Sessions::send_direct`]; taken by the session.
    pub direct: Option<mpsc::Receiver<Direct>>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut map) = self.sessions.by_device.lock()
            && map.get(&self.device).is_some_and(|e| e.id == self.id)
        {
            map.remove(&self.device);
        }
        self.released.cancel();
    }
}

/// How long a new session waits for the one it replaces to end.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

impl Sessions {
    /// Sessions whose direct queues hold `direct_capacity` messages.
    pub fn new(direct_capacity: usize) -> Sessions {
        Sessions {
            by_device: Mutex::default(),
            next_id: AtomicU64::new(1),
            direct_capacity: direct_capacity.max(1),
        }
    }

    pub fn kick_all(&self, why: Kick) {
        let map = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        for e in map.values() {
            let _ = e.reason.set(why);
            e.kick.cancel();
        }
    }

    pub fn len(&self) -> usize {
        self.by_device.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn contains(&self, device: &str) -> bool {
        self.by_device.lock().is_ok_and(|m| m.contains_key(device))
    }

    /// Takes `device`'s slot: kicks the session holding it and waits until that session has
    /// ended (its will, if any, sent), so one device never has two sessions. `None` when the
    /// previous session did not end within [`TAKEOVER_WAIT`]: a session ends within a few
    /// seconds of its kick (every write and the close are bounded), so that is a bug, and the
    /// new connection is refused rather than run beside the old one.
    pub(crate) async fn claim(self: &Arc<Self>, device: &str) -> Option<Claim> {
        loop {
            let previous = {
                let mut map = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(device) {
                    Some(e) => {
                        let _ = e.reason.set(Kick::TakenOver);
                        e.kick.cancel();
                        e.released.clone()
                    }
                    None => {
                        let (direct, direct_rx) = mpsc::channel(self.direct_capacity);
                        let claim = Claim {
                            sessions: self.clone(),
                            device: device.to_owned(),
                            id: self.next_id.fetch_add(1, Ordering::Relaxed),
                            kick: CancellationToken::new(),
                            reason: Arc::new(OnceLock::new()),
                            released: CancellationToken::new(),
                            direct: Some(direct_rx),
                        };
                        map.insert(
                            device.to_owned(),
                            Entry {
                                id: claim.id,
                                kick: claim.kick.clone(),
                                reason: claim.reason.clone(),
                                released: claim.released.clone(),
                                direct,
                            },
                        );
                        return Some(claim);
                    }
                }
            };
            if tokio::time::timeout(TAKEOVER_WAIT, previous.cancelled())
                .await
                .is_err()
            {
                tracing::error!(
                    device,
                    "previous session did not end in time; new connection refused"
                );
                return None;
            }
        }
    }
}

impl Links for Sessions {
    fn send_direct(&self, device: &str, msg: Direct) -> Result<(), DirectError> {
        let map = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.get(device).ok_or(DirectError::NotConnected)?;
        entry.direct.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DirectError::Full,
            mpsc::error::TrySendError::Closed(_) => DirectError::NotConnected,
        })
    }

    fn kick(&self, device: &str, why: Kick) -> bool {
        let map = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(device) {
            Some(e) => {
                let _ = e.reason.set(why);
                e.kick.cancel();
                true
            }
            None => false,
        }
    }
}

/// Source addresses the front keeps a connection bucket for: about 100 bytes each. Beyond it,
/// sources whose bucket has refilled are forgotten first (see `limit::Table`).
const MAX_SOURCES: usize = 10_000;

/// Everything a connection task needs.
#[derive(Debug)]
pub struct Front {
    pub(crate) max_packet: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_keep_alive: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_message: MaxMessageBytes,
    pub(crate) device_rate: Rate,
    /// QoS 1/2 publishes of one device waiting for their acknowledgement (`mqtt.max_inflight`).
    pub(crate) max_inflight: u16,
    /// Acknowledge a publish once it is committed (`ingest.ack = "commit"`), or once queued.
    pub(crate) ack_after_commit: bool,
    /// New connections per source IP address, both listeners together.
    sources: Mutex<limit::Table<IpAddr>>,
    /// Message buckets of devices whose session ended before their bucket refilled, so that
    /// reconnecting does not buy a device a new burst. Bounded like `sources`.
    parked: Mutex<limit::Table<String>>,
    pub(crate) credentials: Arc<Credentials>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) uplinks: Uplinks,
    pub(crate) shutdown: CancellationToken,
}

/// Why a connection got no further before its CONNACK.
enum Cut {
    Timeout,
    ShuttingDown,
}

impl Front {
    pub fn new(
        config: &Config,
        credentials: Arc<Credentials>,
        metrics: Arc<Metrics>,
        sessions: Arc<Sessions>,
        uplinks: Uplinks,
        shutdown: CancellationToken,
    ) -> Front {
        let (cfg, limits) = (&config.mqtt, &config.limits);
        Front {
            max_packet: cfg.max_packet_bytes,
            connect_timeout: cfg.connect_timeout,
            max_keep_alive: cfg.max_keep_alive,
            max_connections: cfg.max_connections,
            max_message: limits.max_message_bytes.clone(),
            device_rate: Rate::new(limits.device_messages_per_second, limits.device_burst),
            max_inflight: cfg.max_inflight,
            ack_after_commit: config.ingest.ack == IngestAck::Commit,
            sources: Mutex::new(limit::Table::new(
                Rate::new(cfg.per_source_connects_per_second, cfg.per_source_burst),
                MAX_SOURCES,
            )),
            parked: Mutex::new(limit::Table::new(
                Rate::new(limits.device_messages_per_second, limits.device_burst),
                cfg.max_connections.max(MAX_SOURCES),
            )),
            credentials,
            metrics,
            sessions,
            uplinks,
            shutdown,
        }
    }

    /// Accepts plain TCP connections until `shutdown`; each one runs in its own task on
    /// `tracker`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tracker: TaskTracker) {
        self.accept_loop(listener, None, tracker).await;
    }

    /// Accepts TLS connections until `shutdown`. The handshake runs in the connection's task.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        tls: TlsAcceptor,
        tracker: TaskTracker,
    ) {
        self.accept_loop(listener, Some(tls), tracker).await;
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        tracker: TaskTracker,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if !self.source_may_connect(peer.ip()) {
                        self.metrics.refuse(
                            Refusal::RateLimited,
                            &peer,
                            "too many new connections from this address",
                        );
                        // Dropping the stream closes it.
                        continue;
                    }
                    let deadline = Instant::now() + self.connect_timeout;
                    let _ = stream.set_nodelay(true);
                    match &tls {
                        None => tracker.spawn(self.clone().connection(stream, peer, deadline)),
                        Some(tls) => tracker.spawn(self.clone().tls_connection(
                            tls.clone(),
                            stream,
                            peer,
                            deadline,
                        )),
                    };
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Takes a token from the bucket of `ip`'s source (see [`source_of`]).
    fn source_may_connect(&self, ip: IpAddr) -> bool {
        let now = Instant::now().into_std();
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.try_take(source_of(ip), now)
    }

    /// Runs one step before the CONNACK, within the connection's deadline.
    async fn before_connack<F: Future>(
        &self,
        deadline: Instant,
        step: F,
    ) -> Result<F::Output, Cut> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(Cut::ShuttingDown),
            out = tokio::time::timeout_at(deadline, step) => out.map_err(|_| Cut::Timeout),
        }
    }

    fn cut(&self, cut: Cut, peer: &SocketAddr, what: &str) {
        match cut {
            Cut::Timeout => self.metrics.refuse(Refusal::ConnectTimeout, peer, what),
            Cut::ShuttingDown => {
                self.metrics
                    .refuse(Refusal::ShuttingDown, peer, "gateway is shutting down")
            }
        }
    }

    async fn tls_connection(
        self: Arc<Self>,
        tls: TlsAcceptor,
        stream: TcpStream,
        peer: SocketAddr,
        deadline: Instant,
    ) {
        match self.before_connack(deadline, tls.accept(stream)).await {
            Ok(Ok(stream)) => self.connection(stream, peer, deadline).await,
            Ok(Err(e)) => self.metrics.refuse(Refusal::Tls, &peer, &e.to_string()),
            Err(cut) => self.cut(cut, &peer, "no TLS handshake in time"),
        }
    }

    pub(super) async fn connection<S: DeviceStream>(
        self: Arc<Self>,
        mut stream: S,
        peer: SocketAddr,
        deadline: Instant,
    ) {
        let mut buf = BytesMut::with_capacity(512);
        let level = self
            .before_connack(
                deadline,
                read_protocol_level(&mut stream, &mut buf, self.max_packet),
            )
            .await;
        match level {
            Err(cut) => self.cut(cut, &peer, "no CONNECT in time"),
            Ok(Err(why)) => self.metrics.refuse(Refusal::Protocol, &peer, why),
            Ok(Ok(4)) => self.connect(V4, false, stream, buf, peer, deadline).await,
            Ok(Ok(5)) => self.connect(V5, true, stream, buf, peer, deadline).await,
            Ok(Ok(level)) => {
                // MQTT 3.1 and unknown levels: refuse with the 3.1 "unacceptable protocol
                // version" code, which every client version can read.
                let _ = send(&mut stream, &[0x20, 0x02, 0x00, 0x01]).await;
                let detail = format!("unsupported protocol level {level}");
                self.metrics.refuse(Refusal::Protocol, &peer, &detail);
            }
        }
    }

    async fn connect<P: Protocol + Send + 'static, S: DeviceStream>(
        self: Arc<Self>,
        mut proto: P,
        v5: bool,
        mut stream: S,
        mut buf: BytesMut,
        peer: SocketAddr,
        deadline: Instant,
    ) {
        let read = self
            .before_connack(
                deadline,
                session::read_packet(&mut proto, &mut stream, &mut buf, self.max_packet),
            )
            .await;
        let (connect, login, will) = match read {
            Ok(Ok(Packet::Connect(connect, _props, will, _will_props, login))) => {
                (connect, login, will)
            }
            Ok(Ok(_)) => {
                return self.metrics.refuse(
                    Refusal::Protocol,
                    &peer,
                    "first packet is not CONNECT",
                );
            }
            Ok(Err(e)) => {
                return self
                    .metrics
                    .refuse(Refusal::Protocol, &peer, &e.to_string());
            }
            Err(cut) => return self.cut(cut, &peer, "CONNECT incomplete"),
        };

        let refuse = |code: ConnectReturnCode| {
            let mut out = BytesMut::new();
            let packet = Packet::ConnAck(
                ConnAck {
                    session_present: false,
                    code,
                },
                None,
            );
            let _ = proto.write(packet, &mut out);
            out
        };
        let Some(login) = login else {
            self.metrics
                .refuse(Refusal::BadCredentials, &peer, "no username/password");
            let _ = send(&mut stream, &refuse(ConnectReturnCode::BadUserNamePassword)).await;
            return;
        };
        let device = login.username;
        if !connect.client_id.is_empty() && connect.client_id != device {
            self.metrics
                .refuse(Refusal::ClientId, &peer, "client id is not the username");
            let _ = send(
                &mut stream,
                &refuse(ConnectReturnCode::ClientIdentifierNotValid),
            )
            .await;
            return;
        }
        if fleetgate_protocol::id::validate(&device).is_err()
            || !self.credentials.check(&device, &login.password)
        {
            self.metrics.refuse(
                Refusal::BadCredentials,
                &peer,
                "unknown device or wrong credential",
            );
            let _ = send(&mut stream, &refuse(ConnectReturnCode::BadUserNamePassword)).await;
            return;
        }
        let will = match will.map(|w| will_publish(&device, w)).transpose() {
            Ok(w) => w,
            Err(()) => {
                self.metrics.refuse(
                    Refusal::Will,
                    &peer,
                    "will topic is not the device's uplink",
                );
                let _ = send(&mut stream, &refuse(ConnectReturnCode::NotAuthorized)).await;
                return;
            }
        };
        let unavailable = if v5 {
            ConnectReturnCode::ServerUnavailable
        } else {
            ConnectReturnCode::ServiceUnavailable
        };
        if self.shutdown.is_cancelled() {
            self.metrics
                .refuse(Refusal::ShuttingDown, &peer, "gateway is shutting down");
            let _ = send(&mut stream, &refuse(unavailable)).await;
            return;
        }
        if self.sessions.len() >= self.max_connections && !self.sessions.contains(&device) {
            self.metrics.refuse(
                Refusal::ServerFull,
                &peer,
                "device budget (mqtt.max_connections) reached",
            );
            let code = if v5 {
                ConnectReturnCode::QuotaExceeded
            } else {
                unavailable
            };
            let _ = send(&mut stream, &refuse(code)).await;
            return;
        }

        let Some(mut claim) = self.sessions.claim(&device).await else {
            self.metrics.refuse(
                Refusal::Takeover,
                &peer,
                "the device's previous session did not end in time",
            );
            let _ = send(&mut stream, &refuse(unavailable)).await;
            return;
        };
        // The claim may have waited for the previous session to end, and the device's
        // credential been revoked or rotated meanwhile: that kick went to the previous session
        // only. A kick from now on finds this claim (credentials change before kicks), so one
        // more check closes the gap.
        if !self.credentials.check(&device, &login.password) {
            self.metrics.refuse(
                Refusal::BadCredentials,
                &peer,
                "credential revoked while waiting for the previous session to end",
            );
            let _ = send(&mut stream, &refuse(ConnectReturnCode::BadUserNamePassword)).await;
            return;
        }

        let requested = Duration::from_secs(u64::from(connect.keep_alive));
        let keep_alive = if requested.is_zero() || requested > self.max_keep_alive {
            self.max_keep_alive
        } else {
            requested
        };
        let props = v5.then(|| ConnAckProperties {
            max_packet_size: u32::try_from(self.max_packet).ok(),
            // The device may have this many QoS 1/2 publishes unacknowledged; a session reads
            // no further while that many wait for their commit (3.1.1 devices have no such
            // setting and simply find the session not reading).
            receive_max: Some(self.max_inflight),
            server_keep_alive: (keep_alive != requested).then_some(keep_alive.as_secs() as u16),
            retain_available: Some(0),
            wildcard_subscription_available: Some(0),
            subscription_identifiers_available: Some(0),
            shared_subscription_available: Some(0),
            ..Default::default()
        });
        // Presence is queued before the CONNACK goes out: anything the device does after it
        // sees the CONNACK (and any sync after that) comes after its "online".
        let protocol = if v5 { 5 } else { 4 };
        self.presence(&device, claim.id, true, protocol, peer, None)
            .await;
        let mut out = BytesMut::new();
        // No session state is kept between connections: a device subscribes again, and the
        // gateway offers again what matters (updates, rollbacks, bin edges) after its hello.
        let connack = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
            },
            props,
        );
        if proto.write(connack, &mut out).is_err() || send(&mut stream, &out).await.is_err() {
            self.presence(
                &device,
                claim.id,
                false,
                protocol,
                peer,
                Some("connection closed"),
            )
            .await;
            return;
        }
        self.metrics.connects.inc();
        self.metrics.connected.inc();
        let direct = claim.direct.take().unwrap_or_else(|| mpsc::channel(1).1);
        // The claim ensures the device's previous session has parked its bucket by now.
        let bucket = self
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&device, Instant::now().into_std());
        let session = Session::new(
            proto,
            v5,
            device.clone(),
            claim.id,
            stream,
            buf,
            will,
            keep_alive,
            direct,
            bucket,
            &self,
        );
        let (end, bucket) = session.run(&claim).await;
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).put(
            device.clone(),
            bucket,
            Instant::now().into_std(),
        );
        self.metrics.connected.dec();
        let reason = end.describe();
        tracing::debug!(device, reason, "session ended");
        self.presence(&device, claim.id, false, protocol, peer, Some(reason))
            .await;
        drop(claim);
    }

    async fn presence(
        &self,
        device: &str,
        session: u64,
        online: bool,
        protocol: u8,
        peer: SocketAddr,
        reason: Option<&'static str>,
    ) {
        let event = PresenceEvent {
            device: device.to_owned(),
            session,
            online,
            at_ms: now_ms(),
            protocol,
            peer: peer.to_string(),
            reason,
        };
        let _ = self
            .uplinks
            .writer()
            .send_async(WriterMsg::Presence(event))
            .await;
    }
}

/// The source a connection's address counts against: an IPv4 address (IPv4 clients of an IPv6
/// listener included), or an IPv6 address's /64 network. One host is routinely given a whole
/// /64, so counting single IPv6 addresses would give it 2^64 sources.
pub(crate) fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Checks a will at CONNECT time and turns it into the publish to send if the session ends
/// without a clean DISCONNECT. The will may only go to one of the device's uplink topics.
fn will_publish(device: &str, will: LastWill) -> Result<session::Will, ()> {
    let topic = std::str::from_utf8(&will.topic).map_err(|_| ())?;
    let (channel, encoding) = policy::uplink(device, topic).map_err(|_| ())?;
    Ok(session::Will {
        channel,
        encoding,
        payload: will.message,
    })
}

/// Reads until the CONNECT's protocol level is in `buf` (without consuming anything) and
/// returns it. MQTT 3.1.1 is level 4, MQTT 5 is level 5.
async fn read_protocol_level<S: DeviceStream>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<u8, &'static str> {
    loop {
        // A CONNECT announcing more than the limit is refused from its fixed header, not held
        // until the rest of it (which may never come) or the connect timeout.
        if session::announced_len(buf).is_some_and(|n| n > max_packet) || buf.len() > max_packet {
            return Err("CONNECT too large");
        }
        match connect_level(buf) {
            Ok(Some(level)) => return Ok(level),
            Ok(None) => {}
            Err(why) => return Err(why),
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err("closed before CONNECT"),
            Ok(_) => {}
            Err(_) => return Err("read error before CONNECT"),
        }
    }
}

/// The protocol level of a CONNECT at the start of `buf`; `Ok(None)` while incomplete.
pub(crate) fn connect_level(buf: &[u8]) -> Result<Option<u8>, &'static str> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err("first packet is not CONNECT");
    }
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err("malformed remaining length");
        }
    }
    let (Some(&hi), Some(&lo)) = (buf.get(i), buf.get(i + 1)) else {
        return Ok(None);
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    if name_len > 6 {
        return Err("unknown protocol name");
    }
    Ok(buf.get(i + 2 + name_len).copied())
}

#[cfg(test)]
mod tests;
