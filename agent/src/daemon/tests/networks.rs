//! Creating, listing and removing networks: refusals name the clash and the fix, and
//! a network made on one host is usable on every other at once.

use super::*;

#[tokio::test]
async fn a_created_network_is_listed_and_inspected() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let created = h1.create_network("app", "100.64.0.0/16").await;
    assert_eq!(created.name, "app");
    assert_eq!(created.subnet.to_string(), "100.64.0.0/16");
    assert_eq!(created.block_prefix, 24);
    assert!(!created.encrypted);
    assert!(created.vni > 0);
    assert!(created.blocks.is_empty());
    let listed: Vec<(String, u32)> = h1
        .agent
        .list_networks()
        .into_iter()
        .map(|n| (n.name, n.vni))
        .collect();
    assert_eq!(listed, [("app".to_owned(), created.vni)]);
    h1.attach("a", "app", None).await;
    let inspected = h1.agent.inspect_network("app").unwrap();
    assert_eq!(inspected.endpoints, 1);
    assert_eq!(inspected.blocks.len(), 1);
    assert_eq!(inspected.blocks[0].node, "h1");
    assert_eq!(inspected.blocks[0].block.to_string(), "100.64.0.0/24");
}

#[tokio::test]
async fn two_networks_get_different_vnis() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let app = h1.create_network("app", "100.64.0.0/16").await;
    let db = h1.create_network("db", "100.65.0.0/16").await;
    assert_ne!(app.vni, db.vni);
}

#[tokio::test]
async fn an_overlapping_subnet_is_refused_naming_the_other_network() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    // Asked on another host: the check reads the store, not a cached view.
    let e = h2
        .agent
        .create_network(&new_network("other", "100.64.128.0/24"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "subnet 100.64.128.0/24 overlaps network \"app\" (100.64.0.0/16); pick a subnet outside it"
    );
    assert!(!bed
        .store
        .keys()
        .await
        .contains(&"networks/other".to_owned()));
}

#[tokio::test]
async fn a_duplicate_name_is_refused() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let e = h1
        .agent
        .create_network(&new_network("app", "100.65.0.0/16"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "network \"app\" already exists (subnet 100.64.0.0/16); remove it first with: netagent network rm app"
    );
    assert_eq!(
        h1.agent.inspect_network("app").unwrap().subnet.to_string(),
        "100.64.0.0/16"
    );
}

#[tokio::test]
async fn removing_a_network_in_use_needs_force_and_names_the_hosts() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    h2.attach("b", "app", None).await;
    let e = h1.agent.remove_network("app", false).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "network \"app\" has 2 endpoint(s) attached (on h1, h2); detach them first, or remove anyway with: netagent network rm app --force"
    );
    assert!(h1.agent.inspect_network("app").is_ok());
    h1.agent.remove_network("app", true).await.unwrap();
    assert!(h1.agent.list_networks().is_empty());
    let keys = bed.store.keys().await;
    assert!(
        !keys.iter().any(|k| k.starts_with("networks/")
            || k.starts_with("blocks/")
            || k.starts_with("endpoints/")),
        "{keys:?}"
    );
}

#[tokio::test]
async fn an_unused_network_is_removed_without_force() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    h1.agent.detach("/run/netns/a", "app").await.unwrap();
    let removed = h1.agent.remove_network("app", false).await.unwrap();
    assert_eq!(removed.name, "app");
    let e = h1.agent.inspect_network("app").unwrap_err();
    assert_eq!(
        e.to_string(),
        "network \"app\" not found; create it with: netagent network create app --subnet CIDR"
    );
}

#[tokio::test]
async fn creating_a_network_while_the_store_is_away_fails_saying_so() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    bed.store.set_reachable(false);
    let e = h1
        .agent
        .create_network(&new_network("app", "100.64.0.0/16"))
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("unreachable")
            && text.contains("networks cannot be changed while the store is away"),
        "{text}"
    );
    bed.store.set_reachable(true);
    assert!(h1.agent.list_networks().is_empty());
    h1.create_network("app", "100.64.0.0/16").await;
}

#[tokio::test]
async fn a_network_created_on_one_host_is_attachable_on_another_at_once() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let b = h2.attach("b", "app", Some("api")).await;
    assert_eq!(
        b.address,
        ip("100.64.0.2"),
        "the first block, as h2 is first"
    );
    eventually("h1 answers for it", || {
        h1.resolve("app", "api") == [b.address]
    })
    .await;
}

