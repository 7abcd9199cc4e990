//! The real datapath: [`BpfDatapath`] holds the loaded object (see [`super::load`])
//! and its maps, applies plan operations and the agent's other map writes, and
//! attaches through [`super::links`]. A restarted agent re-opens the pinned maps
//! (adopting their contents, read back through [`super::pinned`]) and swaps its
//! programs into the pinned links in place.
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuHashMap,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use svc_lb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, ConnCount, ConnKey, ExtConfig,
    MAP_AFF_MATCH, MAP_AFFINITY, MAP_BACKENDS, MAP_BE_STATS, MAP_CONFIG, MAP_CONNS, MAP_FE_STATS,
    MAP_MAGLEV, MAP_NODE_ADDR, MAP_REVNAT, MAP_SRC_RANGE4, MAP_SRC_RANGE6, MAP_SVC_META, MAP_SVC4,
    MAP_SVC6, MAP_XDP_DEV, MaglevTable, NodeAddrKey, RevNat, SrcRange4Key, SrcRange6Key, Svc4Key,
    Svc6Key, SvcMeta, SvcValue,
};
use svc_lb_common::{MAP_TRAFFIC, TrafficCount, TrafficKey};
use tracing::warn;

use super::{
    MapStore,
    codec::{self, SvcKey, Write},
    links,
    load::LoadOptions,
    pinned::{collect, read_state},
    probe::TcAttach,
    sys,
};
use crate::plan::{Capacity, CurrentState, Op};

/// The capacity of a (hash, LRU hash or LPM trie) map as the kernel has it: a re-used
/// pin keeps the size it was created with, whatever the object says.
fn max_entries(map: &Map, name: &str) -> Result<usize> {
    let data = match map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) => d,
        _ => bail!("map {name} is not a hash map or LPM trie"),
    };
    Ok(data
        .info()
        .with_context(|| format!("info of map {name}"))?
        .max_entries() as usize)
}

/// Takes a hash map out of the object, with its capacity.
fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<(HashMap<MapData, K, V>, usize)> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    let max = max_entries(&map, name)?;
    Ok((
        HashMap::try_from(map).with_context(|| format!("map {name} has an unexpected type"))?,
        max,
    ))
}

/// The loaded and attached datapath.
pub struct BpfDatapath {
    // Programs stay loaded while the agent runs; the pinned links keep them attached
    // after it exits.
    programs: Programs,
    /// The sock_ops program of the connection counts is loaded (and gets attached).
    conn_counts: bool,
    /// The `lc`/`wlc` scan programs, loaded once a frontend needs them.
    lc: super::lcdemand::LcDemand,
    /// `LB_CONNS_V1`, which the agent only prunes.
    conns: HashMap<MapData, ConnKey, ConnCount>,
    /// `LB_TRAFFIC_V1`, which the agent only prunes.
    traffic: HashMap<MapData, TrafficKey, TrafficCount>,
    svc4: HashMap<MapData, Svc4Key, SvcValue>,
    svc6: HashMap<MapData, Svc6Key, SvcValue>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nats: HashMap<MapData, u32, RevNat>,
    fe_stats: PerCpuHashMap<MapData, u32, u64>,
    be_stats: PerCpuHashMap<MapData, u32, u64>,
    meta: HashMap<MapData, u32, SvcMeta>,
    /// Session affinity: the programs' remembered backends, and the agent's match map
    /// (see `plan::extras`).
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    aff_match: HashMap<MapData, AffinityMatchKey, u32>,
    cap: Capacity,
    /// The external path's maps, or why the object has none (built without the tc/XDP
    /// programs): then every external-path operation fails with that reason.
    ext: std::result::Result<ExtMaps, String>,
    /// Entries per Maglev table (`--maglev-table-size`).
    maglev_size: u32,
    /// Whether runs of map writes go through BPF_MAP_UPDATE_BATCH (see
    /// [`Self::set_map_batch`]).
    batch: bool,
    /// Every map [`MapStore::read_current`] reads was created by this open (no pin of it
    /// existed) and nothing has been written since: they are empty, and the first read
    /// returns the empty state without walking them. Walking an empty hash map visits
    /// all its buckets (2–4 ms for a million-entry map), which on a first start is a
    /// dozen milliseconds on the way to the first sync for nothing.
    created_empty: std::sync::atomic::AtomicBool,
}

/// The maps [`MapStore::read_current`] reads (see `BpfDatapath::created_empty`).
const READ_BACK_MAPS: [&str; 9] = [
    MAP_SVC4,
    MAP_SVC6,
    MAP_BACKENDS,
    MAP_REVNAT,
    MAP_SVC_META,
    MAP_AFF_MATCH,
    MAP_MAGLEV,
    MAP_SRC_RANGE4,
    MAP_SRC_RANGE6,
];

/// The object once its maps are taken: its programs, loaded, or still going through
/// the verifier on a thread of their own (see [`BpfDatapath::open_overlapped`]).
enum Programs {
    /// Maps open, programs not loaded yet.
    Unloaded(Ebpf),
    Loaded(Ebpf),
    Loading(std::thread::JoinHandle<Result<Ebpf>>),
    /// The load failed (its error was returned once) or its thread panicked.
    Failed,
}

/// Maps of the external path (tc/XDP).
struct ExtMaps {
    maglev: HashMap<MapData, u32, MaglevTable>,
    /// Source ranges. The value is unused by the programs (a hit is the answer).
    src4: LpmTrie<MapData, SrcRange4Key, u32>,
    src6: LpmTrie<MapData, SrcRange6Key, u32>,
    node_addr: HashMap<MapData, NodeAddrKey, u32>,
    config: Array<MapData, ExtConfig>,
    /// Capacities of `maglev`, `src4` and `src6`.
    maglev_entries: usize,
    src4_entries: usize,
    src6_entries: usize,
}

