//! Several hosts on one store: names resolve across hosts, blocks and peers are
//! shared out, and a host's death or another host's change reaches every agent.

use super::*;
use crate::api::{EndpointState, PeerState};

/// Two hosts on network "app": h1 (192.0.2.11) and h2 (192.0.2.12).
async fn two_hosts(bed: &Bed) -> (Host, Host) {
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    (h1, h2)
}

#[tokio::test]
async fn replicas_on_two_hosts_resolve_on_both_with_every_replica() {
    let bed = Bed::new().await;
    let (h1, h2) = two_hosts(&bed).await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let b = h2.attach("b", "app", Some("api")).await.address;
    let both = sorted(vec![a, b]);
    eventually("both replicas answered on both hosts", || {
        sorted(h1.resolve("app", "api")) == both && sorted(h2.resolve("app", "api")) == both
    })
    .await;
    // Each one's own name too, from the other host.
    assert_eq!(h1.resolve("app", "b"), [b]);
    assert_eq!(h2.resolve("app", "a"), [a]);
}

#[tokio::test]
async fn the_answer_order_rotates_between_queries() {
    let bed = Bed::new().await;
    let (h1, h2) = two_hosts(&bed).await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let b = h2.attach("b", "app", Some("api")).await.address;
    eventually("both replicas answered on h1", || {
        h1.resolve("app", "api").len() == 2
    })
    .await;
    let first = h1.resolve("app", "api");
    let second = h1.resolve("app", "api");
    assert_eq!(sorted(first.clone()), [a, b]);
    assert_eq!(
        second,
        [first[1], first[0]],
        "the second answer starts elsewhere"
    );
}

#[tokio::test]
async fn each_host_takes_its_own_block() {
    let bed = Bed::new().await;
    let (h1, h2) = two_hosts(&bed).await;
    assert_eq!(h1.attach("a", "app", None).await.address, ip("100.64.0.2"));
    assert_eq!(h2.attach("b", "app", None).await.address, ip("100.64.1.2"));
    let blocks: Vec<(String, String)> = h1
        .agent
        .inspect_network("app")
        .unwrap()
        .blocks
        .iter()
        .map(|b| (b.block.to_string(), b.node.clone()))
        .collect();
    assert_eq!(
        blocks,
        [
            ("100.64.0.0/24".to_owned(), "h1".to_owned()),
            ("100.64.1.0/24".to_owned(), "h2".to_owned()),
        ]
    );
}

#[tokio::test]
async fn hosts_list_each_other_as_up_peers() {
    let bed = Bed::new().await;
    let (h1, h2) = two_hosts(&bed).await;
    h2.attach("b", "app", None).await;
    eventually("h2 up in h1's peers with its network", || {
        h1.peer("h2").is_some_and(|p| {
            p.state == PeerState::Up
                && p.underlay == ip("192.0.2.12")
                && p.networks == ["app"]
                && p.endpoints == 1
        })
    })
    .await;
    eventually("h1 up in h2's peers", || {
        h2.peer("h1").is_some_and(|p| p.state == PeerState::Up)
    })
    .await;
    assert!(h1.peer("h1").is_none(), "a host is not its own peer");
    assert_eq!(h1.agent.status().peers_up, 1);
}

#[tokio::test]
async fn a_dead_host_leaves_the_answers_and_shows_down() {
    let bed = Bed::new().await;
    let (h1, h2) = two_hosts(&bed).await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let b = h2.attach("b", "app", Some("api")).await.address;
    eventually("both replicas", || h1.resolve("app", "api").len() == 2).await;
    bed.expire("h2").await;
    eventually("h2's replica leaves h1's answers", || {
        h1.resolve("app", "api") == [a]
    })
    .await;
    assert!(h1.resolve("app", "b").is_empty());
    assert_eq!(h1.peer("h2").map(|p| p.state), Some(PeerState::Down));
    let states: Vec<(Ipv4Addr, EndpointState)> = h1
        .agent
        .endpoints()
        .iter()
        .map(|e| (e.address, e.state))
        .collect();
    assert_eq!(states, [(a, EndpointState::Up), (b, EndpointState::Down)]);
    assert_eq!(h1.agent.status().peers_down, 1);
}

#[tokio::test]
async fn a_host_that_comes_back_answers_again_with_the_same_addresses() {
    let bed = Bed::new().await;
    let (h1, h2) = two_hosts(&bed).await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let b = h2.attach("b", "app", Some("api")).await.address;
    bed.expire("h2").await;
    eventually("h2's replica leaves", || h1.resolve("app", "api") == [a]).await;
    bed.revive(&h2.name, h2.underlay).await;
    eventually("h2's replica back in h1's answers", || {
        sorted(h1.resolve("app", "api")) == [a, b]
    })
    .await;
    assert_eq!(h1.peer("h2").map(|p| p.state), Some(PeerState::Up));
}

