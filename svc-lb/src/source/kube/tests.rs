use std::collections::BTreeMap;

use kube::runtime::watcher::{self, Event};

use super::*;

fn svc(name: &str, ip: &str, rv: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": rv,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": rv},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
        },
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]},
        "status": {"conditions": [{"type": "X", "status": "True", "reason": rv, "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}]},
    }))
    .expect("a Service")
}

/// Whether an event changed the store.
fn changes<K>(deltas: Vec<Delta<K>>) -> bool {
    !deltas.is_empty()
}

fn names(store: &Store<Service, SvcObj>) -> Vec<String> {
    store.live.keys().map(|(_, n)| n.clone()).collect()
}

#[test]
fn a_list_replaces_the_store_only_when_complete() {
    let mut s = Store::new("Service", trim_service);
    assert!(!changes(s.apply(Ok(Event::Init))));
    assert!(!changes(s.apply(Ok(Event::InitApply(svc(
        "a",
        "10.96.0.1",
        "1"
    ))))));
    assert!(!s.ready, "not ready before InitDone");
    assert!(s.live.is_empty(), "nothing visible before InitDone");
    assert!(changes(s.apply(Ok(Event::InitDone))));
    assert!(s.ready);
    assert_eq!(names(&s), ["a"]);

    // A relist (after a 410) shows nothing until it is complete, then replaces.
    assert!(!changes(s.apply(Ok(Event::Init))));
    assert!(!changes(s.apply(Ok(Event::InitApply(svc(
        "b",
        "10.96.0.2",
        "5"
    ))))));
    assert_eq!(names(&s), ["a"], "the old state stays during the relist");
    assert!(changes(s.apply(Ok(Event::InitDone))));
    assert_eq!(names(&s), ["b"]);

    // A relist that finds the same objects (new resource versions) changes nothing.
    assert!(!changes(s.apply(Ok(Event::Init))));
    assert!(!changes(s.apply(Ok(Event::InitApply(svc(
        "b",
        "10.96.0.2",
        "9"
    ))))));
    assert!(!changes(s.apply(Ok(Event::InitDone))));
}

#[test]
fn updates_count_only_when_a_field_the_model_reads_changes() {
    let mut s = Store::new("Service", trim_service);
    s.apply(Ok(Event::Init));
    s.apply(Ok(Event::InitDone));
    assert!(changes(s.apply(Ok(Event::Apply(svc(
        "a",
        "10.96.0.1",
        "1"
    ))))));
    // New resourceVersion, annotations, managed fields and status conditions: no-op.
    assert!(!changes(s.apply(Ok(Event::Apply(svc(
        "a",
        "10.96.0.1",
        "2"
    ))))));
    assert!(changes(s.apply(Ok(Event::Apply(svc(
        "a",
        "10.96.0.3",
        "3"
    ))))));
    let kept = s.live[&("ns".to_owned(), "a".to_owned())].clone();
    assert!(kept.annotations.is_empty(), "{:?}", kept.annotations);
    assert_eq!(kept.uid, None);
    assert!(changes(s.apply(Ok(Event::Delete(svc(
        "a",
        "10.96.0.3",
        "4"
    ))))));
    assert!(!changes(s.apply(Ok(Event::Delete(svc(
        "a",
        "10.96.0.3",
        "4"
    ))))));
    assert!(s.live.is_empty());
}

#[test]
fn errors_keep_the_state() {
    let mut s = Store::new("Service", trim_service);
    s.apply(Ok(Event::Init));
    s.apply(Ok(Event::InitApply(svc("a", "10.96.0.1", "1"))));
    s.apply(Ok(Event::InitDone));
    assert!(!changes(s.apply(Err(watcher::Error::NoResourceVersion))));
    assert_eq!(names(&s), ["a"]);
    assert!(s.ready);
}

#[test]
fn nodes_keep_only_labels_and_addresses() {
    let mut node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}, "resourceVersion": "7"},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "192.168.1.10"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }))
    .expect("a Node");
    trim_node(&mut node);
    let want: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]},
    }))
    .expect("a Node");
    assert_eq!(node, want);
}

#[test]
fn backoff_grows_caps_jitters_and_resets() {
    let expired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut b = RetryBackoff::new(expired.clone());
    let delays: Vec<Duration> = (&mut b).take(12).collect();
    for (i, d) in delays.iter().enumerate() {
        let base = (RetryBackoff::MIN * 2u32.pow(i as u32)).min(RetryBackoff::MAX);
        assert!(
            *d >= base * 8 / 10 && *d < base * 12 / 10,
            "delay {i}: {d:?} vs {base:?}"
        );
    }
    assert!(delays.iter().all(|d| *d < RetryBackoff::MAX * 12 / 10));
    // A 410 Gone: relist at once, once, without growing the delay.
    expired.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(b.next(), Some(Duration::ZERO));
    assert!(b.next().unwrap_or_default() >= RetryBackoff::MAX * 8 / 10);
    b.reset();
    let first = b.next().unwrap_or_default();
    assert!(first < RetryBackoff::MIN * 12 / 10);
}

