//! The L2 announcement lab: an external client and three nodes on one bridged segment,
//! each node with its own agent (`--l2-announce`) and one pod, and a probe that asks for
//! an address with ARP or a Neighbor Solicitation and counts who answers.
//!
//! ```text
//!                  lan netns: bridge br0 (no addresses)
//!     ┌────────────────┬───────────────┬───────────────┐
//!     c0               n1              n2              n3
//!   client netns     node-1 netns    node-2 netns    node-3 netns
//!   eth0 .100        eth0 .1         eth0 .2         eth0 .3      (10.250.0.0/24,
//!   no default route  └ pod p1        └ pod p2        └ pod p3     fd00:250::/64)
//! ```
//!
//! The load-balancer addresses are on the segment's own subnet, so the client resolves
//! them with ARP/NDP and sends to whichever node answers; nothing in the lab configures
//! them on an interface. Pods follow the two-node lab's scheme: pod of node k is
//! `10.25<k>.1.2` / `fd00:25<k>:1::2`, and every node routes the other nodes' pod CIDRs via
//! them. Nodes keep their IPv6 addresses across a link down (keep_addr_on_down), as a
//! node whose cable is pulled does.
//!
//! Kubernetes mode ([`L2Lab::use_kube_api`]): the bridge gets the address `.254` in the
//! lan namespace, the fake API server ([`crate::fakeapi`]) listens there, and the agents
//! start with `--kubeconfig` instead of the manifest directory; their API traffic stays
//! on the segment.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use pnet_base::MacAddr;
use pnet_packet::{
    MutablePacket, Packet,
    arp::{ArpHardwareTypes, ArpOperations, ArpPacket, MutableArpPacket},
    ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket},
    icmpv6::{
        self, Icmpv6Code, Icmpv6Packet, Icmpv6Types,
        ndp::{MutableNeighborSolicitPacket, NdpOption, NdpOptionTypes, NeighborAdvertPacket},
    },
    ip::IpNextHeaderProtocols,
    ipv6::{Ipv6Packet, MutableIpv6Packet},
};
use serde_json::json;

use crate::{
    agent::{Agent, AgentConfig},
    cgroup::Cgroup,
    fakeapi::FakeApi,
    lab::Bins,
    manifests::{Endpoint, EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    netns::{self, Netns, Veth},
    procs::{ClientOpts, Server},
    report::{ClientReport, Proto},
    tempdir::TempDir,
    twonode::{NodePins, ethtool_k, lan_addr},
};

/// Nodes in the lab: node-1, node-2, node-3 (indices 0..3).
pub const NODES: usize = 3;
/// What every pod serves, TCP and UDP, IPv4 and IPv6.
pub const POD_PORT: u16 = 8080;
/// The external client's host number on the LAN.
pub const CLIENT_HOST: u8 = 100;
/// The heartbeat interval the lab's agents use (the default).
pub const HEARTBEAT_MS: u64 = 200;
/// Node `i`'s heartbeat key file, in the lab's directory: one per node, so that a test
/// can rotate the key one node at a time as the kubelet would.
fn heartbeat_key_file(i: usize) -> String {
    format!("heartbeat-{}.key", node_name(i))
}
/// The agents' heartbeat port (the default).
const HEARTBEAT_PORT: u16 = 7947;
/// The lan namespace's host number on the bridge, where the fake API server listens
/// (Kubernetes mode only).
pub const API_HOST: u8 = 254;

pub fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

fn host(i: usize) -> u8 {
    u8::try_from(i + 1).unwrap_or(u8::MAX)
}

/// Node `i`'s LAN address.
pub fn node_addr(i: usize, v6: bool) -> IpAddr {
    lan_addr(host(i), v6)
}

/// Address of node `i`'s pod, or (`gw`) of the node's end of the pod's link.
fn pod_addr(i: usize, gw: bool, v6: bool) -> IpAddr {
    let h: u8 = if gw { 1 } else { 2 };
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x250 + u16::from(host(i)),
            1,
            0,
            0,
            0,
            0,
            u16::from(h),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 250 + host(i), 1, h))
    }
}

fn pod_cidr(i: usize, v6: bool) -> String {
    if v6 {
        format!("fd00:{:x}::/32", 0x250 + u16::from(host(i)))
    } else {
        format!("10.{}.0.0/16", 250 + host(i))
    }
}

