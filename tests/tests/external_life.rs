//! Privileged end-to-end tests of the external path's life beyond a single sync:
//! session affinity for external clients, an agent restart under external traffic, and
//! the XDP→tc fallback on a device whose driver has no native XDP.
//!
//! Run as root, one at a time:
//! `cargo test --release -p svc-lb-tests --features e2e --test external_life -- --test-threads=1`.
//! A missing tool (`ip`, `ethtool`, `bpftool`), capability or binary fails the test.
//!
//! The lab is the two-node lab of `tests/tests/external.rs` ([`TwoNodeLab`]): an external
//! client and two nodes on a bridged LAN, pods a1, a2 on node A and b1 on node B (each
//! pod's server answers `<pod> <client address it saw>`), one agent per node in the
//! node's namespace with its own pin directory and cgroup, both reading one manifest
//! directory. Every test states its expected counts, including 0 failures, and ends by
//! checking that nothing named with this run's prefix is left.
#![cfg(feature = "e2e")]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use svc_lb_tests::ip;
use svc_lb_tests::{
    ClientReport, Proto,
    agent::AgentConfig,
    bpfquery::tcx_programs,
    checks::{addr_words, all_ok, backends_are, maglev_table, unix_ms},
    cmd,
    manifests::{Protocol, Service, TargetPort, yaml_docs},
    netns,
    report::TimelineEntry,
    twonode::{Node, NodeAgentOptions, POD_PORT, TwoNodeLab, client_addr, run_lab},
};

const NS: &str = "life";
/// Connections per measurement.
const N: u64 = 30;
/// Maglev table size given to both agents (a prime; both nodes must use the same).
const MAGLEV_SIZE: &str = "1021";
/// The pods behind every Service here: two on node A, one on node B.
const PODS: [&str; 3] = ["a1", "a2", "b1"];
/// The agent's warning for a device whose driver refuses native XDP
/// (`svc-lb/src/datapath/bpf.rs`, `attach_xdp`).
const XDP_REFUSED: &str = "native XDP refused by the driver; this device runs tc only";

fn sa(addr: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(addr, port)
}

/// [`run_lab`] for this file's tests.
fn external(body: impl FnOnce(&mut TwoNodeLab) -> Result<()>) {
    run_lab(env!("CARGO_BIN_EXE_svclb-harness"), body);
}

/// A NodePort Service (externalTrafficPolicy Cluster) with TCP port 80 and UDP port 53
/// on the same node port, IPv4 only, and its EndpointSlice over [`PODS`].
struct Svc {
    name: &'static str,
    cluster: &'static str,
    node_port: u16,
    /// `sessionAffinity: ClientIP` with this `timeoutSeconds`.
    affinity_timeout_s: Option<u32>,
}

impl Svc {
    fn yaml(&self, lab: &TwoNodeLab) -> String {
        let mut svc = Service::new(NS, self.name, &[ip(self.cluster)])
            .port("http", 80, TargetPort::Number(POD_PORT), Protocol::Tcp)
            .node_port(self.node_port)
            .port("dns", 53, TargetPort::Number(POD_PORT), Protocol::Udp)
            .node_port(self.node_port)
            .spec("type", json!("NodePort"))
            .spec("externalTrafficPolicy", json!("Cluster"));
        if let Some(t) = self.affinity_timeout_s {
            svc = svc.spec("sessionAffinity", json!("ClientIP")).spec(
                "sessionAffinityConfig",
                json!({"clientIP": {"timeoutSeconds": t}}),
            );
        }
        let ports = [("http", Protocol::Tcp), ("dns", Protocol::Udp)];
        let slice = lab.pod_slice(NS, self.name, false, &ports, &PODS);
        yaml_docs(&[svc.to_value(), slice.to_value()])
    }

    fn file(&self) -> String {
        format!("{}.yaml", self.name)
    }

    fn at(&self, node: Node) -> SocketAddr {
        sa(node.addr(false), self.node_port)
    }
}

