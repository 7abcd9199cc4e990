//! The Markdown report: goals, method, one table per measurement. Every row carries
//! the ratio to direct and to iptables (or says why it cannot), and every number the
//! spread over its repetitions.
use std::fmt::Write as _;

use super::{
    results::{DEFAULT_EPS, LoadOutcome, Metric, Mode, PropCell, Results},
    stats::{self, Summary},
    workload::{CHURN_SERVICES, HOT_ENDPOINTS, SERVICES_PER_FILE},
};

/// Groups of three digits, separated by a thin space: 12 345.
pub(super) fn int(x: f64) -> String {
    let v = x.round() as i64;
    let s = v.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if v < 0 { format!("-{out}") } else { out }
}

pub(super) fn n_label(n: usize) -> String {
    int(n as f64)
}

/// A scale point: `10 000`, or `100 000 × 10` when its Services have other than the
/// standard three endpoints.
fn pt_label(n: usize, eps: usize) -> String {
    if eps == DEFAULT_EPS {
        n_label(n)
    } else {
        format!("{} × {eps}", n_label(n))
    }
}

/// A duration in seconds, in the unit that suits it.
fn dur(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "—".into()
    }
}

pub(super) fn pm_rate(s: &Summary) -> String {
    format!("{} ± {}", int(s.mean), int(s.sd))
}

fn pm_dur(s: &Summary) -> String {
    if s.n > 1 {
        format!("{} ± {}", dur(s.mean), dur(s.sd))
    } else {
        dur(s.mean)
    }
}

/// The start of a table section: its heading, the paragraphs that explain it (each
/// followed by a blank line) and the table's header and alignment rows.
pub(super) fn table_head(out: &mut String, title: &str, paras: &[&str], header: &str) {
    let _ = writeln!(out, "### {title}\n");
    for p in paras {
        let _ = writeln!(out, "{p}\n");
    }
    let _ = writeln!(out, "{header}");
}

/// One table row of svc-lb-only numbers: the given cells, then `n/a` for the two ratio
/// columns (there is no direct or iptables equivalent).
fn row_na(out: &mut String, cells: &[String]) {
    let mut line = String::from("|");
    for c in cells.iter().map(String::as_str).chain(["n/a", "n/a"]) {
        line.push(' ');
        line.push_str(c);
        line.push_str(" |");
    }
    let _ = writeln!(out, "{line}");
}

fn load_note(r: &Results, n: usize, mode: Mode) -> Option<String> {
    r.load(n, mode).and_then(LoadOutcome::why_not_short)
}

/// The ratio of the means of `a` and `b`, with the spread of the per-repetition ratios
/// (repetition i of both ran back to back, so their ratio cancels the machine's drift).
pub(super) fn rate_ratio(a: &[f64], b: &[f64]) -> String {
    rate_ratio_prec(a, b, 2)
}

fn rate_ratio_prec(a: &[f64], b: &[f64], prec: usize) -> String {
    let (Some(sa), Some(sb)) = (stats::summarize(a), stats::summarize(b)) else {
        return "—".into();
    };
    let paired: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, y)| **y > 0.0)
        .map(|(x, y)| x / y)
        .collect();
    match stats::summarize(&paired) {
        Some(p) if p.n > 1 => format!("{:.prec$}× (±{:.2})", sa.mean / sb.mean, p.sd),
        _ if sb.mean > 0.0 => format!("{:.prec$}×", sa.mean / sb.mean),
        _ => "—".into(),
    }
}

fn rate_table(out: &mut String, r: &Results, metric: Metric) {
    let unit = metric.unit();
    let _ = writeln!(out, "### {}\n", metric.title());
    let _ = writeln!(
        out,
        "| N | mode | {unit} (mean ± sd) | reps | × direct | × iptables | failed |\n|---:|---|---:|---:|---:|---:|---:|"
    );
    for n in r.scales() {
        let samples = |mode: Mode| r.rate(metric, n, mode).map(|c| c.samples.as_slice());
        let direct = samples(Mode::Direct);
        let ipt = samples(Mode::Iptables);
        for mode in Mode::ALL {
            let label = if mode == Mode::Direct && metric == Metric::TcpNonService {
                "direct (= VIP row)".to_owned()
            } else {
                mode.name().to_owned()
            };
            match (r.rate(metric, n, mode), load_note(r, n, mode)) {
                (_, Some(why)) => {
                    let _ = writeln!(out, "| {} | {label} | {why} | | | | |", n_label(n));
                }
                (Some(c), None) => {
                    let Some(s) = stats::summarize(&c.samples) else {
                        continue;
                    };
                    let vs_direct = direct.map_or("—".into(), |d| rate_ratio(&c.samples, d));
                    let vs_ipt = ipt.map_or("—".into(), |i| rate_ratio(&c.samples, i));
                    let _ = writeln!(
                        out,
                        "| {} | {label} | {} | {} | {vs_direct} | {vs_ipt} | {} |",
                        n_label(n),
                        pm_rate(&s),
                        s.n,
                        c.failed
                    );
                }
                (None, None) => {}
            }
        }
    }
    let _ = writeln!(
        out,
        "\nRatios are ratios of the means; in parentheses, the standard deviation of the ratio taken \
         repetition by repetition.\n"
    );
}

