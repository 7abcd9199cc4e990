//! Privileged end-to-end tests of the external path under abuse, in the two-node lab
//! (`tests/src/twonode.rs`): a flood of spoofed TCP SYNs to a NodePort must not starve
//! legitimate clients of SNAT ports or conntrack entries, and rejects (ICMP port
//! unreachable for a Service without endpoints) are rate-limited node-wide.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test external_flood -- --test-threads=1`.
//! The flood lasts `SVC_LB_FLOOD_SECS` seconds (default 30, the goal's length).
#![cfg(feature = "e2e")]

#[allow(dead_code)]
#[path = "../src/pkt.rs"]
mod pkt;

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use socket2::{Domain, Protocol as SockProto, SockAddr, Socket, Type};
use svc_lb_tests::{
    Proto,
    checks::{all_failed, all_ok},
    manifests::{Protocol, Service, TargetPort, yaml_docs},
    netns::in_netns,
    twonode::{Node, NodeAgentOptions, POD_PORT, TwoNodeLab, run_lab},
};

const NS: &str = "flood";
/// Spoofed SYNs per second (the goal's rate).
const FLOOD_RATE: u64 = 200;
/// Legitimate connections: one every this often during the flood.
const LEGIT_INTERVAL: Duration = Duration::from_millis(50);

fn flood_secs() -> u64 {
    std::env::var("SVC_LB_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

/// A Service of `ty` with one TCP port (`node_port`), endpoints `pods`, IPv4 only.
fn service_yaml(
    lab: &TwoNodeLab,
    name: &str,
    cluster: &str,
    ty: &str,
    node_port: u16,
    lb: Option<&str>,
    pods: &[&str],
) -> String {
    let cluster: IpAddr = cluster.parse().expect("cluster IP");
    let mut svc = Service::new(NS, name, &[cluster])
        .port("http", 80, TargetPort::Number(POD_PORT), Protocol::Tcp)
        .node_port(node_port)
        .port("dns", 53, TargetPort::Number(POD_PORT), Protocol::Udp)
        .node_port(node_port)
        .spec("type", json!(ty))
        .spec("externalTrafficPolicy", json!("Cluster"));
    if let Some(lb) = lb {
        svc = svc
            .spec("allocateLoadBalancerNodePorts", json!(true))
            .lb_ingress(lb.parse().expect("LB IP"));
    }
    let ports = [("http", Protocol::Tcp), ("dns", Protocol::Udp)];
    let slice = lab.pod_slice(NS, name, false, &ports, pods);
    yaml_docs(&[svc.to_value(), slice.to_value()])
}

/// xorshift64*: enough to spread spoofed sources, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Sends `rate` spoofed TCP SYNs per second to `to` for `secs` seconds from the
/// client's namespace (a raw IPv4 socket, IP_HDRINCL): sources are random hosts of the
/// lab's LAN that do not exist (10.250.0.10-250 without the client .100), source ports
/// random. Nothing answers the node's SYN-ACKs, as with a real spoofed flood. Returns
/// the SYNs sent.
fn flood(lab: &TwoNodeLab, to: SocketAddrV4, rate: u64, secs: u64) -> Result<u64> {
    let ns = lab.net.client.name().to_owned();
    in_netns(&ns, move || {
        let sock = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(SockProto::from(libc::IPPROTO_RAW)),
        )
        .context("raw socket (needs CAP_NET_RAW)")?;
        let dest = SockAddr::from(to);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()));
        let start = Instant::now();
        let total = rate * secs;
        let mut sent = 0;
        while sent < total {
            // Paced by absolute deadlines, so a slow send does not lower the rate.
            let due = start + Duration::from_micros(sent * 1_000_000 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let r = rng.next();
            let mut host = 10 + (r % 241) as u8;
            if host == 100 {
                host = 101;
            }
            let sport = 1024 + ((r >> 16) % 64_000) as u16;
            let mut spec = pkt::Spec::tcp(
                &format!("10.250.0.{host}"),
                sport,
                &to.ip().to_string(),
                to.port(),
                pkt::SYN,
            );
            spec.payload.clear();
            let frame = spec.frame();
            // The IP packet without its Ethernet header.
            sock.send_to(&frame[14..], &dest)
                .with_context(|| format!("send spoofed SYN {sent}"))?;
            sent += 1;
        }
        Ok(sent)
    })
}

