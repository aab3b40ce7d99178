//! Isolation between networks and egress to the outside, as one nftables table.
//!
//! Every network routes through the same host, so the host's forwarding must keep
//! them apart. Each of a network's interfaces (its VXLAN device and every endpoint's
//! host veth) carries the network's VNI as its interface group, so the rules stay the
//! same size however many endpoints there are: a packet may be forwarded between two
//! of our interfaces only when both are in the same group; from outside into a network only replies pass (as with
//! Docker's bridge); traffic leaving the overlay for the outside is masqueraded. The
//! table is rendered from the networks (pure, unit-tested) and replaced in one nft
//! transaction; a hash in the table's comment lets a re-apply of the same state skip it.
//!
//! A Docker host adds a second filter: dockerd sets the FORWARD policy of its own
//! iptables table to DROP. A drop in any base chain is final, so our accept alone does
//! not carry a packet through; every packet our forward chain accepts is marked
//! ([`FORWARD_MARK`]) and one rule in Docker's `DOCKER-USER` chain (the chain Docker
//! leaves to its users) accepts that mark (see [`open_docker_forward`]).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::host::{ENCRYPTED_VXLAN_PORT, VXLAN_PORT};
use crate::netns::Netns;
use crate::spec::NetworkSpec;
use crate::wireguard::MESH_INTERFACE;

/// Name of our table (family `ip`).
pub const TABLE: &str = "netagent";

/// The packet-mark bit our forward chain sets on what it accepts. One bit, outside
/// the ones kube-proxy (0x4000, 0x8000) and Weave (0x20000, 0x40000) use.
pub const FORWARD_MARK: u32 = 0x0100_0000;

/// The whole table for these networks, ending with its identifying comment.
pub fn render(networks: &[NetworkSpec]) -> String {
    let body = render_body(networks);
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n\tcomment \"{}\"\n{body}}}\n",
        marker(h.finish())
    )
}

/// The comment that identifies a rendered table.
pub fn marker(hash: u64) -> String {
    format!("netagent:{hash:016x}")
}

fn render_body(networks: &[NetworkSpec]) -> String {
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
    let subnets: Vec<String> = networks.iter().map(|n| n.subnet.to_string()).collect();
    let mut s = String::new();
    let set = |s: &mut String, name: &str, ty: &str, flags: &str, elems: &[String]| {
        s.push_str(&format!("\tset {name} {{\n\t\ttype {ty}\n{flags}"));
        if !elems.is_empty() {
            s.push_str(&format!("\t\telements = {{ {} }}\n", elems.join(", ")));
        }
        s.push_str("\t}\n");
    };
    set(&mut s, "overlay_groups", "devgroup", "", &groups);
    set(&mut s, "same_network", "devgroup . devgroup", "", &same_net);
    set(
        &mut s,
        "foreign_gateways",
        "devgroup . ipv4_addr",
        "",
        &foreign_gw,
    );
    set(
        &mut s,
        "subnets",
        "ipv4_addr",
        "\t\tflags interval\n",
        &subnets,
    );
    // Conntrack is only needed for egress (NAT) and replies from outside. Skipping it
    // for traffic that stays in the overlay, and for the outer VXLAN packets, removes
    // two connection-table lookups per packet on each host.
    let vxlan = format!("{{ {VXLAN_PORT}, {ENCRYPTED_VXLAN_PORT} }}");
    s.push_str(&format!(
        "\tchain raw_prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifgroup @overlay_groups ip daddr @subnets notrack\n\
         \t\tudp dport {vxlan} notrack\n\
         \t}}\n\
         \tchain raw_output {{\n\
         \t\ttype filter hook output priority raw; policy accept;\n\
         \t\tudp dport {vxlan} notrack\n\
         \t}}\n",
    ));
    let mark = format!("meta mark set meta mark | {FORWARD_MARK:#x}");
    s.push_str(&format!(
        "\tchain forward {{\n\
         \t\ttype filter hook forward priority filter - 10; policy accept;\n\
         \t\tiifgroup . oifgroup @same_network {mark} accept\n\
         \t\tiifgroup @overlay_groups oifgroup @overlay_groups drop\n\
         \t\toifgroup @overlay_groups ct state established,related {mark} accept\n\
         \t\toifgroup @overlay_groups drop\n\
         \t\tiifgroup @overlay_groups {mark} accept\n\
         \t}}\n"
    ));
    // Encrypted networks' VXLAN is taken only from the mesh device.
    s.push_str(&format!(
        "\tchain input {{\n\
         \t\ttype filter hook input priority filter - 10; policy accept;\n\
         \t\tiifgroup . ip daddr @foreign_gateways drop\n\
         \t\tudp dport {ENCRYPTED_VXLAN_PORT} iifname != \"{MESH_INTERFACE}\" drop\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr @subnets oifgroup != @overlay_groups masquerade\n\
         \t}}\n",
    ));
    s
}

/// Replaces our table in `ns` with the one for `networks`, unless it is already there.
/// Returns whether anything changed.
pub async fn sync(ns: &Netns, networks: &[NetworkSpec]) -> Result<bool> {
    let ruleset = render(networks);
    let wanted = ruleset
        .lines()
        .find_map(|l| l.trim().strip_prefix("comment \""))
        .map(|c| c.trim_end_matches('"').to_string())
        .unwrap_or_default();
    let name = ns.to_string();
    ns.run(move || {
        let current = nft(&name, &["list", "table", "ip", TABLE], None).unwrap_or_default();
        if current.contains(&wanted) {
            return Ok(false);
        }
        nft(&name, &["-f", "-"], Some(&ruleset))?;
        Ok(true)
    })
    .await
}

/// Removes our table from `ns` (nothing to do when absent).
pub async fn remove(ns: &Netns) -> Result<()> {
    let name = ns.to_string();
    ns.run(move || {
        if nft(&name, &["list", "table", "ip", TABLE], None).is_ok() {
            nft(&name, &["delete", "table", "ip", TABLE], None)?;
        }
        Ok(())
    })
    .await
}

/// What [`open_docker_forward`] found.
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
        TABLE,
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn only_same_network_pairs_are_allowed() {
        let r = render(&[
            net("a", 1, "100.64.0.0/16", "100.64.1.0/24"),
            net("b", 2, "100.65.0.0/16", "100.65.1.0/24"),
        ]);
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
        let r = render(&[net("a", 1, "100.64.0.0/16", "100.64.1.0/24")]);
        let accepts: Vec<&str> = r.lines().filter(|l| l.ends_with(" accept")).collect();
        assert_eq!(accepts.len(), 3, "{r}");
        for l in accepts {
            assert!(l.contains("meta mark set meta mark | 0x1000000"), "{l}");
        }
    }

    #[test]
    fn rendering_is_stable_and_changes_with_networks() {
        let a = [net("a", 1, "100.64.0.0/16", "100.64.1.0/24")];
        let b = [net("a", 1, "100.66.0.0/16", "100.66.2.0/24")];
        assert_eq!(render(&a), render(&a));
        assert_ne!(render(&a), render(&b));
        assert!(render(&[]).contains("set overlay_groups"));
    }
}
