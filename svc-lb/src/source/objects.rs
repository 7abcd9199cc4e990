//! The sources' own small types for the objects they keep. A decoded k8s-openapi
//! `EndpointSlice` costs about 500 bytes per endpoint and 540 per one-entry label map
//! (at 10 000 Services that layout was most of the agent's heap); these keep only what
//! the model, LB-IPAM, announcement and the health endpoint read, in compact form.
//! The k8s-openapi types stay at the edges: sources and tests convert with `From`.
use std::{net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::model::{LABEL_HEADLESS, LABEL_SERVICE_NAME};

/// An EndpointSlice as the sources keep it. How to read each Kubernetes field:
///
/// - `metadata.name` → `name`; `metadata.namespace` → `namespace` ("default" when unset
///   or empty, as the API server fills it in).
/// - `metadata.labels["kubernetes.io/service-name"]` → `service_name` (the owning
///   Service); `metadata.labels["service.kubernetes.io/headless"]` present → `headless`.
/// - `metadata.annotations["svc-lb.io/weights"]` → `weights` (parsed). No other label
///   or annotation is read by anything.
/// - `addressType` → `address_type`.
/// - `ports[]` → `ports` (an absent list is empty).
/// - `endpoints[]` → `endpoints` (see [`EndpointObj`]).
///
/// Not kept: uid, resource version, owner references, `endpoints[].targetRef`,
/// `hostname`, `deprecatedTopology`, `zone` (nothing reads them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceObj {
    pub name: Box<str>,
    /// Shared (see [`shared_name`]): a cluster has few namespaces.
    pub namespace: Arc<str>,
    /// Kept: sources file the slice under this Service.
    pub service_name: Option<Box<str>>,
    /// Kept: the model ignores headless slices, as kube-proxy does.
    pub headless: bool,
    /// Kept: the model checks every address's family against it.
    pub address_type: AddressType,
    pub ports: Box<[EndpointPortObj]>,
    pub endpoints: Box<[EndpointObj]>,
    /// `metadata.annotations["svc-lb.io/weights"]`, parsed (`None` when absent, as
    /// almost always); the model reports its bad entries against the slice.
    pub weights: Option<Box<crate::model::sched::EndpointWeights>>,
}

/// `addressType` of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
    Fqdn,
    /// Anything else, as written (the model reports it).
    Other(Box<str>),
}

impl AddressType {
    pub(crate) fn parse(s: &str) -> Self {
        match s {
            "IPv4" => Self::IPv4,
            "IPv6" => Self::IPv6,
            "FQDN" => Self::Fqdn,
            other => Self::Other(other.into()),
        }
    }

    /// The value as Kubernetes writes it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::IPv4 => "IPv4",
            Self::IPv6 => "IPv6",
            Self::Fqdn => "FQDN",
            Self::Other(s) => s,
        }
    }
}

impl std::fmt::Display for AddressType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `ports[]` of an EndpointSlice: `name`, `port`, `protocol` as in the API (the model
/// validates them and reports bad ones; `appProtocol` is not read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPortObj {
    /// Shared (see [`shared_name`]), as `protocol`: a few values repeated in every
    /// slice.
    pub name: Option<Arc<str>>,
    pub port: Option<i32>,
    pub protocol: Option<Arc<str>>,
}

/// `endpoints[]` of an EndpointSlice. How to read each Kubernetes field:
///
/// - `addresses[0]` → `address` (parsed once; the API defines all addresses of one
///   endpoint as fungible and kube-proxy uses the first, so the others are not kept).
/// - `conditions.ready` / `.serving` / `.terminating` → `ready` / `serving` /
///   `terminating` (`None`: unset, "unknown").
/// - `nodeName` → `node_name`.
/// - `hints.forZones[].name` / `hints.forNodes[].name` → `hints.for_zones` /
///   `hints.for_nodes` (`hints` is `None` when both are empty, as almost always).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointObj {
    pub address: EndpointAddress,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// Kept: local endpoints (externalTrafficPolicy Local, health checks, L2
    /// announcement) are the ones on this node. Shared (see [`shared_name`]): a cluster
    /// has few nodes and many endpoints.
    pub node_name: Option<Arc<str>>,
    /// Kept: topology-aware routing.
    pub hints: Option<Box<EndpointHintsObj>>,
}

/// The first address of an endpoint. A bad one is kept as written, so that the model
/// still reports it by name (`endpoints[i]: 'x' is not a valid IP address`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointAddress {
    Ip(IpAddr),
    Invalid(Box<str>),
    /// `addresses` is empty.
    Missing,
}

