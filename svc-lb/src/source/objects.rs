//! The sources' own small types for the objects they keep. A decoded k8s-openapi
//! `EndpointSlice` costs about 500 bytes per endpoint and 540 per one-entry label map
//! (at 10 000 Services that layout was most of the agent's heap); these keep only what
//! the model, LB-IPAM, announcement and the health endpoint read, in compact form.
//! The k8s-openapi types stay at the edges: sources and tests convert with `From`.
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

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
    pub namespace: Box<str>,
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
    fn parse(s: &str) -> Self {
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
    pub name: Option<Box<str>>,
    pub port: Option<i32>,
    pub protocol: Option<Box<str>>,
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
    /// announcement) are the ones on this node.
    pub node_name: Option<Box<str>>,
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
            Some(ns) if !ns.is_empty() => ns.into_boxed_str(),
            _ => "default".into(),
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
            name: p.name.map(String::into_boxed_str),
            port: p.port,
            protocol: p.protocol.map(String::into_boxed_str),
        }
    }
}

impl From<Endpoint> for EndpointObj {
    fn from(ep: Endpoint) -> Self {
        let address = match ep.addresses.into_iter().next() {
            None => EndpointAddress::Missing,
            Some(raw) => match raw.parse::<IpAddr>() {
                Ok(ip) => EndpointAddress::Ip(ip),
                Err(_) => EndpointAddress::Invalid(raw.into_boxed_str()),
            },
        };
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
            node_name: ep.node_name.map(String::into_boxed_str),
            hints: hints
                .filter(|h| !h.for_zones.is_empty() || !h.for_nodes.is_empty())
                .map(Box::new),
        }
    }
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
