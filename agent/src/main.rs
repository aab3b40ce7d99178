//! `netagent`: the per-host agent (`netagent agent`), the CLI that talks to it, and a
//! static mode that applies a desired-state file without a store (`netagent apply`).

mod api;
mod cli;
mod client;
mod commands;
mod config;
mod daemon;
mod docker;
mod http;
mod ipam;
mod keeper;
mod model;
mod names;
mod plugin;
mod record_check;
mod static_state;
mod store;
mod systemd;
mod table;

use anyhow::Result;
use clap::Parser;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The chain of causes on one line, never a backtrace (RUST_BACKTRACE may be
        // set for the whole host): the message names the thing and the fix.
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NETAGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some((socket, grace)) = cli.keeper() {
        return keeper::run_keeper(socket, grace);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(cli.run())
}
