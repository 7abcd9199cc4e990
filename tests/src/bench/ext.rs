//! The external path's cost per packet: the agent's own XDP and tc ingress programs, as
//! a real agent attached and programmed them, run on test packets through
//! BPF_PROG_TEST_RUN.
//!
//! The lab is the two-node lab of the external tests ([`crate::twonode`]): both agents
//! run with `--xdp`; two NodePort Services have one endpoint each, a pod on node B
//! (`remote`: SNAT, FIB lookup, back out of the LAN device) and a pod on node A (`local`).
//! A few real connections through each NodePort come first: they prove the path works and
//! leave the neighbour entries that the programs' FIB lookups need. Then, in node A's
//! namespace (the FIB lookups of a test run use the caller's), node A's programs run on
//! frames from the external client to node A's NodePorts:
//! - *new flow*: a SYN from a new source port each run (conntrack and SNAT entries are
//!   created);
//! - *established*: the same ACK again and again after one SYN (a conntrack hit).
//!
//! Each test run carries one packet (`repeat` = 1): a program rewrites the packet in
//! place, so with a larger `repeat` every run after the first would see the rewritten
//! packet, which is no longer addressed to the NodePort, and time the miss path instead.
//! The kernel's duration of a single run includes its own two clock reads, so the same
//! is measured for a trivial program of the same type (it returns at once) and
//! subtracted. The first packet of each case is checked: its verdict, and where it was
//! sent (the endpoint's address), so a case that silently took another path would show.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::{
    bpf::{self, BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP},
    results::ExtCell,
};
use crate::{
    lab::Bins,
    manifests::{Endpoint, EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    report::Proto,
    twonode::{self, Node, NodeAgentOptions, TwoNodeLab},
};

const POD_PORT: u16 = 8080;
/// New-flow runs per case are fewer than established ones: each remote one takes a SNAT
/// port of a range of about 4 500 (`SNAT_PORT_MIN..=SNAT_PORT_MAX`).
pub const NEW_FLOW_RUNS_MAX: u64 = 1_500;

/// (Service name, NodePort, endpoint pod, label).
const CASES: [(&str, u16, &str, &str); 2] = [
    (
        "ext-remote",
        30081,
        "b1",
        "remote endpoint (SNAT, out of the LAN device)",
    ),
    (
        "ext-local",
        30082,
        "a1",
        "local endpoint (into the pod's veth)",
    ),
];

/// A NodePort Service (`externalTrafficPolicy: Cluster`) with pod `pod` as its one endpoint.
pub fn manifest(lab: &TwoNodeLab, name: &str, node_port: u16, pod: &str, vip: Ipv4Addr) -> String {
    let svc = Service::new("bench", name, &[IpAddr::V4(vip)])
        .port("http", 80, TargetPort::Number(POD_PORT), Protocol::Tcp)
        .node_port(node_port)
        .spec("type", json!("NodePort"))
        .spec("externalTrafficPolicy", json!("Cluster"));
    let p = lab.net.pod(pod);
    let slice = EndpointSlice::new("bench", name, "v4", false)
        .port("http", POD_PORT, Protocol::Tcp)
        .endpoint(
            Endpoint::ready(p.addr(false))
                .pod(&format!("{name}-{pod}"))
                .node(p.node.name()),
        );
    yaml_docs(&[svc.to_value(), slice.to_value()])
}

/// Node A's `eth0`: (ifindex, MAC, id of the attached XDP program).
fn device(lab: &TwoNodeLab) -> Result<(u32, [u8; 6], u32)> {
    let out = lab
        .net
        .node(Node::A)
        .ip(["-j", "-d", "link", "show", "dev", "eth0"])?;
    let v: Value = serde_json::from_str(out.trim()).context("parse `ip -j link show`")?;
    let d = &v[0];
    let ifindex = d["ifindex"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .context("node A's eth0 has no ifindex")?;
    let mac = parse_mac(d["address"].as_str().unwrap_or_default())?;
    let xdp = &d["xdp"];
    let id = xdp["prog"]["id"]
        .as_u64()
        .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
        .and_then(|i| u32::try_from(i).ok())
        .with_context(|| format!("no XDP program on node A's eth0 (ip -d link: {xdp})"))?;
    Ok((ifindex, mac, id))
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    ensure!(parts.len() == 6, "not a MAC address: {s:?}");
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("not a MAC address: {s:?}"))?;
    }
    Ok(mac)
}

