//! What the receiving thread does with one datagram, without I/O: the checks that
//! run before any per-peer lookup or Diffie-Hellman (size, message type, mac1, the
//! shared handshake rate limit), and what a peer's session made of it (which
//! results prove the sender holds the peer's keys and so may move its endpoint).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};

/// Handshake messages per second, over all peers, before the mesh answers them with
/// cookies (boringtun's device uses the same).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// The shared limiter's count: `Tunn::decapsulate` checks a handshake message on the
/// same limiter again after [`classify`] did, so each admitted message counts twice.
pub const LIMITER_COUNT: u64 = 2 * HANDSHAKE_RATE_LIMIT;

/// WireGuard's message types (first byte; three zero bytes follow).
const HANDSHAKE_INIT: u8 = 1;
const HANDSHAKE_RESPONSE: u8 = 2;
const DATA: u8 = 4;

/// Why a received datagram (or the packet inside) went no further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Larger than the receive buffers, or a known type at a wrong length.
    BadSize,
    /// No WireGuard message type (or its reserved bytes not zero).
    BadType,
    /// A handshake message whose mac1 is not for this host's key.
    BadMac,
    /// A handshake message under load: answered with a cookie, or not at all.
    RateLimited,
    /// A receiver index no peer holds, or a session that has none for it (expired).
    NoSession,
    /// A handshake initiation from a key that is no peer's.
    UnknownPeer,
    /// A handshake message that failed inside the session (key, timestamp).
    BadHandshake,
    /// A data message whose counter was seen before or is too old.
    Replayed,
    /// A data message that does not decrypt under the session's key.
    DecryptFailed,
    /// A packet that decrypted but is no VXLAN of a network the peer shares here.
    OutOfScope,
}

impl Dropped {
    pub const ALL: [Dropped; 10] = [
        Dropped::BadSize,
        Dropped::BadType,
        Dropped::BadMac,
        Dropped::RateLimited,
        Dropped::NoSession,
        Dropped::UnknownPeer,
        Dropped::BadHandshake,
        Dropped::Replayed,
        Dropped::DecryptFailed,
        Dropped::OutOfScope,
    ];

    /// The reason as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Dropped::BadSize => "bad_size",
            Dropped::BadType => "bad_type",
            Dropped::BadMac => "bad_mac",
            Dropped::RateLimited => "rate_limited",
            Dropped::NoSession => "no_session",
            Dropped::UnknownPeer => "unknown_peer",
            Dropped::BadHandshake => "bad_handshake",
            Dropped::Replayed => "replayed",
            Dropped::DecryptFailed => "decrypt_failed",
            Dropped::OutOfScope => "out_of_scope",
        }
    }
}

/// Drops by reason. Written by the receiving thread alone and only on a drop, so
/// the datapath's delivered packets never touch it.
#[derive(Default)]
pub struct DropCounts([AtomicU64; Dropped::ALL.len()]);

impl DropCounts {
    pub fn count(&self, why: Dropped) {
        self.0[why as usize].fetch_add(1, Relaxed);
    }

    /// Every reason with its count (zero included).
    pub fn get(&self) -> Vec<(&'static str, u64)> {
        Dropped::ALL
            .iter()
            .map(|d| (d.name(), self.0[*d as usize].load(Relaxed)))
            .collect()
    }
}

/// The first look at a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified {
    /// Not for any peer: larger than any of ours, no WireGuard message, a handshake
    /// message with a wrong mac1, or one under load that the limiter could not answer.
    Drop(Dropped),
    /// Under load, a handshake message without a valid mac2: the first `len` bytes of
    /// the reply buffer are the cookie reply to send back; nothing else happens.
    CookieReply(usize),
    /// For the peer whose receiver index (without the session bits) this is.
    Index(u32),
    /// A handshake initiation that passed mac1 and the rate limit: the peer is found
    /// by the static key inside (one X25519).
    Initiation,
}

