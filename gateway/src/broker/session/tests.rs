use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;

use super::*;

fn v4_publish(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let mut out = vec![0x30 | (qos << 1)];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

#[test]
fn peek_reads_qos_and_packet_id() {
    assert_eq!(
        peek_publish(&v4_publish("fg/d/telemetry", 1, 513, b"x")),
        Some((1, 513))
    );
    assert_eq!(
        peek_publish(&v4_publish("a", 2, 7, &[0; 300])),
        Some((2, 7))
    );
    assert_eq!(peek_publish(&v4_publish("a", 0, 0, b"")), Some((0, 0)));
    assert_eq!(peek_publish(&[0xc0, 0]), None, "PINGREQ is not a publish");
    assert_eq!(peek_publish(&[0x32, 10, 0]), None, "incomplete");
}

#[test]
fn parser_reports_need_more_oversized_and_malformed() {
    let full = v4_publish("fg/d/telemetry", 1, 9, b"hello");
    let mut buf = BytesMut::from(&full[..5]);
    assert!(matches!(
        next_packet(&mut V4, &mut buf, 1024),
        Parsed::NeedMore
    ));
    buf.extend_from_slice(&full[5..]);
    match next_packet(&mut V4, &mut buf, 1024) {
        Parsed::Packet(Packet::Publish(p, None), Some((1, 9))) => {
            assert_eq!(&p.topic[..], b"fg/d/telemetry");
            assert_eq!(&p.payload[..], b"hello");
        }
        _ => panic!("expected the publish"),
    }
    assert!(buf.is_empty());

    let mut big = BytesMut::from(&v4_publish("t", 0, 0, &[0; 2000])[..]);
    assert!(matches!(
        next_packet(&mut V4, &mut big, 1024),
        Parsed::Oversized(_)
    ));
    // A SUBSCRIBE without a single filter.
    let mut bad = BytesMut::from(&[0x82, 0x02, 0x00, 0x01][..]);
    assert!(matches!(
        next_packet(&mut V4, &mut bad, 1024),
        Parsed::Malformed(_)
    ));
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_session_parser(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
        for v5 in [false, true] {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                let parsed = if v5 { next_packet(&mut V5, &mut buf, 128) } else { next_packet(&mut V4, &mut buf, 128) };
                match parsed {
                    Parsed::Packet(..) => continue,
                    _ => break,
                }
            }
            let _ = peek_publish(&bytes);
        }
    }
}

#[test]
fn v4_form_strips_properties_and_v5_codes() {
    let ack = Packet::SubAck(
        SubAck {
            pkid: 3,
            return_codes: vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::NotAuthorized,
            ],
        },
        Some(rumqttd::protocol::SubAckProperties {
            reason_string: Some("x".into()),
            user_properties: vec![],
        }),
    );
    let Some(Packet::SubAck(s, None)) = to_v4(ack) else {
        panic!()
    };
    assert_eq!(s.return_codes[1], SubscribeReasonCode::Failure);
    let mut out = BytesMut::new();
    V4.write(Packet::SubAck(s, None), &mut out).unwrap();
    assert_eq!(&out[..], &[0x90, 4, 0, 3, 1, 0x80]);
    assert!(
        to_v4(Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NotAuthorized
            },
            None
        ))
        .is_none()
    );
}

#[test]
fn qos1_publishes_the_gateway_writes_decode_in_both_versions() {
    for (v5, payload) in [(false, vec![1u8, 2, 3]), (true, vec![7u8; 300])] {
        let mut out = BytesMut::new();
        write_qos1_publish(&mut out, v5, b"fg/d1/cmd", 4242, &payload);
        assert_eq!(peek_publish(&out), Some((1, 4242)));
        let mut buf = out.clone();
        let packet = if v5 {
            V5.read_mut(&mut buf, 1 << 20)
        } else {
            V4.read_mut(&mut buf, 1 << 20)
        }
        .unwrap();
        let Packet::Publish(p, _) = packet else {
            panic!("{packet:?}");
        };
        assert_eq!(
            (&p.topic[..], &p.payload[..]),
            (&b"fg/d1/cmd"[..], &payload[..])
        );
        assert!(buf.is_empty(), "nothing left over");
    }
    // A big payload takes a multi-byte remaining length.
    let mut out = BytesMut::new();
    write_qos1_publish(&mut out, false, b"t", 1, &vec![0; 20_000]);
    // 2 + 1 (topic) + 2 (packet id) + 20,000 = 20,005 = 37 + 28 x 128 + 1 x 128^2.
    assert_eq!(&out[..4], &[0x32, 0x80 | 37, 0x80 | 28, 1]);
}

/// rumqttd 0.20's MQTT 5 decoder hits `unreachable!()` on a packet type only servers send; the
/// fuzz target `mqtt_packets` found this CONNECT-then-CONNACK from a client.
#[test]
fn a_server_only_packet_from_a_client_is_a_protocol_violation() {
    // rumqttd's MQTT 5 decoder panics on this CONNACK; it never gets to see it.
    let bytes = include_bytes!("../../../../fuzz/regressions/mqtt_packets/v5-connack-from-client");
    for (first, what) in [
        (bytes[0], "CONNACK"),
        (0x90, "SUBACK"),
        (0xb0, "UNSUBACK"),
        (0xd0, "PINGRESP"),
        (0x00, "reserved packet type 0"),
    ] {
        let mut packet = bytes.to_vec();
        packet[0] = first;
        let mut buf = BytesMut::from(&packet[..]);
        assert!(
            matches!(next_packet(&mut V5, &mut buf, 1024), Parsed::Forbidden(w) if w == what),
            "{what}"
        );
    }
    assert_eq!(parse_all(bytes, 1024), (0, 0));
}

#[test]
fn a_packet_announcing_more_than_the_limit_is_refused_before_it_arrives() {
    // A CONNECT announcing 256 MiB: only its first bytes are here.
    let mut buf = BytesMut::from(&[0x10, 0x80, 0x80, 0x80, 0x01, 0x00, 0x04][..]);
    assert!(matches!(
        next_packet(&mut V4, &mut buf, 65536),
        Parsed::Oversized(n) if n == 5 + (1 << 21)
    ));
    assert_eq!(announced_len(&[0x30, 0x05]), Some(7));
    assert_eq!(announced_len(&[0x30, 0x80]), None, "incomplete");
    assert_eq!(announced_len(&[0x30]), None);
}

/// Telemetry that decodes within bounds goes to the writer decoded, without its bytes; what
/// does not decode, and every other channel, goes as it came.
#[test]
fn the_session_decodes_telemetry_and_leaves_the_rest_to_the_writer() {
    let good = br#"{"seq": 7, "hw": {"temp_c": 41.5}}"#;
    let (payload, decoded) = predecode(Uplink::Telemetry, Encoding::Json, Bytes::from_static(good));
    let t = decoded.expect("decoded");
    assert_eq!((t.seq, t.hw.temp_c), (7, Some(41.5)));
    assert!(payload.is_empty());

    let bad = br#"{"seq": "seven"}"#;
    let (payload, decoded) = predecode(Uplink::Telemetry, Encoding::Json, Bytes::from_static(bad));
    assert!(decoded.is_none());
    assert_eq!(&payload[..], bad);

    let (payload, decoded) = predecode(Uplink::Log, Encoding::Json, Bytes::from_static(good));
    assert!(decoded.is_none());
    assert_eq!(&payload[..], good);
}
