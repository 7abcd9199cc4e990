//! The agent: source → model → plan → datapath. Each snapshot re-models the Services
//! it changed; a periodic full sync re-checks everything.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    datapath::{MapStore, apply::apply_plan, bpf::BpfDatapath, devices, sockterm},
    model::{self, NodeInfo},
    plan::{self, CurrentState},
    source::{self, Snapshot, manifests},
};

pub struct AgentConfig {
    /// Manifest-directory mode; `None` watches the Kubernetes API instead.
    pub manifests: Option<PathBuf>,
    /// Kubernetes mode: this kubeconfig, else `$KUBECONFIG`, else in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Where to serve /healthz, /livez and /readyz; `None` serves nothing.
    pub health_addr: Option<std::net::SocketAddr>,
    /// `--health-addr` was given: an address that cannot be bound stops the start.
    pub health_addr_explicit: bool,
    pub bpffs: PathBuf,
    pub cgroup: PathBuf,
    pub node: NodeInfo,
    /// Where to serve /metrics and /status; `None` serves nothing.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `--metrics-addr` was given: an address that cannot be bound stops the start.
    pub metrics_addr_explicit: bool,
    /// Load the programs with their debug log on (`--bpf-log`).
    pub bpf_log: bool,
    /// `--devices`: where the external path runs; `None` chooses (see [`External`]).
    pub devices: Option<Vec<String>>,
    /// `--nodeport-addresses`: which node addresses serve node ports, to clients on the
    /// node and from outside alike (see [`devices::node_port_addresses`]).
    pub nodeport_addresses: devices::NodePortAddresses,
    /// `--nodeport-localhost`: node ports on 127.0.0.1 and ::1 for clients on the node.
    pub nodeport_localhost: bool,
    /// `--node-ip`: this node's primary address of each family.
    pub node_ips: Vec<std::net::IpAddr>,
    /// `--xdp`: also attach the XDP program to the devices.
    pub xdp: bool,
    /// `--xdp-reject`: where XDP_TX answers a reject, where tc does.
    pub xdp_reject: crate::datapath::xdpdev::XdpReject,
    /// `--ext-stats-interval`: between two folds of the conntrack counts into the
    /// external traffic totals (zero: off).
    pub ext_stats_interval: std::time::Duration,
    /// `--maglev-table-size`.
    pub maglev_size: u32,
    /// `--conntrack-max`: entries of the external path's conntrack map.
    pub conntrack_max: u32,
    /// `--destroy-tcp`: also destroy TCP sockets connected to removed backends.
    pub destroy_tcp: bool,
    /// `--force-feature-off`: kernel features treated as missing, so that their
    /// fallbacks run (tests of older kernels on a new one).
    pub force_feature_off: Vec<crate::datapath::probe::Feature>,
    /// `--max-manifest-bytes`: larger manifest files are not read.
    pub max_manifest_bytes: u64,
    /// `--snat-port-range`; `None` derives it (see [`crate::portrange::choose`]).
    pub snat_port_range: Option<crate::portrange::PortRange>,
    /// `--service-node-port-range`: kept out of the SNAT ports.
    pub node_port_range: crate::portrange::PortRange,
    /// `--reject-rate` and `--reject-burst`: the node-wide ICMP reject limit.
    pub reject_rate: u32,
    pub reject_burst: u32,
    /// `--service-map-max`, `--backend-map-max`, `--revnat-map-max`.
    pub map_sizes: crate::datapath::load::MapSizes,
    /// `--l2-announce`: answer ARP/NDP for load-balancer IPs (see [`crate::announce`]).
    pub l2: Option<crate::announce::run::Config>,
    /// `--socket-lb-scope`: which sockets the socket programs translate.
    pub socket_lb_scope: crate::datapath::poddev::SocketLbScope,
    /// `--pod-devices`: where the per-packet path for pod traffic attaches.
    pub pod_devices: Vec<String>,
    /// `--route-cluster-ips`: the external path translates cluster IPs too.
    pub route_cluster_ips: bool,
}

impl AgentConfig {
    /// Whether the external path is known to be off before the first snapshot: manifest
    /// mode without `--devices`. Kubernetes mode picks its devices from the Node's
    /// addresses, which are not known yet when the maps are created, so it counts as on.
    fn external_off(&self) -> bool {
        // The per-packet path for pods uses the same conntrack.
        self.manifests.is_some()
            && self.devices.as_ref().is_none_or(Vec::is_empty)
            && crate::datapath::poddev::PodDevices::from_flag(
                &self.pod_devices,
                self.socket_lb_scope,
            )
            .is_off()
    }
}

/// The external path's run-time state: the devices (decided once, at the first
/// snapshot, since in Kubernetes mode they follow the Node's addresses), the node
/// addresses last written to the maps, and the healthCheckNodePort server.
struct External {
    devices: Option<Vec<String>>,
    /// The devices' addresses last read (kept when reading them fails).
    device_addrs: Vec<std::net::IpAddr>,
    node_addrs: Option<Vec<std::net::IpAddr>>,
    /// The SNAT addresses last written with them.
    snat: (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>),
    health: Option<crate::hcnp::HealthCheckServer>,
    /// SNAT ports and reject limit, chosen with the devices.
    limits: crate::datapath::bpf::ExtLimits,
}

impl External {
    fn on(&self) -> bool {
        self.devices.as_ref().is_some_and(|d| !d.is_empty())
    }

