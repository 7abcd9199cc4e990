//! Chaos and soak: the real agent in Kubernetes mode while everything that goes wrong on a
//! node goes wrong at once, and then for a long time.
//!
//! Run as root, one at a time (the short chaos test is part of `cargo xtask test`):
//! `cargo test --release -p svc-lb-tests --features e2e --test chaos -- --test-threads=1`;
//! the long forms: `cargo xtask test --long`, or `SVCLB_LONG=1` and `--include-ignored`.
//!
//! # The lab
//! Two Services, `alpha` (10.96.7.1) and `beta` (10.96.7.2), each with TCP port 80 → 8080
//! and UDP port 53 → 5353, served by ten backend namespaces that answer every request with
//! their name: `s1` and `s2` are always ready in both Services; `c1`..`c8` are churned in
//! and out of each Service independently. A churned endpoint goes ready → terminating
//! (`ready: false, serving: true, terminating: true`) → removed from the slice → ready
//! again, one change per EndpointSlice write, and stays at least 150 ms ready, 60 ms
//! terminating and 400 ms removed. Its server runs the whole time, as a terminating pod
//! still serves: so a correct agent can send every connection somewhere that answers, and
//! any failed connect is the agent's (or the datapath's) fault.
//!
//! # The chaos test
//! While four clients (TCP and UDP to both VIPs, a new socket per attempt, one attempt
//! every 3 ms, 3 s timeout) run from the lab's client namespace, three things happen at
//! once for 45 s (`SVCLB_LONG=1`: 10 minutes; `SVCLB_CHAOS_SECS=N`: N seconds):
//! - endpoint churn at 60 changes/s (the test fails below 50/s, measured);
//! - the agent is restarted every 2.5–7.5 s, alternately with SIGKILL and with SIGTERM;
//!   the next one starts at once and the loop waits for its first applied sync. Every
//!   third time an agent is first started and SIGKILLed 20–600 ms later, while it loads,
//!   pins, swaps its links or runs its first sync;
//! - the fake API server flaps every 3 s, in turn: it cuts every connection, refuses
//!   connections for 0.8 s, ends every watch cleanly, expires its history (410 Gone on
//!   every watch: the agent must relist), refuses connections for 1.5 s.
//!
//! It then asserts, with every count printed:
//! - **failed attempts = 0**: every attempt got its answer, UDP replies came from the VIP
//!   and TCP getpeername() showed the VIP (a reply from the backend's own address is a
//!   failure too: the application would drop it);
//! - **stale connects = 0**: no attempt reached a backend whose removal had been applied
//!   more than 100 ms before the attempt started, while the API still had it removed.
//!
//! "Applied" needs a definition that the agent cannot fake and the test can measure. The
//! agent's own `sync applied` log line does not say which API change a sync held (there is
//! no generation to match), so the test reads what the connect and sendmsg hooks act on:
//! a sampler thread reads the pinned service and backend maps every 10 ms and records,
//! per frontend, which backend addresses are in its slots 1..count. For one removal of
//! endpoint B from Service S (the API write that made it terminating, at time r; B's next
//! re-add at time q, or never):
//! - applied = the first of two consecutive samples at or after r (and after the maps
//!   first showed this incarnation of B, if they did before q) in which B is not in the
//!   frontend's slots. One sample alone is not enough: the sampler reads the maps one
//!   entry at a time while the agent writes them, so a single read can miss an entry that
//!   the kernel held all along (the test counts and prints such lone absences);
//! - a stale connect = an attempt to that frontend that started in
//!   [applied + 100 ms, q) and was answered by B.
//!
//! A sample is late by up to its period (10 ms plus scheduling), which only shortens the
//! window in the agent's favour; the test prints the largest gap between samples. A
//! backend that the maps show again after its removal was applied (a restart that brings
//! back stale state, a relist that loses a delete) therefore counts, and so does a
//! datapath that keeps routing to a backend no longer in the slots. A removal that the
//! agent never applies is caught by the end of the run: once the chaos stops, the maps
//! must match the API's final state within 20 s. The test also prints the lag from the
//! API write to the maps (median and maximum) and fails if nothing was checked (no
//! removals applied, no replies from churned backends, too few restarts or flaps).
//!
//! # The soak (`#[ignore]`d: `cargo xtask test --long`)
//! The same lab with one agent and no restarts or flaps, for 10 minutes
//! (`SVCLB_SOAK_SECS=N`: N seconds): churn at 60 changes/s, and the four clients at one
//! attempt every 10 ms. Every 10 s (a sixtieth of the run, at least 1 s) it samples the
//! agent's RSS (`VmRSS` of /proc/PID/status) and the entry count of every pinned map
//! (`svc_lb_common::ALL_MAPS`, counted as `svc-lb status` counts them). **Flat** means,
//! for each series, with the samples cut into four quarters and the first one ignored as
//! warm-up: mean(last quarter) ≤ mean(second quarter) × 1.10 + slack, where the slack is
//! 4 MiB for RSS and 32 entries for a map (the churn moves the service maps by a few
//! entries from one sample to the next). Every attempt must also be answered.
#![cfg(feature = "e2e")]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use svc_lb::datapath::pinned::PinnedMaps;
use svc_lb_common::{ALL_MAPS, PROTO_TCP, PROTO_UDP};
use svc_lb_tests::{
    ClientReport, Lab, Proto, agent::Agent, checks::unix_us, fakeapi::FakeApi, lab::with_lab,
    procs::ClientRun,
};

