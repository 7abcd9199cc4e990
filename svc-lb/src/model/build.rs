//! Services + EndpointSlices → desired frontends and backends, following the rules
//! kube-proxy applies. Everything here is pure; errors are returned, never logged at
//! warn level, because the caller decides how loudly to report them.
//!
//! Frontends are what a client on this node dials, which the socket programs rewrite:
//! - every cluster IP × port (`KIND_CLUSTER_IP`), with the endpoints of the internal
//!   traffic policy;
//! - every node address (`NodeInfo::addresses`: those `--nodeport-addresses` keeps) ×
//!   `nodePort` (`KIND_NODE_PORT`), every `externalIPs` entry ×
//!   port (`KIND_EXTERNAL_IP`) and every VIP-mode load-balancer ingress IP × port
//!   (`KIND_LOAD_BALANCER`). A client on the node reaching these addresses is
//!   "short-circuited" by kube-proxy to the cluster-wide endpoints whatever the
//!   external traffic policy, so these frontends always carry the cluster endpoints.
//!   `ipMode: Proxy` ingress IPs are left alone: the load balancer must see that traffic.
//!
//! With the external path on ([`NodeInfo::external`]) each external address also gets a
//! `SCOPE_EXTERNAL` frontend, read by the tc/XDP programs for traffic from outside the
//! node: node ports once per (port, protocol, family) with the unspecified address,
//! external and load-balancer IPs as themselves. Their backends follow
//! `externalTrafficPolicy` (Local: this node's endpoints, `SVC_FLAG_EXT_LOCAL`, and
//! `SVC_FLAG_DROP_EMPTY` when only other nodes have endpoints); load-balancer IPs carry
//! `loadBalancerSourceRanges` (`SVC_FLAG_SRC_RANGES`).
//!
//! Cluster IPs are allocated by the apiserver and unique; the other addresses are
//! written by users and load-balancer controllers. So a cluster-IP clash skips the later
//! Service whole (there is no right answer), while an external address that clashes
//! with any frontend already claimed loses only that address: a Service can never take
//! over another Service's cluster IP through `externalIPs`.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use svc_lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_TERMINATING, KIND_CLUSTER_IP, KIND_EXTERNAL_IP,
    KIND_LOAD_BALANCER, KIND_NODE_PORT, META_EXTERNAL_LOCAL, META_INTERNAL_LOCAL, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, SCOPE_ALL, SCOPE_EXTERNAL, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXT_LOCAL,
    SVC_FLAG_SCHED_LC, SVC_FLAG_SCHED_RR, SVC_FLAG_SRC_RANGES,
};

use super::{
    BackendAddr, DesiredBackend, DesiredFrontend, DesiredState, FrontendKey, HealthCheck,
    ModelError, NodeInfo, ObjectRef, ServiceRef,
    sched::{self, Scheduler},
};
use crate::source::{
    AddressType, EndpointAddress, SliceGroup, SliceObj, Snapshot, SvcObj as Service,
    SvcPortObj as ServicePort,
};

/// Links an EndpointSlice to its Service (same namespace).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Set by the EndpointSlice controller on slices of headless Services; kube-proxy
/// ignores such slices, and so do we.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// A Service carrying this label asks for a specific proxy implementation. We program it
/// only when the value equals our `--service-proxy-name`; without one we behave like a
/// default kube-proxy and leave every such Service to whichever proxy claims it.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// The apiserver's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The apiserver's upper bound for the same field (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The legacy spelling of `spec.loadBalancerSourceRanges` (comma-separated CIDRs),
/// read only when the field is empty, as Kubernetes does.
pub const ANNOTATION_LB_SOURCE_RANGES: &str =
    "service.beta.kubernetes.io/load-balancer-source-ranges";

/// Turns Services and EndpointSlices into the desired datapath state. Objects that
/// cannot be programmed are skipped and reported; they never affect other Services.
///
/// Services are processed in namespace/name order, so the first one claims a contested
/// frontend. Errors come per Service in that order (see [`super::Cache::errors`]).
/// This is the full rebuild; [`super::Cache`] keeps the same result up to date one
/// changed Service at a time.
pub fn build(snap: &Snapshot, node: &NodeInfo) -> (DesiredState, Vec<ModelError>) {
    let mut cache = super::Cache::default();
    cache.rebuild(snap, node);
    let errors = cache.errors().cloned().collect();
    (cache.into_desired(), errors)
}

/// One Service's share of the input: its Service object and its EndpointSlices (either
/// may be missing).
pub(super) struct Input<'a> {
    pub sref: &'a ServiceRef,
    pub service: Option<&'a Service>,
    pub slices: Option<&'a SliceGroup>,
}

impl<'a> Input<'a> {
    pub fn of(snap: &'a Snapshot, sref: &'a ServiceRef) -> Self {
        Self {
            sref,
            service: snap.services.get(sref).map(|s| &**s),
            slices: snap.slices.get(sref),
        }
    }
}

/// What the model made of one Service: the frontends it won, their draining
/// endpoints, its health check and its problems.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Outcome {
    pub frontends: Vec<DesiredFrontend>,
    pub draining: Vec<(FrontendKey, Vec<DesiredBackend>)>,
    pub health: Option<(u16, HealthCheck)>,
    pub errors: Vec<ModelError>,
    pub skipped: Option<ModelError>,
    pub over_limit: bool,
    /// [`claim_keys`] of the Service, from the plan pass 1 made anyway (a full rebuild
    /// would otherwise plan every Service twice).
    pub keys: Vec<ClaimKey>,
}

/// What a Service may claim and so contend for with other Services: a frontend or a
/// `healthCheckNodePort`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum ClaimKey {
    Frontend(FrontendKey),
    HealthPort(u16),
}

/// Every key the Service could claim in [`model_group`] (a superset of what it wins):
/// two Services interact only through keys they both list. A Service over its frontend
/// limit lists its cluster IPs only, the only addresses it claims, so that its size is
/// never expanded.
pub(super) fn claim_keys(
    sref: &ServiceRef,
    service: Option<&Service>,
    node: &NodeInfo,
) -> Vec<ClaimKey> {
    let Some(svc) = service else {
        return Vec::new();
    };
    if svc.has_label(LABEL_HEADLESS) {
        return Vec::new();
    }
    let Ok(Some(plan)) = plan_service(svc, &service_object(sref), node) else {
        return Vec::new();
    };
    plan_claim_keys(&plan, node)
}

/// [`claim_keys`] of a Service already planned.
fn plan_claim_keys(plan: &ServicePlan<'_>, node: &NodeInfo) -> Vec<ClaimKey> {
    let mut keys: Vec<ClaimKey> = plan.cluster_keys().map(ClaimKey::Frontend).collect();
    if over_limit(plan, 0, node).is_none() {
        keys.extend(
            plan.external_frontends(node)
                .into_iter()
                .map(|fe| ClaimKey::Frontend(fe.key)),
        );
        if let Some(port) = plan.health_check_node_port.filter(|_| node.external) {
            keys.push(ClaimKey::HealthPort(port));
        }
    }
    keys.sort_unstable();
    keys.dedup();
    // The cache keeps these for every Service: no spare capacity.
    keys.shrink_to_fit();
    keys
}

