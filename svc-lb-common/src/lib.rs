//! Types and helpers shared by the eBPF programs, the agent and the CLI.
//!
//! Every map key and value is `#[repr(C)]` and derives `bytemuck::Pod`, so a hidden
//! padding byte is a compile error rather than garbage in a hash key. Byte order is part
//! of the field name wherever it matters (`_be` = network order, exactly as the kernel
//! hands it to the socket hooks).
#![no_std]

use bytemuck::{Pod, Zeroable};

pub mod lookup;
pub mod maglev;
pub use lookup::{Choice, ExtChoice, ExtVia, Stickiness, choose_backend, choose_external};

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
/// V2: 64 counters (the external path added its own).
pub const MAP_COUNTERS: &str = "LB_COUNTERS_V2";
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

// ---- External path (tc / XDP on the node's devices) ----
/// BPF conntrack of the external path: [`CtKey`] → [`CtEntry`], LRU, written by the tc
/// and XDP programs, listed by `svc-lb conntrack`. V2: each entry carries the packets
/// and bytes of its direction (issue 15, `list --stats`).
pub const MAP_CT: &str = "LB_CT_V2";
/// The conntrack map of earlier versions ([`CtKey`] → [`CtValue`], no counters). When
/// its pin exists at start the agent copies its entries into [`MAP_CT`] before the new
/// tc/XDP programs replace the old ones, copies again what the old programs added
/// meanwhile, then removes the pin (`datapath::ctmigrate`): no flow loses its backend
/// or its SNAT translation across the upgrade.
pub const MAP_CT_V1: &str = "LB_CT_V1";
/// Maglev lookup tables: rev-NAT id of an external frontend → [`MaglevTable`]. Written
/// by the agent before the frontend's master entry points at it.
pub const MAP_MAGLEV: &str = "LB_MAGLEV_V1";
/// Session affinity of external clients: [`AffinityExtKey`] (source IP, frontend) →
/// [`AffinityValue`]. LRU, written by the tc/XDP programs.
pub const MAP_AFFINITY_EXT: &str = "LB_AFFEXT_V1";
/// `spec.loadBalancerSourceRanges`: LPM tries keyed by (rev-NAT id, source prefix).
pub const MAP_SRC_RANGE4: &str = "LB_SRCRNG4_V1";
pub const MAP_SRC_RANGE6: &str = "LB_SRCRNG6_V1";
/// The node addresses that serve NodePorts ([`NodeAddrKey`] → `u32` flags), after
/// `--nodeport-addresses` filtering. A NodePort frontend is stored once per port with
/// the unspecified address; it matches a packet only when its destination is here.
pub const MAP_NODE_ADDR: &str = "LB_NODEADDR_V1";
/// One-entry array holding [`ExtConfig`], written by the agent.
pub const MAP_CONFIG: &str = "LB_CONFIG_V1";
/// Devices the XDP program runs on: ifindex → `XDP_DEV_*` flags, written by the agent
/// before it attaches XDP. A device without [`XDP_DEV_TX_OK`] (or without an entry)
/// gets its rejects from tc: XDP passes the packet on instead of sending XDP_TX.
pub const MAP_XDP_DEV: &str = "LB_XDPDEV_V1";
/// Devices the XDP program runs on: an array indexed by ifindex (below
/// [`XDP_MAC_ARRAY_MAX`]) of the device's MAC address (6 bytes, then [`XDP_MAC_SET`],
/// then a zero byte), written by the agent before it attaches XDP. XDP serves only frames
/// sent to that address: a switch flooding unknown unicast (right after the owner's link
/// died) delivers frames for another node here too, and only their owner may answer.
/// tc reads the same fact from `skb->pkt_type`. A device without an entry (byte 6 zero)
/// is served as before (`BPF_PROG_TEST_RUN`). Not pinned: written again at every attach.
/// An array rather than a hash: the kernel inlines an array lookup into a bounds check
/// and an add, where a hash lookup hashes the key and walks a bucket (about 20 ns of
/// every XDP packet).
pub const MAP_XDP_MAC: &str = "LB_XDPMAC";
/// The same for devices whose ifindex is [`XDP_MAC_ARRAY_MAX`] or more (ifindex → the
/// same value), a hash: ifindexes grow with every device a node creates (pod veths), so
/// a device added late can have a large one.
pub const MAP_XDP_MAC_HI: &str = "LB_XDPMACHI";
/// Entries of the `LB_XDPMAC` array (8 KiB): the ifindexes of a node's own devices, made
/// at boot, are small.
pub const XDP_MAC_ARRAY_MAX: u32 = 1 << 10;
/// Byte 6 of an `LB_XDPMAC`/`LB_XDPMACHI` value: the entry holds a device's address
/// (an array entry that was never written is all zeroes).
pub const XDP_MAC_SET: u8 = 1;
/// Open TCP connections per backend address on the socket path ([`ConnKey`] →
/// [`ConnCount`]), kept by the sock_ops program `svclb_sockops` from the sockets' state
/// changes (issue 15: `ActiveConn`/`InActConn`, `lc`/`wlc`). Keyed by the backend's
/// address rather than its id, so that a backend id reused for another address never
/// inherits counts; an address that comes back as a backend keeps the count of its
/// still-open connections, which is what they are.
pub const MAP_CONNS: &str = "LB_CONNS_V1";
/// Traffic of closed TCP connections on the socket path per (frontend, backend address)
/// ([`TrafficKey`] → [`TrafficCount`]), added by `svclb_sockops` when a counted socket
/// closes (issue 15: `list --stats`/`--rate`, `svclb_*_bytes_total`); also the
/// unconnected UDP datagrams the sendmsg hooks translate (`packets_in` only).
pub const MAP_TRAFFIC: &str = "LB_TRAFFIC_V1";
/// Lasting traffic totals of the external path per (frontend, backend address,
/// protocol) ([`ExtTrafficKey`] → [`TrafficCount`]). No program uses it: the agent
/// creates it, folds the conntrack entries' counts into it every few seconds and alone
/// writes it, so that the counters of `list --stats` and the metrics never go down
/// when the LRU evicts an entry or a new flow reuses one (issue 15). Absent when the
/// agent runs with `--ext-stats-interval 0`.
pub const MAP_EXT_TRAFFIC: &str = "LB_EXTTOTAL_V1";
/// Capacity of [`MAP_EXT_TRAFFIC`]: (frontend, backend address, protocol) triples.
pub const EXT_TRAFFIC_MAX: u32 = 65_536;

/// Every map the agent pins, in the order `list`/`status` show them.
pub const ALL_MAPS: [&str; 23] = [
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
    MAP_CT,
    MAP_MAGLEV,
    MAP_AFFINITY_EXT,
    MAP_SRC_RANGE4,
    MAP_SRC_RANGE6,
    MAP_NODE_ADDR,
    MAP_CONFIG,
    MAP_XDP_DEV,
    MAP_CONNS,
    MAP_TRAFFIC,
    MAP_EXT_TRAFFIC,
];

