//! Isolation between networks and egress to the outside, as one nftables table.
//!
//! Every network routes through the same host, so the host's forwarding must keep
//! them apart. Each of a network's interfaces (its VXLAN device and every endpoint's
//! host veth) carries the network's VNI as its interface group, so the rules stay the
//! same size however many endpoints there are: a packet may be forwarded between two
//! of our interfaces only when both are in the same group; from outside into a
//! network only replies pass (as with Docker's bridge); traffic leaving the overlay
//! for the outside is masqueraded. The table is rendered from the networks (pure,
//! unit-tested) and replaced in one nft transaction; a hash in the table's comment
//! lets a re-apply of the same state skip it.
//!
//! A Docker host adds a second filter: dockerd sets the FORWARD policy of its own
//! iptables table to DROP. A drop in any base chain is final, so our accept alone does
//! not carry a packet through; every packet our forward chain accepts is marked
//! ([`FORWARD_MARK`]) and one rule in Docker's `DOCKER-USER` chain (the chain Docker
//! leaves to its users) accepts that mark (see [`open_docker_forward`]).

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::Ipv4Net;

use crate::constants::{
    ENCRYPTED_VXLAN_PORT, FIREWALL_TABLE, FORWARD_MARK, MESH_INTERFACE, VXLAN_PORT,
};
use crate::error::{Error, Result};
use crate::netns::Netns;
use crate::spec::{HostState, NetworkSpec};

/// What the table is made from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FirewallSpec {
    pub networks: Vec<NetworkSpec>,
    /// Underlay addresses of plain networks' peers: the only senders of VXLAN (4789).
    pub vxlan_peers: BTreeSet<Ipv4Addr>,
    /// Mesh addresses of encrypted networks' peers: the only senders of VXLAN on the
    /// mesh (4790).
    pub mesh_peers: BTreeSet<Ipv4Addr>,
    /// Where overlay traffic is never forwarded: the cluster's hosts and its store.
    pub protected: Vec<Ipv4Net>,
}

impl FirewallSpec {
    pub fn of(state: &HostState) -> Self {
        let mut spec = FirewallSpec {
            protected: state.protected.clone(),
            ..Default::default()
        };
        for net in &state.networks {
            let peers = net.peers.iter().map(|p| p.underlay);
            if net.network.encrypted {
                spec.mesh_peers.extend(peers);
            } else {
                spec.vxlan_peers.extend(peers);
            }
            spec.networks.push(net.network.clone());
        }
        spec
    }
}

/// The whole table for `spec`, ending with its identifying comment.
pub fn render(spec: &FirewallSpec) -> String {
    let body = render_body(spec);
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    format!(
        "table ip {FIREWALL_TABLE}\ndelete table ip {FIREWALL_TABLE}\ntable ip {FIREWALL_TABLE} {{\n\tcomment \"{}\"\n{body}}}\n",
        marker(h.finish())
    )
}

/// The comment that identifies a rendered table.
pub fn marker(hash: u64) -> String {
    format!("netagent:{hash:016x}")
}

/// `subnets` less the `holes`, as interval-set elements (`a-b` or a single address).
fn ranges_without(subnets: &[Ipv4Net], holes: &BTreeSet<Ipv4Addr>) -> Vec<String> {
    let mut out = Vec::new();
    for net in subnets {
        let mut from = u32::from(net.network());
        let last = u32::from(net.broadcast());
        let inside = holes
            .iter()
            .map(|h| u32::from(*h))
            .filter(|h| net.contains(&Ipv4Addr::from(*h)));
        let mut push = |a: u32, b: u32| match a.cmp(&b) {
            std::cmp::Ordering::Less => {
                out.push(format!("{}-{}", Ipv4Addr::from(a), Ipv4Addr::from(b)))
            }
            std::cmp::Ordering::Equal => out.push(Ipv4Addr::from(a).to_string()),
            std::cmp::Ordering::Greater => {}
        };
        let mut done = false;
        for hole in inside {
            if hole > from {
                push(from, hole - 1);
            }
            if hole == last {
                done = true;
                break;
            }
            from = hole + 1;
        }
        if !done {
            push(from, last);
        }
    }
    out
}

