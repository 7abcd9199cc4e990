//! Kernel feature probe, run once at agent start (and by `svc-lb status` when no agent
//! answers). It loads tiny test programs, tries attach types, helpers and map types,
//! and [`TABLE`] is the one place that says which code path needs each feature and what
//! is off or degraded without it. [`Probe::choices`] turns the results into the
//! fallbacks the agent uses; `--force-feature-off` marks features missing on purpose so
//! that one kernel can test every fallback.
//!
//! The README's "Kernel support" section has the same table with the kernel versions.
use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Result, bail};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};
use serde::{Deserialize, Serialize};

use super::sys::bpf;

/// A kernel feature the programs or the agent rely on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    SockAddrHooks,
    CgroupLink,
    NetnsCookie,
    Ringbuf,
    SetRetval,
    LruLpmMaps,
    Tcx,
    FibRedirect,
    CsumIpv6Flag,
    XdpLink,
    SkStorageRnat,
    MapBatch,
    AtomicFetch,
    SockOpsConn,
    CoarseClock,
    BpfLoop,
}

/// What one feature is for. `fallback` is true when the agent has a way around a
/// missing feature, which `--force-feature-off` can then force.
pub struct FeatureInfo {
    pub feature: Feature,
    /// The name in logs, `status` and `--force-feature-off`.
    pub name: &'static str,
    pub what: &'static str,
    /// First mainline kernel with it.
    pub since: &'static str,
    /// The code path that needs it.
    pub used_by: &'static str,
    /// What is off or degraded without it.
    pub without: &'static str,
    pub fallback: bool,
}

