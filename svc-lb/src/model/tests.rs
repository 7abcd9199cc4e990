//! Table-driven tests of [`build`]: Kubernetes YAML in, rendered frontends and errors
//! out. Each case states the exact frontends (with their backends) and the exact errors.
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;
use svc_lb_common::{
    BACKEND_ACTIVE, BACKEND_TERMINATING, KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER,
    KIND_NODE_PORT, META_EXTERNAL_LOCAL, META_INTERNAL_LOCAL, PROTO_TCP, PROTO_UDP, SCOPE_ALL,
};

use super::{DesiredState, ModelError, NodeInfo, build};
use crate::source::{Snapshot, compact_service};

// Bad-input catalogue cases (tests/README.md).
mod catalogue;
// The incremental model (Cache) against full builds.
mod incremental;

/// The node the model runs for.
#[derive(Clone, Copy)]
struct TestNode {
    name: Option<&'static str>,
    zone: Option<&'static str>,
    addresses: &'static [&'static str],
    proxy_name: Option<&'static str>,
}

/// A node without a name, zone or addresses (manifest mode without NODE_NAME).
const NO_NODE: TestNode = TestNode {
    name: None,
    zone: None,
    addresses: &[],
    proxy_name: None,
};

impl TestNode {
    const fn named(name: &'static str) -> Self {
        Self {
            name: Some(name),
            ..NO_NODE
        }
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.map(str::to_owned),
            zone: self.zone.map(str::to_owned),
            addresses: self
                .addresses
                .iter()
                .map(|a| a.parse().expect("test node address"))
                .collect(),
            service_proxy_name: self.proxy_name.map(str::to_owned),
            external: false,
            ..NodeInfo::default()
        }
    }
}

struct Case {
    name: &'static str,
    node: TestNode,
    yaml: &'static str,
    /// Every frontend, rendered by [`render`], in key order.
    want: &'static [&'static str],
    /// Every error as (object, substring of the reason), in order.
    errors: &'static [(&'static str, &'static str)],
}

fn parse(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc).expect("test YAML parses");
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("Service") => services.push(serde_yaml::from_value(value).expect("a Service")),
            Some("EndpointSlice") => slices.push(serde_yaml::from_value(value).expect("a slice")),
            other => panic!("unexpected kind {other:?} in test YAML"),
        }
    }
    (services, slices)
}

fn proto(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => panic!("unexpected protocol {p}"),
    }
}

fn hostport(addr: std::net::IpAddr, port: u16) -> String {
    match addr {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// `10.96.0.1:80/TCP (NodePort) ns/name:port [10.0.0.1:8080 10.0.0.2:8080(T)] affinity=10800 itp=Local`
/// where `(T)` marks a terminating backend, the kind is shown unless it is a cluster IP
/// and the traffic policy only when it is Local. Also checks the invariants every frontend
/// must hold, so that no case can forget them.
fn render(state: &DesiredState) -> Vec<String> {
    state
        .frontends
        .iter()
        .map(|(key, fe)| {
            assert_eq!(*key, fe.key, "map key and frontend key agree");
            assert_eq!(key.scope, SCOPE_ALL);
            let mut sorted = fe.backends.clone();
            sorted.sort();
            sorted.dedup_by_key(|b| b.addr);
            assert_eq!(sorted, fe.backends, "backends are sorted and unique");
            let backends: Vec<String> = fe
                .backends
                .iter()
                .map(|b| {
                    assert_eq!(
                        b.addr.proto, key.proto,
                        "backend protocol follows the frontend"
                    );
                    assert_eq!(
                        b.addr.addr.is_ipv4(),
                        key.addr.is_ipv4(),
                        "one address family"
                    );
                    let mark = match b.state {
                        BACKEND_ACTIVE => "",
                        BACKEND_TERMINATING => "(T)",
                        s => panic!("unexpected backend state {s}"),
                    };
                    format!("{}{mark}", hostport(b.addr.addr, b.addr.port))
                })
                .collect();
            let affinity = fe
                .affinity_timeout_s
                .map(|t| format!(" affinity={t}"))
                .unwrap_or_default();
            let kind = match fe.kind {
                KIND_CLUSTER_IP => "",
                KIND_NODE_PORT => " (NodePort)",
                KIND_EXTERNAL_IP => " (ExternalIP)",
                KIND_LOAD_BALANCER => " (LoadBalancer)",
                k => panic!("unexpected kind {k}"),
            };
            let policy = match fe.meta_flags {
                0 => "",
                META_INTERNAL_LOCAL => " itp=Local",
                META_EXTERNAL_LOCAL => " etp=Local",
                f => panic!("unexpected meta flags {f}"),
            };
            format!(
                "{}/{}{kind} {}:{} [{}]{affinity}{policy}",
                hostport(key.addr, key.port),
                proto(key.proto),
                fe.service,
                fe.port_name,
                backends.join(" "),
            )
        })
        .collect()
}

/// Errors come per Service; `want` lists them in any order of objects, and in the
/// model's order for one object.
fn check_errors(case: &str, got: &[ModelError], want: &[(&str, &str)]) {
    let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
    assert_eq!(got.len(), want.len(), "case {case}: errors {shown:#?}");
    let mut got: Vec<&ModelError> = got.iter().collect();
    got.sort_by_key(|e| e.object.to_string());
    let mut want = want.to_vec();
    want.sort_by_key(|(object, _)| *object);
    for (err, (object, reason)) in got.iter().zip(&want) {
        assert_eq!(
            err.object.to_string(),
            *object,
            "case {case}: errors {shown:#?}"
        );
        assert!(
            err.reason.contains(reason),
            "case {case}: {err} should say {reason:?}"
        );
    }
}

fn snapshot(services: &[Service], slices: &[EndpointSlice]) -> Snapshot {
    Snapshot::from_lists(services.to_vec(), slices.to_vec())
}

fn run(case: &Case) {
    let (services, slices) = parse(case.yaml);
    let node = case.node.info();
    let (state, errors) = build(&snapshot(&services, &slices), &node);
    assert_eq!(render(&state), case.want, "case {}", case.name);
    check_errors(case.name, &errors, case.errors);
    for reverse in [false, true] {
        let (built, built_errors) = one_at_a_time(&services, &slices, &node, reverse);
        assert_eq!(built, state, "case {}: incremental state", case.name);
        assert_eq!(
            built_errors, errors,
            "case {}: incremental errors",
            case.name
        );
    }
    // The sources keep objects compacted to what the model reads: every case must model
    // the same from them as from the full objects (slices are always kept as
    // `SliceObj`, whose conversion the snapshot above already went through).
    let compacted = Snapshot::from_lists(
        services
            .iter()
            .cloned()
            .map(compact_service)
            .collect::<Vec<_>>(),
        slices.clone(),
    );
    let (from_compacted, compacted_errors) = build(&compacted, &node);
    assert_eq!(
        from_compacted, state,
        "case {}: compacted objects",
        case.name
    );
    assert_eq!(
        compacted_errors, errors,
        "case {}: compacted objects' errors",
        case.name
    );
}

/// One edit of a snapshot.
type Step<'a> = Box<dyn Fn(&mut Snapshot) + 'a>;

/// The objects added to a [`Cache`](super::Cache) one at a time (in input order or
/// reversed), each update checked against a full build of the objects so far.
fn one_at_a_time(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
    reverse: bool,
) -> (DesiredState, Vec<ModelError>) {
    let mut cache = super::Cache::default();
    let mut snap = Snapshot::default();
    snap.changed.all = true;
    crate::fuzzing::check_incremental(&mut cache, &snap, node, &build(&snap, node).0);
    let mut steps: Vec<Step<'_>> = Vec::new();
    for svc in services {
        steps.push(Box::new(move |snap: &mut Snapshot| {
            let svc = compact_service(svc.clone());
            let sref = crate::source::service_ref(&svc);
            snap.services.insert(sref.clone(), std::sync::Arc::new(svc));
            snap.changed.services.insert(sref);
        }));
    }
    for slice in slices {
        steps.push(Box::new(move |snap: &mut Snapshot| {
            if let Some(owner) = snap.insert_slice(std::sync::Arc::new(slice.clone().into())) {
                snap.changed.services.insert(owner);
            }
        }));
    }
    if reverse {
        steps.reverse();
    }
    for step in steps {
        snap.changed = Default::default();
        step(&mut snap);
        crate::fuzzing::check_incremental(&mut cache, &snap, node, &build(&snap, node).0);
    }
    let errors = cache.errors().cloned().collect();
    (cache.into_desired(), errors)
}

const CASES: &[Case] = &[
    Case {
        name: "cluster IP with sorted ready backends",
        node: NO_NODE,
        yaml: r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.0.0.3], conditions: {ready: true}}
- {addresses: [10.0.0.1], conditions: {ready: true}}
- {addresses: [10.0.0.2]}
"#,
        want: &["10.96.0.10:80/TCP shop/web:http [10.0.0.1:8080 10.0.0.2:8080 10.0.0.3:8080]"],
        errors: &[],
    },
    Case {
        name: "multiple ports, one number with two protocols",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIPs: [10.96.0.10]
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
  - {name: metrics, port: 9153}
---
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
- {name: metrics, port: 9153, protocol: TCP}
endpoints:
- addresses: [10.0.0.5]
"#,
        want: &[
            "10.96.0.10:53/TCP kube-system/dns:dns-tcp [10.0.0.5:53]",
            "10.96.0.10:53/UDP kube-system/dns:dns [10.0.0.5:53]",
            "10.96.0.10:9153/TCP kube-system/dns:metrics [10.0.0.5:9153]",
        ],
        errors: &[],
    },
    Case {
        name: "dual stack: each cluster IP takes the slices of its family",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ports: [{port: 80}]
---
kind: EndpointSlice
metadata: {name: web-v4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00::1"]}]
"#,
        want: &[
            "10.96.0.20:80/TCP default/web: [10.0.0.1:8080]",
            "[fd00:96::20]:80/TCP default/web: [[fd00::1]:8080]",
        ],
        errors: &[],
    },
    Case {
        name: "clusterIP alone, NodePort and LoadBalancer program their cluster IP",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: b}
spec: {type: NodePort, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: 30080}]}
---
kind: Service
metadata: {name: c}
spec: {type: LoadBalancer, clusterIPs: [10.96.0.3], ports: [{port: 80}]}
---
kind: Service
metadata: {name: d}
spec: {type: ClusterIP, clusterIPs: [10.96.0.4], ports: [{port: 80}]}
"#,
        want: &[
            "10.96.0.1:80/TCP default/a: []",
            "10.96.0.2:80/TCP default/b: []",
            "10.96.0.3:80/TCP default/c: []",
            "10.96.0.4:80/TCP default/d: []",
        ],
        errors: &[],
    },
    Case {
        name: "ExternalName, headless, unallocated and proxy-name Services are not programmed",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com, ports: [{port: 80}]}
