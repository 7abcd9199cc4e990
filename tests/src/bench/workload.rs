//! What the bench loads: N Services with 3 endpoints each (or E at the wide points)
//! plus one hot Service with 100 endpoints and [`CHURN_SERVICES`] churn Services, and
//! the same set written three ways: manifests for svc-lb, an iptables-restore file in
//! kube-proxy's iptables layout, and an `nft -f` file in kube-proxy's nftables layout.
//!
//! Addresses. ClusterIPs come from 10.96.0.0/12, in order. Every client namespace has
//! routes only to its own backend links, so the filler Services' endpoints (from
//! 10.128.0.0 up, one distinct "pod IP" each: 10.128.0.0/12 holds the 1 M of 100 000 × 10)
//! and the churn Services' (from 10.144.0.0) are unreachable on purpose: a packet
//! sent to one fails locally and never leaves the lab. Only two Services have live
//! endpoints:
//! - the *measured* Service (TCP 80 → 8080 and UDP 53 → 8053) on the three backends'
//!   primary addresses, placed in the middle of the Service order, which is where an
//!   average Service sits in iptables' linear KUBE-SERVICES chain;
//! - the *hot* Service (TCP 80 → 8080) with 100 endpoints: extra addresses spread over
//!   the three backend namespaces, placed right after the measured one.
//!
//! Planes. Each mode that rewrites addresses has its own client namespace (so that one
//! mode's netfilter rules and conntrack never tax another mode's packets), linked to the
//! same three backend namespaces over its own /24s: plane 0 (direct and svc-lb)
//! 10.240.k.0/24, plane 1 (iptables) 10.241.k.0/24, plane 2 (nftables) 10.242.k.0/24.
//! The same VIPs are used in every plane; only the live endpoints' addresses differ.
use std::{fmt::Write as _, net::Ipv4Addr};

use serde_json::json;

use crate::manifests::{EndpointSlice, Protocol, Service, TargetPort};

/// The Service (ClusterIP) range every VIP comes from, the hot Service's included.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const SVC_TCP_PORT: u16 = 80;
pub const SVC_UDP_PORT: u16 = 53;
pub const TCP_TARGET_PORT: u16 = 8080;
pub const UDP_TARGET_PORT: u16 = 8053;
pub const HOT_ENDPOINTS: usize = 100;
/// The backend namespaces, by reply id. Backend `k` (1-based) answers with `IDS[k-1]`.
pub const IDS: [char; 3] = ['a', 'b', 'c'];
/// The backend that the propagation measurement removes from the measured Service.
pub const REMOVED: u8 = 3;
/// Kubernetes namespace of every generated object.
pub const K8S_NS: &str = "bench";
/// Services per manifest file (a `kind: List` in JSON, as `kubectl get -o json` writes).
pub const SERVICES_PER_FILE: usize = 100;
pub const MEASURED_FILE: &str = "measured.json";
/// Services whose endpoints the churn measurement keeps changing, each in a manifest file
/// of its own (as one changed object arrives from the API), at every scale point.
pub const CHURN_SERVICES: usize = 20;

/// Which client namespace (and /24s) a mode uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    SvcLb = 0,
    Iptables = 1,
    Nftables = 2,
}

impl Plane {
    pub const ALL: [Plane; 3] = [Plane::SvcLb, Plane::Iptables, Plane::Nftables];

    fn octet(self) -> u8 {
        240 + self as u8
    }

    /// Backend `k`'s address on this plane (`10.24p.k.2`).
    pub fn backend(self, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet(), k, 2)
    }

    /// The client side of backend `k`'s link (`10.24p.k.1`).
    pub fn client(self, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet(), k, 1)
    }

    /// The NAT planes' client address for Service traffic (`10.24p.0.1`), on a dummy
    /// device; see [`super::net`].
    pub fn service_source(self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet(), 0, 1)
    }

    /// The hot Service's endpoints on this plane: `10.24p.k.h`, k = 1..=3, h from 10.
    pub fn hot_endpoints(self) -> Vec<Ipv4Addr> {
        (0..HOT_ENDPOINTS)
            .map(|j| {
                let k = u8::try_from(j % 3 + 1).unwrap_or(1);
                let h = u8::try_from(10 + j / 3).unwrap_or(255);
                Ipv4Addr::new(10, self.octet(), k, h)
            })
            .collect()
    }

    /// The measured Service's endpoints: the three backends' primary addresses.
    pub fn measured_endpoints(self) -> Vec<Ipv4Addr> {
        (1..=3).map(|k| self.backend(k)).collect()
    }
}