/// The pod of node `i` ("p1" for node-1...).
pub fn pod_name(i: usize) -> String {
    format!("p{}", i + 1)
}

/// Namespaces and links. Fields drop in declaration order: pods' links, LAN links,
/// then the namespaces.
pub struct L2Net {
    pod_veths: Vec<Veth>,
    pub pods: Vec<Netns>,
    veths: Vec<Veth>,
    pub nodes: Vec<Netns>,
    pub client: Netns,
    pub lan: Netns,
}

impl L2Net {
    pub fn new() -> Result<Self> {
        let lan = Netns::new().context("lan namespace")?;
        let client = Netns::new().context("client namespace")?;
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let ns = Netns::new().with_context(|| format!("namespace of {}", node_name(i)))?;
            // IPv6 addresses survive the failover test's link down.
            let keep_v6 = [
                ("net/ipv6/conf/all/keep_addr_on_down", "1"),
                ("net/ipv6/conf/default/keep_addr_on_down", "1"),
            ];
            for (key, value) in crate::twonode::NODE_SYSCTLS.into_iter().chain(keep_v6) {
                ns.sysctl(key, value)?;
            }
            nodes.push(ns);
        }
        let mut net = Self {
            pod_veths: Vec::new(),
            pods: Vec::new(),
            veths: Vec::new(),
            nodes,
            client,
            lan,
        };
        net.lan.ip([
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        net.lan.link_up("br0")?;
        let mut lan_devs = vec!["c0".to_owned()];
        lan_devs.extend((0..NODES).map(|i| format!("n{}", i + 1)));
        for (k, dev) in lan_devs.iter().enumerate() {
            let far = if k == 0 {
                &net.client
            } else {
                &net.nodes[k - 1]
            };
            let v = Veth::new(&net.lan, dev, far, "eth0")?;
            net.veths.push(v);
            net.lan.ip(["link", "set", dev, "master", "br0"])?;
            // No flooding of unknown unicast: once a dead node's port is gone from the
            // forwarding table, frames still sent to its MAC must be lost, not flooded to
            // the other nodes (whose tc programs would serve them and hide the outage).
            net.lan
                .ip(["link", "set", dev, "type", "bridge_slave", "flood", "off"])?;
            net.lan.link_up(dev)?;
        }
        net.client
            .add_addr("eth0", lan_addr(CLIENT_HOST, false), 24)?;
        net.client
            .add_addr("eth0", lan_addr(CLIENT_HOST, true), 64)?;
        ethtool_k(net.client.name(), "eth0", "tx", false)?;
        net.client.link_up("eth0")?;
        for (i, ns) in net.nodes.iter().enumerate() {
            ns.add_addr("eth0", node_addr(i, false), 24)?;
            ns.add_addr("eth0", node_addr(i, true), 64)?;
            ns.link_up("eth0")?;
            net.route_pods(i)?;
        }
        for dev in &lan_devs {
            net.lan.wait_link_ready(dev, Duration::from_secs(5))?;
            ethtool_k(net.lan.name(), dev, "gro", true)?;
        }
        net.client.wait_link_ready("eth0", Duration::from_secs(5))?;
        ethtool_k(net.client.name(), "eth0", "gro", true)?;
        for ns in &net.nodes {
            ns.wait_link_ready("eth0", Duration::from_secs(5))?;
            ethtool_k(ns.name(), "eth0", "gro", true)?;
        }
        // On an error the links drop before their namespaces, as in the struct.
        let (mut pods, mut pod_veths) = (Vec::new(), Vec::new());
        for (i, node) in net.nodes.iter().enumerate() {
            let pod = Netns::new().with_context(|| format!("namespace of {}", pod_name(i)))?;
            let v = Veth::new(node, "p1", &pod, "eth0")?;
            for v6 in [false, true] {
                let plen = if v6 { 64 } else { 24 };
                node.add_addr("p1", pod_addr(i, true, v6), plen)?;
                pod.add_addr("eth0", pod_addr(i, false, v6), plen)?;
            }
            node.link_up("p1")?;
            pod.link_up("eth0")?;
            for v6 in [false, true] {
                let gw = pod_addr(i, true, v6).to_string();
                pod.ip(["route", "add", "default", "via", &gw])?;
            }
            node.wait_link_ready("p1", Duration::from_secs(5))?;
            pod.wait_link_ready("eth0", Duration::from_secs(5))?;
            ethtool_k(node.name(), "p1", "gro", true)?;
            ethtool_k(pod.name(), "eth0", "gro", true)?;
            pod_veths.push(v);
            pods.push(pod);
        }
        net.pod_veths = pod_veths;
        net.pods = pods;
        Ok(net)
    }
}

impl L2Net {
    /// Node `i`'s routes to the other nodes' pods (again after a link down, which
    /// flushes them, as a routing daemon would restore them).
    pub fn route_pods(&self, i: usize) -> Result<()> {
        for j in (0..NODES).filter(|j| *j != i) {
            for v6 in [false, true] {
                let via = node_addr(j, v6).to_string();
                self.nodes[i].ip(["route", "replace", &pod_cidr(j, v6), "via", &via])?;
            }
        }
        Ok(())
    }
}

/// The whole lab. Fields drop in declaration order: agents and servers first, then the
/// pin directories (cleanup inside each node's namespace), cgroups, network, files.
pub struct L2Lab {
    agents: Vec<Option<Agent>>,
    // Held for their lifetime: the pods stop serving when the lab drops.
    _servers: Vec<Server>,
    /// Kubernetes mode: the fake API server (in the lan namespace) and its kubeconfig.
    api: Option<(FakeApi, PathBuf)>,
    bpf: Vec<NodePins>,
    cgroups: Vec<Cgroup>,
    pub net: L2Net,
    dir: TempDir,
    pub bins: Bins,
    starts: usize,
    /// The key every node's key file holds at start.
    heartbeat_key: String,
}

impl L2Lab {
    /// Builds the network, starts every pod's server and writes the three Node objects.
    pub fn new(bins: Bins) -> Result<Self> {
        let dir = TempDir::new()?;
        for sub in ["manifests", "staging"] {
            std::fs::create_dir(dir.path().join(sub))
                .with_context(|| format!("create {sub} dir"))?;
        }
        // Every agent of the lab authenticates its heartbeat with this key (a new one per
        // lab), so every L2 test runs the authenticated path.
        let key = format!(
            "svclb-lab-key-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        for i in 0..NODES {
            std::fs::write(dir.path().join(heartbeat_key_file(i)), &key)
                .context("write the heartbeat key")?;
        }
        let net = L2Net::new()?;
        let mut cgroups = Vec::new();
        let mut bpf = Vec::new();
        for ns in &net.nodes {
            let cg = Cgroup::new()?;
            bpf.push(NodePins::new(&bins.svc_lb, cg.path(), ns.name())?);
            cgroups.push(cg);
        }
        let mut servers = Vec::new();
        for (i, pod) in net.pods.iter().enumerate() {
            let addrs: Vec<SocketAddr> = [false, true]
                .iter()
                .map(|v6| SocketAddr::new(pod_addr(i, false, *v6), POD_PORT))
                .collect();
            servers.push(Server::start_opts(
                &bins.harness,
                pod.name(),
                &pod_name(i),
                &addrs,
                &addrs,
                true,
            )?);
        }
        let lab = Self {
            agents: (0..NODES).map(|_| None).collect(),
            _servers: servers,
            api: None,
            bpf,
            cgroups,
            net,
            dir,
            bins,
            starts: 0,
            heartbeat_key: key,
        };
        lab.write_manifest("nodes.yaml", &yaml_docs(&node_objects()))?;
        Ok(lab)
    }

