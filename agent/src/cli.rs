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
    /// Seconds to wait for the agent's reply before giving up.
    #[arg(long, global = true, default_value_t = 10.0, value_parser = positive_seconds)]
    timeout: f64,
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
        /// A container's name or id, a namespace path (/run/netns/NAME), or pid:N.
        target: String,
        /// The network to join (see: netagent network ls).
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
        /// Answer the service's name with one replica at a time, rotating (for
        /// clients that sort multi-address answers, such as glibc's getaddrinfo).
        #[arg(long)]
        one_per_answer: bool,
        /// A named port, answered as DNS SRV `_NAME._tcp.SERVICE` (repeatable).
        #[arg(long = "port", value_name = "NAME:PORT[/udp]")]
        ports: Vec<crate::model::Port>,
        /// This namespace's own DNS server for names outside the networks, instead of
        /// the host's (repeatable; for a container without any: its `--dns`).
        #[arg(long = "dns", value_name = "IP[:PORT]", value_parser = parse_dns_server)]
        dns: Vec<std::net::SocketAddr>,
    },
    /// Detach a container or namespace from a network.
    Detach {
        /// A container's name or id, a namespace path (/run/netns/NAME), or pid:N.
        target: String,
        /// The network to leave.
        network: String,
    },
    /// Other hosts: state, underlay, round trip over the overlay.
    Peers,
    /// Services and their live replicas.
    Services {
        /// Only this network's services.
        #[arg(long)]
        network: Option<String>,
    },
    /// Every endpoint in the cluster.
    Endpoints,
    /// This node, the store's health, counts.
    Status,
    /// Replace this host's WireGuard key; peers pick it up and handshake again.
    RotateKey,
    /// List the hosts the store knows of, and remove a dead one's addresses.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Remove every kernel object, rule and local state this host's agent made.
    /// Refused while the agent runs.
    Reset(ConfigArg),
    /// Hold the embedded DNS's sockets across agent restarts (started by the agent).
    #[command(hide = true)]
    DnsKeeper {
        /// Where agents reach the keeper.
        #[arg(long)]
        socket: PathBuf,
        /// Seconds without any agent after which the sockets are let go.
        #[arg(long)]
        grace: u64,
    },
    /// Static mode: make this host's overlay match a desired-state file (TOML).
    Apply {
        /// The desired-state file (TOML: networks, peers, endpoints).
        #[arg(long, short)]
        state: PathBuf,
        /// Keep running and re-apply every --interval seconds.
        #[arg(long)]
        hold: bool,
        /// Seconds between two applies with --hold.
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Static mode: check a desired-state file without touching the kernel.
    Check {
        /// The desired-state file to check.
        #[arg(long, short)]
        state: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum NetworkCommand {
    /// Create a network spanning every host.
    Create {
        /// The network's name (letters, digits, '_', '-', '.'), as containers name it.
        name: String,
        /// The addresses of the whole network (e.g. 100.64.0.0/16); each host takes a block of it.
        #[arg(long)]
        subnet: Ipv4Net,
        /// VXLAN id (default: the lowest free from 1000).
        #[arg(long)]
        vni: Option<u32>,
        /// Prefix length of the block each host takes (default /24, smaller subnets a quarter).
        #[arg(long)]
        block_size: Option<u8>,
        /// MTU inside the network (default: the underlay's less the encapsulation).
        #[arg(long)]
        mtu: Option<u32>,
        /// Encrypt traffic between hosts (WireGuard).
        #[arg(long)]
        encrypted: bool,
    },
    /// List the networks.
    #[command(alias = "list")]
    Ls,
    /// Show one network: subnet, VNI, blocks per host, endpoints.
    Inspect {
        /// The network's name.
        name: String,
    },
    /// Remove a network from every host.
    #[command(alias = "remove")]
    Rm {
        /// The network's name.
        name: String,
        /// Remove even while endpoints are attached (they are detached everywhere).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Every node the store knows of: up or gone (since when), blocks and endpoints.
    #[command(alias = "list")]
    Ls,
    /// Remove a gone node's blocks, endpoints and mesh record from every host.
    /// Refused while its lease lives.
    #[command(alias = "remove")]
    Rm {
        /// The node's name (see: netagent node ls).
        name: String,
    },
}

/// A DNS server as `--dns` takes it: an address, port 53 unless given.
fn parse_dns_server(s: &str) -> std::result::Result<std::net::SocketAddr, String> {
    config::dns_server(s)
        .ok_or_else(|| format!("{s:?} is not an address (198.51.100.53 or 198.51.100.53:5353)"))
}

impl Cli {
    /// The DNS socket keeper's socket and grace, when this is its command: it runs
    /// without the async runtime.
    pub fn keeper(&self) -> Option<(&std::path::Path, std::time::Duration)> {
        match &self.command {
            Command::DnsKeeper { socket, grace } => {
                Some((socket, std::time::Duration::from_secs(*grace)))
            }
            _ => None,
        }
    }

    pub async fn run(self) -> Result<()> {
        let request = match self.command {
            Command::Agent(c) => return commands::run_agent(&c.config).await,
            Command::Reset(c) => return commands::reset(&c.config).await,
            // main runs the keeper before any runtime; this is only for completeness.
            Command::DnsKeeper { socket, grace } => {
                let grace = std::time::Duration::from_secs(grace);
                return tokio::task::spawn_blocking(move || {
                    crate::keeper::run_keeper(&socket, grace)
                })
                .await?;
            }
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
                one_per_answer,
                ports,
                dns,
            } => Request::Attach(AttachRequest {
                target,
                network,
                name,
                service,
                aliases,
                one_per_answer,
                ports,
                dns,
            }),
            Command::Detach { target, network } => Request::Detach { target, network },
            Command::Peers => Request::Peers,
            Command::Services { network } => Request::Services { network },
            Command::Endpoints => Request::Endpoints,
            Command::Status => Request::Status,
            Command::RotateKey => Request::RotateKey,
            Command::Node(NodeCommand::Ls) => Request::NodeList,
            Command::Node(NodeCommand::Rm { name }) => Request::NodeRemove { name },
        };
        let deadline = std::time::Duration::from_secs_f64(self.timeout);
        let reply = client::call(&self.socket, &request, deadline).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&reply.content())?);
        } else {
            print!("{}", commands::render(&request, reply));
        }
        Ok(())
    }
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!(
            "{text:?} is not a number of seconds between 0 and 86400"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command and every argument says what it is for in `--help`.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let here = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && !path.is_empty() {
                missing.push(here.clone());
            }
            for arg in cmd.get_arguments() {
                let builtin = ["help", "version"].contains(&arg.get_id().as_str());
                if arg.get_help().is_none() && !builtin {
                    missing.push(format!("{here} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &here, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "no help for: {missing:?}");
    }
}
