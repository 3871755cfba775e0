//! Runs a [`Script`] against the real front and its sessions: each device connection is an
//! in-memory stream (`tokio::io::duplex`) served by `Front::connection`, the storage writer is
//! [`FakeWriter`], and time is tokio's paused clock, so keep alives and timeouts cost no real
//! time and every run is bounded in steps ([`MAX_OPS`](super::script::MAX_OPS)) and in
//! simulated time. After every step the trace goes through the [`Checker`]; at the end every
//! device closes its side, the writer recovers, and every connection must end within
//! [`FINAL_BOUND`].

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use fleetgate_config::{Config, IngestAck, MaxMessageBytes};
use fleetgate_protocol::{Channel, Downlink, Encoding, Uplink, topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::check::{Checker, Limits, Outcome};
use super::device::{self, Connect};
use super::script::*;
use super::writer::{Event, FakeWriter, Trace};
use crate::auth::{Credentials, digest};
use crate::broker::front::{Front, Sessions};
use crate::bus::{Direct, Kick, Links, Uplinks};
use crate::metrics::Metrics;

/// Connection `n` comes from port `FIRST_PORT + n`: the writer's presence events name it.
pub(super) const FIRST_PORT: u16 = 10_000;
/// `mqtt.max_packet_bytes` of the simulated gateway.
const MAX_PACKET: usize = 1024;
/// Simulated time after which a script's remaining operations are skipped.
const MAX_TIME: Duration = Duration::from_secs(30 * 60);
/// After the last operation, every connection must have ended within this.
const FINAL_BOUND: Duration = Duration::from_secs(15);

/// Runs the script `input` decodes to. `Err` says which check failed.
pub fn run(input: &[u8]) -> Result<Outcome, String> {
    let script = Script::decode(input);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let mut sim = Sim::new(script.settings);
        let result = sim.run(&script.ops).await;
        // Whatever happened, the device tasks go before the runtime does.
        for slot in 0..SLOTS {
            sim.drop_slot(slot);
        }
        result
    })
}

fn config(s: &Settings) -> Config {
    static BASE: OnceLock<Config> = OnceLock::new();
    let mut c = BASE.get_or_init(Config::default).clone();
    c.mqtt.max_packet_bytes = MAX_PACKET;
    c.mqtt.connect_timeout = Duration::from_secs(5);
    c.mqtt.max_keep_alive = Duration::from_secs(60);
    c.mqtt.max_connections = s.max_connections();
    c.mqtt.max_inflight = s.max_inflight();
    c.ingest.ack = if s.ack_on_receipt() {
        IngestAck::Receipt
    } else {
        IngestAck::Commit
    };
    (c.limits.device_messages_per_second, c.limits.device_burst) = s.rate();
    c.limits.max_message_bytes = MaxMessageBytes {
        hello: 300,
        telemetry: 200,
        alert: 100,
        log: 100,
        ack: 100,
        report: 100,
    };
    c
}

enum DevCmd {
    Write(Vec<u8>),
    Eof,
}

/// A device's end of one connection.
struct Slot {
    conn: usize,
    to_device: mpsc::UnboundedSender<DevCmd>,
    pause: watch::Sender<Option<Instant>>,
    tasks: [JoinHandle<()>; 2],
    /// The rest of a half-sent packet, sent before anything else.
    tail: Vec<u8>,
    v5: bool,
    device: &'static str,
    next_pkid: u16,
    prev_pkid: u16,
    /// The latest QoS 1/2 publishes, for sending again.
    sent_qos: Vec<Vec<u8>>,
}

struct Sim {
    settings: Settings,
    front: Arc<Front>,
    sessions: Arc<Sessions>,
    credentials: Arc<Credentials>,
    metrics: Arc<Metrics>,
    uplinks: Uplinks,
    shutdown: CancellationToken,
    writer: FakeWriter,
    trace: Trace,
    checker: Checker,
    limits: Limits,
    slots: [Option<Slot>; SLOTS as usize],
    conns: usize,
    tag: u32,
    direct_id: u32,
    sub_pkid: u16,
}

