//! Prometheus metrics on `--metrics-addr` (`/metrics`), and the agent's status as JSON
//! (`/status`, see [`crate::status`]).
//!
//! Two kinds of metrics:
//! - the agent's own (sync duration and errors, watch restarts, skipped objects), kept
//!   in process-wide metric objects that the agent updates as it works;
//! - the datapath's, read from the pinned maps at each scrape: per-CPU counters are
//!   summed there, so the hot path only ever increments a per-CPU slot.
//!
//! Every name starts with `svclb_`; counters end in `_total`, durations are in seconds.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::{Context, Result};
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet},
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use svc_lb_common::{
    COUNTER_NAMES, CTR_EXT_FORWARDED, CTR_EXT_REPLY_XLATED, CTR_SOCK_BACKEND_MISS,
    CTR_SOCK_RNAT_HIT, CTR_SOCK_SLOT_MISS, CTR_SOCK_XLATED,
};

use crate::{
    datapath::pinned::{self, MapStatus, PinnedMaps, ProgramStatus},
    inspect::{names, view::DatapathView},
    model::ServiceRef,
    status::SyncRecord,
};

/// The metrics address when `--metrics-addr` is not given.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9098";

type Labels = Vec<(&'static str, String)>;

/// The agent's own metrics. Cloning a prometheus-client metric shares its value, so
/// every scrape registers clones of these.
struct AgentMetrics {
    sync_duration: Histogram,
    sync_errors: Counter,
    syncs: Counter,
    last_sync_time: Gauge<f64, std::sync::atomic::AtomicU64>,
    last_sync_ok: Gauge,
    watch_restarts: Family<Labels, Counter>,
    skipped: Family<Labels, Gauge>,
    healthcheck_bind_errors: Counter,
    healthcheck_ports: Gauge,
    sockets_destroyed: Family<Labels, Counter>,
    manifest_stale: Gauge,
    lc_programs: Family<Labels, Gauge>,
}

fn agent() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(|| AgentMetrics {
        // 100 µs .. ~13 s: an empty sync takes microseconds, a first sync of a large
        // cluster seconds.
        sync_duration: Histogram::new(exponential_buckets(0.0001, 4.0, 9)),
        sync_errors: Counter::default(),
        syncs: Counter::default(),
        last_sync_time: Gauge::default(),
        last_sync_ok: Gauge::default(),
        watch_restarts: Family::default(),
        skipped: Family::default(),
        healthcheck_bind_errors: Counter::default(),
        healthcheck_ports: Gauge::default(),
        sockets_destroyed: {
            // Both series exist from the start, so "none destroyed" reads as 0.
            let f = Family::<Labels, Counter>::default();
            for proto in ["udp", "tcp"] {
                let _ = f.get_or_create(&vec![("proto", proto.to_owned())]);
            }
            f
        },
        manifest_stale: Gauge::default(),
        lc_programs: Family::default(),
    })
}

/// The state of the `lc`/`wlc` scan programs: 1 for the current state, 0 for the others.
pub fn set_lc_programs(state: crate::datapath::lcdemand::LcState) {
    for s in crate::datapath::lcdemand::LcState::ALL {
        agent()
            .lc_programs
            .get_or_create(&vec![("state", s.name().to_owned())])
            .set(i64::from(s == state));
    }
}

/// Records the outcome of one sync in the metrics and in the published status.
pub fn record_sync(rec: SyncRecord) {
    observe_sync(&rec);
    crate::status::record_sync(rec);
}

fn observe_sync(rec: &SyncRecord) {
    let m = agent();
    m.syncs.inc();
    m.sync_duration
        .observe(Duration::from_micros(rec.duration_us).as_secs_f64());
    if !rec.ok {
        m.sync_errors.inc();
    }
    m.last_sync_time.set(rec.at_ms as f64 / 1000.0);
    m.last_sync_ok.set(i64::from(rec.ok));
}

/// A source restarted its watch: `source` is e.g. "manifests" or "kubernetes",
/// `reason` a short snake_case word ("error", "expired", "replaced", ...). Keep the
/// set of reasons small: each one is a time series.
pub fn watch_restarted(source: &str, reason: &str) {
    agent()
        .watch_restarts
        .get_or_create(&vec![
            ("source", source.to_owned()),
            ("reason", reason.to_owned()),
        ])
        .inc();
}

/// Objects left out by the last sync, by reason: `unreadable` (the source could not
/// parse them), `invalid` (the model refused them) and `map_full` (the planner had no
/// room for the Service).
pub fn set_skipped(unreadable: usize, invalid: usize, map_full: usize) {
    for (reason, n) in [
        ("unreadable", unreadable),
        ("invalid", invalid),
        ("map_full", map_full),
    ] {
        agent()
            .skipped
            .get_or_create(&vec![("reason", reason.to_owned())])
            .set(n as i64);
    }
}

