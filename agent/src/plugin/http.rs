//! HTTP/1.1 framing for the plugin socket, as Go's HTTP client speaks it: POST with
//! a `Content-Length` body, connections kept alive between calls. Every read is
//! bounded in size and time; chunked bodies are refused (Go sends a length for the
//! in-memory bodies plugin calls have).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::http::request::head_end;
use crate::http::response::reason;

/// Bounds on one connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub max_head: usize,
    pub max_body: usize,
    /// From a request's first byte to its last.
    pub request_timeout: Duration,
    /// For one whole response to be taken off the socket.
    pub write_timeout: Duration,
    /// Between requests (and before the first) before the connection is closed.
    pub idle_timeout: Duration,
}

/// One request, read whole.
#[derive(Debug)]
pub(super) struct Request {
    pub method: String,
    /// The path, without its query: `/NetworkDriver.Join`.
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close after this answer.
    pub close: bool,
}

/// Why no request was read. All but `Gone` are answered, then the connection closed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadError {
    /// The client closed, failed, or stayed idle: nothing to answer.
    Gone,
    Timeout,
    HeadTooLarge,
    BodyTooLarge(usize),
    Chunked,
    Malformed(&'static str),
}

impl ReadError {
    /// Status and message to answer with, if any.
    pub fn answer(&self, limits: &Limits) -> Option<(u16, String)> {
        Some(match self {
            ReadError::Gone => return None,
            ReadError::Timeout => (
                408,
                format!(
                    "request not received whole within {}s",
                    limits.request_timeout.as_secs_f32()
                ),
            ),
            ReadError::HeadTooLarge => (
                431,
                format!("request head larger than {} bytes", limits.max_head),
            ),
            ReadError::BodyTooLarge(n) => (
                413,
                format!(
                    "request body of {n} bytes is larger than the {} allowed",
                    limits.max_body
                ),
            ),
            ReadError::Chunked => (
                411,
                "chunked request bodies are not accepted; send Content-Length".to_owned(),
            ),
            ReadError::Malformed(why) => (400, format!("malformed HTTP request: {why}")),
        })
    }
}

/// A connection and what was read of it past the last request.
pub(super) struct Connection<S> {
    pub stream: S,
    buf: Vec<u8>,
}

