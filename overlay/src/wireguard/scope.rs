//! What a mesh peer may put on this host's mesh device once its packet decrypted:
//! VXLAN from its mesh address to ours, on the encrypted networks' port, with the
//! VNI of an encrypted network that both hosts hold a block of. Anything else (a
//! plain IP packet to a container, VXLAN into a network the peer is no part of, a
//! fragment whose later pieces could change what the first one said) is dropped.
//! Runs per packet: a few byte reads and a binary search, no allocation.

use std::net::Ipv4Addr;

/// The VNIs a peer may send into, sorted (networks per host are few).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    vnis: Box<[u32]>,
}

impl Scope {
    pub fn new(vnis: impl IntoIterator<Item = u32>) -> Scope {
        let mut v: Vec<u32> = vnis.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Scope {
            vnis: v.into_boxed_slice(),
        }
    }

    pub fn contains(&self, vni: u32) -> bool {
        self.vnis.binary_search(&vni).is_ok()
    }
}

const PROTO_UDP: u8 = 17;
/// UDP header and VXLAN header.
const UDP_LEN: usize = 8;
const VXLAN_LEN: usize = 8;

/// Whether `packet` (a decrypted IPv4 packet from the peer whose mesh address is
/// `peer`) is VXLAN from `peer` to `local`:`port` whose VNI is in `scope`.
pub fn admits(packet: &[u8], peer: Ipv4Addr, local: Ipv4Addr, port: u16, scope: &Scope) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let header = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header < 20 || packet.len() < header + UDP_LEN + VXLAN_LEN {
        return false;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    // MF set or an offset: a fragment, whose reassembly we would not see.
    let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
    if total < header + UDP_LEN + VXLAN_LEN
        || total > packet.len()
        || fragment
        || packet[9] != PROTO_UDP
        || packet[12..16] != peer.octets()
        || packet[16..20] != local.octets()
    {
        return false;
    }
    let udp = &packet[header..];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if u16::from_be_bytes([udp[2], udp[3]]) != port
        || udp_len < UDP_LEN + VXLAN_LEN
        || udp_len > total - header
    {
        return false;
    }
    let vxlan = &udp[UDP_LEN..];
    let vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
    scope.contains(vni)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: Ipv4Addr = Ipv4Addr::new(100, 127, 192, 2);
    const LOCAL: Ipv4Addr = Ipv4Addr::new(100, 127, 192, 1);
    const PORT: u16 = 4790;

    /// VXLAN with `vni` from PEER to LOCAL:PORT carrying 14 bytes of Ethernet.
    pub(crate) fn vxlan(vni: u32) -> Vec<u8> {
        let inner = 14;
        let total = 20 + 8 + 8 + inner;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&PEER.octets());
        p[16..20].copy_from_slice(&LOCAL.octets());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&PORT.to_be_bytes());
        p[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
        p[28] = 0x08;
        p[32..36].copy_from_slice(&(vni << 8).to_be_bytes());
        p
    }

    #[test]
    fn table() {
        let scope = Scope::new([7, 42]);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = vxlan(42);
            f(&mut p);
            p
        };
        let options = {
            // IHL 6: four bytes of options, the UDP header after them.
            let mut p = vxlan(7);
            p.splice(20..20, [1, 1, 1, 1]);
            p[0] = 0x46;
            let total = p.len() as u16;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            p
        };
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("VXLAN with an allowed VNI", vxlan(42), true),
            ("the other allowed VNI", vxlan(7), true),
            ("IP options (IHL 6)", options, true),
            ("a VNI outside the scope", vxlan(8), false),
            ("VNI 0", vxlan(0), false),
            (
                "another port",
                with(&|p| p[22..24].copy_from_slice(&4789u16.to_be_bytes())),
                false,
            ),
            ("another source", with(&|p| p[15] = 9), false),
            ("another destination", with(&|p| p[19] = 9), false),
            ("TCP", with(&|p| p[9] = 6), false),
            ("ICMP", with(&|p| p[9] = 1), false),
            ("more fragments", with(&|p| p[6] |= 0x20), false),
            ("a later fragment", with(&|p| p[7] = 1), false),
            ("IPv6", with(&|p| p[0] = 0x65), false),
            ("IHL below 5", with(&|p| p[0] = 0x44), false),
            ("IHL past the packet", with(&|p| p[0] = 0x4f), false),
            (
                "total length beyond the packet",
                with(&|p| p[3] += 1),
                false,
            ),
            (
                "total length too short for VXLAN",
                with(&|p| p[2..4].copy_from_slice(&35u16.to_be_bytes())),
                false,
            ),
            (
                "UDP length too short for VXLAN",
                with(&|p| p[24..26].copy_from_slice(&15u16.to_be_bytes())),
                false,
            ),
            (
                "UDP length beyond the packet",
                with(&|p| p[24..26].copy_from_slice(&900u16.to_be_bytes())),
                false,
            ),
            ("cut in the VXLAN header", vxlan(42)[..35].to_vec(), false),
            ("empty", Vec::new(), false),
        ];
        for (what, packet, want) in cases {
            assert_eq!(admits(&packet, PEER, LOCAL, PORT, &scope), want, "{what}");
        }
        assert!(!admits(&vxlan(42), PEER, LOCAL, PORT, &Scope::default()));
    }

    /// What `admits` must mean, spelled out field by field.
    fn is_vxlan_in_scope(p: &[u8], scope: &Scope) -> bool {
        let h = usize::from(p[0] & 15) * 4;
        p.len() >= 20
            && p[0] >> 4 == 4
            && h >= 20
            && p.len() >= h + 16
            && usize::from(u16::from_be_bytes([p[2], p[3]])) <= p.len()
            && usize::from(u16::from_be_bytes([p[2], p[3]])) >= h + 16
            && p[6] & 0x3f == 0
            && p[7] == 0
            && p[9] == PROTO_UDP
            && p[12..16] == PEER.octets()
            && p[16..20] == LOCAL.octets()
            && p[h + 2..h + 4] == PORT.to_be_bytes()
            && scope.contains(u32::from_be_bytes([0, p[h + 12], p[h + 13], p[h + 14]]))
    }

    #[test]
    fn fuzz_scope_admits_only_vxlan_to_the_port_with_an_allowed_vni() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let scope = Scope::new([7, 42]);
        // Arbitrary bytes, and a valid packet with a few bytes changed.
        let altered = (
            prop_oneof![
                Just(7u32),
                Just(42),
                Just(8),
                any::<u32>().prop_map(|v| v & 0xff_ffff)
            ],
            proptest::collection::vec((0..60usize, any::<u8>()), 0..4),
            0..60usize,
        )
            .prop_map(|(vni, changes, cut)| {
                let mut p = vxlan(vni);
                for (at, b) in changes {
                    if at < p.len() {
                        p[at] = b;
                    }
                }
                p.truncate(cut.max(1));
                p
            });
        let strategy = prop_oneof![proptest::collection::vec(any::<u8>(), 0..80), altered];
        let mut runner = TestRunner::new(Config::with_cases(20_000));
        runner
            .run(&strategy, |p| {
                let got = admits(&p, PEER, LOCAL, PORT, &scope);
                if got {
                    prop_assert!(is_vxlan_in_scope(&p, &scope), "admitted {p:02x?}");
                }
                Ok(())
            })
            .unwrap();
    }
}