fn offset(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(u32::try_from(i).unwrap_or(u32::MAX)))
}

/// ClusterIP of Service `i` in the Service order.
pub fn vip(i: usize) -> Ipv4Addr {
    offset(Ipv4Addr::new(10, 96, 0, 10), i)
}

pub fn hot_vip() -> Ipv4Addr {
    Ipv4Addr::new(10, 110, 0, 10)
}

fn filler_endpoint(i: usize, e: usize, eps: usize) -> Ipv4Addr {
    offset(Ipv4Addr::new(10, 128, 0, 0), i * eps + e)
}

fn churn_vip(i: usize) -> Ipv4Addr {
    offset(Ipv4Addr::new(10, 111, 0, 10), i)
}

fn churn_endpoint(i: usize, e: usize) -> Ipv4Addr {
    offset(Ipv4Addr::new(10, 144, 0, 0), i * 3 + e)
}

/// Churn Service `i` with all three endpoints, or (`removed`) without its last one.
pub fn churn_service(i: usize, removed: bool) -> Svc {
    let k = if removed { 2 } else { 3 };
    Svc {
        name: format!("churn-{i:03}"),
        vip: churn_vip(i),
        ports: vec![HTTP],
        endpoints: (0..k).map(|e| churn_endpoint(i, e)).collect(),
    }
}

/// The manifest file of churn Service `i`.
pub fn churn_file(i: usize) -> String {
    format!("churn-{i:03}.json")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: &'static str,
    pub udp: bool,
    pub port: u16,
    pub target: u16,
}

const HTTP: Port = Port {
    name: "http",
    udp: false,
    port: SVC_TCP_PORT,
    target: TCP_TARGET_PORT,
};
const DNS: Port = Port {
    name: "dns",
    udp: true,
    port: SVC_UDP_PORT,
    target: UDP_TARGET_PORT,
};

/// One Service with its ready endpoints.
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Ipv4Addr>,
}

/// The Service set of one scale point.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Services with [`Self::eps`] endpoints, the measured one included (the hot and the
    /// churn Services come on top).
    pub n: usize,
    /// Endpoints per filler Service (the measured one always has the three backends).
    pub eps: usize,
}

impl Workload {
    pub fn new(n: usize) -> Self {
        Self::wide(n, 3)
    }

    /// N Services with `eps` endpoints each.
    pub fn wide(n: usize, eps: usize) -> Self {
        Self {
            n: n.max(1),
            eps: eps.max(1),
        }
    }

    /// Index of the measured Service in the Service order.
    pub fn measured_index(&self) -> usize {
        self.n / 2
    }

    pub fn measured_vip(&self) -> Ipv4Addr {
        vip(self.measured_index())
    }

    /// The measured Service on `plane`, with all three endpoints or without backend
    /// [`REMOVED`].
    pub fn measured(&self, plane: Plane, removed: bool) -> Svc {
        let mut endpoints = plane.measured_endpoints();
        if removed {
            endpoints.retain(|a| *a != plane.backend(REMOVED));
        }
        Svc {
            name: "measured".into(),
            vip: self.measured_vip(),
            ports: vec![HTTP, DNS],
            endpoints,
        }
    }

    pub fn hot(&self, plane: Plane) -> Svc {
        Svc {
            name: "hot".into(),
            vip: hot_vip(),
            ports: vec![HTTP],
            endpoints: plane.hot_endpoints(),
        }
    }

    fn filler(&self, i: usize) -> Svc {
        Svc {
            name: format!("svc-{i:06}"),
            vip: vip(i),
            ports: vec![HTTP],
            endpoints: (0..self.eps)
                .map(|e| filler_endpoint(i, e, self.eps))
                .collect(),
        }
    }

    /// Every Service in order: fillers, with the measured one at [`Self::measured_index`]
    /// and the hot one right after it, then the churn Services.
    pub fn services(&self, plane: Plane) -> Vec<Svc> {
        let mut out = Vec::with_capacity(self.total_services());
        for i in 0..self.n {
            if i == self.measured_index() {
                out.push(self.measured(plane, false));
                out.push(self.hot(plane));
            } else {
                out.push(self.filler(i));
            }
        }
        out.extend((0..CHURN_SERVICES).map(|i| churn_service(i, false)));
        out
    }