/// The model over a group of Services, sorted by namespace/name, that shares no
/// [`ClaimKey`] with any Service outside it: the result for each is then the same as
/// over all Services. One outcome per input, in input order.
pub(super) fn model_group(inputs: &[Input<'_>], node: &NodeInfo) -> Vec<Outcome> {
    let mut out: Vec<Outcome> = inputs.iter().map(|_| Outcome::default()).collect();
    // Every slice is checked here, so that its errors come first and once; only the
    // count of usable endpoints is kept. The parsed slices are made again, one Service
    // at a time, where they are programmed: held for every Service at once they were
    // the largest transient of a full rebuild (about 90 bytes per endpoint, some
    // 100 MB at 100 000 Services x 10 endpoints).
    let endpoint_counts: Vec<usize> = inputs
        .iter()
        .zip(&mut out)
        .map(|(input, o)| {
            parse_slices(input.slices, &mut o.errors, Log::Report)
                .iter()
                .map(|s| s.endpoints.len())
                .sum()
        })
        .collect();

    // Pass 1: validate every Service and claim its cluster-IP frontends.
    let mut claims: BTreeMap<FrontendKey, ServiceRef> = BTreeMap::new();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let Some(svc) = input.service else {
            continue;
        };
        let errors = &mut out[i].errors;
        // Shares the key's strings: no allocation per Service.
        let object = service_object(input.sref);
        let sref = input.sref.clone();
        if svc.has_label(LABEL_HEADLESS) {
            // kube-proxy watches Services with the selector `!service.kubernetes.io/headless`
            // and so never programs a labelled one, cluster IP or not.
            out[i].skipped = Some(ModelError {
                object,
                reason: format!(
                    "labelled {LABEL_HEADLESS}: not programmed, as kube-proxy does not proxy such Services; remove the label to program it"
                ),
            });
            continue;
        }
        let plan = match plan_service(svc, &object, node) {
            Ok(Some(plan)) => plan,
            Ok(None) => continue,
            Err(reason) => {
                errors.push(ModelError { object, reason });
                continue;
            }
        };
        out[i].keys = plan_claim_keys(&plan, node);
        let errors = &mut out[i].errors;
        if let Some((key, owner)) = plan
            .cluster_keys()
            .find_map(|key| claims.get(&key).map(|owner| (key, owner.clone())))
        {
            errors.push(ModelError {
                object,
                reason: format!(
                    "frontend {} is already used by Service {owner}; this Service is skipped",
                    fmt_key(&key)
                ),
            });
            continue;
        }
        for key in plan.cluster_keys() {
            claims.insert(key, sref.clone());
        }
        let endpoints = endpoint_counts[i];
        if let Some(reason) = over_limit(&plan, endpoints, node) {
            errors.push(ModelError {
                object,
                reason: format!(
                    "{reason}; the Service is refused whole and its cluster IPs refuse connections"
                ),
            });
            refused.push((i, plan, sref));
            continue;
        }
        errors.extend(plan.port_errors.iter().map(|reason| ModelError {
            object: object.clone(),
            reason: reason.clone(),
        }));
        accepted.push((i, plan, sref, object));
    }

    // Pass 2: external addresses, each on its own, after every cluster IP is claimed.
    //
    // External IPs are claimed last: load-balancer IPs are written by a controller the
    // cluster admin trusts, external IPs by any Service author, so when two Services
    // claim one address the load-balancer IP wins (the CVE-2020-8554 pattern). Node
    // ports, allocated by the apiserver, go first as well.
    let mut frontends: Vec<Vec<Frontend>> = accepted
        .iter()
        .map(|(_, plan, _, _)| {
            plan.ports
                .iter()
                .enumerate()
                .flat_map(|(port, p)| {
                    plan.ips.iter().map(move |&addr| Frontend {
                        key: FrontendKey {
                            addr,
                            port: p.port,
                            proto: p.proto,
                            scope: SCOPE_ALL,
                        },
                        kind: KIND_CLUSTER_IP,
                        port,
                    })
                })
                .collect()
        })
        .collect();
    let (mut first, mut last) = (Vec::new(), Vec::new());
    for (_, plan, _, _) in &accepted {
        let (ext, other): (Vec<Frontend>, Vec<Frontend>) = plan
            .external_frontends(node)
            .into_iter()
            .partition(|fe| fe.kind == KIND_EXTERNAL_IP);
        first.push(other);
        last.push(ext);
    }
    let mut kinds: BTreeMap<FrontendKey, u8> = BTreeMap::new();
    for round in [first, last] {
        for (((i, _, sref, object), mine), candidates) in
            accepted.iter().zip(&mut frontends).zip(round)
        {
            claim_external(
                candidates,
                sref,
                object,
                &mut claims,
                &mut kinds,
                mine,
                &mut out[*i].errors,
            );
        }
    }

    for (i, plan, sref) in &refused {
        // Fail closed: the cluster IPs (already claimed in pass 1) stay known to the
        // datapath with no backends, so clients are refused rather than sent to
        // backends the Service had before it went over the limit. A Service whose
        // cluster IPs alone are over the frontend limit gets nothing.
        let o = &mut out[*i];
        if plan.cluster_keys().count() <= node.limits.max_frontends {
            for p in &plan.ports {
                for &addr in &plan.ips {
                    let key = FrontendKey {
                        addr,
                        port: p.port,
                        proto: p.proto,
                        scope: SCOPE_ALL,
                    };
                    o.frontends.push(refused_frontend(key, sref, p.name));
                }
            }
        }
        o.over_limit = true;
    }
    let mut health_owners: BTreeMap<u16, &ServiceRef> = BTreeMap::new();
    for ((i, plan, sref, object), mine) in accepted.iter().zip(&frontends) {
        // Checked and reported above: the same slices again, without their errors.
        let own_slices = &parse_slices(inputs[*i].slices, &mut Vec::new(), Log::Quiet);
        let o = &mut out[*i];
        program(plan, mine, sref, own_slices, node, object, o);
        if let Some(port) = plan.health_check_node_port.filter(|_| node.external) {
            match health_owners.get(&port) {
                None => {
                    health_owners.insert(port, sref);
                    let check = HealthCheck {
                        service: sref.clone(),
                        local_endpoints: local_ready_endpoints(plan, own_slices, node),
                    };
                    o.health = Some((port, check));
                }
                Some(owner) => o.errors.push(ModelError {
                    object: object.clone(),
                    reason: format!(
                        "healthCheckNodePort {port} is already used by Service {owner}; it is not served for this one"
                    ),
                }),
            }
        }
    }
    out
}