impl ExtMaps {
    /// Takes the external maps out of the object. `Ok(Err(why))` when the object has
    /// none of them (an eBPF build without the external path); an error when only some
    /// are there or one has the wrong type.
    fn take(ebpf: &mut Ebpf) -> Result<std::result::Result<Self, String>> {
        let names = [
            MAP_MAGLEV,
            MAP_SRC_RANGE4,
            MAP_SRC_RANGE6,
            MAP_NODE_ADDR,
            MAP_CONFIG,
        ];
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| ebpf.map(n).is_none())
            .collect();
        if !missing.is_empty() {
            return Ok(Err(format!(
                "the eBPF object has no external-path map {} (built without the tc/XDP programs?)",
                missing.join(", ")
            )));
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let maglev = take(ebpf, MAP_MAGLEV)?;
        let src4 = take(ebpf, MAP_SRC_RANGE4)?;
        let src6 = take(ebpf, MAP_SRC_RANGE6)?;
        let mut maps = Self {
            maglev_entries: max_entries(&maglev, MAP_MAGLEV)?,
            src4_entries: max_entries(&src4, MAP_SRC_RANGE4)?,
            src6_entries: max_entries(&src6, MAP_SRC_RANGE6)?,
            maglev: HashMap::try_from(maglev)
                .with_context(|| format!("map {MAP_MAGLEV} has an unexpected type"))?,
            src4: LpmTrie::try_from(src4)
                .with_context(|| format!("map {MAP_SRC_RANGE4} has an unexpected type"))?,
            src6: LpmTrie::try_from(src6)
                .with_context(|| format!("map {MAP_SRC_RANGE6} has an unexpected type"))?,
            node_addr: HashMap::try_from(take(ebpf, MAP_NODE_ADDR)?)
                .with_context(|| format!("map {MAP_NODE_ADDR} has an unexpected type"))?,
            config: Array::try_from(take(ebpf, MAP_CONFIG)?)
                .with_context(|| format!("map {MAP_CONFIG} has an unexpected type"))?,
        };
        maps.prune_undecodable_ranges()?;
        Ok(Ok(maps))
    }

    /// Removes pinned source-range keys that no plan could name (the agent never writes
    /// them: a damaged pin or a foreign writer), so that reading the maps back never
    /// fails on them at every start. The plan then rewrites what is missing.
    fn prune_undecodable_ranges(&mut self) -> Result<()> {
        prune_undecodable(&mut self.src4, MAP_SRC_RANGE4, |plen, k| {
            codec::src_range4_from_raw(plen, k).is_ok()
        })?;
        prune_undecodable(&mut self.src6, MAP_SRC_RANGE6, |plen, k| {
            codec::src_range6_from_raw(plen, k).is_ok()
        })
    }
}

/// Removes the keys of one source-range trie that `decodes` refuses.
fn prune_undecodable<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, u32>,
    name: &str,
    decodes: impl Fn(u32, &K) -> bool,
) -> Result<()> {
    let junk: Vec<_> = trie
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !decodes(k.prefix_len(), &k.data()))
        .collect();
    for k in junk {
        warn!(
            map = name,
            prefix_len = k.prefix_len(),
            "undecodable entry removed; the next sync rewrites what is missing"
        );
        ignore_missing(trie.remove(&k))
            .with_context(|| format!("{name}: remove an undecodable key"))?;
    }
    Ok(())
}

fn take_percpu_hash(ebpf: &mut Ebpf, name: &str) -> Result<PerCpuHashMap<MapData, u32, u64>> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    PerCpuHashMap::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The external path's limits in `ExtConfig`: SNAT source ports (host order, inclusive;
/// 0/0 is svc-lb-common's default range) and the node-wide ICMP reject token bucket
/// (rejects per second, 0 = no limit; burst).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtLimits {
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub reject_rate: u32,
    pub reject_burst: u32,
}

impl Default for ExtLimits {
    fn default() -> Self {
        Self {
            snat_port_min: svc_lb_common::SNAT_PORT_MIN,
            snat_port_max: svc_lb_common::SNAT_PORT_MAX,
            reject_rate: svc_lb_common::REJECT_RATE_DEFAULT,
            reject_burst: svc_lb_common::REJECT_BURST_DEFAULT,
        }
    }
}

impl BpfDatapath {
    /// Loads the object and its programs and opens (or creates) the pinned maps. Safe
    /// over an existing pin directory: the maps are re-opened with their contents.
    /// Nothing is attached yet, so the caller can fill the maps first.
    pub fn open(bpffs: &Path) -> Result<Self> {
        Self::open_with(bpffs, LoadOptions::default())
    }

    /// [`Self::open`] with load-time options.
    pub fn open_with(bpffs: &Path, opts: LoadOptions) -> Result<Self> {
        let mut dp = Self::open_maps(bpffs, opts)?;
        dp.programs()?;
        Ok(dp)
    }

