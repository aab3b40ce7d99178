//! The CLI's side of the local API.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::api::{Reply, Request, Response};

pub async fn call(socket: &Path, req: &Request) -> Result<Response> {
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
    match serde_json::from_str::<Reply>(&reply)
        .context("the agent's reply is not one this CLI reads (a different version?)")?
    {
        Reply::Ok(content) => Response::read(req, content)
            .context("the agent's reply is not one this CLI reads (a different version?)"),
        Reply::Error(e) => Err(anyhow!(e)),
    }
}