/// LoadBalancer IP allocation (see [`crate::lbipam`]): addresses per pool and state,
/// and Services left pending.
struct LbMetrics {
    pool_addresses: Family<Labels, Gauge>,
    pending: Gauge,
}

fn lb() -> &'static LbMetrics {
    static M: OnceLock<LbMetrics> = OnceLock::new();
    M.get_or_init(|| LbMetrics {
        pool_addresses: Family::default(),
        pending: Gauge::default(),
    })
}

/// Publishes the last allocation. Pools that went away lose their series.
pub fn set_lb_pools(alloc: &crate::lbipam::Allocation) {
    let m = lb();
    m.pool_addresses.clear();
    // An IPv6 pool can hold more addresses than a gauge: it saturates.
    let gauge = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
    for p in &alloc.pools {
        for (state, n) in [("used", p.used), ("free", p.free())] {
            m.pool_addresses
                .get_or_create(&vec![("pool", p.name.clone()), ("state", state.to_owned())])
                .set(gauge(n));
        }
    }
    m.pending.set(gauge(alloc.pending.len() as u128));
}

/// L2 announcement (see [`crate::announce`]), when `--l2-announce` is on.
struct L2Metrics {
    announced: Family<Labels, Gauge>,
    replies: Family<Labels, Counter>,
    gratuitous: Family<Labels, Counter>,
    takeovers: Counter,
    releases: Counter,
    live_nodes: Gauge,
    heartbeats_rejected: Family<Labels, Counter>,
}

fn l2() -> &'static L2Metrics {
    static M: OnceLock<L2Metrics> = OnceLock::new();
    M.get_or_init(|| L2Metrics {
        announced: Family::default(),
        replies: Family::default(),
        gratuitous: Family::default(),
        takeovers: Counter::default(),
        releases: Counter::default(),
        live_nodes: Gauge::default(),
        heartbeats_rejected: Family::default(),
    })
}

fn family_label(v6: bool) -> Labels {
    vec![("family", if v6 { "ipv6" } else { "ipv4" }.to_owned())]
}

/// The load-balancer addresses this node answers ARP/NDP for, by family. Also creates
/// the reply and announcement series at 0.
pub fn set_l2_announced(v4: usize, v6: usize) {
    let m = l2();
    for (v6_, n) in [(false, v4), (true, v6)] {
        m.announced
            .get_or_create(&family_label(v6_))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        let _ = m.gratuitous.get_or_create(&family_label(v6_));
        let _ = m
            .replies
            .get_or_create(&vec![("proto", if v6_ { "ndp" } else { "arp" }.to_owned())]);
    }
}

/// This node answered an ARP request (`v6` false) or a Neighbor Solicitation.
pub fn l2_reply_sent(v6: bool) {
    l2().replies
        .get_or_create(&vec![("proto", if v6 { "ndp" } else { "arp" }.to_owned())])
        .inc();
}

/// This node sent a gratuitous ARP (`v6` false) or an unsolicited Neighbor
/// Advertisement.
pub fn l2_gratuitous_sent(v6: bool) {
    l2().gratuitous.get_or_create(&family_label(v6)).inc();
}

/// This node started announcing an address (on one interface).
pub fn l2_taken_over() {
    l2().takeovers.inc();
}

/// This node stopped announcing an address (on one interface).
pub fn l2_released() {
    l2().releases.inc();
}

