//! The real datapath: loads the embedded eBPF object, pins maps and links under a
//! bpffs directory, attaches the socket programs to a cgroup, and applies plan
//! operations to the maps. A restarted agent re-opens the pinned maps (adopting their
//! contents) and swaps its programs into the pinned links in place.
use std::{
    fs,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::FdLink, tc::TcAttachOptions,
    },
};
use svc_lb_common::{
    AffinityExtKey, AffinityKey, AffinityMatchKey, AffinityValue, Backend, CtKey, CtValue,
    ExtConfig, MAP_AFF_MATCH, MAP_AFFINITY, MAP_AFFINITY_EXT, MAP_BACKENDS, MAP_BE_STATS,
    MAP_CONFIG, MAP_COUNTERS, MAP_CT, MAP_FE_STATS, MAP_MAGLEV, MAP_NODE_ADDR, MAP_REVNAT,
    MAP_SRC_RANGE4, MAP_SRC_RANGE6, MAP_SVC_META, MAP_SVC4, MAP_SVC6, MAP_XDP_DEV, MaglevTable,
    NodeAddrKey, PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP, RevNat, SOCK_PROGRAMS, SrcRange4Key,
    SrcRange6Key, Svc4Key, Svc6Key, SvcMeta, SvcValue,
};
use tracing::{info, warn};

use super::{
    MapStore,
    codec::{self, SvcKey, Write},
    pins,
    probe::TcAttach,
    sys,
};
use crate::plan::{Capacity, CurrentState, Op};

/// The eBPF object, built by build.rs through aya-build: the agent is one binary.
/// The eBPF object (all programs and maps), built by build.rs. Public for the packet
/// tests, which load it themselves to run programs through BPF_PROG_TEST_RUN.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svclb"));

/// Default pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/svc-lb";
/// Where a missing bpffs gets mounted.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// Makes sure `bpffs` is a directory on a bpf filesystem, mounting bpffs at
/// /sys/fs/bpf when the host has not (fresh machines boot without it), and that it and
/// its links directory are root's alone (see `pins`).
pub fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    let parent = bpffs.parent().unwrap_or(Path::new("/"));
    if !parent.exists() {
        bail!("bpffs parent directory {} does not exist", parent.display());
    }
    if !sys::is_bpffs(parent)? {
        let mount = Path::new(BPFFS_MOUNT);
        if parent == mount {
            info!(path = BPFFS_MOUNT, "bpffs not mounted; mounting it");
            sys::mount_bpffs(mount)?;
        } else {
            bail!(
                "{} is not on a bpf filesystem (mount -t bpf bpf <dir>)",
                parent.display()
            );
        }
    }
    pins::ensure_private_dir(bpffs)?;
    pins::ensure_private_dir(&links_dir(bpffs))?;
    pins::remove_interrupted_links(&links_dir(bpffs))?;
    Ok(())
}

fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        // Harmless on kernels ≥ 5.11, which charge BPF memory to the memcg instead.
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

fn cgroup_id(cgroup: &Path) -> Result<u64> {
    // On cgroup v2 the cgroup id is the directory's inode number.
    Ok(fs::metadata(cgroup)
        .with_context(|| format!("stat cgroup {}", cgroup.display()))?
        .ino())
}

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
    ebpf: Ebpf,
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
        let junk4: Vec<_> = self
            .src4
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| codec::src_range4_from_raw(k.prefix_len(), &k.data()).is_err())
            .collect();
        for k in junk4 {
            warn!(
                map = MAP_SRC_RANGE4,
                prefix_len = k.prefix_len(),
                "undecodable entry removed; the next sync rewrites what is missing"
            );
            ignore_missing(self.src4.remove(&k))
                .with_context(|| format!("{MAP_SRC_RANGE4}: remove an undecodable key"))?;
        }
        let junk6: Vec<_> = self
            .src6
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| codec::src_range6_from_raw(k.prefix_len(), &k.data()).is_err())
            .collect();
        for k in junk6 {
            warn!(
                map = MAP_SRC_RANGE6,
                prefix_len = k.prefix_len(),
                "undecodable entry removed; the next sync rewrites what is missing"
            );
            ignore_missing(self.src6.remove(&k))
                .with_context(|| format!("{MAP_SRC_RANGE6}: remove an undecodable key"))?;
        }
        Ok(())
    }
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