    /// [`Self::open_with`] that returns once the maps are open, while the socket
    /// programs go through the verifier on a thread of their own. The maps can be read
    /// and written meanwhile (a first sync needs no program), and whatever needs the
    /// programs (attaching them, the eBPF log) waits for the load and returns its error.
    /// On a busy 2-CPU machine the verifier takes longer than modelling, planning and
    /// writing 10 000 Services, so this takes the load off a full sync's critical path.
    pub fn open_overlapped(bpffs: &Path, opts: LoadOptions) -> Result<Self> {
        let mut dp = Self::open_maps(bpffs, opts)?;
        let Programs::Unloaded(mut ebpf) = std::mem::replace(&mut dp.programs, Programs::Failed)
        else {
            bail!("the eBPF programs are not in the object just loaded");
        };
        let conn_counts = dp.conn_counts;
        let loading = std::thread::Builder::new()
            .name("svclb-verify".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                super::load::load_programs(&mut ebpf, conn_counts)?;
                tracing::info!(
                    took_us = started.elapsed().as_micros() as u64,
                    "socket programs loaded (verifier)"
                );
                Ok(ebpf)
            })
            .context("start the program-load thread")?;
        dp.programs = Programs::Loading(loading);
        Ok(dp)
    }

    /// The object's programs, loaded: loads them, or waits for the load still running
    /// (see [`Self::open_overlapped`]); returns the load's error the first time.
    pub fn programs(&mut self) -> Result<&mut Ebpf> {
        let conn_counts = self.conn_counts;
        self.programs = match std::mem::replace(&mut self.programs, Programs::Failed) {
            Programs::Unloaded(mut ebpf) => {
                super::load::load_programs(&mut ebpf, conn_counts)?;
                Programs::Loaded(ebpf)
            }
            Programs::Loading(handle) => match handle.join() {
                Ok(loaded) => Programs::Loaded(loaded?),
                Err(_) => bail!("the program-load thread panicked"),
            },
            done => done,
        };
        match &mut self.programs {
            Programs::Loaded(ebpf) => Ok(ebpf),
            _ => bail!("the socket programs failed to load (see the error reported before)"),
        }
    }

    /// The object with its maps open and its programs not yet loaded.
    fn open_maps(bpffs: &Path, opts: LoadOptions) -> Result<Self> {
        // Before the load creates them: a map whose pin exists may hold an earlier
        // run's state (a pin the load replaces because it was empty counts as existing:
        // the read then finds it empty).
        let created_empty = READ_BACK_MAPS.iter().all(|n| !bpffs.join(n).exists());
        let mut ebpf = super::load::load_maps(bpffs, &opts)?;

        let (svc4, svc4_entries) = take_hash(&mut ebpf, MAP_SVC4)?;
        let (svc6, svc6_entries) = take_hash(&mut ebpf, MAP_SVC6)?;
        let (backends, backend_entries) = take_hash(&mut ebpf, MAP_BACKENDS)?;
        let (rev_nats, rev_nat_entries) = take_hash(&mut ebpf, MAP_REVNAT)?;
        let ext = ExtMaps::take(&mut ebpf)?;
        // Without the external maps no external frontend can be programmed (the agent
        // refuses --devices then), so their capacity is 0.
        let (maglev_tables, src_ranges4, src_ranges6) = match &ext {
            Ok(e) => (e.maglev_entries, e.src4_entries, e.src6_entries),
            Err(_) => (0, 0, 0),
        };
        let cap = Capacity {
            svc4_entries,
            svc6_entries,
            backends: backend_entries,
            rev_nats: rev_nat_entries,
            maglev_tables,
            src_ranges4,
            src_ranges6,
        };
        let fe_stats = take_percpu_hash(&mut ebpf, MAP_FE_STATS)?;
        let be_stats = take_percpu_hash(&mut ebpf, MAP_BE_STATS)?;
        let (meta, _) = take_hash::<u32, SvcMeta>(&mut ebpf, MAP_SVC_META)?;
        let affinity = HashMap::try_from(
            ebpf.take_map(MAP_AFFINITY)
                .ok_or_else(|| anyhow!("map {MAP_AFFINITY} missing from the eBPF object"))?,
        )
        .with_context(|| format!("map {MAP_AFFINITY} has an unexpected type"))?;
        let (aff_match, _) = take_hash::<AffinityMatchKey, u32>(&mut ebpf, MAP_AFF_MATCH)?;
        let (conns, _) = take_hash::<ConnKey, ConnCount>(&mut ebpf, MAP_CONNS)?;
        let (traffic, _) = take_hash::<TrafficKey, TrafficCount>(&mut ebpf, MAP_TRAFFIC)?;
        let lc = super::lcdemand::LcDemand::new(
            opts.compat.lc_loop,
            bpffs,
            opts,
            super::load::take_lc_arrays(&mut ebpf)?,
        );
        let maglev_size = match opts.maglev_size {
            0 => svc_lb_common::MAGLEV_DEFAULT_SIZE,
            n => n,
        };
        Ok(Self {
            ext,
            maglev_size,
            // The probe's answer comes with `set_map_batch`; a kernel without batches
            // refuses the first one and the store goes on one entry at a time.
            batch: true,
            conn_counts: opts.compat.conn_counts,
            conns,
            traffic,
            lc,
            programs: Programs::Unloaded(ebpf),
            svc4,
            svc6,
            backends,
            rev_nats,
            fe_stats,
            be_stats,
            meta,
            affinity,
            aff_match,
            cap,
            created_empty: created_empty.into(),
        })
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl MapStore for BpfDatapath {
    fn read_current(&self) -> Result<CurrentState> {
        if self
            .created_empty
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return codec::decode_state([], [], []);
        }
        let mut state = read_state(&self.svc4, &self.svc6, &self.backends, &self.rev_nats)?;
        if let Ok(ext) = &self.ext {
            // Tables are decoded to their entries per backend id, which say whether
            // a table holds the weights the Services want (`MaglevDigest::matches`), so
            // a restart rewrites only the tables that changed. A table built for
            // another `--maglev-table-size` decodes as unknown and is rewritten.
            for item in ext.maglev.iter() {
                let (id, table) = item.with_context(|| format!("read map {MAP_MAGLEV}"))?;
                state.maglev.insert(
                    id,
                    crate::plan::MaglevDigest::of_table(&table.backend_ids, self.maglev_size),
                );
            }
            for k in ext.src4.keys() {
                let k = k.with_context(|| format!("read map {MAP_SRC_RANGE4}"))?;
                state
                    .src_ranges
                    .insert(codec::src_range4_from_raw(k.prefix_len(), &k.data())?);
            }
            for k in ext.src6.keys() {
                let k = k.with_context(|| format!("read map {MAP_SRC_RANGE6}"))?;
                state
                    .src_ranges
                    .insert(codec::src_range6_from_raw(k.prefix_len(), &k.data())?);
            }
        }
        codec::decode_extras(
            &mut state,
            collect(&self.aff_match, MAP_AFF_MATCH)?
                .into_iter()
                .map(|(k, _)| k),
            collect(&self.meta, MAP_SVC_META)?,
        );
        Ok(state)
    }

    fn apply(&mut self, op: &Op) -> Result<()> {
        *self.created_empty.get_mut() = false;
        for w in codec::encode(op, self.maglev_size)? {
            match w {
                Write::Svc(key, Some(value)) => self.put(key, value)?,
                Write::Svc(key, None) => self.del(key)?,
                Write::Backend(id, Some(raw)) => self
                    .backends
                    .insert(id, raw, 0)
                    .with_context(|| format!("{MAP_BACKENDS}: insert backend {id}"))?,
                Write::Backend(id, None) => ignore_missing(self.backends.remove(&id))
                    .with_context(|| format!("{MAP_BACKENDS}: delete backend {id}"))?,
                Write::ResetBackendStats(id) => ignore_missing(self.be_stats.remove(&id))
                    .with_context(|| format!("{MAP_BE_STATS}: delete {id}"))?,
                Write::RevNat(id, Some(raw)) => self
                    .rev_nats
                    .insert(id, raw, 0)
                    .with_context(|| format!("{MAP_REVNAT}: insert {id}"))?,
                Write::RevNat(id, None) => ignore_missing(self.rev_nats.remove(&id))
                    .with_context(|| format!("{MAP_REVNAT}: delete {id}"))?,
                Write::ResetFrontendStats(id) => ignore_missing(self.fe_stats.remove(&id))
                    .with_context(|| format!("{MAP_FE_STATS}: delete {id}"))?,
                Write::Maglev(id, Some(ids)) => {
                    // 64 KiB: built on the heap, not the stack.
                    let mut buf = vec![0u32; svc_lb_common::MAGLEV_TABLE_MAX];
                    let n = ids.len().min(buf.len());
                    buf[..n].copy_from_slice(&ids[..n]);
                    let table: &MaglevTable = bytemuck::from_bytes(bytemuck::cast_slice(&buf));
                    self.ext_mut()?
                        .maglev
                        .insert(id, table, 0)
                        .with_context(|| format!("{MAP_MAGLEV}: insert table of rev-NAT {id}"))?
                }
                Write::Maglev(id, None) => ignore_missing(self.ext_mut()?.maglev.remove(&id))
                    .with_context(|| format!("{MAP_MAGLEV}: delete table of rev-NAT {id}"))?,
                Write::SrcRange4(plen, k, put) => {
                    let ext = self.ext_mut()?;
                    let key = LpmKey::new(plen, k);
                    if put {
                        ext.src4.insert(&key, 1, 0)
                    } else {
                        ignore_missing(ext.src4.remove(&key))
                    }
                    .with_context(|| format!("{MAP_SRC_RANGE4}: write {k:?}/{plen}"))?
                }
                Write::SrcRange6(plen, k, put) => {
                    let ext = self.ext_mut()?;
                    let key = LpmKey::new(plen, k);
                    if put {
                        ext.src6.insert(&key, 1, 0)
                    } else {
                        ignore_missing(ext.src6.remove(&key))
                    }
                    .with_context(|| format!("{MAP_SRC_RANGE6}: write {k:?}/{plen}"))?
                }
                Write::AffMatch(key, true) => {
                    self.aff_match.insert(key, 1, 0).with_context(|| {
                        format!(
                            "{MAP_AFF_MATCH}: insert backend {} of rev-NAT {}",
                            key.backend_id, key.rev_nat_id
                        )
                    })?
                }
                Write::AffMatch(key, false) => ignore_missing(self.aff_match.remove(&key))
                    .with_context(|| {
                        format!(
                            "{MAP_AFF_MATCH}: delete backend {} of rev-NAT {}",
                            key.backend_id, key.rev_nat_id
                        )
                    })?,
                Write::Meta(id, Some(raw)) => self
                    .meta
                    .insert(id, raw, 0)
                    .with_context(|| format!("{MAP_SVC_META}: insert {id}"))?,
                Write::Meta(id, None) => ignore_missing(self.meta.remove(&id))
                    .with_context(|| format!("{MAP_SVC_META}: delete {id}"))?,
                Write::ForgetClients(rev_nat_id) => {
                    // Rare (affinity switched off, a frontend removed): a walk of the LRU
                    // map is cheap enough, and keeps clients from inheriting a stale choice.
                    let stale: Vec<AffinityKey> = self
                        .affinity
                        .keys()
                        .filter_map(|k| k.ok())
                        .filter(|k| k.rev_nat_id == rev_nat_id)
                        .collect();
                    for key in &stale {
                        ignore_missing(self.affinity.remove(key)).with_context(|| {
                            format!("{MAP_AFFINITY}: forget a client of rev-NAT {rev_nat_id}")
                        })?;
                    }
                    tracing::debug!(
                        rev_nat_id,
                        clients = stale.len(),
                        "session affinity: forgot clients"
                    );
                }
            }
        }
        Ok(())
    }

    fn apply_all(&mut self, ops: &[Op]) -> (usize, Result<()>) {
        *self.created_empty.get_mut() = false;
        apply_in_runs(self, ops)
    }

    fn capacity(&self) -> Capacity {
        self.cap
    }
}

