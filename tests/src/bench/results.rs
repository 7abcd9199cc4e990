//! What a bench run measured, kept raw (every sample) and written as JSON next to the
//! report, so that any table can be recomputed later.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::stats::{self, Summary};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Direct,
    SvcLb,
    Iptables,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::SvcLb, Mode::Iptables, Mode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::SvcLb => "svc-lb",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// The rate measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// TCP connect/1-byte request/1-byte reply/close through the measured Service's VIP.
    TcpVip,
    /// The same to a backend address directly, which is not a Service: what the rules
    /// cost every other new connection.
    TcpNonService,
    /// Through the hot Service (100 endpoints).
    TcpHot,
    /// UDP request/reply through the VIP, a new socket per request.
    UdpVip,
    /// [`Metric::TcpVip`] from a single client thread: one connection per request,
    /// one at a time, so the per-connection cost is not hidden behind parallelism.
    TcpVipSingle,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::TcpVip,
        Metric::TcpVipSingle,
        Metric::TcpNonService,
        Metric::TcpHot,
        Metric::UdpVip,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Metric::TcpVip => "TCP connection rate through the VIP",
            Metric::TcpNonService => "TCP connection rate to a destination that is not a Service",
            Metric::TcpHot => "TCP connection rate through the hot Service (100 endpoints)",
            Metric::UdpVip => "UDP request/response rate through the VIP",
            Metric::TcpVipSingle => {
                "TCP connection rate through the VIP, one client thread (a connection per request)"
            }
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::UdpVip => "req/s",
            _ => "conn/s",
        }
    }

    /// A short name for plot panels.
    pub fn short(self) -> &'static str {
        match self {
            Metric::TcpVip => "TCP conn/s via VIP (4 threads)",
            Metric::TcpVipSingle => "TCP conn/s via VIP (1 thread)",
            Metric::TcpNonService => "TCP conn/s to a non-Service address",
            Metric::TcpHot => "TCP conn/s via the hot Service",
            Metric::UdpVip => "UDP req/s via VIP",
        }
    }
}

/// Endpoints per Service of the standard scale points.
pub const DEFAULT_EPS: usize = 3;

fn default_eps() -> usize {
    DEFAULT_EPS
}

/// How loading a scale point into a mode ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum LoadOutcome {
    Loaded,
    TimedOut {
        after_s: f64,
    },
    Failed {
        after_s: f64,
        error: String,
    },
    /// Not tried: it could not finish within the bound (see the reason).
    NotAttempted {
        reason: String,
    },
}

impl LoadOutcome {
    pub fn is_loaded(&self) -> bool {
        matches!(self, LoadOutcome::Loaded)
    }

    /// [`Self::why_not`] in a few words, for the tables other than the sync table.
    pub fn why_not_short(&self) -> Option<String> {
        match self {
            LoadOutcome::NotAttempted { .. } => {
                Some("not loaded: not attempted (see the full sync table)".into())
            }
            other => other.why_not(),
        }
    }