    /// Kubernetes mode from here on: starts the fake API server on the bridge's own
    /// address in the lan namespace, with the three Node objects, and makes the agents
    /// started after this use it (`--kubeconfig`) instead of the manifest directory.
    pub fn use_kube_api(&mut self) -> Result<&FakeApi> {
        if self.api.is_some() {
            bail!("the lab already has its API server");
        }
        let ip = lan_addr(API_HOST, false);
        self.net.lan.add_addr("br0", ip, 24)?;
        let api = FakeApi::start_in_netns(self.net.lan.name(), ip)?;
        for node in node_objects() {
            api.apply(node)?;
        }
        let kubeconfig = self.dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        Ok(&self.api.insert((api, kubeconfig)).0)
    }

    /// The fake API server, in Kubernetes mode.
    pub fn api(&self) -> Result<&FakeApi> {
        self.api
            .as_ref()
            .map(|(a, _)| a)
            .context("the lab is in manifest mode (no L2Lab::use_kube_api)")
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Writes (or replaces) a manifest file atomically.
    pub fn write_manifest(&self, file: &str, content: &str) -> Result<()> {
        let staged = self.dir.path().join("staging").join(file);
        std::fs::write(&staged, content).with_context(|| format!("write {}", staged.display()))?;
        let target = self.manifests_dir().join(file);
        std::fs::rename(&staged, &target)
            .with_context(|| format!("rename into {}", target.display()))
    }

    /// Starts node `i`'s agent (`--devices eth0 --node-name node-<i+1> --l2-announce`,
    /// and the manifest directory or, after [`L2Lab::use_kube_api`], `--kubeconfig`) and
    /// waits for its first `sync applied`.
    pub fn start_agent(&mut self, i: usize) -> Result<&mut Agent> {
        if self.agents[i].is_some() {
            bail!("the agent of {} is already running", node_name(i));
        }
        self.starts += 1;
        let (manifests, kube) = match &self.api {
            Some((_, kubeconfig)) => (
                PathBuf::new(),
                vec!["--kubeconfig".into(), kubeconfig.display().to_string()],
            ),
            None => (self.manifests_dir(), Vec::new()),
        };
        let config = AgentConfig {
            bin: self.bins.svc_lb.clone(),
            manifests,
            bpffs: self.bpf[i].path.clone(),
            cgroup: self.cgroups[i].path().to_path_buf(),
            log_file: self
                .dir
                .path()
                .join(format!("agent-{}-{}.log", node_name(i), self.starts)),
            extra_args: vec![
                "--devices".into(),
                "eth0".into(),
                "--node-name".into(),
                node_name(i),
                "--l2-announce".into(),
                "--l2-heartbeat-interval".into(),
                HEARTBEAT_MS.to_string(),
                "--l2-heartbeat-key-file".into(),
                self.dir
                    .path()
                    .join(heartbeat_key_file(i))
                    .display()
                    .to_string(),
            ]
            .into_iter()
            .chain(kube)
            .collect(),
        };
        let mut agent = Agent::start_in_netns(config, self.net.nodes[i].name())?;
        agent.wait_applied(1, Duration::from_secs(30))?;
        Ok(self.agents[i].insert(agent))
    }

    /// Starts every node's agent, then waits until each counts all of them as live: the
    /// agents start one after the other, and the first one announces every address
    /// alone until it has heard the others for the heartbeat's rise time (1 s), so a
    /// test that looked earlier would see that start-up state, not the steady one.
    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..NODES {
            self.start_agent(i)?;
        }
        self.wait_all_live(Duration::from_secs(10))
    }