/// Claims the external frontends of one accepted Service that no one holds yet. An
/// external-path frontend shares its address with a socket-path one (same key but the
/// scope); when that address is lost to a clash, so is its twin, and the clash is
/// reported once.
fn claim_external(
    candidates: Vec<Frontend>,
    sref: &ServiceRef,
    object: &ObjectRef,
    claims: &mut BTreeMap<FrontendKey, ServiceRef>,
    kinds: &mut BTreeMap<FrontendKey, u8>,
    mine: &mut Vec<Frontend>,
    errors: &mut Vec<ModelError>,
) {
    let mut lost: BTreeSet<FrontendKey> = BTreeSet::new();
    for fe in candidates {
        let twin = FrontendKey {
            scope: SCOPE_ALL,
            ..fe.key
        };
        if fe.key.scope == SCOPE_EXTERNAL && lost.contains(&twin) {
            continue;
        }
        match claims.get(&fe.key) {
            None => {
                claims.insert(fe.key, sref.clone());
                kinds.insert(fe.key, fe.kind);
                mine.push(fe);
            }
            Some(owner) => {
                lost.insert(fe.key);
                let by = if owner == sref {
                    "another address of this Service".to_owned()
                } else if fe.kind == KIND_EXTERNAL_IP
                    && kinds.get(&fe.key) == Some(&KIND_LOAD_BALANCER)
                {
                    format!(
                        "Service {owner} as its load-balancer IP, which takes precedence over external IPs"
                    )
                } else {
                    format!("Service {owner}")
                };
                errors.push(ModelError {
                    object: object.clone(),
                    reason: format!(
                        "{} frontend {} is already used by {by}; this address is skipped",
                        kind_name(fe.kind),
                        fmt_key(&fe.key),
                    ),
                });
            }
        }
    }
}

/// Why a Service is over a [`ServiceLimits`](super::ServiceLimits) limit, counted from
/// its validated plan before any frontend or backend list is built: frontends are
/// (cluster IPs + external and load-balancer IPs) × ports plus node ports × node
/// addresses of the Service's families, and the same again for the external path when
/// it is on; backends are the endpoints its slices list.
fn over_limit(plan: &ServicePlan<'_>, endpoints: usize, node: &NodeInfo) -> Option<String> {
    let limits = node.limits;
    let ports = plan.ports.len();
    let node_ports = plan.ports.iter().filter(|p| p.node_port.is_some()).count();
    let node_addrs = node.addresses.iter().filter(|a| plan.has_family(a)).count();
    let families = plan.ips.iter().map(family).collect::<BTreeSet<_>>().len();
    let addressed = plan.ips.len().saturating_add(plan.external.len());
    let mut frontends = addressed
        .saturating_mul(ports)
        .saturating_add(node_ports.saturating_mul(node_addrs));
    if node.external {
        frontends = frontends
            .saturating_add(plan.external.len().saturating_mul(ports))
            .saturating_add(node_ports.saturating_mul(families));
    }
    if frontends > limits.max_frontends {
        return Some(format!(
            "{frontends} frontends (addresses × ports) are over the limit of {} (--max-frontends-per-service)",
            limits.max_frontends
        ));
    }
    if endpoints > limits.max_backends {
        return Some(format!(
            "its EndpointSlices list {endpoints} endpoints, over the limit of {} (--max-backends-per-service)",
            limits.max_backends
        ));
    }
    None
}

/// A cluster-IP frontend of a Service refused for a limit: no backends, so connections
/// are refused.
fn refused_frontend(key: FrontendKey, sref: &ServiceRef, port_name: &str) -> DesiredFrontend {
    DesiredFrontend {
        key,
        service: sref.clone(),
        port_name: port_name.to_owned(),
        backends: Vec::new(),
        affinity_timeout_s: None,
        kind: KIND_CLUSTER_IP,
        meta_flags: 0,
        flags: 0,
        src_ranges: Vec::new(),
        scheduler: Scheduler::default(),
        slots: None,
    }
}

/// How many distinct endpoints of a Service are ready on this node: what a
/// `healthCheckNodePort` reports (the load balancer sends traffic only to nodes with
/// at least one).
fn local_ready_endpoints(plan: &ServicePlan<'_>, slices: &[Slice<'_>], node: &NodeInfo) -> usize {
    let Some(here) = node.name.as_deref() else {
        return 0;
    };
    slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|ep| ep.node_name == Some(here) && (ep.ready || plan.publish_not_ready))
        .map(|ep| ep.addr)
        .collect::<BTreeSet<IpAddr>>()
        .len()
}

/// One frontend of an accepted Service: its key, which address it is, and the index of
/// its port in `ServicePlan::ports`.
struct Frontend {
    key: FrontendKey,
    kind: u8,
    port: usize,
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_CLUSTER_IP => "cluster IP",
        KIND_NODE_PORT => "node port",
        KIND_EXTERNAL_IP => "external IP",
        KIND_LOAD_BALANCER => "load-balancer",
        _ => "unknown",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

fn family(ip: &IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The Service's object reference, sharing the strings of its snapshot key (which the
/// sources derive from the same metadata).
fn service_object(sref: &ServiceRef) -> ObjectRef {
    ObjectRef {
        kind: "Service".into(),
        namespace: sref.namespace.clone(),
        name: sref.name.clone(),
    }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        _ => "TCP",
    }
}

fn fmt_key(key: &FrontendKey) -> String {
    match key.addr {
        IpAddr::V4(a) => format!("{a}:{}/{}", key.port, proto_name(key.proto)),
        IpAddr::V6(a) => format!("[{a}]:{}/{}", key.port, proto_name(key.proto)),
    }
}

/// `None` (the API default) is TCP. Anything but TCP, UDP and SCTP is returned as `Err`
/// with its name.
fn parse_proto(proto: Option<&str>) -> Result<u8, &str> {
    match proto {
        None | Some("TCP") => Ok(PROTO_TCP),
        Some("UDP") => Ok(PROTO_UDP),
        Some("SCTP") => Ok(PROTO_SCTP),
        Some(other) => Err(other),
    }
}

/// Whether the socket-level datapath can steer a protocol. SCTP cannot be served there:
/// the kernel runs the cgroup sendmsg/recvmsg hooks for UDP only, and SCTP multi-homing
/// (`sctp_connectx`, one-to-many sockets) reaches peers without passing the connect hook,
/// so a half-working translation would be worse than none. kube-proxy handles SCTP in
/// netfilter; the packet-level datapath here is a later piece of work.
pub const SOCKET_PROTOCOLS: [u8; 2] = [PROTO_TCP, PROTO_UDP];

fn parse_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// Addresses a client can never usefully dial, which the apiserver would not hand out.
fn is_unusable(ip: &IpAddr) -> bool {
    ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

const EXTERNAL_IPS_ENTRY: &str = "externalIPs entry";

/// Why an address written by a user or a load-balancer controller must never become a
/// frontend: the socket programs would then capture connections that this node's pods
/// and host processes make to their own loopback, to the link-local metadata service
/// (169.254.169.254) and so on. `None` for an ordinary unicast address. IPv4-mapped IPv6
/// addresses are judged by their IPv4 form.
pub fn never_a_frontend(ip: &IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    if ip.is_unspecified() {
        return Some("the unspecified address");
    }
    if ip.is_multicast() {
        return Some("a multicast address");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address (169.254.0.0/16)"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address (fe80::/10)"),
        _ => None,
    }
}

/// `--external-ip-cidrs`: with ranges set, an external IP must be inside one of them.
fn external_ip_allowed(ip: &IpAddr, node: &NodeInfo) -> bool {
    node.external_ip_cidrs.is_empty() || node.external_ip_cidrs.iter().any(|n| n.contains(ip))
}

/// An IANA service name, as Kubernetes validates a named `targetPort`: 1-15 characters
/// of `[a-z0-9-]`, at least one letter, no leading, trailing or doubled hyphen.
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

// ---------------------------------------------------------------------------------
// EndpointSlices

struct SlicePort<'a> {
    name: &'a str,
    proto: u8,
    port: u16,
}

