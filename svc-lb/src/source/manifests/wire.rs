//! The manifest source's own decoding of Services and EndpointSlices: private serde
//! structs that mirror the Kubernetes JSON of the fields svc-lb reads, decoded straight
//! from the text (strings borrowed where the text has no escapes) and converted once
//! into [`SvcObj`] / [`SliceObj`]. Decoding into k8s-openapi types first cost one
//! `String` per field and a `BTreeMap` per label set, all dropped right after (at
//! 10 000 Services most of a full scan).
//!
//! Fields are typed as in the API (`port` an `i32`, `targetPort` an int or a string, …),
//! so a wrong type is still refused with its path (`spec.ports[0].port: invalid type:
//! …`); fields nothing reads are skipped unchecked, including unkept labels and
//! annotations (such as the large `last-applied-configuration`), whose values are only
//! checked to be strings.
use std::{borrow::Cow, fmt, marker::PhantomData};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{
    Deserialize, Deserializer,
    de::{MapAccess, Visitor},
};

use crate::{
    model::{LABEL_HEADLESS, LABEL_SERVICE_NAME, sched},
    source::{
        EndpointHintsObj, EndpointObj, EndpointPortObj, IngressObj, SliceObj, SvcObj, SvcPortObj,
        SvcSpec, is_kept_service_annotation, is_kept_service_label,
        objects::{AddressType, EndpointAddress, shared_name},
    },
};

/// A JSON/YAML string, borrowed from the input when it has no escapes.
#[derive(Debug)]
pub(super) struct Str<'a>(Cow<'a, str>);

impl Str<'_> {
    fn boxed(&self) -> Box<str> {
        (*self.0).into()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

/// A string whose value nothing reads: checked to be one, never copied.
struct AnyStr;

impl<'de> Deserialize<'de> for AnyStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AnyStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(AnyStr)
            }
        }
        d.deserialize_str(V)
    }
}

/// A JSON object decoded as `T`: a derived struct would also take an array (its
/// fields by position), which no manifest means.
pub(super) struct MapOnly<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for MapOnly<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = MapOnly<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(MapOnly)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// Which keys of a string map are kept.
trait Keep {
    fn keep(key: &str) -> bool;
}

struct ServiceLabels;
impl Keep for ServiceLabels {
    fn keep(key: &str) -> bool {
        is_kept_service_label(key)
    }
}
struct ServiceAnnotations;
impl Keep for ServiceAnnotations {
    fn keep(key: &str) -> bool {
        is_kept_service_annotation(key)
    }
}
struct SliceLabels;
impl Keep for SliceLabels {
    fn keep(key: &str) -> bool {
        key == LABEL_SERVICE_NAME || key == LABEL_HEADLESS
    }
}
struct SliceAnnotations;
impl Keep for SliceAnnotations {
    fn keep(key: &str) -> bool {
        key == sched::ANNOTATION_WEIGHTS
    }
}
struct All;
impl Keep for All {
    fn keep(_: &str) -> bool {
        true
    }
}

/// A map of strings to strings, keeping the entries `K` accepts, sorted by key (a later
/// duplicate wins, as in a map).
struct Pairs<'a, K>(Vec<(Str<'a>, Str<'a>)>, PhantomData<K>);

impl<K> Pairs<'_, K> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k.0 == key)
            .map(|(_, v)| &*v.0)
    }

    fn boxed(&self, keep: impl Fn(&str) -> bool) -> crate::source::objects::StrPairs {
        crate::source::objects::pairs_of(self.0.iter().map(|(k, v)| (&*k.0, &*v.0)), keep)
    }
}

impl<'de: 'a, 'a, K: Keep> Deserialize<'de> for Pairs<'a, K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a, K>(PhantomData<(&'a (), K)>);
        impl<'de: 'a, 'a, K: Keep> Visitor<'de> for V<'a, K> {
            type Value = Pairs<'a, K>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<Str<'a>>()? {
                    if K::keep(&key.0) {
                        out.push((key, map.next_value::<Str<'a>>()?));
                    } else {
                        map.next_value::<AnyStr>()?;
                    }
                }
                Ok(Pairs(out, PhantomData))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

#[derive(Deserialize)]
struct Meta<'a, L, A> {
    #[serde(borrow)]
    name: Option<Str<'a>>,
    #[serde(borrow)]
    namespace: Option<Str<'a>>,
    #[serde(borrow, bound(deserialize = "L: Keep"))]
    labels: Option<Pairs<'a, L>>,
    #[serde(borrow, bound(deserialize = "A: Keep"))]
    annotations: Option<Pairs<'a, A>>,
}

impl<L, A> Default for Meta<'_, L, A> {
    fn default() -> Self {
        Self {
            name: None,
            namespace: None,
            labels: None,
            annotations: None,
        }
    }
}

