//! Dead hosts: `node ls`, `node rm`, and the reclaim of what a node gone too long
//! holds, agreed between agents through `gone/<node>`.

use super::*;
use crate::api::NodeState;
use crate::daemon::fake::FakeDatapath;
use crate::daemon::nodes::unix_now;
use crate::model::{GoneRecord, MeshRecord};

/// h1 and h2 on "app", h3 holding a block and endpoint "c" of it, then dead: its
/// agent stopped and its lease expired.
async fn with_dead_h3(bed: &Bed, edit: impl Fn(&mut Config) + Copy) -> (Host, Host) {
    let h1 = bed.host_with("h1", 11, FakeDatapath::default(), edit).await;
    let h2 = bed.host_with("h2", 12, FakeDatapath::default(), edit).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    h2.attach("b", "app", None).await;
    let h3 = bed.host_with("h3", 13, FakeDatapath::default(), edit).await;
    h3.attach("c", "app", Some("api")).await;
    let mesh = MeshRecord {
        node: "h3".into(),
        address: ip("100.127.192.3"),
        public_key: "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=".into(),
        endpoint: "192.0.2.13:51820".parse().unwrap(),
    };
    bed.store.put(&model::mesh_key(mesh.address), &mesh).await;
    h3.crash().await;
    bed.expire("h3").await;
    (h1, h2)
}

/// Two passes of the gone-node check.
const CHECK_EVERY_TWICE: Duration = Duration::from_millis(2100);

const H3_BLOCK: &str = "blocks/app/100.64.2.0_24";
const H3_ENDPOINT: &str = "endpoints/app/100.64.2.2";
const H3_MESH: &str = "mesh/100.127.192.3";

/// The peers host `h`'s kernel has for "app".
fn app_peers(h: &Host) -> Vec<String> {
    h.kernel
        .applied()
        .and_then(|s| s.networks.into_iter().find(|n| n.network.name == "app"))
        .map(|n| n.peers.iter().map(|p| p.name.clone()).collect())
        .unwrap_or_default()
}

async fn has_key(bed: &Bed, key: &str) -> bool {
    bed.store.keys().await.iter().any(|k| k == key)
}

async fn wait_for_key(bed: &Bed, key: &str, present: bool) {
    for _ in 0..1500 {
        if has_key(bed, key).await == present {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} still {}", if present { "absent" } else { "present" });
}

fn reclaim_off(c: &mut Config) {
    c.reclaim_after = None;
}

#[tokio::test]
async fn node_ls_shows_a_dead_node_gone_with_what_it_holds() {
    let bed = Bed::new().await;
    let (h1, _h2) = with_dead_h3(&bed, |_| {}).await;
    wait_for_key(&bed, "gone/h3", true).await;
    let nodes = h1.agent.list_nodes();
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["h1", "h2", "h3"]);
    let h3 = &nodes[2];
    assert_eq!(h3.state, NodeState::Gone);
    let since = h3.gone_since.expect("noted gone");
    assert!(since.abs_diff(unix_now()) < 10, "{since}");
    assert_eq!(h3.blocks.len(), 1);
    assert_eq!(h3.blocks[0].block.to_string(), "100.64.2.0/24");
    assert_eq!(h3.endpoints.len(), 1);
    assert_eq!(h3.endpoints[0].address, ip("100.64.2.2"));
    assert_eq!(h3.mesh_address, Some(ip("100.127.192.3")));
    assert_eq!(h3.underlay, Some(ip("192.0.2.13")));
    // The default delay: a day.
    assert!(h3.reclaim_in_secs.is_some_and(|s| s > 86_000), "{h3:?}");
    assert_eq!(nodes[0].state, NodeState::Up);
    assert!(nodes[0].started.is_some() && nodes[0].gone_since.is_none());
}

#[tokio::test]
async fn rm_is_refused_for_a_live_node_this_host_and_an_unknown_one() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h2.attach("b", "app", None).await;
    let e = format!("{:#}", h1.agent.remove_node("h2").await.unwrap_err());
    assert!(
        e.contains("is up") && e.contains("stop the agent on h2") && e.contains("5 s"),
        "{e}"
    );
    assert!(has_key(&bed, "blocks/app/100.64.0.0_24").await);
    let e = format!("{:#}", h1.agent.remove_node("h1").await.unwrap_err());
    assert!(e.contains("is this host"), "{e}");
    let e = format!("{:#}", h1.agent.remove_node("h9").await.unwrap_err());
    assert!(
        e.contains("not known") && e.contains("netagent node ls"),
        "{e}"
    );
}