fn sync_table(out: &mut String, r: &Results) {
    let _ = writeln!(out, "### Full sync time\n");
    let _ = writeln!(
        out,
        "Lower is better. svc-lb: from the agent's `source started` log line (it starts reading its source; the programs \
         load and verify meanwhile) to its first `sync applied` (every Service in the maps); the last columns give the same \
         sync measured from the agent's process start (which adds creating the maps and probing the kernel) and the agent's own `duration_us` for \
         model + plan + map writes (the rest is reading and parsing the manifest files). iptables: `iptables-restore` \
         of the whole nat table into an empty one. nftables: `nft -f` of the whole table into none. Direct has no control \
         plane, so its ratio is n/a.\n"
    );
    let _ = writeln!(
        out,
        "| N | mode | time (mean ± sd) | reps | × direct | × iptables | svc-lb: process start → synced | svc-lb: model+plan+maps | svc-lb: frontends / backends programmed |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in r.scales() {
        let ipt = r
            .sync(n, Mode::Iptables)
            .and_then(|c| stats::summarize(&c.samples_s))
            .filter(|_| {
                r.load(n, Mode::Iptables)
                    .is_some_and(LoadOutcome::is_loaded)
            });
        for mode in [Mode::SvcLb, Mode::Iptables, Mode::Nftables] {
            let Some(c) = r.sync(n, mode) else { continue };
            if let Some(why) = c.outcome.why_not() {
                let _ = writeln!(
                    out,
                    "| {} | {} | **{why}** | | n/a | | | | |",
                    n_label(n),
                    mode.name()
                );
                continue;
            }
            let Some(s) = stats::summarize(&c.samples_s) else {
                continue;
            };
            let vs_ipt = ipt.map_or("—".into(), |i| ratio(s.mean, i.mean));
            let start = stats::summarize(&c.start_to_sync_s)
                .map(|x| pm_dur(&x))
                .unwrap_or_default();
            let agent: Vec<f64> = c.agent_sync_us.iter().map(|u| *u as f64 / 1e6).collect();
            let agent = stats::summarize(&agent)
                .map(|x| pm_dur(&x))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | n/a | {vs_ipt} | {start} | {agent} | {} |",
                n_label(n),
                mode.name(),
                pm_dur(&s),
                s.n,
                programmed(c)
            );
        }
    }
    for (n, eps) in r.meta.settings.wide.clone() {
        let Some(c) = r.sync_eps(n, eps, Mode::SvcLb) else {
            continue;
        };
        let label = pt_label(n, eps);
        if let Some(why) = c.outcome.why_not() {
            let _ = writeln!(
                out,
                "| {label} | svc-lb | **{why}** | | n/a | | | | {} |",
                programmed(c)
            );
            continue;
        }
        let Some(s) = stats::summarize(&c.samples_s) else {
            continue;
        };
        let start = stats::summarize(&c.start_to_sync_s)
            .map(|x| pm_dur(&x))
            .unwrap_or_default();
        let agent: Vec<f64> = c.agent_sync_us.iter().map(|u| *u as f64 / 1e6).collect();
        let agent = stats::summarize(&agent)
            .map(|x| pm_dur(&x))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| {label} | svc-lb | {} | {} | n/a | — | {start} | {agent} | {} |",
            pm_dur(&s),
            s.n,
            programmed(c)
        );
    }
    out.push('\n');
}

fn programmed(c: &super::results::SyncCell) -> String {
    c.programmed.map_or(String::new(), |p| {
        let rejected = if p.rejected > 0 {
            format!(", **{} rejected**", int(p.rejected as f64))
        } else {
            String::new()
        };
        format!(
            "{} / {}{rejected}",
            int(p.frontends as f64),
            int(p.backends as f64)
        )
    })
}

fn prop_table(out: &mut String, r: &Results) {
    let _ = writeln!(out, "### Propagation latency of one endpoint removal\n");
    let _ = writeln!(
        out,
        "Lower is better. One backend is removed from the measured Service (then put back, untimed) with N Services \
         loaded. svc-lb: from just before the new manifest file is renamed into the watched directory until svc-lb's \
         pinned service map, read directly every 100 µs, no longer lists the removed backend for the measured frontend. \
         iptables and nftables: the partial sync kube-proxy would apply (`iptables-restore --noflush` rewriting the \
         Service's KUBE-SVC chains and deleting the stale KUBE-SEP chains; `nft -f -` rewriting the service chains' \
         dispatch and deleting the stale endpoint chains), from the start of the command to its exit, which comes \
         after the kernel committed the transaction. The baselines have no watcher in front of them, so their numbers \
         leave out what kube-proxy adds (its informer, and its `minSyncPeriod`, 1 s by default): they are lower \
         bounds. After the last removal a 300 ms probe of real connections checks that the removed backend answers none. \
         *Under churn*: the same svc-lb measurement while a thread removes and restores endpoints of the \
         {CHURN_SERVICES} churn Services (each in a manifest file of its own) at the rate shown (achieved), so the agent \
         is never idle; the sync-part column is left empty there, because the next sync may be another Service's.\n"
    );
    let _ = writeln!(
        out,
        "| N | mode | p50 | p99 | mean ± sd | samples | timeouts | × direct | × iptables (p50 / p99) | probe: removed backend hits | svc-lb: sync part (p50) |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in r.scales() {
        let ipt = r.prop(n, Mode::Iptables);
        let ipt_p = ipt.map(|c| {
            (
                stats::percentile(&c.samples_ms, 50.0),
                stats::percentile(&c.samples_ms, 99.0),
            )
        });
        for mode in [Mode::SvcLb, Mode::Iptables, Mode::Nftables] {
            if let Some(why) = load_note(r, n, mode) {
                if r.load(n, mode).is_some() {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {why} | | | | | n/a | | | |",
                        n_label(n),
                        mode.name()
                    );
                }
                continue;
            }
            let Some(c) = r.prop(n, mode) else { continue };
            prop_row(out, &n_label(n), mode.name(), c, ipt_p);
            if mode == Mode::SvcLb
                && let Some(c) = r.prop_at(n, DEFAULT_EPS, mode, true)
            {
                prop_row(out, &n_label(n), &churn_label(c), c, ipt_p);
            }
        }
    }
    for (n, eps) in r.meta.settings.wide.clone() {
        for churn in [false, true] {
            if let Some(c) = r.prop_at(n, eps, Mode::SvcLb, churn) {
                let label = if churn {
                    churn_label(c)
                } else {
                    "svc-lb".into()
                };
                prop_row(out, &pt_label(n, eps), &label, c, None);
            }
        }
    }
    out.push('\n');
}

