//! Pod clients: the per-packet path (`--socket-lb-scope host`, tc on the pods' devices)
//! against the socket path (`--socket-lb-scope all`), kube-proxy-style iptables rules and
//! the backends dialled directly, side by side.
//!
//! Four labs exist at once, one per mode, each a node of the two-node lab
//! ([`crate::twonode`]) with four pods behind veths: three backends running the bench's
//! server (ids `a`, `b`, `c`) and a client pod without a default route (only 10.0.0.0/8
//! via its node, and the node has no default route either, so a Service address nothing
//! translates goes nowhere). The labs differ only in node A's datapath:
//! - *per packet*: svc-lb with `--socket-lb-scope host`, its tc programs on the pod
//!   devices it found itself;
//! - *socket*: svc-lb with `--socket-lb-scope all --pod-devices none`: its cgroup
//!   programs translate the pod's connect() and sendmsg();
//! - *iptables*: no agent; kube-proxy's nat-table layout for the same Services
//!   ([`super::workload::iptables_ruleset`]), hooked into PREROUTING, where a pod's
//!   packets meet it on the node;
//! - *direct*: no agent, no rules; the client dials the backends' addresses (round
//!   robin), the limit.
//!
//! Every lab has its own namespaces, so one mode's programs, rules and conntrack never
//! tax another's packets. The load generator runs in the client pod (in node A's cgroup
//! for the svc-lb modes, where the agent's socket programs are attached: with `host`
//! scope they must leave the pod's sockets alone). Every repetition runs every mode once
//! per metric, the order rotating. After the rates, node A's counters must show which
//! path served: the per-packet path's translations and none by the socket programs with
//! `host`, the reverse with `all`.
//!
//! Last, in the per-packet lab, the pod ingress program's cost per packet through
//! BPF_PROG_TEST_RUN, as for the external path ([`super::ext`]): TCP frames from the
//! client pod to a second Service with one endpoint, new flows (a SYN from a new source
//! port each run) and an established one (the same ACK after one SYN).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use super::{
    bpf::{self, BPF_PROG_TYPE_SCHED_CLS},
    ext::{self, ACK, Frames, SYN},
    load::{self, LoadProto, LoadSpec},
    nscmd::{self, Input},
    report::{int, pm_rate, rate_ratio},
    results::{ExtCell, Results},
    server::BenchServer,
    stats,
    workload::{self, Port, SVC_TCP_PORT, SVC_UDP_PORT, Svc, TCP_TARGET_PORT, UDP_TARGET_PORT},
};
use crate::{
    lab::Bins,
    manifests::{Endpoint, EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    podlab,
    twonode::{Node, TwoNodeLab},
};

/// The measured Service (TCP 80 and UDP 53, three endpoints).
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 62, 1);
/// The Service of the cost measurement: TCP 80, one endpoint (the first backend), so
/// that the first packet's destination can be checked.
const COST_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 62, 2);
/// Backend pods and their reply ids.
const BACKENDS: [(&str, char); 3] = [("pa", 'a'), ("pb", 'b'), ("pc", 'c')];
const CLIENT: &str = "client";
const NS: &str = "bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodMode {
    /// svc-lb, `--socket-lb-scope host`: tc on the pod devices.
    PerPacket,
    /// svc-lb, `--socket-lb-scope all`: the socket programs.
    Socket,
    Iptables,
    Direct,
}