#[tokio::test]
async fn rm_of_a_gone_node_removes_its_records_and_every_agent_drops_them() {
    let bed = Bed::new().await;
    let (h1, h2) = with_dead_h3(&bed, |_| {}).await;
    // A dead node's routes stay until its blocks go.
    eventually("h3 a peer on h2", || app_peers(&h2).contains(&"h3".into())).await;
    let removed = h1.agent.remove_node("h3").await.expect("removed");
    assert_eq!(removed.blocks.len(), 1);
    assert_eq!(removed.endpoints.len(), 1);
    for key in [H3_BLOCK, H3_ENDPOINT, H3_MESH, "gone/h3", "nodes/h3"] {
        assert!(!has_key(&bed, key).await, "{key} left in the store");
    }
    eventually("h2's kernel drops h3's block", || {
        app_peers(&h2) == ["h1".to_owned()]
    })
    .await;
    eventually("h2 forgets h3", || {
        h2.agent.list_nodes().iter().all(|n| n.name != "h3")
            && h2.agent.endpoints().iter().all(|e| e.node != "h3")
            && h2.peer("h3").is_none()
    })
    .await;
    assert!(h1.agent.list_nodes().iter().all(|n| n.name != "h3"));
    assert!(h2.resolve("app", "c").is_empty());
    // Its block is free for the next host.
    let h4 = bed.host("h4", 14).await;
    assert_eq!(h4.attach("d", "app", None).await.address, ip("100.64.2.2"));
}

#[tokio::test]
async fn rm_refuses_a_node_whose_lease_came_back() {
    let bed = Bed::new().await;
    let (h1, _h2) = with_dead_h3(&bed, reclaim_off).await;
    let node = model::NodeRecord {
        name: "h3".into(),
        underlay: ip("192.0.2.13"),
        version: "x".into(),
        started: 0,
    };
    bed.store.put("nodes/h3", &node).await;
    assert!(h1.agent.remove_node("h3").await.is_err());
    assert!(has_key(&bed, H3_BLOCK).await && has_key(&bed, H3_ENDPOINT).await);
}

#[tokio::test]
async fn two_agents_racing_reclaim_remove_once() {
    let bed = Bed::new().await;
    let (h1, h2) = with_dead_h3(&bed, reclaim_off).await;
    let old = GoneRecord {
        node: "h3".into(),
        since: 1_000,
    };
    bed.store.put("gone/h3", &old).await;
    // Both decide on the same read, as two agents ticking together would.
    let fresh = h1.agent.read_fresh().await.unwrap();
    let after = Duration::from_secs(10);
    let now = unix_now();
    let (r1, r2) = tokio::join!(
        h1.agent.reclaim(&fresh, "h3", after, now),
        h2.agent.reclaim(&fresh, "h3", after, now)
    );
    let done: Vec<_> = [r1.unwrap(), r2.unwrap()].into_iter().flatten().collect();
    assert_eq!(done.len(), 1, "reclaimed {} times", done.len());
    assert_eq!(done[0].blocks.len(), 1);
    let deleting_the_block = bed
        .store
        .committed()
        .iter()
        .filter(|t| t.delete.iter().any(|k| k == H3_BLOCK))
        .count();
    assert_eq!(deleting_the_block, 1);
    for key in [H3_BLOCK, H3_ENDPOINT, H3_MESH, "gone/h3"] {
        assert!(!has_key(&bed, key).await, "{key} left in the store");
    }
}

#[tokio::test]
async fn a_node_gone_longer_than_the_delay_is_reclaimed_by_the_agents() {
    let bed = Bed::new().await;
    let ten_s = |c: &mut Config| c.reclaim_after = Some(Duration::from_secs(10));
    let (h1, h2) = with_dead_h3(&bed, ten_s).await;
    wait_for_key(&bed, "gone/h3", true).await;
    // Noted just now: kept.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(has_key(&bed, H3_BLOCK).await);
    let since = unix_now() - 11;
    let old = GoneRecord {
        node: "h3".into(),
        since,
    };
    bed.store.put("gone/h3", &old).await;
    wait_for_key(&bed, H3_BLOCK, false).await;
    for key in [H3_ENDPOINT, H3_MESH, "gone/h3"] {
        assert!(!has_key(&bed, key).await, "{key} left in the store");
    }
    eventually("both kernels drop h3's block", || {
        !app_peers(&h1).contains(&"h3".into()) && !app_peers(&h2).contains(&"h3".into())
    })
    .await;
    // Noted once, reclaimed once: by whichever agent came first.
    let committed = bed.store.committed();
    let count = |f: &dyn Fn(&Txn) -> bool| committed.iter().filter(|t| f(t)).count();
    assert_eq!(count(&|t| t.put.iter().any(|(k, _)| k == "gone/h3")), 1);
    assert_eq!(count(&|t| t.delete.iter().any(|k| k == H3_BLOCK)), 1);
}

