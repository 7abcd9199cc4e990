//! Command-line interface: `agent`, `list`, `conntrack`, `trace`, `status`, `cleanup`.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    agent::{self, AgentConfig},
    datapath::{
        links,
        pinned::PinnedMaps,
        pins::{self, DEFAULT_BPFFS},
    },
    inspect,
    metrics::{self, DEFAULT_METRICS_ADDR},
    model::NodeInfo,
};

#[derive(Parser, Debug)]
#[command(
    name = "svc-lb",
    version,
    about = "Kubernetes Service load balancer on eBPF"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The log target of the eBPF programs' aya-log records (`--bpf-log`); it is set in
/// svc-lb-ebpf/src/debug.rs.
pub const BPF_LOG_TARGET: &str = "svclb_ebpf";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of the agent's variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: program Services into the kernel and keep them in sync.
    Agent {
        /// Directory of Service and EndpointSlice manifests (*.yaml, *.yml, *.json).
        /// Without it the agent watches the Kubernetes API.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Kubernetes mode: the kubeconfig to use [default: $KUBECONFIG, else the
        /// in-cluster service account]
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Serve /healthz and /livez (kube-proxy's node health) and /readyz (initial
        /// sync applied) on this address ("off" disables). Given explicitly, an address
        /// that cannot be bound stops the agent at start; the default is only logged
        /// [default: 0.0.0.0:10256 in Kubernetes mode, 127.0.0.1:10256 with --manifests]
        #[arg(long, value_parser = crate::health::parse_addr)]
        health_addr: Option<crate::health::HealthAddr>,
        /// Program Services labelled service.kubernetes.io/service-proxy-name only when
        /// the label has this value [default: leave every labelled Service alone]
        #[arg(long)]
        service_proxy_name: Option<String>,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// cgroup v2 directory to attach to [default: the cgroup2 root from /proc/self/mountinfo]
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// This node's name, for node-local rules [default: $NODE_NAME, then the hostname]
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Serve Prometheus metrics at /metrics and the agent status at /status on this
        /// address ("off" disables; port 0 picks a free port and logs it). Given
        /// explicitly, an address that cannot be bound stops the agent at start; the
        /// default is only logged [default: 127.0.0.1:9098]
        #[arg(long, value_parser = metrics::parse_addr)]
        metrics_addr: Option<metrics::MetricsAddr>,
        /// Turn on the eBPF programs' debug log (aya-log): one line per connect/sendmsg
        /// decision, at level debug under the target `svclb_ebpf` (shown unless the log
        /// filter sets that target). Off by default: the verifier then removes the
        /// logging code.
        #[arg(long)]
        bpf_log: bool,
        /// Devices that get the external path (tc programs, and XDP with --xdp) for
        /// NodePort, LoadBalancer and external IPs reached from outside the node
        /// [default: in Kubernetes mode the interfaces carrying the Node's InternalIP and
        /// ExternalIP addresses (never lo); in manifest mode none, so the external path
        /// is off]
        #[arg(long, value_delimiter = ',', value_name = "IF[,IF...]")]
        devices: Option<Vec<String>>,
        /// Which node addresses serve node ports, to clients on the node (socket
        /// programs) and from outside (tc/XDP) alike: those inside these CIDRs (a family
        /// with no CIDR listed keeps all of its addresses), or, with the keyword
        /// `primary`, the node's primary address of each family (see --node-ip). The node's
        /// addresses: the Node's InternalIP and ExternalIP, --node-ip and the devices'
        /// addresses [default: all of them]
        #[arg(long, value_delimiter = ',', value_name = "CIDR[,CIDR...]|primary", value_parser = crate::datapath::devices::parse_nodeport_entry)]
        nodeport_addresses: Vec<crate::datapath::devices::NodePortEntry>,
        /// Also serve node ports on 127.0.0.1 and ::1 to clients on the node (off by
        /// default, as in kube-proxy's nftables mode).
        #[arg(long)]
        nodeport_localhost: bool,
        /// This node's primary address of each family (at most one per family), for
        /// --nodeport-addresses primary [default: the Node's first InternalIP (else
        /// ExternalIP) per family; with --manifests the devices' first address per family]
        #[arg(long, value_delimiter = ',', value_name = "IP[,IP]")]
        node_ip: Vec<std::net::IpAddr>,
        /// Also attach the XDP program (native mode) to the devices; a driver that
        /// refuses it is logged once and the device runs tc only.
        #[arg(long)]
        xdp: bool,
        /// With --xdp, who answers a Service without endpoints: "auto" sends the ICMP
        /// error from XDP (XDP_TX) except on veth devices, whose peer drops XDP_TX
        /// frames unless it runs XDP itself, where tc answers; "tx" and "tc" force one.
        #[arg(long, value_enum, default_value_t = crate::datapath::xdpdev::XdpReject::Auto)]
        xdp_reject: crate::datapath::xdpdev::XdpReject,
        /// Seconds between two folds of the external path's conntrack counts into the
        /// lasting totals (LB_EXTTOTAL_V1) that `list --stats` and the metrics show
        /// (0.1 to 3600; 0: off, `list --stats` then sums the live entries, which go
        /// down when entries are evicted)
        #[arg(long, default_value_t = 2.0, value_parser = parse_ext_stats_interval, value_name = "SECONDS")]
        ext_stats_interval: f64,
        /// Which sockets the socket programs translate: "all" (every socket in the
        /// cgroup) or "host" (only sockets in the agent's network namespace, Linux
        /// 5.14+). With "host", pods' packets to Services are translated per packet on
        /// --pod-devices instead, so a service mesh proxy in a pod sees the Service
        /// address.
        #[arg(long, value_enum, default_value_t = crate::datapath::poddev::SocketLbScope::All)]
        socket_lb_scope: crate::datapath::poddev::SocketLbScope,
        /// Pod-facing devices (the node's ends of the pods' veths) that get the
        /// per-packet path: Service addresses in packets from pods are translated there,
        /// with conntrack and reverse NAT. `auto`: the node's veth devices whose peers
        /// are in other network namespaces (except --devices), followed as pods come
        /// and go; `none`: no per-packet path [default: auto with --socket-lb-scope
        /// host, none with all]
        #[arg(long, value_delimiter = ',', value_name = "IF[,IF...]")]
        pod_devices: Vec<String>,
        /// Also translate cluster IPs in packets arriving on the external devices
        /// (--devices), for routers that send the Service range to the node. Off by
        /// default: exposing cluster IPs outside the cluster is a decision.
        #[arg(long)]
        route_cluster_ips: bool,
        /// Entries per Maglev table of an external frontend: a prime in 251-16381.
        #[arg(long, default_value_t = svc_lb_common::MAGLEV_DEFAULT_SIZE, value_parser = parse_maglev_size)]
        maglev_table_size: u32,
        /// Entries of the external path's conntrack map (two per flow, preallocated,
        /// about 160 bytes each), 1024-16777216. With the external path off (manifest
        /// mode without --devices) the map gets one entry instead. A pinned map of
        /// another size that holds flows is kept until `svc-lb cleanup`.
        #[arg(long, default_value_t = svc_lb_common::CT_MAP_MAX, value_parser = parse_conntrack_max, value_name = "N")]
        conntrack_max: u32,
        /// Also destroy TCP sockets connected through a Service to a backend that
        /// stopped being usable for it (connected UDP sockets always are). Off by
        /// default: TCP has its own end-to-end signalling.
        #[arg(long)]
        destroy_tcp: bool,
        /// Testing only: treat these kernel features as missing so that their fallbacks
        /// run (`all`, or names from `svc-lb status`'s kernel features: tcx,
        /// fib_redirect, csum_ipv6_flag, set_retval, xdp_link, sk_storage_rnat, map_batch, atomic_fetch,
        /// sock_ops_conn, coarse_clock, bpf_loop).
        #[arg(long, hide = true, value_name = "FEATURE[,FEATURE...]")]
        force_feature_off: Option<String>,
        /// Answer ARP and NDP for load-balancer ingress IPs on the external path's
        /// devices: one live node per address, chosen by rendezvous hashing over the
        /// Node objects, with a UDP heartbeat between agents for liveness (see the
        /// README's "L2 announcement"). Needs --node-name to match a Node.
        #[arg(long)]
        l2_announce: bool,
        /// With --l2-announce: the heartbeat's UDP port, the same on every node.
        #[arg(long, default_value_t = 7947, value_name = "PORT")]
        l2_heartbeat_port: u16,
        /// With --l2-announce: milliseconds between heartbeats (50-5000); a node is dead
        /// after 3.5 intervals of silence and live again after 5 intervals of heartbeats.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(50..=5000), value_name = "MS")]
        l2_heartbeat_interval: u64,
        /// With --l2-announce: authenticate heartbeats with the key in this file (a mounted
        /// Secret, the same on every node, at least 16 bytes; surrounding whitespace is
        /// ignored). One key per line: the first signs, all verify, so that a key can be
        /// rotated; the file is read again at every heartbeat. Without it anyone who can
        /// send to the port can keep a dead node alive.
        #[arg(long, value_name = "PATH")]
        l2_heartbeat_key_file: Option<PathBuf>,
        /// Manifest files larger than this many bytes are reported and not read.
        #[arg(long, default_value_t = crate::source::manifests::DEFAULT_MAX_FILE_BYTES, value_name = "BYTES")]
        max_manifest_bytes: u64,
        /// Refuse external IPs (spec.externalIPs) outside these CIDRs: the CVE-2020-8554
        /// mitigation [default: any unicast address]
        #[arg(long, value_delimiter = ',', value_name = "CIDR[,CIDR...]")]
        external_ip_cidrs: Vec<ipnet::IpNet>,
        /// Scheduler of socket traffic for Services without a `svc-lb.io/scheduler`
        /// annotation: random, rr, wrr, lc or wlc (the external path always uses Maglev; lc
        /// and wlc need the connection counts, else random).
        #[arg(long, default_value = "random", value_parser = crate::model::sched::parse_socket_default, value_name = "NAME")]
        scheduler: crate::model::sched::Scheduler,
        /// A Service with more frontends (addresses × ports) than this is refused whole.
        #[arg(long, default_value_t = crate::model::DEFAULT_MAX_FRONTENDS_PER_SERVICE, value_name = "N")]
        max_frontends_per_service: usize,
        /// A Service whose EndpointSlices list more endpoints than this is refused whole.
        #[arg(long, default_value_t = crate::model::DEFAULT_MAX_BACKENDS_PER_SERVICE, value_name = "N")]
        max_backends_per_service: usize,
        /// Source ports of SNAT flows (external clients to backends on other nodes), per
        /// backend [default: the largest block of >= 1024 ports outside the node's
        /// net.ipv4.ip_local_port_range and --service-node-port-range; 1024-29999 with
        /// the kernel's defaults]
        #[arg(long, value_name = "MIN-MAX")]
        snat_port_range: Option<crate::portrange::PortRange>,
        /// The cluster's node port range (kube-apiserver's --service-node-port-range):
        /// SNAT never uses these ports.
        #[arg(long, default_value = crate::portrange::DEFAULT_NODE_PORTS, value_name = "MIN-MAX")]
        service_node_port_range: crate::portrange::PortRange,
        /// ICMP rejects (a Service without endpoints, from outside the node) sent per
        /// second, node-wide (0-1000000); beyond it they are dropped and counted (0: no
        /// limit).
        /// The default is the kernel's net.ipv4.icmp_msgs_per_sec.
        #[arg(long, default_value_t = svc_lb_common::REJECT_RATE_DEFAULT, value_parser = clap::value_parser!(u32).range(0..=i64::from(svc_lb_common::REJECT_LIMIT_MAX)), value_name = "N")]
        reject_rate: u32,
        /// Rejects sent back to back before --reject-rate applies (1-1000000); the default
        /// is the kernel's net.ipv4.icmp_msgs_burst.
        #[arg(long, default_value_t = svc_lb_common::REJECT_BURST_DEFAULT, value_parser = clap::value_parser!(u32).range(1..=i64::from(svc_lb_common::REJECT_LIMIT_MAX)), value_name = "N")]
        reject_burst: u32,
        /// Entries of the Service maps (one per frontend plus one per backend slot, per
        /// family) and of the affinity match map [default: 1048576]. 100 000 Services ×
        /// 10 endpoints × 1 port need 1 100 000. See the README's "Map sizes".
        #[arg(long, value_parser = parse_map_max, value_name = "N")]
        service_map_max: Option<u32>,
        /// Entries of the backend map and its counters [default: 1048576].
        #[arg(long, value_parser = parse_map_max, value_name = "N")]
        backend_map_max: Option<u32>,
        /// Entries of the reverse-NAT map (one per frontend), the Service metadata and
        /// the per-frontend counters [default: 524288; counters 1048576].
        #[arg(long, value_parser = parse_map_max, value_name = "N")]
        revnat_map_max: Option<u32>,
    },
    /// Show every programmed frontend with its Service, flags and backends, from the
    /// pinned maps (works whether or not the agent runs).
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Only the frontends of this Service (NAMESPACE/NAME).
        #[arg(long, value_name = "NAMESPACE/NAME")]
        service: Option<String>,
        /// With --service and nothing programmed for it: ask the agent's /status here
        /// why it was left out ("off" does not ask).
        #[arg(long, default_value = DEFAULT_METRICS_ADDR, value_parser = metrics::parse_addr)]
        metrics_addr: metrics::MetricsAddr,
        /// Counters per frontend and backend, as `ipvsadm -Ln --stats`: connections,
        /// packets and bytes in and out.
        #[arg(long, conflicts_with = "rate")]
        stats: bool,
        /// Counters per second, as `ipvsadm -Ln --rate`: the maps are read twice,
        /// --interval apart.
        #[arg(long)]
        rate: bool,
        /// Seconds between the two readings of --rate (0.1 to 60).
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval, value_name = "SECONDS", requires = "rate")]
        interval: f64,
    },
    /// Show the flows of the external path (NodePort, LoadBalancer and external IPs)
    /// from the pinned conntrack map: client, frontend, backend, SNAT, flags, lifetime.
    Conntrack {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Only the flows of this Service (NAMESPACE/NAME).
        #[arg(long, value_name = "NAMESPACE/NAME")]
        service: Option<String>,
    },
    /// Explain, step by step, what the datapath does with a new connection to ADDR:PORT
    /// (from a client on this node), or with --external with a packet from outside the
    /// node (NodePort, LoadBalancer IP, external IP).
    Trace {
        /// The destination the client dials, e.g. 10.96.0.10:80 or [fd00::10]:80; with
        /// --external a node address and NodePort, a LoadBalancer IP or an external IP.
        #[arg(long, value_name = "ADDR:PORT")]
        to: std::net::SocketAddr,
        #[arg(long, value_enum, default_value_t = TraceProto::Tcp)]
        proto: TraceProto,
        /// The client: ADDR (shown in the trace) or ADDR:PORT. With --external it is
        /// required with its source port, which the Maglev hash covers.
        #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_from)]
        from: Option<TraceFrom>,
        /// Trace the external path (tc/XDP on the node's devices) instead of the
        /// socket hooks: conntrack, frontend (NodePorts match the node addresses),
        /// source ranges, affinity, Maglev, SNAT.
        #[arg(long, requires = "from", conflicts_with_all = ["netns", "pid"])]
        external: bool,
        /// Trace the per-packet path for pods (tc on --pod-devices, svc-lb-ebpf
        /// pod.rs): a packet a pod at --from ADDR:PORT sends to a Service address
        /// (conntrack, frontend, affinity, choice, DNAT or hairpin, reject).
        #[arg(long, requires = "from", conflicts_with_all = ["external", "netns", "pid"])]
        pod: bool,
        /// The client's network namespace file (e.g. /run/netns/NAME), for session
        /// affinity, which the socket programs key by network namespace (one per pod)
        /// [default: this process's namespace]
        #[arg(long, value_name = "PATH", conflicts_with = "pid")]
        netns: Option<PathBuf>,
        /// The client's process: its network namespace, as with --netns.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Show the attached programs, the maps' fill levels and the agent's last sync.
    Status {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Where the agent serves /status ("off": do not ask the agent).
        #[arg(long, default_value = DEFAULT_METRICS_ADDR, value_parser = metrics::parse_addr)]
        metrics_addr: metrics::MetricsAddr,
    },
    /// Prepare the node for an unprivileged agent: mount bpffs on /sys/fs/bpf when the
    /// host has none (mode 0700), create the pin directory (mode 0700; one owned by
    /// another user is refused) and remove links a killed agent left half pinned. The
    /// DaemonSet's privileged init container runs this; the agent does it too at start.
    Prepare {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Detach every program and remove every pin.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Also detach svc-lb programs on this cgroup whose pins were lost.
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
    Yaml,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TraceProto {
    Tcp,
    Udp,
}

/// `trace --from`: an address, optionally with the client's source port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceFrom {
    pub addr: std::net::IpAddr,
    pub port: Option<u16>,
}

fn parse_from(s: &str) -> Result<TraceFrom, String> {
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Ok(TraceFrom {
            addr: sa.ip(),
            port: Some(sa.port()),
        });
    }
    s.parse::<std::net::IpAddr>()
        .map(|addr| TraceFrom { addr, port: None })
        .map_err(|_| format!("'{s}' is neither ADDR nor ADDR:PORT (IPv6 with a port: [ADDR]:PORT)"))
}