fn churn_label(c: &PropCell) -> String {
    format!("svc-lb under churn ({:.0} changes/s)", c.churn_hz)
}

type Pcts = Option<(Option<f64>, Option<f64>)>;

fn prop_row(out: &mut String, n: &str, mode: &str, c: &PropCell, ipt_p: Pcts) {
    let p50 = stats::percentile(&c.samples_ms, 50.0);
    let p99 = stats::percentile(&c.samples_ms, 99.0);
    let ms = |x: Option<f64>| x.map_or("—".into(), |v| dur(v / 1e3));
    let mean = stats::summarize(&c.samples_ms)
        .map(|s| format!("{} ± {}", dur(s.mean / 1e3), dur(s.sd / 1e3)))
        .unwrap_or_default();
    let vs = match (ipt_p, p50, p99) {
        (Some((Some(i50), Some(i99))), Some(a), Some(b)) => {
            format!("{} / {}", ratio(a, i50), ratio(b, i99))
        }
        _ => "—".into(),
    };
    let hits = match (c.removed_hits, c.probe_ok) {
        (Some(h), Some(ok)) => format!("{h} of {ok}"),
        _ => "—".into(),
    };
    let sync: Vec<f64> = c.agent_sync_us.iter().map(|u| *u as f64).collect();
    let sync = stats::percentile(&sync, 50.0).map_or(String::new(), |u| dur(u / 1e6));
    let _ = writeln!(
        out,
        "| {n} | {mode} | {} | {} | {mean} | {} | {} | n/a | {vs} | {hits} | {sync} |",
        ms(p50),
        ms(p99),
        c.samples_ms.len(),
        c.timeouts
    );
}

fn memory_table(out: &mut String, r: &Results) {
    table_head(
        out,
        "Agent resident memory",
        &[
            "svc-lb's agent process after each full sync, once it returned the sync's freed heap (its `freed heap returned` \
             line, or RSS steady for 100 ms) (`VmRSS` and its peak `VmHWM` from /proc/PID/status). The \
             BPF maps themselves are kernel memory and not part of it; the baselines have no agent process here (kube-proxy \
             would be one), so there is nothing to compare with: the ratios are n/a.",
            "The BPF maps column is the kernel memory of the maps the agent holds open (the sum of `memlock` over \
             its map descriptors in /proc/PID/fdinfo, each map once); a preallocated map counts at its full size \
             whatever N.",
        ],
        "| N | VmRSS (mean ± sd) | VmHWM (mean) | BPF maps (memlock) | samples | × direct | × iptables |\n|---:|---:|---:|---:|---:|---:|---:|",
    );
    for m in &r.memory {
        let rss: Vec<f64> = m.rss_kib.iter().map(|k| *k as f64 / 1024.0).collect();
        let hwm: Vec<f64> = m.hwm_kib.iter().map(|k| *k as f64 / 1024.0).collect();
        let maps: Vec<f64> = m.map_kib.iter().map(|k| *k as f64 / 1024.0).collect();
        let maps = stats::summarize(&maps).map_or("—".into(), |s| {
            format!("{:.1} MiB in {} maps", s.mean, m.maps)
        });
        if let (Some(a), Some(b)) = (stats::summarize(&rss), stats::summarize(&hwm)) {
            row_na(
                out,
                &[
                    pt_label(m.n, m.eps),
                    format!("{:.1} ± {:.1} MiB", a.mean, a.sd),
                    format!("{:.1} MiB", b.mean),
                    maps,
                    a.n.to_string(),
                ],
            );
        }
    }
    out.push('\n');
}

fn bpf_table(out: &mut String, r: &Results) {
    table_head(
        out,
        "BPF per-call cost",
        &[
            "Run time divided by run count of each svc-lb program, from the kernel's BPF statistics, over a window of \
         svc-lb traffic of its own kind (the statistics are switched on only for these windows, through \
         `BPF_ENABLE_STATS`, whose descriptor switches them off again when closed). `tcp-vip` exercises connect4 on a \
         Service (lookup, slot pick, backend lookup, reverse-NAT entry, rewrite); `tcp-non-service` the miss path; \
         `udp-vip` sendmsg4 and recvmsg4. There is no iptables or direct equivalent, so the ratios are n/a. The \
         external path's programs have a table of their own below.",
        ],
        "| N | traffic | program | calls | ns per call | × direct | × iptables |\n|---:|---|---|---:|---:|---:|---:|",
    );
    for b in &r.bpf {
        row_na(
            out,
            &[
                n_label(b.n),
                b.window.to_string(),
                b.program.to_string(),
                int(b.run_cnt as f64),
                b.ns_per_call().map_or("—".into(), |v| format!("{v:.0}")),
            ],
        );
    }
    out.push('\n');
}

