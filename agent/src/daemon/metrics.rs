//! The agent's metrics in the Prometheus text format.

use crate::store::{Store, StoreHealth};

use super::{Agent, Datapath};

impl<S: Store, D: Datapath> Agent<S, D> {
    /// Every series, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        String::new()
    }
}

/// What can be said before the agent has read the store.
pub fn starting_metrics_text(_health: &StoreHealth) -> String {
    String::new()
}
