//! Map definitions. The names are the shared constants of svc-lb-common (the symbol name
//! is the map name aya pins). The sizes are svc-lb-common's `*_MAP_MAX` constants, which
//! the agent reads too; it may override some at load.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SkStorage},
    macros::{btf_map, map},
    maps::ProgramArray,
};
use svc_lb_common::{
    AFF_MATCH_MAP_MAX, AFFINITY_EXT_MAP_MAX, AFFINITY_MAP_MAX, AffinityExtKey, AffinityKey,
    AffinityMatchKey, AffinityValue, BACKEND_MAP_MAX, BE_STATS_MAP_MAX, Backend, CONNS_MAP_MAX,
    COUNTERS_MAX, CT_MAP_MAX, ConnCount, ConnKey, CtEntry, CtKey, ExtConfig, FE_STATS_MAP_MAX,
    MAGLEV_MAP_MAX, MaglevTable, NODE_ADDR_MAP_MAX, NodeAddrKey, REVNAT_MAP_MAX, RejectBucket,
    RevNat, SOCK_RNAT_MAP_MAX, SRC_RANGE_MAP_MAX, SVC_MAP_MAX, SVC_META_MAP_MAX, SockRevNat4Key,
    SockRevNat4Value, SockRevNat6Key, SockRevNat6Value, SockRevNatStore, SockRevNatStoreV1,
    SrcRange4Key, SrcRange6Key, Svc4Key, Svc6Key, SvcMeta, SvcValue, TRAFFIC_MAP_MAX, TrafficCount,
    TrafficKey, XDP_DEV_MAP_MAX, XDP_MAC_ARRAY_MAX, lookup::LcScan,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
pub static LB_SVC4_V1: HashMap<Svc4Key, SvcValue, { SVC_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static LB_SVC6_V1: HashMap<Svc6Key, SvcValue, { SVC_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static LB_BACKENDS_V1: HashMap<u32, Backend, { BACKEND_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static LB_REVNAT_V1: HashMap<u32, RevNat, { REVNAT_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static LB_SKRNAT4_V1: LruHashMap<
    SockRevNat4Key,
    SockRevNat4Value,
    { SOCK_RNAT_MAP_MAX as usize },
> = LruHashMap::new();

#[btf_map]
pub static LB_SKRNAT6_V1: LruHashMap<
    SockRevNat6Key,
    SockRevNat6Value,
    { SOCK_RNAT_MAP_MAX as usize },
> = LruHashMap::new();

/// Reverse NAT of each socket, in the socket (freed with it). The LRU maps above are
/// the fallback for kernels without socket storage in sock_addr programs.
#[btf_map]
pub static LB_SKRNATSK_V2: SkStorage<SockRevNatStore> = SkStorage::new();

/// The store of versions before V2, read after a miss in V2 when the agent found its
/// pin (`compat::sk_rnat_v1`); never written.
#[btf_map]
pub static LB_SKRNATSK_V1: SkStorage<SockRevNatStoreV1> = SkStorage::new();

#[btf_map]
pub static LB_COUNTERS_V2: PerCpuArray<u64, { COUNTERS_MAX as usize }> = PerCpuArray::new();

/// Per-CPU new-connection counts. Entries are created here on first use and deleted by
/// the agent together with the frontend or backend they count, so a reused id starts
/// from zero.
#[btf_map]
pub static LB_FESTATS_V1: PerCpuHashMap<u32, u64, { FE_STATS_MAP_MAX as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();

#[btf_map]
pub static LB_BESTATS_V1: PerCpuHashMap<u32, u64, { BE_STATS_MAP_MAX as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();

/// Open TCP connections per backend address (socket path), kept by `svclb_sockops`
/// and read by the `lc`/`wlc` choice in the connect hooks. Not LRU: an evicted entry
/// would lose counts of connections still open. The agent deletes the entries of
/// addresses that are no backend any more once their counts are 0.
#[btf_map]
pub static LB_CONNS_V1: HashMap<ConnKey, ConnCount, { CONNS_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

/// Traffic of closed TCP connections per (frontend, backend address), added by
/// `svclb_sockops` at the close, and the unconnected UDP datagrams the sendmsg hooks
/// translate (`packets_in` only, see `sock.rs` `count_datagram`). Not per-CPU: one add
/// per closed connection or datagram, and a
/// per-CPU value per (frontend, backend) pair would cost its size times the CPUs. The
/// agent deletes the entries of frontends that are gone with its full sync.
#[btf_map]
pub static LB_TRAFFIC_V1: HashMap<
    TrafficKey,
    TrafficCount,
    { TRAFFIC_MAP_MAX as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Written by the agent for the CLI and metrics; no program reads it.
#[btf_map]
pub static LB_SVCMETA_V1: HashMap<u32, SvcMeta, { SVC_META_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

/// Session affinity: (client netns, frontend) → remembered backend and last use. LRU:
/// when full, the least recently used client forgets its backend, nothing worse.
#[btf_map]
pub static LB_AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_MAP_MAX as usize }> =
    LruHashMap::new();

/// (backend, frontend) pairs an affinity entry may point at. Written by the agent: a
/// pair leaves before its backend leaves the frontend's slots.
#[btf_map]
pub static LB_AFFMATCH_V1: HashMap<
    AffinityMatchKey,
    u32,
    { AFF_MATCH_MAP_MAX as usize },
    NO_PREALLOC,
> = HashMap::new();

// ---- External path (tc / XDP) ----

/// Conntrack of external flows (forward and reply entries, see `CtKey`). LRU: when
/// full, the least recently used flow is forgotten. Each entry counts its direction's
/// packets and bytes (`CtEntry`).
#[btf_map]
pub static LB_CT_V2: LruHashMap<CtKey, CtEntry, { CT_MAP_MAX as usize }> = LruHashMap::new();

/// Maglev tables by rev-NAT id, written by the agent. Only ever read through a map value
/// pointer: a 64 KiB value never touches the stack.
#[btf_map]
pub static LB_MAGLEV_V1: HashMap<u32, MaglevTable, { MAGLEV_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

/// Session affinity of external clients (source address, frontend) → backend. LRU.
#[btf_map]
pub static LB_AFFEXT_V1: LruHashMap<
    AffinityExtKey,
    AffinityValue,
    { AFFINITY_EXT_MAP_MAX as usize },
> = LruHashMap::new();

/// `loadBalancerSourceRanges` (rev-NAT id, prefix) → 1. LPM tries must not be
/// preallocated.
#[btf_map]
pub static LB_SRCRNG4_V1: LpmTrie<SrcRange4Key, u32, { SRC_RANGE_MAP_MAX as usize }, NO_PREALLOC> =
    LpmTrie::new();

#[btf_map]
pub static LB_SRCRNG6_V1: LpmTrie<SrcRange6Key, u32, { SRC_RANGE_MAP_MAX as usize }, NO_PREALLOC> =
    LpmTrie::new();

/// Node addresses that serve NodePorts → flags (unused, 0).
#[btf_map]
pub static LB_NODEADDR_V1: HashMap<NodeAddrKey, u32, { NODE_ADDR_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

/// The agent's external-path settings (entry 0).
#[btf_map]
pub static LB_CONFIG_V1: Array<ExtConfig, 1> = Array::new();

/// The reject rate limit's token bucket (entry 0, see `reject::allowed`). Shared by
/// every CPU, not pinned: a restarted agent starts with a full bucket.
#[btf_map]
pub static LB_REJECT_RL: Array<RejectBucket, 1> = Array::new();

/// Devices running the XDP program: ifindex → `XDP_DEV_*` flags (whether XDP_TX can
/// answer a reject there), written by the agent.
#[btf_map]
pub static LB_XDPDEV_V1: HashMap<u32, u32, { XDP_DEV_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

/// The MAC address of each device running the XDP program (`MAP_XDP_MAC`): indexed by
/// ifindex, address in bytes 0..6, `XDP_MAC_SET` in byte 6. Not pinned, written by the
/// agent at every attach.
#[btf_map]
pub static LB_XDPMAC: Array<[u8; 8], { XDP_MAC_ARRAY_MAX as usize }> = Array::new();

/// The same for ifindexes of `XDP_MAC_ARRAY_MAX` and more (`MAP_XDP_MAC_HI`).
#[btf_map]
pub static LB_XDPMACHI: HashMap<u32, [u8; 8], { XDP_DEV_MAP_MAX as usize }, NO_PREALLOC> =
    HashMap::new();

/// Per-CPU scratch space of the external path: the reject frame and the conntrack keys
/// and values of a new flow do not fit on the 512-byte stack next to the rest of the
/// path. Map helpers take keys and values from map memory as well. Not pinned (nothing
/// in it outlives one packet).
#[btf_map]
pub static LB_SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

#[repr(C)]
pub struct Scratch {
    /// The frame being built.
    pub out: [u8; 128],
    /// The start of the offending frame.
    pub orig: [u8; 128],
    /// Conntrack entries of a new flow.
    pub fkey: CtKey,
    pub fval: CtEntry,
    pub rkey: CtKey,
    pub rval: CtEntry,
}

/// `lc`/`wlc`: the exact scan's running state (the best run so far, the run being
/// read), per CPU, between its steps in the lc programs. In map memory, not registers
/// or the stack: the verifier does not track a map value's contents, so the paths of a
/// step (better or not, same run or a new one) end in equal states and are pruned
/// instead of multiplying over the steps (which took Debian's 5.10 and 6.1 verifiers
/// past their 1 M instruction limit). Not pinned (nothing in it outlives one connect).
#[btf_map]
pub static LB_LCSCAN: PerCpuArray<LcScanState, 1> = PerCpuArray::new();

/// [`LB_LCSCAN`]'s value: the scan's state and, once it is done, its choice (a slot).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct LcScanState {
    pub scan: LcScan,
    pub pick: u16,
    pub _pad: [u8; 6],
}

/// `lc`/`wlc`: index 0 holds the family's lc program (`svclb_lc4`/`svclb_lc6`), which the
/// connect hooks tail-call for an `lc`/`wlc` frontend; empty while no agent runs (two
/// random choices then). A legacy map definition: the kernel takes no
/// BTF key/value types for a program array.
#[map]
pub static LB_LCPROG4: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
pub static LB_LCPROG6: ProgramArray = ProgramArray::with_max_entries(1, 0);