---
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, clusterIPs: [None], ports: [{port: 80}]}
---
kind: EndpointSlice
metadata:
  name: headless-1
  labels: {kubernetes.io/service-name: headless, service.kubernetes.io/headless: ""}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [not-an-ip]}]
---
kind: Service
metadata: {name: pending}
spec: {clusterIP: "", ports: [{port: 80}]}
---
kind: Service
metadata: {name: nospec}
---
kind: Service
metadata:
  name: other-proxy
  labels: {service.kubernetes.io/service-proxy-name: someone-else}
spec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}
---
kind: Service
metadata: {name: kept}
spec: {clusterIP: 10.96.0.8, ports: [{port: 80}]}
"#,
        want: &["10.96.0.8:80/TCP default/kept: []"],
        errors: &[],
    },
    Case {
        name: "invalid cluster IPs skip only their Service",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: bad-ip}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
kind: Service
metadata: {name: bad-second-ip}
spec: {clusterIPs: [10.96.0.5, "fd00::zz"], ports: [{port: 80}]}
---
kind: Service
metadata: {name: unspecified}
spec: {clusterIP: 0.0.0.0, ports: [{port: 80}]}
---
kind: Service
metadata: {name: good}
spec: {clusterIP: 10.96.0.6, ports: [{port: 80}]}
"#,
        want: &["10.96.0.6:80/TCP default/good: []"],
        errors: &[
            (
                "Service default/bad-ip",
                "cluster IP '10.96.0.300' is not a valid IP address",
            ),
            (
                "Service default/bad-second-ip",
                "cluster IP 'fd00::zz' is not a valid IP address",
            ),
            (
                "Service default/unspecified",
                "cluster IP '0.0.0.0' is not a unicast address",
            ),
        ],
    },
    Case {
        name: "out-of-range ports and target ports skip the whole Service",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: port-zero}
spec: {clusterIP: 10.96.0.1, ports: [{name: a, port: 81}, {name: b, port: 0}]}
---
kind: Service
metadata: {name: port-big}
spec: {clusterIP: 10.96.0.2, ports: [{port: 65536}]}
---
kind: Service
metadata: {name: target-zero}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80, targetPort: 0}]}
---
kind: Service
metadata: {name: target-big}
spec: {clusterIP: 10.96.0.4, ports: [{name: web, port: 80, targetPort: 70000}]}
---
kind: Service
metadata: {name: target-numeric-string}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80, targetPort: "8080"}]}
---
kind: Service
metadata: {name: max-port}
spec: {clusterIP: 10.96.0.6, ports: [{port: 65535, targetPort: 65535}]}
"#,
        want: &["10.96.0.6:65535/TCP default/max-port: []"],
        errors: &[
            (
                "Service default/port-big",
                "port 65536 is out of range 1-65535",
            ),
            (
                "Service default/port-zero",
                "port 'b' (0): port 0 is out of range 1-65535",
            ),
            (
                "Service default/target-big",
                "port 'web' (80): targetPort 70000 is out of range",
            ),
            (
                "Service default/target-numeric-string",
                "targetPort '8080' is not a valid port name",
            ),
            (
                "Service default/target-zero",
                "port 80: targetPort 0 is out of range",
            ),
        ],
    },
    Case {
        name: "SCTP and unknown protocols skip only their port, SCTP reported once",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: mixed}
spec:
  clusterIP: 10.96.0.7
  ports:
  - {name: sig, port: 3868, protocol: SCTP}
  - {name: web, port: 80, protocol: TCP}
  - {name: sig2, port: 3869, protocol: SCTP, nodePort: 30001}
  - {name: odd, port: 81, protocol: QUIC}
---
kind: EndpointSlice
metadata: {name: mixed-1, labels: {kubernetes.io/service-name: mixed}}
addressType: IPv4
ports: [{name: sig, port: 3868, protocol: SCTP}, {name: web, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"#,
        want: &["10.96.0.7:80/TCP default/mixed:web [10.0.0.1:8080]"],
        errors: &[
            (
                "Service default/mixed",
                "port 'odd' (81): protocol QUIC is not supported",
            ),
            (
                "Service default/mixed",
                "SCTP port 'sig' (3868), port 'sig2' (3869) are not programmed: the socket-level datapath cannot steer SCTP",
            ),
        ],
    },
    Case {
        name: "a contested frontend goes to the first Service by namespace/name",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: zeta, namespace: b}
spec: {clusterIP: 10.96.1.1, ports: [{name: web, port: 80}, {name: other, port: 81}]}
---
kind: Service
metadata: {name: alpha, namespace: b}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: zz, namespace: a}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80, protocol: UDP}]}
"#,
        want: &["10.96.1.1:80/TCP b/alpha: []", "10.96.1.1:80/UDP a/zz: []"],
        errors: &[(
            "Service b/zeta",
            "frontend 10.96.1.1:80/TCP is already used by Service b/alpha; this Service is skipped",
        )],
    },
    Case {
        name: "a Service that fails validation claims nothing",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: a-broken}
spec: {clusterIP: 10.96.1.2, ports: [{port: 80}, {port: 0, name: x}]}
---
kind: Service
metadata: {name: b-fine}
spec: {clusterIP: 10.96.1.2, ports: [{port: 80}]}
"#,
        want: &["10.96.1.2:80/TCP default/b-fine: []"],
        errors: &[("Service default/a-broken", "port 0 is out of range")],
    },
    Case {
        name: "duplicates inside one Service",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: same-name}
spec: {clusterIP: 10.96.2.3, ports: [{name: a, port: 80}, {name: a, port: 81}]}
---
kind: Service
metadata: {name: same-port}
spec: {clusterIP: 10.96.2.4, ports: [{name: a, port: 80}, {name: b, port: 80}]}
---
kind: Service
metadata: {name: same-ip}
spec: {clusterIPs: [10.96.2.5, 10.96.2.5], ports: [{port: 80}]}
---
kind: Service
metadata: {name: sliced}
spec: {clusterIP: 10.96.2.6, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: sliced-1, labels: {kubernetes.io/service-name: sliced}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1], conditions: {ready: true}}, {addresses: [10.0.0.1]}]
"#,
        want: &["10.96.2.6:80/TCP default/sliced: [10.0.0.1:8080]"],
        errors: &[
            (
                "Service default/same-ip",
                "frontend 10.96.2.5:80/TCP is listed more than once",
            ),
            (
                "Service default/same-name",
                "port name 'a' is used by more than one port",
            ),
            (
                "Service default/same-port",
                "frontend 10.96.2.4:80/TCP is listed more than once",
            ),
        ],
    },
    Case {
        name: "unsupported type, affinity and traffic policy values",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: t}
spec: {type: Weird, clusterIP: 10.96.3.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: a}
spec: {sessionAffinity: Cookie, clusterIP: 10.96.3.2, ports: [{port: 80}]}
---
kind: Service
metadata: {name: p}
spec: {internalTrafficPolicy: Zonal, clusterIP: 10.96.3.3, ports: [{port: 80}]}
---
kind: Service
metadata: {name: timeout}
spec:
  clusterIP: 10.96.3.4
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}
  ports: [{port: 80}]
---
kind: Service
metadata: {namespace: x}
spec: {clusterIP: 10.96.3.5, ports: [{port: 80}]}
"#,
        want: &[],
        errors: &[
            (
                "Service default/a",
                "sessionAffinity 'Cookie' is not supported",
            ),
            (
                "Service default/p",
                "internalTrafficPolicy 'Zonal' is not supported",
            ),
            ("Service default/t", "type 'Weird' is not supported"),
            (
                "Service default/timeout",
                "timeoutSeconds 0 is out of range 1-86400",
            ),
            ("Service x/", "metadata.name is missing"),
        ],
    },
    Case {
        name: "session affinity: default and explicit timeouts",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: default-timeout}
spec: {clusterIP: 10.96.4.1, sessionAffinity: ClientIP, ports: [{port: 80}]}
---
kind: Service
metadata: {name: explicit}
spec:
  clusterIP: 10.96.4.2
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 80}, {name: b, port: 81, protocol: UDP}]
---
kind: Service
metadata: {name: none}
spec: {clusterIP: 10.96.4.3, sessionAffinity: None, ports: [{port: 80}]}
"#,
        want: &[
            "10.96.4.1:80/TCP default/default-timeout: [] affinity=10800",
            "10.96.4.2:80/TCP default/explicit: [] affinity=60",
            "10.96.4.2:81/UDP default/explicit:b [] affinity=60",
            "10.96.4.3:80/TCP default/none: []",
        ],
        errors: &[],
    },
    Case {
        name: "slices merge, duplicates collapse, foreign slices are ignored",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: web, namespace: ns1}
spec: {clusterIP: 10.96.5.1, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-b, namespace: ns1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.2]}
- {addresses: [10.0.0.3]}
---
kind: EndpointSlice
metadata: {name: web-a, namespace: ns1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.2]}
- {addresses: [10.0.0.1]}
- {addresses: [10.0.0.1]}
---
kind: EndpointSlice
metadata: {name: web-other-ns, namespace: ns2, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.9.9.9]}]
---
kind: EndpointSlice
metadata: {name: other-svc, namespace: ns1, labels: {kubernetes.io/service-name: web2}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.9.9.8]}]
---
kind: EndpointSlice
metadata: {name: unlabelled, namespace: ns1}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.9.9.7]}]
---
kind: EndpointSlice
metadata: {name: web-fqdn, namespace: ns1, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [db.example.com]}]
"#,
        want: &["10.96.5.1:80/TCP ns1/web:http [10.0.0.1:8080 10.0.0.2:8080 10.0.0.3:8080]"],
        errors: &[],
    },
    Case {
        name: "a duplicate endpoint prefers the copy that is not terminating",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.5.2, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.2], conditions: {ready: true}}