/// What [`apply_in_runs`] needs from a store: single writes, and batches of puts into
/// one map. A trait so that the host tests can drive the run logic with a fake kernel.
trait RunStore {
    fn batching(&self) -> bool;
    fn stop_batching(&mut self);
    /// BPF_MAP_UPDATE_BATCH of `run` (see [`sys::map_update_batch`]).
    fn write_run(&mut self, run: &Run) -> std::result::Result<(), (usize, std::io::Error)>;
    fn apply_one(&mut self, op: &Op) -> Result<()>;
}

impl RunStore for BpfDatapath {
    fn batching(&self) -> bool {
        self.batch
    }

    fn stop_batching(&mut self) {
        self.batch = false;
    }

    fn write_run(&mut self, run: &Run) -> std::result::Result<(), (usize, std::io::Error)> {
        sys::map_update_batch(self.batch_fd(run.map), &run.keys, &run.values, run.count)
    }

    fn apply_one(&mut self, op: &Op) -> Result<()> {
        self.apply(op)
    }
}

/// Applies `ops` in order: each run of two or more puts into one batched map with one
/// BPF_MAP_UPDATE_BATCH, everything else one op at a time. Returns how many ops were
/// applied, as [`MapStore::apply_all`] does.
fn apply_in_runs(store: &mut impl RunStore, ops: &[Op]) -> (usize, Result<()>) {
    let mut done = 0;
    let mut run = Run::default();
    while done < ops.len() {
        if store.batching() && collect_run(&ops[done..], &mut run) >= 2 {
            match store.write_run(&run) {
                Ok(()) => {
                    done += run.count;
                    continue;
                }
                Err((written, e)) => {
                    done += written;
                    if written == 0 && sys::batch_unsupported(&e) {
                        warn!(error = %e, "BPF_MAP_UPDATE_BATCH refused: map writes go one entry at a time from now on");
                        store.stop_batching();
                    }
                    // The entry the kernel refused goes on its own below: it then
                    // fails with the error a single write gives, or (a passing
                    // condition) succeeds and the batches go on.
                }
            }
        }
        if let Err(e) = store.apply_one(&ops[done]) {
            return (done, Err(e));
        }
        done += 1;
    }
    (ops.len(), Ok(()))
}

