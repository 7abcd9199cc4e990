//! Privileged end-to-end tests of draining on the external path (issue 11, item 3): an
//! established external flow (node port, load-balancer IP) keeps its backend while that
//! backend still serves, even once the Service no longer selects it; new flows go only
//! to the selected endpoints; once the backend stops serving, its flows move (UDP) or
//! are reset by the newly chosen backend (TCP).
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test external_drain -- --test-threads=1`.
//!
//! The lab is the two-node lab of `tests/tests/external.rs` (see `tests/src/twonode.rs`):
//! both backends a1 and a2 run on node A. The client reaches the node port on node A
//! (DNAT only) and the load-balancer IP through node B (DNAT + SNAT, both backends are
//! on the other node), so both kinds of external flow are covered.
#![cfg(feature = "e2e")]

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, ensure};
use serde_json::json;
use svc_lb_tests::ip;
use svc_lb_tests::{
    ClientReport, Proto,
    checks::{all_ok, backends_are, unix_ms},
    manifests::{Endpoint, EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    report::TimelineEntry,
    twonode::{Node, NodeAgentOptions, POD_PORT, TwoNodeLab, run_lab},
};

const NS: &str = "drain";
const NAME: &str = "ingress";
const FILE: &str = "ingress.yaml";
const CLUSTER_IP: &str = "10.96.70.1";
const LB_IP: &str = "10.253.0.70";
const PORT: u16 = 80;
const NODE_PORT: u16 = 30170;
/// New connections counted after each change.
const N: u64 = 30;
/// Pause between the messages of a long-lived flow.
const EVERY: Duration = Duration::from_millis(50);
/// How long the flows run while their backend is draining.
const DRAINING_FOR: Duration = Duration::from_millis(2000);

/// What a1 (the first backend) is in the EndpointSlice.
#[derive(Clone, Copy, Debug)]
enum Old {
    /// Ready; a2 is not in the slice yet.
    Only,
    /// `ready: false, serving: true, terminating: true`, with a2 ready.
    Draining,
    /// `ready: false, serving: false, terminating: true`, with a2 ready.
    NotServing,
}

/// The LoadBalancer Service (TCP and UDP on one node port) and its IPv4 slice.
fn manifest(lab: &TwoNodeLab, old: Old) -> String {
    let svc = Service::new(NS, NAME, &[ip(CLUSTER_IP)])
        .port("tcp", PORT, TargetPort::Number(POD_PORT), Protocol::Tcp)
        .node_port(NODE_PORT)
        .port("udp", PORT, TargetPort::Number(POD_PORT), Protocol::Udp)
        .node_port(NODE_PORT)
        .spec("type", json!("LoadBalancer"))
        .spec("externalTrafficPolicy", json!("Cluster"))
        .spec("allocateLoadBalancerNodePorts", json!(true))
        .lb_ingress(ip(LB_IP));
    let endpoint = |pod: &str| {
        let p = lab.net.pod(pod);
        Endpoint::ready(p.addr(false))
            .pod(&format!("{NAME}-{pod}"))
            .node(p.node.name())
    };
    let mut slice = EndpointSlice::new(NS, NAME, "v4", false)
        .port("tcp", POD_PORT, Protocol::Tcp)
        .port("udp", POD_PORT, Protocol::Udp);
    slice = match old {
        Old::Only => slice.endpoint(endpoint("a1")),
        Old::Draining => slice
            .endpoint(endpoint("a1").conditions(Some(false), Some(true), Some(true)))
            .endpoint(endpoint("a2")),
        Old::NotServing => slice
            .endpoint(endpoint("a1").conditions(Some(false), Some(false), Some(true)))
            .endpoint(endpoint("a2")),
    };
    yaml_docs(&[svc.to_value(), slice.to_value()])
}

/// `n` new connections (TCP) or datagrams from new sockets (UDP).
fn fresh(lab: &TwoNodeLab, target: SocketAddr, proto: Proto, n: u64) -> Result<ClientReport> {
    let mut o = lab.client(target, proto);
    o.count = n;
    o.timeout = Duration::from_secs(1);
    let r = lab.run_client(&o)?;
    eprintln!("new {proto} to {target}: {}", r.summary());
    Ok(r)
}

/// The entries of a timeline that ended in `[from, to)` (Unix ms).
fn between(t: &[TimelineEntry], from: u64, to: u64) -> Vec<&TimelineEntry> {
    t.iter()
        .filter(|e| e.unix_ms >= from && e.unix_ms < to)
        .collect()
}

/// Changes the slice and returns (write time, time both agents had applied it).
fn change(lab: &mut TwoNodeLab, old: Old) -> Result<(u64, u64)> {
    let yaml = manifest(lab, old);
    let t0 = unix_ms();
    lab.apply_manifest(FILE, &yaml)?;
    Ok((t0, unix_ms()))
}

fn drain(xdp: bool) {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        lab.write_manifest(FILE, &manifest(lab, Old::Only))?;
        lab.start_agents(&NodeAgentOptions {
            xdp,
            extra_args: vec!["--maglev-table-size".into(), "1021".into()],
        })?;
        let node_port = SocketAddr::new(Node::A.addr(false), NODE_PORT);
        let lb = SocketAddr::new(ip(LB_IP), PORT);
        lab.net.route_via(lb.ip(), Node::B)?;

        // Long-lived flows, all on a1 (the only backend) from their first message, kept
        // up across both changes.
        let total = DRAINING_FOR + Duration::from_secs(5);
        let flow = |target: SocketAddr, proto: Proto| {
            let mut o = lab.client(target, proto);
            o.count = 0;
            o.duration = Some(total);
            o.interval = EVERY;
            o.timeout = Duration::from_secs(1);
            o.timeline = true;
            match proto {
                Proto::Tcp => o.long_lived = true,
                _ => o.one_socket = true,
            }
            o
        };
        let tcp_np = lab.spawn_client(&flow(node_port, Proto::Tcp))?;
        let tcp_lb = lab.spawn_client(&flow(lb, Proto::Tcp))?;
        let udp_np = lab.spawn_client(&flow(node_port, Proto::Udp))?;
        std::thread::sleep(Duration::from_millis(500));

        // 1. a1 terminates but still serves; a2 is ready.
        let (a_write, a_applied) = change(lab, Old::Draining)?;
        eprintln!("draining applied after {} ms", a_applied - a_write);
        for target in [node_port, lb] {
            let r = fresh(lab, target, Proto::Tcp, N)?;
            all_ok(&r, N)?;
            ensure!(
                r.count("a2") == N,
                "new connections must all reach a2: {}",
                r.summary()
            );
        }
        let r = fresh(lab, node_port, Proto::Udp, N)?;
        all_ok(&r, N)?;
        ensure!(
            r.count("a2") == N,
            "new UDP flows must all reach a2: {}",
            r.summary()
        );
        let waited = unix_ms() - a_applied;
        let rest = DRAINING_FOR.as_millis() as u64;
        if waited < rest {
            std::thread::sleep(Duration::from_millis(rest - waited));
        }

        // 2. a1 stops serving.
        let (b_write, b_applied) = change(lab, Old::NotServing)?;
        eprintln!("not serving applied after {} ms", b_applied - b_write);
        for target in [node_port, lb] {
            let r = fresh(lab, target, Proto::Tcp, N)?;
            all_ok(&r, N)?;
            ensure!(
                r.count("a2") == N,
                "new connections must all reach a2: {}",
                r.summary()
            );
        }

        let tcp: Vec<(&str, ClientReport)> = vec![
            ("node port", tcp_np.wait()?),
            ("load-balancer IP", tcp_lb.wait()?),
        ];
        // The flows must outlive the second change by a margin, or there is nothing to see.
        let outlived = |what: &str, t: &[TimelineEntry]| {
            let last = t.last().map_or(0, |e| e.unix_ms);
            ensure!(
                last > b_applied + 1000,
                "{what}: the flow ended {} ms after a1 stopped serving; it must run ≥ 1 s past it (the changes took too long: {} ms and {} ms)",
                last as i64 - b_applied as i64,
                a_applied - a_write,
                b_applied - b_write
            );
            Ok(())
        };
        for (what, r) in &tcp {
            eprintln!("long-lived TCP via {what}: {}", r.summary());
            let t = &r.timeline;
            outlived(what, t)?;
            // Until a1 stopped serving: every message answered by a1, none lost.
            let before = between(t, 0, b_write);
            ensure!(
                before.iter().all(|e| e.outcome == "a1"),
                "{what}: a message before a1 stopped serving was not answered by a1: {before:?}"
            );
            let draining = between(t, a_applied, b_write).len() as u64;
            let want = (DRAINING_FOR.as_millis() as u64) / (EVERY.as_millis() as u64 * 2);
            ensure!(
                draining >= want,
                "{what}: only {draining} messages while a1 was draining (want ≥ {want})"
            );
            // Then the flow's next packet finds no backend entry and is chosen anew: a2
            // has no socket for it and resets it; a1 never answers again.
            let after: Vec<&TimelineEntry> = between(t, b_write, u64::MAX);
            let first_failure = after.iter().position(|e| e.outcome != "a1");
            let Some(i) = first_failure else {
                anyhow::bail!("{what}: the flow kept a1 after it stopped serving: {after:?}");
            };
            ensure!(
                after[i].unix_ms < b_applied + 500,
                "{what}: the flow was broken only {} ms after the change was applied",
                after[i].unix_ms.saturating_sub(b_applied)
            );
            // The reset is seen where the client happens to be: usually the answer to its
            // next message, or (when the segment that met a2 was the client's ACK of a1's
            // last answer) the getpeername() right after reading that answer.
            ensure!(
                matches!(
                    after[i].outcome.as_str(),
                    "recv:ECONNRESET" | "send:ECONNRESET" | "send:EPIPE" | "getpeername:ENOTCONN"
                ),
                "{what}: the flow must end with a reset, got {:?}",
                after[i]
            );
            ensure!(
                after[i + 1..].iter().all(|e| e.outcome == "session:BROKEN"),
                "{what}: answers after the reset: {after:?}"
            );
            ensure!(
                r.failed == r.failures.get("BROKEN").copied().unwrap_or(0) + 1,
                "{what}: failures other than the one reset: {}",
                r.summary()
            );
        }

        // UDP: the flow (one socket, one 5-tuple) stays on a1 while a1 serves, then
        // moves to a2 with no datagram lost.
        let r = udp_np.wait()?;
        eprintln!("UDP flow via node port: {}", r.summary());
        all_ok(&r, r.attempts)?;
        backends_are(&r, &["a1", "a2"])?;
        let t = &r.timeline;
        outlived("UDP", t)?;
        let before = between(t, 0, b_write);
        ensure!(
            before.iter().all(|e| e.outcome == "a1"),
            "UDP: a datagram before a1 stopped serving was not answered by a1: {before:?}"
        );
        let after = between(t, b_applied + 100, u64::MAX);
        ensure!(
            after.len() >= 10 && after.iter().all(|e| e.outcome == "a2"),
            "UDP: after a1 stopped serving the flow must move to a2: {after:?}"
        );
        Ok(())
    });
}

#[test]
fn external_flows_keep_a_draining_backend_and_move_once_it_stops_serving() {
    drain(false);
}

#[test]
fn xdp_external_flows_keep_a_draining_backend_and_move_once_it_stops_serving() {
    drain(true);
}
