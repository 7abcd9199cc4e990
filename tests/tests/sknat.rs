//! Privileged end-to-end test of the socket reverse NAT under socket churn: one pod
//! churns through many unconnected UDP sockets, each sending to a UDP Service once,
//! while another pod's sockets keep getting replies whose source (recvfrom) and peer
//! (getpeername) is the Service address, never the backend's.
//!
//! The translation a socket needs for its replies lives in the socket's own storage
//! (`LB_SKRNATSK_V2`), so no other socket can push it out. The control run forces the
//! fallback (`--force-feature-off sk_storage_rnat`: LRU maps shared by every socket of
//! the node, 2^18 entries) and shows that the same churn makes an idle socket's reply
//! show the backend address there, so the test can tell the two apart.
//!
//! Churn size: [`CHURN_ENV`] (default [`CHURN_DEFAULT`] sockets, the number).
//!
//! Run as root, one at a time, after `cargo build --release -p svc-lb`:
//! `cargo test --release -p svc-lb-tests --features e2e --test sknat -- --test-threads=1`.
//!
//! The pods are helper processes: this test binary re-run as the ignored test
//! [`pod_helper`], which joins the lab's cgroup and a pod's network namespace (the
//! socket programs see only the lab cgroup's sockets) and then plays its role.
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, UdpSocket},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use svc_lb_tests::{
    Lab, Proto,
    agent::Agent,
    lab::with_lab,
    manifests::{EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    metrics::{http_get, metrics_addr, parse_metrics, scrape_one, start_agent},
    netns::{Netns, enter_netns},
    procs::ChildGuard,
};

const NS: &str = "sknat";
const VIP: &str = "10.96.61.10";
const PORT: u16 = 53;
const TARGET: u16 = 5353;

/// Sockets the churning pod opens (one datagram each), unless [`CHURN_ENV`] says.
const CHURN_DEFAULT: u64 = 500_000;
const CHURN_ENV: &str = "SVCLB_SKNAT_CHURN";

/// The helper's role and its arguments (JSON), and the line prefix of its answers.
const ROLE_ENV: &str = "SVCLB_SKNAT_ROLE";
const OUT: &str = "SKNAT ";

fn e2e(ids: &[&str], body: impl FnOnce(&mut Lab) -> Result<()>) {
    with_lab(env!("CARGO_BIN_EXE_svclb-harness"), ids, body);
}

fn churn_count() -> Result<u64> {
    match std::env::var(CHURN_ENV) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{CHURN_ENV}={v} is not a number")),
        Err(_) => Ok(CHURN_DEFAULT),
    }
}

fn service(lab: &Lab) -> String {
    let host = lab.topo.backend("a");
    let svc = Service::new(NS, "dns", &[VIP.parse().expect("VIP")]).port(
        "dns",
        PORT,
        TargetPort::Number(TARGET),
        Protocol::Udp,
    );
    let slice = EndpointSlice::new(NS, "dns", "x", false)
        .port("dns", TARGET, Protocol::Udp)
        .ready_endpoints(&[host.addr(false)])
        .to_value();
    yaml_docs(&[svc.to_value(), slice])
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().expect("VIP"), PORT)
}

// ---- the pods (helper processes) ----

