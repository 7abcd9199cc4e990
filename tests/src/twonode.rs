//! The two-node lab of the external-path tests: an external client, two nodes that each
//! run their own agent, and pods behind each node.
//!
//! ```text
//!                       lan netns: bridge br0 (no addresses)
//!        ┌──────────────────────┼───────────────────────┐
//!   c0 ──┘                  na ─┘                   nb ─┘
//!   │                       │                        │
//!   client netns            node A netns             node B netns
//!   eth0 10.250.0.100/24    eth0 10.250.0.1/24       eth0 10.250.0.2/24
//!        fd00:250::100/64        fd00:250::1/64           fd00:250::2/64
//!   no default route        p<k> 10.251.k.1/24 ──    p<k> 10.252.k.1/24 ──
//!                                pod netns (eth0 10.251.k.2/24, fd00:251:k::2/64)
//! ```
//!
//! - The client has only its connected LAN route plus the host routes a test adds for the
//!   load-balancer and external IPs under test (via node A or node B, see
//!   [`TwoNodeNet::route_via`]). Pod addresses and everything else are unreachable
//!   from it (ENETUNREACH): no test packet can leave the lab.
//! - Each node forwards (IPv4 and IPv6), sends no ICMP redirects (a node forwarding a
//!   packet back out of the LAN interface it came in on would otherwise tell the client
//!   to go direct), has reverse-path filtering off, and routes the other node's pod CIDR
//!   (10.25x.0.0/16, fd00:25x::/32) via the other node. Nodes have no default route.
//! - Every veth end has GRO on. A veth only runs NAPI when GRO (or an XDP program) is on
//!   at the receiving end, and XDP_TX / XDP_REDIRECT into a veth need that NAPI: without
//!   it the frames an XDP program sends are dropped.
//! - The client's eth0 has TX checksum offload off: a packet from another machine arrives
//!   with a complete checksum, never CHECKSUM_PARTIAL, and that is what a node's XDP and tc
//!   programs must handle on their LAN device.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    agent::{Agent, AgentConfig},
    bench::bpf::xdp_pass,
    bpffs,
    cgroup::Cgroup,
    cmd,
    lab::Bins,
    manifests::{Endpoint, EndpointSlice, Protocol},
    names,
    netns::{self, Netns, Veth},
    procs::{self, ClientOpts, ClientRun, Server},
    report::{ClientReport, Proto},
    tempdir::TempDir,
};

/// A node namespace routes between its pods and the LAN: forwarding on, no redirects
/// (the nodes share one segment), no reverse-path filter (replies of SNATed and
/// hairpinned flows come back on other links). Shared with the L2 lab.
pub const NODE_SYSCTLS: [(&str, &str); 6] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("net/ipv4/conf/all/send_redirects", "0"),
    ("net/ipv4/conf/default/send_redirects", "0"),
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
];

/// The two nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    A,
    B,
}

impl Node {
    pub const ALL: [Node; 2] = [Node::A, Node::B];

    /// 1 for A, 2 for B: the node's host number on the LAN and its pod CIDR digit.
    pub fn num(self) -> u8 {
        match self {
            Node::A => 1,
            Node::B => 2,
        }
    }

    fn idx(self) -> usize {
        usize::from(self.num() - 1)
    }

    /// `--node-name` and the EndpointSlices' `nodeName`.
    pub fn name(self) -> &'static str {
        match self {
            Node::A => "node-a",
            Node::B => "node-b",
        }
    }

    pub fn other(self) -> Node {
        match self {
            Node::A => Node::B,
            Node::B => Node::A,
        }
    }

    /// The node's LAN address.
    pub fn addr(self, v6: bool) -> IpAddr {
        lan_addr(self.num(), v6)
    }

    /// The LAN-side interface (in the lan namespace) of the node's link.
    fn lan_dev(self) -> &'static str {
        match self {
            Node::A => "na",
            Node::B => "nb",
        }
    }
}

