//! Read-only access to the pinned maps, for `svc-lb list/trace/status`, the metrics
//! collector and the agent's start-up read-back: opening pins and decoding what they
//! hold. Nothing here writes a map, so it works the same whether an agent runs or not.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::maps::{
    Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use ipnet::IpNet;
use svc_lb_common::{
    AffinityExtKey, AffinityKey, AffinityMatchKey, AffinityValue, Backend, CtEntry, CtKey, CtValue,
    ExtConfig, FAMILY_V4, FAMILY_V6, MAP_AFF_MATCH, MAP_AFFINITY, MAP_AFFINITY_EXT, MAP_BACKENDS,
    MAP_CONFIG, MAP_COUNTERS, MAP_CT, MAP_MAGLEV, MAP_NODE_ADDR, MAP_REVNAT, MAP_SRC_RANGE4,
    MAP_SRC_RANGE6, MAP_SVC_META, MAP_SVC4, MAP_SVC6, MaglevTable, NodeAddrKey, RevNat,
    SrcRange4Key, SrcRange6Key, Svc4Key, Svc6Key, SvcMeta, SvcValue,
};

use super::codec::{self, SvcKey, addr_words};
use crate::plan::CurrentState;

pub mod objects;
pub use objects::{MapStatus, ProgramStatus, bpf_stats_enabled, maps, programs};

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

/// Which external-path maps an error about a missing pin should point at.
const EXT_HINT: &str = "is an agent with the external path installed here? see --bpffs";
const HINT: &str = "is the agent installed here? see --bpffs";

fn open_pin(bpffs: &Path, name: &str, hint: &str) -> Result<MapData> {
    let path = bpffs.join(name);
    MapData::from_pin(&path).with_context(|| format!("open pinned map {} ({hint})", path.display()))
}

/// A pinned hash map; `lru` for the LRU kinds (aya's HashMap reads both).
fn open_hash<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &str,
    lru: bool,
    hint: &str,
) -> Result<HashMap<MapData, K, V>> {
    let data = open_pin(bpffs, name, hint)?;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    HashMap::try_from(map).with_context(|| format!("pinned map {name} has an unexpected layout"))
}

fn open_pinned_hash<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &str,
) -> Result<HashMap<MapData, K, V>> {
    open_hash(bpffs, name, false, HINT)
}

fn open_trie<K: aya::Pod>(bpffs: &Path, name: &str) -> Result<LpmTrie<MapData, K, u32>> {
    LpmTrie::try_from(Map::LpmTrie(open_pin(bpffs, name, EXT_HINT)?))
        .with_context(|| format!("pinned map {name} has an unexpected layout"))
}

/// Every key of a source-range trie, decoded to (rev-NAT id, range).
pub(super) fn trie_ranges<K: aya::Pod>(
    trie: &LpmTrie<MapData, K, u32>,
    name: &str,
    decode: impl Fn(u32, &K) -> Result<(u32, IpNet)>,
) -> Result<Vec<(u32, IpNet)>> {
    trie.keys()
        .map(|k| {
            let k = k.with_context(|| format!("read map {name}"))?;
            decode(k.prefix_len(), &k.data())
        })
        .collect()
}

/// Every entry of the pinned conntrack map (`svc-lb conntrack`).
pub fn ct_entries(bpffs: &Path) -> Result<Vec<(CtKey, CtValue)>> {
    Ok(ct_entries_counted(bpffs)?
        .into_iter()
        .map(|(k, e)| (k, e.ct))
        .collect())
}

