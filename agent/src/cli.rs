//! Command-line interface (clap derive).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::static_state;

#[derive(Parser, Debug)]
#[command(
    name = "netagent",
    version,
    about = "One private network fabric for a group of Docker hosts"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make this host's overlay match a desired-state file (TOML), then exit, or keep
    /// re-applying it with --hold. Safe to run again at any time: it adopts what exists.
    Apply {
        /// Desired state: underlay address, networks, peers, endpoints.
        #[arg(long, short)]
        state: PathBuf,
        /// Keep running and re-apply every --interval seconds (and when the file changes).
        #[arg(long)]
        hold: bool,
        /// Seconds between re-applies with --hold.
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Check a desired-state file without touching the kernel.
    Check {
        #[arg(long, short)]
        state: PathBuf,
    },
    /// Remove every kernel object and firewall rule netagent made in this namespace.
    Reset,
}

impl Cli {
    pub async fn run(self) -> Result<()> {
        match self.command {
            Command::Apply {
                state,
                hold,
                interval,
            } => static_state::apply(&state, hold, interval).await,
            Command::Check { state } => {
                let s = static_state::load(&state)?;
                println!(
                    "{}: valid ({} networks, {} endpoints)",
                    state.display(),
                    s.networks.len(),
                    s.networks.iter().map(|n| n.endpoints.len()).sum::<usize>()
                );
                Ok(())
            }
            Command::Reset => static_state::reset().await,
        }
    }
}
