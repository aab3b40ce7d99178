//! Attach and detach on one host: the kernel, the store, the DNS and the local list
//! change together, and a failure leaves nothing half-made.

use std::sync::atomic::Ordering;

use super::*;
use crate::api::EndpointState;
use crate::daemon::fake::Call;

#[tokio::test]
async fn attach_takes_a_block_and_the_first_address_and_programs_the_kernel() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let e = h1.attach("a", "app", Some("api")).await;
    assert_eq!(e.address, ip("100.64.0.2"));
    assert_eq!(e.node, "h1");
    assert_eq!(e.state, EndpointState::Up);
    assert_eq!(h1.kernel.networks(), ["app".to_owned()].into());
    assert_eq!(
        h1.kernel.endpoints(),
        [(ip("100.64.0.2"), "app".to_owned())].into()
    );
    let keys = bed.store.keys().await;
    assert!(
        keys.contains(&"blocks/app/100.64.0.0_24".to_owned()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"endpoints/app/100.64.0.2".to_owned()),
        "{keys:?}"
    );
    assert_eq!(h1.resolve("app", "api"), [ip("100.64.0.2")]);
}

#[tokio::test]
async fn the_network_device_is_set_up_before_the_first_endpoint() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    let calls = h1.kernel.calls();
    let apply = calls
        .iter()
        .position(|c| matches!(c, Call::Apply { networks } if networks == &["app".to_owned()]))
        .expect("the network applied");
    let attach = calls
        .iter()
        .position(|c| matches!(c, Call::Attach { .. }))
        .expect("an attach");
    assert!(apply < attach, "{calls:?}");
}

#[tokio::test]
async fn attaching_the_same_namespace_twice_answers_the_first_endpoint() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let first = h1.attach("a", "app", None).await;
    let again = h1.attach("a", "app", None).await;
    assert_eq!(first.address, again.address);
    assert_eq!(h1.kernel.endpoints().len(), 1);
}

#[tokio::test]
async fn each_namespace_gets_its_own_address_in_the_hosts_block() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let mut addresses = Vec::new();
    for ns in ["a", "b", "c"] {
        addresses.push(h1.attach(ns, "app", Some("api")).await.address);
    }
    assert_eq!(
        addresses,
        [ip("100.64.0.2"), ip("100.64.0.3"), ip("100.64.0.4")]
    );
    let mut answered = h1.resolve("app", "api");
    answered.sort();
    assert_eq!(answered, addresses);
}

#[tokio::test]
async fn an_unknown_network_is_an_error_naming_the_fix() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let e = h1.try_attach("a", "nope", None).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "network \"nope\" not found; create it with: netagent network create nope --subnet CIDR"
    );
    let calls = h1.kernel.calls();
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Attach { .. })),
        "{calls:?}"
    );
    assert!(!bed
        .store
        .keys()
        .await
        .iter()
        .any(|k| k.starts_with("blocks/")));
}

#[tokio::test]
async fn a_bad_service_name_is_refused_before_anything_changes() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    let e = h1
        .try_attach("a", "app", Some("no spaces"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("service"), "{e}");
    assert!(h1.kernel.endpoints().is_empty());
    assert!(!bed
        .store
        .keys()
        .await
        .iter()
        .any(|k| k.starts_with("endpoints/")));
}

#[tokio::test]
async fn the_hosts_own_namespace_is_refused() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    // The fake names the host's own namespace identity 1.
    h1.kernel.add_namespace_with("/proc/1/ns/net", 1);
    let e = h1
        .agent
        .attach(attach_request("/proc/1/ns/net", "app", None))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("host's own network namespace"),
        "{e}"
    );
}

#[tokio::test]
async fn a_kernel_refusal_leaves_no_record_in_the_store() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.kernel.fail_attach.store(true, Ordering::Relaxed);
    let e = h1.try_attach("a", "app", None).await.unwrap_err();
    assert!(format!("{e:#}").contains("attach refused"), "{e:#}");
    assert!(!bed
        .store
        .keys()
        .await
        .iter()
        .any(|k| k.starts_with("endpoints/")));
    assert!(h1.resolve("app", "a").is_empty());
    // The next attach works and takes the same address.
    h1.kernel.fail_attach.store(false, Ordering::Relaxed);
    assert_eq!(h1.attach("a", "app", None).await.address, ip("100.64.0.2"));
}

#[tokio::test]
async fn a_store_refusal_undoes_the_kernel_attach() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("first", "app", None).await;
    bed.store.set_reachable(false);
    let e = h1.try_attach("a", "app", None).await.unwrap_err();
    assert!(e.to_string().contains("nothing was attached"), "{e}");
    assert_eq!(
        h1.kernel.endpoints().len(),
        1,
        "only the first endpoint stays"
    );
    assert!(h1.kernel.calls().contains(&Call::Detach {
        address: ip("100.64.0.3")
    }));
}

#[tokio::test]
async fn detach_removes_the_endpoint_everywhere() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", Some("api")).await;
    let b = h1.attach("b", "app", Some("api")).await;
    let gone = h1.agent.detach("/run/netns/b", "app").await.unwrap();
    assert_eq!(gone.address, b.address);
    assert_eq!(h1.kernel.endpoints().len(), 1);
    assert_eq!(h1.resolve("app", "api"), [ip("100.64.0.2")]);
    assert!(!bed
        .store
        .keys()
        .await
        .contains(&"endpoints/app/100.64.0.3".to_owned()));
}

