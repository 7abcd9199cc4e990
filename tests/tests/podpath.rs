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

use anyhow::{Context, Result, ensure};
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
/// How long an attempt to an address nothing serves is given: a connection through
/// any path of this lab completes in a few milliseconds.
const NO_ROUTE_WAIT: Duration = Duration::from_millis(200);

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

/// Takes every pod's default route away, starts both agents with `scope`, adds a3 on
/// node A, then writes the Services (web: a3 and b1; empty: none; self: a1 only;
/// sticky: a3 and b1 with ClientIP affinity). With `pod_path` the pods' devices get the
/// per-packet path (node A finds them itself, a3's device after the agent started;
/// node B is given its list) and node A `--route-cluster-ips`; node A's status must
/// then show a3's device p3 attached.
fn setup(lab: &mut TwoNodeLab, scope: &str, pod_path: bool) -> Result<()> {
    for p in ["a1", "a2", "b1"] {
        podlab::drop_default_routes(lab, p)?;
    }
    // The pod path comes with --route-cluster-ips on node A; the other run has neither.
    let (a, b, extra) = if pod_path {
        ("", "p1", &["--route-cluster-ips"][..])
    } else {
        ("none", "none", &[][..])
    };
    podlab::start_agent(lab, Node::A, scope, a, extra)?;
    podlab::start_agent(lab, Node::B, scope, b, &[])?;
    lab.add_pod("a3", Node::A, POD_PORT)?;
    podlab::drop_default_routes(lab, "a3")?;
    // The Services once a3 exists (its address is in their EndpointSlices); the
    // directory is read whole, so the sync after the last file has all of them.
    let services = [
        ("web", &WEB, &["a3", "b1"][..], false),
        ("empty", &EMPTY, &[][..], false),
        ("self", &SELF, &["a1"][..], false),
        ("sticky", &STICKY, &["a3", "b1"][..], true),
    ];
    for (i, (name, cluster, eps, affinity)) in services.into_iter().enumerate() {
        let yaml = podlab::cluster_service(lab, name, &ips(cluster), eps, affinity);
        if i + 1 == services.len() {
            lab.apply_manifest(&format!("{name}.yaml"), &yaml)?;
        } else {
            lab.write_manifest(&format!("{name}.yaml"), &yaml)?;
        }
    }
    if pod_path {
        podlab::wait_pod_devices(lab, Node::A, "discovered: p1,p2,p3")?;
    }
    Ok(())
}

