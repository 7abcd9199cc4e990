//! LoadBalancer IP allocation (IPAM) from MetalLB `IPAddressPool`s.
//!
//! [`allocate`] is pure: pools, the Services of type LoadBalancer (class unset or
//! [`LB_CLASS`]) and the addresses they already hold in, one allocation out. The rules:
//! - A Service gets one address per IP family it asks for (`spec.ipFamilies`, else the
//!   families of its cluster IPs, else IPv4). Under `PreferDualStack` a family that no
//!   usable pool has is dropped; otherwise a family that cannot be served leaves the
//!   whole Service pending (all or nothing, so a half-served Service never appears).
//! - Three passes, each over Services in namespace/name order:
//!   1. held addresses (the agent's previous allocation, and `status.loadBalancer.ingress`
//!      entries inside a pool) are kept, so that allocation is stable: a new Service
//!      never moves another one's address;
//!   2. requested addresses (`spec.loadBalancerIP`, the `metallb.universe.tf/` or
//!      `metallb.io/loadBalancerIPs` annotation), which must lie in a pool (the named
//!      one, with the `address-pool` annotation) and be free or shareable;
//!   3. everything else: the lowest free address of the first pool (by name) that
//!      allows the Service (its family, `autoAssign` or named by the `address-pool`
//!      annotation, `serviceAllocation.namespaces`).
//! - `allow-shared-ip` (either prefix): Services with the same key, pairwise disjoint
//!   ports and the same traffic policy (all `Cluster`, or all `Local` with one selector)
//!   share one address; pass 3 reuses such an address before taking a new one.
//! - A conflict, an exhausted pool or a requested address in no pool leaves the
//!   Service pending with the reason.
//!
//! Manifest mode (no status to write): every agent computes the same allocation from the
//! same directory when it starts. While it runs, its previous allocation counts as held,
//! so a new Service never moves another one; an agent started later, though, computes
//! from scratch, and if a Service was inserted before others in namespace/name order
//! meanwhile, the two may differ. Addresses that must agree across agents whatever the
//! history are pinned in the manifests (`loadBalancerIPs` or `status.loadBalancer`).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{
    api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};

use crate::{
    model::ServiceRef,
    source::{
        Snapshot,
        metallb::{self, IPAddressPool, L2Advertisement, Pool},
    },
};

pub mod leader;
#[cfg(test)]
mod tests;

/// The `spec.loadBalancerClass` svc-lb allocates for (besides an unset class).
pub const LB_CLASS: &str = "svc-lb.io/lb";

const PREFIXES: [&str; 2] = ["metallb.universe.tf/", "metallb.io/"];

/// One address allocated to one Service, with the pool it came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allocated {
    pub service: ServiceRef,
    pub ip: IpAddr,
    pub pool: String,
}

/// An `L2Advertisement`, resolved: the pools it announces (by name) and where.
#[derive(Clone, Debug, PartialEq)]
pub struct L2Advert {
    pub name: String,
    pub pools: Vec<String>,
    /// Empty: the default devices (the external path's).
    pub interfaces: Vec<String>,
    /// Empty: every node.
    pub node_selectors: Vec<LabelSelector>,
}

/// Use of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    /// Usable addresses (saturating).
    pub size: u128,
    /// Addresses allocated (a shared address counts once).
    pub used: u128,
}

impl PoolUsage {
    pub fn free(&self) -> u128 {
        self.size.saturating_sub(self.used)
    }
}

/// What [`allocate`] decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocation {
    /// The addresses of every Service that got all of its families, one per family.
    pub assigned: BTreeMap<ServiceRef, Vec<Allocated>>,
    /// Services left without addresses, and why.
    pub pending: BTreeMap<ServiceRef, String>,
    pub pools: Vec<PoolUsage>,
}

impl Allocation {
    /// Every allocated address, in Service order.
    pub fn addresses(&self) -> impl Iterator<Item = &Allocated> {
        self.assigned.values().flatten()
    }

    /// The pool an allocated address of `service` came from.
    pub fn pool_of(&self, service: &ServiceRef, ip: IpAddr) -> Option<&str> {
        self.assigned
            .get(service)?
            .iter()
            .find(|a| a.ip == ip)
            .map(|a| a.pool.as_str())
    }
}