    /// Total Services (N plus the hot and the churn ones).
    pub fn total_services(&self) -> usize {
        self.n + 1 + CHURN_SERVICES
    }
}

// ---------------------------------------------------------------------------------
// svc-lb: manifests

fn protocol(p: &Port) -> Protocol {
    if p.udp { Protocol::Udp } else { Protocol::Tcp }
}

/// The Service and its EndpointSlice as `kubectl get -o json` documents.
pub fn manifest_objects(s: &Svc) -> [serde_json::Value; 2] {
    let mut svc = Service::new(K8S_NS, &s.name, &[s.vip.into()]);
    let mut slice = EndpointSlice::new(K8S_NS, &s.name, "bench", false);
    for p in &s.ports {
        svc = svc.port(p.name, p.port, TargetPort::Number(p.target), protocol(p));
        slice = slice.port(p.name, p.target, protocol(p));
    }
    let addrs: Vec<std::net::IpAddr> = s.endpoints.iter().map(|a| (*a).into()).collect();
    slice = slice.ready_endpoints(&addrs);
    [svc.to_value(), slice.to_value()]
}

/// A `kind: List` JSON document of these Services and their slices.
pub fn manifest_list(svcs: &[Svc]) -> String {
    let items: Vec<serde_json::Value> = svcs.iter().flat_map(manifest_objects).collect();
    json!({ "apiVersion": "v1", "kind": "List", "metadata": { "resourceVersion": "" }, "items": items })
        .to_string()
}

/// Manifest files for svc-lb: (file name, content). The measured Service has a file of
/// its own, so that an endpoint change rewrites one small file, as one changed object
/// would arrive from the API; the others are grouped [`SERVICES_PER_FILE`] to a file.
pub fn manifest_files(w: &Workload) -> Vec<(String, String)> {
    let mut rest = Vec::new();
    let mut measured = None;
    let mut churn = Vec::new();
    for s in w.services(Plane::SvcLb) {
        if s.name == "measured" {
            measured = Some(s);
        } else if s.name.starts_with("churn-") {
            churn.push(s);
        } else {
            rest.push(s);
        }
    }
    let mut out: Vec<(String, String)> = rest
        .chunks(SERVICES_PER_FILE)
        .enumerate()
        .map(|(i, c)| (format!("svc-{i:05}.json"), manifest_list(c)))
        .collect();
    for (i, c) in churn.into_iter().enumerate() {
        out.push((churn_file(i), manifest_list(&[c])));
    }
    if let Some(m) = measured {
        out.push((MEASURED_FILE.into(), manifest_list(&[m])));
    }
    out
}

// ---------------------------------------------------------------------------------
// Names shared by the two kube-proxy layouts

/// FNV-1a: a stable, dependency-free hash for chain names.
fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn port_id(s: &Svc, p: &Port) -> String {
    format!("{K8S_NS}/{}:{}", s.name, p.name)
}

fn proto_name(p: &Port) -> &'static str {
    if p.udp { "udp" } else { "tcp" }
}

// ---------------------------------------------------------------------------------
// iptables (kube-proxy's iptables mode, nat table)

fn ipt_svc_chain(s: &Svc, p: &Port) -> String {
    format!("KUBE-SVC-{:016X}", fnv(&port_id(s, p)))
}

fn ipt_sep_chain(s: &Svc, p: &Port, ep: Ipv4Addr) -> String {
    format!("KUBE-SEP-{:016X}", fnv(&format!("{}|{ep}", port_id(s, p))))
}

/// The KUBE-SVC chain's rules: `statistic --mode random` with probability 1/(n−i), the
/// last endpoint unconditional, as kube-proxy writes them.
fn ipt_svc_rules(out: &mut String, s: &Svc, p: &Port) {
    let chain = ipt_svc_chain(s, p);
    let id = port_id(s, p);
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = ipt_sep_chain(s, p, *ep);
        let target = p.target;
        if i + 1 < n {
            let prob = 1.0 / (n - i) as f64;
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment \"{id} -> {ep}:{target}\" -m statistic --mode random --probability {prob:.10} -j {sep}"
            );
        } else {
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment \"{id} -> {ep}:{target}\" -j {sep}"
            );
        }
    }
}