/// Writes the Service's manifest, then starts both agents on their `eth0` (their first
/// sync has it); with `xdp`, checks that both `eth0`s really run the XDP program.
fn start(lab: &mut TwoNodeLab, xdp: bool, svc: &Svc) -> Result<()> {
    lab.write_manifest(&svc.file(), &svc.yaml(lab))?;
    lab.start_agents(&NodeAgentOptions {
        xdp,
        extra_args: vec!["--maglev-table-size".into(), MAGLEV_SIZE.into()],
    })?;
    if xdp {
        for n in Node::ALL {
            let links = lab.node_cmd(n, "ip", &["-d", "link", "show", "dev", "eth0"])?;
            ensure!(
                links.contains("xdp"),
                "--xdp given but no XDP program on {}'s eth0:\n{links}",
                n.name()
            );
        }
    }
    Ok(())
}

/// `n` attempts from the external client.
fn run(lab: &TwoNodeLab, target: SocketAddr, proto: Proto, n: u64) -> Result<ClientReport> {
    let mut o = lab.client(target, proto);
    o.count = n;
    o.timeout = Duration::from_secs(1);
    let r = lab.run_client(&o)?;
    eprintln!("{}", r.summary());
    Ok(r)
}

/// Which client address each backend saw: pods on the entry node see the client itself
/// (DNAT only), pods on the other node see the entry node's address (DNAT + SNAT).
fn assert_seen(lab: &TwoNodeLab, r: &ClientReport, entry: Node) -> Result<()> {
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for (pod, count) in &r.backends {
        let seen = if lab.net.pod(pod).node == entry {
            client_addr(false)
        } else {
            entry.addr(false)
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

/// A log line without the ANSI colour codes of the agent's tracing output.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---- 1. Session affinity (ClientIP) for external clients ----

/// What the nodes' Maglev tables pick for a new flow from the client to the node port:
/// both nodes build the same table, from the backends sorted by address. This is the
/// choice a flow gets when no affinity entry applies.
struct MaglevModel {
    sorted: Vec<(IpAddr, &'static str)>,
    tcp: Vec<usize>,
    udp: Vec<usize>,
    m: u32,
    node_port: u16,
}

impl MaglevModel {
    fn new(lab: &TwoNodeLab, node_port: u16) -> Result<Self> {
        let mut sorted: Vec<(IpAddr, &'static str)> =
            PODS.iter().map(|p| (lab.pod_addr(p, false), *p)).collect();
        sorted.sort();
        let addrs: Vec<IpAddr> = sorted.iter().map(|(a, _)| *a).collect();
        let m: u32 = MAGLEV_SIZE.parse()?;
        Ok(Self {
            tcp: maglev_table(&addrs, POD_PORT, svc_lb_common::PROTO_TCP, m),
            udp: maglev_table(&addrs, POD_PORT, svc_lb_common::PROTO_UDP, m),
            sorted,
            m,
            node_port,
        })
    }

    /// The backend of a new flow from the client's `sport`.
    fn pick(&self, proto: Proto, sport: u16) -> &'static str {
        let (p, table) = match proto {
            Proto::Tcp => (svc_lb_common::PROTO_TCP, &self.tcp),
            Proto::Udp | Proto::UdpConnected => (svc_lb_common::PROTO_UDP, &self.udp),
        };
        // The hash covers the destination port as the packet carries it: the node port.
        let h = svc_lb_common::maglev::flow_hash(
            &addr_words(client_addr(false)),
            sport.to_be(),
            self.node_port.to_be(),
            p,
        );
        self.sorted[table[(h % self.m) as usize]].1
    }

    /// The first port from `from` on whose new flow Maglev sends anywhere but `not`.
    fn port_not_picking(&self, proto: Proto, from: u16, not: &str) -> Result<u16> {
        (from..from.saturating_add(200))
            .find(|p| self.pick(proto, *p) != not)
            .with_context(|| format!("no port in {from}.. whose flow avoids {not}"))
    }

    /// How many of the `n` flows from `first..` Maglev alone would send to each backend.
    fn spread(&self, proto: Proto, first: u16, n: u64) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for i in 0..n {
            let port = first + u16::try_from(i).unwrap_or(u16::MAX);
            *out.entry(self.pick(proto, port)).or_default() += 1;
        }
        out
    }
}

/// `N` new flows from the client through `entry`'s node port, from source ports
/// `first, first + 1, ...` (each port once, so each attempt is a new flow that no
/// conntrack entry covers), all of which must reach `want`.
fn sticky_run(
    lab: &TwoNodeLab,
    svc: &Svc,
    model: &MaglevModel,
    entry: Node,
    proto: Proto,
    first: u16,
    want: &str,
) -> Result<()> {
    let mut o = lab.client(svc.at(entry), proto);
    o.count = N;
    o.sport = Some(first);
    o.sport_step = 1;
    o.timeout = Duration::from_secs(1);
    let r = lab.run_client(&o)?;
    let spread = model.spread(proto, first, N);
    eprintln!(
        "{proto} via {} from ports {first}..: {} (Maglev alone: {spread:?})",
        entry.name(),
        r.summary()
    );
    all_ok(&r, N)?;
    ensure!(
        r.by_sport.len() == N as usize,
        "one attempt per source port expected: {:?}",
        r.by_sport
    );
    ensure!(
        r.backends == BTreeMap::from([(want.to_owned(), N)]),
        "{proto} via {}: every flow of this client must reach {want}: {} (per port: {:?})",
        entry.name(),
        r.summary(),
        r.by_sport
    );
    Ok(())
}

/// Affinity timeout: long enough for a phase's runs, short enough to wait out.
const AFF_TIMEOUT_S: u32 = 2;

/// What `svc-lb-ebpf/src/ext.rs` and svc-lb-common's `choose_external` do, per node:
/// - a new flow of a Service with `ClientIP` affinity first looks up `LB_AFFEXT_V1`
///   (key: client address, the frontend's rev-NAT id, family); a fresh entry (age <=
///   `timeoutSeconds`) whose backend is still a member wins; otherwise Maglev chooses
///   and the choice is remembered. Every new flow that used the entry refreshes it.
/// - `LB_AFFEXT_V1` is each node's own map. Node B knows nothing of what node A
///   remembered: B's first flow from the client is chosen by Maglev (the same table on
///   both nodes, so it is the Maglev choice of *that* flow), and B's later flows stick
///   to it. The two nodes agree only when their first flows happen to hash alike; the
///   test makes them differ on purpose, choosing B's first port so that Maglev sends it
///   elsewhere than A's remembered backend.
/// - TCP and UDP are different frontends (rev-NAT ids), so each has its own entry.
/// - After `timeoutSeconds` without a new flow the entry is stale, and the next flow
///   is a Maglev choice again (and is remembered anew).
fn affinity(xdp: bool) {
    external(|lab| {
        let svc = Svc {
            name: "sticky",
            cluster: "10.96.60.1",
            node_port: 30180,
            affinity_timeout_s: Some(AFF_TIMEOUT_S),
        };
        start(lab, xdp, &svc)?;
        let model = MaglevModel::new(lab, svc.node_port)?;
        let mut remembered = BTreeMap::new();
        for (proto, base) in [(Proto::Tcp, 20_000u16), (Proto::Udp, 24_000)] {
            // Without affinity these flows would spread: the test means something only
            // if Maglev alone sends them to more than one backend.
            let spread = model.spread(proto, base, N);
            ensure!(
                spread.len() >= 2,
                "{proto}: Maglev alone sends the flows from {base}.. to {spread:?}; pick other ports"
            );
            // Via A: the first flow is Maglev's choice, every later one follows it.
            let want = model.pick(proto, base);
            sticky_run(lab, &svc, &model, Node::A, proto, base, want)?;
            // Via B: its own map, no entry for the client yet; a first flow that Maglev
            // sends elsewhere than A's backend goes there, and B's later flows follow.
            let first_b = model.port_not_picking(proto, base + 1000, want)?;
            let want_b = model.pick(proto, first_b);
            sticky_run(lab, &svc, &model, Node::B, proto, first_b, want_b)?;
            // Back via A, from a first port that Maglev sends elsewhere: A still
            // remembers its backend (B's choice did not touch A's map).
            let first_a = model.port_not_picking(proto, base + 2000, want)?;
            sticky_run(lab, &svc, &model, Node::A, proto, first_a, want)?;
            remembered.insert(proto.to_string(), (proto, base, want));
        }
        // No new flow to A for longer than the timeout: A's entries are stale, so a new
        // flow from a port that Maglev sends elsewhere goes there, and the flows after
        // it follow the new choice.
        std::thread::sleep(
            Duration::from_secs(u64::from(AFF_TIMEOUT_S)) + Duration::from_millis(1200),
        );
        for (proto, base, old) in remembered.into_values() {
            let first = model.port_not_picking(proto, base + 3000, old)?;
            let fresh = model.pick(proto, first);
            sticky_run(lab, &svc, &model, Node::A, proto, first, fresh)?;
        }
        Ok(())
    });
}

#[test]
fn session_affinity_client_ip_per_node_with_timeout() {
    affinity(false);
}

#[test]
fn xdp_session_affinity_client_ip_per_node_with_timeout() {
    affinity(true);
}

// ---- 2. Agent restart under external traffic ----

/// `(attach type, device) → (link id, program id, program name)`.
type DeviceLinks = BTreeMap<(String, String), (u64, u64, String)>;

/// `svc-lb status -o json` of node `n`'s pins, run inside its namespace (the device
/// names resolve there): `(attach type, device) → (link id, program id, program name)`
/// for the links on devices.
fn device_links(lab: &TwoNodeLab, n: Node) -> Result<DeviceLinks> {
    let ns = lab.net.node(n).name().to_owned();
    let svc_lb = lab.bins.svc_lb.clone();
    let bpffs = lab.bpffs(n).to_path_buf();
    let out = netns::in_netns(&ns, || {
        cmd::run(
            &svc_lb,
            [
                "status".as_ref(),
                "-o".as_ref(),
                "json".as_ref(),
                "--metrics-addr".as_ref(),
                "off".as_ref(),
                "--bpffs".as_ref(),
                bpffs.as_os_str(),
            ],
        )
    })?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("status JSON: {out}"))?;
    let programs = v["programs"]
        .as_array()
        .with_context(|| format!("no programs in status: {out}"))?;
    let mut links = BTreeMap::new();
    for p in programs {
        let to = p["attached_to"].as_str().unwrap_or_default();
        if let Some(dev) = to.strip_prefix("device ") {
            let key = (
                p["attach_type"].as_str().unwrap_or_default().to_owned(),
                dev.to_owned(),
            );
            let val = (
                p["link_id"].as_u64().unwrap_or(0),
                p["prog_id"].as_u64().unwrap_or(0),
                p["name"].as_str().unwrap_or_default().to_owned(),
            );
            if links.insert(key.clone(), val).is_some() {
                bail!("two links for {key:?} in status: {out}");
            }
        }
    }
    Ok(links)
}

/// Long-lived connections through the restart, each exchanging a message every 50 ms.
const LONG_LIVED: u16 = 4;
/// How long the steady clients run; the restart happens inside this window.
const TRAFFIC: Duration = Duration::from_millis(4500);
/// Pause between new connections (and datagrams) of the steady clients.
const STEADY_INTERVAL: Duration = Duration::from_millis(5);

/// The attempts of a timeline that ended in `[from, to)` (unix ms).
fn phase(t: &[TimelineEntry], from: u64, to: u64) -> Vec<&TimelineEntry> {
    t.iter()
        .filter(|e| e.unix_ms >= from && e.unix_ms < to)
        .collect()
}

/// Every attempt of a phase answered, by every pod.
fn phase_ok(what: &str, entries: &[&TimelineEntry], min: usize) -> Result<()> {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for e in entries {
        *by.entry(e.outcome.as_str()).or_default() += 1;
    }
    eprintln!("{what}: {} attempts {by:?}", entries.len());
    ensure!(
        entries.len() >= min,
        "{what}: only {} attempts (want at least {min}): {by:?}",
        entries.len()
    );
    let pods: BTreeSet<&str> = by.keys().copied().collect();
    ensure!(
        pods == BTreeSet::from(PODS),
        "{what}: outcomes {by:?}, expected answers from exactly {PODS:?} and no failure"
    );
    Ok(())
}

/// While the client keeps long-lived TCP connections, new TCP connections and UDP
/// datagrams going through node A's node port, node A's agent gets SIGTERM and is
/// started again with the same flags and pins. The TCX (and XDP) links are pinned, so
/// the old programs keep working while no agent runs, and the new agent swaps its
/// programs into the same links (`attach_devices` in svc-lb/src/datapath/bpf.rs).
fn restart(xdp: bool) {
    external(|lab| {
        let svc = Svc {
            name: "steady",
            cluster: "10.96.60.2",
            node_port: 30190,
            affinity_timeout_s: None,
        };
        start(lab, xdp, &svc)?;
        let before = device_links(lab, Node::A)?;
        let mut hooks = vec!["tcx_egress", "tcx_ingress"];
        if xdp {
            hooks.push("xdp");
        }
        let want_keys: BTreeSet<(String, String)> = hooks
            .iter()
            .map(|h| ((*h).to_owned(), "eth0".to_owned()))
            .collect();
        ensure!(
            before.keys().cloned().collect::<BTreeSet<_>>() == want_keys,
            "device links before the restart: {before:?}, expected {want_keys:?}"
        );

        let target = svc.at(Node::A);
        let msgs = u64::try_from(TRAFFIC.as_millis() / 50).unwrap_or(u64::MAX);
        let mut long = Vec::new();
        for _ in 0..LONG_LIVED {
            let mut o = lab.client(target, Proto::Tcp);
            o.long_lived = true;
            o.count = msgs;
            o.interval = Duration::from_millis(50);
            o.timeout = Duration::from_secs(1);
            long.push(lab.spawn_client(&o)?);
        }
        let steady = |proto| {
            let mut o = lab.client(target, proto);
            o.count = 0;
            o.duration = Some(TRAFFIC);
            o.interval = STEADY_INTERVAL;
            o.timeout = Duration::from_secs(1);
            o.timeline = true;
            o
        };
        let tcp = lab.spawn_client(&steady(Proto::Tcp))?;
        let udp = lab.spawn_client(&steady(Proto::Udp))?;
        let t_begin = unix_ms();
        std::thread::sleep(Duration::from_millis(1500));

        let mut old = lab.take_agent(Node::A).context("node A's agent")?;
        let mut config = old.config().clone();
        let t_stop = unix_ms();
        let (status, graceful) = old.terminate(Duration::from_secs(5))?;
        let t_exited = unix_ms();
        ensure!(
            graceful && status.success(),
            "the agent must exit by itself on SIGTERM: {status}, graceful {graceful}"
        );
        ensure!(
            old.log_lines()
                .iter()
                .any(|l| plain(l).contains("SIGTERM: exiting")),
            "the stopped agent did not log its SIGTERM exit:\n{}",
            old.log_text()
        );
        drop(old);
        // A moment with no agent at all: the pinned links keep the old programs on.
        std::thread::sleep(Duration::from_millis(300));
        config.log_file = lab.next_agent_log(Node::A);
        let t_start = unix_ms();
        let new_log: Vec<String> = lab
            .start_agent_with(Node::A, config)?
            .log_lines()
            .iter()
            .map(|l| plain(l))
            .collect();
        let t_ready = unix_ms();
        eprintln!(
            "restart: SIGTERM at +{} ms, exited after {} ms, started again {} ms later, ready after {} ms",
            t_stop - t_begin,
            t_exited - t_stop,
            t_start - t_exited,
            t_ready - t_start
        );

        for c in long {
            let r = c.wait()?;
            eprintln!("long-lived: {}", r.summary());
            all_ok(&r, msgs)?;
            ensure!(
                r.backends.len() == 1,
                "a long-lived connection changed backend: {}",
                r.summary()
            );
        }
        let end = u64::MAX;
        for (proto, c) in [("tcp", tcp), ("udp", udp)] {
            let r = c.wait()?;
            eprintln!("steady {proto}: {}", r.summary());
            all_ok(&r, r.attempts)?;
            ensure!(r.timeline.len() as u64 == r.attempts, "timeline incomplete");
            phase_ok(
                &format!("{proto} before the stop"),
                &phase(&r.timeline, 0, t_stop),
                50,
            )?;
            phase_ok(
                &format!("{proto} from SIGTERM until the new agent was ready"),
                &phase(&r.timeline, t_stop, t_ready),
                20,
            )?;
            phase_ok(
                &format!("{proto} after the restart"),
                &phase(&r.timeline, t_ready, end),
                50,
            )?;
        }

        // The same links, now running the new agent's programs (the pins, and the
        // kernel's hooks on eth0).
        let after = device_links(lab, Node::A)?;
        kernel_tcx_matches(lab, Node::A, "eth0", &after)?;
        if xdp {
            let kernel = kernel_xdp(lab, Node::A, "eth0")?;
            let pinned = after.get(&("xdp".to_owned(), "eth0".to_owned()));
            ensure!(
                kernel.len() == 1
                    && kernel[0]["mode"] == "driver"
                    && pinned.is_some_and(|(_, prog, _)| kernel[0]["id"] == json!(prog)),
                "the kernel's XDP program on eth0 {kernel:?} is not the pinned link's {pinned:?}"
            );
        }
        for (key, (link, prog, name)) in &before {
            let Some((link2, prog2, name2)) = after.get(key) else {
                bail!("link {key:?} gone after the restart: {after:?}");
            };
            ensure!(
                link2 == link && prog2 != prog && name2 == name,
                "{key:?}: before link {link} prog {prog} ({name}), after link {link2} prog {prog2} ({name2}); expected the same link with a new program"
            );
        }
        ensure!(
            after.len() == before.len(),
            "device links after the restart: {after:?}, before: {before:?}"
        );
        let mut programs = vec!["svclb_tc_in", "svclb_tc_out"];
        if xdp {
            programs.push("svclb_xdp");
        }
        for p in programs {
            let swapped = new_log
                .iter()
                .filter(|l| {
                    l.contains("replaced program in pinned link")
                        && l.contains(&format!("program=\"{p}\""))
                })
                .count();
            ensure!(
                swapped == 1,
                "the new agent must swap {p} into its pinned link once (saw {swapped}):\n{}",
                new_log.join("\n")
            );
        }
        ensure!(
            !new_log
                .iter()
                .any(|l| l.contains("attached tc program") || l.contains("attached XDP program")),
            "the new agent attached a device program anew instead of swapping it in:\n{}",
            new_log.join("\n")
        );
        Ok(())
    });
}

#[test]
fn agent_restart_under_external_traffic_loses_nothing() {
    restart(false);
}

#[test]
fn xdp_agent_restart_under_external_traffic_loses_nothing() {
    restart(true);
}

// ---- 2b. A damaged source-range pin ----

/// A source-range key that no plan writes (prefix length 8, shorter than the 32-bit
/// rev-NAT id it must start with), put into node A's pinned map while its agent is
/// stopped: the next agent removes it with a warning and serves, instead of failing to
/// read its maps back at every start (a crash loop).
#[test]
fn an_undecodable_source_range_key_is_removed_at_start() {
    external(|lab| {
        let svc = Svc {
            name: "junk",
            cluster: "10.96.60.4",
            node_port: 30194,
            affinity_timeout_s: None,
        };
        start(lab, false, &svc)?;
        let mut old = lab.take_agent(Node::A).context("node A's agent")?;
        let mut config = old.config().clone();
        let (status, graceful) = old.terminate(Duration::from_secs(5))?;
        ensure!(
            graceful && status.success(),
            "the agent must exit by itself on SIGTERM: {status}, graceful {graceful}"
        );
        drop(old);
        let map = lab.bpffs(Node::A).join(svc_lb_common::MAP_SRC_RANGE4);
        let map = map.to_str().context("pin path")?.to_owned();
        // struct bpf_lpm_trie_key: prefix length (host order), then rev-NAT id 7 and
        // 10.0.0.0 in network order.
        let junk_key = [
            "08", "00", "00", "00", "00", "00", "00", "07", "0a", "00", "00", "00",
        ];
        let mut args = vec!["map", "update", "pinned", map.as_str(), "key", "hex"];
        args.extend(junk_key);
        args.extend(["value", "hex", "01", "00", "00", "00"]);
        cmd::run("bpftool", &args)?;
        // bpftool -j lists each key as its bytes, "0x08" and so on.
        let has_junk = || -> Result<(bool, String)> {
            let dump = cmd::run("bpftool", ["-j", "map", "dump", "pinned", map.as_str()])?;
            let entries: Value = serde_json::from_str(&dump).context("bpftool -j map dump")?;
            let want: Vec<Value> = junk_key.iter().map(|b| json!(format!("0x{b}"))).collect();
            let found = entries
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["key"].as_array() == Some(&want)));
            Ok((found, dump))
        };
        let (found, dump) = has_junk()?;
        ensure!(
            found,
            "the junk key is not in the map before the restart:\n{dump}"
        );
        config.log_file = lab.next_agent_log(Node::A);
        let log = lab.start_agent_with(Node::A, config)?.log_text();
        ensure!(
            plain(&log).contains("undecodable entry removed"),
            "the new agent did not report the undecodable key:\n{log}"
        );
        let (found, dump) = has_junk()?;
        ensure!(!found, "the junk key is still in the map:\n{dump}");
        let r = run(lab, svc.at(Node::A), Proto::Tcp, N)?;
        all_ok(&r, N)?;
        Ok(())
    });
}