#[test]
fn rbac_list_names_every_watched_resource() {
    let resources: BTreeMap<&str, &[&str]> =
        API_ACCESS.iter().map(|a| (a.resource, a.verbs)).collect();
    for r in [
        "services",
        "endpointslices",
        "nodes",
        "ipaddresspools",
        "l2advertisements",
    ] {
        assert_eq!(resources[r], ["list", "watch"]);
    }
}

fn slice(name: &str, service: Option<&str>, ip: &str) -> EndpointSlice {
    let labels = match service {
        Some(s) => serde_json::json!({"kubernetes.io/service-name": s}),
        None => serde_json::json!({}),
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "ns", "labels": labels, "resourceVersion": "1"},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"port": 8080}],
    }))
    .expect("an EndpointSlice")
}

fn node(zone: &str, ip: &str, tainted: bool) -> Node {
    let taints = if tainted {
        serde_json::json!([{"key": crate::health::TO_BE_DELETED_TAINT, "effect": "NoSchedule"}])
    } else {
        serde_json::json!([])
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": zone}},
        "spec": {"taints": taints},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }))
    .expect("a Node")
}

fn sref(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "ns".into(),
        name: name.into(),
    }
}

fn changed(names: &[&str]) -> Changed {
    Changed {
        all: false,
        services: names.iter().map(|n| sref(n)).collect(),
    }
}

/// A state after its first lists, and the initial snapshot it published.
fn listed(services: Vec<Service>, slices: Vec<EndpointSlice>, node: Node) -> (State, Snapshot) {
    let mut st = State::new();
    st.service(Ok(Event::Init));
    for s in services {
        st.service(Ok(Event::InitApply(s)));
    }
    st.service(Ok(Event::InitDone));
    st.slice(Ok(Event::Init));
    for s in slices {
        st.slice(Ok(Event::InitApply(s)));
    }
    st.slice(Ok(Event::InitDone));
    st.node(Ok(Event::Init));
    st.node(Ok(Event::InitApply(node)));
    st.node(Ok(Event::InitDone));
    st.pool(Ok(Event::Init));
    st.pool(Ok(Event::InitDone));
    st.advert(Ok(Event::Init));
    st.advert(Ok(Event::InitDone));
    assert!(st.ready());
    let first = st.view.publish();
    (st, first)
}

fn ab() -> (State, Snapshot) {
    listed(
        vec![svc("a", "10.96.0.1", "1"), svc("b", "10.96.0.2", "1")],
        vec![
            slice("a-1", Some("a"), "10.0.0.1"),
            slice("b-1", Some("b"), "10.0.0.2"),
        ],
        node("z1", "192.168.1.10", false),
    )
}

#[test]
fn the_first_snapshot_changes_all_then_each_event_only_its_service() {
    let (mut st, first) = ab();
    assert_eq!(first.changed, Changed::all());
    assert_eq!(first.services.len(), 2);
    assert_eq!(first.slice_count(), 2);
    assert!(first.node.is_some());
    assert!(!st.view.dirty, "nothing changed since");

    st.service(Ok(Event::Apply(svc("b", "10.96.0.9", "2"))));
    st.service(Ok(Event::Apply(svc("c", "10.96.0.3", "1"))));
    assert!(st.view.dirty);
    let snap = st.view.publish();
    assert_eq!(snap.changed, changed(&["b", "c"]));
    assert_eq!(snap.services.len(), 3);
    assert_eq!(
        snap.services[&sref("b")]
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref()),
        Some("10.96.0.9")
    );
    // The unchanged Service is the same object, not a copy.
    assert!(Arc::ptr_eq(
        &first.services[&sref("a")],
        &snap.services[&sref("a")]
    ));

    st.service(Ok(Event::Delete(svc("c", "10.96.0.3", "2"))));
    let snap = st.view.publish();
    assert_eq!(snap.changed, changed(&["c"]));
    assert!(!snap.services.contains_key(&sref("c")));
}

