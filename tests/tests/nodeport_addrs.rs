//! Privileged end-to-end tests of `--nodeport-addresses` and `--nodeport-localhost`: one
//! rule decides which node addresses serve node ports, for clients on the node (the
//! socket programs) and for clients outside it (tc on the node's device) alike.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test nodeport_addrs -- --test-threads=1`.
//!
//! - Manifest mode, in the two-node lab (`tests/src/twonode.rs`): node A gets a second
//!   address of each family on its LAN device, outside the CIDRs given. Three kinds of
//!   client dial both: a host process on node A (node A's namespace and cgroup), a pod on
//!   node A (its own namespace, node A's cgroup) and the external client on the LAN.
//! - Kubernetes mode, in the single-node lab with the fake API server: the Node's
//!   InternalIP and ExternalIP are owned by no one, so only the socket programs can make
//!   them answer, and `primary` or a CIDR decides which of the two does.
//!
//! Every measurement states how many attempts answered, from which backends, and with
//! which errno the others failed.
#![cfg(feature = "e2e")]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use svc_lb_tests::ip;
use svc_lb_tests::{
    Bins, ClientReport, Lab, Proto,
    agent::Agent,
    checks::{all_failed, all_ok, backends_are},
    fakeapi::FakeApi,
    lab::isolated,
    manifests::{EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    procs::ClientOpts,
    twonode::{Node, POD_PORT, TwoNodeLab, run_lab},
};

const NS: &str = "npaddr";
/// Attempts per measurement.
const N: u64 = 20;
const NODE_PORT: u16 = 30400;
/// Inside the CIDRs of the first agent (10.250.0.0/28, fd00:250::/124) are node A's
/// (.1) and node B's (.2) LAN addresses; this second address of node A is outside them.
const OUTSIDE4: &str = "10.250.0.21";
const OUTSIDE6: &str = "fd00:250::21";

fn sa(addr: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(addr, port)
}

fn outside(v6: bool) -> IpAddr {
    ip(if v6 { OUTSIDE6 } else { OUTSIDE4 })
}

fn loopback(v6: bool) -> IpAddr {
    ip(if v6 { "::1" } else { "127.0.0.1" })
}

/// A dual-stack NodePort Service (TCP 80, node port [`NODE_PORT`]) on pods a1, a2 and b1.
fn nodeport_yaml(lab: &TwoNodeLab) -> String {
    let svc = Service::new(NS, "np", &[ip("10.96.60.1"), ip("fd00:96::60:1")])
        .port("http", 80, TargetPort::Number(POD_PORT), Protocol::Tcp)
        .node_port(NODE_PORT)
        .spec("type", json!("NodePort"));
    let mut docs = vec![svc.to_value()];
    for v6 in [false, true] {
        let slice = lab.pod_slice(
            NS,
            "np",
            v6,
            &[("http", Protocol::Tcp)],
            &["a1", "a2", "b1"],
        );
        docs.push(slice.to_value());
    }
    yaml_docs(&docs)
}

/// Who dials: a host process on node A, a pod on node A, or the external client.
#[derive(Clone, Copy, Debug)]
enum From {
    HostA,
    PodA1,
    Outside,
}

fn opts(lab: &TwoNodeLab, from: From, target: SocketAddr) -> ClientOpts {
    match from {
        From::HostA => {
            let mut o = ClientOpts::new(target, Proto::Tcp);
            o.netns = Some(lab.net.node(Node::A).name().to_owned());
            o.cgroup = Some(lab.cgroup(Node::A).to_path_buf());
            o
        }
        From::PodA1 => lab.pod_client("a1", target, Proto::Tcp),
        From::Outside => lab.client(target, Proto::Tcp),
    }
}

fn run(lab: &TwoNodeLab, from: From, target: SocketAddr) -> Result<ClientReport> {
    let mut o = opts(lab, from, target);
    o.count = N;
    o.timeout = Duration::from_secs(1);
    let r = lab.run_client(&o)?;
    eprintln!("{from:?} -> {target}: {}", r.summary());
    Ok(r)
}

/// Every attempt reaches the Service's pods.
fn served(lab: &TwoNodeLab, from: From, target: SocketAddr) -> Result<()> {
    let r = run(lab, from, target)?;
    all_ok(&r, N).with_context(|| format!("{from:?} -> {target} must be served"))?;
    backends_are(&r, &["a1", "a2", "b1"]).with_context(|| format!("{from:?} -> {target}"))
}

/// Every attempt is refused by node A's own stack: the address is node A's, nothing
/// listens on the node port there, and no program rewrote the connection.
fn refused(lab: &TwoNodeLab, from: From, target: SocketAddr) -> Result<()> {
    let r = run(lab, from, target)?;
    all_failed(&r, N, "ECONNREFUSED")
        .with_context(|| format!("{from:?} -> {target} must not be a node port"))
}

/// Stops node A's agent and starts another on the same pins with `args` (node B's agent
/// keeps running).
fn restart_a(lab: &mut TwoNodeLab, args: &[&str]) -> Result<()> {
    let mut old = lab.take_agent(Node::A).context("node A's agent")?;
    old.terminate(Duration::from_secs(5))?;
    let mut config = old.config().clone();
    drop(old);
    config.log_file = lab.next_agent_log(Node::A);
    config.extra_args = ["--devices", "eth0", "--node-name", Node::A.name()]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect();
    lab.start_agent_with(Node::A, config)?;
    Ok(())
}

/// CIDRs, then `primary` with `--nodeport-localhost`: for each rule, a node address it
/// keeps answers on the node port to host processes, pods and outside clients, one it
/// leaves out is refused to all three, and 127.0.0.1/::1 answer only with the option.
#[test]
fn one_rule_for_local_and_external_clients() {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        for v6 in [false, true] {
            let plen = if v6 { 64 } else { 24 };
            lab.net.node(Node::A).add_addr("eth0", outside(v6), plen)?;
        }
        lab.write_manifest("np.yaml", &nodeport_yaml(lab))?;
        lab.start_agents(&svc_lb_tests::twonode::NodeAgentOptions {
            xdp: false,
            extra_args: vec![
                "--nodeport-addresses".into(),
                "10.250.0.0/28,fd00:250::/124".into(),
            ],
        })?;
        // Before any agent change: the second address is node A's own (the stack answers
        // it), and loopback node ports are off by default.
        for v6 in [false, true] {
            for from in [From::HostA, From::PodA1, From::Outside] {
                served(lab, from, sa(Node::A.addr(v6), NODE_PORT))?;
                refused(lab, from, sa(outside(v6), NODE_PORT))?;
            }
            refused(lab, From::HostA, sa(loopback(v6), NODE_PORT))?;
        }

        // `primary` (given with --node-ip: in manifest mode the device's first IPv6
        // address would be the newest one, the test's second address) and localhost on.
        restart_a(
            lab,
            &[
                "--nodeport-addresses",
                "primary",
                "--node-ip",
                "10.250.0.1,fd00:250::1",
                "--nodeport-localhost",
            ],
        )?;
        for v6 in [false, true] {
            for from in [From::HostA, From::PodA1, From::Outside] {
                served(lab, from, sa(Node::A.addr(v6), NODE_PORT))?;
                refused(lab, from, sa(outside(v6), NODE_PORT))?;
            }
            served(lab, From::HostA, sa(loopback(v6), NODE_PORT))?;
        }

        // Every address of the node, no localhost: the second address answers now, on
        // both paths, and loopback is off again.
        restart_a(lab, &[])?;
        for v6 in [false, true] {
            for from in [From::HostA, From::Outside] {
                served(lab, from, sa(outside(v6), NODE_PORT))?;
            }
            refused(lab, From::HostA, sa(loopback(v6), NODE_PORT))?;
        }
        Ok(())
    });
}

