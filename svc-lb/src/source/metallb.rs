//! MetalLB's own configuration kinds (`metallb.io/v1beta1` `IPAddressPool` and
//! `L2Advertisement`), so that a MetalLB user's configuration works unchanged.
//!
//! The serde types follow the API reference field by field (unknown fields are ignored,
//! as the API server's pruning would; a known field of the wrong type is an error).
//! [`Pool::from_object`] validates a pool into address ranges; the allocator
//! ([`crate::lbipam`]) works on those.
use std::{cmp::Ordering, fmt, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "metallb.io/v1beta1";
pub const KIND_POOL: &str = "IPAddressPool";
pub const KIND_L2_ADVERTISEMENT: &str = "L2Advertisement";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IPAddressPool {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: IPAddressPoolSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolSpec {
    /// CIDRs (`192.0.2.0/28`, `2001:db8::/120`) and inclusive ranges
    /// (`192.0.2.10-192.0.2.20`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Whether Services that name no pool and no address may get addresses from this
    /// pool (default true).
    #[serde(default)]
    pub auto_assign: Option<bool>,
    /// Skip IPv4 addresses ending in .0 and .255 (some old clients drop them).
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: Option<bool>,
    #[serde(default)]
    pub service_allocation: Option<ServiceAllocation>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
    #[serde(default)]
    pub namespace_selectors: Option<Vec<LabelSelector>>,
    #[serde(default)]
    pub service_selectors: Option<Vec<LabelSelector>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct L2Advertisement {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: L2AdvertisementSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    /// Pools announced by name; with neither this nor selectors, every pool.
    #[serde(default, rename = "ipAddressPools")]
    pub ip_address_pools: Option<Vec<String>>,
    #[serde(default, rename = "ipAddressPoolSelectors")]
    pub ip_address_pool_selectors: Option<Vec<LabelSelector>>,
    /// Nodes that may announce; none means every node.
    #[serde(default)]
    pub node_selectors: Option<Vec<LabelSelector>>,
    /// Interfaces to announce on; none means the default devices.
    #[serde(default)]
    pub interfaces: Option<Vec<String>>,
}

/// One inclusive address range of one family, as integers (IPv4 in the low 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub v6: bool,
    pub first: u128,
    pub last: u128,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (v6, n) = to_int(ip);
        v6 == self.v6 && (self.first..=self.last).contains(&n)
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.v6 == other.v6 && self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}",
            from_int(self.v6, self.first),
            from_int(self.v6, self.last)
        )
    }
}

pub fn to_int(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (true, u128::from(v6)),
    }
}

pub fn from_int(v6: bool, n: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(n.into())
    } else {
        // Ranges of IPv4 never leave 32 bits: they come from IPv4 addresses.
        IpAddr::V4(u32::try_from(n).unwrap_or(u32::MAX).into())
    }
}