/// Every entry of the pinned conntrack map with its traffic counters.
pub fn ct_entries_counted(bpffs: &Path) -> Result<Vec<(CtKey, CtEntry)>> {
    let m: HashMap<MapData, CtKey, CtEntry> = open_hash(bpffs, MAP_CT, true, EXT_HINT)?;
    // The datapath keeps writing while we walk. When the entry we stand on is evicted,
    // the kernel restarts the walk from the first key, so an entry may come twice:
    // keyed collection drops the duplicates. Each entry is read whole; the listing is
    // a snapshot of entries, not of one instant.
    let all: std::collections::HashMap<CtKey, CtEntry> = m
        .iter()
        .collect::<Result<_, _>>()
        .with_context(|| format!("read {MAP_CT}"))?;
    Ok(all.into_iter().collect())
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

    /// The bpffs directory the maps are pinned in.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
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

    /// The frontend reverse-NAT entry `id` names, decoded as [`Self::read_current`]
    /// reads it (a placeholder when it does not decode).
    pub fn rev_nat(&self, id: u32) -> Result<Option<crate::model::FrontendKey>> {
        Ok(not_found_is_none(self.rev_nats.get(&id, 0))
            .with_context(|| format!("{MAP_REVNAT}: look up {id}"))?
            .map(|raw| codec::revnat_read_back(id, &raw)))
    }

    /// Walks the backend map, decoded as [`Self::read_current`] reads it, without
    /// collecting it; stops when `f` returns false.
    pub fn walk_backends(
        &self,
        mut f: impl FnMut(u32, &crate::plan::BackendEntry) -> bool,
    ) -> Result<()> {
        for entry in self.backends.iter() {
            let (id, raw) = entry.with_context(|| format!("read map {MAP_BACKENDS}"))?;
            if !f(id, &codec::backend_read_back(id, &raw)) {
                break;
            }
        }
        Ok(())
    }

    /// One backend address's open connections (`MAP_CONNS`), for `trace`; `None` when
    /// it has no entry or the map is not pinned (an older agent).
    pub fn conn_count(&self, key: &svc_lb_common::ConnKey) -> Result<Option<(u64, u64)>> {
        if !self.bpffs.join(svc_lb_common::MAP_CONNS).exists() {
            return Ok(None);
        }
        let m: HashMap<MapData, svc_lb_common::ConnKey, svc_lb_common::ConnCount> =
            open_pinned_hash(&self.bpffs, svc_lb_common::MAP_CONNS)?;
        Ok(not_found_is_none(m.get(key, 0))
            .with_context(|| format!("{}: look up {key:?}", svc_lb_common::MAP_CONNS))?
            .map(|c| c.get()))
    }

    /// A client's remembered backend for a frontend (session affinity), for `trace`.
    pub fn affinity_value(&self, key: &AffinityKey) -> Result<Option<AffinityValue>> {
        let m: HashMap<MapData, AffinityKey, AffinityValue> =
            open_hash(&self.bpffs, MAP_AFFINITY, true, HINT)?;
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
        let data = open_pin(&self.bpffs, name, HINT)?;
        let m: PerCpuHashMap<MapData, u32, u64> = PerCpuHashMap::try_from(Map::PerCpuHashMap(data))
            .with_context(|| format!("{name} has an unexpected type"))?;
        m.iter()
            .map(|r| r.map(|(k, v)| (k, v.iter().sum())))
            .collect::<Result<_, _>>()
            .with_context(|| format!("read {name}"))
    }

    /// Open TCP connections per backend address on the socket path (`MAP_CONNS`,
    /// active and inactive, negatives as 0), or `None` when this node keeps no counts:
    /// the sock_ops program is not attached (the kernel lacks it, it was forced off,
    /// or the agent predates it).
    pub fn conn_counts(
        &self,
    ) -> Result<Option<std::collections::HashMap<svc_lb_common::ConnKey, (u64, u64)>>> {
        let link = super::pins::links_dir(&self.bpffs).join(svc_lb_common::PROG_SOCKOPS);
        if !link.exists() || !self.bpffs.join(svc_lb_common::MAP_CONNS).exists() {
            return Ok(None);
        }
        let m: HashMap<MapData, svc_lb_common::ConnKey, svc_lb_common::ConnCount> =
            open_pinned_hash(&self.bpffs, svc_lb_common::MAP_CONNS)?;
        Ok(Some(
            collect(&m, svc_lb_common::MAP_CONNS)?
                .into_iter()
                .map(|(k, v)| (k, v.get()))
                .collect(),
        ))
    }

    /// The socket path's traffic per (frontend, backend address) (`MAP_TRAFFIC`):
    /// closed TCP connections (added by the sock_ops program, see
    /// [`Self::sock_ops_attached`]) and unconnected UDP datagrams (the sendmsg hooks);
    /// `None` when the pins have no such map (an agent that predates it).
    pub fn traffic(
        &self,
    ) -> Result<
        Option<std::collections::HashMap<svc_lb_common::TrafficKey, svc_lb_common::TrafficCount>>,
    > {
        if !self.bpffs.join(svc_lb_common::MAP_TRAFFIC).exists() {
            return Ok(None);
        }
        let m: HashMap<MapData, svc_lb_common::TrafficKey, svc_lb_common::TrafficCount> =
            open_pinned_hash(&self.bpffs, svc_lb_common::MAP_TRAFFIC)?;
        Ok(Some(
            collect(&m, svc_lb_common::MAP_TRAFFIC)?
                .into_iter()
                .collect(),
        ))
    }

    /// The external path's lasting traffic totals (`LB_EXTTOTAL_V1`, kept by the
    /// agent's fold of the conntrack counts, see `exttotals`), per (frontend, backend
    /// address, protocol); `None` when the map is not pinned (`--ext-stats-interval 0`,
    /// or an older agent).
    pub fn ext_totals(
        &self,
    ) -> Result<Option<std::collections::HashMap<CtTrafficKey, svc_lb_common::TrafficCount>>> {
        let name = svc_lb_common::MAP_EXT_TRAFFIC;
        if !self.bpffs.join(name).exists() {
            return Ok(None);
        }
        let m: HashMap<MapData, svc_lb_common::ExtTrafficKey, svc_lb_common::TrafficCount> =
            open_pinned_hash(&self.bpffs, name)?;
        Ok(Some(
            collect(&m, name)?
                .into_iter()
                .map(|(k, v)| ((k.rev_nat_id, k.backend, k.proto), v))
                .collect(),
        ))
    }

    /// Whether the sock_ops program is attached, i.e. whether `MAP_TRAFFIC` counts TCP
    /// connections (as [`Self::conn_counts`]: not on kernels without the feature).
    pub fn sock_ops_attached(&self) -> bool {
        super::pins::links_dir(&self.bpffs)
            .join(svc_lb_common::PROG_SOCKOPS)
            .exists()
    }

    /// External flows per backend id from the conntrack map's live forward entries:
    /// (established, other), as `CT_FLAG_ESTABLISHED` and `CT_FLAG_CLOSING` tell them
    /// apart (an established flow that saw a FIN or RST counts as other). Empty when
    /// the pins have no conntrack map.
    pub fn ct_conn_counts(&self, now_ns: u64) -> Result<CtConns> {
        let mut out = CtConns::default();
        if !self.bpffs.join(MAP_CT).exists() {
            return Ok(out);
        }
        let mut traffic: std::collections::HashMap<CtTrafficKey, svc_lb_common::TrafficCount> =
            std::collections::HashMap::new();
        for (k, e) in ct_entries_counted(&self.bpffs)? {
            let v = e.ct;
            let live = v.expires_ns >= now_ns;
            if let Some(tk) = ct_traffic_key(&k, &v) {
                let t = traffic.entry(tk).or_default();
                if k.dir == svc_lb_common::CT_DIR_FORWARD {
                    t.packets_in = t.packets_in.wrapping_add(e.packets);
                    t.bytes_in = t.bytes_in.wrapping_add(e.bytes);
                    // A flow that is over (expired, or closing) whose counts the entry
                    // still holds.
                    if !live || v.flags & svc_lb_common::CT_FLAG_CLOSING != 0 {
                        t.closed += 1;
                    }
                } else {
                    t.packets_out = t.packets_out.wrapping_add(e.packets);
                    t.bytes_out = t.bytes_out.wrapping_add(e.bytes);
                }
            }
            if k.dir != svc_lb_common::CT_DIR_FORWARD || !live || v.backend_id == 0 {
                continue;
            }
            out.pairs.insert((v.rev_nat_id, v.backend_id));
            let c = out.per_backend.entry(v.backend_id).or_default();
            let established = v.flags & svc_lb_common::CT_FLAG_ESTABLISHED != 0
                && v.flags & svc_lb_common::CT_FLAG_CLOSING == 0;
            if established {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
        }
        out.traffic = Some(traffic);
        Ok(out)
    }

    /// Datapath counters (`CTR_*`), summed over CPUs.
    pub fn counters(&self) -> Result<Vec<u64>> {
        let data = open_pin(&self.bpffs, MAP_COUNTERS, HINT)?;
        let arr: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))
            .context("counters map has an unexpected type")?;
        arr.iter()
            .map(|v| v.map(|per_cpu| per_cpu.iter().sum()))
            .collect::<Result<Vec<u64>, _>>()
            .context("read counters")
    }

    /// Fails, with the reason, when the pins have no external path (an older agent).
    pub fn require_external(&self) -> Result<()> {
        let ct = self.bpffs.join(MAP_CT);
        if !ct.exists() {
            bail!(
                "{} does not exist: the agent under {} has no external path (an older agent?)",
                ct.display(),
                self.bpffs.display()
            );
        }
        Ok(())
    }

    /// Whether `LB_NODEADDR_V1` holds `addr` (a node address that serves NodePorts).
    pub fn is_node_addr(&self, addr: IpAddr) -> Result<bool> {
        let m: HashMap<MapData, NodeAddrKey, u32> =
            open_hash(&self.bpffs, MAP_NODE_ADDR, false, EXT_HINT)?;
        let key = codec::node_addr_key(addr);
        Ok(not_found_is_none(m.get(&key, 0))
            .with_context(|| format!("{MAP_NODE_ADDR}: look up {addr}"))?
            .is_some())
    }

    /// Every address of `LB_NODEADDR_V1`, sorted.
    pub fn node_addrs(&self) -> Result<Vec<IpAddr>> {
        let m: HashMap<MapData, NodeAddrKey, u32> =
            open_hash(&self.bpffs, MAP_NODE_ADDR, false, EXT_HINT)?;
        let mut out: Vec<IpAddr> = m
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("read {MAP_NODE_ADDR}"))?
            .into_iter()
            .filter_map(|k| match k.family {
                FAMILY_V4 => Some(IpAddr::V4(codec::v4_from_word(k.addr_be[0]))),
                FAMILY_V6 => Some(IpAddr::V6(codec::v6_from_words(k.addr_be))),
                _ => None,
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The source-range LPM lookup the programs make for `rev_nat_id` and `src`, with
    /// the full-length key they build.
    pub fn src_allowed(&self, rev_nat_id: u32, src: IpAddr) -> Result<bool> {
        let hit = match src {
            IpAddr::V4(_) => {
                let t: LpmTrie<MapData, SrcRange4Key, u32> =
                    open_trie(&self.bpffs, MAP_SRC_RANGE4)?;
                let key = SrcRange4Key {
                    rev_nat_id_be: rev_nat_id.to_be(),
                    addr_be: addr_words(src)[0],
                };
                not_found_is_none(t.get(&LpmKey::new(64, key), 0))
                    .with_context(|| format!("{MAP_SRC_RANGE4}: look up"))?
            }
            IpAddr::V6(_) => {
                let t: LpmTrie<MapData, SrcRange6Key, u32> =
                    open_trie(&self.bpffs, MAP_SRC_RANGE6)?;
                let key = SrcRange6Key {
                    rev_nat_id_be: rev_nat_id.to_be(),
                    addr_be: addr_words(src),
                };
                not_found_is_none(t.get(&LpmKey::new(160, key), 0))
                    .with_context(|| format!("{MAP_SRC_RANGE6}: look up"))?
            }
        };
        Ok(hit.is_some())
    }

    /// The source ranges of `rev_nat_id`, sorted.
    pub fn src_ranges(&self, rev_nat_id: u32) -> Result<Vec<IpNet>> {
        let t4: LpmTrie<MapData, SrcRange4Key, u32> = open_trie(&self.bpffs, MAP_SRC_RANGE4)?;
        let t6: LpmTrie<MapData, SrcRange6Key, u32> = open_trie(&self.bpffs, MAP_SRC_RANGE6)?;
        let mut out: Vec<IpNet> = trie_ranges(&t4, MAP_SRC_RANGE4, codec::src_range4_from_raw)?
            .into_iter()
            .chain(trie_ranges(
                &t6,
                MAP_SRC_RANGE6,
                codec::src_range6_from_raw,
            )?)
            .filter(|(id, _)| *id == rev_nat_id)
            .map(|(_, net)| net)
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// One conntrack entry of the external path.
    pub fn ct(&self, key: &CtKey) -> Result<Option<CtValue>> {
        let m: HashMap<MapData, CtKey, CtEntry> = open_hash(&self.bpffs, MAP_CT, true, EXT_HINT)?;
        Ok(not_found_is_none(m.get(key, 0))
            .with_context(|| format!("{MAP_CT}: look up {key:?}"))?
            .map(|e| e.ct))
    }

    /// A client's remembered backend on the external path (session affinity).
    pub fn affinity_ext(&self, key: &AffinityExtKey) -> Result<Option<AffinityValue>> {
        let m: HashMap<MapData, AffinityExtKey, AffinityValue> =
            open_hash(&self.bpffs, MAP_AFFINITY_EXT, true, EXT_HINT)?;
        not_found_is_none(m.get(key, 0))
            .with_context(|| format!("{MAP_AFFINITY_EXT}: look up {key:?}"))
    }

    /// A frontend's Maglev table (as many entries as the map value holds).
    pub fn maglev_table(&self, rev_nat_id: u32) -> Result<Option<Vec<u32>>> {
        let m: HashMap<MapData, u32, MaglevTable> =
            open_hash(&self.bpffs, MAP_MAGLEV, false, EXT_HINT)?;
        Ok(not_found_is_none(m.get(&rev_nat_id, 0))
            .with_context(|| format!("{MAP_MAGLEV}: look up {rev_nat_id}"))?
            .map(|t| t.backend_ids.to_vec()))
    }

    /// `LB_CONFIG_V1[0]`, the external path's settings.
    pub fn ext_config(&self) -> Result<Option<ExtConfig>> {
        let a: Array<MapData, ExtConfig> =
            Array::try_from(Map::Array(open_pin(&self.bpffs, MAP_CONFIG, EXT_HINT)?))
                .with_context(|| format!("pinned map {MAP_CONFIG} has an unexpected layout"))?;
        not_found_is_none(a.get(&0, 0)).with_context(|| format!("{MAP_CONFIG}: read entry 0"))
    }
}

/// (frontend rev-NAT id, backend address, protocol) of a conntrack entry's traffic.
pub type CtTrafficKey = (u32, svc_lb_common::ConnKey, u8);

/// Whose traffic a conntrack entry counts: the forward entry names its backend in
/// `nat_*`, the reply entry is keyed by the backend's packet (source = backend).
/// `None` for an entry of no frontend (rev-NAT id 0).
pub fn ct_traffic_key(k: &CtKey, v: &CtValue) -> Option<CtTrafficKey> {
    if v.rev_nat_id == 0 {
        return None;
    }
    let (addr, port) = if k.dir == svc_lb_common::CT_DIR_FORWARD {
        (v.nat_addr_be, v.nat_port_be)
    } else {
        (k.saddr_be, k.sport_be)
    };
    Some((
        v.rev_nat_id,
        svc_lb_common::ConnKey {
            addr_be: addr,
            port_be: port,
            family: k.family,
            _pad: 0,
        },
        k.proto,
    ))
}

/// The external path's flows (`LB_CT_V2` forward entries), as `list` shows them.
#[derive(Clone, Debug, Default)]
pub struct CtConns {
    /// Flows per backend id: (established, any other state).
    pub per_backend: std::collections::HashMap<u32, (u64, u64)>,
    /// Every (rev-NAT id, backend id) a flow goes through: which frontends a draining
    /// backend (named by no slot) still has flows from.
    pub pairs: std::collections::HashSet<(u32, u32)>,
    /// Packets and bytes the external path's entries counted per (frontend, backend
    /// address, protocol), over every entry the map holds, live or expired (`closed`:
    /// forward entries of flows that are over); `None` without a conntrack map.
    pub traffic: Option<std::collections::HashMap<CtTrafficKey, svc_lb_common::TrafficCount>>,
}
