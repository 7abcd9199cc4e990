//! Loading: the embedded eBPF object with its load-time switches (the kernel probe's
//! compat choices, the debug log, map sizes), the map pins it re-opens or creates, and
//! the socket programs through the verifier. Nothing is attached here (see
//! [`super::links`]) and no map is written (see [`super::bpf`]).
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, ProgramArray},
    programs::{CgroupSockAddr, Program, ProgramFd, SockOps},
};
use svc_lb_common::{
    AffinityExtKey, AffinityValue, CtEntry, CtKey, ExtConfig, MAP_AFF_MATCH, MAP_AFFINITY_EXT,
    MAP_BACKENDS, MAP_BE_STATS, MAP_CONFIG, MAP_CT, MAP_FE_STATS, MAP_REVNAT, MAP_SOCK_RNAT4,
    MAP_SOCK_RNAT6, MAP_SVC_META, MAP_SVC4, MAP_SVC6, PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4,
    PROG_SENDMSG6, PROG_SOCKOPS, PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_XDP, SOCK_PROGRAMS,
};
use tracing::{info, warn};

use super::pins::{self, ensure_bpffs, links_dir, tc_netlink_dir};

/// The eBPF object (all programs and maps), built by build.rs. Public for the packet
/// tests, which load it themselves to run programs through BPF_PROG_TEST_RUN.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svclb"));

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
    /// Capacities of the maps the agent fills; `None` keeps the object's.
    pub sizes: MapSizes,
    /// `--socket-lb-scope host`: the host network namespace's cookie, the only one whose
    /// sockets the socket programs translate; 0 (`all`) translates every socket.
    pub host_netns_cookie: u64,
    /// `--route-cluster-ips`: the external path also translates cluster IPs.
    pub route_cluster_ips: bool,
}

/// Capacities of the maps the agent fills (`--service-map-max`, `--backend-map-max`,
/// `--revnat-map-max`). `None` keeps the size compiled into the object (the
/// `svc-lb-common` constants). These maps are not preallocated: an entry costs kernel
/// memory only once it is written, but the bucket array (16 bytes per entry, rounded up
/// to a power of two) is allocated with the map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSizes {
    /// `LB_SVC4_V1`, `LB_SVC6_V1` (one entry per frontend plus one per backend slot)
    /// and `LB_AFFMATCH_V1` (at most one per slot).
    pub services: Option<u32>,
    /// `LB_BACKENDS_V1` and its counters `LB_BESTATS_V1`.
    pub backends: Option<u32>,
    /// `LB_REVNAT_V1` (one per frontend) and what is keyed by its ids:
    /// `LB_SVCMETA_V1`, `LB_FESTATS_V1`.
    pub rev_nats: Option<u32>,
}