    /// Turns the external path off for this run after `e`: logged and shown in
    /// `status`, never fatal, since the socket path does not depend on it.
    fn fail(&mut self, e: anyhow::Error) {
        let why = format!("{e:#}");
        error!(error = %why, "external path OFF for this run (NodePort, LoadBalancer and external IPs from outside the node); the socket path keeps working");
        self.devices = Some(Vec::new());
        self.health = None;
        crate::status::update(|st| st.external_error = Some(why));
    }

    /// Decides the devices (once) from the flags, the mode and the Node's addresses.
    fn decide_devices(
        &mut self,
        cfg: &AgentConfig,
        node: &NodeInfo,
        dp: &BpfDatapath,
    ) -> Result<()> {
        if self.devices.is_some() {
            return Ok(());
        }
        let devices = match (&cfg.devices, &cfg.manifests) {
            (Some(d), _) => d.clone(),
            (None, Some(_)) => Vec::new(),
            (None, None) => {
                let ifaddrs = devices::interfaces()?;
                let d = devices::default_devices(&ifaddrs, &node.addresses);
                if d.is_empty() {
                    warn!(node_addresses = ?node.addresses, "no device carries the Node's addresses; the external path (NodePort, LoadBalancer and external IPs from outside the node) is off (see --devices)");
                }
                d
            }
        };
        if !devices.is_empty() {
            dp.ext_available()
                .context("the external path needs the tc/XDP programs and maps (--devices)")?;
            for dev in &devices {
                accept_local(dev)?;
            }
            self.limits = ext_limits(cfg)?;
            info!(devices = ?devices, xdp = cfg.xdp, "external path on");
        }
        self.devices = Some(devices);
        Ok(())
    }

    /// Reads the devices' addresses (addresses may come and go while the agent runs).
    fn read_device_addrs(&mut self) -> Result<()> {
        let Some(devs) = self.devices.as_ref().filter(|d| !d.is_empty()) else {
            self.device_addrs.clear();
            return Ok(());
        };
        self.device_addrs = devices::device_addresses(&devices::interfaces()?, devs);
        Ok(())
    }

    /// Writes the node addresses (`addrs`, the external share of
    /// [`devices::node_port_addresses`]) and the SNAT addresses (of the devices) when
    /// they changed.
    fn refresh_addresses(
        &mut self,
        dp: &mut BpfDatapath,
        health: &crate::health::Health,
        addrs: &[std::net::IpAddr],
    ) -> Result<()> {
        let Some(devs) = self.devices.as_ref().filter(|d| !d.is_empty()) else {
            return Ok(());
        };
        let (snat4, snat6) = devices::snat_addresses(&self.device_addrs);
        if self.node_addrs.as_deref() == Some(addrs) && self.snat == (snat4, snat6) {
            return Ok(());
        }
        dp.write_ext_config(snat4, snat6, &self.limits)?;
        dp.set_node_addrs(addrs)?;
        info!(node_addresses = ?addrs, snat4 = ?snat4, snat6 = ?snat6, "external path: node addresses written");
        if snat4.is_none() && snat6.is_none() {
            warn!(devices = ?devs, "the devices have no usable address: SNAT is impossible");
        }
        self.health = Some(
            crate::hcnp::HealthCheckServer::new(addrs.to_vec()).with_proxy_health(health.clone()),
        );
        self.node_addrs = Some(addrs.to_vec());
        self.snat = (snat4, snat6);
        Ok(())
    }
}

/// The SNAT port range (`--snat-port-range`, else derived from this node's
/// `ip_local_port_range` and `--service-node-port-range`) and the reject limit.
fn ext_limits(cfg: &AgentConfig) -> Result<crate::datapath::bpf::ExtLimits> {
    use crate::portrange;
    let ephemeral = portrange::read_local_port_range().unwrap_or_else(|e| {
        warn!(error = %format!("{e:#}"), assumed = %portrange::KERNEL_EPHEMERAL, "cannot read the node's ephemeral port range; assuming the kernel's default");
        portrange::KERNEL_EPHEMERAL
    });
    let chosen = portrange::choose(cfg.snat_port_range, ephemeral, cfg.node_port_range)
        .context("SNAT port range")?;
    if let Some(w) = &chosen.warning {
        warn!("{w}");
    }
    info!(
        snat_ports = %chosen.range,
        ip_local_port_range = %ephemeral,
        node_ports = %cfg.node_port_range,
        reject_rate = cfg.reject_rate,
        reject_burst = cfg.reject_burst,
        "external path: SNAT ports and reject limit"
    );
    Ok(crate::datapath::bpf::ExtLimits {
        snat_port_min: chosen.range.min,
        snat_port_max: chosen.range.max,
        reject_rate: cfg.reject_rate,
        reject_burst: cfg.reject_burst,
    })
}

/// Sets `net.ipv4.conf.<dev>.accept_local=1`. tc sends the packets of SNAT flows out
/// itself (bpf_fib_lookup + bpf_redirect_neigh), but what the lookup cannot send (MTU
/// exceeded, no neighbour path, TTL 1) and every packet XDP SNATs go through the
/// kernel's forwarding with this node's own address as source, which the kernel drops
/// as a martian without the setting. Kept on so that those packets get the stack's
/// answer (forwarding, fragmentation-needed, time-exceeded) instead of vanishing. IPv6
/// has no such check.
fn accept_local(dev: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{dev}/accept_local");
    let now = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    if now.trim() != "1" {
        std::fs::write(&path, "1").with_context(|| format!("write 1 to {path}"))?;
        info!(
            device = dev,
            "set accept_local=1 (SNATed external flows leave with the node's address)"
        );
    }
    Ok(())
}