fn ext_series(fam: &str, label: &str, value: &str) -> String {
    format!(r#"svclb_datapath_{fam}_total{{hook="ext",{label}="{value}"}}"#)
}

/// 200 spoofed SYNs per second to node A's NodePort, whose only endpoint is on node B
/// (so every flow, spoofed or not, needs one of node A's SNAT ports), while a client
/// connects every 50 ms: at least 99 % of its connections succeed, and node A drops at
/// most 1 % of that many flows for want of a SNAT port. Half-open flows live
/// `CT_TCP_SYN_TIMEOUT_S` (5 s) and the backend's SYN-ACK retransmissions do not extend
/// them, so the flood holds about 200 × 5 of the 4536 SNAT ports of 61000-65535 (the
/// range is set to that: the default, 1024-29999, is large enough to hide the bug this
/// guards against within the test's 30 s); before, every SYN-ACK promoted its flow to the
/// 6 h established lifetime and the ports ran out after about 23 s.
#[test]
fn spoofed_syn_flood_does_not_starve_legitimate_flows() {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        lab.write_manifest(
            "web.yaml",
            &service_yaml(lab, "web", "10.96.60.1", "NodePort", 30200, None, &["b1"]),
        )?;
        lab.start_agents(&NodeAgentOptions {
            xdp: false,
            extra_args: ["--snat-port-range", "61000-65535"]
                .map(str::to_owned)
                .to_vec(),
        })?;
        let secs = flood_secs();
        let node = Node::A.addr(false);
        let IpAddr::V4(node4) = node else {
            unreachable!("IPv4 node address")
        };
        let target = SocketAddr::new(node, 30200);
        // Warm-up: the path works before the flood.
        let mut o = lab.client(target, Proto::Tcp);
        o.count = 10;
        let r = lab.run_client(&o)?;
        all_ok(&r, 10)?;
        let forwarded = ext_series("translations", "direction", "forward");
        let exhausted = ext_series("drops", "reason", "snat_port_exhausted");
        let fwd_before = lab.node_metric(Node::A, &forwarded)?;

        let mut o = lab.client(target, Proto::Tcp);
        o.count = 0;
        o.duration = Some(Duration::from_secs(secs));
        o.interval = LEGIT_INTERVAL;
        o.timeout = Duration::from_secs(1);
        let legit = lab.spawn_client(&o)?;
        let sent = flood(lab, SocketAddrV4::new(node4, 30200), FLOOD_RATE, secs)?;
        let r = legit.wait()?;
        eprintln!("legitimate: {}", r.summary());
        eprintln!("spoofed SYNs sent: {sent} in {secs} s");

        let exhausted_n = lab.node_metric(Node::A, &exhausted)?;
        let new_flows = lab.node_metric(Node::A, &forwarded)? - fwd_before;
        eprintln!("node A: new external flows {new_flows}, snat_port_exhausted {exhausted_n}");
        // The flood reached the datapath: nearly every spoofed SYN became a flow.
        ensure!(
            new_flows >= sent * 9 / 10 + r.ok,
            "only {new_flows} new flows on node A for {sent} spoofed SYNs and {} connections",
            r.ok
        );
        ensure!(
            r.attempts >= secs * 1000 / LEGIT_INTERVAL.as_millis() as u64 / 2,
            "too few legitimate attempts: {}",
            r.summary()
        );
        ensure!(
            r.ok * 100 >= r.attempts * 99,
            "fewer than 99 % of legitimate connections succeeded: {}",
            r.summary()
        );
        ensure!(
            exhausted_n * 100 <= r.attempts,
            "snat_port_exhausted {exhausted_n} exceeds 1 % of {} legitimate attempts",
            r.attempts
        );
        // The backend saw the node's address (SNAT), never the client's.
        ensure!(
            r.backends.keys().all(|b| b == "b1"),
            "only b1 serves: {}",
            r.summary()
        );
        Ok(())
    });
}

