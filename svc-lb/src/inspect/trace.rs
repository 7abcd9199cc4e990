//! `svc-lb trace`: what the datapath would do with one new connection, step by step.
//!
//! The decision comes from [`svc_lb_common::choose_backend`], the very function the eBPF
//! socket programs run, fed with lookups into the same (pinned) maps. Everything else
//! here only adds context for the reader (the Service, the other candidates).
use std::{
    cell::RefCell,
    hash::{BuildHasher, Hasher},
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use svc_lb_common::{
    AffinityKey, AffinityValue, Backend, COUNTER_NAMES, CTR_SOCK_BACKEND_MISS, CTR_SOCK_NO_BACKEND,
    CTR_SOCK_SLOT_MISS, CTR_SOCK_SRC_RANGE, CTR_SOCK_SRC_UNBOUND, Choice, ConnKey, PROTO_TCP,
    PROTO_UDP, SCOPE_ALL, SVC_FLAG_AFFINITY, SVC_FLAG_SCHED_LC, SVC_FLAG_SCHED_RR,
    SVC_FLAG_SRC_RANGES, Stickiness, SvcValue, choose_backend,
    lookup::{LC_LOOP_MAX, LC_SCAN_MAX, LcPick, LcVia, affinity_fresh, lc_overhead, lc_scan},
};

use super::names;
use crate::{
    datapath::{
        codec::{self, FrontendMeta, SvcKey},
        fake::FakeMaps,
        pinned::PinnedMaps,
    },
    model::FrontendKey,
};

/// The map reads a trace needs. The real maps and the in-memory fake both provide
/// them, so the same trace code runs in host tests and against the kernel.
pub trait TraceMaps {
    fn svc(&self, key: &SvcKey) -> Result<Option<SvcValue>>;
    fn backend(&self, id: u32) -> Result<Option<Backend>>;
    fn meta(&self, rev_nat_id: u32) -> Result<Option<FrontendMeta>>;
    /// Other frontends on the same address, for the "not a Service" hint.
    fn frontends_at(&self, addr: IpAddr) -> Result<Vec<FrontendKey>>;
    /// Session affinity: a client's remembered backend for a frontend.
    fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityValue>>;
    /// Session affinity: whether `backend_id` still belongs to frontend `rev_nat_id`.
    fn affinity_member(&self, backend_id: u32, rev_nat_id: u32) -> Result<bool>;
    /// `loadBalancerSourceRanges`: the LPM lookup the programs make for `rev_nat_id`
    /// and `src`; `None` when these maps hold no source ranges to read.
    fn src_range_allowed(&self, _rev_nat_id: u32, _src: IpAddr) -> Result<Option<bool>> {
        Ok(None)
    }
    /// `lc`/`wlc`: the socket path's open connections to a backend address
    /// (`LB_CONNS_V1`), (active, inactive); `None` when there is no entry.
    fn open_conns(&self, _key: &ConnKey) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }
    /// `lc`/`wlc`: the most slots the connect hooks compare exactly (through the
    /// `svclb_lc4`/`6` programs, which a node with connection counts loads).
    fn lc_exact_max(&self) -> u32 {
        LC_SCAN_MAX
    }
}

impl TraceMaps for PinnedMaps {
    fn svc(&self, key: &SvcKey) -> Result<Option<SvcValue>> {
        self.svc_value(key)
    }
    /// The agent loads the lc programs only once a frontend needs them (and an older
    /// verifier may refuse them): without them in the kernel, reading these maps, the
    /// connect hooks take two random choices at any slot count.
    fn lc_exact_max(&self) -> u32 {
        match crate::datapath::lcdemand::lc_programs_loaded(self.bpffs()) {
            Ok(found) if found.iter().any(|p| p.starts_with("svclb_lcloop")) => LC_LOOP_MAX,
            Ok(found) if !found.is_empty() => LC_SCAN_MAX,
            _ => 0,
        }
    }
    fn backend(&self, id: u32) -> Result<Option<Backend>> {
        self.backend_value(id)
    }
    fn meta(&self, rev_nat_id: u32) -> Result<Option<FrontendMeta>> {
        self.meta_of(rev_nat_id)
    }
    fn frontends_at(&self, addr: IpAddr) -> Result<Vec<FrontendKey>> {
        Ok(self
            .read_current()?
            .frontends
            .into_keys()
            .filter(|fe| fe.addr == addr)
            .collect())
    }
    fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityValue>> {
        self.affinity_value(key)
    }
    fn affinity_member(&self, backend_id: u32, rev_nat_id: u32) -> Result<bool> {
        PinnedMaps::affinity_member(self, backend_id, rev_nat_id)
    }
    fn open_conns(&self, key: &ConnKey) -> Result<Option<(u64, u64)>> {
        self.conn_count(key)
    }
}