---
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.0.1], conditions: {ready: true}}
- {addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: true}}
"#,
        want: &["10.96.5.2:80/TCP default/web: [10.0.0.1:8080 10.0.0.2:8080]"],
        errors: &[],
    },
    Case {
        name: "slice ports match by name and protocol; the number may differ per slice",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.6.1
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: admin, port: 81, targetPort: 9000}
  - {name: udp, port: 82, protocol: UDP}
---
kind: EndpointSlice
metadata: {name: web-old, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: udp, port: 5000, protocol: TCP}
endpoints: [{addresses: [10.0.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-new, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8081, protocol: TCP}
- {name: admin-x, port: 9000}
- {name: udp, port: 5001, protocol: UDP}
endpoints: [{addresses: [10.0.0.2]}]
"#,
        want: &[
            "10.96.6.1:80/TCP default/web:http [10.0.0.1:8080 10.0.0.2:8081]",
            "10.96.6.1:81/TCP default/web:admin []",
            "10.96.6.1:82/UDP default/web:udp [10.0.0.2:5001]",
        ],
        errors: &[],
    },
    Case {
        name: "an unnamed Service port matches a slice port with no name or an empty one",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.6.2, ports: [{name: "", port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: "", port: 8080}]
endpoints: [{addresses: [10.0.0.2]}]
---
kind: EndpointSlice
metadata: {name: web-c, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.3]}]
"#,
        want: &["10.96.6.2:80/TCP default/web: [10.0.0.1:8080 10.0.0.2:8080]"],
        errors: &[],
    },
    Case {
        name: "named targetPort: hand-written slices may use it; no match at all is refused",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.7.1
  ports:
  - {name: http, port: 80, targetPort: web-port}
  - {name: grpc, port: 81, targetPort: grpc-port}
---
kind: EndpointSlice
metadata: {name: web-manual, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: web-port, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-controller, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints: [{addresses: [10.0.0.2]}]
---
kind: Service
metadata: {name: nopods}
spec: {clusterIP: 10.96.7.2, ports: [{port: 80, targetPort: http}]}
---
kind: EndpointSlice
metadata: {name: nopods-placeholder, labels: {kubernetes.io/service-name: nopods}}
addressType: IPv4
ports: null
endpoints: null
"#,
        want: &[
            "10.96.7.1:80/TCP default/web:http [10.0.0.1:8080 10.0.0.2:8081]",
            "10.96.7.1:81/TCP default/web:grpc []",
            "10.96.7.2:80/TCP default/nopods: []",
        ],
        errors: &[(
            "Service default/web",
            "targetPort name 'grpc-port' matches no port in the EndpointSlices of default/web",
        )],
    },
    Case {
        name: "endpoint conditions: ready wins, else serving+terminating, never non-serving",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: mixed}
spec: {clusterIP: 10.96.8.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: mixed-1, labels: {kubernetes.io/service-name: mixed}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.0.1], conditions: {ready: true, serving: true, terminating: false}}
- {addresses: [10.0.0.2], conditions: {}}
- {addresses: [10.0.0.3], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.4], conditions: {ready: false, serving: true}}
- {addresses: [10.0.0.5], conditions: {ready: false}}
---
kind: Service
metadata: {name: draining}
spec: {clusterIP: 10.96.8.2, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: draining-1, labels: {kubernetes.io/service-name: draining}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.1.1], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.1.2], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [10.0.1.3], conditions: {ready: false, terminating: true}}
- {addresses: [10.0.1.4], conditions: {ready: false, serving: true, terminating: false}}
- {addresses: [10.0.1.5], conditions: {ready: false, serving: false}}
---
kind: Service
metadata: {name: dead}
spec: {clusterIP: 10.96.8.3, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: dead-1, labels: {kubernetes.io/service-name: dead}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.2.1], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [10.0.2.2], conditions: {ready: false}}
"#,
        want: &[
            "10.96.8.1:80/TCP default/mixed: [10.0.0.1:8080 10.0.0.2:8080]",
            // An unknown serving condition reads as true (kube-proxy's rule).
            "10.96.8.2:80/TCP default/draining: [10.0.1.1:8080(T) 10.0.1.3:8080(T)]",
            "10.96.8.3:80/TCP default/dead: []",
        ],
        errors: &[],
    },
    Case {
        name: "publishNotReadyAddresses uses every endpoint as active",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: peers}
spec: {clusterIP: 10.96.9.1, publishNotReadyAddresses: true, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: peers-1, labels: {kubernetes.io/service-name: peers}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.0.1], conditions: {ready: true}}
- {addresses: [10.0.0.2], conditions: {ready: false, serving: false}}
- {addresses: [10.0.0.3], conditions: {ready: false, serving: true, terminating: true}}
"#,
        want: &["10.96.9.1:80/TCP default/peers: [10.0.0.1:8080 10.0.0.2:8080 10.0.0.3:8080]"],
        errors: &[],
    },
    Case {
        name: "internalTrafficPolicy Local keeps this node's endpoints only, without fallback",
        node: TestNode::named("node-a"),
        yaml: r#"
kind: Service
metadata: {name: local}
spec: {clusterIP: 10.96.10.1, internalTrafficPolicy: Local, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: local-1, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.0.1], nodeName: node-a}
- {addresses: [10.0.0.2], nodeName: node-b}
- {addresses: [10.0.0.3]}
- {addresses: [10.0.0.4], nodeName: node-a, conditions: {ready: false}}
---
kind: Service
metadata: {name: remote-only}
spec: {clusterIP: 10.96.10.2, internalTrafficPolicy: Local, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: remote-only-1, labels: {kubernetes.io/service-name: remote-only}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.1.1], nodeName: node-b}]
---
kind: Service
metadata: {name: local-draining}
spec: {clusterIP: 10.96.10.3, internalTrafficPolicy: Local, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: local-draining-1, labels: {kubernetes.io/service-name: local-draining}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.2.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.2.2], nodeName: node-b, conditions: {ready: true}}
---
kind: Service
metadata: {name: cluster}
spec: {clusterIP: 10.96.10.4, internalTrafficPolicy: Cluster, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: cluster-1, labels: {kubernetes.io/service-name: cluster}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.3.1], nodeName: node-b}]
"#,
        want: &[
            "10.96.10.1:80/TCP default/local: [10.0.0.1:8080] itp=Local",
            "10.96.10.2:80/TCP default/remote-only: [] itp=Local",
            "10.96.10.3:80/TCP default/local-draining: [10.0.2.1:8080(T)] itp=Local",
            "10.96.10.4:80/TCP default/cluster: [10.0.3.1:8080]",
        ],
        errors: &[],
    },
    Case {
        name: "internalTrafficPolicy Local on a node without a name has no endpoints",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: local}
spec: {clusterIP: 10.96.10.1, internalTrafficPolicy: Local, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: local-1, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1], nodeName: node-a}, {addresses: [10.0.0.3]}]
"#,
        want: &["10.96.10.1:80/TCP default/local: [] itp=Local"],
        errors: &[],
    },
    Case {
        name: "bad endpoint addresses are reported against the slice and skipped alone",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.11.1, ports: [{name: http, port: 80}, {name: alt, port: 81}]}
---
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: alt, port: 70000}, {name: none}]
endpoints:
- {addresses: [10.0.0.1]}
- {addresses: [10.0.0.999]}
- {addresses: ["fd00::1"]}
- {addresses: []}
- {addresses: [224.0.0.1]}
- {addresses: [10.0.0.2, not-used]}
---
kind: EndpointSlice
metadata: {name: web-2, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: Hostname
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.9]}]
"#,
        want: &[
            "10.96.11.1:80/TCP shop/web:http [10.0.0.1:8080 10.0.0.2:8080]",
            "10.96.11.1:81/TCP shop/web:alt []",
        ],
        errors: &[
            (
                "EndpointSlice shop/web-1",
                "ports[1] ('alt'): port 70000 is out of range 1-65535",
            ),
            (
                "EndpointSlice shop/web-1",
                "endpoints[1]: '10.0.0.999' is not a valid IP address",
            ),
            (
                "EndpointSlice shop/web-1",
                "endpoints[2]: address 'fd00::1' does not match addressType IPv4",
            ),
            ("EndpointSlice shop/web-1", "endpoints[3] has no addresses"),
            (
                "EndpointSlice shop/web-1",
                "endpoints[4]: address '224.0.0.1' is not a unicast address",
            ),
            (
                "EndpointSlice shop/web-2",
                "addressType 'Hostname' is not supported",
            ),
        ],
    },
    Case {
        name: "a Service without slices refuses; a missing namespace means default",
        node: NO_NODE,
        yaml: r#"
kind: Service
metadata: {name: lonely}
spec: {clusterIP: 10.96.12.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.12.2, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
---
kind: Service
metadata: {name: noports}
spec: {clusterIP: 10.96.12.3}
"#,
        want: &[
            "10.96.12.1:80/TCP default/lonely: []",
            "10.96.12.2:80/TCP default/web: [10.0.0.1:8080]",
        ],
        errors: &[],
    },
    Case {
        name: "node ports on every node address of the Service's families; external IPs; VIP-mode ingress",
        node: TestNode {
            name: Some("n1"),
            zone: None,
            addresses: &["192.168.1.10", "fd00:1::10"],
            proxy_name: None,
        },
        yaml: r#"
kind: Service
metadata: {name: np}
spec:
  type: NodePort
  clusterIP: 10.96.20.1
  externalIPs: [203.0.113.5, "2001:db8::5", 203.0.113.5]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]
---
kind: EndpointSlice
metadata: {name: np-1, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.0.0.1], nodeName: n1}
- {addresses: [10.0.0.2], nodeName: n2}
---
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.20.2, "fd00:96::2"]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer:
    ingress:
    - {ip: 198.51.100.1}
    - {ip: 198.51.100.2, ipMode: VIP}
    - {ip: 198.51.100.3, ipMode: Proxy}
    - {hostname: lb.example.com}
    - {ip: "2001:db8::1"}