/// Load-time switches of the eBPF object.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Turn on the programs' aya-log debug log (`--bpf-log`).
    pub bpf_log: bool,
    /// Entries per Maglev table (a prime ≤ `MAGLEV_TABLE_MAX`); 0 means the default.
    pub maglev_size: u32,
    /// Entries of `LB_CT_V1` (`--conntrack-max`); 0 means `CT_MAP_MAX`.
    pub conntrack_max: u32,
    /// The external path is known to be off for this run: its LRU maps (conntrack,
    /// external affinity), which the kernel preallocates in full, get
    /// [`EXT_OFF_ENTRIES`] instead.
    pub external_off: bool,
    /// Which helpers and flags the programs may use (from the kernel probe).
    pub compat: Compat,
}

/// The programs' kernel switches (svc-lb-ebpf/src/compat.rs), chosen by
/// [`super::probe::Probe::choices`]. The default is the newest kernel's behaviour.
#[derive(Clone, Copy, Debug)]
pub struct Compat {
    pub set_retval: bool,
    pub csum_ipv6_flag: bool,
    pub fib_redirect: bool,
    pub sk_storage_rnat: bool,
}

impl Default for Compat {
    fn default() -> Self {
        Self {
            set_retval: true,
            csum_ipv6_flag: true,
            fib_redirect: true,
            sk_storage_rnat: true,
        }
    }
}

impl From<&super::probe::Choices> for Compat {
    fn from(c: &super::probe::Choices) -> Self {
        Self {
            set_retval: c.set_retval,
            csum_ipv6_flag: c.csum_ipv6_flag,
            fib_redirect: c.fib_redirect,
            sk_storage_rnat: c.sk_storage_rnat,
        }
    }
}

/// Entries of the external path's LRU maps while it is off. Nothing reads or writes
/// them then, but the maps must exist for the object to load.
pub const EXT_OFF_ENTRIES: u32 = 1;