/// A "failed" cell: the count, then each kind of failure with its count.
pub(super) fn failed_cell(
    failed: u64,
    failures: &std::collections::BTreeMap<String, u64>,
) -> String {
    let kinds = failures
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    if kinds.is_empty() {
        failed.to_string()
    } else {
        format!("{failed} ({kinds})")
    }
}

fn nodeport_table(out: &mut String, r: &Results) {
    table_head(
        out,
        "External path: NodePort request rate (two-node lab)",
        &[
            "Two two-node labs at once, alike but for node A: in one both nodes run svc-lb (`--xdp`); in the other \
         node A has kube-proxy's iptables layout for the same NodePort Service (KUBE-SERVICES → KUBE-NODEPORTS → \
         KUBE-EXT, marked for masquerade → KUBE-SVC → KUBE-SEP with the DNAT; MASQUERADE in POSTROUTING) and no \
         agent runs. The Service's one endpoint is a pod on node B running the bench's server, so every request \
         crosses node A (DNAT and SNAT) to node B and back. The load generator (same settings as the rate tables, \
         TCP) runs in the external client's namespace against node A's NodePort; the two labs' repetitions \
         alternate. There is no direct path to compare with (the client has no route to the pods). A failed \
         attempt that began in the window counts even when it ended (timed out) after it.",
        ],
        "| mode | req/s (mean ± sd) | reps | × direct | × iptables | failed |\n|---|---:|---:|---:|---:|---:|",
    );
    let ipt = r.nodeport.iter().find(|c| c.mode == Mode::Iptables);
    for c in &r.nodeport {
        let Some(s) = stats::summarize(&c.samples) else {
            continue;
        };
        let vs = ipt.map_or("—".into(), |i| rate_ratio(&c.samples, &i.samples));
        let failed = failed_cell(c.failed, &c.failures);
        let _ = writeln!(
            out,
            "| {} | {} | {} | n/a | {vs} | {failed} |",
            c.mode.name(),
            pm_rate(&s),
            s.n
        );
    }
    out.push('\n');
}

fn ext_table(out: &mut String, r: &Results) {
    table_head(
        out,
        "External path: cost per packet",
        &[
            "Node A's `svclb_xdp` and `svclb_tc_in` as its agent (`--xdp`) attached and programmed them in the two-node \
         lab of the external tests, run through BPF_PROG_TEST_RUN on TCP frames from the external client to NodePorts \
         of node A, in node A's namespace (so the programs' FIB lookups see its routes and neighbours, which real \
         connections through each NodePort filled first). Two NodePort Services: one endpoint on node B (remote: \
         DNAT and SNAT, out of the LAN device again) or one on node A (local: into the pod's veth). *New flow*: a SYN \
         from a new source port each run; *established*: the same ACK after one SYN. One packet per test run \
         (a program rewrites the packet in place, so with `repeat` > 1 the runs after the first would see a packet \
         no longer addressed to the NodePort and time the miss path); the kernel's mean duration per run, minus the \
         same for a trivial program of the same type (the timer's own share), is the cost per packet. The first \
         packet of each case is checked: its verdict and where it was sent. Goal: XDP forward ≤ 100 ns (Katran's own \
         tester reports about 101 ns per packet). There is no iptables or direct equivalent, so the ratios are n/a.",
        ],
        "| program | packets | ns per packet | raw (mean) | trivial program | runs | first packet | verdicts | × direct | × iptables |\n|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    );
    ext_rows(out, &r.ext);
    out.push('\n');
}

/// The rows of a per-packet cost table (the external path's, the pod path's), with its
/// header's columns: ns per packet, the raw mean and the trivial program's, runs, the
/// first packet's verdict and destination, every verdict.
pub(super) fn ext_rows(out: &mut String, cells: &[super::results::ExtCell]) {
    for c in cells {
        let verdicts = c
            .verdicts
            .iter()
            .map(|(k, v)| format!("{k} {}", int(*v as f64)))
            .collect::<Vec<_>>()
            .join(", ");
        row_na(
            out,
            &[
                c.program.to_string(),
                c.case.to_string(),
                format!("{:.0}", c.per_packet_ns()),
                format!("{:.0}", c.mean_ns),
                format!("{:.0}", c.baseline_ns),
                int(c.runs as f64),
                format!("{} → {}", c.verdict, c.rewritten_to),
                verdicts,
            ],
        );
    }
}

/// One goal: what it asks, what was measured, whether it holds (`None`: not measured).
struct Goal {
    what: String,
    measured: String,
    met: Met,
}

enum Met {
    Yes,
    No,
    /// A number the issue asks to see, with no bound.
    Reported,
    NotMeasured,
}

impl Goal {
    fn new(what: impl Into<String>, m: Option<(String, bool)>) -> Self {
        match m {
            Some((measured, ok)) => Self {
                what: what.into(),
                measured,
                met: if ok { Met::Yes } else { Met::No },
            },
            None => Self::not_measured(what),
        }
    }

    fn not_measured(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            measured: "not measured in this run".into(),
            met: Met::NotMeasured,
        }
    }
}