    /// Why a mode has no numbers at this scale, for the tables.
    pub fn why_not(&self) -> Option<String> {
        match self {
            LoadOutcome::Loaded => None,
            LoadOutcome::TimedOut { after_s } => {
                Some(format!("did not load within {after_s:.0} s"))
            }
            LoadOutcome::Failed { after_s, error } => {
                Some(format!("load failed after {after_s:.1} s: {error}"))
            }
            LoadOutcome::NotAttempted { reason } => Some(format!("not attempted: {reason}")),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RateCell {
    pub metric: Metric,
    pub n: usize,
    pub mode: Mode,
    /// One rate per repetition (successful attempts per second).
    pub samples: Vec<f64>,
    /// Failed attempts over all repetitions.
    pub failed: u64,
    /// Failure kind → count.
    pub failures: BTreeMap<String, u64>,
    /// Which backend answered, over all repetitions.
    pub replies: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncCell {
    pub n: usize,
    /// Endpoints per Service.
    #[serde(default = "default_eps")]
    pub eps: usize,
    pub mode: Mode,
    /// Full sync times, seconds (svc-lb: from "source started", or "maps open" for an
    /// agent without that line, to the first "sync applied").
    pub samples_s: Vec<f64>,
    /// svc-lb: agent process start to the first "sync applied", seconds.
    pub start_to_sync_s: Vec<f64>,
    /// svc-lb: the sync's own `duration_us` (model + plan + map writes).
    pub agent_sync_us: Vec<u64>,
    pub outcome: LoadOutcome,
    /// svc-lb: what its last first sync programmed.
    #[serde(default)]
    pub programmed: Option<Programmed>,
}

/// The counts of an agent's `sync applied` line.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Programmed {
    pub frontends: u64,
    pub backends: u64,
    pub rejected: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PropCell {
    pub n: usize,
    #[serde(default = "default_eps")]
    pub eps: usize,
    /// Other Services' endpoint changes per second made while this was measured
    /// (achieved rate; 0: a quiet agent).
    #[serde(default)]
    pub churn_hz: f64,
    pub mode: Mode,
    /// Removal latencies, milliseconds.
    pub samples_ms: Vec<f64>,
    /// Removals not visible within the deadline.
    pub timeouts: usize,
    /// Connections answered by the removed backend in a probe right after a removal
    /// (must be 0).
    pub removed_hits: Option<u64>,
    /// Probe connections made for that check.
    pub probe_ok: Option<u64>,
    /// svc-lb: `duration_us` of the sync that applied each removal.
    pub agent_sync_us: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemCell {
    pub n: usize,
    #[serde(default = "default_eps")]
    pub eps: usize,
    /// VmRSS right after each full sync, KiB.
    pub rss_kib: Vec<u64>,
    /// VmHWM (peak RSS) at the same moments, KiB.
    pub hwm_kib: Vec<u64>,
    /// Kernel memory of the BPF maps the agent holds open (sum of `memlock` over its map
    /// descriptors in /proc/PID/fdinfo, each map counted once), KiB.
    #[serde(default)]
    pub map_kib: Vec<u64>,
    /// How many distinct maps that sum covers.
    #[serde(default)]
    pub maps: usize,
}

/// One external-path program on one kind of packet, through BPF_PROG_TEST_RUN.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExtCell {
    /// `svclb_xdp` or `svclb_tc_in`.
    pub program: String,
    /// What the packets were, e.g. "NodePort, remote endpoint, new flow (SYN)".
    pub case: String,
    /// The program's verdict on the checked first packet, by name.
    pub verdict: String,
    /// Where the checked first packet was sent after the program (`addr:port`).
    pub rewritten_to: String,
    /// Test runs (one packet each).
    pub runs: u64,
    /// The kernel's mean duration per run, ns (includes its timer reads).
    pub mean_ns: f64,
    /// The same for a trivial program of the same type (returns at once), ns: the
    /// timer's own share, subtracted in [`ExtCell::per_packet_ns`].
    pub baseline_ns: f64,
    /// Verdict counts over all runs (a run that took another path shows here).
    pub verdicts: BTreeMap<String, u64>,
}

impl ExtCell {
    pub fn per_packet_ns(&self) -> f64 {
        (self.mean_ns - self.baseline_ns).max(0.0)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BpfCell {
    pub n: usize,
    /// The traffic of the window: "tcp-vip", "tcp-non-service" or "udp-vip".
    pub window: String,
    pub program: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

impl BpfCell {
    pub fn ns_per_call(&self) -> Option<f64> {
        (self.run_cnt > 0).then(|| self.run_time_ns as f64 / self.run_cnt as f64)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub mem_total: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub iptables: String,
    pub nft: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Settings {
    pub profile: String,
    pub scales: Vec<usize>,
    pub reps: usize,
    pub duration_ms: u64,
    pub warmup_ms: u64,
    pub threads: usize,
    pub load_timeout_s: u64,
    pub repeat_load_below_s: u64,
    pub prop_samples: usize,
    pub prop_samples_large: usize,
    pub bpf_window_ms: u64,
    pub only: Option<String>,
    /// Churn rate aimed at during the churn propagation measurement, changes/s.
    #[serde(default)]
    pub churn_hz: u32,
    /// Extra (N, endpoints per Service) points for svc-lb alone.
    #[serde(default)]
    pub wide: Vec<(usize, usize)>,
    /// Test runs per external-path case.
    #[serde(default)]
    pub ext_runs: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub settings: Settings,
    pub elapsed_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub loads: Vec<(usize, Mode, LoadOutcome)>,
    pub rates: Vec<RateCell>,
    pub syncs: Vec<SyncCell>,
    pub props: Vec<PropCell>,
    pub memory: Vec<MemCell>,
    pub bpf: Vec<BpfCell>,
    /// External path (tc/XDP) per-packet cost.
    #[serde(default)]
    pub ext: Vec<ExtCell>,
    /// The two-node lab's NodePort request rate (svc-lb and iptables; `n` is 1).
    #[serde(default)]
    pub nodeport: Vec<RateCell>,
    /// The TCP connection rate per socket scheduler, and direct (see
    /// [`super::sched`]).
    #[serde(default)]
    pub sched: Vec<super::sched::SchedCell>,
    /// Pod clients' rates by path ([`super::pod`]).
    #[serde(default)]
    pub pod: Vec<super::pod::PodCell>,
    /// The pod ingress program's cost per packet (BPF_PROG_TEST_RUN).
    #[serde(default)]
    pub pod_cost: Vec<ExtCell>,
    /// Measurements that failed (the run went on without them).
    #[serde(default)]
    pub errors: Vec<String>,
}

impl Results {
    pub fn load(&self, n: usize, mode: Mode) -> Option<&LoadOutcome> {
        self.loads
            .iter()
            .find(|(nn, m, _)| *nn == n && *m == mode)
            .map(|(_, _, o)| o)
    }

    pub fn rate(&self, metric: Metric, n: usize, mode: Mode) -> Option<&RateCell> {
        // Direct has no rules, so its "non-Service" destination is the same measurement
        // as its VIP row (the backends' own addresses).
        let metric = if mode == Mode::Direct && metric == Metric::TcpNonService {
            Metric::TcpVip
        } else {
            metric
        };
        self.rates
            .iter()
            .find(|c| c.metric == metric && c.n == n && c.mode == mode)
    }

    pub fn rate_mut(&mut self, metric: Metric, n: usize, mode: Mode) -> &mut RateCell {
        if let Some(i) = self
            .rates
            .iter()
            .position(|c| c.metric == metric && c.n == n && c.mode == mode)
        {
            return &mut self.rates[i];
        }
        self.rates.push(RateCell {
            metric,
            n,
            mode,
            samples: Vec::new(),
            failed: 0,
            failures: BTreeMap::new(),
            replies: BTreeMap::new(),
        });
        let last = self.rates.len() - 1;
        &mut self.rates[last]
    }

    pub fn rate_summary(&self, metric: Metric, n: usize, mode: Mode) -> Option<Summary> {
        self.rate(metric, n, mode)
            .and_then(|c| stats::summarize(&c.samples))
    }

    pub fn sync(&self, n: usize, mode: Mode) -> Option<&SyncCell> {
        self.sync_eps(n, DEFAULT_EPS, mode)
    }

    pub fn sync_eps(&self, n: usize, eps: usize, mode: Mode) -> Option<&SyncCell> {
        self.syncs
            .iter()
            .find(|c| c.n == n && c.eps == eps && c.mode == mode)
    }

    /// Propagation on a quiet agent at a standard scale point.
    pub fn prop(&self, n: usize, mode: Mode) -> Option<&PropCell> {
        self.prop_at(n, DEFAULT_EPS, mode, false)
    }

    /// Propagation at (N, endpoints per Service), quiet or under churn.
    pub fn prop_at(&self, n: usize, eps: usize, mode: Mode, churn: bool) -> Option<&PropCell> {
        self.props
            .iter()
            .find(|c| c.n == n && c.eps == eps && c.mode == mode && (c.churn_hz > 0.0) == churn)
    }

    pub fn memory_at(&self, n: usize, eps: usize) -> Option<&MemCell> {
        self.memory.iter().find(|m| m.n == n && m.eps == eps)
    }

    /// Every (N, endpoints per Service) point of the run: the standard ones, then the
    /// wide ones.
    pub fn points(&self) -> Vec<(usize, usize)> {
        let mut v: Vec<(usize, usize)> = self
            .scales()
            .into_iter()
            .map(|n| (n, DEFAULT_EPS))
            .collect();
        v.extend(self.meta.settings.wide.iter().copied());
        v
    }

    pub fn scales(&self) -> Vec<usize> {
        self.meta.settings.scales.clone()
    }
}