/// `--service NAMESPACE/NAME` of `list` and `conntrack`: parsed once, before any map is
/// read, and applied to the rows of either command.
struct ServiceFilter(Option<crate::model::ServiceRef>);

impl ServiceFilter {
    fn parse(arg: Option<&str>) -> Result<Self> {
        Ok(Self(arg.map(inspect::list::parse_service).transpose()?))
    }

    /// Keeps the rows of the Service; `of` gives a row's namespace and name (`None`
    /// when the row's Service is unknown, which never matches). Says so on stderr
    /// when nothing is left.
    fn retain<T>(
        &self,
        rows: &mut Vec<T>,
        what: &str,
        of: impl Fn(&T) -> (Option<&str>, Option<&str>),
    ) {
        let Some(want) = &self.0 else {
            return;
        };
        rows.retain(|r| of(r) == (Some(&*want.namespace), Some(&*want.name)));
        if rows.is_empty() {
            eprintln!("no {what} of Service {want} is programmed");
        }
    }
}

/// Says on stderr why the agent left Service `want` out, from its `/status` problems
/// (for example the `service.kubernetes.io/headless` label, a limit, a full map).
fn explain_left_out(want: &crate::model::ServiceRef, addr: std::net::SocketAddr) {
    let report = inspect::status::fetch_agent(addr);
    let Some(st) = report.status else {
        return;
    };
    let prefix = format!("Service {want}: ");
    let other = format!("{want}: ");
    for p in st
        .problems
        .iter()
        .filter(|p| p.starts_with(&prefix) || p.starts_with(&other))
    {
        eprintln!("left out by the agent: {p}");
    }
    for p in st.lb.iter().flat_map(|lb| &lb.pending) {
        if p.service == want.to_string() {
            eprintln!("no load-balancer address yet: {}", p.reason);
        }
    }
}

