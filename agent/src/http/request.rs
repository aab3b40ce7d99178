//! Reading one request head, as a hostile client may send it: at most
//! [`MAX_HEAD`] bytes, all of it within [`HEAD_TIMEOUT`] (a client trickling bytes
//! holds its connection no longer than a silent one). The body is never read: only
//! GET and HEAD are served.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request head (request line and headers) read.
pub const MAX_HEAD: usize = 8 << 10;
/// Time a client has to send its whole head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The path, without its query.
    pub path: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// No whole head within [`HEAD_TIMEOUT`].
    Timeout,
    /// More than [`MAX_HEAD`] bytes without the blank line that ends a head.
    TooLarge,
    /// Not an HTTP/1 request line.
    Malformed,
    /// The client closed or failed before a whole head.
    Closed,
}

/// Reads until the blank line ending the head; what follows it is left unread.
pub async fn read_head<R: AsyncRead + Unpin>(conn: &mut R) -> Result<Head, HeadError> {
    read_head_within(conn, HEAD_TIMEOUT).await
}

async fn read_head_within<R: AsyncRead + Unpin>(
    conn: &mut R,
    limit: Duration,
) -> Result<Head, HeadError> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let read = async {
        loop {
            if len == buf.len() {
                return Err(HeadError::TooLarge);
            }
            let before = len;
            match conn.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => return Err(HeadError::Closed),
                Ok(n) => len += n,
            }
            // Only the new bytes (and the three before them, where a blank line may
            // begin) are searched: a client sending a byte at a time would otherwise
            // cost a scan of the whole buffer per byte.
            let from = before.saturating_sub(3);
            if let Some(end) = head_end(&buf[from..len]) {
                return parse_head(&buf[..from + end]);
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or(Err(HeadError::Timeout))
}

/// Where the head ends (after `\r\n\r\n`, or a bare `\n\n` as lenient clients send).
pub(crate) fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn parse_head(head: &[u8]) -> Result<Head, HeadError> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line)
        .map_err(|_| HeadError::Malformed)?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    if !version.starts_with("HTTP/1.")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Err(HeadError::Malformed);
    }
    // Absolute-form targets (proxies send them) name the path after the authority.
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(HeadError::Malformed);
    }
    Ok(Head {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head_of(bytes: &[u8]) -> Result<Head, HeadError> {
        let mut conn = bytes;
        read_head(&mut conn).await
    }

    #[tokio::test]
    async fn reads_method_and_path_without_query() {
        let h = head_of(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/metrics");
        let h = head_of(b"HEAD http://h:1/readyz HTTP/1.0\n\n")
            .await
            .unwrap();
        assert_eq!((h.method.as_str(), h.path.as_str()), ("HEAD", "/readyz"));
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_request_line() {
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET x HTTP/1.1\r\n\r\n",
            b"\xff / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(head_of(bad).await, Err(HeadError::Malformed), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_head_longer_than_the_bound_is_too_large() {
        let mut req = b"GET / HTTP/1.1\r\nX: ".to_vec();
        req.resize(MAX_HEAD + 1, b'a');
        assert_eq!(head_of(&req).await, Err(HeadError::TooLarge));
        // Exactly at the bound is still read.
        let mut req = b"GET / HTTP/1.1\r\nX: ".to_vec();
        req.resize(MAX_HEAD - 4, b'a');
        req.extend_from_slice(b"\r\n\r\n");
        assert!(head_of(&req).await.is_ok());
    }

    #[tokio::test]
    async fn a_client_that_stops_half_way_is_closed() {
        assert_eq!(head_of(b"GET / HT").await, Err(HeadError::Closed));
    }

    #[tokio::test]
    async fn a_trickling_client_is_cut_off_after_the_timeout() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let trickle = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in b"GET / HTTP/1.1\r\nX: aaaaaaaaaaaaaaaaaaaaa" {
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let limit = Duration::from_millis(200);
        let started = std::time::Instant::now();
        assert_eq!(
            read_head_within(&mut server, limit).await,
            Err(HeadError::Timeout)
        );
        assert!(started.elapsed() < limit * 2);
        drop(server);
        trickle.await.unwrap();
    }
}