fn ipt_sep_rules(out: &mut String, s: &Svc, p: &Port, ep: Ipv4Addr) {
    let sep = ipt_sep_chain(s, p, ep);
    let id = port_id(s, p);
    let proto = proto_name(p);
    let _ = writeln!(
        out,
        "-A {sep} -s {ep}/32 -m comment --comment {id} -j KUBE-MARK-MASQ"
    );
    let _ = writeln!(
        out,
        "-A {sep} -p {proto} -m comment --comment {id} -m {proto} -j DNAT --to-destination {ep}:{}",
        p.target
    );
}

/// A full `iptables-restore` input for the nat table: KUBE-SERVICES with one rule per
/// Service port (then the KUBE-NODEPORTS rule kube-proxy always puts last), a KUBE-SVC
/// chain per Service port, a KUBE-SEP chain per endpoint with the DNAT, hooked into
/// OUTPUT as kube-proxy does for host clients. The filter table's rules (which only
/// reject Services without endpoints) are left out: every Service here has endpoints.
pub fn iptables_ruleset(svcs: &[Svc]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str("*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for s in svcs {
        for p in &s.ports {
            let svc_chain = ipt_svc_chain(s, p);
            let proto = proto_name(p);
            let _ = writeln!(chains, ":{svc_chain} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -d {}/32 -p {proto} -m comment --comment \"{} cluster IP\" -m {proto} --dport {} -j {svc_chain}",
                s.vip,
                port_id(s, p),
                p.port
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for s in svcs {
        for p in &s.ports {
            ipt_svc_rules(&mut rules, s, p);
            for ep in &s.endpoints {
                let _ = writeln!(chains, ":{} - [0:0]", ipt_sep_chain(s, p, *ep));
                ipt_sep_rules(&mut rules, s, p, *ep);
            }
        }
    }
    chains.push_str(&rules);
    chains.push_str("COMMIT\n");
    chains
}

/// The partial sync kube-proxy would run (`iptables-restore --noflush`) when `from`
/// becomes `to` (same Service, different endpoints): the Service's KUBE-SVC chains are
/// rewritten, new KUBE-SEP chains written, stale ones flushed and deleted.
pub fn iptables_change(from: &Svc, to: &Svc) -> String {
    let mut chains = String::from("*nat\n");
    let mut rules = String::new();
    let mut deletes = String::new();
    for p in &to.ports {
        let _ = writeln!(chains, ":{} - [0:0]", ipt_svc_chain(to, p));
        ipt_svc_rules(&mut rules, to, p);
        for ep in to.endpoints.iter().filter(|e| !from.endpoints.contains(e)) {
            let _ = writeln!(chains, ":{} - [0:0]", ipt_sep_chain(to, p, *ep));
            ipt_sep_rules(&mut rules, to, p, *ep);
        }
        for ep in from.endpoints.iter().filter(|e| !to.endpoints.contains(e)) {
            let sep = ipt_sep_chain(from, p, *ep);
            // Declaring the chain flushes it; then nothing refers to it and it can go.
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let _ = writeln!(deletes, "-X {sep}");
        }
    }
    chains.push_str(&rules);
    chains.push_str(&deletes);
    chains.push_str("COMMIT\n");
    chains
}

/// Input that empties the nat table (user chains deleted, built-in chains flushed).
pub const IPTABLES_EMPTY: &str = "*nat\nCOMMIT\n";

// ---------------------------------------------------------------------------------
// nftables (kube-proxy's nftables mode)

pub const NFT_TABLE: &str = "ip kube-proxy";

fn nft_svc_chain(s: &Svc, p: &Port) -> String {
    let id = port_id(s, p);
    format!(
        "service-{:08X}-{K8S_NS}/{}/{}/{}",
        fnv(&id) as u32,
        s.name,
        proto_name(p),
        p.name
    )
}

fn nft_ep_chain(s: &Svc, p: &Port, ep: Ipv4Addr) -> String {
    let id = format!("{}|{ep}", port_id(s, p));
    format!(
        "endpoint-{:08X}-{K8S_NS}/{}/{}/{}__{ep}/{}",
        fnv(&id) as u32,
        s.name,
        proto_name(p),
        p.name,
        p.target
    )
}

fn nft_ep(out: &mut String, s: &Svc, p: &Port, ep: Ipv4Addr) {
    let c = nft_ep_chain(s, p, ep);
    let _ = writeln!(out, "add chain {NFT_TABLE} {c}");
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {c} ip saddr {ep} jump mark-for-masquerade"
    );
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {c} meta l4proto {} dnat to {ep}:{}",
        proto_name(p),
        p.target
    );
}

/// The service chain's dispatch: `numgen random mod n vmap { i : goto endpoint-i }`.
fn nft_dispatch(out: &mut String, s: &Svc, p: &Port) {
    let c = nft_svc_chain(s, p);
    let elems: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", nft_ep_chain(s, p, *ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {c} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        elems.join(", ")
    );
}

