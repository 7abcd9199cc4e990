//! The bench's lab: three backend namespaces and one client namespace per plane (see
//! [`super::workload`]), two cgroups, a pin directory, the backend servers, the agent,
//! and the netfilter rules of the two baselines. Everything is a guard; the fields drop
//! in declaration order, which is the teardown order.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use super::{
    nscmd::{self, Input},
    server::BenchServer,
    workload::{IDS, NFT_TABLE, Plane},
};
use crate::{
    agent::{Agent, AgentConfig},
    bpffs::BpfDir,
    cgroup::Cgroup,
    netns::{Netns, Veth},
    tempdir::TempDir,
    topology::Topology,
};

/// Interface names, in a backend namespace, of the link to each plane's client.
fn backend_dev(plane: Plane) -> String {
    format!("eth{}", plane as u8)
}

/// The baselines' rules. Dropped before the namespaces, so that they are removed
/// explicitly (deleting the namespace would remove them too).
pub struct Rules {
    pub ipt_ns: String,
    pub nft_ns: String,
}

pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(120);

impl Rules {
    /// Empties the iptables nat table of the iptables plane.
    pub fn clear_iptables(&self, timeout: Duration) -> Result<()> {
        nscmd::run_ok(
            &self.ipt_ns,
            "iptables-restore",
            &[],
            Input::Text(super::workload::IPTABLES_EMPTY),
            timeout,
        )?;
        Ok(())
    }

    /// Deletes the kube-proxy table of the nftables plane (creating it first makes the
    /// deletion succeed whether or not it existed).
    pub fn clear_nft(&self, timeout: Duration) -> Result<()> {
        let text = format!("add table {NFT_TABLE}\ndelete table {NFT_TABLE}\n");
        nscmd::run_ok(
            &self.nft_ns,
            "nft",
            &["-f", "-"],
            Input::Text(&text),
            timeout,
        )?;
        Ok(())
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        if let Err(e) = self.clear_iptables(CLEANUP_TIMEOUT) {
            eprintln!("svclb-bench: teardown: iptables rules: {e:#}");
        }
        if let Err(e) = self.clear_nft(CLEANUP_TIMEOUT) {
            eprintln!("svclb-bench: teardown: nftables rules: {e:#}");
        }
    }
}

pub struct BenchNet {
    pub agent: Option<Agent>,
    _servers: Vec<BenchServer>,
    pub rules: Rules,
    /// `svc-lb cleanup` of the pins and of the svc-lb cgroup's links (needs the cgroup).
    bpf: BpfDir,
    /// The svc-lb client cgroup: the agent's programs are attached here.
    svclb_cg: Cgroup,
    /// Where every other client runs: same depth in the hierarchy, nothing attached.
    plain_cg: Cgroup,
    _veths: Vec<Veth>,
    ipt_client: Netns,
    nft_client: Netns,
    /// Plane 0's client namespace and the three backend namespaces.
    pub topo: Topology,
    pub dir: TempDir,
    svc_lb: PathBuf,
    agent_starts: usize,
    agent_args: Vec<String>,
    /// Flags added to the next agents' command lines (`--agent-arg`, `--wide-agent-arg`).
    pub extra_agent_args: Vec<String>,
}