/// `--maglev-table-size`: a prime, so every backend's permutation covers the table.
fn parse_maglev_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    let max = svc_lb_common::MAGLEV_TABLE_MAX as u32;
    if !(251..=max).contains(&n) || !svc_lb_common::maglev::is_prime(n) {
        return Err(format!(
            "{n} is not a prime in 251-{max} (for example 251, 1021, 4093, 16381)"
        ));
    }
    Ok(n)
}

/// Bounds of `--conntrack-max`: below the lower one the LRU evicts live flows under
/// any real load; the upper one (about 2.5 GiB of kernel memory) catches typos.
const CONNTRACK_MAX_RANGE: std::ops::RangeInclusive<u32> = 1024..=(1 << 24);

fn parse_conntrack_max(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of entries"))?;
    if !CONNTRACK_MAX_RANGE.contains(&n) {
        return Err(format!(
            "{n} entries is outside {}-{} (each flow takes two entries of about 160 bytes)",
            CONNTRACK_MAX_RANGE.start(),
            CONNTRACK_MAX_RANGE.end()
        ));
    }
    Ok(n)
}

/// Bounds of `--service-map-max`, `--backend-map-max` and `--revnat-map-max`: the upper
/// one (a 512 MiB bucket array per map before any entry) catches typos.
const MAP_MAX_RANGE: std::ops::RangeInclusive<u32> = 1024..=(1 << 25);

