//! `netagent`: the per-host agent. This first cut runs the overlay from a static
//! desired-state file (`netagent apply`); the etcd control plane, DNS and Docker
//! integration build on the same `overlay` crate.

mod cli;
mod static_state;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NETAGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(cli.run())
}
