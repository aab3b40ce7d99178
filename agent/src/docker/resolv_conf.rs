//! Points a container's resolver at the embedded DNS (127.0.0.11), as Docker does on
//! its own networks. Search domains and options stay as the container had them;
//! outside names reach the host's upstreams through the agent's forwarder.

use std::io::Write;

/// The embedded DNS listener's address inside every attached namespace.
pub const EMBEDDED_DNS: &str = "127.0.0.11";

/// `text` with every `nameserver` line replaced by one for the embedded DNS, at the
/// place of the first (or on top when there was none). Idempotent.
pub fn point_at_embedded_dns(text: &str) -> String {
    let ours = format!("nameserver {EMBEDDED_DNS}");
    let mut out = Vec::new();
    let mut placed = false;
    for line in text.lines() {
        let is_ns = line
            .split_whitespace()
            .next()
            .is_some_and(|w| w == "nameserver");
        if !is_ns {
            out.push(line.to_owned());
        } else if !placed {
            out.push(ours.clone());
            placed = true;
        }
    }
    if !placed {
        out.insert(0, ours);
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

/// Rewrites the resolv.conf that process `pid` sees (through /proc, so it works
/// whatever mount namespace either side is in). Written in place: in a container
/// the file is a bind mount and cannot be replaced by a rename. Blocking.
pub fn rewrite_for_pid(pid: u32) -> std::io::Result<bool> {
    let path = format!("/proc/{pid}/root/etc/resolv.conf");
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    let wanted = point_at_embedded_dns(&current);
    if wanted == current {
        return Ok(false);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(&path)?;
    f.write_all(wanted.as_bytes())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_search_and_options() {
        let before = "# from the host\nsearch corp.example\nnameserver 192.0.2.53\nnameserver 192.0.2.54\noptions ndots:2 timeout:1\n";
        let after = point_at_embedded_dns(before);
        assert_eq!(
            after,
            "# from the host\nsearch corp.example\nnameserver 127.0.0.11\noptions ndots:2 timeout:1\n"
        );
        assert_eq!(point_at_embedded_dns(&after), after);
        assert_eq!(point_at_embedded_dns(""), "nameserver 127.0.0.11\n");
        assert_eq!(
            point_at_embedded_dns("options rotate"),
            "nameserver 127.0.0.11\noptions rotate\n"
        );
    }
}