fn render_body(spec: &FirewallSpec) -> String {
    let networks = &spec.networks;
    // Interface group = VNI (never 0, the default group of every other interface).
    let groups: Vec<String> = networks.iter().map(|n| n.vni.to_string()).collect();
    let same_net: Vec<String> = networks
        .iter()
        .map(|n| format!("{0} . {0}", n.vni))
        .collect();
    let mut foreign_gw = Vec::new();
    for n in networks {
        for other in networks.iter().filter(|o| o.vni != n.vni) {
            foreign_gw.push(format!("{} . {}", n.vni, other.gateway()));
        }
    }
    let own_gw: Vec<String> = networks
        .iter()
        .map(|n| format!("{} . {}", n.vni, n.gateway()))
        .collect();
    let subnet_nets: Vec<Ipv4Net> = networks.iter().map(|n| n.subnet).collect();
    let subnets: Vec<String> = subnet_nets.iter().map(|s| s.to_string()).collect();
    let gateways: BTreeSet<Ipv4Addr> = networks.iter().map(|n| n.gateway()).collect();
    let untracked = ranges_without(&subnet_nets, &gateways);
    let addresses =
        |set: &BTreeSet<Ipv4Addr>| -> Vec<String> { set.iter().map(|a| a.to_string()).collect() };
    let protected: Vec<String> = Ipv4Net::aggregate(&spec.protected)
        .iter()
        .map(|n| n.to_string())
        .collect();
    let mut s = String::new();
    let set = |s: &mut String, name: &str, ty: &str, flags: &str, elems: &[String]| {
        s.push_str(&format!("\tset {name} {{\n\t\ttype {ty}\n{flags}"));
        if !elems.is_empty() {
            s.push_str(&format!("\t\telements = {{ {} }}\n", elems.join(", ")));
        }
        s.push_str("\t}\n");
    };
    let interval = "\t\tflags interval\n";
    set(&mut s, "overlay_groups", "devgroup", "", &groups);
    set(&mut s, "same_network", "devgroup . devgroup", "", &same_net);
    set(
        &mut s,
        "foreign_gateways",
        "devgroup . ipv4_addr",
        "",
        &foreign_gw,
    );
    set(&mut s, "own_gateways", "devgroup . ipv4_addr", "", &own_gw);
    set(&mut s, "subnets", "ipv4_addr", interval, &subnets);
    set(&mut s, "untracked", "ipv4_addr", interval, &untracked);
    set(
        &mut s,
        "vxlan_peers",
        "ipv4_addr",
        "",
        &addresses(&spec.vxlan_peers),
    );
    set(
        &mut s,
        "mesh_peers",
        "ipv4_addr",
        "",
        &addresses(&spec.mesh_peers),
    );
    set(&mut s, "protected", "ipv4_addr", interval, &protected);
    // Conntrack is only needed for egress (NAT), replies from outside and traffic to
    // this host. Skipping it for traffic that stays in the overlay (`untracked` is the
    // subnets less this host's gateways, one lookup), and for the outer VXLAN packets,
    // removes two connection-table lookups per packet on each host.
    let vxlan = format!("{{ {VXLAN_PORT}, {ENCRYPTED_VXLAN_PORT} }}");
    s.push_str(&format!(
        "\tchain raw_prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifgroup @overlay_groups ip daddr @untracked notrack\n\
         \t\tudp dport {vxlan} notrack\n\
         \t}}\n\
         \tchain raw_output {{\n\
         \t\ttype filter hook output priority raw; policy accept;\n\
         \t\tudp dport {vxlan} notrack\n\
         \t}}\n",
    ));
    // Traffic within a network is settled by the first rule; the checks on what
    // leaves the overlay come after it, off that path.
    let mark = format!("meta mark set meta mark | {FORWARD_MARK:#x}");
    s.push_str(&format!(
        "\tchain forward {{\n\
         \t\ttype filter hook forward priority filter - 10; policy accept;\n\
         \t\tiifgroup . oifgroup @same_network {mark} accept\n\
         \t\tiifgroup @overlay_groups oifgroup @overlay_groups drop\n\
         \t\toifgroup @overlay_groups ct state established,related {mark} accept\n\
         \t\toifgroup @overlay_groups drop\n\
         \t\tiifgroup @overlay_groups jump overlay_egress\n\
         \t\tiifname \"{DOCKER_GATEWAY_BRIDGE}\" ct state new jump overlay_egress\n\
         \t}}\n\
         \tchain overlay_egress {{\n\
         \t\tip daddr @protected drop\n\
         \t\toifname \"{MESH_INTERFACE}\" drop\n\
         \t\toifname {{ \"docker0\", \"br-*\", \"{DOCKER_GATEWAY_BRIDGE}\" }} drop\n\
         \t\tudp dport {vxlan} drop\n\
         \t\t{mark} accept\n\
         \t}}\n"
    ));
    // Containers Docker attached through the driver also have Docker's gateway
    // bridge (their egress and published ports): what they start there meets the
    // same checks as what leaves the overlay, and the host takes nothing from it but
    // replies. The host takes from its networks only replies to its own connections,
    // and pings of a network's own gateway (the first check users make; the peers'
    // RTT probe); VXLAN only from known peers, the mesh's only through the mesh.
    s.push_str(&format!(
        "\tchain input {{\n\
         \t\ttype filter hook input priority filter - 10; policy accept;\n\
         \t\tiifgroup @overlay_groups jump overlay_to_host\n\
         \t\tiifname \"{DOCKER_GATEWAY_BRIDGE}\" ct state != {{ established, related }} drop\n\
         \t\tudp dport {VXLAN_PORT} ip saddr != @vxlan_peers drop\n\
         \t\tudp dport {ENCRYPTED_VXLAN_PORT} iifname != \"{MESH_INTERFACE}\" drop\n\
         \t\tudp dport {ENCRYPTED_VXLAN_PORT} ip saddr != @mesh_peers drop\n\
         \t}}\n\
         \tchain overlay_to_host {{\n\
         \t\tiifgroup . ip daddr @foreign_gateways drop\n\
         \t\tct state established,related accept\n\
         \t\tiifgroup . ip daddr @own_gateways icmp type echo-request accept\n\
         \t\tdrop\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr @subnets oifgroup != @overlay_groups masquerade\n\
         \t}}\n",
    ));
    s
}

