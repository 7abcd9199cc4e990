//! The diff: which frontends change, which Services fit, and the ordered operations.
//!
//! Phases, in the order the operations are emitted:
//!
//! 0. (`extras`) leaving affinity match entries, forgotten clients, leaving metadata;
//! 1. removed frontends, one at a time: master, then every slot, then (once no
//!    remaining master names the id) its table and source ranges and its reverse-NAT
//!    entry; then stale slots of frontends whose
//!    Service was rejected (they sit above the count, so nothing reads them); then
//!    reverse-NAT entries no master names and no frontend will adopt;
//! 2. backends that are new or change state;
//! 3. each changed frontend: its new reverse-NAT entry, the slots whose backend changes,
//!    the master (only if count, flags or reverse NAT change), then the slots above the
//!    new count; frontends that shrink the map go first, so that the entries they free
//!    make room for those that grow. Within a changed external frontend: new source ranges and its Maglev table go
//!    after its slots and before its master; leaving source ranges, and the table when
//!    the count drops to 0, after it. Then tables and source ranges of reverse-NAT ids
//!    no master names any more, then those reverse-NAT entries (an entry outlives what
//!    it keys, so a plan of a few frontends finds it all through the entry);
//! 4. backends no slot (and no Maglev table of a frontend left as it is) names any more,
//!    except those an admitted external frontend drains (`DesiredState::draining`):
//!    they stay, as `BACKEND_DRAINING` unless a slot still names them, until their
//!    endpoint stops serving;
//! 5. (`extras`) new affinity match entries, new or changed metadata.
//!
//! Ids never change meaning within one plan: an id freed by a plan is reused only by a
//! later plan, so a connection that raced with the update never finds a different
//! backend or frontend behind an id it already holds.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use ipnet::IpNet;
use svc_lb_common::{
    BACKEND_DRAINING, MAP_BACKENDS, MAP_MAGLEV, MAP_REVNAT, MAP_SRC_RANGE4, MAP_SRC_RANGE6,
    MAP_SVC4, MAP_SVC6, MAX_BACKENDS_PER_FRONTEND, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    SCOPE_EXTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY,
};

use super::{
    BackendEntry, Capacity, CurrentFrontend, CurrentState, Op, Plan, Rejected,
    extras::{Final, plan_extras},
    index::Index,
    mirror::{has_master, present_slots},
};
use crate::model::{BackendAddr, DesiredFrontend, DesiredState, FrontendKey, ServiceRef};

/// Maps whose entries phase 3 writes and deletes frontend by frontend, by index: a
/// frontend's service map is `family(key)`, a source range's map `SRC4 + family`.
const SVC4: usize = 0;
const SVC6: usize = 1;
const MAGLEV: usize = 2;
const SRC4: usize = 3;
const SRC6: usize = 4;
const BLOCK_MAPS: [&str; 5] = [
    MAP_SVC4,
    MAP_SVC6,
    MAP_MAGLEV,
    MAP_SRC_RANGE4,
    MAP_SRC_RANGE6,
];
type PerMap = [usize; BLOCK_MAPS.len()];

/// Backend id per address. The plan only looks addresses up (tens of thousands of
/// times in a full sync), never walks them in order: a hash map, not a tree. The keys
/// come from the cluster's own objects, so a fast hash without DoS resistance will do.
type AddrIds = HashMap<BackendAddr, u32>;

fn family(fe: &FrontendKey) -> usize {
    match fe.addr {
        IpAddr::V4(_) => SVC4,
        IpAddr::V6(_) => SVC6,
    }
}

fn range_map(range: &IpNet) -> usize {
    match range {
        IpNet::V4(_) => SRC4,
        IpNet::V6(_) => SRC6,
    }
}

fn capacity_of(cap: &Capacity, map: usize) -> usize {
    match map {
        SVC4 => cap.svc4_entries,
        SVC6 => cap.svc6_entries,
        MAGLEV => cap.maglev_tables,
        SRC4 => cap.src_ranges4,
        _ => cap.src_ranges6,
    }
}

/// How a frontend is named in rejection reasons.
fn fmt_frontend(fe: &FrontendKey) -> String {
    let proto = match fe.proto {
        PROTO_TCP => "TCP".to_owned(),
        PROTO_UDP => "UDP".to_owned(),
        PROTO_SCTP => "SCTP".to_owned(),
        other => format!("proto {other}"),
    };
    match fe.addr {
        IpAddr::V4(a) => format!("{a}:{}/{proto}", fe.port),
        IpAddr::V6(a) => format!("[{a}]:{}/{proto}", fe.port),
    }
}

/// Service-map entries a current frontend occupies.
fn entries(cf: &CurrentFrontend) -> usize {
    usize::from(has_master(cf)) + present_slots(cf).count()
}

fn slot_present(cf: &CurrentFrontend, slot: usize) -> bool {
    match cf.backend_ids.get(slot - 1) {
        Some(id) => *id != 0,
        None => u16::try_from(slot).is_ok_and(|s| cf.stale_slots.binary_search(&s).is_ok()),
    }
}

/// The reverse-NAT map stores address, port and protocol only (no scope).
fn same_rev_nat(a: &FrontendKey, b: &FrontendKey) -> bool {
    a.addr == b.addr && a.port == b.port && a.proto == b.proto
}

fn wanted_flags(d: &DesiredFrontend) -> (u16, u32) {
    match d.affinity_timeout_s {
        Some(t) => (d.flags | SVC_FLAG_AFFINITY, t),
        None => (d.flags & !SVC_FLAG_AFFINITY, 0),
    }
}

/// Whether a frontend needs a Maglev table: an external one with backends.
fn wants_table(d: &DesiredFrontend) -> bool {
    d.key.scope == SCOPE_EXTERNAL && !d.backends.is_empty()
}

