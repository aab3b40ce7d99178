//! The static mode: desired state from a TOML file, applied to this namespace.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use netagent_overlay::{Host, HostState, NetnsRef};
use tracing::{error, info};

/// Reads and validates a desired-state file; errors name the file and the line.
pub fn load(path: &Path) -> Result<HostState> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read state file {}", path.display()))?;
    let state: HostState =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("state file {}: {e}", path.display()))?;
    state
        .validate()
        .with_context(|| format!("state file {}", path.display()))?;
    Ok(state)
}

pub fn check(path: &Path) -> Result<()> {
    let s = load(path)?;
    println!(
        "{}: valid ({} networks, {} endpoints)",
        path.display(),
        s.networks.len(),
        s.networks.iter().map(|n| n.endpoints.len()).sum::<usize>()
    );
    Ok(())
}

pub async fn apply(path: &Path, hold: bool, interval: u64) -> Result<()> {
    let host = Host::open(&NetnsRef::Current).await?;
    let state = load(path)?;
    let report = host.apply(&state).await?;
    println!(
        "applied {}: {} created, {} removed, {} adjusted, firewall {}",
        path.display(),
        report.created.len(),
        report.removed.len(),
        report.adjusted.len(),
        if report.firewall_changed {
            "updated"
        } else {
            "unchanged"
        }
    );
    if !hold {
        return Ok(());
    }
    let mut tick = tokio::time::interval(Duration::from_secs(interval.max(1)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        // A bad edit of the file keeps the last good state in force.
        match load(path) {
            Ok(state) => match host.apply(&state).await {
                Ok(r) if !r.is_empty() => info!(
                    created = r.created.len(),
                    removed = r.removed.len(),
                    "re-applied"
                ),
                Ok(_) => {}
                Err(e) => error!(error = %e, "apply failed"),
            },
            Err(e) => {
                error!(error = %format!("{e:#}"), "state file rejected; keeping the last applied state")
            }
        }
    }
    info!("stopping; the kernel keeps forwarding");
    Ok(())
}
