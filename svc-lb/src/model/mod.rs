//! The model: Kubernetes objects in, desired frontends and backends out. Pure, no I/O.
//! Nearly every Kubernetes rule lives here.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

mod build;
mod cache;
mod node;
pub mod sched;
pub use build::{
    ANNOTATION_LB_SOURCE_RANGES, DEFAULT_AFFINITY_TIMEOUT_S, LABEL_HEADLESS, LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME, MAX_AFFINITY_TIMEOUT_S, build, never_a_frontend,
};
pub use cache::{Cache, Touched};
pub use node::{LABEL_TOPOLOGY_ZONE, node_info, primary_ips};
#[cfg(test)]
mod tests;

/// One load-balanced address: what a client dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    /// `svc_lb_common::PROTO_*`.
    pub proto: u8,
    /// `svc_lb_common::SCOPE_*`.
    pub scope: u8,
}

/// One backend endpoint as the datapath stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: IpAddr,
    pub port: u16,
    /// `svc_lb_common::PROTO_*`.
    pub proto: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DesiredBackend {
    pub addr: BackendAddr,
    /// `svc_lb_common::BACKEND_ACTIVE` or `BACKEND_TERMINATING`.
    pub state: u8,
    /// The endpoint runs on this node (`nodeName` equals [`NodeInfo::name`]).
    pub local: bool,
}

/// The Service (and its port) a frontend belongs to. Shared strings: every frontend,
/// change set, error and source index holds one, and a clone must not allocate (at
/// 10 000 Services the copies were megabytes of small allocations).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub key: FrontendKey,
    pub service: ServiceRef,
    /// `spec.ports[].name` ("" when unnamed).
    pub port_name: String,
    /// Sorted and free of duplicate addresses. Empty means "refuse connections".
    pub backends: Vec<DesiredBackend>,
    /// `Some(timeout)` when `sessionAffinity: ClientIP`.
    pub affinity_timeout_s: Option<u32>,
    /// `svc_lb_common::KIND_*`: which Service address this frontend is.
    pub kind: u8,
    /// `svc_lb_common::META_*` bits (traffic policies), shown by `list`.
    pub meta_flags: u8,
    /// `svc_lb_common::SVC_FLAG_*` bits (`SVC_FLAG_EXT_LOCAL`, `SVC_FLAG_DROP_EMPTY` on
    /// `SCOPE_EXTERNAL` frontends; `SVC_FLAG_SRC_RANGES` on load-balancer IPs of both
    /// scopes). The planner adds `SVC_FLAG_AFFINITY` itself from `affinity_timeout_s`.
    pub flags: u16,
    /// `loadBalancerSourceRanges` of this frontend's family, sorted and unique; not
    /// empty exactly when `flags` has `SVC_FLAG_SRC_RANGES`.
    pub src_ranges: Vec<IpNet>,
    /// How a new connection picks a slot: `svc-lb.io/scheduler` or the node default on
    /// `SCOPE_ALL` frontends (`maglev` there means `random`: a socket has no source port
    /// to hash at connect time); always `Maglev` on `SCOPE_EXTERNAL` ones.
    pub scheduler: sched::Scheduler,
    /// The weighted slot layout ([`sched::weighted_layout`]): slot `i + 1` holds
    /// `backends[slots[i]]`. `None` is one slot per backend in order (every weight
    /// equal, the usual case). `backends` holds only weights above 0; weight-0
    /// endpoints are in [`DesiredState::draining`].
    pub slots: Option<Arc<[u16]>>,
}

impl DesiredFrontend {
    /// Service-map slots this frontend takes (its master's count).
    pub fn slot_count(&self) -> usize {
        self.slots.as_ref().map_or(self.backends.len(), |s| s.len())
    }

    /// The backend of each slot, in slot order.
    pub fn slot_backends(&self) -> impl Iterator<Item = &DesiredBackend> + '_ {
        (0..self.slot_count()).filter_map(move |i| match &self.slots {
            Some(s) => self.backends.get(usize::from(s[i])),
            None => self.backends.get(i),
        })
    }
}

