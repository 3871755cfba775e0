//! The input of the session simulation: a few settings, then a sequence of operations by the
//! devices, the storage writer and the gateway. Every byte string decodes to a script (bytes
//! that run out end it), so random bytes and a fuzzer's mutations are all meaningful, and
//! [`Script::encode`] writes a script back, so that tests and seeds can be written as
//! operations.
//!
//! Every field is an index into one of the tables below, reduced modulo the table's length
//! when decoded; a decoded script re-encodes to bytes that decode to the same script.

use std::time::Duration;

use fleetgate_protocol::{Downlink, Encoding, Uplink};

/// Operations of one script; what follows is ignored, so that every input runs in bounded
/// steps.
pub const MAX_OPS: usize = 64;
/// Connection slots: each holds at most one device connection at a time.
pub const SLOTS: u8 = 4;
/// Device ids; the first two are enrolled when a script starts.
pub const DEVICES: [&str; 3] = ["d1", "d2", "d3"];

/// The credential of `device` (a wrong one is this with a suffix).
pub fn secret(device: &str) -> String {
    format!("secret-of-{device}")
}

/// How the gateway and its writer are set up for one script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// 0..=2: acknowledge after the commit; 3: once queued (`ingest.ack = "receipt"`).
    pub ack: u8,
    /// Index into [`INFLIGHT`].
    pub inflight: u8,
    /// Index into [`QUEUES`].
    pub queue: u8,
    /// 0: 5 messages a second with a burst of 3; 1: 1000 a second.
    pub rate: u8,
    /// 0: `mqtt.max_connections` 8; 1: 1.
    pub connections: u8,
    /// Index into [`PIPES`].
    pub pipe: u8,
    /// 1: the writer commits every message as soon as it takes it.
    pub auto_commit: u8,
}

/// `mqtt.max_inflight` choices.
pub const INFLIGHT: [u16; 4] = [1, 2, 4, 64];
/// Writer queue choices: messages, bytes.
pub const QUEUES: [(usize, usize); 4] = [(2, 600), (4, 4096), (64, 1 << 20), (1, 300)];
/// Bytes the in-memory connection buffers in each direction.
pub const PIPES: [usize; 4] = [64, 512, 4096, 65536];

impl Settings {
    pub fn ack_on_receipt(&self) -> bool {
        self.ack == 3
    }

    pub fn max_inflight(&self) -> u16 {
        INFLIGHT[usize::from(self.inflight)]
    }

    pub fn queue(&self) -> (usize, usize) {
        QUEUES[usize::from(self.queue)]
    }

    /// Messages per second and burst.
    pub fn rate(&self) -> (f64, u32) {
        if self.rate == 0 {
            (5.0, 3)
        } else {
            (1000.0, 1000)
        }
    }

    pub fn max_connections(&self) -> usize {
        if self.connections == 0 { 8 } else { 1 }
    }

    pub fn pipe(&self) -> usize {
        PIPES[usize::from(self.pipe)]
    }
}

/// Who a CONNECT says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// One of [`DEVICES`].
    Device(usize),
    /// A username that is not a valid device id.
    BadId,
    /// An empty username with a password.
    Empty,
    /// No username or password at all.
    NoLogin,
}

