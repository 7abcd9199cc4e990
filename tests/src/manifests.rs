//! Service and EndpointSlice documents shaped like `kubectl get -o yaml` output (keys
//! sorted, server-set fields such as `uid` and `resourceVersion` present), so the agent
//! is tested on what users actually feed it.
use std::{
    hash::{DefaultHasher, Hash, Hasher},
    net::IpAddr,
};

use serde_json::{Map, Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target: TargetPort,
    pub protocol: Protocol,
    /// `nodePort` (NodePort and LoadBalancer Services).
    pub node_port: Option<u16>,
}

/// A ClusterIP Service.
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// One per family; the first is `spec.clusterIP`.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Further `spec` fields (`type`, `externalTrafficPolicy`, `externalIPs`, ...),
    /// set over the ClusterIP defaults.
    pub spec_extra: Map<String, Value>,
    /// `status.loadBalancer.ingress[].ip`.
    pub lb_ingress: Vec<IpAddr>,
}

impl Service {
    pub fn new(namespace: &str, name: &str, cluster_ips: &[IpAddr]) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            cluster_ips: cluster_ips.to_vec(),
            ports: Vec::new(),
            spec_extra: Map::new(),
            lb_ingress: Vec::new(),
        }
    }

    /// Sets `spec.<key>` (overriding the ClusterIP default of that key, if any).
    pub fn spec(mut self, key: &str, value: Value) -> Self {
        self.spec_extra.insert(key.to_owned(), value);
        self
    }

    /// Sets `nodePort` on the port added last.
    pub fn node_port(mut self, node_port: u16) -> Self {
        if let Some(p) = self.ports.last_mut() {
            p.node_port = Some(node_port);
        }
        self
    }

    /// Adds a `status.loadBalancer.ingress` entry (a VIP-mode ingress IP).
    pub fn lb_ingress(mut self, ip: IpAddr) -> Self {
        self.lb_ingress.push(ip);
        self
    }

    /// Adds a port. `name` may be empty only when it is the Service's single port.
    pub fn port(mut self, name: &str, port: u16, target: TargetPort, protocol: Protocol) -> Self {
        self.ports.push(ServicePort {
            name: (!name.is_empty()).then(|| name.to_owned()),
            port,
            target,
            protocol,
            node_port: None,
        });
        self
    }

    pub fn to_value(&self) -> Value {
        let families: Vec<&str> = self.cluster_ips.iter().map(|ip| family(*ip)).collect();
        let ips: Vec<String> = self.cluster_ips.iter().map(ToString::to_string).collect();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut m = Map::new();
                if let Some(n) = &p.name {
                    m.insert("name".into(), json!(n));
                }
                if let Some(np) = p.node_port {
                    m.insert("nodePort".into(), json!(np));
                }
                m.insert("port".into(), json!(p.port));
                m.insert("protocol".into(), json!(p.protocol.as_str()));
                m.insert(
                    "targetPort".into(),
                    match &p.target {
                        TargetPort::Number(n) => json!(n),
                        TargetPort::Name(n) => json!(n),
                    },
                );
                Value::Object(m)
            })
            .collect();
        let policy = if self.cluster_ips.len() > 1 {
            "RequireDualStack"
        } else {
            "SingleStack"
        };
        let mut spec = json!({
            "clusterIP": ips.first().cloned().unwrap_or_else(|| "None".into()),
            "clusterIPs": ips,
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": families,
            "ipFamilyPolicy": policy,
            "ports": ports,
            "selector": { "app": self.name },
            "sessionAffinity": "None",
            "type": "ClusterIP",
        });
        if let Value::Object(m) = &mut spec {
            for (k, v) in &self.spec_extra {
                m.insert(k.clone(), v.clone());
            }
        }
        let status = if self.lb_ingress.is_empty() {
            json!({ "loadBalancer": {} })
        } else {
            let ingress: Vec<Value> = self
                .lb_ingress
                .iter()
                .map(|ip| json!({ "ip": ip.to_string(), "ipMode": "VIP" }))
                .collect();
            json!({ "loadBalancer": { "ingress": ingress } })
        };
        sorted(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "creationTimestamp": "2025-01-15T09:30:00Z",
                "labels": { "app": self.name },
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": resource_version(&self.name),
                "uid": fake_uid(&["svc", &self.namespace, &self.name]),
            },
            "spec": spec,
            "status": status,
        }))
    }
}

#[derive(Clone, Debug)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// One endpoint. `None` conditions are left out of the document, as the API server
/// leaves them out when they are unknown.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub pod: Option<String>,
    /// `nodeName`; `None` writes the single-node lab's `node-1`.
    pub node_name: Option<String>,
}