/// Validates the pools of a snapshot: each bad pool is left out with its reason
/// ("IPAddressPool ns/name: why"). A pool that overlaps an earlier one (by name) or
/// repeats its name is left out too.
pub fn pools(objects: impl IntoIterator<Item = Arc<IPAddressPool>>) -> (Vec<Pool>, Vec<String>) {
    let mut objects: Vec<_> = objects.into_iter().collect();
    objects.sort_by(|a, b| {
        (&a.metadata.name, &a.metadata.namespace).cmp(&(&b.metadata.name, &b.metadata.namespace))
    });
    let mut out: Vec<Pool> = Vec::new();
    let mut errors = Vec::new();
    for obj in objects {
        let what = format!(
            "{} {}/{}",
            metallb::KIND_POOL,
            obj.metadata.namespace.as_deref().unwrap_or("default"),
            obj.metadata.name.as_deref().unwrap_or_default()
        );
        let pool = match Pool::from_object(&obj) {
            Ok(pool) => pool,
            Err(why) => {
                errors.push(format!("{what}: {why}; the pool is not used"));
                continue;
            }
        };
        if out.iter().any(|p| p.name == pool.name) {
            errors.push(format!(
                "{what}: another pool has the name {}; this one is not used",
                pool.name
            ));
            continue;
        }
        let clash = out.iter().find_map(|p| {
            p.ranges.iter().find_map(|a| {
                pool.ranges
                    .iter()
                    .find(|b| a.overlaps(b))
                    .map(|b| (p, a, b))
            })
        });
        if let Some((other, a, b)) = clash {
            errors.push(format!(
                "{what}: its addresses {b} overlap {a} of pool {}; the pool is not used",
                other.name
            ));
            continue;
        }
        out.push(pool);
    }
    (out, errors)
}