pub const USERS: [User; 9] = [
    User::Device(0),
    User::Device(0),
    User::Device(0),
    User::Device(1),
    User::Device(1),
    User::Device(2),
    User::BadId,
    User::Empty,
    User::NoLogin,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Password {
    Right,
    Wrong,
    Empty,
}

pub const PASSWORDS: [Password; 5] = [
    Password::Right,
    Password::Right,
    Password::Right,
    Password::Wrong,
    Password::Empty,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientId {
    Empty,
    /// The username.
    Same,
    /// Another device's id.
    Other,
    /// Control characters and spaces.
    Odd,
    /// 200 characters.
    Long,
}

pub const CLIENT_IDS: [ClientId; 7] = [
    ClientId::Empty,
    ClientId::Same,
    ClientId::Same,
    ClientId::Empty,
    ClientId::Other,
    ClientId::Odd,
    ClientId::Long,
];

/// Keep alive a CONNECT asks for, in seconds.
pub const KEEP_ALIVES: [u16; 8] = [0, 1, 2, 5, 30, 60, 600, 65535];

/// Protocol levels of a CONNECT: 4 is MQTT 3.1.1, 5 is MQTT 5, 3 is MQTT 3.1 (`MQIsdp`), 6
/// does not exist.
pub const LEVELS: [u8; 6] = [4, 5, 4, 5, 3, 6];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Will {
    None,
    /// On one of the device's own uplink topics.
    Own(Uplink, Encoding),
    /// On another device's telemetry topic.
    Foreign,
    /// On the device's own command topic (a downlink).
    Downlink,
    /// Its own log topic, over the log channel's size limit.
    Oversize,
    /// Not a fleetgate topic.
    BadTopic,
}

pub const WILLS: [Will; 9] = [
    Will::None,
    Will::None,
    Will::None,
    Will::Own(Uplink::Telemetry, Encoding::Json),
    Will::Own(Uplink::Log, Encoding::Postcard),
    Will::Foreign,
    Will::Downlink,
    Will::Oversize,
    Will::BadTopic,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Up(Uplink, Encoding),
    /// Another device's telemetry.
    Foreign,
    /// The device's own command topic.
    Downlink,
    /// `fg/<id>/#`.
    Wildcard,
    /// `fg/<id>`.
    Short,
    Empty,
    /// `fg//telemetry`.
    NoDevice,
    /// Not UTF-8.
    NotUtf8,
    /// `fg/<id>/telemetry/json/x`.
    Trailing,
    /// `$SYS/x`.
    Sys,
    /// 300 bytes.
    Long,
}

pub const TOPICS: [Topic; 20] = [
    Topic::Up(Uplink::Telemetry, Encoding::Json),
    Topic::Up(Uplink::Telemetry, Encoding::Json),
    Topic::Up(Uplink::Telemetry, Encoding::Json),
    Topic::Up(Uplink::Telemetry, Encoding::Postcard),
    Topic::Up(Uplink::Hello, Encoding::Json),
    Topic::Up(Uplink::Alert, Encoding::Json),
    Topic::Up(Uplink::Log, Encoding::Postcard),
    Topic::Up(Uplink::Ack, Encoding::Json),
    Topic::Up(Uplink::Report, Encoding::Json),
    Topic::Foreign,
    Topic::Downlink,
    Topic::Wildcard,
    Topic::Short,
    Topic::Empty,
    Topic::NoDevice,
    Topic::NotUtf8,
    Topic::Trailing,
    Topic::Sys,
    Topic::Long,
    Topic::Up(Uplink::Telemetry, Encoding::Json),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// A JSON object (the fake writer stores it).
    Json,
    /// A JSON array (the fake writer refuses it: unknown).
    Array,
    /// Bytes that are no JSON (the fake writer refuses them: invalid).
    Garbage,
    Empty,
    /// One byte over the channel's `limits.max_message_bytes`.
    OverLimit,
    /// A packet over `mqtt.max_packet_bytes`.
    OverPacket,
}

pub const PAYLOADS: [Payload; 8] = [
    Payload::Json,
    Payload::Json,
    Payload::Json,
    Payload::Array,
    Payload::Garbage,
    Payload::Empty,
    Payload::OverLimit,
    Payload::OverPacket,
];

/// Packet id of a device's publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pkid {
    /// The connection's next id, skipping ids it has in flight.
    Next,
    Fixed(u16),
    /// The id of the connection's previous QoS 1/2 publish.
    Previous,
}

pub const PKIDS: [Pkid; 8] = [
    Pkid::Next,
    Pkid::Next,
    Pkid::Next,
    Pkid::Fixed(1),
    Pkid::Fixed(2),
    Pkid::Fixed(65535),
    Pkid::Fixed(0),
    Pkid::Previous,
];

/// An acknowledgement-type packet from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

pub const ACK_KINDS: [AckKind; 4] = [
    AckKind::PubAck,
    AckKind::PubRec,
    AckKind::PubRel,
    AckKind::PubComp,
];

/// Which packet id an acknowledgement names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckId {
    /// The oldest QoS 1 message from the gateway the device has not acknowledged (PUBACK), or
    /// the oldest QoS 2 publish of the device whose PUBREC it got (PUBREL).
    Due,
    Fixed(u16),
    /// The id of the device's previous QoS 1/2 publish.
    Previous,
}

pub const ACK_IDS: [AckId; 6] = [
    AckId::Due,
    AckId::Due,
    AckId::Due,
    AckId::Fixed(1),
    AckId::Fixed(65535),
    AckId::Previous,
];

/// A subscription filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Own(Downlink, Encoding),
    /// Another device's commands.
    Foreign,
    /// `#`.
    All,
    /// `fg/+/cmd`.
    AnyDevice,
    /// The device's own telemetry (an uplink).
    Uplink,
    /// `fg/`.
    Bad,
}