impl<L, A> Meta<'_, L, A> {
    fn name(&self) -> &str {
        self.name.as_ref().map_or("", |n| &n.0)
    }

    fn namespace(&self) -> &str {
        match self.namespace.as_ref() {
            Some(ns) if !ns.0.is_empty() => &ns.0,
            _ => "default",
        }
    }
}

/// A v1 Service.
#[derive(Deserialize)]
pub(super) struct ServiceWire<'a> {
    #[serde(borrow, default)]
    metadata: Meta<'a, ServiceLabels, ServiceAnnotations>,
    #[serde(borrow)]
    spec: Option<SpecWire<'a>>,
    #[serde(borrow)]
    status: Option<StatusWire<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // Decoded to check their type, as the API does.
struct SpecWire<'a> {
    #[serde(borrow, rename = "type")]
    type_: Option<Str<'a>>,
    #[serde(borrow, rename = "clusterIP")]
    cluster_ip: Option<Str<'a>>,
    #[serde(borrow, rename = "clusterIPs")]
    cluster_ips: Option<Vec<Str<'a>>>,
    #[serde(borrow)]
    ports: Option<Vec<PortWire<'a>>>,
    #[serde(borrow, rename = "externalIPs")]
    external_ips: Option<Vec<Str<'a>>>,
    #[serde(borrow)]
    internal_traffic_policy: Option<Str<'a>>,
    #[serde(borrow)]
    external_traffic_policy: Option<Str<'a>>,
    #[serde(borrow)]
    session_affinity: Option<Str<'a>>,
    session_affinity_config: Option<AffinityConfigWire>,
    #[serde(borrow)]
    load_balancer_source_ranges: Option<Vec<Str<'a>>>,
    health_check_node_port: Option<i32>,
    publish_not_ready_addresses: Option<bool>,
    #[serde(borrow)]
    load_balancer_class: Option<Str<'a>>,
    #[serde(borrow, rename = "loadBalancerIP")]
    load_balancer_ip: Option<Str<'a>>,
    #[serde(borrow)]
    ip_families: Option<Vec<Str<'a>>>,
    #[serde(borrow)]
    ip_family_policy: Option<Str<'a>>,
    #[serde(borrow)]
    selector: Option<Pairs<'a, All>>,
    external_name: Option<AnyStr>,
    allocate_load_balancer_node_ports: Option<bool>,
    traffic_distribution: Option<AnyStr>,
}

#[derive(Deserialize)]
struct AffinityConfigWire {
    #[serde(rename = "clientIP")]
    client_ip: Option<ClientIpWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientIpWire {
    timeout_seconds: Option<i32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // Decoded to check its type, as the API does.
struct PortWire<'a> {
    #[serde(borrow)]
    name: Option<Str<'a>>,
    port: i32,
    #[serde(borrow)]
    protocol: Option<Str<'a>>,
    target_port: Option<IntOrString>,
    node_port: Option<i32>,
    app_protocol: Option<AnyStr>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusWire<'a> {
    #[serde(borrow)]
    load_balancer: Option<LbStatusWire<'a>>,
}

#[derive(Deserialize)]
struct LbStatusWire<'a> {
    #[serde(borrow)]
    ingress: Option<Vec<IngressWire<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // Decoded to check its type, as the API does.
struct IngressWire<'a> {
    #[serde(borrow)]
    ip: Option<Str<'a>>,
    #[serde(borrow)]
    ip_mode: Option<Str<'a>>,
    hostname: Option<AnyStr>,
}

fn strs(v: &Option<Vec<Str<'_>>>) -> Box<[Box<str>]> {
    v.iter().flatten().map(Str::boxed).collect()
}

fn opt(v: &Option<Str<'_>>) -> Option<Box<str>> {
    v.as_ref().map(Str::boxed)
}

/// One of a few values every object repeats, shared (see [`shared_name`]).
fn shared(v: &Option<Str<'_>>) -> Option<std::sync::Arc<str>> {
    v.as_ref().map(|s| shared_name(&s.0))
}

