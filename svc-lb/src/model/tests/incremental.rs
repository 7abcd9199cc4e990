//! [`Cache`] against full builds: random edit sequences (the proptest), the contest
//! rules between Services step by step, and a measurement at 10 000 and 100 000
//! Services.
use std::{sync::Arc, time::Instant};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proptest::prelude::*;
use serde_json::json;

use super::super::{Cache, NodeInfo, ServiceRef, build};
use crate::{
    fuzzing::{check_incremental, model_edits},
    source::{Changed, Snapshot},
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// After every step of a random edit sequence the cache equals a full build, its
    /// errors too, and it touched every frontend that changed.
    #[test]
    fn incremental_equals_full_build(data in proptest::collection::vec(any::<u8>(), 0..6000)) {
        model_edits(&data);
    }
}

fn service(name: &str, ip: &str, extra: serde_json::Value) -> Service {
    let mut spec = json!({"clusterIP": ip, "ports": [{"name": "http", "port": 80}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .expect("test Service")
}

fn slice(service: &str, name: &str, addrs: &[String]) -> EndpointSlice {
    let endpoints: Vec<_> = addrs.iter().map(|a| json!({"addresses": [a]})).collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }))
    .expect("test slice")
}

fn sref(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "default".into(),
        name: name.into(),
    }
}

/// Applies `edit` as one snapshot, checks the cache and returns the owner of each
/// frontend.
fn step(
    cache: &mut Cache,
    snap: &mut Snapshot,
    node: &NodeInfo,
    edit: impl FnOnce(&mut Snapshot),
) -> Vec<String> {
    snap.changed = Changed::default();
    edit(snap);
    let full = build(snap, node).0;
    check_incremental(cache, snap, node, &full);
    cache
        .desired()
        .frontends
        .iter()
        .map(|(k, fe)| format!("{}:{} {}", k.addr, k.port, fe.service.name))
        .collect()
}

fn put(snap: &mut Snapshot, svc: Service) {
    let svc = crate::source::compact_service(svc);
    let r = crate::source::service_ref(&svc);
    snap.services.insert(r.clone(), Arc::new(svc));
    snap.changed.services.insert(r);
}

/// A chain of cluster-IP contests: a (first) holds 10.96.0.1; b wants 10.96.0.1 and
/// 10.96.0.2 and so loses whole; c holds 10.96.0.2. Removing a lets b win both, which
/// takes 10.96.0.2 from c, though neither b nor c changed.
#[test]
fn a_change_re_decides_the_contests_it_reaches() {
    let node = NodeInfo::default();
    let mut cache = Cache::default();
    let mut snap = Snapshot {
        changed: Changed::all(),
        ..Snapshot::default()
    };
    let two = json!({"clusterIPs": ["10.96.0.1", "10.96.0.2"]});
    let got = step(&mut cache, &mut snap, &node, |s| {
        put(s, service("a", "10.96.0.1", json!({})));
        put(s, service("b", "10.96.0.1", two.clone()));
        put(s, service("c", "10.96.0.2", json!({})));
        s.changed = Changed::all();
    });
    assert_eq!(got, ["10.96.0.1:80 a", "10.96.0.2:80 c"]);
    let got = step(&mut cache, &mut snap, &node, |s| {
        s.services.remove(&sref("a"));
        s.changed.services.insert(sref("a"));
    });
    assert_eq!(got, ["10.96.0.1:80 b", "10.96.0.2:80 b"]);
    assert_eq!(cache.errors_of(&sref("c")).len(), 1, "c lost its address");
    // And back: a returns and takes its address again, c gets its own back.
    let got = step(&mut cache, &mut snap, &node, |s| {
        put(s, service("a", "10.96.0.1", json!({})));
    });
    assert_eq!(got, ["10.96.0.1:80 a", "10.96.0.2:80 c"]);
}