#[tokio::test]
async fn a_network_removed_on_one_host_leaves_the_other_hosts_kernel() {
    let bed = Bed::new().await;
    let (h1, h2) = two_hosts(&bed).await;
    h1.attach("a", "app", Some("api")).await;
    h2.attach("b", "app", Some("api")).await;
    assert_eq!(h2.kernel.networks(), ["app".to_owned()].into());
    h1.agent.remove_network("app", true).await.unwrap();
    eventually("h2's endpoint and device are gone", || {
        h2.kernel.networks().is_empty() && h2.kernel.endpoints().is_empty()
    })
    .await;
    assert!(h2.resolve("app", "api").is_empty());
    assert_eq!(h2.agent.status().local_endpoints, 0);
    eventually("h1's own kernel follows", || {
        h1.kernel.networks().is_empty() && h1.kernel.endpoints().is_empty()
    })
    .await;
    h2.listener_closed("b").await;
}

#[tokio::test]
async fn an_endpoint_record_deleted_by_another_host_is_detached_here() {
    let bed = Bed::new().await;
    let (h1, _h2) = two_hosts(&bed).await;
    h1.attach("a", "app", Some("api")).await;
    let b = h1.attach("b", "app", Some("api")).await.address;
    bed.store
        .write(Txn::default().delete("endpoints/app/100.64.0.2"))
        .await;
    eventually("the deleted endpoint leaves the kernel", || {
        h1.kernel.endpoints() == [(b, "app".to_owned())].into()
    })
    .await;
    assert_eq!(h1.resolve("app", "api"), [b]);
    assert_eq!(h1.agent.status().local_endpoints, 1);
    h1.listener_closed("a").await;
}

#[tokio::test]
async fn another_hosts_block_becomes_a_peer_of_the_network_here() {
    let bed = Bed::new().await;
    let (h1, h2) = two_hosts(&bed).await;
    h1.attach("a", "app", None).await;
    let peers_of_app = |host: &Host| -> Vec<(String, String, String)> {
        host.kernel
            .applied()
            .and_then(|s| s.networks.into_iter().find(|n| n.network.name == "app"))
            .map(|n| {
                n.peers
                    .iter()
                    .map(|p| (p.name.clone(), p.underlay.to_string(), p.block.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(peers_of_app(&h1).is_empty());
    h2.attach("b", "app", None).await;
    eventually("h2's block is a peer in h1's kernel", || {
        peers_of_app(&h1)
            == [(
                "h2".to_owned(),
                "192.0.2.12".to_owned(),
                "100.64.1.0/24".to_owned(),
            )]
    })
    .await;
    assert_eq!(
        peers_of_app(&h2),
        [(
            "h1".to_owned(),
            "192.0.2.11".to_owned(),
            "100.64.0.0/24".to_owned(),
        )]
    );
}

#[tokio::test]
async fn a_detached_replica_leaves_the_other_hosts_answers() {
    let bed = Bed::new().await;
    let (h1, h2) = two_hosts(&bed).await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    h2.attach("b", "app", Some("api")).await;
    eventually("both replicas", || h1.resolve("app", "api").len() == 2).await;
    h2.agent.detach("/run/netns/b", "app").await.unwrap();
    eventually("h2's replica leaves h1's answers", || {
        h1.resolve("app", "api") == [a]
    })
    .await;
    assert!(h1.resolve("app", "b").is_empty());
}

#[tokio::test]
async fn concurrent_attaches_on_three_hosts_get_distinct_addresses() {
    let bed = Bed::new().await;
    let hosts = [
        bed.host("h1", 11).await,
        bed.host("h2", 12).await,
        bed.host("h3", 13).await,
    ];
    hosts[0].create_network("app", "100.64.0.0/16").await;
    let attaches = hosts.iter().flat_map(|h| {
        (0..3).map(move |i| async move {
            let e = h
                .attach(&format!("{}-{i}", h.name), "app", Some("api"))
                .await;
            (h.name.clone(), e.address)
        })
    });
    let done = futures::future::join_all(attaches).await;
    let mut addresses: Vec<Ipv4Addr> = done.iter().map(|(_, a)| *a).collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), 9, "{done:?}");
    // Each host's addresses come from its own block.
    let blocks = hosts[0].agent.inspect_network("app").unwrap().blocks;
    assert_eq!(blocks.len(), 3);
    for (host, address) in &done {
        let block = blocks.iter().find(|b| &b.node == host).expect("a block");
        assert!(
            block.block.contains(address),
            "{address} in {}",
            block.block
        );
    }
    eventually("every host answers all nine", || {
        hosts.iter().all(|h| h.resolve("app", "api").len() == 9)
    })
    .await;
}
