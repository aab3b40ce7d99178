//! This host's WireGuard identity: its key pair, and the handshake rate limiter that
//! checks mac1 against the public half.

use std::fs::File;
use std::sync::Arc;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};

use super::receive;

/// A host's key pair; the private half never leaves this process but to its file.
#[derive(Clone)]
pub struct KeyPair {
    pub(super) secret: StaticSecret,
    /// Derived once: every handshake initiation and `status` needs it.
    pub(super) public: PublicKey,
}

impl KeyPair {
    /// A new random key pair (from the kernel's random source).
    pub fn generate() -> std::io::Result<KeyPair> {
        let mut bytes = [0u8; 32];
        let mut f = File::open("/dev/urandom")?;
        std::io::Read::read_exact(&mut f, &mut bytes)?;
        Ok(KeyPair::from_private(bytes))
    }

    pub fn from_private(bytes: [u8; 32]) -> KeyPair {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        KeyPair { secret, public }
    }

    pub fn private_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private half.
        write!(f, "KeyPair(public {:02x?}..)", &self.public()[..4])
    }
}

/// This host's key pair and the handshake rate limiter of all peers, which checks
/// mac1 against our public key and so changes with the key.
pub(super) struct Keys {
    pub(super) pair: KeyPair,
    pub(super) limiter: Arc<RateLimiter>,
}

impl Keys {
    pub(super) fn new(pair: KeyPair) -> Keys {
        let limiter = Arc::new(RateLimiter::new(&pair.public, receive::LIMITER_COUNT));
        Keys { pair, limiter }
    }
}