impl BenchNet {
    pub fn new(svc_lb: &Path, bench_bin: &Path) -> Result<Self> {
        let dir = TempDir::new()?;
        for sub in ["manifests", "staging", "rules"] {
            std::fs::create_dir(dir.path().join(sub))
                .with_context(|| format!("create {sub} dir"))?;
        }
        let topo = Topology::new(&["a", "b", "c"])?;
        let ipt_client = Netns::new().context("iptables client namespace")?;
        let nft_client = Netns::new().context("nftables client namespace")?;
        let mut veths = Vec::new();
        for (plane, client) in [
            (Plane::Iptables, &ipt_client),
            (Plane::Nftables, &nft_client),
        ] {
            for b in &topo.backends {
                let k = b.index;
                let cdev = format!("to-{k}");
                let bdev = backend_dev(plane);
                veths.push(Veth::new(client, &cdev, &b.netns, &bdev)?);
                client.add_addr(&cdev, IpAddr::V4(plane.client(k)), 24)?;
                b.netns.add_addr(&bdev, IpAddr::V4(plane.backend(k)), 24)?;
                client.link_up(&cdev)?;
                b.netns.link_up(&bdev)?;
            }
        }
        // NAT happens after the routing decision of connect()/sendmsg(): without a route
        // for the VIPs the kernel refuses them (ENETUNREACH) before iptables or nftables
        // see a packet. On a node that route is the default route; here it is a route
        // for the Service range into a veth pair whose two ends are both in the client
        // namespace (the kernel here has no dummy device): a packet that was not
        // translated arrives at the other end, is not for a local address, is not
        // forwarded, and is dropped, so nothing leaves the namespace. The source address
        // for that route sits on the pair, and the backends route it back over their link.
        for (plane, client) in [
            (Plane::Iptables, &ipt_client),
            (Plane::Nftables, &nft_client),
        ] {
            let src = plane.service_source();
            veths.push(Veth::new(client, "svc0", client, "svc0-sink")?);
            client.add_addr("svc0", IpAddr::V4(src), 32)?;
            client.link_up("svc0")?;
            client.link_up("svc0-sink")?;
            client.ip([
                "route",
                "add",
                super::workload::SERVICE_CIDR,
                "dev",
                "svc0",
                "src",
                &src.to_string(),
            ])?;
            for b in &topo.backends {
                b.netns.ip([
                    "route".to_owned(),
                    "add".to_owned(),
                    format!("{src}/32"),
                    "via".to_owned(),
                    plane.client(b.index).to_string(),
                    "dev".to_owned(),
                    backend_dev(plane),
                ])?;
            }
        }
        // The hot Service's extra endpoint addresses, on every plane, in one `ip` call
        // per backend namespace.
        for b in &topo.backends {
            let mut batch = String::new();
            for plane in Plane::ALL {
                for a in plane.hot_endpoints() {
                    if a.octets()[2] == b.index {
                        batch.push_str(&format!("addr add {a}/24 dev {}\n", backend_dev(plane)));
                    }
                }
            }
            let file = dir
                .path()
                .join("staging")
                .join(format!("addrs-{}", b.index));
            std::fs::write(&file, batch).context("write the address batch")?;
            crate::cmd::run(
                "ip",
                [
                    "-n".as_ref(),
                    b.netns.name().as_ref(),
                    "-batch".as_ref(),
                    file.as_os_str(),
                ],
            )?;
        }
        for client in [&topo.client, &ipt_client, &nft_client] {
            for b in &topo.backends {
                client.wait_link_ready(&format!("to-{}", b.index), Duration::from_secs(5))?;
            }
            // Room for the load generators' short connections (the server closes first,
            // so ports are reusable at once; this is only headroom).
            client.sysctl("net/ipv4/ip_local_port_range", "1024 65535")?;
        }
        for b in &topo.backends {
            // The servers close first, so they would keep every connection in TIME_WAIT
            // for 60 s. At these rates the client reuses each 4-tuple within seconds, and
            // a NATed SYN carries timestamps based on the VIP it was sent to: the server
            // would drop it as old (PAWS) whenever another VIP's flow left a TIME_WAIT on
            // the same tuple, an artifact of the bench, not a cost of the mode. So the
            // backends keep no TIME_WAIT at all, in every mode.
            b.netns.sysctl("net/ipv4/tcp_max_tw_buckets", "0")?;
            for plane in [Plane::Iptables, Plane::Nftables] {
                b.netns
                    .wait_link_ready(&backend_dev(plane), Duration::from_secs(5))?;
            }
        }
        let svclb_cg = Cgroup::new()?;
        let plain_cg = Cgroup::new()?;
        let bpf = BpfDir::new(svc_lb, svclb_cg.path())?;
        let rules = Rules {
            ipt_ns: ipt_client.name().to_owned(),
            nft_ns: nft_client.name().to_owned(),
        };
        let mut servers = Vec::new();
        for (b, id) in topo.backends.iter().zip(IDS) {
            servers.push(BenchServer::start(bench_bin, b.netns.name(), id)?);
        }
        let mut agent_args = vec!["--log-format".to_owned(), "json".to_owned()];
        // The agent's HTTP endpoints default to fixed ports in the host namespace, which
        // another agent on the machine may hold; the bench needs neither.
        for flag in ["--metrics-addr", "--health-addr"] {
            if agent_supports(svc_lb, flag) {
                agent_args.extend([flag.to_owned(), "off".to_owned()]);
            }
        }
        Ok(Self {
            agent: None,
            _servers: servers,
            rules,
            bpf,
            svclb_cg,
            plain_cg,
            _veths: veths,
            ipt_client,
            nft_client,
            topo,
            dir,
            svc_lb: svc_lb.to_path_buf(),
            agent_starts: 0,
            agent_args,
            extra_agent_args: Vec::new(),
        })
    }