impl ServiceWire<'_> {
    /// The Service as the sources keep it; the same object as converting the
    /// k8s-openapi `Service` of the same text (see [`SvcObj`]).
    pub(super) fn to_obj(&self) -> SvcObj {
        svc_obj(&self.metadata, self.spec.as_ref(), self.status.as_ref())
    }
}

fn svc_obj<L, A>(
    meta: &Meta<'_, L, A>,
    spec: Option<&SpecWire<'_>>,
    status: Option<&StatusWire<'_>>,
) -> SvcObj {
    let spec = spec.map(|spec| {
        let lb = spec.type_.as_ref().is_some_and(|t| t.0 == "LoadBalancer");
        Box::new(SvcSpec {
            type_: shared(&spec.type_),
            cluster_ip: opt(&spec.cluster_ip),
            cluster_ips: strs(&spec.cluster_ips),
            ports: spec
                .ports
                .iter()
                .flatten()
                .map(|p| SvcPortObj {
                    name: shared(&p.name),
                    port: p.port,
                    protocol: shared(&p.protocol),
                    target_port: p.target_port.clone(),
                    node_port: p.node_port,
                })
                .collect(),
            external_ips: strs(&spec.external_ips),
            internal_traffic_policy: shared(&spec.internal_traffic_policy),
            external_traffic_policy: shared(&spec.external_traffic_policy),
            session_affinity: shared(&spec.session_affinity),
            affinity_timeout_seconds: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
            load_balancer_source_ranges: strs(&spec.load_balancer_source_ranges),
            health_check_node_port: spec.health_check_node_port,
            publish_not_ready_addresses: spec.publish_not_ready_addresses,
            load_balancer_class: opt(&spec.load_balancer_class),
            load_balancer_ip: opt(&spec.load_balancer_ip),
            ip_families: spec
                .ip_families
                .iter()
                .flatten()
                .map(|s| shared_name(&s.0))
                .collect(),
            ip_family_policy: shared(&spec.ip_family_policy),
            selector: spec
                .selector
                .as_ref()
                .filter(|_| lb)
                .map(|s| s.boxed(|_| true)),
        })
    });
    let ingress = status
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .map(|i| IngressObj {
            ip: opt(&i.ip),
            ip_mode: opt(&i.ip_mode),
        })
        .collect();
    SvcObj {
        name: meta.name().into(),
        namespace: shared_name(meta.namespace()),
        uid: None,
        labels: meta
            .labels
            .as_ref()
            .map(|l| l.boxed(is_kept_service_label))
            .unwrap_or_default(),
        annotations: meta
            .annotations
            .as_ref()
            .map(|a| a.boxed(is_kept_service_annotation))
            .unwrap_or_default(),
        spec,
        ingress,
    }
}

/// A discovery.k8s.io/v1 EndpointSlice.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SliceWire<'a> {
    #[serde(borrow, default)]
    metadata: Meta<'a, SliceLabels, SliceAnnotations>,
    #[serde(borrow)]
    address_type: Str<'a>,
    #[serde(borrow)]
    ports: Option<Vec<SlicePortWire<'a>>>,
    #[serde(borrow)]
    endpoints: Option<Vec<EndpointWire<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // Decoded to check its type, as the API does.
struct SlicePortWire<'a> {
    #[serde(borrow)]
    name: Option<Str<'a>>,
    port: Option<i32>,
    #[serde(borrow)]
    protocol: Option<Str<'a>>,
    app_protocol: Option<AnyStr>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // Decoded to check its type, as the API does.
struct EndpointWire<'a> {
    #[serde(borrow)]
    addresses: Vec<Str<'a>>,
    conditions: Option<ConditionsWire>,
    #[serde(borrow)]
    hints: Option<HintsWire<'a>>,
    #[serde(borrow)]
    node_name: Option<Str<'a>>,
    hostname: Option<AnyStr>,
    zone: Option<AnyStr>,
}

#[derive(Deserialize)]
struct ConditionsWire {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HintsWire<'a> {
    #[serde(borrow)]
    for_zones: Option<Vec<NameWire<'a>>>,
    #[serde(borrow)]
    for_nodes: Option<Vec<NameWire<'a>>>,
}

#[derive(Deserialize)]
struct NameWire<'a> {
    #[serde(borrow)]
    name: Str<'a>,
}