pub const FILTERS: [Filter; 10] = [
    Filter::Own(Downlink::Command, Encoding::Json),
    Filter::Own(Downlink::Command, Encoding::Json),
    Filter::Own(Downlink::Command, Encoding::Postcard),
    Filter::Own(Downlink::Chunk, Encoding::Postcard),
    Filter::Own(Downlink::Chunk, Encoding::Json),
    Filter::Foreign,
    Filter::All,
    Filter::AnyDevice,
    Filter::Uplink,
    Filter::Bad,
];

/// Packets only a server may send, and the reserved types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOnly {
    ConnAck,
    SubAck,
    UnsubAck,
    PingResp,
    Reserved,
    Auth,
}

pub const SERVER_ONLY: [ServerOnly; 6] = [
    ServerOnly::ConnAck,
    ServerOnly::SubAck,
    ServerOnly::UnsubAck,
    ServerOnly::PingResp,
    ServerOnly::Reserved,
    ServerOnly::Auth,
];

/// How long a device stops reading, in seconds (the session gives up writing after 30).
pub const STOP_READING: [u64; 6] = [1, 5, 29, 31, 60, 300];

/// Simulated waits, in milliseconds.
pub const WAITS: [u64; 12] = [
    1, 100, 200, 500, 1_000, 2_000, 5_000, 15_000, 31_000, 46_000, 91_000, 301_000,
];

/// What the storage writer does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterAction {
    /// Commits every message it has taken since its last commit.
    Commit,
    /// Fails the commit of those messages.
    Fail,
    /// Takes nothing from its queue for this long.
    Stall(Duration),
    /// Commits each message as soon as it takes it (or no longer does).
    Auto(bool),
}

pub const WRITER_ACTIONS: [WriterAction; 9] = [
    WriterAction::Commit,
    WriterAction::Commit,
    WriterAction::Commit,
    WriterAction::Fail,
    WriterAction::Stall(Duration::from_secs(1)),
    WriterAction::Stall(Duration::from_secs(5)),
    WriterAction::Stall(Duration::from_secs(31)),
    WriterAction::Auto(true),
    WriterAction::Auto(false),
];

/// Direct messages the gateway sends a device (commands, update chunks).
pub const DIRECT_CHANNELS: [(Downlink, Encoding); 4] = [
    (Downlink::Command, Encoding::Json),
    (Downlink::Command, Encoding::Postcard),
    (Downlink::Chunk, Encoding::Postcard),
    (Downlink::Chunk, Encoding::Json),
];

/// Where a half packet is cut.
pub const CUTS: [usize; 5] = [1, 2, 3, 5, 10];

/// One step of a script. Fields are indices into the tables above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new connection in `slot` (the device drops whatever was there), nothing sent yet.
    Open {
        slot: u8,
    },
    /// A CONNECT on `slot`'s connection (a new one if the slot is empty).
    Connect {
        slot: u8,
        level: u8,
        user: u8,
        password: u8,
        client_id: u8,
        keep_alive: u8,
        will: u8,
    },
    /// `flags`: bit 0 retain, bit 1 dup.
    Publish {
        slot: u8,
        qos: u8,
        topic: u8,
        payload: u8,
        pkid: u8,
        flags: u8,
    },
    /// The `back`-th last QoS 1/2 publish of the connection again, with DUP set.
    Republish {
        slot: u8,
        back: u8,
    },
    Ack {
        slot: u8,
        kind: u8,
        id: u8,
    },
    /// `count` (1..=3) of the filters, at `qos`.
    Subscribe {
        slot: u8,
        filters: [u8; 3],
        count: u8,
        qos: u8,
    },
    Unsubscribe {
        slot: u8,
        filters: [u8; 3],
        count: u8,
    },
    Ping {
        slot: u8,
    },
    /// `will`: 1 asks (v5) for the will to be sent anyway.
    Disconnect {
        slot: u8,
        will: u8,
    },
    ServerOnly {
        slot: u8,
        kind: u8,
    },
    /// Bytes as they are (at most 63).
    Raw {
        slot: u8,
        bytes: Vec<u8>,
    },
    /// The first bytes of a publish; the rest goes before the slot's next bytes.
    Half {
        slot: u8,
        cut: u8,
        qos: u8,
    },
    /// `whole` 0: a fixed header announcing 256 MiB; 1: a whole packet one byte over the limit.
    Oversize {
        slot: u8,
        whole: u8,
    },
    StopReading {
        slot: u8,
        secs: u8,
    },
    /// `how` 0: the device closes its sending side; 1: it drops the connection.
    Close {
        slot: u8,
        how: u8,
    },
    Wait {
        ms: u8,
    },
    Writer {
        action: u8,
    },
    /// The device's enrollment is revoked: its credential goes and its session is kicked.
    Revoke {
        device: u8,
    },
    Enroll {
        device: u8,
    },
    /// A message for `device`'s session; `big` 1: 200 bytes.
    Direct {
        device: u8,
        channel: u8,
        qos: u8,
        big: u8,
    },
    /// The gateway shuts down; the script ends there.
    Shutdown,
}