/// The table as last applied here and as the kernel listed it right after: what a
/// guard restores, and what tells our own changes from someone else's.
#[derive(Default)]
pub(crate) struct LastApplied(Mutex<Option<Applied>>);

pub(crate) struct Applied {
    pub ruleset: String,
    pub listing: String,
}

impl LastApplied {
    pub fn lock(&self) -> MutexGuard<'_, Option<Applied>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Replaces our table in `ns` with the one for `spec`, unless it is already there
/// (put there by an earlier process, or by us and unchanged since). Returns whether
/// anything changed.
pub(crate) async fn sync(ns: &Netns, spec: &FirewallSpec, last: &Arc<LastApplied>) -> Result<bool> {
    let ruleset = render(spec);
    let wanted = ruleset
        .lines()
        .find_map(|l| l.trim().strip_prefix("comment \""))
        .map(|c| c.trim_end_matches('"').to_string())
        .unwrap_or_default();
    let name = ns.to_string();
    let last = last.clone();
    ns.run(move || {
        let mut last = last.lock();
        let current = list_table(&name).unwrap_or_default();
        let altered = last
            .as_ref()
            .is_some_and(|l| l.ruleset == ruleset && l.listing != current);
        if current.contains(&wanted) && !altered {
            *last = Some(Applied {
                ruleset,
                listing: current,
            });
            return Ok(false);
        }
        let listing = apply_ruleset(&name, &ruleset)?;
        *last = Some(Applied { ruleset, listing });
        Ok(true)
    })
    .await
}

/// Our table as the kernel lists it, in [`canonical`] form (called inside the namespace).
pub(crate) fn list_table(ns: &str) -> Result<String> {
    nft(ns, &["list", "table", "ip", FIREWALL_TABLE], None).map(|l| canonical(&l))
}

/// A listing with its whitespace collapsed and each set's elements sorted: a hash set
/// lists its elements in bucket order, which the kernel's resizing may change while
/// the table stays the same.
fn canonical(listing: &str) -> String {
    const OPEN: &str = "elements = { ";
    let flat = listing.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::with_capacity(flat.len());
    let mut rest = flat.as_str();
    while let Some(i) = rest.find(OPEN) {
        out.push_str(&rest[..i + OPEN.len()]);
        rest = &rest[i + OPEN.len()..];
        let end = rest.find(" }").unwrap_or(rest.len());
        let mut items: Vec<&str> = rest[..end].split(", ").collect();
        items.sort_unstable();
        out.push_str(&items.join(", "));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Loads `ruleset` (one transaction) and returns how the kernel lists it after
/// (called inside the namespace).
pub(crate) fn apply_ruleset(ns: &str, ruleset: &str) -> Result<String> {
    nft(ns, &["-f", "-"], Some(ruleset))?;
    list_table(ns)
}

/// Removes our table from `ns` (nothing to do when absent); a guard stops restoring it.
pub(crate) async fn remove(ns: &Netns, last: &Arc<LastApplied>) -> Result<()> {
    let name = ns.to_string();
    let last = last.clone();
    ns.run(move || {
        let mut last = last.lock();
        *last = None;
        if list_table(&name).is_ok() {
            nft(&name, &["delete", "table", "ip", FIREWALL_TABLE], None)?;
        }
        Ok(())
    })
    .await
}

/// What [`Host::open_docker_forward`](crate::Host::open_docker_forward) found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerForward {
    /// No `DOCKER-USER` chain: no dockerd manages iptables here.
    NoDocker,
    /// Our rule was there already.
    Open,
    /// Our rule was missing and is now inserted.
    Opened,
}

/// The `DOCKER-USER` rule that lets our marked packets through Docker's FORWARD chain.
fn docker_rule(verb: &str) -> Vec<String> {
    let mark = format!("{FORWARD_MARK:#x}/{FORWARD_MARK:#x}");
    [
        "-w",
        verb,
        "DOCKER-USER",
        "-m",
        "mark",
        "--mark",
        &mark,
        "-m",
        "comment",
        "--comment",
        FIREWALL_TABLE,
        "-j",
        "ACCEPT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Makes sure Docker's FORWARD chain in `ns` lets the overlay's traffic through.
/// Uses the `iptables` command, as dockerd does, so both see the same backend.
pub async fn open_docker_forward(ns: &Netns) -> Result<DockerForward> {
    let name = ns.to_string();
    ns.run(move || {
        if run(&name, "iptables", &["-w", "-n", "-L", "DOCKER-USER"], None).is_err() {
            return Ok(DockerForward::NoDocker);
        }
        let check = docker_rule("-C");
        let check: Vec<&str> = check.iter().map(String::as_str).collect();
        if run(&name, "iptables", &check, None).is_ok() {
            return Ok(DockerForward::Open);
        }
        let insert = docker_rule("-I");
        let insert: Vec<&str> = insert.iter().map(String::as_str).collect();
        run(&name, "iptables", &insert, None)?;
        Ok(DockerForward::Opened)
    })
    .await
}

/// Removes the rule [`open_docker_forward`] inserted, if it is there.
pub async fn close_docker_forward(ns: &Netns) -> Result<()> {
    let name = ns.to_string();
    ns.run(move || {
        let delete = docker_rule("-D");
        let delete: Vec<&str> = delete.iter().map(String::as_str).collect();
        while run(&name, "iptables", &delete, None).is_ok() {}
        Ok(())
    })
    .await
}

fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    run(ns, "nft", args, stdin)
}

/// Runs a firewall command in the calling thread's namespace (called from a
/// namespace worker).
fn run(ns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let fail = |message: String| Error::Firewall {
        ns: ns.to_string(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run {program} ({e}); install the {} package",
                if program == "nft" {
                    "nftables"
                } else {
                    program
                }
            ))
        })?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Docker's bridge for the egress and published ports of containers on driver
/// networks (Docker adds it to a container whose driver gives no gateway).
pub const DOCKER_GATEWAY_BRIDGE: &str = "docker_gwbridge";

/// The table that keeps Docker's embedded resolver from taking the namespace's DNS.
pub const DNS_DIVERT_TABLE: &str = "netagent_dns";

/// The rules of the `netagent_dns` table: queries to 127.0.0.11:53 and their answers go
/// untracked. Docker's resolver listens at 127.0.0.11 on a random port and DNATs port
/// 53 to it in the container's nat table; NAT only ever applies to tracked packets,
/// so untracked ones reach the embedded DNS listening at 127.0.0.11:53 itself. The
/// chain runs at raw priority, before conntrack: no rule order against Docker's.
pub fn dns_divert_ruleset() -> String {
    let mut rules = String::new();
    for (dir, port) in [("daddr", "dport"), ("saddr", "sport")] {
        for proto in ["udp", "tcp"] {
            rules.push_str(&format!(
                "    ip {dir} 127.0.0.11 {proto} {port} 53 notrack\n"
            ));
        }
    }
    format!(
        "table ip {DNS_DIVERT_TABLE} {{}}\nflush table ip {DNS_DIVERT_TABLE}\ntable ip {DNS_DIVERT_TABLE} {{\n  chain output {{\n    type filter hook output priority raw; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// Installs [`dns_divert_ruleset`] in the namespace `netns` names, if it is still the
/// one of `identity` (idempotent: the table is replaced whole).
pub async fn divert_dns_from_docker(netns: &crate::NetnsRef, identity: u64) -> Result<()> {
    let ns = Netns::open_expecting(netns, identity)?;
    let name = ns.to_string();
    ns.run(move || nft(&name, &["-f", "-"], Some(&dns_divert_ruleset())).map(|_| ()))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{NetworkState, Peer};

    fn net(name: &str, vni: u32, subnet: &str, block: &str) -> NetworkSpec {
        NetworkSpec {
            name: name.into(),
            vni,
            subnet: subnet.parse().unwrap(),
            block: block.parse().unwrap(),
            mtu: None,
            encrypted: false,
        }
    }

    fn of(networks: &[NetworkSpec]) -> FirewallSpec {
        FirewallSpec {
            networks: networks.to_vec(),
            ..Default::default()
        }
    }

    /// The rules of one chain, without its base-chain header.
    fn chain<'a>(ruleset: &'a str, name: &str) -> Vec<&'a str> {
        ruleset
            .lines()
            .skip_while(|l| l.trim() != format!("chain {name} {{"))
            .skip(1)
            .take_while(|l| l.trim() != "}")
            .map(str::trim)
            .filter(|l| !l.starts_with("type "))
            .collect()
    }

    /// The elements line of one set.
    fn elements<'a>(ruleset: &'a str, name: &str) -> Option<&'a str> {
        ruleset
            .lines()
            .skip_while(|l| l.trim() != format!("set {name} {{"))
            .skip(1)
            .take_while(|l| l.trim() != "}")
            .find_map(|l| l.trim().strip_prefix("elements = "))
    }