const NS: &str = "chaos";
const NODE: &str = "node-1";
/// The node's InternalIP (nothing in the lab owns it; no node port is used here).
const NODE_IP: &str = "10.250.0.1";
/// Always ready in both Services: a correct agent always has somewhere to send a
/// connection.
const STABLE: [&str; 2] = ["s1", "s2"];
/// Churned in and out of each Service.
const CHURN: [&str; 8] = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"];
/// (name, cluster IP).
const SERVICES: [(&str, Ipv4Addr); 2] = [
    ("alpha", Ipv4Addr::new(10, 96, 7, 1)),
    ("beta", Ipv4Addr::new(10, 96, 7, 2)),
];
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
/// A connect may still reach a backend this long after its removal was applied.
const GRACE: Duration = Duration::from_millis(100);
/// Endpoint changes per second the churn aims at, and the least the test accepts.
const CHURN_RATE: f64 = 60.0;
const MIN_CHURN_RATE: f64 = 50.0;
/// How often the sampler reads the maps.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// How long the maps may take to match the API once the chaos stops.
const CONVERGE: Duration = Duration::from_secs(20);
const CHAOS_SHORT: Duration = Duration::from_secs(45);
const LONG: Duration = Duration::from_secs(600);
const RESTART_EVERY: Duration = Duration::from_secs(5);
const FLAP_EVERY: Duration = Duration::from_secs(3);
/// Per-attempt timeout of the clients: generous, because a loaded 2-core machine can
/// stall a process for a while; a lost packet or a refused connect still fails fast.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

fn long() -> bool {
    std::env::var("SVCLB_LONG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `$name` in seconds, else `default`.
fn env_secs(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(default, Duration::from_secs)
}

// ---------------------------------------------------------------------------------
// Backends, frontends and the bits of a map sample.

/// Backend names in topology order: stable first, then churned.
fn ids() -> Vec<&'static str> {
    STABLE.iter().chain(CHURN.iter()).copied().collect()
}

/// Index of churned backend `c` among all backends.
fn churn_backend(c: usize) -> usize {
    STABLE.len() + c
}

/// Frontend index: Service `s`, TCP (0) or UDP (1).
fn frontend(s: usize, udp: bool) -> usize {
    s * 2 + usize::from(udp)
}

fn frontend_of(addr: IpAddr, port: u16, proto: u8) -> Option<usize> {
    let s = SERVICES
        .iter()
        .position(|(_, ip)| addr == IpAddr::V4(*ip))?;
    match (port, proto) {
        (TCP_PORT, PROTO_TCP) => Some(frontend(s, false)),
        (UDP_PORT, PROTO_UDP) => Some(frontend(s, true)),
        _ => None,
    }
}

/// The bit of (frontend, backend) in a sample.
fn bit(f: usize, b: usize) -> u64 {
    1 << (f * 16 + b)
}

fn vip(f: usize) -> SocketAddr {
    let (_, ip) = SERVICES[f / 2];
    let port = if f % 2 == 1 { UDP_PORT } else { TCP_PORT };
    SocketAddr::new(IpAddr::V4(ip), port)
}

// ---------------------------------------------------------------------------------
// Objects, as the API server holds them.

/// A churned endpoint's state in one Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ep {
    Ready,
    Terminating,
    Gone,
}

impl Ep {
    fn next(self) -> Self {
        match self {
            Ep::Ready => Ep::Terminating,
            Ep::Terminating => Ep::Gone,
            Ep::Gone => Ep::Ready,
        }
    }

    /// The least time an endpoint stays in this state.
    fn dwell(self) -> Duration {
        Duration::from_millis(match self {
            Ep::Ready => 150,
            Ep::Terminating => 60,
            Ep::Gone => 400,
        })
    }
}

fn node() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": NODE_IP}, {"type": "Hostname", "address": NODE}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ok", "lastHeartbeatTime": "2025-01-15T09:30:00Z", "lastTransitionTime": "2025-01-15T09:30:00Z"}],
        },
    })
}