impl MapSizes {
    /// (map, entries) for every map whose size this run sets.
    fn entries(&self) -> Vec<(&'static str, u32)> {
        let groups: [(Option<u32>, &[&'static str]); 3] = [
            (self.services, &[MAP_SVC4, MAP_SVC6, MAP_AFF_MATCH]),
            (self.backends, &[MAP_BACKENDS, MAP_BE_STATS]),
            (self.rev_nats, &[MAP_REVNAT, MAP_SVC_META, MAP_FE_STATS]),
        ];
        groups
            .into_iter()
            .filter_map(|(n, maps)| n.map(|n| maps.iter().map(move |m| (*m, n))))
            .flatten()
            .collect()
    }
}

/// The programs' kernel switches (svc-lb-ebpf/src/compat.rs), chosen by
/// [`super::probe::Probe::choices`]. The default is the newest kernel's behaviour.
#[derive(Clone, Copy, Debug)]
pub struct Compat {
    pub set_retval: bool,
    pub csum_ipv6_flag: bool,
    pub fib_redirect: bool,
    pub sk_storage_rnat: bool,
    pub atomic_fetch: bool,
    /// Load the sock_ops program that keeps the connection counts.
    pub conn_counts: bool,
    pub coarse_clock: bool,
    /// Load the `lc`/`wlc` programs into the connect hooks' program arrays.
    pub lc_loop: bool,
    /// Those are `svclb_lcloop4`/`6` (`bpf_loop`), not `svclb_lc4`/`6`.
    pub lc_bpf_loop: bool,
}

impl Default for Compat {
    fn default() -> Self {
        Self {
            set_retval: true,
            csum_ipv6_flag: true,
            fib_redirect: true,
            sk_storage_rnat: true,
            atomic_fetch: true,
            conn_counts: true,
            coarse_clock: true,
            lc_loop: true,
            lc_bpf_loop: true,
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
            atomic_fetch: c.atomic_fetch,
            conn_counts: c.conn_counts,
            coarse_clock: c.coarse_clock,
            lc_loop: c.lc_loop,
            lc_bpf_loop: c.lc_bpf_loop,
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

/// Sets the size of a map that the agent fills (not an LRU: see [`size_lru_map`]) and
/// decides what happens to a pin of another size; returns the size the map has.
///
/// An empty pin is replaced by a map of the new size. A pin that holds entries is kept
/// at its old size with a warning: replacing it would cut the Services it serves until
/// the agent rewrote them. The planner reads each map's real capacity, so a kept map
/// only means that Services beyond it are rejected by name. `svc-lb cleanup` applies the
/// new size at the next start.
fn size_agent_map(
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
    let info = data
        .info()
        .with_context(|| format!("info of pinned map {name}"))?;
    let pinned = info.max_entries();
    if pinned == wanted {
        return Ok(wanted);
    }
    let key_size = info.key_size() as usize;
    use std::os::fd::AsFd as _;
    let fd = data.fd().as_fd();
    let empty = super::sys::first_key(fd, key_size)
        .with_context(|| format!("read pinned map {name}"))?
        .is_none();
    if !empty {
        warn!(
            map = name,
            pinned_entries = pinned,
            wanted_entries = wanted,
            "keeping the pinned map at its old size: it holds entries; the new size takes effect after `svc-lb cleanup`"
        );
        return Ok(pinned);
    }
    drop(data);
    fs::remove_file(&path).with_context(|| format!("remove empty pin {}", path.display()))?;
    info!(
        map = name,
        pinned_entries = pinned,
        entries = wanted,
        "replaced the empty pinned map with one of the new size"
    );
    Ok(wanted)
}

/// A loader being made on a thread of its own (see [`prepare_loader`]).
static PREPARED: std::sync::Mutex<Option<std::thread::JoinHandle<EbpfLoader<'static>>>> =
    std::sync::Mutex::new(None);

/// Starts making the loader of the next [`load_maps`] on a thread of its own.
/// `EbpfLoader::new` reads and parses the kernel's whole BTF (`/sys/kernel/btf/vmlinux`,
/// about 5 MiB here: some 50 ms of CPU); the agent calls this before the kernel probe,
/// which spends most of its time waiting on the kernel (RCU grace periods), so the
/// parse leaves the start-up's critical path. Without it, or if the thread failed,
/// [`load_maps`] makes its loader itself.
pub fn prepare_loader() {
    let spawned = std::thread::Builder::new()
        .name("svclb-btf".into())
        .spawn(EbpfLoader::new);
    match (spawned, PREPARED.lock()) {
        (Ok(handle), Ok(mut slot)) => *slot = Some(handle),
        (Err(e), _) => {
            tracing::debug!(error = %e, "could not start the loader thread; the load makes its own")
        }
        (Ok(_), Err(_)) => {}
    }
}

/// The loader [`prepare_loader`] made, or a new one.
fn prepared_loader() -> EbpfLoader<'static> {
    let handle = PREPARED.lock().ok().and_then(|mut slot| slot.take());
    match handle.map(std::thread::JoinHandle::join) {
        Some(Ok(loader)) => loader,
        _ => EbpfLoader::new(),
    }
}

/// The `.rodata` global that switches the eBPF debug log (svc-lb-ebpf/src/debug.rs).
const BPF_LOG_GLOBAL: &str = "SVCLB_BPF_LOG";
/// aya-log's ring buffer map.
const BPF_LOG_RINGBUF: &str = "AYA_LOGS";

/// Loads the object and opens (or creates) the pinned maps, without loading its socket
/// programs: the maps can be read and written, and the programs are ready for
/// [`load_programs`], which the kernel's verifier makes the long part (hundreds of ms
/// on a busy machine). Safe over an existing pin directory: the maps are re-opened with
/// their contents.
pub fn load_maps(bpffs: &Path, opts: &LoadOptions) -> Result<Ebpf> {
    load_object(bpffs, opts, false)
}

/// [`load_maps`]; with `reopen` for a second copy of the object beside the first (the
/// `lc`/`wlc` programs, see [`load_lc_programs`]): the pins the first copy created or
/// kept are re-opened as they are, nothing is resized, replaced or removed, and nothing
/// is logged twice.
fn load_object(bpffs: &Path, opts: &LoadOptions, reopen: bool) -> Result<Ebpf> {
    raise_memlock();
    ensure_bpffs(bpffs)?;
    let mut loader = if reopen {
        EbpfLoader::new()
    } else {
        prepared_loader()
    };
    // Always set, so that a stale object without the switch fails loudly here.
    let bpf_log = u8::from(opts.bpf_log);
    loader.override_global(BPF_LOG_GLOBAL, &bpf_log, true);
    // Always set too: an object without a switch must not load with its default.
    let switches = [
        ("SVCLB_SET_RETVAL", opts.compat.set_retval),
        ("SVCLB_CSUM_IPV6_FLAG", opts.compat.csum_ipv6_flag),
        ("SVCLB_FIB_REDIRECT", opts.compat.fib_redirect),
        ("SVCLB_SK_STORAGE", opts.compat.sk_storage_rnat),
        ("SVCLB_ATOMIC_FETCH", opts.compat.atomic_fetch),
        ("SVCLB_COARSE_CLOCK", opts.compat.coarse_clock),
        ("SVCLB_LC_LOOP", opts.compat.lc_loop),
    ]
    .map(|(name, on)| (name, u8::from(on)));
    // Sockets of an agent before LB_SKRNATSK_V2 keep their translations in the old
    // store: re-open it (never create it) and let the programs read it after a miss.
    let old_store = bpffs.join(svc_lb_common::MAP_SOCK_RNAT_SK_V1);
    let read_old_store = u8::from(old_store.exists());
    if read_old_store != 0 {
        loader.map_pin_path(svc_lb_common::MAP_SOCK_RNAT_SK_V1, old_store.as_path());
    }
    if read_old_store != 0 && !reopen {
        info!(pin = %old_store.display(), "sockets from before the upgrade keep their reverse NAT: the programs read the old store after a miss");
    }
    loader.override_global("SVCLB_SK_RNAT_V1", &read_old_store, true);
    for (name, value) in &switches {
        loader.override_global(name, value, true);
    }
    loader.override_global("SVCLB_HOST_NETNS", &opts.host_netns_cookie, true);
    let route_cluster_ips = u8::from(opts.route_cluster_ips);
    loader.override_global("SVCLB_ROUTE_CLUSTER_IPS", &route_cluster_ips, true);
    if !opts.bpf_log {
        // The log ring buffer is created anyway (aya creates every map of the
        // object); without the log, one page is enough instead of 128 KiB.
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        loader.map_max_entries(BPF_LOG_RINGBUF, u32::try_from(page).unwrap_or(4096));
    }
    if !reopen {
        size_maps(&mut loader, bpffs, opts)?;
    }
    let pins: Vec<(&str, PathBuf)> = svc_lb_common::ALL_MAPS
        .iter()
        .chain(svc_lb_common::SOCKET_MAPS.iter())
        .map(|n| (*n, bpffs.join(n)))
        .collect();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let rewritten;
    let object: &[u8] = if opts.compat.atomic_fetch {
        OBJECT
    } else {
        let (bytes, n) = super::oldinsn::without_fetch_atomics(OBJECT)
            .context("rewrite the eBPF object for a kernel without BPF_FETCH atomics")?;
        if !reopen {
            info!(
                instructions = n,
                "atomics with fetch replaced by loads in branches this kernel never runs (before 5.12)"
            );
        }
        rewritten = bytes;
        &rewritten
    };
    loader
        .load(object)
        .context("load the eBPF object (needs root: CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)")
}

/// The sizes of the maps this run creates, and what happens to pins of other sizes
/// (see [`size_lru_map`], [`size_agent_map`]); retired and resized pins go.
fn size_maps(loader: &mut EbpfLoader<'_>, bpffs: &Path, opts: &LoadOptions) -> Result<()> {
    let (ct_entries, affext_entries) = if opts.external_off {
        (EXT_OFF_ENTRIES, EXT_OFF_ENTRIES)
    } else {
        let ct = match opts.conntrack_max {
            0 => svc_lb_common::CT_MAP_MAX,
            n => n,
        };
        (ct, svc_lb_common::AFFINITY_EXT_MAP_MAX)
    };
    let ct_entries = size_lru_map::<CtKey, CtEntry>(loader, bpffs, MAP_CT, ct_entries)?;
    let affext_entries = size_lru_map::<AffinityExtKey, AffinityValue>(
        loader,
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
    for (name, entries) in opts.sizes.entries() {
        size_agent_map(loader, bpffs, name, entries)?;
    }
    size_sock_rnat_maps(loader, bpffs, opts.compat.sk_storage_rnat)?;
    pins::remove_retired_pins(bpffs)?;
    replace_resized_config_pin(bpffs)
}

/// The size of the socket reverse-NAT LRU maps (`LB_SKRNAT4_V1`, `LB_SKRNAT6_V1`) when
/// this run creates them: [`svc_lb_common::SOCK_RNAT_MAP_MAX`] on the fallback, where
/// every socket's translations live there, and the smaller
/// [`svc_lb_common::SOCK_RNAT_INDEX_MAX`] with socket-local storage, where they only
/// index connected UDP sockets for socket termination. The kernel preallocates LRU maps
/// in full, so the smaller size is that much less to create at start (and less memory).
///
/// A pin of another size (an older agent's larger maps, or maps made before a switch
/// of the storage) is re-opened as it is, never replaced: its entries are the live
/// sockets' translations (or their termination index), and the programs of the
/// previous run still write it until this run's replace them. A pin smaller than the
/// fallback needs is named in a warning; `svc-lb cleanup` applies the size.
fn size_sock_rnat_maps(loader: &mut EbpfLoader<'_>, bpffs: &Path, sk_storage: bool) -> Result<()> {
    let wanted = if sk_storage {
        svc_lb_common::SOCK_RNAT_INDEX_MAX
    } else {
        svc_lb_common::SOCK_RNAT_MAP_MAX
    };
    for name in [MAP_SOCK_RNAT4, MAP_SOCK_RNAT6] {
        loader.map_max_entries(name, wanted);
        let path = bpffs.join(name);
        if !path.exists() {
            continue;
        }
        let pinned = MapData::from_pin(&path)
            .with_context(|| format!("open pinned map {}", path.display()))?
            .info()
            .with_context(|| format!("info of pinned map {name}"))?
            .max_entries();
        if pinned < wanted && !sk_storage {
            warn!(
                map = name,
                pinned_entries = pinned,
                wanted_entries = wanted,
                "keeping the pinned socket reverse-NAT map at its smaller size (made while socket-local storage was on); the fallback's size takes effect after `svc-lb cleanup`"
            );
        } else if pinned != wanted {
            info!(
                map = name,
                pinned_entries = pinned,
                entries = wanted,
                "keeping the pinned socket reverse-NAT map at its size"
            );
        }
    }
    Ok(())
}

pub(super) fn sock_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a cgroup sock_addr program"))
}

pub(super) fn sockops_program(ebpf: &mut Ebpf) -> Result<&mut SockOps> {
    ebpf.program_mut(PROG_SOCKOPS)
        .ok_or_else(|| anyhow!("program {PROG_SOCKOPS} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {PROG_SOCKOPS} is not a sock_ops program"))
}

/// Loads the socket programs (and with `conn_counts` the sock_ops program) of an
/// object from [`load_maps`] through the verifier, on as many threads as there are
/// CPUs (at most [`VERIFY_THREADS`]): the kernel verifies programs independently, and
/// one thread leaves a CPU idle once the agent's first sync is done with it.
///
/// Not the `lc`/`wlc` scan programs: those load on demand, from a copy of the object
/// of their own ([`load_lc_programs`]), once a frontend needs them.
pub fn load_programs(ebpf: &mut Ebpf, conn_counts: bool) -> Result<()> {
    load_socket_programs(ebpf, conn_counts)
}

/// An error whose chain carries a whole verifier log (tens of KB: every instruction
/// walked) cut to its first line and the log's last lines, which name the limit hit
/// ("BPF program is too large. Processed 1000001 insn"), for a warning that the agent
/// survives. Seen on Debian's 6.1, whose verifier refuses the lc scan.
pub(super) fn verifier_summary(text: &str) -> String {
    const KEEP_LINES: usize = 3;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 2 * KEEP_LINES {
        return text.to_owned();
    }
    format!(
        "{} [… {} lines of the verifier's log …] {}",
        lines[0],
        lines.len() - 1 - KEEP_LINES,
        lines[lines.len() - KEEP_LINES..].join(" | ")
    )
}

fn load_socket_programs(ebpf: &mut Ebpf, conn_counts: bool) -> Result<()> {
    // sock_ops only where the probe found it with socket storage: elsewhere the
    // verifier would refuse its helper, and the counts are reported unavailable instead.
    let wanted: Vec<&str> = SOCK_PROGRAMS
        .iter()
        .copied()
        .chain(conn_counts.then_some(PROG_SOCKOPS))
        .collect();
    let mut programs: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| wanted.contains(name))
        .collect();
    if let Some(missing) = wanted
        .iter()
        .find(|w| !programs.iter().any(|(name, _)| name == *w))
    {
        bail!("program {missing} missing from the eBPF object");
    }
    // The largest first (the IPv6 and IPv4 connect and sendmsg programs take most of
    // the verifier's time), so that the threads end together.
    programs.sort_by_key(|(name, _)| {
        LARGEST_FIRST
            .iter()
            .position(|n| n == name)
            .unwrap_or(LARGEST_FIRST.len())
    });
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, VERIFY_THREADS);
    let queue = std::sync::Mutex::new(programs.into_iter());
    let next = || queue.lock().ok().and_then(|mut q| q.next());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    while let Some((name, program)) = next() {
                        load_program(name, program)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| match w.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    })
}

/// The most threads [`load_programs`] verifies on.
const VERIFY_THREADS: usize = 4;

/// The socket programs, largest (slowest to verify) first.
const LARGEST_FIRST: [&str; 4] = [PROG_CONNECT6, PROG_SENDMSG6, PROG_CONNECT4, PROG_SENDMSG4];

fn load_program(name: &str, program: &mut Program) -> Result<()> {
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        _ => bail!("program {name} is not a socket program"),
    }
    .with_context(|| format!("load program {name} (kernel verifier)"))
}