/// Pins of maps that earlier versions created and this one no longer uses (renamed when
/// their layout changed). The agent removes them at start and `svc-lb cleanup` with the
/// rest; programs of the old version that still hold such a map keep it alive until
/// their links are swapped.
pub const RETIRED_MAPS: [&str; 1] = ["LB_COUNTERS_V1"];

/// Socket-local reverse NAT (`BPF_MAP_TYPE_SK_STORAGE`): each socket carries its own
/// [`SockRevNatStore`], freed with the socket, so no socket's churn can push out another
/// socket's translations. Used when the kernel lets sock_addr programs reach socket
/// storage (probe feature `sk_storage_rnat`); otherwise the LRU maps
/// [`MAP_SOCK_RNAT4`]/[`MAP_SOCK_RNAT6`] are the fallback.
pub const MAP_SOCK_RNAT_SK: &str = "LB_SKRNATSK_V2";

/// Maps whose entries live in the sockets. Pinned (and removed by `cleanup`) like
/// [`ALL_MAPS`], but not listed or counted: user space can neither iterate them nor
/// size them (`max_entries` is 0); sock_diag reads one socket's value at a time.
pub const SOCKET_MAPS: [&str; 1] = [MAP_SOCK_RNAT_SK];

/// The socket reverse-NAT store of versions before [`MAP_SOCK_RNAT_SK`]
/// ([`SockRevNatStoreV1`], 48-byte slots). Sockets that dialled a Service before an
/// upgrade keep their translations there: when its pin exists at start the agent
/// re-opens it and the programs read it (never write it) after a miss in the new store,
/// so replies and `getpeername()` of those sockets still show the Service. Not created
/// on a node that never had it; `svc-lb cleanup` (or a reboot) removes the pin.
pub const MAP_SOCK_RNAT_SK_V1: &str = "LB_SKRNATSK_V1";

/// Socket maps of earlier versions that are only read (see [`MAP_SOCK_RNAT_SK_V1`]).
pub const OLD_SOCKET_MAPS: [&str; 1] = [MAP_SOCK_RNAT_SK_V1];

/// Default capacities. Service and backend maps are created without preallocation, so
/// a large capacity costs kernel memory only when it is used.
pub const SVC_MAP_MAX: u32 = 1 << 20;
pub const BACKEND_MAP_MAX: u32 = 1 << 20;
pub const REVNAT_MAP_MAX: u32 = 1 << 19;
/// `LB_SKRNAT4_V1`/`LB_SKRNAT6_V1` on the fallback (no socket-local storage), where
/// every socket's reverse NAT lives there.
pub const SOCK_RNAT_MAP_MAX: u32 = 1 << 18;
/// The same maps when the kernel has socket-local storage: they then only index the
/// connected UDP sockets for socket termination (sock_diag does not report a UDP
/// socket's storage), and nothing on the reply path reads them. The agent sets this
/// size at load; it is a quarter of the fallback's because these LRU maps are
/// preallocated, and creating them is on the agent's start-up path.
pub const SOCK_RNAT_INDEX_MAX: u32 = 1 << 16;
/// Remembered (client, frontend) pairs. LRU: the least recently used client forgets
/// first when it is full, which costs only stickiness, never correctness.
pub const AFFINITY_MAP_MAX: u32 = 1 << 16;
pub const AFF_MATCH_MAP_MAX: u32 = 1 << 20;
/// Conntrack entries (each external flow uses two: forward and reply). LRU: when full,
/// the least recently used flow is forgotten.
pub const CT_MAP_MAX: u32 = 1 << 18;
/// External frontends that can hold a Maglev table (64 KiB each at the largest size;
/// the map is not preallocated).
pub const MAGLEV_MAP_MAX: u32 = 1 << 14;
pub const AFFINITY_EXT_MAP_MAX: u32 = 1 << 16;
pub const SRC_RANGE_MAP_MAX: u32 = 1 << 16;
pub const NODE_ADDR_MAP_MAX: u32 = 1 << 10;
/// Entries of `LB_XDPDEV_V1` (devices with the XDP program).
pub const XDP_DEV_MAP_MAX: u32 = 1 << 10;
/// Per-frontend connection counters (`LB_FESTATS_V1`, keyed by rev-NAT id).
pub const FE_STATS_MAP_MAX: u32 = 1 << 20;
/// Per-backend connection counters (`LB_BESTATS_V1`): one per backend id.
pub const BE_STATS_MAP_MAX: u32 = BACKEND_MAP_MAX;
/// Service metadata for the CLI and metrics (`LB_SVCMETA_V1`): one per rev-NAT id.
pub const SVC_META_MAP_MAX: u32 = REVNAT_MAP_MAX;
/// `LB_CONNS_V1`: one entry per backend address that had a counted connection.
pub const CONNS_MAP_MAX: u32 = BACKEND_MAP_MAX;
/// `LB_TRAFFIC_V1`: one entry per (frontend, backend address) pair that had a closed
/// counted connection. When full, the traffic of new pairs is not counted.
pub const TRAFFIC_MAP_MAX: u32 = BACKEND_MAP_MAX;
/// `LB_XDPDEV_V1` flag: frames sent back out this device with XDP_TX reach the wire.
/// Not set for a veth, whose XDP_TX frames are dropped unless the peer device runs
/// XDP (or GRO) itself.
pub const XDP_DEV_TX_OK: u32 = 1;

/// `SvcMeta.kind`: how a frontend address came to be.
pub const KIND_CLUSTER_IP: u8 = 1;
pub const KIND_NODE_PORT: u8 = 2;
pub const KIND_LOAD_BALANCER: u8 = 3;
pub const KIND_EXTERNAL_IP: u8 = 4;

/// `SvcMeta.flags` bits: the Service's traffic policies.
pub const META_INTERNAL_LOCAL: u8 = 1 << 0;
pub const META_EXTERNAL_LOCAL: u8 = 1 << 1;
/// `SvcMeta.flags` bits 2–3: the frontend's scheduler (issue 15), as `list` and `trace`
/// name it; the datapath reads `SVC_FLAG_SCHED_RR` instead.
/// Bit 4 joined the mask with `lc`/`wlc`; older metadata never set it.
pub const META_SCHED_MASK: u8 = 0b111 << 2;
pub const META_SCHED_RANDOM: u8 = 0;
pub const META_SCHED_RR: u8 = 1 << 2;
pub const META_SCHED_WRR: u8 = 2 << 2;
pub const META_SCHED_MAGLEV: u8 = 3 << 2;
pub const META_SCHED_LC: u8 = 4 << 2;
pub const META_SCHED_WLC: u8 = 5 << 2;

