//! The numbers and names the overlay shares with the kernel, the firewall and other
//! hosts: ports, overheads, limits and the names that mark what is ours. One place,
//! so the modules that program the kernel agree without importing each other.

/// VXLAN over IPv4 adds 50 bytes (outer IP 20, UDP 8, VXLAN 8, inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// VXLAN's port for plain networks, on the underlay.
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN's port for encrypted networks, inside the mesh only: a socket of its own,
/// so a plaintext packet to 4789 can never reach an encrypted network's device, and
/// anything to 4790 that did not come out of the mesh is dropped by the firewall.
pub const ENCRYPTED_VXLAN_PORT: u16 = 4790;
/// Largest VNI VXLAN can carry.
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// The mesh device on every host (a TAP without ARP).
pub const MESH_INTERFACE: &str = "nawg0";
/// WireGuard over IPv4: outer IP 20 + UDP 8 + data header 16 + authentication tag 16.
pub const WIREGUARD_OVERHEAD: u32 = 60;
/// The largest mesh MTU the datapath's buffers carry (jumbo frames; an underlay with
/// larger frames still gets 9000).
pub const MAX_MESH_MTU: u32 = 9000;

/// Name of our nftables table (family `ip`).
pub const FIREWALL_TABLE: &str = "netagent";
/// The packet-mark bit our forward chain sets on what it accepts. One bit, outside
/// the ones kube-proxy (0x4000, 0x8000) and Weave (0x20000, 0x40000) use.
pub const FORWARD_MARK: u32 = 0x0100_0000;

/// Route protocol number stamped on the routes we add, so we can tell ours apart.
pub const ROUTE_PROTOCOL: u8 = 78;