/// "≥ 0.97× direct at every N" for one rate metric.
fn vs_direct_goal(r: &Results, metric: Metric, what: &str) -> Goal {
    let ratios: Vec<(usize, f64, String)> = r
        .scales()
        .into_iter()
        .filter_map(|n| {
            let a = &r.rate(metric, n, Mode::SvcLb)?.samples;
            let d = &r.rate(metric, n, Mode::Direct)?.samples;
            let x = stats::summarize(a)?.mean / stats::summarize(d)?.mean;
            Some((n, x, rate_ratio_prec(a, d, 3)))
        })
        .collect();
    Goal::new(
        what,
        ratios
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(n, worst, _)| {
                (
                    format!(
                        "{} (worst at N = {})",
                        ratios
                            .iter()
                            .map(|(n, _, s)| format!("{s} at {}", n_label(*n)))
                            .collect::<Vec<_>>()
                            .join(", "),
                        n_label(*n)
                    ),
                    *worst >= 0.97,
                )
            }),
    )
}

fn sync_goal(r: &Results, n: usize, eps: usize, bound_s: f64) -> Goal {
    let what = format!(
        "full sync of {} Services × {eps} endpoints into an empty datapath ≤ {}",
        n_label(n),
        dur(bound_s)
    );
    let Some(c) = r.sync_eps(n, eps, Mode::SvcLb) else {
        return Goal::not_measured(what);
    };
    if let Some(why) = c.outcome.why_not() {
        return Goal::new(what, Some((why, false)));
    }
    let m = stats::summarize(&c.samples_s).map(|s| {
        let agent: Vec<f64> = c.agent_sync_us.iter().map(|u| *u as f64 / 1e6).collect();
        let part = stats::summarize(&agent).map_or(String::new(), |a| {
            format!("; model + plan + map writes {}", dur(a.mean))
        });
        (
            format!("{} (mean of {}{part})", dur(s.mean), s.n),
            s.mean <= bound_s,
        )
    });
    Goal::new(what, m)
}

fn prop_goal(r: &Results, n: usize, churn: bool, bound_ms: f64) -> Goal {
    let what = if churn {
        format!(
            "one endpoint change, p99 under a churn of {} changes/s ≤ {} at {} Services (2× the quiet goal)",
            // Runs from before the churn measurement have no rate: the issue's.
            if r.meta.settings.churn_hz > 0 {
                r.meta.settings.churn_hz
            } else {
                100
            },
            dur(bound_ms / 1e3),
            n_label(n)
        )
    } else {
        format!(
            "one endpoint change → datapath, p99 ≤ {} at {} Services",
            dur(bound_ms / 1e3),
            n_label(n)
        )
    };
    let m = r.prop_at(n, DEFAULT_EPS, Mode::SvcLb, churn).and_then(|c| {
        let p99 = stats::percentile(&c.samples_ms, 99.0)?;
        let mut text = format!(
            "p99 {} over {} removals{}",
            dur(p99 / 1e3),
            c.samples_ms.len(),
            if c.timeouts > 0 {
                format!(", {} timed out", c.timeouts)
            } else {
                String::new()
            }
        );
        if churn {
            text.push_str(&format!(" ({:.0} changes/s achieved", c.churn_hz));
            if let Some(q) = r
                .prop(n, Mode::SvcLb)
                .and_then(|q| stats::percentile(&q.samples_ms, 99.0))
                .filter(|q| *q > 0.0)
            {
                text.push_str(&format!("; {:.2}× the quiet p99", p99 / q));
            }
            text.push(')');
        }
        Some((text, p99 <= bound_ms && c.timeouts == 0))
    });
    Goal::new(what, m)
}

fn rss_goal(r: &Results, n: usize, eps: usize, bound_mib: f64) -> Goal {
    let what = format!(
        "agent RSS ≤ {bound_mib:.0} MiB at {} Services × {eps} endpoints",
        n_label(n)
    );
    let m = r.memory_at(n, eps).and_then(|m| {
        let v: Vec<f64> = m.rss_kib.iter().map(|k| *k as f64 / 1024.0).collect();
        let s = stats::summarize(&v)?;
        Some((format!("{:.1} MiB VmRSS", s.mean), s.mean <= bound_mib))
    });
    Goal::new(what, m)
}