impl EndpointAddress {
    /// The first of an endpoint's `addresses`, parsed.
    pub(crate) fn of_first(raw: Option<&str>) -> Self {
        match raw {
            None => Self::Missing,
            Some(raw) => match raw.parse::<IpAddr>() {
                Ok(ip) => Self::Ip(ip),
                Err(_) => Self::Invalid(raw.into()),
            },
        }
    }
}

/// `hints` of an endpoint: the zone and node names only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointHintsObj {
    pub for_zones: Box<[Box<str>]>,
    pub for_nodes: Box<[Box<str>]>,
}

impl From<EndpointSlice> for SliceObj {
    fn from(slice: EndpointSlice) -> Self {
        let meta = slice.metadata;
        let labels = meta.labels.unwrap_or_default();
        let weights = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::model::sched::ANNOTATION_WEIGHTS))
            .map(|v| Box::new(crate::model::sched::parse_weights(v)));
        let namespace = match meta.namespace {
            Some(ns) if !ns.is_empty() => shared_name(&ns),
            _ => shared_name("default"),
        };
        SliceObj {
            name: meta.name.unwrap_or_default().into_boxed_str(),
            namespace,
            service_name: labels.get(LABEL_SERVICE_NAME).map(|s| s.as_str().into()),
            headless: labels.contains_key(LABEL_HEADLESS),
            address_type: AddressType::parse(&slice.address_type),
            ports: slice
                .ports
                .into_iter()
                .flatten()
                .map(EndpointPortObj::from)
                .collect(),
            endpoints: slice
                .endpoints
                .into_iter()
                .flatten()
                .map(EndpointObj::from)
                .collect(),
            weights,
        }
    }
}

impl From<EndpointPort> for EndpointPortObj {
    fn from(p: EndpointPort) -> Self {
        Self {
            name: p.name.as_deref().map(shared_name),
            port: p.port,
            protocol: p.protocol.as_deref().map(shared_name),
        }
    }
}

impl From<Endpoint> for EndpointObj {
    fn from(ep: Endpoint) -> Self {
        let address = EndpointAddress::of_first(ep.addresses.first().map(String::as_str));
        let cond = ep.conditions.unwrap_or_default();
        let hints = ep.hints.map(|h| EndpointHintsObj {
            for_zones: h
                .for_zones
                .into_iter()
                .flatten()
                .map(|z| z.name.into_boxed_str())
                .collect(),
            for_nodes: h
                .for_nodes
                .into_iter()
                .flatten()
                .map(|n| n.name.into_boxed_str())
                .collect(),
        });
        Self {
            address,
            ready: cond.ready,
            serving: cond.serving,
            terminating: cond.terminating,
            node_name: ep.node_name.as_deref().map(shared_name),
            hints: hints
                .filter(|h| !h.for_zones.is_empty() || !h.for_nodes.is_empty())
                .map(Box::new),
        }
    }
}

/// How many distinct names [`shared_name`] remembers per thread before it starts
/// over: more than a cluster has nodes or namespaces, so that the set only ever fills
/// up when names churn (nodes replaced for ever), and then stays small.
const SHARED_NAMES_KEPT: usize = 4096;

thread_local! {
    // foldhash, not SipHash: a lookup per enumerated field of every object the scan
    // decodes (about 2.4 million at 100 000 Services x 10 endpoints), and the keys are
    // the cluster's own names, not chosen to collide by a client.
    static SHARED_NAMES: std::cell::RefCell<foldhash::HashSet<Arc<str>>> =
        std::cell::RefCell::default();
}

/// A node name or a namespace as one shared string per distinct value. Every endpoint
/// names its node and every object its namespace, and a cluster has few of either: at
/// 100 000 Services × 10 endpoints a string of its own per endpoint (a 32-byte heap
/// chunk for `node-1`) was about 32 MB of the agent's heap. The set is per thread (the
/// manifest scan parses on several) so that no lock is taken per object; an equal name
/// from another thread is another allocation, which only costs memory.
pub(crate) fn shared_name(name: &str) -> Arc<str> {
    SHARED_NAMES.with(|names| {
        let mut names = names.borrow_mut();
        if let Some(shared) = names.get(name) {
            return shared.clone();
        }
        if names.len() >= SHARED_NAMES_KEPT {
            names.clear();
        }
        let shared: Arc<str> = name.into();
        names.insert(shared.clone());
        shared
    })
}