#[tokio::test]
async fn a_network_written_by_another_host_is_attachable_before_the_watch_says_so() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let record = crate::model::NetworkRecord {
        name: "app".into(),
        subnet: "100.64.0.0/16".parse().unwrap(),
        vni: 4242,
        encrypted: false,
        mtu: None,
        block_prefix: 24,
    };
    // Straight into the store, then at once an attach: the watch may not have
    // delivered it yet, and the attach reads the store again rather than refuse.
    bed.store.put("networks/app", &record).await;
    let a = h1.attach("a", "app", None).await;
    assert_eq!(a.address, ip("100.64.0.2"));
    assert_eq!(h1.kernel.applied().unwrap().networks[0].network.vni, 4242);
}

#[tokio::test]
async fn a_bad_network_record_is_left_out_and_named_in_status() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    bed.store
        .write(Txn::default().put(
            "networks/everything",
            br#"{"name":"everything","subnet":"0.0.0.0/0","vni":77,"block_prefix":24}"#.to_vec(),
        ))
        .await;
    eventually("status names the bad record", || {
        h1.agent
            .status()
            .left_out
            .iter()
            .any(|l| l.starts_with("store record networks/everything") && l.contains("/8 to /30"))
    })
    .await;
    let names: Vec<String> = h1
        .agent
        .list_networks()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["app"]);
    // The good network goes on.
    let a = h1.attach("a", "app", None).await;
    assert_eq!(h1.resolve("app", "a"), [a.address]);
}

#[tokio::test]
async fn a_clashing_block_takes_out_only_its_network_on_this_host() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.create_network("other", "100.65.0.0/16").await;
    h1.attach("a", "app", None).await;
    h2.attach("b", "app", None).await;
    let o = h1.attach("o", "other", None).await;
    // A store writer adds a third owner of an "app" block at h2's underlay.
    bed.store
        .write(Txn::default().put(
            "blocks/app/100.64.200.0_24",
            br#"{"network":"app","block":"100.64.200.0/24","node":"ghost","underlay":"192.0.2.12"}"#
                .to_vec(),
        ))
        .await;
    eventually("status names the clash", || {
        h1.agent
            .status()
            .left_out
            .iter()
            .any(|l| l.starts_with("network \"app\" on this host") && l.contains("used twice"))
    })
    .await;
    eventually("the other network stays applied", || {
        h1.kernel.applied().is_some_and(|s| {
            s.networks
                .iter()
                .map(|n| n.network.name.as_str())
                .eq(["other"])
        })
    })
    .await;
    assert_eq!(
        h1.kernel.endpoints(),
        [(o.address, "other".to_owned())].into()
    );
    assert_eq!(h1.resolve("other", "o"), [o.address]);
}

#[tokio::test]
async fn an_endpoint_record_with_too_many_aliases_is_left_out_alone() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let aliases: Vec<String> = (0..1000).map(|i| format!("\"n{i}\"")).collect();
    let record = format!(
        r#"{{"network":"app","address":"100.64.9.9","node":"h1","id":"ns:1","netns":"/proc/1/ns/net","service":"api","aliases":[{}]}}"#,
        aliases.join(",")
    );
    bed.store
        .write(Txn::default().put("endpoints/app/100.64.9.9", record.into_bytes()))
        .await;
    eventually("status names the record", || {
        h1.agent.status().left_out.iter().any(|l| {
            l.starts_with("store record endpoints/app/100.64.9.9") && l.contains("aliases")
        })
    })
    .await;
    assert_eq!(h1.resolve("app", "api"), [a]);
    assert!(h1.resolve("app", "n1").is_empty());
    assert_eq!(h1.kernel.endpoints().len(), 1);
}

#[tokio::test]
async fn a_network_removed_and_created_again_hands_out_addresses_of_its_new_subnet() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    h1.agent.remove_network("app", true).await.unwrap();
    h1.create_network("app", "100.70.0.0/16").await;
    let b = h1.attach("b", "app", None).await;
    assert_eq!(b.address, ip("100.70.0.2"));
    let blocks = h1.agent.inspect_network("app").unwrap().blocks;
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].block.to_string(), "100.70.0.0/24");
    eventually("only the new endpoint in the kernel", || {
        h1.kernel.endpoints() == [(b.address, "app".to_owned())].into()
    })
    .await;
}