/// Measures every case; `runs` is the number of established-flow runs per case.
pub fn measure(bins: Bins, runs: u64) -> Result<Vec<ExtCell>> {
    let mut lab = TwoNodeLab::new(bins)?;
    lab.add_pod("a1", Node::A, POD_PORT)?;
    lab.add_pod("b1", Node::B, POD_PORT)?;
    for (i, (name, node_port, pod, _)) in CASES.iter().enumerate() {
        let vip = Ipv4Addr::new(10, 96, 60, 1 + i as u8);
        let text = manifest(&lab, name, *node_port, pod, vip);
        lab.write_manifest(&format!("{name}.yaml"), &text)?;
    }
    lab.start_agents(&NodeAgentOptions {
        xdp: true,
        extra_args: Vec::new(),
    })?;
    let node = match twonode::Node::A.addr(false) {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => bail!("node A has no IPv4 address"),
    };
    let client = match twonode::client_addr(false) {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => bail!("the client has no IPv4 address"),
    };
    for (name, node_port, pod, _) in CASES {
        let mut opts = lab.client(SocketAddr::from((node, node_port)), Proto::Tcp);
        opts.count = 5;
        opts.timeout = Duration::from_secs(2);
        let r = lab.run_client(&opts)?;
        ensure!(
            r.ok == 5 && r.backends.keys().all(|b| b == pod),
            "{name}: real connections through NodePort {node_port} did not all reach {pod}: {r:?}"
        );
    }
    let (ifindex, _, xdp_id) = device(&lab)?;
    let ns = lab.net.node(Node::A).name().to_owned();
    let pods: Vec<Ipv4Addr> = CASES
        .iter()
        .map(|(_, _, pod, _)| match lab.pod_addr(pod, false) {
            IpAddr::V4(a) => Ok(a),
            IpAddr::V6(_) => bail!("pod {pod} has no IPv4 address"),
        })
        .collect::<Result<_>>()?;
    let cells = crate::netns::in_netns(&ns, move || {
        let tcx = crate::bpfquery::tcx_programs(ifindex)?;
        let tc_id = tcx
            .get("tcx_ingress")
            .and_then(|v| v.first())
            .map(|(_, prog)| *prog)
            .context("no tc ingress program on node A's eth0")?;
        let progs = [
            (
                "svclb_xdp",
                bpf::prog_fd_by_id(xdp_id)?,
                bpf::load_trivial(BPF_PROG_TYPE_XDP, 2)?,
                true,
            ),
            (
                "svclb_tc_in",
                bpf::prog_fd_by_id(u32::try_from(tc_id).context("program id")?)?,
                bpf::load_trivial(BPF_PROG_TYPE_SCHED_CLS, 0)?,
                false,
            ),
        ];
        let mut cells = Vec::new();
        let mut sport: u16 = 1024;
        for (program, fd, nop, xdp) in &progs {
            for ((_, node_port, _, label), pod) in CASES.iter().zip(&pods) {
                let f = Frames {
                    src: client,
                    dst: node,
                    dport: *node_port,
                    // lo's address (all zeroes): the test run builds the skb on lo and
                    // the kernel's pkt_type must say PACKET_HOST, or tc leaves it alone.
                    // XDP runs with lo as ingress device too (no LB_XDPMAC entry).
                    dst_mac: [0; 6],
                };
                let new_runs = runs.clamp(1, NEW_FLOW_RUNS_MAX);
                let first = sport;
                sport = sport.wrapping_add(new_runs as u16 + 1);
                let new = run_case(fd, nop, *xdp, new_runs, *pod, |i| {
                    f.tcp(first.wrapping_add(i as u16), SYN)
                })?;
                cells.push(cell(program, &format!("{label}, new flow (SYN)"), new));
                let est_port = sport;
                sport = sport.wrapping_add(1);
                bpf::test_run(fd, &f.tcp(est_port, SYN))?;
                let est = run_case(fd, nop, *xdp, runs.max(1), *pod, |_| f.tcp(est_port, ACK))?;
                cells.push(cell(program, &format!("{label}, established (ACK)"), est));
            }
        }
        Ok(cells)
    })?;
    drop(lab);
    Ok(cells)
}

pub(super) struct CaseResult {
    verdict: String,
    rewritten_to: String,
    runs: u64,
    mean_ns: f64,
    baseline_ns: f64,
    verdicts: BTreeMap<String, u64>,
}

pub(super) fn cell(program: &str, case: &str, r: CaseResult) -> ExtCell {
    ExtCell {
        program: program.to_owned(),
        case: case.to_owned(),
        verdict: r.verdict,
        rewritten_to: r.rewritten_to,
        runs: r.runs,
        mean_ns: r.mean_ns,
        baseline_ns: r.baseline_ns,
        verdicts: r.verdicts,
    }
}

