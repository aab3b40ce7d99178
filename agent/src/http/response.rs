//! Writing a response and closing: one request per connection (`Connection: close`),
//! so no client holds a connection between requests. Every write has a deadline: a
//! client that does not read is dropped, never buffered for.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Time a client has to take one response (or one event) off the socket.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// After an early answer (431, say), how long and how much of the rest of the
/// request is read and dropped, so the client reads the answer before a reset.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 << 10;

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra header lines, each ending in `\r\n`.
    pub headers: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: String::new(),
        }
    }

    /// A one-line plain-text answer.
    pub fn text(status: u16, line: &str) -> Self {
        Response::new(status, "text/plain; charset=utf-8", format!("{line}\n"))
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push_str(&format!("{name}: {value}\r\n"));
        self
    }

    /// Status line and headers; `length` is the body's.
    pub fn head(&self, length: Option<usize>) -> String {
        let length = length.map_or(String::new(), |n| format!("Content-Length: {n}\r\n"));
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\n{length}Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n{}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.headers
        )
    }

    /// Writes the response (without its body for HEAD) within [`WRITE_TIMEOUT`].
    pub async fn send(self, conn: &mut TcpStream, with_body: bool) -> std::io::Result<()> {
        let mut out = self.head(Some(self.body.len())).into_bytes();
        if with_body {
            out.extend_from_slice(&self.body);
        }
        write_within(conn, &out).await
    }
}

pub async fn write_within<W: AsyncWrite + Unpin>(
    conn: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, conn.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Closes after an answer sent before the request was read whole: our side is shut,
/// then what the client still sends is read and dropped for a moment (bounded), so
/// the kernel does not reset the connection over unread bytes before the client has
/// read the answer.
pub async fn close_lingering(mut conn: TcpStream) {
    let _ = conn.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The reason phrase of the statuses this program's HTTP servers send.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}