/// `--reject-rate 1 --reject-burst 5`: a burst of connected-UDP probes to a LoadBalancer
/// IP without endpoints gets ICMP port unreachable (ECONNREFUSED) for the first 5 and
/// for one more per second after; the others get no answer (a receive timeout). Node A
/// counts each answered probe as a reject and each unanswered one as a rate-limited
/// drop.
/// Node B, whose bucket is its own, still answers.
#[test]
fn rejects_are_rate_limited_per_node() {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        let lb = "10.253.0.90";
        lab.write_manifest(
            "empty.yaml",
            &service_yaml(
                lab,
                "empty",
                "10.96.60.2",
                "LoadBalancer",
                30201,
                Some(lb),
                &[],
            ),
        )?;
        lab.start_agents(&NodeAgentOptions {
            xdp: false,
            extra_args: ["--reject-rate", "1", "--reject-burst", "5"]
                .map(str::to_owned)
                .to_vec(),
        })?;
        let lb: IpAddr = lb.parse()?;
        lab.net.route_via(lb, Node::A)?;
        const PROBES: u64 = 12;
        let mut o = lab.client(SocketAddr::new(lb, 53), Proto::UdpConnected);
        o.count = PROBES;
        o.timeout = Duration::from_millis(200);
        let r = lab.run_client(&o)?;
        eprintln!("{}", r.summary());
        let refused = r.failures.get("ECONNREFUSED").copied().unwrap_or(0);
        let timeouts = r.failures.get("TIMEOUT").copied().unwrap_or(0);
        ensure!(
            refused + timeouts == PROBES && r.ok == 0,
            "every probe is refused or unanswered: {}",
            r.summary()
        );
        // 5 at once, then at most one per started second of the run.
        let max_refused = 5 + r.elapsed_ms.div_ceil(1000);
        ensure!(
            (5..=max_refused).contains(&refused),
            "refused {refused}, expected 5..={max_refused}: {}",
            r.summary()
        );
        let rejects = ext_series("rejects", "reason", "no_backend");
        let limited = ext_series("drops", "reason", "reject_rate_limited");
        ensure!(
            lab.node_metric(Node::A, &rejects)? == refused,
            "{rejects} must count the {refused} answered probes"
        );
        ensure!(
            lab.node_metric(Node::A, &limited)? == timeouts,
            "{limited} must count the {timeouts} unanswered probes"
        );
        // Node B's own bucket is untouched: its limit is per node.
        lab.net.route_via(lb, Node::B)?;
        let mut o = lab.client(SocketAddr::new(lb, 53), Proto::UdpConnected);
        o.count = 5;
        o.timeout = Duration::from_millis(500);
        let r = lab.run_client(&o)?;
        all_failed(&r, 5, "ECONNREFUSED")?;
        ensure!(
            lab.node_metric(Node::B, &limited)? == 0,
            "node B dropped no reject"
        );
        Ok(())
    });
}

/// `--snat-port-range 20000-20009` (10 ports per backend): flows SNATed to the other
/// node's pod take their source ports from that range only (read back with `svc-lb
/// conntrack`), and when the range is used up a new flow is dropped and counted as
/// `snat_port_exhausted` rather than given a port outside it.
#[test]
fn snat_ports_come_from_the_flag_and_run_out_visibly() {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), |lab| {
        lab.write_manifest(
            "web.yaml",
            &service_yaml(lab, "web", "10.96.60.4", "NodePort", 30203, None, &["b1"]),
        )?;
        lab.start_agents(&NodeAgentOptions {
            xdp: false,
            extra_args: ["--snat-port-range", "20000-20009"]
                .map(str::to_owned)
                .to_vec(),
        })?;
        let target = SocketAddr::new(Node::A.addr(false), 30203);
        // 4 flows: with at most 3 of 10 ports taken, 8 tries find a free one.
        let mut o = lab.client(target, Proto::Tcp);
        o.count = 4;
        let r = lab.run_client(&o)?;
        all_ok(&r, 4)?;
        let ports = snat_ports(lab)?;
        ensure!(ports.len() == 4, "4 SNAT flows in conntrack: {ports:?}");
        ensure!(
            ports.iter().all(|p| (20_000..=20_009).contains(p)),
            "SNAT ports outside 20000-20009: {ports:?}"
        );
        // Closed flows keep their port for the closing lifetime (10 s): 30 more flows
        // within it cannot all find one.
        let exhausted = ext_series("drops", "reason", "snat_port_exhausted");
        let mut o = lab.client(target, Proto::Tcp);
        o.count = 30;
        o.timeout = Duration::from_millis(300);
        let r = lab.run_client(&o)?;
        eprintln!("{}", r.summary());
        let n = lab.node_metric(Node::A, &exhausted)?;
        ensure!(
            r.failed > 0 && n >= r.failed,
            "exhaustion: {} failed, {exhausted} = {n}: {}",
            r.failed,
            r.summary()
        );
        let ports = snat_ports(lab)?;
        ensure!(
            ports.len() <= 10 && ports.iter().all(|p| (20_000..=20_009).contains(p)),
            "SNAT ports: {ports:?}"
        );
        Ok(())
    });
}

/// The SNAT source ports of node A's conntrack flows (`svc-lb conntrack -o json`).
fn snat_ports(lab: &TwoNodeLab) -> Result<Vec<u16>> {
    let bin = lab.bins.svc_lb.display().to_string();
    let bpffs = lab.bpffs(Node::A).display().to_string();
    let out = lab.node_cmd(
        Node::A,
        &bin,
        &["conntrack", "-o", "json", "--bpffs", &bpffs],
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("conntrack JSON: {out}"))?;
    let flows = v["flows"]
        .as_array()
        .or_else(|| v.as_array())
        .with_context(|| format!("no flows in {out}"))?;
    let mut ports = Vec::new();
    for f in flows {
        if let Some(snat) = f["snat"].as_str() {
            let addr: SocketAddr = snat
                .parse()
                .with_context(|| format!("SNAT address {snat:?}"))?;
            ports.push(addr.port());
        }
    }
    ports.sort_unstable();
    Ok(ports)
}
