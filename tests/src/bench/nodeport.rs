//! The NodePort request rate of the two-node lab: svc-lb against kube-proxy-style
//! iptables NodePort rules, side by side.
//!
//! Two two-node labs ([`crate::twonode`]) exist at once, alike but for node A's
//! datapath: in one both nodes run svc-lb (`--xdp`); in the other node A has kube-proxy's
//! iptables layout for the same Service (KUBE-SERVICES → KUBE-NODEPORTS → KUBE-EXT (mark
//! for masquerade) → KUBE-SVC → KUBE-SEP with the DNAT, MASQUERADE in POSTROUTING) and no
//! agent runs. The Service's one endpoint is a pod on node B, so every request crosses
//! node A (DNAT and SNAT) to node B and back. The bench's load generator runs in the
//! external client's namespace against node A's NodePort; the repetitions of the two
//! labs alternate, so drift in the machine's load hits both alike.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use super::{
    ext,
    load::{self, LoadProto, LoadSpec},
    nscmd::{self, Input},
    results::{Mode, RateCell},
    server::BenchServer,
};
use crate::{
    lab::Bins,
    twonode::{self, Node, NodeAgentOptions, TwoNodeLab},
};

pub const NODE_PORT: u16 = 30081;
const POD: &str = "b1";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 61, 1);

/// kube-proxy's iptables layout (nat table) for one NodePort Service with one endpoint.
fn iptables_rules(pod: Ipv4Addr) -> String {
    let (ext, svc, sep) = ("KUBE-EXT-BENCHNP", "KUBE-SVC-BENCHNP", "KUBE-SEP-BENCHNP");
    format!(
        "*nat\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n:{ext} - [0:0]\n:{svc} - [0:0]\n:{sep} - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n\
         -A KUBE-SERVICES -d {CLUSTER_IP}/32 -p tcp -m tcp --dport 80 -j {svc}\n\
         -A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-NODEPORTS -p tcp -m tcp --dport {NODE_PORT} -j {ext}\n\
         -A {ext} -j KUBE-MARK-MASQ\n\
         -A {ext} -j {svc}\n\
         -A {svc} -j {sep}\n\
         -A {sep} -s {pod}/32 -j KUBE-MARK-MASQ\n\
         -A {sep} -p tcp -m tcp -j DNAT --to-destination {pod}:{port}\n\
         COMMIT\n",
        port = super::workload::TCP_TARGET_PORT
    )
}

/// One lab: the pod on node B with the bench's server, and node A's datapath.
fn lab(bins: &Bins, bench_bin: &Path, svc_lb: bool) -> Result<(TwoNodeLab, BenchServer)> {
    let mut lab = TwoNodeLab::new(bins.clone())?;
    let pod = lab.net.add_pod(POD, Node::B)?;
    let pod_ns = pod.netns.name().to_owned();
    let pod_addr = pod.addr4;
    // As for the bench's other backends: no TIME_WAIT, or a reused 4-tuple's SYN would
    // be dropped as old (PAWS).
    pod.netns.sysctl("net/ipv4/tcp_max_tw_buckets", "0")?;
    let server = BenchServer::start(bench_bin, &pod_ns, 'b')?;
    if svc_lb {
        let text = ext::manifest(&lab, "np", NODE_PORT, POD, CLUSTER_IP);
        lab.write_manifest("np.yaml", &text)?;
        lab.start_agents(&NodeAgentOptions {
            xdp: true,
            extra_args: Vec::new(),
        })?;
    } else {
        let ns = lab.net.node(Node::A).name().to_owned();
        nscmd::run_ok(
            &ns,
            "iptables-restore",
            &[],
            Input::Text(&iptables_rules(pod_addr)),
            Duration::from_secs(30),
        )
        .context("load the NodePort rules into node A")?;
    }
    Ok((lab, server))
}

/// Rates of both labs, `reps` alternating repetitions of `duration` each.
pub fn measure(
    bins: &Bins,
    bench_bin: &Path,
    reps: usize,
    threads: usize,
    duration: Duration,
    warmup: Duration,
) -> Result<Vec<RateCell>> {
    let node = match twonode::Node::A.addr(false) {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => bail!("node A has no IPv4 address"),
    };
    // Declared before the servers, so the servers stop first.
    let (svclb_lab, _svclb_server) = lab(bins, bench_bin, true)?;
    let (ipt_lab, _ipt_server) = lab(bins, bench_bin, false)?;
    let labs = [(Mode::SvcLb, &svclb_lab), (Mode::Iptables, &ipt_lab)];
    let mut cells: Vec<RateCell> = labs
        .iter()
        .map(|(mode, _)| RateCell {
            metric: super::results::Metric::TcpVip,
            n: 1,
            mode: *mode,
            samples: Vec::new(),
            failed: 0,
            failures: Default::default(),
            replies: Default::default(),
        })
        .collect();
    for rep in 0..reps.max(1) {
        for k in 0..labs.len() {
            // Alternate which lab goes first.
            let i = (k + rep) % labs.len();
            let (_, l) = labs[i];
            super::signal::check()?;
            let spec = LoadSpec {
                netns: l.net.client.name().to_owned(),
                cgroup: None,
                proto: LoadProto::Tcp,
                targets: vec![SocketAddr::from((node, NODE_PORT))],
                threads,
                duration,
                warmup,
            };
            let r = load::run_child(bench_bin, &spec)?;
            let c = &mut cells[i];
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
    if let Some(c) = cells.iter().find(|c| c.mode == Mode::SvcLb && c.failed > 0) {
        // What svc-lb's datapath counted (drops and their reasons), for whoever reads
        // the run's output.
        eprintln!(
            "svclb-bench: NodePort through svc-lb: {} failed attempts; the nodes' datapaths:\n{}",
            c.failed,
            svclb_lab.diagnostics()
        );
    }
    for c in &cells {
        ensure!(
            c.replies.keys().all(|k| k == "b") && c.samples.iter().any(|s| *s > 0.0),
            "NodePort {}: answered by {:?}, rates {:?}, failures {:?}",
            c.mode.name(),
            c.replies,
            c.samples,
            c.failures
        );
    }
    Ok(cells)
}
