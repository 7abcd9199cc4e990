//! Privileged end-to-end test of weighted Maglev on the external path (issue 15): a
//! LoadBalancer Service whose EndpointSlice carries `svc-lb.io/weights`, served by the
//! tc (and, with `--xdp`, XDP) programs of two nodes, each running its own agent.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test external_weights -- --test-threads=1`.
//!
//! The lab is the two-node lab of `tests/tests/external.rs` (see `tests/src/twonode.rs`):
//! pods a1, a2 on node A and b1 on node B. Weights a1=1, a2=3, b1=1 first; a long-lived
//! TCP flow to b1 is opened through node A's node port; then b1's weight drops to 0. The
//! established flow must keep b1 to its end, and new flows (one per source port, the same
//! source ports through node A and then node B) must: all succeed, never reach b1, split
//! a1:a2 as 1:3 within ±15 %, pick the same backend through either node, and pick what
//! the weighted Maglev model picks for their flow hash.
#![cfg(feature = "e2e")]

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use svc_lb::model::BackendAddr;
use svc_lb_tests::ip;
use svc_lb_tests::{
    Proto,
    checks::{addr_words, all_ok},
    manifests::{Endpoint, EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    twonode::{Node, NodeAgentOptions, POD_PORT, TwoNodeLab, client_addr, run_lab},
};

const NS: &str = "extw";
const NAME: &str = "wmag";
const FILE: &str = "wmag.yaml";
const CLUSTER_IP: &str = "10.96.80.1";
const LB_IP: &str = "10.253.0.80";
const PORT: u16 = 80;
const NODE_PORT: u16 = 30180;
/// Maglev table size of both agents (a prime; both nodes must use the same).
const MAGLEV_SIZE: u32 = 1021;
const PODS: [&str; 3] = ["a1", "a2", "b1"];
/// New flows per entry node, one per source port from [`FIRST_SPORT`].
const FLOWS: u64 = 1000;
const FIRST_SPORT: u16 = 20_000;
/// Messages of the long-lived flow, one every [`EVERY`].
const MSGS: u64 = 120;
const EVERY: Duration = Duration::from_millis(50);

/// The Service with weights for a1, a2, b1 (in [`PODS`] order).
fn manifest(lab: &TwoNodeLab, weights: [u16; 3]) -> String {
    let svc = Service::new(NS, NAME, &[ip(CLUSTER_IP)])
        .port("http", PORT, TargetPort::Number(POD_PORT), Protocol::Tcp)
        .node_port(NODE_PORT)
        .spec("type", json!("LoadBalancer"))
        .spec("externalTrafficPolicy", json!("Cluster"))
        .spec("allocateLoadBalancerNodePorts", json!(true))
        .lb_ingress(ip(LB_IP));
    let mut slice = EndpointSlice::new(NS, NAME, "v4", false).port("http", POD_PORT, Protocol::Tcp);
    for pod in PODS {
        let p = lab.net.pod(pod);
        slice = slice.endpoint(
            Endpoint::ready(p.addr(false))
                .pod(&format!("{NAME}-{pod}"))
                .node(p.node.name()),
        );
    }
    let mut slice = slice.to_value();
    let w: Vec<String> = PODS
        .iter()
        .zip(weights)
        .map(|(pod, w)| format!("{}={w}", lab.pod_addr(pod, false)))
        .collect();
    slice["metadata"]["annotations"]["svc-lb.io/weights"] = json!(w.join(","));
    yaml_docs(&[svc.to_value(), slice])
}

/// The backend the weighted Maglev model picks for each source port of the client's
/// flows to port `dport`: the contract's flow hash and permutations, Katran's weighted
/// population over the backends (`svc_lb::maglev::populate_weighted`, which the unit
/// tests check against the unweighted paper's table).
fn model(lab: &TwoNodeLab, weights: [u16; 3], dport: u16, sports: &[u16]) -> Vec<String> {
    let backends: Vec<(u32, BackendAddr, u16)> = PODS
        .iter()
        .zip(weights)
        .enumerate()
        .map(|(i, (pod, w))| {
            let addr = BackendAddr {
                addr: lab.pod_addr(pod, false),
                port: POD_PORT,
                proto: svc_lb_common::PROTO_TCP,
            };
            (i as u32 + 1, addr, w)
        })
        .collect();
    let table = svc_lb::maglev::populate_weighted(&backends, MAGLEV_SIZE);
    sports
        .iter()
        .map(|sport| {
            let h = svc_lb_common::maglev::flow_hash(
                &addr_words(client_addr(false)),
                sport.to_be(),
                dport.to_be(),
                svc_lb_common::PROTO_TCP,
            );
            PODS[table[(h % MAGLEV_SIZE) as usize] as usize - 1].to_owned()
        })
        .collect()
}

/// [`FLOWS`] new connections to the load-balancer IP through `entry`, one per source
/// port; returns the backend of each source port.
fn flows_via(lab: &TwoNodeLab, entry: Node) -> Result<BTreeMap<u16, String>> {
    let lb = ip(LB_IP);
    lab.net.route_via(lb, entry)?;
    let mut o = lab.client(SocketAddr::new(lb, PORT), Proto::Tcp);
    o.count = FLOWS;
    o.sport = Some(FIRST_SPORT);
    o.sport_step = 1;
    o.timeout = Duration::from_secs(1);
    let r = lab.run_client(&o)?;
    eprintln!("via {}: {}", entry.name(), r.summary());
    all_ok(&r, FLOWS)?;
    ensure!(
        r.by_sport.len() == FLOWS as usize,
        "one entry per source port: {} of {FLOWS}",
        r.by_sport.len()
    );
    Ok(r.by_sport.clone())
}

fn weighted_maglev(xdp: bool) {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let before = [1, 3, 1];
        let after = [1, 3, 0];
        lab.write_manifest(FILE, &manifest(lab, before))?;
        lab.start_agents(&NodeAgentOptions {
            xdp,
            extra_args: vec!["--maglev-table-size".into(), MAGLEV_SIZE.to_string()],
        })?;

        // A long-lived flow to b1 through node A's node port (node A SNATs it to node
        // B's pod): a source port the model sends to b1 under the first weights.
        let candidates: Vec<u16> = (41_000..41_200).collect();
        let picks = model(lab, before, NODE_PORT, &candidates);
        let sport = candidates
            .iter()
            .zip(&picks)
            .find(|(_, pod)| *pod == "b1")
            .map(|(p, _)| *p)
            .context("no source port in 41000..41200 hashes to b1")?;
        let mut o = lab.client(SocketAddr::new(Node::A.addr(false), NODE_PORT), Proto::Tcp);
        o.long_lived = true;
        o.count = MSGS;
        o.interval = EVERY;
        o.timeout = Duration::from_secs(1);
        o.sport = Some(sport);
        let long = lab.spawn_client(&o)?;
        std::thread::sleep(Duration::from_millis(500));

        // b1 drains: weight 0.
        lab.apply_manifest(FILE, &manifest(lab, after))?;

        let via_a = flows_via(lab, Node::A)?;
        let via_b = flows_via(lab, Node::B)?;
        let differ: Vec<_> = via_a
            .iter()
            .filter(|(port, pod)| via_b.get(*port) != Some(*pod))
            .map(|(port, pod)| (*port, pod.clone(), via_b.get(port).cloned()))
            .collect();
        ensure!(
            differ.is_empty(),
            "{} source ports chose another backend via B than via A (port, via A, via B): {:?}",
            differ.len(),
            &differ[..differ.len().min(20)]
        );
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for pod in via_a.values() {
            *counts.entry(pod.as_str()).or_default() += 1;
        }
        eprintln!("backends of {FLOWS} new flows (weights a1=1 a2=3 b1=0): {counts:?}");
        ensure!(
            !counts.contains_key("b1"),
            "b1 (weight 0) got new flows: {counts:?}"
        );
        for (pod, share) in [("a1", 0.25), ("a2", 0.75)] {
            let want = share * FLOWS as f64;
            let got = counts.get(pod).copied().unwrap_or(0) as f64;
            ensure!(
                (got - want).abs() <= 0.15 * want,
                "{pod}: {got} flows, expected {want:.0} ± 15 %: {counts:?}"
            );
        }
        let sports: Vec<u16> = via_a.keys().copied().collect();
        let want = model(lab, after, PORT, &sports);
        let mismatch: Vec<_> = sports
            .iter()
            .zip(&want)
            .filter(|(port, pod)| via_a.get(port) != Some(*pod))
            .map(|(port, pod)| (*port, via_a.get(port).cloned(), pod.clone()))
            .collect();
        ensure!(
            mismatch.is_empty(),
            "{} source ports whose backend differs from the weighted Maglev model (port, got, model): {:?}",
            mismatch.len(),
            &mismatch[..mismatch.len().min(20)]
        );

        // The established flow kept b1 through the drain, every message answered.
        let r = long.wait()?;
        eprintln!("long-lived via node A's node port: {}", r.summary());
        all_ok(&r, MSGS)?;
        ensure!(
            r.backends == BTreeMap::from([("b1".to_owned(), MSGS)]),
            "the established flow left b1: {}",
            r.summary()
        );
        Ok(())
    });
}

#[test]
fn weighted_maglev_shares_drain_and_agreement_via_either_node() {
    weighted_maglev(false);
}

#[test]
fn xdp_weighted_maglev_shares_drain_and_agreement_via_either_node() {
    weighted_maglev(true);
}