impl Sim {
    fn new(settings: Settings) -> Sim {
        let config = config(&settings);
        let credentials = Arc::new(Credentials::default());
        for d in &DEVICES[..2] {
            credentials.set(d, digest(&secret(d)));
        }
        let metrics = Arc::new(Metrics::new(Duration::from_secs(10)));
        let sessions = Arc::new(Sessions::new(4));
        let (queue, bytes) = settings.queue();
        let (tx, rx) = flume::bounded(queue);
        let uplinks = Uplinks::new(tx, bytes);
        let shutdown = CancellationToken::new();
        let front = Arc::new(Front::new(
            &config,
            credentials.clone(),
            metrics.clone(),
            sessions.clone(),
            uplinks.clone(),
            shutdown.clone(),
        ));
        let trace = Trace::default();
        let writer = FakeWriter::new(trace.clone(), settings.auto_commit == 1);
        tokio::spawn(writer.clone().run(rx));
        let limits = Limits {
            max_packet: MAX_PACKET,
            max_message: config.limits.max_message_bytes.clone(),
            max_keep_alive: config.mqtt.max_keep_alive,
            connect_timeout: config.mqtt.connect_timeout,
            max_inflight: config.mqtt.max_inflight,
        };
        Sim {
            settings,
            front,
            sessions,
            credentials,
            metrics,
            uplinks,
            shutdown,
            writer,
            trace,
            checker: Checker::new(settings, limits.clone()),
            limits,
            slots: Default::default(),
            conns: 0,
            tag: 0,
            direct_id: 0,
            sub_pkid: 0,
        }
    }

    async fn run(&mut self, ops: &[Op]) -> Result<Outcome, String> {
        let start = Instant::now();
        for (i, op) in ops.iter().enumerate() {
            if Instant::now() - start > MAX_TIME {
                break;
            }
            let stop = self.apply(op).await;
            self.settle()
                .await
                .map_err(|e| format!("after op {i} ({op:?}): {e}"))?;
            if stop {
                break;
            }
        }
        self.finish()
            .await
            .map_err(|e| format!("at the end: {e}"))?;
        Ok(self.checker.outcome.clone())
    }

