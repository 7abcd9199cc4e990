//! Which node announces an address: rendezvous (highest random weight) hashing of
//! (address, node name) over the eligible nodes. Every agent computes the same answer
//! from the same inputs, with no coordination and no API writes, and a node that leaves
//! or joins moves only the addresses it wins or won (about 1/n of them).
use std::net::IpAddr;

use xxhash_rust::xxh3::xxh3_64;

/// The weight of `node` for `ip`. xxh3 is specified and stable across versions and
/// platforms, so agents of different builds still agree (std's hasher promises
/// neither).
pub fn weight(ip: IpAddr, node: &str) -> u64 {
    let mut buf = Vec::with_capacity(17 + node.len());
    match ip {
        IpAddr::V4(a) => {
            buf.push(4);
            buf.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            buf.push(6);
            buf.extend_from_slice(&a.octets());
        }
    }
    buf.extend_from_slice(node.as_bytes());
    xxh3_64(&buf)
}

/// The node that announces `ip` among `candidates`: the highest weight, ties broken by
/// the smaller name so that the answer never depends on the candidates' order. `None`
/// when there is no candidate.
pub fn winner<'a>(ip: IpAddr, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|n| (weight(ip, n), std::cmp::Reverse(n)))
        .max()
        .map(|(_, std::cmp::Reverse(n))| n)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use super::*;

    fn ips(n: u32) -> Vec<IpAddr> {
        (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i))
                } else {
                    format!("2001:db8::{i:x}").parse().unwrap()
                }
            })
            .collect()
    }

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn assign(ips: &[IpAddr], nodes: &[String]) -> BTreeMap<IpAddr, String> {
        ips.iter()
            .map(|ip| {
                let w = winner(*ip, nodes.iter().map(String::as_str)).unwrap();
                (*ip, w.to_owned())
            })
            .collect()
    }

    #[test]
    fn one_winner_whatever_the_order() {
        let ns = nodes(7);
        let mut rev = ns.clone();
        rev.reverse();
        for ip in ips(200) {
            let a = winner(ip, ns.iter().map(String::as_str));
            let b = winner(ip, rev.iter().map(String::as_str));
            assert!(a.is_some());
            assert_eq!(a, b, "{ip}");
        }
        assert_eq!(winner(ips(1)[0], std::iter::empty()), None);
    }

    #[test]
    fn weights_are_fixed_across_builds() {
        // Agents of different versions must agree: pin a few weights.
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(weight(ip, "node-a"), weight(ip, "node-a"));
        assert_ne!(weight(ip, "node-a"), weight(ip, "node-b"));
        let v6: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_ne!(weight(ip, "node-a"), weight(v6, "node-a"));
        assert_eq!(
            weight(ip, "node-a"),
            0x071e_e747_3997_b59a,
            "{:#x}",
            weight(ip, "node-a")
        );
    }

    #[test]
    fn a_leaving_node_moves_only_its_addresses() {
        let all = ips(1000);
        let ns = nodes(5);
        let before = assign(&all, &ns);
        for gone in &ns {
            let rest: Vec<String> = ns.iter().filter(|n| *n != gone).cloned().collect();
            let after = assign(&all, &rest);
            for ip in &all {
                if before[ip] != *gone {
                    assert_eq!(
                        before[ip], after[ip],
                        "{ip} moved though {gone} did not hold it"
                    );
                } else {
                    assert_ne!(after[ip], *gone);
                }
            }
        }
    }

    #[test]
    fn a_joining_node_takes_only_what_it_wins_and_about_its_share() {
        let all = ips(3000);
        let ns = nodes(4);
        let before = assign(&all, &ns);
        let mut more = ns.clone();
        more.push("node-new".to_owned());
        let after = assign(&all, &more);
        let mut moved = 0;
        for ip in &all {
            if before[ip] != after[ip] {
                assert_eq!(after[ip], "node-new", "{ip} moved between old nodes");
                moved += 1;
            }
        }
        // 1/5 of 3000 = 600; the hash spreads within a few percent.
        assert!((450..=750).contains(&moved), "moved {moved}");
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for w in after.values() {
            *per.entry(w).or_default() += 1;
        }
        for (n, c) in per {
            assert!((450..=750).contains(&c), "{n} got {c}");
        }
    }
}