/// The node-port addresses of this sync. The node's addresses are the Node object's
/// InternalIP and ExternalIP addresses (Kubernetes mode), `--node-ip` and the devices'
/// addresses; its primary addresses come from `--node-ip`, else the Node object, else
/// (manifest mode, which has no Node) the devices.
fn node_port_set(
    cfg: &AgentConfig,
    node: &NodeInfo,
    node_object: Option<&k8s_openapi::api::core::v1::Node>,
    device_addrs: &[std::net::IpAddr],
) -> devices::NodePortSet {
    let from_devices = if cfg.manifests.is_some() {
        device_addrs
    } else {
        &[]
    };
    let primary = devices::primary_addresses(
        &cfg.node_ips,
        &model::primary_ips(node_object),
        from_devices,
    );
    let candidates: Vec<std::net::IpAddr> = node
        .addresses
        .iter()
        .chain(&cfg.node_ips)
        .chain(device_addrs)
        .copied()
        .collect();
    devices::node_port_addresses(
        &candidates,
        &primary,
        &cfg.nodeport_addresses,
        cfg.nodeport_localhost,
    )
}

/// After a failed apply, try again this soon even if nothing changes.
const RETRY: Duration = Duration::from_secs(1);

/// How often the model and the plan run over everything although nothing asked for it:
/// the safety net that finds drift between the maps and the objects (a map edited by
/// hand, a fault of the incremental path), as Cilium's periodic prune does.
pub const FULL_SYNC_EVERY: Duration = Duration::from_secs(300);