/// Whether a tc or XDP program of an earlier run is still attached through a pinned
/// link: it keeps writing the maps it was loaded with until this run swaps it out.
fn ext_links_pinned(bpffs: &Path) -> Result<bool> {
    let nl = tc_netlink_dir(bpffs);
    if nl.exists()
        && fs::read_dir(&nl)
            .with_context(|| format!("read {}", nl.display()))?
            .next()
            .is_some()
    {
        return Ok(true);
    }
    let dir = links_dir(bpffs);
    let prefixes = [PROG_TC_INGRESS, PROG_TC_EGRESS, PROG_XDP].map(|p| format!("{p}@"));
    for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let name = entry
            .with_context(|| format!("read {}", dir.display()))?
            .file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sets the size of a preallocated LRU map and decides what happens to a pin of
/// another size left by an earlier run; returns the size the map has for this run.
///
/// aya re-opens an existing pin whatever its size, so the size only changes if the pin
/// goes, and a new map starts empty. It is replaced only when that loses nothing: the
/// map is empty and no tc/XDP program of an earlier run is attached (which could add a
/// flow before this run swaps it out). Otherwise it is kept at its old size with a
/// warning: for the conntrack map, replacing it would cut every external flow whose
/// replies need reverse NAT, which a resize must never do silently. `svc-lb cleanup`
/// applies the new size at the next start.
fn size_lru_map<K: aya::Pod, V: aya::Pod>(
    loader: &mut EbpfLoader<'_>,
    bpffs: &Path,
    name: &'static str,
    wanted: u32,
) -> Result<u32> {
    loader.map_max_entries(name, wanted);
    let path = bpffs.join(name);
    if !path.exists() {
        return Ok(wanted);
    }
    let data =
        MapData::from_pin(&path).with_context(|| format!("open pinned map {}", path.display()))?;
    let pinned = data
        .info()
        .with_context(|| format!("info of pinned map {name}"))?
        .max_entries();
    if pinned == wanted {
        return Ok(wanted);
    }
    let map: HashMap<MapData, K, V> = HashMap::try_from(Map::LruHashMap(data))
        .with_context(|| format!("pinned map {name} has an unexpected layout"))?;
    let first = map
        .keys()
        .next()
        .transpose()
        .with_context(|| format!("read pinned map {name}"))?;
    let busy = if first.is_some() {
        Some("it holds entries (external flows) that a new map would lose")
    } else if ext_links_pinned(bpffs)? {
        Some("tc/XDP programs of an earlier run are attached and may add flows to it")
    } else {
        None
    };
    if let Some(why) = busy {
        warn!(
            map = name,
            pinned_entries = pinned,
            wanted_entries = wanted,
            why,
            "keeping the pinned map at its old size; the new size takes effect after `svc-lb cleanup`"
        );
        return Ok(pinned);
    }
    drop(map);
    fs::remove_file(&path).with_context(|| format!("remove empty pin {}", path.display()))?;
    info!(
        map = name,
        pinned_entries = pinned,
        entries = wanted,
        "replaced the empty pinned map with one of the new size"
    );
    Ok(wanted)
}

/// The `.rodata` global that switches the eBPF debug log (svc-lb-ebpf/src/debug.rs).
const BPF_LOG_GLOBAL: &str = "SVCLB_BPF_LOG";
/// aya-log's ring buffer map.
const BPF_LOG_RINGBUF: &str = "AYA_LOGS";

impl BpfDatapath {
    /// Loads the object and its programs and opens (or creates) the pinned maps. Safe
    /// over an existing pin directory: the maps are re-opened with their contents.
    /// Nothing is attached yet, so the caller can fill the maps first.
    pub fn open(bpffs: &Path) -> Result<Self> {
        Self::open_with(bpffs, LoadOptions::default())
    }

    /// [`Self::open`] with load-time options.
    pub fn open_with(bpffs: &Path, opts: LoadOptions) -> Result<Self> {
        raise_memlock();
        ensure_bpffs(bpffs)?;
        let mut loader = EbpfLoader::new();
        // Always set, so that a stale object without the switch fails loudly here.
        let bpf_log = u8::from(opts.bpf_log);
        loader.override_global(BPF_LOG_GLOBAL, &bpf_log, true);
        // Always set too: an object without a switch must not load with its default.
        let switches = [
            ("SVCLB_SET_RETVAL", opts.compat.set_retval),
            ("SVCLB_CSUM_IPV6_FLAG", opts.compat.csum_ipv6_flag),
            ("SVCLB_FIB_REDIRECT", opts.compat.fib_redirect),
            ("SVCLB_SK_STORAGE", opts.compat.sk_storage_rnat),
        ]
        .map(|(name, on)| (name, u8::from(on)));
        for (name, value) in &switches {
            loader.override_global(name, value, true);
        }
        if !opts.bpf_log {
            // The log ring buffer is created anyway (aya creates every map of the
            // object); without the log, one page is enough instead of 128 KiB.
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            loader.map_max_entries(BPF_LOG_RINGBUF, u32::try_from(page).unwrap_or(4096));
        }
        let (ct_entries, affext_entries) = if opts.external_off {
            (EXT_OFF_ENTRIES, EXT_OFF_ENTRIES)
        } else {
            let ct = match opts.conntrack_max {
                0 => svc_lb_common::CT_MAP_MAX,
                n => n,
            };
            (ct, svc_lb_common::AFFINITY_EXT_MAP_MAX)
        };
        let ct_entries = size_lru_map::<CtKey, CtValue>(&mut loader, bpffs, MAP_CT, ct_entries)?;
        let affext_entries = size_lru_map::<AffinityExtKey, AffinityValue>(
            &mut loader,
            bpffs,
            MAP_AFFINITY_EXT,
            affext_entries,
        )?;
        info!(
            conntrack_entries = ct_entries,
            affinity_ext_entries = affext_entries,
            external_off = opts.external_off,
            "external-path LRU maps sized"
        );
        remove_retired_pins(bpffs)?;
        replace_resized_config_pin(bpffs)?;
        let pins: Vec<(&str, PathBuf)> = svc_lb_common::ALL_MAPS
            .iter()
            .chain(svc_lb_common::SOCKET_MAPS.iter())
            .map(|n| (*n, bpffs.join(n)))
            .collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("load the eBPF object (needs root: CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)")?;
        load_programs(&mut ebpf)?;

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
        let maglev_size = match opts.maglev_size {
            0 => svc_lb_common::MAGLEV_DEFAULT_SIZE,
            n => n,
        };
        Ok(Self {
            ext,
            maglev_size,
            ebpf,
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
        })
    }
}

fn sock_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a cgroup sock_addr program"))
}

fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    for name in SOCK_PROGRAMS {
        sock_program(ebpf, name)?
            .load()
            .with_context(|| format!("load program {name} (kernel verifier)"))?;
    }
    Ok(())
}

/// Attaches every socket program to `cgroup` through a pinned link. Where a pinned
/// link on that cgroup exists (a restart), the new program is swapped into it
/// atomically instead, so there is no moment without a program.
fn attach_all(ebpf: &mut Ebpf, bpffs: &Path, cgroup: &Path) -> Result<()> {
    let cg = fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
    let cg_id = cgroup_id(cgroup)?;
    for name in SOCK_PROGRAMS {
        let prog = sock_program(ebpf, name)?;
        let pin = links_dir(bpffs).join(name);
        if pin.exists() {
            let link = sys::obj_get(&pin)?;
            let li = sys::link_info(&link)?;
            if li.link_type == sys::BPF_LINK_TYPE_CGROUP && li.cgroup_id == cg_id {
                let prog_fd = prog.fd().with_context(|| format!("fd of {name}"))?;
                sys::link_update(&link, prog_fd.as_fd().as_raw_fd())
                    .with_context(|| format!("swap program {name} into {}", pin.display()))?;
                info!(
                    program = name,
                    link_id = li.id,
                    "replaced program in pinned link"
                );
                continue;
            }
            warn!(
                program = name,
                pinned_cgroup_id = li.cgroup_id,
                cgroup = %cgroup.display(),
                "pinned link is attached elsewhere; attaching to the requested cgroup"
            );
        }
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
        let link: FdLink = prog
            .take_link(id)
            .with_context(|| format!("take link of {name}"))?
            .try_into()
            .with_context(|| format!("link of {name} is not a bpf link"))?;
        // Pin under a temporary name (bpffs reserves names with dots), then rename over the old pin, so that the pin
        // path always names an attached link.
        let tmp = links_dir(bpffs).join(format!("{name}_new"));
        let _ = fs::remove_file(&tmp);
        link.pin(&tmp)
            .with_context(|| format!("pin link {}", tmp.display()))?;
        fs::rename(&tmp, &pin)
            .with_context(|| format!("rename {} to {}", tmp.display(), pin.display()))?;
        info!(program = name, cgroup = %cgroup.display(), "attached program");
    }
    Ok(())
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn ifindex(dev: &str) -> Result<u32> {
    let c = std::ffi::CString::new(dev).with_context(|| format!("device name {dev:?}"))?;
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("device {dev}: {}", std::io::Error::last_os_error());
    }
    Ok(idx)
}

/// Swaps `prog_fd` into the link pinned at `pin` when that link is of `link_type` on
/// `ifindex` (a restart): no moment without a program. Returns false when there is no
/// such link (nothing pinned, or a stale pin for another device, which is replaced).
fn swap_into_pinned(
    prog_fd: i32,
    pin: &Path,
    link_type: u32,
    ifindex: u32,
    name: &str,
) -> Result<bool> {
    if !pin.exists() {
        return Ok(false);
    }
    let link = sys::obj_get(pin)?;
    let li = sys::link_info(&link)?;
    // For XDP and TCX links the info union starts with the interface index.
    if li.link_type == link_type && li.cgroup_id as u32 == ifindex {
        sys::link_update(&link, prog_fd)
            .with_context(|| format!("swap program {name} into {}", pin.display()))?;
        info!(program = name, link_id = li.id, pin = %pin.display(), "replaced program in pinned link");
        return Ok(true);
    }
    warn!(program = name, pin = %pin.display(), "pinned link is stale (another device or type); attaching anew");
    Ok(false)
}