#[tokio::test]
async fn reclaim_is_off_when_the_config_says_never() {
    let bed = Bed::new().await;
    let (h1, _h2) = with_dead_h3(&bed, reclaim_off).await;
    let old = GoneRecord {
        node: "h3".into(),
        since: 1_000,
    };
    bed.store.put("gone/h3", &old).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for key in [H3_BLOCK, H3_ENDPOINT, H3_MESH, "gone/h3"] {
        assert!(has_key(&bed, key).await, "{key} reclaimed");
    }
    let h3 = h1.agent.list_nodes().pop().unwrap();
    assert_eq!((h3.gone_since, h3.reclaim_in_secs), (Some(1_000), None));
}

#[tokio::test]
async fn the_gone_record_is_cleared_when_the_node_returns() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let b = h2.attach("b", "app", None).await.address;
    // Stopped, so that only h1 can clear the record (a running agent clears its own).
    let (name, underlay) = (h2.name.clone(), h2.underlay);
    h2.crash().await;
    bed.expire("h2").await;
    wait_for_key(&bed, "gone/h2", true).await;
    tokio::time::sleep(CHECK_EVERY_TWICE).await;
    assert!(has_key(&bed, "gone/h2").await, "kept while h2 is gone");
    bed.revive(&name, underlay).await;
    wait_for_key(&bed, "gone/h2", false).await;
    assert_eq!(h1.agent.list_nodes()[1].state, NodeState::Up);
    // Nothing of it was taken.
    assert_eq!(h1.resolve("app", "b"), [b]);
}

#[tokio::test]
async fn an_unreadable_gone_record_is_noted_again_not_trusted() {
    let bed = Bed::new().await;
    let (h1, _h2) = with_dead_h3(&bed, |_| {}).await;
    wait_for_key(&bed, "gone/h3", true).await;
    // Gone since far in the future: it would put the reclaim off for ever.
    let hostile = GoneRecord {
        node: "h3".into(),
        since: u64::MAX,
    };
    bed.store.put("gone/h3", &hostile).await;
    for _ in 0..500 {
        let g: Option<GoneRecord> = bed.store.get("gone/h3").await;
        if g.as_ref().is_some_and(|g| g.since <= unix_now()) {
            assert!(has_key(&bed, H3_BLOCK).await, "not reclaimed for it");
            let h3 = h1.agent.list_nodes().pop().unwrap();
            assert!(h3.gone_since.is_some_and(|s| s <= unix_now()));
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the unreadable gone record stayed");
}

#[tokio::test]
async fn a_node_back_after_its_reclaim_starts_clean() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    let h2 = bed.host("h2", 12).await;
    assert_eq!(
        h2.attach("old", "app", None).await.address,
        ip("100.64.1.2")
    );
    let kernel = h2.crash().await;
    bed.expire("h2").await;
    // Another host takes h2's old block meanwhile.
    h1.agent.remove_node("h2").await.expect("removed");
    let h3 = bed.host("h3", 13).await;
    assert_eq!(h3.attach("c", "app", None).await.address, ip("100.64.1.2"));
    let h2 = bed.host_on("h2", 12, kernel).await;
    eventually("the old endpoint leaves h2's kernel", || {
        h2.kernel.endpoints().is_empty()
    })
    .await;
    let new = h2.attach("new", "app", None).await.address;
    assert_eq!(new, ip("100.64.2.2"), "a new block");
    eventually("h1 answers h2's new name", || {
        h1.resolve("app", "new") == [new]
    })
    .await;
    assert!(h1.resolve("app", "old").is_empty());
    let h2_info = h1.agent.list_nodes().into_iter().find(|n| n.name == "h2");
    assert_eq!(h2_info.map(|n| n.blocks.len()), Some(1));
}