/// A full `nft -f` input: the `service-ips` verdict map keyed on address, protocol and
/// port, dispatching to a chain per Service port that picks an endpoint chain with
/// `numgen random`, each endpoint chain doing the DNAT; hooked at nat output for host
/// clients. As with iptables, the filter-side chains are left out.
pub fn nft_ruleset(svcs: &[Svc]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "add table {NFT_TABLE}\n\
         add chain {NFT_TABLE} mark-for-masquerade\n\
         add rule {NFT_TABLE} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {NFT_TABLE} masquerading\n\
         add rule {NFT_TABLE} masquerading mark and 0x4000 == 0 return\n\
         add rule {NFT_TABLE} masquerading mark set mark xor 0x4000\n\
         add rule {NFT_TABLE} masquerading masquerade fully-random\n\
         add chain {NFT_TABLE} nat-output {{ type nat hook output priority -100 ; policy accept ; }}\n\
         add chain {NFT_TABLE} nat-postrouting {{ type nat hook postrouting priority 100 ; policy accept ; }}\n\
         add chain {NFT_TABLE} services\n\
         add map {NFT_TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}"
    );
    let mut elems = Vec::new();
    for s in svcs {
        for p in &s.ports {
            for ep in &s.endpoints {
                nft_ep(&mut out, s, p, *ep);
            }
            let c = nft_svc_chain(s, p);
            let _ = writeln!(out, "add chain {NFT_TABLE} {c}");
            nft_dispatch(&mut out, s, p);
            elems.push(format!(
                "{} . {} . {} : goto {c}",
                s.vip,
                proto_name(p),
                p.port
            ));
        }
    }
    for chunk in elems.chunks(1000) {
        let _ = writeln!(
            out,
            "add element {NFT_TABLE} service-ips {{ {} }}",
            chunk.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {NFT_TABLE} nat-output jump services\n\
         add rule {NFT_TABLE} nat-postrouting jump masquerading"
    );
    out
}

