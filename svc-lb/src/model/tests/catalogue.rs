//! Bad-input catalogue cases (tests/README.md) for the model.
use super::{build_with, render};
use crate::model::{ModelError, NodeInfo};

fn shown(errors: &[ModelError]) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

fn node() -> NodeInfo {
    NodeInfo {
        name: Some("n1".into()),
        addresses: vec!["192.168.1.10".parse().expect("literal")],
        ..NodeInfo::default()
    }
}

#[test]
fn an_external_name_service_pointing_at_an_ip_programs_nothing() {
    // The apiserver clears the cluster IP of an ExternalName Service, but a manifest can
    // carry one, with external IPs too: none of them may become a frontend, and the
    // externalName (here the metadata service) is never dialled by the proxy.
    let yaml = r#"
kind: Service
metadata: {name: meta}
spec:
  type: ExternalName
  externalName: 169.254.169.254
  clusterIP: 10.96.40.1
  externalIPs: [203.0.113.40]
  ports: [{port: 80, nodePort: 30040}]
---
kind: Service
metadata: {name: good}
spec: {clusterIP: 10.96.40.2, ports: [{port: 80}]}
"#;
    let (state, errors) = build_with(yaml, &node());
    assert_eq!(render(&state), ["10.96.40.2:80/TCP default/good: []"]);
    assert_eq!(errors, [], "{:#?}", shown(&errors));
}

#[test]
fn negative_ports_and_affinity_timeouts_over_a_day_refuse_the_service() {
    let yaml = r#"
kind: Service
metadata: {name: neg-port}
spec: {clusterIP: 10.96.41.1, ports: [{port: -1}]}
---
kind: Service
metadata: {name: neg-target}
spec: {clusterIP: 10.96.41.2, ports: [{port: 80, targetPort: -8080}]}
---
kind: Service
metadata: {name: neg-node-port}
spec: {type: NodePort, clusterIP: 10.96.41.3, ports: [{port: 80, nodePort: -30000}]}
---
kind: Service
metadata: {name: long-affinity}
spec:
  clusterIP: 10.96.41.4
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}
  ports: [{port: 80}]
---
kind: Service
metadata: {name: neg-affinity}
spec:
  clusterIP: 10.96.41.5
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: -1}}
  ports: [{port: 80}]
---
kind: Service
metadata: {name: day-affinity}
spec:
  clusterIP: 10.96.41.6
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}
  ports: [{port: 80}]
"#;
    let (state, errors) = build_with(yaml, &node());
    assert_eq!(
        render(&state),
        ["10.96.41.6:80/TCP default/day-affinity: [] affinity=86400"]
    );
    let want = [
        (
            "Service default/long-affinity",
            "timeoutSeconds 86401 is out of range 1-86400",
        ),
        (
            "Service default/neg-affinity",
            "timeoutSeconds -1 is out of range 1-86400",
        ),
        (
            "Service default/neg-node-port",
            "nodePort -30000 is out of range 1-65535",
        ),
        (
            "Service default/neg-port",
            "port -1 is out of range 1-65535",
        ),
        (
            "Service default/neg-target",
            "targetPort -8080 is out of range",
        ),
    ];
    assert_eq!(errors.len(), want.len(), "{:#?}", shown(&errors));
    for (e, (object, reason)) in errors.iter().zip(want) {
        assert_eq!(e.object.to_string(), object, "{e}");
        assert!(e.reason.contains(reason), "{e} should say {reason:?}");
    }
}

#[test]
fn ip_family_fields_do_not_override_the_cluster_ips() {
    // The proxy programs the addresses the apiserver allocated (clusterIPs), as
    // kube-proxy does; ipFamilyPolicy and ipFamilies, even nonsense, change nothing.
    let yaml = r#"
kind: Service
metadata: {name: fam}
spec:
  clusterIP: 10.96.42.1
  clusterIPs: [10.96.42.1]
  ipFamilyPolicy: Sometimes
  ipFamilies: [IPv6, IPX]
  ports: [{port: 80}]
---
kind: EndpointSlice
metadata: {name: fam-v6, labels: {kubernetes.io/service-name: fam}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00::1"]}]
---
kind: EndpointSlice
metadata: {name: fam-v4, labels: {kubernetes.io/service-name: fam}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"#;
    let (state, errors) = build_with(yaml, &node());
    assert_eq!(
        render(&state),
        ["10.96.42.1:80/TCP default/fam: [10.0.0.1:8080]"]
    );
    assert_eq!(errors, [], "{:#?}", shown(&errors));
}

#[test]
fn lower_case_protocols_and_bad_health_check_ports_are_reported() {
    let yaml = r#"
kind: Service
metadata: {name: lower}
spec: {clusterIP: 10.96.43.1, ports: [{name: a, port: 80, protocol: tcp}, {name: b, port: 81}]}
---
kind: Service
metadata: {name: hc}
spec:
  type: LoadBalancer
  clusterIP: 10.96.43.2
  externalTrafficPolicy: Local
  healthCheckNodePort: 70000
  ports: [{port: 80, nodePort: 30043}]
"#;
    let node = NodeInfo {
        external: true,
        ..node()
    };
    let (state, errors) = build_with(yaml, &node);
    assert!(state.health_checks.is_empty(), "{:?}", state.health_checks);
    assert!(
        state
            .frontends
            .values()
            .any(|f| &*f.service.name == "lower" && f.port_name == "b"),
        "the good port of 'lower' is programmed"
    );
    assert!(
        !state
            .frontends
            .values()
            .any(|f| &*f.service.name == "lower" && f.port_name == "a"),
        "the port with protocol 'tcp' is not"
    );
    let want = [
        (
            "Service default/hc",
            "healthCheckNodePort 70000 is out of range 1-65535; it is not served",
        ),
        (
            "Service default/lower",
            "port 'a' (80): protocol tcp is not supported",
        ),
    ];
    assert_eq!(errors.len(), want.len(), "{:#?}", shown(&errors));
    for (e, (object, reason)) in errors.iter().zip(want) {
        assert_eq!(e.object.to_string(), object, "{e}");
        assert!(e.reason.contains(reason), "{e} should say {reason:?}");
    }
}