/// `N` attempts from the external client to web's cluster IP, routed via node A, each
/// given `timeout`.
fn from_outside(
    lab: &TwoNodeLab,
    v6: bool,
    proto: Proto,
    timeout: Duration,
) -> Result<ClientReport> {
    let web = ip(WEB[usize::from(v6)]);
    lab.net.route_via(web, Node::A)?;
    let port = if proto == Proto::Tcp { 80 } else { 53 };
    let mut o = lab.client(SocketAddr::new(web, port), proto);
    o.count = N;
    o.timeout = timeout;
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

            // No endpoints: refused at once, TCP by a RST, UDP by ICMP port unreachable
            // (the error a connected socket's recv reports).
            let empty = ip(EMPTY[usize::from(v6)]);
            for (port, proto) in [(80, Proto::Tcp), (53, Proto::UdpConnected)] {
                let r = run(lab, "a1", SocketAddr::new(empty, port), proto)?;
                all_failed(&r, N, "ECONNREFUSED")?;
                ensure!(
                    Duration::from_micros(r.max_failure_us) < FAST_FAIL,
                    "rejects should fail fast: {}",
                    r.summary()
                );
            }

            // The pod whose device appeared after the agent started is served too.
            let r = run(lab, "a3", SocketAddr::new(web, 80), Proto::Tcp)?;
            all_ok(&r, N)?;
            backends_are(&r, &["a3", "b1"])?;

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
                let r = from_outside(lab, v6, proto, Duration::from_secs(1))?;
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
            fwd > 0 && rev > 0 && hairpin > 0 && rejects >= 4 * N && sock == 0,
            "node A counters: pod forward {fwd}, reverse {rev}, hairpin {hairpin}, rejects {rejects}, sock forward {sock}"
        );

        // status names the scope and the pod devices.
        let svc_lb = lab.bins.svc_lb.display().to_string();
        let bpffs = lab.bpffs(Node::A).display().to_string();
        let st = lab.node_cmd(Node::A, &svc_lb, &["status", "--bpffs", &bpffs])?;
        ensure!(
            st.contains("host network namespace only") && st.contains("discovered: p1,p2,p3"),
            "status should name the scope and the pod devices:\n{st}"
        );
        // list says which programs serve which entries; trace --pod explains a pod's
        // packet: to web (forwarded, DNAT only) and to empty (a TCP reset).
        let list = lab.node_cmd(Node::A, &svc_lb, &["list", "--bpffs", &bpffs])?;
        ensure!(
            list.contains("per packet (tc) for pods on p1,p2,p3")
                && list.contains("tc/XDP on eth0"),
            "list should name the paths:\n{list}"
        );
        let a1 = SocketAddr::new(lab.pod_addr("a1", false), 40000).to_string();
        for (to, want) in [
            (format!("{}:80", WEB[0]), "FORWARD to"),
            (format!("{}:80", EMPTY[0]), "TCP RST"),
        ] {
            let t = lab.node_cmd(
                Node::A,
                &svc_lb,
                &[
                    "trace", "--pod", "--from", &a1, "--to", &to, "--bpffs", &bpffs,
                ],
            )?;
            ensure!(
                t.contains("svclb_pod_in") && t.contains(want),
                "trace --pod to {to} should say {want:?}:\n{t}"
            );
        }
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
        // nowhere (the node has no route for it). The node's ICMP errors are rate
        // limited (a few, then one a second), so most attempts end by their timeout:
        // NO_ROUTE_WAIT, far above a connection's time in this lab when a path exists.
        let r = from_outside(lab, false, Proto::Tcp, NO_ROUTE_WAIT)?;
        ensure!(
            r.ok == 0 && r.failed == N,
            "expected every attempt to fail: {}",
            r.summary()
        );
        Ok(())
    });
}

/// A dual-stack Python client: `count` attempts of `mode` (tcp, udp-connected) to
/// HOST:PORT from an AF_INET6 socket with IPV6_V6ONLY off (as Java, .NET and Go open
/// them); prints the replies' first words, the peers getpeername() reported and the
/// errors, as JSON.
const PY_CLIENT: &str = r#"
import errno, json, socket, sys
mode, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {"ok": 0, "backends": {}, "peers": {}, "errors": {}}
def inc(d, k):
    d[k] = d.get(k, 0) + 1
for i in range(count):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.settimeout(2)
    try:
        s.connect((host, port))
        inc(out["peers"], "[%s]:%d" % s.getpeername()[:2])
        s.send(b"x")
        data = s.recv(256)
        out["ok"] += 1
        inc(out["backends"], data.decode().split()[0])
    except OSError as e:
        inc(out["errors"], errno.errorcode.get(e.errno) if e.errno else repr(e))
    finally:
        s.close()
print(json.dumps(out))
"#;

#[derive(Debug, serde::Deserialize)]
struct PyReport {
    ok: u64,
    backends: std::collections::BTreeMap<String, u64>,
    peers: std::collections::BTreeMap<String, u64>,
    errors: std::collections::BTreeMap<String, u64>,
}

