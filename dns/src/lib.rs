//! The embedded DNS server every attached container asks at 127.0.0.11.
//!
//! The record model ([`Snapshot`]: immutable, built whole, swapped whole), the query
//! fast path ([`answer`]: parse the header and question, look the name up in the
//! networks the asking namespace belongs to, write the answer), the [`Forwarder`] for
//! everything else, and the [`DnsServer`] that serves sockets the agent opened inside
//! each namespace.

mod answer;
mod batch;
mod cache;
mod forward;
pub mod metrics;
mod response;
mod server;
mod snapshot;
#[cfg(test)]
mod srv_tests;
mod tcp;
#[cfg(test)]
mod testutil;
mod udp;
mod upstream;
mod wire;

pub use answer::{answer, Answer, Transport};
pub use forward::{
    upstreams_from_resolv_conf, ForwardError, ForwardLimits, Forwarder, FORWARD_DEADLINE,
};
pub use server::{DnsServer, Scope, DEFAULT_TTL};
pub use snapshot::{EndpointRecord, PortProtocol, ServicePort, Snapshot, SnapshotBuilder};
pub use wire::{stub_query, Question, WireError};
