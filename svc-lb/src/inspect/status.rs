//! `svc-lb status`: the attached programs, the maps' fill levels, and the agent's last
//! sync. Programs and maps are read from bpffs, so they show even when the agent is
//! down; the agent's own state comes from its `/status` endpoint.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{
    datapath::pinned::{MapStatus, ProgramStatus, bpf_stats_enabled, maps, programs},
    status::{AgentStatus, format_age, format_utc},
};

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct AgentReport {
    /// Where `status` asked.
    pub address: String,
    pub reachable: bool,
    /// Why the agent could not be reached, or a warning about the one that answered
    /// (for example, it serves another pin directory).
    pub error: Option<String>,
    pub status: Option<AgentStatus>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Status {
    /// This CLI's version.
    pub version: String,
    pub bpffs: String,
    pub bpf_stats_enabled: bool,
    pub programs: Vec<ProgramStatus>,
    /// Why the programs could not be listed (for example, no pins).
    pub programs_error: Option<String>,
    pub maps: Vec<MapStatus>,
    pub agent: AgentReport,
    /// The kernel and its features: the agent's probe (with its forced switches) when
    /// it answers, else a probe run by this command.
    pub kernel: KernelReport,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct KernelReport {
    pub release: String,
    /// `agent` or `this command`.
    pub probed_by: String,
    pub tc_attach: Option<crate::datapath::probe::TcAttach>,
    pub features: Vec<crate::datapath::probe::FeatureStatus>,
    /// Why the agent turned the external path off, if it did.
    pub external_error: Option<String>,
}

/// The agent's probe results, or a fresh probe when no agent answered (an agent
/// older than the probe reports no features).
fn kernel_report(agent: &AgentReport) -> KernelReport {
    if let Some(st) = agent.status.as_ref().filter(|s| !s.features.is_empty()) {
        return KernelReport {
            release: st.kernel.clone(),
            probed_by: "agent".to_owned(),
            tc_attach: st.tc_attach,
            features: st.features.clone(),
            external_error: st.external_error.clone(),
        };
    }
    let probe = crate::datapath::probe::Probe::run(&crate::datapath::probe::KernelProber, &[]);
    KernelReport {
        release: probe.kernel.clone(),
        probed_by: "this command".to_owned(),
        tc_attach: Some(probe.choices().tc_attach),
        features: probe.report(),
        external_error: None,
    }
}

/// The kernel section of the text output.
pub fn render_kernel(k: &KernelReport) -> String {
    let mut out = format!("\nKernel {} (probed by {})\n", k.release, k.probed_by);
    let mut rows = vec![vec![
        "FEATURE".to_owned(),
        "STATE".to_owned(),
        "SINCE".to_owned(),
        "WITHOUT IT".to_owned(),
    ]];
    for f in &k.features {
        let state = match &f.state {
            crate::datapath::probe::State::Found => "found".to_owned(),
            crate::datapath::probe::State::Missing => "MISSING".to_owned(),
            crate::datapath::probe::State::ForcedOff => "FORCED OFF".to_owned(),
            crate::datapath::probe::State::Unknown(e) => format!("UNKNOWN ({e})"),
        };
        rows.push(vec![
            f.name.clone(),
            state,
            f.since.clone(),
            if f.consequence.is_empty() {
                "-".to_owned()
            } else {
                f.consequence.clone()
            },
        ]);
    }
    out.push_str(&table(&rows, &[]));
    if let Some(t) = k.tc_attach {
        out.push_str(&format!(
            "  tc programs attach through {}\n",
            match t {
                crate::datapath::probe::TcAttach::Tcx => "TCX links",
                crate::datapath::probe::TcAttach::Netlink =>
                    "netlink (clsact qdisc, cls_bpf filter)",
            }
        ));
    }
    if let Some(e) = &k.external_error {
        out.push_str(&format!("  EXTERNAL PATH OFF: {e}\n"));
    }
    out
}

/// `GET path` over HTTP/1.0 (one request, no keep-alive, no chunked body), enough
/// for the agent's own endpoints without an HTTP client dependency.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(timeout)).context("set timeout")?;
    s.set_write_timeout(Some(timeout)).context("set timeout")?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .with_context(|| format!("send a request to {addr}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("read the answer of {addr}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .context("malformed HTTP status line")?;
    if code != 200 {
        bail!("{addr}{path} answered HTTP {code}");
    }
    Ok(body.to_owned())
}

pub fn fetch_agent(addr: SocketAddr) -> AgentReport {
    let got = http_get(addr, "/status", Duration::from_secs(2)).and_then(|body| {
        serde_json::from_str::<AgentStatus>(&body).context("the answer is not an svc-lb status")
    });
    match got {
        Ok(st) => AgentReport {
            address: addr.to_string(),
            reachable: true,
            error: None,
            status: Some(st),
        },
        Err(e) => AgentReport {
            address: addr.to_string(),
            reachable: false,
            error: Some(format!("{e:#}")),
            status: None,
        },
    }
}

pub fn collect(bpffs: &Path, agent_addr: Option<SocketAddr>) -> Result<Status> {
    let (programs, programs_error) = match programs(bpffs) {
        Ok(p) => (p, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let agent = match agent_addr {
        Some(a) => {
            let mut r = fetch_agent(a);
            // Several agents may run on one machine (tests, a second pin directory):
            // say so when the one that answered serves other pins.
            if let Some(st) = &r.status {
                let same =
                    |p: &str| std::fs::canonicalize(p).ok() == std::fs::canonicalize(bpffs).ok();
                if !same(&st.bpffs) {
                    r.error = Some(format!(
                        "the agent at {a} serves the pins in {}, not {}",
                        st.bpffs,
                        bpffs.display()
                    ));
                }
            }
            r
        }
        None => AgentReport {
            address: String::new(),
            reachable: false,
            error: Some("not asked (--metrics-addr off)".to_owned()),
            status: None,
        },
    };
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        bpffs: bpffs.display().to_string(),
        bpf_stats_enabled: bpf_stats_enabled(),
        programs,
        programs_error,
        maps: maps(bpffs, &svc_lb_common::ALL_MAPS)?,
        kernel: kernel_report(&agent),
        agent,
    })
}

fn table(rows: &[Vec<String>], right: &[usize]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut width = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::from("  ");
        for (i, c) in r.iter().enumerate() {
            let w = width[i];
            if right.contains(&i) {
                line.push_str(&format!("{c:>w$}  "));
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn render_text(st: &Status, now_ms: u64) -> String {
    let mut out = format!("svc-lb {} — pins in {}\n\n", st.version, st.bpffs);
    out.push_str("Programs\n");
    if let Some(e) = &st.programs_error {
        out.push_str(&format!("  none found: {e}\n"));
    } else if st.programs.is_empty() {
        out.push_str("  none attached (the agent attaches them after its first sync)\n");
    } else {
        let mut rows = vec![vec![
            "NAME".to_owned(),
            "PROG ID".to_owned(),
            "LINK ID".to_owned(),
            "HOOK".to_owned(),
            "ATTACHED TO".to_owned(),
            "XLATED".to_owned(),
            "RUNS".to_owned(),
            "AVG NS".to_owned(),
        ]];
        for p in &st.programs {
            let (runs, avg) = if st.bpf_stats_enabled || p.run_count > 0 {
                (
                    p.run_count.to_string(),
                    p.run_time_ns
                        .checked_div(p.run_count)
                        .map_or_else(|| "-".to_owned(), |avg| avg.to_string()),
                )
            } else {
                ("-".to_owned(), "-".to_owned())
            };
            rows.push(vec![
                p.name.clone(),
                p.prog_id.to_string(),
                p.link_id.to_string(),
                p.attach_type.clone(),
                p.attached_to.clone(),
                format!("{}B", p.xlated_bytes),
                runs,
                avg,
            ]);
        }
        out.push_str(&table(&rows, &[1, 2, 5, 6, 7]));
        if !st.bpf_stats_enabled {
            out.push_str(
                "  (run counts need kernel.bpf_stats_enabled=1; it costs a little on every run, so it is off by default)\n",
            );
        }
    }
    out.push_str("\nMaps\n");
    let mut rows = vec![vec![
        "NAME".to_owned(),
        "ID".to_owned(),
        "TYPE".to_owned(),
        "ENTRIES".to_owned(),
        "CAPACITY".to_owned(),
        "FILL".to_owned(),
    ]];
    for m in &st.maps {
        let fill = if m.map_type.ends_with("array") {
            "(array)".to_owned()
        } else if m.capacity == 0 {
            "-".to_owned()
        } else {
            format!("{:.1}%", m.entries as f64 * 100.0 / m.capacity as f64)
        };
        rows.push(vec![
            m.name.clone(),
            m.map_id.to_string(),
            m.map_type.clone(),
            m.entries.to_string(),
            m.capacity.to_string(),
            fill,
        ]);
    }
    out.push_str(&table(&rows, &[1, 3, 4, 5]));
    out.push_str("\nAgent\n");
    match &st.agent.status {
        Some(a) => {
            if let Some(e) = &st.agent.error {
                out.push_str(&format!("  WARNING      {e}\n"));
            }
            let age = |ms: u64| format_age(Duration::from_millis(now_ms.saturating_sub(ms)));
            out.push_str(&format!(
                "  running      pid {}, version {}, up {} (asked {})\n",
                a.pid,
                a.version,
                age(a.started_at_ms),
                st.agent.address
            ));
            out.push_str(&format!("  source       {}\n", a.source));
            if !a.socket_lb_scope.is_empty() {
                let mut pods = match (a.pod_discovery, a.pod_devices.is_empty()) {
                    (false, true) => "none".to_owned(),
                    (false, false) => a.pod_devices.join(","),
                    (true, true) => "discovered: none yet".to_owned(),
                    (true, false) => format!("discovered: {}", a.pod_devices.join(",")),
                };
                if let Some(e) = &a.pod_error {
                    pods.push_str(&format!(" (FAILED, retried on link events: {e})"));
                }
                out.push_str(&format!(
                    "  paths        sockets: {} (--socket-lb-scope); per-packet pod devices: {pods}; cluster IPs from outside: {}\n",
                    match a.socket_lb_scope.as_str() {
                        "host" => "host network namespace only",
                        _ => "every socket on the node",
                    },
                    if a.route_cluster_ips {
                        "translated (--route-cluster-ips)"
                    } else {
                        "not translated"
                    }
                ));
            }
            if !a.lc_programs.is_empty() {
                let lc = match a.lc_programs.as_str() {
                    "off" => "off (this kernel has no connection counts)".to_owned(),
                    "not_needed" => "not loaded (no lc/wlc frontend yet)".to_owned(),
                    "loading" => "loading (lc/wlc take two random choices meanwhile)".to_owned(),
                    "loaded" => {
                        "loaded (svclb_lcloop4/6 with bpf_loop, else svclb_lc4/6)".to_owned()
                    }
                    "refused" => format!(
                        "REFUSED by the verifier, lc/wlc take two random choices: {}",
                        a.lc_error.as_deref().unwrap_or("no reason recorded")
                    ),
                    other => other.to_owned(),
                };
                out.push_str(&format!("  lc programs  {lc}\n"));
            }
            out.push_str(&format!(
                "  attached     {}\n",
                if a.attached {
                    format!("yes, to {}", a.cgroup)
                } else {
                    "not yet (waiting for the first sync)".to_owned()
                }
            ));
            match &a.last_sync {
                Some(s) => {
                    let result = if s.ok {
                        format!(
                            "ok: {} ops in {} µs; {} frontends, {} backends; {} Services rejected, {} objects skipped",
                            s.ops, s.duration_us, s.frontends, s.backends, s.rejected, s.skipped
                        )
                    } else {
                        format!(
                            "FAILED after {} µs: {}",
                            s.duration_us,
                            s.error.as_deref().unwrap_or("unknown error")
                        )
                    };
                    out.push_str(&format!(
                        "  last sync    {} ({} ago): {result}\n",
                        format_utc(s.at_ms),
                        age(s.at_ms)
                    ));
                    if !s.ok
                        && let Some(ok) = &a.last_success
                    {
                        out.push_str(&format!(
                            "  last success {} ({} ago)\n",
                            format_utc(ok.at_ms),
                            age(ok.at_ms)
                        ));
                    }
                }
                None => out.push_str("  last sync    none yet\n"),
            }
            out.push_str(&format!(
                "  syncs        {} ({} failed)\n",
                a.syncs, a.sync_errors
            ));
            if a.problems_total > 0 {
                let shown = if a.problems.len() < a.problems_total {
                    format!(" (first {})", a.problems.len())
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "  left out     {} objects{shown}:\n",
                    a.problems_total
                ));
                for p in &a.problems {
                    out.push_str(&format!("    {p}\n"));
                }
            }
            if !a.l2_announcers.is_empty() {
                out.push_str(&render_l2(&a.l2_announcers, &a.l2_announcing));
            } else if !a.l2_announcing.is_empty() {
                out.push_str(&format!("  L2 announces {}\n", a.l2_announcing.join(", ")));
            }
            if let Some(lb) = &a.lb {
                out.push_str(&render_lb(lb));
            }
        }
        None => {
            out.push_str(&format!(
                "  not reachable at {}: {}\n",
                if st.agent.address.is_empty() {
                    "-"
                } else {
                    &st.agent.address
                },
                st.agent.error.as_deref().unwrap_or("unknown")
            ));
            out.push_str(
                "  The programs and maps above keep serving traffic without the agent; they are just not updated.\n",
            );
        }
    }
    out.push_str(&render_kernel(&st.kernel));
    out
}

/// `--l2-announce`: the node that answers for each load-balancer address, and where
/// this node answers (`announcing` holds "IP on dev").
pub fn render_l2(announcers: &[crate::status::L2Announcer], announcing: &[String]) -> String {
    let here = |ip: &str| -> String {
        let devs: Vec<&str> = announcing
            .iter()
            .filter_map(|a| a.strip_prefix(ip)?.strip_prefix(" on "))
            .collect();
        if devs.is_empty() {
            "-".to_owned()
        } else {
            devs.join(",")
        }
    };
    let mine = announcers.iter().filter(|a| here(&a.ip) != "-").count();
    let mut out = format!(
        "\nL2 announcement: this node answers for {mine} of {} addresses\n",
        announcers.len()
    );
    let mut rows = vec![vec![
        "ADDRESS".to_owned(),
        "SERVICE".to_owned(),
        "NODE".to_owned(),
        "HERE ON".to_owned(),
    ]];
    for a in announcers {
        rows.push(vec![
            a.ip.clone(),
            a.service.clone(),
            a.node
                .clone()
                .unwrap_or_else(|| "(no live eligible node)".to_owned()),
            here(&a.ip),
        ]);
    }
    out.push_str(&table(&rows, &[]));
    out
}

/// The agent's LoadBalancer address pools, and the Services left without addresses.
pub fn render_lb(lb: &crate::status::LbStatus) -> String {
    let mut out = String::from("\nLoadBalancer address pools\n");
    if lb.pools.is_empty() {
        out.push_str("  none usable\n");
    } else {
        let mut rows = vec![vec![
            "POOL".to_owned(),
            "SIZE".to_owned(),
            "USED".to_owned(),
            "FREE".to_owned(),
        ]];
        for p in &lb.pools {
            rows.push(vec![
                p.name.clone(),
                p.size.to_string(),
                p.used.to_string(),
                p.free.to_string(),
            ]);
        }
        out.push_str(&table(&rows, &[1, 2, 3]));
    }
    for e in &lb.errors {
        out.push_str(&format!("  rejected: {e}\n"));
    }
    if !lb.pending.is_empty() {
        out.push_str(&format!("  pending      {} Services:\n", lb.pending.len()));
        for p in &lb.pending {
            out.push_str(&format!("    {}: {}\n", p.service, p.reason));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_section_names_each_feature_state_and_consequence() {
        use crate::datapath::probe::{FeatureStatus, State, TcAttach};
        let row = |name: &str, state: State, consequence: &str| FeatureStatus {
            name: name.to_owned(),
            state,
            since: "6.6".to_owned(),
            used_by: "external path".to_owned(),
            consequence: consequence.to_owned(),
        };
        let k = KernelReport {
            release: "5.15.0-91-generic".to_owned(),
            probed_by: "agent".to_owned(),
            tc_attach: Some(TcAttach::Netlink),
            features: vec![
                row("cgroup_link", State::Found, ""),
                row("tcx", State::Missing, "tc programs attach through netlink"),
                row("set_retval", State::ForcedOff, "EPERM instead"),
            ],
            external_error: Some("attach svclb_tc_in: verifier".to_owned()),
        };
        let text = render_kernel(&k);
        assert!(
            text.contains("Kernel 5.15.0-91-generic (probed by agent)"),
            "{text}"
        );
        let line = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line("cgroup_link").contains("found"), "{text}");
        assert!(
            line("tcx").contains("MISSING") && line("tcx").contains("netlink"),
            "{text}"
        );
        assert!(line("set_retval").contains("FORCED OFF"), "{text}");
        assert!(text.contains("through netlink"), "{text}");
        assert!(
            text.contains("EXTERNAL PATH OFF: attach svclb_tc_in"),
            "{text}"
        );
    }
}