fn parse_map_max(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of entries"))?;
    if !MAP_MAX_RANGE.contains(&n) {
        return Err(format!(
            "{n} entries is outside {}-{}",
            MAP_MAX_RANGE.start(),
            MAP_MAX_RANGE.end()
        ));
    }
    Ok(n)
}

/// `--node-ip`: at most one unicast, non-loopback address per family.
fn check_node_ips(ips: &[std::net::IpAddr]) -> Result<()> {
    for (i, ip) in ips.iter().enumerate() {
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            anyhow::bail!("--node-ip {ip}: a node address is unicast and not loopback");
        }
        if ips[..i].iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            anyhow::bail!("--node-ip {ip}: at most one address per family");
        }
    }
    Ok(())
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Agent {
            manifests,
            kubeconfig,
            health_addr,
            service_proxy_name,
            bpffs,
            cgroup,
            node_name,
            metrics_addr,
            bpf_log,
            devices,
            nodeport_addresses,
            nodeport_localhost,
            node_ip,
            xdp,
            xdp_reject,
            ext_stats_interval,
            socket_lb_scope,
            pod_devices,
            route_cluster_ips,
            maglev_table_size,
            conntrack_max,
            destroy_tcp,
            force_feature_off,
            l2_announce,
            l2_heartbeat_port,
            l2_heartbeat_interval,
            l2_heartbeat_key_file,
            max_manifest_bytes,
            external_ip_cidrs,
            scheduler,
            max_frontends_per_service,
            max_backends_per_service,
            snat_port_range,
            service_node_port_range,
            reject_rate,
            reject_burst,
            service_map_max,
            backend_map_max,
            revnat_map_max,
        } => {
            let nodeport_addresses =
                crate::datapath::devices::NodePortAddresses::from_entries(&nodeport_addresses)
                    .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?;
            check_node_ips(&node_ip)?;
            let force_feature_off =
                crate::datapath::probe::parse_forced(force_feature_off.as_deref().unwrap_or(""))
                    .map_err(|e| anyhow::anyhow!("--force-feature-off: {e}"))?;
            let cgroup = match cgroup {
                Some(c) => c,
                None => crate::datapath::sys::cgroup2_root()?,
            };
            let node_name = node_name.or_else(hostname);
            let l2 = match (l2_announce, &node_name) {
                (false, _) => None,
                (true, Some(me)) => Some(crate::announce::run::Config {
                    me: me.clone(),
                    port: l2_heartbeat_port,
                    interval: std::time::Duration::from_millis(l2_heartbeat_interval),
                    key: l2_heartbeat_key_file
                        .as_deref()
                        .map(crate::announce::heartbeat::Key::from_file)
                        .transpose()?,
                    key_file: l2_heartbeat_key_file,
                }),
                (true, None) => {
                    anyhow::bail!("--l2-announce needs --node-name (no hostname either)")
                }
            };
            let node = NodeInfo {
                name: node_name,
                service_proxy_name,
                external_ip_cidrs,
                scheduler,
                limits: crate::model::ServiceLimits {
                    max_frontends: max_frontends_per_service,
                    max_backends: max_backends_per_service,
                },
                ..NodeInfo::default()
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start the async runtime")?;
            let default_health = if manifests.is_some() {
                crate::health::DEFAULT_HEALTH_ADDR
            } else {
                crate::health::DEFAULT_HEALTH_ADDR_KUBE
            };
            let health_addr_explicit = health_addr.is_some();
            let health_addr = match health_addr {
                Some(a) => a,
                None => crate::health::parse_addr(default_health).map_err(anyhow::Error::msg)?,
            };
            let metrics_addr_explicit = metrics_addr.is_some();
            let metrics_addr = match metrics_addr {
                Some(a) => a,
                None => metrics::parse_addr(DEFAULT_METRICS_ADDR).map_err(anyhow::Error::msg)?,
            };
            rt.block_on(agent::run(AgentConfig {
                manifests,
                kubeconfig,
                health_addr: health_addr.0,
                health_addr_explicit,
                metrics_addr_explicit,
                bpffs,
                cgroup,
                node,
                metrics_addr: metrics_addr.0,
                bpf_log,
                devices,
                nodeport_addresses,
                nodeport_localhost,
                node_ips: node_ip,
                xdp,
                xdp_reject,
                ext_stats_interval: std::time::Duration::from_secs_f64(ext_stats_interval),
                socket_lb_scope,
                pod_devices,
                route_cluster_ips,
                maglev_size: maglev_table_size,
                conntrack_max,
                destroy_tcp,
                force_feature_off,
                l2,
                max_manifest_bytes,
                snat_port_range,
                node_port_range: service_node_port_range,
                reject_rate,
                reject_burst,
                map_sizes: crate::datapath::load::MapSizes {
                    services: service_map_max,
                    backends: backend_map_max,
                    rev_nats: revnat_map_max,
                },
            }))
        }
        Command::List {
            output,
            bpffs,
            service,
            metrics_addr,
            stats,
            rate,
            interval,
        } => {
            let filter = ServiceFilter::parse(service.as_deref())?;
            let maps = PinnedMaps::open(&bpffs)?;
            // --rate: a first reading, then the listing proper `interval` later
            // (decision: two samples, no estimator kept in the kernel or the agent).
            let before = if rate {
                let v = inspect::view::DatapathView::read(&maps)?;
                let mut e = inspect::list::entries(&v, None);
                inspect::list::set_stats(&mut e, &v);
                std::thread::sleep(std::time::Duration::from_secs_f64(interval));
                Some(e)
            } else {
                None
            };
            let view = inspect::view::DatapathView::read(&maps)?;
            let mut entries = inspect::list::entries(&view, None);
            if stats || rate {
                inspect::list::set_stats(&mut entries, &view);
            }
            if let Some(before) = &before {
                inspect::list::set_rate(&mut entries, before, interval);
                // The rates are what --rate asked for; the totals stay with --stats.
                for e in entries.iter_mut() {
                    e.stats = None;
                    for b in e.backends.iter_mut() {
                        b.stats = None;
                    }
                }
            }
            // Before the filter: a backend another Service lists is not unlisted.
            let unlisted = inspect::list::unlisted_draining(&view, &entries);
            filter.retain(&mut entries, "frontend", |e| {
                (e.namespace.as_deref(), e.service.as_deref())
            });
            if let (Some(want), true, Some(addr)) = (&filter.0, entries.is_empty(), metrics_addr.0)
            {
                explain_left_out(want, addr);
            }
            // The pools of allocated LoadBalancer addresses live in the agent, not in
            // the maps: ask it when there is any LoadBalancer entry.
            let any_lb = entries.iter().any(|e| e.kind == "LoadBalancer");
            if let (true, Some(addr)) = (any_lb, metrics_addr.0)
                && let Some(st) = inspect::status::fetch_agent(addr).status
            {
                if let Some(lb) = &st.lb {
                    inspect::list::set_pools(&mut entries, lb);
                }
                inspect::list::set_announcers(&mut entries, &st.l2_announcers);
            }
            print!(
                "{}",
                match output {
                    Output::Text if stats =>
                        inspect::list::render_counters(&entries, inspect::list::Counters::Stats)
                            + &unlisted,
                    Output::Text if rate =>
                        inspect::list::render_counters(&entries, inspect::list::Counters::Rate)
                            + &unlisted,
                    Output::Text =>
                        inspect::list::render_text(&entries)
                            + &unlisted
                            + &inspect::list::paths_footer(&bpffs),
                    Output::Json => inspect::list::render_json(&entries)?,
                    Output::Yaml => inspect::list::render_yaml(&entries)?,
                }
            );
            Ok(())
        }
        Command::Conntrack {
            output,
            bpffs,
            service,
        } => {
            let filter = ServiceFilter::parse(service.as_deref())?;
            let entries = inspect::conntrack::read_entries(&bpffs)?;
            let meta = PinnedMaps::open(&bpffs)?.meta()?;
            let mut table =
                inspect::conntrack::flows(&entries, &meta, inspect::trace::monotonic_ns());
            filter.retain(&mut table.flows, "flow", |f| {
                (f.namespace.as_deref(), f.service.as_deref())
            });
            print!(
                "{}",
                match output {
                    Output::Text => inspect::conntrack::render_text(&table),
                    Output::Json => inspect::conntrack::render_json(&table)?,
                    Output::Yaml => inspect::conntrack::render_yaml(&table)?,
                }
            );
            Ok(())
        }
        Command::Trace {
            to,
            proto,
            from,
            external,
            pod,
            netns,
            pid,
            output,
            bpffs,
        } => {
            let proto = match proto {
                TraceProto::Tcp => svc_lb_common::PROTO_TCP,
                TraceProto::Udp => svc_lb_common::PROTO_UDP,
            };
            if external || pod {
                let from = match from {
                    Some(TraceFrom {
                        addr,
                        port: Some(port),
                    }) => std::net::SocketAddr::new(addr, port),
                    _ => anyhow::bail!(
                        "--external and --pod need the client's source port: --from ADDR:PORT (the flow hash covers it)"
                    ),
                };
                let req = inspect::exttrace::ExtTraceRequest {
                    from,
                    to,
                    proto,
                    now_ns: inspect::trace::monotonic_ns(),
                    pod,
                };
                let maps = inspect::exttrace::PinnedExtMaps::open(&bpffs)?;
                let t = inspect::exttrace::trace(&maps, &req)?;
                print!(
                    "{}",
                    match output {
                        Output::Text => inspect::exttrace::render_text(&t),
                        Output::Json => serde_json::to_string_pretty(&t)? + "\n",
                        Output::Yaml => serde_yaml::to_string(&t)?,
                    }
                );
                return Ok(());
            }
            let netns = netns.or_else(|| pid.map(|p| PathBuf::from(format!("/proc/{p}/ns/net"))));
            let label = netns.as_ref().map_or_else(
                || "the network namespace of this command".to_owned(),
                |p| p.display().to_string(),
            );
            // Without the cookie the trace still explains everything but the client's
            // affinity entry: a warning, unless the user named the client explicitly.
            let client = match inspect::trace::netns_cookie(netns.as_deref()) {
                Ok(cookie) => Some(inspect::trace::ClientNetns { cookie, label }),
                Err(e) if netns.is_some() => return Err(e),
                Err(e) => {
                    eprintln!("svc-lb: warning: client network namespace unknown: {e:#}");
                    None
                }
            };
            let req = inspect::trace::TraceRequest {
                to,
                proto,
                from: from.map(|f| f.addr),
                client,
                now_ns: inspect::trace::monotonic_ns(),
            };
            // The external path's pins add the source-range maps (load-balancer IPs).
            let t = match inspect::exttrace::PinnedExtMaps::open(&bpffs) {
                Ok(maps) => inspect::trace::trace(&maps, &req, inspect::trace::random_u32())?,
                Err(_) => {
                    let maps = PinnedMaps::open(&bpffs)?;
                    inspect::trace::trace(&maps, &req, inspect::trace::random_u32())?
                }
            };
            print!(
                "{}",
                match output {
                    Output::Text => inspect::trace::render_text(&t),
                    Output::Json => serde_json::to_string_pretty(&t)? + "\n",
                    Output::Yaml => serde_yaml::to_string(&t)?,
                }
            );
            Ok(())
        }
        Command::Status {
            output,
            bpffs,
            metrics_addr,
        } => {
            let st = inspect::status::collect(&bpffs, metrics_addr.0)?;
            print!(
                "{}",
                match output {
                    Output::Text => inspect::status::render_text(&st, crate::status::now_ms()),
                    Output::Json => serde_json::to_string_pretty(&st)? + "\n",
                    Output::Yaml => serde_yaml::to_string(&st)?,
                }
            );
            Ok(())
        }
        Command::Prepare { bpffs } => {
            pins::ensure_bpffs(&bpffs)?;
            println!(
                "{} is ready (bpffs, pin directory mode 0700)",
                bpffs.display()
            );
            Ok(())
        }
        Command::Cleanup { bpffs, cgroup } => {
            let n = links::cleanup(&bpffs, cgroup.as_deref())?;
            println!(
                "detached {n} links and removed pins under {}",
                bpffs.display()
            );
            Ok(())
        }
    }
}

