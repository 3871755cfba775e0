//! The API's TCP listener: every answer is JSON, even the ones hyper writes by itself.
//!
//! hyper answers a request it cannot parse (a control byte in a header, a malformed request
//! line, an oversized header section) with a bodiless 400, 414 or 431 before any handler
//! runs, and offers no hook to change that. [`JsonErrors`] wraps each connection: it keeps
//! the head of the request being read, and when it sees hyper's automatic error response go
//! out it writes a JSON one instead, saying what was wrong with the request. Responses of the
//! API itself always carry a `content-type`; hyper's automatic ones never do, which is how
//! they are told apart.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How much of a request head is kept for explaining a parse error.
const HEAD_CAP: usize = 8 * 1024;

/// A TCP listener whose connections answer parse errors with JSON (for `axum::serve`).
#[derive(Debug)]
pub struct HttpListener(pub TcpListener);

impl axum::serve::Listener for HttpListener {
    type Io = JsonErrors<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (JsonErrors::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// One connection; see the module documentation.
#[derive(Debug)]
pub struct JsonErrors<IO> {
    io: IO,
    /// The first bytes of the request being read (bytes read since the last response began).
    head: Vec<u8>,
    /// A response went out since the last read: the next read starts a new request.
    responded: bool,
    /// A replacement being written: its bytes, how many are written, and the length of the
    /// buffer it stands in for (what the caller is told was written).
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl<IO> JsonErrors<IO> {
    pub fn new(io: IO) -> JsonErrors<IO> {
        JsonErrors {
            io,
            head: Vec::new(),
            responded: false,
            replacing: None,
        }
    }
}

impl<IO: AsyncWrite + Unpin> JsonErrors<IO> {
    /// Writes the rest of a replacement; `Ready(Ok(n))` with the replaced buffer's length.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((bytes, written, stands_for)) = &mut self.replacing else {
            return Poll::Ready(Ok(0));
        };
        while *written < bytes.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        let n = *stands_for;
        self.replacing = None;
        Poll::Ready(Ok(n))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for JsonErrors<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            if this.responded {
                this.head.clear();
                this.responded = false;
            }
            let room = HEAD_CAP.saturating_sub(this.head.len());
            this.head.extend_from_slice(&new[..new.len().min(room)]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for JsonErrors<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacing.is_some() {
            return this.drain(cx);
        }
        if let Some(json) = replacement(buf, &this.head) {
            this.replacing = Some((json, 0, buf.len()));
            return this.drain(cx);
        }
        this.responded = true;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replacing.is_some() {
            ready!(this.drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replacing.is_some() {
            ready!(this.drain(cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// If `out` is hyper's automatic error response (a complete head alone, status 4xx or 5xx,
/// `content-length: 0` and no `content-type`), the JSON response to send instead.
fn replacement(out: &[u8], request_head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(out).ok()?;
    let head = text.strip_suffix("\r\n\r\n")?;
    if head.contains("\r\n\r\n") {
        return None;
    }
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let code: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?
        .get(..3)?
        .parse()
        .ok()?;
    if code < 400 {
        return None;
    }
    let (mut empty, mut typed, mut date) = (false, false, None);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => empty = value == "0",
            "content-type" => typed = true,
            "date" => date = Some(value),
            _ => {}
        }
    }
    if !empty || typed {
        return None;
    }
    let message = match code {
        400 => describe(request_head),
        414 => "the request URI is too long".to_owned(),
        431 => "the request's header section is too large".to_owned(),
        505 => "HTTP version not supported: send HTTP/1.1".to_owned(),
        _ => format!("the request was refused ({status_line})"),
    };
    let body = serde_json::json!({ "error": message }).to_string();
    let reason = status_line.get(13..).unwrap_or("").trim();
    let mut response = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(d) = date {
        response.push_str(&format!("date: {d}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(&body);
    Some(response.into_bytes())
}

/// Says what is wrong with a request head that hyper refused. `head` starts with the head of
/// the request being read; pipelined requests (sent before the previous answer) follow it in
/// the same buffer, so later heads that start with a request line are checked too.
pub(crate) fn describe(head: &[u8]) -> String {
    let mut rest = head;
    let mut first = true;
    while !rest.is_empty() {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(rest.len());
        if let Some(problem) = check_head(&rest[..end], first) {
            return problem;
        }
        first = false;
        rest = rest.get(end + 4..).unwrap_or_default();
    }
    "the request is not valid HTTP/1.1 (malformed request line or header)".to_owned()
}

/// The first problem of one request head. A head that is not `first` is checked only if it
/// starts with a request line (it may be the body of the request before it).
fn check_head(head: &[u8], first: bool) -> Option<String> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next()?;
    let mut parts = request_line.split(|&b| b == b' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let method_ok = method.is_some_and(|m| !m.is_empty() && m.iter().all(|&b| is_tchar(b)));
    let target_ok =
        target.is_some_and(|t| !t.is_empty() && t.iter().all(|&b| b > 0x20 && b != 0x7f));
    let version_ok = matches!(version, Some(b"HTTP/1.1" | b"HTTP/1.0")) && parts.next().is_none();
    if !(method_ok && target_ok && version_ok) {
        return first.then(|| {
            format!(
                "malformed request line `{}`: expected METHOD /path HTTP/1.1",
                printable(request_line)
            )
        });
    }
    for line in lines {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Some(format!("header line `{}` has no colon", printable(line)));
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Some(format!(
                "header name `{}` holds a character not allowed in header names",
                printable(name)
            ));
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        if let Some(&bad) = value
            .iter()
            .find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Some(format!(
                "header `{name}` holds a control character (0x{bad:02x})"
            ));
        }
        let value = String::from_utf8_lossy(value);
        if name == "content-length" && value.trim().parse::<u64>().is_err() {
            return Some(format!(
                "header `content-length` is not a number: {:?}",
                value.trim()
            ));
        }
    }
    None
}

/// RFC 9110 token characters (method and header names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// At most 64 characters of `bytes`, control and non-ASCII bytes escaped.
fn printable(bytes: &[u8]) -> String {
    let mut out: String = bytes
        .iter()
        .take(64)
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if bytes.len() > 64 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests;
