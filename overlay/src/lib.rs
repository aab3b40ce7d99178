//! Everything netagent does to the kernel, behind intent-level, idempotent functions.
//!
//! A caller describes what one host's overlay should be ([`HostState`]: networks, the
//! peers holding other blocks of them, the namespaces attached here) and [`Host::apply`]
//! makes the kernel match: a VXLAN device per network holding the gateway, one route,
//! one neighbour and one FDB entry per remote host (kernel tables grow with hosts, not
//! with containers), a routed veth per attached namespace (no bridge), and one
//! nftables table for isolation and egress. Nothing outside this crate touches
//! netlink or namespaces.

mod attach;
mod constants;
mod error;
mod firewall;
mod firewall_guard;
mod handover;
mod host;
mod naming;
mod netlink;
mod netns;
mod netns_watch;
mod pinned;
mod plan;
mod probe;
mod spec;
mod wireguard;

pub use constants::{
    ENCRYPTED_VXLAN_PORT, FIREWALL_TABLE, FORWARD_MARK, MAX_VNI, MESH_INTERFACE, VXLAN_OVERHEAD,
    VXLAN_PORT, WIREGUARD_OVERHEAD,
};
pub use error::{Error, Result};
pub use firewall::{divert_dns_from_docker, dns_divert_ruleset, DockerForward};
pub use firewall_guard::FirewallGuard;
pub use handover::{
    raise_descriptor_limit, received_listeners, socket_namespace, spawn_in_new_session,
    wait_readable, HandoverChannel, HandoverListener,
};
pub use host::{ApplyReport, Host, Underlay};
pub use naming::{docker_peer_name, host_veth_name, vxlan_name, Mac};
pub use netns::{Netns, NetnsRef};
pub use netns_watch::NetnsWatch;
pub use pinned::{rewrite_in_root, PinnedProcess, Rewrite, MAX_CONTAINER_FILE};
pub use plan::{desired_objects, plan, Object, Plan};
pub use probe::overlay_rtt;
pub use spec::{block_gateway, Endpoint, HostState, NetworkSpec, NetworkState, Peer};
pub use wireguard::{KeyPair, Mesh, MeshOptions, MeshPeer, OnFailure, PeerStats};

/// The offload splitter and coalescer, for the crate's benchmarks only: not part of
/// the API, may change with any release.
#[doc(hidden)]
pub mod bench_support {
    pub use crate::wireguard::offload::{
        split, Coalescer, Malformed, VnetHeader, ETH_LEN, FRAME_HEADROOM, VNET_HDR_LEN,
    };
}
