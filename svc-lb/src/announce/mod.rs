//! L2 announcement of load-balancer addresses (issue 14): for each address exactly one
//! live, eligible node answers ARP (IPv4) and Neighbor Solicitations (IPv6) for it, so
//! that clients on the segment send its traffic to that node, whose external path
//! (tc/XDP) serves it.
//!
//! - [`choose`]: which node, by rendezvous hashing over the eligible nodes; every agent
//!   computes the same answer, so there is no election and no per-address API write.
//! - [`liveness`]: which nodes are alive, from a UDP heartbeat between agents (every
//!   200 ms by default); a dead node's addresses move within about a second, without
//!   waiting for the API server. [`heartbeat`]: its wire format, authenticated with a
//!   shared key when one is given.
//! - [`responder`]: a packet socket per interface that answers for the addresses this
//!   node wins and sends gratuitous ARP / unsolicited NA when it takes one over. The
//!   address is never added to the interface: the kernel would then answer on every
//!   node.
//! - [`run`]: the task that ties them together.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use imbl::OrdMap;
use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::LabelSelector};

use crate::{model::DesiredState, model::ServiceRef, source::Snapshot};

pub mod choose;
pub mod heartbeat;
pub mod liveness;
pub mod responder;
pub mod run;

/// One address to announce.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub ip: IpAddr,
    pub service: ServiceRef,
    /// Where to answer for it; empty means the external path's devices.
    pub interfaces: Vec<String>,
    /// `externalTrafficPolicy: Local`: only nodes in `endpoint_nodes` are eligible.
    pub local_only: bool,
    /// The nodes with a ready endpoint of the Service (the EndpointSlices' `nodeName`).
    pub endpoint_nodes: BTreeSet<String>,
    /// A node must match one of them (an L2Advertisement's `nodeSelectors`); empty
    /// means every node.
    pub node_selectors: Vec<LabelSelector>,
}

/// What announcement needs to know of one Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// Where its agent's heartbeat goes: the InternalIP addresses (else any address).
    pub addresses: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// Not `Ready: False/Unknown`, and not labelled
    /// `node.kubernetes.io/exclude-from-external-load-balancers`.
    pub usable: bool,
}

/// Nodes labelled so are never chosen (the label kube-proxy and MetalLB honour).
pub const LABEL_EXCLUDE_LB: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

impl NodeView {
    pub fn of(node: &Node) -> Option<Self> {
        let name = node.metadata.name.clone().filter(|n| !n.is_empty())?;
        let labels: BTreeMap<String, String> = node.metadata.labels.clone().unwrap_or_default();
        let status = node.status.as_ref();
        let addrs = status
            .and_then(|s| s.addresses.as_deref())
            .unwrap_or_default();
        let parse = |internal_only: bool| -> Vec<IpAddr> {
            addrs
                .iter()
                .filter(|a| !internal_only || a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect()
        };
        let mut addresses = parse(true);
        if addresses.is_empty() {
            addresses = parse(false);
        }
        // A Node with no Ready condition (a hand-written manifest) counts as ready;
        // the heartbeat still has to say its agent is alive.
        let ready = status
            .and_then(|s| s.conditions.as_deref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_none_or(|c| c.status == "True");
        let usable = ready && !labels.contains_key(LABEL_EXCLUDE_LB);
        Some(Self {
            name,
            addresses,
            labels,
            usable,
        })
    }

    pub fn all(nodes: &OrdMap<String, Arc<Node>>) -> Vec<Self> {
        nodes.values().filter_map(|n| Self::of(n)).collect()
    }
}

/// Whether `labels` match `sel` (matchLabels and matchExpressions with In, NotIn,
/// Exists, DoesNotExist; an unknown operator matches nothing).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expr = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    by_label && by_expr
}

/// The addresses to announce until pools are allocated by the agent itself: every
/// VIP-mode load-balancer ingress IP the model programs (it is already served by the
/// external path), with the Service's traffic policy and its endpoints' nodes.
pub fn targets_from(desired: &DesiredState, snap: &Snapshot) -> Vec<Target> {
    let mut out: BTreeMap<IpAddr, Target> = BTreeMap::new();
    for fe in desired.frontends.values() {
        if fe.kind != svc_lb_common::KIND_LOAD_BALANCER
            || fe.key.scope != svc_lb_common::SCOPE_EXTERNAL
        {
            continue;
        }
        let local_only = fe.flags & svc_lb_common::SVC_FLAG_EXT_LOCAL != 0;
        let t = out.entry(fe.key.addr).or_insert_with(|| Target {
            ip: fe.key.addr,
            service: fe.service.clone(),
            interfaces: Vec::new(),
            local_only,
            endpoint_nodes: endpoint_nodes(snap, &fe.service),
            node_selectors: Vec::new(),
        });
        // Two ports of one Service may differ in nothing that matters here; keep the
        // stricter policy if they ever do.
        t.local_only |= local_only;
    }
    out.into_values().collect()
}

/// The nodes with a ready endpoint of `service`.
fn endpoint_nodes(snap: &Snapshot, service: &ServiceRef) -> BTreeSet<String> {
    snap.slices
        .get(service)
        .into_iter()
        .flat_map(|g| g.values())
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.ready.unwrap_or(true))
        .filter_map(|e| e.node_name.as_deref().map(str::to_owned))
        .collect()
}

