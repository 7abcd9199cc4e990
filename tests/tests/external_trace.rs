//! Privileged end-to-end test of `svc-lb trace --external`: what the CLI predicts from
//! node A's pinned maps is what real packets from the external client get through node
//! A's tc programs.
//!
//! Run as root: `cargo test --release -p svc-lb-tests --features e2e --test external_trace
//! -- --test-threads=1`. A missing tool, capability or binary fails the test.
//!
//! The two-node lab (`tests/src/twonode.rs`): pods a1, a2 on node A and b1 on node B,
//! one agent per node. For each fixed client source port, `trace --external` is run
//! first (the flow has no conntrack entry yet, so the trace makes the choice the
//! programs will make), then a real TCP connection from that source port through node
//! A says which pod answered; both must agree for every port. After the connections
//! the same traces must report the flows' conntrack entries with the same backends. A
//! Service with no endpoints must be predicted "reject" and refuse real connections; a
//! source outside loadBalancerSourceRanges must be predicted "drop" and get no answer.
#![cfg(feature = "e2e")]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use svc_lb_tests::ip;
use svc_lb_tests::{
    Proto,
    checks::all_failed,
    manifests::{Endpoint, EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    twonode::{Node, NodeAgentOptions, POD_PORT, TwoNodeLab, client_addr, run_lab},
};

const NS: &str = "xtr";
const MAGLEV_SIZE: &str = "1021";
/// Source ports traced and connected per frontend.
const PORTS: u16 = 24;
/// Attempts expected to fail (each dropped one costs a full timeout).
const N_FAIL: u64 = 10;
const DROP_TIMEOUT: Duration = Duration::from_millis(300);

/// [`run_lab`] for this file's tests.
fn with_lab(body: impl FnOnce(&mut TwoNodeLab) -> Result<()>) {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), body);
}

/// A LoadBalancer Service (TCP `port`, node port `node_port`) on `lb` with ready
/// endpoints `pods`, and its EndpointSlice.
fn lb_service(
    lab: &TwoNodeLab,
    name: &str,
    cluster: &str,
    (port, node_port): (u16, u16),
    lb: &str,
    pods: &[&str],
    source_ranges: &[&str],
) -> String {
    let mut svc = Service::new(NS, name, &[ip(cluster)])
        .port("http", port, TargetPort::Number(POD_PORT), Protocol::Tcp)
        .node_port(node_port)
        .spec("type", json!("LoadBalancer"))
        .spec("externalTrafficPolicy", json!("Cluster"))
        .spec("allocateLoadBalancerNodePorts", json!(true))
        .lb_ingress(ip(lb));
    if !source_ranges.is_empty() {
        svc = svc.spec("loadBalancerSourceRanges", json!(source_ranges));
    }
    let mut slice = EndpointSlice::new(NS, name, "v4", false).port("http", POD_PORT, Protocol::Tcp);
    for pod in pods {
        let p = lab.net.pod(pod);
        slice = slice.endpoint(
            Endpoint::ready(p.addr(false))
                .pod(&format!("{name}-{pod}"))
                .node(p.node.name()),
        );
    }
    yaml_docs(&[svc.to_value(), slice.to_value()])
}