    /// Waits until every node's agent counts all [`NODES`] as live.
    pub fn wait_all_live(&self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let mut live = Vec::new();
            for i in 0..NODES {
                live.push(self.metrics(i)?.get("svclb_l2_live_nodes").copied());
            }
            if live.iter().all(|l| *l == Some(NODES as f64)) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("live nodes counted by each node after {timeout:?}: {live:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn agent(&mut self, i: usize) -> Result<&mut Agent> {
        self.agents[i]
            .as_mut()
            .with_context(|| format!("the agent of {} is not running", node_name(i)))
    }

    /// The key every node's key file holds when the lab starts.
    pub fn heartbeat_key(&self) -> &str {
        &self.heartbeat_key
    }

    /// Replaces node `i`'s heartbeat key file with `content` in one rename, as a Secret
    /// volume's update swaps its files.
    pub fn write_heartbeat_keys(&self, i: usize, content: &str) -> Result<()> {
        let path = self.dir.path().join(heartbeat_key_file(i));
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, content).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
    }

    /// Node `i` dies: its agent is killed (SIGKILL) and its LAN link goes down.
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        let mut agent = self.agents[i]
            .take()
            .with_context(|| format!("the agent of {} is not running", node_name(i)))?;
        agent.kill()?;
        self.net.nodes[i].ip(["link", "set", "eth0", "down"])?;
        Ok(())
    }