/// Waits for the first of the two signals that stop the agent and names it.
async fn stop_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    let health = crate::health::Health::default();
    if let Some(addr) = cfg.health_addr {
        // A default port in use is logged, not fatal: the datapath matters more than
        // its probes, and a failing probe makes the problem visible anyway. A port the
        // operator asked for is a promise to whatever probes it: stop instead.
        match crate::health::bind(addr).await {
            Ok(listener) => {
                info!(addr = %listener.local_addr().map_or(addr, |a| a), "serving /healthz and /readyz");
                let h = health.clone();
                tokio::spawn(async move {
                    if let Err(e) = crate::health::serve(listener, h).await {
                        error!(error = %format!("{e:#}"), "health server stopped");
                    }
                });
            }
            Err(e) if cfg.health_addr_explicit => {
                return Err(e.context(format!(
                    "--health-addr {addr}: cannot serve the health endpoints (use another address, or \"off\")"
                )));
            }
            Err(e) => error!(error = %format!("{e:#}"), "health endpoints disabled"),
        }
    }
    // Check the source before touching the kernel, so a typo fails fast.
    let kube_client = match &cfg.manifests {
        Some(dir) => {
            std::fs::read_dir(dir)
                .with_context(|| format!("manifest directory {}", dir.display()))?;
            None
        }
        None => Some(source::kube::client(cfg.kubeconfig.as_deref()).await?),
    };
    if !crate::datapath::sys::is_cgroup2(&cfg.cgroup)
        .with_context(|| format!("cgroup {}", cfg.cgroup.display()))?
    {
        anyhow::bail!("{} is not a cgroup v2 directory", cfg.cgroup.display());
    }
    if let Some(d) = &cfg.devices {
        devices::check_devices(d)?;
    }
    let pod_mode =
        crate::datapath::poddev::PodDevices::from_flag(&cfg.pod_devices, cfg.socket_lb_scope);
    if let crate::datapath::poddev::PodDevices::List(l) = &pod_mode {
        devices::check_devices(l).context("--pod-devices")?;
    }
    // Before touching the kernel: a kernel that cannot tell namespaces apart stops here.
    let host_netns_cookie = crate::datapath::poddev::host_netns_cookie(cfg.socket_lb_scope)?;
    if cfg.socket_lb_scope == crate::datapath::poddev::SocketLbScope::Host && pod_mode.is_off() {
        warn!(
            "--socket-lb-scope host without --pod-devices: pods' connections to Services are not translated at all"
        );
    }
    // The source starts before the programs load: its first scan (a blocking task)
    // then runs while the kernel verifies them, and the first sync finds it done or
    // nearly. Its snapshots wait in the feed until the loop below takes them.
    let (tx, mut rx) = source::feed();
    let mut watcher = match (&cfg.manifests, kube_client.clone()) {
        (Some(dir), _) => tokio::spawn(manifests::watch(
            dir.clone(),
            manifests::Limits {
                max_file_bytes: cfg.max_manifest_bytes,
            },
            tx,
        )),
        (None, Some(client)) => {
            let opts = source::kube::Options {
                node_name: cfg.node.name.clone(),
                all_nodes: cfg.l2.is_some(),
            };
            tokio::spawn(source::kube::watch(client, opts, tx))
        }
        (None, None) => {
            anyhow::bail!("no source: neither a manifest directory nor a Kubernetes client")
        }
    };
    // The start of the full sync: everything from here to the first `sync applied` is
    // reading the source, modelling, planning and writing (the bench measures from here).
    info!(
        mode = if cfg.manifests.is_some() {
            "manifests"
        } else {
            "kubernetes"
        },
        "source started"
    );
    // The kernel's BTF is parsed beside the probe below (see `prepare_loader`).
    crate::datapath::load::prepare_loader();
    // A single-threaded runtime: let the source reach its scan before the load blocks.
    tokio::task::yield_now().await;
    // What this kernel offers decides the fallbacks; a kernel the socket path cannot
    // run on stops the agent here with the missing features named.
    let probe = crate::datapath::probe::Probe::run(
        &crate::datapath::probe::KernelProber,
        &cfg.force_feature_off,
    );
    probe.log();
    let choices = probe.choices();
    crate::status::update(|st| {
        st.kernel = probe.kernel.clone();
        st.features = probe.report();
        st.tc_attach = Some(choices.tc_attach);
    });
    if let Err(why) = &choices.socket_path {
        anyhow::bail!("{why}");
    }
    // The maps open here; the programs go through the verifier on a thread of their
    // own while the first sync models, plans and writes the maps (it needs no program),
    // and the attach after it waits for them.
    let mut dp = BpfDatapath::open_overlapped(
        &cfg.bpffs,
        crate::datapath::load::LoadOptions {
            bpf_log: cfg.bpf_log,
            maglev_size: cfg.maglev_size,
            conntrack_max: cfg.conntrack_max,
            external_off: cfg.external_off(),
            compat: (&choices).into(),
            sizes: cfg.map_sizes,
            host_netns_cookie,
            route_cluster_ips: cfg.route_cluster_ips,
        },
    )?;
    dp.set_map_batch(choices.map_batch);
    // The external path's lasting traffic totals (issue 15): off the sync, on a thread
    // of their own. A failure leaves `list --stats` on the live entries' sums; the
    // datapath does not depend on it.
    if let Err(e) =
        crate::datapath::exttotals::start(&cfg.bpffs, cfg.ext_stats_interval, choices.map_batch)
    {
        warn!(error = %format!("{e:#}"), "external traffic totals unavailable");
    }
    if cfg.node.scheduler.needs_counts() && !choices.conn_counts {
        warn!(
            scheduler = %cfg.node.scheduler,
            "--scheduler needs active connection counts, which this kernel does not offer (sock_ops_conn); Services without an annotation use random"
        );
    }
    let mut ext = External {
        devices: None,
        device_addrs: Vec::new(),
        node_addrs: None,
        snat: (None, None),
        health: None,
        limits: Default::default(),
    };
    if cfg.bpf_log {
        spawn_bpf_log(&mut dp)?;
    }
    let sockterm = start_sockterm(&cfg)?;
    crate::status::update(|st| {
        st.source = match &cfg.manifests {
            Some(dir) => format!("manifests {}", dir.display()),
            None => "kubernetes".to_owned(),
        };
        st.bpffs = cfg.bpffs.display().to_string();
        st.cgroup = cfg.cgroup.display().to_string();
        st.socket_lb_scope = cfg.socket_lb_scope.name().to_owned();
        st.route_cluster_ips = cfg.route_cluster_ips;
    });
    if let Some(addr) = cfg.metrics_addr {
        spawn_metrics(addr, cfg.bpffs.clone(), cfg.metrics_addr_explicit).await?;
    }
    // Adopt whatever a previous agent programmed: the first sync then changes only
    // what differs, so a restart never disturbs a working Service.
    let mut current = dp.read_current().context("read the pinned maps back")?;
    health.set_loaded();
    info!(
        bpffs = %cfg.bpffs.display(),
        cgroup = %cfg.cgroup.display(),
        frontends = current.frontends.len(),
        backends = current.backends.len(),
        "maps open; adopted pinned state"
    );

    let l2 = cfg
        .l2
        .clone()
        .map(crate::announce::run::spawn)
        .transpose()?;
    // Kubernetes mode: one agent, elected by a Lease, writes the LoadBalancer statuses.
    let lb_writer = kube_client.as_ref().map(|c| {
        let identity = cfg
            .node
            .name
            .clone()
            .unwrap_or_else(|| format!("svc-lb-{}", std::process::id()));
        crate::lbipam::leader::spawn(c.clone(), identity)
    });
    // The snapshot of the last sync, synced again after a failure.
    let mut snap = Snapshot::default();
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut reported = Reported::default();
    let mut ipam = crate::lbipam::Ipam::default();
    // The model, kept between syncs and updated with what each snapshot changed.
    let mut cache = model::Cache::default();
    // The next sync models and plans everything: the first one, after a failed apply,
    // and every FULL_SYNC_EVERY.
    let mut full = true;
    let mut full_at = tokio::time::Instant::now() + FULL_SYNC_EVERY;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut attached = false;
    let mut last_node_ports: Option<devices::NodePortSet> = None;
    let mut pods = crate::datapath::poddev::PodPath::new(pod_mode);
    let lc_done = dp.lc().done();
    publish_lc(&mut dp);

    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            next = rx.next() => {
                let Some(next) = next else {
                    // The source only ends on error; it owns the publisher.
                    return match (&mut watcher).await {
                        Ok(Err(e)) => Err(e).context("source stopped"),
                        Ok(Ok(())) => Err(anyhow::anyhow!("source stopped")),
                        Err(e) => Err(e).context("source panicked"),
                    };
                };
                snap = next;
                // Manifest mode: the pools' addresses become the LoadBalancer Services'
                // ingress IPs before the model sees them.
                if cfg.manifests.is_some() {
                    ipam.update(&mut snap);
                } else if let Some(w) = &lb_writer {
                    // Kubernetes mode: the statuses are the ingress addresses.
                    let pools = ipam.observe_as(&snap, w.leading());
                    w.offer(&snap, &ipam, pools);
                }
            }
            () = retry => {}
            () = tokio::time::sleep_until(full_at) => { full = true; }
            // The lc programs' load ended: into the hooks' program arrays (no sync needed).
            () = lc_done.notified() => {
                if dp.lc().poll() {
                    publish_lc(&mut dp);
                }
                continue;
            }
            // A pod device came or went (or the periodic rescan): no sync needed.
            () = pods.changed() => {
                if attached {
                    let exclude = ext.devices.clone().unwrap_or_default();
                    pods.reconcile(&cfg.bpffs, &exclude, |d| {
                        dp.attach_pod_devices(&cfg.bpffs, &[d.to_owned()], choices.tc_attach)
                    });
                }
                continue;
            }
            name = stop_signal(&mut sigterm, &mut sigint) => {
                info!(signal = name, "{name}: exiting; programs and maps stay pinned");
                // The LB-IPAM Lease goes to another agent now, not when it expires.
                if let Some(w) = &lb_writer { w.release().await; }
                return Ok(());
            }
        }
        health.queued_at(std::time::SystemTime::now());
        health.sync_node(snap.node.as_deref());
        let sync_started = Instant::now();
        // The Node object (Kubernetes mode) adds the zone and the node addresses.
        let mut node = model::node_info(&cfg.node, snap.node.as_deref());
        // lc/wlc need the connection counts this kernel may not have (issue 15).
        node.conn_counts = dp.conn_counts();
        if let Err(e) = ext.decide_devices(&cfg, &node, &dp) {
            ext.fail(e.context("external path: choose the devices"));
        }
        let refreshed = ext.read_device_addrs().and_then(|()| {
            // One rule for both paths: the socket programs' node-port frontends and the
            // external path's node addresses come from the same call.
            let set = node_port_set(&cfg, &node, snap.node.as_deref(), &ext.device_addrs);
            ext.refresh_addresses(&mut dp, &health, &set.external)?;
            Ok(set)
        });
        let set = match refreshed {
            Ok(set) => set,
            Err(e) => {
                if attached {
                    error!(error = %format!("{e:#}"), "external path: could not update the node addresses");
                } else {
                    ext.fail(e.context("external path: write the node addresses"));
                }
                node_port_set(&cfg, &node, snap.node.as_deref(), &ext.device_addrs)
            }
        };
        if last_node_ports.as_ref() != Some(&set) {
            info!(local = ?set.local, external = ?set.external, "node ports: the addresses that serve them");
            if set.local.is_empty() && cfg.nodeport_addresses != devices::NodePortAddresses::All {
                warn!(rule = ?cfg.nodeport_addresses, "no node address passes --nodeport-addresses: node ports answer nowhere");
            }
            last_node_ports = Some(set.clone());
        }
        node.external = ext.on();
        node.addresses = set.local;
        let mut stopped = Vec::new();
        let result = sync(
            &mut dp,
            &mut current,
            &mut cache,
            &snap,
            &node,
            full,
            &mut reported,
            &mut stopped,
        );
        if let Some(l2) = &l2 {
            l2.send_replace(crate::announce::run::Inputs {
                targets: crate::announce::apply_adverts(
                    crate::announce::targets_from(cache.desired(), &snap),
                    ipam.last.as_ref(),
                    &ipam.adverts,
                ),
                nodes: crate::announce::NodeView::all(&snap.nodes),
                default_ifaces: ext.devices.clone().unwrap_or_default(),
            });
        }
        // The cache has taken in what this snapshot changed; syncing it again (a retry,
        // the periodic full sync) re-models nothing more.
        snap.changed = source::Changed::default();
        if full {
            full_at = tokio::time::Instant::now() + FULL_SYNC_EVERY;
            // Connection counts of addresses that are no backend any more, once their
            // connections have closed (issue 15): swept with the full sync.
            match dp.prune_conn_counts() {
                Ok(0) => {}
                Ok(n) => info!(entries = n, "connection counts of removed backends deleted"),
                Err(e) => warn!(error = %format!("{e:#}"), "could not prune connection counts"),
            }
            match dp.prune_traffic() {
                Ok(0) => {}
                Ok(n) => info!(entries = n, "traffic counts of removed frontends deleted"),
                Err(e) => warn!(error = %format!("{e:#}"), "could not prune traffic counts"),
            }
        }
        // A failed apply leaves the maps somewhere between two plans: plan everything.
        full = result.is_err();
        // Whatever part of the plan reached the maps: sockets pinned to backends it
        // removed are ended now, off this thread.
        sockterm.submit(stopped);
        let (problems, problems_total) = reported.problems(crate::status::MAX_PROBLEMS);
        crate::status::update(|st| {
            st.problems = problems;
            st.problems_total = problems_total;
        });
        if !attached {
            // The programs' load ran beside this sync; a program the verifier refused
            // stops the agent here, before anything is attached.
            let waited = Instant::now();
            dp.programs()?;
            info!(
                waited_us = waited.elapsed().as_micros() as u64,
                "socket programs ready to attach"
            );
            // Attach only once the first sync is in the maps, and before it is reported
            // as applied: "applied" means the kernel acts on it.
            // The per-packet path for pods first: with `host` scope, once the socket
            // programs leave pods alone, the pod devices already translate (a device
            // that fails is retried on the next link event; the rest serve).
            // Conntrack of an earlier version: its flows must be in the new map before
            // the new tc/XDP programs replace the old ones (see `ctmigrate`).
            let now = crate::inspect::trace::monotonic_ns();
            match crate::datapath::ctmigrate::copy(&cfg.bpffs, now) {
                Ok(Some(n)) => info!(copied = n, "conntrack: flows of the earlier version copied"),
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "conntrack: could not copy the earlier version's flows")
                }
            }
            let exclude = ext.devices.clone().unwrap_or_default();
            pods.reconcile(&cfg.bpffs, &exclude, |d| {
                dp.attach_pod_devices(&cfg.bpffs, &[d.to_owned()], choices.tc_attach)
            });
            if !pods.mode().is_off() {
                info!(mode = ?pods.mode(), scope = cfg.socket_lb_scope.name(), "per-packet path for pods on");
            }
            dp.attach(&cfg.bpffs, &cfg.cgroup)?;
            if let Some(devs) = ext.devices.clone().filter(|d| !d.is_empty()) {
                let xdp = cfg.xdp && choices.xdp_link;
                if cfg.xdp && !xdp {
                    warn!(
                        "--xdp ignored: this kernel has no XDP links (see the feature probe); the devices run tc only"
                    );
                }
                // The socket path keeps serving whatever happens to the external path.
                let attach = if xdp {
                    crate::datapath::xdpdev::entries(&devs, cfg.xdp_reject)
                        .and_then(|marks| dp.set_xdp_devices(&marks))
                } else {
                    Ok(())
                }
                .and_then(|()| dp.attach_devices(&cfg.bpffs, &devs, xdp, choices.tc_attach));
                if let Err(e) = attach {
                    crate::datapath::links::detach_devices(&cfg.bpffs, &devs);
                    ext.fail(e.context("external path: attach the tc/XDP programs"));
                }
            }
            if let Err(e) = crate::datapath::ctmigrate::finish(
                &cfg.bpffs,
                crate::inspect::trace::monotonic_ns(),
            ) {
                warn!(error = %format!("{e:#}"), "conntrack: could not finish the upgrade of the earlier version's flows");
            }
            attached = true;
            crate::status::update(|st| st.attached = true);
            info!(cgroup = %cfg.cgroup.display(), "programs attached; datapath ready");
        }
        // lc/wlc (issue 15): the scan programs load once a frontend needs them, off the
        // sync and after the socket programs are attached (on a small node the two
        // loads would share the CPUs); a node without lc/wlc never verifies them.
        if current
            .frontends
            .values()
            .any(|f| f.flags & svc_lb_common::SVC_FLAG_SCHED_LC != 0)
        {
            match dp.lc().want() {
                Ok(()) => publish_lc(&mut dp),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "lc/wlc: could not start loading the scan programs")
                }
            }
        }
        retry_at = match result {
            Ok(report) => {
                crate::metrics::record_sync(crate::status::SyncRecord {
                    at_ms: crate::status::now_ms(),
                    ok: true,
                    error: None,
                    duration_us: report.duration.as_micros() as u64,
                    ops: report.ops,
                    frontends: report.frontends,
                    backends: report.backends,
                    rejected: report.rejected,
                    skipped: report.skipped,
                });
                // The healthCheckNodePort listeners first: "sync applied" means
                // everything the sync wants is in place.
                if let Some(server) = ext.health.as_mut() {
                    let checks = report
                        .health_checks
                        .iter()
                        .map(|(port, hc)| {
                            (
                                *port,
                                crate::hcnp::HealthCheckEntry {
                                    namespace: hc.service.namespace.to_string(),
                                    name: hc.service.name.to_string(),
                                    local_endpoints: hc.local_endpoints,
                                },
                            )
                        })
                        .collect();
                    if let Err(e) = server.update(checks).await {
                        error!(error = %format!("{e:#}"), "healthCheckNodePort server update failed");
                    }
                }
                info!(
                    ops = report.ops,
                    frontends = report.frontends,
                    backends = report.backends,
                    rejected = report.rejected,
                    duration_us = report.duration.as_micros() as u64,
                    model_us = report.model.as_micros() as u64,
                    plan_us = report.plan.as_micros() as u64,
                    apply_us = report.apply.as_micros() as u64,
                    "sync applied"
                );
                if let Some(took) = crate::mem::release_after_sync(report.duration) {
                    // Info, not debug: the bench reads the agent's memory after this line.
                    info!(took_us = took.as_micros() as u64, "freed heap returned");
                }
                // Attached above, and the maps hold the sources' first complete view.
                health.set_ready();
                health.updated_at(std::time::SystemTime::now());
                None
            }
            Err(e) => {
                crate::metrics::record_sync(crate::status::SyncRecord {
                    at_ms: crate::status::now_ms(),
                    ok: false,
                    error: Some(format!("{e:#}")),
                    duration_us: sync_started.elapsed().as_micros() as u64,
                    frontends: current.frontends.len(),
                    backends: current.backends.len(),
                    ..Default::default()
                });
                error!(error = %format!("{e:#}"), "sync failed; the datapath keeps its last consistent state, retrying");
                // The mirror tracks every op that succeeded; re-read in case the kernel
                // state moved under us (for example a map edited by hand).
                match dp.read_current() {
                    Ok(c) => current = c,
                    Err(e) => error!(error = %format!("{e:#}"), "re-reading the maps failed"),
                }
                Some(tokio::time::Instant::now() + RETRY)
            }
        };
    }
}