    fn peer(name: &str, underlay: &str, block: &str) -> Peer {
        Peer {
            name: name.into(),
            underlay: underlay.parse().unwrap(),
            block: block.parse().unwrap(),
        }
    }

    #[test]
    fn listings_compare_whatever_the_element_order() {
        let a = "table ip netagent {\n\tset s {\n\t\telements = { 1 . 1, 2 . 2,\n\t\t\t3 . 3 }\n\t}\n}\n";
        let b = "table ip netagent {\n\tset s {\n\t\telements = { 3 . 3, 1 . 1,\n\t\t\t2 . 2 }\n\t}\n}\n";
        assert_eq!(canonical(a), canonical(b));
        assert_eq!(
            canonical(a),
            "table ip netagent { set s { elements = { 1 . 1, 2 . 2, 3 . 3 } } }"
        );
        assert_ne!(canonical(a), canonical(&a.replace("2 . 2", "2 . 3")));
    }

    #[test]
    fn only_same_network_pairs_are_allowed() {
        let r = render(&of(&[
            net("a", 1, "100.64.0.0/16", "100.64.1.0/24"),
            net("b", 2, "100.65.0.0/16", "100.65.1.0/24"),
        ]));
        assert!(r.contains("elements = { 1 . 1, 2 . 2 }"), "{r}");
        assert!(!r.contains("1 . 2"), "{r}");
        assert!(
            r.contains("elements = { 1 . 100.65.1.1, 2 . 100.64.1.1 }"),
            "{r}"
        );
        assert!(r.contains("elements = { 100.64.0.0/16, 100.65.0.0/16 }"));
    }