/// `svc-lb trace --external -o json` against node A's pins.
fn trace(lab: &TwoNodeLab, from: SocketAddr, to: SocketAddr) -> Result<Value> {
    let out = Command::new(&lab.bins.svc_lb)
        .args(["trace", "--external", "-o", "json", "--bpffs"])
        .arg(lab.bpffs(Node::A))
        .args(["--from", &from.to_string(), "--to", &to.to_string()])
        .output()
        .context("run svc-lb trace --external")?;
    ensure!(
        out.status.success(),
        "svc-lb trace --external --from {from} --to {to} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "trace output is not JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The pod whose address the trace's verdict names, and how it was chosen.
fn predicted(lab: &TwoNodeLab, t: &Value) -> Result<(String, String)> {
    ensure!(
        t["verdict"]["action"] == "forward",
        "expected a forward verdict: {t:#}"
    );
    let b = &t["verdict"]["backend"];
    let addr: IpAddr = b["address"]
        .as_str()
        .with_context(|| format!("no backend address: {t:#}"))?
        .parse()?;
    ensure!(b["port"] == json!(POD_PORT), "backend port: {b}");
    let pod = ["a1", "a2", "b1"]
        .into_iter()
        .find(|p| lab.pod_addr(p, false) == addr)
        .with_context(|| format!("the predicted backend {addr} is no pod of the lab"))?;
    let via = b["via"].as_str().unwrap_or("").to_owned();
    Ok((pod.to_owned(), via))
}

#[test]
fn trace_external_predicts_what_real_flows_get_through_node_a() {
    with_lab(|lab| {
        let web = lb_service(
            lab,
            "tweb",
            "10.96.60.1",
            (80, 30130),
            "10.253.1.10",
            &["a1", "a2", "b1"],
            &[],
        );
        let empty = lb_service(
            lab,
            "tempty",
            "10.96.60.2",
            (80, 30131),
            "10.253.1.20",
            &[],
            &[],
        );
        // TEST-NET-1 does not contain the client.
        let ranged = lb_service(
            lab,
            "tranged",
            "10.96.60.3",
            (80, 30132),
            "10.253.1.30",
            &["a1"],
            &["192.0.2.0/24"],
        );
        for (file, yaml) in [
            ("tweb.yaml", &web),
            ("tempty.yaml", &empty),
            ("tranged.yaml", &ranged),
        ] {
            lab.write_manifest(file, yaml)?;
        }
        lab.start_agents(&NodeAgentOptions {
            xdp: false,
            extra_args: vec!["--maglev-table-size".into(), MAGLEV_SIZE.into()],
        })?;
        for lb in ["10.253.1.10", "10.253.1.20", "10.253.1.30"] {
            lab.net.route_via(ip(lb), Node::A)?;
        }
        let client = client_addr(false);

        // The NodePort at node A's address (a node-address match) and the LB IP (an
        // exact match); a separate source-port range each.
        let frontends = [
            (SocketAddr::new(Node::A.addr(false), 30130), 41_000u16),
            (SocketAddr::new(ip("10.253.1.10"), 80), 42_000u16),
        ];
        let mut agreed = 0u32;
        let mut ct_agreed = 0u32;
        for (target, first) in frontends {
            let mut predictions: BTreeMap<u16, String> = BTreeMap::new();
            for port in first..first + PORTS {
                let t = trace(lab, SocketAddr::new(client, port), target)?;
                let (pod, via) = predicted(lab, &t)?;
                ensure!(via == "maglev", "a new flow is chosen by Maglev: {t:#}");
                ensure!(
                    t["conntrack"].is_null(),
                    "no conntrack entry before the first packet: {t:#}"
                );
                if target.port() == 30130 {
                    ensure!(
                        t["frontend"]["node_address"] == json!(Node::A.addr(false).to_string())
                            && t["frontend"]["address"] == "0.0.0.0",
                        "the NodePort entry must match through node A's address: {t:#}"
                    );
                }
                // A pod on node B is reached with SNAT, node A's own pods without.
                let snat = t["verdict"]["nat"]["snat"] == json!(true);
                ensure!(
                    snat == (pod == "b1"),
                    "SNAT exactly for the remote pod: {pod}, {t:#}"
                );
                predictions.insert(port, pod);
            }
            let spread: BTreeSet<&str> = predictions.values().map(String::as_str).collect();
            ensure!(
                spread.len() >= 2,
                "{PORTS} source ports should spread over several backends: {predictions:?}"
            );

            let mut o = lab.client(target, Proto::Tcp);
            o.count = u64::from(PORTS);
            o.sport = Some(first);
            o.sport_step = 1;
            o.timeout = Duration::from_secs(1);
            let r = lab.run_client(&o)?;
            eprintln!("{target}: {}", r.summary());
            ensure!(
                r.attempts == u64::from(PORTS) && r.ok == u64::from(PORTS) && r.failed == 0,
                "expected {PORTS} answers and 0 failures: {}",
                r.summary()
            );
            ensure!(
                r.by_sport.len() == usize::from(PORTS),
                "one answer per source port: {:?}",
                r.by_sport
            );
            let differ: Vec<_> = predictions
                .iter()
                .filter(|(port, pod)| r.by_sport.get(*port) != Some(*pod))
                .map(|(port, pod)| (*port, pod.clone(), r.by_sport.get(port).cloned()))
                .collect();
            ensure!(
                differ.is_empty(),
                "{target}: source ports whose real backend differs from the trace (port, predicted, real): {differ:?}"
            );
            agreed += u32::from(PORTS);

            // The flows are in conntrack now (closing, 10 s): the trace must say so and
            // name the same backend.
            for port in first..first + PORTS {
                let t = trace(lab, SocketAddr::new(client, port), target)?;
                let (pod, via) = predicted(lab, &t)?;
                ensure!(
                    via == "conntrack" && t["conntrack"]["state"] == "established",
                    "port {port}: the flow's conntrack entry must decide: {t:#}"
                );
                ensure!(
                    pod == predictions[&port],
                    "port {port}: conntrack names {pod}, the first trace {}",
                    predictions[&port]
                );
                ct_agreed += 1;
            }
        }
        ensure!(
            (agreed, ct_agreed) == (2 * u32::from(PORTS), 2 * u32::from(PORTS)),
            "checked {agreed} predictions and {ct_agreed} conntrack traces"
        );
        eprintln!(
            "{agreed} predicted backends matched the real connections, {ct_agreed} conntrack traces matched"
        );

        // No endpoints: predicted reject, and real connections are refused.
        let target = SocketAddr::new(ip("10.253.1.20"), 80);
        let t = trace(lab, SocketAddr::new(client, 43_000), target)?;
        ensure!(
            t["verdict"]["action"] == "reject"
                && t["verdict"]["reason"] == "ext_rejected_no_backend",
            "a Service without endpoints must be predicted reject: {t:#}"
        );
        let mut o = lab.client(target, Proto::Tcp);
        o.count = N_FAIL;
        o.timeout = Duration::from_secs(1);
        let r = lab.run_client(&o)?;
        eprintln!("{target}: {}", r.summary());
        all_failed(&r, N_FAIL, "ECONNREFUSED")?;

        // Outside loadBalancerSourceRanges: predicted drop, and real connections get no
        // answer at all.
        let target = SocketAddr::new(ip("10.253.1.30"), 80);
        let t = trace(lab, SocketAddr::new(client, 43_001), target)?;
        ensure!(
            t["verdict"]["action"] == "drop"
                && t["verdict"]["reason"] == "ext_dropped_source_range"
                && t["source_ranges"]["allowed"] == json!(false),
            "a source outside the ranges must be predicted drop: {t:#}"
        );
        let mut o = lab.client(target, Proto::Tcp);
        o.count = N_FAIL;
        o.timeout = DROP_TIMEOUT;
        let r = lab.run_client(&o)?;
        eprintln!("{target}: {}", r.summary());
        all_failed(&r, N_FAIL, "TIMEOUT")?;
        Ok(())
    });
}
