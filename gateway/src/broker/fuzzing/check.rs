//! The checks of the session simulation: a model of what the front and its sessions must do,
//! fed with the [`Trace`](super::writer::Trace) in order, that fails at the first event the
//! gateway may not produce.
//!
//! The model reads the device's bytes with the sessions' own packet reader, so it sees the
//! packets the session sees, and says what must follow from them: the CONNACK, one
//! acknowledgement per QoS 1/2 publish in order and with the right verdict, the answers to
//! subscriptions, releases and pings in order, which messages reach the writer and in which
//! order, why the session ends and how soon. When a session's packets are taken depends on
//! back-pressure the model does not follow, so every check holds whatever that timing was:
//! an acknowledgement is checked against what the writer committed when the device read it,
//! a message against the packets sent before it, an end against what happened before it.
//!
//! A device that misuses QoS 2 packet ids (reusing one in flight, releasing one that it was
//! never acknowledged) leaves the outcome of those publishes to the session's choice: the
//! model then stops checking QoS 2 verdicts and duplicates on that connection (`lenient`),
//! and everything else still holds.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetgate_config::MaxMessageBytes;
use fleetgate_protocol::{Channel, Downlink, Encoding, Uplink, topic};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{DisconnectReasonCode, Packet};
use tokio::time::Instant;

use super::device::{self, FromServer};
use super::script::{DEVICES, Settings, secret};
use super::writer::{Event, Taken};
use crate::broker::front::connect_level;
use crate::broker::policy;
use crate::broker::session::{Parsed, next_packet};
use crate::bus::Refusal;

/// What the gateway may take for something it must do "at once" when it also has to write to
/// the device and close the connection (two `CLOSE_TIMEOUT`s and some room).
const SLACK: Duration = Duration::from_secs(3);
/// `session::WRITE_TIMEOUT`.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// `front::TAKEOVER_WAIT`.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// `session::SHUTDOWN_ACKS`.
const SHUTDOWN_ACKS: Duration = Duration::from_secs(2);

/// What the checks need of the gateway's configuration.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    pub max_packet: usize,
    pub max_message: MaxMessageBytes,
    pub max_keep_alive: Duration,
    pub connect_timeout: Duration,
    pub max_inflight: u16,
}

/// How the run went, for tests that want to know what a script reached.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Connections opened.
    pub connections: usize,
    /// Sessions that went online.
    pub sessions: usize,
    /// Device messages the writer took.
    pub delivered: usize,
    /// Acknowledgements devices read.
    pub acks: usize,
    /// Commits the writer failed.
    pub failed_commits: usize,
    /// Why sessions ended, as the writer was told, with how often.
    pub ends: std::collections::BTreeMap<&'static str, usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No whole CONNECT yet.
    Connecting,
    /// The model expects (or saw) the CONNECT accepted.
    Session,
    /// Refused, or cut before its CONNACK.
    Refused,
    /// The model cannot tell what the gateway makes of it (a CONNECT completed at the very
    /// instant of its deadline): only the global checks apply.
    Untracked,
}

/// What a CONNACK must say.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// None at all: the connection closes.
    Nothing,
    /// One of these codes (the first is the one the model expects; the others are what a
    /// full server or a takeover that timed out may answer instead).
    Codes(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    Disconnect { will: bool },
    Oversized,
    Malformed,
    Violation,
}

/// The device's view of one of its QoS 2 packet ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Q2 {
    /// Publish `.0` sent, no PUBREC yet.
    Published(usize),
    /// PUBREC read, no PUBREL sent yet.
    Recorded,
    /// PUBREL sent, no PUBCOMP yet.
    Released,
}

#[derive(Debug)]
struct Pub {
    qos: u8,
    pkid: u16,
    /// Channel and encoding if the device may publish on the topic.
    permitted: Option<(Uplink, Encoding)>,
    /// Within the channel's size limit.
    fits: bool,
    payload: Bytes,
    sent_at: Instant,
    /// A v3.1.1 retransmission of a QoS 2 publish still in flight: never delivered again.
    retransmit: bool,
    /// The message's number and the writer's verdict, once the writer took it.
    delivered: Option<(u64, Option<Refusal>)>,
}

