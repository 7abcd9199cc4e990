//! The per-packet path for pod traffic (`--pod-devices`) and `--socket-lb-scope`, in the
//! two-node lab (tests/src/twonode.rs, additions in tests/src/podlab.rs): pods behind
//! veths on node A (a1, a2, a3) and node B (b1), no default route anywhere, so a Service
//! address that nothing translates goes nowhere.
//!
//! With `--socket-lb-scope host` the socket programs leave the pods' sockets alone (their
//! clients run in the node's cgroup, where the programs are attached): whatever reaches a
//! backend was translated by the tc programs on the pods' devices.
#![cfg(feature = "e2e")]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, ensure};
use svc_lb_tests::{
    ClientReport, Proto,
    checks::{all_failed, all_ok, backends_are},
    ip,
    podlab::{self, OrigDstListener},
    twonode::{Node, POD_PORT, TwoNodeLab, run_lab},
};

const N: u64 = 20;
/// A rejected attempt must fail well within this (the ICMP error comes back at once).
const FAST_FAIL: Duration = Duration::from_millis(250);

const WEB: [&str; 2] = ["10.96.60.10", "fd00:96::60:10"];
const EMPTY: [&str; 2] = ["10.96.60.11", "fd00:96::60:11"];
const SELF: [&str; 2] = ["10.96.60.12", "fd00:96::60:12"];
const STICKY: [&str; 2] = ["10.96.60.13", "fd00:96::60:13"];

fn ips(s: &[&str]) -> Vec<IpAddr> {
    s.iter().map(|a| ip(a)).collect()
}

fn pods(body: impl FnOnce(&mut TwoNodeLab) -> Result<()>) {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), body);
}

/// Adds a3 on node A, takes every pod's default route away, writes the Services
/// (web: a3 and b1; empty: none; self: a1 only; sticky: a3 and b1 with ClientIP affinity) and starts both agents with `scope`;
/// with `pod_path` the pods' devices get the per-packet path and node A
/// `--route-cluster-ips`.
fn setup(lab: &mut TwoNodeLab, scope: &str, pod_path: bool) -> Result<()> {
    lab.add_pod("a3", Node::A, POD_PORT)?;
    for p in ["a1", "a2", "a3", "b1"] {
        podlab::drop_default_routes(lab, p)?;
    }
    for (name, cluster, eps, affinity) in [
        ("web", &WEB, &["a3", "b1"][..], false),
        ("empty", &EMPTY, &[][..], false),
        ("self", &SELF, &["a1"][..], false),
        ("sticky", &STICKY, &["a3", "b1"][..], true),
    ] {
        let yaml = podlab::cluster_service(lab, name, &ips(cluster), eps, affinity);
        lab.write_manifest(&format!("{name}.yaml"), &yaml)?;
    }
    // The pod path comes with --route-cluster-ips on node A; the other run has neither.
    let (a, b, extra) = if pod_path {
        ("p1,p2,p3", "p1", &["--route-cluster-ips"][..])
    } else {
        ("", "", &[][..])
    };
    podlab::start_agent(lab, Node::A, scope, a, extra)?;
    podlab::start_agent(lab, Node::B, scope, b, &[])?;
    Ok(())
}

/// `N` attempts from the external client to web's cluster IP, routed via node A.
fn from_outside(lab: &TwoNodeLab, v6: bool, proto: Proto) -> Result<ClientReport> {
    let web = ip(WEB[usize::from(v6)]);
    lab.net.route_via(web, Node::A)?;
    let port = if proto == Proto::Tcp { 80 } else { 53 };
    let mut o = lab.client(SocketAddr::new(web, port), proto);
    o.count = N;
    o.timeout = Duration::from_secs(1);
    let r = lab.run_client(&o)?;
    eprintln!("outside -> {web}:{port} {proto:?}: {}", r.summary());
    Ok(r)
}

fn run(lab: &TwoNodeLab, pod: &str, target: SocketAddr, proto: Proto) -> Result<ClientReport> {
    let mut o = lab.pod_client(pod, target, proto);
    o.count = N;
    o.timeout = Duration::from_secs(1);
    let r = lab.run_client(&o)?;
    eprintln!("{pod} -> {target} {proto:?}: {}", r.summary());
    Ok(r)
}

/// The mesh pod a2 dials web's cluster IP; its REDIRECT rule hands the connection to
/// the local listener, which reports the original destination.
fn mesh_sees(lab: &TwoNodeLab) -> Result<ClientReport> {
    podlab::mesh_redirect(lab, "a2")?;
    let _listener = OrigDstListener::start(lab, "a2")?;
    let r = run(lab, "a2", SocketAddr::new(ip(WEB[0]), 80), Proto::Tcp)?;
    all_ok(&r, N)?;
    Ok(r)
}