#[test]
fn an_unchanged_reapply_or_delete_of_a_missing_object_publishes_nothing() {
    let (mut st, first) = ab();
    // New resourceVersion, annotations, managed fields, status conditions.
    st.service(Ok(Event::Apply(svc("a", "10.96.0.1", "7"))));
    let mut same = slice("a-1", Some("a"), "10.0.0.1");
    same.metadata.resource_version = Some("8".to_owned());
    st.slice(Ok(Event::Apply(same)));
    st.service(Ok(Event::Delete(svc("zz", "10.96.0.99", "1"))));
    st.node(Ok(Event::Apply(node("z1", "192.168.1.10", false))));
    // Errors and a slice that belongs to no Service change nothing either.
    st.service(Err(watcher::Error::NoResourceVersion));
    st.slice(Ok(Event::Apply(slice("orphan", None, "10.0.0.7"))));
    st.slice(Ok(Event::Delete(slice("orphan", None, "10.0.0.7"))));
    assert!(
        !st.view.dirty,
        "no-op events make the source publish nothing"
    );
    let snap = st.view.publish();
    assert!(snap.changed.is_empty());
    assert!(Arc::ptr_eq(
        &first.services[&sref("a")],
        &snap.services[&sref("a")]
    ));
    assert!(Arc::ptr_eq(
        first.slices[&sref("a")].get("a-1").unwrap(),
        snap.slices[&sref("a")].get("a-1").unwrap()
    ));
}

#[test]
fn a_slice_changes_its_owner_and_a_label_change_moves_it() {
    let (mut st, _) = ab();
    st.slice(Ok(Event::Apply(slice("a-1", Some("a"), "10.0.0.5"))));
    let snap = st.view.publish();
    assert_eq!(snap.changed, changed(&["a"]));

    // The slice's label now names b: it leaves a and joins b.
    st.slice(Ok(Event::Apply(slice("a-1", Some("b"), "10.0.0.5"))));
    let snap = st.view.publish();
    assert_eq!(snap.changed, changed(&["a", "b"]));
    assert!(!snap.slices.contains_key(&sref("a")));
    let names: Vec<&str> = snap.slices[&sref("b")].keys().collect();
    assert_eq!(names, ["a-1", "b-1"]);

    // Losing the label takes it out of b; gaining one puts it in that Service.
    st.slice(Ok(Event::Apply(slice("a-1", None, "10.0.0.5"))));
    assert_eq!(st.view.publish().changed, changed(&["b"]));
    st.slice(Ok(Event::Apply(slice("a-1", Some("c"), "10.0.0.5"))));
    let snap = st.view.publish();
    assert_eq!(snap.changed, changed(&["c"]));
    assert_eq!(snap.slice_count(), 2);

    st.slice(Ok(Event::Delete(slice("a-1", Some("c"), "10.0.0.5"))));
    let snap = st.view.publish();
    assert_eq!(snap.changed, changed(&["c"]));
    assert!(!snap.slices.contains_key(&sref("c")));
}

#[test]
fn only_node_changes_the_model_reads_change_every_service() {
    let (mut st, _) = ab();
    // The autoscaler's taint: the health endpoint reads it, the model does not.
    st.node(Ok(Event::Apply(node("z1", "192.168.1.10", true))));
    assert!(st.view.dirty, "the health endpoint needs the new Node");
    let snap = st.view.publish();
    assert!(snap.changed.is_empty());
    assert!(snap.node.as_ref().is_some_and(|n| n.spec.is_some()));

    st.node(Ok(Event::Apply(node("z2", "192.168.1.10", true))));
    assert_eq!(st.view.publish().changed, Changed::all());
    st.node(Ok(Event::Apply(node("z2", "192.168.1.11", true))));
    assert_eq!(st.view.publish().changed, Changed::all());
    // A Service change in the same batch as a Node change: all.
    st.service(Ok(Event::Apply(svc("a", "10.96.0.5", "3"))));
    st.node(Ok(Event::Delete(node("z2", "192.168.1.11", true))));
    st.service(Ok(Event::Apply(svc("b", "10.96.0.6", "3"))));
    let snap = st.view.publish();
    assert_eq!(snap.changed, Changed::all());
    assert!(snap.node.is_none());
}