/// Pins a new link under a temporary name, then renames it over `pin`, so the pin path
/// always names an attached link.
fn pin_link(link: FdLink, bpffs: &Path, pin: &Path) -> Result<()> {
    let file = pin
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = links_dir(bpffs).join(format!("{file}_new"));
    let _ = fs::remove_file(&tmp);
    link.pin(&tmp)
        .with_context(|| format!("pin link {}", tmp.display()))?;
    fs::rename(&tmp, pin)
        .with_context(|| format!("rename {} to {}", tmp.display(), pin.display()))?;
    Ok(())
}

/// Where netlink-attached tc programs are recorded: one pinned program per
/// `<program>@<device>`, so that a restart knows to replace the filter and `cleanup`
/// knows which filters to remove (a netlink filter has no bpf link to pin).
pub fn tc_netlink_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("tc-netlink")
}

/// The cls_bpf filter svc-lb owns on each clsact hook: a fixed priority and handle, so
/// a restarted agent replaces its own filter in place (the kernel swaps the program
/// under RCU: no packet sees no program) instead of adding a second one.
pub const TC_NETLINK_PRIORITY: u16 = 100;
pub const TC_NETLINK_HANDLE: u16 = 1;

/// Attaches `prog` to `dev` through netlink (clsact qdisc + direct-action filter), for
/// kernels without TCX: replaces svc-lb's filter when there is one, adds it otherwise.
fn attach_tc_netlink(
    prog: &mut SchedClassifier,
    bpffs: &Path,
    dev: &str,
    name: &str,
    attach_type: TcAttachType,
) -> Result<()> {
    if let Err(e) = aya::programs::tc::qdisc_add_clsact(dev) {
        let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(anyhow::Error::new(e))
                .with_context(|| format!("add the clsact qdisc to device {dev}"));
        }
    }
    let handle = aya::programs::tc::TcHandle::new(0, TC_NETLINK_HANDLE);
    let dir = tc_netlink_dir(bpffs);
    let record = dir.join(format!("{name}@{dev}"));
    // Replace only the filter an earlier run recorded (without NLM_F_CREATE the kernel
    // only changes an existing filter); otherwise create it exclusively, so that a
    // filter svc-lb does not own at that priority and handle (or a legacy `ingress`
    // qdisc, where ingress and egress are one hook) fails the attach instead of being
    // replaced.
    let replaced = if record.exists() {
        // Built only here: dropping an unused link handle would remove the filter.
        let ours = aya::programs::tc::SchedClassifierLink::attached(
            dev,
            attach_type,
            TC_NETLINK_PRIORITY,
            handle,
            None,
        )
        .with_context(|| format!("device {dev}"))?;
        prog.attach_to_link(ours).map_err(|e| e.to_string())
    } else {
        Err("no filter recorded by an earlier run".to_owned())
    };
    let id = match replaced {
        Ok(id) => {
            info!(program = name, device = %dev, priority = TC_NETLINK_PRIORITY, "replaced program in the netlink tc filter");
            id
        }
        Err(replace_err) => {
            let id = prog
                .attach_with_options(
                    dev,
                    attach_type,
                    TcAttachOptions::Netlink(aya::programs::tc::NlOptions {
                        priority: TC_NETLINK_PRIORITY,
                        handle,
                        classid: None,
                    }),
                )
                .map_err(anyhow::Error::new)
                .with_context(|| {
                    format!(
                        "attach {name} to device {dev} (netlink filter at priority {TC_NETLINK_PRIORITY}, handle {TC_NETLINK_HANDLE}; is that taken, or does the device have an `ingress` qdisc instead of clsact? not replaced: {replace_err})"
                    )
                })?;
            info!(program = name, device = %dev, priority = TC_NETLINK_PRIORITY, "attached tc program (netlink)");
            id
        }
    };
    // aya removes the filters of the links it holds when the program is dropped; the
    // filter must outlive the agent, like a pinned link.
    let link = prog
        .take_link(id)
        .with_context(|| format!("take link of {name}"))?;
    std::mem::forget(link);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!("{name}@{dev}_new"));
    let _ = fs::remove_file(&tmp);
    prog.pin(&tmp)
        .with_context(|| format!("pin program {}", tmp.display()))?;
    fs::rename(&tmp, &record)
        .with_context(|| format!("rename {} to {}", tmp.display(), record.display()))?;
    Ok(())
}

