//! The pure `desired_host_state`: what the kernel should hold, from the cluster view
//! and this host's endpoints alone.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use netagent_overlay::NetnsRef;

use super::ip;
use crate::daemon::local::LocalEndpoint;
use crate::daemon::reconcile::{desired_host_state, HostFacts};
use crate::model::{BlockRecord, Cluster, EndpointRecord, MeshRecord, NetworkRecord};

fn facts<'a>(node: &'a str, mesh: Option<&str>) -> HostFacts<'a> {
    HostFacts {
        node,
        underlay: ip("192.0.2.11"),
        underlay_interface: None,
        mesh_address: mesh.map(ip),
        store_addresses: &[],
    }
}

fn network(c: &mut Cluster, name: &str, subnet: &str, vni: u32, encrypted: bool) {
    c.networks.insert(
        name.into(),
        NetworkRecord {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            vni,
            encrypted,
            mtu: None,
            block_prefix: 24,
        },
    );
}

fn block(c: &mut Cluster, network: &str, block: &str, node: &str, underlay: &str) {
    let block: Ipv4Net = block.parse().unwrap();
    c.blocks.insert(
        format!("{network}/{block}"),
        BlockRecord {
            network: network.into(),
            block,
            node: node.into(),
            underlay: ip(underlay),
        },
    );
}

fn mesh(c: &mut Cluster, node: &str, address: &str) {
    c.mesh.insert(
        address.into(),
        MeshRecord {
            node: node.into(),
            address: ip(address),
            public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            endpoint: format!("{}:51820", ip("192.0.2.99")).parse().unwrap(),
        },
    );
}

fn endpoint(network: &str, address: &str, ino: u64) -> (String, LocalEndpoint) {
    let netns = format!("/run/netns/n{ino}");
    (
        format!("endpoints/{network}/{address}"),
        LocalEndpoint {
            record: EndpointRecord {
                network: network.into(),
                address: ip(address),
                node: "h1".into(),
                id: format!("ns:{ino}"),
                netns: netns.clone(),
                name: None,
                service: None,
                aliases: Vec::new(),
                in_service: true,
                container: None,
                one_per_answer: false,
                ports: Vec::new(),
            },
            netns: NetnsRef::parse(&netns).unwrap(),
            ino,
            upstreams: Vec::new(),
            docker_endpoint: None,
        },
    )
}

fn two_host_cluster() -> Cluster {
    let mut c = Cluster::default();
    network(&mut c, "app", "100.64.0.0/16", 10, false);
    block(&mut c, "app", "100.64.0.0/24", "h1", "192.0.2.11");
    block(&mut c, "app", "100.64.1.0/24", "h2", "192.0.2.12");
    c
}

#[test]
fn a_network_is_here_only_where_this_host_holds_a_block() {
    let mut c = two_host_cluster();
    network(&mut c, "other", "100.65.0.0/16", 11, false);
    block(&mut c, "other", "100.65.1.0/24", "h2", "192.0.2.12");
    let state = desired_host_state(&c, &BTreeMap::new(), &facts("h1", None));
    let names: Vec<&str> = state
        .networks
        .iter()
        .map(|n| n.network.name.as_str())
        .collect();
    assert_eq!(names, ["app"]);
    assert_eq!(
        state.networks[0].network.block,
        "100.64.0.0/24".parse::<Ipv4Net>().unwrap()
    );
}

#[test]
fn every_other_block_is_a_peer_at_its_hosts_underlay() {
    let mut c = two_host_cluster();
    block(&mut c, "app", "100.64.2.0/24", "h3", "192.0.2.13");
    let state = desired_host_state(&c, &BTreeMap::new(), &facts("h1", None));
    let peers: Vec<(String, String, String)> = state.networks[0]
        .peers
        .iter()
        .map(|p| (p.name.clone(), p.underlay.to_string(), p.block.to_string()))
        .collect();
    assert_eq!(
        peers,
        [
            ("h2".into(), "192.0.2.12".into(), "100.64.1.0/24".into()),
            ("h3".into(), "192.0.2.13".into(), "100.64.2.0/24".into()),
        ]
    );
}