#[test]
fn a_relist_changes_only_what_differs() {
    let (mut st, first) = listed(
        vec![
            svc("a", "10.96.0.1", "1"),
            svc("b", "10.96.0.2", "1"),
            svc("c", "10.96.0.3", "1"),
        ],
        vec![
            slice("a-1", Some("a"), "10.0.0.1"),
            slice("b-1", Some("b"), "10.0.0.2"),
            slice("x", Some("c"), "10.0.0.3"),
        ],
        node("z1", "192.168.1.10", false),
    );
    // After a 410: a is the same (new resource versions), b changed, c is gone, d is
    // new; the slice x moved from c to d.
    st.service(Ok(Event::Init));
    st.service(Ok(Event::InitApply(svc("a", "10.96.0.1", "50"))));
    st.service(Ok(Event::InitApply(svc("b", "10.96.0.20", "50"))));
    st.service(Ok(Event::InitApply(svc("d", "10.96.0.4", "50"))));
    st.slice(Ok(Event::Init));
    st.slice(Ok(Event::InitApply(slice("a-1", Some("a"), "10.0.0.1"))));
    st.slice(Ok(Event::InitApply(slice("b-1", Some("b"), "10.0.0.2"))));
    st.slice(Ok(Event::InitApply(slice("x", Some("d"), "10.0.0.3"))));
    assert!(!st.view.dirty, "nothing shows before a list is complete");
    st.service(Ok(Event::InitDone));
    st.slice(Ok(Event::InitDone));
    let snap = st.view.publish();
    assert_eq!(snap.changed, changed(&["b", "c", "d"]));
    let names: Vec<&str> = snap.services.keys().map(|r| &*r.name).collect();
    assert_eq!(names, ["a", "b", "d"]);
    assert!(!snap.slices.contains_key(&sref("c")));
    assert!(snap.slices[&sref("d")].get("x").is_some());
    for (svc, slice) in [("a", "a-1"), ("b", "b-1")] {
        assert!(Arc::ptr_eq(
            first.slices[&sref(svc)].get(slice).unwrap(),
            snap.slices[&sref(svc)].get(slice).unwrap()
        ));
    }
    assert!(Arc::ptr_eq(
        &first.services[&sref("a")],
        &snap.services[&sref("a")]
    ));

    // A relist that finds the same cluster publishes nothing.
    st.service(Ok(Event::Init));
    for (n, ip) in [("a", "10.96.0.1"), ("b", "10.96.0.20"), ("d", "10.96.0.4")] {
        st.service(Ok(Event::InitApply(svc(n, ip, "90"))));
    }
    st.service(Ok(Event::InitDone));
    st.node(Ok(Event::Init));
    st.node(Ok(Event::InitApply(node("z1", "192.168.1.10", false))));
    st.node(Ok(Event::InitDone));
    assert!(!st.view.dirty);
}

/// The cost of one change at 100 000 Services (one slice each): applying the event and
/// publishing the snapshot. Run by hand:
/// `cargo test --release -p svc-lb source::kube::tests::one_change_at_100k -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand in release"]
fn one_change_at_100k_services_costs_microseconds() {
    use std::time::Instant;
    const N: usize = 100_000;
    let ip = |i: usize| format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
    let build = Instant::now();
    let (mut st, first) = listed(
        (0..N).map(|i| svc(&format!("s{i}"), &ip(i), "1")).collect(),
        (0..N)
            .map(|i| {
                let name = format!("s{i}");
                slice(&format!("{name}-1"), Some(&name), &ip(i))
            })
            .collect(),
        node("z1", "192.168.1.10", false),
    );
    eprintln!(
        "initial list of {N} Services + {N} slices: {:?}",
        build.elapsed()
    );
    assert_eq!(first.services.len(), N);
    drop(first);

    // Events are decoded before the clock starts, as the watcher hands them over.
    const ROUNDS: usize = 2_000;
    let events: Vec<EndpointSlice> = (0..ROUNDS)
        .map(|r| {
            let i = r * 37 % N;
            let name = format!("s{i}");
            slice(&format!("{name}-1"), Some(&name), &ip(N + r))
        })
        .collect();
    let mut took = Vec::with_capacity(ROUNDS);
    let mut kept = Vec::new();
    for ev in events {
        let t = Instant::now();
        st.slice(Ok(Event::Apply(ev)));
        let snap = st.view.publish();
        took.push(t.elapsed());
        assert_eq!(snap.changed.services.len(), 1);
        // The agent holds the snapshot while it syncs: the next change must not copy.
        kept.push(snap);
        if kept.len() > 2 {
            kept.remove(0);
        }
    }
    took.sort();
    let p = |q: usize| took[(took.len() - 1) * q / 100];
    eprintln!(
        "one slice change + publish at {N} Services: p50 {:?}, p99 {:?}, max {:?}",
        p(50),
        p(99),
        took[took.len() - 1]
    );

    // A relist that finds every object unchanged (the 410 case).
    let relist: Vec<Service> = (0..N).map(|i| svc(&format!("s{i}"), &ip(i), "2")).collect();
    let t = Instant::now();
    st.service(Ok(Event::Init));
    for s in relist {
        st.service(Ok(Event::InitApply(s)));
    }
    st.service(Ok(Event::InitDone));
    eprintln!("relist of {N} unchanged Services: {:?}", t.elapsed());
    assert!(!st.view.dirty);
    assert!(
        p(99) < std::time::Duration::from_millis(1),
        "p99 {:?}",
        p(99)
    );
}