    /// A forger on the client's segment, without the key, claims for `secs` seconds that
    /// node `as_node` is alive: every 20 ms it sends each other node a plain heartbeat
    /// and an authenticated-looking one with a made-up tag, in that node's name. Returns
    /// the number of datagrams sent when joined.
    pub fn forge_heartbeats(
        &self,
        as_node: usize,
        secs: u64,
    ) -> std::thread::JoinHandle<Result<usize>> {
        let ns = self.net.client.name().to_owned();
        let name = node_name(as_node);
        std::thread::spawn(move || -> Result<usize> {
            netns::enter_netns(&ns)?;
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("forger socket")?;
            let plain = format!("svclb-l2-hb1 {name}").into_bytes();
            let until = std::time::Instant::now() + Duration::from_secs(secs);
            let mut sent = 0;
            while std::time::Instant::now() < until {
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default();
                let forged = [
                    b"svclb-l2-hb2 ".as_slice(),
                    &ms.to_be_bytes(),
                    name.as_bytes(),
                    &[0u8; 32],
                ]
                .concat();
                for to in (0..NODES).filter(|i| *i != as_node) {
                    for msg in [&plain, &forged] {
                        // A node whose link is down answers nothing; keep sending.
                        if sock
                            .send_to(msg, SocketAddr::new(node_addr(to, false), HEARTBEAT_PORT))
                            .is_ok()
                        {
                            sent += 1;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(sent)
        })
    }

    /// Node `i` comes back: link up, then a fresh agent on the same pins.
    pub fn revive_node(&mut self, i: usize) -> Result<()> {
        self.net.nodes[i].link_up("eth0")?;
        self.net.nodes[i].wait_link_ready("eth0", Duration::from_secs(5))?;
        self.net.route_pods(i)?;
        self.start_agent(i)?;
        Ok(())
    }

    /// Client options from the external client's namespace.
    pub fn client(&self, target: SocketAddr, proto: crate::report::Proto) -> ClientOpts {
        let mut o = ClientOpts::new(target, proto);
        o.netns = Some(self.net.client.name().to_owned());
        o
    }

    pub fn run_client(&self, opts: &ClientOpts) -> Result<crate::report::ClientReport> {
        crate::procs::run_client(&self.bins.harness, opts)
    }

    pub fn spawn_client(&self, opts: &ClientOpts) -> Result<crate::procs::ClientRun> {
        crate::procs::spawn_client(&self.bins.harness, opts)
    }

    /// The MAC address of each node's eth0.
    pub fn node_macs(&self) -> Result<Vec<[u8; 6]>> {
        self.net
            .nodes
            .iter()
            .map(|ns| {
                netns::in_netns(ns.name(), || {
                    Ok(svc_lb::announce::responder::link("eth0")?.mac)
                })
            })
            .collect()
    }

    /// Asks for `ip` once from the client (ARP for IPv4, a Neighbor Solicitation to
    /// its solicited-node group for IPv6) and returns the nodes that answered within
    /// `listen`, one entry per answer (so a node answering twice shows twice). An
    /// answer from an unknown MAC address is an error.
    pub fn who_answers(&self, ip: IpAddr, listen: Duration) -> Result<Vec<usize>> {
        let macs = self.node_macs()?;
        let answers = netns::in_netns(self.net.client.name(), || probe(ip, listen))?;
        answers
            .into_iter()
            .map(|m| {
                macs.iter()
                    .position(|n| *n == m)
                    .with_context(|| format!("an answer for {ip} from unknown MAC {m:02x?}"))
            })
            .collect()
    }

    /// Waits until exactly one node answers for `ip` (two probes in a row agree);
    /// returns it.
    pub fn wait_one_answer(&self, ip: IpAddr, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        loop {
            let a = self.who_answers(ip, Duration::from_millis(200))?;
            if a.len() == 1 && last == a {
                return Ok(a[0]);
            }
            if Instant::now() > deadline {
                bail!("{ip}: no single answering node after {timeout:?}; last answers {a:?}");
            }
            last = a;
        }
    }

    /// Runs `program args...` in the external client's namespace (a foreign client:
    /// no cgroup, no svc-lb on it).
    pub fn in_client(&self, program: &str, args: &[String]) -> Result<std::process::Output> {
        run_in(self.net.client.name(), program.as_ref(), args)
    }

    /// Runs `svc-lb ARGS --bpffs <node i's pins>` in node `i`'s namespace, where the
    /// CLI's default metrics address reaches that node's agent.
    pub fn svc_lb_on(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.push("--bpffs".into());
        all.push(self.bpf[i].path.display().to_string());
        run_in(self.net.nodes[i].name(), self.bins.svc_lb.as_os_str(), &all)
    }

    /// Node `i`'s agent's metrics (its default address, inside the node's namespace).
    pub fn metrics(&self, i: usize) -> Result<std::collections::BTreeMap<String, f64>> {
        let addr: SocketAddr = svc_lb::metrics::DEFAULT_METRICS_ADDR
            .parse()
            .context("the default metrics address")?;
        let text = netns::in_netns(self.net.nodes[i].name(), || {
            crate::metrics::http_get(addr, "/metrics")
        })?;
        Ok(crate::metrics::parse_metrics(&text))
    }

    /// Probes `vip` `times` times and checks that exactly `node` answers, once each time.
    pub fn only(&self, vip: IpAddr, node: usize, times: usize) -> Result<()> {
        for _ in 0..times {
            let a = self.who_answers(vip, Duration::from_millis(300))?;
            anyhow::ensure!(
                a == vec![node],
                "{vip}: answers from {:?}, want exactly one from {}",
                a.iter().map(|i| node_name(*i)).collect::<Vec<_>>(),
                node_name(node)
            );
        }
        Ok(())
    }

    /// `n` TCP connections from the client to `vip:80`.
    pub fn connect(&self, vip: IpAddr, n: u64) -> Result<ClientReport> {
        let mut o = self.client(SocketAddr::new(vip, 80), Proto::Tcp);
        o.count = n;
        let r = self.run_client(&o)?;
        anyhow::ensure!(r.is_consistent(), "inconsistent report {r:?}");
        Ok(r)
    }

    /// A client loop against `vip:80` for `secs` seconds in the background: a TCP
    /// connection every 20 ms with a 300 ms timeout, every attempt in the timeline (for
    /// [`outage_ms`]).
    pub fn client_loop(&self, vip: IpAddr, secs: u64) -> Result<crate::procs::ClientRun> {
        let mut o = self.client(SocketAddr::new(vip, 80), Proto::Tcp);
        o.count = 0;
        o.duration = Some(Duration::from_secs(secs));
        o.interval = Duration::from_millis(20);
        o.timeout = Duration::from_millis(300);
        o.timeline = true;
        self.spawn_client(&o)
    }

    /// The log lines of node `i`'s running agent that contain every one of `words`.
    pub fn log_count(&mut self, i: usize, words: &[&str]) -> Result<usize> {
        Ok(self
            .agent(i)?
            .log_lines()
            .iter()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .count())
    }
}

/// The three Node objects: InternalIPs on the LAN (both families), Ready.
pub fn node_objects() -> Vec<serde_json::Value> {
    (0..NODES)
        .map(|i| {
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node_name(i), "labels": {"kubernetes.io/hostname": node_name(i)}},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": node_addr(i, false).to_string()},
                        {"type": "InternalIP", "address": node_addr(i, true).to_string()},
                    ],
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            })
        })
        .collect()
}