/// Removes svc-lb's netlink filter of `name` on `dev` and its record. Failures are
/// logged (the device may be gone); the record goes anyway.
fn detach_tc_netlink(record: &Path, dev: &str, name: &str, attach_type: TcAttachType) {
    match aya::programs::tc::qdisc_detach_program(dev, attach_type, name) {
        Ok(()) => info!(program = name, device = %dev, "removed the netlink tc filter"),
        Err(e) => {
            warn!(program = name, device = %dev, error = %format!("{:#}", anyhow::Error::new(e)), "could not remove the netlink tc filter")
        }
    }
    if let Err(e) = fs::remove_file(record) {
        warn!(pin = %record.display(), error = %e, "could not remove the record");
    }
}

/// Detaches the link pinned at `pin` and removes the pin; failures are logged.
fn detach_pin(pin: &Path) {
    match sys::obj_get(pin).and_then(|fd| sys::link_detach(&fd)) {
        Ok(()) => info!(pin = %pin.display(), "detached the link of an earlier run"),
        Err(e) => warn!(pin = %pin.display(), error = %format!("{e:#}"), "could not detach link"),
    }
    if let Err(e) = fs::remove_file(pin) {
        warn!(pin = %pin.display(), error = %e, "could not remove the pin");
    }
}

/// Detaches every tc and XDP program of svc-lb from `devices` (TCX and XDP links,
/// netlink filters), best effort: after a failed attach the external path is off, and a
/// half-attached device (ingress translating, egress not) would break its flows.
pub fn detach_devices(bpffs: &Path, devices: &[String]) {
    for dev in devices {
        for (name, t) in [
            (PROG_TC_INGRESS, TcAttachType::Ingress),
            (PROG_TC_EGRESS, TcAttachType::Egress),
        ] {
            let record = tc_netlink_dir(bpffs).join(format!("{name}@{dev}"));
            if record.exists() {
                detach_tc_netlink(&record, dev, name, t);
            }
        }
        for name in [PROG_TC_INGRESS, PROG_TC_EGRESS, PROG_XDP] {
            let pin = links_dir(bpffs).join(format!("{name}@{dev}"));
            if pin.exists() {
                detach_pin(&pin);
            }
        }
    }
}

/// Removes every netlink tc filter recorded under `bpffs` (`cleanup`); returns how
/// many records there were.
fn cleanup_tc_netlink(bpffs: &Path) -> Result<usize> {
    let dir = tc_netlink_dir(bpffs);
    if !dir.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("read {}", dir.display()))?
            .path();
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        match file.split_once('@') {
            Some((prog, dev)) if prog == PROG_TC_INGRESS || prog == PROG_TC_EGRESS => {
                let t = if prog == PROG_TC_INGRESS {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                detach_tc_netlink(&path, dev, prog, t);
                n += 1;
            }
            _ => fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?,
        }
    }
    fs::remove_dir(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(n)
}