fn service(s: usize) -> Value {
    let (name, ip) = SERVICES[s];
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip.to_string(),
            "clusterIPs": [ip.to_string()],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": [
                {"name": "tcp", "port": TCP_PORT, "protocol": "TCP", "targetPort": TCP_TARGET},
                {"name": "udp", "port": UDP_PORT, "protocol": "UDP", "targetPort": UDP_TARGET},
            ],
        },
        "status": {"loadBalancer": {}},
    })
}

/// Service `s`'s one EndpointSlice: the stable backends ready, the churned ones as
/// `churn` says.
fn slice(s: usize, addrs: &[IpAddr], churn: &[Ep]) -> Value {
    let (name, _) = SERVICES[s];
    let conditions = |ep: Ep| match ep {
        Ep::Ready => json!({"ready": true, "serving": true, "terminating": false}),
        _ => json!({"ready": false, "serving": true, "terminating": true}),
    };
    let endpoints: Vec<Value> = (0..STABLE.len())
        .map(|b| (b, Ep::Ready))
        .chain(
            churn
                .iter()
                .enumerate()
                .map(|(c, ep)| (churn_backend(c), *ep)),
        )
        .filter(|(_, ep)| *ep != Ep::Gone)
        .map(|(b, ep)| {
            json!({
                "addresses": [addrs[b].to_string()],
                "conditions": conditions(ep),
                "nodeName": NODE,
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-1"),
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "tcp", "port": TCP_TARGET, "protocol": "TCP"},
            {"name": "udp", "port": UDP_TARGET, "protocol": "UDP"},
        ],
        "endpoints": endpoints,
    })
}

/// The maps' content the API asks for: every stable backend and every ready churned one,
/// in both frontends of each Service.
fn desired_mask(states: &[Vec<Ep>]) -> u64 {
    let mut mask = 0;
    for (s, churn) in states.iter().enumerate() {
        for udp in [false, true] {
            let f = frontend(s, udp);
            for b in 0..STABLE.len() {
                mask |= bit(f, b);
            }
            for (c, ep) in churn.iter().enumerate() {
                if *ep == Ep::Ready {
                    mask |= bit(f, churn_backend(c));
                }
            }
        }
    }
    mask
}

// ---------------------------------------------------------------------------------
// The cluster: API server, agent, clients.

fn lock(api: &Mutex<FakeApi>) -> MutexGuard<'_, FakeApi> {
    api.lock().unwrap_or_else(|p| p.into_inner())
}

struct Cluster {
    api: Arc<Mutex<FakeApi>>,
    kubeconfig: PathBuf,
    /// Backend IPv4 addresses, in [`ids`] order.
    addrs: Vec<IpAddr>,
    starts: usize,
}

impl Cluster {
    /// Backends serving, the API server holding the Node, both Services and their slices
    /// with every endpoint ready.
    fn new(lab: &mut Lab) -> Result<Self> {
        let addrs = lab.topo.addrs(false);
        for (b, id) in ids().into_iter().enumerate() {
            lab.serve(
                id,
                id,
                &[SocketAddr::new(addrs[b], TCP_TARGET)],
                &[SocketAddr::new(addrs[b], UDP_TARGET)],
            )?;
        }
        let api = FakeApi::start()?;
        let kubeconfig = lab.dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        api.apply(node())?;
        for s in 0..SERVICES.len() {
            api.apply(service(s))?;
            api.apply(slice(s, &addrs, &[Ep::Ready; CHURN.len()]))?;
        }
        Ok(Self {
            api: Arc::new(Mutex::new(api)),
            kubeconfig,
            addrs,
            starts: 0,
        })
    }

    /// Starts an agent and waits for its first applied sync.
    fn start_agent(&mut self, lab: &Lab) -> Result<Agent> {
        let mut agent = self.spawn_agent(lab)?;
        agent
            .wait_applied(1, Duration::from_secs(60))
            .with_context(|| format!("agent start #{}", self.starts))?;
        Ok(agent)
    }

    /// Starts an agent without waiting for anything.
    fn spawn_agent(&mut self, lab: &Lab) -> Result<Agent> {
        self.starts += 1;
        Agent::start(lab.kube_agent_config(
            &self.kubeconfig,
            NODE,
            &format!("chaos-agent-{}.log", self.starts),
            &[],
        ))
    }
}

/// xorshift64: enough to spread restarts over the agent's phases.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        Self(unix_us() | 1)
    }

    /// Uniform in [lo, hi).
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = u64::try_from((hi - lo).as_micros()).unwrap_or(1).max(1);
        lo + Duration::from_micros(self.0 % span)
    }
}