/// Source ranges stored for one reverse-NAT id.
fn ranges_of(set: &BTreeSet<(u32, IpNet)>, id: u32) -> BTreeSet<IpNet> {
    set.range((id, IpNet::V4(Default::default()))..)
        .take_while(|(i, _)| *i == id)
        .map(|(_, r)| *r)
        .collect()
}

/// Whether the Maglev table and source ranges stored under `rev_nat_id` are what `d`
/// wants (given that its backends keep the ids `by_addr` says).
fn extras_match(
    state: &CurrentState,
    rev_nat_id: u32,
    d: &DesiredFrontend,
    by_addr: &AddrIds,
) -> bool {
    let table_ok = if wants_table(d) {
        // The pairs phase 3 would write: one per slot of the weighted layout.
        let pairs: Option<Vec<(u32, BackendAddr)>> = d
            .slot_backends()
            .map(|b| by_addr.get(&b.addr).map(|id| (*id, b.addr)))
            .collect();
        match (pairs, state.maglev.get(&rev_nat_id)) {
            (Some(pairs), Some(have)) => have.matches(&pairs),
            _ => false,
        }
    } else {
        !state.maglev.contains_key(&rev_nat_id)
    };
    table_ok
        && ranges_of(&state.src_ranges, rev_nat_id)
            .iter()
            .eq(d.src_ranges.iter())
}

/// A desired frontend with everything that does not depend on which Services fit.
struct Candidate<'a> {
    desired: &'a DesiredFrontend,
    current: Option<&'a CurrentFrontend>,
    /// An existing reverse-NAT entry with the right content; `None` means a new one.
    rev_nat: Option<u32>,
    /// Whether the frontend needs any operation at all.
    changed: bool,
    /// Keys its rewrite inserts, and deletes, in each of the [`BLOCK_MAPS`].
    adds: PerMap,
    dels: PerMap,
}

impl<'a> Candidate<'a> {
    fn new(
        desired: &'a DesiredFrontend,
        current: Option<&'a CurrentFrontend>,
        rev_nat: Option<u32>,
        by_addr: &AddrIds,
        state: &CurrentState,
    ) -> Self {
        // Slots follow the weighted layout (issue 15), not the backend list.
        let n = desired.slot_count();
        let (flags, timeout) = wanted_flags(desired);
        let changed = match current {
            None => true,
            Some(cf) => {
                !has_master(cf)
                    || rev_nat != Some(cf.rev_nat_id)
                    || cf.flags != flags
                    || cf.affinity_timeout_s != timeout
                    || !cf.stale_slots.is_empty()
                    || cf.backend_ids.len() != n
                    || desired
                        .slot_backends()
                        .zip(&cf.backend_ids)
                        .any(|(b, id)| by_addr.get(&b.addr) != Some(id))
                    || !extras_match(state, cf.rev_nat_id, desired, by_addr)
            }
        };
        let mut adds = PerMap::default();
        let mut dels = PerMap::default();
        if changed {
            let fam = family(&desired.key);
            (adds[fam], dels[fam]) = match current {
                None => (1 + n, 0),
                Some(cf) => {
                    let new_slots = (1..=n).filter(|s| !slot_present(cf, *s)).count();
                    let dels = present_slots(cf).filter(|s| usize::from(*s) > n).count();
                    (usize::from(!has_master(cf)) + new_slots, dels)
                }
            };
            // A kept or adopted id is never cleared in phase 1, so its table and ranges
            // are what phase 3 finds; a fresh id has neither.
            let table = rev_nat.is_some_and(|id| state.maglev.contains_key(&id));
            let want = wants_table(desired);
            adds[MAGLEV] = usize::from(want && !table);
            dels[MAGLEV] = usize::from(!want && table);
            let have = rev_nat.map_or_else(BTreeSet::new, |id| ranges_of(&state.src_ranges, id));
            let want: BTreeSet<IpNet> = desired.src_ranges.iter().copied().collect();
            for r in want.difference(&have) {
                adds[range_map(r)] += 1;
            }
            for r in have.difference(&want) {
                dels[range_map(r)] += 1;
            }
        }
        Self {
            desired,
            current,
            rev_nat,
            changed,
            adds,
            dels,
        }
    }

    fn key(&self) -> &FrontendKey {
        &self.desired.key
    }

    /// Phase-3 position: frontends that free service-map entries go first.
    fn order(&self) -> (bool, FrontendKey) {
        let fam = family(self.key());
        (self.adds[fam] > self.dels[fam], *self.key())
    }
}

/// Entry counts the admitted Services add, checked against the capacity after each
/// Service. Counts are exact except for two conservative shortcuts: stale slots of
/// rejected Services, deleted in phase 1, are not credited (which Services end up
/// rejected is not known while admitting), nor are the tables and source ranges of
/// ids no master names any more, deleted after phase 3.
struct Budget {
    cap: Capacity,
    /// Entries of each of the [`BLOCK_MAPS`] once phase 1 is done.
    base: PerMap,
    adds: PerMap,
    /// Keys the admitted frontends delete in phase 3, per map.
    dels: PerMap,
    /// Every admitted changed frontend that inserts or deletes keys there, per map.
    blocks: [Vec<Block>; BLOCK_MAPS.len()],
    backends_base: usize,
    /// Unordered here; sorted once when the plan hands out their ids.
    new_backends: HashSet<BackendAddr>,
    /// Ids no backend and no slot uses: the most new backends one plan can add.
    free_backend_ids: usize,
    rev_nats_base: usize,
    new_rev_nats: usize,
}