/// Opcodes: a byte picks its operation modulo the table's length, so that common operations
/// take more of the byte's values.
const OPCODES: [u8; 32] = [
    2, 2, 2, 2, 2, 2, // Publish
    1, 1, 1, // Connect
    0, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, // Open .. StopReading
    15, 16, 16, 17, 17, 17, 18, 19, 20, // Close .. Direct
];
/// Shutdown hides behind `Wait` (opcode 16) with a marker argument, so that random bytes rarely
/// end a script early.
const SHUTDOWN_MARK: u8 = 0xff;

/// A decoded input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Script {
    pub settings: Settings,
    pub ops: Vec<Op>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn next(&mut self) -> Option<u8> {
        let b = self.bytes.get(self.at).copied();
        self.at += 1;
        b
    }

    /// An index below `n`; a missing byte reads as 0.
    fn pick(&mut self, n: usize) -> u8 {
        (usize::from(self.next().unwrap_or(0)) % n) as u8
    }
}

impl Script {
    pub fn decode(bytes: &[u8]) -> Script {
        let mut r = Reader { bytes, at: 0 };
        let a = r.next().unwrap_or(0);
        let b = r.next().unwrap_or(0);
        let settings = Settings {
            ack: a & 3,
            inflight: (a >> 2) & 3,
            queue: (a >> 4) & 3,
            rate: (a >> 6) & 1,
            connections: a >> 7,
            pipe: b & 3,
            auto_commit: (b >> 2) & 1,
        };
        let mut ops = Vec::new();
        while ops.len() < MAX_OPS {
            let Some(code) = r.next() else { break };
            let slot = |r: &mut Reader| r.pick(usize::from(SLOTS));
            let op = match OPCODES[usize::from(code) % OPCODES.len()] {
                0 => Op::Open { slot: slot(&mut r) },
                1 => Op::Connect {
                    slot: slot(&mut r),
                    level: r.pick(LEVELS.len()),
                    user: r.pick(USERS.len()),
                    password: r.pick(PASSWORDS.len()),
                    client_id: r.pick(CLIENT_IDS.len()),
                    keep_alive: r.pick(KEEP_ALIVES.len()),
                    will: r.pick(WILLS.len()),
                },
                2 => Op::Publish {
                    slot: slot(&mut r),
                    qos: r.pick(3),
                    topic: r.pick(TOPICS.len()),
                    payload: r.pick(PAYLOADS.len()),
                    pkid: r.pick(PKIDS.len()),
                    flags: r.pick(4),
                },
                3 => Op::Republish {
                    slot: slot(&mut r),
                    back: r.pick(4),
                },
                4 => Op::Ack {
                    slot: slot(&mut r),
                    kind: r.pick(ACK_KINDS.len()),
                    id: r.pick(ACK_IDS.len()),
                },
                5 => Op::Subscribe {
                    slot: slot(&mut r),
                    filters: [
                        r.pick(FILTERS.len()),
                        r.pick(FILTERS.len()),
                        r.pick(FILTERS.len()),
                    ],
                    count: r.pick(3),
                    qos: r.pick(3),
                },
                6 => Op::Unsubscribe {
                    slot: slot(&mut r),
                    filters: [
                        r.pick(FILTERS.len()),
                        r.pick(FILTERS.len()),
                        r.pick(FILTERS.len()),
                    ],
                    count: r.pick(3),
                },
                7 => Op::Ping { slot: slot(&mut r) },
                8 => Op::Disconnect {
                    slot: slot(&mut r),
                    will: r.pick(2),
                },
                9 => Op::ServerOnly {
                    slot: slot(&mut r),
                    kind: r.pick(SERVER_ONLY.len()),
                },
                10 => {
                    let slot = slot(&mut r);
                    let len = r.pick(64);
                    let bytes = (0..len).map_while(|_| r.next()).collect();
                    Op::Raw { slot, bytes }
                }
                11 => Op::Half {
                    slot: slot(&mut r),
                    cut: r.pick(CUTS.len()),
                    qos: r.pick(3),
                },
                12 => Op::Oversize {
                    slot: slot(&mut r),
                    whole: r.pick(2),
                },
                13 => Op::StopReading {
                    slot: slot(&mut r),
                    secs: r.pick(STOP_READING.len()),
                },
                14 => Op::Close {
                    slot: slot(&mut r),
                    how: r.pick(2),
                },
                15 => Op::Close {
                    slot: slot(&mut r),
                    how: 0,
                },
                16 => match r.next().unwrap_or(0) {
                    SHUTDOWN_MARK => Op::Shutdown,
                    ms => Op::Wait {
                        ms: (usize::from(ms) % WAITS.len()) as u8,
                    },
                },
                17 => Op::Writer {
                    action: r.pick(WRITER_ACTIONS.len()),
                },
                18 => Op::Revoke {
                    device: r.pick(DEVICES.len()),
                },
                19 => Op::Enroll {
                    device: r.pick(DEVICES.len()),
                },
                _ => Op::Direct {
                    device: r.pick(DEVICES.len()),
                    channel: r.pick(DIRECT_CHANNELS.len()),
                    qos: r.pick(2),
                    big: r.pick(2),
                },
            };
            let shutdown = op == Op::Shutdown;
            ops.push(op);
            if shutdown {
                break;
            }
        }
        Script { settings, ops }
    }