/// Resolves the L2Advertisements against the valid pools, in name order.
pub fn advertisements(
    objects: impl IntoIterator<Item = Arc<L2Advertisement>>,
    pools: &[Pool],
) -> Vec<L2Advert> {
    let mut out: Vec<L2Advert> = objects
        .into_iter()
        .map(|obj| {
            let spec = &obj.spec;
            let named = spec.ip_address_pools.as_deref().unwrap_or_default();
            let selectors = spec
                .ip_address_pool_selectors
                .as_deref()
                .unwrap_or_default();
            let all = named.is_empty() && selectors.is_empty();
            let pools = pools
                .iter()
                .filter(|p| {
                    all || named.contains(&p.name)
                        || selectors
                            .iter()
                            .any(|s| crate::announce::selector_matches(s, &p.labels))
                })
                .map(|p| p.name.clone())
                .collect();
            L2Advert {
                name: obj.metadata.name.clone().unwrap_or_default(),
                pools,
                interfaces: spec.interfaces.clone().unwrap_or_default(),
                node_selectors: spec.node_selectors.clone().unwrap_or_default(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Whether svc-lb allocates for `svc`: type LoadBalancer, class unset or ours.
pub fn is_ours(svc: &Service) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    spec.type_.as_deref() == Some("LoadBalancer")
        && spec
            .load_balancer_class
            .as_deref()
            .is_none_or(|c| c == LB_CLASS)
}

/// A Service whose `status.loadBalancer.ingress` lists addresses, none inside a pool,
/// and that requests none: someone else gave it those addresses (a manifest written by
/// hand, another controller); it keeps them and is not ours to allocate for.
fn assigned_elsewhere(svc: &Service, pools: &[Pool]) -> bool {
    let ips: Vec<IpAddr> = status_ips(svc);
    !ips.is_empty()
        && !ips.iter().any(|ip| pools.iter().any(|p| p.contains(*ip)))
        && matches!(requested(svc), Ok(r) if r.is_empty())
}

fn status_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

fn annotation<'a>(svc: &'a Service, name: &str) -> Option<&'a str> {
    let ann = svc.metadata.annotations.as_ref()?;
    PREFIXES
        .iter()
        .find_map(|p| ann.get(&format!("{p}{name}")))
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
}

/// What sharing an address needs to know of one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Share {
    key: Option<String>,
    ports: BTreeSet<(String, i32)>,
    local: bool,
    selector: Option<BTreeMap<String, String>>,
}

impl Share {
    fn of(svc: &Service) -> Self {
        let spec = svc.spec.as_ref();
        Share {
            key: annotation(svc, "allow-shared-ip").map(str::to_owned),
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .map(|p| (p.protocol.clone().unwrap_or_else(|| "TCP".into()), p.port))
                .collect(),
            local: spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local"),
            selector: spec.and_then(|s| s.selector.clone()),
        }
    }

    /// Why `self` cannot share with `other`, if it cannot.
    fn conflict(&self, other: &Share) -> Option<String> {
        match (&self.key, &other.key) {
            (Some(a), Some(b)) if a == b => {}
            _ => {
                return Some(
                    "it is in use and the two do not share one allow-shared-ip key".into(),
                );
            }
        }
        if let Some((proto, port)) = self.ports.intersection(&other.ports).next() {
            return Some(format!("both use port {port}/{proto}"));
        }
        if self.local != other.local || (self.local && self.selector != other.selector) {
            return Some(
                "sharing needs the same externalTrafficPolicy (and, for Local, the same selector)"
                    .into(),
            );
        }
        None
    }
}

/// One Service as the allocator sees it.
struct Request {
    service: ServiceRef,
    namespace: String,
    /// The families wanted (false = IPv4), in order.
    families: Vec<bool>,
    prefer_dual: bool,
    pool: Option<String>,
    requested: Result<Vec<IpAddr>, String>,
    held: Vec<IpAddr>,
    share: Share,
}

fn families(svc: &Service) -> Vec<bool> {
    let spec = svc.spec.as_ref();
    let mut out: Vec<bool> = Vec::new();
    let mut push = |v6: bool| {
        if !out.contains(&v6) {
            out.push(v6);
        }
    };
    let declared = spec.and_then(|s| s.ip_families.as_ref());
    if let Some(f) = declared.filter(|f| !f.is_empty()) {
        f.iter().for_each(|f| push(f == "IPv6"));
    } else {
        let ips = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
        let one = spec.and_then(|s| s.cluster_ip.clone());
        for ip in ips.iter().chain(one.iter()) {
            if let Ok(ip) = ip.parse::<IpAddr>() {
                push(ip.is_ipv6());
            }
        }
    }
    if out.is_empty() {
        out.push(false);
    }
    out
}

fn requested(svc: &Service) -> Result<Vec<IpAddr>, String> {
    let mut raw: Vec<(&str, String)> = Vec::new();
    if let Some(ip) = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .filter(|s| !s.is_empty())
    {
        raw.push(("spec.loadBalancerIP", ip.to_owned()));
    }
    if let Some(list) = annotation(svc, "loadBalancerIPs") {
        raw.extend(
            list.split(',')
                .map(|s| ("the loadBalancerIPs annotation", s.trim().to_owned())),
        );
    }
    let mut out: Vec<IpAddr> = Vec::new();
    for (what, ip) in raw {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{what}: '{ip}' is not an IP address"))?;
        if out.iter().any(|o| o.is_ipv6() == ip.is_ipv6() && *o != ip) {
            return Err(format!(
                "more than one {} address is requested",
                if ip.is_ipv6() { "IPv6" } else { "IPv4" }
            ));
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

fn request(service: &ServiceRef, svc: &Service, previous: Option<&Allocation>) -> Request {
    let status = status_ips(svc);
    let before = previous
        .and_then(|p| p.assigned.get(service))
        .into_iter()
        .flatten()
        .map(|a| a.ip);
    let mut held: Vec<IpAddr> = Vec::new();
    for ip in before.chain(status) {
        if !held.contains(&ip) {
            held.push(ip);
        }
    }
    Request {
        service: service.clone(),
        namespace: service.namespace.to_string(),
        families: families(svc),
        prefer_dual: svc
            .spec
            .as_ref()
            .and_then(|s| s.ip_family_policy.as_deref())
            == Some("PreferDualStack"),
        pool: annotation(svc, "address-pool").map(str::to_owned),
        requested: requested(svc),
        held,
        share: Share::of(svc),
    }
}

/// An address in use.
struct Holder {
    pool: usize,
    users: Vec<(ServiceRef, Share)>,
}

struct State<'p> {
    pools: &'p [Pool],
    used: BTreeMap<IpAddr, Holder>,
    /// Per Service: family → (address, pool index).
    got: BTreeMap<ServiceRef, BTreeMap<bool, (IpAddr, usize)>>,
    pending: BTreeMap<ServiceRef, String>,
}

impl State<'_> {
    /// The pools `req` may take `ip` from (with the address-pool annotation, only that
    /// one); an error says why none.
    fn pool_for(&self, req: &Request, ip: IpAddr) -> Result<usize, String> {
        let Some(i) = self.pools.iter().position(|p| p.contains(ip)) else {
            return Err(format!("{ip} is in no IPAddressPool"));
        };
        let pool = &self.pools[i];
        if let Some(want) = &req.pool
            && *want != pool.name
        {
            return Err(format!(
                "{ip} is in pool {}, not in pool {want} named by the address-pool annotation",
                pool.name
            ));
        }
        if !pool.allows_namespace(&req.namespace) {
            return Err(format!(
                "pool {} does not serve namespace {}",
                pool.name, req.namespace
            ));
        }
        Ok(i)
    }

    /// Whether `req` may use `ip` now (free, or shareable with everyone on it).
    fn free_for(&self, req: &Request, ip: IpAddr) -> Result<(), String> {
        let Some(holder) = self.used.get(&ip) else {
            return Ok(());
        };
        for (other, share) in &holder.users {
            if *other == req.service {
                continue;
            }
            if let Some(why) = req.share.conflict(share) {
                return Err(format!("{ip} is in use by {other}: {why}"));
            }
        }
        Ok(())
    }

    fn take(&mut self, req: &Request, ip: IpAddr, pool: usize) {
        let holder = self.used.entry(ip).or_insert_with(|| Holder {
            pool,
            users: Vec::new(),
        });
        if !holder.users.iter().any(|(s, _)| *s == req.service) {
            holder.users.push((req.service.clone(), req.share.clone()));
        }
        self.got
            .entry(req.service.clone())
            .or_default()
            .insert(ip.is_ipv6(), (ip, pool));
    }

    fn has(&self, req: &Request, v6: bool) -> bool {
        self.got
            .get(&req.service)
            .is_some_and(|g| g.contains_key(&v6))
    }

    fn try_take(&mut self, req: &Request, ip: IpAddr) -> Result<(), String> {
        let pool = self.pool_for(req, ip)?;
        self.free_for(req, ip)?;
        self.take(req, ip, pool);
        Ok(())
    }

    /// The pools, in order, that pass 3 may take a `v6` address from for `req`.
    fn auto_pools(&self, req: &Request, v6: bool) -> Vec<usize> {
        (0..self.pools.len())
            .filter(|&i| {
                let p = &self.pools[i];
                p.ranges.iter().any(|r| r.v6 == v6)
                    && p.allows_namespace(&req.namespace)
                    && match &req.pool {
                        Some(want) => *want == p.name,
                        None => p.auto_assign,
                    }
            })
            .collect()
    }

    fn auto(&mut self, req: &Request, v6: bool) -> Result<(), String> {
        let pools = self.auto_pools(req, v6);
        if pools.is_empty() {
            let family = if v6 { "IPv6" } else { "IPv4" };
            return Err(match &req.pool {
                Some(want) if !self.pools.iter().any(|p| p.name == *want) => {
                    format!(
                        "the address-pool annotation names pool {want}, which does not exist or is invalid"
                    )
                }
                Some(want) => format!(
                    "pool {want} has no {family} addresses for namespace {}",
                    req.namespace
                ),
                None => format!(
                    "no IPAddressPool with autoAssign offers {family} addresses to namespace {}",
                    req.namespace
                ),
            });
        }
        // A shareable address already in use by a Service with the same key first.
        if req.share.key.is_some() {
            let shared = self.used.iter().find(|(ip, h)| {
                ip.is_ipv6() == v6
                    && pools.contains(&h.pool)
                    && h.users.iter().all(|(_, s)| req.share.conflict(s).is_none())
            });
            if let Some((&ip, h)) = shared {
                let pool = h.pool;
                self.take(req, ip, pool);
                return Ok(());
            }
        }
        for &i in &pools {
            if let Some(ip) = self.lowest_free(i, v6) {
                self.take(req, ip, i);
                return Ok(());
            }
        }
        let names: Vec<&str> = pools.iter().map(|&i| self.pools[i].name.as_str()).collect();
        Err(format!(
            "no free {} address: pool{} {} exhausted",
            if v6 { "IPv6" } else { "IPv4" },
            if names.len() > 1 { "s" } else { "" },
            names.join(", ")
        ))
    }

    /// The lowest address of pool `i` of family `v6` that no one uses. Steps over used
    /// and skipped addresses only, so it costs O(used) per call, not O(pool size).
    fn lowest_free(&self, i: usize, v6: bool) -> Option<IpAddr> {
        let pool = &self.pools[i];
        for r in pool.ranges.iter().filter(|r| r.v6 == v6) {
            let mut n = r.first;
            loop {
                let ip = metallb::from_int(v6, n);
                if !pool.skips(ip) && !self.used.contains_key(&ip) {
                    return Some(ip);
                }
                if n == r.last {
                    break;
                }
                n += 1;
            }
        }
        None
    }

    fn release(&mut self, service: &ServiceRef) {
        for (ip, _) in self.got.remove(service).unwrap_or_default().into_values() {
            if let Some(h) = self.used.get_mut(&ip) {
                h.users.retain(|(s, _)| s != service);
                if h.users.is_empty() {
                    self.used.remove(&ip);
                }
            }
        }
    }
}

/// Allocates addresses from `pools` (valid, disjoint, in priority order) to the
/// Services we own among `services`; `previous` is the allocation this agent made
/// before (its addresses are held). See the module doc for the rules.
pub fn allocate<'s>(
    pools: &[Pool],
    services: impl IntoIterator<Item = (&'s ServiceRef, &'s Service)>,
    previous: Option<&Allocation>,
) -> Allocation {
    let mut reqs: Vec<Request> = services
        .into_iter()
        .filter(|(_, svc)| is_ours(svc) && !assigned_elsewhere(svc, pools))
        .map(|(r, svc)| request(r, svc, previous))
        .collect();
    reqs.sort_by(|a, b| a.service.cmp(&b.service));
    let mut st = State {
        pools,
        used: BTreeMap::new(),
        got: BTreeMap::new(),
        pending: BTreeMap::new(),
    };
    for req in &mut reqs {
        if req.prefer_dual && req.families.len() > 1 {
            let families = std::mem::take(&mut req.families);
            req.families = families
                .into_iter()
                .filter(|&v6| !st.auto_pools(req, v6).is_empty())
                .collect();
            if req.families.is_empty() {
                req.families.push(false);
            }
        }
    }
    // Pass 1: held addresses (with a request, only those it still asks for).
    for req in &reqs {
        let asked = req.requested.as_ref().ok().filter(|r| !r.is_empty());
        for &ip in &req.held {
            if !req.families.contains(&ip.is_ipv6())
                || st.has(req, ip.is_ipv6())
                || asked.is_some_and(|a| !a.contains(&ip))
            {
                continue;
            }
            // A held address that no longer fits (its pool changed, someone requested
            // it first) is let go; pass 3 finds another.
            let _ = st.try_take(req, ip);
        }
    }
    // Pass 2: requested addresses.
    for req in &reqs {
        let asked = match &req.requested {
            Ok(a) => a,
            Err(why) => {
                st.pending.insert(req.service.clone(), why.clone());
                continue;
            }
        };
        for &ip in asked {
            if !req.families.contains(&ip.is_ipv6()) {
                st.pending.insert(
                    req.service.clone(),
                    format!("requested {ip}, but the Service has no family of that address"),
                );
                break;
            }
            if st.has(req, ip.is_ipv6()) {
                continue;
            }
            if let Err(why) = st.try_take(req, ip) {
                st.pending
                    .insert(req.service.clone(), format!("requested {why}"));
                break;
            }
        }
    }
    // Pass 3: the rest, from the pools.
    for req in &reqs {
        if st.pending.contains_key(&req.service) {
            continue;
        }
        let requested = req.requested.as_ref().map(Vec::len).unwrap_or(0) > 0;
        for &v6 in &req.families {
            if st.has(req, v6) {
                continue;
            }
            let result = if requested {
                Err(format!(
                    "the requested addresses name no {} address",
                    if v6 { "IPv6" } else { "IPv4" }
                ))
            } else {
                st.auto(req, v6)
            };
            if let Err(why) = result {
                st.pending.insert(req.service.clone(), why);
                break;
            }
        }
    }
    let pending: Vec<ServiceRef> = st.pending.keys().cloned().collect();
    for s in &pending {
        st.release(s);
    }
    let assigned = st
        .got
        .iter()
        .map(|(service, got)| {
            let list = got
                .values()
                .map(|&(ip, pool)| Allocated {
                    service: service.clone(),
                    ip,
                    pool: pools[pool].name.clone(),
                })
                .collect();
            (service.clone(), list)
        })
        .collect();
    let usage = pools
        .iter()
        .enumerate()
        .map(|(i, p)| PoolUsage {
            name: p.name.clone(),
            size: p.size(),
            used: st.used.values().filter(|h| h.pool == i).count() as u128,
        })
        .collect();
    Allocation {
        assigned,
        pending: st.pending,
        pools: usage,
    }
}

/// The ingress addresses a Service gets from its allocation: VIP mode, so that the
/// model programs them like any other `status.loadBalancer.ingress` IP.
fn with_ingress(svc: &Service, ips: &[IpAddr]) -> Service {
    let mut out = svc.clone();
    let status = out.status.get_or_insert_with(ServiceStatus::default);
    status.load_balancer = Some(LoadBalancerStatus {
        ingress: (!ips.is_empty()).then(|| {
            ips.iter()
                .map(|ip| LoadBalancerIngress {
                    ip: Some(ip.to_string()),
                    ip_mode: Some("VIP".into()),
                    ..Default::default()
                })
                .collect()
        }),
    });
    out
}

/// What the agent keeps between snapshots (manifest mode): the last allocation, held by
/// the next one.
#[derive(Debug, Default)]
pub struct Ipam {
    pub last: Option<Allocation>,
    pub adverts: Vec<L2Advert>,
    pub errors: Vec<String>,
}

impl Ipam {
    /// Allocates over `snap` and writes the result into its Services' ingress addresses
    /// (pending ones get none); Services whose addresses changed are marked changed.
    /// Without any pool nothing is touched, so that Services keep the ingress written
    /// in their manifests.
    pub fn update(&mut self, snap: &mut Snapshot) {
        let (pools, errors) = pools(snap.pools.values().cloned());
        self.adverts = advertisements(snap.l2_adverts.values().cloned(), &pools);
        for e in errors.iter().filter(|e| !self.errors.contains(e)) {
            tracing::error!(error = %e, "address pool rejected");
        }
        self.errors = errors;
        if pools.is_empty() && self.last.is_none() {
            return;
        }
        let services = snap.services.iter().map(|(r, s)| (r, &**s));
        let alloc = allocate(&pools, services, self.last.as_ref());
        let before = self.last.as_ref();
        let ips_of = |a: Option<&Allocation>, s: &ServiceRef| -> Vec<IpAddr> {
            a.and_then(|a| a.assigned.get(s))
                .into_iter()
                .flatten()
                .map(|a| a.ip)
                .collect()
        };
        let managed: BTreeSet<&ServiceRef> =
            alloc.assigned.keys().chain(alloc.pending.keys()).collect();
        for service in managed {
            let ips = ips_of(Some(&alloc), service);
            if let Some(svc) = snap.services.get(service).cloned() {
                let new = Arc::new(with_ingress(&svc, &ips));
                if new != svc {
                    snap.services.insert(service.clone(), new);
                }
            }
            if ips != ips_of(before, service) {
                snap.changed.services.insert(service.clone());
                match alloc.pending.get(service) {
                    Some(why) => {
                        tracing::warn!(service = %service, reason = %why, "load-balancer address pending")
                    }
                    None => {
                        tracing::info!(service = %service, addresses = ?ips, "load-balancer addresses allocated")
                    }
                }
            }
        }
        // Released Services (deleted, or no longer ours) lose the addresses we wrote.
        for service in before.map(|b| b.assigned.keys()).into_iter().flatten() {
            if !alloc.assigned.contains_key(service) && !alloc.pending.contains_key(service) {
                snap.changed.services.insert(service.clone());
            }
        }
        crate::metrics::set_lb_pools(&alloc);
        let published = status_of(&alloc, &self.errors);
        crate::status::update(|st| st.lb = Some(published));
        self.last = Some(alloc);
    }
}

/// The allocation as `/status` publishes it.
pub fn status_of(alloc: &Allocation, errors: &[String]) -> crate::status::LbStatus {
    use crate::status::{LbAddress, LbPending, LbPool, LbStatus};
    LbStatus {
        pools: alloc
            .pools
            .iter()
            .map(|p| LbPool {
                name: p.name.clone(),
                size: p.size,
                used: p.used,
                free: p.free(),
            })
            .collect(),
        addresses: alloc
            .addresses()
            .map(|a| LbAddress {
                service: a.service.to_string(),
                ip: a.ip.to_string(),
                pool: a.pool.clone(),
            })
            .collect(),
        pending: alloc
            .pending
            .iter()
            .map(|(s, why)| LbPending {
                service: s.to_string(),
                reason: why.clone(),
            })
            .collect(),
        errors: errors.to_vec(),
    }
}