/// One client per frontend, `duration` long, recording every attempt.
fn spawn_clients(
    lab: &Lab,
    duration: Duration,
    interval: Duration,
) -> Result<Vec<(usize, ClientRun)>> {
    let mut runs = Vec::new();
    for s in 0..SERVICES.len() {
        for udp in [false, true] {
            let f = frontend(s, udp);
            let proto = if udp { Proto::Udp } else { Proto::Tcp };
            let mut o = lab.client(vip(f), proto);
            o.count = 0;
            o.duration = Some(duration);
            o.interval = interval;
            o.timeout = CLIENT_TIMEOUT;
            o.timeline = true;
            runs.push((f, lab.spawn_client(&o)?));
        }
    }
    Ok(runs)
}

/// Sleeps `d` in short steps; true when `stop` was raised meanwhile.
fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    stop.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------
// Churn.

/// One endpoint change, timed just before the API server stored it.
#[derive(Clone, Copy, Debug)]
struct Change {
    at_us: u64,
    s: usize,
    c: usize,
    to: Ep,
}

struct ChurnLog {
    changes: Vec<Change>,
    elapsed: Duration,
    /// Ticks with no endpoint past its least dwell time.
    idle_ticks: u64,
    last: Vec<Vec<Ep>>,
}

impl ChurnLog {
    fn rate(&self) -> f64 {
        self.changes.len() as f64 / self.elapsed.as_secs_f64().max(0.001)
    }
}

/// Changes one churned endpoint every 1/[`CHURN_RATE`] s (on an absolute schedule, so
/// a stalled thread catches up): the one that has waited longest past its least dwell
/// time. Each change is one EndpointSlice write. Runs until `stop`.
fn churn(api: &Mutex<FakeApi>, addrs: &[IpAddr], stop: &AtomicBool) -> Result<ChurnLog> {
    let start = Instant::now();
    let mut states: Vec<Vec<(Ep, Instant)>> = (0..SERVICES.len())
        .map(|_| vec![(Ep::Ready, start); CHURN.len()])
        .collect();
    let period = Duration::from_secs_f64(1.0 / CHURN_RATE);
    let mut changes = Vec::new();
    let mut idle_ticks = 0;
    let mut tick: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick += 1;
        let due = start + period * tick;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let now = Instant::now();
        let pick = states
            .iter()
            .enumerate()
            .flat_map(|(s, v)| v.iter().enumerate().map(move |(c, st)| (s, c, *st)))
            .filter(|(_, _, (ep, since))| now.duration_since(*since) >= ep.dwell())
            .min_by_key(|(_, _, (ep, since))| *since + ep.dwell());
        let Some((s, c, (ep, _))) = pick else {
            idle_ticks += 1;
            continue;
        };
        let to = ep.next();
        states[s][c] = (to, now);
        let churn: Vec<Ep> = states[s].iter().map(|(ep, _)| *ep).collect();
        let object = slice(s, addrs, &churn);
        let at_us = unix_us();
        lock(api).apply(object)?;
        changes.push(Change { at_us, s, c, to });
    }
    Ok(ChurnLog {
        changes,
        elapsed: start.elapsed(),
        idle_ticks,
        last: states
            .iter()
            .map(|v| v.iter().map(|(ep, _)| *ep).collect())
            .collect(),
    })
}

// ---------------------------------------------------------------------------------
// API server flaps.

#[derive(Debug, Default)]
struct Flaps {
    cut: u64,
    refused: u64,
    ended: u64,
    expired: u64,
}

/// Every `every`, the next of: cut every connection, refuse connections for 0.8 s, end
/// every watch cleanly, expire the history (410), refuse for 1.5 s. Always leaves the
/// server up.
fn flap(api: &Mutex<FakeApi>, stop: &AtomicBool, every: Duration) -> Result<Flaps> {
    let mut flaps = Flaps::default();
    let mut i = 0u64;
    while !sleep_unless(stop, every) {
        match i % 5 {
            0 => {
                lock(api).drop_connections();
                flaps.cut += 1;
            }
            2 => {
                lock(api).end_watches();
                flaps.ended += 1;
            }
            3 => {
                lock(api).expire();
                flaps.expired += 1;
            }
            k => {
                let outage = Duration::from_millis(if k == 1 { 800 } else { 1500 });
                lock(api).stop();
                thread::sleep(outage);
                lock(api).restart()?;
                flaps.refused += 1;
            }
        }
        i += 1;
    }
    Ok(flaps)
}

// ---------------------------------------------------------------------------------
// The sampler: what the kernel's maps hold, every 10 ms.

#[derive(Default)]
struct Samples {
    at_us: Vec<u64>,
    masks: Vec<u64>,
    read_errors: u64,
    first_error: Option<String>,
    max_gap_us: u64,
}

impl Samples {
    /// Index of the first sample at or after `t`.
    fn from(&self, t: u64) -> usize {
        self.at_us.partition_point(|&x| x < t)
    }

    /// Time of the first sample in [from, to) for which `pred(mask)` holds.
    fn first(&self, from: u64, to: u64, pred: impl Fn(u64) -> bool) -> Option<u64> {
        self.first_run(from, to, 1, pred)
    }