/// Addresses from an address pool follow the pool's L2Advertisements: an address
/// whose pool no advertisement selects is not announced (MetalLB's rule), and one that
/// several select takes the union of their interfaces and node selectors (an
/// advertisement with none of them means every interface or every node). Addresses
/// not from a pool (ingress written by hand or by another controller) keep the
/// defaults `targets_from` gave them.
pub fn apply_adverts(
    targets: Vec<Target>,
    alloc: Option<&crate::lbipam::Allocation>,
    adverts: &[crate::lbipam::L2Advert],
) -> Vec<Target> {
    let Some(alloc) = alloc else {
        return targets;
    };
    targets
        .into_iter()
        .filter_map(|mut t| {
            let Some(pool) = alloc.pool_of(&t.service, t.ip) else {
                return Some(t);
            };
            let chosen: Vec<_> = adverts
                .iter()
                .filter(|a| a.pools.iter().any(|p| p == pool))
                .collect();
            if chosen.is_empty() {
                return None;
            }
            t.interfaces = if chosen.iter().any(|a| a.interfaces.is_empty()) {
                Vec::new()
            } else {
                let set: BTreeSet<&String> = chosen.iter().flat_map(|a| &a.interfaces).collect();
                set.into_iter().cloned().collect()
            };
            t.node_selectors = if chosen.iter().any(|a| a.node_selectors.is_empty()) {
                Vec::new()
            } else {
                let mut all: Vec<LabelSelector> = Vec::new();
                for s in chosen.iter().flat_map(|a| &a.node_selectors) {
                    if !all.contains(s) {
                        all.push(s.clone());
                    }
                }
                all
            };
            Some(t)
        })
        .collect()
}

/// The node that announces each target (`None`: no node is eligible and live), as
/// every agent computes it. `live(name)` says whether a node counts as live.
pub fn winners<'n>(
    targets: &[Target],
    nodes: &'n [NodeView],
    live: impl Fn(&str) -> bool,
) -> Vec<(&'n str, IpAddr)> {
    let candidates: Vec<&NodeView> = nodes.iter().filter(|n| n.usable && live(&n.name)).collect();
    targets
        .iter()
        .filter_map(|t| {
            let eligible = candidates
                .iter()
                .filter(|n| !t.local_only || t.endpoint_nodes.contains(&n.name))
                .filter(|n| {
                    t.node_selectors.is_empty()
                        || t.node_selectors
                            .iter()
                            .any(|s| selector_matches(s, &n.labels))
                })
                .map(|n| n.name.as_str());
            choose::winner(t.ip, eligible).map(|w| (w, t.ip))
        })
        .collect()
}

/// The addresses `me` announces, by interface (`default_ifaces` for targets that name
/// none). `live(name)` says whether a node counts as live (this node's own readiness
/// included).
pub fn assign(
    targets: &[Target],
    nodes: &[NodeView],
    me: &str,
    default_ifaces: &[String],
    live: impl Fn(&str) -> bool,
) -> BTreeMap<String, BTreeSet<IpAddr>> {
    let won: BTreeSet<IpAddr> = winners(targets, nodes, live)
        .into_iter()
        .filter(|(w, _)| *w == me)
        .map(|(_, ip)| ip)
        .collect();
    let mut out: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for t in targets.iter().filter(|t| won.contains(&t.ip)) {
        let ifaces = if t.interfaces.is_empty() {
            default_ifaces
        } else {
            &t.interfaces
        };
        for i in ifaces {
            out.entry(i.clone()).or_default().insert(t.ip);
        }
    }
    out
}

#[cfg(test)]
mod tests;
