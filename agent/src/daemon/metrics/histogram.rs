//! A histogram of durations for work that happens seconds apart (a reconcile pass):
//! one lock per observation is nothing next to the work measured.

use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the reconcile duration buckets, in seconds: a pass that changes
/// nothing takes milliseconds; one that builds many devices, seconds.
pub const RECONCILE_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), then above the last bound; and the sum.
    counts: Mutex<(Vec<u64>, f64)>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: Mutex::new((vec![0; bounds.len() + 1], 0.0)),
        }
    }

    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        let mut c = self.counts.lock().unwrap();
        c.0[i] += 1;
        c.1 += secs;
    }

    /// The bounds, the counts per bucket and the sum, now.
    pub fn get(&self) -> (&'static [f64], Vec<u64>, f64) {
        let c = self.counts.lock().unwrap();
        (self.bounds, c.0.clone(), c.1)
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&RECONCILE_BUCKETS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_fall_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(60));
        let (bounds, counts, sum) = h.get();
        assert_eq!(counts.len(), bounds.len() + 1);
        assert_eq!(counts[0], 1, "1 ms is in le=0.001");
        assert_eq!(counts[3], 1, "7 ms is in le=0.01");
        assert_eq!(counts[bounds.len()], 1, "a minute is above every bound");
        assert!((sum - 60.008).abs() < 1e-9);
    }
}