    /// Lets every task run until all wait (time moves on by a millisecond at most), then
    /// checks what happened.
    async fn settle(&mut self) -> Result<(), String> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.check()
    }

    fn check(&mut self) -> Result<(), String> {
        self.checker.absorb(self.trace.take())?;
        self.checker.tick(Instant::now())?;
        let (queue, bytes) = self.settings.queue();
        let (len, used) = (self.uplinks.writer().len(), self.uplinks.bytes_used());
        if len > queue || used > bytes {
            return Err(format!(
                "writer queue at {len} messages and {used} bytes, over {queue} and {bytes}"
            ));
        }
        Ok(())
    }

    /// Every device closes its sending side and reads what comes; the writer recovers. Every
    /// connection must then end, and the end state must be clean.
    async fn finish(&mut self) -> Result<(), String> {
        self.writer.heal();
        for s in self.slots.iter_mut().flatten() {
            let _ = s.pause.send(None);
            let _ = s.to_device.send(DevCmd::Eof);
            self.trace.push(Event::DeviceClosed {
                conn: s.conn,
                dropped: false,
            });
        }
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.check()?;
            if self.checker.all_ended() {
                break;
            }
            if Instant::now() - start > FINAL_BOUND {
                return Err(format!(
                    "connections still open {FINAL_BOUND:?} after their devices closed: {:?}",
                    (0..self.conns)
                        .filter(|c| !self.checker.ended(*c))
                        .collect::<Vec<_>>()
                ));
            }
        }
        // The writer takes the last presence events.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.check()?;
        self.checker.finish(&self.metrics, self.sessions.len())?;
        if self.uplinks.bytes_used() != 0 {
            return Err(format!(
                "{} bytes of the writer queue still held",
                self.uplinks.bytes_used()
            ));
        }
        Ok(())
    }

    fn open(&mut self, slot: u8) {
        self.drop_slot(slot);
        let conn = self.conns;
        self.conns += 1;
        self.trace.push(Event::Opened { conn });
        let (client, server) = tokio::io::duplex(self.settings.pipe());
        let (rd, wr) = tokio::io::split(client);
        let (to_device, rx) = mpsc::unbounded_channel();
        let (pause, pause_rx) = watch::channel(None);
        let tasks = [
            tokio::spawn(device_writer(wr, rx)),
            tokio::spawn(device_reader(rd, pause_rx, conn, self.trace.clone())),
        ];
        let peer = SocketAddr::from(([127, 0, 0, 1], FIRST_PORT + conn as u16));
        let deadline = Instant::now() + self.limits.connect_timeout;
        let task = tokio::spawn(self.front.clone().connection(server, peer, deadline));
        let trace = self.trace.clone();
        tokio::spawn(async move {
            let result = task.await;
            trace.push(Event::Ended {
                conn,
                panicked: result.is_err(),
            });
        });
        self.slots[usize::from(slot)] = Some(Slot {
            conn,
            to_device,
            pause,
            tasks,
            tail: Vec::new(),
            v5: false,
            device: DEVICES[0],
            next_pkid: 1,
            prev_pkid: 1,
            sent_qos: Vec::new(),
        });
    }

    /// The device drops its connection.
    fn drop_slot(&mut self, slot: u8) {
        if let Some(s) = self.slots[usize::from(slot)].take() {
            for t in &s.tasks {
                t.abort();
            }
            self.trace.push(Event::DeviceClosed {
                conn: s.conn,
                dropped: true,
            });
        }
    }

    fn send(&mut self, slot: u8, bytes: &[u8]) {
        let Some(s) = self.slots[usize::from(slot)].as_mut() else {
            return;
        };
        let mut all = std::mem::take(&mut s.tail);
        all.extend_from_slice(bytes);
        self.trace.push(Event::Sent {
            conn: s.conn,
            bytes: all.clone(),
        });
        let _ = s.to_device.send(DevCmd::Write(all));
    }

    fn next_tag(&mut self) -> u32 {
        self.tag += 1;
        self.tag
    }

    /// Carries out one operation; `true` ends the script.
    async fn apply(&mut self, op: &Op) -> bool {
        match *op {
            Op::Open { slot } => self.open(slot),
            Op::Connect {
                slot,
                level,
                user,
                password,
                client_id,
                keep_alive,
                will,
            } => self.connect(slot, level, user, password, client_id, keep_alive, will),
            Op::Publish {
                slot,
                qos,
                topic,
                payload,
                pkid,
                flags,
            } => self.publish(slot, qos, topic, payload, pkid, flags),
            Op::Republish { slot, back } => {
                if let Some(s) = self.slots[usize::from(slot)].as_ref() {
                    let back = usize::from(back);
                    if back < s.sent_qos.len() {
                        let mut p = s.sent_qos[s.sent_qos.len() - 1 - back].clone();
                        p[0] |= 0x08;
                        self.send(slot, &p);
                    }
                }
            }
            Op::Ack { slot, kind, id } => {
                let Some(s) = self.slots[usize::from(slot)].as_ref() else {
                    return false;
                };
                let kind = ACK_KINDS[usize::from(kind)];
                let pkid = match ACK_IDS[usize::from(id)] {
                    AckId::Due => match kind {
                        AckKind::PubRel => self.checker.due_pubrel(s.conn),
                        _ => self.checker.due_puback(s.conn),
                    }
                    .unwrap_or(1),
                    AckId::Fixed(id) => id,
                    AckId::Previous => s.prev_pkid,
                };
                let first = match kind {
                    AckKind::PubAck => 0x40,
                    AckKind::PubRec => 0x50,
                    AckKind::PubRel => 0x62,
                    AckKind::PubComp => 0x70,
                };
                self.send(slot, &device::ack(first, pkid));
            }
            Op::Subscribe {
                slot,
                filters,
                count,
                qos,
            } => {
                let Some(s) = self.slots[usize::from(slot)].as_ref() else {
                    return false;
                };
                let (v5, dev) = (s.v5, s.device);
                let filters: Vec<(Vec<u8>, u8)> = filters[..=usize::from(count)]
                    .iter()
                    .map(|f| (filter(dev, FILTERS[usize::from(*f)]), qos))
                    .collect();
                let pkid = self.next_sub_pkid();
                self.send(slot, &device::subscribe(v5, pkid, &filters));
            }
            Op::Unsubscribe {
                slot,
                filters,
                count,
            } => {
                let Some(s) = self.slots[usize::from(slot)].as_ref() else {
                    return false;
                };
                let (v5, dev) = (s.v5, s.device);
                let filters: Vec<Vec<u8>> = filters[..=usize::from(count)]
                    .iter()
                    .map(|f| filter(dev, FILTERS[usize::from(*f)]))
                    .collect();
                let pkid = self.next_sub_pkid();
                self.send(slot, &device::unsubscribe(v5, pkid, &filters));
            }
            Op::Ping { slot } => self.send(slot, &[0xc0, 0]),
            Op::Disconnect { slot, will } => {
                let v5 = self.slots[usize::from(slot)].as_ref().is_some_and(|s| s.v5);
                if v5 && will == 1 {
                    self.send(slot, &[0xe0, 2, 0x04, 0]);
                } else {
                    self.send(slot, &[0xe0, 0]);
                }
            }
            Op::ServerOnly { slot, kind } => {
                let bytes: &[u8] = match SERVER_ONLY[usize::from(kind)] {
                    ServerOnly::ConnAck => &[0x20, 2, 0, 0],
                    ServerOnly::SubAck => &[0x90, 3, 0, 1, 0],
                    ServerOnly::UnsubAck => &[0xb0, 2, 0, 1],
                    ServerOnly::PingResp => &[0xd0, 0],
                    ServerOnly::Reserved => &[0x00, 0],
                    ServerOnly::Auth => &[0xf0, 0],
                };
                self.send(slot, bytes);
            }
            Op::Raw { slot, ref bytes } => {
                if self.slots[usize::from(slot)].is_none() {
                    self.open(slot);
                }
                self.send(slot, bytes);
            }
            Op::Half { slot, cut, qos } => {
                let Some(s) = self.slots[usize::from(slot)].as_ref() else {
                    return false;
                };
                let (v5, dev, conn, from) = (s.v5, s.device, s.conn, s.next_pkid);
                let pkid = self.checker.free_pkid(conn, from);
                let tag = self.next_tag();
                let topic = topic::format(dev, Channel::Up(Uplink::Telemetry), Encoding::Json);
                let payload = format!("{{\"t\":{tag}}}");
                let p = device::publish(v5, qos, pkid, 0, topic.as_bytes(), payload.as_bytes());
                let k = CUTS[usize::from(cut)].min(p.len() - 1);
                self.note_publish(slot, qos, pkid, &p);
                self.send(slot, &p[..k]);
                if let Some(s) = self.slots[usize::from(slot)].as_mut() {
                    s.tail = p[k..].to_vec();
                }
            }
            Op::Oversize { slot, whole } => {
                let Some(s) = self.slots[usize::from(slot)].as_ref() else {
                    return false;
                };
                if whole == 0 {
                    self.send(slot, &[0x30, 0xff, 0xff, 0xff, 0x7f]);
                } else {
                    let topic =
                        topic::format(s.device, Channel::Up(Uplink::Telemetry), Encoding::Json);
                    // 1 + 2 (length) + 2 + topic + (v5: 1) + payload = MAX_PACKET + 1
                    let payload = vec![b'{'; MAX_PACKET + 1 - 5 - topic.len() - usize::from(s.v5)];
                    let p = device::publish(s.v5, 0, 0, 0, topic.as_bytes(), &payload);
                    debug_assert_eq!(p.len(), MAX_PACKET + 1);
                    self.send(slot, &p);
                }
            }
            Op::StopReading { slot, secs } => {
                if let Some(s) = self.slots[usize::from(slot)].as_ref() {
                    let until =
                        Instant::now() + Duration::from_secs(STOP_READING[usize::from(secs)]);
                    let _ = s.pause.send(Some(until));
                    self.trace.push(Event::ReadPaused {
                        conn: s.conn,
                        until,
                    });
                }
            }
            Op::Close { slot, how } => {
                if how == 1 {
                    self.drop_slot(slot);
                } else if let Some(s) = self.slots[usize::from(slot)].as_ref() {
                    let _ = s.to_device.send(DevCmd::Eof);
                    self.trace.push(Event::DeviceClosed {
                        conn: s.conn,
                        dropped: false,
                    });
                }
            }
            Op::Wait { ms } => {
                tokio::time::sleep(Duration::from_millis(WAITS[usize::from(ms)])).await;
            }
            Op::Writer { action } => match WRITER_ACTIONS[usize::from(action)] {
                WriterAction::Commit => self.writer.commit(),
                WriterAction::Fail => self.writer.fail(),
                WriterAction::Stall(d) => self.writer.stall(d),
                WriterAction::Auto(on) => self.writer.set_auto(on),
            },
            Op::Revoke { device } => {
                let d = DEVICES[usize::from(device)];
                self.credentials.remove(d);
                self.writer.revoke(d);
                self.trace.push(Event::Revoked { device: d });
                self.sessions.kick(d, Kick::Revoked);
            }
            Op::Enroll { device } => {
                let d = DEVICES[usize::from(device)];
                self.credentials.set(d, digest(&secret(d)));
                self.writer.enroll(d);
                self.trace.push(Event::Enrolled { device: d });
            }
            Op::Direct {
                device,
                channel,
                qos,
                big,
            } => {
                let d = DEVICES[usize::from(device)];
                let (channel, encoding) = DIRECT_CHANNELS[usize::from(channel)];
                self.direct_id += 1;
                let id = self.direct_id;
                let mut payload = format!("D{id}:").into_bytes();
                payload.resize(if big == 1 { 200 } else { 8 }, b'.');
                let result = self.sessions.send_direct(
                    d,
                    Direct {
                        channel,
                        encoding,
                        payload: Bytes::from(payload),
                        qos,
                    },
                );
                self.trace.push(Event::Direct {
                    device: d,
                    id,
                    channel,
                    encoding,
                    qos,
                    result,
                });
            }
            Op::Shutdown => {
                self.trace.push(Event::Shutdown);
                self.shutdown.cancel();
                self.sessions.kick_all(Kick::ShuttingDown);
                return true;
            }
        }
        false
    }

    fn next_sub_pkid(&mut self) -> u16 {
        self.sub_pkid = self.sub_pkid.checked_add(1).unwrap_or(1);
        self.sub_pkid
    }

    #[allow(clippy::too_many_arguments)]
    fn connect(
        &mut self,
        slot: u8,
        level: u8,
        user: u8,
        password: u8,
        client_id: u8,
        keep_alive: u8,
        will: u8,
    ) {
        if self.slots[usize::from(slot)].is_none() {
            self.open(slot);
        }
        let level = LEVELS[usize::from(level)];
        let user = USERS[usize::from(user)];
        let name = match user {
            User::Device(i) => DEVICES[i],
            User::BadId => "d1/x",
            User::Empty | User::NoLogin => "",
        };
        // The device whose topics it uses.
        let device = match user {
            User::Device(i) => DEVICES[i],
            _ => DEVICES[0],
        };
        let pass = match PASSWORDS[usize::from(password)] {
            Password::Right => secret(name),
            Password::Wrong => format!("{}-not", secret(name)),
            Password::Empty => String::new(),
        };
        let client_id: Vec<u8> = match CLIENT_IDS[usize::from(client_id)] {
            ClientId::Empty => Vec::new(),
            ClientId::Same => name.as_bytes().to_vec(),
            ClientId::Other => other(device).as_bytes().to_vec(),
            ClientId::Odd => b"a b\x01".to_vec(),
            ClientId::Long => vec![b'c'; 200],
        };
        let tag = self.next_tag();
        let will: Option<(Vec<u8>, Vec<u8>)> = match WILLS[usize::from(will)] {
            Will::None => None,
            Will::Own(ch, enc) => Some((
                topic::format(device, Channel::Up(ch), enc).into_bytes(),
                format!("{{\"will\":{tag}}}").into_bytes(),
            )),
            Will::Foreign => Some((
                topic::format(
                    other(device),
                    Channel::Up(Uplink::Telemetry),
                    Encoding::Json,
                )
                .into_bytes(),
                b"{}".to_vec(),
            )),
            Will::Downlink => Some((
                topic::format(device, Channel::Down(Downlink::Command), Encoding::Json)
                    .into_bytes(),
                b"{}".to_vec(),
            )),
            Will::Oversize => Some((
                topic::format(device, Channel::Up(Uplink::Log), Encoding::Postcard).into_bytes(),
                vec![b'{'; 150],
            )),
            Will::BadTopic => Some((b"fg/#".to_vec(), b"{}".to_vec())),
        };
        let bytes = Connect {
            level,
            client_id: &client_id,
            keep_alive: KEEP_ALIVES[usize::from(keep_alive)],
            login: match user {
                User::NoLogin => None,
                _ => Some((name.as_bytes(), Some(pass.as_bytes()))),
            },
            will: will.as_ref().map(|(t, p)| (&t[..], &p[..])),
        }
        .encode();
        if let Some(s) = self.slots[usize::from(slot)].as_mut() {
            s.v5 = level == 5;
            s.device = device;
        }
        self.send(slot, &bytes);
    }

    fn publish(&mut self, slot: u8, qos: u8, topic: u8, payload: u8, pkid: u8, flags: u8) {
        let Some(s) = self.slots[usize::from(slot)].as_ref() else {
            return;
        };
        let (v5, dev, conn, from, prev) = (s.v5, s.device, s.conn, s.next_pkid, s.prev_pkid);
        let topic = TOPICS[usize::from(topic)];
        let topic_bytes = topic_of(dev, topic);
        let limit = match topic {
            Topic::Up(ch, _) => self.limits.max_message.of(ch),
            _ => 200,
        };
        let tag = self.next_tag();
        let mut kind = PAYLOADS[usize::from(payload)];
        if kind == Payload::Empty && qos == 2 {
            // QoS 2 payloads stay unique (see `check`: the model tells retransmissions apart).
            kind = Payload::Garbage;
        }
        let body: Vec<u8> = match kind {
            Payload::Json => format!("{{\"t\":{tag}}}").into_bytes(),
            Payload::Array => format!("[{tag}]").into_bytes(),
            Payload::Garbage => {
                let mut b = vec![0xff];
                b.extend(tag.to_be_bytes());
                b
            }
            Payload::Empty => Vec::new(),
            Payload::OverLimit => {
                let mut b = format!("{{\"t\":{tag}").into_bytes();
                b.resize(limit + 1, b' ');
                b
            }
            Payload::OverPacket => vec![b'{'; MAX_PACKET],
        };
        let pkid = match PKIDS[usize::from(pkid)] {
            Pkid::Next => self.checker.free_pkid(conn, from),
            Pkid::Fixed(id) => id,
            Pkid::Previous => prev,
        };
        let p = device::publish(v5, qos, pkid, flags, &topic_bytes, &body);
        self.note_publish(slot, qos, pkid, &p);
        self.send(slot, &p);
    }

    fn note_publish(&mut self, slot: u8, qos: u8, pkid: u16, p: &[u8]) {
        let Some(s) = self.slots[usize::from(slot)].as_mut() else {
            return;
        };
        if qos == 0 {
            return;
        }
        s.prev_pkid = pkid;
        if pkid >= s.next_pkid {
            s.next_pkid = pkid.checked_add(1).unwrap_or(1);
        }
        s.sent_qos.push(p.to_vec());
        if s.sent_qos.len() > 4 {
            s.sent_qos.remove(0);
        }
    }
}