/// Every probed feature, in the order `status` lists them.
pub const TABLE: &[FeatureInfo] = &[
    FeatureInfo {
        feature: Feature::SockAddrHooks,
        name: "sock_addr_hooks",
        what: "cgroup sock_addr connect/sendmsg (4.17/4.18), recvmsg (5.2) and getpeername (5.8) hooks",
        since: "5.8",
        used_by: "socket path (ClusterIP and every Service address dialled on this node)",
        without: "the agent cannot run: the socket path is its core",
        fallback: false,
    },
    FeatureInfo {
        feature: Feature::CgroupLink,
        name: "cgroup_link",
        what: "bpf_link for cgroup programs and BPF_LINK_UPDATE",
        since: "5.7",
        used_by: "socket path: pinned links that outlive the agent and are swapped in place on restart",
        without: "the agent cannot run",
        fallback: false,
    },
    FeatureInfo {
        feature: Feature::NetnsCookie,
        name: "netns_cookie",
        what: "bpf_get_netns_cookie in sock_addr programs",
        since: "5.7",
        used_by: "socket path: per-pod session affinity keys",
        without: "the agent cannot run",
        fallback: false,
    },
    FeatureInfo {
        feature: Feature::Ringbuf,
        name: "ringbuf",
        what: "BPF ring buffer map",
        since: "5.8",
        used_by: "the eBPF debug log (--bpf-log); the map is created on every load",
        without: "the object cannot load: the agent cannot run",
        fallback: false,
    },
    FeatureInfo {
        feature: Feature::SetRetval,
        name: "set_retval",
        what: "bpf_set_retval in sock_addr programs",
        since: "5.18",
        used_by: "socket path: a Service without endpoints refuses with ECONNREFUSED",
        without: "a Service without endpoints refuses with EPERM instead of ECONNREFUSED",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::LruLpmMaps,
        name: "lru_lpm_maps",
        what: "LRU hash and LPM trie maps",
        since: "4.11",
        used_by: "conntrack, affinity and loadBalancerSourceRanges maps",
        without: "the object cannot load: the agent cannot run",
        fallback: false,
    },
    FeatureInfo {
        feature: Feature::Tcx,
        name: "tcx",
        what: "TCX links for tc programs",
        since: "6.6",
        used_by: "external path: tc programs on the devices",
        without: "tc programs attach through netlink (clsact qdisc, direct-action cls_bpf filter); the restart swap replaces the filter in place",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::FibRedirect,
        name: "fib_redirect",
        what: "bpf_redirect_neigh (5.10) and bpf_check_mtu (5.12) in tc programs",
        since: "5.12",
        used_by: "external path: SNAT flows leave through bpf_fib_lookup + bpf_redirect_neigh",
        without: "SNAT flows go through the kernel's forwarding (needs accept_local=1, which the agent sets; iptables FORWARD rules apply)",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::CsumIpv6Flag,
        name: "csum_ipv6_flag",
        what: "BPF_F_IPV6 flag of bpf_l4_csum_replace",
        since: "6.16",
        used_by: "external path: IPv6 address rewrites on CHECKSUM_COMPLETE packets",
        without: "the flag is left out and the skb checksum is corrected with bpf_csum_update (same result, one more helper call)",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::XdpLink,
        name: "xdp_link",
        what: "bpf_link for XDP programs",
        since: "5.9",
        used_by: "external path with --xdp",
        without: "--xdp is ignored: the devices run tc only",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::SkStorageRnat,
        name: "sk_storage_rnat",
        what: "socket-local storage (BPF_MAP_TYPE_SK_STORAGE) from sock_addr programs",
        since: "5.3",
        used_by: "socket path: each socket keeps its own reverse NAT (replies and getpeername show the Service address)",
        without: "reverse NAT lives in LRU maps shared by all sockets of the node: heavy socket churn in one pod can evict another pod's entry (its replies then show the backend address)",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::MapBatch,
        name: "map_batch",
        what: "BPF_MAP_UPDATE_BATCH on hash maps",
        since: "5.6",
        used_by: "map writes: a sync writes each run of entries into one map with one syscall",
        without: "one syscall per map entry (a full sync of many Services takes longer)",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::AtomicFetch,
        name: "atomic_fetch",
        what: "BPF atomics with BPF_FETCH (atomic_fetch_add)",
        since: "5.12",
        used_by: "socket path: the rr/wrr cursor of a frontend is one atomic fetch-add",
        without: "the rr/wrr cursor is a plain read and write: connects racing on two CPUs may take the same turn",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::SockOpsConn,
        name: "sock_ops_conn",
        what: "cgroup sock_ops program reaching socket-local storage (bpf_sk_storage_get, ctx->sk)",
        since: "5.10",
        used_by: "active connection counts (list ActiveConn/InActConn, svclb_backend_active_connections) and the lc/wlc schedulers",
        without: "no active connection counts (shown as unavailable); Services asking for lc/wlc get the default scheduler, reported against each Service",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::CoarseClock,
        name: "coarse_clock",
        what: "bpf_ktime_get_coarse_ns in XDP and tc programs",
        since: "5.11",
        used_by: "external path: conntrack lifetimes and session affinity read the clock of the last timer tick (a load instead of a clock-source read on every packet)",
        without: "the precise clock (bpf_ktime_get_ns): the same lifetimes, about 30 ns more per packet",
        fallback: true,
    },
    FeatureInfo {
        feature: Feature::BpfLoop,
        name: "bpf_loop",
        what: "bpf_loop in sock_addr programs",
        since: "5.17",
        used_by: "lc/wlc: svclb_lcloop4/6 compare every slot of a frontend (up to 4096)",
        without: "lc/wlc use svclb_lc4/6 instead: exact up to 64 slots, the lighter of two random slots above",
        fallback: true,
    },
];

pub fn info(f: Feature) -> &'static FeatureInfo {
    // TABLE lists every variant; the unit test `table_lists_every_feature` checks it.
    TABLE.iter().find(|i| i.feature == f).unwrap_or(&TABLE[0])
}

/// A probe's answer for one feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum State {
    Found,
    Missing,
    /// Found but turned off with `--force-feature-off`.
    ForcedOff,
    /// The probe itself failed (for example no privilege); the reason.
    Unknown(String),
}

impl State {
    /// Whether code may rely on the feature. An unknown answer counts as missing, so
    /// that a fallback (which works everywhere) is chosen.
    pub fn usable(&self) -> bool {
        matches!(self, State::Found)
    }
}

/// Answers the probe questions; the kernel, or a table in tests.
pub trait Prober {
    fn kernel_release(&self) -> String;
    /// `Ok(true)` when the feature is there.
    fn has(&self, f: Feature) -> Result<bool>;
}

/// The probe's results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kernel: String,
    pub states: BTreeMap<Feature, State>,
}

