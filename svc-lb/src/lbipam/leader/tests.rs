use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use serde_json::json;

use super::*;
use crate::source::metallb::IPAddressPool;

fn wall(secs: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + secs).expect("a timestamp")
}

fn lease(holder: &str, renew: i64) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(LEASE_NAME.into()),
            resource_version: Some("7".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(wall(renew))),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }),
    }
}

fn holder(step: &Step) -> Option<&str> {
    match step {
        Step::Create(l) | Step::Update(l) => l.spec.as_ref()?.holder_identity.as_deref(),
        Step::Wait => None,
    }
}

#[test]
fn a_missing_lease_is_created_held_by_us() {
    let mut e = Elector::new("n1".into());
    let t0 = Instant::now();
    let step = e.step(None, t0, wall(0));
    let Step::Create(l) = &step else {
        panic!("expected a create: {step:?}")
    };
    let spec = l.spec.as_ref().expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("n1"));
    assert_eq!(spec.lease_transitions, Some(0));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert!(!e.leading(t0), "not before the write succeeded");
    e.wrote(t0);
    assert!(e.leading(t0));
    assert!(e.leading(t0 + RENEW_DEADLINE - Duration::from_millis(1)));
    assert!(
        !e.leading(t0 + RENEW_DEADLINE),
        "a leader that cannot renew stops"
    );
}

#[test]
fn a_live_lease_is_left_alone_and_an_unrenewed_one_taken_over_after_its_duration() {
    let mut e = Elector::new("n2".into());
    let t0 = Instant::now();
    assert_eq!(e.step(Some(&lease("n1", 0)), t0, wall(0)), Step::Wait);
    // Renewed at 5 s: the clock restarts from that sight.
    let t5 = t0 + Duration::from_secs(5);
    assert_eq!(e.step(Some(&lease("n1", 5)), t5, wall(5)), Step::Wait);
    // 14.9 s after the last renewal was seen: still n1's.
    let almost = t5 + LEASE_DURATION - Duration::from_millis(100);
    assert_eq!(e.step(Some(&lease("n1", 5)), almost, wall(19)), Step::Wait);
    assert_eq!(
        e.expires(),
        Some(t5 + LEASE_DURATION),
        "read again when it expires"
    );
    // 15 s: taken over, keeping the resourceVersion read (a race loses with 409).
    let step = e.step(Some(&lease("n1", 5)), t5 + LEASE_DURATION, wall(20));
    let Step::Update(l) = &step else {
        panic!("expected a takeover: {step:?}")
    };
    assert_eq!(holder(&step), Some("n2"));
    assert_eq!(l.metadata.resource_version.as_deref(), Some("7"));
    let spec = l.spec.as_ref().expect("spec");
    assert_eq!(spec.lease_transitions, Some(4));
    assert_eq!(spec.renew_time, Some(MicroTime(wall(20))));
}

#[test]
fn our_own_lease_is_renewed_without_a_transition() {
    let mut e = Elector::new("n1".into());
    let t0 = Instant::now();
    let step = e.step(Some(&lease("n1", 0)), t0, wall(3));
    let Step::Update(l) = &step else {
        panic!("expected a renewal: {step:?}")
    };
    let spec = l.spec.as_ref().expect("spec");
    assert_eq!(spec.lease_transitions, Some(3));
    assert_eq!(spec.renew_time, Some(MicroTime(wall(3))));
    e.wrote(t0);
    // Someone else took it (we were partitioned): no longer leading at once.
    assert_eq!(e.step(Some(&lease("n9", 4)), t0, wall(4)), Step::Wait);
    assert!(!e.leading(t0));
}

#[test]
fn an_empty_holder_is_taken_at_once() {
    let mut e = Elector::new("n2".into());
    let step = e.step(Some(&lease("", 0)), Instant::now(), wall(0));
    assert!(matches!(step, Step::Update(_)));
    assert_eq!(holder(&step), Some("n2"));
}

#[test]
fn a_released_lease_has_no_holder_and_the_next_agent_takes_it_at_once() {
    let t0 = Instant::now();
    let mut n1 = Elector::new("n1".into());
    let Step::Update(mine) = n1.step(Some(&lease("n1", 0)), t0, wall(1)) else {
        panic!("n1 renews its own Lease")
    };
    n1.wrote(t0);
    assert!(n1.leading(t0));
    let released = n1.released(mine, wall(2));
    assert!(!n1.leading(t0), "no longer leads once it let go");
    let spec = released.spec.as_ref().expect("spec");
    assert_eq!(spec.holder_identity, None);
    assert_eq!(spec.lease_duration_seconds, Some(1));
    assert_eq!(
        spec.lease_transitions,
        Some(3),
        "a release is no transition"
    );
    // n2 had seen n1's Lease renewed a moment ago: it still takes the released one now.
    let mut n2 = Elector::new("n2".into());
    assert_eq!(n2.step(Some(&lease("n1", 1)), t0, wall(1)), Step::Wait);
    let step = n2.step(Some(&released), t0 + Duration::from_millis(10), wall(2));
    assert!(matches!(step, Step::Update(_)), "{step:?}");
    assert_eq!(holder(&step), Some("n2"));
}

