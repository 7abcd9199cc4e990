//! The lab network: one client namespace wired by a veth pair to each backend namespace.
//!
//! ```text
//!   client netns (no default route)            backend netns k (k = 1..=N)
//!   to-k: 10.240.k.1/24, fd00:240:k::1/64  ──  eth0: 10.240.k.2/24, fd00:240:k::2/64
//! ```
//! The client namespace only has connected routes to the backend subnets. A Service
//! address that the agent does not rewrite therefore fails locally with ENETUNREACH and
//! no packet ever leaves the lab.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, Veth};

/// Backend `k`'s IPv4 address (`10.240.k.2`).
pub fn backend_v4(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, k, 2)
}

/// Backend `k`'s IPv6 address (`fd00:240:k::2`).
pub fn backend_v6(k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x240, u16::from(k), 0, 0, 0, 0, 2)
}

/// The client side of backend `k`'s link (`10.240.k.1`, `fd00:240:k::1`).
pub fn client_v4(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, k, 1)
}

pub fn client_v6(k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x240, u16::from(k), 0, 0, 0, 0, 1)
}

/// One backend "pod": its own namespace and addresses.
#[derive(Debug)]
pub struct BackendHost {
    /// Short label ("a", "b", ...), also the default reply id of its server.
    pub id: String,
    /// Subnet index: the host is `10.240.<index>.2`.
    pub index: u8,
    pub addr4: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub netns: Netns,
}

impl BackendHost {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.addr6)
        } else {
            IpAddr::V4(self.addr4)
        }
    }
}

/// Fields drop in declaration order: the veth pairs go first, then the namespaces.
#[derive(Debug)]
pub struct Topology {
    veths: Vec<Veth>,
    pub backends: Vec<BackendHost>,
    pub client: Netns,
}

impl Topology {
    /// Creates the client namespace and one backend namespace per id, `ids[i]` getting
    /// subnet index `i + 1`.
    pub fn new(ids: &[&str]) -> Result<Self> {
        if ids.len() > 250 {
            bail!("at most 250 backends");
        }
        let mut topo = Self {
            veths: Vec::new(),
            backends: Vec::new(),
            client: Netns::new().context("client namespace")?,
        };
        for (i, id) in ids.iter().enumerate() {
            let k = u8::try_from(i + 1).context("backend index")?;
            let netns = Netns::new().with_context(|| format!("namespace of backend {id}"))?;
            let client_dev = format!("to-{k}");
            topo.veths
                .push(Veth::new(&topo.client, &client_dev, &netns, "eth0")?);
            let host = BackendHost {
                id: (*id).to_owned(),
                index: k,
                addr4: backend_v4(k),
                addr6: backend_v6(k),
                netns,
            };
            topo.client
                .add_addr(&client_dev, IpAddr::V4(client_v4(k)), 24)?;
            topo.client
                .add_addr(&client_dev, IpAddr::V6(client_v6(k)), 64)?;
            host.netns.add_addr("eth0", IpAddr::V4(host.addr4), 24)?;
            host.netns.add_addr("eth0", IpAddr::V6(host.addr6), 64)?;
            topo.client.link_up(&client_dev)?;
            host.netns.link_up("eth0")?;
            topo.backends.push(host);
        }
        for b in &topo.backends {
            let client_dev = format!("to-{}", b.index);
            topo.client
                .wait_link_ready(&client_dev, Duration::from_secs(5))?;
            b.netns.wait_link_ready("eth0", Duration::from_secs(5))?;
        }
        Ok(topo)
    }

    pub fn backend(&self, id: &str) -> &BackendHost {
        self.backends
            .iter()
            .find(|b| b.id == id)
            .unwrap_or_else(|| panic!("no backend {id} in this topology"))
    }

    /// Every backend address of one family, in `ids` order.
    pub fn addrs(&self, v6: bool) -> Vec<IpAddr> {
        self.backends.iter().map(|b| b.addr(v6)).collect()
    }
}