/// Publishes the state of the lc programs in the status and the metrics.
fn publish_lc(dp: &mut BpfDatapath) {
    let lc = dp.lc();
    let (state, error) = (lc.state(), lc.error().map(str::to_owned));
    crate::metrics::set_lc_programs(state);
    crate::status::update(|st| {
        st.lc_programs = state.name().to_owned();
        st.lc_error = error;
    });
}

/// Probes whether sockets can be destroyed here and starts the terminator thread (see
/// [`sockterm`]); where the kernel refuses, one warning and nothing more.
fn start_sockterm(cfg: &AgentConfig) -> Result<sockterm::Terminator> {
    let (mode, why) = sockterm::probe();
    match (mode, why) {
        (sockterm::SockTermMode::Off, Some(why)) => warn!(
            reason = %why,
            "socket termination unavailable (needs CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN): connected UDP sockets keep talking to removed backends until their applications reconnect"
        ),
        (mode, _) => info!(mode = ?mode, destroy_tcp = cfg.destroy_tcp, "socket termination on"),
    }
    sockterm::Terminator::start(sockterm::SockTermConfig {
        bpffs: cfg.bpffs.clone(),
        mode,
        destroy_tcp: cfg.destroy_tcp,
    })
}

/// Serves metrics and status in the background. The default address that cannot be
/// bound is logged, not fatal: the datapath matters more than its metrics. One given
/// with `--metrics-addr` (`explicit`) is an error.
async fn spawn_metrics(addr: std::net::SocketAddr, bpffs: PathBuf, explicit: bool) -> Result<()> {
    match crate::metrics::bind(addr).await {
        Ok(listener) => {
            let bound = listener.local_addr().map_or(addr, |a| a);
            info!(addr = %bound, "serving /metrics and /status");
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(listener, bpffs).await {
                    error!(error = %format!("{e:#}"), "metrics server stopped");
                }
            });
        }
        Err(e) if explicit => {
            return Err(e.context(format!(
                "--metrics-addr {addr}: cannot serve metrics (use another address, or \"off\")"
            )));
        }
        Err(e) => error!(error = %format!("{e:#}"), "metrics disabled"),
    }
    Ok(())
}

