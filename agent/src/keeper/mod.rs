//! Keeps the embedded DNS's sockets open across a restart or an upgrade of the agent.
//!
//! Each attached namespace's DNS sockets (UDP and TCP at 127.0.0.11:53) are copied to
//! a small keeper process (`netagent dns-keeper`, started by the first agent in a
//! session of its own) over a local channel (`SCM_RIGHTS`). When the agent exits the
//! sockets stay open in the keeper: queries that arrive meanwhile wait in their
//! buffers. The next agent (the same binary or a new one) takes the copies back and
//! answers them. The keeper lets go of everything once no agent has been connected for
//! its grace period, so a host whose agent was stopped for good does not keep its
//! namespaces alive.

mod link;
mod process;
mod protocol;

pub use link::{stop_keeper, Inherited, KeeperLink};
pub use process::run as run_keeper;