/// `list --interval`: seconds, 0.1 to 60.
fn parse_ext_stats_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| {
        format!("--ext-stats-interval takes seconds (e.g. 2, or 0 for off), got {s:?}: {e}")
    })?;
    if v != 0.0 && !(0.1..=3600.0).contains(&v) {
        return Err(format!(
            "--ext-stats-interval must be 0 (off) or between 0.1 and 3600 seconds, got {s}"
        ));
    }
    Ok(v)
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("--interval takes seconds (e.g. 1 or 0.5), got {s:?}: {e}"))?;
    if !(0.1..=60.0).contains(&v) {
        return Err(format!(
            "--interval must be between 0.1 and 60 seconds, got {s}"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod agent_flag_tests {
    use super::*;

    #[test]
    fn maglev_size_must_be_a_prime_in_range() {
        assert_eq!(parse_maglev_size("16381"), Ok(16381));
        assert_eq!(parse_maglev_size("251"), Ok(251));
        for bad in ["250", "16383", "241", "65537", "1000", "x"] {
            assert!(parse_maglev_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn conntrack_max_defaults_to_the_map_size_and_is_bounded() {
        let size = |args: &[&str]| {
            let cli = Cli::try_parse_from(["svc-lb", "agent"].iter().chain(args))?;
            let Command::Agent { conntrack_max, .. } = cli.command else {
                panic!("agent subcommand")
            };
            Ok::<u32, clap::Error>(conntrack_max)
        };
        assert_eq!(size(&[]).unwrap(), svc_lb_common::CT_MAP_MAX);
        assert_eq!(size(&["--conntrack-max", "1024"]).unwrap(), 1024);
        assert_eq!(size(&["--conntrack-max", "16777216"]).unwrap(), 1 << 24);
        for bad in ["1023", "16777217", "0", "-1", "lots"] {
            let err = size(&[&format!("--conntrack-max={bad}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--conntrack-max"), "{bad}: {err}");
        }
        assert_eq!(
            parse_conntrack_max("100"),
            Err("100 entries is outside 1024-16777216 (each flow takes two entries of about 160 bytes)".to_owned())
        );
    }

    #[test]
    fn map_size_flags_default_to_the_object_and_are_bounded() {
        let sizes = |args: &[&str]| {
            let cli = Cli::try_parse_from(["svc-lb", "agent"].iter().chain(args))?;
            let Command::Agent {
                service_map_max,
                backend_map_max,
                revnat_map_max,
                ..
            } = cli.command
            else {
                panic!("agent subcommand")
            };
            Ok::<_, clap::Error>((service_map_max, backend_map_max, revnat_map_max))
        };
        assert_eq!(sizes(&[]).unwrap(), (None, None, None));
        assert_eq!(
            sizes(&[
                "--service-map-max",
                "2097152",
                "--backend-map-max",
                "1024",
                "--revnat-map-max",
                "33554432"
            ])
            .unwrap(),
            (Some(1 << 21), Some(1024), Some(1 << 25))
        );
        for bad in ["1023", "33554433", "0", "lots"] {
            let err = sizes(&[&format!("--service-map-max={bad}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--service-map-max"), "{bad}: {err}");
        }
    }

    #[test]
    fn snat_port_and_reject_limit_flags_parse_with_bounds() {
        let parse = |args: &[&str]| Cli::try_parse_from(["svc-lb", "agent"].iter().chain(args));
        let Command::Agent {
            snat_port_range,
            service_node_port_range,
            reject_rate,
            reject_burst,
            ..
        } = parse(&[]).unwrap().command
        else {
            panic!("agent subcommand")
        };
        assert_eq!(snat_port_range, None);
        assert_eq!(service_node_port_range.to_string(), "30000-32767");
        assert_eq!(
            (reject_rate, reject_burst),
            (
                svc_lb_common::REJECT_RATE_DEFAULT,
                svc_lb_common::REJECT_BURST_DEFAULT
            )
        );
        let Command::Agent {
            snat_port_range,
            service_node_port_range,
            reject_rate,
            reject_burst,
            ..
        } = parse(&[
            "--snat-port-range",
            "20000-24999",
            "--service-node-port-range",
            "40000-41000",
            "--reject-rate",
            "0",
            "--reject-burst",
            "1",
        ])
        .unwrap()
        .command
        else {
            panic!("agent subcommand")
        };
        assert_eq!(
            snat_port_range.map(|r| r.to_string()).as_deref(),
            Some("20000-24999")
        );
        assert_eq!(service_node_port_range.to_string(), "40000-41000");
        assert_eq!((reject_rate, reject_burst), (0, 1));
        for (flag, bad) in [
            ("--snat-port-range", "25000-20000"),
            ("--snat-port-range", "0-100"),
            ("--snat-port-range", "70000"),
            ("--service-node-port-range", "x-y"),
            ("--reject-rate", "1000001"),
            ("--reject-burst", "0"),
            ("--reject-burst", "-1"),
        ] {
            let err = parse(&[&format!("{flag}={bad}")]).unwrap_err().to_string();
            assert!(err.contains(flag), "{flag} {bad}: {err}");
        }
    }

    #[test]
    fn external_path_flags_parse() {
        let cli = Cli::try_parse_from([
            "svc-lb",
            "agent",
            "--manifests",
            "/tmp",
            "--devices",
            "eth0,eth1",
            "--nodeport-addresses",
            "192.168.0.0/16,fd00::/8",
            "--xdp",
            "--maglev-table-size",
            "1021",
        ])
        .unwrap();
        let Command::Agent {
            devices,
            nodeport_addresses,
            xdp,
            maglev_table_size,
            ..
        } = cli.command
        else {
            panic!("agent subcommand")
        };
        assert_eq!(devices, Some(vec!["eth0".to_owned(), "eth1".to_owned()]));
        assert_eq!(nodeport_addresses.len(), 2);
        assert!(xdp);
        assert_eq!(maglev_table_size, 1021);
        assert!(Cli::try_parse_from(["svc-lb", "agent", "--maglev-table-size", "1000"]).is_err());
        assert!(Cli::try_parse_from(["svc-lb", "agent", "--nodeport-addresses", "nope"]).is_err());
    }

    #[test]
    fn nodeport_flags_parse() {
        use crate::datapath::devices::{NodePortAddresses, NodePortEntry};
        let parse = |args: &[&str]| {
            let mut all = vec!["svc-lb", "agent"];
            all.extend(args);
            let Command::Agent {
                nodeport_addresses,
                nodeport_localhost,
                node_ip,
                ..
            } = Cli::try_parse_from(all)?.command
            else {
                panic!("agent subcommand")
            };
            Ok::<_, clap::Error>((nodeport_addresses, nodeport_localhost, node_ip))
        };
        let (entries, localhost, ips) = parse(&[]).unwrap();
        assert_eq!(
            NodePortAddresses::from_entries(&entries),
            Ok(NodePortAddresses::All)
        );
        assert!(!localhost && ips.is_empty());
        let (entries, localhost, _) =
            parse(&["--nodeport-addresses", "primary", "--nodeport-localhost"]).unwrap();
        assert_eq!(entries, vec![NodePortEntry::Primary]);
        assert!(localhost);
        // Host bits are dropped, as the apiserver's CIDR parsing would.
        let (entries, _, _) = parse(&["--nodeport-addresses", "10.1.2.3/16"]).unwrap();
        assert_eq!(
            NodePortAddresses::from_entries(&entries),
            Ok(NodePortAddresses::Cidrs(vec![
                "10.1.0.0/16".parse().unwrap()
            ]))
        );
        let (entries, _, _) = parse(&["--nodeport-addresses", "primary,10.0.0.0/8"]).unwrap();
        assert_eq!(
            NodePortAddresses::from_entries(&entries),
            Err("'primary' cannot be combined with other entries".to_owned())
        );
        for loopback in ["127.0.0.0/8", "127.0.0.1/32", "::1/128"] {
            let err = parse(&["--nodeport-addresses", loopback])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--nodeport-localhost"), "{loopback}: {err}");
        }
        // 0.0.0.0/0 contains loopback but is not only loopback: it is "every address".
        assert!(parse(&["--nodeport-addresses", "0.0.0.0/0"]).is_ok());
        let (_, _, ips) = parse(&["--node-ip", "10.0.0.1,fd00::1"]).unwrap();
        assert!(check_node_ips(&ips).is_ok());
        for bad in [&["10.0.0.1", "10.0.0.2"][..], &["127.0.0.1"], &["::"]] {
            let ips: Vec<std::net::IpAddr> = bad.iter().map(|a| a.parse().unwrap()).collect();
            assert!(check_node_ips(&ips).is_err(), "{bad:?}");
        }
    }
}
