//! The query path: parse, look up in the asking namespace's networks, write. Only
//! local names are answered here; everything else goes to the forwarder.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use crate::snapshot::{Snapshot, SrvTarget};
use crate::wire::{self, Glue, Question, Rdata, WireError};

/// How the query arrived: UDP answers are bounded by 512 bytes or the client's EDNS
/// size; TCP answers by the 64 KiB message limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not a local name: ask the upstream resolvers.
    Forward,
    /// Not worth a reply (a response, or shorter than a header).
    Drop,
}

/// Answers `packet` from the names of `networks` (the asking namespace's networks).
/// A name found in several of them answers with all their addresses.
pub fn answer(
    snapshot: &Snapshot,
    networks: &[&str],
    packet: &[u8],
    transport: Transport,
    ttl: u32,
) -> Answer {
    let q = match wire::parse(packet) {
        Ok(q) => q,
        Err(WireError::Drop) => return Answer::Drop,
        Err(WireError::FormErr(_)) => {
            return Answer::Reply(wire::write_error(packet, wire::RCODE_FORMERR))
        }
        Err(WireError::NotImp(_)) => {
            return Answer::Reply(wire::write_error(packet, wire::RCODE_NOTIMP))
        }
    };
    if q.qclass != wire::CLASS_IN && q.qclass != wire::CLASS_ANY {
        return Answer::Reply(wire::write_response(
            &q,
            wire::RCODE_NOTIMP,
            &[],
            0,
            usize::MAX,
        ));
    }
    let limit = match transport {
        Transport::Tcp => u16::MAX as usize,
        Transport::Udp => q.edns_size.map_or(wire::CLASSIC_UDP_LIMIT, |s| {
            s.min(wire::OUR_EDNS_SIZE) as usize
        }),
    };
    if let Some(address) = reverse_address(&q.name) {
        return match networks.iter().find_map(|n| snapshot.reverse(n, address)) {
            Some(target) if q.qtype == wire::TYPE_PTR || q.qtype == wire::TYPE_ANY => {
                Answer::Reply(wire::write_response(
                    &q,
                    wire::RCODE_NOERROR,
                    &[Rdata::Ptr(target)],
                    ttl,
                    limit,
                ))
            }
            Some(_) => Answer::Reply(wire::write_response(
                &q,
                wire::RCODE_NOERROR,
                &[],
                ttl,
                limit,
            )),
            None => Answer::Forward,
        };
    }
    ADDRESSES.with_borrow_mut(|addresses| {
        addresses.clear();
        local(snapshot, networks, &q, addresses, ttl, limit)
    })
}

thread_local! {
    /// The addresses of the answer being written, reused query after query so that
    /// a local answer allocates only its own bytes.
    static ADDRESSES: std::cell::RefCell<Vec<Ipv4Addr>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The answer to a parsed query for a name that is not an address's reverse name.
fn local(
    snapshot: &Snapshot,
    networks: &[&str],
    q: &Question<'_>,
    addresses: &mut Vec<Ipv4Addr>,
    ttl: u32,
    limit: usize,
) -> Answer {
    let mut known = false;
    let mut one_per_answer = false;
    // Only a query that gets the addresses turns the rotation: the C library asks A
    // and AAAA for every lookup, and if both turned it, a service with two replicas
    // would give every lookup the same first address.
    let wants_addresses = q.qtype == wire::TYPE_A || q.qtype == wire::TYPE_ANY;
    for network in networks {
        if let Some(set) = snapshot.lookup(network, &q.name) {
            known = true;
            one_per_answer |= set.is_one_per_answer();
            if wants_addresses {
                set.rotated(addresses);
            }
        }
    }
    // SRV names are looked at only when asked for, or when the name is no address
    // name: an A query for `_http._tcp.api` is answered here (no data), not upstream.
    let wants_srv = q.qtype == wire::TYPE_SRV || q.qtype == wire::TYPE_ANY;
    let mut srv: Vec<&SrvTarget> = Vec::new();
    if wants_srv || !known {
        for network in networks {
            if let Some(set) = snapshot.lookup_srv(network, &q.name) {
                known = true;
                if wants_srv {
                    set.rotated(&mut srv);
                }
            }
        }
    }
    if !known {
        return Answer::Forward;
    }
    // A namespace on several networks gets the name from each: one replica still
    // means one, or the C library would sort the others in front again.
    if one_per_answer {
        addresses.truncate(1);
    }
    Answer::Reply(local_reply(
        q,
        addresses,
        &srv,
        networks.len() > 1,
        ttl,
        limit,
    ))
}

/// A local name: its A records for A/ANY, its SRV records (targets' addresses in
/// the additional section) for SRV/ANY; for any other type NOERROR with no answer
/// (never NXDOMAIN, which would make the C library give up on the A answer too).
fn local_reply(
    q: &Question<'_>,
    addresses: &[Ipv4Addr],
    srv: &[&SrvTarget],
    several_networks: bool,
    ttl: u32,
    limit: usize,
) -> Vec<u8> {
    // `addresses` holds something only for A and ANY.
    if srv.is_empty() {
        return wire::write_addresses(q, addresses, ttl, limit);
    }
    let mut records: Vec<Rdata<'_>> = addresses.iter().map(|a| Rdata::A(*a)).collect();
    let glue: Vec<Glue<'_>> = srv.iter().map(|e| (&e.target[..], e.address)).collect();
    // The same replica on two of the asker's networks: one SRV record (the
    // additional section keeps both addresses of its target).
    let mut seen = HashSet::new();
    records.extend(
        srv.iter()
            .filter(|e| !several_networks || seen.insert((e.port, &e.target[..])))
            .map(|e| Rdata::Srv {
                port: e.port,
                target: &e.target,
            }),
    );
    wire::write_response_with_glue(q, wire::RCODE_NOERROR, &records, &glue, ttl, limit)
}

/// `d.c.b.a.in-addr.arpa` → a.b.c.d.
fn reverse_address(name: &[u8]) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(b".in-addr.arpa")?;
    let text = std::str::from_utf8(rest).ok()?;
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for slot in octets.iter_mut().rev() {
        *slot = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}