// ---- 3. XDP fallback on a device without native XDP ----

/// The bridge that takes over node A's LAN addresses in the fallback test.
const BRIDGE: &str = "lan0";

/// Puts node A's `eth0` under a bridge `lan0` that carries node A's LAN addresses and
/// routes, as on a host whose uplink is bridged. A Linux bridge implements no
/// `ndo_bpf`, so it has no native XDP (only generic), while the packets for the node
/// address reach `lan0`'s tc hooks (the bridge hands them up through `lan0`, and the
/// node's replies leave through it).
fn bridge_node_a(lab: &TwoNodeLab) -> Result<()> {
    let ns = lab.net.node(Node::A);
    ns.ip([
        "link",
        "add",
        BRIDGE,
        "type",
        "bridge",
        "stp_state",
        "0",
        "mcast_snooping",
        "0",
    ])?;
    ns.ip(["addr", "flush", "dev", "eth0"])?;
    ns.ip(["link", "set", "eth0", "master", BRIDGE])?;
    for v6 in [false, true] {
        ns.add_addr(BRIDGE, Node::A.addr(v6), if v6 { 64 } else { 24 })?;
    }
    ns.link_up(BRIDGE)?;
    ns.wait_link_ready(BRIDGE, Duration::from_secs(5))?;
    for (cidr, via) in [
        ("10.252.0.0/16", Node::B.addr(false)),
        ("fd00:252::/32", Node::B.addr(true)),
    ] {
        ns.ip([
            "route",
            "replace",
            cidr,
            "via",
            &via.to_string(),
            "dev",
            BRIDGE,
        ])?;
    }
    Ok(())
}