/// How the tc programs attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcAttach {
    Tcx,
    Netlink,
}

/// What the agent does on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choices {
    /// `Err`: why the agent cannot run at all.
    pub socket_path: std::result::Result<(), String>,
    pub tc_attach: TcAttach,
    pub set_retval: bool,
    pub csum_ipv6_flag: bool,
    pub fib_redirect: bool,
    pub xdp_link: bool,
    pub sk_storage_rnat: bool,
    pub map_batch: bool,
    pub atomic_fetch: bool,
    /// Active connection counts (the sock_ops program). They read the translations in
    /// the sockets' own storage, so they also need `sk_storage_rnat`.
    pub conn_counts: bool,
    /// The external path reads the coarse clock (`bpf_ktime_get_coarse_ns`).
    pub coarse_clock: bool,
    /// Load the `lc`/`wlc` programs (`svclb_lc4`/`6`, tail-called by the connect
    /// hooks): only with connection counts, without which no frontend is `lc`/`wlc`.
    pub lc_loop: bool,
    /// The `lc`/`wlc` programs are the `bpf_loop` ones (`svclb_lcloop4`/`6`, every
    /// slot) rather than `svclb_lc4`/`6` (up to `LC_SCAN_MAX` slots).
    pub lc_bpf_loop: bool,
}

/// `--force-feature-off`: names from [`TABLE`] (only those with a fallback), or `all`.
pub fn parse_forced(s: &str) -> std::result::Result<Vec<Feature>, String> {
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name == "all" {
            out.extend(TABLE.iter().filter(|i| i.fallback).map(|i| i.feature));
            continue;
        }
        let Some(i) = TABLE.iter().find(|i| i.name == name) else {
            let known: Vec<&str> = TABLE
                .iter()
                .filter(|i| i.fallback)
                .map(|i| i.name)
                .collect();
            return Err(format!(
                "unknown feature {name:?} (known: all, {})",
                known.join(", ")
            ));
        };
        if !i.fallback {
            return Err(format!(
                "feature {name} has no fallback, so it cannot be forced off"
            ));
        }
        out.push(i.feature);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

impl Probe {
    pub fn run(prober: &dyn Prober, forced_off: &[Feature]) -> Self {
        let states = TABLE
            .iter()
            .map(|i| {
                let state = match prober.has(i.feature) {
                    Ok(true) if forced_off.contains(&i.feature) => State::ForcedOff,
                    Ok(true) => State::Found,
                    Ok(false) => State::Missing,
                    Err(e) => State::Unknown(format!("{e:#}")),
                };
                (i.feature, state)
            })
            .collect();
        Probe {
            kernel: prober.kernel_release(),
            states,
        }
    }

    pub fn state(&self, f: Feature) -> &State {
        static MISSING: State = State::Missing;
        self.states.get(&f).unwrap_or(&MISSING)
    }

    pub fn choices(&self) -> Choices {
        // A required feature that is plainly missing stops the agent with its reason; an
        // unknown answer lets the load try (and fail with the kernel's own words).
        let missing: Vec<String> = TABLE
            .iter()
            .filter(|i| !i.fallback && *self.state(i.feature) == State::Missing)
            .map(|i| format!("{} ({}, Linux ≥ {})", i.name, i.what, i.since))
            .collect();
        Choices {
            socket_path: if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "kernel {} lacks what the socket path needs: {}; svc-lb needs Linux ≥ 5.8 (5.10 LTS or newer recommended)",
                    self.kernel,
                    missing.join("; ")
                ))
            },
            tc_attach: if self.state(Feature::Tcx).usable() {
                TcAttach::Tcx
            } else {
                TcAttach::Netlink
            },
            set_retval: self.state(Feature::SetRetval).usable(),
            csum_ipv6_flag: self.state(Feature::CsumIpv6Flag).usable(),
            fib_redirect: self.state(Feature::FibRedirect).usable(),
            xdp_link: self.state(Feature::XdpLink).usable(),
            sk_storage_rnat: self.state(Feature::SkStorageRnat).usable(),
            map_batch: self.state(Feature::MapBatch).usable(),
            atomic_fetch: self.state(Feature::AtomicFetch).usable(),
            conn_counts: self.state(Feature::SockOpsConn).usable()
                && self.state(Feature::SkStorageRnat).usable(),
            coarse_clock: self.state(Feature::CoarseClock).usable(),
            lc_loop: self.state(Feature::SockOpsConn).usable()
                && self.state(Feature::SkStorageRnat).usable(),
            lc_bpf_loop: self.state(Feature::BpfLoop).usable(),
        }
    }

    /// One row per feature for `/status` and `svc-lb status`.
    pub fn report(&self) -> Vec<FeatureStatus> {
        TABLE
            .iter()
            .map(|i| {
                let state = self.state(i.feature).clone();
                FeatureStatus {
                    name: i.name.to_owned(),
                    since: i.since.to_owned(),
                    used_by: i.used_by.to_owned(),
                    consequence: if state.usable() {
                        String::new()
                    } else {
                        i.without.to_owned()
                    },
                    state,
                }
            })
            .collect()
    }

    /// Logs the kernel and every feature (one line each), at start.
    pub fn log(&self) {
        tracing::info!(kernel = %self.kernel, "kernel feature probe");
        for f in self.report() {
            match &f.state {
                State::Found => {
                    tracing::info!(feature = %f.name, since = %f.since, "kernel feature found")
                }
                State::Missing | State::ForcedOff | State::Unknown(_) => tracing::warn!(
                    feature = %f.name,
                    state = ?f.state,
                    since = %f.since,
                    consequence = %f.consequence,
                    "kernel feature not used"
                ),
            }
        }
    }
}