    #[test]
    fn everything_forwarded_is_marked_for_docker() {
        let r = render(&of(&[net("a", 1, "100.64.0.0/16", "100.64.1.0/24")]));
        let accepts: Vec<&str> = ["forward", "overlay_egress"]
            .iter()
            .flat_map(|c| chain(&r, c))
            .filter(|l| l.ends_with(" accept"))
            .collect();
        assert_eq!(accepts.len(), 3, "{r}");
        for l in accepts {
            assert!(l.contains("meta mark set meta mark | 0x1000000"), "{l}");
        }
    }

    #[test]
    fn rendering_is_stable_and_changes_with_networks() {
        let a = of(&[net("a", 1, "100.64.0.0/16", "100.64.1.0/24")]);
        let b = of(&[net("a", 1, "100.66.0.0/16", "100.66.2.0/24")]);
        assert_eq!(render(&a), render(&a));
        assert_ne!(render(&a), render(&b));
        let mut c = a.clone();
        c.protected.push("192.0.2.2/32".parse().unwrap());
        assert_ne!(render(&a), render(&c));
        assert!(render(&FirewallSpec::default()).contains("set overlay_groups"));
    }

    #[test]
    fn the_hosts_own_gateways_are_tracked() {
        let r = render(&of(&[
            net("a", 1, "100.64.0.0/16", "100.64.1.0/24"),
            net("b", 2, "100.65.0.0/16", "100.65.1.0/24"),
        ]));
        assert_eq!(
            elements(&r, "untracked"),
            Some(
                "{ 100.64.0.0-100.64.1.0, 100.64.1.2-100.64.255.255, \
                 100.65.0.0-100.65.1.0, 100.65.1.2-100.65.255.255 }"
            ),
            "{r}"
        );
        assert_eq!(
            chain(&r, "raw_prerouting")[0],
            "iifgroup @overlay_groups ip daddr @untracked notrack"
        );
    }

