//! Map definitions. The names are the shared constants of svc-lb-common (the symbol name
//! is the map name aya pins); the sizes here are defaults the agent may override at load.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    macros::btf_map,
};
use svc_lb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, RevNat, SockRevNat4Key,
    SockRevNat4Value, SockRevNat6Key, SockRevNat6Value, Svc4Key, Svc6Key, SvcMeta, SvcValue,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
pub static LB_SVC4_V1: HashMap<Svc4Key, SvcValue, { 1 << 20 }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static LB_SVC6_V1: HashMap<Svc6Key, SvcValue, { 1 << 20 }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static LB_BACKENDS_V1: HashMap<u32, Backend, { 1 << 20 }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static LB_REVNAT_V1: HashMap<u32, RevNat, { 1 << 19 }, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static LB_SKRNAT4_V1: LruHashMap<SockRevNat4Key, SockRevNat4Value, { 1 << 18 }> =
    LruHashMap::new();

#[btf_map]
pub static LB_SKRNAT6_V1: LruHashMap<SockRevNat6Key, SockRevNat6Value, { 1 << 18 }> =
    LruHashMap::new();

#[btf_map]
pub static LB_COUNTERS_V2: PerCpuArray<u64, 64> = PerCpuArray::new();

/// Per-CPU new-connection counts. Entries are created here on first use and deleted by
/// the agent together with the frontend or backend they count, so a reused id starts
/// from zero.
#[btf_map]
pub static LB_FESTATS_V1: PerCpuHashMap<u32, u64, { 1 << 20 }, NO_PREALLOC> = PerCpuHashMap::new();

#[btf_map]
pub static LB_BESTATS_V1: PerCpuHashMap<u32, u64, { 1 << 20 }, NO_PREALLOC> = PerCpuHashMap::new();

/// Written by the agent for the CLI and metrics; no program reads it.
#[btf_map]
pub static LB_SVCMETA_V1: HashMap<u32, SvcMeta, { 1 << 19 }, NO_PREALLOC> = HashMap::new();

/// Session affinity: (client netns, frontend) → remembered backend and last use. LRU:
/// when full, the least recently used client forgets its backend, nothing worse.
#[btf_map]
pub static LB_AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue, { 1 << 16 }> = LruHashMap::new();

/// (backend, frontend) pairs an affinity entry may point at. Written by the agent: a
/// pair leaves before its backend leaves the frontend's slots.
#[btf_map]
pub static LB_AFFMATCH_V1: HashMap<AffinityMatchKey, u32, { 1 << 20 }, NO_PREALLOC> =
    HashMap::new();
