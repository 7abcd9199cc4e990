//! The node's devices and addresses: which interfaces get the tc/XDP programs, which
//! addresses serve node ports ([`node_port_addresses`], one rule for the socket
//! programs' node-port frontends and the external path's `LB_NODEADDR_V1`) and which
//! source address SNATed flows use. The choices are pure functions over the interface
//! list, which [`interfaces`] reads with getifaddrs.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

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

/// Whether an address can receive node-port traffic: unicast, not loopback (served only
/// through `--nodeport-localhost`) and not link-local (an IPv6 link-local address is
/// ambiguous without its interface).
fn serves(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast() && !a.is_loopback()
        }
        IpAddr::V6(a) => {
            !a.is_unspecified()
                && !a.is_multicast()
                && !a.is_loopback()
                && (a.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// The addresses of `devices` that could serve node ports, in device order, then the
/// kernel's, unique: the external path's share of the node's addresses, and the source
/// of its SNAT addresses ([`snat_addresses`]).
pub fn device_addresses(ifaddrs: &[IfAddr], devices: &[String]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for dev in devices {
        for ifa in ifaddrs.iter().filter(|i| &i.device == dev) {
            if serves(&ifa.addr) && !out.contains(&ifa.addr) {
                out.push(ifa.addr);
            }
        }
    }
    out
}

/// `--nodeport-addresses`: which of the node's addresses serve node ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the node (no flag; kube-proxy's iptables default).
    #[default]
    All,
    /// kube-proxy's keyword `primary`: the node's primary address of each family
    /// ([`primary_addresses`]).
    Primary,
    /// The addresses inside these CIDRs. A family with no CIDR in the list keeps all of
    /// its addresses, as in kube-proxy (pkg/proxy/util/nodeport_addresses.go).
    Cidrs(Vec<IpNet>),
}

/// One entry of `--nodeport-addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortEntry {
    Primary,
    Cidr(IpNet),
}

/// The keyword of [`NodePortAddresses::Primary`].
pub const NODEPORT_PRIMARY: &str = "primary";

/// Parses one `--nodeport-addresses` entry. A CIDR that holds only loopback addresses is
/// refused: loopback is never a node address here, `--nodeport-localhost` serves it.
pub fn parse_nodeport_entry(s: &str) -> Result<NodePortEntry, String> {
    if s == NODEPORT_PRIMARY {
        return Ok(NodePortEntry::Primary);
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("'{s}' is neither a CIDR nor '{NODEPORT_PRIMARY}'"))?;
    let loopback: IpNet = match net {
        IpNet::V4(_) => "127.0.0.0/8".parse().map_err(|_| "loopback")?,
        IpNet::V6(_) => "::1/128".parse().map_err(|_| "loopback")?,
    };
    if loopback.contains(&net) {
        return Err(format!(
            "{s} holds only loopback addresses; node ports on 127.0.0.1 and ::1 are turned on with --nodeport-localhost"
        ));
    }
    Ok(NodePortEntry::Cidr(net.trunc()))
}

impl NodePortAddresses {
    /// The flag's entries as one rule: none is [`Self::All`]; `primary` stands alone, as
    /// kube-proxy requires.
    pub fn from_entries(entries: &[NodePortEntry]) -> Result<Self, String> {
        if entries.is_empty() {
            return Ok(Self::All);
        }
        if entries.contains(&NodePortEntry::Primary) {
            if entries.len() > 1 {
                return Err(format!(
                    "'{NODEPORT_PRIMARY}' cannot be combined with other entries"
                ));
            }
            return Ok(Self::Primary);
        }
        Ok(Self::Cidrs(
            entries
                .iter()
                .filter_map(|e| match e {
                    NodePortEntry::Cidr(n) => Some(*n),
                    NodePortEntry::Primary => None,
                })
                .collect(),
        ))
    }

    /// Whether `addr` passes the rule; `primary` holds the primary addresses.
    fn keeps(&self, addr: &IpAddr, primary: &[IpAddr]) -> bool {
        match self {
            Self::All => true,
            Self::Primary => primary.contains(addr),
            Self::Cidrs(nets) => {
                let mut of_family = nets
                    .iter()
                    .filter(|n| {
                        matches!(
                            (n, addr),
                            (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_))
                        )
                    })
                    .peekable();
                of_family.peek().is_none() || of_family.any(|n| n.contains(addr))
            }
        }
    }
}