struct SliceEndpoint<'a> {
    addr: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<&'a str>,
    /// `hints.forZones[].name`: the zones the EndpointSlice controller assigned it to.
    zone_hints: Vec<&'a str>,
    /// `hints.forNodes[].name` (trafficDistribution PreferSameNode).
    node_hints: Vec<&'a str>,
    /// From the slice's `svc-lb.io/weights` ([`sched::DEFAULT_WEIGHT`] when unnamed).
    weight: u16,
}

/// An EndpointSlice checked once, up front, so that its errors are reported once no
/// matter how many Service ports read it.
struct Slice<'a> {
    family: Family,
    ports: Vec<SlicePort<'a>>,
    endpoints: Vec<SliceEndpoint<'a>>,
}

/// Parses the slices of one Service, in slice-name order. Slices labelled headless are
/// left out, as kube-proxy does.
/// Whether [`parse_slices`] logs what it ignores (at debug): once per slice, on the
/// first of its two parses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Log {
    Report,
    Quiet,
}

fn parse_slices<'a>(
    group: Option<&'a SliceGroup>,
    errors: &mut Vec<ModelError>,
    log: Log,
) -> Vec<Slice<'a>> {
    let mut out = Vec::new();
    for slice in group.into_iter().flat_map(SliceGroup::values) {
        if slice.headless {
            continue;
        }
        let family = match &slice.address_type {
            AddressType::IPv4 => Family::V4,
            AddressType::IPv6 => Family::V6,
            AddressType::Fqdn => {
                if log == Log::Report {
                    tracing::debug!(slice = %slice.object_ref(), "FQDN EndpointSlices cannot be load-balanced; ignored");
                }
                continue;
            }
            AddressType::Other(other) => {
                errors.push(ModelError {
                    object: slice.object_ref(),
                    reason: format!(
                        "addressType '{other}' is not supported (want IPv4, IPv6 or FQDN); the slice is ignored"
                    ),
                });
                continue;
            }
        };
        if let Some(w) = &slice.weights {
            errors.extend(w.errors(&slice.object_ref()));
        }
        out.push(Slice {
            family,
            ports: slice_ports(slice, errors, log),
            endpoints: slice_endpoints(slice, family, errors),
        });
    }
    out
}

fn slice_ports<'a>(
    slice: &'a SliceObj,
    errors: &mut Vec<ModelError>,
    log: Log,
) -> Vec<SlicePort<'a>> {
    let mut out = Vec::with_capacity(slice.ports.len());
    for (i, p) in slice.ports.iter().enumerate() {
        let pname = p.name.as_deref().unwrap_or_default();
        // A slice port without a number means "all ports", which no proxy can steer.
        let Some(number) = p.port else {
            if log == Log::Report {
                tracing::debug!(slice = %slice.object_ref(), port = pname, "EndpointSlice port has no number; ignored");
            }
            continue;
        };
        let Some(port) = parse_port(number) else {
            errors.push(ModelError {
                object: slice.object_ref(),
                reason: format!("ports[{i}] ('{pname}'): port {number} is out of range 1-65535"),
            });
            continue;
        };
        // Ports of protocols we cannot serve can only match Service ports we skip.
        let Ok(proto) = parse_proto(p.protocol.as_deref()) else {
            continue;
        };
        out.push(SlicePort {
            name: pname,
            proto,
            port,
        });
    }
    out
}

fn slice_endpoints<'a>(
    slice: &'a SliceObj,
    family_want: Family,
    errors: &mut Vec<ModelError>,
) -> Vec<SliceEndpoint<'a>> {
    let mut out = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // The API defines all addresses of one endpoint as fungible; kube-proxy uses the
        // first one only, and so do we (the source keeps only that one).
        let addr = match &ep.address {
            EndpointAddress::Missing => {
                errors.push(ModelError {
                    object: slice.object_ref(),
                    reason: format!("endpoints[{i}] has no addresses; it is skipped"),
                });
                continue;
            }
            EndpointAddress::Ip(addr) if family(addr) != family_want => {
                errors.push(ModelError {
                    object: slice.object_ref(),
                    reason: format!(
                        "endpoints[{i}]: address '{addr}' does not match addressType {}; it is skipped",
                        slice.address_type
                    ),
                });
                continue;
            }
            EndpointAddress::Ip(addr) if is_unusable(addr) => {
                errors.push(ModelError {
                    object: slice.object_ref(),
                    reason: format!(
                        "endpoints[{i}]: address '{addr}' is not a unicast address; it is skipped"
                    ),
                });
                continue;
            }
            EndpointAddress::Ip(addr) => *addr,
            EndpointAddress::Invalid(raw) => {
                errors.push(ModelError {
                    object: slice.object_ref(),
                    reason: format!(
                        "endpoints[{i}]: '{raw}' is not a valid IP address; it is skipped"
                    ),
                });
                continue;
            }
        };
        // Unset conditions mean "unknown". kube-proxy reads an unknown ready or serving
        // as true and an unknown terminating as false; so do we.
        let hints = ep.hints.as_deref();
        out.push(SliceEndpoint {
            addr,
            ready: ep.ready.unwrap_or(true),
            serving: ep.serving.unwrap_or(true),
            terminating: ep.terminating.unwrap_or(false),
            node_name: ep.node_name.as_deref(),
            weight: slice
                .weights
                .as_ref()
                .map_or(sched::DEFAULT_WEIGHT, |w| w.of(&addr)),
            zone_hints: hints
                .into_iter()
                .flat_map(|h| h.for_zones.iter())
                .map(|z| &**z)
                .collect(),
            node_hints: hints
                .into_iter()
                .flat_map(|h| h.for_nodes.iter())
                .map(|n| &**n)
                .collect(),
        });
    }
    out
}

// ---------------------------------------------------------------------------------
// Services

struct PortPlan<'a> {
    /// "" when unnamed, as the API treats a missing name.
    name: &'a str,
    port: u16,
    proto: u8,
    /// `targetPort` when it is a name: lets hand-written slices name their port after it.
    target_name: Option<&'a str>,
    /// `nodePort`, when the apiserver allocated one (NodePort and LoadBalancer types).
    node_port: Option<u16>,
}

