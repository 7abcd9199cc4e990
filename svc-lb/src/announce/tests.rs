use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use super::*;

fn node(name: &str, labels: &[(&str, &str)], usable: bool) -> NodeView {
    NodeView {
        name: name.to_owned(),
        addresses: Vec::new(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        usable,
    }
}

fn target(ip: &str) -> Target {
    Target {
        ip: ip.parse().unwrap(),
        service: ServiceRef {
            namespace: "default".into(),
            name: "lb".into(),
        },
        interfaces: Vec::new(),
        local_only: false,
        endpoint_nodes: BTreeSet::new(),
        node_selectors: Vec::new(),
    }
}

/// Who announces each target, as every node computes it.
fn owners(targets: &[Target], nodes: &[NodeView], live: &[&str]) -> BTreeMap<IpAddr, Vec<String>> {
    let mut out: BTreeMap<IpAddr, Vec<String>> =
        targets.iter().map(|t| (t.ip, Vec::new())).collect();
    for me in nodes {
        let got = assign(targets, nodes, &me.name, &["eth0".to_owned()], |n| {
            live.contains(&n)
        });
        for ip in got.get("eth0").into_iter().flatten() {
            out.get_mut(ip).unwrap().push(me.name.clone());
        }
    }
    out
}

#[test]
fn every_address_has_exactly_one_announcer() {
    let nodes = vec![
        node("a", &[], true),
        node("b", &[], true),
        node("c", &[], true),
    ];
    let targets: Vec<Target> = (1..=50)
        .map(|i| target(&format!("192.0.2.{i}")))
        .chain((1..=50).map(|i| target(&format!("2001:db8::{i:x}"))))
        .collect();
    for (ip, who) in owners(&targets, &nodes, &["a", "b", "c"]) {
        assert_eq!(who.len(), 1, "{ip}: {who:?}");
    }
    // Node b dead: still one each, never b.
    for (ip, who) in owners(&targets, &nodes, &["a", "c"]) {
        assert_eq!(who.len(), 1, "{ip}: {who:?}");
        assert_ne!(who[0], "b");
    }
    // Nobody live: nobody announces.
    assert!(owners(&targets, &nodes, &[]).values().all(Vec::is_empty));
}

#[test]
fn local_policy_unusable_nodes_and_selectors() {
    let nodes = vec![
        node("a", &[("zone", "x")], true),
        node("b", &[("zone", "y")], true),
        node("c", &[("zone", "x")], false),
    ];
    let live = ["a", "b", "c"];
    let mut t = target("192.0.2.1");
    t.local_only = true;
    t.endpoint_nodes = ["b".to_owned()].into();
    assert_eq!(
        owners(std::slice::from_ref(&t), &nodes, &live)[&t.ip],
        vec!["b"]
    );
    // No live node with an endpoint: nobody.
    assert!(owners(std::slice::from_ref(&t), &nodes, &["a", "c"])[&t.ip].is_empty());
    // The not-ready node c is never chosen; the selector leaves only a and c.
    let mut s = target("192.0.2.2");
    s.node_selectors = vec![LabelSelector {
        match_labels: Some([("zone".to_owned(), "x".to_owned())].into()),
        ..LabelSelector::default()
    }];
    assert_eq!(
        owners(std::slice::from_ref(&s), &nodes, &live)[&s.ip],
        vec!["a"]
    );
}

#[test]
fn selector_operators() {
    let labels: BTreeMap<String, String> = [("k".to_owned(), "v".to_owned())].into();
    let expr = |op: &str, values: &[&str]| LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "k".into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        }]),
        ..LabelSelector::default()
    };
    assert!(selector_matches(&LabelSelector::default(), &labels));
    assert!(selector_matches(&expr("In", &["v", "w"]), &labels));
    assert!(!selector_matches(&expr("NotIn", &["v"]), &labels));
    assert!(selector_matches(&expr("Exists", &[]), &labels));
    assert!(!selector_matches(&expr("DoesNotExist", &[]), &labels));
    assert!(!selector_matches(&expr("Bogus", &[]), &labels));
}

#[test]
fn node_view_reads_addresses_readiness_and_exclusion() {
    let yaml = r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {a: b}}
status:
  addresses: [{type: Hostname, address: n1}, {type: ExternalIP, address: 203.0.113.1}, {type: InternalIP, address: 10.0.0.1}]
  conditions: [{type: Ready, status: "True"}]
