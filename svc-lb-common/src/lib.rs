//! Types and helpers shared by the eBPF programs, the agent and the CLI.
//!
//! Every map key and value is `#[repr(C)]` and derives `bytemuck::Pod`, so a hidden
//! padding byte is a compile error rather than garbage in a hash key. Byte order is part
//! of the field name wherever it matters (`_be` = network order, exactly as the kernel
//! hands it to the socket hooks).
#![no_std]

use bytemuck::{Pod, Zeroable};

pub mod lookup;
pub use lookup::{Choice, Stickiness, choose_backend};

/// Map names. They are also the pin file names under the bpffs directory. The `_V1`
/// suffix is the layout version: a changed layout gets a new name, so an agent never
/// re-opens an old pin with a new layout (aya does not check this). Kernel object names
/// are limited to 15 characters.
pub const MAP_SVC4: &str = "LB_SVC4_V1";
pub const MAP_SVC6: &str = "LB_SVC6_V1";
pub const MAP_BACKENDS: &str = "LB_BACKENDS_V1";
pub const MAP_REVNAT: &str = "LB_REVNAT_V1";
pub const MAP_SOCK_RNAT4: &str = "LB_SKRNAT4_V1";
pub const MAP_SOCK_RNAT6: &str = "LB_SKRNAT6_V1";
pub const MAP_COUNTERS: &str = "LB_COUNTERS_V1";
/// New connections per frontend (keyed by rev-NAT id) and per backend id, per CPU.
pub const MAP_FE_STATS: &str = "LB_FESTATS_V1";
pub const MAP_BE_STATS: &str = "LB_BESTATS_V1";
/// Which Service a frontend belongs to, for the CLI and metrics (keyed by rev-NAT id).
/// The datapath never reads it.
pub const MAP_SVC_META: &str = "LB_SVCMETA_V1";
/// Session affinity (ClientIP): (client, frontend) → remembered backend. LRU, written by
/// the socket programs.
pub const MAP_AFFINITY: &str = "LB_AFFINITY_V1";
/// Which (backend, frontend) pairs an affinity entry may point at; written by the agent.
pub const MAP_AFF_MATCH: &str = "LB_AFFMATCH_V1";

/// Every map the agent pins, in the order `list`/`status` show them.
pub const ALL_MAPS: [&str; 12] = [
    MAP_SVC4,
    MAP_SVC6,
    MAP_BACKENDS,
    MAP_REVNAT,
    MAP_SOCK_RNAT4,
    MAP_SOCK_RNAT6,
    MAP_COUNTERS,
    MAP_FE_STATS,
    MAP_BE_STATS,
    MAP_SVC_META,
    MAP_AFFINITY,
    MAP_AFF_MATCH,
];

/// Default capacities. Service and backend maps are created without preallocation, so
/// a large capacity costs kernel memory only when it is used.
pub const SVC_MAP_MAX: u32 = 1 << 20;
pub const BACKEND_MAP_MAX: u32 = 1 << 20;
pub const REVNAT_MAP_MAX: u32 = 1 << 19;
pub const SOCK_RNAT_MAP_MAX: u32 = 1 << 18;
/// Remembered (client, frontend) pairs. LRU: the least recently used client forgets
/// first when it is full, which costs only stickiness, never correctness.
pub const AFFINITY_MAP_MAX: u32 = 1 << 16;
pub const AFF_MATCH_MAP_MAX: u32 = 1 << 20;

/// `SvcMeta.kind`: how a frontend address came to be.
pub const KIND_CLUSTER_IP: u8 = 1;
pub const KIND_NODE_PORT: u8 = 2;
pub const KIND_LOAD_BALANCER: u8 = 3;
pub const KIND_EXTERNAL_IP: u8 = 4;

/// `SvcMeta.flags` bits: the Service's traffic policies.
pub const META_INTERNAL_LOCAL: u8 = 1 << 0;
pub const META_EXTERNAL_LOCAL: u8 = 1 << 1;

/// Program names (the ELF section symbols) and their attach points.
pub const PROG_CONNECT4: &str = "svclb_connect4";
pub const PROG_CONNECT6: &str = "svclb_connect6";
pub const PROG_SENDMSG4: &str = "svclb_sendmsg4";
pub const PROG_SENDMSG6: &str = "svclb_sendmsg6";
pub const PROG_RECVMSG4: &str = "svclb_recvmsg4";
pub const PROG_RECVMSG6: &str = "svclb_recvmsg6";
pub const PROG_GETPEER4: &str = "svclb_getpeer4";
pub const PROG_GETPEER6: &str = "svclb_getpeer6";

pub const SOCK_PROGRAMS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
    PROG_GETPEER4,
    PROG_GETPEER6,
];

/// IP protocol numbers as they appear in `bpf_sock_addr.protocol` and in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// `SvcKey.scope`: which clients a frontend entry serves. Socket-level lookups use
/// `SCOPE_ALL`; the external path may add node-local entries later.
pub const SCOPE_ALL: u8 = 0;

/// `SvcValue.flags` bits.
pub const SVC_FLAG_AFFINITY: u16 = 1 << 0;

/// `Backend.state`.
pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;

/// Key of the IPv4 service map. `slot == 0` is the master entry that holds the backend
/// count; slots `1..=count` each hold one backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Svc4Key {
    pub addr_be: u32,
    pub port_be: u16,
    pub slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Svc4Key>() == 12);

/// Key of the IPv6 service map; same slot scheme as [`Svc4Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Svc6Key {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Svc6Key>() == 24);

