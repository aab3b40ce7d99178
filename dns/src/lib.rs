//! The embedded DNS server every attached container asks at 127.0.0.11.
//!
//! So far: the record model ([`Snapshot`], immutable, built whole and swapped by the
//! caller) and the query fast path ([`answer`]): parse the header and question, look the
//! name up in the networks the asking namespace belongs to, write the answer. Local
//! names never allocate more than the response buffer. Anything not local is returned
//! as [`Answer::Forward`] for the (coming) forwarder. Server sockets, forwarding and the
//! cache are the next steps of issue 3.

mod answer;
mod snapshot;
mod wire;

pub use answer::{answer, Answer, Transport};
pub use snapshot::{EndpointRecord, Snapshot, SnapshotBuilder};
pub use wire::{Question, WireError};