/// The flags `TwoNodeLab::start_agents` gives, with `devices` and `--xdp`.
fn agent_config(lab: &TwoNodeLab, n: Node, devices: &str) -> AgentConfig {
    AgentConfig {
        bin: lab.bins.svc_lb.clone(),
        manifests: lab.manifests_dir(),
        bpffs: lab.bpffs(n).to_path_buf(),
        cgroup: lab.cgroup(n).to_path_buf(),
        log_file: lab.next_agent_log(n),
        extra_args: [
            "--devices",
            devices,
            "--node-name",
            n.name(),
            "--xdp",
            "--maglev-table-size",
            MAGLEV_SIZE,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
    }
}

/// `bpftool -j net show dev DEV` in node `n`'s namespace: the XDP programs the kernel
/// has on the device. (bpftool 7.1 does not list TCX programs; see [`kernel_tcx`].)
fn kernel_xdp(lab: &TwoNodeLab, n: Node, dev: &str) -> Result<Vec<Value>> {
    let ns = lab.net.node(n).name().to_owned();
    let out = netns::in_netns(&ns, || {
        cmd::run("bpftool", ["-j", "net", "show", "dev", dev])
    })?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("bpftool JSON: {out}"))?;
    Ok(v[0]["xdp"].as_array().cloned().unwrap_or_default())
}

