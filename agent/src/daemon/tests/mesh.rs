//! The encrypted mesh: started by the first block of an encrypted network, published
//! in the store, peered with the other hosts' records, its key rotated, and started
//! again when it stops by itself.

use std::sync::atomic::Ordering;

use super::*;
use crate::daemon::fake::Call;
use crate::daemon::keys::encode_key;
use crate::model::MeshRecord;

async fn create_secret(host: &Host) -> NetworkInfo {
    host.agent
        .create_network(&new_encrypted_network("secret", "100.66.0.0/16"))
        .await
        .expect("encrypted network created")
}

fn mesh_starts(kernel: &FakeDatapath) -> usize {
    kernel
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::StartMesh { .. }))
        .count()
}

fn applied_networks(kernel: &FakeDatapath) -> Vec<String> {
    kernel
        .applied()
        .map(|s| s.networks.iter().map(|n| n.network.name.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_first_block_of_an_encrypted_network_starts_the_mesh_and_publishes_it() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    create_secret(&h1).await;
    assert!(h1.kernel.mesh().is_none(), "no block here yet: no mesh");
    h1.attach("a", "secret", None).await;
    let mesh = h1.kernel.mesh().expect("the mesh started");
    assert_eq!(mesh.address, ip("100.127.192.1"));
    let status = h1.agent.status();
    assert_eq!(status.mesh_address, Some(ip("100.127.192.1")));
    let record: MeshRecord = bed
        .store
        .get("mesh/100.127.192.1")
        .await
        .expect("the mesh record");
    assert_eq!(record.node, "h1");
    assert_eq!(record.public_key, status.public_key);
    assert_eq!(
        record.public_key,
        encode_key(&mesh.public_key.lock().unwrap())
    );
    assert_eq!(
        record.endpoint,
        std::net::SocketAddrV4::new(ip("192.0.2.11"), h1.agent.cfg.mesh_port)
    );
    assert_eq!(applied_networks(&h1.kernel), ["secret"]);
    assert_eq!(
        h1.kernel.applied().unwrap().mesh_address,
        Some(ip("100.127.192.1"))
    );
}

#[tokio::test]
async fn a_plain_network_starts_no_mesh() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    assert!(h1.kernel.mesh().is_none());
    assert_eq!(mesh_starts(&h1.kernel), 0);
    assert!(!bed
        .store
        .keys()
        .await
        .iter()
        .any(|k| k.starts_with("mesh/")));
}

#[tokio::test]
async fn an_encrypted_network_waits_while_the_mesh_cannot_start() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    create_secret(&h1).await;
    h1.kernel.fail_mesh.store(true, Ordering::Relaxed);
    let e = h1.try_attach("a", "secret", None).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "network \"secret\" is encrypted and this host's mesh is not up (see the agent's log)"
    );
    assert!(
        h1.kernel.networks().is_empty(),
        "never carried in plaintext"
    );
    assert!(h1.kernel.endpoints().is_empty());
    assert!(!applied_networks(&h1.kernel).contains(&"secret".to_owned()));
    assert!(!bed
        .store
        .keys()
        .await
        .iter()
        .any(|k| k.starts_with("endpoints/")));
    // Once the mesh can start, the same attach works.
    h1.kernel.fail_mesh.store(false, Ordering::Relaxed);
    let a = h1.attach("a", "secret", None).await;
    assert_eq!(a.address, ip("100.66.0.2"));
    assert_eq!(h1.kernel.networks(), ["secret".to_owned()].into());
}

#[tokio::test]
async fn another_hosts_mesh_record_becomes_a_peer_for_the_shared_network() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    let secret = create_secret(&h1).await;
    h1.attach("a", "secret", None).await;
    h2.attach("b", "secret", None).await;
    let h2_key = h2.agent.status().public_key;
    let mesh = h1.kernel.mesh().expect("h1's mesh");
    eventually("h2 is h1's mesh peer", || {
        mesh.peers.lock().unwrap().len() == 1
    })
    .await;
    let peer = mesh.peers.lock().unwrap()[0].clone();
    assert_eq!(peer.address, ip("100.127.192.2"));
    assert_eq!(encode_key(&peer.public_key), h2_key);
    assert_eq!(*peer.endpoint.ip(), ip("192.0.2.12"));
    assert_eq!(peer.vnis, [secret.vni].into());
    // The encrypted network reaches h2 at its mesh address, not its underlay.
    eventually("h2's block is a peer inside the mesh", || {
        h1.kernel.applied().is_some_and(|s| {
            s.networks
                .iter()
                .any(|n| n.peers.iter().any(|p| p.underlay == ip("100.127.192.2")))
        })
    })
    .await;
}