/// One frontend's phase-3 operations on one map, as far as entry counts go. Within a
/// frontend every insert comes before its master is written and every delete after.
#[derive(Clone, Copy)]
struct Block {
    order: (bool, FrontendKey),
    adds: usize,
    dels: usize,
}

impl Block {
    fn of(c: &Candidate<'_>, map: usize) -> Option<Self> {
        (c.adds[map] + c.dels[map] > 0).then(|| Self {
            order: c.order(),
            adds: c.adds[map],
            dels: c.dels[map],
        })
    }
}

/// Largest entry count reached right after an insert into a map, or 0 if the blocks
/// insert nothing.
fn peak(base: usize, mut blocks: Vec<Block>) -> usize {
    blocks.sort_unstable_by_key(|b| b.order);
    let mut level = base;
    let mut peak = 0;
    for b in blocks {
        if b.adds > 0 {
            peak = peak.max(level + b.adds);
        }
        level = (level + b.adds).saturating_sub(b.dels);
    }
    peak
}

impl Budget {
    /// Admits the frontends of one Service if every map stays within capacity during
    /// the whole plan; otherwise leaves the budget as it was and says which maps
    /// overflow.
    fn try_admit(&mut self, fronts: &[&Candidate<'_>], by_addr: &AddrIds) -> Result<(), String> {
        let mut full = Vec::new();
        let changed: Vec<&&Candidate<'_>> = fronts.iter().filter(|c| c.changed).collect();

        let mut adds = self.adds;
        let mut dels = self.dels;
        for c in &changed {
            for (sum, n) in adds.iter_mut().zip(c.adds) {
                *sum += n;
            }
            for (sum, n) in dels.iter_mut().zip(c.dels) {
                *sum += n;
            }
        }
        full.extend(
            [SVC4, SVC6]
                .into_iter()
                .filter_map(|m| self.overflow(m, &adds, &dels, &changed)),
        );

        // Only this Service's own new addresses: copying the running set for every
        // Service would make admission quadratic.
        let mine: BTreeSet<BackendAddr> = fronts
            .iter()
            .flat_map(|c| c.desired.backends.iter().map(|b| b.addr))
            .filter(|a| !by_addr.contains_key(a) && !self.new_backends.contains(a))
            .collect();
        if !mine.is_empty() {
            let total = self.new_backends.len() + mine.len();
            let peak = self.backends_base + total;
            if peak > self.cap.backends {
                full.push(format!(
                    "map {MAP_BACKENDS} full: needs {peak} entries, capacity {}",
                    self.cap.backends
                ));
            } else if total > self.free_backend_ids {
                full.push(format!(
                    "map {MAP_BACKENDS}: no free backend id left for {peak} entries"
                ));
            }
        }

        let new_rev_nats =
            self.new_rev_nats + changed.iter().filter(|c| c.rev_nat.is_none()).count();
        if new_rev_nats > self.new_rev_nats {
            let peak = self.rev_nats_base + new_rev_nats;
            if peak > self.cap.rev_nats {
                full.push(format!(
                    "map {MAP_REVNAT} full: needs {peak} entries, capacity {}",
                    self.cap.rev_nats
                ));
            }
        }

        full.extend(
            [MAGLEV, SRC4, SRC6]
                .into_iter()
                .filter_map(|m| self.overflow(m, &adds, &dels, &changed)),
        );

        if !full.is_empty() {
            return Err(full.join("; "));
        }
        for (m, blocks) in self.blocks.iter_mut().enumerate() {
            blocks.extend(changed.iter().filter_map(|c| Block::of(c, m)));
        }
        self.adds = adds;
        self.dels = dels;
        self.new_backends.extend(mine);
        self.new_rev_nats = new_rev_nats;
        Ok(())
    }

    /// Why map `m` would overflow if `changed` joined the admitted frontends (which
    /// with them insert `adds` and delete `dels` keys in total), or `None` if it stays
    /// within capacity.
    fn overflow(
        &self,
        m: usize,
        adds: &PerMap,
        dels: &PerMap,
        changed: &[&&Candidate<'_>],
    ) -> Option<String> {
        let cap = capacity_of(&self.cap, m);
        // Cheap bound first (as if nothing were deleted in phase 3); only a plan near
        // the capacity pays for the exact walk.
        if adds[m] == self.adds[m] || self.base[m] + adds[m] <= cap {
            return None;
        }
        // Without deletes the level only rises: the peak is the last insert's. A sync
        // into nearly full maps (every Service after the first that does not fit) then
        // costs no sort of every admitted frontend's block.
        let peak = if dels[m] == 0 {
            self.base[m] + adds[m]
        } else {
            let mut blocks = self.blocks[m].clone();
            blocks.extend(changed.iter().filter_map(|c| Block::of(c, m)));
            peak(self.base[m], blocks)
        };
        (peak > cap).then(|| {
            format!(
                "map {} full: needs {peak} entries, capacity {cap}",
                BLOCK_MAPS[m]
            )
        })
    }
}

/// The frontend `d` with no backends, for a rejected Service whose frontend `cf` is
/// programmed under reverse-NAT id `id`: what it keeps (id, source ranges) costs no new
/// entry, and with a count of 0 the datapath refuses connections (never drops them:
/// `SVC_FLAG_DROP_EMPTY` is cleared).
fn emptied(
    d: &DesiredFrontend,
    cf: &CurrentFrontend,
    ranges: &BTreeSet<(u32, IpNet)>,
    id: u32,
) -> DesiredFrontend {
    DesiredFrontend {
        backends: Vec::new(),
        affinity_timeout_s: None,
        flags: cf.flags & !(SVC_FLAG_AFFINITY | SVC_FLAG_DROP_EMPTY),
        src_ranges: ranges_of(ranges, id).into_iter().collect(),
        ..d.clone()
    }
}

/// Slots the admitted frontends want: a size hint for the plan's ops.
fn wanted_hint(admitted: &[&Candidate<'_>]) -> usize {
    admitted
        .iter()
        .filter(|c| c.changed)
        .map(|c| 2 * c.desired.slot_count())
        .sum()
}

/// Hands out the lowest ids ≥ 1 that are not in `used`, in increasing order.
struct IdAllocator<'a> {
    used: &'a BTreeSet<u32>,
    next: u32,
}

impl Iterator for IdAllocator<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        loop {
            let id = self.next;
            if id == 0 {
                // Wrapped around: the id space is exhausted.
                return None;
            }
            self.next = id.wrapping_add(1);
            if !self.used.contains(&id) {
                return Some(id);
            }
        }
    }
}

