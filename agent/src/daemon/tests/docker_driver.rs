//! Docker's network and IPAM driver calls, in the order the engine makes them, on a
//! fake kernel: what each answers, what it refuses (with the fix in the message),
//! and what it leaves in the store, the kernel and the DNS.

use std::collections::HashMap;

use serde_json::json;

use super::*;
use crate::daemon::PluginDriver;
use crate::docker::{Container, ContainerNetwork};
use crate::plugin::protocol::*;
use crate::plugin::Driver;

const SUBNET: &str = "100.80.0.0/16";

fn driver(h: &Host) -> PluginDriver<TestStore, FakeDatapath> {
    let d = PluginDriver::new(h.agent.view.store().health());
    d.running(h.agent.clone());
    d
}

/// `docker network create -d netagent --ipam-driver netagent --subnet SUBNET NAME`,
/// as the engine calls it, then its event naming the network.
async fn docker_network_create(
    h: &Host,
    d: &PluginDriver<TestStore, FakeDatapath>,
    id: &str,
    name: &str,
) {
    let pool = d
        .request_pool(RequestPoolRequest {
            address_space: "netagent".into(),
            pool: SUBNET.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pool.pool, SUBNET);
    assert_eq!(pool.data["com.docker.network.gateway"], "0.0.0.0/0");
    d.create_network(create_request(id, "netagent", json!({})))
        .await
        .unwrap();
    h.agent.register_docker_network(id, name).await.unwrap();
}

fn create_request(id: &str, space: &str, generic: serde_json::Value) -> CreateNetworkRequest {
    serde_json::from_value(json!({
        "NetworkID": id,
        "Options": {"com.docker.network.generic": generic},
        "IPv4Data": [{"AddressSpace": space, "Pool": SUBNET, "Gateway": "0.0.0.0/0"}],
    }))
    .unwrap()
}

/// One container start: address, endpoint, join, and its namespace appearing.
async fn docker_run(
    h: &Host,
    d: &PluginDriver<TestStore, FakeDatapath>,
    network_id: &str,
    endpoint_id: &str,
    ip: &str,
) -> Result<JoinResponse, String> {
    let address = d
        .request_address(RequestAddressRequest {
            pool_id: format!("netagent/{SUBNET}"),
            address: ip.into(),
            ..Default::default()
        })
        .await?;
    d.create_endpoint(CreateEndpointRequest {
        network_id: network_id.into(),
        endpoint_id: endpoint_id.into(),
        interface: Some(EndpointInterface {
            address: address.address.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    let sandbox = format!("/run/netns/sb-{endpoint_id}");
    h.kernel.add_namespace(&sandbox);
    d.join(JoinRequest {
        network_id: network_id.into(),
        endpoint_id: endpoint_id.into(),
        sandbox_key: sandbox,
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn a_container_joins_through_the_driver_and_is_named_by_its_start() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let d = driver(&h1);
    docker_network_create(&h1, &d, "n1", "ch03").await;
    assert!(h1.agent.list_networks().iter().any(|n| n.name == "ch03"));
    let join = docker_run(&h1, &d, "n1", "e1", "").await.unwrap();
    // The engine moves our interface in, with a /32 and the subnet through this
    // host's gateway; no default gateway (Docker's gateway bridge gives that).
    assert_eq!(
        join.interface_name.as_ref().unwrap().src_name,
        "nad64500002"
    );
    assert_eq!(join.gateway, "");
    let routes: Vec<(String, i32, String)> = join
        .static_routes
        .iter()
        .map(|r| (r.destination.clone(), r.route_type, r.next_hop.clone()))
        .collect();
    assert_eq!(
        routes,
        [
            ("100.80.0.1/32".to_owned(), 1, String::new()),
            (SUBNET.to_owned(), 0, "100.80.0.1".to_owned()),
        ]
    );
    assert!(bed
        .store
        .keys()
        .await
        .contains(&"endpoints/ch03/100.80.0.2".to_owned()));
    // The DNS listener follows once the namespace is there.
    h1.listener("sb-e1").await;
    let c = Container {
        id: "0123456789abcdef".into(),
        name: "ch03_api_1".into(),
        pid: 1,
        labels: HashMap::from([("com.docker.compose.service".into(), "api".into())]),
        image_only_labels: Vec::new(),
        resolv_conf_path: None,
        in_service: true,
        dns_servers: Vec::new(),
        networks: vec![ContainerNetwork {
            network_id: "n1".into(),
            endpoint_id: "e1".into(),
            aliases: vec!["api".into(), "backend".into(), "0123456789ab".into()],
        }],
    };
    h1.agent.name_driver_endpoints(&c).await;
    for name in ["api", "backend", "ch03_api_1", "0123456789ab"] {
        assert_eq!(h1.resolve("ch03", name), [ip("100.80.0.2")], "{name}");
    }
    // Leave: gone from the store, the kernel and the DNS.
    d.leave(LeaveRequest {
        network_id: "n1".into(),
        endpoint_id: "e1".into(),
    })
    .await
    .unwrap();
    assert!(h1.kernel.endpoints().is_empty());
    assert!(h1.resolve("ch03", "api").is_empty());
    assert!(!bed
        .store
        .keys()
        .await
        .iter()
        .any(|k| k.starts_with("endpoints/")));
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_fix_and_change_nothing() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let d = driver(&h1);
    // Docker's own IPAM knows nothing of the hosts' blocks.
    let e = d
        .create_network(create_request("x", "LocalDefault", json!({})))
        .await
        .unwrap_err();
    assert!(e.contains("--ipam-driver netagent"), "{e}");
    let e = d
        .create_network(create_request(
            "x",
            "netagent",
            json!({"nosuchoption": "1"}),
        ))
        .await
        .unwrap_err();
    assert!(e.contains("unknown driver option \"nosuchoption\""), "{e}");
    docker_network_create(&h1, &d, "n1", "ch03").await;
    let e = d
        .request_pool(RequestPoolRequest {
            pool: "100.80.128.0/17".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.contains("overlaps netagent network \"ch03\""), "{e}");
    // --ip outside this host's block (h1 holds 100.80.0.0/24).
    let e = docker_run(&h1, &d, "n1", "e1", "100.80.7.9")
        .await
        .unwrap_err();
    assert!(e.contains("not in this host's block 100.80.0.0/24"), "{e}");
    assert!(h1.kernel.endpoints().is_empty());
    // --ip inside it is kept; the same address again is refused.
    docker_run(&h1, &d, "n1", "e2", "100.80.0.9").await.unwrap();
    assert!(bed
        .store
        .keys()
        .await
        .contains(&"endpoints/ch03/100.80.0.9".to_owned()));
    let e = docker_run(&h1, &d, "n1", "e3", "100.80.0.9")
        .await
        .unwrap_err();
    assert!(e.contains("in use"), "{e}");
    // A join for an endpoint the driver never made.
    let e = d
        .join(JoinRequest {
            network_id: "n1".into(),
            endpoint_id: "nope".into(),
            sandbox_key: "/run/docker/netns/nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.contains("not created through netagent"), "{e}");
}

#[tokio::test]
async fn an_address_handed_out_is_not_handed_out_again_before_its_join() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let d = driver(&h1);
    docker_network_create(&h1, &d, "n1", "ch03").await;
    let ask = || {
        d.request_address(RequestAddressRequest {
            pool_id: format!("netagent/{SUBNET}"),
            ..Default::default()
        })
    };
    let a = ask().await.unwrap().address;
    let b = ask().await.unwrap().address;
    assert_eq!((a.as_str(), b.as_str()), ("100.80.0.2/32", "100.80.0.3/32"));
    d.release_address(ReleaseAddressRequest {
        pool_id: format!("netagent/{SUBNET}"),
        address: a.clone(),
    })
    .await
    .unwrap();
    assert_eq!(ask().await.unwrap().address, a);
}

#[tokio::test]
async fn calls_before_the_agent_runs_are_answered_at_once() {
    let bed = Bed::new().await;
    let h1 = bed.host("h1", 11).await;
    let d: PluginDriver<TestStore, FakeDatapath> =
        PluginDriver::new(h1.agent.view.store().health());
    let e = d
        .request_pool(RequestPoolRequest {
            pool: SUBNET.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.contains("netagent is starting"), "{e}");
}