"#;
    let n: k8s_openapi::api::core::v1::Node = serde_yaml::from_str(yaml).unwrap();
    let v = NodeView::of(&n).unwrap();
    assert_eq!(v.addresses, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
    assert!(v.usable);
    let not_ready = yaml.replace("\"True\"", "\"False\"");
    let n: k8s_openapi::api::core::v1::Node = serde_yaml::from_str(&not_ready).unwrap();
    assert!(!NodeView::of(&n).unwrap().usable);
    let excluded = yaml.replace("{a: b}", &format!("{{{LABEL_EXCLUDE_LB}: \"\"}}"));
    let n: k8s_openapi::api::core::v1::Node = serde_yaml::from_str(&excluded).unwrap();
    assert!(!NodeView::of(&n).unwrap().usable);
}

#[test]
fn the_manifest_source_reads_nodes_and_changes_no_service_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let node = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, namespace: ignored}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
        )
    };
    std::fs::write(
        dir.path().join("nodes.yaml"),
        format!("{}---\n{}", node("n1", "10.0.0.1"), node("n2", "10.0.0.2")),
    )
    .unwrap();
    let mut src = crate::source::manifests::ManifestDir::new(dir.path());
    let snap = src.load().unwrap();
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let views = NodeView::all(&snap.nodes);
    let names: Vec<&str> = views.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["n1", "n2"]);
    assert_eq!(
        views[1].addresses,
        vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
    );
    // Rewriting one Node is seen, and changes no Service.
    std::fs::write(dir.path().join("nodes.yaml"), node("n1", "10.0.0.9")).unwrap();
    let snap = src.reload().unwrap().expect("a change");
    assert!(snap.changed.services.is_empty());
    let views = NodeView::all(&snap.nodes);
    assert_eq!(views.len(), 1);
    assert_eq!(
        views[0].addresses,
        vec!["10.0.0.9".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn pool_addresses_follow_their_l2_advertisements() {
    use crate::lbipam::{Allocated, Allocation, L2Advert};
    let svc = target("192.0.2.1").service;
    let mut alloc = Allocation::default();
    alloc.assigned.insert(
        svc.clone(),
        ["192.0.2.1", "192.0.2.2"]
            .iter()
            .zip(["announced", "silent"])
            .map(|(ip, pool)| Allocated {
                service: svc.clone(),
                ip: ip.parse().unwrap(),
                pool: pool.to_owned(),
            })
            .collect(),
    );
    let zone = |z: &str| LabelSelector {
        match_labels: Some([("zone".to_owned(), z.to_owned())].into()),
        ..Default::default()
    };
    let advert = |name: &str, ifaces: &[&str], sels: Vec<LabelSelector>| L2Advert {
        name: name.to_owned(),
        pools: vec!["announced".to_owned()],
        interfaces: ifaces.iter().map(|i| (*i).to_owned()).collect(),
        node_selectors: sels,
    };
    // 192.0.2.3 is not from a pool (hand-written ingress): it keeps the defaults.
    let targets = vec![
        target("192.0.2.1"),
        target("192.0.2.2"),
        target("192.0.2.3"),
    ];
    let adverts = [
        advert("a", &["eth1"], vec![zone("a")]),
        advert("b", &["eth2", "eth1"], vec![zone("b")]),
    ];

    let got = apply_adverts(targets.clone(), Some(&alloc), &adverts);
    let ips: Vec<String> = got.iter().map(|t| t.ip.to_string()).collect();
    assert_eq!(
        ips,
        ["192.0.2.1", "192.0.2.3"],
        "a pool no advertisement selects is silent"
    );
    assert_eq!(got[0].interfaces, ["eth1", "eth2"]);
    assert_eq!(got[0].node_selectors, [zone("a"), zone("b")]);
    assert_eq!(got[1], targets[2]);

    // An advertisement without interfaces or selectors widens to every one of them.
    let wide = [adverts[0].clone(), advert("c", &[], Vec::new())];
    let got = apply_adverts(targets.clone(), Some(&alloc), &wide);
    assert!(got[0].interfaces.is_empty() && got[0].node_selectors.is_empty());

    // No allocation at all (no pools): every target as it was.
    assert_eq!(apply_adverts(targets.clone(), None, &adverts), targets);
}