/// A load-balancer IP of one Service beats an external IP of an earlier one; when the
/// load-balancer IP goes away, the external IP is programmed, and back.
#[test]
fn a_load_balancer_ip_released_goes_to_the_external_ip_that_wanted_it() {
    let node = NodeInfo::default();
    let mut cache = Cache::default();
    let mut snap = Snapshot {
        changed: Changed::all(),
        ..Snapshot::default()
    };
    let lb = |ip: Option<&str>| {
        let mut svc = service("b", "10.96.0.2", json!({"type": "LoadBalancer"}));
        if let Some(ip) = ip {
            svc.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": ip}]}}))
                .expect("status");
        }
        svc
    };
    let got = step(&mut cache, &mut snap, &node, |s| {
        put(
            s,
            service("a", "10.96.0.1", json!({"externalIPs": ["203.0.113.1"]})),
        );
        put(s, lb(Some("203.0.113.1")));
        s.changed = Changed::all();
    });
    assert_eq!(
        got,
        ["10.96.0.1:80 a", "10.96.0.2:80 b", "203.0.113.1:80 b"]
    );
    let got = step(&mut cache, &mut snap, &node, |s| put(s, lb(None)));
    assert_eq!(
        got,
        ["10.96.0.1:80 a", "10.96.0.2:80 b", "203.0.113.1:80 a"]
    );
    let got = step(&mut cache, &mut snap, &node, |s| {
        put(s, lb(Some("203.0.113.1")))
    });
    assert_eq!(
        got,
        ["10.96.0.1:80 a", "10.96.0.2:80 b", "203.0.113.1:80 b"]
    );
}

fn large(n: u32) -> Snapshot {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let name = format!("svc-{i}");
        let ip = format!("10.{}.{}.{}", 96 + (i >> 16), (i >> 8) & 255, i & 255);
        services.push(service(&name, &ip, json!({})));
        let addrs: Vec<String> = (0..3)
            .map(|e| {
                format!(
                    "10.{}.{}.{}",
                    128 + (i >> 14),
                    (i >> 6) & 255,
                    (i & 63) * 4 + e
                )
            })
            .collect();
        slices.push(slice(&name, &format!("{name}-1"), &addrs));
    }
    Snapshot::from_lists(services, slices)
}

/// Run by hand: `cargo test --release -p svc-lb large_cluster_update -- --ignored
/// --nocapture`. Prints the cost of a full build and of one changed Service.
#[test]
#[ignore = "a measurement, run by hand"]
fn large_cluster_update() {
    let node = NodeInfo {
        name: Some("n1".into()),
        ..NodeInfo::default()
    };
    for n in [10_000u32, 100_000] {
        let mut snap = large(n);
        let t = Instant::now();
        let (full, errors) = build(&snap, &node);
        let full_build = t.elapsed();
        assert!(errors.is_empty());
        assert_eq!(full.frontends.len(), n as usize);
        let mut cache = Cache::default();
        let t = Instant::now();
        cache.update(&snap, &node);
        let first = t.elapsed();
        const ROUNDS: u32 = 1000;
        let mut total = std::time::Duration::ZERO;
        let mut worst = std::time::Duration::ZERO;
        for r in 0..ROUNDS {
            let i = r * 7919 % n;
            let name = format!("svc-{i}");
            let addrs = vec![format!("10.250.{}.{}", r >> 8, r & 255)];
            snap.changed = Changed::default();
            snap.insert_slice(Arc::new(slice(&name, &format!("{name}-1"), &addrs).into()));
            snap.changed.services.insert(sref(&name));
            let t = Instant::now();
            let touched = cache.update(&snap, &node);
            let took = t.elapsed();
            total += took;
            worst = worst.max(took);
            assert_eq!(touched.frontends.len(), 1);
        }
        assert_eq!(cache.desired(), &build(&snap, &node).0);
        println!(
            "{n} Services: full build {full_build:?}, first update {first:?}, one changed Service: mean {:?}, worst {worst:?} over {ROUNDS}",
            total / ROUNDS
        );
    }
}
