//! Lasting traffic totals of the external path (issue 15). The tc/XDP programs count
//! packets and bytes in each conntrack entry (`LB_CT_V2`, [`CtEntry`]); an entry the LRU
//! evicts, or that a new flow with the same 5-tuple replaces, takes its counts with it.
//! So the agent folds the entries' counts every `--ext-stats-interval` into totals per
//! (frontend, backend address, protocol) in a map of its own, `LB_EXTTOTAL_V1`,
//! which `list --stats` and the metrics read: counters that never go down. No work is
//! added per packet.
//!
//! Per entry the fold remembers the counts it last saw (keyed by a hash of the entry's
//! key, 24 bytes an entry): a higher count adds the difference; a lower one, or the
//! entry now naming another (frontend, backend address), is a new flow that reused the
//! key, and its whole count is added. An entry that disappears between two folds loses
//! what it gained since the last one: at most one interval of its traffic.
use std::{
    collections::{HashMap, HashSet},
    hash::BuildHasher,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use svc_lb_common::{
    CT_DIR_FORWARD, CT_FLAG_CLOSING, ConnKey, CtEntry, CtKey, EXT_TRAFFIC_MAX, ExtTrafficKey,
    MAP_CT, MAP_EXT_TRAFFIC, TrafficCount,
};
use tracing::{debug, info, warn};

use super::{pinned::ct_traffic_key, sys};
use crate::model::FrontendKey;

/// The counts of one conntrack entry at the last fold.
#[derive(Clone, Copy, Debug)]
struct Seen {
    packets: u64,
    bytes: u64,
    /// Low 31 bits: a hash of the entry's (frontend, backend address, protocol); bit
    /// 31 ([`CLOSED`]): the flow's end was counted.
    tag: u32,
    /// The fold that saw it last.
    generation: u32,
}

const CLOSED: u32 = 1 << 31;

/// The fold's keys are already keyed hashes of the entries' keys: hashing them again
/// would only cost time.
#[derive(Default)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type SeenMap = HashMap<u64, Seen, std::hash::BuildHasherDefault<PassThrough>>;

/// Increases found by one fold, per (frontend, backend address, protocol).
pub type Deltas = HashMap<ExtTrafficKey, TrafficCount>;

/// The fold's memory between two passes over the conntrack map.
pub struct Fold {
    hasher: std::collections::hash_map::RandomState,
    seen: SeenMap,
    generation: u32,
    /// The next pass only records what it sees (the totals already hold it: an agent
    /// restarted on its pinned totals).
    baseline: bool,
}

impl Fold {
    /// `baseline`: the first pass takes the entries as they are, adding nothing.
    pub fn new(baseline: bool) -> Self {
        Self {
            hasher: std::collections::hash_map::RandomState::new(),
            seen: SeenMap::default(),
            generation: 0,
            baseline,
        }
    }

    /// Entries remembered (the fold's memory is about 32 bytes each).
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// One conntrack entry of this pass: its increase since the last pass goes into
    /// `deltas`. An entry may come twice in a pass (a key walk restarts when the entry
    /// it stands on goes away): the second time adds only what it gained meanwhile.
    pub fn entry(&mut self, k: &CtKey, e: &CtEntry, now_ns: u64, deltas: &mut Deltas) {
        let Some((rev_nat_id, backend, proto)) = ct_traffic_key(k, &e.ct) else {
            return;
        };
        let tk = ExtTrafficKey {
            rev_nat_id,
            backend,
            proto,
            _pad: [0; 3],
        };
        let tag = (self.hasher.hash_one(tk) as u32) & !CLOSED;
        let forward = k.dir == CT_DIR_FORWARD;
        let over = forward && (e.ct.expires_ns < now_ns || e.ct.flags & CT_FLAG_CLOSING != 0);
        let h = self.hasher.hash_one(k);
        let prev = self.seen.get(&h).copied();
        let same_flow =
            prev.filter(|p| p.tag & !CLOSED == tag && p.packets <= e.packets && p.bytes <= e.bytes);
        let closed_before = same_flow.is_some_and(|p| p.tag & CLOSED != 0);
        if !self.baseline {
            let (dp, db) = match same_flow {
                Some(p) => (e.packets - p.packets, e.bytes - p.bytes),
                None => (e.packets, e.bytes),
            };
            let newly_closed = over && !closed_before;
            if dp != 0 || db != 0 || newly_closed {
                let t = deltas.entry(tk).or_default();
                if forward {
                    t.packets_in = t.packets_in.wrapping_add(dp);
                    t.bytes_in = t.bytes_in.wrapping_add(db);
                } else {
                    t.packets_out = t.packets_out.wrapping_add(dp);
                    t.bytes_out = t.bytes_out.wrapping_add(db);
                }
                if newly_closed {
                    t.closed += 1;
                }
            }
        }
        self.seen.insert(
            h,
            Seen {
                packets: e.packets,
                bytes: e.bytes,
                tag: tag | if over || closed_before { CLOSED } else { 0 },
                generation: self.generation,
            },
        );
    }

    /// Ends a pass: entries it did not see are gone from the map and forgotten.
    pub fn finish(&mut self) {
        let g = self.generation;
        self.seen.retain(|_, s| s.generation == g);
        // After a flood of short flows, give the memory back.
        if self.seen.capacity() > 4 * self.seen.len() + 4096 {
            self.seen.shrink_to_fit();
        }
        self.generation = g.wrapping_add(1);
        self.baseline = false;
    }
}

/// What the totals may keep: the programmed frontends (rev-NAT id → frontend) and
/// backend addresses (address, protocol). A fold reads only the part its keys name
/// ([`Programmed::read_for`]), which is all [`settle`] looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub frontends: HashMap<u32, FrontendKey>,
    pub backends: HashSet<(ConnKey, u8)>,
}