/// Native-mode XDP on each device. A driver that refuses it costs only the
/// acceleration: one warning per device, and the tc programs do the work.
fn attach_xdp(ebpf: &mut Ebpf, bpffs: &Path, devices: &[String]) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_XDP)
        .ok_or_else(|| {
            anyhow!(
                "program {PROG_XDP} missing from the eBPF object (built without the external path?)"
            )
        })?
        .try_into()
        .with_context(|| format!("program {PROG_XDP} is not an XDP program"))?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("load program {PROG_XDP} (kernel verifier)"))?;
    }
    for dev in devices {
        let pin = links_dir(bpffs).join(format!("{PROG_XDP}@{dev}"));
        let prog_fd = prog
            .fd()
            .with_context(|| format!("fd of {PROG_XDP}"))?
            .as_fd()
            .as_raw_fd();
        if swap_into_pinned(
            prog_fd,
            &pin,
            sys::BPF_LINK_TYPE_XDP,
            ifindex(dev)?,
            PROG_XDP,
        )? {
            continue;
        }
        let id = match prog.attach(dev, XdpMode::Driver) {
            Ok(id) => id,
            Err(e) => {
                // Through anyhow so that the kernel's reason (the error's source) is shown.
                let error = format!("{:#}", anyhow::Error::new(e));
                warn!(device = %dev, %error, "native XDP refused by the driver; this device runs tc only");
                continue;
            }
        };
        let link = prog
            .take_link(id)
            .with_context(|| format!("take link of {PROG_XDP}"))?;
        match FdLink::try_from(link) {
            Ok(link) => {
                pin_link(link, bpffs, &pin)?;
                info!(program = PROG_XDP, device = %dev, "attached XDP program (native mode)");
            }
            Err(e) => {
                // A netlink attachment (no bpf link on this kernel) cannot be pinned,
                // so a restart could not find it; rather run tc-only. Dropping the
                // link detaches it.
                warn!(device = %dev, error = %e, "XDP attached without a bpf link; detached, this device runs tc only");
            }
        }
    }
    Ok(())
}

