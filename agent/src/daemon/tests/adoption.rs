//! An agent restarted on the same kernel takes over the endpoints it attached, and
//! only those: a namespace gone or replaced while it was down, or a store record it
//! never made, is removed.

use super::*;
use crate::daemon::fake::Call;
use crate::model::EndpointRecord;

fn attaches(kernel: &FakeDatapath) -> usize {
    kernel
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Attach { .. }))
        .count()
}

#[tokio::test]
async fn a_restarted_agent_keeps_its_endpoints_and_answers_for_them() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let b = h1.attach("b", "app", Some("api")).await.address;
    let kernel = h1.crash().await;
    let h1 = bed.host_on("h1", 11, kernel).await;
    assert_eq!(
        h1.kernel.endpoints(),
        [(a, "app".to_owned()), (b, "app".to_owned())].into()
    );
    assert_eq!(attaches(&h1.kernel), 2, "nothing attached again");
    assert_eq!(sorted(h1.resolve("app", "api")), [a, b]);
    assert_eq!(h1.agent.status().local_endpoints, 2);
    let listener = h1.listener("a").await;
    assert_eq!(query_a(listener, "b").await, [b]);
    // Detach still knows the namespace behind each adopted endpoint.
    h1.agent.detach("/run/netns/a", "app").await.unwrap();
    assert_eq!(h1.resolve("app", "api"), [b]);
}

#[tokio::test]
async fn a_restarted_agent_hands_out_no_address_twice() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    let kernel = h1.crash().await;
    let h1 = bed.host_on("h1", 11, kernel).await;
    assert_eq!(h1.attach("b", "app", None).await.address, ip("100.64.0.3"));
    assert_eq!(h1.attach("a", "app", None).await.address, ip("100.64.0.2"));
}

#[tokio::test]
async fn an_endpoint_whose_namespace_went_while_the_agent_was_down_is_removed_at_start() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("lost", "app", Some("api")).await;
    let kept = h1.attach("kept", "app", Some("api")).await.address;
    let kernel = h1.crash().await;
    kernel.remove_namespace("/run/netns/lost");
    let h1 = bed.host_on("h1", 11, kernel).await;
    let keys = bed.store.keys().await;
    assert!(
        !keys.contains(&"endpoints/app/100.64.0.2".to_owned()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"endpoints/app/100.64.0.3".to_owned()),
        "{keys:?}"
    );
    assert_eq!(h1.resolve("app", "api"), [kept]);
    assert!(h1.resolve("app", "lost").is_empty());
    assert_eq!(h1.kernel.endpoints(), [(kept, "app".to_owned())].into());
}

#[tokio::test]
async fn a_store_record_this_host_did_not_attach_is_not_adopted_and_is_removed() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let kernel = h1.crash().await;
    // A store writer names this host and a namespace of its choosing, which exists.
    let ino = kernel.add_namespace("/run/netns/victim");
    let planted = EndpointRecord {
        network: "app".into(),
        address: ip("100.64.0.9"),
        node: "h1".into(),
        id: format!("ns:{ino}"),
        netns: "/run/netns/victim".into(),
        name: Some("victim".into()),
        service: Some("api".into()),
        aliases: Vec::new(),
        in_service: true,
        container: None,
        one_per_answer: false,
        ports: Vec::new(),
    };
    bed.store.put("endpoints/app/100.64.0.9", &planted).await;
    let h1 = bed.host_on("h1", 11, kernel).await;
    assert!(!bed
        .store
        .keys()
        .await
        .contains(&"endpoints/app/100.64.0.9".to_owned()));
    assert_eq!(h1.kernel.endpoints(), [(a, "app".to_owned())].into());
    assert_eq!(h1.resolve("app", "api"), [a]);
    assert!(h1.resolve("app", "victim").is_empty());
    assert_eq!(
        h1.listener_scope("victim").await,
        None,
        "no listener planted"
    );
}

#[tokio::test]
async fn a_namespace_replaced_while_the_agent_was_down_is_not_adopted() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", Some("api")).await;
    let kernel = h1.crash().await;
    let old = kernel.identity_of("/run/netns/a").unwrap();
    kernel.remove_namespace("/run/netns/a");
    let new = kernel.add_namespace("/run/netns/a");
    assert_ne!(old, new);
    let h1 = bed.host_on("h1", 11, kernel).await;
    assert!(h1.kernel.endpoints().is_empty());
    assert!(h1.resolve("app", "api").is_empty());
    assert!(!bed
        .store
        .keys()
        .await
        .contains(&"endpoints/app/100.64.0.2".to_owned()));
    assert_eq!(h1.listener_scope("a").await, None);
    // The new namespace is a new endpoint, attached only when asked.
    let e = h1.attach("a", "app", Some("api")).await;
    assert_eq!(h1.resolve("app", "api"), [e.address]);
}