fn allocator(used: &BTreeSet<u32>) -> IdAllocator<'_> {
    IdAllocator { used, next: 1 }
}

/// Diff `current` against `desired` into ordered operations (see the module docs).
/// Services that would overflow a map at any point of the plan, or that have a
/// frontend with more backends than a frontend can hold, are rejected whole: Services
/// programmed now are admitted first, then new ones, each group in namespace/name
/// order. What a rejected Service has programmed is emptied (no backends: connections
/// are refused) rather than left routing to its old backends.
pub fn plan(current: &CurrentState, desired: &DesiredState, cap: &Capacity) -> Plan {
    plan_with(current, desired, cap, None)
}

/// [`plan`], with fresh ids taken from `ids` (the index of a larger state that
/// `current` is a part of) instead of from `current` alone.
pub(super) fn plan_with(
    current: &CurrentState,
    desired: &DesiredState,
    cap: &Capacity,
    ids: Option<&Index>,
) -> Plan {
    let mut out = Out::kept();
    let rejected = plan_into(current, desired, cap, ids, &mut out);
    Plan {
        ops: out.buf,
        rejected,
    }
}

/// [`plan`] into an empty datapath, its ops handed to `sink` in order, in slices of
/// `chunk` (the last one shorter), as they are planned: the whole plan of a first sync
/// (2.3 M ops at 100 000 Services × 10 endpoints, about 100 MB) is never held at once.
/// The concatenated slices are exactly [`plan`]'s ops for an empty current state, so
/// every guarantee of its order holds for any prefix that reaches the maps. When
/// `sink` returns `false` (the maps refused a write) planning stops and no further
/// slice is handed over. Returns the rejected Services, as [`Plan::rejected`].
pub fn plan_streamed(
    desired: &DesiredState,
    cap: &Capacity,
    chunk: usize,
    sink: &mut dyn FnMut(Vec<Op>) -> bool,
) -> Vec<Rejected> {
    let empty = CurrentState::default();
    let mut out = Out {
        buf: Vec::new(),
        sink: Some((sink, chunk.max(1))),
        stopped: false,
        flushed: 0,
    };
    let rejected = plan_into(&empty, desired, cap, None, &mut out);
    out.flush();
    rejected
}

/// Takes one slice of a streamed plan; `false` stops the planning.
type Sink<'s> = &'s mut dyn FnMut(Vec<Op>) -> bool;

/// Where the planned ops go: kept in one vector ([`Plan::ops`]), or handed on in
/// slices as they are planned ([`plan_streamed`]).
struct Out<'s> {
    buf: Vec<Op>,
    /// The receiver of full slices, and the slice length.
    sink: Option<(Sink<'s>, usize)>,
    /// The sink refused a slice: everything after it is dropped.
    stopped: bool,
    /// Ops handed to the sink so far.
    flushed: usize,
}

impl Out<'_> {
    fn kept() -> Self {
        Self {
            buf: Vec::new(),
            sink: None,
            stopped: false,
            flushed: 0,
        }
    }

    fn push(&mut self, op: Op) {
        if self.stopped {
            return;
        }
        self.buf.push(op);
        if self
            .sink
            .as_ref()
            .is_some_and(|(_, n)| self.buf.len() >= *n)
        {
            self.flush();
        }
    }

    /// Hands what is buffered to the sink, if there is one.
    fn flush(&mut self) {
        let Some((sink, chunk)) = self.sink.as_mut() else {
            return;
        };
        if self.stopped || self.buf.is_empty() {
            return;
        }
        let slice = std::mem::replace(&mut self.buf, Vec::with_capacity(*chunk));
        self.flushed += slice.len();
        if !sink(slice) {
            self.stopped = true;
            self.buf = Vec::new();
        }
    }

    /// Room for `n` more ops, when they are all kept.
    fn reserve(&mut self, n: usize) {
        if self.sink.is_none() {
            self.buf.reserve(n);
        }
    }

    /// Puts `first` before every op planned so far.
    fn prepend(&mut self, first: Vec<Op>) {
        if first.is_empty() {
            return;
        }
        // Only a plan from a state with entries has ops to put first (entries that
        // leave), and only a plan from an empty state is streamed.
        debug_assert_eq!(self.flushed, 0, "ops to prepend after a streamed slice");
        let rest = std::mem::take(&mut self.buf);
        self.buf = first;
        self.buf.reserve(rest.len());
        for op in rest {
            self.push(op);
        }
    }
}

impl Extend<Op> for Out<'_> {
    fn extend<I: IntoIterator<Item = Op>>(&mut self, iter: I) {
        for op in iter {
            self.push(op);
        }
    }
}

