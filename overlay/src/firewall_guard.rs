//! Keeps our nftables table in place when another program removes or edits it.
//!
//! A firewall reload (`nft flush ruleset`, as `systemctl restart nftables` does)
//! deletes every table, ours with it, and with it the isolation between networks.
//! The kernel announces every committed nftables change on the `NFNLGRP_NFTABLES`
//! multicast group; a thread inside the host's namespace listens there, and when a
//! change touched our table it compares the table with the listing taken right after
//! our last apply and loads the last ruleset again if they differ. Our own applies
//! are announced too; they leave the table as listed, so they end there (no loop).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::constants::FIREWALL_TABLE;
use crate::error::{Error, Result};
use crate::firewall::{apply_ruleset, list_table, LastApplied};
use crate::netns::Netns;

/// `nfnetlink` subsystem of nftables, and the message types we read.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
/// `NFPROTO_IPV4`: the family of an `ip` table.
const NFPROTO_IPV4: u8 = 2;
/// Attribute 1 names the table in every table, chain, rule, set, element, object
/// and flowtable message.
const ATTR_TABLE: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// A change is acted on once the events have been quiet this long (one `nft -f`
/// sends a burst), and at the latest this long after the first: well inside 100 ms.
const QUIET: Duration = Duration::from_millis(15);
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Watching while held; dropping it stops the watch at once.
pub struct FirewallGuard {
    /// The write end of a pipe the watching thread polls: closing it (on drop) wakes
    /// the thread to stop, so it needs no timer while nothing happens.
    _stop: OwnedFd,
}

/// Starts the watch in `ns`; returns once the subscription is open, so that every
/// change from then on is seen.
pub(crate) async fn start(ns: &Netns, last: Arc<LastApplied>) -> Result<FirewallGuard> {
    let (stopped, stop) = stop_pipe().map_err(|e| Error::Worker(format!("pipe: {e}")))?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let name = ns.to_string();
    ns.spawn_inside("nft-guard", move |entered| {
        let socket = entered.and_then(|()| subscribe(&name));
        match socket {
            Ok(fd) => {
                let _ = ready_tx.send(Ok(()));
                watch(&fd, &stopped, &name, &last);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    })?;
    ready_rx
        .await
        .map_err(|_| Error::Worker(format!("firewall guard for {ns} panicked")))??;
    Ok(FirewallGuard { _stop: stop })
}

/// A pipe as (read end, write end); the read end polls as hung up once the write
/// end is closed.
fn stop_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `pipe2` fills the two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A netlink socket in the calling thread's namespace, subscribed to nftables' changes.
fn subscribe(ns: &str) -> Result<OwnedFd> {
    let fail = |what: &str| Error::Firewall {
        ns: ns.to_string(),
        message: format!(
            "cannot watch nftables changes ({what}: {}); the kernel needs nf_tables",
            std::io::Error::last_os_error()
        ),
    };
    // SAFETY: plain socket calls on a descriptor we own; every pointer is to a local
    // of the size passed with it.
    unsafe {
        let raw = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        );
        if raw < 0 {
            return Err(fail("socket"));
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ) < 0
        {
            return Err(fail("bind"));
        }
        let group = libc::NFNLGRP_NFTABLES as u32;
        let option = |level, name, value: *const libc::c_void, len: usize| {
            libc::setsockopt(fd.as_raw_fd(), level, name, value, len as libc::socklen_t) == 0
        };
        if !option(
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            (&group as *const u32).cast(),
            4,
        ) {
            return Err(fail("join NFNLGRP_NFTABLES"));
        }
        // A reload of a large ruleset is a burst of events; an overflow is handled
        // (it counts as a change) but costs a check.
        let size: libc::c_int = 1 << 20;
        option(
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            4,
        );
        Ok(fd)
    }
}

/// Reads events until `stopped` hangs up; restores the table after each burst that
/// touched it. Sleeps in `poll` with no timeout unless a burst is pending.
fn watch(fd: &OwnedFd, stopped: &OwnedFd, ns: &str, last: &LastApplied) {
    let mut buf = vec![0u8; 1 << 16];
    // (first event of the burst, latest event)
    let mut pending: Option<(Instant, Instant)> = None;
    debug!(
        ns,
        "watching nftables for changes to table {FIREWALL_TABLE}"
    );
    loop {
        let timeout = pending.map(|(first, latest)| {
            (latest + QUIET)
                .min(first + MAX_WAIT)
                .saturating_duration_since(Instant::now())
        });
        let mut fds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stopped.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls our own two descriptors.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, poll_timeout(timeout)) };
        if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            warn!(ns, error = %std::io::Error::last_os_error(), "firewall guard cannot wait for events; stopped");
            return;
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[0].revents != 0 && drain(fd, &mut buf) {
            let now = Instant::now();
            pending = Some((pending.map_or(now, |(first, _)| first), now));
        }
        if let Some((first, latest)) = pending {
            let now = Instant::now();
            if now - latest >= QUIET || now - first >= MAX_WAIT {
                pending = None;
                restore_if_changed(ns, last, first);
            }
        }
    }
    debug!(ns, "firewall guard stopped");
}

/// `poll`'s timeout in milliseconds, rounded up; -1 (none) for `None`.
fn poll_timeout(timeout: Option<Duration>) -> libc::c_int {
    timeout.map_or(-1, |t| {
        t.as_nanos()
            .div_ceil(1_000_000)
            .min(libc::c_int::MAX as u128) as libc::c_int
    })
}