#[test]
fn only_this_hosts_endpoints_of_each_network_are_in_it() {
    let mut c = two_host_cluster();
    network(&mut c, "db", "100.65.0.0/16", 11, false);
    block(&mut c, "db", "100.65.0.0/24", "h1", "192.0.2.11");
    let endpoints: BTreeMap<_, _> = [
        endpoint("app", "100.64.0.2", 7),
        endpoint("db", "100.65.0.2", 7),
        endpoint("app", "100.64.0.3", 8),
    ]
    .into_iter()
    .collect();
    let state = desired_host_state(&c, &endpoints, &facts("h1", None));
    let of = |name: &str| -> Vec<String> {
        state
            .networks
            .iter()
            .find(|n| n.network.name == name)
            .unwrap()
            .endpoints
            .iter()
            .map(|e| format!("{} {:?}", e.address, e.identity))
            .collect()
    };
    assert_eq!(of("app"), ["100.64.0.2 Some(7)", "100.64.0.3 Some(8)"]);
    assert_eq!(of("db"), ["100.65.0.2 Some(7)"]);
}

#[test]
fn an_encrypted_network_waits_for_the_mesh_and_never_goes_plaintext() {
    let mut c = two_host_cluster();
    network(&mut c, "secret", "100.66.0.0/16", 12, true);
    block(&mut c, "secret", "100.66.0.0/24", "h1", "192.0.2.11");
    block(&mut c, "secret", "100.66.1.0/24", "h2", "192.0.2.12");
    let without = desired_host_state(&c, &BTreeMap::new(), &facts("h1", None));
    assert!(without.networks.iter().all(|n| n.network.name != "secret"));
    mesh(&mut c, "h2", "100.127.192.2");
    let with = desired_host_state(&c, &BTreeMap::new(), &facts("h1", Some("100.127.192.1")));
    let secret = with
        .networks
        .iter()
        .find(|n| n.network.name == "secret")
        .expect("the encrypted network, once the mesh runs");
    // Its peer is reached at its mesh address, inside WireGuard.
    assert_eq!(secret.peers[0].underlay, ip("100.127.192.2"));
    assert_eq!(with.mesh_address, Some(ip("100.127.192.1")));
}

#[test]
fn an_encrypted_peer_without_a_mesh_record_is_left_out() {
    let mut c = Cluster::default();
    network(&mut c, "secret", "100.66.0.0/16", 12, true);
    block(&mut c, "secret", "100.66.0.0/24", "h1", "192.0.2.11");
    block(&mut c, "secret", "100.66.1.0/24", "h2", "192.0.2.12");
    let state = desired_host_state(&c, &BTreeMap::new(), &facts("h1", Some("100.127.192.1")));
    assert!(state.networks[0].peers.is_empty());
}

#[test]
fn every_cluster_host_and_the_store_are_protected() {
    let mut c = two_host_cluster();
    mesh(&mut c, "h2", "100.127.192.2");
    let store = [ip("198.51.100.7")];
    let host = HostFacts {
        store_addresses: &store,
        ..facts("h1", None)
    };
    let state = desired_host_state(&c, &BTreeMap::new(), &host);
    let protected: Vec<String> = state.protected.iter().map(|n| n.to_string()).collect();
    for must in ["192.0.2.11/32", "192.0.2.12/32", "198.51.100.7/32"] {
        assert!(
            protected.iter().any(|p| p == must),
            "{must} in {protected:?}"
        );
    }
    assert!(
        protected.iter().any(|p| p.starts_with("100.127.")),
        "the mesh's subnet in {protected:?}"
    );
}

#[test]
fn a_host_with_no_block_has_an_empty_datapath() {
    let c = two_host_cluster();
    let state = desired_host_state(&c, &BTreeMap::new(), &facts("h9", None));
    assert!(state.networks.is_empty());
    assert_eq!(state.underlay_address, ip("192.0.2.11"));
}