/// The nodes the heartbeat says are live (this one included when it is ready).
pub fn set_l2_live_nodes(n: usize) {
    l2().live_nodes.set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// `n` datagrams on the heartbeat port were refused for `reason` (0 creates the series).
pub fn l2_heartbeats_rejected(reason: &'static str, n: u64) {
    l2().heartbeats_rejected
        .get_or_create(&vec![("reason", reason.to_owned())])
        .inc_by(n);
}

/// Manifest files whose last good content stands in for a version that could not be
/// read or parsed.
pub fn set_manifest_files_stale(n: usize) {
    agent()
        .manifest_stale
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// Services the model refused for going over a per-Service limit
/// (`--max-frontends-per-service`, `--max-backends-per-service`): the `over_limit`
/// reason of `svclb_skipped_objects`.
pub fn set_skipped_over_limit(n: usize) {
    agent()
        .skipped
        .get_or_create(&vec![("reason", "over_limit".to_owned())])
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// A healthCheckNodePort could not be bound (see [`crate::hcnp`]).
pub fn healthcheck_bind_failed() {
    agent().healthcheck_bind_errors.inc();
}

/// healthCheckNodePorts with an open listener.
pub fn set_healthcheck_ports(n: usize) {
    agent()
        .healthcheck_ports
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// Sockets destroyed because their backend left the Service (see
/// [`crate::datapath::sockterm`]); `proto` is "udp" or "tcp".
pub fn sockets_destroyed(proto: &str, n: u64) {
    agent()
        .sockets_destroyed
        .get_or_create(&vec![("proto", proto.to_owned())])
        .inc_by(n);
}

/// What one scrape read from bpffs. Reading happens before encoding, on a blocking
/// thread, because it is a series of bpf(2) calls.
#[derive(Debug, Default)]
pub struct ScrapeData {
    pub view: Option<DatapathView>,
    pub counters: Vec<u64>,
    pub maps: Vec<MapStatus>,
    pub programs: Vec<ProgramStatus>,
    pub bpf_stats_enabled: bool,
    /// Why part of the datapath could not be read.
    pub errors: Vec<String>,
}

impl ScrapeData {
    pub fn read(bpffs: &Path) -> Self {
        let mut d = ScrapeData {
            bpf_stats_enabled: pinned::bpf_stats_enabled(),
            ..Default::default()
        };
        match PinnedMaps::open(bpffs) {
            Ok(maps) => {
                match DatapathView::read(&maps) {
                    Ok(v) => d.view = Some(v),
                    Err(e) => d.errors.push(format!("{e:#}")),
                }
                match maps.counters() {
                    Ok(c) => d.counters = c,
                    Err(e) => d.errors.push(format!("{e:#}")),
                }
            }
            Err(e) => d.errors.push(format!("{e:#}")),
        }
        match pinned::maps(bpffs, &svc_lb_common::ALL_MAPS) {
            Ok(m) => d.maps = m,
            Err(e) => d.errors.push(format!("{e:#}")),
        }
        match pinned::programs(bpffs) {
            Ok(p) => d.programs = p,
            Err(e) => d.errors.push(format!("{e:#}")),
        }
        d
    }
}

/// Encodes [`ScrapeData`] as metric families.
#[derive(Debug)]
struct DatapathCollector(ScrapeData);

fn counter_family<V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, V)],
) -> std::fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    // Same punctuation as the registered metrics, whose help the registry ends with a period.
    let help = format!("{help}.");
    let mut m = enc.encode_descriptor(name, &help, None, MetricType::Counter)?;
    for (labels, v) in series {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

fn gauge_family<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, V)],
) -> std::fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    // Same punctuation as the registered metrics, whose help the registry ends with a period.
    let help = format!("{help}.");
    let mut m = enc.encode_descriptor(name, &help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        if labels.is_empty() {
            // A lone unlabelled sample: `name 1`, not `name{} 1`.
            m.encode_gauge(v)?;
        } else {
            m.encode_family(labels)?.encode_gauge(v)?;
        }
    }
    Ok(())
}

/// How a datapath counter is exported: (hook, family, label name, label value).
///
/// The hook comes from the name's prefix: `sock_` for the socket programs, `ext_` for
/// the external path (tc/XDP). The rest of the name decides the family, so counters
/// the eBPF programs add later are exported without a change here as long as they
/// follow the naming (`rejected_*`, `dropped_*`, `error_*`, `affinity_*`).
fn classify_counter(
    index: u32,
    name: &'static str,
) -> (&'static str, &'static str, &'static str, String) {
    let (hook, rest) = if let Some(r) = name.strip_prefix("sock_") {
        ("sock", r)
    } else if let Some(r) = name.strip_prefix("ext_") {
        ("ext", r)
    } else if let Some(r) = name.strip_prefix("pod_") {
        // The per-packet path for pod traffic (`--pod-devices`).
        ("pod", r)
    } else {
        ("other", name)
    };
    let reason = |p: &str| rest.strip_prefix(p).unwrap_or(rest).to_owned();
    let (fam, label, value) = match index {
        CTR_SOCK_XLATED | CTR_EXT_FORWARDED | svc_lb_common::CTR_POD_XLATED => {
            ("translations", "direction", "forward".to_owned())
        }
        CTR_SOCK_RNAT_HIT | CTR_EXT_REPLY_XLATED | svc_lb_common::CTR_POD_REPLY_XLATED => {
            ("translations", "direction", "reverse".to_owned())
        }
        // The outcomes of `choose_backend` that refuse the connection: inconsistent
        // maps refuse it too, so they are rejects rather than errors.
        CTR_SOCK_SLOT_MISS | CTR_SOCK_BACKEND_MISS => ("rejects", "reason", reason("error_")),
        _ if rest.starts_with("rejected_") => ("rejects", "reason", reason("rejected_")),
        _ if rest.starts_with("dropped_") => ("drops", "reason", reason("dropped_")),
        _ if rest.starts_with("error_") => ("errors", "reason", reason("error_")),
        _ if rest.starts_with("affinity_") => ("affinity", "result", reason("affinity_")),
        _ => ("events", "name", rest.to_owned()),
    };
    (hook, fam, label, value)
}