/// One feature in `/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureStatus {
    pub name: String,
    #[serde(flatten)]
    pub state: State,
    pub since: String,
    pub used_by: String,
    /// What is off or degraded; empty when the feature is used.
    pub consequence: String,
}

// ---- The real probe: bpf(2) ----

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

const PROG_TYPE_SCHED_CLS: u32 = 3;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_UDP4_RECVMSG: u32 = 19;
const ATTACH_INET4_GETPEERNAME: u32 = 29;
const ATTACH_TCX_INGRESS: u32 = 46;

const FUNC_L4_CSUM_REPLACE: i32 = 11;
const F_PSEUDO_HDR: i32 = 1 << 4;
const F_IPV6: i32 = 1 << 7;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// `dst = imm` (64-bit).
const fn mov(dst: u8, imm: i32) -> Insn {
    Insn {
        code: 0xb7,
        regs: dst,
        off: 0,
        imm,
    }
}

const fn call(helper: i32) -> Insn {
    Insn {
        code: 0x85,
        regs: 0,
        off: 0,
        imm: helper,
    }
}

const EXIT: Insn = Insn {
    code: 0x95,
    regs: 0,
    off: 0,
    imm: 0,
};

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

fn load(prog_type: u32, attach: u32, insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: attach,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A load failure that says nothing about the feature (no privilege) is an error; any
/// other means the kernel refused the program, so the feature is missing.
fn load_answer(r: io::Result<OwnedFd>) -> Result<Option<OwnedFd>> {
    match r {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            bail!("BPF_PROG_LOAD: {e} (needs CAP_BPF/CAP_SYS_ADMIN)")
        }
        Err(_) => Ok(None),
    }
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// BPF_LINK_CREATE with a target that cannot exist: a kernel that knows the attach type
/// gets as far as looking the target up and answers `known_errno`; one that does not
/// stops earlier with EINVAL.
fn link_create_knows(prog: &OwnedFd, target: u32, attach_type: u32, known_errno: i32) -> bool {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target,
        attach_type,
        ..Default::default()
    };
    match bpf(BPF_LINK_CREATE, &mut attr) {
        // SAFETY: an unexpected success returned a link fd we own; closing it detaches.
        Ok(fd) => {
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            true
        }
        Err(e) => e.raw_os_error() == Some(known_errno),
    }
}

/// The kernel, through bpf(2) and aya's helper and map probes.
pub struct KernelProber;

