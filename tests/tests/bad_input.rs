//! Bad attach requests get a clear error and leave nothing half-made in the kernel.

use std::net::Ipv4Addr;

use netagent_overlay::{Endpoint, Host, NetnsRef, NetworkSpec};
use netagent_tests::{apply, root_test, testbed::netns_path, Mesh, Testbed};

#[test]
fn bad_attaches_are_refused_and_leave_nothing() {
    root_test!();
    let mut bed = Testbed::new(1);
    let c1 = bed.container("a1");
    let c2 = bed.container("a2");
    let mesh = Mesh::new(&bed).network("a", 100, "100.64.0.0/16");
    let h1 = bed.hosts[0].clone();
    let state = mesh.state(1);
    apply(&h1.path(), &state).unwrap();
    let spec = state.networks[0].network.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let host = rt.block_on(Host::open(&NetnsRef::Path(h1.path()))).unwrap();
    let ep = |netns: NetnsRef, ip: [u8; 4], id: &str| Endpoint {
        id: id.into(),
        netns,
        address: Ipv4Addr::from(ip),
        mac: None,
        identity: None,
        default_route: true,
    };
    let attach = |spec: &NetworkSpec, e: Endpoint| rt.block_on(host.attach(spec, &e));
    let clean = bed.dump(&h1.netns);

    let err = attach(
        &spec,
        ep(NetnsRef::Pid(999_999_999), [100, 64, 1, 10], "ghost"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("process 999999999 not found"),
        "{err}"
    );
    assert_eq!(clean, bed.dump(&h1.netns));

    let other = NetworkSpec {
        name: "nope".into(),
        vni: 300,
        subnet: "100.66.0.0/16".parse().unwrap(),
        block: "100.66.1.0/24".parse().unwrap(),
        mtu: None,
        encrypted: false,
    };
    let err = attach(
        &other,
        ep(NetnsRef::Path(netns_path(&c1)), [100, 66, 1, 10], "c1"),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("network \"nope\" (VNI 300) is not set up"),
        "{err}"
    );
    assert_eq!(clean, bed.dump(&h1.netns));

    let err = attach(
        &spec,
        ep(NetnsRef::Path(netns_path(&c1)), [100, 65, 1, 10], "c1"),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("100.65.1.10 is not a free host address of this host's block 100.64.1.0/24"),
        "{err}"
    );
    assert_eq!(clean, bed.dump(&h1.netns));

    attach(
        &spec,
        ep(NetnsRef::Path(netns_path(&c1)), [100, 64, 1, 10], "c1"),
    )
    .unwrap();
    attach(
        &spec,
        ep(NetnsRef::Path(netns_path(&c1)), [100, 64, 1, 10], "c1"),
    )
    .expect("the same attach again is a no-op");
    let attached = bed.dump(&h1.netns);
    let err = attach(
        &spec,
        ep(NetnsRef::Path(netns_path(&c2)), [100, 64, 1, 10], "c2"),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("address 100.64.1.10 is already attached as endpoint \"c1\""),
        "{err}"
    );
    assert_eq!(attached, bed.dump(&h1.netns));
    assert!(
        !bed.exec_ok(&c2, "ip -o link").contains("eth0"),
        "c2 got an interface"
    );

    // A whole state with a clash is refused before anything is touched.
    let mut dup = mesh.clone();
    dup.endpoint(1, "a", &c1, 20);
    dup.endpoint(1, "a", &c2, 20);
    let err = apply(&h1.path(), &dup.state(1)).unwrap_err();
    assert!(
        err.to_string().contains("appears twice") || err.to_string().contains("given to both"),
        "{err}"
    );
    assert_eq!(attached, bed.dump(&h1.netns));
}

#[test]
fn a_namespace_that_vanishes_is_reported_and_the_rest_applies() {
    root_test!();
    let mut bed = Testbed::new(1);
    let c1 = bed.container("a1");
    let mut mesh = Mesh::new(&bed).network("a", 100, "100.64.0.0/16");
    mesh.endpoint(1, "a", &c1, 10);
    let gone = format!("{}gone", bed.id);
    mesh.endpoints.push(netagent_tests::mesh::MeshEndpoint {
        host: 1,
        network: "a".into(),
        netns: gone.clone(),
        address: "100.64.1.11".parse().unwrap(),
    });
    let err = apply(&bed.hosts[0].path(), &mesh.state(1)).unwrap_err();
    assert!(
        err.to_string().contains(&gone),
        "error should name the missing namespace: {err}"
    );
    assert!(
        bed.ping(&c1, "100.64.1.1".parse().unwrap()),
        "the good endpoint must still be attached"
    );
}