/// Packs the longest prefix of `ops` (at most [`BATCH_MAX`]) whose ops each put one
/// entry into the same batched map into `run`; returns its length (0: the first op is
/// not such a put).
fn collect_run(ops: &[Op], run: &mut Run) -> usize {
    run.map = None;
    run.keys.clear();
    run.values.clear();
    run.count = 0;
    for op in ops.iter().take(BATCH_MAX) {
        let Some(w) = codec::single_put(op) else {
            break;
        };
        let Some((map, key, value)) = batch_entry(&w) else {
            break;
        };
        if run.map.is_some_and(|m| m != map) {
            break;
        }
        run.map = Some(map);
        run.keys.extend_from_slice(key);
        run.values.extend_from_slice(value);
        run.count += 1;
    }
    run.count
}

/// The maps whose entries a run of ops may write with one BPF_MAP_UPDATE_BATCH: the
/// hash maps a plan fills by the thousand (not the LPM tries, which have no batch
/// operations, nor the rare Maglev tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BatchMap {
    Svc4,
    Svc6,
    Backends,
    RevNats,
    Meta,
    AffMatch,
}

/// The most entries one batch writes: bounds the buffers (a full sync of a million
/// backends writes them in slices) while keeping the syscalls few.
const BATCH_MAX: usize = 8192;

/// Consecutive ops that each put one entry into one map, packed as the kernel takes
/// them. The buffers are reused from run to run.
#[derive(Default)]
struct Run {
    map: Option<BatchMap>,
    keys: Vec<u8>,
    values: Vec<u8>,
    count: usize,
}

/// The value of every affinity match entry.
static AFF_MATCH_VALUE: u32 = 1;

/// The one map entry `w` puts, if it is a put into a batched map: (map, key, value).
fn batch_entry(w: &Write) -> Option<(BatchMap, &[u8], &[u8])> {
    use bytemuck::bytes_of;
    Some(match w {
        Write::Svc(SvcKey::V4(k), Some(v)) => (BatchMap::Svc4, bytes_of(k), bytes_of(v)),
        Write::Svc(SvcKey::V6(k), Some(v)) => (BatchMap::Svc6, bytes_of(k), bytes_of(v)),
        Write::Backend(id, Some(v)) => (BatchMap::Backends, bytes_of(id), bytes_of(v)),
        Write::RevNat(id, Some(v)) => (BatchMap::RevNats, bytes_of(id), bytes_of(v)),
        Write::Meta(id, Some(v)) => (BatchMap::Meta, bytes_of(id), bytes_of(v)),
        Write::AffMatch(k, true) => (BatchMap::AffMatch, bytes_of(k), bytes_of(&AFF_MATCH_VALUE)),
        _ => return None,
    })
}

impl BpfDatapath {
    /// Writes runs of map entries with BPF_MAP_UPDATE_BATCH (`true`, the default) or
    /// one entry per syscall (the probe found no batch operations, or
    /// `--force-feature-off map_batch`).
    pub fn set_map_batch(&mut self, on: bool) {
        self.batch = on;
    }