fn goals(r: &Results) -> Vec<Goal> {
    let mut g = vec![
        sync_goal(r, 10_000, DEFAULT_EPS, 0.2),
        sync_goal(r, 100_000, 10, 10.0),
        rss_goal(r, 100_000, 10, 512.0),
    ];
    // BPF map memory at the largest point measured.
    let maps = r
        .memory
        .iter()
        .filter(|m| !m.map_kib.is_empty())
        .max_by_key(|m| (m.n, m.eps));
    g.push(match maps {
        Some(m) => Goal {
            what: "BPF map memory reported".into(),
            measured: format!(
                "{:.1} MiB in {} maps at {} Services × {} endpoints (see the memory table)",
                m.map_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
                m.maps,
                n_label(m.n),
                m.eps
            ),
            met: Met::Reported,
        },
        None => Goal::not_measured("BPF map memory reported"),
    });
    g.push(prop_goal(r, 10_000, false, 10.0));
    g.push(prop_goal(r, 100_000, false, 50.0));
    g.push(prop_goal(r, 10_000, true, 20.0));
    g.push(prop_goal(r, 100_000, true, 100.0));
    g.push(rss_goal(r, 10_000, DEFAULT_EPS, 64.0));
    let connect: Vec<(usize, f64)> = r
        .bpf
        .iter()
        .filter(|b| b.window == "tcp-vip" && b.program.contains("connect4"))
        .filter_map(|b| Some((b.n, b.ns_per_call()?)))
        .collect();
    g.push(Goal::new(
        "connect4 ≤ 250 ns per call on a Service hit, at every N (kernel bpf_stats)",
        connect
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(n, worst)| {
                (
                    format!(
                        "{} (worst at N = {})",
                        connect
                            .iter()
                            .map(|(n, v)| format!("{v:.0} ns at {}", n_label(*n)))
                            .collect::<Vec<_>>()
                            .join(", "),
                        n_label(*n)
                    ),
                    *worst <= 250.0,
                )
            }),
    ));
    g.push(vs_direct_goal(
        r,
        Metric::TcpVip,
        "VIP connection rate ≥ 0.97× direct at every N (4 client threads)",
    ));
    g.push(vs_direct_goal(
        r,
        Metric::TcpVipSingle,
        "VIP connection rate ≥ 0.97× direct at every N, single-threaded client (a connection per request)",
    ));
    // XDP forward: the worst of the remote-endpoint cases (out of the LAN device again,
    // as a load balancer forwards).
    let xdp: Vec<&super::results::ExtCell> = r
        .ext
        .iter()
        .filter(|c| c.program == "svclb_xdp" && c.case.starts_with("remote"))
        .collect();
    g.push(Goal::new(
        "XDP forward ≤ 100 ns per packet (BPF_PROG_TEST_RUN; Katran ~101 ns)",
        xdp.iter()
            .map(|c| c.per_packet_ns())
            .max_by(f64::total_cmp)
            .map(|worst| {
                (
                    xdp.iter()
                        .map(|c| {
                            let kind = c.case.rsplit(", ").next().unwrap_or_default();
                            format!("{:.0} ns {kind} (verdict {})", c.per_packet_ns(), c.verdict)
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    worst <= 100.0,
                )
            }),
    ));
    let tc: Vec<String> = r
        .ext
        .iter()
        .filter(|c| c.program == "svclb_tc_in")
        .map(|c| format!("{:.0} ns {}", c.per_packet_ns(), c.case))
        .collect();
    g.push(if tc.is_empty() {
        Goal::not_measured("tc ingress cost per packet reported")
    } else {
        Goal {
            what: "tc ingress cost per packet reported".into(),
            measured: tc.join("; "),
            met: Met::Reported,
        }
    });
    let np = |m: Mode| r.nodeport.iter().find(|c| c.mode == m);
    let what =
        "two-node lab: NodePort request rate against kube-proxy-style iptables NodePort rules";
    g.push(match (np(Mode::SvcLb), np(Mode::Iptables)) {
        (Some(a), Some(i)) => Goal {
            what: what.into(),
            measured: format!(
                "{} iptables ({} against {} req/s)",
                rate_ratio(&a.samples, &i.samples),
                stats::summarize(&a.samples).map_or("—".into(), |s| int(s.mean)),
                stats::summarize(&i.samples).map_or("—".into(), |s| int(s.mean)),
            ),
            met: Met::Reported,
        },
        _ => Goal::not_measured(what),
    });
    g.push(match super::pod::goal(r) {
        Some(measured) => Goal {
            what: super::pod::GOAL.into(),
            measured,
            met: Met::Reported,
        },
        None => Goal::not_measured(super::pod::GOAL),
    });
    // An earlier goal of the project, kept for comparison with earlier reports.
    let vs_ipt = (|| {
        let n = 10_000;
        let a = &r.rate(Metric::TcpVip, n, Mode::SvcLb)?.samples;
        let i = &r.rate(Metric::TcpVip, n, Mode::Iptables)?.samples;
        let x = stats::summarize(a)?.mean / stats::summarize(i)?.mean;
        Some((format!("{} iptables", rate_ratio(a, i)), x >= 3.0))
    })();
    g.push(Goal::new(
        "(earlier goal) VIP connection rate ≥ 3× iptables at 10 000 Services",
        vs_ipt,
    ));
    g
}

/// How many goals were missed (for the closing line of the run).
pub fn missed_goals(r: &Results) -> Vec<String> {
    goals(r)
        .into_iter()
        .filter(|g| matches!(g.met, Met::No))
        .map(|g| format!("{}: {}", g.what, g.measured))
        .collect()
}

fn method(out: &mut String, r: &Results) {
    let s = &r.meta.settings;
    let _ = writeln!(
        out,
        "## What was measured, and how\n\n\
         - **Topology.** Three backend network namespaces, each running one server process (4 accept threads, \
         2 UDP threads) that answers every request with its one-byte id. Every mode has a client namespace of \
         its own with no default route, linked to the same three backends by its own veth pairs: direct and \
         svc-lb share one, iptables and nftables have one each, so that one mode's rules and conntrack never \
         tax another mode's packets. Clients of svc-lb run in the cgroup its programs are attached to; all other \
         clients run in a sibling cgroup with nothing attached. Traffic never leaves these namespaces. \
         NAT happens after the routing decision of connect(), so the iptables and nftables namespaces \
         route the Service range into a veth pair whose two ends are both in the namespace (on a node the \
         default route plays this part); whatever is not translated is dropped there. The backends keep no \
         TIME_WAIT (`tcp_max_tw_buckets` = 0): the load reuses each 4-tuple within seconds, and the \
         timestamps of a NATed SYN would otherwise make a backend drop it as old (PAWS), an artifact of the \
         bench rather than a cost of a mode.\n\
         - **Services.** N Services with 3 ready endpoints each (N ∈ {scales}), plus one hot Service with \
         {HOT_ENDPOINTS} endpoints and {CHURN_SERVICES} churn Services (3 endpoints each, a manifest file each, \
         changed only by the churn measurement).{wide} Only the *measured* Service (TCP 80 → 8080, UDP 53 → 8053, sitting in the \
         middle of the Service order, where an average Service sits in iptables' linear KUBE-SERVICES chain) and \
         the hot one have live endpoints; the other endpoints are distinct unroutable pod addresses. svc-lb reads \
         them as JSON `kind: List` manifests, {SERVICES_PER_FILE} Services per file, the measured Service in a \
         file of its own.\n\
         - **Modes.** *direct*: the client dials the backend addresses itself (round robin over the measured \
         Service's 3, or the hot Service's {HOT_ENDPOINTS}); this is the limit. *svc-lb*: socket-level \
         translation of the VIP by its cgroup programs. *iptables*: kube-proxy's iptables layout in the nat \
         table (KUBE-SERVICES with one rule per Service port and the KUBE-NODEPORTS rule last, a KUBE-SVC chain \
         per Service port with `statistic --mode random` rules, a KUBE-SEP chain per endpoint with the DNAT), \
         loaded with `iptables-restore` and hooked into OUTPUT as kube-proxy does for host clients. *nftables*: \
         kube-proxy's nftables layout (a `service-ips` verdict map keyed on address . protocol . port, a chain \
         per Service port dispatching with `numgen random mod n vmap` to endpoint chains that DNAT), loaded with \
         `nft -f`. Both baselines leave out the filter-table rules, which only matter for Services without \
         endpoints. In their namespaces conntrack's TIME_WAIT and UDP timeouts are lowered to 10 s so that the \
         global conntrack table cannot fill during the run; that does not change the work per new connection.\n\
         - **Priority.** The bench and everything it starts run at nice {nice} (and its session's scheduler \
         autogroup too, restored afterwards), so that other work on the machine disturbs them less; that \
         applies to every mode alike.\n\
         - **Rates.** A load-generator process joins the mode's cgroup and namespace, then runs {threads} threads \
         for {dur} ms after a {warm} ms warm-up; only attempts that finish inside the window count. TCP: connect, \
         send 1 byte, read the 1-byte reply and the server's FIN, close (the server closes first, so the client \
         keeps no TIME_WAIT). UDP: a new socket per request, sendto, recvfrom, close. {reps} repetitions; every \
         repetition runs every loaded mode once and the order of the modes rotates, so drift in the machine's \
         load hits every mode alike. The tables give mean ± sample standard deviation over the repetitions and \
         the ratio of means. The single-threaded TCP row runs the same with one client thread: one \
         connection per request, one at a time.\n\
         - **Full sync.** Into an empty datapath each time (svc-lb: a fresh agent on empty maps). A load is \
         bounded at {lt} s; one that does not finish is recorded as such with the time spent, and the mode has \
         no other numbers at that N. A load is repeated (up to 3 times) only while one takes under {rb} s. \
         A load predicted (from the two scale points before it) to take over 4× the bound is not started, \
         because nft runs its whole transaction in one system call that cannot be interrupted. An svc-lb \
         sync that leaves Services out (its `sync applied` line reports rejected objects, or fewer backends than \
         the Services have) counts as a failed load.\n\
         - **Propagation.** {ps} removals per mode and N ({psl} at 100 000 and more); see the table for how each is \
         timed. p50/p99 are nearest-rank percentiles, so with few samples p99 is the worst sample. svc-lb is \
         measured again under a churn of {churn} endpoint changes per second to other Services.\n\
         - **BPF cost, memory and the external path**: see their tables ({ext} test runs per established-flow \
         case of the external path).\n",
        scales = s
            .scales
            .iter()
            .map(|n| n_label(*n))
            .collect::<Vec<_>>()
            .join(", "),
        threads = s.threads,
        dur = s.duration_ms,
        warm = s.warmup_ms,
        reps = s.reps,
        lt = s.load_timeout_s,
        rb = s.repeat_load_below_s,
        ps = s.prop_samples,
        psl = s.prop_samples_large,
        nice = super::NICE,
        churn = s.churn_hz,
        ext = int(s.ext_runs as f64),
        wide = if s.wide.is_empty() {
            String::new()
        } else {
            format!(
                " Wide points, svc-lb alone (full sync, memory, propagation): {} (N × endpoints per \
                 Service; the measured Service keeps its 3).",
                s.wide
                    .iter()
                    .map(|(n, e)| pt_label(*n, *e))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    );
}

/// "24684096 kB" → "23.5 GiB".
fn gib(meminfo: &str) -> String {
    meminfo
        .split_whitespace()
        .next()
        .and_then(|k| k.parse::<f64>().ok())
        .map_or_else(
            || meminfo.to_owned(),
            |k| format!("{:.1} GiB", k / 1024.0 / 1024.0),
        )
}

/// The plots' paths relative to the report.
pub struct Plots<'a> {
    /// TCP connection rate (through the VIP and to a non-Service address).
    pub conn_rate: &'a str,
    /// Every metric against N.
    pub metrics: &'a str,
}

/// The whole report. `notes` is appended as the closing notes.
pub fn render(r: &Results, plots: Option<Plots<'_>>, notes: Option<&str>) -> String {
    let m = &r.meta;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# svc-lb benchmarks\n\n\
         <!-- Generated by svclb-bench (tests/src/bench); the closing notes come from bench/NOTES.md. -->\n\n\
         - **Run:** {date}, `{cmd}` (profile `{profile}`{only}), {mins:.1} min.\n\
         - **Machine:** {nproc} CPUs ({cpu}), Linux {kernel}, {mem} RAM; load average {la0} at the start, {la1} at the \
         end (1, 5, 15 min). The machine is shared: the load average shows how much other work ran.\n\
         - **Tools:** {ipt}; {nft}.\n\n\
         **Read the ratios, not the absolute numbers.** All modes ran side by side on the same machine, on the same \
         backends and load generator, with their repetitions interleaved, so the ratios between them hold on a noisy \
         machine. The absolute numbers hold only for this machine at this moment: everything (clients, backends, \
         kernel networking) shares {nproc} CPUs.\n",
        date = m.date,
        cmd = m.command,
        profile = m.settings.profile,
        only = m
            .settings
            .only
            .as_ref()
            .map_or(String::new(), |o| format!(", only `{o}`")),
        mins = m.elapsed_s / 60.0,
        nproc = m.machine.nproc,
        cpu = m.machine.cpu,
        kernel = m.machine.kernel,
        mem = gib(&m.machine.mem_total),
        la0 = m.machine.loadavg_start,
        la1 = m.machine.loadavg_end,
        ipt = m.machine.iptables,
        nft = m.machine.nft,
    );
    let _ = writeln!(
        out,
        "## Goals\n\nThe goals are reported here; they are not test assertions.\n"
    );
    let _ = writeln!(out, "| goal | measured | met |\n|---|---|---|");
    for g in goals(r) {
        let met = match g.met {
            Met::Yes => "yes",
            Met::No => "**no**",
            Met::Reported => "reported",
            Met::NotMeasured => "not measured",
        };
        let _ = writeln!(out, "| {} | {} | {met} |", g.what, g.measured);
    }
    out.push('\n');
    method(&mut out, r);
    let _ = writeln!(out, "## Results\n");
    if let Some(p) = plots {
        let _ = writeln!(
            out,
            "![TCP connection rate against N for every mode]({})\n\n\
             *Connection rate against the number of Services (log scale), mean ± sd. A mode that did not load at \
             some N has no point there.*\n\n\
             ![Every metric against N for every mode]({})\n\n\
             *Every metric against N for every mode that has it ([full size]({})): the five rates, full sync \
             time, propagation p99 (svc-lb also under churn), memory and the socket programs' cost per call; the \
             wide points (more endpoints per Service) are series of their own. The external path is measured once, \
             not against N: see its table.*\n",
            p.conn_rate, p.metrics, p.metrics
        );
    }
    let rates_present = |m: Metric| r.rates.iter().any(|c| c.metric == m);
    for metric in Metric::ALL {
        if rates_present(metric) {
            rate_table(&mut out, r, metric);
        }
    }
    if !r.syncs.is_empty() && r.meta.settings.only.as_deref().is_none_or(|o| o == "sync") {
        sync_table(&mut out, r);
    }
    if !r.props.is_empty() {
        prop_table(&mut out, r);
    }
    if !r.memory.is_empty()
        && r.meta
            .settings
            .only
            .as_deref()
            .is_none_or(|o| o == "memory")
    {
        memory_table(&mut out, r);
    }
    if !r.bpf.is_empty() {
        bpf_table(&mut out, r);
    }
    if !r.ext.is_empty() {
        ext_table(&mut out, r);
    }
    if !r.nodeport.is_empty() {
        nodeport_table(&mut out, r);
    }
    if !r.sched.is_empty() {
        super::sched::table(&mut out, &r.sched);
    }
    if !r.pod.is_empty() || !r.pod_cost.is_empty() {
        super::pod::report(&mut out, r);
    }
    if !r.errors.is_empty() {
        let _ = writeln!(
            out,
            "### Errors during the run\n\nThese measurements failed; the run went on without them.\n"
        );
        for e in &r.errors {
            let _ = writeln!(out, "- {e}");
        }
        out.push('\n');
    }
    if let Some(notes) = notes {
        let _ = writeln!(out, "## Closing notes\n\n{}", notes.trim());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(int(12_345.4), "12\u{202f}345");
        assert_eq!(int(999.0), "999");
        assert_eq!(int(1_000_000.0), "1\u{202f}000\u{202f}000");
        assert_eq!(dur(0.000_25), "250 µs");
        assert_eq!(dur(0.0123), "12.3 ms");
        assert_eq!(dur(2.5), "2.50 s");
        assert_eq!(ratio(3.0, 2.0), "1.50×");
        assert_eq!(ratio(3.0, 0.0), "—");
    }
}