---
kind: EndpointSlice
metadata: {name: lb-1, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{port: 8443}]
endpoints: [{addresses: [10.0.1.1]}]
---
kind: EndpointSlice
metadata: {name: lb-2, labels: {kubernetes.io/service-name: lb}}
addressType: IPv6
ports: [{port: 8443}]
endpoints: [{addresses: ["fd00:1::1"]}]
---
kind: Service
metadata: {name: lb-no-nodeports}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.20.3
  ports: [{port: 80}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}
"#,
        want: &[
            // Cluster IPs keep the internal policy; every other address gets the
            // cluster-wide endpoints (kube-proxy's short-circuit for node-local clients).
            "10.96.20.1:53/UDP default/np:dns [10.0.0.1:5353] itp=Local",
            "10.96.20.1:80/TCP default/np:http [10.0.0.1:8080] itp=Local",
            "10.96.20.2:443/TCP default/lb: [10.0.1.1:8443]",
            "10.96.20.3:80/TCP default/lb-no-nodeports: []",
            "192.168.1.10:30053/UDP (NodePort) default/np:dns [10.0.0.1:5353 10.0.0.2:5353] etp=Local",
            "192.168.1.10:30080/TCP (NodePort) default/np:http [10.0.0.1:8080 10.0.0.2:8080] etp=Local",
            "192.168.1.10:30443/TCP (NodePort) default/lb: [10.0.1.1:8443]",
            "198.51.100.1:443/TCP (LoadBalancer) default/lb: [10.0.1.1:8443]",
            "198.51.100.2:443/TCP (LoadBalancer) default/lb: [10.0.1.1:8443]",
            "198.51.100.9:80/TCP (LoadBalancer) default/lb-no-nodeports: []",
            "203.0.113.5:53/UDP (ExternalIP) default/np:dns [10.0.0.1:5353 10.0.0.2:5353] etp=Local",
            "203.0.113.5:80/TCP (ExternalIP) default/np:http [10.0.0.1:8080 10.0.0.2:8080] etp=Local",
            "[2001:db8::1]:443/TCP (LoadBalancer) default/lb: [[fd00:1::1]:8443]",
            "[fd00:1::10]:30443/TCP (NodePort) default/lb: [[fd00:1::1]:8443]",
            "[fd00:96::2]:443/TCP default/lb: [[fd00:1::1]:8443]",
        ],
        errors: &[],
    },
    Case {
        name: "external addresses never take a frontend from another Service",
        node: TestNode {
            name: Some("n1"),
            zone: None,
            addresses: &["192.168.1.10"],
            proxy_name: None,
        },
        yaml: r#"
kind: Service
metadata: {name: a-thief}
spec:
  clusterIP: 10.96.21.1
  externalIPs: [10.96.21.9, 203.0.113.1]
  ports: [{port: 80}]
---
kind: Service
metadata: {name: b-victim}
spec: {clusterIP: 10.96.21.9, ports: [{port: 80}]}
---
kind: Service
metadata: {name: c-np}
spec: {type: NodePort, clusterIP: 10.96.21.2, ports: [{port: 80, nodePort: 30000}]}
---
kind: Service
metadata: {name: d-np}
spec: {type: NodePort, clusterIP: 10.96.21.3, externalIPs: [10.96.21.3], ports: [{port: 80, nodePort: 30000}]}
"#,
        want: &[
            "10.96.21.1:80/TCP default/a-thief: []",
            "10.96.21.2:80/TCP default/c-np: []",
            "10.96.21.3:80/TCP default/d-np: []",
            "10.96.21.9:80/TCP default/b-victim: []",
            "192.168.1.10:30000/TCP (NodePort) default/c-np: []",
            "203.0.113.1:80/TCP (ExternalIP) default/a-thief: []",
        ],
        errors: &[
            // Node ports and load-balancer IPs are claimed before any external IP.
            (
                "Service default/d-np",
                "node port frontend 192.168.1.10:30000/TCP is already used by Service default/c-np",
            ),
            (
                "Service default/a-thief",
                "external IP frontend 10.96.21.9:80/TCP is already used by Service default/b-victim; this address is skipped",
            ),
            (
                "Service default/d-np",
                "external IP frontend 10.96.21.3:80/TCP is already used by another address of this Service",
            ),
        ],
    },
    Case {
        name: "bad external addresses skip alone; other families are dropped quietly; bad nodePort skips the Service",
        node: TestNode {
            name: Some("n1"),
            zone: None,
            addresses: &["192.168.1.10", "fd00:1::10"],
            proxy_name: None,
        },
        yaml: r#"
kind: Service
metadata: {name: ext}
spec:
  type: NodePort
  clusterIP: 10.96.22.1
  externalIPs: [203.0.113.300, "2001:db8::9", 0.0.0.0, 203.0.113.2]
  ports: [{port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: bogus}]}}
---
kind: Service
metadata: {name: np-big}
spec: {type: NodePort, clusterIP: 10.96.22.2, ports: [{port: 80, nodePort: 70000}]}
"#,
        want: &[
            "10.96.22.1:80/TCP default/ext: []",
            "192.168.1.10:30080/TCP (NodePort) default/ext: []",
            "203.0.113.2:80/TCP (ExternalIP) default/ext: []",
        ],
        errors: &[
            (
                "Service default/ext",
                "externalIPs entry '203.0.113.300' is not a valid IP address; it is skipped",
            ),
            (
                "Service default/ext",
                "externalIPs entry '0.0.0.0' is refused: the unspecified address, which must never become a Service frontend",
            ),
            (
                "Service default/ext",
                "load-balancer ingress IP 'bogus' is not a valid IP address; it is skipped",
            ),
            (
                "Service default/np-big",
                "port 80: nodePort 70000 is out of range 1-65535",
            ),
        ],
    },
    Case {
        name: "service-proxy-name: only our own name is programmed",
        node: TestNode {
            name: None,
            zone: None,
            addresses: &[],
            proxy_name: Some("svc-lb"),
        },
        yaml: r#"
kind: Service
metadata: {name: ours, labels: {service.kubernetes.io/service-proxy-name: svc-lb}}
spec: {clusterIP: 10.96.23.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: theirs, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.23.2, ports: [{port: 80}]}
---
kind: Service
metadata: {name: empty-label, labels: {service.kubernetes.io/service-proxy-name: ""}}
spec: {clusterIP: 10.96.23.3, ports: [{port: 80}]}
---
kind: Service
metadata: {name: unlabelled}
spec: {clusterIP: 10.96.23.4, ports: [{port: 80}]}
"#,
        want: &[
            "10.96.23.1:80/TCP default/ours: []",
            "10.96.23.4:80/TCP default/unlabelled: []",
        ],
        errors: &[],
    },
    Case {
        name: "topology: zone hints restrict the cluster policy only when complete and useful",
        node: TestNode {
            name: Some("n1"),
            zone: Some("zone-a"),
            addresses: &["192.168.1.10"],
            proxy_name: None,
        },
        yaml: r#"
kind: Service
metadata: {name: hinted}
spec: {type: NodePort, trafficDistribution: PreferClose, clusterIP: 10.96.24.1, ports: [{port: 80, nodePort: 30124}]}
---
kind: EndpointSlice
metadata: {name: hinted-1, labels: {kubernetes.io/service-name: hinted}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.0.1], zone: zone-a, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.0.0.2], zone: zone-b, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.0.0.3], zone: zone-b, hints: {forZones: [{name: zone-a}, {name: zone-c}]}}
- {addresses: [10.0.0.4], conditions: {ready: false}}
---
kind: Service
metadata: {name: incomplete}
spec: {clusterIP: 10.96.24.2, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: incomplete-1, labels: {kubernetes.io/service-name: incomplete}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.1.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.0.1.2]}
---
kind: Service
metadata: {name: elsewhere}
spec: {clusterIP: 10.96.24.3, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: elsewhere-1, labels: {kubernetes.io/service-name: elsewhere}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.2.1], hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.0.2.2], hints: {forZones: [{name: zone-c}]}}
---
kind: Service
metadata: {name: same-node}
spec: {clusterIP: 10.96.24.4, trafficDistribution: PreferSameNode, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: same-node-1, labels: {kubernetes.io/service-name: same-node}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.3.1], nodeName: n1, hints: {forNodes: [{name: n1}], forZones: [{name: zone-a}]}}
- {addresses: [10.0.3.2], nodeName: n2, hints: {forNodes: [{name: n2}], forZones: [{name: zone-a}]}}
---
kind: Service
metadata: {name: draining}
spec: {clusterIP: 10.96.24.5, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: draining-1, labels: {kubernetes.io/service-name: draining}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.4.1], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.0.4.2], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-a}]}}
---
kind: Service
metadata: {name: local}
spec: {clusterIP: 10.96.24.6, internalTrafficPolicy: Local, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: local-1, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.5.1], nodeName: n1, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.0.5.2], nodeName: n2, hints: {forZones: [{name: zone-a}]}}
"#,
        want: &[
            "10.96.24.1:80/TCP default/hinted: [10.0.0.1:8080 10.0.0.3:8080]",
            "10.96.24.2:80/TCP default/incomplete: [10.0.1.1:8080 10.0.1.2:8080]",
            "10.96.24.3:80/TCP default/elsewhere: [10.0.2.1:8080 10.0.2.2:8080]",
            "10.96.24.4:80/TCP default/same-node: [10.0.3.1:8080]",
            // The terminating fallback ignores topology, as kube-proxy's does.
            "10.96.24.5:80/TCP default/draining: [10.0.4.1:8080(T) 10.0.4.2:8080(T)]",
            // Local policy: this node's endpoints whatever their hints.
            "10.96.24.6:80/TCP default/local: [10.0.5.1:8080] itp=Local",
            "192.168.1.10:30124/TCP (NodePort) default/hinted: [10.0.0.1:8080 10.0.0.3:8080]",
        ],
        errors: &[],
    },
    Case {
        name: "topology: a node without a zone label ignores zone hints",
        node: TestNode::named("n1"),
        yaml: r#"
kind: Service
metadata: {name: hinted}
spec: {clusterIP: 10.96.25.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: hinted-1, labels: {kubernetes.io/service-name: hinted}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.0.0.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.0.0.2], hints: {forZones: [{name: zone-b}]}}
"#,
        want: &["10.96.25.1:80/TCP default/hinted: [10.0.0.1:8080 10.0.0.2:8080]"],
        errors: &[],
    },
];