    fn batch_fd(&self, map: Option<BatchMap>) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        let data = match map {
            Some(BatchMap::Svc4) | None => self.svc4.map(),
            Some(BatchMap::Svc6) => self.svc6.map(),
            Some(BatchMap::Backends) => self.backends.map(),
            Some(BatchMap::RevNats) => self.rev_nats.map(),
            Some(BatchMap::Meta) => self.meta.map(),
            Some(BatchMap::AffMatch) => self.aff_match.map(),
        };
        data.fd().as_fd()
    }

    /// Attaches (or swaps in) the programs; call after the first sync so that the new
    /// programs never see maps emptier than the old ones did.
    pub fn attach(&mut self, bpffs: &Path, cgroup: &Path) -> Result<()> {
        let conn_counts = self.conn_counts;
        let ebpf = self.programs()?;
        links::attach_sock_programs(ebpf, bpffs, cgroup)?;
        links::attach_sockops(ebpf, bpffs, cgroup, conn_counts)?;
        if !self.conn_counts {
            // Counts of an earlier run that had them: nothing keeps them true now (its
            // sockets close without a program to count it), so none are left to mislead
            // a later run that has them again.
            let keys: Vec<ConnKey> = self.conns.keys().filter_map(|k| k.ok()).collect();
            for k in &keys {
                ignore_missing(self.conns.remove(k))
                    .with_context(|| format!("{MAP_CONNS}: delete {k:?}"))?;
            }
        }
        Ok(())
    }

    /// The `lc`/`wlc` scan programs of this run (see [`super::lcdemand`]).
    pub fn lc(&mut self) -> &mut super::lcdemand::LcDemand {
        &mut self.lc
    }

    /// Whether this run keeps active connection counts (the sock_ops program loaded).
    pub fn conn_counts(&self) -> bool {
        self.conn_counts
    }

    /// Deletes the connection counts (`LB_CONNS_V1`) of addresses that no TCP backend
    /// has any more and whose counts are 0; returns how many. An address still counting
    /// open connections keeps its entry until they close (its sockets decrement it).
    /// A connection that the connect hook sent to the address just before it left, and
    /// whose first count lands between this read and the delete, is lost from the
    /// counts (its later decrement finds no entry and is dropped): counts never go
    /// below what is open by more than such races.
    pub fn prune_conn_counts(&mut self) -> Result<usize> {
        // The counts first: usually few, and none at all after a fresh start, whose
        // first full sync then reads no backend back (tens of ms at 10 000 Services,
        // on the way to attaching the programs).
        let idle: Vec<ConnKey> = self
            .conns
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| v.get() == (0, 0))
            .map(|(k, _)| k)
            .collect();
        if idle.is_empty() {
            return Ok(0);
        }
        let live: std::collections::HashSet<ConnKey> = self
            .backends
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, b)| b.proto == svc_lb_common::PROTO_TCP)
            .map(|(_, b)| ConnKey::of_backend(&b))
            .collect();
        let stale: Vec<ConnKey> = idle.into_iter().filter(|k| !live.contains(k)).collect();
        for k in &stale {
            ignore_missing(self.conns.remove(k))
                .with_context(|| format!("{MAP_CONNS}: delete {k:?}"))?;
        }
        Ok(stale.len())
    }

    /// Deletes the traffic counts (`LB_TRAFFIC_V1`) of frontends that are gone (no
    /// rev-NAT entry); returns how many. Swept with the full sync: until then a
    /// rev-NAT id reused for a new frontend would show the old one's traffic to the
    /// backend addresses both share.
    pub fn prune_traffic(&mut self) -> Result<usize> {
        // The counts first, as in `prune_conn_counts`: none after a fresh start, whose
        // first full sync then does not walk the 10 000 rev-NAT ids it just wrote one
        // key per syscall before attaching the programs.
        let counted: Vec<TrafficKey> = self.traffic.keys().filter_map(|k| k.ok()).collect();
        if counted.is_empty() {
            return Ok(0);
        }
        let live: std::collections::HashSet<u32> =
            self.rev_nats.keys().filter_map(|k| k.ok()).collect();
        let stale: Vec<TrafficKey> = counted
            .into_iter()
            .filter(|k| !live.contains(&k.rev_nat_id))
            .collect();
        for k in &stale {
            ignore_missing(self.traffic.remove(k))
                .with_context(|| format!("{MAP_TRAFFIC}: delete {k:?}"))?;
        }
        Ok(stale.len())
    }

    fn ext_mut(&mut self) -> Result<&mut ExtMaps> {
        self.ext
            .as_mut()
            .map_err(|why| anyhow!("external path: {why}"))
    }

    /// Whether the object carries the external path's maps; `Err` says why not.
    pub fn ext_available(&self) -> Result<()> {
        self.ext
            .as_ref()
            .map(|_| ())
            .map_err(|why| anyhow!("external path: {why}"))
    }

    /// Writes the external path's settings (`LB_CONFIG_V1[0]`): the SNAT address of
    /// each family (`None`: flows that would need it are dropped), the table size, the
    /// SNAT ports and the reject limit.
    pub fn write_ext_config(
        &mut self,
        snat4: Option<std::net::Ipv4Addr>,
        snat6: Option<std::net::Ipv6Addr>,
        limits: &ExtLimits,
    ) -> Result<()> {
        let cfg = ExtConfig {
            snat4_be: snat4.map_or(0, |a| u32::from_ne_bytes(a.octets())),
            snat6_be: snat6.map_or([0; 4], |a| codec::addr_words(std::net::IpAddr::V6(a))),
            maglev_size: self.maglev_size,
            flags: 0,
            _pad: 0,
            snat_port_min: limits.snat_port_min,
            snat_port_max: limits.snat_port_max,
            reject_rate: limits.reject_rate,
            reject_burst: limits.reject_burst,
            _pad2: 0,
        };
        self.ext_mut()?
            .config
            .set(0, cfg, 0)
            .with_context(|| format!("{MAP_CONFIG}: write entry 0"))
    }

    /// Makes `LB_XDPDEV_V1` hold exactly `devices` (ifindex → `XDP_DEV_*` flags, see
    /// [`super::xdpdev`]). Call before the XDP program is attached: an unmarked device
    /// gets its rejects from tc.
    pub fn set_xdp_devices(&mut self, devices: &[(u32, u32)]) -> Result<()> {
        let map = self
            .programs()?
            .map_mut(MAP_XDP_DEV)
            .ok_or_else(|| anyhow!("map {MAP_XDP_DEV} missing from the eBPF object"))?;
        let mut map: HashMap<&mut MapData, u32, u32> = HashMap::try_from(map)
            .with_context(|| format!("map {MAP_XDP_DEV} has an unexpected type"))?;
        for (ifindex, flags) in devices {
            map.insert(ifindex, flags, 0)
                .with_context(|| format!("{MAP_XDP_DEV}: insert ifindex {ifindex}"))?;
        }
        let have: Vec<u32> = map
            .keys()
            .collect::<Result<_, _>>()
            .with_context(|| format!("read map {MAP_XDP_DEV}"))?;
        for ifindex in have
            .iter()
            .filter(|i| !devices.iter().any(|(d, _)| d == *i))
        {
            ignore_missing(map.remove(ifindex))
                .with_context(|| format!("{MAP_XDP_DEV}: delete ifindex {ifindex}"))?;
        }
        Ok(())
    }

    /// Makes `LB_NODEADDR_V1` hold exactly `addrs` (the addresses node ports answer on).
    pub fn set_node_addrs(&mut self, addrs: &[std::net::IpAddr]) -> Result<()> {
        let ext = self.ext_mut()?;
        let want: std::collections::BTreeSet<NodeAddrKey> =
            addrs.iter().map(|a| codec::node_addr_key(*a)).collect();
        for key in &want {
            ext.node_addr
                .insert(key, 0, 0)
                .with_context(|| format!("{MAP_NODE_ADDR}: insert {key:?}"))?;
        }
        let have: Vec<NodeAddrKey> = ext
            .node_addr
            .keys()
            .collect::<Result<_, _>>()
            .with_context(|| format!("read map {MAP_NODE_ADDR}"))?;
        for key in have.iter().filter(|k| !want.contains(k)) {
            ignore_missing(ext.node_addr.remove(key))
                .with_context(|| format!("{MAP_NODE_ADDR}: delete {key:?}"))?;
        }
        Ok(())
    }

    /// Attaches (or swaps in) the tc programs on each device, and with `xdp` the XDP
    /// program in native mode; call after the first sync, like [`Self::attach`]. Links
    /// are pinned as `links/<program>@<device>`. A device whose driver refuses native
    /// XDP gets one warning and stays tc-only.
    /// `tc` chooses TCX links or, on kernels without TCX, netlink filters (see
    /// [`links::attach_devices`]).
    pub fn attach_devices(
        &mut self,
        bpffs: &Path,
        devices: &[String],
        xdp: bool,
        tc: TcAttach,
    ) -> Result<()> {
        if devices.is_empty() {
            return Ok(());
        }
        self.ext_available()?;
        links::attach_devices(self.programs()?, bpffs, devices, xdp, tc)
    }

    /// Attaches (or swaps in) the per-packet path's tc programs on the pod devices
    /// (`--pod-devices`, see [`super::poddev`]).
    pub fn attach_pod_devices(
        &mut self,
        bpffs: &Path,
        devices: &[String],
        tc: TcAttach,
    ) -> Result<()> {
        if devices.is_empty() {
            return Ok(());
        }
        super::poddev::attach(self.programs()?, bpffs, devices, tc)
    }

    /// Starts reading the programs' aya-log records (only useful with
    /// [`LoadOptions::bpf_log`]); they go to the `log` facade, which tracing receives.
    pub fn ebpf_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(self.programs()?).context("start the eBPF log reader")
    }

    fn put(&mut self, key: SvcKey, value: SvcValue) -> Result<()> {
        match key {
            SvcKey::V4(k) => self
                .svc4
                .insert(k, value, 0)
                .with_context(|| format!("{MAP_SVC4}: insert {k:?}")),
            SvcKey::V6(k) => self
                .svc6
                .insert(k, value, 0)
                .with_context(|| format!("{MAP_SVC6}: insert {k:?}")),
        }
    }

    fn del(&mut self, key: SvcKey) -> Result<()> {
        match key {
            SvcKey::V4(k) => ignore_missing(self.svc4.remove(&k))
                .with_context(|| format!("{MAP_SVC4}: delete {k:?}")),
            SvcKey::V6(k) => ignore_missing(self.svc6.remove(&k))
                .with_context(|| format!("{MAP_SVC6}: delete {k:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The batched write path without a kernel: a store that records each batch and
    //! single write, and can refuse an entry or the batch command itself.
    use std::io;

    use svc_lb_common::{BACKEND_ACTIVE, PROTO_TCP, SCOPE_ALL};

    use super::*;
    use crate::{
        model::{BackendAddr, FrontendKey, ServiceRef},
        plan::{BackendEntry, FrontendMeta},
    };

    #[derive(Default)]
    struct Recorder {
        batch: bool,
        /// (map, count, keys, values) of each batch the store took.
        batches: Vec<(BatchMap, usize, Vec<u8>, Vec<u8>)>,
        singles: Vec<Op>,
        /// Refuse the batch whose entry at this index (counted over every entry
        /// offered in batches) is reached, having written the ones before it.
        refuse_at: Option<(usize, i32)>,
        offered: usize,
        fail_single: Option<usize>,
    }

    impl RunStore for Recorder {
        fn batching(&self) -> bool {
            self.batch
        }
        fn stop_batching(&mut self) {
            self.batch = false;
        }
        fn write_run(&mut self, run: &Run) -> std::result::Result<(), (usize, io::Error)> {
            let map = run.map.unwrap();
            if let Some((at, errno)) = self.refuse_at
                && (self.offered..self.offered + run.count).contains(&at)
            {
                self.refuse_at = None;
                let written = at - self.offered;
                let (k, v) = (run.keys.len() / run.count, run.values.len() / run.count);
                if written > 0 {
                    self.batches.push((
                        map,
                        written,
                        run.keys[..k * written].to_vec(),
                        run.values[..v * written].to_vec(),
                    ));
                }
                self.offered += written;
                return Err((written, io::Error::from_raw_os_error(errno)));
            }
            self.offered += run.count;
            self.batches
                .push((map, run.count, run.keys.clone(), run.values.clone()));
            Ok(())
        }
        fn apply_one(&mut self, op: &Op) -> Result<()> {
            if self.fail_single == Some(self.singles.len()) {
                bail!("refused");
            }
            self.singles.push(op.clone());
            Ok(())
        }
    }

    fn fe(i: u8) -> FrontendKey {
        FrontendKey {
            addr: std::net::Ipv4Addr::new(10, 96, 0, i).into(),
            port: 80,
            proto: PROTO_TCP,
            scope: SCOPE_ALL,
        }
    }

    fn backend(id: u32) -> Op {
        Op::UpsertBackend {
            id,
            backend: BackendEntry {
                addr: BackendAddr {
                    addr: std::net::Ipv4Addr::from(0x0a00_0000 + id).into(),
                    port: 8080,
                    proto: PROTO_TCP,
                },
                state: BACKEND_ACTIVE,
                local: false,
            },
        }
    }

    fn meta(rev_nat_id: u32) -> Op {
        Op::UpsertMeta {
            rev_nat_id,
            meta: Box::new(FrontendMeta {
                service: ServiceRef {
                    namespace: "ns".into(),
                    name: format!("svc-{rev_nat_id}").into(),
                },
                port_name: "http".into(),
                kind: 0,
                flags: 0,
            }),
        }
    }

    /// Five backends, three slots and a master of one frontend, a slot delete, two
    /// metadata entries, and a lone reverse-NAT entry.
    fn plan_ops() -> Vec<Op> {
        let mut ops: Vec<Op> = (1..=5).map(backend).collect();
        ops.extend((1..=3).map(|slot| Op::UpsertSlot {
            frontend: fe(1),
            slot,
            backend_id: u32::from(slot),
        }));
        ops.push(Op::UpsertMaster {
            frontend: fe(1),
            count: 3,
            rev_nat_id: 1,
            flags: 0,
            affinity_timeout_s: 0,
        });
        ops.push(Op::DeleteSlot {
            frontend: fe(2),
            slot: 4,
        });
        ops.extend([meta(1), meta(2)]);
        ops.push(Op::UpsertRevNat {
            id: 1,
            frontend: fe(1),
        });
        ops
    }

    /// The bytes single writes of `ops` would put: (keys, values).
    fn encoded(ops: &[Op]) -> (Vec<u8>, Vec<u8>) {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for op in ops {
            let writes = codec::encode(op, 251).unwrap();
            let (_, key, value) = batch_entry(&writes[0]).unwrap();
            k.extend_from_slice(key);
            v.extend_from_slice(value);
        }
        (k, v)
    }

    #[test]
    fn runs_of_puts_into_one_map_go_in_one_batch_each() {
        let ops = plan_ops();
        let mut store = Recorder {
            batch: true,
            ..Default::default()
        };
        let (done, result) = apply_in_runs(&mut store, &ops);
        result.unwrap();
        assert_eq!(done, ops.len());
        let shape: Vec<(BatchMap, usize)> = store.batches.iter().map(|b| (b.0, b.1)).collect();
        assert_eq!(
            shape,
            vec![
                (BatchMap::Backends, 5),
                (BatchMap::Svc4, 4),
                (BatchMap::Meta, 2)
            ]
        );
        // The same bytes, in the same order, as one write per op.
        assert_eq!(
            (store.batches[0].2.clone(), store.batches[0].3.clone()),
            encoded(&ops[..5])
        );
        assert_eq!(
            (store.batches[1].2.clone(), store.batches[1].3.clone()),
            encoded(&ops[5..9])
        );
        assert_eq!(
            (store.batches[2].2.clone(), store.batches[2].3.clone()),
            encoded(&ops[10..12])
        );
        // A delete and a run of one go on their own.
        assert_eq!(store.singles, vec![ops[9].clone(), ops[12].clone()]);
    }

    #[test]
    fn without_batches_every_op_goes_alone() {
        let ops = plan_ops();
        let mut store = Recorder::default();
        let (done, result) = apply_in_runs(&mut store, &ops);
        result.unwrap();
        assert_eq!(done, ops.len());
        assert!(store.batches.is_empty());
        assert_eq!(store.singles, ops);
    }

    #[test]
    fn a_refused_entry_goes_alone_and_the_batches_go_on() {
        let ops = plan_ops();
        let mut store = Recorder {
            batch: true,
            refuse_at: Some((2, libc::ENOMEM)),
            ..Default::default()
        };
        let (done, result) = apply_in_runs(&mut store, &ops);
        result.unwrap();
        assert_eq!(done, ops.len());
        assert!(store.batch, "a refused entry does not switch batches off");
        let shape: Vec<(BatchMap, usize)> = store.batches.iter().map(|b| (b.0, b.1)).collect();
        // Backends 1-2 in the batch, 3 alone, 4-5 in the next batch.
        assert_eq!(
            shape,
            vec![
                (BatchMap::Backends, 2),
                (BatchMap::Backends, 2),
                (BatchMap::Svc4, 4),
                (BatchMap::Meta, 2)
            ]
        );
        assert_eq!(store.singles[0], ops[2]);
    }

    #[test]
    fn a_kernel_without_batches_switches_them_off_once() {
        let ops = plan_ops();
        let mut store = Recorder {
            batch: true,
            refuse_at: Some((0, libc::EINVAL)),
            ..Default::default()
        };
        let (done, result) = apply_in_runs(&mut store, &ops);
        result.unwrap();
        assert_eq!(done, ops.len());
        assert!(!store.batch);
        assert!(store.batches.is_empty());
        assert_eq!(store.singles, ops);
    }

    #[test]
    fn a_failed_single_write_stops_and_counts_what_was_applied() {
        let ops = plan_ops();
        let mut store = Recorder {
            batch: true,
            // The slot delete, after the backend and service-map batches.
            fail_single: Some(0),
            ..Default::default()
        };
        let (done, result) = apply_in_runs(&mut store, &ops);
        assert!(result.is_err());
        assert_eq!(done, 9);
        assert_eq!(ops[done], ops[9]);
    }

    #[test]
    fn long_runs_are_cut_at_the_batch_limit() {
        let ops: Vec<Op> = (1..=BATCH_MAX as u32 + 5).map(backend).collect();
        let mut store = Recorder {
            batch: true,
            ..Default::default()
        };
        let (done, result) = apply_in_runs(&mut store, &ops);
        result.unwrap();
        assert_eq!(done, ops.len());
        let counts: Vec<usize> = store.batches.iter().map(|b| b.1).collect();
        assert_eq!(counts, vec![BATCH_MAX, 5]);
        assert_eq!(store.batches[1].2, encoded(&ops[BATCH_MAX..]).0);
    }
}
