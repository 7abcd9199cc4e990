//! The node's devices and addresses for the external path: which interfaces get the
//! tc/XDP programs, which addresses serve node ports (`LB_NODEADDR_V1`) and which
//! source address SNATed flows use. The choices are pure functions over the interface
//! list, which [`interfaces`] reads with getifaddrs.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;

/// One address of one interface, in the kernel's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub device: String,
    pub addr: IpAddr,
}

/// Every IP address of every interface (getifaddrs).
pub fn interfaces() -> Result<Vec<IfAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().context("getifaddrs")?;
    Ok(addrs
        .filter_map(|ifa| {
            let sa = ifa.address?;
            let addr = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(sa.as_sockaddr_in6()?.ip())
            };
            Some(IfAddr {
                device: ifa.interface_name,
                addr,
            })
        })
        .collect())
}

/// Interfaces that must not carry the external path: loopback sees no traffic from
/// outside the node.
fn excluded(device: &str) -> bool {
    device == "lo"
}

/// The default devices in Kubernetes mode: the interfaces that carry one of the Node's
/// InternalIP/ExternalIP addresses, in interface order, never `lo`.
pub fn default_devices(ifaddrs: &[IfAddr], node_addresses: &[IpAddr]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for ifa in ifaddrs {
        if node_addresses.contains(&ifa.addr)
            && !excluded(&ifa.device)
            && !out.contains(&ifa.device)
        {
            out.push(ifa.device.clone());
        }
    }
    out
}

/// Checks that every device exists (has an entry in the interface list, or an index).
pub fn check_devices(devices: &[String]) -> Result<()> {
    for dev in devices {
        if excluded(dev) {
            bail!("device {dev}: the loopback device cannot carry the external path");
        }
        if nix::net::if_::if_nametoindex(dev.as_str()).is_err() {
            bail!("device {dev} does not exist (see --devices)");
        }
    }
    Ok(())
}

/// Whether an address can receive node-port traffic: unicast and not link-local (an
/// IPv6 link-local address is ambiguous without its interface).
fn serves(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast(),
        IpAddr::V6(a) => {
            !a.is_unspecified() && !a.is_multicast() && (a.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// The addresses node ports answer on: those of `devices` (in device order, then the
/// kernel's), kept only if inside one of `filter` when it is not empty
/// (`--nodeport-addresses`), unique.
pub fn node_addresses(ifaddrs: &[IfAddr], devices: &[String], filter: &[IpNet]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for dev in devices {
        for ifa in ifaddrs.iter().filter(|i| &i.device == dev) {
            let wanted = filter.is_empty() || filter.iter().any(|n| n.contains(&ifa.addr));
            if serves(&ifa.addr) && wanted && !out.contains(&ifa.addr) {
                out.push(ifa.addr);
            }
        }
    }
    out
}

/// The SNAT address of each family: the first node address of that family (so, of the
/// first device that has one).
pub fn snat_addresses(node_addrs: &[IpAddr]) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let v4 = node_addrs.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let v6 = node_addrs.iter().find_map(|a| match a {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifa(device: &str, addr: &str) -> IfAddr {
        IfAddr {
            device: device.to_owned(),
            addr: addr.parse().unwrap(),
        }
    }

    fn list() -> Vec<IfAddr> {
        vec![
            ifa("lo", "127.0.0.1"),
            ifa("lo", "::1"),
            ifa("eth0", "192.168.1.10"),
            ifa("eth0", "fe80::1"),
            ifa("eth0", "2001:db8::10"),
            ifa("eth1", "10.0.0.5"),
            ifa("eth1", "192.168.1.11"),
            ifa("cni0", "10.244.0.1"),
        ]
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn default_devices_carry_node_addresses_never_lo() {
        let node = ips(&["10.0.0.5", "192.168.1.10", "127.0.0.1"]);
        assert_eq!(default_devices(&list(), &node), vec!["eth0", "eth1"]);
        assert!(default_devices(&list(), &ips(&["203.0.113.1"])).is_empty());
    }

    #[test]
    fn node_addresses_follow_devices_and_filter() {
        let devs = vec!["eth1".to_owned(), "eth0".to_owned()];
        assert_eq!(
            node_addresses(&list(), &devs, &[]),
            ips(&["10.0.0.5", "192.168.1.11", "192.168.1.10", "2001:db8::10"])
        );
        let filter: Vec<IpNet> = vec!["192.168.1.0/24".parse().unwrap()];
        assert_eq!(
            node_addresses(&list(), &devs, &filter),
            ips(&["192.168.1.11", "192.168.1.10"])
        );
        assert!(node_addresses(&list(), &["cni9".to_owned()], &[]).is_empty());
    }

    #[test]
    fn snat_is_the_first_address_of_each_family() {
        let (v4, v6) = snat_addresses(&ips(&["2001:db8::10", "10.0.0.5", "192.168.1.10"]));
        assert_eq!(v4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(v6, Some("2001:db8::10".parse().unwrap()));
        assert_eq!(snat_addresses(&ips(&["10.0.0.5"])).1, None);
    }
}
