//! The device's side of the wire: the MQTT packets a simulated device writes, and a reader of
//! what the gateway writes back. The reader is written from the MQTT 3.1.1 and 5 specs, apart
//! from rumqttd, so that it also checks how the gateway encodes (rumqttd's MQTT 5 decoder
//! cannot read server packets at all).

use bytes::BufMut;

/// Appends MQTT's variable byte integer.
pub(super) fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.extend_from_slice(b);
}

/// A packet of type byte `first` around `body`.
pub(super) fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A CONNECT. `login`: username and, if any, password; `will`: topic and payload.
pub(super) struct Connect<'a> {
    pub level: u8,
    pub client_id: &'a [u8],
    pub keep_alive: u16,
    pub login: Option<(&'a [u8], Option<&'a [u8]>)>,
    pub will: Option<(&'a [u8], &'a [u8])>,
}

impl Connect<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.level == 5;
        let mut body = Vec::new();
        if self.level == 3 {
            put_bytes(&mut body, b"MQIsdp");
        } else {
            put_bytes(&mut body, b"MQTT");
        }
        body.push(self.level);
        let mut flags = 0x02; // clean session / clean start
        if self.will.is_some() {
            flags |= 0x04 | 0x08; // will, QoS 1
        }
        if let Some((_, password)) = self.login {
            flags |= 0x80;
            if password.is_some() {
                flags |= 0x40;
            }
        }
        body.push(flags);
        body.put_u16(self.keep_alive);
        if v5 {
            body.push(0); // no properties
        }
        put_bytes(&mut body, self.client_id);
        if let Some((topic, payload)) = self.will {
            if v5 {
                body.push(0); // no will properties
            }
            put_bytes(&mut body, topic);
            put_bytes(&mut body, payload);
        }
        if let Some((user, password)) = self.login {
            put_bytes(&mut body, user);
            if let Some(p) = password {
                put_bytes(&mut body, p);
            }
        }
        packet(0x10, &body)
    }
}

pub(super) fn publish(
    v5: bool,
    qos: u8,
    pkid: u16,
    flags: u8,
    topic: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    put_bytes(&mut body, topic);
    if qos > 0 {
        body.put_u16(pkid);
    }
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    let first = 0x30 | (qos << 1) | (flags & 1) | ((flags & 2) << 2);
    packet(first, &body)
}

/// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70) in their short form.
pub(super) fn ack(first: u8, pkid: u16) -> Vec<u8> {
    packet(first, &pkid.to_be_bytes())
}