impl Endpoint {
    /// A ready, serving, non-terminating endpoint.
    pub fn ready(address: IpAddr) -> Self {
        Self {
            address,
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
            pod: None,
            node_name: None,
        }
    }

    pub fn node(mut self, node_name: &str) -> Self {
        self.node_name = Some(node_name.into());
        self
    }

    pub fn conditions(
        mut self,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Self {
        self.ready = ready;
        self.serving = serving;
        self.terminating = terminating;
        self
    }

    pub fn pod(mut self, name: &str) -> Self {
        self.pod = Some(name.into());
        self
    }
}

/// An EndpointSlice of one address family, owned by a Service through the
/// `kubernetes.io/service-name` label.
#[derive(Clone, Debug)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub v6: bool,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    pub fn new(namespace: &str, service: &str, name_suffix: &str, v6: bool) -> Self {
        Self {
            namespace: namespace.into(),
            name: format!("{service}-{name_suffix}"),
            service: service.into(),
            v6,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    pub fn port(mut self, name: &str, port: u16, protocol: Protocol) -> Self {
        self.ports.push(SlicePort {
            name: (!name.is_empty()).then(|| name.to_owned()),
            port,
            protocol,
        });
        self
    }

    pub fn endpoint(mut self, e: Endpoint) -> Self {
        self.endpoints.push(e);
        self
    }

    /// Ready endpoints at each address.
    pub fn ready_endpoints(mut self, addrs: &[IpAddr]) -> Self {
        for a in addrs {
            self.endpoints.push(Endpoint::ready(*a));
        }
        self
    }

    pub fn to_value(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut cond = Map::new();
                for (k, v) in [
                    ("ready", e.ready),
                    ("serving", e.serving),
                    ("terminating", e.terminating),
                ] {
                    if let Some(v) = v {
                        cond.insert(k.into(), json!(v));
                    }
                }
                let pod = e
                    .pod
                    .clone()
                    .unwrap_or_else(|| format!("{}-{i}", self.service));
                json!({
                    "addresses": [e.address.to_string()],
                    "conditions": cond,
                    "nodeName": e.node_name.clone().unwrap_or_else(|| "node-1".into()),
                    "targetRef": {
                        "kind": "Pod",
                        "name": pod,
                        "namespace": self.namespace,
                        "uid": fake_uid(&["pod", &self.namespace, &pod]),
                    },
                })
            })
            .collect();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                json!({
                    // kubectl shows an unnamed port as name: "".
                    "name": p.name.clone().unwrap_or_default(),
                    "port": p.port,
                    "protocol": p.protocol.as_str(),
                })
            })
            .collect();
        sorted(json!({
            "addressType": if self.v6 { "IPv6" } else { "IPv4" },
            "apiVersion": "discovery.k8s.io/v1",
            "endpoints": endpoints,
            "kind": "EndpointSlice",
            "metadata": {
                "annotations": {
                    "endpoints.kubernetes.io/last-change-trigger-time": "2025-01-15T09:31:00Z",
                },
                "creationTimestamp": "2025-01-15T09:30:00Z",
                "generateName": format!("{}-", self.service),
                "generation": 1,
                "labels": {
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "kubernetes.io/service-name": self.service,
                },
                "name": self.name,
                "namespace": self.namespace,
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "blockOwnerDeletion": true,
                    "controller": true,
                    "kind": "Service",
                    "name": self.service,
                    "uid": fake_uid(&["svc", &self.namespace, &self.service]),
                }],
                "resourceVersion": resource_version(&self.name),
                "uid": fake_uid(&["slice", &self.namespace, &self.name]),
            },
            "ports": ports,
        }))
    }
}