impl Programmed {
    /// The frontends and backend addresses that `keys` name, as the pinned maps hold
    /// them now. The rev-NAT ids are looked up one by one; the backend map (keyed by
    /// id, not address) is walked, only while some key's address is still unseen, and
    /// only when a key names one. Reading the whole state instead decoded every
    /// Service and backend each interval: at 100 000 Services × 10 endpoints over
    /// 100 MB and two million map reads every 2 s, to answer questions about the few
    /// frontends that carried external traffic.
    pub fn read_for<'k>(
        maps: &super::pinned::PinnedMaps,
        keys: impl IntoIterator<Item = &'k ExtTrafficKey>,
    ) -> Result<Self> {
        let mut ids = std::collections::BTreeSet::new();
        let mut unseen: HashSet<(ConnKey, u8)> = HashSet::new();
        for k in keys {
            ids.insert(k.rev_nat_id);
            if k.backend != departed() {
                unseen.insert((k.backend, k.proto));
            }
        }
        let mut p = Programmed::default();
        for id in ids {
            if let Some(fe) = maps.rev_nat(id)? {
                p.frontends.insert(id, fe);
            }
        }
        if !unseen.is_empty() {
            maps.walk_backends(|_, b| {
                let key = (crate::inspect::view::conn_key(&b.addr), b.addr.proto);
                if unseen.remove(&key) {
                    p.backends.insert(key);
                }
                !unseen.is_empty()
            })?;
        }
        Ok(p)
    }
}

/// The zero backend address: where a frontend keeps what departed backends carried.
pub fn departed() -> ConnKey {
    bytemuck::Zeroable::zeroed()
}

/// Applies one fold's `deltas` to `totals`:
/// - a frontend that is no longer programmed loses its totals, and so does a rev-NAT id
///   that `before` knew as another frontend (an id reused for another Service starts
///   from 0);
/// - deltas of frontends that are not programmed are dropped;
/// - a backend address gone from the backend map has its totals moved to the
///   frontend's [`departed`] entry, so the frontend's totals keep them while the map
///   keeps no entry per departed address.
pub fn settle(
    totals: &mut HashMap<ExtTrafficKey, TrafficCount>,
    deltas: &Deltas,
    now: &Programmed,
    before: Option<&Programmed>,
) {
    totals.retain(|k, _| match now.frontends.get(&k.rev_nat_id) {
        None => false,
        Some(f) => before
            .and_then(|b| b.frontends.get(&k.rev_nat_id))
            .is_none_or(|old| old == f),
    });
    for (k, d) in deltas {
        if now.frontends.contains_key(&k.rev_nat_id) {
            totals.entry(*k).or_default().add(d);
        }
    }
    let gone: Vec<ExtTrafficKey> = totals
        .keys()
        .filter(|k| k.backend != departed() && !now.backends.contains(&(k.backend, k.proto)))
        .copied()
        .collect();
    for k in gone {
        if let Some(t) = totals.remove(&k) {
            let to = ExtTrafficKey {
                backend: departed(),
                ..k
            };
            totals.entry(to).or_default().add(&t);
        }
    }
}