/// Value of both service maps. In the master slot `count` and the flags are meaningful
/// and `backend_id` is 0; in slots `1..=count` only `backend_id` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcValue {
    pub backend_id: u32,
    pub count: u32,
    pub rev_nat_id: u32,
    pub flags: u16,
    pub _pad: u16,
    pub affinity_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<SvcValue>() == 20);

/// A backend, keyed by a `u32` id (0 is never valid). IPv4 addresses use `addr_be[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Backend {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// Reverse NAT entry: the frontend a `rev_nat_id` stands for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RevNat {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    pub proto: u8,
}
const _: () = assert!(core::mem::size_of::<RevNat>() == 20);

/// Service identity of a frontend: NUL-padded UTF-8 strings. Kubernetes limits
/// namespaces and Service names to 63 bytes and port names to 15, so these never
/// truncate a valid object.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcMeta {
    pub namespace: [u8; 64],
    pub name: [u8; 64],
    pub port_name: [u8; 16],
    pub kind: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<SvcMeta>() == 152);

/// Key of the affinity map. For the socket programs the client is the pod, identified
/// by its network namespace (`bpf_get_netns_cookie`), as Cilium keys it: every socket of
/// the pod, whatever its source address, sticks to the same backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub rev_nat_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// Value of the affinity map: the backend the client was sent to, and when it last
/// connected (`bpf_ktime_get_ns`, monotonic). Each connection refreshes the time, as
/// kube-proxy's `recent` match does, so the timeout counts from the last connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// Key of the affinity match map: a backend that currently belongs to a frontend with
/// session affinity. An affinity entry is used only while its pair is here, so it can
/// never send a client to a backend that left the Service (or to a reused id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityMatchKey {
    pub backend_id: u32,
    pub rev_nat_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityMatchKey>() == 8);

/// Socket-level reverse translation, IPv4: (socket cookie, backend) → the Service
/// address the application asked for. Written by connect/sendmsg, read by
/// recvmsg/getpeername.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNat4Key {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNat4Key>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNat4Value {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevNat4Value>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNat6Key {
    pub cookie: u64,
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub _pad: [u16; 3],
}
const _: () = assert!(core::mem::size_of::<SockRevNat6Key>() == 32);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNat6Value {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevNat6Value>() == 24);

/// Indexes of the per-CPU counter array. Drops and errors are counted here rather
/// than logged, so the hot path never formats anything.
pub const CTR_SOCK_XLATED: u32 = 0;
pub const CTR_SOCK_NO_BACKEND: u32 = 1;
pub const CTR_SOCK_SLOT_MISS: u32 = 2;
pub const CTR_SOCK_BACKEND_MISS: u32 = 3;
pub const CTR_SOCK_RNAT_UPDATE_FAIL: u32 = 4;
pub const CTR_SOCK_RNAT_HIT: u32 = 5;
/// Session affinity: a connection went to its remembered backend.
pub const CTR_SOCK_AFF_HIT: u32 = 6;
/// Session affinity: a remembered backend was not used (timed out, or no longer in
/// the Service); a new one was picked.
pub const CTR_SOCK_AFF_STALE: u32 = 7;
/// Session affinity: the choice could not be remembered (map update failed).
pub const CTR_SOCK_AFF_UPDATE_FAIL: u32 = 8;
pub const COUNTERS_MAX: u32 = 16;

/// Counter names for the CLI and metrics, indexed like the `CTR_*` constants.
pub const COUNTER_NAMES: [(u32, &str); 9] = [
    (CTR_SOCK_XLATED, "sock_translated"),
    (CTR_SOCK_NO_BACKEND, "sock_rejected_no_backend"),
    (CTR_SOCK_SLOT_MISS, "sock_error_slot_missing"),
    (CTR_SOCK_BACKEND_MISS, "sock_error_backend_missing"),
    (CTR_SOCK_RNAT_UPDATE_FAIL, "sock_error_revnat_update"),
    (CTR_SOCK_RNAT_HIT, "sock_revnat_translated"),
    (CTR_SOCK_AFF_HIT, "sock_affinity_hit"),
    (CTR_SOCK_AFF_STALE, "sock_affinity_stale"),
    (CTR_SOCK_AFF_UPDATE_FAIL, "sock_error_affinity_update"),
];

/// Slot chosen for a new connection: uniform over `1..=count`. Both the eBPF programs
/// and `svc-lb trace` call this, so they cannot drift apart. Returns `None` when the
/// Service has no backend.
#[inline(always)]
pub fn select_slot(random: u32, count: u32) -> Option<u16> {
    if count == 0 {
        return None;
    }
    // count never exceeds u16::MAX (the planner caps backends per frontend).
    Some((random % count) as u16 + 1)
}

/// Largest number of backends one frontend can hold (slots are `u16`).
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for Svc4Key {}
    unsafe impl aya::Pod for Svc6Key {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for SvcMeta {}
    unsafe impl aya::Pod for SockRevNat4Key {}
    unsafe impl aya::Pod for SockRevNat4Value {}
    unsafe impl aya::Pod for SockRevNat6Key {}
    unsafe impl aya::Pod for SockRevNat6Value {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatchKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_slot_covers_every_backend_and_never_zero() {
        assert_eq!(select_slot(7, 0), None);
        let mut seen = [false; 5];
        for r in 0..100u32 {
            let s = select_slot(r, 5).unwrap_or(0);
            assert!((1..=5).contains(&s), "slot {s} out of range");
            seen[usize::from(s - 1)] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(select_slot(u32::MAX, 1), Some(1));
    }

    #[test]
    fn map_names_fit_kernel_object_names() {
        for name in ALL_MAPS.iter().chain(SOCK_PROGRAMS.iter()) {
            assert!(name.len() <= 15, "{name} is longer than BPF_OBJ_NAME_LEN-1");
        }
    }
}