/// Reads every queued datagram; whether any named our table (or was lost).
fn drain(fd: &OwnedFd, buf: &mut [u8]) -> bool {
    let mut touched = false;
    loop {
        // SAFETY: reads into our own buffer, at most its length, without blocking.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            touched |= touches_our_table(&buf[..n as usize]);
            continue;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            // Events were lost; any of them may have been ours.
            Some(libc::ENOBUFS) => touched = true,
            Some(libc::EINTR) => {}
            _ => return touched,
        }
    }
}

/// Loads the last ruleset again unless the table is as we left it.
fn restore_if_changed(ns: &str, last: &LastApplied, since: Instant) {
    let mut last = last.lock();
    let Some(applied) = last.as_mut() else {
        return;
    };
    let why = match list_table(ns) {
        Ok(listing) if listing == applied.listing => return,
        Ok(_) => "changed",
        Err(_) => "deleted",
    };
    match apply_ruleset(ns, &applied.ruleset) {
        Ok(listing) => {
            applied.listing = listing;
            info!(
                ns,
                table = FIREWALL_TABLE,
                after_ms = since.elapsed().as_millis() as u64,
                "firewall table {why} by another program; restored"
            );
        }
        Err(e) => warn!(ns, error = %e, "firewall table {why} by another program and not restored"),
    }
}

/// Whether a datagram of nftables events names our table (family `ip`).
fn touches_our_table(mut datagram: &[u8]) -> bool {
    let mut touched = false;
    while datagram.len() >= 16 {
        let len = u32::from_ne_bytes(datagram[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(datagram[4..6].try_into().unwrap());
        if len < 16 || len > datagram.len() {
            break;
        }
        let message = &datagram[16..len];
        if kind >> 8 == NFNL_SUBSYS_NFTABLES
            && kind & 0xff != NFT_MSG_NEWGEN
            && message.len() >= 4
            && message[0] == NFPROTO_IPV4
            && table_name(&message[4..]) == Some(FIREWALL_TABLE.as_bytes())
        {
            touched = true;
        }
        datagram = datagram.get((len + 3) & !3..).unwrap_or(&[]);
    }
    touched
}

/// The table-name attribute among netlink attributes.
fn table_name(mut attrs: &[u8]) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == ATTR_TABLE {
            let value = &attrs[4..len];
            return Some(value.split(|b| *b == 0).next().unwrap_or(value));
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One nftables event message: `msg` of the nftables subsystem, `family`, and a
    /// table-name attribute.
    fn event(msg: u16, family: u8, table: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let name_len = table.len() + 1;
        attr.extend_from_slice(&((4 + name_len) as u16).to_ne_bytes());
        attr.extend_from_slice(&ATTR_TABLE.to_ne_bytes());
        attr.extend_from_slice(table.as_bytes());
        attr.push(0);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let len = 16 + 4 + attr.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&(NFNL_SUBSYS_NFTABLES << 8 | msg).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(&attr);
        m
    }

    #[test]
    fn our_table_is_recognised_among_events() {
        const DELTABLE: u16 = 2;
        const NEWRULE: u16 = 6;
        assert!(touches_our_table(&event(
            DELTABLE,
            NFPROTO_IPV4,
            FIREWALL_TABLE
        )));
        assert!(!touches_our_table(&event(DELTABLE, NFPROTO_IPV4, "filter")));
        // inet and ip6 tables of the same name are not ours.
        assert!(!touches_our_table(&event(NEWRULE, 1, FIREWALL_TABLE)));
        assert!(!touches_our_table(&event(NEWRULE, 10, FIREWALL_TABLE)));
        let mut burst = event(NEWRULE, NFPROTO_IPV4, "filter");
        burst.extend(event(NEWRULE, NFPROTO_IPV4, "netagent2"));
        assert!(!touches_our_table(&burst));
        burst.extend(event(NEWRULE, NFPROTO_IPV4, FIREWALL_TABLE));
        assert!(touches_our_table(&burst));
        assert!(!touches_our_table(&burst[..burst.len() - 3]));
        assert!(!touches_our_table(&[]));
    }

    /// The watching thread sleeps until its guard goes, then stops at once; events
    /// that do not name our table (here: bytes that are no netlink message) leave
    /// it asleep.
    #[test]
    fn watch_stops_as_soon_as_the_guard_is_dropped() {
        use std::os::unix::net::UnixDatagram;
        let (events, sender) = UnixDatagram::pair().unwrap();
        let (stopped, stop) = stop_pipe().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let socket = OwnedFd::from(events);
            watch(&socket, &stopped, "test", &LastApplied::default());
            let _ = done_tx.send(());
        });
        sender.send(b"not netlink").unwrap();
        assert!(
            done_rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "stopped while the guard was held"
        );
        let dropped = Instant::now();
        drop(FirewallGuard { _stop: stop });
        done_rx
            .recv_timeout(Duration::from_secs(1))
            .expect("stopped after the guard was dropped");
        assert!(dropped.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn poll_timeouts_round_up_to_whole_milliseconds() {
        assert_eq!(poll_timeout(None), -1);
        assert_eq!(poll_timeout(Some(Duration::ZERO)), 0);
        assert_eq!(poll_timeout(Some(Duration::from_micros(1))), 1);
        assert_eq!(poll_timeout(Some(QUIET)), 15);
    }
}