#[tokio::test]
async fn a_host_restarted_at_a_new_underlay_moves_its_blocks_there() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    h2.attach("b", "app", None).await;
    let kernel = h1.crash().await;
    let h1 = bed.host_on("h1", 21, kernel).await;
    let block: model::BlockRecord = bed
        .store
        .get("blocks/app/100.64.0.0_24")
        .await
        .expect("h1's block");
    assert_eq!(
        (block.node.as_str(), block.underlay),
        ("h1", ip("192.0.2.21"))
    );
    eventually("h2 reaches h1's block at its new underlay", || {
        h2.kernel.applied().is_some_and(|s| {
            s.networks[0]
                .peers
                .iter()
                .any(|p| p.name == "h1" && p.underlay == ip("192.0.2.21"))
        })
    })
    .await;
    assert_eq!(h1.kernel.endpoints().len(), 1);
}

#[tokio::test]
async fn a_first_start_without_a_list_adopts_the_stores_records_for_this_host() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let list = h1.agent.local.file().to_owned();
    let kernel = h1.crash().await;
    // As an agent of a version that kept no list leaves it.
    std::fs::remove_file(&list).unwrap();
    let h1 = bed.host_on("h1", 11, kernel).await;
    assert_eq!(h1.resolve("app", "api"), [a]);
    assert_eq!(h1.kernel.endpoints(), [(a, "app".to_owned())].into());
    assert!(bed
        .store
        .keys()
        .await
        .contains(&format!("endpoints/app/{a}")));
    assert!(list.exists(), "the list is written again");
}

#[tokio::test]
async fn an_unreadable_list_adopts_nothing() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let list = h1.agent.local.file().to_owned();
    let kernel = h1.crash().await;
    std::fs::write(&list, b"{ not json").unwrap();
    let h1 = bed.host_on("h1", 11, kernel).await;
    assert!(h1.resolve("app", "api").is_empty());
    assert!(h1.kernel.endpoints().is_empty());
    assert!(!bed
        .store
        .keys()
        .await
        .contains(&format!("endpoints/app/{a}")));
}

/// A store writer's endpoint record for `node` on network "app", at `netns`.
fn planted(node: &str, address: &str, netns: &str, ino: u64) -> EndpointRecord {
    EndpointRecord {
        network: "app".into(),
        address: ip(address),
        node: node.into(),
        id: format!("ns:{ino}"),
        netns: netns.into(),
        name: Some("planted".into()),
        service: None,
        aliases: Vec::new(),
        in_service: true,
        container: None,
        one_per_answer: false,
        ports: Vec::new(),
    }
}

#[tokio::test]
async fn a_record_naming_the_hosts_own_namespace_is_never_adopted() {
    let bed = Bed::new().await;
    let h2 = bed.host("h2", 12).await;
    h2.create_network("app", "100.64.0.0/16").await;
    // Before h1 ever ran (no list of its own yet), a store writer gives it a block
    // and an endpoint in the host's own namespace.
    let block = model::BlockRecord {
        network: "app".into(),
        block: "100.64.5.0/24".parse().unwrap(),
        node: "h1".into(),
        underlay: ip("192.0.2.11"),
    };
    bed.store.put("blocks/app/100.64.5.0_24", &block).await;
    let record = planted("h1", "100.64.5.2", "/proc/1/ns/net", 1);
    bed.store.put("endpoints/app/100.64.5.2", &record).await;
    let kernel = FakeDatapath::default();
    kernel.add_namespace_with("/proc/1/ns/net", 1);
    let h1 = bed.host_on("h1", 11, kernel).await;
    assert!(
        h1.kernel.endpoints().is_empty(),
        "the host joined a network"
    );
    assert_eq!(h1.agent.status().local_endpoints, 0);
    assert!(!bed
        .store
        .keys()
        .await
        .contains(&"endpoints/app/100.64.5.2".to_owned()));
}

#[tokio::test]
async fn a_record_naming_this_host_written_while_it_runs_is_not_attached_here() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", None).await.address;
    let ino = h1.kernel.add_namespace("/run/netns/victim");
    let record = planted("h1", "100.64.0.9", "/run/netns/victim", ino);
    bed.store.put("endpoints/app/100.64.0.9", &record).await;
    // A full pass sees it.
    h1.create_network("poke", "100.65.0.0/16").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h1.kernel.endpoints(), [(a, "app".to_owned())].into());
    assert_eq!(h1.listener_scope("victim").await, None);
    assert_eq!(h1.agent.status().local_endpoints, 1);
}