/// The kernel's own view of device `dev` in node `n`'s namespace (BPF_PROG_QUERY, not
/// the agent's pins): `(link id, program id)` of every program at its TCX ingress and
/// egress hooks, keyed `tcx_ingress` / `tcx_egress` like `svc-lb status`.
fn kernel_tcx(lab: &TwoNodeLab, n: Node, dev: &str) -> Result<BTreeMap<String, Vec<(u64, u64)>>> {
    let ns = lab.net.node(n).name().to_owned();
    let dev = dev.to_owned();
    netns::in_netns(&ns, move || {
        let name = std::ffi::CString::new(dev.clone()).context("device name")?;
        // SAFETY: a NUL-terminated name; the call only reads it.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no device {dev} in this namespace");
        tcx_programs(ifindex).with_context(|| format!("TCX programs of {dev}"))
    })
}

/// Checks that the kernel runs exactly the pinned links of `links` (from
/// [`device_links`]) at `dev`'s TCX hooks, one program per hook.
fn kernel_tcx_matches(lab: &TwoNodeLab, n: Node, dev: &str, links: &DeviceLinks) -> Result<()> {
    let kernel = kernel_tcx(lab, n, dev)?;
    let mut want: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for hook in ["tcx_ingress", "tcx_egress"] {
        let v = links
            .get(&(hook.to_owned(), dev.to_owned()))
            .map(|(link, prog, _)| vec![(*link, *prog)])
            .unwrap_or_default();
        want.insert(hook.to_owned(), v);
    }
    ensure!(
        kernel == want,
        "{}'s {dev}: the kernel's TCX programs (link, prog) {kernel:?}, the pins say {want:?}",
        n.name()
    );
    Ok(())
}

