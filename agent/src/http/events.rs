//! `/events`: the picture as server-sent events, sent on connect and whenever it
//! changes, with a comment line to keep proxies from closing a quiet stream. Each
//! client costs one task and the last picture it was sent: events are written to the
//! socket directly (nothing queues), and a client that stops reading is dropped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::phase::Phase;
use super::response::{write_within, Response};

/// How often the picture is compared with the last one sent.
const COMPARE_EVERY: Duration = Duration::from_millis(500);
/// Longest quiet time on a stream before a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Streams until the client goes away or stops reading.
pub async fn stream(mut conn: TcpStream, phase: watch::Receiver<Phase>) {
    let head = Response::new(200, "text/event-stream; charset=utf-8", "")
        .header("X-Accel-Buffering", "no")
        .head(None);
    if write_within(&mut conn, head.as_bytes()).await.is_err() {
        return;
    }
    let (mut from_client, mut to_client) = conn.into_split();
    let mut last: Arc<str> = Arc::from("");
    let mut quiet_since = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(COMPARE_EVERY);
    let mut ignored = [0u8; 512];
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // The client never speaks on a stream; anything it sends is dropped, and
            // its end of the connection ends the stream at once.
            read = from_client.read(&mut ignored) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
        }
        let Some(picture) = shared_picture(&phase) else {
            continue;
        };
        let event = if *picture != *last {
            let event = format!("event: picture\ndata: {picture}\n\n");
            last = picture;
            event
        } else if quiet_since.elapsed() >= KEEP_ALIVE {
            ": keep-alive\n\n".to_owned()
        } else {
            continue;
        };
        if write_within(&mut to_client, event.as_bytes())
            .await
            .is_err()
        {
            return;
        }
        quiet_since = tokio::time::Instant::now();
    }
}

/// The picture as JSON, built at most once per [`COMPARE_EVERY`] for all streams:
/// building it reads the whole view, and each open page would otherwise pay that
/// twice a second.
fn shared_picture(phase: &watch::Receiver<Phase>) -> Option<Arc<str>> {
    static LATEST: Mutex<Option<(Instant, Arc<str>)>> = Mutex::new(None);
    if let Some((at, json)) = &*LATEST.lock().unwrap() {
        if at.elapsed() < COMPARE_EVERY {
            return Some(json.clone());
        }
    }
    // Built outside the lock: a stream waiting on another's build would hold a
    // runtime worker the while. Two building at once now and then is fine.
    let phase = phase.borrow().clone();
    let json: Arc<str> = serde_json::to_string(&phase.picture()).ok()?.into();
    *LATEST.lock().unwrap() = Some((Instant::now(), json.clone()));
    Some(json)
}