/// The `lc`/`wlc` scan programs, loaded, with the program array each goes into.
pub struct LcPrograms(Vec<(&'static str, &'static str, ProgramFd)>);

/// `lc`/`wlc` (issue 15): loads `svclb_lcloop4`/`svclb_lcloop6` where the kernel has
/// `bpf_loop` (every slot compared), else `svclb_lc4`/`svclb_lc6` (up to
/// `LC_SCAN_MAX` slots): the hooks' code with the scan, from a second copy of the object, which re-opens the pinned maps of the first
/// ([`load_object`] with `reopen`). A copy of their own, so that the verifier's long
/// walk of the scan (minutes on older kernels, where it may end in a refusal) runs on a
/// thread that borrows nothing the agent needs meanwhile. Its unpinned maps are its
/// own and unused by the scan programs (their program arrays stay empty); with
/// `--bpf-log` their log lines go to this copy's ring buffer, which nobody reads.
///
/// The copy's other programs are never loaded; it is dropped here, and the programs
/// live on through the descriptors returned (and, once inserted with
/// [`insert_lc_programs`], through the connect hooks' program arrays).
pub fn load_lc_programs(bpffs: &Path, opts: &LoadOptions) -> Result<LcPrograms> {
    let mut ebpf = load_object(bpffs, opts, true)?;
    let mut loaded = Vec::new();
    let (lc4, lc6) = if opts.compat.lc_bpf_loop {
        (svc_lb_common::PROG_LCLOOP4, svc_lb_common::PROG_LCLOOP6)
    } else {
        (svc_lb_common::PROG_LC4, svc_lb_common::PROG_LC6)
    };
    for (prog, map) in [
        (lc4, svc_lb_common::MAP_LC_PROG4),
        (lc6, svc_lb_common::MAP_LC_PROG6),
    ] {
        let p = sock_program(&mut ebpf, prog)?;
        p.load()
            .with_context(|| format!("load program {prog} (kernel verifier)"))?;
        let fd = p
            .fd()
            .with_context(|| format!("program {prog}: no descriptor"))?
            .try_clone()
            .with_context(|| format!("program {prog}: dup its descriptor"))?;
        loaded.push((prog, map, fd));
    }
    Ok(LcPrograms(loaded))
}