/// Program names (the ELF section symbols) and their attach points.
pub const PROG_CONNECT4: &str = "svclb_connect4";
pub const PROG_CONNECT6: &str = "svclb_connect6";
pub const PROG_SENDMSG4: &str = "svclb_sendmsg4";
pub const PROG_SENDMSG6: &str = "svclb_sendmsg6";
pub const PROG_RECVMSG4: &str = "svclb_recvmsg4";
pub const PROG_RECVMSG6: &str = "svclb_recvmsg6";
pub const PROG_GETPEER4: &str = "svclb_getpeer4";
pub const PROG_GETPEER6: &str = "svclb_getpeer6";
/// tc (TCX) programs on the node's devices, and the XDP program (`--xdp`).
pub const PROG_TC_INGRESS: &str = "svclb_tc_in";
pub const PROG_TC_EGRESS: &str = "svclb_tc_out";
pub const PROG_XDP: &str = "svclb_xdp";
/// Per-packet path on the pod-facing devices (`--pod-devices`): tc ingress sees what a
/// pod sends, tc egress what goes back into it.
pub const PROG_POD_INGRESS: &str = "svclb_pod_in";
pub const PROG_POD_EGRESS: &str = "svclb_pod_out";
/// sock_ops program on the socket programs' cgroup: follows the TCP state of sockets
/// the connect hooks translated and keeps `LB_CONNS_V1`. Loaded and attached only when
/// the kernel has it (probe feature `sock_ops_conn`).
pub const PROG_SOCKOPS: &str = "svclb_sockops";

/// `lc`/`wlc` (issue 15): programs the connect hooks tail-call for an `lc`/`wlc`
/// frontend, through index 0 of `MAP_LC_PROG4`/`MAP_LC_PROG6`. Each is its connect
/// hook's code with the exact scan; loaded only where the node keeps connection counts,
/// never attached.
pub const PROG_LC4: &str = "svclb_lc4";
pub const PROG_LC6: &str = "svclb_lc6";
/// The same with every slot compared (`lookup::LC_LOOP_MAX`), each step a `bpf_loop`
/// callback: loaded instead of the two above where the kernel has `bpf_loop` (5.17).
pub const PROG_LCLOOP4: &str = "svclb_lcloop4";
pub const PROG_LCLOOP6: &str = "svclb_lcloop6";
/// The program arrays holding them (one per family: a tail call needs the caller's
/// attach type). Not pinned: while no agent runs they are empty, and the connect hooks
/// take two random choices for `lc`/`wlc` frontends.
pub const MAP_LC_PROG4: &str = "LB_LCPROG4";
pub const MAP_LC_PROG6: &str = "LB_LCPROG6";

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

/// `SvcKey.scope`: which clients a frontend entry serves. The socket programs (clients
/// on this node) look up `SCOPE_ALL`; the tc/XDP programs (clients outside the node)
/// look up `SCOPE_EXTERNAL`, whose backends follow `externalTrafficPolicy`.
pub const SCOPE_ALL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// `SvcValue.flags` bits.
pub const SVC_FLAG_AFFINITY: u16 = 1 << 0;
/// Load-balancer IP frontend with `loadBalancerSourceRanges`: a source must match an
/// entry of `LB_SRCRNG4/6_V1` for this rev-NAT id. The external path drops other
/// packets; the socket programs (`SCOPE_ALL` frontend) refuse other bound sources.
pub const SVC_FLAG_SRC_RANGES: u16 = 1 << 1;
/// External frontend of an `externalTrafficPolicy: Local` Service: the client's address
/// is preserved (never SNAT), and when `count == 0` while other nodes have endpoints the
/// packet is dropped (kube-proxy's rule) rather than rejected.
pub const SVC_FLAG_EXT_LOCAL: u16 = 1 << 2;
/// Set with `count == 0` on an `SVC_FLAG_EXT_LOCAL` frontend whose Service has endpoints
/// on other nodes: drop instead of answering ICMP port unreachable.
pub const SVC_FLAG_DROP_EMPTY: u16 = 1 << 3;
/// Scheduler `rr`/`wrr` (issue 15): new connections take the slots in turn. The master
/// entry's `backend_id` (unused there otherwise) is the cursor, advanced with an atomic
/// fetch-add by the socket programs; the agent's writes of the master reset it to 0.
/// Without the flag a slot is drawn at random (scheduler `random`, weighted through the
/// slot layout).
pub const SVC_FLAG_SCHED_RR: u16 = 1 << 4;
/// Scheduler `lc`/`wlc` (issue 15): the backend with the fewest connections
/// (`lookup::lc_scan`). The slot layout groups each backend's slots into one run whose
/// length is its weight (one slot each under `lc`), so the scan reads the weights from
/// the slots. Set only while the connection counts exist (`sock_ops_conn`).
pub const SVC_FLAG_SCHED_LC: u16 = 1 << 5;

/// `Backend.state`.
pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;
/// Kept only for the external path's established flows: the endpoint still serves but
/// the Service no longer selects it (terminating while others are ready, dropped by a
/// topology hint or a traffic policy). No slot, Maglev table or affinity pair names it,
/// so no new flow or socket picks it; the conntrack check still finds it.
pub const BACKEND_DRAINING: u8 = 2;
/// `Backend.flags`: the endpoint runs on this node (`nodeName == --node-name`). External
/// traffic to a local backend is only DNATed; to a remote one it is also SNATed to the
/// node's address so the reply comes back through this node.
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 0;

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
    /// `BACKEND_FLAG_*` (was padding in the first layout, so old pins read as 0).
    pub flags: u8,
    pub _pad: [u8; 2],
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

/// [`SockRevNatSlot::family`]: an IPv4 translation (addresses in word 0, also for an
/// AF_INET6 socket dialling `::ffff:a.b.c.d`), an IPv6 one, or an empty slot (0).
pub const SK_RNAT_V4: u8 = 4;
pub const SK_RNAT_V6: u8 = 6;
/// Translations one socket remembers. A connected socket needs one; an unconnected UDP
/// socket sending to several Services keeps the ones of the last `SK_RNAT_SLOTS`
/// distinct backends it sent to (least recently used replaced first), and a reply from
/// a backend older than that shows the backend address. Only the socket's own sends
/// can push a translation out.
pub const SK_RNAT_SLOTS: usize = 4;

/// One translation of a socket: a reply from `backend` shows `service`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatSlot {
    pub backend_be: [u32; 4],
    pub service_be: [u32; 4],
    pub backend_port_be: u16,
    pub service_port_be: u16,
    /// `SK_RNAT_V4`, `SK_RNAT_V6`, or 0 (empty).
    pub family: u8,
    pub _pad: [u8; 3],
    pub rev_nat_id: u32,
}
// 44, not 48: four slots then fit the kernel's 256-byte allocation for a socket's
// storage element (72 bytes of header + 176); at 48 they took a 512-byte one, and that
// allocation is most of the cost of a socket's first connect to a Service.
const _: () = assert!(core::mem::size_of::<SockRevNatSlot>() == 44);