/// The node that the rendezvous hash picks for `vip` among `among`.
pub fn hrw(vip: IpAddr, among: &[usize]) -> usize {
    let names: Vec<String> = among.iter().map(|i| node_name(*i)).collect();
    let w = svc_lb::announce::choose::winner(vip, names.iter().map(String::as_str));
    w.and_then(|w| names.iter().position(|n| n == w))
        .map_or(usize::MAX, |p| among[p])
}

/// An IPv4 and an IPv6 load-balancer address on the lab's subnet that the same node
/// wins among all three; returns (v4, v6, that node).
pub fn vips_won_by_one_node() -> (IpAddr, IpAddr, usize) {
    let all: Vec<usize> = (0..NODES).collect();
    let v4 = IpAddr::V4(lan_v4(200));
    let owner = hrw(v4, &all);
    let v6 = (0x200..0x300)
        .map(|h| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, h)))
        .find(|v| hrw(*v, &all) == owner)
        .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    (v4, v6, owner)
}

/// The longest time without a successful attempt in a timeline run, from its first
/// attempt's start to its last attempt's end.
pub fn outage_ms(r: &ClientReport) -> u64 {
    let Some(first) = r.timeline.first().map(|e| e.start_unix_us / 1000) else {
        return u64::MAX;
    };
    let end = r.timeline.last().map_or(first, |e| e.unix_ms);
    let mut last_ok = first;
    let mut worst = 0;
    for e in r.timeline.iter().filter(|e| !e.outcome.contains(':')) {
        worst = worst.max(e.unix_ms.saturating_sub(last_ok));
        last_ok = e.unix_ms;
    }
    worst.max(end.saturating_sub(last_ok))
}