#[test]
fn build_cases() {
    for case in CASES {
        run(case);
    }
}

#[test]
fn case_names_are_unique() {
    let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before);
}

#[test]
fn empty_input_gives_empty_state() {
    let (state, errors) = build(&Snapshot::default(), &NodeInfo::default());
    assert!(state.frontends.is_empty());
    assert!(errors.is_empty());
}

/// Frontends of one Service share their backend list across cluster IPs of the same
/// family, and each DesiredFrontend names its Service and port.
#[test]
fn frontend_fields() {
    let (services, slices) = parse(
        r#"
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.0.1, "fd00::1"]
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, protocol: UDP}]
"#,
    );
    let (state, errors) = build(&snapshot(&services, &slices), &NodeInfo::default());
    assert!(errors.is_empty());
    assert_eq!(state.frontends.len(), 2);
    for fe in state.frontends.values() {
        assert_eq!(&*fe.service.namespace, "shop");
        assert_eq!(&*fe.service.name, "web");
        assert_eq!(fe.port_name, "http");
        assert_eq!(fe.key.port, 80);
        assert_eq!(fe.key.proto, PROTO_UDP);
        assert_eq!(
            fe.affinity_timeout_s,
            Some(super::DEFAULT_AFFINITY_TIMEOUT_S)
        );
        assert!(fe.backends.is_empty());
    }
}

/// Switching a Service's type in every direction, planned and applied op by op on the
/// fake maps: after each switch exactly the new type's frontends are programmed (the old
/// ones are gone) and the invariants hold after every op.
#[test]
fn type_switches_replace_the_frontends() {
    use crate::{
        datapath::{MapStore, apply::apply_plan, fake::FakeMaps},
        plan::{CurrentState, plan},
    };

    let node = TestNode {
        name: Some("n1"),
        zone: None,
        addresses: &["192.168.1.10"],
        proxy_name: None,
    }
    .info();
    let slice = r#"
---
kind: EndpointSlice
metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"#;
    let external_name = "kind: Service\nmetadata: {name: s}\nspec: {type: ExternalName, externalName: example.com}\n";
    let cluster_ip = "kind: Service\nmetadata: {name: s}\nspec: {type: ClusterIP, clusterIP: 10.96.30.1, ports: [{port: 80}]}\n";
    let node_port = "kind: Service\nmetadata: {name: s}\nspec: {type: NodePort, clusterIP: 10.96.30.1, ports: [{port: 80, nodePort: 30080}]}\n";
    let load_balancer = "kind: Service\nmetadata: {name: s}\nspec: {type: LoadBalancer, clusterIP: 10.96.30.1, ports: [{port: 80, nodePort: 30080}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}\n";
    let keys = |s: &DesiredState| -> Vec<String> {
        s.frontends
            .keys()
            .map(|k| hostport(k.addr, k.port))
            .collect()
    };
    let steps: &[(&str, &str, &[&str])] = &[
        ("ExternalName", external_name, &[]),
        ("ClusterIP", cluster_ip, &["10.96.30.1:80"]),
        (
            "NodePort",
            node_port,
            &["10.96.30.1:80", "192.168.1.10:30080"],
        ),
        ("ExternalName", external_name, &[]),
        (
            "NodePort",
            node_port,
            &["10.96.30.1:80", "192.168.1.10:30080"],
        ),
        (
            "LoadBalancer",
            load_balancer,
            &["10.96.30.1:80", "192.168.1.10:30080", "198.51.100.1:80"],
        ),
        ("ClusterIP", cluster_ip, &["10.96.30.1:80"]),
        ("ExternalName", external_name, &[]),
    ];
    let mut fake = FakeMaps::with_default_capacity();
    let mut current = CurrentState::default();
    for (ty, yaml, want) in steps {
        let (services, slices) = parse(&format!("{yaml}{slice}"));
        let (desired, errors) = build(&snapshot(&services, &slices), &node);
        assert!(errors.is_empty(), "{ty}: {errors:?}");
        assert_eq!(keys(&desired), *want, "switch to {ty}");
        for fe in desired.frontends.values() {
            assert_eq!(
                fe.backends.len(),
                1,
                "{ty}: every frontend has the endpoint"
            );
        }
        let p = plan(&current, &desired, &fake.capacity());
        assert!(p.rejected.is_empty());
        apply_plan(&mut fake, &mut current, &p).expect("the fake applies every op");
        fake.check_invariants()
            .expect("invariants after the switch");
        let programmed: Vec<String> = current
            .frontends
            .keys()
            .map(|k| hostport(k.addr, k.port))
            .collect();
        assert_eq!(programmed, *want, "maps after switching to {ty}");
        if want.is_empty() {
            assert!(current.backends.is_empty() && current.rev_nats.is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------
// The external path: SCOPE_EXTERNAL frontends, locality, source ranges, health checks.

mod external {
    use std::collections::BTreeMap;

    use svc_lb_common::{
        SCOPE_EXTERNAL, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXT_LOCAL, SVC_FLAG_SRC_RANGES,
    };

    use super::*;

    fn node(name: Option<&str>, external: bool) -> NodeInfo {
        NodeInfo {
            name: name.map(str::to_owned),
            addresses: vec!["192.168.1.10".parse().unwrap()],
            external,
            ..NodeInfo::default()
        }
    }

    /// `ext 0.0.0.0:30080/TCP (NodePort) ns/name:port [10.0.0.1:8080(L)] EXT_LOCAL|DROP_EMPTY ranges=10.0.0.0/8`
    fn render_ext(state: &DesiredState) -> Vec<String> {
        state
            .frontends
            .values()
            .filter(|fe| fe.key.scope == SCOPE_EXTERNAL)
            .map(|fe| {
                let backends: Vec<String> = fe
                    .backends
                    .iter()
                    .map(|b| {
                        format!(
                            "{}{}",
                            hostport(b.addr.addr, b.addr.port),
                            if b.local { "(L)" } else { "" }
                        )
                    })
                    .collect();
                let kind = match fe.kind {
                    KIND_NODE_PORT => "NodePort",
                    KIND_EXTERNAL_IP => "ExternalIP",
                    KIND_LOAD_BALANCER => "LoadBalancer",
                    k => panic!("unexpected external kind {k}"),
                };
                let mut flags = Vec::new();
                for (bit, name) in [
                    (SVC_FLAG_EXT_LOCAL, "EXT_LOCAL"),
                    (SVC_FLAG_DROP_EMPTY, "DROP_EMPTY"),
                    (SVC_FLAG_SRC_RANGES, "SRC_RANGES"),
                ] {
                    if fe.flags & bit != 0 {
                        flags.push(name);
                    }
                }
                assert_eq!(
                    fe.flags & SVC_FLAG_SRC_RANGES != 0,
                    !fe.src_ranges.is_empty(),
                    "SRC_RANGES exactly when there are ranges"
                );
                let ranges: Vec<String> = fe.src_ranges.iter().map(ToString::to_string).collect();
                let mut line = format!(
                    "{}/{} ({kind}) {}:{} [{}]",
                    hostport(fe.key.addr, fe.key.port),
                    proto(fe.key.proto),
                    fe.service,
                    fe.port_name,
                    backends.join(" ")
                );
                if !flags.is_empty() {
                    line += &format!(" {}", flags.join("|"));
                }
                if !ranges.is_empty() {
                    line += &format!(" ranges={}", ranges.join(","));
                }
                line
            })
            .collect()
    }

    fn build_yaml(yaml: &str, node: &NodeInfo) -> (DesiredState, Vec<ModelError>) {
        let (services, slices) = parse(yaml);
        build(&snapshot(&services, &slices), node)
    }

    struct ExtCase {
        name: &'static str,
        node_name: Option<&'static str>,
        yaml: &'static str,
        want: &'static [&'static str],
        /// (port, "ns/name", local endpoints)
        health: &'static [(u16, &'static str, usize)],
        errors: &'static [(&'static str, &'static str)],
    }

    const SLICE_TWO_NODES: &str = r#"
---
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.0.0.1], nodeName: n1}
- {addresses: [10.0.0.2], nodeName: n2}
- {addresses: [10.0.0.3], nodeName: n1, conditions: {ready: false}}
"#;

    fn cases() -> Vec<(ExtCase, String)> {
        let with_slice = |yaml: &str| format!("{yaml}{SLICE_TWO_NODES}");
        vec![
            (
                ExtCase {
                    name: "node port, cluster policy: every endpoint, one frontend per family",
                    node_name: Some("n1"),
                    yaml: r#"
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIPs: [10.96.0.1, "fd00::1"]
  ports: [{name: http, port: 80, nodePort: 30080}]
"#,
                    want: &[
                        "0.0.0.0:30080/TCP (NodePort) shop/web:http [10.0.0.1:8080(L) 10.0.0.2:8080]",
                        "[::]:30080/TCP (NodePort) shop/web:http []",
                    ],
                    health: &[],
                    errors: &[],
                },
                String::new(),
            ),
            (
                ExtCase {
                    name: "node port, local policy: local endpoints only",
                    node_name: Some("n1"),
                    yaml: r#"
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIPs: [10.96.0.1]
  ports: [{name: http, port: 80, nodePort: 30080}]
"#,
                    want: &[
                        "0.0.0.0:30080/TCP (NodePort) shop/web:http [10.0.0.1:8080(L)] EXT_LOCAL",
                    ],
                    health: &[],
                    errors: &[],
                },
                String::new(),
            ),
            (
                ExtCase {
                    name: "local policy, endpoints only elsewhere: drop",
                    node_name: Some("n3"),
                    yaml: r#"
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIPs: [10.96.0.1]
  ports: [{name: http, port: 80, nodePort: 30080}]
"#,
                    want: &["0.0.0.0:30080/TCP (NodePort) shop/web:http [] EXT_LOCAL|DROP_EMPTY"],
                    health: &[],
                    errors: &[],
                },
                String::new(),
            ),
            (
                ExtCase {
                    name: "local policy, no endpoint anywhere: reject, not drop",
                    node_name: Some("n1"),
                    yaml: r#"
kind: Service
metadata: {name: lone, namespace: shop}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIPs: [10.96.0.9]
  ports: [{name: http, port: 80, nodePort: 30090}]
"#,
                    want: &["0.0.0.0:30090/TCP (NodePort) shop/lone:http [] EXT_LOCAL"],
                    health: &[],
                    errors: &[],
                },
                String::new(),
            ),
            (
                ExtCase {
                    name: "load balancer: VIP ingress and external IPs, health check, source ranges",
                    node_name: Some("n1"),
                    yaml: r#"
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  clusterIPs: [10.96.0.1]
  externalIPs: [198.51.100.7]
  loadBalancerSourceRanges: [" 203.0.113.0/24", "2001:db8::/32", "10.1.2.3/8", "bogus"]
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress:
    - {ip: 192.0.2.10}
    - {ip: 192.0.2.11, ipMode: Proxy}
"#,
                    want: &[
                        "0.0.0.0:30080/TCP (NodePort) shop/web:http [10.0.0.1:8080(L)] EXT_LOCAL",
                        "192.0.2.10:80/TCP (LoadBalancer) shop/web:http [10.0.0.1:8080(L)] EXT_LOCAL|SRC_RANGES ranges=10.0.0.0/8,203.0.113.0/24",
                        "198.51.100.7:80/TCP (ExternalIP) shop/web:http [10.0.0.1:8080(L)] EXT_LOCAL",
                    ],
                    health: &[(32000, "shop/web", 1)],
                    errors: &[(
                        "Service shop/web",
                        "loadBalancerSourceRanges entry 'bogus' is not a valid CIDR",
                    )],
                },
                String::new(),
            ),
            (
                ExtCase {
                    name: "legacy source-range annotation; all invalid leaves the address open",
                    node_name: Some("n1"),
                    yaml: r#"
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: "198.18.0.0/15, 100.64.0.0/10"}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.1]
  ports: [{name: http, port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.10}]}}