/// A Service that passed validation and will be programmed.
struct ServicePlan<'a> {
    /// Cluster IPs, one per family.
    ips: Vec<IpAddr>,
    /// External IPs and VIP-mode load-balancer ingress IPs (with their `KIND_*`), only
    /// of the families the Service has a cluster IP for, sorted and unique per kind.
    external: Vec<(IpAddr, u8)>,
    ports: Vec<PortPlan<'a>>,
    affinity_timeout_s: Option<u32>,
    local_only: bool,
    external_local: bool,
    publish_not_ready: bool,
    /// `loadBalancerSourceRanges` (type LoadBalancer only), valid entries only, sorted,
    /// unique, host bits cleared.
    src_ranges: Vec<IpNet>,
    /// `healthCheckNodePort`, kept only for LoadBalancer Services with
    /// `externalTrafficPolicy: Local` (where kube-proxy serves it).
    health_check_node_port: Option<u16>,
    /// Problems that skip a part of the Service (a port, an address); the rest still
    /// programs.
    port_errors: Vec<String>,
    /// `svc-lb.io/scheduler`, or the node default (issue 15).
    scheduler: Scheduler,
}

impl ServicePlan<'_> {
    fn cluster_keys(&self) -> impl Iterator<Item = FrontendKey> + '_ {
        self.ips.iter().flat_map(move |&addr| {
            self.ports.iter().map(move |p| FrontendKey {
                addr,
                port: p.port,
                proto: p.proto,
                scope: SCOPE_ALL,
            })
        })
    }

    fn has_family(&self, ip: &IpAddr) -> bool {
        self.ips.iter().any(|c| family(c) == family(ip))
    }

    /// Node ports on every node address, then external IPs, then load-balancer IPs.
    /// kube-proxy programs a family's node ports, external IPs and ingress IPs only when
    /// the Service has a cluster IP of that family; so do we. With the external path on,
    /// the same again in `SCOPE_EXTERNAL` (see [`Self::scoped_frontends`]).
    fn external_frontends(&self, node: &NodeInfo) -> Vec<Frontend> {
        let mut out = self.scoped_frontends(SCOPE_ALL, node);
        if node.external {
            out.extend(self.scoped_frontends(SCOPE_EXTERNAL, node));
        }
        out
    }

    /// The node-port, external-IP and load-balancer-IP frontends of one scope: node
    /// ports per port, then per address, then every external and load-balancer IP as
    /// itself per port. `SCOPE_ALL` (socket programs) puts a node port on each node
    /// address; `SCOPE_EXTERNAL` (traffic that enters the node from outside) once per
    /// family with the unspecified address, which the datapath matches on every node
    /// address of `LB_NODEADDR_V1`.
    fn scoped_frontends(&self, scope: u8, node: &NodeInfo) -> Vec<Frontend> {
        let node_port_addrs: Vec<IpAddr> = if scope == SCOPE_EXTERNAL {
            let families: BTreeSet<Family> = self.ips.iter().map(family).collect();
            families
                .into_iter()
                .map(|fam| match fam {
                    Family::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                })
                .collect()
        } else {
            node.addresses
                .iter()
                .copied()
                .filter(|a| self.has_family(a))
                .collect()
        };
        let mut out = Vec::new();
        for (port, p) in self.ports.iter().enumerate() {
            let Some(node_port) = p.node_port else {
                continue;
            };
            for &addr in &node_port_addrs {
                out.push(Frontend {
                    key: FrontendKey {
                        addr,
                        port: node_port,
                        proto: p.proto,
                        scope,
                    },
                    kind: KIND_NODE_PORT,
                    port,
                });
            }
        }
        for &(addr, kind) in &self.external {
            for (port, p) in self.ports.iter().enumerate() {
                out.push(Frontend {
                    key: FrontendKey {
                        addr,
                        port: p.port,
                        proto: p.proto,
                        scope,
                    },
                    kind,
                    port,
                });
            }
        }
        out
    }
}

/// The source ranges that apply to a load-balancer IP of family `fam`, kube-proxy's rule
/// (pkg/proxy/serviceport.go): only the ranges of that family; none of that family
/// means no filtering; a zero-length prefix (0.0.0.0/0, ::/0) of that family means
/// "allow any", the same as no ranges.
fn family_ranges(ranges: &[IpNet], fam: Family) -> Vec<IpNet> {
    let of_family: Vec<IpNet> = ranges
        .iter()
        .filter(|r| family(&r.addr()) == fam)
        .copied()
        .collect();
    if of_family.iter().any(|r| r.prefix_len() == 0) {
        return Vec::new();
    }
    of_family
}

/// Parses `loadBalancerSourceRanges` (or, when that is empty, the legacy annotation).
/// As kube-proxy does, an entry that is not a CIDR is skipped (and reported) rather than
/// failing the Service. When no valid entry is left the load-balancer addresses stay
/// open to every source, again as kube-proxy (whose firewall rules exist only for valid
/// ranges) behaves; the report says so, since that is rarely what the author meant.
fn source_ranges(svc: &Service, errors: &mut Vec<String>) -> Vec<IpNet> {
    let spec_ranges: Vec<&str> = svc
        .spec
        .iter()
        .flat_map(|s| s.load_balancer_source_ranges.iter())
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .collect();
    let (raw, what) = if spec_ranges.is_empty() {
        let annotated: Vec<&str> = svc
            .annotation(ANNOTATION_LB_SOURCE_RANGES)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        (
            annotated,
            "annotation ".to_owned() + ANNOTATION_LB_SOURCE_RANGES,
        )
    } else {
        (spec_ranges, "loadBalancerSourceRanges".to_owned())
    };
    let mut out = BTreeSet::new();
    for r in &raw {
        match r.parse::<IpNet>() {
            Ok(net) => {
                out.insert(net.trunc());
            }
            Err(_) => errors.push(format!(
                "{what} entry '{r}' is not a valid CIDR; it is skipped"
            )),
        }
    }
    if !raw.is_empty() && out.is_empty() {
        errors.push(format!(
            "{what} has no valid entry; the load-balancer addresses accept every source"
        ));
    }
    out.into_iter().collect()
}

