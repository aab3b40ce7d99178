//! The CLI's side of the local API. Every call has a deadline: an agent that accepts
//! and never answers (stuck, or another program on the socket) is named, not waited on.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::api::{Reply, Request, Response};

/// Sends `req` to the agent at `socket` and reads its reply within `deadline`.
pub async fn call(socket: &Path, req: &Request, deadline: Duration) -> Result<Response> {
    tokio::time::timeout(deadline, exchange(socket, req))
        .await
        .unwrap_or_else(|_| {
            Err(anyhow!(
                "the agent at {} did not answer within {} s; see its log (journalctl -u netagent), or wait longer with --timeout",
                socket.display(),
                deadline.as_secs_f64()
            ))
        })
}

/// Said of a reply line this CLI cannot read.
const UNREADABLE: &str = "the agent's reply is not one this CLI reads (a different version?)";

async fn exchange(socket: &Path, req: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the agent at {}; is it running? (systemctl status netagent, or give --socket)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut lines = BufReader::new(read).lines();
    let reply = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow!("the agent closed the connection without a reply"))?;
    match serde_json::from_str::<Reply>(&reply).context(UNREADABLE)? {
        Reply::Ok(content) => Response::read(req, content).context(UNREADABLE),
        Reply::Error(e) => Err(anyhow!(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_that_accepts_and_never_answers_is_named_within_the_deadline() {
        let dir = std::env::temp_dir().join(format!("netagent-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Accepts, reads, never replies.
        let held = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(stream);
        });
        let started = std::time::Instant::now();
        let e = call(&path, &Request::Status, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            e.to_string(),
            format!(
                "the agent at {} did not answer within 0.2 s; see its log (journalctl -u netagent), or wait longer with --timeout",
                path.display()
            )
        );
        held.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
