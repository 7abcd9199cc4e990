//! STAND-IN for the healthCheckNodePort server that another branch provides (same
//! interface). It only records the wanted checks and logs them; it opens no listener.
//! The lead replaces this file with the real one at merge.
use std::{collections::BTreeMap, net::IpAddr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckEntry {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

pub struct HealthCheckServer {
    bind_addrs: Vec<IpAddr>,
    checks: BTreeMap<u16, HealthCheckEntry>,
}

impl HealthCheckServer {
    pub fn new(bind_addrs: Vec<IpAddr>) -> Self {
        Self {
            bind_addrs,
            checks: BTreeMap::new(),
        }
    }

    pub async fn update(&mut self, checks: BTreeMap<u16, HealthCheckEntry>) -> anyhow::Result<()> {
        if checks != self.checks {
            tracing::debug!(ports = ?checks.keys().collect::<Vec<_>>(), bind = ?self.bind_addrs, "health checks (stand-in: not served)");
            self.checks = checks;
        }
        Ok(())
    }
}