    /// The bytes that decode to this script (each field must be within its table).
    pub fn encode(&self) -> Vec<u8> {
        let s = &self.settings;
        let mut out = vec![
            s.ack | s.inflight << 2 | s.queue << 4 | s.rate << 6 | s.connections << 7,
            s.pipe | s.auto_commit << 2,
        ];
        let code = |op: u8| OPCODES.iter().position(|&o| o == op).unwrap_or(0) as u8;
        for op in &self.ops {
            match op {
                Op::Open { slot } => out.extend([code(0), *slot]),
                Op::Connect {
                    slot,
                    level,
                    user,
                    password,
                    client_id,
                    keep_alive,
                    will,
                } => out.extend([
                    code(1),
                    *slot,
                    *level,
                    *user,
                    *password,
                    *client_id,
                    *keep_alive,
                    *will,
                ]),
                Op::Publish {
                    slot,
                    qos,
                    topic,
                    payload,
                    pkid,
                    flags,
                } => out.extend([code(2), *slot, *qos, *topic, *payload, *pkid, *flags]),
                Op::Republish { slot, back } => out.extend([code(3), *slot, *back]),
                Op::Ack { slot, kind, id } => out.extend([code(4), *slot, *kind, *id]),
                Op::Subscribe {
                    slot,
                    filters,
                    count,
                    qos,
                } => {
                    out.extend([code(5), *slot]);
                    out.extend(filters);
                    out.extend([*count, *qos]);
                }
                Op::Unsubscribe {
                    slot,
                    filters,
                    count,
                } => {
                    out.extend([code(6), *slot]);
                    out.extend(filters);
                    out.push(*count);
                }
                Op::Ping { slot } => out.extend([code(7), *slot]),
                Op::Disconnect { slot, will } => out.extend([code(8), *slot, *will]),
                Op::ServerOnly { slot, kind } => out.extend([code(9), *slot, *kind]),
                Op::Raw { slot, bytes } => {
                    out.extend([code(10), *slot, bytes.len() as u8]);
                    out.extend(bytes);
                }
                Op::Half { slot, cut, qos } => out.extend([code(11), *slot, *cut, *qos]),
                Op::Oversize { slot, whole } => out.extend([code(12), *slot, *whole]),
                Op::StopReading { slot, secs } => out.extend([code(13), *slot, *secs]),
                Op::Close { slot, how } => out.extend([code(14), *slot, *how]),
                Op::Wait { ms } => out.extend([code(16), *ms]),
                Op::Writer { action } => out.extend([code(17), *action]),
                Op::Revoke { device } => out.extend([code(18), *device]),
                Op::Enroll { device } => out.extend([code(19), *device]),
                Op::Direct {
                    device,
                    channel,
                    qos,
                    big,
                } => out.extend([code(20), *device, *channel, *qos, *big]),
                Op::Shutdown => out.extend([code(16), SHUTDOWN_MARK]),
            }
        }
        out
    }
}