---
kind: Service
metadata: {name: open, namespace: shop}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.2]
  loadBalancerSourceRanges: [nope]
  ports: [{name: http, port: 81, nodePort: 30081}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.20}]}}
"#,
                    want: &[
                        "0.0.0.0:30080/TCP (NodePort) shop/web:http [10.0.0.1:8080(L) 10.0.0.2:8080]",
                        "0.0.0.0:30081/TCP (NodePort) shop/open:http []",
                        "192.0.2.10:80/TCP (LoadBalancer) shop/web:http [10.0.0.1:8080(L) 10.0.0.2:8080] SRC_RANGES ranges=100.64.0.0/10,198.18.0.0/15",
                        "192.0.2.20:81/TCP (LoadBalancer) shop/open:http []",
                    ],
                    health: &[],
                    errors: &[
                        ("Service shop/open", "entry 'nope' is not a valid CIDR"),
                        ("Service shop/open", "has no valid entry; the load-balancer addresses accept every source"),
                    ],
                },
                String::new(),
            ),
            (
                ExtCase {
                    name: "health checks only for LoadBalancer with local policy; clashes reported",
                    node_name: Some("n2"),
                    yaml: r#"
kind: Service
metadata: {name: cluster-lb, namespace: shop}
spec:
  type: LoadBalancer
  healthCheckNodePort: 32001
  clusterIPs: [10.96.0.3]
  ports: [{port: 82, nodePort: 30082}]
---
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  clusterIPs: [10.96.0.1]
  ports: [{name: http, port: 80, nodePort: 30080}]
---
kind: Service
metadata: {name: web2, namespace: shop}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  clusterIPs: [10.96.0.4]
  ports: [{name: http, port: 84, nodePort: 30084}]
"#,
                    want: &[
                        "0.0.0.0:30080/TCP (NodePort) shop/web:http [10.0.0.2:8080(L)] EXT_LOCAL",
                        "0.0.0.0:30082/TCP (NodePort) shop/cluster-lb: []",
                        "0.0.0.0:30084/TCP (NodePort) shop/web2:http [] EXT_LOCAL",
                    ],
                    health: &[(32000, "shop/web", 1)],
                    errors: &[(
                        "Service shop/web2",
                        "healthCheckNodePort 32000 is already used by Service shop/web",
                    )],
                },
                String::new(),
            ),
            (
                ExtCase {
                    name: "an external IP lost to a clash takes its external twin along",
                    node_name: Some("n1"),
                    yaml: r#"
kind: Service
metadata: {name: a, namespace: shop}
spec:
  clusterIPs: [10.96.0.50]
  ports: [{port: 80}]
---
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.0.1]
  externalIPs: [10.96.0.50, 198.51.100.8]
  ports: [{name: http, port: 80}]
"#,
                    want: &["198.51.100.8:80/TCP (ExternalIP) shop/web:http [10.0.0.1:8080(L) 10.0.0.2:8080]"],
                    health: &[],
                    errors: &[(
                        "Service shop/web",
                        "external IP frontend 10.96.0.50:80/TCP is already used by Service shop/a",
                    )],
                },
                String::new(),
            ),
        ]
        .into_iter()
        .map(|(c, _)| {
            let yaml = with_slice(c.yaml);
            (c, yaml)
        })
        .collect()
    }

    #[test]
    fn external_cases() {
        for (case, yaml) in cases() {
            let (state, errors) = build_yaml(&yaml, &node(case.node_name, true));
            assert_eq!(render_ext(&state), case.want, "case {}", case.name);
            let health: Vec<(u16, String, usize)> = state
                .health_checks
                .iter()
                .map(|(p, h)| (*p, h.service.to_string(), h.local_endpoints))
                .collect();
            let want_health: Vec<(u16, String, usize)> = case
                .health
                .iter()
                .map(|(p, s, n)| (*p, (*s).to_owned(), *n))
                .collect();
            assert_eq!(health, want_health, "case {}", case.name);
            check_errors(case.name, &errors, case.errors);
            // The socket path's frontends do not change with the external path.
            let (off, off_errors) = build_yaml(&yaml, &node(case.node_name, false));
            let socket: BTreeMap<_, _> = state
                .frontends
                .iter()
                .filter(|(k, _)| k.scope == SCOPE_ALL)
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            assert_eq!(off.frontends, socket, "case {}", case.name);
            assert!(off.health_checks.is_empty(), "case {}", case.name);
            assert!(off_errors.len() <= errors.len(), "case {}", case.name);
            // Socket-path frontends carry no external-policy flags; a load-balancer IP
            // carries its source ranges (the socket programs check clients on the node
            // against them), the same as its external twin.
            for f in socket.values() {
                assert_eq!(f.flags & !SVC_FLAG_SRC_RANGES, 0, "case {}", case.name);
                assert_eq!(
                    f.flags & SVC_FLAG_SRC_RANGES != 0,
                    !f.src_ranges.is_empty(),
                    "case {}",
                    case.name
                );
                if f.kind == KIND_LOAD_BALANCER {
                    let twin = crate::model::FrontendKey {
                        scope: SCOPE_EXTERNAL,
                        ..f.key
                    };
                    assert_eq!(
                        state.frontends.get(&twin).map(|t| &t.src_ranges),
                        Some(&f.src_ranges),
                        "case {}",
                        case.name
                    );
                } else {
                    assert!(f.src_ranges.is_empty(), "case {}", case.name);
                }
            }
        }
    }

    #[test]
    fn socket_path_backends_carry_locality_too() {
        let yaml = format!(
            "{}{SLICE_TWO_NODES}",
            r#"
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.0.1]
  ports: [{name: http, port: 80}]
"#
        );
        for (name, want) in [
            (Some("n1"), [true, false]),
            (Some("n2"), [false, true]),
            (None, [false, false]),
        ] {
            let (state, _) = build_yaml(&yaml, &node(name, false));
            let fe = state.frontends.values().next().unwrap();
            let local: Vec<bool> = fe.backends.iter().map(|b| b.local).collect();
            assert_eq!(local, want, "node {name:?}");
        }
    }
}

// ---------------------------------------------------------------------------------
// loadBalancerSourceRanges per family, kube-proxy's rule (pkg/proxy/serviceport.go):
// only the ranges of the address's family apply; none of that family, or a zero-length
// prefix of it, means no filtering. Both scopes carry them (issue 11, item 5).

mod source_ranges_per_family {
    use svc_lb_common::{SCOPE_EXTERNAL, SVC_FLAG_SRC_RANGES};

    use super::*;

    #[test]
    fn each_family_gets_its_own_ranges_and_zero_prefix_allows_all() {
        let yaml = r#"
kind: Service
metadata: {name: v4only, namespace: shop}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  clusterIPs: [10.96.0.1, "fd00:96::1"]
  loadBalancerSourceRanges: ["10.0.0.0/8"]
  ports: [{name: http, port: 80}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.10}, {ip: "2001:db8:1::10"}]}}
---
kind: Service
metadata: {name: zero, namespace: shop}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  clusterIPs: [10.96.0.2, "fd00:96::2"]
  loadBalancerSourceRanges: ["0.0.0.0/0", "10.0.0.0/8", "2001:db8::/32"]
  ports: [{name: http, port: 80}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.20}, {ip: "2001:db8:1::20"}]}}