impl PodMode {
    pub const ALL: [PodMode; 4] = [
        PodMode::Direct,
        PodMode::PerPacket,
        PodMode::Socket,
        PodMode::Iptables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PodMode::PerPacket => "svc-lb per packet (`--socket-lb-scope host`)",
            PodMode::Socket => "svc-lb socket (`--socket-lb-scope all`)",
            PodMode::Iptables => "iptables",
            PodMode::Direct => "direct",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodMetric {
    /// TCP, a connection per request, the profile's client threads.
    Tcp,
    /// The same from one client thread.
    TcpSingle,
    /// UDP request/response, a new socket per request.
    Udp,
}

impl PodMetric {
    pub const ALL: [PodMetric; 3] = [PodMetric::Tcp, PodMetric::TcpSingle, PodMetric::Udp];

    pub fn title(self) -> &'static str {
        match self {
            PodMetric::Tcp => "TCP connection rate",
            PodMetric::TcpSingle => "TCP connection rate, one client thread",
            PodMetric::Udp => "UDP request/response rate",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            PodMetric::Udp => "req/s",
            _ => "conn/s",
        }
    }
}

/// The rates of one mode and metric over all repetitions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodCell {
    pub metric: PodMetric,
    pub mode: PodMode,
    /// One rate per repetition (successful attempts per second).
    pub samples: Vec<f64>,
    pub failed: u64,
    /// Failure kind → count.
    pub failures: BTreeMap<String, u64>,
    /// Which backend answered → count.
    pub replies: BTreeMap<String, u64>,
}

/// What the pod scenario needs of the run's profile.
#[derive(Clone, Debug)]
pub struct PodSettings {
    pub reps: usize,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Established-flow test runs of the cost measurement.
    pub runs: u64,
}

/// The Services in kube-proxy's terms, for the iptables ruleset.
fn services(backends: &[Ipv4Addr]) -> Vec<Svc> {
    let http = Port {
        name: "http",
        udp: false,
        port: SVC_TCP_PORT,
        target: TCP_TARGET_PORT,
    };
    let dns = Port {
        name: "dns",
        udp: true,
        port: SVC_UDP_PORT,
        target: UDP_TARGET_PORT,
    };
    vec![
        Svc {
            name: "pod-bench".into(),
            vip: VIP,
            ports: vec![http, dns],
            endpoints: backends.to_vec(),
        },
        Svc {
            name: "pod-cost".into(),
            vip: COST_VIP,
            ports: vec![http],
            endpoints: backends[..1].to_vec(),
        },
    ]
}

/// The same Services as manifests for svc-lb, every endpoint a pod on node A.
fn manifest(svcs: &[Svc]) -> String {
    let mut docs = Vec::new();
    for s in svcs {
        let mut svc = Service::new(NS, &s.name, &[IpAddr::V4(s.vip)]);
        let mut slice = EndpointSlice::new(NS, &s.name, "v4", false);
        for p in &s.ports {
            let proto = if p.udp { Protocol::Udp } else { Protocol::Tcp };
            svc = svc.port(p.name, p.port, TargetPort::Number(p.target), proto);
            slice = slice.port(p.name, p.target, proto);
        }
        for (i, ep) in s.endpoints.iter().enumerate() {
            slice = slice.endpoint(
                Endpoint::ready(IpAddr::V4(*ep))
                    .pod(&format!("{}-{i}", s.name))
                    .node(Node::A.name()),
            );
        }
        docs.push(svc.to_value());
        docs.push(slice.to_value());
    }
    yaml_docs(&docs)
}

/// kube-proxy's rules for pod clients: the bench's ruleset (hooked into OUTPUT, for host
/// clients) also hooked into PREROUTING, where kube-proxy catches pods' packets.
fn iptables_rules(svcs: &[Svc]) -> Result<String> {
    let rules = workload::iptables_ruleset(svcs);
    let body = rules
        .strip_suffix("COMMIT\n")
        .context("the iptables ruleset does not end with COMMIT")?;
    Ok(format!(
        "{body}-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n"
    ))
}

/// One mode's lab. Field order: the servers stop before the lab goes.
struct PodLab {
    mode: PodMode,
    _servers: Vec<BenchServer>,
    lab: TwoNodeLab,
    backends: Vec<Ipv4Addr>,
}

