//! Drives the test bed from scripts: the demo (scripts/demo.sh) and the benchmarks
//! (scripts/bench/). Runs as root; everything it makes is removed on exit.

mod bench_convergence;
mod bench_docker;
mod bench_overlay;
mod bench_scale;
mod bench_wireguard;
mod common;
mod demo;
mod dns_agent;
mod dns_memory;
mod dns_serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "netagent-testbed",
    about = "netagent's demo and benchmarks on a test bed of network namespaces (run as root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Three hosts, etcd and an agent each: networks, services across hosts, an
    /// encrypted network and Docker containers, shown step by step.
    Demo,
    /// iperf3 across two hosts: the overlay, a bare kernel VXLAN pair and the raw
    /// underlay (-P1 and -P4, medians of five rounds). Last line: key=value figures.
    BenchOverlay {
        /// Seconds per iperf3 run.
        #[arg(default_value_t = 10)]
        seconds: u32,
    },
    /// Serves the benchmark's names (`db`, a 3-replica `echo_api`) over UDP and TCP
    /// with netagent's DNS server until killed.
    DnsServe {
        /// Address to listen on (UDP and TCP).
        #[arg(default_value = "127.0.0.1:5301")]
        addr: String,
    },
    /// A running agent with the DNS benchmark's names (`db`, a 3-replica `echo_api`)
    /// and NAMESPACES attached namespaces in all; prints `ready agent_pid=PID
    /// clients=NS,...` and runs until its standard input closes.
    DnsAgent {
        /// Attached namespaces in all (at least 5).
        #[arg(default_value_t = 200)]
        namespaces: usize,
    },
    /// Resident memory with 100,000 DNS records, and the cost of updating one endpoint.
    DnsMemory,
    /// Attach-to-resolve convergence, failure detection and agent memory with 1,000
    /// endpoints over three hosts. Last line: key=value figures.
    BenchConvergence {
        /// Attaches whose convergence is measured.
        #[arg(default_value_t = 100)]
        attaches: usize,
    },
    /// Two hosts with a dockerd and an agent serving the Docker network driver each:
    /// `docker run -d` latency on a netagent network against a Docker bridge network
    /// and `--network none`, and a container started on host 1 -> its name resolving
    /// in a container on host 2. Last line: key=value figures.
    BenchDocker {
        /// Containers per measured kind.
        #[arg(default_value_t = 50)]
        containers: usize,
    },
    /// HOSTS agents against one etcd, 10 endpoints each: convergence, attach to
    /// resolvable on every host, an etcd restart, memory and idle CPU. Last line:
    /// key=value figures.
    BenchScale {
        /// Hosts (each a namespace with its own agent), 2 to 200.
        #[arg(default_value_t = 100)]
        hosts: usize,
        /// Another netagent program to run as the agents (for a before/after).
        #[arg(long)]
        agent_bin: Option<std::path::PathBuf>,
    },
    /// An encrypted network against wireguard-go and boringtun-cli tunnels, plain VXLAN
    /// and the raw underlay (iperf3 -P1, medians of three rounds). BENCH_QUICK=1:
    /// netagent's networks only; BENCH_VERBOSE=1: TCP retransmits of each run.
    BenchWireguard {
        /// Seconds per iperf3 run.
        #[arg(default_value_t = 5)]
        seconds: u32,
        /// The boringtun-cli program to compare with.
        #[arg(value_name = "BORINGTUN_CLI", default_value = "boringtun-cli")]
        boringtun_cli: String,
        /// A wireguard-go build with TUN and UDP offloads; its column is skipped without it.
        #[arg(value_name = "MODERN_WIREGUARD_GO")]
        modern_wireguard_go: Option<String>,
    },
}

fn main() {
    match Cli::parse().command {
        Command::Demo => demo::run(),
        Command::BenchOverlay { seconds } => bench_overlay::run(seconds),
        Command::DnsServe { addr } => dns_serve::run(&addr),
        Command::DnsAgent { namespaces } => dns_agent::run(namespaces),
        Command::DnsMemory => dns_memory::run(),
        Command::BenchConvergence { attaches } => bench_convergence::run(attaches),
        Command::BenchDocker { containers } => bench_docker::run(containers),
        Command::BenchScale { hosts, agent_bin } => bench_scale::run(hosts, agent_bin),
        Command::BenchWireguard {
            seconds,
            boringtun_cli,
            modern_wireguard_go,
        } => bench_wireguard::run(seconds, boringtun_cli, modern_wireguard_go),
    }
}