impl MapStore for BpfDatapath {
    fn read_current(&self) -> Result<CurrentState> {
        let mut state = read_state(&self.svc4, &self.svc6, &self.backends, &self.rev_nats)?;
        if let Ok(ext) = &self.ext {
            // Tables are listed, not decoded: an empty id list tells the planner their
            // contents are unknown, so the first plan after start-up rewrites every
            // external frontend's table. That is the simple correct choice: the table
            // size may have changed with the flags, and a table is cheap to rebuild
            // (rewriting it in place is atomic for the programs).
            for id in ext.maglev.keys() {
                let id = id.with_context(|| format!("read map {MAP_MAGLEV}"))?;
                state.maglev.insert(id, Vec::new());
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

    fn capacity(&self) -> Capacity {
        self.cap
    }
}

impl BpfDatapath {
    /// Attaches (or swaps in) the programs; call after the first sync so that the new
    /// programs never see maps emptier than the old ones did.
    pub fn attach(&mut self, bpffs: &Path, cgroup: &Path) -> Result<()> {
        attach_all(&mut self.ebpf, bpffs, cgroup)
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
            .ebpf
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
    /// [`attach_tc_netlink`]).
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
        for name in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object (built without the external path?)"))?
                .try_into()
                .with_context(|| format!("program {name} is not a tc program"))?;
            if prog.fd().is_err() {
                prog.load()
                    .with_context(|| format!("load program {name} (kernel verifier)"))?;
            }
            let attach_type = if name == PROG_TC_INGRESS {
                TcAttachType::Ingress
            } else {
                TcAttachType::Egress
            };
            for dev in devices {
                let pin = links_dir(bpffs).join(format!("{name}@{dev}"));
                if tc == TcAttach::Netlink {
                    attach_tc_netlink(prog, bpffs, dev, name, attach_type)?;
                    // A TCX link of an earlier run (another kernel, or the switch
                    // forced): the filter is in place now, so it goes.
                    if pin.exists() {
                        detach_pin(&pin);
                    }
                    continue;
                }
                let ifindex = ifindex(dev)?;
                if swap_into_pinned(
                    prog.fd()
                        .with_context(|| format!("fd of {name}"))?
                        .as_fd()
                        .as_raw_fd(),
                    &pin,
                    sys::BPF_LINK_TYPE_TCX,
                    ifindex,
                    name,
                )? {
                    continue;
                }
                let id = prog
                    .attach_with_options(
                        dev,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| format!("attach {name} to device {dev} (TCX)"))?;
                let link: FdLink = prog
                    .take_link(id)
                    .with_context(|| format!("take link of {name}"))?
                    .try_into()
                    .with_context(|| format!("link of {name} on {dev} is not a bpf link"))?;
                pin_link(link, bpffs, &pin)?;
                info!(program = name, device = %dev, "attached tc program");
            }
            // Netlink filters of an earlier run go once the TCX links are in place.
            for dev in devices.iter().filter(|_| tc == TcAttach::Tcx) {
                let record = tc_netlink_dir(bpffs).join(format!("{name}@{dev}"));
                if record.exists() {
                    detach_tc_netlink(&record, dev, name, attach_type);
                }
            }
        }
        if xdp {
            attach_xdp(&mut self.ebpf, bpffs, devices)?;
        }
        Ok(())
    }

    /// Starts reading the programs' aya-log records (only useful with
    /// [`LoadOptions::bpf_log`]); they go to the `log` facade, which tracing receives.
    pub fn ebpf_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("start the eBPF log reader")
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

fn collect<K: aya::Pod, V: aya::Pod>(
    m: &HashMap<MapData, K, V>,
    name: &str,
) -> Result<Vec<(K, V)>> {
    m.iter()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("read map {name}"))
}

fn read_state(
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

/// Removes a pinned `LB_CONFIG_V1` whose value size is not this version's `ExtConfig`
/// (an upgrade that added fields): aya would re-open it and the programs would not load
/// against it. Nothing is lost: the agent writes the config at every start, and
/// programs of the old version keep their own copy until their links are swapped.
fn replace_resized_config_pin(bpffs: &Path) -> Result<()> {
    let path = bpffs.join(MAP_CONFIG);
    if !path.exists() {
        return Ok(());
    }
    let data =
        MapData::from_pin(&path).with_context(|| format!("open pinned map {}", path.display()))?;
    let size = data
        .info()
        .with_context(|| format!("info of pinned map {MAP_CONFIG}"))?
        .value_size();
    let want = std::mem::size_of::<ExtConfig>() as u32;
    if size != want {
        fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        info!(pin = %path.display(), pinned_value_size = size, value_size = want, "replaced the pinned config map of an earlier version");
    }
    Ok(())
}

/// Removes the pins of maps an earlier version used (`RETIRED_MAPS`), so that an
/// upgraded node does not keep them forever.
fn remove_retired_pins(bpffs: &Path) -> Result<()> {
    for name in svc_lb_common::RETIRED_MAPS {
        let path = bpffs.join(name);
        if path.exists() {
            fs::remove_file(&path)
                .with_context(|| format!("remove retired pin {}", path.display()))?;
            info!(pin = %path.display(), "removed the pin of a map this version no longer uses");
        }
    }
    Ok(())
}

/// Detaches every program and removes every pin under `bpffs`. With `cgroup`, also
/// detaches svc-lb links on that cgroup whose pins were lost.
pub fn cleanup(bpffs: &Path, cgroup: Option<&Path>) -> Result<usize> {
    let mut detached = 0;
    let links = links_dir(bpffs);
    if links.exists() {
        for entry in fs::read_dir(&links).with_context(|| format!("read {}", links.display()))? {
            let path = entry
                .with_context(|| format!("read {}", links.display()))?
                .path();
            match sys::obj_get(&path).and_then(|fd| sys::link_detach(&fd)) {
                Ok(()) => detached += 1,
                Err(e) => {
                    warn!(pin = %path.display(), error = %format!("{e:#}"), "could not detach link; removing the pin anyway")
                }
            }
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        fs::remove_dir(&links).with_context(|| format!("remove {}", links.display()))?;
    }
    detached += cleanup_tc_netlink(bpffs)?;
    if let Some(cg) = cgroup {
        detached += sys::detach_orphan_links(cgroup_id(cg)?, "svclb_")?;
    }
    for name in svc_lb_common::ALL_MAPS
        .iter()
        .chain(svc_lb_common::SOCKET_MAPS.iter())
    {
        let path = bpffs.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
    }
    remove_retired_pins(bpffs)?;
    if bpffs.exists() {
        fs::remove_dir(bpffs)
            .with_context(|| format!("remove {} (not empty?)", bpffs.display()))?;
    }
    Ok(detached)
}