// ---- Kubernetes mode: the Node's addresses ----

const KNODE: &str = "node-1";
/// The Node's InternalIP (its primary address) and ExternalIP. Nothing in the lab owns
/// them: a connection no program rewrites fails in the client with ENETUNREACH.
const INTERNAL_IP: &str = "10.250.0.1";
const EXTERNAL_IP: &str = "10.250.0.2";

fn node_object() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": KNODE, "labels": {"kubernetes.io/hostname": KNODE}},
        "status": {
            "addresses": [
                {"type": "Hostname", "address": KNODE},
                {"type": "ExternalIP", "address": EXTERNAL_IP},
                {"type": "InternalIP", "address": INTERNAL_IP},
            ],
        },
    })
}

fn start_kube_agent(
    lab: &Lab,
    kubeconfig: &std::path::Path,
    n: usize,
    args: &[&str],
) -> Result<Agent> {
    let config = lab.kube_agent_config(kubeconfig, KNODE, &format!("kube-agent-{n}.log"), args);
    let mut agent = Agent::start(config)?;
    agent.wait_applied(1, Duration::from_secs(30))?;
    Ok(agent)
}

fn kube_run(lab: &Lab, target: &str) -> Result<ClientReport> {
    let mut o = lab.client(target.parse().context("target")?, Proto::Tcp);
    o.count = N;
    let r = lab.run_client(&o)?;
    eprintln!("client -> {target}: {}", r.summary());
    Ok(r)
}