    #[test]
    fn ranges_leave_out_holes_at_either_end() {
        let nets: Vec<Ipv4Net> = vec!["100.64.0.0/30".parse().unwrap()];
        let holes = |a: &[&str]| a.iter().map(|h| h.parse().unwrap()).collect();
        assert_eq!(
            ranges_without(&nets, &holes(&["100.64.0.0", "100.64.0.3"])),
            ["100.64.0.1-100.64.0.2"]
        );
        assert_eq!(
            ranges_without(&nets, &holes(&["100.64.0.1", "100.64.0.2"])),
            ["100.64.0.0", "100.64.0.3"]
        );
        assert_eq!(
            ranges_without(&nets, &holes(&["100.65.0.1"])),
            ["100.64.0.0-100.64.0.3"]
        );
    }

    #[test]
    fn vxlan_is_taken_only_from_peers() {
        let plain = NetworkState {
            network: net("a", 1, "100.64.0.0/16", "100.64.1.0/24"),
            peers: vec![
                peer("h2", "192.0.2.12", "100.64.2.0/24"),
                peer("h3", "192.0.2.13", "100.64.3.0/24"),
            ],
            endpoints: vec![],
        };
        let mut secure = NetworkState {
            network: net("s", 2, "100.66.0.0/16", "100.66.1.0/24"),
            peers: vec![peer("h2", "100.127.0.2", "100.66.2.0/24")],
            endpoints: vec![],
        };
        secure.network.encrypted = true;
        let state = HostState {
            underlay_address: "192.0.2.11".parse().unwrap(),
            underlay_interface: None,
            networks: vec![plain, secure],
            mesh_address: Some("100.127.0.1".parse().unwrap()),
            protected: vec![],
        };
        let r = render(&FirewallSpec::of(&state));
        assert_eq!(
            elements(&r, "vxlan_peers"),
            Some("{ 192.0.2.12, 192.0.2.13 }")
        );
        assert_eq!(elements(&r, "mesh_peers"), Some("{ 100.127.0.2 }"));
        let input = chain(&r, "input");
        assert_eq!(
            input,
            [
                "iifgroup @overlay_groups jump overlay_to_host",
                "iifname \"docker_gwbridge\" ct state != { established, related } drop",
                "udp dport 4789 ip saddr != @vxlan_peers drop",
                "udp dport 4790 iifname != \"nawg0\" drop",
                "udp dport 4790 ip saddr != @mesh_peers drop",
            ],
            "{r}"
        );
    }

