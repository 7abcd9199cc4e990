//! `svclb-bench`: svc-lb against the direct path and kube-proxy-style iptables and
//! nftables rules, side by side on one machine in one run.
//!
//! Ratios are the point: every mode runs on the same backends, the same load generator
//! and the same kind of client namespace, with the repetitions of all modes interleaved,
//! so that a noisy machine slows them all alike. Absolute numbers hold only for the
//! machine and the moment they were taken.
//!
//! Layout:
//! - [`workload`]: the Services of a scale point and their three encodings (manifests,
//!   iptables-restore input, nft input), with the endpoint change used for propagation;
//! - [`net`]: namespaces, cgroups, pins, servers, agent and rules, as guards;
//! - [`server`], [`load`]: the backend and load-generator child processes;
//! - [`nscmd`]: timed, bounded iptables-restore/nft runs inside a client namespace;
//! - [`bpf`]: reading svc-lb's pinned maps and the kernel's BPF run-time statistics;
//! - [`ext`]: the external path's per-packet cost (tc/XDP through BPF_PROG_TEST_RUN);
//! - [`nodeport`]: the two-node lab's NodePort request rate, svc-lb against iptables;
//! - [`sched`]: the TCP connection rate through a VIP per socket scheduler;
//! - [`pod`]: pod clients: the per-packet path against the socket path, iptables and
//!   direct;
//! - [`run`]: the measurement sequence; [`report`] and [`plot`]: Markdown and SVG.
pub mod bpf;
pub mod clock;
pub mod ext;
pub mod load;
pub mod net;
pub mod nodeport;
pub mod nscmd;
pub mod plot;
pub mod pod;
pub mod progress;
pub mod report;
pub mod results;
pub mod run;
pub mod sched;
pub mod server;
pub mod signal;
pub mod stats;
pub mod workload;

use std::path::PathBuf;

/// The bench's nice value (and so its children's).
pub const NICE: i32 = -10;

/// Raises the bench's CPU priority for its lifetime. With the scheduler's autogroups
/// (on by default) a process's nice value only counts inside its session, and each
/// session competes as one: so both are raised, this process's nice value (inherited by
/// every child) and its session's autogroup nice value, which is restored on drop.
pub struct Priority {
    autogroup_old: Option<i32>,
}

const AUTOGROUP: &str = "/proc/self/autogroup";

impl Priority {
    pub fn raise() -> Self {
        // SAFETY: setpriority has no memory-safety preconditions.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, NICE) } != 0 {
            eprintln!(
                "svclb-bench: could not set nice {NICE}: {}",
                std::io::Error::last_os_error()
            );
        }
        // "/autogroup-22 nice 0"
        let autogroup_old = std::fs::read_to_string(AUTOGROUP)
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse::<i32>().ok());
        let autogroup_old = autogroup_old.filter(|_| {
            std::fs::write(AUTOGROUP, NICE.to_string())
                .inspect_err(|e| eprintln!("svclb-bench: could not set the autogroup nice: {e}"))
                .is_ok()
        });
        Self { autogroup_old }
    }
}

impl Drop for Priority {
    fn drop(&mut self) {
        if let Some(old) = self.autogroup_old
            && let Err(e) = std::fs::write(AUTOGROUP, old.to_string())
        {
            eprintln!("svclb-bench: teardown: restore the autogroup nice: {e}");
        }
    }
}

/// One measurement, selectable with `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// TCP connection rate: through the VIP, to a non-Service address, through the hot Service.
    Tcp,
    /// UDP request/response rate through the VIP.
    Udp,
    /// Full sync time of N Services.
    Sync,
    /// Propagation latency of one endpoint removal.
    Propagation,
    /// The agent's resident memory after its full sync.
    Memory,
    /// Per-call cost of svc-lb's BPF programs.
    Bpf,
    /// The external path (two-node lab): XDP and tc cost per packet, and the NodePort
    /// request rate against iptables.
    Ext,
    /// TCP connection rate through the VIP per socket scheduler (random, rr, wrr) and
    /// direct, at one scale point (10 000 Services in the full run).
    Sched,
    /// Pod clients: the per-packet path (`--socket-lb-scope host`) against the socket
    /// path, iptables and direct (TCP and UDP rates), and the pod program's cost per packet.
    Pod,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Tcp => "tcp",
            Scenario::Udp => "udp",
            Scenario::Sync => "sync",
            Scenario::Propagation => "propagation",
            Scenario::Memory => "memory",
            Scenario::Bpf => "bpf",
            Scenario::Ext => "ext",
            Scenario::Sched => "sched",
            Scenario::Pod => "pod",
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Short run: N ∈ {1, 1000}, shorter windows, fewer propagation samples (about 3 min).
    #[arg(long, conflicts_with = "smoke")]
    pub quick: bool,
    /// A few seconds at N = 1, checking that every mode works; writes no report into the
    /// repository. `cargo xtask test` runs this so the harness cannot rot unnoticed.
    #[arg(long)]
    pub smoke: bool,
    /// Run one scenario only.
    #[arg(long, value_enum)]
    pub only: Option<Scenario>,
    /// Override the scale points (comma-separated Service counts).
    #[arg(long, value_delimiter = ',')]
    pub scales: Option<Vec<usize>>,
    /// Override the repetitions of each rate point.
    #[arg(long)]
    pub reps: Option<usize>,
    /// Override the measured window of each rate point, milliseconds.
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Override the wide points, svc-lb alone: comma-separated `NxE` (N Services with E
    /// endpoints each), e.g. `1000x10`; `0x0` for none.
    #[arg(long, value_delimiter = ',', value_parser = parse_wide)]
    pub wide: Option<Vec<(usize, usize)>>,
    /// An extra flag for every agent the bench starts, e.g. `--agent-arg=--flag=value`
    /// (repeatable; one argument each).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// An extra flag for the agents of the wide points only (after `--agent-arg`), e.g.
    /// larger maps for 100000x10 (repeatable; one argument each).
    #[arg(long = "wide-agent-arg", allow_hyphen_values = true)]
    pub wide_agent_args: Vec<String>,
    /// Override the bound on loading one scale point into one mode, seconds.
    #[arg(long)]
    pub load_timeout_s: Option<u64>,
    /// The agent binary [default: $SVC_LB_BIN, else <workspace>/target/release/svc-lb].
    #[arg(long)]
    pub svc_lb: Option<PathBuf>,
    /// Where reports go [default: <workspace>/bench/results].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// The summary of the latest full run [default: <workspace>/docs/benchmarks.md];
    /// written only by a full run without --only.
    #[arg(long)]
    pub docs: Option<PathBuf>,
    /// The command line to print in the report (xtask passes its own).
    #[arg(long)]
    pub command: Option<String>,
}

fn parse_wide(s: &str) -> Result<(usize, usize), String> {
    let (n, e) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?}: expected NxE, e.g. 100000x10"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|e| format!("{s:?}: {v:?} is not a count: {e}"))
    };
    Ok((num(n)?, num(e)?))
}

/// `<workspace>`: the parent of this crate's directory.
pub fn workspace() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf()
}