/// The value of [`MAP_SOCK_RNAT_SK`] for one socket: its translations, most recently
/// used first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatStore {
    pub slots: [SockRevNatSlot; SK_RNAT_SLOTS],
}
const _: () = assert!(core::mem::size_of::<SockRevNatStore>() == 44 * SK_RNAT_SLOTS);
// `record` is written out for four slots.
const _: () = assert!(SK_RNAT_SLOTS == 4);

/// A slot of [`MAP_SOCK_RNAT_SK_V1`]: today's slot and 4 bytes of padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatSlotV1 {
    pub slot: SockRevNatSlot,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevNatSlotV1>() == 48);

/// The value of [`MAP_SOCK_RNAT_SK_V1`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatStoreV1 {
    pub slots: [SockRevNatSlotV1; SK_RNAT_SLOTS],
}
const _: () = assert!(core::mem::size_of::<SockRevNatStoreV1>() == 48 * SK_RNAT_SLOTS);

impl SockRevNatStoreV1 {
    /// The translation of replies from (`family`, `backend_be`, `port_be`).
    #[inline(always)]
    pub fn lookup(
        &self,
        family: u8,
        backend_be: &[u32; 4],
        port_be: u16,
    ) -> Option<&SockRevNatSlot> {
        self.slots
            .iter()
            .map(|s| &s.slot)
            .find(|s| s.matches(family, backend_be, port_be))
    }
}

impl SockRevNatStore {
    /// The translation of replies from (`family`, `backend_be`, `port_be`).
    #[inline(always)]
    pub fn lookup(
        &self,
        family: u8,
        backend_be: &[u32; 4],
        port_be: u16,
    ) -> Option<&SockRevNatSlot> {
        self.slots
            .iter()
            .find(|s| s.matches(family, backend_be, port_be))
    }

    /// Remembers a translation, moving it to the front: the slots before the one that
    /// held the same backend (or, when none did, all but the last, which is dropped)
    /// shift back by one. Written out as four straight paths so that the verifier
    /// walks four short paths, not every combination of per-slot branches.
    #[inline(always)]
    pub fn record(&mut self, slot: SockRevNatSlot) {
        let (f, b, p) = (slot.family, &slot.backend_be, slot.backend_port_be);
        let s = &mut self.slots;
        // A new socket's store (slots fill from the front): nothing to shift.
        if s[0].family == 0 {
            s[0] = slot;
            return;
        }
        if !s[0].matches(f, b, p) {
            if s[1].matches(f, b, p) {
                s[1] = s[0];
            } else if s[2].matches(f, b, p) {
                s[2] = s[1];
                s[1] = s[0];
            } else {
                s[3] = s[2];
                s[2] = s[1];
                s[1] = s[0];
            }
        }
        s[0] = slot;
    }
}

impl SockRevNatSlot {
    /// Word by word: the eBPF target has no `memcmp`.
    #[inline(always)]
    pub fn matches(&self, family: u8, backend_be: &[u32; 4], port_be: u16) -> bool {
        self.family == family
            && self.backend_port_be == port_be
            && self.backend_be[0] == backend_be[0]
            && self.backend_be[1] == backend_be[1]
            && self.backend_be[2] == backend_be[2]
            && self.backend_be[3] == backend_be[3]
    }
}

/// Conntrack key of the external path, in the byte order of the wire. One map serves
/// both families (IPv4 uses word 0 of the addresses, the rest is zero).
/// - `CT_DIR_FORWARD`: the packet as the client sent it (client → frontend).
/// - `CT_DIR_REPLY`: the backend's reply as it arrives at this node (backend → client,
///   or backend → node address and SNAT port when the flow was SNATed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// Conntrack value.
/// - Forward entry: `backend_id` and the backend's address/port (`nat_*`: a reused id
///   pointing at another address is detected and the flow re-chosen); `snat_*` the
///   source the packet is rewritten to (zero when not SNATed).
/// - Reply entry: `nat_*` is the frontend address/port to restore as the reply's source;
///   `snat_*` is the client address/port to restore as its destination (only when the
///   flow was SNATed, `CT_FLAG_SNAT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtValue {
    /// Monotonic time (`bpf_ktime_get_ns`) after which the entry is ignored.
    pub expires_ns: u64,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub nat_addr_be: [u32; 4],
    pub snat_addr_be: [u32; 4],
    pub nat_port_be: u16,
    pub snat_port_be: u16,
    /// `CT_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 56);

/// Value of [`MAP_CT`]: the [`CtValue`] (first, so a pointer to the entry is one to its
/// value) and the traffic of the entry's direction: the forward entry counts the
/// client's packets (IPVS "in"), the reply entry the backend's ("out"). Bytes are the
/// IP packet's length (header included, as IPVS counts). Plain adds, not atomic ones: a
/// direction of a flow arrives on one receive queue, so one CPU at a time writes an
/// entry's counters (a rare concurrent packet may lose one count).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtEntry {
    pub ct: CtValue,
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 72);

pub const CT_FLAG_SNAT: u8 = 1 << 0;
/// A FIN or RST was seen: the entry now lives only `CT_TCP_CLOSE_TIMEOUT_S`.
pub const CT_FLAG_CLOSING: u8 = 1 << 1;
/// The backend answered at least once.
pub const CT_FLAG_SEEN_REPLY: u8 = 1 << 2;
/// TCP: the handshake completed (a packet without SYN after the backend answered): the
/// entry lives `CT_TCP_TIMEOUT_S`. Until then it is half-open and lives only
/// `CT_TCP_SYN_TIMEOUT_S` from the client's last packet.
pub const CT_FLAG_ESTABLISHED: u8 = 1 << 3;

/// Conntrack lifetimes, refreshed by every packet of the flow (a half-open TCP entry
/// only by the client's packets: the backend's SYN-ACK retransmissions to a spoofed
/// client must not keep it, and its SNAT port, alive).
pub const CT_TCP_TIMEOUT_S: u64 = 21_600;
pub const CT_TCP_CLOSE_TIMEOUT_S: u64 = 10;
/// Short, so that a flood of spoofed SYNs holds at most rate × this many SNAT ports and
/// conntrack entries. A client retransmitting its SYN (1 s, 3 s, 7 s...) refreshes it;
/// the handshake takes one round trip.
pub const CT_TCP_SYN_TIMEOUT_S: u64 = 5;
pub const CT_UDP_TIMEOUT_S: u64 = 60;