/// A LoadBalancer Service `name` on port 80 (target [`POD_PORT`]) with the ingress IPs
/// `vips` (one per family, matching its cluster IPs), endpoints the pods of `nodes`;
/// `local` sets `externalTrafficPolicy: Local`.
pub fn lb_service(
    name: &str,
    cluster: &[IpAddr],
    vips: &[IpAddr],
    nodes: &[usize],
    local: bool,
) -> String {
    yaml_docs(&lb_objects(name, cluster, vips, nodes, local))
}

/// [`lb_service`]'s Service and EndpointSlices as API objects.
pub fn lb_objects(
    name: &str,
    cluster: &[IpAddr],
    vips: &[IpAddr],
    nodes: &[usize],
    local: bool,
) -> Vec<serde_json::Value> {
    let mut svc = Service::new("default", name, cluster)
        .port("http", 80, TargetPort::Number(POD_PORT), Protocol::Tcp)
        .spec("type", json!("LoadBalancer"))
        .spec("allocateLoadBalancerNodePorts", json!(false));
    if cluster.len() > 1 {
        svc = svc.spec("ipFamilyPolicy", json!("PreferDualStack"));
    }
    if local {
        svc = svc.spec("externalTrafficPolicy", json!("Local"));
    }
    for v in vips {
        svc = svc.lb_ingress(*v);
    }
    let mut docs = vec![svc.to_value()];
    for c in cluster {
        let v6 = c.is_ipv6();
        let mut slice = EndpointSlice::new("default", name, if v6 { "v6" } else { "v4" }, v6).port(
            "http",
            POD_PORT,
            Protocol::Tcp,
        );
        for &i in nodes {
            slice = slice.endpoint(
                Endpoint::ready(pod_addr(i, false, v6))
                    .pod(&format!("{name}-{}", pod_name(i)))
                    .node(&node_name(i)),
            );
        }
        docs.push(slice.to_value());
    }
    docs
}

/// Runs `body` in a fresh lab under [`crate::lab::isolated`]; on failure prints every
/// agent's log tail before the lab drops.
pub fn run_l2_lab(harness: &str, body: impl FnOnce(&mut L2Lab) -> Result<()>) {
    crate::lab::isolated(|| {
        let bins = Bins::from_env(Some(harness)).expect("locate the binaries");
        let mut lab = L2Lab::new(bins).expect("build the lab");
        if let Err(e) = body(&mut lab) {
            for i in 0..NODES {
                if let Ok(a) = lab.agent(i) {
                    let lines = a.log_lines();
                    let tail = lines.len().saturating_sub(60);
                    eprintln!("==== {} ====\n{}", node_name(i), lines[tail..].join("\n"));
                }
            }
            panic!("{e:?}");
        }
    });
}

/// Runs `program args...` in network namespace `ns`: the calling thread enters it and
/// the child inherits it.
fn run_in(ns: &str, program: &std::ffi::OsStr, args: &[String]) -> Result<std::process::Output> {
    netns::in_netns(ns, || {
        std::process::Command::new(program)
            .args(args)
            .output()
            .with_context(|| {
                format!(
                    "run {} {args:?} (cargo xtask setup installs it)",
                    program.display()
                )
            })
    })
}

const ETH_P_ALL: u16 = 0x0003;