impl SliceObj {
    /// The slice's namespace/name as an object reference, for error messages.
    pub fn object_ref(&self) -> crate::model::ObjectRef {
        crate::model::ObjectRef {
            kind: "EndpointSlice".into(),
            namespace: (*self.namespace).into(),
            name: (*self.name).into(),
        }
    }
}

/// Key/value pairs sorted by key (the labels, annotations or selector kept of an
/// object): one small allocation instead of a map's tree nodes.
pub type StrPairs = Box<[(Box<str>, Box<str>)]>;

/// A Service as the sources keep it: what the model, LB-IPAM and the leader's status
/// writes read, nothing else. How to read each Kubernetes field:
///
/// - `metadata.name` → `name` (empty when unset: the model reports it);
///   `metadata.namespace` → `namespace` ("default" when unset or empty); `metadata.uid`
///   → `uid` (the Kubernetes source only, so that a Service deleted and created again is
///   a change).
/// - `metadata.labels`: only `service.kubernetes.io/headless` and
///   `service.kubernetes.io/service-proxy-name` (the model reads them; nothing selects
///   Services by label) → `labels`.
/// - `metadata.annotations`: only those [`super::is_kept_service_annotation`] accepts
///   (`svc-lb.io/…`, MetalLB's, the legacy source-ranges one) → `annotations`, read
///   through [`SvcObj::annotation`].
/// - `spec` → `spec` (see [`SvcSpec`]); `None` when absent (the model skips it).
/// - `status.loadBalancer.ingress[].ip` / `.ipMode` → `ingress` (hostname-only entries
///   keep `ip: None`; `status.conditions` are not kept).
///
/// Addresses stay as written: the model and LB-IPAM report a bad one by its text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcObj {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub uid: Option<Box<str>>,
    /// Kept labels only, in key order.
    pub labels: StrPairs,
    /// Kept annotations only, in key order.
    pub annotations: StrPairs,
    pub spec: Option<Box<SvcSpec>>,
    pub ingress: Box<[IngressObj]>,
}

/// `spec` of a Service; each field is the Kubernetes field of the same (snake-case)
/// name, absent lists empty. Not kept: `selector` of a Service that is not a
/// `LoadBalancer` (LB-IPAM compares the selectors of `Local` LoadBalancer Services that
/// share an address; svc-lb proxies by EndpointSlices), `externalName`,
/// `allocateLoadBalancerNodePorts`, `trafficDistribution`, `ports[].appProtocol`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
///
/// The fields whose values come from a short list (`type`, the policies,
/// `sessionAffinity`, `ipFamilies`, and the ports' `name` and `protocol`) are shared
/// strings (see [`shared_name`]): every Service repeats them, and a string of its own
/// each was a 32-byte heap chunk (about 25 MB at 100 000 Services).
pub struct SvcSpec {
    pub type_: Option<Arc<str>>,
    pub cluster_ip: Option<Box<str>>,
    pub cluster_ips: Box<[Box<str>]>,
    pub ports: Box<[SvcPortObj]>,
    pub external_ips: Box<[Box<str>]>,
    pub internal_traffic_policy: Option<Arc<str>>,
    pub external_traffic_policy: Option<Arc<str>>,
    pub session_affinity: Option<Arc<str>>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_seconds: Option<i32>,
    pub load_balancer_source_ranges: Box<[Box<str>]>,
    pub health_check_node_port: Option<i32>,
    pub publish_not_ready_addresses: Option<bool>,
    pub load_balancer_class: Option<Box<str>>,
    pub load_balancer_ip: Option<Box<str>>,
    pub ip_families: Box<[Arc<str>]>,
    pub ip_family_policy: Option<Arc<str>>,
    /// `LoadBalancer` Services only, in key order.
    pub selector: Option<StrPairs>,
}

/// `spec.ports[]` of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcPortObj {
    pub name: Option<Arc<str>>,
    pub port: i32,
    pub protocol: Option<Arc<str>>,
    pub target_port: Option<IntOrString>,
    pub node_port: Option<i32>,
}

/// One `status.loadBalancer.ingress[]` entry: its address and `ipMode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressObj {
    pub ip: Option<Box<str>>,
    pub ip_mode: Option<Box<str>>,
}

impl SvcObj {
    /// The value of annotation `key`, if kept (see [`super::is_kept_service_annotation`]).
    pub fn annotation(&self, key: &str) -> Option<&str> {
        find_pair(&self.annotations, key)
    }

    /// Whether the Service carries label `key` (kept labels only).
    pub fn has_label(&self, key: &str) -> bool {
        find_pair(&self.labels, key).is_some()
    }

    /// The value of label `key` (kept labels only).
    pub fn label(&self, key: &str) -> Option<&str> {
        find_pair(&self.labels, key)
    }