impl PodLab {
    fn new(bins: &Bins, bench_bin: &Path, mode: PodMode) -> Result<Self> {
        let mut lab = TwoNodeLab::new(bins.clone())?;
        let mut servers = Vec::new();
        let mut backends = Vec::new();
        for (name, id) in BACKENDS {
            let pod = lab.net.add_pod(name, Node::A)?;
            // As for the bench's other backends: no TIME_WAIT, or a reused 4-tuple's
            // SYN would be dropped as old (PAWS).
            pod.netns.sysctl("net/ipv4/tcp_max_tw_buckets", "0")?;
            backends.push(pod.addr4);
            let ns = pod.netns.name().to_owned();
            servers.push(BenchServer::start(bench_bin, &ns, id)?);
        }
        lab.net.add_pod(CLIENT, Node::A)?;
        podlab::drop_default_routes(&lab, CLIENT)?;
        let svcs = services(&backends);
        match mode {
            PodMode::PerPacket | PodMode::Socket => {
                lab.write_manifest("pod-bench.yaml", &manifest(&svcs))?;
                let (scope, devices) = if mode == PodMode::PerPacket {
                    ("host", "")
                } else {
                    ("all", "none")
                };
                podlab::start_agent(&mut lab, Node::A, scope, devices, &[])?;
                if mode == PodMode::PerPacket {
                    // Backends p1..p3, the client p4: all found by the agent itself.
                    podlab::wait_pod_devices(&lab, Node::A, "discovered: p1,p2,p3,p4")?;
                }
            }
            PodMode::Iptables => {
                let ns = lab.net.node(Node::A).name().to_owned();
                nscmd::run_ok(
                    &ns,
                    "iptables-restore",
                    &[],
                    Input::Text(&iptables_rules(&svcs)?),
                    Duration::from_secs(30),
                )
                .context("load the Service rules into node A")?;
            }
            PodMode::Direct => {}
        }
        Ok(Self {
            mode,
            _servers: servers,
            lab,
            backends,
        })
    }

    fn spec(&self, metric: PodMetric, s: &PodSettings) -> LoadSpec {
        let udp = metric == PodMetric::Udp;
        let targets = if self.mode == PodMode::Direct {
            let port = if udp {
                UDP_TARGET_PORT
            } else {
                TCP_TARGET_PORT
            };
            self.backends
                .iter()
                .map(|b| SocketAddr::from((*b, port)))
                .collect()
        } else {
            let port = if udp { SVC_UDP_PORT } else { SVC_TCP_PORT };
            vec![SocketAddr::from((VIP, port))]
        };
        let svclb = matches!(self.mode, PodMode::PerPacket | PodMode::Socket);
        LoadSpec {
            netns: self.lab.net.pod(CLIENT).netns.name().to_owned(),
            // The node's cgroup, where the agent's socket programs are attached, as a
            // pod's processes are on a node.
            cgroup: svclb.then(|| PathBuf::from(self.lab.cgroup(Node::A))),
            proto: if udp { LoadProto::Udp } else { LoadProto::Tcp },
            targets,
            threads: if metric == PodMetric::TcpSingle {
                1
            } else {
                s.threads
            },
            duration: s.duration,
            warmup: s.warmup,
        }
    }

    /// Node A's counters must say which path served the pod's traffic.
    fn check_path(&mut self) -> Result<()> {
        if !matches!(self.mode, PodMode::PerPacket | PodMode::Socket) {
            return Ok(());
        }
        let (pod, sock) = match self.counters() {
            Ok(c) => c,
            Err(e) => {
                let log = self
                    .lab
                    .agent(Node::A)
                    .map(|a| a.log_text())
                    .unwrap_or_default();
                return Err(e.context(format!("node A's agent log:\n{log}")));
            }
        };
        let ok = match self.mode {
            PodMode::PerPacket => pod > 0 && sock == 0,
            _ => sock > 0 && pod == 0,
        };
        ensure!(
            ok,
            "{}: node A translated {pod} flows per packet and {sock} in the socket programs",
            self.mode.name()
        );
        Ok(())
    }