/// Real clients in a pod on the per-packet path (`host` scope): curl over both
/// families, Python dual-stack sockets to the IPv4-mapped Service address (TCP and
/// connected UDP: the application sees the mapped Service address as its peer), and a
/// long-lived TCP connection and a connected UDP socket that keep their backend while
/// node A's agent is killed (SIGKILL, by pid) and started again on the same pins.
#[test]
fn host_scope_real_clients_and_an_agent_kill() {
    pods(|lab| {
        setup(lab, "host", true)?;
        for v6 in [false, true] {
            let url = format!("http://{}/", SocketAddr::new(ip(WEB[usize::from(v6)]), 80));
            let mut got = std::collections::BTreeMap::<String, u64>::new();
            for _ in 0..10 {
                // --http0.9: the lab's servers answer with their id and the peer only.
                let out = podlab::pod_exec(
                    lab,
                    "a1",
                    "curl",
                    &["-sS", "-g", "--http0.9", "--max-time", "3", &url],
                )?;
                ensure!(
                    out.status.success(),
                    "curl {url} from a1: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let body = String::from_utf8_lossy(&out.stdout).into_owned();
                let id = body
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                *got.entry(id).or_default() += 1;
            }
            eprintln!("curl {url}: {got:?}");
            ensure!(
                got.keys().all(|k| k == "a3" || k == "b1") && got.values().sum::<u64>() == 10,
                "curl {url} replies: {got:?}"
            );
        }

        let mapped = format!("::ffff:{}", WEB[0]);
        for (mode, port) in [("tcp", 80u16), ("udp-connected", 53)] {
            let out = podlab::pod_exec(
                lab,
                "a1",
                "python3",
                &["-c", PY_CLIENT, mode, &mapped, &port.to_string(), "10"],
            )?;
            ensure!(
                out.status.success(),
                "python3 {mode}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let r: PyReport = serde_json::from_slice(&out.stdout)?;
            eprintln!("python3 {mode} [{mapped}]:{port}: {r:?}");
            let peer = format!("[{mapped}]:{port}");
            ensure!(
                r.ok == 10
                    && r.errors.is_empty()
                    && r.backends.keys().all(|k| k == "a3" || k == "b1")
                    && r.peers.get(&peer) == Some(&10),
                "python3 {mode}: every attempt answered by a3 or b1 with peer {peer}: {r:?}"
            );
        }

        // Long-lived flows across a killed and restarted agent.
        let web = ip(WEB[0]);
        let msgs = 60;
        let mut tcp = lab.pod_client("a1", SocketAddr::new(web, 80), Proto::Tcp);
        tcp.long_lived = true;
        let mut udp = lab.pod_client("a1", SocketAddr::new(web, 53), Proto::UdpConnected);
        udp.one_socket = true;
        let mut runs = Vec::new();
        for mut o in [tcp, udp] {
            o.count = msgs;
            o.interval = Duration::from_millis(50);
            o.timeout = Duration::from_secs(1);
            runs.push(lab.spawn_client(&o)?);
        }
        std::thread::sleep(Duration::from_millis(1000));
        let mut old = lab.take_agent(Node::A).context("node A's agent")?;
        let mut config = old.config().clone();
        let status = old.kill()?;
        eprintln!("node A's agent killed: {status}");
        drop(old);
        std::thread::sleep(Duration::from_millis(300));
        config.log_file = lab.next_agent_log(Node::A);
        lab.start_agent_with(Node::A, config)?;
        for (what, c) in ["long-lived TCP", "connected UDP"].into_iter().zip(runs) {
            let r = c.wait()?;
            eprintln!("{what} across the kill: {}", r.summary());
            all_ok(&r, msgs)?;
            ensure!(
                r.backends.len() == 1,
                "{what} changed backend: {}",
                r.summary()
            );
        }
        // The restarted agent found the same pod devices (and swapped its programs in).
        podlab::wait_pod_devices(lab, Node::A, "discovered: p1,p2,p3")?;
        let r = run(lab, "a3", SocketAddr::new(web, 80), Proto::Tcp)?;
        all_ok(&r, N)?;
        Ok(())
    });
}