/// The external path's per-flow window. A packet of an established flow does the
/// flow's periodic work only when it changes its own conntrack entry's flags or moves
/// its expiry into another window of 2^`CT_REFRESH_WINDOW_SHIFT` ns (about 4.2 ms, one
/// timer tick at HZ 250); the other packets skip those hash lookups. The work: a
/// client's packet checks that the flow's backend is still there (else the flow is
/// chosen anew) and refreshes the reply entry (bringing it back after an LRU eviction);
/// a backend's packet refreshes the forward entry. So the other entry's expiry lags by
/// less than one window, and a removed backend or an evicted reply entry is noticed by
/// the client's first packet at least one window after its previous one (or sooner,
/// at a window edge). Two packets more than one window apart always do the work.
pub const CT_REFRESH_WINDOW_SHIFT: u32 = 22;
pub const CT_REFRESH_WINDOW_NS: u64 = 1 << CT_REFRESH_WINDOW_SHIFT;

/// Default SNAT source ports of the external path (flows to remote backends), used when
/// `ExtConfig` holds no range: the ports above the kernel's default ephemeral range
/// (32768–60999, `net.ipv4.ip_local_port_range`), which the node's own sockets do not
/// pick. The agent derives the range from the node's actual `ip_local_port_range` and
/// node port range (or `--snat-port-range`). The client's own port is kept when it
/// lies in the range and its reply key is free; otherwise a few pseudo-random ports of
/// the range are tried. Each port is per (backend address, backend port, protocol), so
/// the range holds that many concurrent flows per backend.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
pub const SNAT_PORT_TRIES: u32 = 8;
/// The kernel's default ephemeral range, which the default SNAT range avoids.
pub const EPHEMERAL_PORT_MIN: u16 = 32_768;
pub const EPHEMERAL_PORT_MAX: u16 = 60_999;

/// Largest Maglev table (a prime). `--maglev-table-size` may choose a smaller prime.
pub const MAGLEV_TABLE_MAX: usize = 16_381;
pub const MAGLEV_DEFAULT_SIZE: u32 = 16_381;

/// Value of `LB_MAGLEV_V1`: backend ids; only the first `ExtConfig.maglev_size` are used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct MaglevTable {
    pub backend_ids: [u32; MAGLEV_TABLE_MAX],
}

/// Key of the external affinity map: the client's source address and the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityExtKey {
    pub addr_be: [u32; 4],
    pub rev_nat_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AffinityExtKey>() == 24);

/// Data of the source-range LPM keys: the rev-NAT id (big-endian, so that it is the
/// leading, always fully matched 32 bits) then the source prefix. The LPM prefix length
/// is `32 + prefix`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SrcRange4Key {
    pub rev_nat_id_be: u32,
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<SrcRange4Key>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SrcRange6Key {
    pub rev_nat_id_be: u32,
    pub addr_be: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<SrcRange6Key>() == 20);

/// Key of `LB_NODEADDR_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct NodeAddrKey {
    pub addr_be: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<NodeAddrKey>() == 20);

/// The agent's settings for the external path (entry 0 of `LB_CONFIG_V1`). Zero
/// addresses mean "no SNAT address of this family": flows that would need SNAT are
/// dropped and counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ExtConfig {
    pub snat4_be: u32,
    pub snat6_be: [u32; 4],
    /// Maglev table size in use (a prime ≤ `MAGLEV_TABLE_MAX`).
    pub maglev_size: u32,
    pub flags: u32,
    pub _pad: u32,
    /// SNAT source ports (host order, inclusive) of flows to remote backends; both 0
    /// (a config written by an older agent): `SNAT_PORT_MIN..=SNAT_PORT_MAX`.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Node-wide token bucket of the ICMP rejects: rejects per second (0: no limit) and
    /// the most sent back to back (see [`reject_bucket`]).
    pub reject_rate: u32,
    pub reject_burst: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<ExtConfig>() == 48);

/// Default `--reject-rate` and `--reject-burst`: the kernel's node-wide ICMP limit
/// (`net.ipv4.icmp_msgs_per_sec` = 1000, `net.ipv4.icmp_msgs_burst` = 50).
pub const REJECT_RATE_DEFAULT: u32 = 1000;
pub const REJECT_BURST_DEFAULT: u32 = 50;
/// Largest `--reject-rate` and `--reject-burst`.
pub const REJECT_LIMIT_MAX: u32 = 1_000_000;

/// State of the reject token bucket (entry 0 of the eBPF side's unpinned
/// `LB_REJECT_RL`): when it was last refilled and the credit left. The credit may go
/// below 0 when CPUs race (as the kernel's `icmp_global` credit may).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RejectBucket {
    pub stamp_ns: u64,
    pub credit: i64,
}
const _: () = assert!(core::mem::size_of::<RejectBucket>() == 16);

/// What [`reject_bucket`] decided for one reject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketTake {
    /// Send it; take one credit.
    Consume,
    /// Send it; the bucket becomes (`stamp_ns`, `credit`), this reject already taken.
    Refill { stamp_ns: u64, credit: i64 },
    /// Drop it: no credit, and too little time since the last refill for a new one.
    Empty,
}

