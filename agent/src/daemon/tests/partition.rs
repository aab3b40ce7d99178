//! The store out of reach: names and the datapath go on with the last known state,
//! changes that need the store are refused without leaving anything half-done, and
//! what happened meanwhile is caught up when the store is back.

use super::*;
use crate::api::AgentState;
use crate::daemon::fake::Call;
use crate::model::NetworkRecord;

/// h1 and h2 on "app" with a replica of "api" each.
async fn two_replicas(bed: &Bed) -> (Host, Host, Ipv4Addr, Ipv4Addr) {
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let b = h2.attach("b", "app", Some("api")).await.address;
    eventually("both replicas on both hosts", || {
        h1.resolve("app", "api").len() == 2 && h2.resolve("app", "api").len() == 2
    })
    .await;
    (h1, h2, a, b)
}

#[tokio::test]
async fn names_keep_answering_the_last_known_state_while_the_store_is_away() {
    let bed = Bed::new().await;
    let (h1, h2, a, b) = two_replicas(&bed).await;
    bed.store.set_reachable(false);
    // Longer than a liveness sweep and a reconcile.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sorted(h1.resolve("app", "api")), [a, b]);
    assert_eq!(sorted(h2.resolve("app", "api")), [a, b]);
    let listener = h1.listener("a").await;
    assert_eq!(sorted(query_a(listener, "api").await), [a, b]);
    assert_eq!(h1.kernel.endpoints(), [(a, "app".to_owned())].into());
}

#[tokio::test]
async fn status_is_degraded_with_the_stores_error_while_it_is_away() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    assert_eq!(h1.agent.status().state, AgentState::Ok);
    bed.store.set_reachable(false);
    let status = h1.agent.status();
    assert_eq!(status.state, AgentState::Degraded);
    assert!(!status.store.connected);
    assert_eq!(
        status.store.error.as_deref(),
        Some("partitioned by the test")
    );
    bed.store.set_reachable(true);
    assert_eq!(h1.agent.status().state, AgentState::Ok);
}

#[tokio::test]
async fn a_first_attach_while_the_store_is_away_says_nothing_was_attached() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    eventually("h2 knows the network", || {
        h2.agent.inspect_network("app").is_ok()
    })
    .await;
    bed.store.set_reachable(false);
    let e = h2.try_attach("b", "app", None).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("unreachable") && text.contains("nothing was attached"),
        "{text}"
    );
    // No block was taken: no device, no endpoint.
    assert!(h2.kernel.networks().is_empty());
    assert!(h2.kernel.endpoints().is_empty());
    assert!(!h2
        .kernel
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Attach { .. })));
    bed.store.set_reachable(true);
    // The first block: the refused attach took nothing.
    assert_eq!(h2.attach("b", "app", None).await.address, ip("100.64.0.2"));
}

#[tokio::test]
async fn a_namespace_gone_during_a_partition_leaves_the_kernel_at_once_and_the_store_later() {
    let bed = Bed::new().await;
    let (h1, h2, a, b) = two_replicas(&bed).await;
    bed.store.set_reachable(false);
    h1.kernel.remove_namespace("/run/netns/a");
    eventually("the kernel lets go of the gone namespace", || {
        h1.kernel.endpoints().is_empty()
    })
    .await;
    h1.listener_closed("a").await;
    let key = format!("endpoints/app/{a}");
    assert!(bed.store.keys().await.contains(&key), "the store is away");
    bed.store.set_reachable(true);
    for _ in 0..500 {
        if !bed.store.keys().await.contains(&key) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !bed.store.keys().await.contains(&key),
        "deleted once the store is back"
    );
    eventually("both hosts let go of it", || {
        h1.resolve("app", "api") == [b] && h2.resolve("app", "api") == [b]
    })
    .await;
}

#[tokio::test]
async fn a_namespace_gone_during_a_partition_leaves_this_hosts_answers_at_once() {
    let bed = Bed::new().await;
    let (h1, _h2, _a, b) = two_replicas(&bed).await;
    bed.store.set_reachable(false);
    h1.kernel.remove_namespace("/run/netns/a");
    eventually("the kernel lets go of the gone namespace", || {
        h1.kernel.endpoints().is_empty()
    })
    .await;
    eventually("this host's DNS lets go of it", || {
        h1.resolve("app", "api") == [b] && h1.resolve("app", "a").is_empty()
    })
    .await;
}

#[tokio::test]
async fn changes_made_during_a_partition_are_seen_after_it() {
    let bed = Bed::new().await;
    let (h1, _h2, a, b) = two_replicas(&bed).await;
    bed.store.set_reachable(false);
    // Another host (an operator) changes the store meanwhile.
    bed.store
        .write(Txn::default().delete(format!("endpoints/app/{b}")))
        .await;
    let late = NetworkRecord {
        name: "late".into(),
        subnet: "100.65.0.0/16".parse().unwrap(),
        vni: 4242,
        encrypted: false,
        mtu: None,
        block_prefix: 24,
    };
    bed.store.put("networks/late", &late).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sorted(h1.resolve("app", "api")),
        [a, b],
        "nothing arrives while partitioned"
    );
    bed.store.set_reachable(true);
    eventually("h1 sees the deletion", || h1.resolve("app", "api") == [a]).await;
    let names: Vec<String> = h1
        .agent
        .list_networks()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["app", "late"]);
}

#[tokio::test]
async fn attach_works_again_once_the_store_is_back() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", Some("api")).await;
    bed.store.set_reachable(false);
    assert!(h1.try_attach("b", "app", Some("api")).await.is_err());
    bed.store.set_reachable(true);
    let b = h1.attach("b", "app", Some("api")).await;
    assert_eq!(
        b.address,
        ip("100.64.0.3"),
        "the refused attach kept no address"
    );
    assert_eq!(h1.kernel.endpoints().len(), 2);
    assert_eq!(
        sorted(h1.resolve("app", "api")),
        [ip("100.64.0.2"), b.address]
    );
}

#[tokio::test]
async fn an_endpoint_deleted_by_another_host_during_a_partition_is_detached_after_it() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let a = h1.attach("a", "app", Some("api")).await.address;
    let b = h1.attach("b", "app", Some("api")).await.address;
    bed.store.set_reachable(false);
    bed.store
        .write(Txn::default().delete(format!("endpoints/app/{a}")))
        .await;
    // Long enough for the watch to miss the change: a fresh picture comes instead.
    tokio::time::sleep(Duration::from_millis(300)).await;
    bed.store.set_reachable(true);
    eventually("h1 no longer answers for a", || {
        h1.resolve("app", "api") == [b]
    })
    .await;
    // As when the deletion arrives as a change: the namespace is detached here too.
    eventually("a leaves h1's kernel", || {
        h1.kernel.endpoints() == [(b, "app".to_owned())].into()
    })
    .await;
    assert_eq!(h1.agent.status().local_endpoints, 1);
}

#[tokio::test]
async fn a_name_gone_during_a_partition_does_not_come_back_when_the_store_does() {
    let bed = Bed::new().await;
    let (h1, _h2, _a, b) = two_replicas(&bed).await;
    bed.store.set_reachable(false);
    h1.kernel.remove_namespace("/run/netns/a");
    eventually("this host's DNS lets go of it", || {
        h1.resolve("app", "api") == [b]
    })
    .await;
    bed.store.set_reachable(true);
    // Until the store has taken the deletion and a while after.
    for _ in 0..120 {
        assert!(
            h1.resolve("app", "a").is_empty(),
            "the gone name answered again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