/// Sends one request for `ip` on this namespace's eth0 and collects the source MAC of
/// every answer for it within `listen`.
fn probe(ip: IpAddr, listen: Duration) -> Result<Vec<[u8; 6]>> {
    let link = svc_lb::announce::responder::link("eth0")?;
    // SAFETY: plain socket(2); checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = link.ifindex;
    // SAFETY: valid sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("bind the probe socket");
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: `tv` is a live timeval and its size is passed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let request = match ip {
        IpAddr::V4(a) => arp_request(link.mac, lan_v4(CLIENT_HOST), a),
        IpAddr::V6(a) => solicit(link.mac, lan_v6(CLIENT_HOST), a),
    }
    .context("build the probe")?;
    // SAFETY: `request` is valid for reads of its length.
    let n = unsafe { libc::send(sock.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("send the probe");
    }
    let mut out = Vec::new();
    let deadline = Instant::now() + listen;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        if let Some(mac) = answer_for(&buf[..n], ip, link.mac) {
            out.push(mac);
        }
    }
    Ok(out)
}

fn lan_v4(h: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, h)
}

fn lan_v6(h: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, u16::from(h))
}

/// The sender MAC of `frame` when it is an ARP reply or Neighbor Advertisement for `ip`
/// not sent by `own`.
fn answer_for(frame: &[u8], ip: IpAddr, own: [u8; 6]) -> Option<[u8; 6]> {
    let eth = EthernetPacket::new(frame)?;
    let src = eth.get_source();
    if src == MacAddr::from(own) {
        return None;
    }
    match ip {
        IpAddr::V4(a) => {
            let arp =
                ArpPacket::new(eth.payload()).filter(|_| eth.get_ethertype() == EtherTypes::Arp)?;
            (arp.get_operation() == ArpOperations::Reply && arp.get_sender_proto_addr() == a)
                .then(|| arp.get_sender_hw_addr().octets())
        }
        IpAddr::V6(a) => {
            let ip6 = Ipv6Packet::new(eth.payload())
                .filter(|_| eth.get_ethertype() == EtherTypes::Ipv6)?;
            if ip6.get_next_header() != IpNextHeaderProtocols::Icmpv6 {
                return None;
            }
            let na = NeighborAdvertPacket::new(ip6.payload())?;
            (na.get_icmpv6_type() == Icmpv6Types::NeighborAdvert && na.get_target_addr() == a)
                .then(|| src.octets())
        }
    }
}

fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 60];
    let mut eth = MutableEthernetPacket::new(&mut buf)?;
    eth.set_destination(MacAddr::broadcast());
    eth.set_source(MacAddr::from(mac));
    eth.set_ethertype(EtherTypes::Arp);
    let mut arp = MutableArpPacket::new(eth.payload_mut())?;
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_operation(ArpOperations::Request);
    arp.set_sender_hw_addr(MacAddr::from(mac));
    arp.set_sender_proto_addr(sender);
    arp.set_target_hw_addr(MacAddr::zero());
    arp.set_target_proto_addr(target);
    Some(buf)
}

fn solicit(mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Option<Vec<u8>> {
    let t = target.octets();
    let dst = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let d = dst.octets();
    let mut buf = vec![0u8; 14 + 40 + 32];
    let mut eth = MutableEthernetPacket::new(&mut buf)?;
    eth.set_destination(MacAddr::new(0x33, 0x33, d[12], d[13], d[14], d[15]));
    eth.set_source(MacAddr::from(mac));
    eth.set_ethertype(EtherTypes::Ipv6);
    let mut ip = MutableIpv6Packet::new(eth.payload_mut())?;
    ip.set_version(6);
    ip.set_payload_length(32);
    ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
    ip.set_hop_limit(255);
    ip.set_source(src);
    ip.set_destination(dst);
    let mut ns = MutableNeighborSolicitPacket::new(ip.payload_mut())?;
    ns.set_icmpv6_type(Icmpv6Types::NeighborSolicit);
    ns.set_icmpv6_code(Icmpv6Code(0));
    ns.set_target_addr(target);
    ns.set_options(&[NdpOption {
        option_type: NdpOptionTypes::SourceLLAddr,
        length: 1,
        data: mac.to_vec(),
    }]);
    let sum = icmpv6::checksum(&Icmpv6Packet::new(ns.packet())?, &src, &dst);
    ns.set_checksum(sum);
    Some(buf)
}