/// Documents as multi-document YAML (`---` between them).
pub fn yaml_docs(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).expect("a JSON value always serializes to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Documents wrapped in a `kind: List`, as `kubectl get svc,endpointslice -o yaml` prints.
pub fn yaml_list(items: &[Value]) -> String {
    let list = sorted(json!({
        "apiVersion": "v1",
        "items": items,
        "kind": "List",
        "metadata": { "resourceVersion": "" },
    }));
    serde_yaml::to_string(&list).expect("a JSON value always serializes to YAML")
}

/// One document as pretty JSON (`kubectl get -o json`).
pub fn json_doc(doc: &Value) -> String {
    serde_json::to_string_pretty(doc).expect("a JSON value always serializes")
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() { "IPv6" } else { "IPv4" }
}

fn hash(parts: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// A stable uid-shaped string, so documents look like real API objects.
fn fake_uid(parts: &[&str]) -> String {
    let a = hash(parts);
    let b = hash(&[&a.to_string()]);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

fn resource_version(name: &str) -> String {
    (hash(&[name]) % 900_000 + 100_000).to_string()
}

/// Rebuilds every object with its keys in sorted order, as kubectl prints them, whatever
/// the map type behind `serde_json::Value` is.
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut pairs: Vec<(String, Value)> = m.into_iter().collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(pairs.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// A Service in `ns` with one TCP port `port` → `target` and ready endpoints at `addrs`,
/// as two YAML documents in one file.
pub fn tcp_service(
    ns: &str,
    name: &str,
    vip: &str,
    port: u16,
    target: u16,
    addrs: &[std::net::IpAddr],
) -> String {
    let vip = crate::ip(vip);
    let svc = Service::new(ns, name, &[vip]).port(
        "http",
        port,
        TargetPort::Number(target),
        Protocol::Tcp,
    );
    let slice = EndpointSlice::new(ns, name, "x1", vip.is_ipv6())
        .port("http", target, Protocol::Tcp)
        .ready_endpoints(addrs);
    yaml_docs(&[svc.to_value(), slice.to_value()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_yaml_looks_like_kubectl_output() {
        let svc = Service::new("demo", "web", &["10.96.100.10".parse().unwrap()]).port(
            "http",
            80,
            TargetPort::Name("http".into()),
            Protocol::Tcp,
        );
        let y = yaml_docs(&[svc.to_value()]);
        assert!(y.starts_with("apiVersion: v1\nkind: Service\n"), "{y}");
        assert!(y.contains("clusterIP: 10.96.100.10\n"), "{y}");
        assert!(y.contains("targetPort: http\n"), "{y}");
        assert!(y.contains("ipFamilyPolicy: SingleStack\n"), "{y}");
    }

    #[test]
    fn slice_carries_the_service_label_and_optional_conditions() {
        let s = EndpointSlice::new("demo", "web", "abcde", false)
            .port("http", 8080, Protocol::Tcp)
            .endpoint(Endpoint::ready("10.240.1.2".parse().unwrap()).conditions(
                None,
                Some(true),
                None,
            ));
        let v = s.to_value();
        assert_eq!(
            v["metadata"]["labels"]["kubernetes.io/service-name"],
            json!("web")
        );
        assert_eq!(v["endpoints"][0]["conditions"], json!({ "serving": true }));
        let docs = yaml_docs(&[v.clone(), v]);
        assert_eq!(docs.matches("kind: EndpointSlice").count(), 2);
        assert!(docs.contains("\n---\n"));
    }

    #[test]
    fn external_fields_node_port_ingress_and_node_name() {
        let svc = Service::new("demo", "lb", &["10.96.0.5".parse().unwrap()])
            .port("http", 80, TargetPort::Number(8080), Protocol::Tcp)
            .node_port(30080)
            .spec("type", json!("LoadBalancer"))
            .spec("externalTrafficPolicy", json!("Local"))
            .lb_ingress("10.253.0.1".parse().unwrap());
        let v = svc.to_value();
        assert_eq!(v["spec"]["type"], json!("LoadBalancer"));
        assert_eq!(v["spec"]["externalTrafficPolicy"], json!("Local"));
        assert_eq!(v["spec"]["ports"][0]["nodePort"], json!(30080));
        assert_eq!(
            v["status"]["loadBalancer"]["ingress"],
            json!([{ "ip": "10.253.0.1", "ipMode": "VIP" }])
        );
        // Without the new fields the document is what it always was.
        let plain = Service::new("demo", "web", &["10.96.0.6".parse().unwrap()])
            .port("", 80, TargetPort::Number(8080), Protocol::Tcp)
            .to_value();
        assert_eq!(plain["spec"]["type"], json!("ClusterIP"));
        assert!(plain["spec"]["ports"][0].get("nodePort").is_none());
        assert_eq!(plain["status"], json!({ "loadBalancer": {} }));
        let slice = EndpointSlice::new("demo", "lb", "x", false)
            .endpoint(Endpoint::ready("10.251.1.2".parse().unwrap()).node("node-a"))
            .endpoint(Endpoint::ready("10.251.1.3".parse().unwrap()))
            .to_value();
        assert_eq!(slice["endpoints"][0]["nodeName"], json!("node-a"));
        assert_eq!(slice["endpoints"][1]["nodeName"], json!("node-1"));
    }
}