/// Checks `datagram` from `from` before any per-peer work. `max_len` is the largest
/// datagram the receiving buffers take; `reply` has room for a cookie reply (64 bytes).
pub fn classify(
    limiter: &RateLimiter,
    from: Ipv4Addr,
    datagram: &[u8],
    max_len: usize,
    reply: &mut [u8],
) -> Classified {
    // boringtun panics when a datagram would not fit the buffer, authenticated or not.
    if datagram.len() > max_len {
        return Classified::Drop(Dropped::BadSize);
    }
    match limiter.verify_packet(Some(from.into()), datagram, reply) {
        Ok(Packet::HandshakeInit(_)) => Classified::Initiation,
        Ok(Packet::HandshakeResponse(p)) => Classified::Index(p.receiver_idx >> 8),
        Ok(Packet::PacketCookieReply(p)) => Classified::Index(p.receiver_idx >> 8),
        Ok(Packet::PacketData(p)) => Classified::Index(p.receiver_idx >> 8),
        Err(TunnResult::WriteToNetwork(cookie)) => Classified::CookieReply(cookie.len()),
        Err(TunnResult::Err(WireGuardError::InvalidPacket)) => Classified::Drop(unparsed(datagram)),
        Err(TunnResult::Err(WireGuardError::InvalidMac)) => Classified::Drop(Dropped::BadMac),
        Err(_) => Classified::Drop(Dropped::RateLimited),
    }
}

/// Why boringtun could not parse `datagram`: a known type (with its reserved bytes
/// zero) means the length was wrong.
fn unparsed(datagram: &[u8]) -> Dropped {
    match datagram.get(..4) {
        Some(&[t, 0, 0, 0]) if (HANDSHAKE_INIT..=DATA).contains(&t) => Dropped::BadSize,
        Some(_) => Dropped::BadType,
        None => Dropped::BadSize,
    }
}

/// What a peer's session made of a datagram.
#[derive(Debug)]
pub enum Opened<'a> {
    /// Nothing to do (a cookie reply taken in): the endpoint stays.
    Nothing,
    /// Refused by the session: the endpoint stays.
    Refused(Dropped),
    /// A message to send back. `authenticated` when it completes a handshake (our
    /// response to an initiation, our keepalive after a response): the sender holds
    /// the peer's key. A cookie reply is not.
    Reply {
        bytes: &'a [u8],
        authenticated: bool,
    },
    /// A data message that decrypted: a keepalive (`packet` None) or an IPv4 packet
    /// with the source address inside it.
    Data {
        packet: Option<(&'a mut [u8], Ipv4Addr)>,
    },
}

impl Opened<'_> {
    /// Whether the sender proved it holds the peer's keys: only then may the peer's
    /// endpoint move to where the datagram came from.
    pub fn authenticated(&self) -> bool {
        match self {
            Opened::Nothing | Opened::Refused(_) => false,
            Opened::Reply { authenticated, .. } => *authenticated,
            Opened::Data { .. } => true,
        }
    }
}

/// Runs `datagram` through the peer's session; `out` takes a reply or the packet.
pub fn open<'a>(tunn: &mut Tunn, from: Ipv4Addr, datagram: &[u8], out: &'a mut [u8]) -> Opened<'a> {
    let received = datagram.first().copied().unwrap_or(0);
    match tunn.decapsulate(Some(from.into()), datagram, out) {
        TunnResult::WriteToNetwork(reply) => {
            let sent = reply.first().copied().unwrap_or(0);
            let authenticated = completes_handshake(received, sent);
            Opened::Reply {
                bytes: reply,
                authenticated,
            }
        }
        TunnResult::WriteToTunnelV4(packet, source) if received == DATA => Opened::Data {
            packet: Some((packet, source)),
        },
        // An IPv6 packet decrypted: authenticated, but nothing the mesh carries.
        TunnResult::WriteToTunnelV6(..) if received == DATA => Opened::Data { packet: None },
        // Done after a data message is a keepalive; after a cookie reply, nothing
        // authenticated (anyone who saw our initiation can answer with one).
        TunnResult::Done if received == DATA => Opened::Data { packet: None },
        TunnResult::Err(e) => Opened::Refused(refused(e)),
        _ => Opened::Nothing,
    }
}

/// Why a session refused a datagram.
fn refused(e: WireGuardError) -> Dropped {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => Dropped::Replayed,
        WireGuardError::InvalidAeadTag => Dropped::DecryptFailed,
        WireGuardError::NoCurrentSession
        | WireGuardError::WrongIndex
        | WireGuardError::ConnectionExpired => Dropped::NoSession,
        WireGuardError::UnderLoad => Dropped::RateLimited,
        _ => Dropped::BadHandshake,
    }
}