    /// Whether `type` is `LoadBalancer`.
    pub fn is_load_balancer(&self) -> bool {
        self.spec
            .as_ref()
            .is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer"))
    }
}

fn find_pair<'a>(pairs: &'a [(Box<str>, Box<str>)], key: &str) -> Option<&'a str> {
    pairs
        .binary_search_by(|(k, _)| (**k).cmp(key))
        .ok()
        .map(|i| &*pairs[i].1)
}

/// Sorted by key, later duplicates winning as in a map; `keep` filters the keys.
pub(crate) fn pairs_of<K: AsRef<str>, V: AsRef<str>>(
    it: impl IntoIterator<Item = (K, V)>,
    keep: impl Fn(&str) -> bool,
) -> StrPairs {
    let mut v: Vec<(Box<str>, Box<str>)> = Vec::new();
    for (k, val) in it {
        let k = k.as_ref();
        if !keep(k) {
            continue;
        }
        match v.binary_search_by(|(x, _)| (**x).cmp(k)) {
            Ok(i) => v[i].1 = val.as_ref().into(),
            Err(i) => v.insert(i, (k.into(), val.as_ref().into())),
        }
    }
    v.into_boxed_slice()
}

/// Like [`boxed_strs`], each value shared (see [`shared_name`]).
pub(crate) fn shared_strs<S: AsRef<str>>(
    v: Option<impl IntoIterator<Item = S>>,
) -> Box<[Arc<str>]> {
    v.into_iter()
        .flatten()
        .map(|s| shared_name(s.as_ref()))
        .collect()
}

pub(crate) fn boxed_strs<S: AsRef<str>>(v: Option<impl IntoIterator<Item = S>>) -> Box<[Box<str>]> {
    v.into_iter().flatten().map(|s| s.as_ref().into()).collect()
}

impl From<Service> for SvcObj {
    fn from(svc: Service) -> Self {
        let meta = svc.metadata;
        let spec = svc.spec.map(|spec| {
            let lb = spec.type_.as_deref() == Some("LoadBalancer");
            Box::new(SvcSpec {
                type_: spec.type_.as_deref().map(shared_name),
                cluster_ip: spec.cluster_ip.map(String::into_boxed_str),
                cluster_ips: boxed_strs(spec.cluster_ips),
                ports: spec
                    .ports
                    .into_iter()
                    .flatten()
                    .map(SvcPortObj::from)
                    .collect(),
                external_ips: boxed_strs(spec.external_ips),
                internal_traffic_policy: spec.internal_traffic_policy.as_deref().map(shared_name),
                external_traffic_policy: spec.external_traffic_policy.as_deref().map(shared_name),
                session_affinity: spec.session_affinity.as_deref().map(shared_name),
                affinity_timeout_seconds: spec
                    .session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds),
                load_balancer_source_ranges: boxed_strs(spec.load_balancer_source_ranges),
                health_check_node_port: spec.health_check_node_port,
                publish_not_ready_addresses: spec.publish_not_ready_addresses,
                load_balancer_class: spec.load_balancer_class.map(String::into_boxed_str),
                load_balancer_ip: spec.load_balancer_ip.map(String::into_boxed_str),
                ip_families: shared_strs(spec.ip_families),
                ip_family_policy: spec.ip_family_policy.as_deref().map(shared_name),
                selector: spec.selector.filter(|_| lb).map(|s| pairs_of(s, |_| true)),
            })
        });
        let ingress = svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .into_iter()
            .flatten()
            .map(|i| IngressObj {
                ip: i.ip.map(String::into_boxed_str),
                ip_mode: i.ip_mode.map(String::into_boxed_str),
            })
            .collect();
        SvcObj {
            name: meta.name.as_deref().unwrap_or_default().into(),
            namespace: match meta.namespace.as_deref() {
                Some(ns) if !ns.is_empty() => ns.into(),
                _ => "default".into(),
            },
            uid: None,
            labels: pairs_of(
                meta.labels.into_iter().flatten(),
                super::is_kept_service_label,
            ),
            annotations: pairs_of(
                meta.annotations.into_iter().flatten(),
                super::is_kept_service_annotation,
            ),
            spec,
            ingress,
        }
    }
}

impl From<ServicePort> for SvcPortObj {
    fn from(p: ServicePort) -> Self {
        Self {
            name: p.name.as_deref().map(shared_name),
            port: p.port,
            protocol: p.protocol.as_deref().map(shared_name),
            target_port: p.target_port,
            node_port: p.node_port,
        }
    }
}
