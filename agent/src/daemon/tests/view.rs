//! The cluster view against the store's own watch events delivered late, as a busy
//! runtime delivers them: this host's writes must survive events older than them.

use super::*;
use crate::daemon::cluster_view::ClusterView;
use crate::model::{BlockRecord, NetworkRecord, BLOCKS, ENDPOINTS, NETWORKS_GUARD};

fn network(subnet: &str) -> NetworkRecord {
    NetworkRecord {
        name: "app".into(),
        subnet: subnet.parse().unwrap(),
        vni: 4200,
        encrypted: false,
        mtu: None,
        block_prefix: 24,
    }
}

fn block(block: &str) -> BlockRecord {
    BlockRecord {
        network: "app".into(),
        block: block.parse().unwrap(),
        node: "h1".into(),
        underlay: "192.0.2.11".parse().unwrap(),
    }
}

fn create(n: &NetworkRecord) -> Txn {
    Txn::default()
        .put(model::network_key(&n.name), model::encode(n))
        .put(NETWORKS_GUARD, b"1".to_vec())
}

fn remove(name: &str) -> Txn {
    Txn::default()
        .delete(model::network_key(name))
        .delete_prefix(format!("{BLOCKS}{name}/"))
        .delete_prefix(format!("{ENDPOINTS}{name}/"))
}

/// An endpoint record of `node` at `address` on "app".
fn endpoint(node: &str, address: &str) -> (String, Vec<u8>) {
    let record = serde_json::json!({
        "network": "app", "address": address, "node": node,
        "id": format!("netns:{address}"), "netns": format!("/run/netns/{address}"),
    });
    (
        model::endpoint_key("app", address.parse().unwrap()),
        serde_json::to_vec(&record).unwrap(),
    )
}

fn held(view: &ClusterView<TestStore>) -> (Option<String>, Vec<String>) {
    view.read(|c| {
        (
            c.networks.get("app").map(|n| n.subnet.to_string()),
            c.blocks.values().map(|b| b.block.to_string()).collect(),
        )
    })
}

#[tokio::test]
async fn a_network_made_again_survives_the_late_events_of_its_removal() {
    let bed = Bed::new().await;
    let view = ClusterView::new(bed.store.clone(), "h1");
    let mut watch = bed.store.watch();
    let first = watch.recv().await.expect("a first picture");
    view.apply_event(first);

    let old = network("100.64.0.0/16");
    assert!(view.commit(create(&old)).await.unwrap());
    let old_block = block("100.64.0.0/24");
    let key = model::block_key("app", old_block.block);
    assert!(view
        .commit(Txn::default().put(key, model::encode(&old_block)))
        .await
        .unwrap());
    let (mine, _) = endpoint("h1", "100.64.0.2");
    for (key, value) in [endpoint("h1", "100.64.0.2"), endpoint("h2", "100.64.1.2")] {
        bed.store.write(Txn::default().put(key, value)).await;
    }
    for _ in 0..4 {
        view.apply_event(watch.recv().await.unwrap());
    }
    assert_eq!(view.read(|c| c.endpoints.len()), 2);
    assert_eq!(
        held(&view),
        (Some("100.64.0.0/16".into()), vec!["100.64.0.0/24".into()])
    );

    // Removed and made again before the watch delivers either.
    assert!(view.commit(remove("app")).await.unwrap());
    assert_eq!(held(&view), (None, vec![]), "the prefix delete is mirrored");
    assert_eq!(view.read(|c| c.endpoints.len()), 0);
    // This host's endpoint went with it: the reconcile pass is to detach it.
    assert_eq!(view.take_suspects(), [mine]);
    assert!(view
        .commit(create(&network("100.70.0.0/16")))
        .await
        .unwrap());
    let new = (Some("100.70.0.0/16".to_string()), vec![]);
    assert_eq!(held(&view), new);

    let removal = watch.recv().await.unwrap();
    assert!(matches!(&removal, StoreEvent::Changes { changes, .. } if changes.len() == 4));
    view.apply_event(removal);
    assert_eq!(
        held(&view),
        new,
        "the removal's event is older than the create"
    );
    // A fresh picture read before the create is older too.
    view.apply_event(StoreEvent::Reset(Loaded {
        revision: 5,
        pairs: vec![(NETWORKS_GUARD.into(), b"1".to_vec())],
    }));
    assert_eq!(held(&view), new);

    view.apply_event(watch.recv().await.unwrap());
    assert_eq!(held(&view), new);
    // Once the watch has delivered the create, a later change by another host wins.
    bed.store.write(remove("app")).await;
    view.apply_event(watch.recv().await.unwrap());
    assert_eq!(held(&view), (None, vec![]));
}

#[tokio::test]
async fn a_store_restored_to_an_older_revision_is_believed() {
    let bed = Bed::new().await;
    let view = ClusterView::new(bed.store.clone(), "h1");
    let mut watch = bed.store.watch();
    view.apply_event(watch.recv().await.unwrap());
    let (key, value) = endpoint("h1", "100.64.0.2");
    for _ in 0..3 {
        bed.store
            .write(Txn::default().put(NETWORKS_GUARD, b"1".to_vec()))
            .await;
        view.apply_event(watch.recv().await.unwrap());
    }
    assert!(view.commit(Txn::default().put(key, value)).await.unwrap());
    assert_eq!(view.read(|c| c.endpoints.len()), 1);
    // The store comes back from a backup taken before that write, at revision 2:
    // the write is lost, and the view must say so rather than keep it.
    view.apply_event(StoreEvent::Reset(Loaded {
        revision: 2,
        pairs: vec![(NETWORKS_GUARD.into(), b"1".to_vec())],
    }));
    assert_eq!(view.read(|c| (c.revision, c.endpoints.len())), (2, 0));
}
