//! Taking everything of ours out of the kernel (uninstall, tests).

use super::Host;
use crate::error::{Error, Result};
use crate::firewall;
use crate::naming::{host_veth_address, vxlan_vni};
use crate::netlink::Link;

impl Host {
    /// Removes every device and rule we own here (uninstall, tests); reports every error.
    pub async fn reset(&self) -> Result<()> {
        let observed = self.observe().await?;
        let mut errors = Vec::new();
        let ours = |l: &&Link| vxlan_vni(&l.name).is_some() || host_veth_address(&l.name).is_some();
        for link in observed.links.values().filter(ours) {
            if let Err(e) = self.nl.delete_link(link.index, &link.name).await {
                errors.push(e);
            }
        }
        if let Err(e) = firewall::remove(&self.ns, &self.firewall).await {
            errors.push(e);
        }
        if let Err(e) = firewall::close_docker_forward(&self.ns).await {
            errors.push(e);
        }
        Error::collect(errors)
    }
}
