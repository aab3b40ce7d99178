//! Points a container's resolver at the embedded DNS (127.0.0.11), as Docker does on
//! its own networks. Search domains and options stay as the container had them;
//! outside names reach the host's upstreams through the agent's forwarder.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use netagent_overlay::{rewrite_in_root, PinnedProcess, Rewrite};

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

/// Points the resolver of the pinned container process at the embedded DNS, in
/// place (in a container the file is a bind mount and cannot be replaced by a
/// rename). The container shapes its own filesystem, so the file is reached only
/// through its pinned root, and must be the very file the engine made for it
/// (`engine_file`, Docker's `ResolvConfPath`, same device and inode). Blocking.
pub fn rewrite(
    process: &PinnedProcess,
    engine_file: &Path,
) -> Result<Rewrite, netagent_overlay::Error> {
    let meta = std::fs::symlink_metadata(engine_file).map_err(|e| {
        netagent_overlay::Error::ContainerFile {
            path: engine_file.display().to_string(),
            why: format!("the engine's resolv.conf cannot be found: {e}"),
        }
    })?;
    let root = process.root()?;
    rewrite_in_root(
        &root,
        "/etc/resolv.conf",
        Some((meta.dev(), meta.ino())),
        point_at_embedded_dns,
    )
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