impl SliceWire<'_> {
    /// The slice as the sources keep it; the same object as converting the
    /// k8s-openapi `EndpointSlice` of the same text (see [`SliceObj`]).
    pub(super) fn to_obj(&self) -> SliceObj {
        slice_obj(
            &self.metadata,
            &self.address_type,
            &self.ports,
            &self.endpoints,
        )
    }
}

fn slice_obj<L, A>(
    meta: &Meta<'_, L, A>,
    address_type: &Str<'_>,
    ports: &Option<Vec<SlicePortWire<'_>>>,
    endpoints: &Option<Vec<EndpointWire<'_>>>,
) -> SliceObj {
    let labels = meta.labels.as_ref();
    let names = |v: &Option<Vec<NameWire<'_>>>| -> Box<[Box<str>]> {
        v.iter().flatten().map(|n| n.name.boxed()).collect()
    };
    SliceObj {
        name: meta.name().into(),
        namespace: shared_name(meta.namespace()),
        service_name: labels
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .map(Into::into),
        headless: labels.is_some_and(|l| l.get(LABEL_HEADLESS).is_some()),
        address_type: AddressType::parse(&address_type.0),
        ports: ports
            .iter()
            .flatten()
            .map(|p| EndpointPortObj {
                name: shared(&p.name),
                port: p.port,
                protocol: shared(&p.protocol),
            })
            .collect(),
        endpoints: endpoints
            .iter()
            .flatten()
            .map(|ep| {
                let cond = ep.conditions.as_ref();
                let hints = ep.hints.as_ref().map(|h| EndpointHintsObj {
                    for_zones: names(&h.for_zones),
                    for_nodes: names(&h.for_nodes),
                });
                EndpointObj {
                    address: EndpointAddress::of_first(ep.addresses.first().map(|a| &*a.0)),
                    ready: cond.and_then(|c| c.ready),
                    serving: cond.and_then(|c| c.serving),
                    terminating: cond.and_then(|c| c.terminating),
                    node_name: ep.node_name.as_ref().map(|n| shared_name(&n.0)),
                    hints: hints
                        .filter(|h| !h.for_zones.is_empty() || !h.for_nodes.is_empty())
                        .map(Box::new),
                }
            })
            .collect(),
        weights: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(sched::ANNOTATION_WEIGHTS))
            .map(|v| Box::new(sched::parse_weights(v))),
    }
}

/// Keys kept of a Service or an EndpointSlice, for [`AnyWire`].
struct AnyLabels;
impl Keep for AnyLabels {
    fn keep(key: &str) -> bool {
        ServiceLabels::keep(key) || SliceLabels::keep(key)
    }
}
struct AnyAnnotations;
impl Keep for AnyAnnotations {
    fn keep(key: &str) -> bool {
        ServiceAnnotations::keep(key) || SliceAnnotations::keep(key)
    }
}

/// Any JSON document or list item, decoded in one pass: the head of every object and
/// the fields of both a Service and an EndpointSlice. The JSON fast path reads a file
/// with it, so that the text is tokenized once rather than once for the head, once
/// for the list and once for each object. Anything it cannot decode sends the file to
/// the general path, which reports the problem.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AnyWire<'a> {
    #[serde(default)]
    pub api_version: super::HeadStr,
    #[serde(default)]
    pub kind: super::HeadStr,
    #[serde(borrow, default)]
    metadata: Meta<'a, AnyLabels, AnyAnnotations>,
    #[serde(borrow)]
    spec: Option<SpecWire<'a>>,
    #[serde(borrow)]
    status: Option<StatusWire<'a>>,
    #[serde(borrow)]
    address_type: Option<Str<'a>>,
    #[serde(borrow)]
    ports: Option<Vec<SlicePortWire<'a>>>,
    #[serde(borrow)]
    endpoints: Option<Vec<EndpointWire<'a>>>,
    #[serde(borrow)]
    pub items: Option<Vec<MapOnly<AnyWire<'a>>>>,
}

impl AnyWire<'_> {
    /// The object as a Service.
    pub(super) fn service(&self) -> SvcObj {
        svc_obj(&self.metadata, self.spec.as_ref(), self.status.as_ref())
    }

    /// The object as an EndpointSlice; `None` without `addressType` (required).
    pub(super) fn slice(&self) -> Option<SliceObj> {
        Some(slice_obj(
            &self.metadata,
            self.address_type.as_ref()?,
            &self.ports,
            &self.endpoints,
        ))
    }
}