"#;
        let (services, slices) = parse(yaml);
        for external in [false, true] {
            let node = NodeInfo {
                name: Some("n1".into()),
                addresses: vec!["192.168.1.10".parse().unwrap()],
                external,
                ..NodeInfo::default()
            };
            let (state, errors) = build(&snapshot(&services, &slices), &node);
            assert!(errors.is_empty(), "{errors:?}");
            let ranges = |addr: &str, scope: u8| {
                let fe = &state.frontends[&crate::model::FrontendKey {
                    addr: addr.parse().unwrap(),
                    port: 80,
                    proto: svc_lb_common::PROTO_TCP,
                    scope,
                }];
                assert_eq!(
                    fe.flags & SVC_FLAG_SRC_RANGES != 0,
                    !fe.src_ranges.is_empty()
                );
                fe.src_ranges
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            };
            let mut scopes = vec![SCOPE_ALL];
            if external {
                scopes.push(SCOPE_EXTERNAL);
            }
            for scope in scopes {
                assert_eq!(ranges("192.0.2.10", scope), ["10.0.0.0/8"]);
                // No IPv6 range: the IPv6 address is not filtered.
                assert!(ranges("2001:db8:1::10", scope).is_empty());
                // 0.0.0.0/0 among the IPv4 ranges: allow any.
                assert!(ranges("192.0.2.20", scope).is_empty());
                assert_eq!(ranges("2001:db8:1::20", scope), ["2001:db8::/32"]);
                // Cluster IPs are never filtered.
                assert!(ranges("10.96.0.1", SCOPE_ALL).is_empty());
            }
        }
    }
}
// Hostile input (issue 12): addresses that must never become frontends, external-IP
// ranges, load-balancer precedence, per-Service limits; the headless label (issue 11).

fn build_with(yaml: &str, node: &NodeInfo) -> (DesiredState, Vec<ModelError>) {
    let (services, slices) = parse(yaml);
    build(&snapshot(&services, &slices), node)
}

#[test]
fn loopback_link_local_and_other_special_addresses_are_refused_as_frontends() {
    let yaml = r#"
kind: Service
metadata: {name: hijack, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.30.1
  clusterIPs: [10.96.30.1, "fd00::30:1"]
  externalIPs: [169.254.169.254, 127.0.0.53, "::1", "fe80::1", 224.0.0.1, 255.255.255.255, "::ffff:127.0.0.1", 203.0.113.30]
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 127.0.0.1}, {ip: 169.254.1.1}, {ip: "::"}, {ip: "ff02::1"}, {ip: 198.51.100.30}]
"#;
    let (state, errors) = build_with(yaml, &NodeInfo::default());
    assert_eq!(
        render(&state),
        [
            "10.96.30.1:80/TCP t/hijack: []",
            "198.51.100.30:80/TCP (LoadBalancer) t/hijack: []",
            "203.0.113.30:80/TCP (ExternalIP) t/hijack: []",
            "[fd00::30:1]:80/TCP t/hijack: []",
        ]
    );
    let want = [
        (
            "externalIPs entry '169.254.169.254'",
            "a link-local address (169.254.0.0/16)",
        ),
        ("externalIPs entry '127.0.0.53'", "a loopback address"),
        ("externalIPs entry '::1'", "a loopback address"),
        (
            "externalIPs entry 'fe80::1'",
            "a link-local address (fe80::/10)",
        ),
        ("externalIPs entry '224.0.0.1'", "a multicast address"),
        (
            "externalIPs entry '255.255.255.255'",
            "the broadcast address",
        ),
        ("externalIPs entry '::ffff:127.0.0.1'", "a loopback address"),
        ("load-balancer ingress IP '127.0.0.1'", "a loopback address"),
        (
            "load-balancer ingress IP '169.254.1.1'",
            "a link-local address",
        ),
        ("load-balancer ingress IP '::'", "the unspecified address"),
        ("load-balancer ingress IP 'ff02::1'", "a multicast address"),
    ];
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), want.len(), "{shown:#?}");
    for (e, (what, why)) in errors.iter().zip(want) {
        assert_eq!(e.object.to_string(), "Service t/hijack");
        assert!(
            e.reason.starts_with(&format!("{what} is refused: {why}"))
                && e.reason.contains("must never become a Service frontend"),
            "{e}"
        );
    }
}

#[test]
fn external_ip_cidrs_refuse_external_ips_outside_them_but_not_lb_ips() {
    let yaml = r#"
kind: Service
metadata: {name: ext, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.31.1
  externalIPs: [203.0.113.7, 198.51.100.7]
  ports: [{port: 80}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.7}]}}
"#;
    let node = NodeInfo {
        external_ip_cidrs: vec!["203.0.113.0/24".parse().unwrap()],
        ..NodeInfo::default()
    };
    let (state, errors) = build_with(yaml, &node);
    assert_eq!(
        render(&state),
        [
            "10.96.31.1:80/TCP t/ext: []",
            "192.0.2.7:80/TCP (LoadBalancer) t/ext: []",
            "203.0.113.7:80/TCP (ExternalIP) t/ext: []",
        ]
    );
    check_errors(
        "external-ip-cidrs",
        &errors,
        &[(
            "Service t/ext",
            "externalIPs entry '198.51.100.7' is refused: it is outside --external-ip-cidrs (203.0.113.0/24)",
        )],
    );
    // Without the flag every unicast external IP is allowed.
    let (state, errors) = build_with(yaml, &NodeInfo::default());
    assert_eq!(state.frontends.len(), 4);
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn a_load_balancer_ip_wins_over_an_external_ip_of_another_service() {
    // "a-user" sorts first and would win by name; the controller-written ingress wins.
    let yaml = r#"
kind: Service
metadata: {name: a-user, namespace: t}
spec: {clusterIP: 10.96.32.1, externalIPs: [198.51.100.9], ports: [{port: 80}]}
---
kind: Service
metadata: {name: b-lb, namespace: t}
spec: {type: LoadBalancer, clusterIP: 10.96.32.2, ports: [{port: 80}]}
status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}
"#;
    let (state, errors) = build_with(yaml, &NodeInfo::default());
    assert_eq!(
        render(&state),
        [
            "10.96.32.1:80/TCP t/a-user: []",
            "10.96.32.2:80/TCP t/b-lb: []",
            "198.51.100.9:80/TCP (LoadBalancer) t/b-lb: []",
        ]
    );
    check_errors(
        "lb precedence",
        &errors,
        &[(
            "Service t/a-user",
            "external IP frontend 198.51.100.9:80/TCP is already used by Service t/b-lb as its load-balancer IP, which takes precedence over external IPs; this address is skipped",
        )],
    );
}

fn ports_yaml(n: usize) -> String {
    (1..=n)
        .map(|p| format!("{{name: p{p}, port: {p}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn a_service_over_the_frontend_limit_is_refused_whole_and_fails_closed() {
    let node = NodeInfo {
        limits: super::ServiceLimits {
            max_frontends: 6,
            max_backends: 100,
        },
        ..NodeInfo::default()
    };
    // 2 cluster IPs × 3 ports = 6: at the limit. One external IP more: 9.
    let yaml = format!(
        r#"
kind: Service
metadata: {{name: at-limit, namespace: t}}
spec: {{clusterIPs: [10.96.33.1, "fd00::33:1"], ports: [{ports}]}}
---
kind: Service
metadata: {{name: over, namespace: t}}
spec: {{clusterIPs: [10.96.33.2, "fd00::33:2"], externalIPs: [203.0.113.33], ports: [{ports}]}}
---
kind: EndpointSlice
metadata:
  name: over-1
  namespace: t
  labels: {{kubernetes.io/service-name: over}}
addressType: IPv4
ports: [{{name: p1, port: 8080}}]
endpoints: [{{addresses: [10.0.0.1]}}]
---
kind: Service
metadata: {{name: way-over, namespace: t}}
spec: {{clusterIPs: [10.96.33.3], ports: [{many}]}}
"#,
        ports = ports_yaml(3),
        many = ports_yaml(7)
    );
    let (state, errors) = build_with(&yaml, &node);
    check_errors(
        "frontend limit",
        &errors,
        &[
            (
                "Service t/over",
                "9 frontends (addresses × ports) are over the limit of 6 (--max-frontends-per-service); the Service is refused whole and its cluster IPs refuse connections",
            ),
            (
                "Service t/way-over",
                "7 frontends (addresses × ports) are over the limit of 6",
            ),
        ],
    );
    let over: Vec<&super::DesiredFrontend> = state
        .frontends
        .values()
        .filter(|f| &*f.service.name == "over")
        .collect();
    // Its 6 cluster-IP frontends, all without backends; no external IP.
    assert_eq!(over.len(), 6);
    assert!(
        over.iter()
            .all(|f| f.backends.is_empty() && f.kind == KIND_CLUSTER_IP)
    );
    // Its cluster IPs alone are over the limit: nothing at all.
    assert!(
        state
            .frontends
            .values()
            .all(|f| &*f.service.name != "way-over")
    );
    assert_eq!(
        state
            .frontends
            .values()
            .filter(|f| &*f.service.name == "at-limit")
            .count(),
        6
    );
    let names: Vec<String> = state.over_limit.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["t/over", "t/way-over"]);
}

#[test]
fn a_service_over_the_backend_limit_is_refused_whole() {
    let node = NodeInfo {
        limits: super::ServiceLimits {
            max_frontends: 100,
            max_backends: 2,
        },
        ..NodeInfo::default()
    };
    let yaml = r#"
kind: Service
metadata: {name: big, namespace: t}
spec: {clusterIP: 10.96.34.1, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: big-1, namespace: t, labels: {kubernetes.io/service-name: big}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]
---
kind: EndpointSlice
metadata: {name: big-2, namespace: t, labels: {kubernetes.io/service-name: big}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.3]}]
---
kind: Service
metadata: {name: small, namespace: t}
spec: {clusterIP: 10.96.34.2, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: small-1, namespace: t, labels: {kubernetes.io/service-name: small}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]
"#;
    let (state, errors) = build_with(yaml, &node);
    assert_eq!(
        render(&state),
        [
            "10.96.34.1:80/TCP t/big:http []",
            "10.96.34.2:80/TCP t/small:http [10.0.0.1:8080 10.0.0.2:8080]",
        ]
    );
    check_errors(
        "backend limit",
        &errors,
        &[(
            "Service t/big",
            "its EndpointSlices list 3 endpoints, over the limit of 2 (--max-backends-per-service); the Service is refused whole",
        )],
    );
}