/// The token bucket of the ICMP rejects, in the shape of the kernel's `icmp_global_allow`:
/// credit refills at `rate` per second, up to `burst`, when it is used up (a long quiet
/// period gives `burst`, not more). The first call (a zeroed bucket) finds it full.
/// `rate` 0 is no limit, which the caller checks; the agent keeps `rate` and `burst` at
/// most [`REJECT_LIMIT_MAX`], so the arithmetic cannot overflow.
#[inline(always)]
pub fn reject_bucket(b: &RejectBucket, now_ns: u64, rate: u32, burst: u32) -> BucketTake {
    const SEC: u64 = 1_000_000_000;
    // Past this much quiet time the bucket is full anyway (rate ≥ 1, burst ≤ 10^6).
    const QUIET_MAX: u64 = 1_000_000 * SEC;
    if b.credit > 0 {
        return BucketTake::Consume;
    }
    let delta = if b.stamp_ns == 0 {
        QUIET_MAX
    } else {
        now_ns.saturating_sub(b.stamp_ns)
    };
    let delta = if delta > QUIET_MAX { QUIET_MAX } else { delta };
    // Whole seconds and the rest apart: 10^15 ns × 10^6 per second would not fit in 64
    // bits, and BPF has no 128-bit division.
    let rate = u64::from(rate);
    let add = delta / SEC * rate + delta % SEC * rate / SEC;
    let add = if add > u64::from(burst) {
        u64::from(burst)
    } else {
        add
    } as i64;
    if add == 0 {
        return BucketTake::Empty;
    }
    let credit = if b.credit < 0 { 0 } else { b.credit } + add;
    let burst = i64::from(if burst == 0 { 1 } else { burst });
    BucketTake::Refill {
        stamp_ns: now_ns,
        credit: if credit > burst { burst } else { credit } - 1,
    }
}

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
/// `loadBalancerSourceRanges`: a client on the node whose bound source is outside the
/// ranges of the load-balancer IP it dialled was refused (ECONNREFUSED).
pub const CTR_SOCK_SRC_RANGE: u32 = 9;
/// `loadBalancerSourceRanges`: the socket had no source address yet (unbound; the
/// kernel picks it from the route after the hook), so the connection to the
/// load-balancer IP passed untouched instead of being short-circuited to a backend.
pub const CTR_SOCK_SRC_UNBOUND: u32 = 10;
/// External path (tc/XDP). The eBPF helper adds the rest of its reasons here.
pub const CTR_EXT_FORWARDED: u32 = 16;
pub const CTR_EXT_REPLY_XLATED: u32 = 17;
pub const CTR_EXT_REJECT_NO_BACKEND: u32 = 18;
pub const CTR_EXT_DROP_NO_LOCAL: u32 = 19;
pub const CTR_EXT_DROP_SRC_RANGE: u32 = 20;
pub const CTR_EXT_CT_UPDATE_FAIL: u32 = 21;
/// A packet of an established external flow (forward entry within its lifetime).
pub const CTR_EXT_CT_HIT: u32 = 22;
/// An established flow's backend left (or its id now holds another address): the flow
/// was chosen anew (a TCP flow is reset by the new backend, see svc-lb-ebpf `ct.rs`).
pub const CTR_EXT_BACKEND_GONE: u32 = 23;
/// No free SNAT source port for a flow to a remote backend: dropped.
pub const CTR_EXT_SNAT_PORT_EXHAUSTED: u32 = 24;
/// A remote backend needs SNAT but `ExtConfig` has no address of the family: dropped.
pub const CTR_EXT_NO_SNAT_ADDR: u32 = 25;
/// An external frontend without a Maglev table (or with size 0): the flow hash picked a
/// slot instead (still consistent per flow, not across backend changes).
pub const CTR_EXT_MAGLEV_MISSING: u32 = 26;
/// A Maglev entry or slot pointed at a backend id that does not exist: dropped.
pub const CTR_EXT_BACKEND_MISSING: u32 = 27;
/// Session affinity of an external client: the remembered backend was used.
pub const CTR_EXT_AFF_HIT: u32 = 28;
/// Session affinity: the external affinity entry could not be written.
pub const CTR_EXT_AFF_UPDATE_FAIL: u32 = 29;
/// The ICMP reject could not be built (packet too short, IPv4 options, helper error):
/// the packet was dropped instead.
pub const CTR_EXT_REJECT_FAILED: u32 = 30;
/// The XDP program rewrote a packet (forward path) and passed it to the stack.
pub const CTR_EXT_XDP_FORWARDED: u32 = 31;
/// The XDP program sent a reject back out the device (XDP_TX).
pub const CTR_EXT_XDP_TX: u32 = 32;
/// A packet the external path cannot handle (IP fragment, IPv6 extension header) passed
/// untouched.
pub const CTR_EXT_PASS_UNSUPPORTED: u32 = 33;
/// A packet rewrite (store or checksum helper) failed: dropped.
pub const CTR_EXT_REWRITE_FAIL: u32 = 34;
/// A TCP FIN or RST moved a conntrack entry to its closing lifetime.
pub const CTR_EXT_CT_CLOSING: u32 = 35;
/// tc ingress sent a translated packet of a SNAT flow (either direction) out itself:
/// FIB lookup, TTL/hop limit decremented, `bpf_redirect_neigh`.
pub const CTR_EXT_FIB_REDIRECTED: u32 = 36;
/// The FIB lookup for such a packet did not give a neighbour to send it to (local
/// destination, forwarding disabled, no route, MTU, TTL/hop limit ≤ 1): it went into
/// the stack's forwarding instead.
pub const CTR_EXT_FIB_TO_STACK: u32 = 37;
/// The XDP program found a reject on a device where XDP_TX cannot be trusted
/// (`LB_XDPDEV_V1`) and passed the packet on; tc ingress answers it.
pub const CTR_EXT_XDP_REJECT_TO_TC: u32 = 38;
/// A reject (ICMP/ICMPv6 port unreachable) was not sent because the node-wide reject
/// rate limit (`--reject-rate`, `--reject-burst`) was used up: the packet was dropped.
pub const CTR_EXT_REJECT_RATE_LIMITED: u32 = 39;
// Per-packet path for pod traffic (`pod.rs`). The detail counters of conntrack, choice
// and reject are the external path's (shared code); these say which path acted.
// Numbered from 48 so that counters added to the other paths meanwhile do not collide.
/// A pod's packet to a Service address was translated (new or established flow).
pub const CTR_POD_XLATED: u32 = 48;
/// A reply on its way back into a pod was given the Service address back.
pub const CTR_POD_REPLY_XLATED: u32 = 49;
/// A pod reached itself through its Service (source rewritten, sent back to it).
pub const CTR_POD_HAIRPIN: u32 = 50;
/// A pod's packet to a Service without endpoints was answered with ICMP unreachable.
pub const CTR_POD_REJECTED: u32 = 51;
/// A pod's packet to a Service was dropped (source range, missing backend, rewrite).
pub const CTR_POD_DROPPED: u32 = 52;
pub const COUNTERS_MAX: u32 = 64;

