//! The query path stays allocation-light: a local answer costs one allocation (the
//! answer's own bytes), a name to forward none before the forwarder takes it. Counted
//! by a global allocator wrapper; this file is its own test binary, so nothing else
//! allocates in it while a count runs (one test, one thread).

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

use netagent_dns::{answer, Answer, EndpointRecord, SnapshotBuilder, Transport};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations made by `work`.
fn allocations<T>(work: impl FnOnce() -> T) -> (usize, T) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let out = work();
    (ALLOCATIONS.load(Ordering::Relaxed) - before, out)
}

#[test]
fn a_local_answer_allocates_once_and_a_forward_decision_not_at_all() {
    let record = |ip: [u8; 4], name: &str, service: &str| {
        EndpointRecord::replica("app", Ipv4Addr::from(ip), name, Some(service))
    };
    let snapshot = SnapshotBuilder::new()
        .endpoints([
            record([100, 64, 1, 11], "db", "db"),
            record([100, 64, 2, 10], "echo_api.1", "echo_api"),
            record([100, 64, 2, 11], "echo_api.2", "echo_api"),
            record([100, 64, 3, 12], "echo_api.3", "echo_api"),
        ])
        .build();
    let networks = ["app"];
    let local = netagent_dns::stub_query(1, "Echo_API", 1);
    let outside = netagent_dns::stub_query(2, "example.org", 1);
    let ask = |packet: &[u8]| answer(&snapshot, &networks, packet, Transport::Udp, 5);
    // Warm: anything done once per process (thread-locals, lazy statics) is done.
    ask(&local);
    ask(&outside);

    let (n, reply) = allocations(|| ask(&local));
    assert!(
        matches!(&reply, Answer::Reply(bytes) if u16::from_be_bytes([bytes[6], bytes[7]]) == 3),
        "three replicas answered"
    );
    let (m, reply) = allocations(|| ask(&outside));
    assert!(matches!(reply, Answer::Forward));
    assert_eq!(n, 1, "a local answer allocates its bytes and nothing else");
    assert_eq!(m, 0, "deciding to forward allocates nothing");
}
