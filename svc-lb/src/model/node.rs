//! What the agent learns about its own Node object: the zone (for topology hints) and
//! the addresses node ports are reachable on.
use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::core::v1::Node;

use super::NodeInfo;

/// The well-known zone label, set by the cloud provider or the installer.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// Completes `base` (the name and proxy name from the command line) with what the Node
/// object says. Without a Node (not created yet, or manifest mode) the zone and the
/// addresses stay as `base` has them.
///
/// Only `InternalIP` and `ExternalIP` addresses count: those are the ones clients dial
/// with a node port. Hostnames and unparsable entries are ignored.
pub fn node_info(base: &NodeInfo, node: Option<&Node>) -> NodeInfo {
    let mut info = base.clone();
    let Some(node) = node else {
        return info;
    };
    info.zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .filter(|z| !z.is_empty())
        .cloned();
    let addresses: BTreeSet<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .collect();
    info.addresses = addresses.into_iter().collect();
    info
}

/// The Node's primary address of each family, kube-proxy's "node IPs" (which its
/// `--nodeport-addresses primary` turns into a /32 and a /128): the first InternalIP,
/// else the first ExternalIP, and then the first address of the other family in the same
/// order (k8s.io/component-helpers/node/util `GetNodeHostIPs`). Empty without a Node.
pub fn primary_ips(node: Option<&Node>) -> Vec<IpAddr> {
    let addrs = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref());
    let of_type = |t: &'static str| {
        addrs
            .into_iter()
            .flatten()
            .filter(move |a| a.type_ == t)
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
    };
    let mut all = of_type("InternalIP").chain(of_type("ExternalIP"));
    let Some(first) = all.next() else {
        return Vec::new();
    };
    let mut out = vec![first];
    out.extend(all.find(|a| a.is_ipv4() != first.is_ipv4()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> Node {
        serde_yaml::from_str(yaml).expect("a Node")
    }

    #[test]
    fn zone_and_addresses_come_from_the_node() {
        let base = NodeInfo {
            name: Some("n1".into()),
            service_proxy_name: Some("svc-lb".into()),
            ..NodeInfo::default()
        };
        let n = node(
            r#"
kind: Node
metadata:
  name: n1
  labels: {topology.kubernetes.io/zone: zone-a}
status:
  addresses:
  - {type: Hostname, address: n1}
  - {type: InternalIP, address: 192.168.1.10}
  - {type: InternalIP, address: "fd00::10"}
  - {type: ExternalIP, address: 203.0.113.7}
  - {type: InternalIP, address: 192.168.1.10}
  - {type: InternalDNS, address: n1.example}
  - {type: ExternalIP, address: not-an-ip}
"#,
        );
        let info = node_info(&base, Some(&n));
        assert_eq!(info.name.as_deref(), Some("n1"));
        assert_eq!(info.service_proxy_name.as_deref(), Some("svc-lb"));
        assert_eq!(info.zone.as_deref(), Some("zone-a"));
        let want: Vec<IpAddr> = ["192.168.1.10", "203.0.113.7", "fd00::10"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(info.addresses, want);
    }

    #[test]
    fn without_a_node_the_base_is_kept() {
        let base = NodeInfo {
            name: Some("n1".into()),
            zone: Some("z".into()),
            ..NodeInfo::default()
        };
        assert_eq!(node_info(&base, None), base);
        // A Node without the label or addresses clears what a previous Node said.
        let bare =
            node("{kind: Node, metadata: {name: n1, labels: {topology.kubernetes.io/zone: ''}}}");
        let info = node_info(&base, Some(&bare));
        assert_eq!(info.zone, None);
        assert!(info.addresses.is_empty());
    }

    #[test]
    fn primary_ips_are_internal_first_one_per_family() {
        let ips = |yaml: &str| -> Vec<String> {
            primary_ips(Some(&node(yaml)))
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let both = r#"
kind: Node
status:
  addresses:
  - {type: ExternalIP, address: 203.0.113.7}
  - {type: InternalIP, address: 192.168.1.10}
  - {type: InternalIP, address: 192.168.1.11}
  - {type: ExternalIP, address: "2001:db8::7"}
  - {type: InternalIP, address: "fd00::10"}
"#;
        assert_eq!(ips(both), ["192.168.1.10", "fd00::10"]);
        // Only external addresses: the first one, then the other family's.
        let external = r#"
kind: Node
status:
  addresses:
  - {type: Hostname, address: n1}
  - {type: ExternalIP, address: "2001:db8::7"}
  - {type: ExternalIP, address: 203.0.113.7}
"#;
        assert_eq!(ips(external), ["2001:db8::7", "203.0.113.7"]);
        assert!(
            ips("{kind: Node, status: {addresses: [{type: Hostname, address: n1}]}}").is_empty()
        );
        assert!(primary_ips(None).is_empty());
    }
}