fn pool() -> Arc<IPAddressPool> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": "edge", "namespace": "metallb-system"},
            "spec": {"addresses": ["10.253.1.10-10.253.1.11"]},
        }))
        .expect("a pool"),
    )
}

fn svc(name: &str, spec: serde_json::Value, ingress: &[&str]) -> Service {
    let ingress: Vec<_> = ingress.iter().map(|ip| json!({"ip": ip})).collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns"},
        "spec": spec,
        "status": {"loadBalancer": {"ingress": ingress}},
    }))
    .expect("a service")
}

fn lb() -> serde_json::Value {
    json!({"type": "LoadBalancer", "ports": [{"port": 80}], "ipFamilies": ["IPv4"]})
}

fn writes(services: Vec<Service>) -> Vec<(String, Vec<String>)> {
    let mut snap = Snapshot::from_lists(services, Vec::new());
    let p = pool();
    snap.pools.insert(
        crate::model::ObjectRef {
            kind: "IPAddressPool".into(),
            namespace: "metallb-system".into(),
            name: "edge".into(),
        },
        p,
    );
    let mut ipam = Ipam::default();
    let pools = ipam.observe(&snap);
    let alloc = ipam.last.clone().expect("an allocation");
    status_writes(&snap, &alloc, &pools)
        .into_iter()
        .map(|(s, ips)| {
            (
                s.name.to_string(),
                ips.iter().map(|i| i.to_string()).collect(),
            )
        })
        .collect()
}

#[test]
fn the_leader_writes_only_statuses_that_differ() {
    // New Services in name order; one that already has an address keeps it.
    let got = writes(vec![svc("a", lb(), &[]), svc("b", lb(), &["10.253.1.10"])]);
    assert_eq!(got, vec![("a".to_owned(), vec!["10.253.1.11".to_owned()])]);
    // Nothing to write when the statuses say what the allocation says.
    let got = writes(vec![
        svc("a", lb(), &["10.253.1.11"]),
        svc("b", lb(), &["10.253.1.10"]),
    ]);
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn a_service_that_stops_being_a_load_balancer_is_released_but_foreign_ones_are_left_alone() {
    let cluster_ip = json!({"type": "ClusterIP", "ports": [{"port": 80}]});
    let foreign = json!({"type": "LoadBalancer", "loadBalancerClass": "other.io/lb", "ports": [{"port": 80}]});
    let got = writes(vec![
        svc("was-lb", cluster_ip, &["10.253.1.10"]),
        svc("foreign", foreign, &["10.253.1.11"]),
        // An address outside the pools was given by someone else: left alone too.
        svc("elsewhere", lb(), &["192.0.2.1"]),
    ]);
    assert_eq!(got, vec![("was-lb".to_owned(), Vec::new())]);
}

#[test]
fn a_pending_service_loses_a_conflicting_pool_address() {
    // Both claim .10 in their status; "a" sorts first and keeps it, "b" has no
    // allow-shared-ip key, so it moves to the free .11.
    let got = writes(vec![
        svc("a", lb(), &["10.253.1.10"]),
        svc("b", lb(), &["10.253.1.10"]),
    ]);
    assert_eq!(got, vec![("b".to_owned(), vec!["10.253.1.11".to_owned()])]);
    // With a third claimant the pool is exhausted: "c" is pending and cleared.
    let got = writes(vec![
        svc("a", lb(), &["10.253.1.10"]),
        svc("b", lb(), &["10.253.1.11"]),
        svc("c", lb(), &["10.253.1.10"]),
    ]);
    assert_eq!(got, vec![("c".to_owned(), Vec::new())]);
}

#[test]
fn the_patch_sets_or_clears_the_ingress() {
    let ip: IpAddr = "10.253.1.10".parse().expect("ip");
    assert_eq!(
        status_patch(&[ip]),
        json!({"status": {"loadBalancer": {"ingress": [{"ip": "10.253.1.10", "ipMode": "VIP"}]}}})
    );
    assert_eq!(
        status_patch(&[]),
        json!({"status": {"loadBalancer": {"ingress": null}}})
    );
}