const CHUNK: usize = 8 << 10;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S) -> Self {
        Connection {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads the next request: waits up to the idle timeout for its first byte, then
    /// gives it the request timeout for the rest.
    pub async fn read_request(&mut self, limits: &Limits) -> Result<Request, ReadError> {
        if self.buf.is_empty() {
            match tokio::time::timeout(limits.idle_timeout, self.fill()).await {
                Ok(Ok(())) => {}
                Ok(Err(())) | Err(_) => return Err(ReadError::Gone),
            }
        }
        let deadline = Instant::now() + limits.request_timeout;
        match tokio::time::timeout_at(deadline, self.read_after_first_byte(limits)).await {
            Ok(r) => r,
            Err(_) => Err(ReadError::Timeout),
        }
    }

    async fn read_after_first_byte(&mut self, limits: &Limits) -> Result<Request, ReadError> {
        let mut scanned = 0;
        let head_len = loop {
            // Only new bytes (and the three before them) are searched: a client
            // sending a byte at a time costs no rescans.
            if let Some(end) = head_end(&self.buf[scanned..]) {
                break scanned + end;
            }
            if self.buf.len() > limits.max_head {
                return Err(ReadError::HeadTooLarge);
            }
            scanned = self.buf.len().saturating_sub(3);
            self.fill().await.map_err(|()| ReadError::Gone)?;
        };
        if head_len > limits.max_head {
            return Err(ReadError::HeadTooLarge);
        }
        let head = parse_head(&self.buf[..head_len])?;
        if head.chunked {
            return Err(ReadError::Chunked);
        }
        if head.length > limits.max_body {
            return Err(ReadError::BodyTooLarge(head.length));
        }
        let end = head_len + head.length;
        while self.buf.len() < end {
            self.fill().await.map_err(|()| ReadError::Gone)?;
        }
        let body = self.buf[head_len..end].to_vec();
        self.buf.drain(..end);
        Ok(Request {
            method: head.method,
            path: head.path,
            body,
            close: head.close,
        })
    }

    /// Appends what the socket has (at most [`CHUNK`] bytes); `Err` when it is closed.
    async fn fill(&mut self) -> Result<(), ()> {
        let mut chunk = [0u8; CHUNK];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => Err(()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// Writes one response within the write timeout.
    pub async fn respond(
        &mut self,
        limits: &Limits,
        status: u16,
        body: &[u8],
        close: bool,
    ) -> std::io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/vnd.docker.plugins.v1+json\r\nContent-Length: {}\r\n{}\r\n",
            reason(status),
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
        )
        .into_bytes();
        out.extend_from_slice(body);
        let write = async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(limits.write_timeout, write).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
}

struct Head {
    method: String,
    path: String,
    length: usize,
    chunked: bool,
    close: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, ReadError> {
    let head = std::str::from_utf8(head).map_err(|_| ReadError::Malformed("not UTF-8"))?;
    let mut lines = head.lines();
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Malformed("bad request line"));
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ReadError::Malformed("not HTTP/1.0 or HTTP/1.1")),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ReadError::Malformed("bad method"));
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(ReadError::Malformed("the target is not a path"));
    }
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = http10;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Malformed("header line without a colon"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or(ReadError::Malformed("bad Content-Length"))?;
            // Two differing lengths are how request smuggling starts: refused.
            if length.is_some_and(|m| m != n) {
                return Err(ReadError::Malformed("conflicting Content-Length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    Ok(Head {
        method: method.to_owned(),
        path: path.to_owned(),
        length: length.unwrap_or(0),
        chunked,
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 8 << 10,
        max_body: 1 << 20,
        request_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
    };

    async fn read_all(bytes: &[u8]) -> Vec<Result<Request, ReadError>> {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(bytes).await.unwrap();
        drop(client);
        let mut conn = Connection::new(server);
        let mut out = Vec::new();
        loop {
            let r = conn.read_request(&LIMITS).await;
            // The server closes after any error; so does this reader.
            let failed = r.is_err();
            out.push(r);
            if failed {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn reads_pipelined_requests_with_bodies() {
        let got = read_all(
            b"POST /A?x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}POST /B HTTP/1.1\r\ncontent-length:0\r\nConnection: close\r\n\r\n",
        )
        .await;
        let a = got[0].as_ref().unwrap();
        assert_eq!(
            (a.method.as_str(), a.path.as_str(), &a.body[..], a.close),
            ("POST", "/A", &b"{}"[..], false)
        );
        let b = got[1].as_ref().unwrap();
        assert_eq!((b.path.as_str(), b.body.len(), b.close), ("/B", 0, true));
        assert_eq!(got[2].as_ref().unwrap_err(), &ReadError::Gone);
    }

    #[tokio::test]
    async fn refuses_bad_framing() {
        for (bytes, want) in [
            (
                &b"POST /A HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                ReadError::Chunked,
            ),
            (
                b"POST /A HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                ReadError::Malformed("conflicting Content-Length"),
            ),
            (
                b"POST /A HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
                ReadError::Malformed("bad Content-Length"),
            ),
            (
                b"POST /A HTTP/2\r\n\r\n",
                ReadError::Malformed("not HTTP/1.0 or HTTP/1.1"),
            ),
            (
                b"POST /A HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n",
                ReadError::BodyTooLarge(1048577),
            ),
        ] {
            assert_eq!(read_all(bytes).await[0].as_ref().unwrap_err(), &want);
        }
        let mut long = b"POST /A HTTP/1.1\r\nX: ".to_vec();
        long.resize(LIMITS.max_head + 10, b'a');
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            read_all(&long).await[0].as_ref().unwrap_err(),
            &ReadError::HeadTooLarge
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_gone() {
        let got = read_all(b"POST /A HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}").await;
        assert_eq!(got[0].as_ref().unwrap_err(), &ReadError::Gone);
    }
}