/// The other enrolled device.
fn other(device: &str) -> &'static str {
    if device == DEVICES[0] {
        DEVICES[1]
    } else {
        DEVICES[0]
    }
}

fn topic_of(dev: &str, t: Topic) -> Vec<u8> {
    match t {
        Topic::Up(ch, enc) => topic::format(dev, Channel::Up(ch), enc).into_bytes(),
        Topic::Foreign => {
            topic::format(other(dev), Channel::Up(Uplink::Telemetry), Encoding::Json).into_bytes()
        }
        Topic::Downlink => {
            topic::format(dev, Channel::Down(Downlink::Command), Encoding::Json).into_bytes()
        }
        Topic::Wildcard => format!("fg/{dev}/#").into_bytes(),
        Topic::Short => format!("fg/{dev}").into_bytes(),
        Topic::Empty => Vec::new(),
        Topic::NoDevice => b"fg//telemetry".to_vec(),
        Topic::NotUtf8 => b"fg/\xff\xfe/telemetry".to_vec(),
        Topic::Trailing => format!("fg/{dev}/telemetry/json/x").into_bytes(),
        Topic::Sys => b"$SYS/x".to_vec(),
        Topic::Long => {
            let mut t = b"fg/".to_vec();
            t.resize(300, b'a');
            t
        }
    }
}