/// A validated pool: what the allocator needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// Sorted, disjoint.
    pub ranges: Vec<Range>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    /// `spec.serviceAllocation.namespaces`: only Services of these namespaces may use
    /// the pool (`None`: every namespace).
    pub namespaces: Option<Vec<String>>,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Pool {
    /// Validates `obj`; the error names the field and the reason (the caller adds the
    /// object).
    pub fn from_object(obj: &IPAddressPool) -> Result<Pool, String> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let spec = &obj.spec;
        if spec.addresses.is_empty() {
            return Err("spec.addresses is empty: the pool has no addresses".to_owned());
        }
        let mut ranges = Vec::with_capacity(spec.addresses.len());
        for (i, raw) in spec.addresses.iter().enumerate() {
            let range = parse_range(raw.trim())
                .map_err(|why| format!("spec.addresses[{i}] '{raw}': {why}"))?;
            ranges.push((i, range));
        }
        ranges.sort_by_key(|(_, r)| *r);
        for pair in ranges.windows(2) {
            let ((i, a), (j, b)) = (pair[0], pair[1]);
            if a.overlaps(&b) {
                let (i, j) = (i.min(j), i.max(j));
                return Err(format!(
                    "spec.addresses[{i}] and spec.addresses[{j}] overlap ({a} and {b})"
                ));
            }
        }
        let mut namespaces = None;
        if let Some(sa) = &spec.service_allocation {
            let unsupported = [
                ("priority", sa.priority.is_some()),
                ("namespaceSelectors", sa.namespace_selectors.is_some()),
                ("serviceSelectors", sa.service_selectors.is_some()),
            ];
            if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "spec.serviceAllocation.{field} is not supported by svc-lb (only \
                     spec.serviceAllocation.namespaces is); the pool is not used rather than \
                     used for Services it should not serve"
                ));
            }
            namespaces = sa.namespaces.clone();
        }
        Ok(Pool {
            name,
            ranges: ranges.into_iter().map(|(_, r)| r).collect(),
            auto_assign: spec.auto_assign.unwrap_or(true),
            avoid_buggy_ips: spec.avoid_buggy_ips.unwrap_or(false),
            namespaces,
            labels: obj.metadata.labels.clone().unwrap_or_default(),
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip)) && !self.skips(ip)
    }

    /// Whether `avoidBuggyIPs` leaves `ip` out.
    pub fn skips(&self, ip: IpAddr) -> bool {
        self.avoid_buggy_ips && is_buggy(ip)
    }

    pub fn allows_namespace(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|ns| ns.iter().any(|n| n == namespace))
    }

    /// The number of usable addresses, per family (IPv4, IPv6), saturating.
    pub fn size(&self) -> u128 {
        self.ranges.iter().fold(0u128, |acc, r| {
            let mut n = (r.last - r.first).saturating_add(1);
            if self.avoid_buggy_ips && !r.v6 {
                n -= count_mod(r.first, r.last, 0) + count_mod(r.first, r.last, 255);
            }
            acc.saturating_add(n)
        })
    }
}

/// How many x in first..=last have x % 256 == rem.
fn count_mod(first: u128, last: u128, rem: u128) -> u128 {
    // Numbers ≤ n with x % 256 == rem: (n - rem) / 256 + 1 when n ≥ rem.
    let upto = |n: u128| if n < rem { 0 } else { (n - rem) / 256 + 1 };
    upto(last) - if first == 0 { 0 } else { upto(first - 1) }
}

fn is_buggy(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => matches!(v4.octets()[3], 0 | 255),
        IpAddr::V6(_) => false,
    }
}

