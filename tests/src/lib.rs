//! The multi-host test bed: hosts as network namespaces on one machine, joined by a
//! bridge in their own "underlay" namespace, with an "outside" namespace that plays
//! the world beyond the hosts (their default router, holding 203.0.113.1).
//!
//! Every name carries the test process's PID, so tests run in parallel and leftovers
//! of a killed run are recognised and removed by the next one. Dropping a [`Testbed`]
//! (pass, failure or panic) kills the processes started in it and deletes its namespaces.

pub mod cluster;
pub mod docker;
pub mod mesh;
pub mod pki;
pub mod run;
pub mod testbed;
pub mod upstream;
pub mod vxlan;

pub use mesh::{block, Mesh};
pub use run::{netagent_bin, require_root, sh, sh_ok};
pub use testbed::{in_netns, tcp_transfer, TestHost, Testbed, OUTSIDE_ADDRESS};

/// Applies `state` to the host namespace at `path` on a fresh runtime.
pub fn apply(
    path: &std::path::Path,
    state: &netagent_overlay::HostState,
) -> netagent_overlay::Result<netagent_overlay::ApplyReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let host =
            netagent_overlay::Host::open(&netagent_overlay::NetnsRef::Path(path.into())).await?;
        host.apply(state).await
    })
}

/// Writes a state as the TOML file `netagent apply --state` reads.
pub fn write_state(path: &std::path::Path, state: &netagent_overlay::HostState) {
    std::fs::write(path, toml::to_string(state).expect("state serialises"))
        .expect("write state file");
}