    #[test]
    fn the_overlay_reaches_the_host_only_with_replies_and_gateway_pings() {
        let r = render(&of(&[net("a", 1, "100.64.0.0/16", "100.64.1.0/24")]));
        assert_eq!(elements(&r, "own_gateways"), Some("{ 1 . 100.64.1.1 }"));
        assert_eq!(
            chain(&r, "overlay_to_host"),
            [
                "iifgroup . ip daddr @foreign_gateways drop",
                "ct state established,related accept",
                "iifgroup . ip daddr @own_gateways icmp type echo-request accept",
                "drop",
            ],
            "{r}"
        );
    }

    #[test]
    fn overlay_egress_never_reaches_cluster_hosts_store_or_mesh() {
        let mut spec = of(&[net("a", 1, "100.64.0.0/16", "100.64.1.0/24")]);
        spec.protected = [
            "192.0.2.12/32",
            "192.0.2.2/32",
            "100.127.0.0/16",
            "192.0.2.12/32",
        ]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
        let r = render(&spec);
        assert_eq!(
            elements(&r, "protected"),
            Some("{ 100.127.0.0/16, 192.0.2.2/32, 192.0.2.12/32 }"),
            "{r}"
        );
        let forward = chain(&r, "forward");
        // Traffic within a network is decided first: the new checks cost it nothing.
        assert!(forward[0].starts_with("iifgroup . oifgroup @same_network"));
        assert_eq!(
            &forward[forward.len() - 2..],
            [
                "iifgroup @overlay_groups jump overlay_egress",
                // Containers' new connections over Docker's gateway bridge too.
                "iifname \"docker_gwbridge\" ct state new jump overlay_egress"
            ]
        );
        let egress = chain(&r, "overlay_egress");
        assert_eq!(egress[0], "ip daddr @protected drop");
        assert_eq!(egress[1], "oifname \"nawg0\" drop");
        // Nor to containers on Docker's bridges (past Docker's own isolation), nor
        // VXLAN to anyone's port.
        assert_eq!(
            egress[2],
            "oifname { \"docker0\", \"br-*\", \"docker_gwbridge\" } drop"
        );
        assert_eq!(egress[3], "udp dport { 4789, 4790 } drop");
        assert!(egress[4].ends_with(" accept"));
        assert!(render(&FirewallSpec::default()).contains("set protected"));
    }
}