impl TraceMaps for FakeMaps {
    fn svc(&self, key: &SvcKey) -> Result<Option<SvcValue>> {
        Ok(FakeMaps::svc(self).get(key).copied())
    }
    fn backend(&self, id: u32) -> Result<Option<Backend>> {
        Ok(self.backends().get(&id).copied())
    }
    fn meta(&self, _rev_nat_id: u32) -> Result<Option<FrontendMeta>> {
        Ok(None)
    }
    fn frontends_at(&self, addr: IpAddr) -> Result<Vec<FrontendKey>> {
        Ok(FakeMaps::svc(self)
            .keys()
            .map(codec::frontend_of)
            .filter(|(fe, slot)| *slot == 0 && fe.addr == addr)
            .map(|(fe, _)| fe)
            .collect())
    }
    // The fake holds no affinity maps: every client is on its first connection.
    fn affinity(&self, _key: &AffinityKey) -> Result<Option<AffinityValue>> {
        Ok(None)
    }
    fn affinity_member(&self, _backend_id: u32, _rev_nat_id: u32) -> Result<bool> {
        Ok(false)
    }
    fn src_range_allowed(&self, rev_nat_id: u32, src: IpAddr) -> Result<Option<bool>> {
        Ok(Some(
            self.src_ranges()
                .iter()
                .any(|(id, net)| *id == rev_nat_id && net.contains(&src)),
        ))
    }
}

/// What to trace.
#[derive(Clone, Debug)]
pub struct TraceRequest {
    pub to: SocketAddr,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// The client's address, shown in the trace.
    pub from: Option<IpAddr>,
    /// The client for session affinity: the socket programs key it by the network
    /// namespace cookie of the connecting socket (one per pod).
    pub client: Option<ClientNetns>,
    /// `CLOCK_MONOTONIC` now, the clock of `bpf_ktime_get_ns()`.
    pub now_ns: u64,
}

/// A client network namespace, as the socket programs see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientNetns {
    pub cookie: u64,
    /// Where it came from, for the reader (`/run/netns/x`, `this process`, ...).
    pub label: String,
}

/// `CLOCK_MONOTONIC`, which `bpf_ktime_get_ns()` reads too.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The cookie of a network namespace: `netns` is a namespace file (`/run/netns/NAME`,
/// `/proc/PID/ns/net`), or `None` for this process's own. A helper thread enters the
/// namespace (setns changes only the calling thread), opens a socket there and asks
/// for its `SO_NETNS_COOKIE` (Linux ≥ 5.14), the value `bpf_get_netns_cookie` returns.
pub fn netns_cookie(netns: Option<&std::path::Path>) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let netns = netns.map(std::path::Path::to_path_buf);
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<u64> {
                if let Some(path) = &netns {
                    let f = std::fs::File::open(path)
                        .with_context(|| format!("open network namespace {}", path.display()))?;
                    // SAFETY: a valid namespace fd; this thread is ours and ends here.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error())
                            .with_context(|| format!("enter {}", path.display()));
                    }
                }
                // SAFETY: plain socket(2); the fd is owned right away.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error()).context("socket");
                }
                // SAFETY: fd is a new socket that nothing else owns.
                let sock =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                let cookie = crate::datapath::sys::sockopt_u64(
                    std::os::fd::AsFd::as_fd(&sock),
                    libc::SO_NETNS_COOKIE,
                )
                .context("getsockopt SO_NETNS_COOKIE (Linux ≥ 5.14)")?;
                Ok(cookie)
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the netns helper thread panicked")))
    })
}