#[tokio::test]
async fn a_host_without_a_block_of_the_network_is_a_peer_for_no_network() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    create_secret(&h1).await;
    h1.agent
        .create_network(&new_encrypted_network("other", "100.67.0.0/16"))
        .await
        .unwrap();
    h1.attach("a", "secret", None).await;
    h2.attach("b", "other", None).await;
    let mesh = h1.kernel.mesh().expect("h1's mesh");
    eventually("h2 is h1's mesh peer", || {
        mesh.peers.lock().unwrap().len() == 1
    })
    .await;
    assert!(
        mesh.peers.lock().unwrap()[0].vnis.is_empty(),
        "no shared network"
    );
}

#[tokio::test]
async fn rotating_the_key_publishes_it_and_gives_it_to_the_mesh_and_peers() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let h2 = bed.host("h2", 12).await;
    create_secret(&h1).await;
    h1.attach("a", "secret", None).await;
    h2.attach("b", "secret", None).await;
    let old = h1.agent.status().public_key;
    let new = h1.agent.rotate_key().await.unwrap().public_key;
    assert_ne!(new, old);
    assert_eq!(h1.agent.status().public_key, new);
    let mesh = h1.kernel.mesh().unwrap();
    assert_eq!(encode_key(&mesh.public_key.lock().unwrap()), new);
    let record: MeshRecord = bed.store.get("mesh/100.127.192.1").await.unwrap();
    assert_eq!(record.public_key, new);
    let h2_mesh = h2.kernel.mesh().unwrap();
    eventually("h2's peer for h1 has the new key", || {
        h2_mesh
            .peers
            .lock()
            .unwrap()
            .iter()
            .any(|p| encode_key(&p.public_key) == new)
    })
    .await;
    assert_eq!(mesh_starts(&h1.kernel), 1, "the running mesh took the key");
}

#[tokio::test]
async fn a_rotated_key_outlives_a_restart() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    create_secret(&h1).await;
    h1.attach("a", "secret", None).await;
    let new = h1.agent.rotate_key().await.unwrap().public_key;
    let kernel = h1.crash().await;
    let h1 = bed.host_on("h1", 11, kernel).await;
    assert_eq!(h1.agent.status().public_key, new);
    let record: MeshRecord = bed.store.get("mesh/100.127.192.1").await.unwrap();
    assert_eq!(record.public_key, new);
}

#[tokio::test]
async fn a_mesh_that_stops_by_itself_is_started_again() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    create_secret(&h1).await;
    h1.attach("a", "secret", None).await;
    let first = h1.kernel.mesh().unwrap();
    *first.failure.lock().unwrap() = Some("device deleted".into());
    // Any store change wakes the reconciler.
    h1.create_network("poke", "100.68.0.0/16").await;
    eventually("a second mesh started", || mesh_starts(&h1.kernel) == 2).await;
    let second = h1.kernel.mesh().unwrap();
    assert!(!Arc::ptr_eq(&first, &second));
    assert_eq!(second.address, first.address, "the same mesh address");
    // The old device took the network's VXLAN device and endpoint with it: the
    // pass after the restart applies in full and puts them back.
    eventually("the encrypted network and its endpoint back", || {
        h1.kernel.networks().contains("secret") && h1.kernel.endpoints().len() == 1
    })
    .await;
    let calls = h1.kernel.calls();
    let restarted = calls
        .iter()
        .rposition(|c| matches!(c, Call::StartMesh { .. }))
        .unwrap();
    assert!(
        calls[restarted..].iter().any(
            |c| matches!(c, Call::Apply { networks } if networks.iter().any(|n| n == "secret"))
        ),
        "{calls:?}"
    );
}