    /// Node A's forward translations: (per packet on the pod devices, socket programs).
    fn counters(&self) -> Result<(u64, u64)> {
        let m = |series: &str| self.lab.node_metric(Node::A, series);
        Ok((
            m(r#"svclb_datapath_translations_total{hook="pod",direction="forward"}"#)?,
            m(r#"svclb_datapath_translations_total{hook="sock",direction="forward"}"#)?,
        ))
    }
}

/// Rates of every mode and metric, and the pod program's cost per packet.
pub fn measure(
    bins: &Bins,
    bench_bin: &Path,
    s: &PodSettings,
) -> Result<(Vec<PodCell>, Vec<ExtCell>)> {
    let mut labs = PodMode::ALL
        .iter()
        .map(|m| PodLab::new(bins, bench_bin, *m).with_context(|| format!("lab of {}", m.name())))
        .collect::<Result<Vec<_>>>()?;
    let mut cells: Vec<PodCell> = PodMetric::ALL
        .iter()
        .flat_map(|metric| {
            labs.iter().map(|l| PodCell {
                metric: *metric,
                mode: l.mode,
                samples: Vec::new(),
                failed: 0,
                failures: BTreeMap::new(),
                replies: BTreeMap::new(),
            })
        })
        .collect();
    for rep in 0..s.reps.max(1) {
        for (mi, metric) in PodMetric::ALL.iter().enumerate() {
            for k in 0..labs.len() {
                // Rotate which lab goes first.
                let li = (k + rep) % labs.len();
                super::signal::check()?;
                let r = load::run_child(bench_bin, &labs[li].spec(*metric, s))?;
                let c = &mut cells[mi * labs.len() + li];
                c.samples.push(r.rate());
                c.failed += r.failed;
                for (k, v) in r.failures {
                    *c.failures.entry(k).or_default() += v;
                }
                for (k, v) in r.replies {
                    *c.replies.entry(k).or_default() += v;
                }
            }
        }
    }
    for l in &mut labs {
        if cells.iter().any(|c| c.mode == l.mode && c.failed > 0)
            && matches!(l.mode, PodMode::PerPacket | PodMode::Socket)
        {
            eprintln!(
                "svclb-bench: pod clients through {}: failed attempts; node A's datapath:\n{}",
                l.mode.name(),
                l.lab.diagnostics()
            );
        }
        l.check_path()?;
    }
    let per_packet = labs
        .iter()
        .find(|l| l.mode == PodMode::PerPacket)
        .context("no per-packet lab")?;
    let cost = cost(per_packet, s.runs)?;
    drop(labs);
    Ok((cells, cost))
}

/// `svclb_pod_in` of the client pod's device, through BPF_PROG_TEST_RUN in node A's
/// namespace: new flows and an established one to the one-endpoint Service.
fn cost(l: &PodLab, runs: u64) -> Result<Vec<ExtCell>> {
    let client = l.lab.net.pod(CLIENT);
    let dev = format!("p{}", client.k);
    let src = client.addr4;
    let endpoint = *l.backends.first().context("no backend")?;
    let ns = l.lab.net.node(Node::A).name().to_owned();
    crate::netns::in_netns(&ns, move || {
        let ifindex = podlab::ifindex(&dev)?;
        let tcx = crate::bpfquery::tcx_programs(ifindex)?;
        let id = tcx
            .get("tcx_ingress")
            .and_then(|v| v.first())
            .map(|(_, prog)| *prog)
            .with_context(|| format!("no tc ingress program on node A's {dev}"))?;
        let prog = bpf::prog_fd_by_id(u32::try_from(id).context("program id")?)?;
        let nop = bpf::load_trivial(BPF_PROG_TYPE_SCHED_CLS, 0)?;
        let f = Frames {
            src,
            dst: COST_VIP,
            dport: SVC_TCP_PORT,
            // As in the external path's runs: the test run's skb is on lo, and an
            // all-zero destination MAC makes it PACKET_HOST.
            dst_mac: [0; 6],
        };
        let program = svc_lb_common::PROG_POD_INGRESS;
        let label = "pod → Service, local endpoint";
        let new_runs = runs.clamp(1, ext::NEW_FLOW_RUNS_MAX);
        // Source ports below the client's ephemeral range: no real flow has them.
        let first: u16 = 1024;
        let new = ext::run_case(&prog, &nop, false, new_runs, endpoint, |i| {
            f.tcp(first.wrapping_add(i as u16), SYN)
        })?;
        let est_port = first.wrapping_add(new_runs as u16 + 1);
        bpf::test_run(&prog, &f.tcp(est_port, SYN))?;
        let est = ext::run_case(&prog, &nop, false, runs.max(1), endpoint, |_| {
            f.tcp(est_port, ACK)
        })?;
        Ok(vec![
            ext::cell(program, &format!("{label}, new flow (SYN)"), new),
            ext::cell(program, &format!("{label}, established (ACK)"), est),
        ])
    })
}

/// The goal line of the report.
pub const GOAL: &str = "pod clients: per-packet path (`--socket-lb-scope host`) against the socket path and \
                        iptables (TCP connection rate, 4 threads)";

fn cell(r: &Results, metric: PodMetric, mode: PodMode) -> Option<&PodCell> {
    r.pod.iter().find(|c| c.metric == metric && c.mode == mode)
}

/// The per-packet path's TCP rate against the socket path and iptables, for the goals.
pub fn goal(r: &Results) -> Option<String> {
    let samples = |m: PodMode| cell(r, PodMetric::Tcp, m).map(|c| c.samples.as_slice());
    let pp = samples(PodMode::PerPacket)?;
    let vs = |m: PodMode| samples(m).map_or("—".into(), |b| rate_ratio(pp, b));
    Some(format!(
        "{} the socket path, {} iptables, {} direct ({} conn/s)",
        vs(PodMode::Socket),
        vs(PodMode::Iptables),
        vs(PodMode::Direct),
        stats::summarize(pp).map_or("—".into(), |s| int(s.mean)),
    ))
}

/// The report's section: the rate table, then the pod program's cost per packet.
pub fn report(out: &mut String, r: &Results) {
    let threads = r.meta.settings.threads;
    let para = format!(
        "Four labs at once, one per mode, each a node with four pods behind veths: three backends running the \
         bench's server and a client pod with no default route (only 10.0.0.0/8 via its node; the node has no \
         default route either). The labs differ only in the node's datapath: *per packet*: svc-lb with \
         `--socket-lb-scope host`, its tc programs on the pod devices it found itself (the client runs in the \
         node's cgroup, where the socket programs are attached and must leave the pod's sockets alone); *socket*: \
         svc-lb with `--socket-lb-scope all --pod-devices none` (its cgroup programs translate the pod's \
         connect() and sendmsg()); *iptables*: no agent, kube-proxy's nat-table layout for the same Services \
         hooked into PREROUTING, where a pod's packets meet it on the node; *direct*: the client dials the \
         three backends' addresses, the limit. One Service (TCP 80, UDP 53) with the three backends. Load as in \
         the rate tables ({threads} client threads, and 1 for the single-threaded row; a connection or a socket \
         per request), every repetition running every mode once per row, the order rotating. After the run the \
         node's counters must show that the per-packet lab's flows were translated per packet and none by the \
         socket programs, and the reverse in the socket lab."
    );
    super::report::table_head(
        out,
        "Pod clients: per-packet path, socket path and iptables",
        &[&para],
        "| traffic | mode | rate (mean ± sd) | reps | × direct | × iptables | × socket path | failed |\n\
         |---|---|---:|---:|---:|---:|---:|---|",
    );
    for metric in PodMetric::ALL {
        let samples = |m: PodMode| cell(r, metric, m).map(|c| c.samples.as_slice());
        let traffic = match metric {
            PodMetric::Tcp => format!("TCP, {threads} threads"),
            PodMetric::TcpSingle => "TCP, 1 thread".to_owned(),
            PodMetric::Udp => format!("UDP, {threads} threads"),
        };
        for mode in PodMode::ALL {
            let Some(c) = cell(r, metric, mode) else {
                continue;
            };
            let Some(s) = stats::summarize(&c.samples) else {
                continue;
            };
            let vs = |m: PodMode| samples(m).map_or("—".into(), |b| rate_ratio(&c.samples, b));
            let failed = super::report::failed_cell(c.failed, &c.failures);
            let _ = writeln!(
                out,
                "| pod {traffic} | {} | {} {} | {} | {} | {} | {} | {failed} |",
                mode.name(),
                pm_rate(&s),
                metric.unit(),
                s.n,
                vs(PodMode::Direct),
                vs(PodMode::Iptables),
                vs(PodMode::Socket),
            );
        }
    }
    out.push('\n');
    if r.pod_cost.is_empty() {
        return;
    }
    super::report::table_head(
        out,
        "Pod path: cost per packet",
        &[
            "`svclb_pod_in` as the agent of the per-packet lab attached it to the client pod's device, run through \
             BPF_PROG_TEST_RUN in the node's namespace on TCP frames from the client pod to a second Service with \
             one endpoint (a backend pod on the same node: DNAT, then the kernel routes the packet). New flow, \
             established flow, one packet per run and the trivial program subtracted, as in the external path's \
             table.",
        ],
        "| program | packets | ns per packet | raw (mean) | trivial program | runs | first packet | verdicts | × direct | × iptables |\n\
         |---|---|---:|---:|---:|---:|---|---|---:|---:|",
    );
    super::report::ext_rows(out, &r.pod_cost);
    out.push('\n');
}

/// What a smoke run must show: every mode and row measured, nothing failed, every
/// backend answered; the cost cases ran.
pub fn smoke_problems(r: &Results) -> Vec<String> {
    let mut problems = Vec::new();
    let ids: Vec<String> = BACKENDS.iter().map(|(_, id)| id.to_string()).collect();
    for metric in PodMetric::ALL {
        for mode in PodMode::ALL {
            match cell(r, metric, mode) {
                Some(c)
                    if !c.samples.is_empty()
                        && c.samples.iter().all(|s| *s > 0.0)
                        && c.failed == 0
                        && c.replies.keys().eq(ids.iter()) => {}
                other => problems.push(format!("pod {metric:?} {}: {other:?}", mode.name())),
            }
        }
    }
    if r.pod_cost.len() != 2 || r.pod_cost.iter().any(|c| c.runs == 0 || c.mean_ns <= 0.0) {
        problems.push(format!("pod program cost: {:?}", r.pod_cost));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_rules_hook_prerouting_and_manifests_carry_both_services() {
        let b = [
            Ipv4Addr::new(10, 251, 1, 2),
            Ipv4Addr::new(10, 251, 2, 2),
            Ipv4Addr::new(10, 251, 3, 2),
        ];
        let svcs = services(&b);
        let rules = iptables_rules(&svcs).unwrap();
        assert!(rules.ends_with("-j KUBE-SERVICES\nCOMMIT\n"), "{rules}");
        assert!(rules.contains("-A PREROUTING "), "{rules}");
        assert!(rules.contains("-A OUTPUT "), "{rules}");
        assert!(rules.contains("10.96.62.1/32"), "{rules}");
        assert_eq!(rules.matches("COMMIT").count(), 1);
        let m = manifest(&svcs);
        for want in ["10.96.62.1", "10.96.62.2", "10.251.3.2", "8053"] {
            assert!(m.contains(want), "{want} missing:\n{m}");
        }
    }
}
