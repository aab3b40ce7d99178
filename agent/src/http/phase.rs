//! What the HTTP endpoint answers from: the agent while it starts (only the store's
//! health is known), then the running agent. One small shared value, so the server
//! needs neither the store's nor the datapath's type.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::daemon::{starting_metrics_text, Agent, Picture};
use crate::store::{Store, StoreHealth};

/// The agent as the HTTP endpoint sees it once it runs.
pub trait RunningAgent: Send + Sync {
    /// Ok, or why not ready, in one line.
    fn readiness(&self) -> BoxFuture<'_, Result<(), String>>;
    fn metrics_text(&self) -> String;
    fn picture(&self) -> Picture;
}

impl<S: Store> RunningAgent for Agent<S> {
    fn readiness(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(Agent::readiness(self))
    }

    fn metrics_text(&self) -> String {
        Agent::metrics_text(self)
    }

    fn picture(&self) -> Picture {
        Agent::picture(self)
    }
}

#[derive(Clone)]
pub enum Phase {
    /// Waiting for the store, adopting, reconciling for the first time.
    Starting {
        node: String,
        health: watch::Receiver<StoreHealth>,
    },
    Running(Arc<dyn RunningAgent>),
}

impl Phase {
    /// Ok, or `not ready: ...` in one line.
    pub async fn readiness(&self) -> Result<(), String> {
        let why = match self {
            Phase::Starting { health, .. } => starting_because(&health.borrow()),
            Phase::Running(agent) => match agent.readiness().await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            },
        };
        Err(format!("not ready: {why}"))
    }

    pub fn metrics_text(&self) -> String {
        match self {
            Phase::Starting { health, .. } => starting_metrics_text(&health.borrow()),
            Phase::Running(agent) => agent.metrics_text(),
        }
    }

    pub fn picture(&self) -> Picture {
        match self {
            Phase::Starting { node, health } => {
                Picture::starting(node, starting_because(&health.borrow()))
            }
            Phase::Running(agent) => agent.picture(),
        }
    }
}

/// What a starting agent waits for, in the words of the local API's answer.
fn starting_because(h: &StoreHealth) -> String {
    if h.connected {
        "starting: reading the cluster store and reconciling for the first time".into()
    } else {
        format!(
            "waiting for {} at {}: {}",
            h.kind,
            h.location,
            h.error.as_deref().unwrap_or("connecting")
        )
    }
}
