//! Privileged end-to-end tests of the external path: NodePort, LoadBalancer IPs and
//! externalIPs served by the tc (and, with `--xdp`, XDP) programs of two nodes, each
//! running its own agent, for a client on "another machine".
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test external -- --test-threads=1`.
//! A missing tool (`ip`, `ethtool`, `bpftool`), capability or binary fails the test.
//!
//! The lab ([`TwoNodeLab`], see `tests/src/twonode.rs`): an external client and two
//! nodes on a bridged LAN, pods behind each node (a1, a2 on node A, b1 on node B by
//! default; each pod's server answers `<pod> <client address it saw>`), one agent per node
//! in the node's namespace with its own pin directory and cgroup, both reading the same
//! manifest directory whose EndpointSlices carry `nodeName`. The client has no default
//! route: it reaches NodePorts at the node addresses on the LAN and the load-balancer and
//! external IPs through a host route via node A or node B that each test sets.
//!
//! Every test states its expected counts, including 0 failures, and ends by checking that
//! nothing named with this run's prefix is left.
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use svc_lb_tests::ip;
use svc_lb_tests::{
    ClientReport, Proto,
    checks::{addr_words, all_failed, all_ok, backends_are, maglev_table, unix_ms},
    manifests::{Endpoint, EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    twonode::{Node, NodeAgentOptions, POD_PORT, TwoNodeLab, client_addr, run_lab, run_lab_with},
};

const NS: &str = "ext";
/// Connections per measurement.
const N: u64 = 30;
/// Connections expected to be dropped: each costs a full timeout, so fewer.
const N_DROP: u64 = 20;
/// Timeout of an attempt expected to be dropped (no answer at all).
const DROP_TIMEOUT: Duration = Duration::from_millis(300);
/// A rejected connection must fail well within this (ICMP comes back at once).
const FAST_FAIL: Duration = Duration::from_millis(250);
/// Maglev table size given to both agents (a prime; both nodes must use the same).
const MAGLEV_SIZE: &str = "1021";

/// [`run_lab`] for this file's tests.
fn external(body: impl FnOnce(&mut TwoNodeLab) -> Result<()>) {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), body);
}

/// A Service of type NodePort or LoadBalancer and its EndpointSlices (one per family of
/// `cluster`), built from the lab's pods.
#[derive(Clone, Debug)]
struct Svc {
    name: &'static str,
    /// Cluster IPs, one per family.
    cluster: &'static [&'static str],
    ty: &'static str,
    local: bool,
    /// (port name, port, protocol, nodePort); the target is always [`POD_PORT`].
    ports: &'static [(&'static str, u16, Protocol, u16)],
    /// Endpoint pods (ready, with their node as `nodeName`).
    pods: Vec<&'static str>,
    lb: &'static [&'static str],
    external_ips: &'static [&'static str],
    source_ranges: Vec<&'static str>,
    health_check_node_port: Option<u16>,
}

impl Svc {
    fn new(name: &'static str, cluster: &'static [&'static str], ty: &'static str) -> Self {
        Self {
            name,
            cluster,
            ty,
            local: false,
            ports: &[],
            pods: Vec::new(),
            lb: &[],
            external_ips: &[],
            source_ranges: Vec::new(),
            health_check_node_port: None,
        }
    }

    fn yaml(&self, lab: &TwoNodeLab) -> String {
        let cluster: Vec<IpAddr> = self.cluster.iter().map(|s| ip(s)).collect();
        let mut svc = Service::new(NS, self.name, &cluster);
        for (name, port, proto, node_port) in self.ports {
            svc = svc
                .port(name, *port, TargetPort::Number(POD_PORT), *proto)
                .node_port(*node_port);
        }
        svc = svc.spec("type", json!(self.ty)).spec(
            "externalTrafficPolicy",
            json!(if self.local { "Local" } else { "Cluster" }),
        );
        if cluster.len() > 1 {
            svc = svc.spec("ipFamilyPolicy", json!("PreferDualStack"));
        }
        if self.ty == "LoadBalancer" {
            svc = svc.spec("allocateLoadBalancerNodePorts", json!(true));
        }
        if !self.external_ips.is_empty() {
            svc = svc.spec("externalIPs", json!(self.external_ips));
        }
        if !self.source_ranges.is_empty() {
            svc = svc.spec("loadBalancerSourceRanges", json!(self.source_ranges));
        }
        if let Some(hc) = self.health_check_node_port {
            svc = svc.spec("healthCheckNodePort", json!(hc));
        }
        for addr in self.lb {
            svc = svc.lb_ingress(ip(addr));
        }
        let mut docs = vec![svc.to_value()];
        for c in &cluster {
            let v6 = c.is_ipv6();
            let mut slice = EndpointSlice::new(NS, self.name, if v6 { "v6" } else { "v4" }, v6);
            for (name, _, proto, _) in self.ports {
                slice = slice.port(name, POD_PORT, *proto);
            }
            for pod in &self.pods {
                let p = lab.net.pod(pod);
                slice = slice.endpoint(
                    Endpoint::ready(p.addr(v6))
                        .pod(&format!("{}-{pod}", self.name))
                        .node(p.node.name()),
                );
            }
            docs.push(slice.to_value());
        }
        yaml_docs(&docs)
    }

    fn file(&self) -> String {
        format!("{}.yaml", self.name)
    }
}

/// Writes the Services' manifests, then starts both agents (their first sync has them).
fn start(lab: &mut TwoNodeLab, xdp: bool, services: &[&Svc]) -> Result<()> {
    start_with(lab, xdp, Vec::new(), services)
}

/// [`start`] with more agent arguments.
fn start_with(
    lab: &mut TwoNodeLab,
    xdp: bool,
    extra: Vec<String>,
    services: &[&Svc],
) -> Result<()> {
    for s in services {
        lab.write_manifest(&s.file(), &s.yaml(lab))?;
    }
    let mut extra_args = vec!["--maglev-table-size".into(), MAGLEV_SIZE.into()];
    extra_args.extend(extra);
    lab.start_agents(&NodeAgentOptions { xdp, extra_args })?;
    if xdp {
        // Without XDP links (kernels < 5.9, or forced off) the agent ignores --xdp.
        for n in Node::ALL {
            let want = !lab.agent(n)?.feature_unused("xdp_link");
            let links = lab.node_cmd(n, "ip", &["-d", "link", "show", "dev", "eth0"])?;
            ensure!(
                links.contains("xdp") == want,
                "--xdp given, XDP links forced off: {}; XDP on {}'s eth0: {}:\n{links}",
                !want,
                n.name(),
                links.contains("xdp")
            );
        }
    }
    Ok(())
}

/// Rewrites a Service's manifest and waits until both agents applied it.
fn update(lab: &mut TwoNodeLab, svc: &Svc) -> Result<()> {
    let yaml = svc.yaml(lab);
    lab.apply_manifest(&svc.file(), &yaml)
}

fn sa(addr: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(addr, port)
}

/// `n` attempts from the external client.
fn run(
    lab: &TwoNodeLab,
    target: SocketAddr,
    proto: Proto,
    n: u64,
    timeout: Duration,
) -> Result<ClientReport> {
    let mut o = lab.client(target, proto);
    o.count = n;
    o.timeout = timeout;
    let r = lab.run_client(&o)?;
    eprintln!("{}", r.summary());
    Ok(r)
}

/// Which client address each backend saw: pods on the entry node see the client itself
/// (DNAT only), pods on the other node see the entry node's address (DNAT + SNAT).
fn assert_seen(lab: &TwoNodeLab, r: &ClientReport, entry: Node, v6: bool) -> Result<()> {
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for (pod, count) in &r.backends {
        let seen = if lab.net.pod(pod).node == entry {
            client_addr(v6)
        } else {
            entry.addr(v6)
        };
        *want.entry(seen.to_string()).or_default() += count;
    }
    ensure!(
        r.backend_saw == want,
        "client addresses seen by the backends: got {:?}, expected {want:?} (entry {}): {}",
        r.backend_saw,
        entry.name(),
        r.summary()
    );
    Ok(())
}

// ---- 1. externalTrafficPolicy: Cluster through a NodePort ----

fn web() -> Svc {
    let mut s = Svc::new("web", &["10.96.50.1", "fd00:96::50:1"], "NodePort");
    s.ports = &[
        ("http", 80, Protocol::Tcp, 30080),
        ("dns", 53, Protocol::Udp, 30080),
    ];
    s.pods = vec!["a1", "a2", "b1"];
    s
}

fn cluster_nodeport(xdp: bool) {
    external(|lab| {
        start(lab, xdp, &[&web()])?;
        for entry in Node::ALL {
            // TCP over IPv4 and IPv6: backends on both nodes answer.
            for v6 in [false, true] {
                let r = run(
                    lab,
                    sa(entry.addr(v6), 30080),
                    Proto::Tcp,
                    N,
                    Duration::from_secs(1),
                )?;
                all_ok(&r, N)?;
                backends_are(&r, &["a1", "a2", "b1"])?;
                assert_seen(lab, &r, entry, v6)?;
            }
            // UDP, a new socket (source port) per datagram; the reply comes from the
            // NodePort the client sent to.
            let target = sa(entry.addr(false), 30080);
            let r = run(lab, target, Proto::Udp, N, Duration::from_secs(1))?;
            all_ok(&r, N)?;
            backends_are(&r, &["a1", "a2", "b1"])?;
            assert_seen(lab, &r, entry, false)?;
            ensure!(
                r.reply_sources == BTreeMap::from([(target.to_string(), N)]),
                "UDP replies must come from {target}: {:?}",
                r.reply_sources
            );
            // The SNAT flows (to the other node's pod) left through the FIB lookup and
            // bpf_redirect_neigh, not through the kernel's forwarding (tc ingress sends the
            // translated replies that way in XDP mode too).
            let fib = |name: &str| {
                lab.node_metric(
                    entry,
                    &format!(r#"svclb_datapath_events_total{{hook="ext",name="{name}"}}"#),
                )
            };
            let (sent, to_stack) = (fib("fib_redirected")?, fib("fib_to_stack")?);
            // Without bpf_redirect_neigh/bpf_check_mtu (kernels < 5.12, or forced off
            // in the fallback run) every SNAT flow goes through the kernel's forwarding
            // instead; the entry node's agent says which.
            let ok = if lab.agent(entry)?.feature_unused("fib_redirect") {
                sent == 0 && to_stack > 0
            } else {
                sent > 0 && (xdp || to_stack == 0)
            };
            ensure!(
                ok,
                "{}: fib_redirected {sent}, fib_to_stack {to_stack}",
                entry.name()
            );
        }
        Ok(())
    });
}

#[test]
fn cluster_policy_nodeport_reaches_pods_on_both_nodes() {
    cluster_nodeport(false);
}

#[test]
fn xdp_cluster_policy_nodeport_reaches_pods_on_both_nodes() {
    cluster_nodeport(true);
}

// ---- 2. externalTrafficPolicy: Local ----

fn local_svc() -> Svc {
    let mut s = Svc::new("loc", &["10.96.50.2"], "NodePort");
    s.local = true;
    s.ports = &[
        ("http", 80, Protocol::Tcp, 30090),
        ("dns", 53, Protocol::Udp, 30090),
    ];
    // Both pods on node A: node B has no local endpoint.
    s.pods = vec!["a1", "a2"];
    s
}

fn local_policy(xdp: bool) {
    external(|lab| {
        start(lab, xdp, &[&local_svc()])?;
        let client = client_addr(false).to_string();
        // Via A: only A's pods, and each saw the client's own address.
        for proto in [Proto::Tcp, Proto::Udp] {
            let r = run(
                lab,
                sa(Node::A.addr(false), 30090),
                proto,
                N,
                Duration::from_secs(1),
            )?;
            all_ok(&r, N)?;
            backends_are(&r, &["a1", "a2"])?;
            ensure!(
                r.backend_saw == BTreeMap::from([(client.clone(), N)]),
                "{proto}: every backend must see the client {client}: {:?}",
                r.backend_saw
            );
        }
        // Via B: no local endpoint, every connection is dropped (a connect timeout, not a
        // reset or an ICMP error).
        let r = run(
            lab,
            sa(Node::B.addr(false), 30090),
            Proto::Tcp,
            N_DROP,
            DROP_TIMEOUT,
        )?;
        all_failed(&r, N_DROP, "TIMEOUT")?;
        let r = run(
            lab,
            sa(Node::B.addr(false), 30090),
            Proto::Udp,
            N_DROP,
            DROP_TIMEOUT,
        )?;
        all_failed(&r, N_DROP, "TIMEOUT")?;
        Ok(())
    });
}

#[test]
fn local_policy_preserves_client_ip_and_drops_without_local_endpoint() {
    local_policy(false);
}

#[test]
fn xdp_local_policy_preserves_client_ip_and_drops_without_local_endpoint() {
    local_policy(true);
}

// ---- 3. healthCheckNodePort ----

#[test]
fn health_check_node_port_reports_local_endpoints() {
    external(|lab| {
        let mut s = Svc::new("hc", &["10.96.50.3"], "LoadBalancer");
        s.local = true;
        s.ports = &[("http", 80, Protocol::Tcp, 30100)];
        s.lb = &["10.253.0.30"];
        s.health_check_node_port = Some(32100);
        s.pods = vec!["a1"];
        start(lab, false, &[&s])?;
        for (node, status, local) in [(Node::A, 200, 1), (Node::B, 503, 0)] {
            let (code, body) = lab.http_get(sa(node.addr(false), 32100), "/")?;
            eprintln!("GET {}:32100 → {code} {body}", node.addr(false));
            ensure!(
                code == status,
                "{}: expected HTTP {status}, got {code}: {body}",
                node.name()
            );
            let v: Value = serde_json::from_str(body.trim())
                .with_context(|| format!("health check body is not JSON: {body:?}"))?;
            ensure!(
                v["localEndpoints"] == json!(local),
                "{}: localEndpoints must be {local}: {body}",
                node.name()
            );
            ensure!(
                body.contains("\"hc\"") && body.contains(&format!("\"{NS}\"")),
                "{}: the body must name the Service {NS}/hc: {body}",
                node.name()
            );
        }
        // The LB IP itself: only node A, which has the endpoint, serves it.
        let lb = ip("10.253.0.30");
        lab.net.route_via(lb, Node::A)?;
        let r = run(lab, sa(lb, 80), Proto::Tcp, N, Duration::from_secs(1))?;
        all_ok(&r, N)?;
        backends_are(&r, &["a1"])?;
        lab.net.route_via(lb, Node::B)?;
        let r = run(lab, sa(lb, 80), Proto::Tcp, N_DROP, DROP_TIMEOUT)?;
        all_failed(&r, N_DROP, "TIMEOUT")?;
        Ok(())
    });
}

// ---- 4. LoadBalancer IP, externalIP, loadBalancerSourceRanges ----

fn lb_svc() -> Svc {
    let mut s = Svc::new("lb", &["10.96.50.4"], "LoadBalancer");
    s.ports = &[("http", 80, Protocol::Tcp, 30110)];
    s.lb = &["10.253.0.10"];
    s.external_ips = &["10.253.0.20"];
    s.pods = vec!["a1", "a2", "b1"];
    s
}

fn ranged_svc(range: &'static str) -> Svc {
    let mut s = Svc::new("lbsr", &["10.96.50.5"], "LoadBalancer");
    s.ports = &[("http", 80, Protocol::Tcp, 30111)];
    s.lb = &["10.253.0.40"];
    s.source_ranges = vec![range];
    s.pods = vec!["a1", "a2", "b1"];
    s
}

fn lb_and_external_ips(xdp: bool) {
    external(|lab| {
        // 192.0.2.0/24 (TEST-NET-1) does not contain the client.
        start(lab, xdp, &[&lb_svc(), &ranged_svc("192.0.2.0/24")])?;
        for entry in Node::ALL {
            for addr in ["10.253.0.10", "10.253.0.20"] {
                let addr = ip(addr);
                lab.net.route_via(addr, entry)?;
                let r = run(lab, sa(addr, 80), Proto::Tcp, N, Duration::from_secs(1))?;
                all_ok(&r, N)?;
                backends_are(&r, &["a1", "a2", "b1"])?;
                assert_seen(lab, &r, entry, false)?;
            }
        }
        let ranged = ip("10.253.0.40");
        for entry in Node::ALL {
            lab.net.route_via(ranged, entry)?;
            let r = run(lab, sa(ranged, 80), Proto::Tcp, N_DROP, DROP_TIMEOUT)?;
            all_failed(&r, N_DROP, "TIMEOUT")?;
        }
        update(lab, &ranged_svc("10.250.0.0/24"))?;
        for entry in Node::ALL {
            lab.net.route_via(ranged, entry)?;
            let r = run(lab, sa(ranged, 80), Proto::Tcp, N, Duration::from_secs(1))?;
            all_ok(&r, N)?;
            backends_are(&r, &["a1", "a2", "b1"])?;
        }
        Ok(())
    });
}

#[test]
fn lb_ip_and_external_ip_via_either_node_and_source_ranges() {
    lb_and_external_ips(false);
}

#[test]
fn xdp_lb_ip_and_external_ip_via_either_node_and_source_ranges() {
    lb_and_external_ips(true);
}

// ---- 5. Maglev agreement ----

fn maglev_agreement(xdp: bool) {
    external(|lab| {
        let mut s = Svc::new("mag", &["10.96.50.6"], "LoadBalancer");
        s.ports = &[("http", 80, Protocol::Tcp, 30112)];
        s.lb = &["10.253.0.50"];
        s.pods = vec!["a1", "a2", "b1"];
        start(lab, xdp, &[&s])?;
        let lb = ip("10.253.0.50");
        let n = 40u64;
        let mut picks = Vec::new();
        for entry in Node::ALL {
            lab.net.route_via(lb, entry)?;
            let mut o = lab.client(sa(lb, 80), Proto::Tcp);
            o.count = n;
            o.sport = Some(40_000);
            o.sport_step = 1;
            let r = lab.run_client(&o)?;
            eprintln!("via {}: {}", entry.name(), r.summary());
            all_ok(&r, n)?;
            ensure!(
                r.by_sport.len() == n as usize,
                "one entry per source port: {:?}",
                r.by_sport
            );
            picks.push(r);
        }
        let (a, b) = (&picks[0].by_sport, &picks[1].by_sport);
        let differ: Vec<_> = a
            .iter()
            .filter(|(port, pod)| b.get(*port) != Some(*pod))
            .map(|(port, pod)| (*port, pod.clone(), b.get(port).cloned()))
            .collect();
        ensure!(
            differ.is_empty(),
            "source ports that chose another backend via B than via A (port, via A, via B): {differ:?}"
        );
        // The agreement means something only if the flows were spread.
        backends_are(&picks[0], &["a1", "a2", "b1"])?;
        // And both paths (and both modes, tc and XDP) pick what the Maglev model picks:
        // the contract's flow hash and permutations, the paper's table population over
        // the backends sorted by address.
        let pods = ["a1", "a2", "b1"];
        let mut sorted: Vec<(IpAddr, &str)> =
            pods.iter().map(|p| (lab.pod_addr(p, false), *p)).collect();
        sorted.sort();
        let addrs: Vec<IpAddr> = sorted.iter().map(|(a, _)| *a).collect();
        let m: u32 = MAGLEV_SIZE.parse()?;
        let table = maglev_table(&addrs, POD_PORT, svc_lb_common::PROTO_TCP, m);
        let model_mismatch: Vec<_> = a
            .iter()
            .filter_map(|(port, pod)| {
                let h = svc_lb_common::maglev::flow_hash(
                    &addr_words(client_addr(false)),
                    port.to_be(),
                    80u16.to_be(),
                    svc_lb_common::PROTO_TCP,
                );
                let want = sorted[table[(h % m) as usize]].1;
                (want != pod).then(|| (*port, pod.clone(), want))
            })
            .collect();
        ensure!(
            model_mismatch.is_empty(),
            "source ports whose backend differs from the Maglev model (port, got, model): {model_mismatch:?}"
        );
        Ok(())
    });
}

#[test]
fn maglev_same_backend_for_same_flow_via_either_node() {
    maglev_agreement(false);
}

#[test]
fn xdp_maglev_same_backend_for_same_flow_via_either_node() {
    maglev_agreement(true);
}

// ---- 6. Conntrack ----

#[test]
fn conntrack_keeps_established_flows_and_moves_udp_off_a_replaced_pod() {
    external(|lab| {
        let mut ct = Svc::new("ct", &["10.96.50.7"], "LoadBalancer");
        ct.ports = &[("http", 80, Protocol::Tcp, 30113)];
        ct.lb = &["10.253.0.60"];
        ct.pods = vec!["a1"];
        let mut udp = Svc::new("udpc", &["10.96.50.8"], "LoadBalancer");
        udp.ports = &[("dns", 53, Protocol::Udp, 30114)];
        udp.lb = &["10.253.0.70"];
        lab.add_pod("u1", Node::A, POD_PORT)?;
        udp.pods = vec!["u1"];
        start(lab, false, &[&ct, &udp])?;

        // Long-lived TCP connections (all on a1, the only backend) keep exchanging
        // messages while other backends come and go: with three backends most of these
        // flows hash elsewhere, so only conntrack keeps them on a1.
        let lb = ip("10.253.0.60");
        lab.net.route_via(lb, Node::A)?;
        let msgs = 60u64;
        let mut runs = Vec::new();
        for i in 0..4u16 {
            let mut o = lab.client(sa(lb, 80), Proto::Tcp);
            o.long_lived = true;
            o.count = msgs;
            o.interval = Duration::from_millis(50);
            o.timeout = Duration::from_secs(1);
            o.sport = Some(42_000 + i);
            runs.push(lab.spawn_client(&o)?);
        }
        std::thread::sleep(Duration::from_millis(500));
        ct.pods = vec!["a1", "a2", "b1"];
        update(lab, &ct)?;
        // New connections do use the new backends meanwhile.
        let r = run(lab, sa(lb, 80), Proto::Tcp, N, Duration::from_secs(1))?;
        all_ok(&r, N)?;
        backends_are(&r, &["a1", "a2", "b1"])?;
        std::thread::sleep(Duration::from_millis(300));
        ct.pods = vec!["a1", "b1"];
        update(lab, &ct)?;
        std::thread::sleep(Duration::from_millis(300));
        ct.pods = vec!["a1"];
        update(lab, &ct)?;
        for c in runs {
            let r = c.wait()?;
            eprintln!("long-lived: {}", r.summary());
            all_ok(&r, msgs)?;
            ensure!(
                r.backends == BTreeMap::from([("a1".to_owned(), msgs)]),
                "a long-lived connection changed backend: {}",
                r.summary()
            );
        }

        // UDP from one fixed source port while its only pod u1 is replaced by u2 (on the
        // other node, another address). u1 keeps running, so a stale flow would still get
        // answers from it: none may come once u2 answered, and u2 must answer within 1 s
        // of being in the manifests.
        let vip = ip("10.253.0.70");
        lab.net.route_via(vip, Node::A)?;
        let mut o = lab.client(sa(vip, 53), Proto::Udp);
        o.one_socket = true;
        o.sport = Some(43_000);
        o.count = 0;
        o.duration = Some(Duration::from_millis(3500));
        o.interval = Duration::from_millis(20);
        o.timeout = Duration::from_millis(200);
        o.timeline = true;
        let client = lab.spawn_client(&o)?;
        std::thread::sleep(Duration::from_millis(1000));
        lab.add_pod("u2", Node::B, POD_PORT)?;
        udp.pods = vec!["u2"];
        let yaml = udp.yaml(lab);
        let before = lab.applied()?;
        let written = unix_ms();
        lab.write_manifest(&udp.file(), &yaml)?;
        let t0 = Instant::now();
        lab.wait_both_applied(before)?;
        eprintln!(
            "udpc: both agents applied the new pod after {:?}",
            t0.elapsed()
        );
        let r = client.wait()?;
        eprintln!("udp: {}", r.summary());
        let before_write: Vec<_> = r.timeline.iter().filter(|e| e.unix_ms < written).collect();
        ensure!(
            !before_write.is_empty() && before_write.iter().all(|e| e.outcome == "u1"),
            "before the change every datagram must be answered by u1: {before_write:?}"
        );
        let first_u2 = r
            .timeline
            .iter()
            .find(|e| e.outcome == "u2")
            .with_context(|| format!("u2 never answered: {}", r.summary()))?;
        let delay = first_u2.unix_ms.saturating_sub(written);
        ensure!(
            delay <= 1000,
            "u2 answered only {delay} ms after the manifest change"
        );
        let after: Vec<_> = r
            .timeline
            .iter()
            .filter(|e| e.unix_ms >= first_u2.unix_ms)
            .collect();
        ensure!(
            after.len() > 20 && after.iter().all(|e| e.outcome == "u2"),
            "after u2's first answer ({delay} ms after the change) every datagram must reach u2: {:?}",
            after
                .iter()
                .filter(|e| e.outcome != "u2")
                .collect::<Vec<_>>()
        );
        eprintln!("udp: u2 answered {delay} ms after the manifest change");
        Ok(())
    });
}

// ---- 7. Reject without endpoints ----

/// Who must answer the rejects of [`reject_no_endpoints`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum RejectBy {
    /// No XDP: tc.
    Tc,
    /// `--xdp --xdp-reject tx`, the LAN end of each node's veth running XDP (the lab's
    /// default, as a wire would deliver the frames): XDP_TX.
    XdpTx,
    /// `--xdp` (reject mode auto) on plain veth pairs, nothing on the LAN ends: the
    /// XDP program passes the packet on and tc answers.
    XdpOnPlainVeth,
}

fn reject_no_endpoints(by: RejectBy) {
    let xdp = by != RejectBy::Tc;
    let wire_xdp = by != RejectBy::XdpOnPlainVeth;
    run_lab_with(env!("CARGO_BIN_EXE_svclb-harness"), wire_xdp, |lab| {
        let mut s = Svc::new("empty", &["10.96.50.9", "fd00:96::50:9"], "LoadBalancer");
        s.ports = &[
            ("http", 80, Protocol::Tcp, 30115),
            ("dns", 53, Protocol::Udp, 30115),
        ];
        s.lb = &["10.253.0.80", "fd00:253::80"];
        let extra = if by == RejectBy::XdpTx {
            vec!["--xdp-reject".to_owned(), "tx".to_owned()]
        } else {
            Vec::new()
        };
        start_with(lab, xdp, extra, &[&s])?;
        // The LB IPs, not the NodePort: a node address with no listener is refused by the
        // node's own stack anyway, whereas an LB IP is no address of the node (without
        // the agent, node A answers it with "network unreachable").
        let xdp_tx = r#"svclb_datapath_events_total{hook="ext",name="xdp_tx"}"#;
        let to_tc = r#"svclb_datapath_events_total{hook="ext",name="xdp_reject_to_tc"}"#;
        let rejects = r#"svclb_datapath_rejects_total{hook="ext",reason="no_backend"}"#;
        for entry in Node::ALL {
            let mut probes = 0;
            for lb in s.lb.iter().map(|a| ip(a)) {
                lab.net.route_via(lb, entry)?;
                for (proto, port) in [(Proto::Tcp, 80), (Proto::UdpConnected, 53)] {
                    if lb.is_ipv6() && proto == Proto::Tcp {
                        probes += tcp6_refused(lab, sa(lb, port))?;
                        continue;
                    }
                    let r = run(lab, sa(lb, port), proto, N_DROP, Duration::from_secs(1))?;
                    all_failed(&r, N_DROP, "ECONNREFUSED")?;
                    ensure!(
                        Duration::from_micros(r.max_failure_us) < FAST_FAIL,
                        "{proto} to {lb} via {}: a reject must fail fast, slowest took {} µs",
                        entry.name(),
                        r.max_failure_us
                    );
                    probes += N_DROP;
                }
            }
            // Every probe was answered once, by the hook under test: XDP_TX, or tc (on
            // a plain veth after the XDP program passed each one on).
            ensure!(
                lab.node_metric(entry, rejects)? == probes,
                "{}: {rejects} must count the {probes} probes",
                entry.name()
            );
            // No XDP program without XDP links (kernels < 5.9, or forced off): tc answers.
            let xdp_on = xdp && !lab.agent(entry)?.feature_unused("xdp_link");
            let (want_tx, want_to_tc) = match by {
                _ if !xdp_on => (0, 0),
                RejectBy::Tc => (0, 0),
                RejectBy::XdpTx => (probes, 0),
                RejectBy::XdpOnPlainVeth => (0, probes),
            };
            for (series, want) in [(xdp_tx, want_tx), (to_tc, want_to_tc)] {
                let got = lab.node_metric(entry, series)?;
                ensure!(
                    got == want,
                    "{}: {series} is {got}, expected {want}",
                    entry.name()
                );
            }
        }
        Ok(())
    });
}

/// TCP over IPv6 to a rejecting frontend; returns the rejects it caused. In this lab the
/// whole path runs in one kernel, synchronously inside the client's connect(): the
/// ICMPv6 error for the first SYN arrives while connect() still owns the socket, and
/// TCP/IPv6 keeps it as a soft error (`TcpExtLockDroppedIcmps`); the SYN retransmitted
/// after the initial RTO (1 s) is rejected again, outside the syscall, and connect()
/// fails with ECONNREFUSED. A client on another machine gets the first answer after
/// connect() has let go of the socket. IPv4 fails on the first SYN in the same lab.
fn tcp6_refused(lab: &TwoNodeLab, to: SocketAddr) -> Result<u64> {
    const PROBES: u64 = 3;
    let r = run(lab, to, Proto::Tcp, PROBES, Duration::from_secs(3))?;
    all_failed(&r, PROBES, "ECONNREFUSED")?;
    ensure!(
        Duration::from_micros(r.max_failure_us) < Duration::from_millis(1500),
        "tcp to {to}: refused only after {} µs (expected at the first SYN retransmit, ~1 s)",
        r.max_failure_us
    );
    Ok(2 * PROBES)
}

#[test]
fn reject_with_icmp_when_no_endpoints() {
    reject_no_endpoints(RejectBy::Tc);
}

#[test]
fn xdp_reject_with_icmp_when_no_endpoints() {
    reject_no_endpoints(RejectBy::XdpTx);
}

/// A veth whose peer runs no XDP program drops XDP_TX frames: with `--xdp` the agent
/// marks the veth (its driver) so that tc answers instead, and every probe is refused.
#[test]
fn xdp_reject_on_plain_veth_is_answered_by_tc() {
    reject_no_endpoints(RejectBy::XdpOnPlainVeth);
}

// ---- 8. Hairpin ----

/// A pod reaching its own Service through its node's NodePort or the LB IP. The pod's
/// client runs in node A's cgroup, so node A's socket programs translate its connect()
/// as they do for every local process: that is how a local pod hairpins (its packets
/// never cross node A's LAN device, where the tc programs sit).
#[test]
fn hairpin_pod_reaches_its_own_service_via_nodeport_and_lb_ip() {
    external(|lab| {
        let mut s = Svc::new("hp", &["10.96.50.10"], "LoadBalancer");
        s.ports = &[("http", 80, Protocol::Tcp, 30116)];
        s.lb = &["10.253.0.90"];
        s.pods = vec!["a1", "a2", "b1"];
        start(lab, false, &[&s])?;
        for target in [sa(Node::A.addr(false), 30116), sa(ip("10.253.0.90"), 80)] {
            let mut o = lab.pod_client("a1", target, Proto::Tcp);
            o.count = N;
            let r = lab.run_client(&o)?;
            eprintln!("hairpin from a1: {}", r.summary());
            all_ok(&r, N)?;
            // a1 included: the pod reached itself through its Service.
            backends_are(&r, &["a1", "a2", "b1"])?;
        }
        Ok(())
    });
}

// ---- Frames sent to another node's MAC address ----

/// Frames received on node `n`'s LAN device.
fn rx_packets(lab: &TwoNodeLab, n: Node) -> Result<u64> {
    let out = lab.node_cmd(n, "ip", &["-s", "-j", "link", "show", "dev", "eth0"])?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("ip -s -j link: {out}"))?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packets in {out}"))
}

/// A switch floods a frame whose destination MAC it does not know (right after the
/// owner's link died, or its entry aged out) to every port. Only the node the frame was
/// sent to may translate or answer it; another node that serves the same load-balancer
/// IP must leave it alone, or the client gets two answers to one SYN.
fn foreign_mac(xdp: bool) {
    external(|lab| {
        start(lab, xdp, &[&lb_svc()])?;
        // The bridge forgets node A's MAC and never learns it again ("na" is node A's
        // port): every frame the client sends to node A is flooded to node B too.
        lab.net.lan.ip([
            "link",
            "set",
            "na",
            "type",
            "bridge_slave",
            "learning",
            "off",
            "fdb_flush",
        ])?;
        let addr = ip("10.253.0.10");
        lab.net.route_via(addr, Node::A)?;
        let series = |fam: &str, label: &str, value: &str| {
            format!(r#"svclb_datapath_{fam}_total{{hook="ext",{label}="{value}"}}"#)
        };
        let watched = [
            series("translations", "direction", "forward"),
            series("translations", "direction", "reverse"),
            series("events", "name", "conntrack_hit"),
            series("events", "name", "xdp_forwarded"),
        ];
        let rx_before = rx_packets(lab, Node::B)?;
        let r = run(lab, sa(addr, 80), Proto::Tcp, N, Duration::from_secs(1))?;
        all_ok(&r, N)?;
        backends_are(&r, &["a1", "a2", "b1"])?;
        assert_seen(lab, &r, Node::A, false)?;
        // SYN, ACK, request and FIN at least, per connection.
        let flooded = rx_packets(lab, Node::B)? - rx_before;
        ensure!(
            flooded >= 3 * N,
            "node B must have received the client's frames to node A (flooded): {flooded}"
        );
        for s in &watched {
            let got = lab.node_metric(Node::B, s)?;
            ensure!(
                got == 0,
                "node B served frames sent to node A's MAC: {s} = {got}"
            );
        }
        let forwarded = lab.node_metric(Node::A, &watched[0])?;
        ensure!(
            forwarded >= N,
            "node A translated {forwarded} flows, expected {N}"
        );
        Ok(())
    });
}

#[test]
fn frames_for_another_nodes_mac_are_not_served() {
    foreign_mac(false);
}

#[test]
fn xdp_frames_for_another_nodes_mac_are_not_served() {
    foreign_mac(true);
}

// ---- The lab itself, without agents ----

/// The topology routes exactly what it should: the client reaches the node addresses
/// and nothing else until a test adds a route; nodes forward to their own and to the
/// other node's pods; pods reach each other across nodes. No agent runs, so this also
/// shows what "not handled by the agent" looks like.
#[test]
fn lab_routes_only_what_a_test_adds() {
    external(|lab| {
        let a1 = lab.pod_addr("a1", false);
        let b1 = lab.pod_addr("b1", false);
        let client = client_addr(false).to_string();
        let quick = Duration::from_millis(500);
        // No route: pods and LB IPs are unreachable from the client, locally.
        for dest in [a1, b1, ip("10.253.0.10"), lab.pod_addr("a1", true)] {
            let r = run(lab, sa(dest, POD_PORT), Proto::Tcp, 1, quick)?;
            all_failed(&r, 1, "ENETUNREACH")?;
        }
        // The node addresses are on-link; nothing listens on a NodePort without an agent.
        for n in Node::ALL {
            for v6 in [false, true] {
                let r = run(lab, sa(n.addr(v6), 30080), Proto::Tcp, 1, quick)?;
                all_failed(&r, 1, "ECONNREFUSED")?;
            }
        }
        // An address routed via a node that has no route for it: the node says so.
        lab.net.route_via(ip("10.253.0.10"), Node::A)?;
        let r = run(lab, sa(ip("10.253.0.10"), 80), Proto::Tcp, 1, quick)?;
        ensure!(
            r.failed == 1
                && (r.failures_of("EHOSTUNREACH") == 1 || r.failures_of("ENETUNREACH") == 1),
            "node A must answer an unroutable address with ICMP unreachable: {}",
            r.summary()
        );
        lab.net.unroute(ip("10.253.0.10"))?;
        // Plain routing through either node to pods on either node.
        for (pod, dest) in [("a1", a1), ("b1", b1)] {
            for via in Node::ALL {
                lab.net.route_via(dest, via)?;
                for proto in [Proto::Tcp, Proto::Udp] {
                    let r = run(lab, sa(dest, POD_PORT), proto, 5, quick)?;
                    all_ok(&r, 5)?;
                    backends_are(&r, &[pod])?;
                    ensure!(
                        r.backend_saw == BTreeMap::from([(client.clone(), 5)]),
                        "plain routing keeps the client address: {:?}",
                        r.backend_saw
                    );
                }
            }
            lab.net.unroute(dest)?;
            let r = run(lab, sa(dest, POD_PORT), Proto::Tcp, 1, quick)?;
            all_failed(&r, 1, "ENETUNREACH")?;
        }
        let a1v6 = lab.pod_addr("a1", true);
        lab.net.route_via(a1v6, Node::B)?;
        let r = run(lab, sa(a1v6, POD_PORT), Proto::Tcp, 5, quick)?;
        all_ok(&r, 5)?;
        backends_are(&r, &["a1"])?;
        // Pod to pod across nodes (no cgroup: no agent involved).
        let mut o = lab.client(sa(b1, POD_PORT), Proto::Tcp);
        o.netns = Some(lab.net.pod("a1").netns.name().to_owned());
        o.count = 5;
        let r = lab.run_client(&o)?;
        all_ok(&r, 5)?;
        ensure!(
            r.backend_saw == BTreeMap::from([(a1.to_string(), 5)]),
            "b1 must see a1's address: {:?}",
            r.backend_saw
        );
        Ok(())
    });
}

// ---- list --stats: packets and bytes of the external path ----

/// Node `n`'s `svc-lb list --stats -o json`, parsed.
fn list_stats(lab: &TwoNodeLab, n: Node) -> Result<Vec<Value>> {
    let bin = lab.bins.svc_lb.display().to_string();
    let bpffs = lab.bpffs(n).display().to_string();
    let out = lab.node_cmd(
        n,
        &bin,
        &["list", "--stats", "-o", "json", "--bpffs", &bpffs],
    )?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("list JSON: {out}"))?;
    v.as_array()
        .cloned()
        .context("list -o json is not an array")
}

/// The external frontend `addr`:`port`/`proto` of a listing.
fn ext_frontend<'a>(all: &'a [Value], addr: &str, port: u16, proto: &str) -> Result<&'a Value> {
    all.iter()
        .find(|f| {
            f["address"] == addr
                && f["port"] == port
                && f["protocol"] == proto
                && f["scope"] == "external"
        })
        .with_context(|| format!("no external frontend {addr}:{port}/{proto} in {all:?}"))
}

fn num(v: &Value, field: &str) -> Result<u64> {
    v["stats"][field]
        .as_u64()
        .with_context(|| format!("stats.{field} is not a number in {v}"))
}

/// Packets and bytes of the external path in `list --stats`, from the conntrack entries
/// of the entry node (A). UDP through the NodePort, a new socket per datagram: every
/// flow is one datagram each way, so exactly N packets in and out, N × 29 bytes in (IP
/// header, UDP header, the 1-byte request) and, out, each reply's 28 header bytes plus
/// `<pod> <address:port it saw>`: exact for the local pods, which see the client's
/// ephemeral port (5 digits); within 1 to 5 port digits for the remote pod, which sees
/// node A's SNAT port; per backend its share, the backends adding up to the frontend.
/// TCP: N connections, each at least 3 packets in
/// (SYN, request, FIN) and 2 out (SYN-ACK, reply), at most 8 each way, 40 to 80 header
/// bytes a packet plus the payload. Node B, which only forwards, counts nothing.
fn ext_stats(xdp: bool) {
    external(|lab| {
        start_with(
            lab,
            xdp,
            vec![
                "--ext-stats-interval".into(),
                EXT_STATS_INTERVAL.into(),
                "--metrics-addr".into(),
                format!("127.0.0.1:{METRICS_PORT}"),
            ],
            &[&web()],
        )?;
        let entry = Node::A;
        let udp = run(
            lab,
            sa(entry.addr(false), 30080),
            Proto::Udp,
            N,
            Duration::from_secs(1),
        )?;
        all_ok(&udp, N)?;
        let tcp = run(
            lab,
            sa(entry.addr(false), 30080),
            Proto::Tcp,
            N,
            Duration::from_secs(1),
        )?;
        all_ok(&tcp, N)?;
        // The last ACKs of the TCP connections are on their way; then one fold of the
        // conntrack counts into the totals.
        std::thread::sleep(Duration::from_millis(500) + EXT_FOLD_WAIT);
        let all = list_stats(lab, entry)?;
        // A reply's payload: (shortest, longest) over the port digits it may carry.
        let reply_len = |pod: &str| -> (u64, u64) {
            let local = lab.net.pod(pod).node == entry;
            let seen = if local {
                client_addr(false)
            } else {
                entry.addr(false)
            };
            let base = (pod.len() + 1 + seen.to_string().len() + 1) as u64;
            if local {
                (base + 5, base + 5)
            } else {
                (base + 1, base + 5)
            }
        };

        let fe = ext_frontend(&all, "0.0.0.0", 30080, "UDP")?;
        let got = [
            num(fe, "packets_in")?,
            num(fe, "packets_out")?,
            num(fe, "bytes_in")?,
        ];
        ensure!(
            got == [N, N, N * 29],
            "UDP NodePort: packets in/out, bytes in {got:?}, expected {:?}: {fe}",
            [N, N, N * 29]
        );
        let mut sum_out = 0;
        for (pod, c) in &udp.backends {
            let addr = lab.net.pod(pod).addr(false).to_string();
            let b = fe["backends"]
                .as_array()
                .and_then(|bs| bs.iter().find(|b| b["address"] == addr.as_str()))
                .with_context(|| format!("no backend {addr} ({pod}) in {fe}"))?;
            let got = [
                num(b, "packets_in")?,
                num(b, "packets_out")?,
                num(b, "bytes_in")?,
            ];
            let want = [*c, *c, c * 29];
            let out = num(b, "bytes_out")?;
            let (lo, hi) = reply_len(pod);
            ensure!(
                got == want && (c * (28 + lo)..=c * (28 + hi)).contains(&out),
                "UDP backend {pod}: {got:?}, expected {want:?}; bytes out {out}, expected {}..={}: {b}",
                c * (28 + lo),
                c * (28 + hi)
            );
            sum_out += out;
        }
        ensure!(
            num(fe, "bytes_out")? == sum_out,
            "UDP NodePort: the backends' bytes out add up to {sum_out}: {fe}"
        );

        let fe = ext_frontend(&all, "0.0.0.0", 30080, "TCP")?;
        let (pin, pout) = (num(fe, "packets_in")?, num(fe, "packets_out")?);
        let (bin, bout) = (num(fe, "bytes_in")?, num(fe, "bytes_out")?);
        let replies: u64 = tcp
            .backends
            .iter()
            .map(|(pod, c)| c * reply_len(pod).0)
            .sum();
        ensure!(
            (3 * N..=8 * N).contains(&pin)
                && (2 * N..=8 * N).contains(&pout)
                && (40 * pin + N..=80 * pin + N).contains(&bin)
                && (40 * pout + replies..=80 * pout + replies).contains(&bout),
            "TCP NodePort: {N} connections, packets in/out {pin}/{pout}, bytes in/out {bin}/{bout} (replies {replies} bytes): {fe}"
        );

        // Node B saw the SNATed flows only as a router: no external frontend counted.
        for f in list_stats(lab, Node::B)? {
            if f["scope"] == "external" && f["port"] == 30080 {
                ensure!(
                    num(&f, "packets_in")? == 0 && num(&f, "packets_out")? == 0,
                    "node B counted traffic it only forwarded: {f}"
                );
            }
        }
        totals_outlive_conntrack(lab, entry, &all)
    });
}

/// `--ext-stats-interval` of the [`ext_stats`] agents, and how long a test waits for a
/// fold after the traffic.
const EXT_STATS_INTERVAL: &str = "0.5";
const EXT_FOLD_WAIT: Duration = Duration::from_millis(1500);
/// The metrics port of the [`ext_stats`] agents, inside each node's namespace.
const METRICS_PORT: u16 = 19464;

/// The lasting totals (issue 15): every conntrack entry of node `entry` is deleted, as
/// the LRU evicts entries; `list --stats` (and `--rate` across the deletion) and the
/// metrics keep what `before` (the listing before) showed: exactly for UDP, at least
/// for TCP (a late ACK may still come), and `--rate` shows no traffic. The live sums
/// of the entries would have dropped to 0.
fn totals_outlive_conntrack(lab: &TwoNodeLab, entry: Node, before: &[Value]) -> Result<()> {
    let metrics = |what: &str| -> Result<std::collections::BTreeMap<String, f64>> {
        let ns = lab.net.node(entry).name().to_owned();
        let addr: SocketAddr = format!("127.0.0.1:{METRICS_PORT}").parse()?;
        let text = svc_lb_tests::netns::in_netns(&ns, || {
            svc_lb_tests::metrics::http_get(addr, "/metrics")
        })
        .with_context(|| format!("scrape node {}'s metrics {what}", entry.name()))?;
        Ok(svc_lb_tests::metrics::parse_metrics(&text))
    };
    // The frontend's external series of a scrape: (packets in, packets out, bytes in).
    let ext_series =
        |m: &std::collections::BTreeMap<String, f64>, proto: &str| -> Result<[u64; 3]> {
            let mut out = [0u64; 3];
            for (i, (name, dir)) in [
                ("svclb_frontend_external_packets_total", "in"),
                ("svclb_frontend_external_packets_total", "out"),
                ("svclb_frontend_external_bytes_total", "in"),
            ]
            .into_iter()
            .enumerate()
            {
                let hits: Vec<f64> = m
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with(name)
                            && k.contains("scope=\"external\"")
                            && k.contains(&format!("frontend=\"0.0.0.0:30080/{proto}\""))
                            && k.contains(&format!("direction=\"{dir}\""))
                    })
                    .map(|(_, v)| *v)
                    .collect();
                ensure!(
                    hits.len() == 1,
                    "{name} of the external {proto} NodePort ({dir}): {hits:?} among {m:#?}"
                );
                out[i] = hits[0] as u64;
            }
            Ok(out)
        };
    let fe_of = |all: &[Value], proto: &str| -> Result<[u64; 3]> {
        let fe = ext_frontend(all, "0.0.0.0", 30080, proto)?;
        Ok([
            num(fe, "packets_in")?,
            num(fe, "packets_out")?,
            num(fe, "bytes_in")?,
        ])
    };
    let udp_before = fe_of(before, "UDP")?;
    let tcp_before = fe_of(before, "TCP")?;
    let m = metrics("before")?;
    ensure!(
        ext_series(&m, "UDP")? == udp_before,
        "the metrics' UDP totals {:?} are not list's {udp_before:?}",
        ext_series(&m, "UDP")?
    );

    // Every conntrack entry goes, as the LRU would evict them.
    let ct_path = lab.bpffs(entry).join(svc_lb_common::MAP_CT);
    let ct = aya::maps::MapData::from_pin(&ct_path)
        .with_context(|| format!("open {}", ct_path.display()))?;
    let mut ct: aya::maps::HashMap<_, svc_lb_common::CtKey, svc_lb_common::CtEntry> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(ct))?;
    let keys: Vec<svc_lb_common::CtKey> = ct.keys().collect::<Result<_, _>>()?;
    ensure!(
        !keys.is_empty(),
        "node {} has no conntrack entries",
        entry.name()
    );
    for k in &keys {
        ct.remove(k)?;
    }
    ensure!(
        ct.keys().next().is_none(),
        "conntrack entries left after the deletion"
    );
    // `--rate` across the deletion and the next folds: nothing flows, so 0.
    let bin = lab.bins.svc_lb.display().to_string();
    let bpffs = lab.bpffs(entry).display().to_string();
    let out = lab.node_cmd(
        entry,
        &bin,
        &[
            "list",
            "--rate",
            "--interval",
            "2",
            "-o",
            "json",
            "--bpffs",
            &bpffs,
        ],
    )?;
    let rates: Value = serde_json::from_str(&out).with_context(|| format!("list JSON: {out}"))?;
    for proto in ["UDP", "TCP"] {
        let fe = ext_frontend(
            rates.as_array().context("not an array")?,
            "0.0.0.0",
            30080,
            proto,
        )?;
        for f in [
            "packets_in_per_second",
            "packets_out_per_second",
            "bytes_in_per_second",
            "bytes_out_per_second",
        ] {
            let r = fe["rate"][f]
                .as_f64()
                .with_context(|| format!("rate.{f} is not a number: {fe}"))?;
            ensure!(
                r == 0.0 || (proto == "TCP" && r >= 0.0),
                "{proto} NodePort: {f} {r} while nothing flows and the entries went: {fe}"
            );
        }
    }
    std::thread::sleep(EXT_FOLD_WAIT);
    let after = list_stats(lab, entry)?;
    let udp_after = fe_of(&after, "UDP")?;
    let tcp_after = fe_of(&after, "TCP")?;
    ensure!(
        udp_after == udp_before,
        "UDP NodePort totals changed when the conntrack entries went: {udp_before:?} → {udp_after:?}"
    );
    ensure!(
        tcp_after.iter().zip(&tcp_before).all(|(a, b)| a >= b),
        "TCP NodePort totals went down when the conntrack entries went: {tcp_before:?} → {tcp_after:?}"
    );
    // Per backend too (UDP: exactly).
    let fe_b = ext_frontend(before, "0.0.0.0", 30080, "UDP")?;
    let fe_a = ext_frontend(&after, "0.0.0.0", 30080, "UDP")?;
    let per_backend = |fe: &Value| -> Result<BTreeMap<String, [u64; 4]>> {
        fe["backends"]
            .as_array()
            .context("no backends")?
            .iter()
            .map(|b| {
                Ok((
                    b["address"].to_string(),
                    [
                        num(b, "packets_in")?,
                        num(b, "packets_out")?,
                        num(b, "bytes_in")?,
                        num(b, "bytes_out")?,
                    ],
                ))
            })
            .collect()
    };
    ensure!(
        per_backend(fe_b)? == per_backend(fe_a)?,
        "UDP backends' totals changed: {:?} → {:?}",
        per_backend(fe_b)?,
        per_backend(fe_a)?
    );
    let m = metrics("after")?;
    ensure!(
        ext_series(&m, "UDP")? == udp_before,
        "the metrics' UDP totals went from {udp_before:?} to {:?}",
        ext_series(&m, "UDP")?
    );
    let tcp_m = ext_series(&m, "TCP")?;
    ensure!(
        tcp_m.iter().zip(&tcp_before).all(|(a, b)| a >= b),
        "the metrics' TCP totals {tcp_m:?} are below list's before {tcp_before:?}"
    );
    Ok(())
}

#[test]
fn list_stats_count_packets_and_bytes_of_nodeport_flows() {
    ext_stats(false);
}

#[test]
fn xdp_list_stats_count_packets_and_bytes_of_nodeport_flows() {
    ext_stats(true);
}