/// Counter names for the CLI and metrics, indexed like the `CTR_*` constants.
pub const COUNTER_NAMES: [(u32, &str); 40] = [
    (CTR_SOCK_XLATED, "sock_translated"),
    (CTR_SOCK_NO_BACKEND, "sock_rejected_no_backend"),
    (CTR_SOCK_SLOT_MISS, "sock_error_slot_missing"),
    (CTR_SOCK_BACKEND_MISS, "sock_error_backend_missing"),
    (CTR_SOCK_RNAT_UPDATE_FAIL, "sock_error_revnat_update"),
    (CTR_SOCK_RNAT_HIT, "sock_revnat_translated"),
    (CTR_SOCK_AFF_HIT, "sock_affinity_hit"),
    (CTR_SOCK_AFF_STALE, "sock_affinity_stale"),
    (CTR_SOCK_AFF_UPDATE_FAIL, "sock_error_affinity_update"),
    (CTR_SOCK_SRC_RANGE, "sock_rejected_source_range"),
    (CTR_SOCK_SRC_UNBOUND, "sock_passed_source_unbound"),
    (CTR_EXT_FORWARDED, "ext_forwarded"),
    (CTR_EXT_REPLY_XLATED, "ext_reply_translated"),
    (CTR_EXT_REJECT_NO_BACKEND, "ext_rejected_no_backend"),
    (CTR_EXT_DROP_NO_LOCAL, "ext_dropped_no_local_endpoint"),
    (CTR_EXT_DROP_SRC_RANGE, "ext_dropped_source_range"),
    (CTR_EXT_CT_UPDATE_FAIL, "ext_error_conntrack_update"),
    (CTR_EXT_CT_HIT, "ext_conntrack_hit"),
    (CTR_EXT_BACKEND_GONE, "ext_conntrack_backend_gone"),
    (
        CTR_EXT_SNAT_PORT_EXHAUSTED,
        "ext_dropped_snat_port_exhausted",
    ),
    (CTR_EXT_NO_SNAT_ADDR, "ext_dropped_no_snat_address"),
    (CTR_EXT_MAGLEV_MISSING, "ext_maglev_table_missing"),
    (CTR_EXT_BACKEND_MISSING, "ext_error_backend_missing"),
    (CTR_EXT_AFF_HIT, "ext_affinity_hit"),
    (CTR_EXT_AFF_UPDATE_FAIL, "ext_error_affinity_update"),
    (CTR_EXT_REJECT_FAILED, "ext_error_reject_build"),
    (CTR_EXT_XDP_FORWARDED, "ext_xdp_forwarded"),
    (CTR_EXT_XDP_TX, "ext_xdp_tx"),
    (CTR_EXT_PASS_UNSUPPORTED, "ext_passed_unsupported"),
    (CTR_EXT_REWRITE_FAIL, "ext_error_rewrite"),
    (CTR_EXT_CT_CLOSING, "ext_conntrack_closing"),
    (CTR_EXT_FIB_REDIRECTED, "ext_fib_redirected"),
    (CTR_EXT_FIB_TO_STACK, "ext_fib_to_stack"),
    (CTR_EXT_XDP_REJECT_TO_TC, "ext_xdp_reject_to_tc"),
    (
        CTR_EXT_REJECT_RATE_LIMITED,
        "ext_dropped_reject_rate_limited",
    ),
    (CTR_POD_XLATED, "pod_translated"),
    (CTR_POD_REPLY_XLATED, "pod_reply_translated"),
    (CTR_POD_HAIRPIN, "pod_hairpin"),
    (CTR_POD_REJECTED, "pod_rejected_service"),
    (CTR_POD_DROPPED, "pod_dropped_service"),
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

/// Key of [`MAP_CONNS`]: a backend address as the socket sees its peer. IPv4 addresses
/// use `addr_be[0]` (also for a dual-stack socket's `::ffff:a.b.c.d` peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ConnKey {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 20);

impl ConnKey {
    /// The key of a backend entry (its address and port as the connect hook writes
    /// them into the socket).
    #[inline(always)]
    pub fn of_backend(b: &Backend) -> Self {
        let v4 = b.family == FAMILY_V4;
        ConnKey {
            addr_be: if v4 {
                [b.addr_be[0], 0, 0, 0]
            } else {
                b.addr_be
            },
            port_be: b.port_be,
            family: b.family,
            _pad: 0,
        }
    }
}

/// Value of [`MAP_CONNS`]: TCP connections now open to the backend, changed by atomic
/// adds (a decrement adds `u64::MAX`). `active`: ESTABLISHED; `inactive`: every other
/// state a counted socket passes through before it closes (SYN_SENT, FIN_WAIT1/2,
/// CLOSE_WAIT, LAST_ACK, CLOSING), as IPVS names them. Read as `i64` and clamped at 0
/// ([`ConnCount::get`]): a decrement whose increment went to an entry the agent has
/// since deleted may take a new entry below zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ConnCount {
    pub active: u64,
    pub inactive: u64,
}
const _: () = assert!(core::mem::size_of::<ConnCount>() == 16);

impl ConnCount {
    /// (active, inactive), negative values as 0.
    #[inline(always)]
    pub fn get(&self) -> (u64, u64) {
        let clamp = |v: u64| if (v as i64) < 0 { 0 } else { v };
        (clamp(self.active), clamp(self.inactive))
    }
}

/// Key of [`MAP_TRAFFIC`]: a frontend (its rev-NAT id, as the socket's reverse-NAT
/// slot names it) and a backend address (as [`MAP_CONNS`] keys it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct TrafficKey {
    pub rev_nat_id: u32,
    pub backend: ConnKey,
}
const _: () = assert!(core::mem::size_of::<TrafficKey>() == 24);

/// Value of [`MAP_TRAFFIC`], changed by atomic adds when a counted socket closes.
/// Directions as IPVS names them: `in` is client → backend, `out` backend → client.
/// Packets are the client socket's TCP segments (`segs_out`/`segs_in`: SYN, pure ACKs,
/// FIN and retransmissions included); bytes are payload (`bytes_acked` and
/// `bytes_received` without the SYN's and the FINs' sequence numbers). For a UDP
/// frontend only `packets_in` is counted (one per unconnected datagram, by the sendmsg
/// hooks, which see no length and no reply); its other fields stay 0 and mean unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct TrafficCount {
    /// Connections whose traffic is in the other fields (closed ones).
    pub closed: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCount>() == 40);

/// Key of [`MAP_EXT_TRAFFIC`]: a frontend's rev-NAT id, the backend address its
/// flows went to and their protocol. The zero `backend` holds what backends that have
/// left the backend map carried (folded in when they go, so the frontend's totals keep
/// them while the map keeps no key per departed address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ExtTrafficKey {
    pub rev_nat_id: u32,
    pub backend: ConnKey,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ExtTrafficKey>() == 28);

impl TrafficCount {
    /// Field-wise sum (wrapping: counters).
    pub fn add(&mut self, o: &TrafficCount) {
        self.closed = self.closed.wrapping_add(o.closed);
        self.packets_in = self.packets_in.wrapping_add(o.packets_in);
        self.packets_out = self.packets_out.wrapping_add(o.packets_out);
        self.bytes_in = self.bytes_in.wrapping_add(o.bytes_in);
        self.bytes_out = self.bytes_out.wrapping_add(o.bytes_out);
    }
}

/// TCP states as the kernel numbers them (`BPF_TCP_*`), for [`payload_bytes`].
pub const TCP_FIN_WAIT1: u32 = 4;
pub const TCP_FIN_WAIT2: u32 = 5;
pub const TCP_CLOSE_WAIT: u32 = 8;
pub const TCP_LAST_ACK: u32 = 9;
pub const TCP_CLOSING: u32 = 11;

/// Payload bytes (in, out) of a client socket that closes from state `last`, from its
/// `bytes_acked` and `bytes_received`, which count sequence numbers: the SYN and our
/// FIN once acked, the peer's FIN once received. Taken off:
/// - the SYN: the first byte any ACK of ours covers;
/// - our FIN: sent in FIN_WAIT1/2, CLOSING and LAST_ACK, acked when nothing sent is
///   outstanding (`snd_una == snd_nxt`);
/// - the peer's FIN: received in CLOSE_WAIT, LAST_ACK, CLOSING, and in FIN_WAIT2 when
///   the socket leaves it for TIME_WAIT. A FIN_WAIT2 socket that ends by timeout or
///   reset without the peer's FIN shows one byte too few (at 0, 0).
#[inline(always)]
pub fn payload_bytes(
    bytes_acked: u64,
    bytes_received: u64,
    last: u32,
    snd_una: u32,
    snd_nxt: u32,
) -> (u64, u64) {
    let fin_sent = matches!(
        last,
        TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK
    );
    let fin_acked = fin_sent && snd_una == snd_nxt;
    let fin_received = matches!(
        last,
        TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_FIN_WAIT2
    );
    let sent = bytes_acked
        .saturating_sub(1)
        .saturating_sub(u64::from(fin_acked));
    let received = bytes_received.saturating_sub(u64::from(fin_received));
    (sent, received)
}

