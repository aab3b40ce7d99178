//! The peer table: every other host of the mesh with its WireGuard session, receiver
//! index, endpoint and scope, found by mesh address (sending), by receiver index
//! (receiving) and by public key (handshake initiations, reconfiguration).

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use boringtun::x25519::PublicKey;
// Spins briefly before sleeping: the in and out threads meet on a peer's session
// for a microsecond at a time, too short to be worth a futex wait.
use parking_lot::Mutex;
use tracing::error;

use super::keys::KeyPair;
use super::scope::Scope;

/// Another host of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPeer {
    pub public_key: [u8; 32],
    /// Where its WireGuard socket listens (its underlay address and port).
    pub endpoint: SocketAddrV4,
    /// Its address on the mesh: the only source accepted from it.
    pub address: Ipv4Addr,
    /// The VNIs of the encrypted networks both it and this host hold a block of: the
    /// only networks its packets may enter here.
    pub vnis: BTreeSet<u32>,
}

/// What `peers` shows of one mesh peer.
#[derive(Clone, Debug)]
pub struct PeerStats {
    pub public_key: [u8; 32],
    pub address: Ipv4Addr,
    /// Where its packets come from now (roaming followed).
    pub endpoint: SocketAddrV4,
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

pub(super) struct PeerState {
    pub(super) public_key: [u8; 32],
    pub(super) address: Ipv4Addr,
    /// Our receiver index for it (random, 24 bits; boringtun adds 8 session bits).
    pub(super) index: u32,
    pub(super) endpoint: Mutex<SocketAddrV4>,
    pub(super) tunn: Mutex<Tunn>,
    /// Follows the networks it shares with this host, its sessions untouched.
    pub(super) scope: parking_lot::RwLock<Scope>,
}

#[derive(Default)]
pub(super) struct Peers {
    pub(super) by_address: HashMap<Ipv4Addr, Arc<PeerState>>,
    pub(super) by_index: HashMap<u32, Arc<PeerState>>,
    pub(super) by_key: HashMap<[u8; 32], Arc<PeerState>>,
}

impl Peers {
    /// The table for `peers`, made from this one (built from `previous`): a peer whose
    /// key and address are unchanged keeps its state and takes its new scope. The
    /// flag is false when a peer was left out for want of a receiver index.
    pub(super) fn next(
        &self,
        previous: &[MeshPeer],
        peers: &[MeshPeer],
        keys: &KeyPair,
        limiter: &Arc<RateLimiter>,
    ) -> (Peers, bool) {
        let mut next = Peers::default();
        let mut complete = true;
        for p in peers {
            let state = match self.by_key.get(&p.public_key) {
                Some(existing) if existing.address == p.address => {
                    // A roamed endpoint stays unless the store's changed (a change of
                    // scope alone must not undo roaming).
                    let moved = !previous
                        .iter()
                        .any(|q| q.public_key == p.public_key && q.endpoint == p.endpoint);
                    if moved {
                        *existing.endpoint.lock() = p.endpoint;
                    }
                    *existing.scope.write() = Scope::new(p.vnis.iter().copied());
                    existing.clone()
                }
                _ => {
                    let taken =
                        |i: &u32| self.by_index.contains_key(i) || next.by_index.contains_key(i);
                    let index = match random_index(taken) {
                        Ok(index) => index,
                        Err(e) => {
                            error!(peer = %p.address, error = %e, "no random receiver index; mesh peer left out for now");
                            complete = false;
                            continue;
                        }
                    };
                    Arc::new(PeerState {
                        public_key: p.public_key,
                        address: p.address,
                        index,
                        endpoint: Mutex::new(p.endpoint),
                        tunn: Mutex::new(new_tunn(keys, limiter, p.public_key, index)),
                        scope: parking_lot::RwLock::new(Scope::new(p.vnis.iter().copied())),
                    })
                }
            };
            next.by_address.insert(state.address, state.clone());
            next.by_index.insert(state.index, state.clone());
            next.by_key.insert(state.public_key, state);
        }
        (next, complete)
    }

    /// Gives every session this host's new key: each starts over with a handshake.
    pub(super) fn rekey(&self, keys: &KeyPair, limiter: &Arc<RateLimiter>) {
        for p in self.by_key.values() {
            p.tunn.lock().set_static_private(
                keys.secret.clone(),
                keys.public,
                Some(limiter.clone()),
            );
        }
    }

    pub(super) fn stats(&self) -> Vec<PeerStats> {
        self.by_key
            .values()
            .map(|p| {
                let (last_handshake, tx, rx, ..) = p.tunn.lock().stats();
                PeerStats {
                    public_key: p.public_key,
                    address: p.address,
                    endpoint: *p.endpoint.lock(),
                    last_handshake,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect()
    }
}

fn new_tunn(keys: &KeyPair, limiter: &Arc<RateLimiter>, peer: [u8; 32], index: u32) -> Tunn {
    // Keepalive every 10 s: a restarted peer finds out quickly that our session is
    // gone, and a NAT on the way keeps its mapping.
    Tunn::new(
        keys.secret.clone(),
        PublicKey::from(peer),
        None,
        Some(10),
        index,
        Some(limiter.clone()),
    )
}

/// A receiver index from the kernel's random source, unused (and not 0): a sender
/// that guesses sequential indices finds no session by them.
fn random_index(taken: impl Fn(&u32) -> bool) -> std::result::Result<u32, getrandom::Error> {
    loop {
        let mut bytes = [0u8; 4];
        getrandom::getrandom(&mut bytes)?;
        let index = u32::from_le_bytes(bytes) & 0x00ff_ffff;
        if index != 0 && !taken(&index) {
            return Ok(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn receiver_indices_are_random_24_bit_and_unique() {
        let mut taken = HashSet::new();
        let mut order = Vec::new();
        for _ in 0..2000 {
            let index = random_index(|i| taken.contains(i)).unwrap();
            assert!(index != 0 && index <= 0x00ff_ffff, "{index:#x}");
            assert!(taken.insert(index), "{index:#x} given twice");
            order.push(index);
        }
        // Nothing a sender could guess from the last one: no run of neighbours.
        let neighbours = order
            .windows(2)
            .filter(|w| w[1].abs_diff(w[0]) < 256)
            .count();
        assert!(
            neighbours < 5,
            "{neighbours} indices close to the one before"
        );
        // Taken indices are skipped.
        for _ in 0..100 {
            assert_eq!(random_index(|i| i % 2 == 0).unwrap() % 2, 1);
        }
    }
}
