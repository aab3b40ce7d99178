//! Command-line interface (clap derive): the daemon, and the commands that talk to
//! it over the local API.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;

use crate::api::{AttachRequest, Request};
use crate::ipam::NewNetwork;
use crate::{client, commands, config, static_state};

#[derive(Parser, Debug)]
#[command(
    name = "netagent",
    version,
    about = "One private network fabric for a group of Docker hosts"
)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "NETAGENT_SOCKET", default_value = config::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (the systemd service runs this).
    Agent(ConfigArg),
    /// Create, list, inspect and remove networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Attach a Docker container (name or id) or a namespace (/run/netns/x, pid:N) to a network.
    Attach {
        target: String,
        network: String,
        /// Service name: answered with every replica, rotated.
        #[arg(long)]
        service: Option<String>,
        /// More names for this endpoint alone (repeatable).
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// The endpoint's own name (default: the namespace's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Detach a container or namespace from a network.
    Detach { target: String, network: String },
    /// Other hosts: state, underlay, round trip over the overlay.
    Peers,
    /// Services and their live replicas.
    Services {
        #[arg(long)]
        network: Option<String>,
    },
    /// Every endpoint in the cluster.
    Endpoints,
    /// This node, the store's health, counts.
    Status,
    /// Replace this host's WireGuard key; peers pick it up and handshake again.
    RotateKey,
    /// Remove every kernel object, rule and local state this host's agent made.
    /// Refused while the agent runs.
    Reset(ConfigArg),
    /// Static mode: make this host's overlay match a desired-state file (TOML).
    Apply {
        #[arg(long, short)]
        state: PathBuf,
        /// Keep running and re-apply every --interval seconds.
        #[arg(long)]
        hold: bool,
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Static mode: check a desired-state file without touching the kernel.
    Check {
        #[arg(long, short)]
        state: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum NetworkCommand {
    /// Create a network spanning every host.
    Create {
        name: String,
        #[arg(long)]
        subnet: Ipv4Net,
        /// VXLAN id (default: the lowest free from 1000).
        #[arg(long)]
        vni: Option<u32>,
        /// Prefix length of the block each host takes (default /24, smaller subnets a quarter).
        #[arg(long)]
        block_size: Option<u8>,
        #[arg(long)]
        mtu: Option<u32>,
        /// Encrypt traffic between hosts (WireGuard).
        #[arg(long)]
        encrypted: bool,
    },
    #[command(alias = "list")]
    Ls,
    Inspect {
        name: String,
    },
    #[command(alias = "remove")]
    Rm {
        name: String,
        /// Remove even while endpoints are attached (they are detached everywhere).
        #[arg(long)]
        force: bool,
    },
}

impl Cli {
    pub async fn run(self) -> Result<()> {
        let request = match self.command {
            Command::Agent(c) => return commands::run_agent(&c.config).await,
            Command::Reset(c) => return commands::reset(&c.config).await,
            Command::Apply {
                state,
                hold,
                interval,
            } => return static_state::apply(&state, hold, interval).await,
            Command::Check { state } => return static_state::check(&state),
            Command::Network(NetworkCommand::Create {
                name,
                subnet,
                vni,
                block_size,
                mtu,
                encrypted,
            }) => Request::NetworkCreate(NewNetwork {
                name,
                subnet,
                vni,
                block_prefix: block_size,
                mtu,
                encrypted,
            }),
            Command::Network(NetworkCommand::Ls) => Request::NetworkList,
            Command::Network(NetworkCommand::Inspect { name }) => Request::NetworkInspect { name },
            Command::Network(NetworkCommand::Rm { name, force }) => {
                Request::NetworkRemove { name, force }
            }
            Command::Attach {
                target,
                network,
                service,
                aliases,
                name,
            } => Request::Attach(AttachRequest {
                target,
                network,
                name,
                service,
                aliases,
            }),
            Command::Detach { target, network } => Request::Detach { target, network },
            Command::Peers => Request::Peers,
            Command::Services { network } => Request::Services { network },
            Command::Endpoints => Request::Endpoints,
            Command::Status => Request::Status,
            Command::RotateKey => Request::RotateKey,
        };
        let reply = client::call(&self.socket, &request).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&reply)?);
        } else {
            print!("{}", commands::render(&request, reply)?);
        }
        Ok(())
    }
}