/// The LAN's host `host` (`10.250.0.<host>`, `fd00:250::<host>`).
pub fn lan_addr(host: u8, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, u16::from(host)))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 250, 0, host))
    }
}

/// The external client's host number on the LAN.
pub const CLIENT_HOST: u8 = 100;

/// The external client's address.
pub fn client_addr(v6: bool) -> IpAddr {
    lan_addr(CLIENT_HOST, v6)
}

/// Address of pod `k` on `node`, or (`gw`) of the node's end of the pod's link.
fn pod_addr(node: Node, k: u8, gw: bool, v6: bool) -> IpAddr {
    let host: u8 = if gw { 1 } else { 2 };
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x250 + u16::from(node.num()),
            u16::from(k),
            0,
            0,
            0,
            0,
            u16::from(host),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 250 + node.num(), k, host))
    }
}

/// A node's pod CIDR.
fn pod_cidr(node: Node, v6: bool) -> String {
    if v6 {
        format!("fd00:{:x}::/32", 0x250 + u16::from(node.num()))
    } else {
        format!("10.{}.0.0/16", 250 + node.num())
    }
}

/// One pod: its own namespace behind a veth to its node.
#[derive(Debug)]
pub struct Pod {
    /// Label, also its server's reply id ("a1", "b1", ...).
    pub name: String,
    pub node: Node,
    /// Link number on the node: the pod is `10.25<node>.<k>.2`.
    pub k: u8,
    pub addr4: Ipv4Addr,
    pub addr6: Ipv6Addr,
    // Field order: the link goes before the namespace.
    _veth: Veth,
    pub netns: Netns,
}

impl Pod {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.addr6)
        } else {
            IpAddr::V4(self.addr4)
        }
    }
}

/// Runs `ethtool -K <dev> <feature> <on|off>` inside namespace `ns` (from a thread that
/// entered it, so the tool sees that namespace's interfaces).
pub fn ethtool_k(ns: &str, dev: &str, feature: &str, on: bool) -> Result<()> {
    let state = if on { "on" } else { "off" };
    netns::in_netns(ns, || {
        cmd::run("ethtool", ["-K", dev, feature, state])
            .with_context(|| format!("ethtool -K {dev} {feature} {state} in {ns}"))
    })?;
    Ok(())
}

/// Namespaces, links and routes of the two-node lab. Fields drop in declaration order:
/// pods (each with its link), the LAN links, then the namespaces.
#[derive(Debug)]
pub struct TwoNodeNet {
    /// Pass-through XDP links on the LAN ends of the nodes' links (see [`xdp_pass`]).
    wire: Vec<OwnedFd>,
    pub pods: Vec<Pod>,
    veths: Vec<Veth>,
    nodes: Vec<Netns>,
    pub client: Netns,
    pub lan: Netns,
}

impl TwoNodeNet {
    pub fn new() -> Result<Self> {
        Self::build(true)
    }