fn filter(dev: &str, f: Filter) -> Vec<u8> {
    match f {
        Filter::Own(ch, enc) => topic::format(dev, Channel::Down(ch), enc).into_bytes(),
        Filter::Foreign => {
            topic::format(other(dev), Channel::Down(Downlink::Command), Encoding::Json).into_bytes()
        }
        Filter::All => b"#".to_vec(),
        Filter::AnyDevice => b"fg/+/cmd".to_vec(),
        Filter::Uplink => {
            topic::format(dev, Channel::Up(Uplink::Telemetry), Encoding::Json).into_bytes()
        }
        Filter::Bad => b"fg/".to_vec(),
    }
}

/// Writes what the device sends, in order; stops at the first error (the gateway is gone).
async fn device_writer(mut wr: WriteHalf<DuplexStream>, mut rx: mpsc::UnboundedReceiver<DevCmd>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            DevCmd::Write(b) => {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            DevCmd::Eof => {
                let _ = wr.shutdown().await;
                return;
            }
        }
    }
}

/// Reads what the gateway sends into the trace, except while paused.
async fn device_reader(
    mut rd: ReadHalf<DuplexStream>,
    mut pause: watch::Receiver<Option<Instant>>,
    conn: usize,
    trace: Trace,
) {
    let mut buf = vec![0u8; 4096];
    let mut controlled = true;
    loop {
        if controlled {
            let until = *pause.borrow_and_update();
            if let Some(until) = until.filter(|u| *u > Instant::now()) {
                tokio::select! {
                    biased;
                    r = pause.changed() => controlled = r.is_ok(),
                    _ = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
        }
        let read = tokio::select! {
            biased;
            r = pause.changed(), if controlled => {
                controlled = r.is_ok();
                continue;
            }
            r = rd.read(&mut buf) => r,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => trace.push(Event::Received {
                conn,
                bytes: buf[..n].to_vec(),
            }),
        }
    }
}
