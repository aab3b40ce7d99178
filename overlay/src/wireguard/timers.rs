//! The timer thread: handshakes, keepalives and rekeying.

use std::sync::atomic::Ordering;
use std::time::Duration;

use boringtun::noise::TunnResult;
use tracing::debug;

use super::{io, Shared};

/// Handshakes, keepalives and rekeying, four times a second.
pub(super) fn run(s: &Shared) -> std::result::Result<(), String> {
    let mut batch = io::SendBatch::new();
    while !s.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        // The shared limiter counts handshakes per second: Tunn leaves resetting a
        // shared one to us (the limiter itself resets at most once a second).
        s.keys.read().unwrap().limiter.reset_count();
        let peers = s.peers.read().unwrap();
        for p in peers.by_key.values() {
            let to = *p.endpoint.lock();
            let mut tunn = p.tunn.lock();
            match tunn.update_timers(batch.next_buf()) {
                TunnResult::WriteToNetwork(out) => {
                    let len = out.len();
                    batch.push(len, to);
                }
                TunnResult::Err(e) => debug!(peer = %p.address, error = ?e, "timer"),
                _ => {}
            }
            if batch.is_full() {
                batch.flush(&s.udp);
            }
        }
        drop(peers);
        batch.flush(&s.udp);
    }
    Ok(())
}