/// A `healthCheckNodePort` to serve: which Service it reports on and how many of its
/// endpoints are on this node (kube-proxy answers 200 when there is at least one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceRef,
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, DesiredFrontend>,
    /// `healthCheckNodePort` → its Service, for LoadBalancer Services with
    /// `externalTrafficPolicy: Local` (only when the external path is on).
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Services left alone on purpose (not errors), with why: a Service labelled
    /// `service.kubernetes.io/headless`. Shown by `svc-lb status`.
    pub skipped: BTreeMap<ServiceRef, ModelError>,
    /// Services refused whole for going over a [`ServiceLimits`] limit. Their cluster
    /// IPs are programmed with no backends (connections are refused) so that nothing
    /// keeps routing to their old backends; their reasons are in the errors.
    pub over_limit: BTreeSet<ServiceRef>,
    /// Per `SCOPE_EXTERNAL` frontend: endpoints that still serve but that its
    /// `backends` leave out (terminating while others are ready, not ready but serving,
    /// outside this node's topology hints or traffic policy), with state
    /// `BACKEND_DRAINING`. The planner keeps their backend entries (never creates
    /// them) so that established external flows keep their backend, as kube-proxy's
    /// conntrack does; no new flow is sent to them. Sorted, no frontend with none.
    pub draining: BTreeMap<FrontendKey, Vec<DesiredBackend>>,
}

/// What this node is, for rules that depend on it (traffic policy, topology, node
/// ports) and how this proxy is configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: Option<String>,
    /// The Node's `topology.kubernetes.io/zone` label, for zone hints.
    pub zone: Option<String>,
    /// The addresses node ports are programmed on for clients on the node, sorted and
    /// unique. `node_info` fills in the Node's InternalIP and ExternalIP addresses; the
    /// agent replaces them with the local share of `devices::node_port_addresses` (the
    /// `--nodeport-addresses` rule, the same one the external path uses).
    pub addresses: Vec<IpAddr>,
    /// `--service-proxy-name`: Services labelled `service.kubernetes.io/service-proxy-name`
    /// are programmed only when the label has this value.
    pub service_proxy_name: Option<String>,
    /// The external path (tc/XDP on the node's devices) is on: also emit the
    /// `SCOPE_EXTERNAL` frontends and the health checks. Off, nothing would read them.
    pub external: bool,
    /// `--external-ip-cidrs`: when not empty, `externalIPs` outside these are refused.
    pub external_ip_cidrs: Vec<IpNet>,
    /// Per-Service limits, checked before a Service is expanded into frontends.
    pub limits: ServiceLimits,
    /// `--scheduler`: the scheduler of socket frontends whose Service has no (valid)
    /// `svc-lb.io/scheduler` annotation.
    pub scheduler: sched::Scheduler,
    /// The datapath keeps active connection counts (probe `sock_ops_conn`): `lc`/`wlc`
    /// can run. Set by the agent from the kernel probe.
    pub conn_counts: bool,
}

/// The default of `--max-frontends-per-service`.
pub const DEFAULT_MAX_FRONTENDS_PER_SERVICE: usize = 1024;
/// The default of `--max-backends-per-service`.
pub const DEFAULT_MAX_BACKENDS_PER_SERVICE: usize = 20_000;

/// What one Service may cost, checked before the model expands it: a Service over a
/// limit is refused whole (see `build`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceLimits {
    /// Frontends: (cluster IPs + node addresses for node ports + external and
    /// load-balancer IPs) × ports, both scopes counted.
    pub max_frontends: usize,
    /// Endpoints listed by the Service's EndpointSlices (each endpoint counts once per
    /// slice that lists it).
    pub max_backends: usize,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            max_frontends: DEFAULT_MAX_FRONTENDS_PER_SERVICE,
            max_backends: DEFAULT_MAX_BACKENDS_PER_SERVICE,
        }
    }
}

/// A Kubernetes object named in an error.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// "Service" or "EndpointSlice" (borrowed: the manifest source keeps several
    /// references per object, and these two need no allocation), or whatever kind an
    /// input named.
    pub kind: std::borrow::Cow<'static, str>,
    /// Shared, as [`ServiceRef`]'s: the manifest source keeps several references per
    /// object.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectRef {
    /// `kind` as [`ObjectRef::kind`], without an allocation for the two kinds we read.
    pub fn kind_of(kind: &str) -> std::borrow::Cow<'static, str> {
        match kind {
            "Service" => "Service".into(),
            "EndpointSlice" => "EndpointSlice".into(),
            other => other.to_owned().into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// An object (or part of one) that could not be programmed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelError {
    pub object: ObjectRef,
    pub reason: String,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}