/// Whether sending `sent` in answer to `received` means a handshake completed: an
/// initiation answered with a response, a response answered with a keepalive. A
/// cookie reply written back (the limiter under load) is neither.
pub fn completes_handshake(received: u8, sent: u8) -> bool {
    matches!(
        (received, sent),
        (HANDSHAKE_INIT, HANDSHAKE_RESPONSE) | (HANDSHAKE_RESPONSE, DATA)
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use boringtun::x25519::{PublicKey, StaticSecret};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    const FROM: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
    const MAX: usize = 9216;
    /// Our receiver index for the peer.
    const OUR_INDEX: u32 = 0x00ab_cdef;

    struct Side {
        secret: StaticSecret,
        public: PublicKey,
    }

    fn side(seed: u8) -> Side {
        let secret = StaticSecret::from([seed; 32]);
        let public = PublicKey::from(&secret);
        Side { secret, public }
    }

    /// This host's session for peer `b` (on our shared `limiter`), and `b`'s for us.
    fn tunnels(limiter: &Arc<RateLimiter>) -> (Tunn, Tunn, Side) {
        let (a, b) = (side(1), side(2));
        let ours = Tunn::new(
            a.secret.clone(),
            b.public,
            None,
            None,
            OUR_INDEX,
            Some(limiter.clone()),
        );
        let theirs = Tunn::new(b.secret.clone(), a.public, None, None, 77, None);
        (ours, theirs, a)
    }

    fn limiter(count: u64) -> Arc<RateLimiter> {
        Arc::new(RateLimiter::new(&side(1).public, count))
    }

    fn initiation(t: &mut Tunn) -> Vec<u8> {
        let mut buf = [0u8; 256];
        match t.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no initiation: {other:?}"),
        }
    }

    /// Decapsulates on the peer's side; the message it writes back.
    fn answer(t: &mut Tunn, datagram: &[u8]) -> Vec<u8> {
        let mut buf = [0u8; 256];
        match t.decapsulate(Some(FROM.into()), datagram, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no answer: {other:?}"),
        }
    }

    /// What this host does with `datagram`: classified, then opened when it names
    /// the peer. Returns whether the endpoint moves and the message type sent back.
    fn receive(limiter: &RateLimiter, ours: &mut Tunn, datagram: &[u8]) -> (bool, Option<u8>) {
        let (roams, sent) = receive_bytes(limiter, ours, datagram);
        (roams, sent.map(|b| b[0]))
    }

    /// [`receive`] with the whole message sent back.
    fn receive_bytes(
        limiter: &RateLimiter,
        ours: &mut Tunn,
        datagram: &[u8],
    ) -> (bool, Option<Vec<u8>>) {
        let mut reply = [0u8; 256];
        match classify(limiter, FROM, datagram, MAX, &mut reply) {
            Classified::Drop(_) => (false, None),
            Classified::CookieReply(len) => (false, Some(reply[..len].to_vec())),
            Classified::Index(i) if i != OUR_INDEX => (false, None),
            Classified::Index(_) | Classified::Initiation => {
                let mut out = vec![0u8; MAX];
                let opened = open(ours, FROM, datagram, &mut out);
                let sent = match &opened {
                    Opened::Reply { bytes, .. } => Some(bytes.to_vec()),
                    _ => None,
                };
                (opened.authenticated(), sent)
            }
        }
    }

    #[test]
    fn a_completed_handshake_and_data_move_the_endpoint() {
        let limiter = limiter(LIMITER_COUNT);
        let (mut ours, mut theirs, _) = tunnels(&limiter);
        // We initiate; their response completes the handshake (we send a keepalive).
        let init = initiation(&mut ours);
        let response = answer(&mut theirs, &init);
        assert_eq!(response[0], 2);
        let (roams, keepalive) = receive_bytes(&limiter, &mut ours, &response);
        let keepalive = keepalive.expect("a keepalive");
        assert!(roams);
        assert_eq!(keepalive[0], 4);
        let mut buf = [0u8; 256];
        assert!(matches!(
            theirs.decapsulate(Some(FROM.into()), &keepalive, &mut buf),
            TunnResult::Done
        ));
        // Their data (a keepalive) decrypts.
        let keepalive = match theirs.encapsulate(&[], &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(receive(&limiter, &mut ours, &keepalive), (true, None));
        // The same datagram again (a replay from elsewhere): refused.
        assert_eq!(receive(&limiter, &mut ours, &keepalive), (false, None));
        // An initiation from the peer is answered with a response.
        let init = initiation(&mut theirs);
        assert_eq!(receive(&limiter, &mut ours, &init), (true, Some(2)));
    }

    #[test]
    fn cookie_replies_under_load_never_move_the_endpoint() {
        // Under load from the first message: the check before any lookup answers
        // with a cookie, and the peer's session never sees the message.
        let loaded = limiter(0);
        let (mut ours, mut theirs, _) = tunnels(&loaded);
        let init = initiation(&mut theirs);
        assert_eq!(receive(&loaded, &mut ours, &init), (false, Some(3)));
        let init = initiation(&mut ours);
        let response = answer(&mut theirs, &init);
        assert_eq!(receive(&loaded, &mut ours, &response), (false, Some(3)));

        // Under load between the two checks (decapsulate checks again on the shared
        // limiter): the session writes the cookie reply; still no roaming.
        let edge = limiter(1);
        let (mut ours, mut theirs, _) = tunnels(&edge);
        let init = initiation(&mut theirs);
        assert_eq!(receive(&edge, &mut ours, &init), (false, Some(3)));

        // A cookie reply received (anyone who saw our initiation can send one).
        let quiet = limiter(LIMITER_COUNT);
        let (mut ours, theirs, a) = tunnels(&quiet);
        drop(theirs);
        let b = side(2);
        let mut strict = Tunn::new(
            b.secret.clone(),
            a.public,
            None,
            None,
            78,
            Some(Arc::new(RateLimiter::new(&b.public, 0))),
        );
        let init = initiation(&mut ours);
        let cookie = answer(&mut strict, &init);
        assert_eq!(cookie[0], 3);
        assert_eq!(receive(&quiet, &mut ours, &cookie), (false, None));
    }

    #[test]
    fn forged_handshake_responses_reach_no_session() {
        let limiter = limiter(LIMITER_COUNT);
        let (mut ours, _, _) = tunnels(&limiter);
        // Right size and type, our index, no valid mac1: dropped before the peer.
        let mut forged = vec![0u8; 92];
        forged[0] = 2;
        forged[8..12].copy_from_slice(&(OUR_INDEX << 8).to_le_bytes());
        let mut reply = [0u8; 256];
        assert_eq!(
            classify(&limiter, FROM, &forged, MAX, &mut reply),
            Classified::Drop(Dropped::BadMac)
        );
        assert_eq!(receive(&limiter, &mut ours, &forged), (false, None));
    }

    /// The message types with the sizes boringtun parses, or anything.
    fn datagram() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (
                prop_oneof![
                    Just((1u8, 148usize)),
                    Just((2, 92)),
                    Just((3, 64)),
                    Just((4, 32)),
                    Just((4, 200))
                ],
                proptest::collection::vec(any::<u8>(), 148..200),
                any::<bool>(),
            )
                .prop_map(|((kind, len), mut bytes, ours)| {
                    bytes.truncate(len);
                    bytes[0] = kind;
                    bytes[1..4].fill(0);
                    if ours {
                        let at = if kind == 2 { 8 } else { 4 };
                        bytes[at..at + 4].copy_from_slice(&(OUR_INDEX << 8).to_le_bytes());
                    }
                    bytes
                }),
        ]
    }

    #[test]
    fn fuzz_random_datagrams_never_roam_nor_reach_a_peer_unauthenticated() {
        for count in [LIMITER_COUNT, 0] {
            let limiter = limiter(count);
            let (mut ours, mut theirs, _) = tunnels(&limiter);
            // An established session, so that data messages are tried against it.
            let init = initiation(&mut ours);
            let response = answer(&mut theirs, &init);
            assert!(receive(&limiter, &mut ours, &response).0 || count == 0);
            let ours = std::cell::RefCell::new(ours);
            let mut runner = TestRunner::new(Config::with_cases(3000));
            runner
                .run(&datagram(), |bytes| {
                    let mut reply = [0u8; 256];
                    let classified = classify(&limiter, FROM, &bytes, MAX, &mut reply);
                    // Handshake messages reach a peer only with a valid mac1.
                    prop_assert!(
                        matches!(classified, Classified::Drop(_) | Classified::Index(_)),
                        "{classified:?}"
                    );
                    if let Classified::Index(_) = classified {
                        prop_assert!(matches!(bytes[0], 3 | 4));
                    }
                    prop_assert_eq!(
                        receive(&limiter, &mut ours.borrow_mut(), &bytes),
                        (false, None)
                    );
                    Ok(())
                })
                .unwrap();
        }
    }

    #[test]
    fn fuzz_altered_initiations_never_reach_a_peer() {
        let limiter = limiter(u64::MAX);
        let (_, mut theirs, _) = tunnels(&limiter);
        let init = initiation(&mut theirs);
        let mut reply = [0u8; 256];
        assert_eq!(
            classify(&limiter, FROM, &init, MAX, &mut reply),
            Classified::Initiation
        );
        // Any change to the message or its mac1 (mac2, the last 16 bytes, counts
        // only under load).
        let mut runner = TestRunner::new(Config::with_cases(3000));
        runner
            .run(&(0..init.len() - 16, 1..=255u8), |(at, flip)| {
                let mut altered = init.clone();
                altered[at] ^= flip;
                let mut reply = [0u8; 256];
                let got = classify(&limiter, FROM, &altered, MAX, &mut reply);
                if at == 0 && altered[0] == 4 {
                    // Now a data message, which goes by its receiver index like any
                    // other: its session's decryption, not mac1, authenticates it.
                    prop_assert!(matches!(got, Classified::Index(_)), "{:?}", got);
                } else {
                    prop_assert!(matches!(got, Classified::Drop(_)), "{:?}", got);
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn handshake_completion_table() {
        for received in 0..=5u8 {
            for sent in 0..=5u8 {
                let want = (received, sent) == (1, 2) || (received, sent) == (2, 4);
                assert_eq!(
                    completes_handshake(received, sent),
                    want,
                    "{received} {sent}"
                );
            }
        }
    }

    #[test]
    fn oversized_datagrams_are_dropped_unopened() {
        let limiter = limiter(LIMITER_COUNT);
        let mut d = vec![0u8; MAX + 1];
        d[0] = 4;
        let mut reply = [0u8; 256];
        assert_eq!(
            classify(&limiter, FROM, &d, MAX, &mut reply),
            Classified::Drop(Dropped::BadSize)
        );
    }

    #[test]
    fn unparsed_datagrams_are_told_apart_by_type_and_size() {
        let limiter = limiter(LIMITER_COUNT);
        let mut reply = [0u8; 256];
        let mut classify = |d: &[u8]| classify(&limiter, FROM, d, MAX, &mut reply);
        assert_eq!(
            classify(&[1, 0, 0, 0, 9]),
            Classified::Drop(Dropped::BadSize)
        );
        assert_eq!(classify(&[4, 0, 0]), Classified::Drop(Dropped::BadSize));
        assert_eq!(classify(&[9; 148]), Classified::Drop(Dropped::BadType));
        let mut reserved = vec![0u8; 148];
        reserved[0] = 1;
        reserved[2] = 1;
        assert_eq!(classify(&reserved), Classified::Drop(Dropped::BadType));
    }

    #[test]
    fn a_data_message_seen_twice_or_altered_is_refused_with_its_reason() {
        let limiter = limiter(LIMITER_COUNT);
        let (mut ours, mut theirs, _) = tunnels(&limiter);
        let init = initiation(&mut ours);
        let response = answer(&mut theirs, &init);
        let (_, keepalive) = receive_bytes(&limiter, &mut ours, &response);
        let mut buf = [0u8; 256];
        theirs.decapsulate(
            Some(FROM.into()),
            &keepalive.expect("a keepalive"),
            &mut buf,
        );
        let sealed = match theirs.encapsulate(&[], &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        let mut out = vec![0u8; MAX];
        assert!(matches!(
            open(&mut ours, FROM, &sealed, &mut out),
            Opened::Data { packet: None }
        ));
        assert!(matches!(
            open(&mut ours, FROM, &sealed, &mut out),
            Opened::Refused(Dropped::Replayed)
        ));
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        altered[8] ^= 1;
        assert!(matches!(
            open(&mut ours, FROM, &altered, &mut out),
            Opened::Refused(Dropped::DecryptFailed)
        ));
    }

    #[test]
    fn drop_counts_name_every_reason() {
        let counts = DropCounts::default();
        counts.count(Dropped::OutOfScope);
        counts.count(Dropped::OutOfScope);
        let got = counts.get();
        assert_eq!(got.len(), Dropped::ALL.len());
        assert!(got.contains(&("out_of_scope", 2)));
        assert!(got.contains(&("bad_mac", 0)));
    }
}