    /// `wire_xdp`: put the pass-through XDP program on the LAN ends of the nodes' links
    /// (see [`Self::new`]); without it each node's link is a plain veth pair, on which a
    /// node's XDP_TX frames are lost, as on a veth whose peer nobody controls.
    pub fn build(wire_xdp: bool) -> Result<Self> {
        let lan = Netns::new().context("lan namespace")?;
        let client = Netns::new().context("client namespace")?;
        let mut nodes = Vec::new();
        for n in Node::ALL {
            let ns = Netns::new().with_context(|| format!("namespace of {}", n.name()))?;
            // `default` before any interface exists, so that eth0 and every pod link
            // inherit it; `all` because the effective rp_filter is max(all, dev).
            for (key, value) in NODE_SYSCTLS {
                ns.sysctl(key, value)?;
            }
            nodes.push(ns);
        }
        let mut net = Self {
            wire: Vec::new(),
            pods: Vec::new(),
            veths: Vec::new(),
            nodes,
            client,
            lan,
        };
        // The bridge forwards at once (no STP); multicast snooping off so that IPv6
        // neighbour discovery is simply flooded.
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
        let mut ends: Vec<(String, &'static str)> = vec![(net.client.name().to_owned(), "c0")];
        for n in Node::ALL {
            ends.push((net.node(n).name().to_owned(), n.lan_dev()));
        }
        for (i, (_, lan_dev)) in ends.iter().enumerate() {
            let far = if i == 0 {
                &net.client
            } else {
                &net.nodes[i - 1]
            };
            let v = Veth::new(&net.lan, lan_dev, far, "eth0")?;
            net.veths.push(v);
            net.lan.ip(["link", "set", lan_dev, "master", "br0"])?;
            net.lan.link_up(lan_dev)?;
        }
        net.client.add_addr("eth0", client_addr(false), 24)?;
        net.client.add_addr("eth0", client_addr(true), 64)?;
        // A packet from another machine carries a complete checksum.
        ethtool_k(net.client.name(), "eth0", "tx", false)?;
        net.client.link_up("eth0")?;
        for n in Node::ALL {
            let ns = net.node(n);
            ns.add_addr("eth0", n.addr(false), 24)?;
            ns.add_addr("eth0", n.addr(true), 64)?;
            ns.link_up("eth0")?;
            for v6 in [false, true] {
                let via = n.other().addr(v6).to_string();
                let cidr = pod_cidr(n.other(), v6);
                ns.ip(["route", "add", &cidr, "via", &via])?;
            }
        }
        for dev in ["c0", "na", "nb"] {
            net.lan.wait_link_ready(dev, Duration::from_secs(5))?;
        }
        net.client.wait_link_ready("eth0", Duration::from_secs(5))?;
        for n in Node::ALL {
            net.node(n)
                .wait_link_ready("eth0", Duration::from_secs(5))?;
        }
        // GRO (hence NAPI) once both ends of each pair are up.
        for dev in ["c0", "na", "nb"] {
            ethtool_k(net.lan.name(), dev, "gro", true)?;
        }
        ethtool_k(net.client.name(), "eth0", "gro", true)?;
        for n in Node::ALL {
            ethtool_k(net.node(n).name(), "eth0", "gro", true)?;
        }
        // A node's XDP program answers rejects with XDP_TX; the LAN end must run XDP
        // itself for a veth to deliver those frames, as a wire would.
        for n in Node::ALL.into_iter().filter(|_| wire_xdp) {
            let dev = n.lan_dev();
            let link = netns::in_netns(net.lan.name(), move || {
                let c = std::ffi::CString::new(dev).context("device name")?;
                // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
                let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
                if idx == 0 {
                    bail!("no device {dev} in the LAN namespace");
                }
                xdp_pass(idx)
            })?;
            net.wire.push(link);
        }
        Ok(net)
    }

    pub fn node(&self, n: Node) -> &Netns {
        &self.nodes[n.idx()]
    }

    /// Adds pod `name` on `node` (its link number is the next free one on that node).
    pub fn add_pod(&mut self, name: &str, node: Node) -> Result<&Pod> {
        if self.pods.iter().any(|p| p.name == name) {
            bail!("pod {name} exists already");
        }
        let k = self
            .pods
            .iter()
            .filter(|p| p.node == node)
            .map(|p| p.k)
            .max()
            .unwrap_or(0)
            + 1;
        let ns = Netns::new().with_context(|| format!("namespace of pod {name}"))?;
        let node_ns = self.node(node);
        let dev = format!("p{k}");
        let veth = Veth::new(node_ns, &dev, &ns, "eth0")?;
        for v6 in [false, true] {
            let plen = if v6 { 64 } else { 24 };
            node_ns.add_addr(&dev, pod_addr(node, k, true, v6), plen)?;
            ns.add_addr("eth0", pod_addr(node, k, false, v6), plen)?;
        }
        node_ns.link_up(&dev)?;
        ns.link_up("eth0")?;
        for v6 in [false, true] {
            let gw = pod_addr(node, k, true, v6).to_string();
            ns.ip(["route", "add", "default", "via", &gw])?;
        }
        node_ns.wait_link_ready(&dev, Duration::from_secs(5))?;
        ns.wait_link_ready("eth0", Duration::from_secs(5))?;
        ethtool_k(node_ns.name(), &dev, "gro", true)?;
        ethtool_k(ns.name(), "eth0", "gro", true)?;
        let (IpAddr::V4(addr4), IpAddr::V6(addr6)) = (
            pod_addr(node, k, false, false),
            pod_addr(node, k, false, true),
        ) else {
            bail!("pod address families");
        };
        self.pods.push(Pod {
            name: name.to_owned(),
            node,
            k,
            addr4,
            addr6,
            _veth: veth,
            netns: ns,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in this lab"))
    }

    /// Sets (or replaces) the client's host route to `dest` via `node`.
    pub fn route_via(&self, dest: IpAddr, node: Node) -> Result<()> {
        let plen = if dest.is_ipv6() { 128 } else { 32 };
        let cidr = format!("{dest}/{plen}");
        let via = node.addr(dest.is_ipv6()).to_string();
        self.client.ip(["route", "replace", &cidr, "via", &via])?;
        Ok(())
    }

    /// Removes the client's route to `dest`.
    pub fn unroute(&self, dest: IpAddr) -> Result<()> {
        let plen = if dest.is_ipv6() { 128 } else { 32 };
        self.client
            .ip(["route", "del", &format!("{dest}/{plen}")])?;
        Ok(())
    }
}

/// A node's private pin directory `/sys/fs/bpf/svclbt-<pid>-<n>`. On drop it runs
/// `svc-lb cleanup` for it and the node's cgroup **inside the node's namespace**: the
/// node's agent attached programs to the node's `eth0`, and a cleanup run from the host
/// namespace must never go near the host's own `eth0`. Then it removes what is left of the
/// directory. (The single-node lab's `BpfDir` has no devices, so it runs cleanup in place.)
#[derive(Debug)]
pub struct NodePins {
    pub path: PathBuf,
    svc_lb: PathBuf,
    cgroup: PathBuf,
    netns: String,
}

impl NodePins {
    pub fn new(svc_lb: &Path, cgroup: &Path, netns: &str) -> Result<Self> {
        let path = bpffs::ensure_bpffs()?.join(names::unique());
        std::fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self {
            path,
            svc_lb: svc_lb.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
            netns: netns.to_owned(),
        })
    }
}

impl Drop for NodePins {
    fn drop(&mut self) {
        if self.path.exists() {
            let (svc_lb, path, cgroup) = (&self.svc_lb, &self.path, &self.cgroup);
            let r = netns::in_netns(&self.netns, || {
                cmd::run(
                    svc_lb,
                    [
                        "cleanup".as_ref(),
                        "--bpffs".as_ref(),
                        path.as_os_str(),
                        "--cgroup".as_ref(),
                        cgroup.as_os_str(),
                    ],
                )
            });
            if let Err(e) = r {
                eprintln!("svclb-harness: teardown: {e:#}");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "svclb-harness: teardown: remove {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Per-node agent settings.
#[derive(Clone, Debug, Default)]
pub struct NodeAgentOptions {
    /// `--xdp`.
    pub xdp: bool,
    /// More arguments for both agents.
    pub extra_args: Vec<String>,
}

/// The whole two-node lab. Fields drop in declaration order: agents and servers stop
/// first; then each pin directory runs `svc-lb cleanup` (which needs its cgroup); then
/// the cgroups, the network and the temp directory with manifests and logs.
pub struct TwoNodeLab {
    agents: Vec<Option<Agent>>,
    servers: Vec<Server>,
    bpf: Vec<NodePins>,
    cgroups: Vec<Cgroup>,
    pub net: TwoNodeNet,
    dir: TempDir,
    pub bins: Bins,
    agent_starts: usize,
}

impl TwoNodeLab {
    /// Builds the network (no pods yet), a cgroup and a pin directory per node and an
    /// empty manifest directory shared by both agents (the same Services and
    /// EndpointSlices are visible to every node of a cluster).
    pub fn new(bins: Bins) -> Result<Self> {
        Self::build(bins, true)
    }

    /// [`Self::new`] with the network of [`TwoNodeNet::build`]`(wire_xdp)`.
    pub fn build(bins: Bins, wire_xdp: bool) -> Result<Self> {
        let dir = TempDir::new()?;
        for sub in ["manifests", "staging"] {
            std::fs::create_dir(dir.path().join(sub))
                .with_context(|| format!("create {sub} dir"))?;
        }
        let net = TwoNodeNet::build(wire_xdp)?;
        let mut cgroups = Vec::new();
        let mut bpf = Vec::new();
        for n in Node::ALL {
            let cg = Cgroup::new()?;
            bpf.push(NodePins::new(&bins.svc_lb, cg.path(), net.node(n).name())?);
            cgroups.push(cg);
        }
        Ok(Self {
            agents: vec![None, None],
            servers: Vec::new(),
            bpf,
            cgroups,
            net,
            dir,
            bins,
            agent_starts: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn cgroup(&self, n: Node) -> &Path {
        self.cgroups[n.idx()].path()
    }

    pub fn bpffs(&self, n: Node) -> &Path {
        &self.bpf[n.idx()].path
    }

    /// Adds a pod and starts its server: TCP and UDP on `port`, IPv4 and IPv6, replying
    /// `<name> <client address seen>`.
    pub fn add_pod(&mut self, name: &str, node: Node, port: u16) -> Result<()> {
        let pod = self.net.add_pod(name, node)?;
        let addrs: Vec<std::net::SocketAddr> = [false, true]
            .iter()
            .map(|v6| std::net::SocketAddr::new(pod.addr(*v6), port))
            .collect();
        let ns = pod.netns.name().to_owned();
        let s = Server::start_opts(&self.bins.harness, &ns, name, &addrs, &addrs, true)?;
        self.servers.push(s);
        Ok(())
    }

    pub fn pod_addr(&self, name: &str, v6: bool) -> IpAddr {
        self.net.pod(name).addr(v6)
    }

    /// The EndpointSlice of Service `ns`/`name` for one family: each of `ports` (name,
    /// protocol) to [`POD_PORT`], and the lab pods `pods` as ready endpoints on their
    /// nodes (pod names `<name>-<pod>`).
    pub fn pod_slice(
        &self,
        ns: &str,
        name: &str,
        v6: bool,
        ports: &[(&str, Protocol)],
        pods: &[&str],
    ) -> EndpointSlice {
        let mut slice = EndpointSlice::new(ns, name, if v6 { "v6" } else { "v4" }, v6);
        for (port, proto) in ports {
            slice = slice.port(port, POD_PORT, *proto);
        }
        for pod in pods {
            let p = self.net.pod(pod);
            slice = slice.endpoint(
                Endpoint::ready(p.addr(v6))
                    .pod(&format!("{name}-{pod}"))
                    .node(p.node.name()),
            );
        }
        slice
    }

    /// Writes (or replaces) a manifest file atomically (staged, then renamed in).
    pub fn write_manifest(&self, file: &str, content: &str) -> Result<()> {
        let staged = self.dir.path().join("staging").join(file);
        std::fs::write(&staged, content).with_context(|| format!("write {}", staged.display()))?;
        let target = self.manifests_dir().join(file);
        std::fs::rename(&staged, &target)
            .with_context(|| format!("rename into {}", target.display()))
    }

    /// Starts both agents, each in its node's namespace with `--devices eth0
    /// --node-name node-x`, and waits for the first `sync applied` of each.
    pub fn start_agents(&mut self, opts: &NodeAgentOptions) -> Result<()> {
        for n in Node::ALL {
            if self.agents[n.idx()].is_some() {
                bail!("the agent of {} is already running", n.name());
            }
            self.agent_starts += 1;
            let mut extra_args: Vec<String> = vec![
                "--devices".into(),
                "eth0".into(),
                "--node-name".into(),
                n.name().into(),
            ];
            if opts.xdp {
                extra_args.push("--xdp".into());
            }
            extra_args.extend(opts.extra_args.iter().cloned());
            let config = AgentConfig {
                bin: self.bins.svc_lb.clone(),
                manifests: self.manifests_dir(),
                bpffs: self.bpffs(n).to_path_buf(),
                cgroup: self.cgroup(n).to_path_buf(),
                log_file: self.dir.path().join(format!(
                    "agent-{}-{}.log",
                    n.name(),
                    self.agent_starts
                )),
                extra_args,
            };
            let agent = Agent::start_in_netns(config, self.net.node(n).name())?;
            self.agents[n.idx()] = Some(agent);
        }
        for n in Node::ALL {
            self.agent(n)?.wait_applied(1, Duration::from_secs(30))?;
        }
        Ok(())
    }

    pub fn agent(&mut self, n: Node) -> Result<&mut Agent> {
        self.agents[n.idx()]
            .as_mut()
            .with_context(|| format!("the agent of {} is not running", n.name()))
    }

    /// `sync applied` counts of both agents, to wait for the next one after a change.
    pub fn applied(&mut self) -> Result<[usize; 2]> {
        Ok([
            self.agent(Node::A)?.applied_count(),
            self.agent(Node::B)?.applied_count(),
        ])
    }

    /// Waits until both agents applied a sync after `before` (from [`Self::applied`]).
    pub fn wait_both_applied(&mut self, before: [usize; 2]) -> Result<()> {
        for n in Node::ALL {
            self.agent(n)?
                .wait_applied(before[n.idx()] + 1, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Writes a manifest and waits until both agents applied it.
    pub fn apply_manifest(&mut self, file: &str, content: &str) -> Result<()> {
        let before = self.applied()?;
        self.write_manifest(file, content)?;
        self.wait_both_applied(before)
    }

    /// Client options from the external client's namespace (in no cgroup: it stands for
    /// another machine, where no agent runs).
    pub fn client(&self, target: std::net::SocketAddr, proto: Proto) -> ClientOpts {
        let mut o = ClientOpts::new(target, proto);
        o.netns = Some(self.net.client.name().to_owned());
        o
    }

    /// Client options from inside pod `pod`'s namespace, in its node's cgroup (so that
    /// the node's socket programs serve its sockets, as they serve every local pod).
    pub fn pod_client(&self, pod: &str, target: std::net::SocketAddr, proto: Proto) -> ClientOpts {
        let p = self.net.pod(pod);
        let mut o = ClientOpts::new(target, proto);
        o.netns = Some(p.netns.name().to_owned());
        o.cgroup = Some(self.cgroup(p.node).to_path_buf());
        o
    }

    pub fn run_client(&self, opts: &ClientOpts) -> Result<ClientReport> {
        procs::run_client(&self.bins.harness, opts)
    }

    pub fn spawn_client(&self, opts: &ClientOpts) -> Result<ClientRun> {
        procs::spawn_client(&self.bins.harness, opts)
    }

    /// `GET <path>` over HTTP/1.0 from the client's namespace; returns the status code
    /// and the body.
    pub fn http_get(&self, target: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
        let ns = self.net.client.name().to_owned();
        netns::in_netns(&ns, move || http_get(target, path))
    }

    /// The value of one series (exactly as exposed, e.g.
    /// `svclb_datapath_events_total{hook="ext",name="xdp_tx"}`) of node `n`'s agent metrics;
    /// 0 when the agent does not expose it (yet).
    pub fn node_metric(&self, n: Node, series: &str) -> Result<u64> {
        let ns = self.net.node(n).name().to_owned();
        let (status, body) = netns::in_netns(&ns, || {
            http_get(
                std::net::SocketAddr::from(([127, 0, 0, 1], 9098)),
                "/metrics",
            )
        })?;
        if status != 200 {
            bail!("metrics of node {}: HTTP {status}", n.name());
        }
        for line in body.lines() {
            if let Some((name, value)) = line.rsplit_once(' ')
                && name == series
            {
                return value
                    .parse()
                    .with_context(|| format!("metric line {line:?} of node {}", n.name()));
            }
        }
        Ok(0)
    }

    /// Runs a command inside node `n`'s namespace (for diagnostics: `ip`, `bpftool`...).
    pub fn node_cmd(&self, n: Node, program: &str, args: &[&str]) -> Result<String> {
        let ns = self.net.node(n).name().to_owned();
        netns::in_netns(&ns, || {
            let out = Command::new(program)
                .args(args)
                .output()
                .with_context(|| format!("run {program}"))?;
            Ok(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }
}

impl TwoNodeLab {
    /// What each node's datapath says, for a failed test: the programmed frontends
    /// (`svc-lb list`), the non-zero `svclb_` metrics of its agent (served on the default
    /// metrics address inside the node's namespace) and the programs on its devices.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for n in Node::ALL {
            out.push_str(&format!("==== {} ====\n", n.name()));
            let bpffs = self.bpffs(n).display().to_string();
            let svc_lb = self.bins.svc_lb.display().to_string();
            match self.node_cmd(n, &svc_lb, &["list", "--bpffs", &bpffs]) {
                Ok(t) => out.push_str(&format!("-- svc-lb list\n{t}")),
                Err(e) => out.push_str(&format!("-- svc-lb list: {e:#}\n")),
            }
            let ns = self.net.node(n).name().to_owned();
            let metrics = netns::in_netns(&ns, || {
                http_get(
                    std::net::SocketAddr::from(([127, 0, 0, 1], 9098)),
                    "/metrics",
                )
            });
            match metrics {
                Ok((_, body)) => {
                    out.push_str("-- non-zero svclb_ metrics\n");
                    for l in body.lines() {
                        if l.starts_with("svclb_") && !l.ends_with(" 0") {
                            out.push_str(l);
                            out.push('\n');
                        }
                    }
                }
                Err(e) => out.push_str(&format!("-- metrics: {e:#}\n")),
            }
            match self.node_cmd(n, "bpftool", &["net", "show"]) {
                Ok(t) => out.push_str(&format!("-- bpftool net show\n{t}")),
                Err(e) => out.push_str(&format!("-- bpftool net show: {e:#}\n")),
            }
            // veth's own counters include XDP (xdp_tx, xdp_tx_errors, drops).
            match self.node_cmd(n, "ethtool", &["-S", "eth0"]) {
                Ok(t) => out.push_str(&format!(
                    "-- ethtool -S eth0 (non-zero)\n{}",
                    nonzero_lines(&t)
                )),
                Err(e) => out.push_str(&format!("-- ethtool -S eth0: {e:#}\n")),
            }
            match self.node_cmd(n, "nstat", &["-a", "-s"]) {
                Ok(t) => out.push_str(&format!("-- nstat -a\n{t}")),
                Err(e) => out.push_str(&format!("-- nstat: {e:#}\n")),
            }
        }
        for (what, ns) in [("client", &self.net.client), ("lan", &self.net.lan)] {
            let name = ns.name().to_owned();
            let r = netns::in_netns(&name, || {
                let mut t = cmd::run("ip", ["-s", "link", "show"])?;
                if what == "client" {
                    t.push_str(&cmd::run("nstat", ["-a", "-s"])?);
                } else {
                    for dev in ["c0", "na", "nb"] {
                        let stats = cmd::run("ethtool", ["-S", dev])?;
                        let gro = cmd::run("ethtool", ["-k", dev])?;
                        t.push_str(&format!(
                            "-- ethtool -S {dev} (non-zero)\n{}",
                            nonzero_lines(&stats)
                        ));
                        t.push_str(&format!(
                            "-- ethtool -k {dev}: {}\n",
                            gro.lines()
                                .filter(|l| l.contains("generic-receive-offload"))
                                .collect::<String>()
                        ));
                    }
                }
                Ok(t)
            });
            match r {
                Ok(t) => out.push_str(&format!("==== {what}: ip -s link, nstat ====\n{t}")),
                Err(e) => out.push_str(&format!("==== {what}: {e:#}\n")),
            }
        }
        out
    }
}

/// The lines of `ethtool -S` output whose value is not 0.
fn nonzero_lines(text: &str) -> String {
    text.lines()
        .filter(|l| {
            l.rsplit_once(':')
                .is_some_and(|(_, v)| v.trim() != "0" && !v.trim().is_empty())
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A minimal HTTP/1.0 GET: enough for a health check endpoint, no dependency.
fn http_get(target: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .with_context(|| format!("connect to {target}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .context("set read timeout")?;
    let host = match target.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {host}:{}\r\nConnection: close\r\n\r\n",
        target.port()
    )
    .context("send request")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("read response")?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

// Appended for tests/tests/external_life.rs (agent restart, XDP fallback): one node's
// agent taken out of the lab, and one started with a configuration of the test's own.
impl TwoNodeLab {
    /// Takes node `n`'s agent out of the lab, still running: the caller stops it (its
    /// log stays readable) and may start another one with [`Self::start_agent_with`].
    pub fn take_agent(&mut self, n: Node) -> Option<Agent> {
        self.agents[n.idx()].take()
    }

    /// Starts an agent with `config` in node `n`'s namespace (for example the config of
    /// a stopped agent, to restart it with the same flags and pins, or one with other
    /// `--devices`) and waits for its first `sync applied`.
    pub fn start_agent_with(&mut self, n: Node, config: AgentConfig) -> Result<&mut Agent> {
        if self.agents[n.idx()].is_some() {
            bail!("the agent of {} is already running", n.name());
        }
        self.agent_starts += 1;
        let mut agent = Agent::start_in_netns(config, self.net.node(n).name())?;
        agent.wait_applied(1, Duration::from_secs(30))?;
        Ok(self.agents[n.idx()].insert(agent))
    }

    /// A fresh log file name in the lab's directory for another start of `n`'s agent.
    pub fn next_agent_log(&self, n: Node) -> PathBuf {
        self.dir
            .path()
            .join(format!("agent-{}-{}.log", n.name(), self.agent_starts + 1))
    }
}

/// The port every pod of [`run_lab`]'s default set serves TCP and UDP on.
pub const POD_PORT: u16 = 8080;

/// Runs `body` in a fresh lab with pods a1, a2 on node A and b1 on node B (serving on
/// [`POD_PORT`]), under [`crate::lab::isolated`]. `harness` is the test's
/// `env!("CARGO_BIN_EXE_svclb-harness")`. On failure it prints the lab's diagnostics and
/// panics while the lab is alive, so that its agents print their logs as it drops.
pub fn run_lab(harness: &str, body: impl FnOnce(&mut TwoNodeLab) -> Result<()>) {
    run_lab_with(harness, true, body);
}

/// [`run_lab`] on the network of [`TwoNodeNet::build`]`(wire_xdp)`.
pub fn run_lab_with(
    harness: &str,
    wire_xdp: bool,
    body: impl FnOnce(&mut TwoNodeLab) -> Result<()>,
) {
    crate::lab::isolated(|| {
        let bins = Bins::from_env(Some(harness)).expect("locate the binaries");
        let mut lab = TwoNodeLab::build(bins, wire_xdp).expect("build the lab");
        let setup = (|| -> Result<()> {
            lab.add_pod("a1", Node::A, POD_PORT)?;
            lab.add_pod("a2", Node::A, POD_PORT)?;
            lab.add_pod("b1", Node::B, POD_PORT)?;
            Ok(())
        })();
        if let Err(e) = setup.and_then(|()| body(&mut lab)) {
            eprintln!("{}", lab.diagnostics());
            panic!("{e:?}");
        }
    });
}