/// The connect hooks' program arrays, taken out of the object whose socket programs
/// tail-call through them ([`insert_lc_programs`] fills them). They live as long as
/// the agent holds them (the kernel empties a program array when its last user-space
/// reference closes): after the agent exits, the connect hooks take two random
/// choices until the next agent fills its own.
pub fn take_lc_arrays(ebpf: &mut Ebpf) -> Result<Vec<(&'static str, ProgramArray<MapData>)>> {
    [svc_lb_common::MAP_LC_PROG4, svc_lb_common::MAP_LC_PROG6]
        .into_iter()
        .map(|map| {
            let m = ebpf
                .take_map(map)
                .ok_or_else(|| anyhow!("map {map} missing from the eBPF object"))?;
            let array = ProgramArray::try_from(m)
                .with_context(|| format!("map {map} is not a program array"))?;
            Ok((map, array))
        })
        .collect()
}

/// Puts each lc program into index 0 of its family's program array, where the
/// connect hooks tail-call it.
pub fn insert_lc_programs(
    arrays: &mut [(&'static str, ProgramArray<MapData>)],
    programs: &LcPrograms,
) -> Result<()> {
    for (prog, map, fd) in &programs.0 {
        let (_, array) = arrays
            .iter_mut()
            .find(|(m, _)| m == map)
            .ok_or_else(|| anyhow!("map {map} missing from the eBPF object"))?;
        array
            .set(0, fd, 0)
            .with_context(|| format!("put {prog} into {map}"))?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_verifier_log_in_a_warning_keeps_its_first_and_last_lines() {
        let log: String = std::iter::once(
            "load program svclb_lc4 (kernel verifier): E2BIG. Verifier output: 0: (bf) r9 = r1"
                .to_owned(),
        )
        .chain((1..5000).map(|i| format!("{i}: (b7) r0 = 0")))
        .chain([
            "BPF program is too large. Processed 1000001 insn".to_owned(),
            "processed 1000001 insns (limit 1000000)".to_owned(),
        ])
        .collect::<Vec<_>>()
        .join("\n");
        let s = super::verifier_summary(&log);
        assert!(s.len() < 400, "{s}");
        assert!(s.starts_with("load program svclb_lc4"));
        assert!(s.ends_with("processed 1000001 insns (limit 1000000)"));
        assert!(s.contains("BPF program is too large"));
        assert_eq!(super::verifier_summary("one line"), "one line");
    }

    use super::*;

    #[test]
    fn map_sizes_cover_each_group_and_leave_the_rest_to_the_object() {
        assert!(MapSizes::default().entries().is_empty());
        let sizes = MapSizes {
            services: Some(1 << 21),
            backends: None,
            rev_nats: Some(4096),
        };
        assert_eq!(
            sizes.entries(),
            vec![
                (MAP_SVC4, 1 << 21),
                (MAP_SVC6, 1 << 21),
                (MAP_AFF_MATCH, 1 << 21),
                (MAP_REVNAT, 4096),
                (MAP_SVC_META, 4096),
                (MAP_FE_STATS, 4096),
            ]
        );
    }
}