#[tokio::test]
async fn detach_while_the_store_is_away_changes_nothing() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", Some("api")).await;
    bed.store.set_reachable(false);
    let e = h1.agent.detach("/run/netns/a", "app").await.unwrap_err();
    assert!(e.to_string().contains("nothing was detached"), "{e}");
    assert_eq!(h1.kernel.endpoints().len(), 1);
    assert_eq!(h1.resolve("app", "api"), [ip("100.64.0.2")]);
}

#[tokio::test]
async fn detaching_what_is_not_attached_says_so() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.kernel.add_namespace("/run/netns/a");
    let e = h1.agent.detach("/run/netns/a", "app").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "/run/netns/a is not attached to network \"app\" on this host"
    );
}

#[tokio::test]
async fn a_namespace_that_goes_away_is_removed_within_a_sweep() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", Some("api")).await;
    h1.attach("b", "app", Some("api")).await;
    h1.kernel.remove_namespace("/run/netns/a");
    eventually("the gone namespace's endpoint is removed", || {
        h1.kernel.endpoints().len() == 1 && h1.resolve("app", "api") == [ip("100.64.0.3")]
    })
    .await;
    let keys = bed.store.keys().await;
    assert!(
        !keys.contains(&"endpoints/app/100.64.0.2".to_owned()),
        "{keys:?}"
    );
}

#[tokio::test]
async fn the_list_of_attached_namespaces_follows_the_endpoints() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    let list = super::super::attached_file::load(h1.agent.local.file())
        .await
        .unwrap()
        .expect("a list");
    let a = &list["endpoints/app/100.64.0.2"];
    assert_eq!(a.netns, "/run/netns/a");
    assert_eq!(Some(a.ino), h1.kernel.identity_of("/run/netns/a"));
    h1.agent.detach("/run/netns/a", "app").await.unwrap();
    let list = super::super::attached_file::load(h1.agent.local.file())
        .await
        .unwrap()
        .expect("a list");
    assert!(list.is_empty());
}

#[tokio::test]
async fn a_network_whose_setup_failed_is_set_up_again_by_the_next_attach() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.kernel.fail_apply.store(true, Ordering::Relaxed);
    let e = h1.try_attach("a", "app", None).await.unwrap_err();
    // The attach's own failure, with the setup failure it follows named first.
    let text = format!("{e:#}");
    assert!(
        text.contains("setting up the network failed first: ") && text.contains("apply refused"),
        "{text}"
    );
    assert!(h1.kernel.networks().is_empty());
    h1.kernel.fail_apply.store(false, Ordering::Relaxed);
    assert_eq!(h1.attach("a", "app", None).await.address, ip("100.64.0.2"));
    assert_eq!(h1.kernel.networks(), ["app".to_owned()].into());
}

#[tokio::test]
async fn an_endpoint_is_not_detached_by_a_stale_deletion_of_its_address() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    // A picture read before the attach arrives after it (as an etcd watch may
    // deliver it): the endpoint seems gone, but the store still has it.
    let store = bed.store.clone();
    let mut stale = store.snapshot().await;
    stale.pairs.retain(|(k, _)| !k.starts_with("endpoints/"));
    h1.agent
        .view
        .apply_event(crate::store::StoreEvent::Reset(stale));
    h1.agent.reconcile_once(false).await;
    assert_eq!(h1.kernel.endpoints().len(), 1, "still attached");
    assert_eq!(
        h1.resolve("app", "a"),
        [ip("100.64.0.2")],
        "and answered again"
    );
}

/// Status polling, attaches and store churn at once on several threads: no lock
/// waits on another in a circle.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_attaches_and_store_churn_together_never_deadlock() {
    let bed = Bed::new().await;
    let h1 = Arc::new(bed.host("h1", 11).await);
    h1.create_network("app", "100.64.0.0/16").await;
    let work = async {
        let poll = {
            let h1 = h1.clone();
            tokio::spawn(async move {
                for _ in 0..2000 {
                    let _ = h1.agent.status();
                    let _ = h1.agent.peers();
                    tokio::task::yield_now().await;
                }
            })
        };
        let churn = {
            let store = bed.store.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    store
                        .write(Txn::default().put(format!("nodes/other{i}"), b"{}".to_vec()))
                        .await;
                }
            })
        };
        for i in 0..20 {
            h1.attach(&format!("n{i}"), "app", Some("api")).await;
        }
        poll.await.unwrap();
        churn.await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .expect("finished within 30 s: no deadlock");
    assert_eq!(h1.kernel.endpoints().len(), 20);
}

#[tokio::test]
async fn another_networks_broken_object_does_not_stop_attaches_to_this_one() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    h1.create_network("app", "100.64.0.0/16").await;
    h1.attach("a", "app", None).await;
    // Every apply from now on fails (another network's object, say), changing
    // nothing: the device of "app" is still there.
    h1.kernel.fail_apply.store(true, Ordering::Relaxed);
    h1.agent.reconcile_once(true).await;
    assert_eq!(h1.attach("b", "app", None).await.address, ip("100.64.0.3"));
    assert_eq!(h1.kernel.endpoints().len(), 2);
}
