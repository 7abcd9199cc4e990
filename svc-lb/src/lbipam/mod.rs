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

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::{
    model::ServiceRef,
    source::{
        IngressObj, Snapshot, SvcObj as Service,
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
    svc.ingress
        .iter()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

fn annotation<'a>(svc: &'a Service, name: &str) -> Option<&'a str> {
    PREFIXES
        .iter()
        .find_map(|p| svc.annotation(&format!("{p}{name}")))
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
}

/// What sharing an address needs to know of one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Share {
    key: Option<String>,
    ports: BTreeSet<(String, i32)>,
    local: bool,
    selector: Option<crate::source::StrPairs>,
}

impl Share {
    fn of(svc: &Service) -> Self {
        let spec = svc.spec.as_deref();
        Share {
            key: annotation(svc, "allow-shared-ip").map(str::to_owned),
            ports: spec
                .into_iter()
                .flat_map(|s| s.ports.iter())
                .map(|p| (p.protocol.as_deref().unwrap_or("TCP").to_owned(), p.port))
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
    let declared = spec.map(|s| &*s.ip_families);
    if let Some(f) = declared.filter(|f| !f.is_empty()) {
        f.iter().for_each(|f| push(&**f == "IPv6"));
    } else {
        let ips = spec.map(|s| &*s.cluster_ips).unwrap_or_default();
        let one = spec.and_then(|s| s.cluster_ip.as_deref());
        for ip in ips.iter().map(|ip| &**ip).chain(one) {
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
    /// Per (pool, range): every address of the range below this one is used or
    /// skipped, so that [`State::lowest_free`] never walks the same prefix twice (a
    /// /8 or /64 pool with thousands of Services would otherwise cost O(n²) steps).
    cursor: BTreeMap<(usize, usize), u128>,
    /// allow-shared-ip key → the addresses that a Service with that key uses, so that
    /// sharing looks at those only, not at every address in use.
    by_key: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Services that kept an address in pass 1.
    held: BTreeSet<ServiceRef>,
}

// Counts the allocator's inner steps in tests, which bound the work of a pass
// without timing it.
#[cfg(test)]
thread_local! {
    static STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[inline]
fn step() {
    #[cfg(test)]
    STEPS.with(|s| s.set(s.get() + 1));
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
        // Kept in Service order, so that a conflict names the same user whatever the
        // order the users came in.
        let at = holder.users.partition_point(|(s, _)| *s < req.service);
        if holder.users.get(at).is_none_or(|(s, _)| *s != req.service) {
            holder
                .users
                .insert(at, (req.service.clone(), req.share.clone()));
        }
        if let Some(key) = &req.share.key {
            self.by_key.entry(key.clone()).or_default().insert(ip);
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

    /// Leaves `req` pending, and frees what it took at once, so that a Service later
    /// in the same pass can have it.
    fn fail(&mut self, req: &Request, why: String) {
        self.pending.insert(req.service.clone(), why);
        self.release(&req.service);
    }

    /// The pools, in order, that pass 3 may take a `v6` address from for `req`.
    fn auto_pools(&self, req: &Request, v6: bool) -> Vec<usize> {
        auto_pools(self.pools, req, v6)
    }
}

fn auto_pools(pools: &[Pool], req: &Request, v6: bool) -> Vec<usize> {
    (0..pools.len())
        .filter(|&i| {
            let p = &pools[i];
            p.ranges.iter().any(|r| r.v6 == v6)
                && p.allows_namespace(&req.namespace)
                && match &req.pool {
                    Some(want) => *want == p.name,
                    None => p.auto_assign,
                }
        })
        .collect()
}

impl State<'_> {
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
        if let Some(key) = &req.share.key {
            let shared = self.by_key.get(key).into_iter().flatten().find_map(|ip| {
                step();
                let h = self.used.get(ip)?;
                (ip.is_ipv6() == v6
                    && pools.contains(&h.pool)
                    && h.users.iter().all(|(_, s)| req.share.conflict(s).is_none()))
                .then_some((*ip, h.pool))
            });
            if let Some((ip, pool)) = shared {
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

    /// The lowest address of pool `i` of family `v6` that no one uses. Starts at the
    /// range's cursor, so over a whole pass it steps over each used or skipped address
    /// about once, whatever the pool's size.
    fn lowest_free(&mut self, i: usize, v6: bool) -> Option<IpAddr> {
        let pools = self.pools;
        let pool = &pools[i];
        for (ri, r) in pool.ranges.iter().enumerate().filter(|(_, r)| r.v6 == v6) {
            let mut n = self.cursor.get(&(i, ri)).copied().unwrap_or(r.first);
            loop {
                step();
                let ip = metallb::from_int(v6, n);
                if !pool.skips(ip) && !self.used.contains_key(&ip) {
                    self.cursor.insert((i, ri), n);
                    return Some(ip);
                }
                if n == r.last {
                    break;
                }
                n += 1;
            }
            self.cursor.insert((i, ri), r.last);
        }
        None
    }

    fn release(&mut self, service: &ServiceRef) {
        for (ip, pool) in self.got.remove(service).unwrap_or_default().into_values() {
            let Some(h) = self.used.get_mut(&ip) else {
                continue;
            };
            let key = h
                .users
                .iter()
                .find(|(s, _)| s == service)
                .and_then(|(_, share)| share.key.clone());
            h.users.retain(|(s, _)| s != service);
            if let Some(key) = key
                && !h.users.iter().any(|(_, s)| s.key.as_ref() == Some(&key))
                && let Some(set) = self.by_key.get_mut(&key)
            {
                set.remove(&ip);
            }
            if h.users.is_empty() {
                self.used.remove(&ip);
                // The address is free again: the range's cursor must not be past it.
                let (_, n) = metallb::to_int(ip);
                if let Some(ri) = self.pools[pool].ranges.iter().position(|r| r.contains(ip))
                    && let Some(c) = self.cursor.get_mut(&(pool, ri))
                {
                    *c = (*c).min(n);
                }
            }
        }
    }
}

/// Passes 1 to 3 (see the module doc) over `reqs`, in order; Services in `unheld`
/// keep nothing in pass 1.
fn passes<'p>(pools: &'p [Pool], reqs: &[Request], unheld: &BTreeSet<ServiceRef>) -> State<'p> {
    let mut st = State {
        pools,
        used: BTreeMap::new(),
        got: BTreeMap::new(),
        pending: BTreeMap::new(),
        cursor: BTreeMap::new(),
        by_key: BTreeMap::new(),
        held: BTreeSet::new(),
    };
    // Pass 1: held addresses (with a request, only those it still asks for).
    for req in reqs.iter().filter(|r| !unheld.contains(&r.service)) {
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
            if st.try_take(req, ip).is_ok() {
                st.held.insert(req.service.clone());
            }
        }
    }
    // Pass 2: requested addresses. A request must name every family the Service
    // wants, and is checked whole before anything is taken.
    for req in reqs {
        let asked = match &req.requested {
            Ok(a) if a.is_empty() => continue,
            Ok(a) => a,
            Err(why) => {
                st.fail(req, why.clone());
                continue;
            }
        };
        let why = if let Some(ip) = asked
            .iter()
            .find(|ip| !req.families.contains(&ip.is_ipv6()))
        {
            Some(format!(
                "requested {ip}, but the Service has no family of that address"
            ))
        } else if let Some(&v6) = req
            .families
            .iter()
            .find(|&&v6| !asked.iter().any(|ip| ip.is_ipv6() == v6))
        {
            Some(format!(
                "the requested addresses name no {} address",
                if v6 { "IPv6" } else { "IPv4" }
            ))
        } else {
            let mut why = None;
            for &ip in asked {
                if st.has(req, ip.is_ipv6()) {
                    continue;
                }
                if let Err(e) = st.try_take(req, ip) {
                    why = Some(format!("requested {e}"));
                    break;
                }
            }
            why
        };
        if let Some(why) = why {
            st.fail(req, why);
        }
    }
    // Pass 3: the rest, from the pools.
    for req in reqs {
        if st.pending.contains_key(&req.service)
            || req.requested.as_ref().is_ok_and(|r| !r.is_empty())
        {
            continue;
        }
        for &v6 in &req.families {
            if st.has(req, v6) {
                continue;
            }
            if let Err(why) = st.auto(req, v6) {
                st.fail(req, why);
                break;
            }
        }
    }
    st
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
    for req in &mut reqs {
        if req.prefer_dual && req.families.len() > 1 {
            let families = std::mem::take(&mut req.families);
            req.families = families
                .into_iter()
                .filter(|&v6| !auto_pools(pools, req, v6).is_empty())
                .collect();
            if req.families.is_empty() {
                req.families.push(false);
            }
        }
    }
    // A Service that kept an address in pass 1 and then went pending frees it at
    // once, but a Service earlier in the order may already have been refused for want
    // of it. Such Services lose their hold and the passes run again, until none does:
    // one call gives what the next snapshot would, and the set only grows, so this
    // ends (in practice after one or two rounds).
    let mut unheld: BTreeSet<ServiceRef> = BTreeSet::new();
    let st = loop {
        let st = passes(pools, &reqs, &unheld);
        let lost: Vec<ServiceRef> = st
            .pending
            .keys()
            .filter(|s| st.held.contains(*s) && !unheld.contains(*s))
            .cloned()
            .collect();
        if lost.is_empty() {
            break st;
        }
        unheld.extend(lost);
    };
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
    out.ingress = ips
        .iter()
        .map(|ip| IngressObj {
            ip: Some(ip.to_string().into()),
            ip_mode: Some("VIP".into()),
        })
        .collect();
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
    /// The valid pools of `snap` and their advertisements; a rejected pool is logged
    /// once, when it first appears.
    pub(crate) fn read_pools(&mut self, snap: &Snapshot) -> Vec<Pool> {
        let (pools, errors) = pools(snap.pools.values().cloned());
        self.adverts = advertisements(snap.l2_adverts.values().cloned(), &pools);
        for e in errors.iter().filter(|e| !self.errors.contains(e)) {
            tracing::error!(error = %e, "address pool rejected");
        }
        self.errors = errors;
        pools
    }

    /// Allocates over `snap` and writes the result into its Services' ingress addresses
    /// (pending ones get none); Services whose addresses changed are marked changed.
    /// Without any pool nothing is touched, so that Services keep the ingress written
    /// in their manifests.
    pub fn update(&mut self, snap: &mut Snapshot) {
        let pools = self.read_pools(snap);
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

/// The properties every allocation keeps, for the fuzz target and tests: each address
/// lies in the pool it names, a Service has at most one address per family and is not
/// both assigned and pending, Services share an address only when sharing allows it,
/// and the pools' use matches the addresses.
#[doc(hidden)]
pub fn validate<'s>(
    pools: &[Pool],
    services: impl IntoIterator<Item = (&'s ServiceRef, &'s Service)>,
    alloc: &Allocation,
) -> Result<(), String> {
    let by_ref: BTreeMap<&ServiceRef, &Service> = services.into_iter().collect();
    let mut users: BTreeMap<IpAddr, Vec<&ServiceRef>> = BTreeMap::new();
    for (service, got) in &alloc.assigned {
        if alloc.pending.contains_key(service) {
            return Err(format!("{service} is both assigned and pending"));
        }
        let Some(svc) = by_ref.get(service) else {
            return Err(format!("{service} is assigned but is not an input"));
        };
        if !is_ours(svc) {
            return Err(format!("{service} is assigned but is not ours"));
        }
        for v6 in [false, true] {
            if got.iter().filter(|a| a.ip.is_ipv6() == v6).count() > 1 {
                return Err(format!("{service} has two addresses of one family"));
            }
        }
        for a in got {
            let Some(pool) = pools.iter().find(|p| p.name == a.pool) else {
                return Err(format!("{}: no pool {}", a.ip, a.pool));
            };
            if !pool.contains(a.ip) {
                return Err(format!("{} is outside pool {}", a.ip, a.pool));
            }
            users.entry(a.ip).or_default().push(service);
        }
    }
    for (ip, who) in &users {
        let shares: Vec<Share> = who.iter().map(|s| Share::of(by_ref[*s])).collect();
        for (i, x) in shares.iter().enumerate() {
            for y in &shares[i + 1..] {
                if let Some(why) = x.conflict(y) {
                    return Err(format!("{ip} is shared by {who:?}: {why}"));
                }
            }
        }
    }
    for (i, p) in alloc.pools.iter().enumerate() {
        let used = users
            .keys()
            .filter(|ip| pools.get(i).is_some_and(|pool| pool.contains(**ip)))
            .count() as u128;
        if p.used != used || p.used > p.size {
            return Err(format!(
                "pool {} counts {} used of {}, the addresses say {used}",
                p.name, p.used, p.size
            ));
        }
    }
    Ok(())
}