impl Pub {
    /// Whether the session must hand it to the writer (if it gets that far).
    fn deliverable(&self, lenient: bool) -> bool {
        self.permitted.is_some() && self.fits && !self.retransmit && (self.qos < 2 || !lenient)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Immediate {
    /// `reason`: `None` when either answer is right.
    PubComp {
        pkid: u16,
        reason: Option<u8>,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PingResp,
}

enum Proto {
    V4(V4),
    V5(V5),
}

impl Proto {
    fn next(&mut self, buf: &mut BytesMut, max: usize) -> Parsed {
        match self {
            Proto::V4(p) => next_packet(p, buf, max),
            Proto::V5(p) => next_packet(p, buf, max),
        }
    }
}

/// The model of one established (or expected) session.
struct Model {
    v5: bool,
    device: String,
    proto: Proto,
    /// The effective keep alive.
    keep_alive: Duration,
    will: Option<(Uplink, Encoding, Bytes)>,
    pubs: Vec<Pub>,
    /// QoS 1/2 publishes waiting for their acknowledgement, in order.
    acks: VecDeque<usize>,
    /// Publishes up to here are checked as committed (for the acknowledgements).
    committed_upto: usize,
    /// Answers due that the session writes at once, in order.
    immediate: VecDeque<Immediate>,
    terminal: Option<Terminal>,
    lenient: bool,
    /// Publishes before this one are matched with the writer's messages or skipped.
    next_match: usize,
    last_n: u64,
    q2: HashMap<u16, Q2>,
    subs: Vec<(Downlink, Encoding, u8)>,
    granted_ever: Vec<(Downlink, Encoding, u8)>,
    /// QoS 1 messages from the gateway the device has not acknowledged.
    directs_unacked: VecDeque<u16>,
    will_taken: bool,
    /// Index of the latest publish acknowledged.
    acked_upto: Option<usize>,
    disconnect_read: Option<Option<u8>>,
}

struct Conn {
    opened: Instant,
    stream: BytesMut,
    phase: Phase,
    expect: Option<Expect>,
    /// The CONNECT's protocol level (for reading the CONNACK).
    v5_connack: bool,
    connack: Option<u8>,
    requested_keep_alive: u16,
    last_sent: Instant,
    /// The longest the device sent nothing, up to `last_sent`.
    silence: Duration,
    closed: Option<Instant>,
    dropped: bool,
    inbox: Vec<u8>,
    pauses: Vec<(Instant, Instant)>,
    epoch: Option<u64>,
    online: bool,
    ended: Option<Instant>,
    end_reason: Option<&'static str>,
    /// When and why the gateway was to end the session, and how long that may take.
    kicked: Option<(Instant, &'static str)>,
    failed: Option<Instant>,
    deadline: Option<(Instant, Duration, &'static str)>,
    model: Option<Model>,
}

#[derive(Debug)]
struct DirectRec {
    device: &'static str,
    channel: Downlink,
    encoding: Encoding,
    qos: u8,
    queued: bool,
    delivered: bool,
}

pub(super) struct Checker {
    settings: Settings,
    limits: Limits,
    conns: Vec<Conn>,
    by_epoch: HashMap<u64, usize>,
    enrolled: [bool; 3],
    /// Device -> epoch of its session that the writer saw online and not yet offline.
    live: HashMap<String, u64>,
    offline: HashMap<u64, &'static str>,
    /// (epoch, n) -> committed (true) or failed (false).
    commits: HashMap<(u64, u64), bool>,
    directs: HashMap<u32, DirectRec>,
    shutdown: Option<Instant>,
    stalls: Vec<(Instant, Instant)>,
    rejected_reported: HashMap<String, u64>,
    pub outcome: Outcome,
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
}

impl Checker {
    pub fn new(settings: Settings, limits: Limits) -> Checker {
        Checker {
            settings,
            limits,
            conns: Vec::new(),
            by_epoch: HashMap::new(),
            enrolled: [true, true, false],
            live: HashMap::new(),
            offline: HashMap::new(),
            commits: HashMap::new(),
            directs: HashMap::new(),
            shutdown: None,
            stalls: Vec::new(),
            rejected_reported: HashMap::new(),
            outcome: Outcome::default(),
        }
    }

    /// Checks the events, in order.
    pub fn absorb(&mut self, events: Vec<(Instant, Event)>) -> Check {
        for (at, event) in events {
            self.event(at, event)?;
        }
        Ok(())
    }

    /// Checks what must have happened by `now`.
    pub fn tick(&self, now: Instant) -> Check {
        for (i, c) in self.conns.iter().enumerate() {
            if c.ended.is_some() {
                continue;
            }
            if let Some((since, slack, why)) = c.deadline
                && now > since + slack + self.stalled_within(since, now)
            {
                return Err(format!(
                    "connection {i} still open {:?} after {why}",
                    now - since
                ));
            }
        }
        Ok(())
    }

    /// Time the writer was stalled between `from` and `to`: sessions may wait for it.
    fn stalled_within(&self, from: Instant, to: Instant) -> Duration {
        self.stalls
            .iter()
            .map(|&(a, b)| b.min(to).saturating_duration_since(a.max(from)))
            .sum()
    }

    pub fn ended(&self, conn: usize) -> bool {
        self.conns.get(conn).is_none_or(|c| c.ended.is_some())
    }

    pub fn all_ended(&self) -> bool {
        self.conns.iter().all(|c| c.ended.is_some())
    }

    /// The device's next free packet id from `from` on (not in flight as QoS 2).
    pub fn free_pkid(&self, conn: usize, from: u16) -> u16 {
        let mut id = from.max(1);
        if let Some(m) = self.conns.get(conn).and_then(|c| c.model.as_ref()) {
            while m.q2.contains_key(&id) || m.acks.iter().any(|&i| m.pubs[i].pkid == id) {
                id = id.checked_add(1).unwrap_or(1);
            }
        }
        id
    }

    /// The oldest QoS 1 message of the gateway the device has not acknowledged.
    pub fn due_puback(&self, conn: usize) -> Option<u16> {
        let m = self.conns.get(conn)?.model.as_ref()?;
        m.directs_unacked.front().copied()
    }

    /// The oldest QoS 2 publish whose PUBREC the device read and has not released.
    pub fn due_pubrel(&self, conn: usize) -> Option<u16> {
        let m = self.conns.get(conn)?.model.as_ref()?;
        let mut ids: Vec<u16> =
            m.q2.iter()
                .filter(|(_, s)| **s == Q2::Recorded)
                .map(|(id, _)| *id)
                .collect();
        ids.sort_unstable();
        ids.first().copied()
    }

    fn event(&mut self, at: Instant, event: Event) -> Check {
        match event {
            Event::Opened { conn } => {
                debug_assert_eq!(conn, self.conns.len());
                self.outcome.connections += 1;
                self.conns.push(Conn {
                    opened: at,
                    stream: BytesMut::new(),
                    phase: Phase::Connecting,
                    expect: None,
                    v5_connack: false,
                    connack: None,
                    requested_keep_alive: 0,
                    last_sent: at,
                    silence: Duration::ZERO,
                    closed: None,
                    dropped: false,
                    inbox: Vec::new(),
                    pauses: Vec::new(),
                    epoch: None,
                    online: false,
                    ended: None,
                    end_reason: None,
                    kicked: None,
                    failed: None,
                    deadline: Some((
                        at,
                        self.limits.connect_timeout + TAKEOVER_WAIT + SLACK,
                        "it opened without a session",
                    )),
                    model: None,
                });
                Ok(())
            }
            Event::Sent { conn, bytes } => self.sent(at, conn, &bytes),
            Event::Received { conn, bytes } => self.received(conn, &bytes),
            Event::ReadPaused { conn, until } => {
                self.conns[conn].pauses.push((at, until));
                Ok(())
            }
            Event::DeviceClosed { conn, dropped } => {
                let c = &mut self.conns[conn];
                c.closed.get_or_insert(at);
                c.dropped |= dropped;
                Ok(())
            }
            Event::Ended { conn, panicked } => {
                ensure!(!panicked, "the task of connection {conn} panicked");
                if let Some((since, slack, why)) = self.conns[conn].deadline {
                    let allowed = since + slack + self.stalled_within(since, at);
                    ensure!(
                        at <= allowed,
                        "connection {conn} ended {:?} after {why}",
                        at - since
                    );
                }
                self.conns[conn].ended = Some(at);
                Ok(())
            }
            Event::Took(taken) => self.took(at, taken),
            Event::Committed { msgs } => {
                for m in msgs {
                    self.commits.insert(m, true);
                }
                Ok(())
            }
            Event::Failed { msgs } => {
                self.outcome.failed_commits += 1;
                for (epoch, n) in msgs {
                    self.commits.insert((epoch, n), false);
                    if let Some(&i) = self.by_epoch.get(&epoch) {
                        let c = &mut self.conns[i];
                        c.failed.get_or_insert(at);
                        set_deadline(c, at, SLACK, "its commit failed");
                    }
                }
                Ok(())
            }
            Event::WriterStalled { until } => {
                self.stalls.push((at, until));
                Ok(())
            }
            Event::Revoked { device } => {
                self.enrolled[device_index(device)] = false;
                for c in &mut self.conns {
                    if c.ended.is_none()
                        && c.phase == Phase::Session
                        && c.model.as_ref().is_some_and(|m| m.device == device)
                    {
                        c.kicked.get_or_insert((at, "revoked"));
                        set_deadline(c, at, SLACK, "its device was revoked");
                        // A CONNECT still waiting for the device's previous session to end
                        // is refused once it is its turn.
                        if c.connack.is_none()
                            && let Some(Expect::Codes(codes)) = &mut c.expect
                        {
                            codes.push(if c.v5_connack { 0x86 } else { 4 });
                        }
                    }
                }
                Ok(())
            }
            Event::Enrolled { device } => {
                self.enrolled[device_index(device)] = true;
                Ok(())
            }
            Event::Direct {
                device,
                id,
                channel,
                encoding,
                qos,
                result,
            } => {
                self.directs.insert(
                    id,
                    DirectRec {
                        device,
                        channel,
                        encoding,
                        qos,
                        queued: result.is_ok(),
                        delivered: false,
                    },
                );
                Ok(())
            }
            Event::Shutdown => {
                self.shutdown = Some(at);
                for c in &mut self.conns {
                    if c.ended.is_none() {
                        c.kicked.get_or_insert((at, "shutdown"));
                        set_deadline(
                            c,
                            at,
                            SHUTDOWN_ACKS + WRITE_TIMEOUT + SLACK,
                            "the gateway began to shut down",
                        );
                    }
                }
                Ok(())
            }
        }
    }

    fn sent(&mut self, at: Instant, conn: usize, bytes: &[u8]) -> Check {
        let c = &mut self.conns[conn];
        if c.closed.is_some() || c.ended.is_some() {
            // Nobody reads it.
            return Ok(());
        }
        c.silence = c.silence.max(at.saturating_duration_since(c.last_sent));
        c.last_sent = at;
        match c.phase {
            Phase::Connecting => {
                c.stream.extend_from_slice(bytes);
                self.connecting(at, conn)
            }
            Phase::Session => {
                c.stream.extend_from_slice(bytes);
                self.session_packets(at, conn)
            }
            Phase::Refused | Phase::Untracked => Ok(()),
        }
    }

    /// Follows the front up to the CONNECT and predicts its answer.
    fn connecting(&mut self, at: Instant, conn: usize) -> Check {
        let limits = self.limits.clone();
        let c = &mut self.conns[conn];
        let deadline = c.opened + limits.connect_timeout;
        let level = match connect_level(&c.stream) {
            Ok(Some(level)) => level,
            Ok(None) if c.stream.len() > limits.max_packet => {
                c.phase = Phase::Refused;
                c.expect = Some(Expect::Nothing);
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Err(_) => {
                c.phase = Phase::Refused;
                c.expect = Some(Expect::Nothing);
                return Ok(());
            }
        };
        if at.saturating_duration_since(deadline) < Duration::from_millis(2)
            && deadline.saturating_duration_since(at) < Duration::from_millis(2)
        {
            c.phase = Phase::Untracked;
            return Ok(());
        }
        if at > deadline {
            c.phase = Phase::Refused;
            c.expect = Some(Expect::Nothing);
            return Ok(());
        }
        if level != 4 && level != 5 {
            c.phase = Phase::Refused;
            c.expect = Some(Expect::Codes(vec![1]));
            return Ok(());
        }
        let v5 = level == 5;
        c.v5_connack = v5;
        let mut proto = if v5 { Proto::V5(V5) } else { Proto::V4(V4) };
        let (connect, will, login) = match proto.next(&mut c.stream, limits.max_packet) {
            Parsed::NeedMore => return Ok(()),
            Parsed::Packet(Packet::Connect(connect, _, will, _, login), _) => {
                (connect, will, login)
            }
            _ => {
                c.phase = Phase::Refused;
                c.expect = Some(Expect::Nothing);
                return Ok(());
            }
        };
        c.requested_keep_alive = connect.keep_alive;
        let code = |v4: u8, v5code: u8| if v5 { v5code } else { v4 };
        let bad_login = code(4, 0x86);
        let unavailable = code(3, 0x88);
        let full = code(3, 0x97);
        let refuse = |c: &mut Conn, codes: Vec<u8>| {
            c.phase = Phase::Refused;
            c.expect = Some(Expect::Codes(codes));
        };
        let Some(login) = login else {
            refuse(c, vec![bad_login]);
            return Ok(());
        };
        let device = login.username.clone();
        if !connect.client_id.is_empty() && connect.client_id != device {
            refuse(c, vec![code(2, 0x85)]);
            return Ok(());
        }
        let known = DEVICES
            .iter()
            .position(|d| *d == device)
            .is_some_and(|i| self.enrolled[i]);
        if !known || login.password != secret(&device) {
            refuse(c, vec![bad_login]);
            return Ok(());
        }
        let will = match will {
            None => None,
            Some(w) => match std::str::from_utf8(&w.topic)
                .ok()
                .and_then(|t| policy::uplink(&device, t).ok())
            {
                Some((channel, encoding)) => Some((channel, encoding, w.message)),
                None => {
                    refuse(c, vec![code(5, 0x87)]);
                    return Ok(());
                }
            },
        };
        if self.shutdown.is_some() {
            // Refused, or cut before the CONNACK.
            c.phase = Phase::Refused;
            c.expect = None;
            return Ok(());
        }
        // The device budget, counted as the front counts it: sessions that hold their slot.
        let holding = |c: &Conn| c.phase == Phase::Session && c.ended.is_none();
        let ending = |c: &Conn| {
            c.kicked.is_some()
                || c.failed.is_some()
                || c.closed.is_some()
                || c.model.as_ref().is_some_and(|m| m.terminal.is_some())
        };
        let same_device = |c: &Conn| c.model.as_ref().is_some_and(|m| m.device == device);
        let others: Vec<&Conn> = self
            .conns
            .iter()
            .filter(|o| holding(o) && !same_device(o))
            .collect();
        let has_own = self.conns.iter().any(|o| holding(o) && same_device(o));
        let max = self.settings.max_connections();
        let mut codes = vec![0];
        if !has_own && others.len() >= max {
            if others.iter().filter(|o| !ending(o)).count() >= max {
                codes = vec![full];
            } else {
                codes.push(full);
            }
        }
        if has_own {
            // A previous session that does not end in time is reported by its own deadline;
            // the new connection is then refused.
            codes.push(unavailable);
        }
        let requested = Duration::from_secs(u64::from(connect.keep_alive));
        let keep_alive = if requested.is_zero() || requested > limits.max_keep_alive {
            limits.max_keep_alive
        } else {
            requested
        };
        let c = &mut self.conns[conn];
        if codes == [full] {
            refuse(c, codes);
            return Ok(());
        }
        c.phase = Phase::Session;
        c.expect = Some(Expect::Codes(codes));
        c.deadline = None;
        c.model = Some(Model {
            v5,
            device: device.clone(),
            proto,
            keep_alive,
            will,
            pubs: Vec::new(),
            acks: VecDeque::new(),
            committed_upto: 0,
            immediate: VecDeque::new(),
            terminal: None,
            lenient: false,
            next_match: 0,
            last_n: 0,
            q2: HashMap::new(),
            subs: Vec::new(),
            granted_ever: Vec::new(),
            directs_unacked: VecDeque::new(),
            will_taken: false,
            acked_upto: None,
            disconnect_read: None,
        });
        // The device's previous session is replaced.
        for (i, o) in self.conns.iter_mut().enumerate() {
            if i != conn && holding(o) && o.model.as_ref().is_some_and(|m| m.device == device) {
                o.kicked.get_or_insert((at, "taken over"));
                set_deadline(o, at, SLACK, "a new connection of its device");
            }
        }
        self.session_packets(at, conn)
    }

    /// Reads the session's packets as the session does, up to its last one.
    fn session_packets(&mut self, at: Instant, conn: usize) -> Check {
        let max_packet = self.limits.max_packet;
        let max_message = self.limits.max_message.clone();
        let c = &mut self.conns[conn];
        let Some(m) = c.model.as_mut() else {
            return Ok(());
        };
        while m.terminal.is_none() {
            let packet = match m.proto.next(&mut c.stream, max_packet) {
                Parsed::NeedMore => break,
                Parsed::Oversized(_) => {
                    m.terminal = Some(Terminal::Oversized);
                    break;
                }
                Parsed::Malformed(_) => {
                    m.terminal = Some(Terminal::Malformed);
                    break;
                }
                Parsed::Forbidden(_) => {
                    m.terminal = Some(Terminal::Violation);
                    break;
                }
                Parsed::Packet(p, peek) => (p, peek),
            };
            match packet {
                (Packet::Publish(p, _), peek) => {
                    let (qos, pkid) = peek.unwrap_or((0, 0));
                    let topic = String::from_utf8_lossy(&p.topic);
                    let permitted = policy::uplink(&m.device, &topic).ok();
                    let fits =
                        permitted.is_some_and(|(ch, _)| p.payload.len() <= max_message.of(ch));
                    let idx = m.pubs.len();
                    let mut retransmit = false;
                    if qos == 2 {
                        match m.q2.get(&pkid) {
                            None => {
                                m.q2.insert(pkid, Q2::Published(idx));
                            }
                            Some(&Q2::Published(j))
                                if !m.v5
                                    && m.pubs[j].payload == p.payload
                                    && m.pubs[j].permitted == permitted =>
                            {
                                retransmit = true;
                            }
                            Some(_) => m.lenient = true,
                        }
                    }
                    m.pubs.push(Pub {
                        qos,
                        pkid,
                        permitted,
                        fits,
                        payload: p.payload,
                        sent_at: at,
                        retransmit,
                        delivered: None,
                    });
                    if qos > 0 {
                        m.acks.push_back(idx);
                    }
                }
                (Packet::Subscribe(sub, _), _) => {
                    let mut codes = Vec::new();
                    for f in sub.filters {
                        match policy::subscribe(&m.device, &f.path) {
                            Ok(s) => {
                                let most = if s.channel == Downlink::Chunk { 0 } else { 1 };
                                let qos = (f.qos as u8).min(most);
                                m.subs
                                    .retain(|(ch, e, _)| (*ch, *e) != (s.channel, s.encoding));
                                m.subs.push((s.channel, s.encoding, qos));
                                m.granted_ever.push((s.channel, s.encoding, qos));
                                codes.push(qos);
                            }
                            Err(_) => codes.push(if m.v5 { 0x87 } else { 0x80 }),
                        }
                    }
                    m.immediate.push_back(Immediate::SubAck {
                        pkid: sub.pkid,
                        codes,
                    });
                }
                (Packet::Unsubscribe(unsub, _), _) => {
                    let mut codes = Vec::new();
                    for f in &unsub.filters {
                        let code = match policy::subscribe(&m.device, f) {
                            Ok(s) => {
                                let had = m
                                    .subs
                                    .iter()
                                    .any(|(ch, e, _)| (*ch, *e) == (s.channel, s.encoding));
                                m.subs
                                    .retain(|(ch, e, _)| (*ch, *e) != (s.channel, s.encoding));
                                if had { 0 } else { 0x11 }
                            }
                            Err(_) => 0x11,
                        };
                        codes.push(code);
                    }
                    if !m.v5 {
                        codes.clear();
                    }
                    m.immediate.push_back(Immediate::UnsubAck {
                        pkid: unsub.pkid,
                        codes,
                    });
                }
                (Packet::PubRel(rel, _), _) => {
                    let reason = match m.q2.get(&rel.pkid) {
                        Some(Q2::Recorded) => {
                            m.q2.insert(rel.pkid, Q2::Released);
                            Some(0)
                        }
                        Some(_) => {
                            // Released before its PUBREC, or twice.
                            m.lenient = true;
                            m.q2.remove(&rel.pkid);
                            None
                        }
                        None => Some(if m.v5 { 0x92 } else { 0 }),
                    };
                    let reason = if m.lenient && m.v5 { None } else { reason };
                    m.immediate.push_back(Immediate::PubComp {
                        pkid: rel.pkid,
                        reason,
                    });
                }
                (Packet::PubAck(ack, _), _) => {
                    m.directs_unacked.retain(|id| *id != ack.pkid);
                }
                (Packet::PubRec(..) | Packet::PubComp(..), _) => {}
                (Packet::PingReq(_), _) => m.immediate.push_back(Immediate::PingResp),
                (Packet::Disconnect(d, _), _) => {
                    m.terminal = Some(Terminal::Disconnect {
                        will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                    });
                }
                _ => m.terminal = Some(Terminal::Violation),
            }
        }
        Ok(())
    }

    fn received(&mut self, conn: usize, bytes: &[u8]) -> Check {
        if self.conns[conn].phase == Phase::Untracked {
            return Ok(());
        }
        self.conns[conn].inbox.extend_from_slice(bytes);
        loop {
            let c = &mut self.conns[conn];
            let v5 = match &c.model {
                Some(m) if c.connack.is_some() => m.v5,
                _ => c.v5_connack,
            };
            let packet = match device::read_server(&mut c.inbox, v5) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("connection {conn} got {e}")),
            };
            self.server_packet(conn, packet)?;
        }
    }

    fn server_packet(&mut self, conn: usize, packet: FromServer) -> Check {
        let limits = self.limits.clone();
        let settings = self.settings;
        let c = &mut self.conns[conn];
        if c.phase == Phase::Untracked {
            return Ok(());
        }
        let Some(code) = c.connack else {
            let FromServer::ConnAck { code, props } = packet else {
                return Err(format!("connection {conn}: {packet:?} before its CONNACK"));
            };
            c.connack = Some(code);
            match &c.expect {
                Some(Expect::Codes(codes)) => ensure!(
                    codes.contains(&code),
                    "connection {conn}: CONNACK {code:#x}, expected one of {codes:x?}"
                ),
                Some(Expect::Nothing) => {
                    return Err(format!(
                        "connection {conn}: CONNACK {code:#x} where none was due"
                    ));
                }
                None => {}
            }
            if code != 0 {
                c.phase = Phase::Refused;
                c.model = None;
                return Ok(());
            }
            ensure!(
                c.phase == Phase::Session,
                "connection {conn} accepted where it must be refused"
            );
            if let (Some(m), Some(props)) = (&c.model, props) {
                let requested = c.requested_keep_alive;
                let server = (u64::from(requested) != m.keep_alive.as_secs())
                    .then_some(m.keep_alive.as_secs() as u16);
                ensure!(
                    props.receive_max == Some(limits.max_inflight)
                        && props.max_packet == Some(limits.max_packet as u32)
                        && props.server_keep_alive == server,
                    "connection {conn}: CONNACK properties {props:?} (keep alive asked {requested})"
                );
            }
            return Ok(());
        };
        ensure!(
            code == 0,
            "connection {conn}: {packet:?} after a refusing CONNACK"
        );
        let epoch = c.epoch;
        let Some(m) = c.model.as_mut() else {
            return Ok(());
        };
        ensure!(
            m.disconnect_read.is_none(),
            "connection {conn}: {packet:?} after the gateway's DISCONNECT"
        );
        match packet {
            FromServer::ConnAck { .. } => Err(format!("connection {conn}: a second CONNACK")),
            FromServer::Ack { rec, pkid, reason } => {
                self.outcome.acks += 1;
                let Some(idx) = m.acks.pop_front() else {
                    return Err(format!(
                        "connection {conn}: acknowledgement of {pkid} with no publish waiting"
                    ));
                };
                let p = &m.pubs[idx];
                ensure!(
                    rec == (p.qos == 2) && pkid == p.pkid,
                    "connection {conn}: {} of {pkid}, expected the {} of publish {idx} (QoS {}, id {})",
                    if rec { "PUBREC" } else { "PUBACK" },
                    if p.qos == 2 { "PUBREC" } else { "PUBACK" },
                    p.qos,
                    p.pkid
                );
                m.acked_upto = Some(idx);
                if p.qos == 2 && matches!(m.q2.get(&pkid), Some(Q2::Published(_))) {
                    if m.v5 && reason.unwrap_or(0) >= 0x80 {
                        m.q2.remove(&pkid);
                    } else {
                        m.q2.insert(pkid, Q2::Recorded);
                    }
                }
                // Everything up to this publish is with the writer, and committed.
                if !settings.ack_on_receipt() {
                    for j in m.committed_upto..=idx {
                        let q = &m.pubs[j];
                        match q.delivered {
                            // A publish the writer took has its session online (checked
                            // where it is taken): `epoch` is known.
                            Some((n, _)) => match epoch.and_then(|e| self.commits.get(&(e, n))) {
                                Some(true) => {}
                                Some(false) => {
                                    return Err(format!(
                                        "connection {conn}: publish {j} acknowledged (with publish {idx}) though its commit failed"
                                    ));
                                }
                                None => {
                                    return Err(format!(
                                        "connection {conn}: publish {j} acknowledged (with publish {idx}) before its commit"
                                    ));
                                }
                            },
                            None if q.deliverable(m.lenient) => {
                                return Err(format!(
                                    "connection {conn}: publish {j} acknowledged (with publish {idx}) before the writer had it"
                                ));
                            }
                            None => {}
                        }
                    }
                    m.committed_upto = idx + 1;
                }
                // The verdict.
                let p = &m.pubs[idx];
                if m.v5 && (p.qos < 2 || !m.lenient) {
                    let expected = if p.permitted.is_none() {
                        0x87
                    } else if !p.fits {
                        0x83
                    } else if settings.ack_on_receipt() {
                        0
                    } else {
                        match p.delivered {
                            Some((_, None)) => 0,
                            Some((_, Some(Refusal::Invalid))) => 0x99,
                            Some((_, Some(Refusal::Unknown))) => 0x80,
                            Some((_, Some(Refusal::NotAuthorized))) => 0x87,
                            // Checked above: only in receipt mode.
                            None => 0,
                        }
                    };
                    ensure!(
                        reason.unwrap_or(0) == expected,
                        "connection {conn}: publish {idx} answered {:#x}, expected {expected:#x} ({p:?})",
                        reason.unwrap_or(0)
                    );
                }
                Ok(())
            }
            FromServer::PubComp { pkid, reason } => {
                let Some(Immediate::PubComp {
                    pkid: want,
                    reason: why,
                }) = m.immediate.pop_front()
                else {
                    return Err(format!("connection {conn}: PUBCOMP {pkid} not due"));
                };
                ensure!(
                    pkid == want && why.is_none_or(|w| reason.unwrap_or(0) == w),
                    "connection {conn}: PUBCOMP {pkid} {reason:?}, expected {want} {why:?}"
                );
                if m.q2.get(&pkid) == Some(&Q2::Released) {
                    m.q2.remove(&pkid);
                }
                Ok(())
            }
            FromServer::SubAck { pkid, codes } => {
                let want = m.immediate.pop_front();
                ensure!(
                    want == Some(Immediate::SubAck {
                        pkid,
                        codes: codes.clone()
                    }),
                    "connection {conn}: SUBACK {pkid} {codes:x?}, expected {want:?}"
                );
                Ok(())
            }
            FromServer::UnsubAck { pkid, codes } => {
                let want = m.immediate.pop_front();
                ensure!(
                    want == Some(Immediate::UnsubAck {
                        pkid,
                        codes: codes.clone()
                    }),
                    "connection {conn}: UNSUBACK {pkid} {codes:x?}, expected {want:?}"
                );
                Ok(())
            }
            FromServer::PingResp => {
                let want = m.immediate.pop_front();
                ensure!(
                    want == Some(Immediate::PingResp),
                    "connection {conn}: PINGRESP, expected {want:?}"
                );
                Ok(())
            }
            FromServer::Disconnect { reason } => {
                m.disconnect_read = Some(reason);
                Ok(())
            }
            FromServer::Publish {
                qos,
                pkid,
                topic,
                payload,
            } => {
                let id = std::str::from_utf8(&payload)
                    .ok()
                    .and_then(|s| s.strip_prefix('D'))
                    .and_then(|s| s.split_once(':'))
                    .and_then(|(id, _)| id.parse::<u32>().ok());
                let Some(d) = id.and_then(|id| self.directs.get_mut(&id)) else {
                    return Err(format!(
                        "connection {conn}: a publish the gateway was never given: {payload:02x?}"
                    ));
                };
                ensure!(
                    d.queued,
                    "connection {conn}: a direct message its session refused"
                );
                ensure!(
                    !d.delivered,
                    "connection {conn}: a direct message delivered twice"
                );
                d.delivered = true;
                ensure!(
                    d.device == m.device,
                    "connection {conn} of {} got a message for {}",
                    m.device,
                    d.device
                );
                let want = topic::format(d.device, Channel::Down(d.channel), d.encoding);
                ensure!(
                    topic == want.as_bytes(),
                    "connection {conn}: direct message on {:?}, expected {want}",
                    String::from_utf8_lossy(&topic)
                );
                ensure!(
                    m.granted_ever.iter().any(
                        |&(ch, e, g)| (ch, e) == (d.channel, d.encoding) && d.qos.min(g) == qos
                    ),
                    "connection {conn}: direct message at QoS {qos} (sent at {}, subscribed {:?})",
                    d.qos,
                    m.granted_ever
                );
                if qos == 1 {
                    ensure!(
                        pkid != 0 && !m.directs_unacked.contains(&pkid),
                        "connection {conn}: direct message with packet id {pkid} in flight {:?}",
                        m.directs_unacked
                    );
                    m.directs_unacked.push_back(pkid);
                }
                Ok(())
            }
        }
    }

    fn took(&mut self, at: Instant, taken: Taken) -> Check {
        let settings = self.settings;
        match taken {
            Taken::Presence {
                epoch,
                device,
                online,
                peer,
                reason,
            } => {
                let conn = peer_conn(&peer)?;
                if online {
                    self.outcome.sessions += 1;
                    ensure!(
                        !self.by_epoch.contains_key(&epoch),
                        "session epoch {epoch} online twice"
                    );
                    self.by_epoch.insert(epoch, conn);
                    let c = &mut self.conns[conn];
                    c.epoch = Some(epoch);
                    c.online = true;
                    ensure!(
                        matches!(c.phase, Phase::Session | Phase::Untracked),
                        "connection {conn} went online though it must be refused"
                    );
                    if let Some(m) = &c.model {
                        ensure!(
                            m.device == device,
                            "connection {conn} online as {device}, authenticated as {}",
                            m.device
                        );
                    }
                    if let Some(other) = self.live.insert(device.clone(), epoch) {
                        return Err(format!(
                            "{device} online in session {epoch} while session {other} is not yet offline"
                        ));
                    }
                    return Ok(());
                }
                let reason = reason.unwrap_or("");
                ensure!(
                    self.by_epoch.get(&epoch) == Some(&conn),
                    "offline of session {epoch} that never went online"
                );
                ensure!(
                    self.offline.insert(epoch, reason).is_none(),
                    "session {epoch} offline twice"
                );
                ensure!(
                    self.live.remove(&device) == Some(epoch),
                    "{device} offline in session {epoch}, which was not its live one"
                );
                *self.outcome.ends.entry(reason).or_default() += 1;
                self.conns[conn].end_reason = Some(reason);
                self.explain_end(at, conn, reason)
            }
            Taken::Rejected { device, count } => {
                *self.rejected_reported.entry(device).or_default() += count;
                Ok(())
            }
            Taken::Marker => Ok(()),
            Taken::Uplink {
                epoch,
                n,
                channel,
                encoding,
                payload,
                rejected,
                verdict,
            } => {
                let Some(&conn) = self.by_epoch.get(&epoch) else {
                    return Err(format!(
                        "a message of session {epoch} before it went online"
                    ));
                };
                ensure!(
                    !self.offline.contains_key(&epoch),
                    "a message of session {epoch} after it went offline"
                );
                let c = &mut self.conns[conn];
                let Some(m) = c.model.as_mut() else {
                    return Ok(());
                };
                *self.rejected_reported.entry(m.device.clone()).or_default() += rejected;
                let Some(n) = n else {
                    ensure!(!m.will_taken, "connection {conn}: two wills");
                    m.will_taken = true;
                    ensure!(
                        m.will.as_ref() == Some(&(channel, encoding, payload.clone())),
                        "connection {conn}: will {channel:?} {encoding:?} {payload:02x?}, expected {:?}",
                        m.will
                    );
                    return Ok(());
                };
                self.outcome.delivered += 1;
                ensure!(
                    n == m.last_n + 1,
                    "connection {conn}: message {n} after message {}",
                    m.last_n
                );
                m.last_n = n;
                // The first publish after the last matched one that this message can be; none
                // that had to reach the writer may be passed over.
                let mut found = None;
                for j in m.next_match..m.pubs.len() {
                    let p = &m.pubs[j];
                    let candidate = p.permitted == Some((channel, encoding))
                        && p.fits
                        && !p.retransmit
                        && p.payload == payload;
                    if candidate {
                        found = Some(j);
                        break;
                    }
                    if p.deliverable(m.lenient) {
                        return Err(format!(
                            "connection {conn}: message {n} ({channel:?} {payload:02x?}) is not publish {j} ({p:?}), which is due first"
                        ));
                    }
                }
                let Some(j) = found else {
                    return Err(format!(
                        "connection {conn}: message {n} ({channel:?} {encoding:?} {payload:02x?}) matches no publish the device sent"
                    ));
                };
                m.next_match = j + 1;
                m.pubs[j].delivered = Some((n, verdict));
                let sent_at = m.pubs[j].sent_at;
                if let Some((kicked, why)) = c.kicked {
                    ensure!(
                        sent_at < kicked,
                        "connection {conn}: publish {j} sent after the session was {why} reached the writer"
                    );
                }
                if let Some(failed) = c.failed {
                    ensure!(
                        sent_at < failed,
                        "connection {conn}: publish {j} sent after the session's commit failed reached the writer"
                    );
                }
                if !settings.ack_on_receipt() {
                    ensure!(
                        m.acked_upto.is_none_or(|a| a < j),
                        "connection {conn}: publish {j} reached the writer after publish {:?} was acknowledged",
                        m.acked_upto
                    );
                }
                Ok(())
            }
        }
    }

    /// Checks that a session ended for a reason it had.
    fn explain_end(&mut self, at: Instant, conn: usize, reason: &'static str) -> Check {
        let shutdown = self.shutdown.is_some();
        let stalled = self.stalled_within(self.conns[conn].opened, at);
        let c = &mut self.conns[conn];
        let Some(m) = c.model.as_ref() else {
            return Ok(());
        };
        let terminal = m.terminal;
        let kicked = c.kicked.map(|(_, why)| why);
        let ok = match reason {
            "disconnect" => matches!(terminal, Some(Terminal::Disconnect { .. })),
            "packet too large" => terminal == Some(Terminal::Oversized),
            "malformed packet" => terminal == Some(Terminal::Malformed),
            "protocol violation" => terminal == Some(Terminal::Violation),
            // Reading the end of the stream means every packet before it was taken, the last
            // one included; a dropped connection can also fail a write first.
            "connection closed" => c.closed.is_some() && (c.dropped || terminal.is_none()),
            // The device was silent for as long at least once. (Not necessarily the last
            // time: the session may end long before its task does, and the writer take the
            // offline long after that, when it is stalled; what the device sends in between
            // stays in the pipe.)
            "keep alive timeout" => {
                c.ended
                    .unwrap_or(at)
                    .saturating_duration_since(c.last_sent)
                    .max(c.silence)
                    + Duration::from_millis(1)
                    >= m.keep_alive + m.keep_alive / 2
            }
            // The writer hears of the end after the session's last writes and close, which
            // may take a while of their own.
            "device stopped reading" => c.pauses.iter().any(|&(from, until)| {
                from + WRITE_TIMEOUT <= at + Duration::from_secs(1) && until + SLACK + stalled >= at
            }),
            "replaced by a new connection" => kicked == Some("taken over"),
            "enrollment revoked" => kicked == Some("revoked"),
            "gateway shutting down" => shutdown,
            "storage failed" => c.failed.is_some(),
            _ => false,
        };
        ensure!(
            ok,
            "connection {conn} ended with {reason:?}: terminal {terminal:?}, kicked {kicked:?}, closed {:?}, last sent {:?} before, keep alive {:?}",
            c.closed.map(|t| at - t),
            at - c.last_sent,
            m.keep_alive
        );
        // The will goes to the writer before the offline, if the end sends it and it fits.
        let sends_will = match reason {
            "disconnect" => terminal == Some(Terminal::Disconnect { will: true }),
            _ => true,
        };
        let fits = m
            .will
            .as_ref()
            .is_some_and(|(ch, _, p)| p.len() <= self.limits.max_message.of(*ch));
        ensure!(
            m.will_taken == (sends_will && fits),
            "connection {conn} ended with {reason:?}: will sent {}, will {:?}",
            m.will_taken,
            m.will
        );
        Ok(())
    }

    /// After the final phase, when every connection has ended: what must hold at the end.
    pub fn finish(&self, metrics: &crate::metrics::Metrics, sessions: usize) -> Check {
        use crate::metrics::Reject;
        for (i, c) in self.conns.iter().enumerate() {
            ensure!(c.ended.is_some(), "connection {i} never ended");
            if let Some(epoch) = c.epoch {
                ensure!(
                    self.offline.contains_key(&epoch),
                    "connection {i} (session {epoch}) never went offline"
                );
            }
            let (Some(m), Some(reason)) = (&c.model, c.end_reason) else {
                continue;
            };
            if let Some(read) = m.disconnect_read {
                let want = match reason {
                    "keep alive timeout" => Some(0x8d),
                    "replaced by a new connection" => Some(0x8e),
                    "enrollment revoked" => Some(0x87),
                    "gateway shutting down" => Some(0x8b),
                    "packet too large" => Some(0x95),
                    "malformed packet" => Some(0x81),
                    "protocol violation" => Some(0x82),
                    "storage failed" => Some(0x80),
                    _ => None,
                };
                ensure!(
                    want.is_some() && read == want,
                    "connection {i} ended with {reason:?} and told the device {read:x?}"
                );
            }
        }
        ensure!(sessions == 0, "{sessions} sessions still registered");
        ensure!(
            metrics.connected.get() == 0,
            "connected gauge at {}",
            metrics.connected.get()
        );
        let ends = |r: &str| self.outcome.ends.get(r).copied().unwrap_or(0) as u64;
        for (reject, reason) in [
            (Reject::Oversized, "packet too large"),
            (Reject::Malformed, "malformed packet"),
            (Reject::ProtocolViolation, "protocol violation"),
        ] {
            ensure!(
                metrics.rejected_count(reject) == ends(reason),
                "{} {reason:?} ends, {} counted as {}",
                ends(reason),
                metrics.rejected_count(reject),
                reject.name()
            );
        }
        for d in DEVICES {
            let counted = metrics.refusals(d).0;
            let reported = self.rejected_reported.get(d).copied().unwrap_or(0);
            ensure!(
                counted == reported,
                "{d}: {counted} refusals counted, {reported} reported to the writer"
            );
        }
        Ok(())
    }
}

fn device_index(device: &str) -> usize {
    DEVICES.iter().position(|d| *d == device).unwrap_or(0)
}

/// Keeps the earliest deadline.
fn set_deadline(c: &mut Conn, at: Instant, slack: Duration, why: &'static str) {
    if c.ended.is_some() {
        return;
    }
    match c.deadline {
        Some((since, s, _)) if since + s <= at + slack => {}
        _ => c.deadline = Some((at, slack, why)),
    }
}

/// The connection a peer address stands for (see `sim::peer`).
fn peer_conn(peer: &str) -> Result<usize, String> {
    let addr: std::net::SocketAddr = peer
        .parse()
        .map_err(|_| format!("presence with peer {peer:?}"))?;
    Ok(usize::from(addr.port() - super::sim::FIRST_PORT))
}
