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

fn names(store: &Store<Service>) -> Vec<String> {
    store.live.keys().map(|(_, n)| n.clone()).collect()
}

#[test]
fn a_list_replaces_the_store_only_when_complete() {
    let mut s = Store::new("Service", trim_service);
    assert!(!s.apply(Ok(Event::Init)));
    assert!(!s.apply(Ok(Event::InitApply(svc("a", "10.96.0.1", "1")))));
    assert!(!s.ready, "not ready before InitDone");
    assert!(s.live.is_empty(), "nothing visible before InitDone");
    assert!(s.apply(Ok(Event::InitDone)));
    assert!(s.ready);
    assert_eq!(names(&s), ["a"]);

    // A relist (after a 410) shows nothing until it is complete, then replaces.
    assert!(!s.apply(Ok(Event::Init)));
    assert!(!s.apply(Ok(Event::InitApply(svc("b", "10.96.0.2", "5")))));
    assert_eq!(names(&s), ["a"], "the old state stays during the relist");
    assert!(s.apply(Ok(Event::InitDone)));
    assert_eq!(names(&s), ["b"]);

    // A relist that finds the same objects (new resource versions) changes nothing.
    assert!(!s.apply(Ok(Event::Init)));
    assert!(!s.apply(Ok(Event::InitApply(svc("b", "10.96.0.2", "9")))));
    assert!(!s.apply(Ok(Event::InitDone)));
}

#[test]
fn updates_count_only_when_a_field_the_model_reads_changes() {
    let mut s = Store::new("Service", trim_service);
    s.apply(Ok(Event::Init));
    s.apply(Ok(Event::InitDone));
    assert!(s.apply(Ok(Event::Apply(svc("a", "10.96.0.1", "1")))));
    // New resourceVersion, annotations, managed fields and status conditions: no-op.
    assert!(!s.apply(Ok(Event::Apply(svc("a", "10.96.0.1", "2")))));
    assert!(s.apply(Ok(Event::Apply(svc("a", "10.96.0.3", "3")))));
    let kept = &s.live[&("ns".to_owned(), "a".to_owned())];
    assert_eq!(kept.metadata.resource_version, None);
    assert_eq!(kept.metadata.annotations, None);
    assert_eq!(kept.metadata.managed_fields, None);
    assert!(s.apply(Ok(Event::Delete(svc("a", "10.96.0.3", "4")))));
    assert!(!s.apply(Ok(Event::Delete(svc("a", "10.96.0.3", "4")))));
    assert!(s.live.is_empty());
}

#[test]
fn errors_keep_the_state() {
    let mut s = Store::new("Service", trim_service);
    s.apply(Ok(Event::Init));
    s.apply(Ok(Event::InitApply(svc("a", "10.96.0.1", "1"))));
    s.apply(Ok(Event::InitDone));
    assert!(!s.apply(Err(watcher::Error::NoResourceVersion)));
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
    for r in ["services", "endpointslices", "nodes"] {
        assert_eq!(resources[r], ["list", "watch"]);
    }
}