/// Parses the externally reachable addresses of a Service: `spec.externalIPs` and the
/// VIP-mode IPs of `status.loadBalancer.ingress`. A bad entry is reported and skipped
/// alone; addresses of a family the Service has no cluster IP for are dropped silently,
/// as kube-proxy's per-family proxiers do.
fn external_addresses(
    svc: &Service,
    ips: &[IpAddr],
    node: &NodeInfo,
    errors: &mut Vec<String>,
) -> Vec<(IpAddr, u8)> {
    let mut external = BTreeSet::new();
    let mut lb = BTreeSet::new();
    let families: BTreeSet<Family> = ips.iter().map(family).collect();
    let mut add = |set: &mut BTreeSet<IpAddr>, what: &str, raw: &str| {
        let Ok(ip) = raw.parse::<IpAddr>() else {
            errors.push(format!(
                "{what} '{raw}' is not a valid IP address; it is skipped"
            ));
            return;
        };
        if let Some(why) = never_a_frontend(&ip) {
            errors.push(format!(
                "{what} '{raw}' is refused: {why}, which must never become a Service frontend (it would capture this node's own traffic)"
            ));
        } else if what == EXTERNAL_IPS_ENTRY && !external_ip_allowed(&ip, node) {
            errors.push(format!(
                "{what} '{raw}' is refused: it is outside --external-ip-cidrs ({})",
                node.external_ip_cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        } else if !families.contains(&family(&ip)) {
            tracing::debug!(
                address = raw,
                "{what} has no cluster IP of its family; not programmed"
            );
        } else {
            set.insert(ip);
        }
    };
    for raw in svc.spec.iter().flat_map(|s| s.external_ips.iter()) {
        add(&mut external, EXTERNAL_IPS_ENTRY, raw);
    }
    for ing in svc.ingress.iter() {
        let Some(raw) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            // A hostname-only ingress (some cloud load balancers) has no address to steer.
            continue;
        };
        // `ipMode: Proxy` means the load balancer terminates or rewrites the traffic
        // itself, so it must reach it: short-circuiting would bypass it.
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        add(&mut lb, "load-balancer ingress IP", raw);
    }
    external
        .into_iter()
        .map(|ip| (ip, KIND_EXTERNAL_IP))
        .chain(lb.into_iter().map(|ip| (ip, KIND_LOAD_BALANCER)))
        .collect()
}

/// Validates a Service. `Ok(None)` means "not ours to program" (no error): the reason
/// is logged at debug level. `Err` means bad input that skips the whole Service.
fn plan_service<'a>(
    svc: &'a Service,
    object: &ObjectRef,
    node: &NodeInfo,
) -> Result<Option<ServicePlan<'a>>, String> {
    let skip = |why: &str| {
        tracing::debug!(service = %object, reason = why, "Service not programmed");
        Ok(None)
    };
    if object.name.is_empty() {
        return Err("metadata.name is missing".to_owned());
    }
    let proxy_name = svc.label(LABEL_SERVICE_PROXY_NAME);
    if let Some(wanted) = proxy_name
        && node.service_proxy_name.as_deref() != Some(wanted)
    {
        return skip("labelled for another service proxy");
    }
    let Some(spec) = svc.spec.as_ref() else {
        return skip("no spec");
    };
    match spec.type_.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        Some("ExternalName") => return skip("ExternalName Services are DNS-only"),
        Some(other) => {
            return Err(format!(
                "type '{other}' is not supported (want ClusterIP, NodePort, LoadBalancer or ExternalName)"
            ));
        }
    }

    // `clusterIPs` is authoritative (its first entry equals `clusterIP`); older objects
    // may carry only `clusterIP`.
    let raw_ips: Vec<&str> = match &*spec.cluster_ips {
        ips if !ips.is_empty() => ips.iter().map(|ip| &**ip).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if raw_ips.contains(&"None") {
        return skip("headless");
    }
    if raw_ips.iter().all(|ip| ip.is_empty()) {
        // The apiserver allocates one on create; an object without it cannot be dialled.
        return skip("no cluster IP allocated");
    }
    let mut ips = Vec::with_capacity(raw_ips.len());
    for raw in raw_ips {
        match raw.parse::<IpAddr>() {
            Ok(ip) if is_unusable(&ip) => {
                return Err(format!("cluster IP '{raw}' is not a unicast address"));
            }
            Ok(ip) => ips.push(ip),
            Err(_) => return Err(format!("cluster IP '{raw}' is not a valid IP address")),
        }
    }

    let local_only = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(format!(
                "internalTrafficPolicy '{other}' is not supported (want Cluster or Local)"
            ));
        }
    };
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(format!(
                "externalTrafficPolicy '{other}' is not supported (want Cluster or Local)"
            ));
        }
    };
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec.affinity_timeout_seconds;
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(t),
                    _ => {
                        return Err(format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}"
                        ));
                    }
                },
            }
        }
        Some(other) => {
            return Err(format!(
                "sessionAffinity '{other}' is not supported (want None or ClientIP)"
            ));
        }
    };

    let mut port_errors = Vec::new();
    let (scheduler, bad_scheduler) = sched::service_scheduler(
        svc.annotation(sched::ANNOTATION_SCHEDULER),
        node.scheduler,
        node.conn_counts,
        object,
    );
    port_errors.extend(bad_scheduler.map(|e| e.reason));
    let ports = plan_ports(&spec.ports, &mut port_errors)?;
    let external = external_addresses(svc, &ips, node, &mut port_errors);
    let lb_type = spec.type_.as_deref() == Some("LoadBalancer");
    let src_ranges = if lb_type {
        source_ranges(svc, &mut port_errors)
    } else {
        Vec::new()
    };
    let health_check_node_port = match spec.health_check_node_port {
        Some(p) if lb_type && external_local => match parse_port(p) {
            Some(p) => Some(p),
            None => {
                port_errors.push(format!(
                    "healthCheckNodePort {p} is out of range 1-65535; it is not served"
                ));
                None
            }
        },
        _ => None,
    };
    let plan = ServicePlan {
        ips,
        external,
        ports,
        affinity_timeout_s,
        local_only,
        external_local,
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        src_ranges,
        health_check_node_port,
        port_errors,
        scheduler,
    };

    let mut keys = BTreeSet::new();
    if let Some(dup) = plan.cluster_keys().find(|k| !keys.insert(*k)) {
        return Err(format!(
            "frontend {} is listed more than once",
            fmt_key(&dup)
        ));
    }
    Ok(Some(plan))
}

/// How a port is named in errors: by name when it has one, else by number.
fn port_label(p: &ServicePort) -> String {
    match p.name.as_deref() {
        Some(n) if !n.is_empty() => format!("port '{n}' ({})", p.port),
        _ => format!("port {}", p.port),
    }
}