/// What a helper does.
#[derive(Serialize, Deserialize, Debug)]
enum Role {
    /// Opens `sockets` unconnected UDP sockets one after another, each sending one
    /// datagram to `target` and closing.
    Churn { sockets: u64, target: SocketAddr },
    /// Sends one datagram from an unconnected and from a connected socket to `target`,
    /// says `ready`, waits for `go` on stdin, then reads both replies (queued since),
    /// then does one fresh round on each socket.
    Idle { target: SocketAddr },
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct ChurnReport {
    sockets: u64,
    elapsed_ms: u64,
    /// sendto errors by errno (a pod without a route: ENETUNREACH, after the socket
    /// program translated the destination).
    send_errors: BTreeMap<i32, u64>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct IdleReport {
    /// recvfrom sources and getpeername answers, in order: the replies read after the
    /// churn first, then the fresh round.
    unconnected_sources: Vec<String>,
    connected_sources: Vec<String>,
    connected_peers: Vec<String>,
}

fn say(v: &impl Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{OUT}{}", serde_json::to_string(v)?)?;
    out.flush()?;
    Ok(())
}

fn churn(sockets: u64, target: SocketAddr) -> Result<ChurnReport> {
    let start = Instant::now();
    let mut report = ChurnReport {
        sockets,
        ..Default::default()
    };
    for _ in 0..sockets {
        let s = UdpSocket::bind("0.0.0.0:0").context("bind a churn socket")?;
        if let Err(e) = s.send_to(b"?", target) {
            *report
                .send_errors
                .entry(e.raw_os_error().unwrap_or(-1))
                .or_default() += 1;
        }
    }
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

fn recv_source(s: &UdpSocket) -> Result<String> {
    let mut buf = [0u8; 512];
    let (_, from) = s.recv_from(&mut buf).context("recv")?;
    Ok(from.to_string())
}

fn idle(target: SocketAddr) -> Result<IdleReport> {
    let timeout = Some(Duration::from_secs(3));
    let unconnected = UdpSocket::bind("0.0.0.0:0")?;
    unconnected.set_read_timeout(timeout)?;
    let connected = UdpSocket::bind("0.0.0.0:0")?;
    connected.set_read_timeout(timeout)?;
    connected.connect(target).context("connect")?;
    unconnected.send_to(b"?", target).context("sendto")?;
    connected.send(b"?").context("send")?;
    say(&"ready")?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    ensure!(line.trim() == "go", "expected go, got {line:?}");
    let mut r = IdleReport::default();
    for round in 0..2 {
        if round == 1 {
            unconnected.send_to(b"?", target).context("sendto")?;
            connected.send(b"?").context("send")?;
        }
        r.unconnected_sources.push(recv_source(&unconnected)?);
        r.connected_sources.push(recv_source(&connected)?);
        r.connected_peers
            .push(connected.peer_addr().context("getpeername")?.to_string());
    }
    Ok(r)
}

/// Runs the pods on one CPU. The LRU maps keep a CPU's newest entries on that CPU's own
/// list until it needs room, so a churn on another CPU may happen to spare the idle
/// pod's entries: on one CPU the control run's eviction does not depend on scheduling.
fn pin_to_first_cpu() -> Result<()> {
    // SAFETY: cpu_set_t is plain data; both calls get its exact size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        let first = (0..libc::CPU_SETSIZE as usize)
            .find(|c| libc::CPU_ISSET(*c, &set))
            .context("no CPU in the affinity mask")?;
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(first, &mut one);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

/// Not a test of its own: the pods of the tests below run this (ignored) test in a
/// child process with [`ROLE_ENV`] set.
#[test]
#[ignore = "helper process of the sknat tests; they run it"]
fn pod_helper() {
    let run = || -> Result<()> {
        let role: Role = serde_json::from_str(&std::env::var(ROLE_ENV).context(ROLE_ENV)?)?;
        let cgroup = std::env::var("SVCLB_SKNAT_CGROUP").context("cgroup")?;
        std::fs::write(
            std::path::Path::new(&cgroup).join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("join cgroup {cgroup}"))?;
        enter_netns(&std::env::var("SVCLB_SKNAT_NETNS").context("netns")?)?;
        pin_to_first_cpu()?;
        match role {
            Role::Churn { sockets, target } => say(&churn(sockets, target)?),
            Role::Idle { target } => say(&idle(target)?),
        }
    };
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}

/// A running pod.
struct Pod {
    child: ChildGuard,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Pod {
    fn start(lab: &Lab, netns: &str, role: &Role) -> Result<Self> {
        let exe = std::env::current_exe().context("this test binary")?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "pod_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, serde_json::to_string(role)?)
        .env("SVCLB_SKNAT_CGROUP", lab.cgroup())
        .env("SVCLB_SKNAT_NETNS", netns)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        let mut child = cmd.spawn().context("start a pod helper")?;
        let stdout = child.stdout.take().context("pod stdout")?;
        Ok(Self {
            child: ChildGuard::new(child, "sknat pod"),
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The pod's next answer.
    fn answer<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T> {
        for line in self.lines.by_ref() {
            let line = line?;
            // libtest prints `test pod_helper ... ` on the same line first.
            if let Some((_, json)) = line.split_once(OUT) {
                return serde_json::from_str(json).with_context(|| format!("pod said {json}"));
            }
        }
        let status = self.child.wait()?;
        bail!("the pod ended ({status}) without an answer")
    }

    fn tell(&mut self, what: &str) -> Result<()> {
        let stdin = self.child.child_mut().stdin.as_mut().context("pod stdin")?;
        writeln!(stdin, "{what}")?;
        stdin.flush()?;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        let status = self.child.wait()?;
        ensure!(status.success(), "pod exited with {status}");
        Ok(())
    }
}

/// Socket-path forward translations so far (`svclb_datapath_translations`).
fn forward_translations(agent: &Agent) -> Result<f64> {
    let m = parse_metrics(&http_get(metrics_addr(agent)?, "/metrics")?);
    m.iter()
        .find(|(k, _)| {
            k.starts_with("svclb_datapath_translations")
                && k.contains("hook=\"sock\"")
                && k.contains("direction=\"forward\"")
        })
        .map(|(_, v)| *v)
        .context("no socket forward-translation counter in /metrics")
}

/// What one run saw.
struct Outcome {
    churn: ChurnReport,
    idle: IdleReport,
    /// The long-running clients of the other pod.
    unconnected: svc_lb_tests::ClientReport,
    connected: svc_lb_tests::ClientReport,
    translated: f64,
    /// Entries of the IPv4 LRU map after the churn.
    lru_entries: f64,
}

/// The agent (with `extra` flags) serves the Service; the idle pod's sockets send
/// before the churn and read after it, the busy pod's clients send and receive all
/// along, and the churning pod opens `sockets` sockets.
fn run(lab: &mut Lab, tag: &str, extra: &[&str], sockets: u64) -> Result<Outcome> {
    let a = lab.topo.backend("a").addr(false);
    lab.serve("a", "a", &[], &[SocketAddr::new(a, TARGET)])?;
    lab.write_manifest("dns.yaml", &service(lab))?;
    let agent = start_agent(lab, tag, extra)?;
    // The churning pod: its own namespace, with no route (its datagrams are translated
    // by the socket program, then fail locally with ENETUNREACH: nothing leaves it).
    let churn_ns = Netns::new().context("the churning pod's namespace")?;
    let client_ns = lab.topo.client.name().to_owned();

    let mut idle_pod = Pod::start(lab, &client_ns, &Role::Idle { target: vip() })?;
    let ready: String = idle_pod.answer()?;
    ensure!(ready == "ready", "idle pod said {ready}");
    // Long enough to cover the churn (57 000 to 150 000 sockets/s on a loaded 2-CPU
    // machine); checked below.
    let window = Duration::from_secs((sockets / 25_000).max(5) + 3);
    let opts = |proto| {
        let mut o = lab.client(vip(), proto);
        o.count = 0;
        o.duration = Some(window);
        o.interval = Duration::from_millis(20);
        o.timeout = Duration::from_millis(1000);
        o.one_socket = true;
        o
    };
    let busy_unconnected = lab.spawn_client(&opts(Proto::Udp))?;
    let busy_connected = lab.spawn_client(&opts(Proto::UdpConnected))?;
    let before = forward_translations(&agent)?;
    let mut churn_pod = Pod::start(
        lab,
        churn_ns.name(),
        &Role::Churn {
            sockets,
            target: vip(),
        },
    )?;
    let churn: ChurnReport = churn_pod.answer()?;
    churn_pod.finish()?;
    let translated = forward_translations(&agent)? - before;
    let lru_entries = scrape_one(
        &agent,
        &format!(
            "svclb_map_entries{{map=\"{}\"}}",
            svc_lb_common::MAP_SOCK_RNAT4
        ),
    )?;
    idle_pod.tell("go")?;
    let idle: IdleReport = idle_pod.answer()?;
    idle_pod.finish()?;
    let unconnected = busy_unconnected.wait()?;
    let connected = busy_connected.wait()?;
    eprintln!(
        "{tag}: churn of {} sockets took {} ms ({:.0} sockets/s), send errors {:?}; {translated} forward translations; {lru_entries} entries in the IPv4 LRU map",
        churn.sockets,
        churn.elapsed_ms,
        churn.sockets as f64 * 1000.0 / churn.elapsed_ms.max(1) as f64,
        churn.send_errors
    );
    eprintln!("{tag}: idle pod {idle:?}");
    eprintln!(
        "{tag}: busy unconnected {}; sources {:?}",
        unconnected.summary(),
        unconnected.reply_sources
    );
    eprintln!(
        "{tag}: busy connected {}; sources {:?}; peers {:?}",
        connected.summary(),
        connected.reply_sources,
        connected.peer_names
    );
    ensure!(
        churn.elapsed_ms < window.as_millis() as u64,
        "the churn ({} ms) outlasted the busy clients' window ({window:?})",
        churn.elapsed_ms
    );
    ensure!(
        translated >= sockets as f64,
        "only {translated} translations for {sockets} churn sockets: the churn did not go through the socket programs"
    );
    drop(agent);
    Ok(Outcome {
        churn,
        idle,
        unconnected,
        connected,
        translated,
        lru_entries,
    })
}

/// Answers whose address is not the Service's.
fn wrong(addrs: &BTreeMap<String, u64>) -> u64 {
    let want = vip().to_string();
    addrs
        .iter()
        .filter(|(a, _)| **a != want)
        .map(|(_, n)| *n)
        .sum()
}

fn count_all(v: &[String]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for a in v {
        *m.entry(a.clone()).or_default() += 1;
    }
    m
}

/// The scenario: 500 000 unconnected UDP sockets in one pod, and the other
/// pod's sockets (idle through the churn, and busy all along) see only the Service
/// address in their replies.
#[test]
fn socket_churn_in_one_pod_never_breaks_another_pods_replies() {
    e2e(&["a"], |lab| {
        let sockets = churn_count()?;
        let o = run(lab, "sk", &[], sockets)?;
        ensure!(o.translated >= sockets as f64);
        let vip = vip().to_string();
        for (name, r) in [("unconnected", &o.unconnected), ("connected", &o.connected)] {
            ensure!(
                r.is_consistent() && r.failed == 0 && r.ok > 0,
                "busy {name} client: {}; {:?}",
                r.summary(),
                r.failure_samples
            );
            ensure!(
                r.reply_sources.values().sum::<u64>() == r.ok && wrong(&r.reply_sources) == 0,
                "busy {name} client: replies from {:?}, expected {vip} only",
                r.reply_sources
            );
        }
        ensure!(
            o.connected.peer_names.values().sum::<u64>() == o.connected.ok
                && wrong(&o.connected.peer_names) == 0,
            "busy connected client: getpeername {:?}",
            o.connected.peer_names
        );
        let idle = &o.idle;
        for (name, v) in [
            ("unconnected source", &idle.unconnected_sources),
            ("connected source", &idle.connected_sources),
            ("connected peer", &idle.connected_peers),
        ] {
            ensure!(
                v.len() == 2 && wrong(&count_all(v)) == 0,
                "idle pod, {name}: {v:?}, expected {vip} twice"
            );
        }
        ensure!(o.churn.sockets == sockets);
        // Unconnected sends write no global entry: the LRU map holds the connected
        // UDP sockets only (the busy client's one socket, the idle pod's one).
        ensure!(
            o.lru_entries <= 4.0,
            "{} entries in the IPv4 LRU map after the churn; expected the connected sockets' only",
            o.lru_entries
        );
        Ok(())
    });
}

/// The control: with the LRU fallback forced, the same churn (more sockets than the
/// LRU maps hold) evicts the idle sockets' translations, and their replies show the
/// backend address. This is what the socket storage prevents, and shows that the test
/// above would see it.
#[test]
fn lru_fallback_loses_an_idle_sockets_translation_under_the_same_churn() {
    e2e(&["a"], |lab| {
        let sockets = churn_count()?.max(2 * u64::from(svc_lb_common::SOCK_RNAT_MAP_MAX));
        let o = run(
            lab,
            "lru",
            &["--force-feature-off", "sk_storage_rnat"],
            sockets,
        )?;
        ensure!(
            o.lru_entries >= f64::from(svc_lb_common::SOCK_RNAT_MAP_MAX) * 0.9,
            "the churn left only {} entries in the IPv4 LRU map",
            o.lru_entries
        );
        let backend = SocketAddr::new(lab.topo.backend("a").addr(false), TARGET).to_string();
        let idle = &o.idle;
        let first = [&idle.unconnected_sources[0], &idle.connected_sources[0]];
        ensure!(
            first.iter().all(|s| **s == backend),
            "the idle sockets' first replies came from {first:?}; with the LRU maps churned through twice, expected the backend address {backend}"
        );
        // A new send re-records the translation: the fresh round shows the Service again.
        let vip = vip().to_string();
        ensure!(
            idle.unconnected_sources[1] == vip,
            "fresh round: {:?}",
            idle.unconnected_sources
        );
        Ok(())
    });
}

/// An upgrade from an agent whose programs kept a socket's reverse NAT in
/// `LB_SKRNATSK_V1` (48-byte slots, before `LB_SKRNATSK_V2`): a socket that dialled the
/// Service under the old agent still gets replies (recvfrom) and a peer (getpeername)
/// with the Service address after the new agent replaced the programs, because the new
/// programs read the old store after a miss in theirs.
///
/// Needs the old agent's binary (`SVCLB_OLD_BIN`, e.g. a build of a commit before
/// `LB_SKRNATSK_V2`), so it is not part of the normal run:
/// `SVCLB_OLD_BIN=/path/to/old/svc-lb cargo test --release -p svc-lb-tests --features e2e --test sknat -- --ignored --test-threads=1 upgrade`.
#[test]
#[ignore = "needs SVCLB_OLD_BIN, an agent from before LB_SKRNATSK_V2"]
fn upgrade_keeps_the_reverse_nat_of_sockets_in_the_old_store() {
    e2e(&["a"], |lab| {
        let old = std::env::var("SVCLB_OLD_BIN").context("SVCLB_OLD_BIN (the old agent)")?;
        let new = std::mem::replace(&mut lab.bins.svc_lb, old.into());
        let a = lab.topo.backend("a").addr(false);
        lab.serve("a", "a", &[], &[SocketAddr::new(a, TARGET)])?;
        lab.write_manifest("dns.yaml", &service(lab))?;
        let old_agent = start_agent(lab, "old", &[])?;
        let client_ns = lab.topo.client.name().to_owned();
        let mut idle_pod = Pod::start(lab, &client_ns, &Role::Idle { target: vip() })?;
        let ready: String = idle_pod.answer()?;
        ensure!(ready == "ready", "idle pod said {ready}");
        drop(old_agent);
        let old_pin = lab.bpffs().join(svc_lb_common::MAP_SOCK_RNAT_SK_V1);
        ensure!(
            old_pin.exists(),
            "the old agent left no {} pin: is SVCLB_OLD_BIN older than LB_SKRNATSK_V2?",
            svc_lb_common::MAP_SOCK_RNAT_SK_V1
        );
        lab.bins.svc_lb = new;
        let new_agent = start_agent(lab, "new", &[])?;
        idle_pod.tell("go")?;
        let idle: IdleReport = idle_pod.answer()?;
        idle_pod.finish()?;
        drop(new_agent);
        eprintln!("upgrade: idle pod {idle:?}");
        let vip = vip().to_string();
        for (what, got) in [
            ("unconnected recvfrom", &idle.unconnected_sources),
            ("connected recvfrom", &idle.connected_sources),
            ("getpeername", &idle.connected_peers),
        ] {
            ensure!(
                got.iter().all(|a| *a == vip),
                "{what} after the upgrade: {got:?}, expected {vip} (first: the socket's translation from before the upgrade; second: a fresh send)"
            );
        }
        Ok(())
    });
}