impl KernelProber {
    fn sock_addr_hooks(&self) -> Result<bool> {
        let prog = [mov(0, 1), EXIT];
        for attach in [
            ATTACH_INET4_CONNECT,
            ATTACH_UDP4_RECVMSG,
            ATTACH_INET4_GETPEERNAME,
        ] {
            if load_answer(load(PROG_TYPE_CGROUP_SOCK_ADDR, attach, &prog))?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn cgroup_link(&self) -> Result<bool> {
        let Some(prog) = load_answer(load(
            PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_INET4_CONNECT,
            &[mov(0, 1), EXIT],
        ))?
        else {
            return Ok(false);
        };
        // The target is a cgroup fd; -1 is none (EBADF once the command is known).
        Ok(link_create_knows(
            &prog,
            u32::MAX,
            ATTACH_INET4_CONNECT,
            libc::EBADF,
        ))
    }

    fn tcx(&self) -> Result<bool> {
        let Some(prog) = load_answer(load(PROG_TYPE_SCHED_CLS, 0, &[mov(0, -1), EXIT]))? else {
            return Ok(false);
        };
        // The target is an interface index; 0 is none (ENODEV once TCX is known).
        Ok(link_create_knows(
            &prog,
            0,
            ATTACH_TCX_INGRESS,
            libc::ENODEV,
        ))
    }

    /// Loads `w1 = atomic_fetch_add((u32 *)(r10 - 8), w1)` on a stack slot: kernels
    /// before 5.12 accept only BPF_ADD without BPF_FETCH there (EINVAL).
    fn atomic_fetch(&self) -> Result<bool> {
        let prog = [
            mov(1, 0),
            // *(u64 *)(r10 - 8) = r1: BPF_STX | BPF_MEM | BPF_DW, dst r10, src r1.
            Insn {
                code: 0x7b,
                regs: 0x1a,
                off: -8,
                imm: 0,
            },
            mov(1, 1),
            // BPF_STX | BPF_ATOMIC | BPF_W, imm BPF_ADD | BPF_FETCH.
            Insn {
                code: 0xc3,
                regs: 0x1a,
                off: -8,
                imm: 0x01,
            },
            mov(0, 0),
            EXIT,
        ];
        Ok(load_answer(load(PROG_TYPE_SCHED_CLS, 0, &prog))?.is_some())
    }

    /// Runs `bpf_l4_csum_replace(skb, 20, 0, 0, BPF_F_PSEUDO_HDR | BPF_F_IPV6)` on a
    /// zeroed frame: kernels without the flag answer EINVAL at run time (the verifier
    /// does not look at flags).
    fn csum_ipv6_flag(&self) -> Result<bool> {
        let prog = [
            mov(2, 20),
            mov(3, 0),
            mov(4, 0),
            mov(5, F_PSEUDO_HDR | F_IPV6),
            call(FUNC_L4_CSUM_REPLACE),
            EXIT,
        ];
        let Some(fd) = load_answer(load(PROG_TYPE_SCHED_CLS, 0, &prog))? else {
            return Ok(false);
        };
        let frame = [0u8; 64];
        let run = super::sys::prog_test_run(fd.as_fd(), &frame, 0, 1)?;
        Ok(run.retval == 0)
    }
}

fn helper(t: ProgramType, h: BpfHelper) -> Result<bool> {
    is_helper_supported(t, h).map_err(|e| anyhow::anyhow!("helper probe {h:?}: {e}"))
}

fn map(t: MapType) -> Result<bool> {
    is_map_supported(t).map_err(|e| anyhow::anyhow!("map probe {t:?}: {e}"))
}

/// [`map`] for `SK_STORAGE`, asked by two features, probed once per process: the
/// probe's map is allocated and then freed by the kernel (the bad BTF descriptor is
/// refused after the allocation), and freeing a local-storage map waits for an RCU
/// grace period (18–40 ms each, measured with `strace -T -e trace=bpf` on the 6.18
/// machine), which sat on the agent's start-up path twice.
fn sk_storage_map() -> Result<bool> {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if let Some(a) = ANSWER.get() {
        return Ok(*a);
    }
    let a = map(MapType::SkStorage)?;
    Ok(*ANSWER.get_or_init(|| a))
}

impl Prober for KernelProber {
    fn kernel_release(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    }

    fn has(&self, f: Feature) -> Result<bool> {
        match f {
            Feature::SockAddrHooks => self.sock_addr_hooks(),
            Feature::CgroupLink => self.cgroup_link(),
            Feature::NetnsCookie => helper(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_get_netns_cookie,
            ),
            Feature::Ringbuf => map(MapType::RingBuf),
            Feature::SetRetval => {
                helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval)
            }
            Feature::LruLpmMaps => Ok(map(MapType::LruHash)? && map(MapType::LpmTrie)?),
            Feature::Tcx => self.tcx(),
            Feature::FibRedirect => {
                Ok(helper(
                    ProgramType::SchedClassifier,
                    BpfHelper::BPF_FUNC_redirect_neigh,
                )? && helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_check_mtu)?)
            }
            Feature::CsumIpv6Flag => self.csum_ipv6_flag(),
            Feature::MapBatch => super::sys::probe_map_update_batch(),
            Feature::AtomicFetch => self.atomic_fetch(),
            Feature::SockOpsConn => Ok(sk_storage_map()?
                && helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get)?),
            Feature::CoarseClock => Ok(helper(
                ProgramType::Xdp,
                BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
            )? && helper(
                ProgramType::SchedClassifier,
                BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
            )?),
            Feature::BpfLoop => helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_loop),
            Feature::SkStorageRnat => Ok(sk_storage_map()?
                && helper(
                    ProgramType::CgroupSockAddr,
                    BpfHelper::BPF_FUNC_sk_storage_get,
                )?),
            // No side-effect-free attach test tells an XDP link apart on every kernel
            // (a missing device is EINVAL both before and after 5.9); the attach code
            // also refuses a netlink attachment, so the version is only the first check.
            Feature::XdpLink => {
                let v = aya::util::KernelVersion::current()
                    .map_err(|e| anyhow::anyhow!("kernel version: {e}"))?;
                Ok(v >= aya::util::KernelVersion::new(5, 9, 0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel described by a table: features listed are there, `errors` fail.
    struct Fake {
        has: Vec<Feature>,
        errors: Vec<Feature>,
    }

    impl Prober for Fake {
        fn kernel_release(&self) -> String {
            "5.15.0-fake".to_owned()
        }
        fn has(&self, f: Feature) -> Result<bool> {
            if self.errors.contains(&f) {
                bail!("no privilege");
            }
            Ok(self.has.contains(&f))
        }
    }

    fn all() -> Vec<Feature> {
        TABLE.iter().map(|i| i.feature).collect()
    }

    #[test]
    fn table_lists_every_feature_once() {
        let mut seen: Vec<Feature> = all();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), TABLE.len());
        for f in all() {
            assert_eq!(info(f).feature, f);
        }
    }

    #[test]
    fn a_new_kernel_uses_everything() {
        let p = Probe::run(
            &Fake {
                has: all(),
                errors: vec![],
            },
            &[],
        );
        let c = p.choices();
        assert_eq!(c.socket_path, Ok(()));
        assert_eq!(c.tc_attach, TcAttach::Tcx);
        assert!(c.set_retval && c.csum_ipv6_flag && c.fib_redirect && c.xdp_link);
        assert!(c.sk_storage_rnat && c.coarse_clock && c.lc_loop && c.lc_bpf_loop);
        assert!(p.report().iter().all(|f| f.consequence.is_empty()));
    }

    #[test]
    fn kernel_5_15_gets_the_fallbacks() {
        // 5.15: no TCX, no bpf_set_retval, no BPF_F_IPV6; the rest is there.
        let has: Vec<Feature> = all()
            .into_iter()
            .filter(|f| !matches!(f, Feature::Tcx | Feature::SetRetval | Feature::CsumIpv6Flag))
            .collect();
        let p = Probe::run(
            &Fake {
                has,
                errors: vec![],
            },
            &[],
        );
        let c = p.choices();
        assert_eq!(c.socket_path, Ok(()));
        assert_eq!(c.tc_attach, TcAttach::Netlink);
        assert!(!c.set_retval && !c.csum_ipv6_flag);
        assert!(c.fib_redirect && c.xdp_link);
        let tcx = p.report().into_iter().find(|f| f.name == "tcx").unwrap();
        assert_eq!(tcx.state, State::Missing);
        assert!(tcx.consequence.contains("netlink"), "{tcx:?}");
    }

    #[test]
    fn forced_off_features_take_the_fallback_and_say_so() {
        let forced = parse_forced("tcx,fib_redirect").unwrap();
        let p = Probe::run(
            &Fake {
                has: all(),
                errors: vec![],
            },
            &forced,
        );
        assert_eq!(p.state(Feature::Tcx), &State::ForcedOff);
        assert_eq!(p.state(Feature::SetRetval), &State::Found);
        let c = p.choices();
        assert_eq!(c.tc_attach, TcAttach::Netlink);
        assert!(!c.fib_redirect && c.set_retval);
    }

    #[test]
    fn all_forces_every_fallback_and_nothing_required() {
        let forced = parse_forced("all").unwrap();
        let want: Vec<Feature> = TABLE
            .iter()
            .filter(|i| i.fallback)
            .map(|i| i.feature)
            .collect();
        assert_eq!(forced, want);
        let c = Probe::run(
            &Fake {
                has: all(),
                errors: vec![],
            },
            &forced,
        )
        .choices();
        assert_eq!(c.socket_path, Ok(()));
        assert_eq!(c.tc_attach, TcAttach::Netlink);
        assert!(!c.set_retval && !c.csum_ipv6_flag && !c.fib_redirect && !c.xdp_link);
        assert!(!c.sk_storage_rnat && !c.conn_counts && !c.coarse_clock && !c.lc_loop);
        assert!(!c.lc_bpf_loop);
    }

    #[test]
    fn connection_counts_need_sock_ops_and_socket_storage() {
        let choices = |off: &str| {
            Probe::run(
                &Fake {
                    has: all(),
                    errors: vec![],
                },
                &parse_forced(off).unwrap(),
            )
            .choices()
        };
        let run = |off: &str| choices(off).conn_counts;
        assert!(run(""));
        assert!(!run("sock_ops_conn"));
        let lc = |off: &str| choices(off).lc_loop;
        // There is no lc without the counts, so no lc programs either.
        assert!(lc(""));
        assert!(!lc("sock_ops_conn") && !lc("sk_storage_rnat"));
        // Without bpf_loop the lc programs are the bounded ones (svclb_lc4/6).
        let looped = |off: &str| choices(off).lc_bpf_loop;
        assert!(looped("") && !looped("bpf_loop"));
        // The counts find a socket's backend in its reverse-NAT storage.
        assert!(!run("sk_storage_rnat"));
    }

    #[test]
    fn forcing_a_required_or_unknown_feature_is_refused() {
        assert!(
            parse_forced("cgroup_link")
                .unwrap_err()
                .contains("no fallback")
        );
        assert!(parse_forced("tcx,bogus").unwrap_err().contains("bogus"));
        assert_eq!(parse_forced(""), Ok(vec![]));
    }

    #[test]
    fn a_missing_required_feature_stops_the_agent_with_its_name() {
        let has: Vec<Feature> = all()
            .into_iter()
            .filter(|f| *f != Feature::SockAddrHooks)
            .collect();
        let c = Probe::run(
            &Fake {
                has,
                errors: vec![],
            },
            &[],
        )
        .choices();
        let err = c.socket_path.unwrap_err();
        assert!(
            err.contains("sock_addr_hooks") && err.contains("5.15.0-fake"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_probe_picks_the_fallback_but_does_not_stop_the_agent() {
        let p = Probe::run(
            &Fake {
                has: all(),
                errors: vec![Feature::Tcx, Feature::CgroupLink],
            },
            &[],
        );
        assert!(matches!(p.state(Feature::Tcx), State::Unknown(e) if e.contains("privilege")));
        let c = p.choices();
        assert_eq!(c.tc_attach, TcAttach::Netlink);
        assert_eq!(c.socket_path, Ok(()));
    }

    #[test]
    fn status_rows_serialize_with_state_and_consequence() {
        let p = Probe::run(
            &Fake {
                has: vec![],
                errors: vec![],
            },
            &[],
        );
        let rows = p.report();
        let v = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(v["state"], "missing");
        assert_eq!(v["name"], "sock_addr_hooks");
        let back: Vec<FeatureStatus> =
            serde_json::from_value(serde_json::to_value(&rows).unwrap()).unwrap();
        assert_eq!(back, rows);
    }
}