/// kube-proxy's partial sync for an endpoint change: new endpoint chains, the service
/// chains' dispatch rewritten, stale endpoint chains deleted, in one transaction.
pub fn nft_change(from: &Svc, to: &Svc) -> String {
    let mut out = String::new();
    for p in &to.ports {
        for ep in to.endpoints.iter().filter(|e| !from.endpoints.contains(e)) {
            nft_ep(&mut out, to, p, *ep);
        }
        let _ = writeln!(out, "flush chain {NFT_TABLE} {}", nft_svc_chain(to, p));
        nft_dispatch(&mut out, to, p);
        for ep in from.endpoints.iter().filter(|e| !to.endpoints.contains(e)) {
            let c = nft_ep_chain(from, p, *ep);
            let _ = writeln!(out, "flush chain {NFT_TABLE} {c}");
            let _ = writeln!(out, "delete chain {NFT_TABLE} {c}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_is_in_the_middle_and_hot_follows() {
        let w = Workload::new(1000);
        let s = w.services(Plane::Iptables);
        assert_eq!(s.len(), 1001 + CHURN_SERVICES);
        assert_eq!(s.len(), w.total_services());
        assert_eq!(s[500].name, "measured");
        assert_eq!(s[501].name, "hot");
        assert_eq!(s[501].endpoints.len(), HOT_ENDPOINTS);
        assert_eq!(s[500].endpoints, Plane::Iptables.measured_endpoints());
        let one = Workload::new(1).services(Plane::SvcLb);
        assert_eq!(
            one.iter()
                .take(3)
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["measured", "hot", "churn-000"]
        );
        let wide = Workload::wide(10, 10).services(Plane::SvcLb);
        assert_eq!(wide[0].endpoints.len(), 10);
        assert_eq!(wide[5].endpoints.len(), 3, "the measured Service keeps 3");
    }

    #[test]
    fn addresses_are_distinct_and_in_their_ranges() {
        let hot = Plane::Nftables.hot_endpoints();
        let set: std::collections::BTreeSet<_> = hot.iter().collect();
        assert_eq!(set.len(), HOT_ENDPOINTS);
        assert!(
            hot.iter()
                .all(|a| a.octets()[1] == 242 && a.octets()[3] >= 10)
        );
        assert_eq!(vip(0), Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(vip(100_000), Ipv4Addr::new(10, 97, 134, 170));
        assert_eq!(
            filler_endpoint(99_999, 2, 3),
            Ipv4Addr::new(10, 132, 147, 223)
        );
        // 100 000 × 10 stays below the churn Services' endpoints.
        assert!(filler_endpoint(99_999, 9, 10) < churn_endpoint(0, 0));
        assert!(churn_vip(CHURN_SERVICES) < Ipv4Addr::new(10, 112, 0, 0));
    }

    #[test]
    fn iptables_layout_is_kube_proxy_like() {
        let w = Workload::new(3);
        let text = iptables_ruleset(&w.services(Plane::Iptables));
        assert!(text.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n"));
        assert!(text.ends_with("COMMIT\n"));
        // 2 ports for the measured Service, 1 each for 2 fillers, hot and the churn ones.
        assert_eq!(
            text.matches("-A KUBE-SERVICES -d ").count(),
            5 + CHURN_SERVICES
        );
        assert!(text.contains("--probability 0.3333333333 -j KUBE-SEP-"));
        assert!(text.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert!(text.contains("-j DNAT --to-destination 10.241.3.2:8053"));
        // The nodeports rule is last in KUBE-SERVICES.
        let last = text
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last.contains("KUBE-NODEPORTS"));
    }

    #[test]
    fn iptables_change_drops_the_removed_endpoint() {
        let w = Workload::new(10);
        let from = w.measured(Plane::Iptables, false);
        let to = w.measured(Plane::Iptables, true);
        let text = iptables_change(&from, &to);
        assert_eq!(text.matches("\n-X KUBE-SEP-").count(), 2);
        assert!(!text.contains("10.241.3.2:"));
        assert!(text.contains("--probability 0.5000000000"));
        let back = iptables_change(&to, &from);
        assert!(back.contains("DNAT --to-destination 10.241.3.2:8080"));
        assert!(!back.contains("-X "));
    }

    #[test]
    fn nft_layout_is_kube_proxy_like() {
        let w = Workload::new(2);
        let text = nft_ruleset(&w.services(Plane::Nftables));
        assert!(text.contains("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }"));
        assert!(text.contains("numgen random mod 100 vmap { 0 : goto endpoint-"));
        assert!(text.contains("10.96.0.11 . udp . 53 : goto service-"));
        assert!(text.contains("dnat to 10.242.3.2:8053"));
        let change = nft_change(
            &w.measured(Plane::Nftables, false),
            &w.measured(Plane::Nftables, true),
        );
        assert_eq!(change.matches("delete chain").count(), 2);
        assert_eq!(change.matches("numgen random mod 2 vmap").count(), 2);
    }

    #[test]
    fn manifests_put_the_measured_service_in_its_own_file() {
        let files = manifest_files(&Workload::new(250));
        assert_eq!(files.len(), 4 + CHURN_SERVICES);
        let (name, content) = files.last().unwrap();
        assert_eq!(name, MEASURED_FILE);
        let v: serde_json::Value = serde_json::from_str(content).unwrap();
        assert_eq!(v["items"].as_array().unwrap().len(), 2);
        assert_eq!(v["items"][1]["endpoints"].as_array().unwrap().len(), 3);
        let all: usize = files
            .iter()
            .map(|(_, c)| {
                c.matches("\"apiVersion\":\"v1\",\"kind\":\"Service\"")
                    .count()
            })
            .sum();
        assert_eq!(all, 251 + CHURN_SERVICES);
        assert!(files.iter().any(|(n, _)| n == &churn_file(0)));
    }
}