/// Validates the ports. Bad ones fail the whole Service; ports of an unsupported
/// protocol are only left out, with their reason pushed to `skipped`.
fn plan_ports<'a>(
    ports: &'a [ServicePort],
    skipped: &mut Vec<String>,
) -> Result<Vec<PortPlan<'a>>, String> {
    let mut names = BTreeSet::new();
    let mut out = Vec::with_capacity(ports.len());
    let mut unserved = Vec::new();
    for p in ports {
        let label = port_label(p);
        let name = p.name.as_deref().unwrap_or_default();
        // Slices identify ports by name alone, so two ports with one name could not be
        // told apart (the apiserver rejects this too).
        if !names.insert(name) {
            return Err(format!("port name '{name}' is used by more than one port"));
        }
        let Some(port) = parse_port(p.port) else {
            return Err(format!("{label}: port {} is out of range 1-65535", p.port));
        };
        let target_name = match &p.target_port {
            None => None,
            Some(IntOrString::Int(t)) => {
                if parse_port(*t).is_none() {
                    return Err(format!("{label}: targetPort {t} is out of range 1-65535"));
                }
                None
            }
            Some(IntOrString::String(t)) => {
                if !is_port_name(t) {
                    return Err(format!(
                        "{label}: targetPort '{t}' is not a valid port name"
                    ));
                }
                Some(t.as_str())
            }
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => match parse_port(n) {
                Some(n) => Some(n),
                None => return Err(format!("{label}: nodePort {n} is out of range 1-65535")),
            },
        };
        let proto = match parse_proto(p.protocol.as_deref()) {
            Ok(proto) if SOCKET_PROTOCOLS.contains(&proto) => proto,
            Ok(_) => {
                unserved.push(label);
                continue;
            }
            Err(other) => {
                skipped.push(format!(
                    "{label}: protocol {other} is not supported; this port is skipped"
                ));
                continue;
            }
        };
        out.push(PortPlan {
            name,
            port,
            proto,
            target_name,
            node_port,
        });
    }
    if !unserved.is_empty() {
        // One report per Service, not per port: the reason is the same for all of them.
        skipped.push(format!(
            "SCTP {} {} not programmed: the socket-level datapath cannot steer SCTP (the kernel's cgroup sendmsg/recvmsg hooks serve UDP only and SCTP multi-homing bypasses connect); the other ports are",
            unserved.join(", "),
            if unserved.len() == 1 { "is" } else { "are" },
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// Backends

struct Candidate<'a> {
    addr: BackendAddr,
    ep: &'a SliceEndpoint<'a>,
}

/// The backend port one slice offers for a Service port, if any.
fn slice_port_for(slice: &Slice<'_>, port: &PortPlan<'_>) -> Option<u16> {
    let by_name = |name: &str| {
        slice
            .ports
            .iter()
            .find(|sp| sp.name == name && sp.proto == port.proto)
            .map(|sp| sp.port)
    };
    by_name(port.name).or_else(|| port.target_name.and_then(by_name))
}

/// Adds the frontends of an accepted Service to its outcome.
fn program(
    plan: &ServicePlan<'_>,
    frontends: &[Frontend],
    sref: &ServiceRef,
    slices: &[Slice<'_>],
    node: &NodeInfo,
    object: &ObjectRef,
    out: &mut Outcome,
) {
    let errors = &mut out.errors;
    for port in &plan.ports {
        if let Some(target) = port.target_name {
            // Only slices with endpoints count: the controller's placeholder slice for a
            // Service without pods carries no ports at all.
            let populated = slices.iter().filter(|s| !s.endpoints.is_empty());
            let mut populated = populated.peekable();
            if populated.peek().is_some() && populated.all(|s| slice_port_for(s, port).is_none()) {
                errors.push(ModelError {
                    object: object.clone(),
                    reason: format!(
                        "targetPort name '{target}' matches no port in the EndpointSlices of {sref}"
                    ),
                });
            }
        }
    }
    // Endpoints per (port, family), computed once and shared by every frontend of them.
    let mut chosen: BTreeMap<(usize, Family), Endpoints> = BTreeMap::new();
    for fe in frontends {
        let port = &plan.ports[fe.port];
        let fam = family(&fe.key.addr);
        let eps = chosen
            .entry((fe.port, fam))
            .or_insert_with(|| select_backends(plan, port, fam, slices, node));
        let internal = fe.kind == KIND_CLUSTER_IP;
        let outside = fe.key.scope == SCOPE_EXTERNAL;
        // Cluster IPs follow the internal traffic policy. Every other address is
        // "external": kube-proxy sends traffic that starts on this node (pods or the
        // host) to the cluster-wide endpoints whatever the external policy, and the
        // socket programs only ever see traffic that starts on this node. Traffic from
        // outside the node (the tc/XDP path's SCOPE_EXTERNAL frontends) follows the
        // external policy.
        let mut backends = if (internal && plan.local_only) || (outside && plan.external_local) {
            eps.local.clone()
        } else {
            eps.cluster.clone()
        };
        let scheduler = match (outside, plan.scheduler) {
            (true, _) => Scheduler::Maglev,
            (false, Scheduler::Maglev) => Scheduler::Random,
            (false, s) => s,
        };
        // Weight 0 drains (as IPVS's quiesced real server): the endpoint leaves the slots
        // and tables but keeps its backend entry as draining, so established connections
        // and `list` still find it; all weights 0 refuse new connections, as no endpoints.
        let mut zero: Vec<DesiredBackend> = Vec::new();
        if !eps.weights.is_empty() {
            backends.retain(|b| {
                let keep = eps.weights.get(&b.addr) != Some(&0);
                if !keep {
                    zero.push(DesiredBackend {
                        state: BACKEND_DRAINING,
                        ..*b
                    });
                }
                keep
            });
        }
        let slots = slot_layout(&backends, &eps.weights, scheduler, object, &mut out.errors);
        if outside || !zero.is_empty() {
            let mut draining: Vec<DesiredBackend> = if outside {
                eps.serving
                    .iter()
                    .filter(|s| !backends.iter().any(|b| b.addr == s.addr))
                    .copied()
                    .collect()
            } else {
                Vec::new()
            };
            for z in zero {
                if !draining.iter().any(|d| d.addr == z.addr) {
                    draining.push(z);
                }
            }
            draining.sort_unstable();
            if !draining.is_empty() {
                out.draining.push((fe.key, draining));
            }
        }
        let mut flags = 0;
        let mut src_ranges = Vec::new();
        if outside && plan.external_local {
            flags |= SVC_FLAG_EXT_LOCAL;
            // kube-proxy drops (rather than rejects) when the Service has endpoints,
            // just none here: the load balancer's health check steers away soon.
            if backends.is_empty() && !eps.cluster.is_empty() {
                flags |= SVC_FLAG_DROP_EMPTY;
            }
        }
        // Both scopes: the external path checks the packet's source, the socket
        // programs the bound source of a client on this node (kube-proxy filters both
        // since 1.25).
        if fe.kind == KIND_LOAD_BALANCER {
            src_ranges = family_ranges(&plan.src_ranges, fam);
            if !src_ranges.is_empty() {
                flags |= SVC_FLAG_SRC_RANGES;
            }
        }
        if matches!(scheduler, Scheduler::Rr | Scheduler::Wrr) {
            flags |= SVC_FLAG_SCHED_RR;
        }
        if scheduler.needs_counts() {
            flags |= SVC_FLAG_SCHED_LC;
        }
        let meta_flags = if internal {
            if plan.local_only {
                META_INTERNAL_LOCAL
            } else {
                0
            }
        } else if plan.external_local {
            META_EXTERNAL_LOCAL
        } else {
            0
        };
        let meta_flags = meta_flags | scheduler.meta_bits();
        out.frontends.push(DesiredFrontend {
            key: fe.key,
            service: sref.clone(),
            port_name: port.name.to_owned(),
            backends,
            affinity_timeout_s: plan.affinity_timeout_s,
            kind: fe.kind,
            meta_flags,
            flags,
            src_ranges,
            scheduler,
            slots,
        });
    }
}

/// The slot layout of one frontend ([`DesiredFrontend::slots`]): `None` when every
/// backend has the same weight (one slot each, in order), else the weighted layout;
/// a layout scaled down to fit is reported against the Service.
fn slot_layout(
    backends: &[DesiredBackend],
    weights: &HashMap<BackendAddr, u16>,
    scheduler: Scheduler,
    object: &ObjectRef,
    errors: &mut Vec<ModelError>,
) -> Option<std::sync::Arc<[u16]>> {
    let w: Vec<u16> = backends
        .iter()
        .map(|b| {
            weights
                .get(&b.addr)
                .copied()
                .unwrap_or(sched::DEFAULT_WEIGHT)
        })
        .collect();
    if !scheduler.weighted() || w.windows(2).all(|p| p[0] == p[1]) {
        return None;
    }
    let layout = sched::weighted_layout(&w, scheduler);
    if let Some(why) = layout.scaled {
        errors.push(ModelError {
            object: object.clone(),
            reason: format!("annotation {}: {why}", sched::ANNOTATION_WEIGHTS),
        });
    }
    // Backend indexes fit: a frontend holds at most MAX_BACKENDS_PER_FRONTEND (u16).
    Some(
        layout
            .slots
            .into_iter()
            .map(|i| u16::try_from(i).unwrap_or(u16::MAX))
            .collect(),
    )
}

/// The usable endpoints of one Service port and family, for each traffic policy.
struct Endpoints {
    /// "Cluster" policy: topology-aware (hints), every node.
    cluster: Vec<DesiredBackend>,
    /// "Local" policy: this node's endpoints only; no topology, no fallback to others.
    local: Vec<DesiredBackend>,
    /// Every endpoint that still serves (ready, or serving whatever else it is), as
    /// `BACKEND_DRAINING`: what an external frontend drains from besides its backends.
    serving: Vec<DesiredBackend>,
    /// `svc-lb.io/weights` of the endpoints that have a weight other than the default
    /// (empty without the annotation, as almost always).
    weights: HashMap<BackendAddr, u16>,
}

/// Which endpoints the topology hints restrict the Cluster policy to (kube-proxy's
/// rules): hints count only when every ready endpoint carries one, and only when at
/// least one endpoint is hinted for this node (or its zone); otherwise every endpoint is
/// used. Node hints (PreferSameNode) win over zone hints (PreferClose/PreferSameZone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'a> {
    All,
    Node(&'a str),
    Zone(&'a str),
}

fn topology<'a>(ready: &[&SliceEndpoint<'_>], node: &'a NodeInfo) -> Topology<'a> {
    if ready.is_empty() {
        return Topology::All;
    }
    if let Some(name) = node.name.as_deref()
        && ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| e.node_hints.contains(&name))
    {
        return Topology::Node(name);
    }
    if let Some(zone) = node.zone.as_deref()
        && ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| e.zone_hints.contains(&zone))
    {
        return Topology::Zone(zone);
    }
    Topology::All
}

fn select_backends(
    plan: &ServicePlan<'_>,
    port: &PortPlan<'_>,
    fam: Family,
    slices: &[Slice<'_>],
    node: &NodeInfo,
) -> Endpoints {
    // Merge the slices of this family. An endpoint can briefly sit in two slices while
    // the controller moves it; the first copy wins unless it is terminating and a later
    // one is not (a recycled pod IP: prefer the live pod, as kube-proxy does).
    let mut cands: Vec<Candidate<'_>> = Vec::new();
    let mut at: HashMap<BackendAddr, usize> = HashMap::new();
    let mut weights: HashMap<BackendAddr, u16> = HashMap::new();
    for slice in slices.iter().filter(|s| s.family == fam) {
        let Some(bport) = slice_port_for(slice, port) else {
            continue;
        };
        for ep in &slice.endpoints {
            let addr = BackendAddr {
                addr: ep.addr,
                port: bport,
                proto: port.proto,
            };
            match at.get(&addr) {
                None => {
                    at.insert(addr, cands.len());
                    cands.push(Candidate { addr, ep });
                    if ep.weight != sched::DEFAULT_WEIGHT {
                        weights.insert(addr, ep.weight);
                    }
                }
                Some(&i) => {
                    if cands[i].ep.terminating && !ep.terminating {
                        cands[i].ep = ep;
                    }
                }
            }
        }
    }

    // publishNotReadyAddresses: the Service wants every endpoint, ready or not (the
    // EndpointSlice controller marks them all ready for such Services; hand-written
    // slices may not, so apply it here too).
    let ready = |c: &Candidate<'_>| c.ep.ready || plan.publish_not_ready;
    let draining = |c: &Candidate<'_>| c.ep.serving && c.ep.terminating;
    // An unnamed node has no local endpoints.
    let here = node.name.as_deref();
    let is_local = |c: &Candidate<'_>| here.is_some() && c.ep.node_name == here;
    let active = |c: &Candidate<'_>| DesiredBackend {
        addr: c.addr,
        state: BACKEND_ACTIVE,
        local: is_local(c),
    };
    let terminating = |c: &Candidate<'_>| DesiredBackend {
        addr: c.addr,
        state: BACKEND_TERMINATING,
        local: is_local(c),
    };

    // Cluster policy: ready endpoints the topology allows; with none ready anywhere,
    // let terminating endpoints that still serve drain the traffic instead of refusing
    // it (kube-proxy's terminating-endpoint fallback, which ignores topology).
    let ready_eps: Vec<&SliceEndpoint<'_>> =
        cands.iter().filter(|c| ready(c)).map(|c| c.ep).collect();
    let topo = topology(&ready_eps, node);
    let allowed = |c: &Candidate<'_>| match topo {
        Topology::All => true,
        Topology::Node(name) => c.ep.node_hints.contains(&name),
        Topology::Zone(zone) => c.ep.zone_hints.contains(&zone),
    };
    let mut cluster: Vec<DesiredBackend> = cands
        .iter()
        .filter(|c| ready(c) && allowed(c))
        .map(active)
        .collect();
    if cluster.is_empty() {
        cluster = cands
            .iter()
            .filter(|c| draining(c))
            .map(terminating)
            .collect();
    }

    // Local policy: no fallback to remote endpoints, that is the point of it; the
    // terminating fallback applies among local endpoints only.
    let local_cands: Vec<&Candidate<'_>> = cands.iter().filter(|c| is_local(c)).collect();
    let mut local: Vec<DesiredBackend> = local_cands
        .iter()
        .filter(|c| ready(c))
        .map(|c| active(c))
        .collect();
    if local.is_empty() {
        local = local_cands
            .iter()
            .filter(|c| draining(c))
            .map(|c| terminating(c))
            .collect();
    }

    // Established external flows keep any endpoint that still serves, whatever picks
    // new flows now (kube-proxy never breaks them, and flushes UDP conntrack only for
    // endpoints that stopped serving).
    let mut serving: Vec<DesiredBackend> = cands
        .iter()
        .filter(|c| ready(c) || c.ep.serving)
        .map(|c| DesiredBackend {
            addr: c.addr,
            state: BACKEND_DRAINING,
            local: is_local(c),
        })
        .collect();

    cluster.sort_unstable();
    local.sort_unstable();
    serving.sort_unstable();
    Endpoints {
        cluster,
        local,
        serving,
        weights,
    }
}