/// Forwards the programs' aya-log records to the log (target `svclb_ebpf`, level
/// debug) until the agent exits.
fn spawn_bpf_log(dp: &mut BpfDatapath) -> Result<()> {
    let logger = dp.ebpf_logger()?;
    // SAFETY: the logger owns the ring buffer's map fd and returns that same fd from
    // as_raw_fd() for as long as it lives, and the AsyncFd owns the logger.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watch the eBPF log ring buffer: {e}"))?;
    info!("eBPF debug log on: records appear at level debug, target svclb_ebpf");
    tokio::spawn(async move {
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    error!(error = %e, "eBPF log reader stopped");
                    return;
                }
            }
        }
    });
    Ok(())
}

/// The problems being reported, each logged once while it persists, so that a bad
/// file does not flood the log on every reload. Kept per Service, so that a sync
/// formats only the problems of the Services it re-modelled.
#[derive(Default)]
pub struct Reported {
    /// The source errors last seen (the source shares one list until it changes).
    source_seen: Option<std::sync::Arc<Vec<source::SourceError>>>,
    source: BTreeSet<String>,
    model: BTreeMap<model::ServiceRef, BTreeSet<String>>,
    model_total: usize,
    plan: BTreeSet<String>,
}

impl Reported {
    /// At most `max` problems, and how many there are.
    pub fn problems(&self, max: usize) -> (Vec<String>, usize) {
        let shown = self
            .source
            .iter()
            .chain(self.model.values().flatten())
            .chain(&self.plan)
            .take(max)
            .cloned()
            .collect();
        (
            shown,
            self.source.len() + self.model_total + self.plan.len(),
        )
    }