#[test]
fn the_headless_label_skips_a_service_with_a_cluster_ip_and_says_why() {
    let labelled = r#"
kind: Service
metadata:
  name: web
  namespace: t
  labels: {service.kubernetes.io/headless: ""}
spec: {clusterIP: 10.96.35.1, ports: [{port: 80}]}
"#;
    let (state, errors) = build_with(labelled, &NodeInfo::default());
    assert!(state.frontends.is_empty());
    assert!(errors.is_empty(), "{errors:?}");
    let skipped: Vec<String> = state.skipped.values().map(ToString::to_string).collect();
    assert_eq!(
        skipped,
        [
            "Service t/web: labelled service.kubernetes.io/headless: not programmed, as kube-proxy does not proxy such Services; remove the label to program it"
        ]
    );
    // Without the label it is programmed.
    let plain = labelled.replace("  labels: {service.kubernetes.io/headless: \"\"}\n", "");
    let (state, _) = build_with(&plain, &NodeInfo::default());
    assert_eq!(render(&state), ["10.96.35.1:80/TCP t/web: []"]);
    assert!(state.skipped.is_empty());
}

// ---------------------------------------------------------------------------------
// Draining on the external path (issue 11, item 3): endpoints that still serve but are
// not selected stay listed per external frontend, so established flows keep them.

mod draining {
    use svc_lb_common::{BACKEND_DRAINING, SCOPE_EXTERNAL};

    use super::*;

    fn node(zone: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: Some("n1".to_owned()),
            zone: zone.map(str::to_owned),
            addresses: vec!["192.168.1.10".parse().unwrap()],
            external: true,
            ..NodeInfo::default()
        }
    }

    /// `0.0.0.0:30080/TCP [selected...] drain [draining...]` for every external
    /// frontend, and checks that no socket-path frontend drains anything.
    fn render_drain(state: &DesiredState) -> Vec<String> {
        for key in state.draining.keys() {
            assert_eq!(key.scope, SCOPE_EXTERNAL, "only external frontends drain");
            assert!(state.frontends.contains_key(key), "draining of a frontend");
        }
        state
            .frontends
            .values()
            .filter(|fe| fe.key.scope == SCOPE_EXTERNAL)
            .map(|fe| {
                let list = |bs: &[crate::model::DesiredBackend]| {
                    bs.iter()
                        .map(|b| hostport(b.addr.addr, b.addr.port))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                let draining = state.draining.get(&fe.key).cloned().unwrap_or_default();
                assert!(
                    state.draining.get(&fe.key).is_none_or(|d| !d.is_empty()),
                    "no empty draining list"
                );
                for d in &draining {
                    assert_eq!(d.state, BACKEND_DRAINING);
                    assert!(
                        !fe.backends.iter().any(|b| b.addr == d.addr),
                        "a selected backend is not draining"
                    );
                }
                let mut sorted = draining.clone();
                sorted.sort();
                assert_eq!(sorted, draining, "sorted");
                format!(
                    "{}/{} [{}] drain [{}]",
                    hostport(fe.key.addr, fe.key.port),
                    proto(fe.key.proto),
                    list(&fe.backends),
                    list(&draining)
                )
            })
            .collect()
    }

    const SVC: &str = r#"
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIPs: [10.96.0.1]
  ports: [{name: http, port: 80, nodePort: 30080}]
"#;

    fn slice(endpoints: &str) -> String {
        format!(
            r#"{SVC}
---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{endpoints}"#
        )
    }

    #[test]
    fn serving_endpoints_that_are_not_selected_drain() {
        let cases: &[(&str, Option<&str>, &str, &str)] = &[
            (
                "terminating but serving while another is ready",
                None,
                "- {addresses: [10.0.0.1], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}\n\
                 - {addresses: [10.0.0.2], nodeName: n1}\n",
                "0.0.0.0:30080/TCP [10.0.0.2:8080] drain [10.0.0.1:8080]",
            ),
            (
                "terminating and not serving: gone for established flows too",
                None,
                "- {addresses: [10.0.0.1], nodeName: n1, conditions: {ready: false, serving: false, terminating: true}}\n\
                 - {addresses: [10.0.0.2], nodeName: n1}\n",
                "0.0.0.0:30080/TCP [10.0.0.2:8080] drain []",
            ),
            (
                "not ready but serving (and serving unknown, read as serving like kube-proxy)",
                None,
                "- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: false}}\n\
                 - {addresses: [10.0.0.2], conditions: {ready: false}}\n\
                 - {addresses: [10.0.0.3]}\n\
                 - {addresses: [10.0.0.4], conditions: {ready: false, serving: false}}\n",
                "0.0.0.0:30080/TCP [10.0.0.3:8080] drain [10.0.0.1:8080 10.0.0.2:8080]",
            ),
            (
                "every endpoint terminating: the fallback selects them, nothing drains",
                None,
                "- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}\n\
                 - {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}\n",
                "0.0.0.0:30080/TCP [10.0.0.1:8080 10.0.0.2:8080] drain []",
            ),
            (
                "left out by a zone hint",
                Some("zone-a"),
                "- {addresses: [10.0.0.1], hints: {forZones: [{name: zone-a}]}}\n\
                 - {addresses: [10.0.0.2], hints: {forZones: [{name: zone-b}]}}\n",
                "0.0.0.0:30080/TCP [10.0.0.1:8080] drain [10.0.0.2:8080]",
            ),
        ];
        for (name, zone, endpoints, want) in cases {
            let (state, errors) = build_with(&slice(endpoints), &node(*zone));
            assert!(errors.is_empty(), "{name}: {errors:?}");
            assert_eq!(render_drain(&state), [*want], "{name}");
        }
    }

    #[test]
    fn external_traffic_policy_local_drains_the_other_nodes_endpoints() {
        let yaml = slice(
            "- {addresses: [10.0.0.1], nodeName: n1}\n\
             - {addresses: [10.0.0.2], nodeName: n2}\n\
             - {addresses: [10.0.0.3], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}\n",
        )
        .replace(
            "  type: NodePort\n",
            "  type: NodePort\n  externalTrafficPolicy: Local\n",
        );
        let (state, errors) = build_with(&yaml, &node(None));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            render_drain(&state),
            ["0.0.0.0:30080/TCP [10.0.0.1:8080] drain [10.0.0.2:8080 10.0.0.3:8080]"]
        );
        // The draining entry keeps its locality (the flow's SNAT was decided by it).
        let d = state.draining.values().next().unwrap();
        assert_eq!(d.iter().map(|b| b.local).collect::<Vec<_>>(), [false, true]);
    }

    #[test]
    fn load_balancer_ips_drain_and_the_socket_path_never_does() {
        let yaml = slice(
            "- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.0.0.2]}\n",
        )
        .replace("type: NodePort", "type: LoadBalancer")
        .replace(
            "  ports: [{name: http, port: 80, nodePort: 30080}]\n",
            "  ports: [{name: http, port: 80, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.5}]}}\n",
        );
        let (state, errors) = build_with(&yaml, &node(None));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            render_drain(&state),
            [
                "0.0.0.0:30080/TCP [10.0.0.2:8080] drain [10.0.0.1:8080]",
                "203.0.113.5:80/TCP [10.0.0.2:8080] drain [10.0.0.1:8080]",
            ]
        );
        // Without the external path nothing drains (no one would read it).
        let off = NodeInfo {
            external: false,
            ..node(None)
        };
        let (state, _) = build_with(&yaml, &off);
        assert!(state.draining.is_empty());
    }
}

/// Issue 15: the scheduler annotation and the slice's weights become the frontends'
/// scheduler, flags and slot layout; weight 0 leaves the slots for the draining list;
/// bad values are reported and the defaults apply.
#[test]
fn schedulers_and_weights_shape_the_frontends() {
    use svc_lb_common::{BACKEND_DRAINING, META_SCHED_MASK, META_SCHED_WRR, SVC_FLAG_SCHED_RR};

    use super::sched::Scheduler;
    let yaml = r#"
kind: Service
metadata: {name: web, namespace: shop, annotations: {svc-lb.io/scheduler: wrr}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: Service
metadata: {name: odd, namespace: shop, annotations: {svc-lb.io/scheduler: wlc}}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web},
  annotations: {svc-lb.io/weights: "10.0.0.1=1,10.0.0.2=2,10.0.0.3=0,nope"}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.0.0.1]}
- {addresses: [10.0.0.2]}
- {addresses: [10.0.0.3]}
---
kind: EndpointSlice
metadata: {name: odd-1, namespace: shop, labels: {kubernetes.io/service-name: odd}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.0.0.1]}
- {addresses: [10.0.0.2]}
"#;
    let (services, slices) = parse(yaml);
    let node = NodeInfo::default();
    let (state, errors) = build(&snapshot(&services, &slices), &node);
    let web = state
        .frontends
        .values()
        .find(|f| &*f.service.name == "web")
        .expect("web frontend");
    assert_eq!(web.scheduler, Scheduler::Wrr);
    assert!(web.flags & SVC_FLAG_SCHED_RR != 0);
    assert_eq!(web.meta_flags & META_SCHED_MASK, META_SCHED_WRR);
    let addrs: Vec<String> = web
        .backends
        .iter()
        .map(|b| b.addr.addr.to_string())
        .collect();
    assert_eq!(
        addrs,
        ["10.0.0.1", "10.0.0.2"],
        "weight 0 leaves the backends"
    );
    let slots: Vec<String> = web
        .slot_backends()
        .map(|b| b.addr.addr.to_string())
        .collect();
    assert_eq!(slots, ["10.0.0.2", "10.0.0.1", "10.0.0.2"]);
    let draining = &state.draining[&web.key];
    assert_eq!(draining.len(), 1);
    assert_eq!(draining[0].addr.addr.to_string(), "10.0.0.3");
    assert_eq!(draining[0].state, BACKEND_DRAINING);

    let odd = state
        .frontends
        .values()
        .find(|f| &*f.service.name == "odd")
        .expect("odd frontend");
    assert_eq!(odd.scheduler, Scheduler::Random);
    assert_eq!(odd.flags & SVC_FLAG_SCHED_RR, 0);
    assert_eq!(odd.slots, None, "equal weights: one slot per backend");
    assert_eq!(odd.slot_count(), 2);
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        shown.iter().any(|e| e.starts_with("Service shop/odd")
            && e.contains("'wlc' needs active connection counts")
            && e.contains("using random")),
        "{shown:#?}"
    );
    assert!(
        shown
            .iter()
            .any(|e| e.starts_with("EndpointSlice shop/web-1") && e.contains("'nope'")),
        "{shown:#?}"
    );
}