pub(super) fn subscribe(v5: bool, pkid: u16, filters: &[(Vec<u8>, u8)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_u16(pkid);
    if v5 {
        body.push(0);
    }
    for (f, qos) in filters {
        put_bytes(&mut body, f);
        body.push(*qos);
    }
    packet(0x82, &body)
}

pub(super) fn unsubscribe(v5: bool, pkid: u16, filters: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_u16(pkid);
    if v5 {
        body.push(0);
    }
    for f in filters {
        put_bytes(&mut body, f);
    }
    packet(0xa2, &body)
}

/// A packet from the gateway, as the device reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FromServer {
    /// `props`: the MQTT 5 properties the checks look at.
    ConnAck {
        code: u8,
        props: Option<ConnAckProps>,
    },
    Publish {
        qos: u8,
        pkid: u16,
        topic: Vec<u8>,
        payload: Vec<u8>,
    },
    /// PUBACK or PUBREC (`rec`), with the reason code (`None`: the short form).
    Ack {
        rec: bool,
        pkid: u16,
        reason: Option<u8>,
    },
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
    Disconnect {
        reason: Option<u8>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ConnAckProps {
    pub receive_max: Option<u16>,
    pub max_packet: Option<u32>,
    pub server_keep_alive: Option<u16>,
}

/// Takes the next whole packet from `buf`. `Ok(None)`: incomplete; `Err`: not a packet a
/// gateway may send a device of that version (the checks fail on it).
pub(super) fn read_server(buf: &mut Vec<u8>, v5: bool) -> Result<Option<FromServer>, String> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(format!("remaining length of more than 4 bytes: {buf:02x?}"));
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let whole: Vec<u8> = buf.drain(..i + len).collect();
    let body = &whole[i..];
    let bad = |what: &str| Err(format!("{what}: {whole:02x?} (v5: {v5})"));
    let pkid = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let packet = match first {
        0x20 => {
            if body.len() < 2 {
                return bad("short CONNACK");
            }
            let props = if v5 {
                let mut r = &body[2..];
                Some(
                    read_connack_props(&mut r)
                        .ok_or_else(|| format!("CONNACK properties: {whole:02x?}"))?,
                )
            } else if body.len() != 2 {
                return bad("v3.1.1 CONNACK with more than its two bytes");
            } else {
                None
            };
            FromServer::ConnAck {
                code: body[1],
                props,
            }
        }
        0x30..=0x3f => {
            let qos = (first >> 1) & 3;
            if qos == 3 || body.len() < 2 {
                return bad("PUBLISH");
            }
            let tlen = usize::from(pkid(body));
            let mut at = 2 + tlen;
            if body.len() < at {
                return bad("PUBLISH topic");
            }
            let topic = body[2..at].to_vec();
            let mut id = 0;
            if qos > 0 {
                if body.len() < at + 2 {
                    return bad("PUBLISH packet id");
                }
                id = pkid(&body[at..]);
                at += 2;
            }
            if v5 {
                let mut r = &body[at..];
                let Some(plen) = read_varint(&mut r) else {
                    return bad("PUBLISH properties");
                };
                if r.len() < plen {
                    return bad("PUBLISH properties");
                }
                at = body.len() - r.len() + plen;
            }
            FromServer::Publish {
                qos,
                pkid: id,
                topic,
                payload: body[at..].to_vec(),
            }
        }
        0x40 | 0x50 | 0x70 => {
            if body.len() < 2 || (!v5 && body.len() != 2) {
                return bad("acknowledgement");
            }
            let reason = body.get(2).copied();
            if body.len() > 3 && usize::from(body[3]) + 4 != body.len() {
                return bad("acknowledgement properties");
            }
            match first {
                0x70 => FromServer::PubComp {
                    pkid: pkid(body),
                    reason,
                },
                _ => FromServer::Ack {
                    rec: first == 0x50,
                    pkid: pkid(body),
                    reason,
                },
            }
        }
        0x90 | 0xb0 => {
            if body.len() < 2 {
                return bad("SUBACK/UNSUBACK");
            }
            let mut at = 2;
            if v5 {
                let mut r = &body[2..];
                let Some(plen) = read_varint(&mut r) else {
                    return bad("SUBACK/UNSUBACK properties");
                };
                at = body.len() - r.len() + plen;
                if at > body.len() {
                    return bad("SUBACK/UNSUBACK properties");
                }
            }
            let codes = body[at..].to_vec();
            if first == 0x90 {
                FromServer::SubAck {
                    pkid: pkid(body),
                    codes,
                }
            } else {
                if !v5 && !codes.is_empty() {
                    return bad("v3.1.1 UNSUBACK with reason codes");
                }
                FromServer::UnsubAck {
                    pkid: pkid(body),
                    codes,
                }
            }
        }
        0xd0 if body.is_empty() => FromServer::PingResp,
        0xe0 if v5 => FromServer::Disconnect {
            reason: body.first().copied(),
        },
        _ => return bad("a packet a gateway does not send a device"),
    };
    Ok(Some(packet))
}

fn read_varint(r: &mut &[u8]) -> Option<usize> {
    let mut n = 0usize;
    for i in 0..4 {
        let (&b, rest) = r.split_first()?;
        *r = rest;
        n |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

/// The CONNACK properties the checks need; `None` when they do not parse.
fn read_connack_props(r: &mut &[u8]) -> Option<ConnAckProps> {
    let len = read_varint(r)?;
    if r.len() != len {
        return None;
    }
    let mut props = ConnAckProps::default();
    let take = |r: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        if r.len() < n {
            return None;
        }
        let (a, b) = r.split_at(n);
        *r = b;
        Some(a.to_vec())
    };
    let u16_of = |b: Vec<u8>| u16::from_be_bytes([b[0], b[1]]);
    while let Some((&id, rest)) = r.split_first() {
        *r = rest;
        match id {
            // Byte properties.
            0x24 | 0x25 | 0x28 | 0x29 | 0x2a => {
                take(r, 1)?;
            }
            0x21 => props.receive_max = Some(u16_of(take(r, 2)?)),
            0x13 => props.server_keep_alive = Some(u16_of(take(r, 2)?)),
            0x22 => {
                take(r, 2)?;
            }
            0x11 => {
                take(r, 4)?;
            }
            0x27 => {
                let b = take(r, 4)?;
                props.max_packet = Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            }
            // Strings and binary data.
            0x12 | 0x1a | 0x1c | 0x1f | 0x15 | 0x16 => {
                let n = usize::from(u16_of(take(r, 2)?));
                take(r, n)?;
            }
            // User property: two strings.
            0x26 => {
                for _ in 0..2 {
                    let n = usize::from(u16_of(take(r, 2)?));
                    take(r, n)?;
                }
            }
            _ => return None,
        }
    }
    Some(props)
}
