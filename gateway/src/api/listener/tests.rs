use axum::Router;
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

#[test]
fn a_bad_request_head_is_explained() {
    let cases: [(&[u8], &str); 6] = [
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Trace: a\x01b\r\n\r\n",
            "header `x-trace` holds a control character (0x01)",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
            "header name `Bad Name` holds a character not allowed in header names",
        ),
        (
            b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
            "malformed request line `GET /a b HTTP/1.1`: expected METHOD /path HTTP/1.1",
        ),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 12x\r\n\r\n",
            "header `content-length` is not a number: \"12x\"",
        ),
        (
            b"GET / HTTP/1.1\r\nHost\r\n\r\n",
            "header line `Host` has no colon",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "the request is not valid HTTP/1.1 (malformed request line or header)",
        ),
    ];
    for (head, want) in cases {
        assert_eq!(describe(head), want, "{}", String::from_utf8_lossy(head));
    }
}

#[test]
fn only_hypers_bodiless_error_responses_are_replaced() {
    let head = b"GET / HTTP/1.1\r\nX: \x02\r\n\r\n";
    let auto = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 07:37:32 GMT\r\n\r\n";
    let json = String::from_utf8(replacement(auto, head).unwrap()).unwrap();
    let body = r#"{"error":"header `x` holds a control character (0x02)"}"#;
    assert_eq!(
        json,
        format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\ndate: Thu, 03 Dec 2026 07:37:32 GMT\r\n\r\n{body}",
            body.len()
        )
    );
    let too_large = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
    assert!(
        String::from_utf8(replacement(too_large, b"").unwrap())
            .unwrap()
            .ends_with(r#"{"error":"the request's header section is too large"}"#)
    );
    // The API's own answers are left alone: they have a type, a body, or a 2xx/3xx status.
    for own in [
        &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"[..],
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 12\r\n\r\n",
        b"{\"error\": \"a body chunk\"}",
    ] {
        assert_eq!(replacement(own, head), None, "{}", String::from_utf8_lossy(own));
    }
}

/// Sends raw bytes on one connection and reads the answer until the server closes it.
async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn a_control_byte_in_a_header_gets_a_json_400_on_a_live_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/ok", get(|| async { "fine" }));
    let server = tokio::spawn(async move {
        axum::serve(HttpListener(listener), app).await.unwrap();
    });

    let answer = exchange(
        addr,
        b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Trace: a\x01b\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    assert!(head.contains("content-type: application/json"), "{answer}");
    assert_eq!(
        body,
        r#"{"error":"header `x-trace` holds a control character (0x01)"}"#
    );

    // A good request first, then a bad one on the same connection: the explanation is about
    // the second request's head.
    let answer = exchange(
        addr,
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\nX-Other: \x7f\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("\r\n\r\nfine"), "{answer}");
    assert!(
        answer.ends_with(r#"{"error":"header `x-other` holds a control character (0x7f)"}"#),
        "{answer}"
    );
    server.abort();
}