/// Entries read from the conntrack map per BPF_MAP_LOOKUP_BATCH call.
const BATCH: u32 = 4096;

/// Passes every entry of the pinned conntrack map to `f`: by BPF_MAP_LOOKUP_BATCH
/// when `batch` (the buffers hold [`BATCH`] entries: about 450 KiB), else key by key.
/// A batch walk that fails part way is done again key by key (the fold takes an entry
/// seen twice). Returns whether the batch walk was used.
pub fn read_ct(
    ct: std::os::fd::BorrowedFd<'_>,
    batch: bool,
    mut f: impl FnMut(&CtKey, &CtEntry),
) -> Result<bool> {
    if batch {
        match read_ct_batch(ct, &mut f) {
            Ok(()) => return Ok(true),
            Err(e) => {
                debug!(error = %e, "conntrack batch read failed; reading key by key");
            }
        }
    }
    let fd = ct;
    let ks = size_of::<CtKey>();
    let mut cur: Option<CtKey> = None;
    loop {
        let next = match cur {
            None => sys::first_key(fd, ks)?,
            Some(k) => sys::next_key(fd, &k)?,
        };
        let Some(raw) = next else { break };
        let k: CtKey = bytemuck::pod_read_unaligned(&raw);
        if let Some(e) = sys::map_lookup::<CtKey, CtEntry>(fd, &k)
            .with_context(|| format!("{MAP_CT}: look up an entry"))?
        {
            f(&k, &e);
        }
        cur = Some(k);
    }
    Ok(false)
}

fn read_ct_batch(
    ct: std::os::fd::BorrowedFd<'_>,
    f: &mut impl FnMut(&CtKey, &CtEntry),
) -> std::io::Result<()> {
    let ks = size_of::<CtKey>();
    let vs = size_of::<CtEntry>();
    let mut keys = vec![0u8; ks * BATCH as usize];
    let mut values = vec![0u8; vs * BATCH as usize];
    let mut token = [0u8; 8];
    let mut first = true;
    loop {
        let (n, done) =
            sys::map_lookup_batch(ct, &mut token, first, &mut keys, &mut values, BATCH)?;
        first = false;
        for i in 0..n {
            let k: CtKey = bytemuck::pod_read_unaligned(&keys[i * ks..(i + 1) * ks]);
            let e: CtEntry = bytemuck::pod_read_unaligned(&values[i * vs..(i + 1) * vs]);
            f(&k, &e);
        }
        if done {
            return Ok(());
        }
    }
}

type TotalsMap = BpfHashMap<MapData, ExtTrafficKey, TrafficCount>;

/// Opens the pinned totals map, creating and pinning it when absent. Returns it and
/// whether it existed (then the conntrack entries' counts are already in it).
pub fn open_or_create(bpffs: &Path) -> Result<(TotalsMap, bool)> {
    let path = bpffs.join(MAP_EXT_TRAFFIC);
    let existed = path.exists();
    if !existed {
        let fd = sys::create_hash_map(
            MAP_EXT_TRAFFIC,
            size_of::<ExtTrafficKey>() as u32,
            size_of::<TrafficCount>() as u32,
            EXT_TRAFFIC_MAX,
        )?;
        sys::obj_pin(fd.as_fd(), &path)?;
    }
    let data =
        MapData::from_pin(&path).with_context(|| format!("open pinned map {}", path.display()))?;
    let m = BpfHashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("pinned map {MAP_EXT_TRAFFIC} has an unexpected layout"))?;
    Ok((m, existed))
}

/// The agent's folding of the conntrack counts: its memory, the totals map and their
/// copy (the agent alone writes the map, so the copy is what the map holds).
pub struct Folder {
    bpffs: PathBuf,
    batch: bool,
    fold: Fold,
    map: TotalsMap,
    totals: HashMap<ExtTrafficKey, TrafficCount>,
    programmed: Option<Programmed>,
    /// Increases read but not yet in the map (a fold that failed part way keeps them
    /// for the next one: the fold's memory already counts them as seen).
    pending: Deltas,
}

