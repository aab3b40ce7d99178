//! Pauses between reconnect attempts: growing, capped, and spread at random, so that
//! the agents of a hundred hosts that lost etcd together do not all come back in the
//! same instant (each comeback is a watch and a lease, and without a resumable
//! revision a full read).

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The first pause after a failure is at most this...
const FIRST: Duration = Duration::from_millis(100);
/// ...and none is longer than this, so an agent is back within it of etcd's return.
const LONGEST: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// A session worked: the next failure starts from the shortest pause again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// The pause before the next attempt: between half and all of the current
    /// ceiling, which doubles with each failure up to [`LONGEST`].
    pub fn next_pause(&mut self) -> Duration {
        let ceiling = FIRST
            .saturating_mul(1 << self.failures.min(10))
            .min(LONGEST);
        self.failures = self.failures.saturating_add(1);
        ceiling / 2 + ceiling.mul_f64(random_fraction() / 2.0)
    }
}

/// A number in [0, 1): std's per-process random hash keys are randomness enough
/// to spread reconnects.
fn random_fraction() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x6e61);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_a_ceiling_and_are_spread() {
        let mut b = Backoff::default();
        let first = b.next_pause();
        assert!(first >= FIRST / 2 && first <= FIRST, "{first:?}");
        for _ in 0..10 {
            b.next_pause();
        }
        let later: Vec<Duration> = (0..20).map(|_| b.next_pause()).collect();
        assert!(later.iter().all(|p| *p >= LONGEST / 2 && *p <= LONGEST));
        // Spread: twenty draws are not all the same.
        assert!(later.iter().any(|p| *p != later[0]), "{later:?}");
        b.succeeded();
        assert!(b.next_pause() <= FIRST);
    }
}
