//! The per-connection backend choice, shared by the eBPF socket programs and
//! `svc-lb trace`.
//!
//! Both sides call [`choose_backend`] with closures that read their own view of the
//! maps: the eBPF side passes kernel map lookups, the CLI passes lookups into a snapshot
//! read from the pinned maps. The decision itself (which entry is consulted in which
//! order, which refusal reason applies) exists once, so `trace` cannot explain a choice
//! the datapath would not make.
use crate::{
    AffinityValue, CTR_EXT_BACKEND_MISSING, CTR_EXT_DROP_NO_LOCAL, CTR_EXT_DROP_SRC_RANGE,
    CTR_EXT_REJECT_NO_BACKEND, CTR_SOCK_BACKEND_MISS, CTR_SOCK_NO_BACKEND, CTR_SOCK_SLOT_MISS,
    CTR_SOCK_SRC_RANGE, MAGLEV_TABLE_MAX, SNAT_PORT_MAX, SNAT_PORT_MIN, SVC_FLAG_AFFINITY,
    SVC_FLAG_DROP_EMPTY, SVC_FLAG_SCHED_LC, SVC_FLAG_SCHED_RR, SVC_FLAG_SRC_RANGES, SvcValue,
    select_slot,
};

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`) as it sits in
/// an `addr_be` array: the bytes `00 00 ff ff` in network order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 address (network order) inside an IPv4-mapped IPv6 address, or `None`.
///
/// An AF_INET6 socket that is not `IPV6_V6ONLY` reaches IPv4 peers as `::ffff:a.b.c.d`
/// (Java, .NET and Go dual-stack sockets do). The kernel runs the IPv6 socket hooks
/// with that form, then sends IPv4 packets; so the socket programs look such a
/// destination up in the IPv4 Service maps and write mapped addresses back.
#[inline(always)]
pub fn v4_mapped(addr_be: &[u32; 4]) -> Option<u32> {
    if addr_be[0] == 0 && addr_be[1] == 0 && addr_be[2] == V4_MAPPED_WORD {
        Some(addr_be[3])
    } else {
        None
    }
}

/// `addr_be` (an IPv4 address in network order) as `::ffff:a.b.c.d`.
#[inline(always)]
pub fn to_v4_mapped(addr_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, addr_be]
}

/// Whether (and how) a backend choice is tied to the client (session affinity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stickiness {
    /// The Service has no session affinity.
    Off,
    /// The client's remembered backend was used. The caller refreshes the entry with
    /// `now_ns`, so the timeout counts from the last connection (kube-proxy's rule).
    Remembered { now_ns: u64 },
    /// A backend was picked at random; the caller remembers it for the client at
    /// `now_ns`. `stale` says a remembered entry existed but could not be used (it timed
    /// out, or its backend left the Service).
    New { now_ns: u64, stale: bool },
}

/// Whether a remembered entry may still be used at `now_ns`: within the Service's
/// timeout since its last use. A clock that went backwards (it cannot, it is
/// monotonic) counts as expired rather than as "used in the future".
#[inline(always)]
pub fn affinity_fresh(entry: &AffinityValue, now_ns: u64, timeout_s: u32) -> bool {
    match now_ns.checked_sub(entry.last_used_ns) {
        Some(age) => age <= u64::from(timeout_s) * 1_000_000_000,
        None => false,
    }
}

/// What the datapath does with one new connection (or unconnected datagram).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice<B> {
    /// No master entry for the destination: not a Service, pass it untouched.
    NotService,
    /// A load-balancer IP with `loadBalancerSourceRanges`, and the socket has no source
    /// address yet (unbound): the ranges cannot be checked in the hook, so the
    /// connection passes untouched (to the real load balancer, which applies them).
    SourceUnknown { rev_nat_id: u32 },
    /// A known Service that refuses the connection. `reason` is a `CTR_*` counter index.
    Refuse {
        reason: u32,
        rev_nat_id: u32,
        /// The slot that was chosen before the refusal (0 when none was).
        slot: u16,
        /// The backend id the slot pointed at (0 when none was read).
        backend_id: u32,
    },
    /// Rewrite the destination to `backend`.
    Backend {
        backend: B,
        backend_id: u32,
        rev_nat_id: u32,
        /// The slot `1..=count` that was chosen, or 0 when the client's remembered
        /// backend was used (session affinity).
        slot: u16,
        sticky: Stickiness,
    },
}

/// Chooses the backend of a new connection: master entry (slot 0) → backend count →
/// [`select_slot`] → slot entry → backend id → backend entry. O(1), no loop over
/// backends.
///
/// - `master`: the slot-0 entry of the destination (address, port, protocol, scope), or
///   `None` when there is none.
/// - `src_allowed`: for a master with `SVC_FLAG_SRC_RANGES` (a load-balancer IP with
///   `loadBalancerSourceRanges`), whether the client's source address is in a range of
///   `rev_nat_id`; `None` when the socket has no source address yet. Checked before
///   anything else, as on the external path: an excluded client is refused
///   (`CTR_SOCK_SRC_RANGE`) even by an empty Service, and learns nothing more.
/// - `random`: a uniform random number; called only when the Service has backends and
///   no `SVC_FLAG_SCHED_RR` (scheduler `random`: the slot layout carries the weights).
/// - `in_turn`: the frontend's round-robin cursor, advanced by one (an atomic fetch-add
///   on the master entry in eBPF); called instead of `random` for a master with
///   `SVC_FLAG_SCHED_RR` (schedulers `rr`/`wrr`), so slot `cursor % count + 1` follows
///   the layout in order.
/// - `least`: for a master with `SVC_FLAG_SCHED_LC` (schedulers `lc`/`wlc`), the slot
///   of the least loaded backend, called with `count` instead of `random`/`in_turn`;
///   the socket programs and `trace` both pass [`lc_scan`] with their own map readers.
/// - `slot_backend`: the `backend_id` stored in slot `n` (`1..=count`) of the same
///   frontend, or `None` when that slot is missing.
/// - `backend`: the backend entry for an id, or `None` when it is missing. `B` is
///   whatever the caller reads the address from (a map value pointer in eBPF, a copy in
///   the CLI).
///
/// A missing slot or backend entry means a planner bug or a map edited by hand (the
/// planner writes backends, then slots, then the master count): refusing is safer than
/// letting the connection reach the Service address.
///
/// Session affinity (`master.flags & SVC_FLAG_AFFINITY`), after the `count == 0` check
/// (an empty Service refuses whatever a client remembers) and before `random`:
/// - `now_ns`: the monotonic clock; called only for Services with affinity;
/// - `remembered`: the affinity entry of this client for the frontend (`rev_nat_id`);
/// - `is_member`: whether backend `id` still belongs to this frontend (the agent's
///   match map). An entry is used only when it is fresh ([`affinity_fresh`]), its
///   backend is a member and the backend entry exists; otherwise a new backend is
///   picked at random. The caller records the result ([`Stickiness`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn choose_backend<B>(
    master: Option<&SvcValue>,
    src_allowed: impl FnOnce(u32) -> Option<bool>,
    now_ns: impl FnOnce() -> u64,
    remembered: impl FnOnce(u32) -> Option<AffinityValue>,
    is_member: impl FnOnce(u32, u32) -> bool,
    random: impl FnOnce() -> u32,
    in_turn: impl FnOnce() -> u32,
    least: impl FnOnce(u32) -> Option<u16>,
    slot_backend: impl FnOnce(u16) -> Option<u32>,
    mut backend: impl FnMut(u32) -> Option<B>,
) -> Choice<B> {
    let Some(master) = master else {
        return Choice::NotService;
    };
    let rev_nat_id = master.rev_nat_id;
    if master.flags & SVC_FLAG_SRC_RANGES != 0 {
        match src_allowed(rev_nat_id) {
            Some(true) => {}
            Some(false) => {
                return Choice::Refuse {
                    reason: CTR_SOCK_SRC_RANGE,
                    rev_nat_id,
                    slot: 0,
                    backend_id: 0,
                };
            }
            None => return Choice::SourceUnknown { rev_nat_id },
        }
    }
    let count = master.count;
    let refuse_empty = Choice::Refuse {
        reason: CTR_SOCK_NO_BACKEND,
        rev_nat_id,
        slot: 0,
        backend_id: 0,
    };
    if count == 0 {
        return refuse_empty;
    }
    let sticky = match affinity(master, now_ns, remembered, is_member, &mut backend) {
        Affinity::Hit {
            backend,
            backend_id,
            sticky,
        } => {
            return Choice::Backend {
                backend,
                backend_id,
                rev_nat_id,
                slot: 0,
                sticky,
            };
        }
        Affinity::Miss(sticky) => sticky,
    };
    let slot = if master.flags & SVC_FLAG_SCHED_LC != 0 {
        least(count)
    } else if master.flags & SVC_FLAG_SCHED_RR != 0 {
        select_slot(in_turn(), count)
    } else {
        select_slot(random(), count)
    };
    let Some(slot) = slot else {
        return refuse_empty;
    };
    let Some(backend_id) = slot_backend(slot) else {
        return Choice::Refuse {
            reason: CTR_SOCK_SLOT_MISS,
            rev_nat_id,
            slot,
            backend_id: 0,
        };
    };
    match backend(backend_id) {
        Some(backend) => Choice::Backend {
            backend,
            backend_id,
            rev_nat_id,
            slot,
            sticky,
        },
        None => Choice::Refuse {
            reason: CTR_SOCK_BACKEND_MISS,
            rev_nat_id,
            slot,
            backend_id,
        },
    }
}

/// Most slots `lc`/`wlc` compare one by one. The connect hooks hand an `lc`/`wlc`
/// frontend to a separate program by a tail call (svc-lb-ebpf/src/sock.rs), which
/// holds the scan, so that the hooks every other connection runs carry none of its
/// verifier cost. A frontend with more slots (more backends, or weights whose
/// gcd-reduced sum is larger) is served by two random choices instead (see
/// [`lc_scan`]). The scan is a bounded loop over [`LcScan`] whose state lives in a
/// per-CPU map between the steps, run at the start of the lc program (one verifier
/// state enters it): the 6.18 verifier walks about 1 500 instructions per slot for
/// IPv4, twice that for the IPv6 program (which holds an IPv4 and an IPv6 scan).
pub const LC_SCAN_MAX: u32 = 64;

/// Most slots the `bpf_loop` lc programs (kernels ≥ 5.17) compare: every slot a
/// frontend can have (the agent's weighted layouts stop at 4096 slots), so `lc`/`wlc`
/// are exact there. Their verifier cost does not grow with it (one callback per step).
pub const LC_LOOP_MAX: u32 = 4096;

/// IPVS's load of a real server: active connections × 256 + inactive ones. Each count
/// is capped at 2^32 so that the products [`lc_less`] forms fit in 64 bits.
#[inline(always)]
pub fn lc_overhead(active: u64, inactive: u64) -> u64 {
    let cap = 1u64 << 32;
    let a = if active > cap { cap } else { active };
    let i = if inactive > cap { cap } else { inactive };
    (a << 8) + i
}

/// `wlc`'s comparison, as IPVS makes it: `a` (load, weight) is less loaded than `b` when
/// `load_a / weight_a < load_b / weight_b`, compared by cross-multiplication (no
/// division, exact). `lc` is the same with every weight 1. Weights are ≥ 1 (weight 0
/// drains: such a backend holds no slot).
#[inline(always)]
pub fn lc_less(a_load: u64, a_weight: u32, b_load: u64, b_weight: u32) -> bool {
    a_load.wrapping_mul(u64::from(b_weight)) < b_load.wrapping_mul(u64::from(a_weight))
}

/// How [`lc_scan`] chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LcVia {
    /// Every slot compared: the exact IPVS choice (ties broken by the seed).
    Scan,
    /// More slots than the exact scan takes: the lighter of two random slots `a` and
    /// `b` (weights shape the draw, the load alone decides between the two).
    TwoChoices { a: u16, b: u16 },
}

/// The choice of [`lc_scan`]: the first slot of the chosen backend's run, its load
/// ([`lc_overhead`]) and its weight (run length; 1 for two choices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LcPick {
    pub slot: u16,
    pub load: u64,
    pub weight: u32,
    pub via: LcVia,
}

/// Tie-break key of a slot: among equally loaded backends the one with the smallest
/// key wins, so ties spread over the backends instead of always taking the first
/// (which would send every UDP connection, never counted, to one backend).
#[inline(always)]
fn lc_tie(seed: u32, slot: u16) -> u32 {
    crate::maglev::mix64(u64::from(seed) | (u64::from(slot) << 32)) as u32
}

/// What a missing slot or backend weighs: more than any real load, small enough that a
/// product with a weight does not wrap.
const LC_MISSING: u64 = u64::MAX >> 17;

/// What the best run weighs before any run was compared: more than a missing slot at
/// weight 1, so that the first run always wins against it.
const LC_NONE: u64 = LC_MISSING + 1;

/// The exact `lc`/`wlc` scan as a state fed one slot at a time, in order `1..=count`:
/// [`lc_scan`] drives it with a loop, the eBPF lc programs with steps written out.
/// A run's length is the distance between its first slot and the next run's, not a
/// counter, and no field is a "none yet" flag that every step tests.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct LcScan {
    best_load: u64,
    run_load: u64,
    best_weight: u32,
    best_tie: u32,
    run_id: u32,
    seed: u32,
    best_slot: u16,
    run_first: u16,
}

impl LcScan {
    /// Starts a scan: slot 1 holds `id` (readers as for [`LcScan::step`]).
    #[inline(always)]
    pub fn new(seed: u32, id: Option<u32>, load: impl FnOnce(u32) -> Option<u64>) -> Self {
        let mut s = Self {
            best_load: LC_NONE,
            run_load: 0,
            best_weight: 1,
            best_tie: 0,
            run_id: 0,
            seed,
            best_slot: 0,
            run_first: 1,
        };
        s.start(1, id, load);
        s
    }

    /// Slot `slot` (2, 3, … in order) holds backend `id` (`None`: the slot is
    /// missing). A slot continuing the run of the previous one adds to its weight;
    /// another ends that run and starts its own, and only then is `load(id)` asked (the
    /// backend's [`lc_overhead`], `None` when its entry is missing). A missing slot or
    /// backend counts as fully loaded.
    #[inline(always)]
    pub fn step(&mut self, slot: u16, id: Option<u32>, load: impl FnOnce(u32) -> Option<u64>) {
        if !self.continues(id) {
            self.consider(slot);
            self.start(slot, id, load);
        }
    }

    /// Whether a slot holding `id` continues the run being read ([`LcScan::step`] in
    /// parts, for a caller that keeps the state in memory between them: `continues`;
    /// if not, `consider` the slot, then `start` its run).
    #[inline(always)]
    pub fn continues(&self, id: Option<u32>) -> bool {
        matches!(id, Some(id) if id != 0 && id == self.run_id)
    }

    /// The second part of [`LcScan::step`] (see [`LcScan::continues`]).
    #[inline(always)]
    pub fn start(&mut self, slot: u16, id: Option<u32>, load: impl FnOnce(u32) -> Option<u64>) {
        let (id, l) = match id {
            Some(id) => (id, load(id).unwrap_or(LC_MISSING)),
            None => (0, LC_MISSING),
        };
        self.run_id = id;
        self.run_first = slot;
        self.run_load = l;
    }

    /// Compares the run that ends before slot `end` with the best so far: the least
    /// `load / weight` wins ([`lc_less`]), ties by a key mixed from the seed.
    /// The first part of [`LcScan::step`] for a slot `end` that does not continue the
    /// run (see [`LcScan::continues`]).
    #[inline(always)]
    pub fn consider(&mut self, end: u16) {
        let (first, l) = (self.run_first, self.run_load);
        let w = u32::from(end.wrapping_sub(first));
        let tie = lc_tie(self.seed, first);
        let better = lc_less(l, w, self.best_load, self.best_weight)
            || (!lc_less(self.best_load, self.best_weight, l, w) && tie < self.best_tie);
        if better {
            self.best_slot = first;
            self.best_load = l;
            self.best_weight = w;
            self.best_tie = tie;
        }
    }

    /// Ends the scan after the last slot `count`: the last run is compared, and
    /// [`LcScan::best_slot`] holds the choice.
    #[inline(always)]
    pub fn conclude(&mut self, count: u32) {
        self.consider((count as u16).wrapping_add(1));
    }

    /// The least loaded run's first slot so far (0: none), after [`LcScan::conclude`]
    /// the choice.
    #[inline(always)]
    pub fn best_slot(&self) -> u16 {
        self.best_slot
    }

    /// The least loaded run's first slot, after the last slot `count`.
    #[inline(always)]
    pub fn finish(mut self, count: u32) -> Option<LcPick> {
        self.conclude(count);
        if self.best_slot == 0 {
            return None;
        }
        Some(LcPick {
            slot: self.best_slot,
            load: self.best_load,
            weight: self.best_weight,
            via: LcVia::Scan,
        })
    }
}

/// The approximate `lc`/`wlc` choice: the lighter of two slots drawn from `seed`
/// (power of two choices). A backend's chance to be drawn is its weight's share; the
/// loads decide. `count` must not be 0. Readers as for [`lc_scan`].
#[inline(always)]
pub fn lc_two_choices(
    count: u32,
    seed: u32,
    mut slot_backend: impl FnMut(u16) -> Option<u32>,
    mut load: impl FnMut(u32) -> Option<u64>,
) -> LcPick {
    let count = if count == 0 { 1 } else { count };
    let a = (seed % count) as u16 + 1;
    let b = (lc_tie(seed, 0) % count) as u16 + 1;
    let la = slot_backend(a).and_then(&mut load).unwrap_or(LC_MISSING);
    let lb = slot_backend(b).and_then(&mut load).unwrap_or(LC_MISSING);
    let (slot, l) = if lb < la { (b, lb) } else { (a, la) };
    LcPick {
        slot,
        load: l,
        weight: 1,
        via: LcVia::TwoChoices { a, b },
    }
}

/// `lc`/`wlc`: the slot of the backend with the least load per weight. The layout
/// holds each backend's slots as one run (its weight).
///
/// - `count ≤ exact_max`: slots `1..=count` are read in order ([`LcScan`]); each run of
///   one backend id is a candidate whose weight is the run's length; the least
///   `load / weight` wins ([`lc_less`]), ties by a key mixed from `seed`. Exact.
/// - above: [`lc_two_choices`]. The datapath's `exact_max` is [`LC_SCAN_MAX`] where
///   the lc programs are loaded, else 0.
///
/// `slot_backend(n)`: backend id of slot `n` (`None` when missing); `load(id)`: the
/// backend's [`lc_overhead`] (`None` when its entry is missing). A missing slot or
/// backend counts as fully loaded, so it is taken only when nothing else is there (and
/// the caller then refuses, as for any missing entry). `None` only for `count == 0`.
pub fn lc_scan(
    count: u32,
    seed: u32,
    exact_max: u32,
    mut slot_backend: impl FnMut(u16) -> Option<u32>,
    mut load: impl FnMut(u32) -> Option<u64>,
) -> Option<LcPick> {
    if count == 0 {
        return None;
    }
    if count > exact_max {
        return Some(lc_two_choices(count, seed, slot_backend, load));
    }
    let mut scan = LcScan::new(seed, slot_backend(1), &mut load);
    for slot in 2..=count {
        let slot = slot as u16;
        scan.step(slot, slot_backend(slot), &mut load);
    }
    scan.finish(count)
}

/// The session-affinity step shared by [`choose_backend`] and [`choose_external`].
enum Affinity<B> {
    /// The remembered backend is fresh, still a member, and present.
    Hit {
        backend: B,
        backend_id: u32,
        sticky: Stickiness,
    },
    /// Choose a new backend; how to remember it (`Off` without affinity).
    Miss(Stickiness),
}

#[inline(always)]
fn affinity<B>(
    master: &SvcValue,
    now_ns: impl FnOnce() -> u64,
    remembered: impl FnOnce(u32) -> Option<AffinityValue>,
    is_member: impl FnOnce(u32, u32) -> bool,
    backend: &mut impl FnMut(u32) -> Option<B>,
) -> Affinity<B> {
    if master.flags & SVC_FLAG_AFFINITY == 0 {
        return Affinity::Miss(Stickiness::Off);
    }
    let now = now_ns();
    let Some(entry) = remembered(master.rev_nat_id) else {
        return Affinity::Miss(Stickiness::New {
            now_ns: now,
            stale: false,
        });
    };
    if affinity_fresh(&entry, now, master.affinity_timeout_s)
        && is_member(entry.backend_id, master.rev_nat_id)
        && let Some(b) = backend(entry.backend_id)
    {
        return Affinity::Hit {
            backend: b,
            backend_id: entry.backend_id,
            sticky: Stickiness::Remembered { now_ns: now },
        };
    }
    Affinity::Miss(Stickiness::New {
        now_ns: now,
        stale: true,
    })
}

/// How [`choose_external`] found the backend of a new external flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtVia {
    /// The client's remembered backend (session affinity ClientIP).
    Affinity,
    /// `LB_MAGLEV_V1[rev_nat_id].backend_ids[flow_hash % maglev_size]`.
    Maglev { index: u32 },
    /// The frontend had no usable Maglev table: slot `flow_hash % count + 1` instead
    /// (the caller counts `CTR_EXT_MAGLEV_MISSING`).
    SlotFallback { slot: u16 },
}

/// What the external path (tc/XDP) does with the first packet of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtChoice<B> {
    /// No external frontend for the destination: pass it untouched.
    NotService,
    /// Drop the packet silently; `reason` is a `CTR_EXT_*` counter index.
    Drop { reason: u32, rev_nat_id: u32 },
    /// Answer ICMP/ICMPv6 port unreachable (`CTR_EXT_REJECT_NO_BACKEND`).
    Reject { reason: u32, rev_nat_id: u32 },
    /// Send the flow to `backend`.
    Backend {
        backend: B,
        backend_id: u32,
        rev_nat_id: u32,
        /// The master entry's `SVC_FLAG_*` bits (the caller needs `SVC_FLAG_EXT_LOCAL`).
        svc_flags: u16,
        via: ExtVia,
        sticky: Stickiness,
    },
}

/// Index into a Maglev table of `size` entries for a flow hash, or `None` when the size
/// is unusable (0, or larger than the table type holds).
#[inline(always)]
pub fn maglev_index(flow_hash: u32, size: u32) -> Option<u32> {
    if size == 0 || size as usize > MAGLEV_TABLE_MAX {
        return None;
    }
    Some(flow_hash % size)
}

/// Chooses what happens to a new external flow. The tc and XDP programs and
/// `svc-lb trace` call this with their own map readers, so they cannot disagree.
///
/// Order (each step only runs when the previous ones let the packet through):
/// 1. `master` (the `SCOPE_EXTERNAL` slot-0 entry, exact address first, then the
///    NodePort wildcard; the caller does both lookups) missing → [`ExtChoice::NotService`];
/// 2. `SVC_FLAG_SRC_RANGES` and `src_allowed(rev_nat_id)` false → drop
///    (`CTR_EXT_DROP_SRC_RANGE`): a filtered client learns nothing, not even "no
///    endpoints";
/// 3. `count == 0` → drop with `SVC_FLAG_DROP_EMPTY` (`CTR_EXT_DROP_NO_LOCAL`), else
///    reject (`CTR_EXT_REJECT_NO_BACKEND`);
/// 4. session affinity as in [`choose_backend`] (`remembered`, `is_member`, fresh);
/// 5. Maglev: `maglev(rev_nat_id, index)` returns the backend id at `index` of the
///    frontend's table, `None` when the frontend has no table; `maglev_size` is
///    `ExtConfig.maglev_size`. Without a usable table the flow hash picks a slot
///    (`slot_backend`), which keeps one flow on one backend while the set is stable;
/// 6. `backend(id)` missing (or a zero id in the table) → drop
///    (`CTR_EXT_BACKEND_MISSING`; a planner bug or a table written before its backends).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn choose_external<B>(
    master: Option<&SvcValue>,
    src_allowed: impl FnOnce(u32) -> bool,
    flow_hash: u32,
    now_ns: impl FnOnce() -> u64,
    remembered: impl FnOnce(u32) -> Option<AffinityValue>,
    is_member: impl FnOnce(u32, u32) -> bool,
    maglev_size: u32,
    maglev: impl FnOnce(u32, u32) -> Option<u32>,
    slot_backend: impl FnOnce(u16) -> Option<u32>,
    mut backend: impl FnMut(u32) -> Option<B>,
) -> ExtChoice<B> {
    let Some(master) = master else {
        return ExtChoice::NotService;
    };
    let rev_nat_id = master.rev_nat_id;
    let svc_flags = master.flags;
    if svc_flags & SVC_FLAG_SRC_RANGES != 0 && !src_allowed(rev_nat_id) {
        return ExtChoice::Drop {
            reason: CTR_EXT_DROP_SRC_RANGE,
            rev_nat_id,
        };
    }
    if master.count == 0 {
        return if svc_flags & SVC_FLAG_DROP_EMPTY != 0 {
            ExtChoice::Drop {
                reason: CTR_EXT_DROP_NO_LOCAL,
                rev_nat_id,
            }
        } else {
            ExtChoice::Reject {
                reason: CTR_EXT_REJECT_NO_BACKEND,
                rev_nat_id,
            }
        };
    }
    let sticky = match affinity(master, now_ns, remembered, is_member, &mut backend) {
        Affinity::Hit {
            backend,
            backend_id,
            sticky,
        } => {
            return ExtChoice::Backend {
                backend,
                backend_id,
                rev_nat_id,
                svc_flags,
                via: ExtVia::Affinity,
                sticky,
            };
        }
        Affinity::Miss(sticky) => sticky,
    };
    let from_table = match maglev_index(flow_hash, maglev_size) {
        Some(index) => maglev(rev_nat_id, index).map(|id| (id, ExtVia::Maglev { index })),
        None => None,
    };
    let (backend_id, via) = match from_table {
        Some(found) => found,
        None => {
            let Some(slot) = select_slot(flow_hash, master.count) else {
                return ExtChoice::Reject {
                    reason: CTR_EXT_REJECT_NO_BACKEND,
                    rev_nat_id,
                };
            };
            match slot_backend(slot) {
                Some(id) => (id, ExtVia::SlotFallback { slot }),
                None => {
                    return ExtChoice::Drop {
                        reason: CTR_EXT_BACKEND_MISSING,
                        rev_nat_id,
                    };
                }
            }
        }
    };
    let found = if backend_id == 0 {
        None
    } else {
        backend(backend_id)
    };
    match found {
        Some(b) => ExtChoice::Backend {
            backend: b,
            backend_id,
            rev_nat_id,
            svc_flags,
            via,
            sticky,
        },
        None => ExtChoice::Drop {
            reason: CTR_EXT_BACKEND_MISSING,
            rev_nat_id,
        },
    }
}

/// The SNAT port range in effect: `ExtConfig`'s (host order, inclusive), or
/// `SNAT_PORT_MIN..=SNAT_PORT_MAX` when it holds none (an older agent's config) or an
/// inverted one.
#[inline(always)]
pub fn snat_range(min: u16, max: u16) -> (u16, u16) {
    if min == 0 || max < min {
        (SNAT_PORT_MIN, SNAT_PORT_MAX)
    } else {
        (min, max)
    }
}

/// SNAT source port (host order) to try on `attempt` (0-based) for a flow from
/// `client_port` (host order), within `min..=max` (see [`snat_range`]). Attempt 0 keeps
/// the client's port when it lies in the range (the range is chosen to be outside the
/// node's ephemeral ports and its node ports, so a node-local socket is unlikely to hold
/// it); every other attempt, and attempt 0 for a client port outside the range, is a
/// pseudo-random port of the range derived from `seed` (the flow hash) and the attempt
/// number. The caller claims the port by inserting the reply conntrack key with
/// BPF_NOEXIST, so a taken port is never reused.
#[inline(always)]
pub fn snat_port(client_port: u16, seed: u32, attempt: u32, min: u16, max: u16) -> u16 {
    let (min, max) = snat_range(min, max);
    if attempt == 0 && client_port != 0 && (min..=max).contains(&client_port) {
        return client_port;
    }
    let span = u32::from(max - min) + 1;
    let mixed = crate::maglev::mix64(u64::from(seed) | (u64::from(attempt) << 32)) as u32;
    min + (mixed % span) as u16
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use bytemuck::Zeroable;

    fn master(count: u32) -> SvcValue {
        SvcValue {
            count,
            rev_nat_id: 7,
            ..SvcValue::zeroed()
        }
    }

    fn sticky_master(count: u32, timeout_s: u32) -> SvcValue {
        SvcValue {
            flags: SVC_FLAG_AFFINITY,
            affinity_timeout_s: timeout_s,
            ..master(count)
        }
    }

    /// `choose_backend` without session affinity: the affinity closures must not run.
    fn choose<B>(
        m: Option<&SvcValue>,
        random: impl FnOnce() -> u32,
        slot_backend: impl FnOnce(u16) -> Option<u32>,
        backend: impl FnMut(u32) -> Option<B>,
    ) -> Choice<B> {
        choose_backend(
            m,
            |_| panic!("source ranges read without the flag"),
            || panic!("clock read without affinity"),
            |_| panic!("affinity map read without affinity"),
            |_, _| panic!("match map read without affinity"),
            random,
            || panic!("round-robin cursor read without SVC_FLAG_SCHED_RR"),
            |_| panic!("lc scan without SVC_FLAG_SCHED_LC"),
            slot_backend,
            backend,
        )
    }

    /// loadBalancerSourceRanges on the socket path: checked first (even an empty
    /// Service refuses an excluded source with the range reason), an unknown source
    /// passes untouched, an allowed one goes on to the usual choice.
    #[test]
    fn source_ranges_refuse_excluded_and_pass_unknown_sources() {
        let run = |count: u32, allowed: Option<bool>| -> Choice<u32> {
            let m = SvcValue {
                flags: SVC_FLAG_SRC_RANGES,
                ..master(count)
            };
            choose_backend(
                Some(&m),
                |rev| {
                    assert_eq!(rev, 7);
                    allowed
                },
                || panic!("clock read without affinity"),
                |_| panic!("affinity map read without affinity"),
                |_, _| panic!("match map read without affinity"),
                || 0,
                || panic!("cursor read without SVC_FLAG_SCHED_RR"),
                |_| panic!("lc scan without SVC_FLAG_SCHED_LC"),
                |_| Some(11),
                Some,
            )
        };
        for count in [0, 2] {
            assert_eq!(
                run(count, Some(false)),
                Choice::Refuse {
                    reason: CTR_SOCK_SRC_RANGE,
                    rev_nat_id: 7,
                    slot: 0,
                    backend_id: 0
                }
            );
            assert_eq!(run(count, None), Choice::SourceUnknown { rev_nat_id: 7 });
        }
        assert!(matches!(
            run(0, Some(true)),
            Choice::Refuse {
                reason: CTR_SOCK_NO_BACKEND,
                ..
            }
        ));
        assert!(matches!(
            run(2, Some(true)),
            Choice::Backend { backend_id: 11, .. }
        ));
    }

    #[test]
    fn v4_mapped_only_matches_ffff_prefix() {
        use core::net::{Ipv4Addr, Ipv6Addr};
        let words = |a: Ipv6Addr| {
            let o = a.octets();
            core::array::from_fn::<u32, 4, _>(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        };
        let v4 = Ipv4Addr::new(10, 96, 0, 10);
        let v4_be = u32::from_ne_bytes(v4.octets());
        let mapped = words(v4.to_ipv6_mapped());
        assert_eq!(v4_mapped(&mapped), Some(v4_be));
        assert_eq!(to_v4_mapped(v4_be), mapped);
        // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96) and plain IPv6 are not mapped.
        for other in [
            "::10.96.0.10",
            "64:ff9b::10.96.0.10",
            "fd00:96::10",
            "::1",
            "::",
            "1::ffff:10.96.0.10",
        ] {
            let a: Ipv6Addr = other.parse().unwrap();
            assert_eq!(v4_mapped(&words(a)), None, "{other}");
        }
    }

    #[test]
    fn no_master_is_not_a_service() {
        let c: Choice<u32> = choose(None, || 0, |_| Some(1), Some);
        assert_eq!(c, Choice::NotService);
    }

    #[test]
    fn empty_service_refuses_without_drawing_a_random_number() {
        let m = master(0);
        let c: Choice<u32> = choose(
            Some(&m),
            || panic!("random drawn for an empty Service"),
            |_| Some(1),
            Some,
        );
        assert_eq!(
            c,
            Choice::Refuse {
                reason: CTR_SOCK_NO_BACKEND,
                rev_nat_id: 7,
                slot: 0,
                backend_id: 0
            }
        );
    }

    #[test]
    fn random_picks_slot_then_backend() {
        let m = master(3);
        let slots = [0u32, 11, 12, 13];
        let c = choose(
            Some(&m),
            || 4,
            |s| slots.get(usize::from(s)).copied(),
            |id| Some(id * 10),
        );
        // 4 % 3 + 1 = slot 2 → backend 12.
        assert_eq!(
            c,
            Choice::Backend {
                backend: 120,
                backend_id: 12,
                rev_nat_id: 7,
                slot: 2,
                sticky: Stickiness::Off,
            }
        );
    }

    /// `rr`/`wrr`: the cursor, not a random number, picks the slot, so consecutive
    /// connections walk the layout in order.
    #[test]
    fn in_turn_walks_the_slots_in_order() {
        let m = SvcValue {
            flags: SVC_FLAG_SCHED_RR,
            ..master(3)
        };
        let slots = [0u32, 11, 12, 13];
        let walked: std::vec::Vec<u16> = (0..7u32)
            .map(|cursor| {
                match choose_backend(
                    Some(&m),
                    |_| panic!("source ranges read without the flag"),
                    || panic!("clock read without affinity"),
                    |_| panic!("affinity map read without affinity"),
                    |_, _| panic!("match map read without affinity"),
                    || panic!("random number drawn for an in-turn frontend"),
                    || cursor,
                    |_| panic!("lc scan without SVC_FLAG_SCHED_LC"),
                    |s| slots.get(usize::from(s)).copied(),
                    Some,
                ) {
                    Choice::Backend { slot, .. } => slot,
                    other => panic!("unexpected {other:?}"),
                }
            })
            .collect();
        assert_eq!(walked, [1, 2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn missing_slot_or_backend_refuses_with_its_reason() {
        let m = master(2);
        let c: Choice<u32> = choose(Some(&m), || 1, |_| None, Some);
        assert!(matches!(
            c,
            Choice::Refuse {
                reason: CTR_SOCK_SLOT_MISS,
                slot: 2,
                ..
            }
        ));
        let c: Choice<u32> = choose(Some(&m), || 1, |_| Some(5), |_| None);
        assert!(matches!(
            c,
            Choice::Refuse {
                reason: CTR_SOCK_BACKEND_MISS,
                slot: 2,
                backend_id: 5,
                ..
            }
        ));
    }

    const SEC: u64 = 1_000_000_000;

    fn entry(backend_id: u32, last_used_ns: u64) -> AffinityValue {
        AffinityValue {
            last_used_ns,
            backend_id,
            _pad: 0,
        }
    }

    /// Affinity on: the remembered backend when it is fresh, a member and exists;
    /// otherwise a random one, and the caller is told to remember it.
    fn sticky_choice(
        remembered: Option<AffinityValue>,
        member: bool,
        exists: bool,
        now: u64,
    ) -> Choice<u32> {
        let m = sticky_master(3, 10);
        let slots = [0u32, 11, 12, 13];
        choose_backend(
            Some(&m),
            |_| panic!("source ranges read without the flag"),
            || now,
            |rev| {
                assert_eq!(rev, 7, "the entry is looked up for this frontend");
                remembered
            },
            |id, rev| {
                assert_eq!((id, rev), (13, 7));
                member
            },
            || 0,
            || panic!("cursor read without SVC_FLAG_SCHED_RR"),
            |_| panic!("lc scan without SVC_FLAG_SCHED_LC"),
            |s| slots.get(usize::from(s)).copied(),
            |id| (id != 13 || exists).then_some(id * 10),
        )
    }

    #[test]
    fn affinity_uses_a_fresh_member_and_refreshes_it() {
        let now = 100 * SEC;
        assert_eq!(
            sticky_choice(Some(entry(13, now - 10 * SEC)), true, true, now),
            Choice::Backend {
                backend: 130,
                backend_id: 13,
                rev_nat_id: 7,
                slot: 0,
                sticky: Stickiness::Remembered { now_ns: now },
            }
        );
    }

    #[test]
    fn affinity_picks_anew_without_a_usable_entry() {
        let now = 100 * SEC;
        let random = |sticky| Choice::Backend {
            backend: 110,
            backend_id: 11,
            rev_nat_id: 7,
            slot: 1,
            sticky,
        };
        // No entry yet.
        assert_eq!(
            sticky_choice(None, true, true, now),
            random(Stickiness::New {
                now_ns: now,
                stale: false
            })
        );
        let stale = Stickiness::New {
            now_ns: now,
            stale: true,
        };
        // Timed out (one nanosecond past the timeout since the last connection).
        assert_eq!(
            sticky_choice(Some(entry(13, now - 10 * SEC - 1)), true, true, now),
            random(stale)
        );
        // The backend left the Service (or its id was reused elsewhere).
        assert_eq!(
            sticky_choice(Some(entry(13, now - SEC)), false, true, now),
            random(stale)
        );
        // The backend entry is gone.
        assert_eq!(
            sticky_choice(Some(entry(13, now - SEC)), true, false, now),
            random(stale)
        );
    }

    #[test]
    fn affinity_never_resurrects_an_empty_service() {
        let m = sticky_master(0, 10);
        let c: Choice<u32> = choose_backend(
            Some(&m),
            |_| panic!("source ranges read without the flag"),
            || panic!("clock read for an empty Service"),
            |_| Some(entry(13, 0)),
            |_, _| true,
            || 0,
            || panic!("cursor read for an empty Service"),
            |_| panic!("lc scan without SVC_FLAG_SCHED_LC"),
            |_| Some(13),
            Some,
        );
        assert!(matches!(
            c,
            Choice::Refuse {
                reason: CTR_SOCK_NO_BACKEND,
                ..
            }
        ));
    }

    #[test]
    fn freshness_counts_from_the_last_use() {
        let e = entry(1, 5 * SEC);
        assert!(affinity_fresh(&e, 5 * SEC, 1));
        assert!(affinity_fresh(&e, 6 * SEC, 1));
        assert!(!affinity_fresh(&e, 6 * SEC + 1, 1));
        assert!(
            !affinity_fresh(&e, 4 * SEC, 1),
            "a clock going back is expired"
        );
        // The largest timeout cannot overflow.
        assert!(affinity_fresh(
            &e,
            5 * SEC + u64::from(u32::MAX) * SEC,
            u32::MAX
        ));
    }
    // ---- choose_external ----

    fn ext_master(count: u32, flags: u16) -> SvcValue {
        SvcValue {
            count,
            rev_nat_id: 9,
            flags,
            ..SvcValue::zeroed()
        }
    }

    /// `choose_external` without affinity: the affinity closures must not run.
    fn ext(
        m: Option<&SvcValue>,
        allowed: bool,
        hash: u32,
        size: u32,
        table: Option<&[u32]>,
        slots: &[u32],
        backends: &[u32],
    ) -> ExtChoice<u32> {
        choose_external(
            m,
            |rev| {
                assert_eq!(rev, 9);
                allowed
            },
            hash,
            || panic!("clock read without affinity"),
            |_| panic!("affinity read without affinity"),
            |_, _| panic!("match read without affinity"),
            size,
            |rev, index| {
                assert_eq!(rev, 9);
                table.and_then(|t| t.get(index as usize).copied())
            },
            |s| slots.get(usize::from(s)).copied(),
            |id| backends.contains(&id).then_some(id * 10),
        )
    }

    #[test]
    fn external_not_service_without_master() {
        assert_eq!(ext(None, true, 0, 7, None, &[], &[]), ExtChoice::NotService);
    }

    #[test]
    fn external_source_range_drops_before_anything_else() {
        // Even an empty Service drops (not rejects) a filtered source.
        let m = ext_master(0, SVC_FLAG_SRC_RANGES);
        assert_eq!(
            ext(Some(&m), false, 0, 7, None, &[], &[]),
            ExtChoice::Drop {
                reason: CTR_EXT_DROP_SRC_RANGE,
                rev_nat_id: 9
            }
        );
        // An allowed source of the same empty Service is rejected.
        assert_eq!(
            ext(Some(&m), true, 0, 7, None, &[], &[]),
            ExtChoice::Reject {
                reason: CTR_EXT_REJECT_NO_BACKEND,
                rev_nat_id: 9
            }
        );
        // Without the flag the source is never checked.
        let m = ext_master(1, 0);
        let t = [5u32; 7];
        assert!(matches!(
            ext(Some(&m), false, 3, 7, Some(&t), &[], &[5]),
            ExtChoice::Backend { backend_id: 5, .. }
        ));
    }

    #[test]
    fn external_empty_drops_only_with_drop_empty() {
        let m = ext_master(0, crate::SVC_FLAG_EXT_LOCAL | SVC_FLAG_DROP_EMPTY);
        assert_eq!(
            ext(Some(&m), true, 0, 7, None, &[], &[]),
            ExtChoice::Drop {
                reason: CTR_EXT_DROP_NO_LOCAL,
                rev_nat_id: 9
            }
        );
        let m = ext_master(0, crate::SVC_FLAG_EXT_LOCAL);
        assert!(matches!(
            ext(Some(&m), true, 0, 7, None, &[], &[]),
            ExtChoice::Reject { .. }
        ));
    }

    #[test]
    fn external_maglev_indexes_hash_mod_size() {
        let m = ext_master(3, 0);
        let table = [1u32, 2, 3, 1, 2, 3, 1];
        for hash in [0u32, 5, 6, 13, 1_000_003] {
            let index = hash % 7;
            assert_eq!(
                ext(Some(&m), true, hash, 7, Some(&table), &[], &[1, 2, 3]),
                ExtChoice::Backend {
                    backend: table[index as usize] * 10,
                    backend_id: table[index as usize],
                    rev_nat_id: 9,
                    svc_flags: 0,
                    via: ExtVia::Maglev { index },
                    sticky: Stickiness::Off,
                }
            );
        }
    }

    #[test]
    fn external_without_table_falls_back_to_a_hashed_slot() {
        let m = ext_master(2, 0);
        let slots = [0u32, 21, 22];
        // No table for the frontend.
        assert_eq!(
            ext(Some(&m), true, 5, 7, None, &slots, &[21, 22]),
            ExtChoice::Backend {
                backend: 220,
                backend_id: 22,
                rev_nat_id: 9,
                svc_flags: 0,
                via: ExtVia::SlotFallback { slot: 2 },
                sticky: Stickiness::Off,
            }
        );
        // A size the table type cannot hold, or zero, is not used either.
        let big = [21u32; 4];
        for size in [0u32, MAGLEV_TABLE_MAX as u32 + 1] {
            assert!(matches!(
                ext(Some(&m), true, 4, size, Some(&big), &slots, &[21, 22]),
                ExtChoice::Backend {
                    via: ExtVia::SlotFallback { slot: 1 },
                    ..
                }
            ));
        }
    }

    #[test]
    fn external_missing_backend_drops() {
        let m = ext_master(1, 0);
        // Zero id in the table (not yet written) and an id without a backend entry.
        for table in [[0u32; 7], [4u32; 7]] {
            assert_eq!(
                ext(Some(&m), true, 1, 7, Some(&table), &[], &[5]),
                ExtChoice::Drop {
                    reason: CTR_EXT_BACKEND_MISSING,
                    rev_nat_id: 9
                }
            );
        }
        // Fallback slot missing.
        assert!(matches!(
            ext(Some(&m), true, 1, 7, None, &[0], &[5]),
            ExtChoice::Drop {
                reason: CTR_EXT_BACKEND_MISSING,
                ..
            }
        ));
    }

    #[test]
    fn external_affinity_prefers_a_fresh_member_over_maglev() {
        let m = SvcValue {
            affinity_timeout_s: 10,
            ..ext_master(2, SVC_FLAG_AFFINITY)
        };
        let table = [1u32; 7];
        let run = |remembered: Option<AffinityValue>, member: bool| {
            choose_external(
                Some(&m),
                |_| panic!("no source ranges"),
                3,
                || 100 * SEC,
                |_| remembered,
                |id, rev| {
                    assert_eq!((id, rev), (2, 9));
                    member
                },
                7,
                |_, i| table.get(i as usize).copied(),
                |_| None,
                |id| Some(id * 10),
            )
        };
        assert!(matches!(
            run(Some(entry(2, 95 * SEC)), true),
            ExtChoice::Backend {
                backend_id: 2,
                via: ExtVia::Affinity,
                sticky: Stickiness::Remembered { .. },
                ..
            }
        ));
        // Not a member any more → Maglev, and the caller is told the entry was stale.
        assert!(matches!(
            run(Some(entry(2, 95 * SEC)), false),
            ExtChoice::Backend {
                backend_id: 1,
                via: ExtVia::Maglev { index: 3 },
                sticky: Stickiness::New { stale: true, .. },
                ..
            }
        ));
        assert!(matches!(
            run(None, true),
            ExtChoice::Backend {
                backend_id: 1,
                sticky: Stickiness::New { stale: false, .. },
                ..
            }
        ));
    }

    #[test]
    fn snat_port_keeps_a_client_port_inside_the_range_first() {
        // The default range (a config without one).
        assert_eq!(snat_port(62000, 99, 0, 0, 0), 62000);
        assert_ne!(snat_port(1234, 99, 0, 0, 0), 1234);
        // A configured range: the client's port is kept only inside it.
        assert_eq!(snat_port(1234, 99, 0, 1024, 2047), 1234);
        assert_ne!(snat_port(62000, 99, 0, 1024, 2047), 62000);
        for (min, max) in [
            (0u16, 0u16),
            (1024, 2047),
            (40_000, 40_000),
            (65_535, 65_535),
        ] {
            let (lo, hi) = snat_range(min, max);
            for attempt in 0..8 {
                for client in [40_000u16, 1234, 62_000, 0] {
                    let p = snat_port(client, 77, attempt, min, max);
                    assert!(
                        (lo..=hi).contains(&p),
                        "{p} outside {lo}-{hi} (client {client})"
                    );
                }
            }
        }
        // Attempts differ from each other (a retry does not test the same port again).
        let ports: std::collections::BTreeSet<u16> =
            (1..8).map(|a| snat_port(40_000, 77, a, 0, 0)).collect();
        assert!(ports.len() >= 6, "{ports:?}");
        assert_eq!(snat_port(0, 5, 0, 0, 0), snat_port(40_000, 5, 0, 0, 0));
        // An inverted range falls back to the default.
        assert_eq!(snat_range(5000, 4000), (SNAT_PORT_MIN, SNAT_PORT_MAX));
    }

    #[test]
    fn reject_bucket_allows_the_burst_then_the_rate() {
        use crate::{BucketTake, RejectBucket, reject_bucket};
        const MS: u64 = 1_000_000;
        // Simulates the eBPF side: Consume takes one credit, Refill replaces the state.
        let mut b = RejectBucket {
            stamp_ns: 0,
            credit: 0,
        };
        let mut take = |now: u64| match reject_bucket(&b, now, 100, 5) {
            BucketTake::Consume => {
                b.credit -= 1;
                true
            }
            BucketTake::Refill { stamp_ns, credit } => {
                b = RejectBucket { stamp_ns, credit };
                true
            }
            BucketTake::Empty => false,
        };
        let t0 = 5_000 * MS;
        // A burst of 20 at once: the first 5 pass.
        let sent = (0..20).filter(|_| take(t0)).count();
        assert_eq!(sent, 5);
        // 100/s: one credit per 10 ms.
        assert!(!take(t0 + 5 * MS));
        assert!(take(t0 + 10 * MS));
        assert!(!take(t0 + 10 * MS));
        // One second of 1 ms arrivals: about 100 pass (not 1000).
        let sent = (1..=1000).filter(|i| take(t0 + 10 * MS + i * MS)).count();
        assert!((95..=101).contains(&sent), "{sent}");
        // A long quiet period refills to the burst, not beyond.
        let later = t0 + 60_000 * MS;
        let sent = (0..20).filter(|_| take(later)).count();
        assert_eq!(sent, 5);
        // A rate below the burst: still full at the start, and after a quiet period.
        let mut b = RejectBucket {
            stamp_ns: 0,
            credit: 0,
        };
        let mut slow = |now: u64| match reject_bucket(&b, now, 1, 3) {
            BucketTake::Consume => {
                b.credit -= 1;
                true
            }
            BucketTake::Refill { stamp_ns, credit } => {
                b = RejectBucket { stamp_ns, credit };
                true
            }
            BucketTake::Empty => false,
        };
        assert_eq!((0..10).filter(|_| slow(t0)).count(), 3);
        assert!(!slow(t0 + 900 * MS));
        assert!(slow(t0 + 1000 * MS));
        assert_eq!((0..10).filter(|_| slow(t0 + 100_000 * MS)).count(), 3);
        // Extreme settings do not overflow.
        let z = RejectBucket {
            stamp_ns: 1,
            credit: 0,
        };
        assert_eq!(
            reject_bucket(
                &z,
                u64::MAX,
                crate::REJECT_LIMIT_MAX,
                crate::REJECT_LIMIT_MAX
            ),
            BucketTake::Refill {
                stamp_ns: u64::MAX,
                credit: i64::from(crate::REJECT_LIMIT_MAX) - 1
            }
        );
        // A credit driven below zero by racing CPUs recovers.
        let neg = RejectBucket {
            stamp_ns: 10 * MS,
            credit: -3,
        };
        assert_eq!(
            reject_bucket(&neg, 30 * MS, 100, 5),
            BucketTake::Refill {
                stamp_ns: 30 * MS,
                credit: 1
            }
        );
    }

    // ---- lc / wlc ----

    #[test]
    fn lc_load_is_ipvs_overhead_and_wlc_compares_by_cross_multiplication() {
        assert_eq!(lc_overhead(0, 0), 0);
        assert_eq!(lc_overhead(1, 0), 256);
        assert_eq!(lc_overhead(2, 3), 515);
        // Capped: the product with any u16 weight stays below 2^64.
        let big = lc_overhead(u64::MAX, u64::MAX);
        assert!(big.checked_mul(65_535).is_some());
        // 3 conns on weight 2 (1.5 each) is lighter than 2 on weight 1 (2).
        assert!(lc_less(3 * 256, 2, 2 * 256, 1));
        assert!(!lc_less(2 * 256, 1, 3 * 256, 2));
        // Equal ratios are not less either way: 2/1 and 4/2.
        assert!(!lc_less(512, 1, 1024, 2) && !lc_less(1024, 2, 512, 1));
        // lc: inactive counts only between equal actives.
        assert!(lc_less(lc_overhead(1, 200), 1, lc_overhead(2, 0), 1));
        assert!(lc_less(lc_overhead(1, 0), 1, lc_overhead(1, 1), 1));
    }

    /// `lc_scan` over a slot list (index 0 unused) with loads per backend id, every
    /// slot compared (the datapath's bound is LC_SCAN_MAX; the scan itself has none).
    fn scan(slots: &[u32], loads: &[(u32, u64)], seed: u32) -> LcPick {
        lc_scan(
            (slots.len() - 1) as u32,
            seed,
            u32::MAX,
            |s| slots.get(usize::from(s)).copied(),
            |id| loads.iter().find(|(i, _)| *i == id).map(|(_, l)| *l),
        )
        .unwrap()
    }

    #[test]
    fn lc_scan_picks_the_least_loaded_and_reads_weights_from_runs() {
        // lc: one slot each; backend 12 has the fewest.
        let p = scan(&[0, 11, 12, 13], &[(11, 512), (12, 256), (13, 768)], 5);
        assert_eq!((p.slot, p.load, p.weight, p.via), (2, 256, 1, LcVia::Scan));
        // wlc 1:3 as runs: 11 | 12 12 12. 1 and 2 conns: per weight 1 and 2/3 → 12;
        // 0 and 3 → 11.
        let slots = [0, 11, 12, 12, 12];
        let p = scan(&slots, &[(11, 256), (12, 512)], 1);
        assert_eq!((p.slot, p.weight, p.load), (2, 3, 512));
        let p = scan(&slots, &[(11, 0), (12, 768)], 1);
        assert_eq!((p.slot, p.weight), (1, 1));
        // Filling: connections go to the lightest per weight; after 40 picks the
        // loads stand 1:3.
        let mut conns = [0u64; 2];
        for seed in 0..40u32 {
            let loads = [
                (11, lc_overhead(conns[0], 0)),
                (12, lc_overhead(conns[1], 0)),
            ];
            let p = scan(&slots, &loads, seed);
            conns[(slots[usize::from(p.slot)] - 11) as usize] += 1;
        }
        assert_eq!(conns, [10, 30]);
    }

    #[test]
    fn lc_scan_spreads_ties_and_treats_missing_entries_as_full() {
        // Every backend idle (UDP is never counted): ties go everywhere, not to slot 1.
        let slots = [0, 11, 12, 13, 14];
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64u32 {
            seen.insert(scan(&slots, &[(11, 0), (12, 0), (13, 0), (14, 0)], seed).slot);
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        // Backend 12 has no entry and slot 3 none: both lose to a loaded backend.
        let p = scan(&slots, &[(11, 5000), (13, 9000), (14, 7000)], 3);
        assert_eq!(p.slot, 1);
        let p = lc_scan(
            4,
            3,
            LC_SCAN_MAX,
            |s| (s != 3).then(|| slots[usize::from(s)]),
            |id| Some(if id == 13 { 0 } else { 5000 }),
        )
        .unwrap();
        assert_ne!(p.slot, 3, "a missing slot is never lighter");
        assert_eq!(lc_scan(0, 1, LC_SCAN_MAX, |_| Some(1), |_| Some(0)), None);
    }

    #[test]
    fn lc_scan_above_the_bound_takes_the_lighter_of_two_random_slots() {
        // The bound is the caller's: LC_SCAN_MAX with the lc programs, 0 without.
        for (n, exact_max) in [(8u32, 4u32), (LC_SCAN_MAX + 1, LC_SCAN_MAX), (3, 0)] {
            let mut reads = 0;
            for seed in 0..200u32 {
                let p = lc_scan(
                    n,
                    seed,
                    exact_max,
                    |s| {
                        reads += 1;
                        Some(u32::from(s) + 100)
                    },
                    |id| Some(u64::from(id % 7)),
                )
                .unwrap();
                let LcVia::TwoChoices { a, b } = p.via else {
                    panic!("scan above the bound: {p:?}");
                };
                assert!((1..=n as u16).contains(&a) && (1..=n as u16).contains(&b));
                let load = |s: u16| u64::from((u32::from(s) + 100) % 7);
                assert_eq!(p.load, load(a).min(load(b)));
                assert!(p.slot == a || p.slot == b);
            }
            assert_eq!(reads, 400, "two slot reads per choice, not a scan");
        }
    }

    #[test]
    fn conclude_leaves_the_choice_finish_returns() {
        // The lc programs end the scan with `conclude` and read `best_slot`.
        let ids = [11u32, 12, 13, 14];
        for count in 1..=6u32 {
            for seed in 0..64u32 {
                for shape in 0..16u32 {
                    // Runs of equal ids (wlc weights), a missing slot, loads from the seed.
                    let slot = |s: u16| -> Option<u32> {
                        let i = usize::from(s - 1);
                        if shape == 5 && s == 2 {
                            return None;
                        }
                        Some(ids[(i * (shape as usize % 3 + 1) / 3).min(3)])
                    };
                    let load = |id: u32| -> Option<u64> {
                        (id != 14 || shape % 4 != 0).then(|| u64::from((id * (shape + 1)) % 5) << 8)
                    };
                    let a = lc_scan(count, seed, LC_SCAN_MAX, slot, load);
                    let mut s = LcScan::new(seed, slot(1), load);
                    for n in 2..=count as u16 {
                        s.step(n, slot(n), load);
                    }
                    s.conclude(count);
                    assert_eq!(
                        a.map(|p| p.slot),
                        Some(s.best_slot()),
                        "count {count} seed {seed} shape {shape}"
                    );
                }
            }
        }
    }

    #[test]
    fn lc_scan_is_exact_over_many_slots_given_the_bound() {
        // 40 backends under lc, loads falling then rising: the least is backend 125,
        // far from either end and never drawn by luck alone.
        let slots: std::vec::Vec<u32> = std::iter::once(0).chain(100..140).collect();
        let loads: std::vec::Vec<(u32, u64)> = (100..140u32)
            .map(|id| (id, lc_overhead(u64::from(id.abs_diff(125)) + 1, 0)))
            .collect();
        for seed in 0..50 {
            let p = scan(&slots, &loads, seed);
            assert_eq!(
                (p.slot, p.load, p.via),
                (26, 256, LcVia::Scan),
                "seed {seed}"
            );
        }
        // wlc with long runs: 1 slot for 7, 200 for 8.
        // 8 holds 150 connections (0.75 per weight), 7 holds 1: 8 is lighter.
        let mut slots = std::vec![0u32, 7];
        slots.extend(std::iter::repeat_n(8, 200));
        let p = scan(
            &slots,
            &[(7, lc_overhead(1, 0)), (8, lc_overhead(150, 0))],
            3,
        );
        assert_eq!((p.slot, p.weight), (2, 200));
        let p = scan(&slots, &[(7, 0), (8, lc_overhead(150, 0))], 3);
        assert_eq!((p.slot, p.weight), (1, 1));
        // The fed state gives what the loop gives, slot by slot (the eBPF callback's
        // way), and nothing fed is no choice.
        let load = |id: u32| Some(if id == 7 { 0 } else { 9 });
        let mut s = LcScan::new(3, Some(slots[1]), load);
        for (i, id) in slots.iter().enumerate().skip(2) {
            s.step(i as u16, Some(*id), load);
        }
        assert_eq!(
            s.finish(slots.len() as u32 - 1).map(|p| (p.slot, p.weight)),
            Some((1, 1))
        );
        let s = LcScan::new(3, Some(slots[1]), load);
        assert_eq!(s.finish(1).map(|p| (p.slot, p.weight)), Some((1, 1)));
    }

    #[test]
    fn choose_backend_asks_the_lc_scan_for_an_lc_master() {
        let m = SvcValue {
            flags: SVC_FLAG_SCHED_LC,
            ..master(3)
        };
        let slots = [0u32, 11, 12, 13];
        let c: Choice<u32> = choose_backend(
            Some(&m),
            |_| panic!("source ranges read without the flag"),
            || panic!("clock read without affinity"),
            |_| panic!("affinity map read without affinity"),
            |_, _| panic!("match map read without affinity"),
            || panic!("random number drawn for an lc frontend"),
            || panic!("cursor read for an lc frontend"),
            |count| {
                assert_eq!(count, 3);
                lc_scan(
                    count,
                    9,
                    LC_SCAN_MAX,
                    |s| slots.get(usize::from(s)).copied(),
                    |id| Some(if id == 13 { 0 } else { 256 }),
                )
                .map(|p| p.slot)
            },
            |s| slots.get(usize::from(s)).copied(),
            Some,
        );
        assert!(
            matches!(
                c,
                Choice::Backend {
                    backend_id: 13,
                    slot: 3,
                    ..
                }
            ),
            "{c:?}"
        );
    }
}