/// What one fold did, for the log and the measurements.
#[derive(Clone, Copy, Debug, Default)]
pub struct FoldReport {
    pub entries: usize,
    pub remembered: usize,
    pub totals: usize,
    pub batch: bool,
    pub elapsed: Duration,
}

impl Folder {
    pub fn open(bpffs: &Path, batch: bool) -> Result<Self> {
        let (map, existed) = open_or_create(bpffs)?;
        let totals: HashMap<ExtTrafficKey, TrafficCount> = map
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("read {MAP_EXT_TRAFFIC}"))?;
        Ok(Self {
            bpffs: bpffs.to_path_buf(),
            batch,
            fold: Fold::new(existed),
            map,
            totals,
            programmed: None,
            pending: Deltas::new(),
        })
    }

    /// One fold: the conntrack entries into the totals, then the changed totals into
    /// the map.
    pub fn fold_once(&mut self) -> Result<FoldReport> {
        let start = Instant::now();
        let ct_path = self.bpffs.join(MAP_CT);
        let maps = super::pinned::PinnedMaps::open(&self.bpffs)?;
        let deltas = &mut self.pending;
        let mut entries = 0usize;
        let mut batch = false;
        if ct_path.exists() {
            let ct = MapData::from_pin(&ct_path)
                .with_context(|| format!("open pinned map {}", ct_path.display()))?;
            let now_ns = crate::inspect::trace::monotonic_ns();
            let fold = &mut self.fold;
            batch = read_ct(ct.fd().as_fd(), self.batch, |k, e| {
                entries += 1;
                fold.entry(k, e, now_ns, deltas);
            })?;
            self.fold.finish();
        }
        // Read after the conntrack walk (it needs the walk's keys): a frontend
        // programmed while the walk ran is then known, and its counts are kept.
        let now = Programmed::read_for(&maps, self.totals.keys().chain(self.pending.keys()))?;
        let mut next = self.totals.clone();
        settle(&mut next, &self.pending, &now, self.programmed.as_ref());
        for k in self.totals.keys().filter(|k| !next.contains_key(k)) {
            match self.map.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("{MAP_EXT_TRAFFIC}: remove {k:?}"));
                }
            }
        }
        for (k, v) in &next {
            if self.totals.get(k) != Some(v) {
                self.map
                    .insert(k, v, 0)
                    .with_context(|| format!("{MAP_EXT_TRAFFIC}: write {k:?}"))?;
            }
        }
        self.totals = next;
        self.programmed = Some(now);
        self.pending.clear();
        Ok(FoldReport {
            entries,
            remembered: self.fold.remembered(),
            totals: self.totals.len(),
            batch,
            elapsed: start.elapsed(),
        })
    }
}

/// Starts the folding thread (`interval` zero: off, and a pin left by an earlier run
/// is removed, so that `list` shows the live entries' sums instead of stale totals).
pub fn start(bpffs: &Path, interval: Duration, batch: bool) -> Result<()> {
    let path = bpffs.join(MAP_EXT_TRAFFIC);
    if interval.is_zero() {
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("remove {} (--ext-stats-interval 0)", path.display()))?;
        }
        info!(
            "external traffic totals off (--ext-stats-interval 0): list --stats sums the live conntrack entries"
        );
        return Ok(());
    }
    let mut folder = Folder::open(bpffs, batch)?;
    info!(
        interval_ms = interval.as_millis() as u64,
        batch,
        totals = folder.totals.len(),
        "external traffic totals: folding the conntrack counts"
    );
    std::thread::Builder::new()
        .name("ext-totals".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                match folder.fold_once() {
                    Ok(r) => {
                        failing = false;
                        debug!(entries = r.entries, remembered = r.remembered, totals = r.totals, batch = r.batch, elapsed_us = r.elapsed.as_micros() as u64, "external traffic folded");
                    }
                    // Warned once per run of failures: the next fold retries.
                    Err(e) if !failing => {
                        failing = true;
                        warn!(error = %format!("{e:#}"), "external traffic totals: fold failed; retrying every interval");
                    }
                    Err(_) => {}
                }
                std::thread::sleep(interval);
            }
        })
        .context("spawn the external traffic totals thread")?;
    Ok(())
}

#[cfg(test)]
mod tests;