/// In Kubernetes mode the socket programs serve node ports on the Node's addresses that
/// pass the rule: `primary` is the InternalIP only (kube-proxy's node IP), a CIDR picks
/// the ExternalIP instead, and none of the rules serves the other address.
#[test]
fn kube_node_addresses_follow_the_rule() {
    isolated(|| {
        let bins =
            Bins::from_env(Some(env!("CARGO_BIN_EXE_svclb-harness"))).expect("locate the binaries");
        let mut lab = Lab::new(bins, &["a", "b"]).expect("build the lab");
        let body = (|| -> Result<()> {
            lab.serve_all_tcp(8080, false)?;
            let api = FakeApi::start()?;
            let kubeconfig = lab.dir().join("kubeconfig");
            api.write_kubeconfig(&kubeconfig)?;
            api.apply(node_object())?;
            let svc = Service::new(NS, "knp", &[ip("10.96.61.1")])
                .port("http", 80, TargetPort::Number(8080), Protocol::Tcp)
                .node_port(30401)
                .spec("type", json!("NodePort"));
            api.apply(svc.to_value())?;
            let slice = EndpointSlice::new(NS, "knp", "v4", false)
                .port("http", 8080, Protocol::Tcp)
                .ready_endpoints(&lab.topo.addrs(false));
            api.apply(slice.to_value())?;
            let internal = format!("{INTERNAL_IP}:30401");
            let external = format!("{EXTERNAL_IP}:30401");
            let cases: [(&[&str], &str, &str); 3] = [
                (&[], &internal, &external),
                (&["--nodeport-addresses", "primary"], &internal, &external),
                (
                    &["--nodeport-addresses", "10.250.0.2/32"],
                    &external,
                    &internal,
                ),
            ];
            for (i, (args, on, off)) in cases.iter().enumerate() {
                let mut agent = start_kube_agent(&lab, &kubeconfig, i, args)?;
                let r = kube_run(&lab, on)?;
                all_ok(&r, N).with_context(|| format!("{args:?}: {on} must be served"))?;
                backends_are(&r, &["a", "b"])?;
                let r = kube_run(&lab, off)?;
                if args.is_empty() {
                    // The default serves every node address.
                    all_ok(&r, N).with_context(|| format!("{args:?}: {off} must be served"))?;
                } else {
                    all_failed(&r, N, "ENETUNREACH")
                        .with_context(|| format!("{args:?}: {off} must not be a node port"))?;
                }
                agent.terminate(Duration::from_secs(5))?;
            }
            Ok(())
        })();
        if let Err(e) = body {
            panic!("{e:?}");
        }
    });
}