/// The node's primary address of each family, as kube-proxy's `primary` means it (its
/// "node IPs", cmd/kube-proxy/app/server.go): `given` (`--node-ip`) first, then the
/// Node object's (`node`, see `model::node::primary_ips`), then, in manifest mode only
/// (`devices`), the first address of the family on the devices. Loopback is never one.
pub fn primary_addresses(given: &[IpAddr], node: &[IpAddr], devices: &[IpAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for addr in given.iter().chain(node).chain(devices) {
        if serves(addr) && !out.iter().any(|a| a.is_ipv4() == addr.is_ipv4()) {
            out.push(*addr);
        }
    }
    out
}

/// The addresses that serve node ports, the one answer both paths use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePortSet {
    /// For traffic from outside the node (`LB_NODEADDR_V1`, the tc/XDP programs).
    pub external: Vec<IpAddr>,
    /// For clients on the node (the socket programs' `SCOPE_ALL` node-port
    /// frontends): the same, plus 127.0.0.1 and ::1 with `--nodeport-localhost`.
    pub local: Vec<IpAddr>,
}

/// Which node addresses serve node ports, for clients on the node and from outside
/// alike: the node's addresses (`candidates`: the Node's InternalIP and ExternalIP
/// addresses, `--node-ip` and the devices' addresses) and its `primary` addresses, kept
/// by `rule` (`--nodeport-addresses`), unique, in order. Loopback addresses are never
/// node addresses; `localhost` (`--nodeport-localhost`) adds 127.0.0.1 and ::1 for
/// clients on the node only (a packet from outside never carries them).
pub fn node_port_addresses(
    candidates: &[IpAddr],
    primary: &[IpAddr],
    rule: &NodePortAddresses,
    localhost: bool,
) -> NodePortSet {
    let external: BTreeSet<IpAddr> = primary
        .iter()
        .chain(candidates)
        .filter(|a| serves(a) && rule.keeps(a, primary))
        .copied()
        .collect();
    let mut local = external.clone();
    if localhost {
        local.insert(IpAddr::V4(Ipv4Addr::LOCALHOST));
        local.insert(IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
    NodePortSet {
        external: external.into_iter().collect(),
        local: local.into_iter().collect(),
    }
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
    fn device_addresses_follow_devices_never_link_local() {
        let devs = vec!["eth1".to_owned(), "eth0".to_owned()];
        assert_eq!(
            device_addresses(&list(), &devs),
            ips(&["10.0.0.5", "192.168.1.11", "192.168.1.10", "2001:db8::10"])
        );
        assert!(device_addresses(&list(), &["cni9".to_owned()]).is_empty());
    }

    fn cidrs(v: &[&str]) -> NodePortAddresses {
        NodePortAddresses::Cidrs(v.iter().map(|c| c.parse().unwrap()).collect())
    }

    /// A dual-stack node: two IPv4 and two IPv6 addresses, loopback and a link-local one
    /// among the candidates (they never serve).
    fn node() -> (Vec<IpAddr>, Vec<IpAddr>) {
        let candidates = ips(&[
            "192.168.1.10",
            "10.0.0.5",
            "2001:db8::10",
            "fd00::5",
            "127.0.0.1",
            "::1",
            "fe80::1",
            "192.168.1.10",
        ]);
        (candidates, ips(&["192.168.1.10", "2001:db8::10"]))
    }

    #[test]
    fn node_port_rule_cidr_primary_and_all() {
        let (cand, primary) = node();
        let all = ips(&["10.0.0.5", "192.168.1.10", "2001:db8::10", "fd00::5"]);
        let cases: &[(&str, NodePortAddresses, &[&str])] = &[
            (
                "default: every node address, never loopback or link-local",
                NodePortAddresses::All,
                &["10.0.0.5", "192.168.1.10", "2001:db8::10", "fd00::5"],
            ),
            (
                "CIDRs of both families",
                cidrs(&["192.168.0.0/16", "fd00::/8"]),
                &["192.168.1.10", "fd00::5"],
            ),
            (
                "a family without a CIDR keeps all of its addresses (kube-proxy)",
                cidrs(&["10.0.0.0/8"]),
                &["10.0.0.5", "2001:db8::10", "fd00::5"],
            ),
            (
                "a zero-length prefix is every address of its family",
                cidrs(&["0.0.0.0/0", "fd00::/8"]),
                &["10.0.0.5", "192.168.1.10", "fd00::5"],
            ),
            (
                "CIDRs that match nothing: no address of that family",
                cidrs(&["203.0.113.0/24", "2001:db8:ffff::/48"]),
                &[],
            ),
            (
                "primary: one address per family",
                NodePortAddresses::Primary,
                &["192.168.1.10", "2001:db8::10"],
            ),
        ];
        for (name, rule, want) in cases {
            let got = node_port_addresses(&cand, &primary, rule, false);
            assert_eq!(got.external, ips(want), "{name}");
            assert_eq!(
                got.local,
                ips(want),
                "{name}: local = external without localhost"
            );
        }
        // Single-stack primary: only that family.
        let v4 = node_port_addresses(
            &cand,
            &ips(&["10.0.0.5"]),
            &NodePortAddresses::Primary,
            false,
        );
        assert_eq!(v4.external, ips(&["10.0.0.5"]));
        // primary without any known primary address serves nothing.
        let none = node_port_addresses(&cand, &[], &NodePortAddresses::Primary, false);
        assert!(none.external.is_empty() && none.local.is_empty());
        // The candidates alone decide under the default: nothing known, nothing served.
        assert!(
            node_port_addresses(&[], &[], &NodePortAddresses::All, false)
                .local
                .is_empty()
        );
        assert_eq!(
            node_port_addresses(&cand, &primary, &NodePortAddresses::All, false).external,
            all
        );
    }

    #[test]
    fn localhost_is_local_only_and_opt_in() {
        let (cand, primary) = node();
        for rule in [
            NodePortAddresses::All,
            NodePortAddresses::Primary,
            cidrs(&["10.0.0.0/8", "fd00::/8"]),
        ] {
            let off = node_port_addresses(&cand, &primary, &rule, false);
            assert!(
                !off.local.iter().any(IpAddr::is_loopback),
                "{rule:?}: {off:?}"
            );
            let on = node_port_addresses(&cand, &primary, &rule, true);
            // Outside traffic never carries a loopback destination: the external set is
            // the same either way.
            assert_eq!(on.external, off.external, "{rule:?}");
            let mut want = off.external.clone();
            want.extend(ips(&["127.0.0.1", "::1"]));
            want.sort();
            assert_eq!(on.local, want, "{rule:?}");
        }
    }

    #[test]
    fn primary_addresses_prefer_the_flag_then_the_node_then_devices() {
        let node_ips = ips(&["192.168.1.10", "2001:db8::10"]);
        let devs = ips(&["10.0.0.5", "fd00::5", "10.0.0.6"]);
        assert_eq!(primary_addresses(&[], &node_ips, &[]), node_ips);
        assert_eq!(
            primary_addresses(&ips(&["10.9.9.9"]), &node_ips, &devs),
            ips(&["10.9.9.9", "2001:db8::10"])
        );
        assert_eq!(
            primary_addresses(&[], &[], &devs),
            ips(&["10.0.0.5", "fd00::5"])
        );
        assert_eq!(
            primary_addresses(&[], &ips(&["127.0.0.1"]), &devs),
            ips(&["10.0.0.5", "fd00::5"]),
            "loopback is never primary"
        );
    }

    #[test]
    fn nodeport_entries() {
        assert_eq!(parse_nodeport_entry("primary"), Ok(NodePortEntry::Primary));
        assert!(parse_nodeport_entry("Primary").is_err());
        assert!(parse_nodeport_entry("10.0.0.0/8").is_ok());
        assert!(parse_nodeport_entry("127.0.0.0/9").is_err());
        assert!(parse_nodeport_entry("::1/128").is_err());
        assert!(parse_nodeport_entry("::/0").is_ok());
        assert_eq!(
            NodePortAddresses::from_entries(&[]),
            Ok(NodePortAddresses::All)
        );
    }

    #[test]
    fn snat_is_the_first_address_of_each_family() {
        let (v4, v6) = snat_addresses(&ips(&["2001:db8::10", "10.0.0.5", "192.168.1.10"]));
        assert_eq!(v4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(v6, Some("2001:db8::10".parse().unwrap()));
        assert_eq!(snat_addresses(&ips(&["10.0.0.5"])).1, None);
    }
}