/// Runs `frame(i)` for i in 0..runs through `prog` and the same frames through `nop`.
/// The first frame's output must be addressed to `endpoint`.
pub(super) fn run_case(
    prog: &OwnedFd,
    nop: &OwnedFd,
    xdp: bool,
    runs: u64,
    endpoint: Ipv4Addr,
    frame: impl Fn(u64) -> Vec<u8>,
) -> Result<CaseResult> {
    let mut total = 0u64;
    let mut base = 0u64;
    let mut verdicts = BTreeMap::new();
    let mut first = None;
    for i in 0..runs {
        let f = frame(i);
        let (rc, out, ns) = bpf::test_run(prog, &f)?;
        total += u64::from(ns);
        *verdicts.entry(verdict_name(xdp, rc)).or_insert(0u64) += 1;
        if first.is_none() {
            first = Some((rc, out));
        }
        // Interleaved, so that both see the same state of the machine.
        base += u64::from(bpf::test_run(nop, &f)?.2);
    }
    let (rc, out) = first.context("no run")?;
    let to = destination(&out).unwrap_or_default();
    let want = format!("{endpoint}:{POD_PORT}");
    ensure!(
        to == want,
        "the first packet was sent to {to:?} (verdict {}), not to the endpoint {want}: the \
         program did not take the forward path",
        verdict_name(xdp, rc)
    );
    Ok(CaseResult {
        verdict: verdict_name(xdp, rc),
        rewritten_to: to,
        runs,
        mean_ns: total as f64 / runs as f64,
        baseline_ns: base as f64 / runs as f64,
        verdicts,
    })
}

fn verdict_name(xdp: bool, rc: u32) -> String {
    let name = if xdp {
        match rc {
            0 => "XDP_ABORTED",
            1 => "XDP_DROP",
            2 => "XDP_PASS",
            3 => "XDP_TX",
            4 => "XDP_REDIRECT",
            _ => "",
        }
    } else {
        match rc {
            0 => "TC_ACT_OK",
            2 => "TC_ACT_SHOT",
            7 => "TC_ACT_REDIRECT",
            u32::MAX => "TC_ACT_UNSPEC",
            _ => "",
        }
    };
    if name.is_empty() {
        format!("{rc}")
    } else {
        name.to_owned()
    }
}

/// `addr:port` an IPv4/TCP frame is addressed to.
fn destination(frame: &[u8]) -> Option<String> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(frame.get(14)? & 0x0f) * 4;
    let ip: [u8; 4] = frame.get(30..34)?.try_into().ok()?;
    let l4 = 14 + ihl;
    let port = u16::from_be_bytes(frame.get(l4 + 2..l4 + 4)?.try_into().ok()?);
    Some(format!("{}:{port}", Ipv4Addr::from(ip)))
}

pub(super) const SYN: u8 = 0x02;
pub(super) const ACK: u8 = 0x10;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];

pub(super) struct Frames {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub dst_mac: [u8; 6],
}

fn csum(sum: u32, bytes: &[u8]) -> u32 {
    bytes.chunks(2).fold(sum, |s, c| {
        s + u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
    })
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

impl Frames {
    /// Ethernet + IPv4 + TCP (no options, no payload) with valid checksums.
    pub fn tcp(&self, sport: u16, flags: u8) -> Vec<u8> {
        let mut f = Vec::with_capacity(54);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        let c = fold(csum(0, &ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
        if flags & ACK != 0 {
            tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
        }
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
        let pseudo = csum(csum(0, &self.src.octets()), &self.dst.octets()) + 6 + 20;
        let c = fold(csum(pseudo, &tcp));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&tcp);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_valid_checksums_and_parse_back() {
        let f = Frames {
            src: Ipv4Addr::new(10, 250, 0, 100),
            dst: Ipv4Addr::new(10, 250, 0, 1),
            dport: 30081,
            dst_mac: [2, 0, 0, 0, 0, 1],
        }
        .tcp(4242, SYN);
        assert_eq!(f.len(), 54);
        // A correct checksum sums (with itself) to 0xffff, i.e. folds to 0.
        assert_eq!(fold(csum(0, &f[14..34])), 0);
        let pseudo = csum(csum(0, &f[26..30]), &f[30..34]) + 6 + 20;
        assert_eq!(fold(csum(pseudo, &f[34..54])), 0);
        assert_eq!(destination(&f).as_deref(), Some("10.250.0.1:30081"));
        assert_eq!(parse_mac("02:00:00:00:00:0a").unwrap(), [2, 0, 0, 0, 0, 10]);
        assert!(parse_mac("nope").is_err());
        assert_eq!(verdict_name(true, 3), "XDP_TX");
        assert_eq!(verdict_name(false, 9), "9");
    }
}