    fn source(&mut self, snap: &Snapshot) {
        if self
            .source_seen
            .as_ref()
            .is_some_and(|seen| std::sync::Arc::ptr_eq(seen, &snap.errors))
        {
            return;
        }
        let mut now = BTreeSet::new();
        for e in snap.errors.iter() {
            let file = e
                .file
                .as_deref()
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default();
            let object = e
                .object
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            report_once(
                &self.source,
                &mut now,
                e.to_string(),
                || warn!(file, object, reason = %e.reason, "skipped bad input"),
            );
        }
        self.source = now;
        self.source_seen = Some(snap.errors.clone());
    }

    /// The problems of the Services `touched` re-modelled (of all after a full one).
    fn model(&mut self, cache: &model::Cache, touched: &model::Touched, snap: &Snapshot) {
        let desired = cache.desired();
        let one = |reported: &mut Self, sref: &model::ServiceRef| {
            let old = reported.model.remove(sref).unwrap_or_default();
            let mut now = BTreeSet::new();
            for e in cache.errors_of(sref) {
                report_once(
                    &old,
                    &mut now,
                    e.to_string(),
                    || warn!(file = origin(snap, &e.object), object = %e.object, reason = %e.reason, "skipped bad input"),
                );
            }
            if let Some(e) = desired.skipped.get(sref) {
                report_once(
                    &old,
                    &mut now,
                    e.to_string(),
                    || info!(file = origin(snap, &e.object), object = %e.object, reason = %e.reason, "Service not programmed"),
                );
            }
            reported.model_total = reported.model_total + now.len() - old.len();
            if !now.is_empty() {
                reported.model.insert(sref.clone(), now);
            }
        };
        if touched.all {
            let mut all: BTreeSet<model::ServiceRef> = self.model.keys().cloned().collect();
            all.extend(cache.services_with_errors().cloned());
            all.extend(desired.skipped.keys().cloned());
            for sref in &all {
                one(self, sref);
            }
        } else {
            for sref in &touched.services {
                one(self, sref);
            }
        }
    }

    fn plan(&mut self, rejected: &[plan::Rejected]) {
        let mut now = BTreeSet::new();
        for r in rejected {
            report_once(
                &self.plan,
                &mut now,
                format!("{}: {}", r.service, r.reason),
                || error!(service = %r.service, reason = %r.reason, "Service not programmed"),
            );
        }
        self.plan = now;
    }
}