#[test]
fn host_scope_mesh_pod_sees_the_service_and_plain_pods_use_the_per_packet_path() {
    pods(|lab| {
        setup(lab, "host", true)?;
        // The mesh: its proxy sees the Service address, nothing else.
        let r = mesh_sees(lab)?;
        backends_are(&r, &["orig=10.96.60.10:80"])?;

        for v6 in [false, true] {
            // Plain pod, TCP and UDP: both backends (one local, one on node B), every
            // attempt answered; UDP replies come from the Service address (reverse NAT).
            let web = ip(WEB[usize::from(v6)]);
            let r = run(lab, "a1", SocketAddr::new(web, 80), Proto::Tcp)?;
            all_ok(&r, N)?;
            backends_are(&r, &["a3", "b1"])?;
            let r = run(lab, "a1", SocketAddr::new(web, 53), Proto::Udp)?;
            all_ok(&r, N)?;
            backends_are(&r, &["a3", "b1"])?;
            let want = SocketAddr::new(web, 53).to_string();
            ensure!(
                r.reply_sources.keys().all(|s| *s == want),
                "UDP replies should come from {want}: {:?}",
                r.reply_sources
            );
            // The backends saw the pod's own address (DNAT only).
            let a1 = lab.pod_addr("a1", v6).to_string();
            ensure!(
                r.backend_saw.keys().all(|s| *s == a1),
                "backends should see {a1}: {:?}",
                r.backend_saw
            );

            // No endpoints: refused at once (ICMP port unreachable from the pod path).
            // TCP over IPv6 is left out: the pod's stack receives the ICMPv6 error while
            // connect() still holds the socket and only keeps it as a soft error (nstat
            // TcpExtLockDroppedIcmps), so the attempt times out; see the README.
            if !v6 {
                let r = run(lab, "a1", SocketAddr::new(ip(EMPTY[0]), 80), Proto::Tcp)?;
                all_failed(&r, N, "ECONNREFUSED")?;
                ensure!(
                    Duration::from_micros(r.max_failure_us) < FAST_FAIL,
                    "rejects should fail fast: {}",
                    r.summary()
                );
            }

            // Session affinity (ClientIP): every attempt of a1 lands on one backend.
            let sticky = ip(STICKY[usize::from(v6)]);
            for (port, proto) in [(80, Proto::Tcp), (53, Proto::Udp)] {
                let r = run(lab, "a1", SocketAddr::new(sticky, port), proto)?;
                all_ok(&r, N)?;
                ensure!(
                    r.backends.len() == 1,
                    "affinity: one backend expected: {}",
                    r.summary()
                );
            }

            // Hairpin: a1 reaches itself through its Service; it sees the Service
            // address as the peer, not itself.
            let svc = ip(SELF[usize::from(v6)]);
            for (port, proto) in [(80, Proto::Tcp), (53, Proto::Udp)] {
                let r = run(lab, "a1", SocketAddr::new(svc, port), proto)?;
                all_ok(&r, N)?;
                backends_are(&r, &["a1"])?;
                ensure!(
                    r.backend_saw.keys().all(|s| *s == svc.to_string()),
                    "hairpin: a1's server should see {svc}: {:?}",
                    r.backend_saw
                );
            }
        }

        // --route-cluster-ips: a cluster IP routed to node A from outside reaches both
        // backends (b1 on node B through SNAT).
        for v6 in [false, true] {
            for proto in [Proto::Tcp, Proto::Udp] {
                let r = from_outside(lab, v6, proto)?;
                all_ok(&r, N)?;
                backends_are(&r, &["a3", "b1"])?;
            }
        }

        // Node A's counters: the pod path translated (both directions) and hairpinned,
        // answered the rejects, and the socket programs translated nothing (every
        // client here is a pod outside the host scope).
        let m = |series: &str| lab.node_metric(Node::A, series);
        let fwd = m(r#"svclb_datapath_translations_total{hook="pod",direction="forward"}"#)?;
        let rev = m(r#"svclb_datapath_translations_total{hook="pod",direction="reverse"}"#)?;
        let hairpin = m(r#"svclb_datapath_events_total{hook="pod",name="hairpin"}"#)?;
        let rejects = m(r#"svclb_datapath_rejects_total{hook="pod",reason="service"}"#)?;
        let sock = m(r#"svclb_datapath_translations_total{hook="sock",direction="forward"}"#)?;
        eprintln!(
            "node A: pod forward {fwd}, reverse {rev}, hairpin {hairpin}, rejects {rejects}; sock forward {sock}"
        );
        ensure!(
            fwd > 0 && rev > 0 && hairpin > 0 && rejects >= N && sock == 0,
            "node A counters: pod forward {fwd}, reverse {rev}, hairpin {hairpin}, rejects {rejects}, sock forward {sock}"
        );

        // status names the scope and the pod devices.
        let svc_lb = lab.bins.svc_lb.display().to_string();
        let bpffs = lab.bpffs(Node::A).display().to_string();
        let st = lab.node_cmd(Node::A, &svc_lb, &["status", "--bpffs", &bpffs])?;
        ensure!(
            st.contains("host network namespace only") && st.contains("p1,p2,p3"),
            "status should name the scope and the pod devices:\n{st}"
        );
        Ok(())
    });
}

#[test]
fn all_scope_mesh_pod_sees_a_backend() {
    pods(|lab| {
        setup(lab, "all", false)?;
        // The socket programs translated the connect() before the pod's own rules saw
        // it: the proxy sees a backend, the problem users of service meshes report.
        let r = mesh_sees(lab)?;
        let want: Vec<String> = ["a3", "b1"]
            .iter()
            .map(|p| format!("orig={}", SocketAddr::new(lab.pod_addr(p, false), POD_PORT)))
            .collect();
        ensure!(
            r.backends.keys().all(|k| want.contains(k)),
            "the proxy should see backends {want:?}: {}",
            r.summary()
        );
        // Without --route-cluster-ips a cluster IP routed to the node from outside goes
        // nowhere (the node has no route for it).
        let r = from_outside(lab, false, Proto::Tcp)?;
        ensure!(
            r.ok == 0 && r.failed == N,
            "expected every attempt to fail: {}",
            r.summary()
        );
        Ok(())
    });
}