/// Largest number of backends one frontend can hold (slots are `u16`).
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for Svc4Key {}
    unsafe impl aya::Pod for Svc6Key {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ConnCount {}
    unsafe impl aya::Pod for TrafficKey {}
    unsafe impl aya::Pod for TrafficCount {}
    unsafe impl aya::Pod for ExtTrafficKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for SvcMeta {}
    unsafe impl aya::Pod for SockRevNat4Key {}
    unsafe impl aya::Pod for SockRevNat4Value {}
    unsafe impl aya::Pod for SockRevNat6Key {}
    unsafe impl aya::Pod for SockRevNat6Value {}
    unsafe impl aya::Pod for SockRevNatStore {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for AffinityExtKey {}
    unsafe impl aya::Pod for SrcRange4Key {}
    unsafe impl aya::Pod for SrcRange6Key {}
    unsafe impl aya::Pod for NodeAddrKey {}
    unsafe impl aya::Pod for ExtConfig {}
    unsafe impl aya::Pod for RejectBucket {}
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

    fn slot(family: u8, backend: u32, port: u16, service: u32) -> SockRevNatSlot {
        SockRevNatSlot {
            backend_be: [backend, 0, 0, 0],
            service_be: [service, 0, 0, 0],
            backend_port_be: port,
            service_port_be: 53,
            family,
            _pad: [0; 3],
            rev_nat_id: service,
        }
    }

    fn backends(st: &SockRevNatStore) -> [u32; SK_RNAT_SLOTS] {
        st.slots.map(|s| s.backend_be[0])
    }

    #[test]
    fn a_socket_store_keeps_its_most_recently_used_translations() {
        let mut st = SockRevNatStore::zeroed();
        assert!(
            st.lookup(SK_RNAT_V4, &[0; 4], 0).is_none(),
            "an empty slot matches nothing"
        );
        for b in 1..=4 {
            st.record(slot(SK_RNAT_V4, b, 80, 100 + b));
        }
        assert_eq!(backends(&st), [4, 3, 2, 1]);
        for b in 1..=4 {
            let got = st
                .lookup(SK_RNAT_V4, &[b, 0, 0, 0], 80)
                .map(|s| s.service_be[0]);
            assert_eq!(got, Some(100 + b));
        }
        // Each position of a match moves to the front without a duplicate.
        st.record(slot(SK_RNAT_V4, 3, 80, 103));
        assert_eq!(backends(&st), [3, 4, 2, 1]);
        st.record(slot(SK_RNAT_V4, 2, 80, 102));
        assert_eq!(backends(&st), [2, 3, 4, 1]);
        st.record(slot(SK_RNAT_V4, 1, 80, 101));
        assert_eq!(backends(&st), [1, 2, 3, 4]);
        st.record(slot(SK_RNAT_V4, 1, 80, 201));
        assert_eq!(backends(&st), [1, 2, 3, 4]);
        assert_eq!(
            st.lookup(SK_RNAT_V4, &[1, 0, 0, 0], 80)
                .map(|s| s.service_be[0]),
            Some(201),
            "a repeated backend takes the newest Service"
        );
        // A new backend drops the least recently used one (4).
        st.record(slot(SK_RNAT_V4, 9, 80, 109));
        assert_eq!(backends(&st), [9, 1, 2, 3]);
        assert!(st.lookup(SK_RNAT_V4, &[4, 0, 0, 0], 80).is_none());
        // Family and port are part of the key.
        assert!(st.lookup(SK_RNAT_V6, &[1, 0, 0, 0], 80).is_none());
        assert!(st.lookup(SK_RNAT_V4, &[1, 0, 0, 0], 81).is_none());
    }

    #[test]
    fn map_names_fit_kernel_object_names() {
        let ext = [
            PROG_TC_INGRESS,
            PROG_TC_EGRESS,
            PROG_XDP,
            PROG_POD_INGRESS,
            PROG_POD_EGRESS,
        ];
        for name in ALL_MAPS
            .iter()
            .chain(SOCKET_MAPS.iter())
            .chain(SOCK_PROGRAMS.iter())
            .chain(ext.iter())
            .chain([PROG_LC4, PROG_LC6, PROG_LCLOOP4, PROG_LCLOOP6].iter())
            .chain([MAP_LC_PROG4, MAP_LC_PROG6].iter())
        {
            assert!(name.len() <= 15, "{name} is longer than BPF_OBJ_NAME_LEN-1");
        }
    }

    /// The numbers the kernel's `tcp_info` showed for a loopback connection that sent
    /// 1000 bytes, shut down its side, then read a 300-byte reply and the FIN:
    /// `bytes_acked` 1002, `bytes_received` 301, leaving FIN_WAIT2 for TIME_WAIT.
    #[test]
    fn payload_bytes_take_off_syn_and_fins() {
        assert_eq!(payload_bytes(1002, 301, TCP_FIN_WAIT2, 7, 7), (1000, 300));
        // Passive close: the peer's FIN first (CLOSE_WAIT), ours acked in LAST_ACK.
        assert_eq!(payload_bytes(1002, 301, TCP_LAST_ACK, 9, 9), (1000, 300));
        // Simultaneous close.
        assert_eq!(payload_bytes(1002, 301, TCP_CLOSING, 9, 9), (1000, 300));
        // Reset while established: no FIN either way.
        assert_eq!(payload_bytes(501, 40, 1, 9, 9), (500, 40));
        // Reset in FIN_WAIT1 before our FIN was acked.
        assert_eq!(payload_bytes(501, 40, TCP_FIN_WAIT1, 8, 9), (500, 40));
        // Refused: the SYN was never acked.
        assert_eq!(payload_bytes(0, 0, 2, 0, 1), (0, 0));
        // Never below zero.
        assert_eq!(payload_bytes(1, 0, TCP_FIN_WAIT2, 3, 3), (0, 0));
    }

    #[test]
    fn traffic_counts_add_field_by_field() {
        let mut a = TrafficCount {
            closed: 1,
            packets_in: 2,
            packets_out: 3,
            bytes_in: 4,
            bytes_out: 5,
        };
        a.add(&a.clone());
        assert_eq!(
            a,
            TrafficCount {
                closed: 2,
                packets_in: 4,
                packets_out: 6,
                bytes_in: 8,
                bytes_out: 10,
            }
        );
    }
}