impl prometheus_client::collector::Collector for DatapathCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let d = &self.0;
        gauge_family(
            &mut enc,
            "svclb_datapath_readable",
            "1 when the last scrape could read every pinned map and link, else 0 (see the agent log)",
            &[(Vec::new(), i64::from(d.errors.is_empty()))],
        )?;
        if let Some(view) = &d.view {
            self.encode_view(&mut enc, view)?;
        }

        // Datapath counters by reason.
        let mut fams: BTreeMap<&str, Vec<(Labels, u64)>> = BTreeMap::new();
        for (index, name) in COUNTER_NAMES {
            let Some(v) = d.counters.get(index as usize) else {
                continue;
            };
            let (hook, fam, label, value) = classify_counter(index, name);
            fams.entry(fam)
                .or_default()
                .push((vec![("hook", hook.to_owned()), (label, value)], *v));
        }
        for (fam, help) in [
            (
                "translations",
                "Addresses rewritten, by hook: sock (forward: Service → backend at connect/sendmsg; reverse: backend → Service at recvmsg/getpeername) and ext (forward: packets of external clients sent to a backend; reverse: replies translated back)",
            ),
            (
                "rejects",
                "Connections refused, by hook and reason: ECONNREFUSED at the socket hooks, ICMP port unreachable on the external path (no_backend is a Service without ready endpoints; slot_missing and backend_missing mean inconsistent maps)",
            ),
            (
                "drops",
                "Packets of the external path dropped on purpose, by reason (no_local_endpoint: externalTrafficPolicy Local without a local endpoint; source_range: source not in loadBalancerSourceRanges)",
            ),
            (
                "errors",
                "Datapath errors that did not stop the connection, by reason",
            ),
            (
                "affinity",
                "Session affinity lookups of new connections: hit (the remembered backend was used) or stale (it had expired or left the Service, so a new one was drawn)",
            ),
            ("events", "Other datapath counters"),
        ] {
            if let Some(series) = fams.get(fam) {
                counter_family(&mut enc, &format!("svclb_datapath_{fam}"), help, series)?;
            }
        }

        // Map utilisation.
        let entries: Vec<(Labels, i64)> = d
            .maps
            .iter()
            .map(|m| (vec![("map", m.name.clone())], m.entries as i64))
            .collect();
        gauge_family(
            &mut enc,
            "svclb_map_entries",
            "Entries in each pinned map (arrays count as full)",
            &entries,
        )?;
        let capacity: Vec<(Labels, i64)> = d
            .maps
            .iter()
            .map(|m| (vec![("map", m.name.clone())], m.capacity as i64))
            .collect();
        gauge_family(
            &mut enc,
            "svclb_map_capacity",
            "Maximum entries of each pinned map",
            &capacity,
        )?;
        let ratio: Vec<(Labels, f64)> = d
            .maps
            .iter()
            .filter(|m| m.capacity > 0 && !m.map_type.ends_with("array"))
            .map(|m| {
                (
                    vec![("map", m.name.clone())],
                    m.entries as f64 / m.capacity as f64,
                )
            })
            .collect();
        gauge_family(
            &mut enc,
            "svclb_map_fill_ratio",
            "svclb_map_entries / svclb_map_capacity for hash maps (0..1); a full map makes the agent reject Services",
            &ratio,
        )?;

        // Kernel BPF statistics.
        gauge_family(
            &mut enc,
            "svclb_bpf_stats_enabled",
            "1 when kernel.bpf_stats_enabled is on, so that program run counts and times grow",
            &[(Vec::new(), i64::from(d.bpf_stats_enabled))],
        )?;
        if d.bpf_stats_enabled {
            let label = |p: &ProgramStatus| {
                vec![("program", p.name.clone()), ("hook", p.attach_type.clone())]
            };
            let runs: Vec<(Labels, u64)> =
                d.programs.iter().map(|p| (label(p), p.run_count)).collect();
            counter_family(
                &mut enc,
                "svclb_program_runs",
                "Runs of each attached program while kernel BPF statistics were on",
                &runs,
            )?;
            let time: Vec<(Labels, f64)> = d
                .programs
                .iter()
                .map(|p| (label(p), p.run_time_ns as f64 / 1e9))
                .collect();
            counter_family(
                &mut enc,
                "svclb_program_run_time_seconds",
                "Time spent in each attached program while kernel BPF statistics were on",
                &time,
            )?;
        }
        Ok(())
    }
}