/// `a.b.c.d/n`, `x::/n` (host bits must be zero), `A-B` (both of one family, A ≤ B), or
/// a single address.
pub fn parse_range(raw: &str) -> Result<Range, String> {
    if let Some((a, b)) = raw.split_once('-') {
        let a: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("'{}' is not an IP address", a.trim()))?;
        let b: IpAddr = b
            .trim()
            .parse()
            .map_err(|_| format!("'{}' is not an IP address", b.trim()))?;
        let ((av6, an), (bv6, bn)) = (to_int(a), to_int(b));
        if av6 != bv6 {
            return Err("the range mixes IPv4 and IPv6".to_owned());
        }
        if an.cmp(&bn) == Ordering::Greater {
            return Err(format!("the range is reversed ({a} is after {b})"));
        }
        return Ok(Range {
            v6: av6,
            first: an,
            last: bn,
        });
    }
    if raw.contains('/') {
        let net: IpNet = raw.parse().map_err(|_| "not a valid CIDR".to_owned())?;
        if net.network() != net.addr() {
            return Err(format!(
                "host bits are set (the network is {}/{})",
                net.network(),
                net.prefix_len()
            ));
        }
        let ((v6, first), (_, last)) = (to_int(net.network()), to_int(net.broadcast()));
        return Ok(Range { v6, first, last });
    }
    let ip: IpAddr = raw
        .parse()
        .map_err(|_| "neither a CIDR, a range A-B nor an IP address".to_owned())?;
    let (v6, n) = to_int(ip);
    Ok(Range {
        v6,
        first: n,
        last: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(addresses: &[&str]) -> IPAddressPool {
        IPAddressPool {
            metadata: ObjectMeta {
                name: Some("p".into()),
                ..Default::default()
            },
            spec: IPAddressPoolSpec {
                addresses: addresses.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn parses_cidrs_ranges_and_single_addresses_of_both_families() {
        let p = Pool::from_object(&pool(&[
            "192.0.2.0/30",
            "2001:db8::10-2001:db8::11",
            "198.51.100.7",
        ]))
        .unwrap();
        assert_eq!(p.size(), 4 + 2 + 1);
        assert!(p.contains("192.0.2.3".parse().unwrap()));
        assert!(!p.contains("192.0.2.4".parse().unwrap()));
        assert!(p.contains("2001:db8::11".parse().unwrap()));
        assert!(p.contains("198.51.100.7".parse().unwrap()));
        assert!(p.auto_assign);
    }

    #[test]
    fn bad_addresses_are_named_with_their_reason() {
        let cases = [
            (
                "192.0.2.0/33",
                "spec.addresses[0] '192.0.2.0/33': not a valid CIDR",
            ),
            ("192.0.2.1/24", "host bits are set"),
            ("192.0.2.9-192.0.2.1", "the range is reversed"),
            ("192.0.2.1-2001:db8::1", "mixes IPv4 and IPv6"),
            ("banana", "neither a CIDR"),
        ];
        for (raw, want) in cases {
            let err = Pool::from_object(&pool(&[raw])).unwrap_err();
            assert!(err.contains(want), "{raw}: {err}");
        }
        let err = Pool::from_object(&pool(&["192.0.2.0/28", "192.0.2.8-192.0.2.20"])).unwrap_err();
        assert!(
            err.contains("spec.addresses[0] and spec.addresses[1] overlap"),
            "{err}"
        );
        let err = Pool::from_object(&pool(&[])).unwrap_err();
        assert!(err.contains("spec.addresses is empty"), "{err}");
    }

    #[test]
    fn avoid_buggy_ips_skips_dot_zero_and_dot_255_only_in_ipv4() {
        let mut obj = pool(&["10.0.0.0/23", "2001:db8::/126"]);
        obj.spec.avoid_buggy_ips = Some(true);
        let p = Pool::from_object(&obj).unwrap();
        // 512 IPv4 less .0 and .255 of two /24s, plus 4 IPv6.
        assert_eq!(p.size(), 512 - 4 + 4);
        assert!(!p.contains("10.0.1.0".parse().unwrap()));
        assert!(!p.contains("10.0.0.255".parse().unwrap()));
        assert!(p.contains("10.0.1.1".parse().unwrap()));
        assert!(p.contains("2001:db8::".parse().unwrap()));
    }

    #[test]
    fn unsupported_service_allocation_keeps_the_pool_out() {
        let mut obj = pool(&["10.0.0.0/30"]);
        obj.spec.service_allocation = Some(ServiceAllocation {
            service_selectors: Some(vec![LabelSelector::default()]),
            ..Default::default()
        });
        let err = Pool::from_object(&obj).unwrap_err();
        assert!(err.contains("serviceSelectors is not supported"), "{err}");
        obj.spec.service_allocation = Some(ServiceAllocation {
            namespaces: Some(vec!["web".into()]),
            ..Default::default()
        });
        let p = Pool::from_object(&obj).unwrap();
        assert!(p.allows_namespace("web") && !p.allows_namespace("default"));
    }

    #[test]
    fn deserializes_the_api_field_names() {
        let obj: L2Advertisement = serde_json::from_value(serde_json::json!({
            "apiVersion": "metallb.io/v1beta1", "kind": "L2Advertisement",
            "metadata": {"name": "l2", "namespace": "metallb-system"},
            "spec": {"ipAddressPools": ["a"], "interfaces": ["eth0"],
                     "nodeSelectors": [{"matchLabels": {"x": "y"}}]}
        }))
        .unwrap();
        assert_eq!(obj.spec.ip_address_pools, Some(vec!["a".to_owned()]));
        assert_eq!(obj.spec.interfaces, Some(vec!["eth0".to_owned()]));
        let bad = serde_json::from_value::<IPAddressPool>(serde_json::json!({
            "metadata": {"name": "p"}, "spec": {"autoAssign": "yes"}
        }));
        assert!(bad.is_err());
    }
}
