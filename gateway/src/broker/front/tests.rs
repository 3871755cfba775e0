use super::*;

#[test]
fn protocol_level_is_read_from_a_partial_connect() {
    // CONNECT, remaining length 16, "MQTT", level 4, ...
    let v4: &[u8] = &[
        0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 4, b'd', b'e', b'v', b'1',
    ];
    for n in 0..9 {
        assert_eq!(connect_level(&v4[..n]), Ok(None), "prefix of {n} bytes");
    }
    assert_eq!(connect_level(&v4[..9]), Ok(Some(4)));
    assert_eq!(connect_level(v4), Ok(Some(4)));
    // Two-byte remaining length, MQTT 5.
    let v5: &[u8] = &[0x10, 0x80, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 5];
    assert_eq!(connect_level(v5), Ok(Some(5)));
    // MQTT 3.1: "MQIsdp", level 3.
    let v3: &[u8] = &[0x10, 20, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3];
    assert_eq!(connect_level(v3), Ok(Some(3)));
}

#[test]
fn non_connect_first_bytes_are_refused() {
    assert!(connect_level(b"GET / HTTP/1.1\r\n").is_err());
    assert!(connect_level(&[0x30, 0]).is_err());
    assert!(connect_level(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    assert!(connect_level(&[0x10, 10, 0, 200]).is_err());
}

#[tokio::test]
async fn claim_replaces_the_previous_session_after_it_releases() {
    let sessions = Arc::new(Sessions::default());
    let first = sessions.claim("d1").await.unwrap();
    assert_eq!(sessions.len(), 1);
    let kicked = first.kick.clone();
    let reason = first.reason.clone();
    let s = sessions.clone();
    let second = tokio::spawn(async move { s.claim("d1").await.unwrap() });
    kicked.cancelled().await;
    assert_eq!(reason.get(), Some(&Kick::TakenOver));
    // The second claim waits until the first is dropped.
    tokio::task::yield_now().await;
    assert!(!second.is_finished());
    drop(first);
    let second = second.await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert!(!second.kick.is_cancelled());
    assert!(sessions.kick("d1", Kick::Revoked));
    assert_eq!(second.reason.get(), Some(&Kick::Revoked));
    drop(second);
    assert!(sessions.is_empty());
    assert!(!sessions.kick("d1", Kick::Revoked));
}

/// A session that never ends is not replaced behind its back: the new connection is refused,
/// and the old session stays the one that kicks reach.
#[tokio::test(start_paused = true)]
async fn a_session_that_does_not_end_is_never_run_beside_a_new_one() {
    let sessions = Arc::new(Sessions::default());
    let stuck = sessions.claim("d1").await.unwrap();
    assert!(
        sessions.claim("d1").await.is_none(),
        "refused after the wait"
    );
    assert_eq!(sessions.len(), 1);
    assert_eq!(stuck.reason.get(), Some(&Kick::TakenOver));
    drop(stuck);
    assert!(sessions.is_empty());
    assert!(sessions.claim("d1").await.is_some());
}

#[test]
fn an_ipv6_source_is_its_64_network() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
    assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    assert_eq!(
        source_of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
        ip("2001:db8:1:2::")
    );
    assert_eq!(
        source_of(ip("2001:db8:1:2::1")),
        source_of(ip("2001:db8:1:2:ffff::9"))
    );
    assert_ne!(
        source_of(ip("2001:db8:1:2::1")),
        source_of(ip("2001:db8:1:3::1"))
    );
}

/// Issue 13: a CONNECT announcing 256 MiB was held, waiting for bytes that never come, until
/// the connect timeout. Its fixed header is enough to refuse it.
#[tokio::test(start_paused = true)]
async fn a_connect_announcing_more_than_the_limit_is_refused_from_its_header() {
    use tokio::io::AsyncWriteExt;
    let (mut device, mut gateway) = tokio::io::duplex(64);
    // CONNECT, remaining length 268,435,455, then the start of the protocol name.
    device
        .write_all(&[0x10, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x04])
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    let read = tokio::time::timeout(
        Duration::from_secs(3600),
        read_protocol_level(&mut gateway, &mut buf, 65_536),
    )
    .await;
    assert_eq!(read, Ok(Err("CONNECT too large")));
    drop(device);
}