/// At most this many candidates are listed; the count is always exact.
pub const MAX_LISTED: u16 = 64;

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Trace {
    pub destination: String,
    pub protocol: &'static str,
    pub from: Option<String>,
    /// The socket hooks that make this decision.
    pub hooks: &'static str,
    /// The frontend's master entry; `null` when the destination is not a Service.
    pub frontend: Option<TraceFrontend>,
    /// The session affinity lookup; `null` when the Service has none.
    pub affinity: Option<TraceAffinity>,
    /// Slots `1..=count` in order (at most [`MAX_LISTED`]).
    pub candidates: Vec<TraceCandidate>,
    pub verdict: TraceVerdict,
    /// The same facts as prose, one entry per step, in the order the datapath takes
    /// them.
    pub steps: Vec<TraceStep>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct TraceFrontend {
    pub rev_nat_id: u32,
    pub namespace: Option<String>,
    pub service: Option<String>,
    pub port_name: Option<String>,
    pub kind: &'static str,
    pub backend_count: u32,
    /// "random", "rr", "wrr" (slots in turn) or "maglev" (external path).
    pub scheduler: &'static str,
    pub session_affinity: &'static str,
    pub affinity_timeout_seconds: Option<u32>,
    pub internal_traffic_policy: &'static str,
    pub external_traffic_policy: &'static str,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TraceAffinity {
    /// The client's network namespace cookie; `null` when unknown.
    pub client_netns_cookie: Option<u64>,
    pub client: Option<String>,
    /// The client's entry, if it has one.
    pub entry: Option<TraceAffinityEntry>,
    /// Whether the remembered backend is used for this connection.
    pub used: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TraceAffinityEntry {
    pub backend_id: u32,
    /// Seconds since the client's last connection.
    pub age_seconds: f64,
    /// Within the Service's timeout.
    pub fresh: bool,
    /// The backend still belongs to the frontend.
    pub member: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct TraceCandidate {
    pub slot: u16,
    pub backend_id: u32,
    pub address: String,
    pub port: u16,
    /// "active", "terminating", or "missing" (no backend entry for the id).
    pub state: &'static str,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct TraceVerdict {
    /// "pass" (not a Service: untouched), "reject" (the syscall fails) or "rewrite".
    pub action: &'static str,
    /// For "reject": the errno the application sees.
    pub errno: Option<&'static str>,
    /// For "reject": the datapath counter that counts it (as `status` and the metrics
    /// name it).
    pub reason: Option<&'static str>,
    /// For "rewrite": the backend this trace chose.
    pub backend: Option<TraceChosen>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct TraceChosen {
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub state: &'static str,
    pub slot: u16,
    /// "random": drawn anew for every connection, so a real connection may take any
    /// of the candidates; "affinity": the client's remembered backend.
    pub via: &'static str,
    /// Whether every new connection from this client goes to this backend now.
    pub deterministic: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct TraceStep {
    pub step: &'static str,
    pub result: String,
    pub details: Vec<String>,
}

pub(super) fn counter_name(index: u32) -> &'static str {
    COUNTER_NAMES
        .iter()
        .find(|(i, _)| *i == index)
        .map_or("unknown", |(_, n)| n)
}

/// A random number like `bpf_get_prandom_u32()` would give, from the standard
/// library's randomly seeded hasher (no extra dependency for one number).
pub fn random_u32() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish() as u32
}

/// The IPv4 address inside `to` when it is IPv4-mapped (`[::ffff:a.b.c.d]:port`).
fn v4_mapped(to: &SocketAddr) -> Option<std::net::Ipv4Addr> {
    match to {
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
        SocketAddr::V4(_) => None,
    }
}

fn hooks(to: &SocketAddr, proto: u8) -> &'static str {
    if v4_mapped(to).is_some() {
        // udpv6_sendmsg hands a mapped destination to the IPv4 path before its own hook.
        return if proto == PROTO_UDP {
            "sendmsg4 (unconnected UDP: the kernel passes mapped datagrams to the IPv4 path), connect6 (connected UDP), recvmsg6/getpeername6 (replies)"
        } else {
            "connect6, getpeername6"
        };
    }
    match (to.is_ipv4(), proto) {
        (true, PROTO_UDP) => "sendmsg4 (unconnected UDP), connect4 (connected UDP)",
        (true, _) => "connect4",
        (false, PROTO_UDP) => "sendmsg6 (unconnected UDP), connect6 (connected UDP)",
        (false, _) => "connect6",
    }
}

/// Runs the datapath's decision for `req` against `maps`. `random` stands for the
/// kernel's `bpf_get_prandom_u32()`; tests pass a fixed number.
pub fn trace(maps: &dyn TraceMaps, req: &TraceRequest, random: u32) -> Result<Trace> {
    if req.proto != PROTO_TCP && req.proto != PROTO_UDP {
        bail!("only TCP and UDP are load-balanced at the socket level");
    }
    // A dual-stack socket dialling `::ffff:a.b.c.d` is an IPv4 client to the socket
    // programs: they look the IPv4 address up in the IPv4 maps.
    let mapped = v4_mapped(&req.to);
    let fe = FrontendKey {
        addr: mapped.map_or(req.to.ip(), IpAddr::V4),
        port: req.to.port(),
        proto: req.proto,
        scope: SCOPE_ALL,
    };
    let fe_text = format!(
        "{}/{}",
        names::socket(&fe.addr, fe.port),
        names::proto(fe.proto)
    );
    let mut steps = Vec::new();
    if let Some(v4) = mapped {
        steps.push(TraceStep {
            step: "address",
            result: format!(
                "IPv4-mapped: {} is looked up as the IPv4 address {v4}",
                req.to.ip()
            ),
            details: vec![
                "an AF_INET6 socket without IPV6_V6ONLY reaches IPv4 peers as ::ffff:a.b.c.d; the kernel sends IPv4 packets".to_owned(),
                "the backend is written back as ::ffff:<backend>, and replies and getpeername() show the Service address as ::ffff:<address>".to_owned(),
            ],
        });
    }
    let master = maps.svc(&codec::svc_key(&fe, 0))?;

    // The decision, exactly as the eBPF programs take it. Map errors cannot cross the
    // closures (the shared function's lookups are infallible, as they are in the
    // kernel), so the first one is kept here and reported after the call.
    let error = RefCell::new(None);
    let keep = |e: anyhow::Error| {
        error.borrow_mut().get_or_insert(e);
    };
    // Without a client cookie the trace is a first connection: nothing remembered.
    let remembered = |rev_nat_id: u32| {
        let cookie = req.client.as_ref()?.cookie;
        let key = AffinityKey {
            netns_cookie: cookie,
            rev_nat_id,
            _pad: 0,
        };
        maps.affinity(&key).unwrap_or_else(|e| {
            keep(e);
            None
        })
    };
    let is_member = |backend_id, rev_nat_id| {
        maps.affinity_member(backend_id, rev_nat_id)
            .unwrap_or_else(|e| {
                keep(e);
                false
            })
    };
    // The client's bound source is `--from`; without it the trace is an unbound
    // socket's, whose source the hook cannot know.
    let src_checked = RefCell::new(None);
    let src_allowed = |rev_nat_id: u32| {
        let from = req.from?;
        let from = match from {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(from, IpAddr::V4),
            v4 => v4,
        };
        let allowed = match maps.src_range_allowed(rev_nat_id, from) {
            Ok(a) => a,
            Err(e) => {
                keep(e);
                None
            }
        };
        *src_checked.borrow_mut() = Some((from, allowed));
        allowed
    };
    let slot_backend = |slot: u16| match maps.svc(&codec::svc_key(&fe, slot)) {
        Ok(v) => v.map(|v| v.backend_id),
        Err(e) => {
            keep(e);
            None
        }
    };
    // lc/wlc: the scan the connect hook makes, over the same maps (`random` is its
    // tie-break seed); what it found is explained in the selection step.
    let lc_pick = std::cell::Cell::new(None);
    let exact_max = maps.lc_exact_max();
    let least = |count: u32| {
        let pick = lc_scan(count, random, exact_max, &slot_backend, |id| {
            let b = match maps.backend(id) {
                Ok(b) => b?,
                Err(e) => {
                    keep(e);
                    return None;
                }
            };
            match maps.open_conns(&ConnKey::of_backend(&b)) {
                Ok(c) => Some(c.map_or(0, |(a, i)| lc_overhead(a, i))),
                Err(e) => {
                    keep(e);
                    Some(0)
                }
            }
        });
        lc_pick.set(pick);
        pick.map(|p| p.slot)
    };
    let choice = choose_backend(
        master.as_ref(),
        src_allowed,
        || req.now_ns,
        remembered,
        is_member,
        || random,
        // The cursor as it stands: the next connection takes this turn (a trace does
        // not advance it).
        || master.map_or(0, |m| m.backend_id),
        least,
        slot_backend,
        |id| match maps.backend(id) {
            Ok(b) => b,
            Err(e) => {
                keep(e);
                None
            }
        },
    );
    if let Some(e) = error.into_inner() {
        return Err(e.context("read the maps"));
    }

    let mut out = Trace {
        destination: names::socket(&req.to.ip(), fe.port),
        protocol: names::proto(fe.proto),
        from: req.from.map(|a| a.to_string()),
        hooks: hooks(&req.to, req.proto),
        frontend: None,
        affinity: None,
        candidates: Vec::new(),
        verdict: TraceVerdict {
            action: "pass",
            errno: None,
            reason: None,
            backend: None,
        },
        steps: Vec::new(),
    };

    let Some(master) = master else {
        let others = maps.frontends_at(fe.addr)?;
        let mut details = vec![format!(
            "no entry for {fe_text} (slot 0, scope all) in the {} map",
            if fe.addr.is_ipv4() {
                svc_lb_common::MAP_SVC4
            } else {
                svc_lb_common::MAP_SVC6
            }
        )];
        if others.is_empty() {
            details.push(format!("no frontend uses the address {} at all", fe.addr));
        } else {
            let list: Vec<String> = others
                .iter()
                .map(|o| format!("{}/{}", o.port, names::proto(o.proto)))
                .collect();
            details.push(format!(
                "the address {} is a frontend on other ports: {}",
                fe.addr,
                list.join(", ")
            ));
        }
        steps.push(TraceStep {
            step: "frontend",
            result: "not found: not a Service".to_owned(),
            details,
        });
        steps.push(TraceStep {
            step: "verdict",
            result: "PASS: the connection goes to the address as dialled, untouched".to_owned(),
            details: Vec::new(),
        });
        out.steps = steps;
        return Ok(out);
    };

    let meta = maps.meta(master.rev_nat_id)?;
    let meta_flags = meta.as_ref().map_or(0, |m| m.flags);
    let affinity = master.flags & SVC_FLAG_AFFINITY != 0;
    let frontend = TraceFrontend {
        rev_nat_id: master.rev_nat_id,
        namespace: meta.as_ref().map(|m| m.service.namespace.to_string()),
        service: meta.as_ref().map(|m| m.service.name.to_string()),
        port_name: meta.as_ref().map(|m| m.port_name.clone()),
        kind: names::kind(meta.as_ref().map_or(0, |m| m.kind)),
        backend_count: master.count,
        scheduler: names::scheduler(meta_flags),
        session_affinity: if affinity { "ClientIP" } else { "None" },
        affinity_timeout_seconds: affinity.then_some(master.affinity_timeout_s),
        internal_traffic_policy: names::internal_policy(meta_flags),
        external_traffic_policy: names::external_policy(meta_flags),
    };
    let service = match &meta {
        Some(m) if m.port_name.is_empty() => format!("Service {} ({})", m.service, frontend.kind),
        Some(m) => format!(
            "Service {} port {:?} ({})",
            m.service, m.port_name, frontend.kind
        ),
        None => "Service unknown (no metadata for this rev-NAT id yet)".to_owned(),
    };
    steps.push(TraceStep {
        step: "frontend",
        result: format!("found {fe_text}: rev-NAT id {}", master.rev_nat_id),
        details: vec![service],
    });
    steps.push(TraceStep {
        step: "flags",
        result: match frontend.affinity_timeout_seconds {
            Some(t) => format!("session affinity ClientIP, timeout {t}s"),
            None => "session affinity None".to_owned(),
        },
        details: vec![
            format!(
                "traffic policy: internal {}, external {} (the agent applied it when it chose the backends below)",
                frontend.internal_traffic_policy, frontend.external_traffic_policy
            ),
            format!(
                "scheduler {}: {}",
                frontend.scheduler,
                if master.flags & SVC_FLAG_SCHED_LC != 0 {
                    "the backend with the fewest open connections per weight (each backend's slots form one run, its length the weight)"
                } else if master.flags & SVC_FLAG_SCHED_RR != 0 {
                    "the slots are taken in turn (a cursor in the master entry)"
                } else {
                    "a random slot; weights repeat a backend over several slots"
                }
            ),
        ],
    });

    // Context only: the slots the random choice draws from.
    let listed = u16::try_from(master.count)
        .unwrap_or(u16::MAX)
        .min(MAX_LISTED);
    for slot in 1..=listed {
        let id = maps.svc(&codec::svc_key(&fe, slot))?.map(|v| v.backend_id);
        let be = match id {
            Some(id) => maps.backend(id)?,
            None => None,
        };
        out.candidates
            .push(candidate(slot, id.unwrap_or(0), be.as_ref()));
    }
    let mut cand_lines: Vec<String> = out
        .candidates
        .iter()
        .map(|c| {
            if c.state == "missing" {
                format!("slot {:>3}  backend {:>5}  (missing)", c.slot, c.backend_id)
            } else {
                let addr: IpAddr = c.address.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
                format!(
                    "slot {:>3}  backend {:>5}  {}  {}",
                    c.slot,
                    c.backend_id,
                    names::socket(&addr, c.port),
                    c.state
                )
            }
        })
        .collect();
    if master.count > u32::from(listed) {
        cand_lines.push(format!("... and {} more", master.count - u32::from(listed)));
    }
    steps.push(TraceStep {
        step: "backends",
        result: if master.count == 0 {
            "none".to_owned()
        } else {
            format!("{} in slots 1..={}", master.count, master.count)
        },
        details: cand_lines,
    });
    out.frontend = Some(frontend);
    if master.flags & SVC_FLAG_SRC_RANGES != 0 {
        steps.push(source_step(&choice, src_checked.into_inner()));
    }
    if affinity {
        let (step, aff) = affinity_step(maps, req, &master, &choice)?;
        steps.push(step);
        out.affinity = Some(aff);
    }

    match choice {
        // The master entry was found above, and `choose_backend` answers NotService
        // only without one.
        Choice::NotService => {}
        Choice::SourceUnknown { .. } => {
            steps.push(TraceStep {
                step: "verdict",
                result: "PASS: the connection goes to the load-balancer IP as dialled, untouched"
                    .to_owned(),
                details: vec![
                    "the ranges are applied where the source is known: by the load balancer, and by the external path when the traffic comes back in".to_owned(),
                    format!("counted as {}", counter_name(CTR_SOCK_SRC_UNBOUND)),
                ],
            });
        }
        Choice::Refuse {
            reason,
            slot,
            backend_id,
            ..
        } => {
            let why = match reason {
                CTR_SOCK_NO_BACKEND => {
                    "the Service has no ready backend (kube-proxy's REJECT)".to_owned()
                }
                CTR_SOCK_SRC_RANGE => {
                    "the client's source is outside the load-balancer IP's loadBalancerSourceRanges"
                        .to_owned()
                }
                CTR_SOCK_SLOT_MISS => format!(
                    "slot {slot} is missing below the count {} (a planner bug or a map edited by hand)",
                    master.count
                ),
                CTR_SOCK_BACKEND_MISS => format!(
                    "slot {slot} names backend {backend_id}, which is not in the backend map"
                ),
                _ => "unknown reason".to_owned(),
            };
            if slot != 0 {
                steps.push(selection_step(
                    &master,
                    random,
                    slot,
                    backend_id,
                    lc_pick.get(),
                    exact_max,
                ));
            }
            steps.push(TraceStep {
                step: "verdict",
                result: "REJECT: connect()/sendmsg() fails with ECONNREFUSED".to_owned(),
                details: vec![why, format!("counted as {}", counter_name(reason))],
            });
            out.verdict = TraceVerdict {
                action: "reject",
                errno: Some("ECONNREFUSED"),
                reason: Some(counter_name(reason)),
                backend: None,
            };
        }
        Choice::Backend {
            backend,
            backend_id,
            slot,
            sticky,
            ..
        } => {
            let via_affinity = matches!(sticky, Stickiness::Remembered { .. });
            if !via_affinity {
                steps.push(selection_step(
                    &master,
                    random,
                    slot,
                    backend_id,
                    lc_pick.get(),
                    exact_max,
                ));
            }
            let c = candidate(slot, backend_id, Some(&backend));
            let addr: IpAddr = c.address.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
            let deterministic = via_affinity || master.count == 1;
            let timeout = master.affinity_timeout_s;
            // What the socket sees: the mapped form for a mapped destination.
            let seen = match (mapped, addr) {
                (Some(_), IpAddr::V4(a)) => IpAddr::V6(a.to_ipv6_mapped()),
                _ => addr,
            };
            steps.push(TraceStep {
                step: "verdict",
                result: format!(
                    "REWRITE to {} (backend {backend_id}, {})",
                    names::socket(&seen, c.port),
                    c.state
                ),
                details: match sticky {
                    Stickiness::Remembered { .. } => vec![format!(
                        "the client's remembered backend: its new connections go here until {timeout}s after its last one"
                    )],
                    Stickiness::New { .. } => vec![format!(
                        "drawn at random; the datapath remembers what it draws for this client (for {timeout}s), so after its first connection a trace shows that backend"
                    )],
                    Stickiness::Off if master.count == 1 => {
                        vec!["the only backend: every connection goes here".to_owned()]
                    }
                    Stickiness::Off if master.flags & SVC_FLAG_SCHED_LC != 0 => vec![
                        "the least loaded backend now (open connections per weight); the next connection may go elsewhere".to_owned(),
                    ],
                    Stickiness::Off if master.flags & SVC_FLAG_SCHED_RR != 0 => vec![format!(
                        "the slots are taken in turn: each new connection takes the next of the {} slots",
                        master.count
                    )],
                    Stickiness::Off => vec![format!(
                        "one of {} equally likely slots, drawn again for every connection (a weighted backend holds several)",
                        master.count
                    )],
                },
            });
            out.verdict = TraceVerdict {
                action: "rewrite",
                errno: None,
                reason: None,
                backend: Some(TraceChosen {
                    id: backend_id,
                    address: c.address,
                    port: c.port,
                    state: c.state,
                    slot,
                    via: if via_affinity {
                        "affinity"
                    } else if master.flags & SVC_FLAG_SCHED_LC != 0 {
                        "least connections"
                    } else if master.flags & SVC_FLAG_SCHED_RR != 0 {
                        "in turn"
                    } else {
                        "random"
                    },
                    deterministic,
                }),
            };
        }
    }
    out.steps = steps;
    Ok(out)
}

/// The `loadBalancerSourceRanges` step: the client's bound source (`--from`) and
/// whether a range of the frontend holds it.
fn source_step(choice: &Choice<Backend>, checked: Option<(IpAddr, Option<bool>)>) -> TraceStep {
    let refused = matches!(
        choice,
        Choice::Refuse {
            reason: CTR_SOCK_SRC_RANGE,
            ..
        }
    );
    let result = match checked {
        None => "source unknown: an unbound socket has no source address in the hook (give --from ADDR for a bound one)".to_owned(),
        Some((from, _)) if refused => format!("{from} is outside loadBalancerSourceRanges"),
        Some((from, Some(true))) => format!("{from} is inside loadBalancerSourceRanges"),
        Some((from, _)) => format!("{from}: the ranges could not be read"),
    };
    TraceStep {
        step: "source",
        result,
        details: vec![
            "load-balancer IP with loadBalancerSourceRanges: the socket programs check the socket's bound source (or the datagram's IP_PKTINFO source)".to_owned(),
        ],
    }
}

/// Explains the session affinity lookup that `choose_backend` made: the client's entry
/// and why it is (or is not) used. Reads the same two maps again, for display only.
fn affinity_step(
    maps: &dyn TraceMaps,
    req: &TraceRequest,
    master: &SvcValue,
    choice: &Choice<Backend>,
) -> Result<(TraceStep, TraceAffinity)> {
    let used = matches!(
        choice,
        Choice::Backend {
            sticky: Stickiness::Remembered { .. },
            ..
        }
    );
    let Some(client) = &req.client else {
        return Ok((
            TraceStep {
                step: "affinity",
                result: "client unknown: traced as its first connection".to_owned(),
                details: vec![
                    "the socket programs key affinity by the client's network namespace; give --netns or --pid".to_owned(),
                ],
            },
            TraceAffinity {
                client_netns_cookie: None,
                client: None,
                entry: None,
                used,
            },
        ));
    };
    let key = AffinityKey {
        netns_cookie: client.cookie,
        rev_nat_id: master.rev_nat_id,
        _pad: 0,
    };
    let who = format!("client netns cookie {} ({})", client.cookie, client.label);
    let entry = match maps.affinity(&key)? {
        Some(v) => Some(affinity_entry(
            &v,
            req.now_ns,
            master,
            maps.affinity_member(v.backend_id, master.rev_nat_id)?,
        )),
        None => None,
    };
    let (result, details) = affinity_text(
        &who,
        entry.as_ref(),
        used,
        master.affinity_timeout_s,
        AffinityWords {
            first: "a first connection: the backend is drawn at random and remembered",
            anew: "a new backend is drawn and remembered",
            unit: "connection",
        },
    );
    Ok((
        TraceStep {
            step: "affinity",
            result,
            details,
        },
        TraceAffinity {
            client_netns_cookie: Some(client.cookie),
            client: Some(client.label.clone()),
            entry,
            used,
        },
    ))
}

/// An affinity entry as a trace shows it.
pub(super) fn affinity_entry(
    v: &AffinityValue,
    now_ns: u64,
    master: &SvcValue,
    member: bool,
) -> TraceAffinityEntry {
    TraceAffinityEntry {
        backend_id: v.backend_id,
        age_seconds: now_ns.saturating_sub(v.last_used_ns) as f64 / 1e9,
        fresh: affinity_fresh(v, now_ns, master.affinity_timeout_s),
        member,
    }
}

/// How the socket and the external trace word the affinity step.
pub(super) struct AffinityWords {
    /// Without an entry.
    pub first: &'static str,
    /// What happens when the entry cannot be used.
    pub anew: &'static str,
    /// One new connection (socket) or flow (external).
    pub unit: &'static str,
}

/// The affinity step's result and details for `who`, shared by both traces.
pub(super) fn affinity_text(
    who: &str,
    entry: Option<&TraceAffinityEntry>,
    used: bool,
    timeout_s: u32,
    words: AffinityWords,
) -> (String, Vec<String>) {
    let Some(e) = entry else {
        return (format!("no entry for {who}"), vec![words.first.to_owned()]);
    };
    let anew = words.anew;
    let why = if used {
        "used".to_owned()
    } else if !e.fresh {
        format!("expired (timeout {timeout_s}s): {anew}")
    } else if !e.member {
        format!("its backend left the Service: {anew}")
    } else {
        format!("its backend entry is missing: {anew}")
    };
    (
        format!("{who} → backend {}: {why}", e.backend_id),
        vec![format!(
            "last {} {:.1}s ago, timeout {timeout_s}s; backend still in the Service: {}",
            words.unit,
            e.age_seconds,
            if e.member { "yes" } else { "no" }
        )],
    )
}

/// The lc programs whose bound is `exact_max` ([`TraceMaps::lc_exact_max`]).
fn lc_programs(exact_max: u32) -> &'static str {
    if exact_max == LC_LOOP_MAX {
        "svclb_lcloop4/svclb_lcloop6"
    } else {
        "svclb_lc4/svclb_lc6"
    }
}

fn selection_step(
    master: &SvcValue,
    random: u32,
    slot: u16,
    backend_id: u32,
    lc: Option<LcPick>,
    exact_max: u32,
) -> TraceStep {
    if master.flags & SVC_FLAG_SCHED_LC != 0 {
        let (active, inactive) = lc.map_or((0, 0), |p| (p.load >> 8, p.load & 0xff));
        let how = match lc.map(|p| p.via) {
            Some(LcVia::TwoChoices { a, b }) => format!(
                "{}: the lighter of two random slots, {a} and {b} (approximate: a backend is drawn in proportion to its weight, the load alone decides)",
                if exact_max > 0 && master.count > exact_max {
                    format!(
                        "more than {exact_max} slots, the most {} compares",
                        lc_programs(exact_max)
                    )
                } else {
                    "no lc program (svclb_lc4/svclb_lc6, or svclb_lcloop4/svclb_lcloop6 with bpf_loop) loaded for these maps on this node: the agent loads them once a frontend is lc/wlc, and an older kernel's verifier may refuse them (see svc-lb status)".to_owned()
                }
            ),
            _ => format!(
                "by the lc program ({}, loaded on this node): every slot 1..={} compared: least load / weight, by cross-multiplication as IPVS does (exact); equal loads broken at random (this trace's seed {random})",
                lc_programs(exact_max),
                master.count
            ),
        };
        return TraceStep {
            step: "selection",
            result: format!("least connections: slot {slot} → backend {backend_id}"),
            details: vec![
                how,
                format!(
                    "chosen load {} = active × 256 + inactive (about {active} active, {inactive} inactive) at weight {}",
                    lc.map_or(0, |p| p.load),
                    lc.map_or(0, |p| p.weight)
                ),
            ],
        };
    }
    if master.flags & SVC_FLAG_SCHED_RR != 0 {
        return TraceStep {
            step: "selection",
            result: format!("slot {slot} in turn → backend {backend_id}"),
            details: vec![format!(
                "rr/wrr: slot = cursor % {count} + 1; the cursor is at {cursor}, so the next connection takes slot {slot} and the one after the next slot",
                count = master.count,
                cursor = master.backend_id
            )],
        };
    }
    TraceStep {
        step: "selection",
        result: format!("random slot {slot} → backend {backend_id}"),
        details: vec![format!(
            "slot = prandom % {count} + 1 (this trace drew {random}); each slot has probability 1/{count}",
            count = master.count
        )],
    }
}

pub(super) fn candidate(slot: u16, backend_id: u32, be: Option<&Backend>) -> TraceCandidate {
    match be.and_then(|b| codec::backend_from_raw(b).ok()) {
        Some(b) => TraceCandidate {
            slot,
            backend_id,
            address: b.addr.addr.to_string(),
            port: b.addr.port,
            state: names::backend_state(b.state),
        },
        None => TraceCandidate {
            slot,
            backend_id,
            address: String::new(),
            port: 0,
            state: "missing",
        },
    }
}

/// The steps as numbered lines.
pub fn render_text(t: &Trace) -> String {
    let mut out = format!(
        "trace {} {}{} (hooks: {})\n",
        t.protocol,
        t.destination,
        t.from
            .as_ref()
            .map(|f| format!(" from {f}"))
            .unwrap_or_default(),
        t.hooks
    );
    let width = t.steps.iter().map(|s| s.step.len()).max().unwrap_or(0);
    for (i, s) in t.steps.iter().enumerate() {
        out.push_str(&format!("{:>2}. {:<width$}  {}\n", i + 1, s.step, s.result));
        for d in &s.details {
            out.push_str(&format!("    {:<width$}    {d}\n", ""));
        }
    }
    out
}