impl DatapathCollector {
    fn encode_view(&self, enc: &mut DescriptorEncoder, view: &DatapathView) -> std::fmt::Result {
        let mut per_service: BTreeMap<ServiceRef, u64> = BTreeMap::new();
        let mut per_frontend = Vec::new();
        let mut backend_services: BTreeMap<u32, BTreeSet<ServiceRef>> = BTreeMap::new();
        let fe_traffic = view.frontend_traffic();
        let fe_datagrams = view.udp_frontend_traffic();
        // (packets, bytes) series of frontends and backends.
        let mut frontend_traffic: TrafficSeries = Default::default();
        let mut backend_traffic: TrafficSeries = Default::default();
        // The external path's lasting totals (never the live conntrack sums, which go
        // down when entries go): IP packets and bytes, headers included, so series of
        // their own rather than a label on the socket path's segments and payload.
        let ext_fe = view.ext_frontend_traffic();
        let ext_be = view.ext_backend_traffic();
        let mut frontend_ext: TrafficSeries = Default::default();
        let mut backend_ext: TrafficSeries = Default::default();
        let mut by_address: std::collections::HashMap<
            svc_lb_common::ConnKey,
            svc_lb_common::TrafficCount,
        > = Default::default();
        for (k, v) in view.traffic.iter().flatten() {
            by_address.entry(k.backend).or_default().add(v);
        }
        // Apart from the TCP counts: a TCP and a UDP backend may share an address.
        let mut udp_by_address: std::collections::HashMap<svc_lb_common::ConnKey, u64> =
            Default::default();
        for (k, v) in view.udp_traffic.iter().flatten() {
            *udp_by_address.entry(k.backend).or_default() += v.packets_in;
        }
        let drain = view.draining();
        for (fe, cur) in &view.state.frontends {
            let meta = view.meta.get(&cur.rev_nat_id);
            let n = view
                .frontend_conns
                .get(&cur.rev_nat_id)
                .copied()
                .unwrap_or(0);
            let (ns, svc, port, kind) = match meta {
                Some(m) => (
                    m.service.namespace.to_string(),
                    m.service.name.to_string(),
                    m.port_name.clone(),
                    names::kind(m.kind),
                ),
                None => (String::new(), String::new(), String::new(), names::kind(0)),
            };
            if let Some(m) = meta {
                *per_service.entry(m.service.clone()).or_default() += n;
                // A draining backend (no slot) is the Service's while its
                // connections go through this frontend, as `list` shows it.
                let draining = view.draining_of(cur.rev_nat_id, fe.proto, &drain);
                for id in cur.backend_ids.iter().chain(&draining) {
                    backend_services
                        .entry(*id)
                        .or_default()
                        .insert(m.service.clone());
                }
            }
            let labels = vec![
                ("namespace", ns),
                ("service", svc),
                ("port_name", port),
                ("kind", kind.to_owned()),
                // A LoadBalancer or external IP has a socket and an external entry
                // at the same address: the scope keeps their series apart.
                (
                    "scope",
                    if fe.scope == svc_lb_common::SCOPE_EXTERNAL {
                        "external"
                    } else {
                        "socket"
                    }
                    .to_owned(),
                ),
                (
                    "frontend",
                    format!(
                        "{}/{}",
                        names::socket(&fe.addr, fe.port),
                        names::proto(fe.proto)
                    ),
                ),
            ];
            // Traffic is counted for the socket path's TCP connections and its
            // unconnected UDP datagrams (packets in only): what is not counted gets no
            // series rather than a 0 that would read as idle.
            if fe.scope != svc_lb_common::SCOPE_EXTERNAL {
                if fe.proto == svc_lb_common::PROTO_TCP && view.traffic.is_some() {
                    let t = fe_traffic.get(&cur.rev_nat_id).copied().unwrap_or_default();
                    push_traffic(&mut frontend_traffic, &labels, &t);
                } else if fe.proto == svc_lb_common::PROTO_UDP && view.udp_traffic.is_some() {
                    let n = fe_datagrams
                        .get(&cur.rev_nat_id)
                        .map_or(0, |t| t.packets_in);
                    push_datagrams(&mut frontend_traffic, &labels, n);
                }
            }
            if view.ext_totals {
                let t = ext_fe.get(&cur.rev_nat_id).copied().unwrap_or_default();
                push_traffic(&mut frontend_ext, &labels, &t);
            }
            per_frontend.push((labels, n));
        }
        let services: Vec<(Labels, u64)> = per_service
            .iter()
            .map(|(s, n)| {
                (
                    vec![
                        ("namespace", s.namespace.to_string()),
                        ("service", s.name.to_string()),
                    ],
                    *n,
                )
            })
            .collect();
        counter_family(
            enc,
            "svclb_service_new_connections",
            "New connections (and unconnected UDP datagrams) load-balanced per Service, over all its frontends",
            &services,
        )?;
        counter_family(
            enc,
            "svclb_frontend_new_connections",
            "New connections (and unconnected UDP datagrams) load-balanced per frontend address",
            &per_frontend,
        )?;
        let mut backends = Vec::new();
        let mut open_active = Vec::new();
        let mut open_inactive = Vec::new();
        for (id, b) in &view.state.backends {
            let svcs = backend_services.get(id);
            // A backend entry is shared by every frontend that reaches the same
            // address, port and protocol; when two Services do, both are named.
            let join = |f: fn(&ServiceRef) -> &str| {
                svcs.map(|s| s.iter().map(f).collect::<BTreeSet<_>>())
                    .unwrap_or_default()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let labels = vec![
                ("namespace", join(|s| &s.namespace)),
                ("service", join(|s| &s.name)),
                (
                    "backend",
                    format!(
                        "{}/{}",
                        names::socket(&b.addr.addr, b.addr.port),
                        names::proto(b.addr.proto)
                    ),
                ),
            ];
            if let Some((active, inactive)) = view.open_connections(*id) {
                let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                open_active.push((labels.clone(), gauge(active)));
                open_inactive.push((labels.clone(), gauge(inactive)));
            }
            if b.addr.proto == svc_lb_common::PROTO_TCP && view.traffic.is_some() {
                let key = crate::inspect::view::conn_key(&b.addr);
                let t = by_address.get(&key).copied().unwrap_or_default();
                push_traffic(&mut backend_traffic, &labels, &t);
            } else if b.addr.proto == svc_lb_common::PROTO_UDP && view.udp_traffic.is_some() {
                let key = crate::inspect::view::conn_key(&b.addr);
                let n = udp_by_address.get(&key).copied().unwrap_or(0);
                push_datagrams(&mut backend_traffic, &labels, n);
            }
            if view.ext_totals {
                let key = (crate::inspect::view::conn_key(&b.addr), b.addr.proto);
                let t = ext_be.get(&key).copied().unwrap_or_default();
                push_traffic(&mut backend_ext, &labels, &t);
            }
            backends.push((labels, view.backend_conns.get(id).copied().unwrap_or(0)));
        }
        const PACKETS: &str = "TCP segments of the socket path's closed TCP connections, and (direction in only) its unconnected UDP datagrams";
        const BYTES: &str = "Payload bytes of the socket path's closed TCP connections";
        for (name, what, series) in [
            ("svclb_frontend_packets", PACKETS, &frontend_traffic.0),
            ("svclb_frontend_bytes", BYTES, &frontend_traffic.1),
            ("svclb_backend_packets", PACKETS, &backend_traffic.0),
            ("svclb_backend_bytes", BYTES, &backend_traffic.1),
        ] {
            let of = if name.starts_with("svclb_frontend") {
                "per frontend"
            } else {
                "per backend, over every frontend"
            };
            counter_family(
                enc,
                name,
                &format!(
                    "{what} {of}; direction in: client to backend, out: back (IPVS InPkts/OutPkts, InBytes/OutBytes)"
                ),
                series,
            )?;
        }
        if view.ext_totals {
            for (name, what, series) in [
                (
                    "svclb_frontend_external_packets",
                    "IP packets",
                    &frontend_ext.0,
                ),
                (
                    "svclb_frontend_external_bytes",
                    "IP bytes (headers included)",
                    &frontend_ext.1,
                ),
                (
                    "svclb_backend_external_packets",
                    "IP packets",
                    &backend_ext.0,
                ),
                (
                    "svclb_backend_external_bytes",
                    "IP bytes (headers included)",
                    &backend_ext.1,
                ),
            ] {
                let of = if name.starts_with("svclb_frontend") {
                    "per frontend, including backends that have left it"
                } else {
                    "per backend, over every frontend"
                };
                counter_family(
                    enc,
                    name,
                    &format!(
                        "{what} of the external path's flows (tc/XDP, and tc on pod devices) {of}, folded from the conntrack entries every --ext-stats-interval; direction in: client to backend, out: back"
                    ),
                    series,
                )?;
            }
        }
        // Absent (not 0) when the node keeps no counts: "unknown" is not "idle".
        if view.open_conns.is_some() {
            gauge_family(
                enc,
                "svclb_backend_active_connections",
                "TCP connections open to each backend in ESTABLISHED state (IPVS ActiveConn): socket-path connections to its address plus established external flows",
                &open_active,
            )?;
            gauge_family(
                enc,
                "svclb_backend_inactive_connections",
                "TCP connections open to each backend in any other state (IPVS InActConn: SYN_SENT, FIN_WAIT, CLOSE_WAIT...; external flows not established or closing)",
                &open_inactive,
            )?;
        }
        counter_family(
            enc,
            "svclb_backend_new_connections",
            "New connections sent to each backend, from every frontend that uses it",
            &backends,
        )?;
        let distinct: BTreeSet<&ServiceRef> = view.meta.values().map(|m| &m.service).collect();
        for (name, help, v) in [
            (
                "svclb_programmed_services",
                "Services with at least one frontend in the maps",
                distinct.len(),
            ),
            (
                "svclb_programmed_frontends",
                "Frontends (address, port, protocol) in the maps",
                view.state.frontends.len(),
            ),
            (
                "svclb_programmed_backends",
                "Distinct backends (address, port, protocol) in the maps",
                view.state.backends.len(),
            ),
        ] {
            gauge_family(enc, name, help, &[(Vec::new(), v as i64)])?;
        }
        Ok(())
    }
}

/// Series of `svclb_*_packets_total` and `svclb_*_bytes_total`.
type TrafficSeries = (Vec<(Labels, u64)>, Vec<(Labels, u64)>);

/// Adds one object's packets and bytes, one series per direction.
fn push_traffic(out: &mut TrafficSeries, labels: &Labels, t: &svc_lb_common::TrafficCount) {
    for (dir, packets, bytes) in [
        ("in", t.packets_in, t.bytes_in),
        ("out", t.packets_out, t.bytes_out),
    ] {
        let mut l = labels.clone();
        l.push(("direction", dir.to_owned()));
        out.0.push((l.clone(), packets));
        out.1.push((l, bytes));
    }
}

/// Adds one UDP object's datagrams: a packets series with direction `in` only. No
/// bytes series and no `out`: the sendmsg hook sees neither a length nor the replies,
/// and a 0 would read as a measurement.
fn push_datagrams(out: &mut TrafficSeries, labels: &Labels, packets_in: u64) {
    let mut l = labels.clone();
    l.push(("direction", "in".to_owned()));
    out.0.push((l, packets_in));
}

/// The whole exposition for one scrape, in the OpenMetrics text format.
pub fn render(data: ScrapeData) -> Result<String> {
    let mut reg = Registry::default();
    let m = agent();
    reg.register(
        "svclb_sync_duration_seconds",
        "Duration of one sync (model, plan, apply to the maps)",
        m.sync_duration.clone(),
    );
    reg.register(
        "svclb_syncs",
        "Syncs attempted since the agent started",
        m.syncs.clone(),
    );
    reg.register(
        "svclb_sync_errors",
        "Syncs that failed to apply; the datapath keeps its last consistent state and the agent retries",
        m.sync_errors.clone(),
    );
    reg.register(
        "svclb_last_sync_timestamp_seconds",
        "Unix time the last sync finished",
        m.last_sync_time.clone(),
    );
    reg.register(
        "svclb_last_sync_success",
        "1 when the last sync succeeded, else 0",
        m.last_sync_ok.clone(),
    );
    reg.register(
        "svclb_lc_programs",
        "1 for the state of the lc/wlc scan programs on this node (off, not_needed, loading, loaded, refused): loaded once a frontend is lc or wlc; until then, or when refused, lc/wlc take the lighter of two random slots",
        m.lc_programs.clone(),
    );
    reg.register(
        "svclb_watch_restarts",
        "Times a source restarted its watch, by source and reason",
        m.watch_restarts.clone(),
    );
    reg.register(
        "svclb_skipped_objects",
        "Objects the last sync left out, by reason (unreadable, invalid, over_limit, map_full)",
        m.skipped.clone(),
    );
    reg.register(
        "svclb_manifest_files_stale",
        "Manifest files whose last good content stays in effect because their current version cannot be read or parsed",
        m.manifest_stale.clone(),
    );
    reg.register(
        "svclb_lb_pool_addresses",
        "Addresses of each IPAddressPool by state (used, free); a shared address counts once",
        lb().pool_addresses.clone(),
    );
    reg.register(
        "svclb_lb_pending_services",
        "LoadBalancer Services left without addresses (conflict, exhausted pool, requested address in no pool)",
        lb().pending.clone(),
    );
    let l2m = l2();
    reg.register(
        "svclb_l2_announced_addresses",
        "Load-balancer addresses this node answers ARP (ipv4) or NDP (ipv6) for",
        l2m.announced.clone(),
    );
    reg.register(
        "svclb_l2_replies",
        "ARP replies and Neighbor Advertisements this node sent in answer to a request for an address it announces, by protocol",
        l2m.replies.clone(),
    );
    reg.register(
        "svclb_l2_gratuitous",
        "Gratuitous ARPs and unsolicited Neighbor Advertisements sent when this node took an address over (three per takeover), by family",
        l2m.gratuitous.clone(),
    );
    reg.register(
        "svclb_l2_takeovers",
        "Times this node started announcing an address on an interface (start, failover to it, new address)",
        l2m.takeovers.clone(),
    );
    reg.register(
        "svclb_l2_releases",
        "Times this node stopped announcing an address on an interface (a peer came back or won it, the address went away)",
        l2m.releases.clone(),
    );
    reg.register(
        "svclb_l2_live_nodes",
        "Nodes the L2 heartbeat counts as live, this one included",
        l2m.live_nodes.clone(),
    );
    reg.register(
        "svclb_l2_heartbeats_rejected",
        "Datagrams on the L2 heartbeat port that were not taken as a heartbeat, by reason (malformed, key_mismatch, bad_tag, clock_skew, replay)",
        l2m.heartbeats_rejected.clone(),
    );
    reg.register(
        "svclb_lb_ipam_leader",
        "1 while this agent holds the LB-IPAM Lease and writes the Services' load-balancer status (Kubernetes mode)",
        lb_writer().leader.clone(),
    );
    reg.register(
        "svclb_lb_status_writes",
        "Service status.loadBalancer patches this agent made as the LB-IPAM leader",
        lb_writer().writes.clone(),
    );
    reg.register(
        "svclb_healthcheck_bind_errors",
        "Attempts to open a healthCheckNodePort that failed (port taken or address missing); retried at every sync",
        m.healthcheck_bind_errors.clone(),
    );
    reg.register(
        "svclb_healthcheck_node_ports",
        "healthCheckNodePorts served by this agent",
        m.healthcheck_ports.clone(),
    );
    reg.register(
        "svclb_sockets_destroyed",
        "Sockets the agent destroyed because the backend they were connected to through a Service stopped being usable for it, by protocol",
        m.sockets_destroyed.clone(),
    );
    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
        .set(1);
    reg.register("svclb_build_info", "The agent's version (always 1)", build);
    reg.register_collector(Box::new(DatapathCollector(data)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).context("encode the metrics")?;
    Ok(out)
}

struct Ctx {
    bpffs: PathBuf,
}

async fn metrics_handler(
    axum::extract::State(ctx): axum::extract::State<Arc<Ctx>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let bpffs = ctx.bpffs.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let data = ScrapeData::read(&bpffs);
        for e in &data.errors {
            tracing::warn!(error = %e, "metrics: could not read part of the datapath");
        }
        render(data)
    })
    .await;
    match rendered {
        Ok(Ok(body)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Ok(Err(e)) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e:#}\n"),
        )
            .into_response(),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics task failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn status_handler() -> axum::Json<crate::status::AgentStatus> {
    axum::Json(crate::status::snapshot())
}

/// Binds the metrics address. Separate from [`serve`] so that the agent can log the
/// bound address (port 0 picks a free one) and fail early on a bad address.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen for metrics on {addr}"))
}

/// Serves `/metrics` and `/status` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, bpffs: PathBuf) -> Result<()> {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .route("/status", axum::routing::get(status_handler))
        .with_state(Arc::new(Ctx { bpffs }));
    axum::serve(listener, app)
        .await
        .context("metrics server stopped")
}

/// `--metrics-addr`: an address, or `off` (`None`). A newtype because clap reads an
/// `Option<T>` field as "T, optional", which is not what `off` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

/// Parses `--metrics-addr`.
pub fn parse_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{s:?} is not ADDR:PORT or \"off\": {e}"))
}

/// The LB-IPAM status writer (Kubernetes mode, see `lbipam::leader`).
struct LbWriterMetrics {
    leader: Gauge,
    writes: Counter,
}

fn lb_writer() -> &'static LbWriterMetrics {
    static M: OnceLock<LbWriterMetrics> = OnceLock::new();
    M.get_or_init(|| LbWriterMetrics {
        leader: Gauge::default(),
        writes: Counter::default(),
    })
}

pub fn set_lb_ipam_leader(leading: bool) {
    lb_writer().leader.set(i64::from(leading));
}

pub fn lb_status_written() {
    lb_writer().writes.inc();
}
