//! Read-only access to the pinned maps, for `svc-lb list/trace/status`, the metrics
//! collector and the agent's start-up read-back: opening pins and decoding what they
//! hold. Nothing here writes a map, so it works the same whether an agent runs or not.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use svc_lb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, MAP_AFF_MATCH, MAP_AFFINITY,
    MAP_BACKENDS, MAP_COUNTERS, MAP_REVNAT, MAP_SVC_META, MAP_SVC4, MAP_SVC6, RevNat, Svc4Key,
    Svc6Key, SvcMeta, SvcValue,
};

use super::codec::{self, SvcKey};
use crate::plan::CurrentState;

pub(super) fn collect<K: aya::Pod, V: aya::Pod>(
    m: &HashMap<MapData, K, V>,
    name: &str,
) -> Result<Vec<(K, V)>> {
    m.iter()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("read map {name}"))
}

pub(super) fn read_state(
    svc4: &HashMap<MapData, Svc4Key, SvcValue>,
    svc6: &HashMap<MapData, Svc6Key, SvcValue>,
    backends: &HashMap<MapData, u32, Backend>,
    rev_nats: &HashMap<MapData, u32, RevNat>,
) -> Result<CurrentState> {
    let svc = collect(svc4, MAP_SVC4)?
        .into_iter()
        .map(|(k, v)| (SvcKey::V4(k), v))
        .chain(
            collect(svc6, MAP_SVC6)?
                .into_iter()
                .map(|(k, v)| (SvcKey::V6(k), v)),
        );
    codec::decode_state(
        svc,
        collect(backends, MAP_BACKENDS)?,
        collect(rev_nats, MAP_REVNAT)?,
    )
}

fn open_pinned_hash<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &str,
) -> Result<HashMap<MapData, K, V>> {
    let path = bpffs.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "open pinned map {} (is the agent installed here? see --bpffs)",
            path.display()
        )
    })?;
    HashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("pinned map {name} has an unexpected layout"))
}

fn not_found_is_none<V>(r: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Read-only view of the pinned maps, for the CLI. Works whether the agent runs or not.
pub struct PinnedMaps {
    svc4: HashMap<MapData, Svc4Key, SvcValue>,
    svc6: HashMap<MapData, Svc6Key, SvcValue>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nats: HashMap<MapData, u32, RevNat>,
    bpffs: PathBuf,
}

impl PinnedMaps {
    pub fn open(bpffs: &Path) -> Result<Self> {
        Ok(Self {
            svc4: open_pinned_hash(bpffs, MAP_SVC4)?,
            svc6: open_pinned_hash(bpffs, MAP_SVC6)?,
            backends: open_pinned_hash(bpffs, MAP_BACKENDS)?,
            rev_nats: open_pinned_hash(bpffs, MAP_REVNAT)?,
            bpffs: bpffs.to_path_buf(),
        })
    }

    pub fn read_current(&self) -> Result<CurrentState> {
        read_state(&self.svc4, &self.svc6, &self.backends, &self.rev_nats)
    }

    /// One service-map entry (the datapath's own lookup, for `trace`).
    pub fn svc_value(&self, key: &SvcKey) -> Result<Option<SvcValue>> {
        let r = match key {
            SvcKey::V4(k) => self.svc4.get(k, 0),
            SvcKey::V6(k) => self.svc6.get(k, 0),
        };
        not_found_is_none(r).with_context(|| format!("look up {key:?}"))
    }

    /// One backend entry.
    pub fn backend_value(&self, id: u32) -> Result<Option<Backend>> {
        not_found_is_none(self.backends.get(&id, 0))
            .with_context(|| format!("{MAP_BACKENDS}: look up {id}"))
    }

    /// A client's remembered backend for a frontend (session affinity), for `trace`.
    pub fn affinity_value(&self, key: &AffinityKey) -> Result<Option<AffinityValue>> {
        let path = self.bpffs.join(MAP_AFFINITY);
        let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
        // The affinity map is an LRU hash; aya's HashMap reads both kinds.
        let m: HashMap<MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(Map::LruHashMap(data))
                .with_context(|| format!("{MAP_AFFINITY} has an unexpected layout"))?;
        not_found_is_none(m.get(key, 0)).with_context(|| format!("{MAP_AFFINITY}: look up {key:?}"))
    }

    /// Whether an affinity entry may point at `backend_id` for `rev_nat_id` (the agent's
    /// match map), for `trace`.
    pub fn affinity_member(&self, backend_id: u32, rev_nat_id: u32) -> Result<bool> {
        let m: HashMap<MapData, AffinityMatchKey, u32> =
            open_pinned_hash(&self.bpffs, MAP_AFF_MATCH)?;
        let key = AffinityMatchKey {
            backend_id,
            rev_nat_id,
        };
        Ok(not_found_is_none(m.get(&key, 0))
            .with_context(|| format!("{MAP_AFF_MATCH}: look up {key:?}"))?
            .is_some())
    }

    /// The Service identity of one rev-NAT id.
    pub fn meta_of(&self, rev_nat_id: u32) -> Result<Option<codec::FrontendMeta>> {
        let m: HashMap<MapData, u32, SvcMeta> = open_pinned_hash(&self.bpffs, MAP_SVC_META)?;
        Ok(not_found_is_none(m.get(&rev_nat_id, 0))
            .with_context(|| format!("{MAP_SVC_META}: look up {rev_nat_id}"))?
            .map(|raw| codec::meta_from_raw(&raw)))
    }

    /// Service identity per rev-NAT id.
    pub fn meta(&self) -> Result<std::collections::HashMap<u32, codec::FrontendMeta>> {
        let m: HashMap<MapData, u32, SvcMeta> = open_pinned_hash(&self.bpffs, MAP_SVC_META)?;
        Ok(collect(&m, MAP_SVC_META)?
            .into_iter()
            .map(|(id, raw)| (id, codec::meta_from_raw(&raw)))
            .collect())
    }

    /// New-connection counts per rev-NAT id (`MAP_FE_STATS`) or per backend id
    /// (`MAP_BE_STATS`), summed over CPUs.
    pub fn conn_stats(&self, name: &str) -> Result<std::collections::HashMap<u32, u64>> {
        let path = self.bpffs.join(name);
        let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
        let m: PerCpuHashMap<MapData, u32, u64> = PerCpuHashMap::try_from(Map::PerCpuHashMap(data))
            .with_context(|| format!("{name} has an unexpected type"))?;
        m.iter()
            .map(|r| r.map(|(k, v)| (k, v.iter().sum())))
            .collect::<Result<_, _>>()
            .with_context(|| format!("read {name}"))
    }

    /// Datapath counters (`CTR_*`), summed over CPUs.
    pub fn counters(&self) -> Result<Vec<u64>> {
        let path = self.bpffs.join(MAP_COUNTERS);
        let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
        let arr: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))
            .context("counters map has an unexpected type")?;
        arr.iter()
            .map(|v| v.map(|per_cpu| per_cpu.iter().sum()))
            .collect::<Result<Vec<u64>, _>>()
            .context("read counters")
    }
}