fn plan_into(
    current: &CurrentState,
    desired: &DesiredState,
    cap: &Capacity,
    ids: Option<&Index>,
    ops: &mut Out<'_>,
) -> Vec<Rejected> {
    // The lowest id of each backend address is the one kept; duplicates are orphans.
    let mut by_addr: AddrIds = HashMap::with_capacity(current.backends.len());
    for (id, b) in &current.backends {
        by_addr.entry(b.addr).or_insert(*id);
    }

    let mut master_refs: BTreeMap<u32, Vec<FrontendKey>> = BTreeMap::new();
    for (fe, cf) in &current.frontends {
        if has_master(cf) && cf.rev_nat_id != 0 {
            master_refs.entry(cf.rev_nat_id).or_default().push(*fe);
        }
    }

    // Reverse-NAT entries no master names (left by an interrupted apply) are adopted
    // by the frontend they describe instead of being replaced.
    let mut orphans: BTreeMap<(IpAddr, u16, u8), BTreeSet<u32>> = BTreeMap::new();
    for (id, fe) in &current.rev_nats {
        if !master_refs.contains_key(id) {
            orphans
                .entry((fe.addr, fe.port, fe.proto))
                .or_default()
                .insert(*id);
        }
    }
    let mut claimed: BTreeSet<u32> = BTreeSet::new();
    let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(desired.frontends.len());
    for (key, d) in &desired.frontends {
        let cur = current.frontends.get(key);
        let kept = cur
            .filter(|cf| has_master(cf))
            .map(|cf| cf.rev_nat_id)
            .filter(|id| {
                *id != 0
                    && current
                        .rev_nats
                        .get(id)
                        .is_some_and(|fe| same_rev_nat(fe, key))
            });
        let rev_nat = kept.or_else(|| {
            let ids = orphans.get_mut(&(key.addr, key.port, key.proto))?;
            let id = ids.pop_first()?;
            claimed.insert(id);
            Some(id)
        });
        claimed.extend(kept);
        candidates.push(Candidate::new(d, cur, rev_nat, &by_addr, current));
    }

    let removed: Vec<(&FrontendKey, &CurrentFrontend)> = current
        .frontends
        .iter()
        .filter(|(k, _)| !desired.frontends.contains_key(*k))
        .collect();
    let removed_keys: BTreeSet<&FrontendKey> = removed.iter().map(|(k, _)| *k).collect();
    // Reverse-NAT entries deleted in phase 1: named by no master that survives it.
    let phase1_rev_nats: BTreeSet<u32> = current
        .rev_nats
        .keys()
        .copied()
        .filter(|id| !claimed.contains(id))
        .filter(|id| {
            master_refs
                .get(id)
                .is_none_or(|fes| fes.iter().all(|fe| removed_keys.contains(fe)))
        })
        .collect();

    // What the maps hold once phase 1 is done: the service-map entries of removed
    // frontends go, and so do the tables and source ranges of their ids unless another
    // frontend keeps or adopts the id.
    let mut base = PerMap::default();
    for (fe, cf) in &current.frontends {
        base[family(fe)] += entries(cf);
    }
    for (fe, cf) in &removed {
        base[family(fe)] -= entries(cf);
    }
    let phase1_extras: BTreeSet<u32> = removed
        .iter()
        .filter(|(_, cf)| has_master(cf))
        .map(|(_, cf)| cf.rev_nat_id)
        .filter(|id| !claimed.contains(id))
        .collect();
    base[MAGLEV] = current
        .maglev
        .keys()
        .filter(|id| !phase1_extras.contains(id))
        .count();
    for (_, range) in current
        .src_ranges
        .iter()
        .filter(|(id, _)| !phase1_extras.contains(id))
    {
        base[range_map(range)] += 1;
    }
    let mut used_backend_ids: BTreeSet<u32> = current.backends.keys().copied().collect();
    for cf in current.frontends.values() {
        used_backend_ids.extend(cf.backend_ids.iter().copied().filter(|id| *id != 0));
    }
    let mut budget = Budget {
        cap: *cap,
        base,
        adds: PerMap::default(),
        dels: PerMap::default(),
        blocks: Default::default(),
        backends_base: current.backends.len(),
        // At most every desired address: sized once instead of rehashed as it grows.
        new_backends: HashSet::with_capacity(
            candidates.iter().map(|c| c.desired.backends.len()).sum(),
        ),
        free_backend_ids: (u32::MAX as usize).saturating_sub(used_backend_ids.len()),
        rev_nats_base: current.rev_nats.len() - phase1_rev_nats.len(),
        new_rev_nats: 0,
    };

    let mut services: BTreeMap<&ServiceRef, Vec<&Candidate<'_>>> = BTreeMap::new();
    for c in &candidates {
        services.entry(&c.desired.service).or_default().push(c);
    }
    let mut rejected = Vec::new();
    let mut admitted_keys: HashSet<FrontendKey> = HashSet::with_capacity(candidates.len());
    // Services that are programmed now are admitted first: a newly created Service,
    // however large, cannot push out one that already works (it is the one rejected).
    let programmed =
        |fronts: &Vec<&Candidate<'_>>| fronts.iter().any(|c| c.current.is_some_and(has_master));
    let order: Vec<(&&ServiceRef, &Vec<&Candidate<'_>>)> = services
        .iter()
        .filter(|(_, f)| programmed(f))
        .chain(services.iter().filter(|(_, f)| !programmed(f)))
        .collect();
    for (service, fronts) in order {
        let too_big = fronts
            .iter()
            .find(|c| c.desired.slot_count() > MAX_BACKENDS_PER_FRONTEND);
        let verdict = match too_big {
            Some(c) => Err(format!(
                "frontend {} has {} backends; one frontend holds at most {MAX_BACKENDS_PER_FRONTEND}",
                fmt_frontend(c.key()),
                c.desired.backends.len()
            )),
            None => budget.try_admit(fronts, &by_addr),
        };
        match verdict {
            Ok(()) => admitted_keys.extend(fronts.iter().map(|c| *c.key())),
            Err(reason) => rejected.push(Rejected {
                service: (*service).clone(),
                reason,
            }),
        }
    }

    // Fail closed: a rejected Service must not keep routing to its old backends (they
    // may belong to someone else by now). Its programmed frontends stay, emptied: no
    // backends, so connections are refused until it fits again. Emptying only deletes
    // entries (same reverse-NAT id, same source ranges), so it always fits.
    let rejected_services: BTreeSet<&ServiceRef> = rejected.iter().map(|r| &r.service).collect();
    let emptied_desired: Vec<(DesiredFrontend, Option<u32>)> = candidates
        .iter()
        .filter(|c| rejected_services.contains(&c.desired.service))
        .filter_map(|c| {
            let cf = c.current.filter(|cf| has_master(cf))?;
            let id = c.rev_nat?;
            Some((emptied(c.desired, cf, &current.src_ranges, id), c.rev_nat))
        })
        .collect();
    let emptied_cands: Vec<Candidate<'_>> = emptied_desired
        .iter()
        .map(|(d, id)| Candidate::new(d, current.frontends.get(&d.key), *id, &by_addr, current))
        .collect();
    let emptied_refs: Vec<&Candidate<'_>> = emptied_cands.iter().collect();
    let emptied_keys: BTreeSet<FrontendKey> = match budget.try_admit(&emptied_refs, &by_addr) {
        Ok(()) => emptied_cands.iter().map(|c| *c.key()).collect(),
        Err(_) => BTreeSet::new(),
    };
    for r in &mut rejected {
        if emptied_cands
            .iter()
            .any(|c| c.desired.service == r.service && emptied_keys.contains(c.key()))
        {
            r.reason
                .push_str("; its programmed frontends refuse connections until it fits");
        }
    }
    let (admitted, kept): (Vec<&Candidate<'_>>, Vec<&Candidate<'_>>) = candidates
        .iter()
        .filter(|c| !emptied_keys.contains(c.key()))
        .partition(|c| admitted_keys.contains(c.key()));
    drop(admitted_keys);
    let admitted: Vec<&Candidate<'_>> = admitted
        .into_iter()
        .chain(
            emptied_cands
                .iter()
                .filter(|c| emptied_keys.contains(c.key())),
        )
        .collect();

    // New ids go to admitted frontends only, lowest first, in address / key order.
    let mut backend_ids = by_addr.clone();
    let mut fresh_ids: Box<dyn Iterator<Item = u32>> = match ids {
        Some(ix) => Box::new(ix.fresh_backend_ids()),
        None => Box::new(allocator(&used_backend_ids)),
    };
    // The set is freed before the map grows: at a first sync of 1 M backends each is
    // tens of MB, and both at once set the agent's high-water mark.
    let mut new_backends: Vec<BackendAddr> = std::mem::take(&mut budget.new_backends)
        .into_iter()
        .collect();
    new_backends.sort_unstable();
    backend_ids.reserve(new_backends.len());
    for addr in new_backends {
        if let Some(id) = fresh_ids.next() {
            backend_ids.insert(addr, id);
        }
    }
    let mut used_rev_ids: BTreeSet<u32> = current.rev_nats.keys().copied().collect();
    used_rev_ids.extend(master_refs.keys().copied());
    // Tables and source ranges of ids no master names are deleted at the end of this
    // plan: until then their ids must not name a new frontend.
    used_rev_ids.extend(current.maglev.keys().copied());
    used_rev_ids.extend(current.src_ranges.iter().map(|(id, _)| *id));
    let mut fresh_rev: Box<dyn Iterator<Item = u32>> = match ids {
        Some(ix) => Box::new(ix.fresh_rev_nat_ids()),
        None => Box::new(allocator(&used_rev_ids)),
    };
    let mut rev_ids: HashMap<FrontendKey, u32> = HashMap::with_capacity(admitted.len());
    let mut new_rev_nats: HashSet<FrontendKey> = HashSet::new();
    for c in &admitted {
        let id = match c.rev_nat {
            Some(id) => Some(id),
            None => fresh_rev.next().inspect(|_| {
                new_rev_nats.insert(*c.key());
            }),
        };
        if let Some(id) = id {
            rev_ids.insert(*c.key(), id);
        }
    }

    // A full sync plans about three ops per backend: room for them up front rather than
    // copying a growing vector of large ops.
    ops.reserve(
        removed.len() + wanted_hint(&admitted) + 3 * admitted.iter().filter(|c| c.changed).count(),
    );
    // What the Maglev and source-range maps hold as the ops go, so that no key is
    // deleted twice.
    let mut tables: BTreeSet<u32> = current.maglev.keys().copied().collect();
    let mut ranges: BTreeSet<(u32, IpNet)> = current.src_ranges.clone();
    let drop_extras = |id: u32,
                       ops: &mut Out<'_>,
                       tables: &mut BTreeSet<u32>,
                       ranges: &mut BTreeSet<(u32, IpNet)>| {
        if tables.remove(&id) {
            ops.push(Op::DeleteMaglev { rev_nat_id: id });
        }
        for range in ranges_of(ranges, id) {
            ranges.remove(&(id, range));
            ops.push(Op::DeleteSrcRange {
                rev_nat_id: id,
                range,
            });
        }
    };

    // Phase 1.
    let mut removed_refs: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, cf) in &removed {
        if has_master(cf) {
            *removed_refs.entry(cf.rev_nat_id).or_default() += 1;
        }
    }
    for (fe, cf) in &removed {
        if has_master(cf) {
            ops.push(Op::DeleteMaster { frontend: **fe });
        }
        ops.extend(present_slots(cf).map(|slot| Op::DeleteSlot {
            frontend: **fe,
            slot,
        }));
        if has_master(cf) {
            let id = cf.rev_nat_id;
            if let Some(left) = removed_refs.get_mut(&id) {
                *left -= 1;
                // Tables and ranges before the entry: a plan of a few frontends finds
                // an id through its entry, so an interrupted apply leaves none behind.
                if *left == 0 && !claimed.contains(&id) {
                    drop_extras(id, ops, &mut tables, &mut ranges);
                }
                if *left == 0 && phase1_rev_nats.contains(&id) {
                    ops.push(Op::DeleteRevNat { id });
                }
            }
        }
    }
    for c in &kept {
        if let Some(cf) = c.current {
            ops.extend(cf.stale_slots.iter().map(|&slot| Op::DeleteSlot {
                frontend: *c.key(),
                slot,
            }));
        }
    }
    ops.extend(
        phase1_rev_nats
            .iter()
            .filter(|id| !removed_refs.contains_key(id))
            .map(|&id| Op::DeleteRevNat { id }),
    );

    // Phase 2. Two frontends may disagree on one address's state; active wins, since
    // the entry is shared and draining it would starve the frontend that wants it.
    //
    // Every (id, entry) the frontends name, then sorted by id and merged: a flat vector
    // of the references is about half the size of a tree of the entries (at a first
    // sync of 1 M backends, 28 MB against 50), and it sits beside the id map and the
    // growing mirror at the plan's high-water mark. The sort is stable, so an id's
    // entry is the first one pushed (address and locality), with the lowest state.
    let refs: usize = admitted
        .iter()
        .map(|c| c.desired.backends.len() + desired.draining.get(c.key()).map_or(0, |d| d.len()))
        .sum();
    let mut wanted: Vec<(u32, BackendEntry)> = Vec::with_capacity(refs);
    for c in &admitted {
        for b in &c.desired.backends {
            let Some(&id) = backend_ids.get(&b.addr) else {
                continue;
            };
            wanted.push((
                id,
                BackendEntry {
                    addr: b.addr,
                    state: b.state,
                    local: b.local,
                },
            ));
        }
    }
    // Draining backends of admitted external frontends keep the entry they have (same
    // id, same address: the external path's conntrack check passes) and are never
    // created, since no flow can be using a backend that has no entry. Rejected
    // Services drain nothing: they fail closed.
    for c in &admitted {
        if emptied_keys.contains(c.key()) {
            continue;
        }
        for b in desired.draining.get(c.key()).into_iter().flatten() {
            let Some(&id) = by_addr.get(&b.addr) else {
                continue;
            };
            wanted.push((
                id,
                BackendEntry {
                    addr: b.addr,
                    state: BACKEND_DRAINING,
                    local: b.local,
                },
            ));
        }
    }
    wanted.sort_by_key(|(id, _)| *id);
    // `dedup_by` passes the later element first; the earlier one is kept.
    wanted.dedup_by(|later, kept| {
        if later.0 != kept.0 {
            return false;
        }
        kept.1.state = kept.1.state.min(later.1.state);
        true
    });
    for (id, backend) in &wanted {
        if current.backends.get(id) != Some(backend) {
            ops.push(Op::UpsertBackend {
                id: *id,
                backend: *backend,
            });
        }
    }
    // Phase 4 needs the ids only, and a plan from maps without backends none at all:
    // the entries go before phase 3 (a first sync's are tens of MB).
    let mut final_backend_ids: BTreeSet<u32> = if current.backends.is_empty() {
        BTreeSet::new()
    } else {
        wanted.iter().map(|(id, _)| *id).collect()
    };
    drop(wanted);

    // Phase 3.
    let mut changed: Vec<&&Candidate<'_>> = admitted.iter().filter(|c| c.changed).collect();
    changed.sort_by_key(|c| c.order());
    // Frontends left as they are because an id could not be allocated. Admission bounds
    // the ids a plan needs by the free id space, so this stays empty in practice; it
    // exists so that such a frontend is treated like a rejected one, never half-written.
    let mut untouched: Vec<&Candidate<'_>> = Vec::new();
    // What each written frontend ends as: (key, rev-NAT id, flags, backend ids).
    let mut written: Vec<(&Candidate<'_>, u32, u16, Vec<u32>)> = Vec::new();
    let mut ready: Vec<(&&Candidate<'_>, u32, Vec<u32>)> = Vec::with_capacity(changed.len());
    for c in changed {
        let fe = *c.key();
        let ids: Option<Vec<u32>> = c
            .desired
            .slot_backends()
            .map(|b| backend_ids.get(&b.addr).copied())
            .collect();
        let (Some(&rev_nat_id), Some(ids)) = (rev_ids.get(&fe), ids) else {
            untouched.push(c);
            continue;
        };
        ready.push((c, rev_nat_id, ids));
    }
    // Every id the plan writes is in `ready` now. A streamed first sync writes its
    // slots from here on while the mirror of the maps grows on another thread: the
    // address maps (1 M backends: about 50 MB each) would otherwise sit beside both
    // until the plan ends, at the agent's high-water mark.
    drop(backend_ids);
    drop(by_addr);
    // The new reverse-NAT entries of all of them first: no master names one yet, so
    // they may go before any slot, and the service map's writes then follow each
    // other, which the kernel store writes in batches. An apply interrupted here leaves
    // entries no master names, which the next plan adopts.
    for (c, rev_nat_id, _) in &ready {
        if new_rev_nats.contains(c.key()) {
            ops.push(Op::UpsertRevNat {
                id: *rev_nat_id,
                frontend: *c.key(),
            });
        }
    }
    for (c, rev_nat_id, ids) in ready {
        let fe = *c.key();
        let now = |slot: usize| {
            c.current
                .and_then(|cf| cf.backend_ids.get(slot - 1))
                .copied()
        };
        for (i, id) in ids.iter().enumerate() {
            if now(i + 1) != Some(*id) {
                // Slot numbers fit: admission rejected frontends above MAX_BACKENDS_PER_FRONTEND.
                let slot = u16::try_from(i + 1).unwrap_or(u16::MAX);
                ops.push(Op::UpsertSlot {
                    frontend: fe,
                    slot,
                    backend_id: *id,
                });
            }
        }
        // Source ranges and Maglev table: in place before the master names them.
        let want_ranges: BTreeSet<IpNet> = c.desired.src_ranges.iter().copied().collect();
        let have_ranges = ranges_of(&ranges, rev_nat_id);
        for range in want_ranges.difference(&have_ranges) {
            ranges.insert((rev_nat_id, *range));
            ops.push(Op::UpsertSrcRange {
                rev_nat_id,
                range: *range,
            });
        }
        if wants_table(c.desired) {
            // One pair per slot: a backend repeated in the weighted layout fills the
            // table in proportion (`maglev::populate` counts repeats as weight). The
            // digest holds the weights: slots that are already right (an apply
            // interrupted after them) say nothing about the table.
            let pairs: Vec<(u32, BackendAddr)> = ids
                .iter()
                .zip(c.desired.slot_backends())
                .map(|(id, b)| (*id, b.addr))
                .collect();
            let up_to_date = tables.contains(&rev_nat_id)
                && current
                    .maglev
                    .get(&rev_nat_id)
                    .is_some_and(|have| have.matches(&pairs));
            if !up_to_date {
                tables.insert(rev_nat_id);
                ops.push(Op::UpsertMaglev {
                    rev_nat_id,
                    backends: pairs,
                });
            }
        }
        let count = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        let (flags, affinity_timeout_s) = wanted_flags(c.desired);
        let master_ok = c.current.is_some_and(|cf| {
            has_master(cf)
                && cf.backend_ids.len() == ids.len()
                && cf.rev_nat_id == rev_nat_id
                && cf.flags == flags
                && cf.affinity_timeout_s == affinity_timeout_s
        });
        if !master_ok {
            ops.push(Op::UpsertMaster {
                frontend: fe,
                count,
                rev_nat_id,
                flags,
                affinity_timeout_s,
            });
        }
        if let Some(cf) = c.current {
            ops.extend(
                present_slots(cf)
                    .filter(|s| usize::from(*s) > ids.len())
                    .map(|slot| Op::DeleteSlot { frontend: fe, slot }),
            );
        }
        for range in have_ranges.difference(&want_ranges) {
            ranges.remove(&(rev_nat_id, *range));
            ops.push(Op::DeleteSrcRange {
                rev_nat_id,
                range: *range,
            });
        }
        if !wants_table(c.desired) && tables.remove(&rev_nat_id) {
            ops.push(Op::DeleteMaglev { rev_nat_id });
        }
        written.push((c, rev_nat_id, flags, ids));
    }
    let as_is: Vec<&CurrentFrontend> = kept
        .iter()
        .chain(&untouched)
        .filter_map(|c| c.current)
        .collect();
    let final_rev_ids: BTreeSet<u32> = rev_ids
        .iter()
        .filter(|(fe, _)| !untouched.iter().any(|c| c.key() == *fe))
        .map(|(_, id)| *id)
        .chain(
            as_is
                .iter()
                .filter(|cf| has_master(cf))
                .map(|cf| cf.rev_nat_id),
        )
        .collect();
    let extra_ids: BTreeSet<u32> = tables
        .iter()
        .copied()
        .chain(ranges.iter().map(|(id, _)| *id))
        .filter(|id| !final_rev_ids.contains(id))
        .collect();
    for id in extra_ids {
        drop_extras(id, ops, &mut tables, &mut ranges);
    }

    ops.extend(
        current
            .rev_nats
            .keys()
            .filter(|id| !phase1_rev_nats.contains(id) && !final_rev_ids.contains(id))
            .map(|&id| Op::DeleteRevNat { id }),
    );
    // Phase 4.
    for cf in &as_is {
        final_backend_ids.extend(cf.backend_ids.iter().copied());
        // A frontend left as it is keeps its table, which may still name backends its
        // slots no longer do (an interrupted apply).
        if has_master(cf)
            && let Some(table) = current.maglev.get(&cf.rev_nat_id)
        {
            final_backend_ids.extend(table.ids());
        }
    }
    ops.extend(
        current
            .backends
            .keys()
            .filter(|id| !final_backend_ids.contains(id))
            .map(|&id| Op::DeleteBackend { id }),
    );

    // Affinity match entries and metadata of the frontends as the plan leaves them.
    let mut finals: Vec<Final<'_>> = written
        .iter()
        .map(|(c, rev_nat_id, flags, ids)| Final {
            rev_nat_id: *rev_nat_id,
            flags: *flags,
            ids,
            desired: c.desired,
        })
        .collect();
    let unwritten = admitted
        .iter()
        .filter(|c| !c.changed)
        .chain(&kept)
        .chain(&untouched);
    for c in unwritten {
        if let Some(cf) = c.current.filter(|cf| has_master(cf)) {
            finals.push(Final {
                rev_nat_id: cf.rev_nat_id,
                flags: cf.flags,
                ids: &cf.backend_ids,
                desired: c.desired,
            });
        }
    }
    let (first, last) = plan_extras(current, &finals);
    ops.prepend(first);
    ops.extend(last);
    rejected
}
