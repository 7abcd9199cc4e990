//! Real runtimes against the socket programs: OpenJDK (`java.net.Socket`,
//! `HttpURLConnection`, `DatagramChannel`, `DatagramSocket`) and Node.js (`net`, `http`,
//! `dgram`), each with its own standard library, run inside the lab's client namespace
//! and cgroup. A lab that only runs our own client proves only our own client: the JDK
//! dials an IPv4 Service from an AF_INET6 socket as `::ffff:VIP` by default, and Node
//! reads the peer with `getpeername()` and every reply's source with `recvmsg()`.
//!
//! - Exact counts: the dual-stack Service uses the `rr` scheduler and every attempt is a
//!   new socket, so 30 attempts over three backends give exactly 10 each; 0 failures.
//! - The application sees the Service address: the peer (`getRemoteSocketAddress()`,
//!   `socket.remoteAddress`, `socket.remoteAddress()`) and the source of every UDP reply
//!   (`DatagramPacket.getSocketAddress()`, `DatagramChannel.receive()`,
//!   `rinfo.address`), in the form the application dialled.
//! - The family the runtime really opened is read from the kernel's socket tables
//!   (`/proc/self/net/{tcp,udp}{,6}`), so the JDK's mapped path is proven, not assumed.
//! - A long-lived connected UDP socket whose backend leaves the EndpointSlice gets the
//!   error the README documents (`ECONNABORTED` / `EDESTADDRREQ`) and, reconnected as a
//!   resolver does, reaches a live backend (README, "Sockets pinned to removed backends").
//!
//! The programs are `tests/runtimes/Client.java` (single-file source launch, no javac
//! step) and `tests/runtimes/client.js`, which also serves HTTP in the backends.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test runtimes -- --test-threads=1`.
//! A missing `java` or `node` fails the test (`cargo xtask setup` installs both).
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::json;
use svc_lb_tests::{
    Bins, Lab,
    agent::Agent,
    ip,
    lab::{in_client, isolated, spawn_in_client},
    manifests::{EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    metrics,
    procs::{ChildGuard, die_with_parent},
};

const NS: &str = "runtimes";
const V4: &str = "10.96.70.10";
const V6: &str = "fd00:96::70:10";
/// The harness's server: reads a byte, answers its id, closes.
const RAW_PORT: u16 = 8080;
/// Node's `http` server in each backend (`client.js serve-http`).
const HTTP_PORT: u16 = 8081;
/// The harness's UDP server: answers every datagram with its id.
const UDP_PORT: u16 = 5353;
const JAVA_SRC: &str = include_str!("../runtimes/Client.java");
const NODE_SRC: &str = include_str!("../runtimes/client.js");
/// Attempts per job: a multiple of the three backends, so `rr` gives exact counts.
const N: u64 = 30;

/// Builds a lab with backends `ids` serving TCP on 8080 and UDP on 5353 at both their
/// addresses, writes the two client programs into the lab's directory, runs `body`,
/// tears everything down, then checks that nothing of this run is left.
fn lab_test(ids: &[&str], body: impl FnOnce(&mut Lab, &Programs) -> Result<()>) {
    isolated(|| {
        let bins =
            Bins::from_env(Some(env!("CARGO_BIN_EXE_svclb-harness"))).expect("locate the binaries");
        let mut lab = Lab::new(bins, ids).expect("build the lab");
        let plan: Vec<(String, IpAddr, IpAddr)> = lab
            .topo
            .backends
            .iter()
            .map(|b| (b.id.clone(), b.addr(false), b.addr(true)))
            .collect();
        for (id, a4, a6) in plan {
            lab.serve(
                &id,
                &id,
                &[SocketAddr::new(a4, RAW_PORT), SocketAddr::new(a6, RAW_PORT)],
                &[SocketAddr::new(a4, UDP_PORT), SocketAddr::new(a6, UDP_PORT)],
            )
            .expect("start a backend server");
        }
        let programs = Programs::write(&lab).expect("write the client programs");
        if let Err(e) = body(&mut lab, &programs) {
            panic!("{e:?}");
        }
    });
}

/// The client programs, written where the client namespace's processes can read them.
struct Programs {
    java: PathBuf,
    node: PathBuf,
}

impl Programs {
    fn write(lab: &Lab) -> Result<Self> {
        let java = lab.dir().join("Client.java");
        let node = lab.dir().join("client.js");
        std::fs::write(&java, JAVA_SRC).context("write Client.java")?;
        std::fs::write(&node, NODE_SRC).context("write client.js")?;
        Ok(Self { java, node })
    }

    /// The command line of one run: `java [flags] Client.java ARGS` or
    /// `node client.js ARGS`.
    fn argv(&self, rt: Runtime, java_flags: &[&str], args: &[String]) -> (String, Vec<String>) {
        match rt {
            Runtime::Java => {
                // C1 only and the serial collector: these runs are short, and the
                // machine is shared.
                let mut v: Vec<String> = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
                    .into_iter()
                    .chain(java_flags.iter().copied())
                    .map(str::to_owned)
                    .collect();
                v.push(self.java.display().to_string());
                v.extend(args.iter().cloned());
                ("java".to_owned(), v)
            }
            Runtime::Node => {
                let mut v = vec![self.node.display().to_string()];
                v.extend(args.iter().cloned());
                ("node".to_owned(), v)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runtime {
    Java,
    Node,
}

/// The dual-stack Service `web` (`rr`): `raw` 8080/TCP → the harness, `http` 80/TCP →
/// Node's HTTP server, `dns` 53/UDP → the harness; ready endpoints at the backends
/// `ids`, one EndpointSlice per family.
fn web_service(lab: &Lab, ids: &[&str]) -> String {
    let mut svc = Service::new(NS, "web", &[ip(V4), ip(V6)])
        .port("raw", RAW_PORT, TargetPort::Number(RAW_PORT), Protocol::Tcp)
        .port("http", 80, TargetPort::Number(HTTP_PORT), Protocol::Tcp)
        .port("dns", 53, TargetPort::Number(UDP_PORT), Protocol::Udp)
        .to_value();
    svc["metadata"]["annotations"] = json!({ "svc-lb.io/scheduler": "rr" });
    let mut docs = vec![svc];
    for v6 in [false, true] {
        let addrs: Vec<IpAddr> = ids.iter().map(|id| lab.topo.backend(id).addr(v6)).collect();
        let slice = EndpointSlice::new(NS, "web", if v6 { "v6" } else { "v4" }, v6)
            .port("raw", RAW_PORT, Protocol::Tcp)
            .port("http", HTTP_PORT, Protocol::Tcp)
            .port("dns", UDP_PORT, Protocol::Udp)
            .ready_endpoints(&addrs);
        docs.push(slice.to_value());
    }
    yaml_docs(&docs)
}

/// Starts Node's HTTP server in backend `id`'s namespace on both its addresses and waits
/// for its `ready`. Stopped by pid when the guard drops.
fn start_http_backend(lab: &Lab, programs: &Programs, id: &str) -> Result<ChildGuard> {
    let b = lab.topo.backend(id);
    let ns = b.netns.name().to_owned();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns, "node"])
        .arg(&programs.node)
        .args(["serve-http", id, &HTTP_PORT.to_string()])
        .arg(b.addr(false).to_string())
        .arg(b.addr(true).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // Spawned from the test's own thread, which outlives the server.
    die_with_parent(&mut cmd, libc::SIGKILL);
    let mut child = cmd
        .spawn()
        .context("start node (is it installed? `cargo xtask setup` installs it)")?;
    let stdout = child.stdout.take().context("node stdout")?;
    let mut guard = ChildGuard::new(child, format!("node HTTP server {id}"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line == "ready" => Ok(guard),
        other => {
            let status = guard.kill().ok();
            bail!("node HTTP server in {ns} did not start (exit {status:?}): {other:?}")
        }
    }
}

/// One job of a client run: `count` attempts of `mode` at `host:port`.
struct Job {
    mode: &'static str,
    host: &'static str,
    port: u16,
    /// Family the runtime must have opened (`inet`/`inet6`), when it can be seen.
    family: Option<&'static str>,
    /// The application reads the peer (`getpeername`) / each reply's source.
    peer: bool,
    source: bool,
}

impl Job {
    fn spec(&self) -> String {
        format!("{},{},{},{N}", self.mode, self.host, self.port)
    }

    /// The Service address as the application dialled it.
    fn dialled(&self) -> SocketAddr {
        SocketAddr::new(ip(self.host), self.port)
    }

    /// The frontend `svc-lb list` counts the attempt under.
    fn frontend(&self) -> String {
        let vip = match ip(self.host) {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            a => a,
        };
        let proto = if self.mode.starts_with("udp") {
            "UDP"
        } else {
            "TCP"
        };
        format!("{vip}:{}/{proto}", self.port)
    }
}

fn job(mode: &'static str, host: &'static str, port: u16) -> Job {
    let udp = mode.starts_with("udp");
    Job {
        mode,
        host,
        port,
        family: None,
        peer: mode == "tcp" || (udp && mode != "udp"),
        source: udp,
    }
}

#[derive(Debug, Default, Deserialize)]
struct Report {
    job: String,
    ok: u64,
    failed: u64,
    backends: BTreeMap<String, u64>,
    peers: BTreeMap<String, u64>,
    sources: BTreeMap<String, u64>,
    families: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

/// Runs `jobs` in one process of `rt` and checks every report: exactly `want` replies
/// per backend, no failure, the peer and every reply's source are the Service address
/// as dialled, and the socket's family is the one expected.
fn run_jobs(
    lab: &Lab,
    programs: &Programs,
    rt: Runtime,
    java_flags: &[&str],
    jobs: &[Job],
    want: &BTreeMap<String, u64>,
) -> Result<()> {
    let specs: Vec<String> = jobs.iter().map(Job::spec).collect();
    let (program, args) = programs.argv(rt, java_flags, &specs);
    let out = in_client(lab, &program, &args)?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<Report> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("parse {l}")))
        .collect::<Result<_>>()?;
    ensure!(
        reports.len() == jobs.len(),
        "{program}: {} reports for {} jobs: {reports:?}",
        reports.len(),
        jobs.len()
    );
    for (j, r) in jobs.iter().zip(&reports) {
        eprintln!("{rt:?} {java_flags:?} {}: {r:?}", r.job);
        let what = format!("{rt:?} {java_flags:?} {}", r.job);
        ensure!(
            r.failed == 0 && r.ok == N && r.errors.is_empty(),
            "{what}: {} of {N} failed: {:?}",
            r.failed,
            r.errors
        );
        ensure!(
            r.backends == *want,
            "{what}: replies {:?}, expected exactly {want:?}",
            r.backends
        );
        let at_vip = BTreeMap::from([(j.dialled(), N)]);
        if j.peer {
            let peers = addrs(&r.peers)?;
            ensure!(
                peers == at_vip,
                "{what}: the application saw the peers {peers:?}, expected {at_vip:?}"
            );
        }
        if j.source {
            let sources = addrs(&r.sources)?;
            ensure!(
                sources == at_vip,
                "{what}: replies came from {sources:?}, expected {at_vip:?}"
            );
        }
        if let Some(f) = j.family {
            let want_f = BTreeMap::from([(f.to_owned(), N)]);
            ensure!(
                r.families == want_f,
                "{what}: sockets of the families {:?}, expected {want_f:?}",
                r.families
            );
        }
    }
    Ok(())
}

/// `address:port` keys (as the runtime printed them: `[v6]:port`, `v4:port`, IPv6 written
/// out in full by the JDK) as socket addresses.
fn addrs(m: &BTreeMap<String, u64>) -> Result<BTreeMap<SocketAddr, u64>> {
    m.iter()
        .map(|(k, n)| {
            k.parse::<SocketAddr>()
                .with_context(|| format!("not an address: {k}"))
                .map(|a| (a, *n))
        })
        .collect()
}

fn exact(ids: &[&str]) -> BTreeMap<String, u64> {
    ids.iter()
        .map(|id| ((*id).to_owned(), N / ids.len() as u64))
        .collect()
}

/// Starts the agent (JSON logs, metrics) and returns it with its metrics address.
fn start_agent(lab: &Lab, tag: &str) -> Result<(Agent, SocketAddr)> {
    let agent = metrics::start_agent(lab, tag, &[])?;
    let addr = metrics::metrics_addr(&agent)?;
    Ok((agent, addr))
}

fn metric(addr: SocketAddr, series: &str) -> Result<f64> {
    metrics::metric(
        &metrics::parse_metrics(&metrics::http_get(addr, "/metrics")?),
        series,
    )
}

/// The frontend counters of `web` equal the attempts the jobs made through each.
fn check_counters(lab: &Lab, metrics: SocketAddr, jobs: &[&Job]) -> Result<()> {
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for j in jobs {
        *want.entry(j.frontend()).or_default() += N;
    }
    let (fes, _) = lab.list_new_connections(&format!("{NS}/web"))?;
    let fes: BTreeMap<String, u64> = fes.into_iter().filter(|(_, n)| *n > 0).collect();
    ensure!(fes == want, "frontend counters {fes:?}, expected {want:?}");
    let total = N * jobs.len() as u64;
    let xlated = metric(
        metrics,
        r#"svclb_datapath_translations_total{hook="sock",direction="forward"}"#,
    )?;
    ensure!(
        xlated == total as f64,
        "forward translations {xlated}, expected {total}"
    );
    Ok(())
}

// ---- Java ----

/// OpenJDK 17 to the dual-stack `rr` Service, 30 new sockets per job: `Socket` (TCP),
/// `HttpURLConnection` (to Node's HTTP server), connected `DatagramChannel`,
/// `DatagramSocket.connect` and unconnected `DatagramSocket`, at the IPv4 and the IPv6
/// cluster IP. By default the JDK opens AF_INET6 sockets for the IPv4 address too
/// (dialling `::ffff:VIP`): the kernel's tables must show `inet6` for every one, and
/// the JDK must hand the application the IPv4 Service address as peer and as every
/// reply's source. With `-Djava.net.preferIPv4Stack=true` the same jobs use AF_INET.
/// Exactly 10 per backend each time, no failure, and the agent counts every connection.
#[test]
fn java_sockets_http_and_datagrams_reach_dual_stack_services() {
    lab_test(&["a", "b", "c"], |lab, programs| {
        lab.write_manifest("web.yaml", &web_service(lab, &["a", "b", "c"]))?;
        let _http: Vec<ChildGuard> = ["a", "b", "c"]
            .iter()
            .map(|id| start_http_backend(lab, programs, id))
            .collect::<Result<_>>()?;
        let (_agent, metrics) = start_agent(lab, "java")?;
        let want = exact(&["a", "b", "c"]);

        let fam = |mut j: Job, f: &'static str| {
            j.family = Some(f);
            j
        };
        let mut dual = Vec::new();
        for host in [V4, V6] {
            dual.extend([
                fam(job("tcp", host, RAW_PORT), "inet6"),
                job("http", host, 80),
                fam(job("udp-channel", host, 53), "inet6"),
                fam(job("udp-socket", host, 53), "inet6"),
                fam(job("udp", host, 53), "inet6"),
            ]);
        }
        run_jobs(lab, programs, Runtime::Java, &[], &dual, &want)?;
        let v4_stack = [
            fam(job("tcp", V4, RAW_PORT), "inet"),
            job("http", V4, 80),
            fam(job("udp-socket", V4, 53), "inet"),
        ];
        run_jobs(
            lab,
            programs,
            Runtime::Java,
            &["-Djava.net.preferIPv4Stack=true"],
            &v4_stack,
            &want,
        )?;
        let all: Vec<&Job> = dual.iter().chain(&v4_stack).collect();
        check_counters(lab, metrics, &all)
    });
}

// ---- Node.js ----

/// Node.js to the dual-stack `rr` Service, 30 new sockets per job: `net.connect`,
/// `http.get` (no agent: a connection per request), `dgram` connected and unconnected,
/// at the IPv4 cluster IP (AF_INET), its mapped form `::ffff:VIP` (AF_INET6, as a
/// dual-stack `udp6` socket sends) and the IPv6 cluster IP. `socket.remoteAddress` /
/// `socket.remoteAddress()` (getpeername) and every reply's `rinfo.address` are the
/// Service address as dialled; exactly 10 per backend, no failure, every connection
/// counted.
#[test]
fn node_net_http_and_dgram_reach_dual_stack_services() {
    lab_test(&["a", "b", "c"], |lab, programs| {
        lab.write_manifest("web.yaml", &web_service(lab, &["a", "b", "c"]))?;
        let _http: Vec<ChildGuard> = ["a", "b", "c"]
            .iter()
            .map(|id| start_http_backend(lab, programs, id))
            .collect::<Result<_>>()?;
        let (_agent, metrics) = start_agent(lab, "node")?;
        let want = exact(&["a", "b", "c"]);
        let mapped = "::ffff:10.96.70.10";
        let fam = |mut j: Job, f: &'static str| {
            j.family = Some(f);
            j
        };
        let mut jobs = Vec::new();
        for (host, f) in [(V4, "inet"), (mapped, "inet6"), (V6, "inet6")] {
            jobs.extend([
                fam(job("tcp", host, RAW_PORT), f),
                fam(job("udp-connected", host, 53), f),
                fam(job("udp", host, 53), f),
            ]);
        }
        for host in [V4, V6] {
            let mut j = job("http", host, 80);
            j.peer = true;
            jobs.push(j);
        }
        run_jobs(lab, programs, Runtime::Node, &[], &jobs, &want)?;
        let all: Vec<&Job> = jobs.iter().collect();
        check_counters(lab, metrics, &all)
    });
}

// ---- long-lived connected UDP ----

/// One line of `long-udp`.
#[derive(Debug, Deserialize)]
struct Event {
    t: u64,
    event: String,
    backend: Option<String>,
    source: Option<String>,
    peer: Option<String>,
    error: Option<String>,
    op: Option<String>,
}

/// Runs `long-udp` of `rt` at `host`:53 for `ms`; once its socket has its first reply,
/// takes that backend out of `web` (both families: `keep` stays), then checks what the
/// README promises: the socket is disconnected, the application's next call fails with
/// `ECONNABORTED` (receive) or `EDESTADDRREQ` (send), within a second of the sync; the
/// client connects again (as a resolver does) and every later reply comes from a live
/// backend; every reply's source is the Service address; no reply is lost. Returns the
/// backend that was removed.
fn removed_backend_moves(
    lab: &Lab,
    agent: &mut Agent,
    programs: &Programs,
    rt: Runtime,
    host: &str,
    live: &[&str],
) -> Result<String> {
    const MS: u64 = 3000;
    let args: Vec<String> = ["long-udp", host, "53", &MS.to_string()]
        .map(str::to_owned)
        .to_vec();
    let (program, argv) = programs.argv(rt, &[], &args);
    let child = spawn_in_client(lab, &program, &argv)?;
    let mut guard = ChildGuard::new(child, format!("{program} long-udp"));
    let stdout = guard.child_mut().stdout.take().context("long-udp stdout")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    let mut events: Vec<(Instant, Event)> = Vec::new();
    let parse = |line: &str| -> Result<Event> {
        serde_json::from_str(line).with_context(|| format!("{rt:?} long-udp printed {line}"))
    };
    // The first reply names the backend the socket is connected to.
    let first = loop {
        let (at, line) = rx
            .recv_timeout(Duration::from_secs(20))
            .with_context(|| format!("{rt:?} long-udp: no reply; so far {events:?}"))?;
        let e = parse(&line)?;
        let backend = (e.event == "reply").then(|| e.backend.clone()).flatten();
        events.push((at, e));
        if let Some(b) = backend {
            break b;
        }
    };
    ensure!(live.contains(&first.as_str()), "first reply from {first}");
    let keep: Vec<&str> = live.iter().copied().filter(|b| *b != first).collect();
    let applied = agent.applied_count();
    lab.write_manifest("web.yaml", &web_service(lab, &keep))?;
    agent.wait_applied(applied + 1, Duration::from_secs(10))?;
    let synced = Instant::now();
    while let Ok((at, line)) = rx.recv_timeout(Duration::from_secs(MS / 1000 + 20)) {
        events.push((at, parse(&line)?));
    }
    let status = guard.wait()?;
    ensure!(status.success(), "{rt:?} long-udp exited {status}");
    for (_, e) in &events {
        eprintln!("{rt:?} long-udp {host}: {e:?}");
    }

    let vip = SocketAddr::new(ip(host), 53);
    let errors: Vec<&(Instant, Event)> =
        events.iter().filter(|(_, e)| e.event == "error").collect();
    let Some((err_at, first_err)) = errors.first() else {
        bail!("{rt:?}: the socket never saw its backend {first} go (no error, no move)");
    };
    for (_, e) in &errors {
        let what = e.error.as_deref().unwrap_or("?");
        ensure!(
            matches!(what, "ECONNABORTED" | "EDESTADDRREQ"),
            "{rt:?}: error {what} on {:?}, expected ECONNABORTED (receive) or EDESTADDRREQ (send) as the README says",
            e.op
        );
    }
    ensure!(
        errors.len() == 1,
        "{rt:?}: {} errors, expected one (then a new socket): {errors:?}",
        errors.len()
    );
    let late = err_at.saturating_duration_since(synced);
    ensure!(
        late < Duration::from_secs(1),
        "{rt:?}: the error came {late:?} after the sync"
    );
    let mut before = 0;
    let mut after: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen_error = false;
    let mut reconnected = false;
    for (_, e) in &events {
        match e.event.as_str() {
            "error" => seen_error = true,
            "connected" => {
                let peer: SocketAddr = e
                    .peer
                    .as_deref()
                    .unwrap_or("?")
                    .parse()
                    .with_context(|| format!("peer of {e:?}"))?;
                ensure!(peer == vip, "{rt:?}: connected to {peer}: {e:?}");
                reconnected |= seen_error;
            }
            "reply" => {
                let source: SocketAddr = e
                    .source
                    .as_deref()
                    .unwrap_or("?")
                    .parse()
                    .with_context(|| format!("reply source of {e:?}"))?;
                ensure!(source == vip, "{rt:?}: a reply from {source}: {e:?}");
                let b = e.backend.clone().unwrap_or_default();
                if seen_error {
                    *after.entry(b).or_default() += 1;
                } else {
                    ensure!(
                        b == first,
                        "{rt:?}: the connected socket moved by itself: {e:?}"
                    );
                    before += 1;
                }
            }
            _ => {}
        }
    }
    ensure!(
        reconnected,
        "{rt:?}: never connected again after {first_err:?}"
    );
    let total_after: u64 = after.values().sum();
    ensure!(
        total_after >= 10 && after.keys().all(|b| keep.contains(&b.as_str())),
        "{rt:?}: after the error, replies {after:?} (live: {keep:?})"
    );
    eprintln!(
        "{rt:?} {host}: {before} replies from {first}, then at {} ms {first_err:?}, {late:?} after the sync, then {after:?}",
        first_err.t
    );
    Ok(first)
}

/// A resolver-like client (one connected UDP socket sending every 20 ms, a new socket
/// after an error) keeps working while its backend leaves the Service: Node.js on the
/// IPv6 cluster IP, then the JDK's `DatagramSocket` on the IPv4 one (an AF_INET6 socket
/// connected to `::ffff:VIP`). Each gets one documented error within a second of the
/// sync, then only live backends answer; the agent counts both sockets destroyed.
#[test]
fn connected_udp_of_node_and_java_leaves_a_removed_backend() {
    lab_test(&["a", "b", "c"], |lab, programs| {
        lab.write_manifest("web.yaml", &web_service(lab, &["a", "b", "c"]))?;
        let (mut agent, metrics) = start_agent(lab, "longudp")?;
        let all = ["a", "b", "c"];
        let gone = removed_backend_moves(lab, &mut agent, programs, Runtime::Node, V6, &all)?;
        let live: Vec<&str> = all.iter().copied().filter(|b| *b != gone).collect();
        removed_backend_moves(lab, &mut agent, programs, Runtime::Java, V4, &live)?;
        let destroyed = metric(metrics, r#"svclb_sockets_destroyed_total{proto="udp"}"#)?;
        ensure!(
            destroyed == 2.0,
            "sockets destroyed: {destroyed}, expected 2"
        );
        Ok(())
    });
}