/// Logs `msg` unless it was reported before, and keeps it in `now`.
fn report_once(
    reported: &BTreeSet<String>,
    now: &mut BTreeSet<String>,
    msg: String,
    log: impl FnOnce(),
) {
    if !reported.contains(&msg) {
        log();
    }
    now.insert(msg);
}

fn origin(snap: &Snapshot, obj: &model::ObjectRef) -> String {
    snap.origins
        .get(obj)
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// What one applied sync did.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// The healthCheckNodePorts the synced state wants served.
    pub health_checks: std::collections::BTreeMap<u16, model::HealthCheck>,
    pub ops: usize,
    pub frontends: usize,
    pub backends: usize,
    pub rejected: usize,
    /// Objects left out as unreadable or invalid.
    pub skipped: usize,
    pub duration: Duration,
    /// The stages of `duration`: modelling, planning, and writing the maps.
    pub model: Duration,
    pub plan: Duration,
    pub apply: Duration,
}

/// One pass: model, plan, apply. Returns an error only when applying failed; a first
/// sync that fails still lets the programs attach, since the maps hold a consistent
/// (if older) state. `stopped` receives the (frontend, backend) pairs that the applied
/// part of the plan made unusable, even when it failed half way.
///
/// The model re-models only what `snap.changed` names and the plan covers the frontends
/// that changed, unless `full`: then both run over everything (the first sync, after a
/// failed apply, and every [`FULL_SYNC_EVERY`] as the safety net that finds drift).
#[allow(clippy::too_many_arguments)]
pub fn sync(
    dp: &mut dyn MapStore,
    current: &mut CurrentState,
    cache: &mut model::Cache,
    snap: &Snapshot,
    node: &NodeInfo,
    full: bool,
    reported: &mut Reported,
    stopped: &mut Vec<sockterm::Stopped>,
) -> Result<SyncReport> {
    let started = Instant::now();
    if full {
        crate::mem::log_usage("sync start");
    }
    reported.source(snap);
    let mut touched = cache.update(snap, node);
    if full && !touched.all {
        if cache.rebuild(snap, node) {
            error!(
                "the incremental model differed from a full rebuild of the same objects (a bug: please report it); the full rebuild is used"
            );
        }
        touched = model::Touched::all();
    }
    reported.model(cache, &touched, snap);
    let desired = cache.desired();
    let model_errors = cache.error_count();
    // None: plan every frontend.
    let touched: Option<&BTreeSet<model::FrontendKey>> =
        (!touched.all).then_some(&touched.frontends);
    tracing::debug!(
        touched = touched.map_or(usize::MAX, BTreeSet::len),
        model_us = started.elapsed().as_micros() as u64,
        "modelled"
    );
    let modelled = started.elapsed();
    if full {
        crate::mem::log_usage("modelled");
    }
    let cap = dp.capacity();
    if touched.is_none() && current.is_empty() {
        // A first start on empty maps: the plan is every entry, streamed to the maps in
        // slices rather than held whole (see `plan_and_apply_streamed`). Nothing is
        // programmed yet, so no socket can be pinned to a backend it takes out.
        crate::mem::release_between_stages();
        crate::mem::log_usage("trimmed");
        let streamed = crate::datapath::apply::plan_and_apply_streamed(dp, current, desired, &cap);
        reported.plan(&streamed.rejected);
        crate::metrics::set_skipped(
            snap.errors.len(),
            model_errors.saturating_sub(desired.over_limit.len()),
            streamed.rejected.len(),
        );
        crate::metrics::set_skipped_over_limit(desired.over_limit.len());
        stopped.clear();
        let done = started.elapsed();
        crate::mem::log_usage("applied");
        let ops = streamed.result?;
        let writing = streamed.writing.min(done - modelled);
        return Ok(SyncReport {
            health_checks: desired.health_checks.clone(),
            ops,
            frontends: current.frontends.len(),
            backends: current.backends.len(),
            rejected: streamed.rejected.len(),
            skipped: snap.errors.len() + model_errors,
            duration: done,
            model: modelled,
            // Planning and writing interleave: the plan is the rest of the time.
            plan: done - modelled - writing,
            apply: writing,
        });
    }
    let plan = match touched {
        Some(touched) => plan::plan_touched(current, desired, touched, &cap),
        None => plan::plan(current, desired, &cap),
    };
    reported.plan(&plan.rejected);
    crate::metrics::set_skipped(
        snap.errors.len(),
        model_errors.saturating_sub(desired.over_limit.len()),
        plan.rejected.len(),
    );
    crate::metrics::set_skipped_over_limit(desired.over_limit.len());
    // Sockets pinned to a backend the plan takes out of a frontend are ended once the
    // ops that take it out reached the maps (even if the apply stops half way).
    let mut leaving = sockterm::stopped(current, &plan.ops);
    let planned = started.elapsed();
    if full {
        crate::mem::log_usage("planned");
    }
    let applied = apply_plan(dp, current, &plan);
    let written = started.elapsed();
    if full {
        crate::mem::log_usage("applied");
    }
    sockterm::retain_unusable(&mut leaving, current);
    *stopped = leaving;
    let ops = applied?;
    Ok(SyncReport {
        health_checks: desired.health_checks.clone(),
        ops,
        frontends: current.frontends.len(),
        backends: current.backends.len(),
        rejected: plan.rejected.len(),
        skipped: snap.errors.len() + model_errors,
        duration: started.elapsed(),
        model: modelled,
        plan: planned - modelled,
        apply: written - planned,
    })
}