    pub fn client_ns(&self, plane: Plane) -> &str {
        match plane {
            Plane::SvcLb => self.topo.client.name(),
            Plane::Iptables => self.ipt_client.name(),
            Plane::Nftables => self.nft_client.name(),
        }
    }

    pub fn svclb_cgroup(&self) -> &Path {
        self.svclb_cg.path()
    }

    pub fn plain_cgroup(&self) -> &Path {
        self.plain_cg.path()
    }

    pub fn bpffs(&self) -> &Path {
        self.bpf.path()
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn rules_dir(&self) -> PathBuf {
        self.dir.path().join("rules")
    }

    /// Writes a manifest file atomically (staged, then renamed in), so the agent never
    /// reads half a file. Returns right after the rename.
    pub fn write_manifest(&self, name: &str, content: &str) -> Result<()> {
        let staged = self.dir.path().join("staging").join(name);
        std::fs::write(&staged, content).with_context(|| format!("write {}", staged.display()))?;
        let target = self.manifests().join(name);
        std::fs::rename(&staged, &target).with_context(|| format!("rename to {}", target.display()))
    }

    /// Removes every manifest.
    pub fn clear_manifests(&self) -> Result<()> {
        let dir = self.manifests();
        for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let p = e?.path();
            std::fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
        }
        Ok(())
    }

    /// Stops the agent and removes its programs and pins, so the next agent starts from
    /// empty maps.
    pub fn reset_agent(&mut self) -> Result<()> {
        if let Some(mut a) = self.agent.take() {
            a.terminate(Duration::from_secs(10))?;
        }
        if self.bpf.path().exists() {
            crate::cmd::run(
                &self.svc_lb,
                [
                    "cleanup".as_ref(),
                    "--bpffs".as_ref(),
                    self.bpf.path().as_os_str(),
                    "--cgroup".as_ref(),
                    self.svclb_cg.path().as_os_str(),
                ],
            )?;
        }
        Ok(())
    }

    /// Starts a fresh agent on the manifest directory (not waiting for its sync).
    pub fn start_agent(&mut self) -> Result<&mut Agent> {
        self.reset_agent()?;
        self.agent_starts += 1;
        let config = AgentConfig {
            bin: self.svc_lb.clone(),
            manifests: self.manifests(),
            bpffs: self.bpf.path().to_path_buf(),
            cgroup: self.svclb_cg.path().to_path_buf(),
            log_file: self
                .dir
                .path()
                .join(format!("agent-{}.log", self.agent_starts)),
            extra_args: self
                .agent_args
                .iter()
                .chain(&self.extra_agent_args)
                .cloned()
                .collect(),
        };
        Ok(self.agent.insert(Agent::start(config)?))
    }
}

/// Whether `svc-lb agent --help` lists `flag` (the agent's flags are still growing).
fn agent_supports(svc_lb: &Path, flag: &str) -> bool {
    std::process::Command::new(svc_lb)
        .args(["agent", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}