/// Lines of an agent's log that carry the XDP refusal.
fn refusals(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| plain(l))
        .filter(|l| l.contains(XDP_REFUSED))
        .collect()
}

#[test]
fn xdp_fallback_on_a_device_without_native_xdp_serves_through_tc() {
    external(|lab| {
        let svc = Svc {
            name: "fallback",
            cluster: "10.96.60.3",
            node_port: 30200,
            affinity_timeout_s: None,
        };
        lab.write_manifest(&svc.file(), &svc.yaml(lab))?;
        bridge_node_a(lab)?;
        // Node B as usual (a veth: native XDP works), node A on the bridge.
        lab.start_agent_with(Node::B, agent_config(lab, Node::B, "eth0"))?;
        lab.start_agent_with(Node::A, agent_config(lab, Node::A, BRIDGE))?;

        // One more sync: the warning belongs to the attach, not to every sync.
        let second = Svc {
            name: "fallback2",
            cluster: "10.96.60.4",
            node_port: 30201,
            affinity_timeout_s: None,
        };
        let yaml = second.yaml(lab);
        lab.apply_manifest(&second.file(), &yaml)?;

        let log_a = lab.agent(Node::A)?.log_lines();
        let warned = refusals(&log_a);
        ensure!(
            warned.len() == 1 && warned[0].contains(&format!("device={BRIDGE}")),
            "node A's agent must warn exactly once, for {BRIDGE}: {warned:#?}\nlog:\n{}",
            log_a
                .iter()
                .map(|l| plain(l))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let warned_b = refusals(&lab.agent(Node::B)?.log_lines());
        ensure!(
            warned_b.is_empty(),
            "node B's veth runs native XDP, yet its agent warned: {warned_b:?}"
        );

        // The pins: tc links on the bridge, no XDP link (node B: all three on eth0).
        let links_a = device_links(lab, Node::A)?;
        let want_a: BTreeSet<(String, String)> = ["tcx_egress", "tcx_ingress"]
            .iter()
            .map(|h| ((*h).to_owned(), BRIDGE.to_owned()))
            .collect();
        ensure!(
            links_a.keys().cloned().collect::<BTreeSet<_>>() == want_a,
            "node A's device links: {links_a:?}, expected exactly {want_a:?}"
        );
        let links_b = device_links(lab, Node::B)?;
        ensure!(
            links_b.contains_key(&("xdp".to_owned(), "eth0".to_owned())),
            "node B's eth0 must run XDP: {links_b:?}"
        );
        // The kernel's view of the bridge agrees: the pinned TCX links and no XDP.
        kernel_tcx_matches(lab, Node::A, BRIDGE, &links_a)?;
        let xdp = kernel_xdp(lab, Node::A, BRIDGE)?;
        ensure!(
            xdp.is_empty(),
            "no XDP program may sit on {BRIDGE}: {xdp:?}"
        );
        let link = lab.node_cmd(Node::A, "ip", &["-d", "link", "show", "dev", BRIDGE])?;
        ensure!(
            !link.contains("xdp"),
            "ip link shows an XDP program on {BRIDGE}:\n{link}"
        );

        // And the node port works through tc alone: DNAT to A's pods, DNAT + SNAT to B's.
        for proto in [Proto::Tcp, Proto::Udp] {
            let r = run(lab, svc.at(Node::A), proto, N)?;
            all_ok(&r, N)?;
            backends_are(&r, &PODS)?;
            assert_seen(lab, &r, Node::A)?;
        }
        Ok(())
    });
}