    /// Time of the first of `n` consecutive samples in [from, to) for which `pred(mask)`
    /// holds.
    fn first_run(&self, from: u64, to: u64, n: usize, pred: impl Fn(u64) -> bool) -> Option<u64> {
        let end = self.at_us.partition_point(|&x| x < to);
        (self.from(from)..end.saturating_sub(n - 1))
            .find(|&i| (i..i + n).all(|j| pred(self.masks[j])))
            .map(|i| self.at_us[i])
    }

    /// Whether `m` is set in each sample of [from, to), run-length encoded with times in
    /// ms relative to `zero`: `-30:in×3 0:out×12 120:in×2`.
    fn pattern(&self, m: u64, zero: u64, from: u64, to: u64) -> String {
        let mut out: Vec<(i64, bool, usize)> = Vec::new();
        for i in self.from(from)..self.at_us.len() {
            if self.at_us[i] >= to {
                break;
            }
            let set = self.masks[i] & m != 0;
            match out.last_mut() {
                Some((_, s, n)) if *s == set => *n += 1,
                _ => out.push(((self.at_us[i] as i64 - zero as i64) / 1000, set, 1)),
            }
        }
        out.iter()
            .map(|(t, set, n)| format!("{t}:{}×{n}", if *set { "in" } else { "out" }))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Which (frontend, backend) pairs are in the slots 1..count of the maps right now.
fn read_mask(maps: &PinnedMaps, addrs: &[IpAddr]) -> Result<u64> {
    let st = maps.read_current()?;
    let mut mask = 0;
    for (key, fe) in &st.frontends {
        let Some(f) = frontend_of(key.addr, key.port, key.proto) else {
            continue;
        };
        for id in &fe.backend_ids {
            if let Some(be) = st.backends.get(id)
                && let Some(b) = addrs.iter().position(|a| *a == be.addr.addr)
            {
                mask |= bit(f, b);
            }
        }
    }
    Ok(mask)
}

fn spawn_sampler(
    lab: &Lab,
    addrs: Vec<IpAddr>,
    stop: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<Samples>> {
    // The pins outlive every agent, so these fds stay valid across restarts.
    let maps = PinnedMaps::open(lab.bpffs()).context("open the pinned maps")?;
    Ok(thread::spawn(move || {
        let mut out = Samples::default();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match read_mask(&maps, &addrs) {
                Ok(mask) => {
                    let t = unix_us();
                    if let Some(&prev) = out.at_us.last() {
                        out.max_gap_us = out.max_gap_us.max(t.saturating_sub(prev));
                    }
                    out.at_us.push(t);
                    out.masks.push(mask);
                }
                Err(e) => {
                    // A read races the agent's writes (a key deleted between
                    // get_next_key and lookup): skipped, and counted.
                    out.read_errors += 1;
                    out.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
            next += SAMPLE_EVERY;
            match next.checked_duration_since(Instant::now()) {
                Some(wait) => thread::sleep(wait),
                None => next = Instant::now(),
            }
        }
        out
    }))
}

// ---------------------------------------------------------------------------------
// Analysis.

/// Per (frontend, backend): the windows [applied + grace, re-add) in which no attempt may
/// reach the backend.
struct Windows {
    by_pair: BTreeMap<(usize, usize), Vec<(u64, u64)>>,
    /// API write → first sample without the backend, µs.
    lags_us: Vec<u64>,
    /// Removals re-added before the maps ever dropped the backend (the agent was down
    /// or the API off the air for the whole time): nothing to check.
    unapplied: usize,
    /// Removals where one lone sample missed the backend before it was really removed.
    lone_absences: usize,
}

fn grace_us() -> u64 {
    u64::try_from(GRACE.as_micros()).unwrap_or(u64::MAX)
}

fn windows(changes: &[Change], samples: &Samples) -> Windows {
    let grace = grace_us();
    let mut w = Windows {
        by_pair: BTreeMap::new(),
        lags_us: Vec::new(),
        unapplied: 0,
        lone_absences: 0,
    };
    for s in 0..SERVICES.len() {
        for c in 0..CHURN.len() {
            let evs: Vec<&Change> = changes.iter().filter(|e| e.s == s && e.c == c).collect();
            let mut added = 0;
            for (i, e) in evs.iter().enumerate() {
                match e.to {
                    Ep::Ready => added = e.at_us,
                    Ep::Gone => {}
                    Ep::Terminating => {
                        let readd = evs[i + 1..]
                            .iter()
                            .find(|x| x.to == Ep::Ready)
                            .map_or(u64::MAX, |x| x.at_us);
                        for udp in [false, true] {
                            let (f, b) = (frontend(s, udp), churn_backend(c));
                            let m = bit(f, b);
                            // After the maps showed this incarnation, if they did: an
                            // add applied late is not a resurrection.
                            let shown = samples.first(added, readd, |x| x & m != 0);
                            let from = e.at_us.max(shown.unwrap_or(0));
                            let out = |x: u64| x & m == 0;
                            let applied = samples.first_run(from, readd, 2, out);
                            if samples.first(from, readd, out) < applied {
                                w.lone_absences += 1;
                            }
                            match applied {
                                Some(applied) => {
                                    w.lags_us.push(applied - e.at_us);
                                    if applied.saturating_add(grace) < readd {
                                        w.by_pair
                                            .entry((f, b))
                                            .or_default()
                                            .push((applied + grace, readd));
                                    }
                                }
                                None => w.unapplied += 1,
                            }
                        }
                    }
                }
            }
        }
    }
    w
}

/// What the clients saw.
#[derive(Default)]
struct Verdict {
    attempts: u64,
    failed: u64,
    wrong_address: u64,
    stale: u64,
    churn_replies: u64,
    samples: Vec<String>,
}

fn judge(reports: &[(usize, ClientReport)], w: &Windows, samples: &Samples) -> Verdict {
    let ids = ids();
    let mut v = Verdict::default();
    for (f, r) in reports {
        v.attempts += r.attempts;
        v.failed += r.failed;
        let want = vip(*f).to_string();
        v.wrong_address += r
            .reply_sources
            .iter()
            .chain(r.peer_names.iter())
            .filter(|(a, _)| **a != want)
            .map(|(_, n)| n)
            .sum::<u64>();
        for t in &r.timeline {
            let Some(b) = ids.iter().position(|id| *id == t.outcome) else {
                continue;
            };
            if b < STABLE.len() {
                continue;
            }
            v.churn_replies += 1;
            let window = w.by_pair.get(&(*f, b)).and_then(|ws| {
                let i = ws.partition_point(|(from, _)| *from <= t.start_unix_us);
                (i > 0 && t.start_unix_us < ws[i - 1].1).then(|| ws[i - 1])
            });
            if let Some((from, _)) = window {
                v.stale += 1;
                if v.samples.len() < 10 {
                    let applied = from - grace_us();
                    v.samples.push(format!(
                        "{} reached {} in an attempt that started {} ms after the removal was applied (unix µs {}); {} in the slots (ms after applied): {}",
                        vip(*f),
                        t.outcome,
                        (t.start_unix_us - applied) / 1000,
                        t.start_unix_us,
                        t.outcome,
                        samples.pattern(
                            bit(*f, b),
                            applied,
                            applied.saturating_sub(1_000_000),
                            t.start_unix_us + 300_000
                        )
                    ));
                }
            }
        }
    }
    v
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Waits until the maps hold exactly `want`; the last mask seen otherwise.
fn converge(lab: &Lab, addrs: &[IpAddr], want: u64) -> Result<Duration> {
    let maps = PinnedMaps::open(lab.bpffs())?;
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < CONVERGE {
        if let Ok(mask) = read_mask(&maps, addrs) {
            if mask == want {
                return Ok(start.elapsed());
            }
            last = Some(mask);
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the maps did not match the API's final state within {CONVERGE:?}: want {want:#x}, last seen {last:x?} (differing bits {:#x})",
        last.map_or(0, |m| m ^ want)
    )
}

// ---------------------------------------------------------------------------------
// The tests.

/// Every client's attempts are counted; churned backends answered some; see the module
/// documentation for the rules.
#[test]
fn chaos_restarts_churn_and_api_flaps() {
    let duration = env_secs("SVCLB_CHAOS_SECS", if long() { LONG } else { CHAOS_SHORT });
    with_lab(env!("CARGO_BIN_EXE_svclb-harness"), &ids(), |lab| {
        chaos(lab, duration)
    });
}

fn chaos(lab: &mut Lab, duration: Duration) -> Result<()> {
    let mut k8s = Cluster::new(lab)?;
    let mut agent = Some(k8s.start_agent(lab)?);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_sampler(lab, k8s.addrs.clone(), stop.clone())?;
    let clients = spawn_clients(lab, duration, Duration::from_millis(3))?;
    let started = Instant::now();
    let churner = {
        let (api, addrs, stop) = (k8s.api.clone(), k8s.addrs.clone(), stop.clone());
        thread::spawn(move || churn(&api, &addrs, &stop))
    };
    let flapper = {
        let (api, stop) = (k8s.api.clone(), stop.clone());
        thread::spawn(move || flap(&api, &stop, FLAP_EVERY))
    };

    // Restarts, on this thread.
    let (mut sigkill, mut sigterm, mut early) = (0u64, 0u64, 0u64);
    let mut max_start = Duration::ZERO;
    let mut jitter = Jitter::new();
    let outcome = (|| -> Result<()> {
        while started.elapsed() + RESTART_EVERY < duration {
            thread::sleep(jitter.between(RESTART_EVERY / 2, RESTART_EVERY * 3 / 2));
            let mut old = agent.take().context("no agent")?;
            ensure!(
                old.is_running()?,
                "the agent exited by itself:\n{}",
                old.log_text()
            );
            if (sigkill + sigterm) % 2 == 0 {
                let status = old.kill()?;
                ensure!(
                    std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
                    "SIGKILL: {status}"
                );
                sigkill += 1;
            } else {
                let (status, graceful) = old.terminate(Duration::from_secs(10))?;
                ensure!(
                    graceful && status.success(),
                    "SIGTERM: the agent should exit 0 by itself: {status}\n{}",
                    old.log_text()
                );
                sigterm += 1;
            }
            if (sigkill + sigterm) % 3 == 0 {
                // Killed while it starts: loading, pinning, swapping the links or in its
                // first sync. The next agent must finish what this one left half done.
                let mut young = k8s.spawn_agent(lab)?;
                thread::sleep(
                    jitter.between(Duration::from_millis(20), Duration::from_millis(600)),
                );
                young.kill()?;
                early += 1;
            }
            let t = Instant::now();
            agent = Some(k8s.start_agent(lab)?);
            max_start = max_start.max(t.elapsed());
        }
        Ok(())
    })();
    if outcome.is_ok()
        && let Some(rest) = duration.checked_sub(started.elapsed())
    {
        thread::sleep(rest);
    }
    stop.store(true, Ordering::Relaxed);
    let churn_log = churner
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
    let flaps = flapper
        .join()
        .map_err(|_| anyhow::anyhow!("the flap thread panicked"))??;
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the sampler panicked"))?;
    let mut reports = Vec::new();
    for (f, run) in clients {
        reports.push((f, run.wait()?));
    }
    outcome?;
    let agent = agent.as_mut().context("no agent")?;
    ensure!(agent.is_running()?, "the last agent exited");
    let converged = converge(lab, &k8s.addrs, desired_mask(&churn_log.last))?;

    let w = windows(&churn_log.changes, &samples);
    let v = judge(&reports, &w, &samples);
    let mut lags = w.lags_us.clone();
    lags.sort_unstable();
    let checked: usize = w.by_pair.values().map(Vec::len).sum();
    eprintln!(
        "chaos: {:?}; churn {} changes in {:.1} s = {:.1}/s ({} idle ticks); restarts: {sigkill} SIGKILL, {sigterm} SIGTERM, {early} SIGKILL while starting (slowest start to first sync {max_start:?}); flaps: {flaps:?}",
        duration,
        churn_log.changes.len(),
        churn_log.elapsed.as_secs_f64(),
        churn_log.rate(),
        churn_log.idle_ticks,
    );
    eprintln!(
        "chaos: {} map samples (largest gap {} ms, {} reads skipped{}); removals applied: {} (lag API → maps: median {} ms, p99 {} ms, max {} ms), {} with a window checked, {} re-added before being applied, {} lone absences; converged {converged:?} after the end",
        samples.at_us.len(),
        samples.max_gap_us / 1000,
        samples.read_errors,
        samples
            .first_error
            .as_deref()
            .map(|e| format!(": first {e}"))
            .unwrap_or_default(),
        lags.len(),
        percentile(&lags, 0.5) / 1000,
        percentile(&lags, 0.99) / 1000,
        lags.last().copied().unwrap_or(0) / 1000,
        checked,
        w.unapplied,
        w.lone_absences,
    );
    for (f, r) in &reports {
        eprintln!("chaos: frontend {}: {}", vip(*f), r.summary());
    }
    eprintln!(
        "chaos: {} attempts, {} failed, {} answered from a wrong address, {} stale connects (of {} answers from churned backends)",
        v.attempts, v.failed, v.wrong_address, v.stale, v.churn_replies
    );

    // The premises: without them a pass would mean nothing.
    ensure!(
        churn_log.rate() >= MIN_CHURN_RATE,
        "the churn reached only {:.1} changes/s (at least {MIN_CHURN_RATE} wanted)",
        churn_log.rate()
    );
    ensure!(
        sigkill >= 2 && sigterm >= 2 && early >= 1,
        "too few restarts: {sigkill} SIGKILL, {sigterm} SIGTERM, {early} SIGKILL while starting"
    );
    ensure!(
        flaps.cut >= 1 && flaps.refused >= 2 && flaps.ended >= 1 && flaps.expired >= 1,
        "too few API flaps: {flaps:?}"
    );
    ensure!(
        checked >= 20 && v.churn_replies >= 100,
        "too little was checked: {checked} removal windows, {} answers from churned backends",
        v.churn_replies
    );
    let secs = duration.as_secs().max(1);
    for (f, r) in &reports {
        ensure!(
            r.attempts >= 20 * secs,
            "{}: only {} attempts in {secs} s",
            vip(*f),
            r.attempts
        );
    }
    // The verdict.
    let failures: Vec<String> = reports
        .iter()
        .filter(|(_, r)| r.failed > 0)
        .map(|(f, r)| format!("{}: {:?}", vip(*f), r.failure_samples))
        .collect();
    ensure!(
        v.failed == 0 && v.wrong_address == 0,
        "{} failed attempts and {} answers from a wrong address; first failures: {failures:?}",
        v.failed,
        v.wrong_address
    );
    ensure!(
        v.stale == 0,
        "{} connects reached a backend more than {GRACE:?} after its removal was applied: {:?}",
        v.stale,
        v.samples
    );
    Ok(())
}

/// `VmRSS` of process `pid`, bytes.
fn rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in {path}"))?;
    Ok(kb * 1024)
}

/// The flatness rule of the module documentation: `None` when flat, else why not.
fn not_flat(series: &[u64], slack: f64) -> Option<String> {
    let q = series.len() / 4;
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64;
    let second = mean(&series[q..2 * q]);
    let last = mean(&series[series.len() - q..]);
    let limit = second * 1.10 + slack;
    (last > limit).then(|| {
        format!("mean of the last quarter {last:.0} > {limit:.0} (second quarter {second:.0})")
    })
}

#[test]
#[ignore = "10 minutes: run by `cargo xtask test --long` (or --include-ignored, SVCLB_SOAK_SECS=N)"]
fn soak_rss_and_maps_stay_flat() {
    let duration = env_secs("SVCLB_SOAK_SECS", LONG);
    with_lab(env!("CARGO_BIN_EXE_svclb-harness"), &ids(), |lab| {
        soak(lab, duration)
    });
}

fn soak(lab: &mut Lab, duration: Duration) -> Result<()> {
    let every = (duration / 60).max(Duration::from_secs(1));
    let mut k8s = Cluster::new(lab)?;
    let mut agent = k8s.start_agent(lab)?;
    let pid = agent.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = spawn_clients(lab, duration, Duration::from_millis(10))?;
    let churner = {
        let (api, addrs, stop) = (k8s.api.clone(), k8s.addrs.clone(), stop.clone());
        thread::spawn(move || churn(&api, &addrs, &stop))
    };
    let start = Instant::now();
    let mut rss_series = Vec::new();
    let mut maps_series: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut capacity = BTreeMap::new();
    let sampled = (|| -> Result<()> {
        while start.elapsed() < duration {
            thread::sleep(every);
            ensure!(
                agent.is_running()?,
                "the agent exited:\n{}",
                agent.log_text()
            );
            rss_series.push(rss(pid)?);
            for m in svc_lb::datapath::pinned::maps(lab.bpffs(), &ALL_MAPS)? {
                capacity.insert(m.name.clone(), m.capacity);
                maps_series.entry(m.name).or_default().push(m.entries);
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let churn_log = churner
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
    let mut reports = Vec::new();
    for (f, run) in clients {
        reports.push((f, run.wait()?));
    }
    sampled?;
    ensure!(
        rss_series.len() >= 8,
        "only {} samples: the run is too short",
        rss_series.len()
    );

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "soak: {duration:?}, {} samples every {every:?}; churn {} changes = {:.1}/s",
        rss_series.len(),
        churn_log.changes.len(),
        churn_log.rate()
    );
    eprintln!(
        "soak: agent RSS MiB: {}",
        rss_series
            .iter()
            .map(|b| format!("{:.1}", mib(*b)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut problems = Vec::new();
    if let Some(why) = not_flat(&rss_series, 4.0 * 1024.0 * 1024.0) {
        problems.push(format!("agent RSS: {why}"));
    }
    for (name, series) in &maps_series {
        eprintln!(
            "soak: {name} (capacity {}): first {}, max {}, last {}",
            capacity.get(name).copied().unwrap_or(0),
            series.first().copied().unwrap_or(0),
            series.iter().max().copied().unwrap_or(0),
            series.last().copied().unwrap_or(0)
        );
        if let Some(why) = not_flat(series, 32.0) {
            problems.push(format!("{name}: {why}"));
        }
    }
    for (f, r) in &reports {
        eprintln!("soak: frontend {}: {}", vip(*f), r.summary());
        if r.failed > 0 {
            problems.push(format!(
                "{}: {} failed attempts, first {:?}",
                vip(*f),
                r.failed,
                r.failure_samples
            ));
        }
    }
    ensure!(
        churn_log.rate() >= MIN_CHURN_RATE,
        "the churn reached only {:.1} changes/s",
        churn_log.rate()
    );
    ensure!(problems.is_empty(), "not flat: {problems:#?}");
    Ok(())
}
