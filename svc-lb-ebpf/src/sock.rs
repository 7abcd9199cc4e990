//! Socket-level load balancing: rewrite the destination a local process dials (connect,
//! unconnected sendmsg) from a Service address to a backend, and make replies and
//! getpeername show the Service address again.
//!
//! Fail open: an address that is not a Service passes untouched. A Service with no
//! usable backend refuses with ECONNREFUSED, as kube-proxy's REJECT rule does. A
//! load-balancer IP with `loadBalancerSourceRanges` refuses a bound source outside the
//! ranges the same way, and lets an unbound socket (no source yet) pass untouched.
use core::ffi::c_void;

use aya_ebpf::{
    btf_maps::lpm_trie::Key,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop, bpf_set_retval,
    },
    maps::ProgramArray,
    programs::SockAddrContext,
};
use svc_lb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, CTR_SOCK_AFF_HIT, CTR_SOCK_AFF_STALE,
    CTR_SOCK_AFF_UPDATE_FAIL, CTR_SOCK_RNAT_UPDATE_FAIL, CTR_SOCK_SRC_UNBOUND, CTR_SOCK_XLATED,
    Choice, ConnKey, PROTO_UDP, SCOPE_ALL, SVC_FLAG_SCHED_LC, SrcRange4Key, SrcRange6Key,
    Stickiness, Svc4Key, Svc6Key, SvcValue, TrafficCount, TrafficKey, choose_backend,
    lookup::{LC_LOOP_MAX, LC_SCAN_MAX, LcScan, lc_overhead, lc_two_choices, v4_mapped},
    select_slot,
};

use crate::maps::{
    LB_AFFINITY_V1, LB_AFFMATCH_V1, LB_BACKENDS_V1, LB_BESTATS_V1, LB_CONNS_V1, LB_COUNTERS_V2,
    LB_FESTATS_V1, LB_LCPROG4, LB_LCPROG6, LB_LCSCAN, LB_SRCRNG4_V1, LB_SRCRNG6_V1, LB_SVC4_V1,
    LB_SVC6_V1, LB_TRAFFIC_V1,
};

const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[derive(Clone, Copy)]
pub enum Family {
    V4,
    V6,
}

/// How a program serves an `lc`/`wlc` frontend (issue 15): a const generic parameter
/// of the forward path, so that each program holds only its own way (and a tail call
/// stays in the program's main function, where the verifier allows it).
pub mod lc {
    /// sendmsg: a random slot. Unconnected datagrams are never counted as open
    /// connections (only as packets sent, `count_datagram`), so there is nothing to compare, and the sendmsg programs stay without the scan.
    pub const RANDOM: u8 = 0;
    /// The connect hooks: tail-call the family's lc program (`svclb_lc4`/`6`), so that
    /// the hooks every other connection runs carry no scan for the verifier to walk.
    /// Where none is loaded (a kernel without connection counts, or no agent running) the
    /// lighter of two random slots is taken.
    pub const TAIL_CALL: u8 = 1;
    /// The lc programs `svclb_lc4`/`6`: the exact scan over up to `LC_SCAN_MAX` slots,
    /// a bounded loop run at the start of the program (`lc_prescan`); two random
    /// choices above. For kernels without `bpf_loop`.
    pub const SCAN: u8 = 2;
    /// The lc programs `svclb_lcloop4`/`6` (kernels with `bpf_loop`, 5.17): the same
    /// scan with each step a `bpf_loop` callback, which the verifier walks once
    /// whatever the count, over up to `LC_LOOP_MAX` slots (every slot a frontend can
    /// have).
    pub const SCAN_LOOP: u8 = 3;
}

/// `--socket-lb-scope host`: the cookie of the agent's (the host's) network namespace,
/// set at load; 0 (`all`) translates every socket. Read-only data the verifier knows:
/// with 0 the check and its helper call are removed.
#[unsafe(no_mangle)]
static SVCLB_HOST_NETNS: aya_ebpf::Global<u64> = aya_ebpf::Global::new(0);

/// Whether this socket is one the socket programs translate: with `host` scope only
/// sockets of the host network namespace; pods' packets are translated per packet
/// (`pod.rs`) instead, so a mesh proxy in the pod sees the Service address.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    let host = SVCLB_HOST_NETNS.load();
    host == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == host
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(c) = LB_COUNTERS_V2.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *c += 1 };
    }
}

/// Counts one new connection (or unconnected datagram) for a frontend and a backend.
#[inline(always)]
pub(crate) fn count_conn(rev_nat_id: u32, backend_id: u32) {
    for (map, key) in [(&LB_FESTATS_V1, rev_nat_id), (&LB_BESTATS_V1, backend_id)] {
        if let Some(c) = map.get_ptr_mut(key) {
            unsafe { *c += 1 };
        } else if map
            .insert(key, 1u64, u64::from(aya_ebpf::bindings::BPF_NOEXIST))
            .is_err()
        {
            // Another CPU created the entry first; this CPU's slot exists now.
            if let Some(c) = map.get_ptr_mut(key) {
                unsafe { *c += 1 };
            }
        }
    }
}

/// Counts one unconnected datagram the sendmsg hooks translated: `packets_in` of the
/// (frontend, backend address) entry of `LB_TRAFFIC_V1`, the map the sock_ops program
/// adds closed TCP connections to. Only packets: the hook's context carries no
/// datagram length (`bpf_sock_addr` has no size field), so `bytes_in` stays 0 there
/// and the agent shows UDP bytes as unknown. Replies are not counted (README `list`):
/// recvmsg4/6 run only when the application asks for the source address, and again
/// for each `MSG_PEEK`, so their count would not be the datagrams received.
///
/// A function of its own (a BPF-to-BPF call), not inlined: the verifier walks its few
/// branches (found, created, lost the creation race) once per call site instead of
/// once per path of the backend choice that reaches it.
#[inline(never)]
fn count_datagram(rev_nat_id: u32, be: *const Backend) {
    let key = TrafficKey {
        rev_nat_id,
        backend: ConnKey::of_backend(unsafe { &*be }),
    };
    let mut t = LB_TRAFFIC_V1.get_ptr_mut(&key);
    if t.is_none() {
        // Another CPU may create it first (EEXIST): the lookup below finds theirs. A
        // full map leaves the datagram uncounted.
        let _ = LB_TRAFFIC_V1.insert(
            &key,
            TrafficCount::default(),
            u64::from(aya_ebpf::bindings::BPF_NOEXIST),
        );
        t = LB_TRAFFIC_V1.get_ptr_mut(&key);
    }
    if let Some(t) = t {
        crate::sockops::atomic_add(unsafe { &raw mut (*t).packets_in }, 1);
    }
}

#[inline(always)]
fn refuse(reason: u32) -> i32 {
    count(reason);
    // Without this the syscall would fail with EPERM; kube-proxy's REJECT gives
    // ECONNREFUSED and clients treat the two differently. Kernels < 5.18 lack the
    // helper: the agent's probe turns it off there (EPERM it is).
    if crate::compat::set_retval() {
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    REJECT
}

/// What [`remembered`] found, for [`remember`]: the client (the cookie of the socket's
/// network namespace) and its entry in the map, if any.
struct Client {
    netns: u64,
    entry: *mut AffinityValue,
}

/// Session affinity, step 1: the client's remembered backend for a frontend. The client
/// is the socket's network namespace (the pod).
#[inline(always)]
fn remembered(
    ctx: &SockAddrContext,
    client: &mut Client,
    rev_nat_id: u32,
) -> Option<AffinityValue> {
    client.netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let key = AffinityKey {
        netns_cookie: client.netns,
        rev_nat_id,
        _pad: 0,
    };
    let entry = LB_AFFINITY_V1.get_ptr_mut(key)?;
    client.entry = entry;
    Some(unsafe { *entry })
}

/// Session affinity, step 2: the remembered backend still belongs to the frontend.
#[inline(always)]
fn is_member(backend_id: u32, rev_nat_id: u32) -> bool {
    LB_AFFMATCH_V1
        .get_ptr(AffinityMatchKey {
            backend_id,
            rev_nat_id,
        })
        .is_some()
}

/// Session affinity, step 3: remember the backend (or refresh its last use).
#[inline(always)]
fn remember(client: &Client, rev_nat_id: u32, backend_id: u32, sticky: Stickiness) {
    let now_ns = match sticky {
        Stickiness::Off => return,
        Stickiness::Remembered { now_ns } => {
            count(CTR_SOCK_AFF_HIT);
            // The entry the choice came from: refresh it in place. An LRU update would
            // allocate a new element and free the old one on every connection (the
            // lookup already marked the entry as used for the LRU). Another CPU writing
            // the same client's entry at once leaves one of the two times, both recent.
            if !client.entry.is_null() {
                unsafe { (*client.entry).last_used_ns = now_ns };
                return;
            }
            now_ns
        }
        Stickiness::New { now_ns, stale } => {
            if stale {
                count(CTR_SOCK_AFF_STALE);
            }
            now_ns
        }
    };
    let key = AffinityKey {
        netns_cookie: client.netns,
        rev_nat_id,
        _pad: 0,
    };
    let value = AffinityValue {
        last_used_ns: now_ns,
        backend_id,
        _pad: 0,
    };
    if LB_AFFINITY_V1.insert(key, value, 0).is_err() {
        // The connection works; only the next one may pick another backend.
        count(CTR_SOCK_AFF_UPDATE_FAIL);
    }
}

/// `sendmsg`: the hook is sendmsg4/6, whose context also carries the source a datagram
/// asked for (`IP_PKTINFO`); the verifier refuses that field in the connect hooks.
#[inline(always)]
pub fn forward<const LC: u8>(ctx: &SockAddrContext, family: Family, sendmsg: bool) -> i32 {
    if !in_scope(ctx) {
        return ALLOW;
    }
    match family {
        Family::V4 => forward4::<LC>(ctx, sendmsg),
        Family::V6 => forward6::<LC>(ctx, sendmsg),
    }
}

/// The client's IPv4 source as far as it is known in the hook (network order, 0 when
/// not yet): the datagram's `IP_PKTINFO` source on sendmsg, else the address the socket
/// is bound to. An unbound socket gets its source from the route lookup, which the
/// kernel makes after this hook; there is no way to make it here.
#[inline(always)]
fn source4(ctx: &SockAddrContext, sendmsg: bool) -> u32 {
    let sa = ctx.sock_addr;
    if sendmsg {
        let s = unsafe { (*sa).msg_src_ip4 };
        if s != 0 {
            return s;
        }
    }
    bound4(ctx)
}

/// The IPv4 address the socket is bound to (also for an AF_INET6 socket bound to
/// `::ffff:a.b.c.d`), 0 when unbound.
#[inline(always)]
fn bound4(ctx: &SockAddrContext) -> u32 {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return 0;
    }
    unsafe { (*sk).src_ip4 }
}

#[inline(always)]
fn source6(ctx: &SockAddrContext, sendmsg: bool) -> [u32; 4] {
    let sa = ctx.sock_addr;
    if sendmsg {
        let s = unsafe {
            [
                (*sa).msg_src_ip6[0],
                (*sa).msg_src_ip6[1],
                (*sa).msg_src_ip6[2],
                (*sa).msg_src_ip6[3],
            ]
        };
        if s != [0; 4] {
            return s;
        }
    }
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    if sk.is_null() {
        return [0; 4];
    }
    unsafe {
        [
            (*sk).src_ip6[0],
            (*sk).src_ip6[1],
            (*sk).src_ip6[2],
            (*sk).src_ip6[3],
        ]
    }
}

/// `loadBalancerSourceRanges` for `choose_backend`: the LPM lookup the external path
/// makes, or `None` when the source is not known yet.
#[inline(always)]
fn src_allowed4(src: u32, rev_nat_id: u32) -> Option<bool> {
    if src == 0 {
        count(CTR_SOCK_SRC_UNBOUND);
        return None;
    }
    let key = Key::new(
        64,
        SrcRange4Key {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr_be: src,
        },
    );
    Some(LB_SRCRNG4_V1.get(&key).is_some())
}

#[inline(always)]
fn src_allowed6(src: [u32; 4], rev_nat_id: u32) -> Option<bool> {
    if src == [0; 4] {
        count(CTR_SOCK_SRC_UNBOUND);
        return None;
    }
    let key = Key::new(
        160,
        SrcRange6Key {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr_be: src,
        },
    );
    Some(LB_SRCRNG6_V1.get(&key).is_some())
}

/// Schedulers `rr`/`wrr`: the frontend's cursor (the master entry's otherwise unused
/// `backend_id`), advanced by one. With BPF_FETCH atomics (5.12) this is one fetch-add,
/// so connects racing on several CPUs each take their own turn; without, a read and a
/// write, where a race can repeat a turn (the walk stays in the layout's order).
#[inline(always)]
fn next_in_turn(master: Option<*mut SvcValue>) -> u32 {
    let Some(m) = master else {
        return 0;
    };
    let cursor = unsafe { &raw mut (*m).backend_id };
    if crate::compat::atomic_fetch() {
        // Written as the instruction itself: the object is built for cpu v1, where LLVM
        // refuses to use an atomic add's result (and the bpf target has no AtomicU32);
        // the kernel accepts BPF_ATOMIC | BPF_FETCH from 5.12 whatever the cpu flag.
        let mut turn: u64 = 1;
        // Safety: `cursor` points into a map value, valid and aligned for this run.
        unsafe {
            core::arch::asm!(
                "w2 = atomic_fetch_add((u32 *)(r1 + 0), w2)",
                in("r1") cursor,
                inout("r2") turn,
                options(nostack),
            );
        }
        turn as u32
    } else {
        let now = unsafe { core::ptr::read_volatile(cursor) };
        unsafe { core::ptr::write_volatile(cursor, now.wrapping_add(1)) };
        now
    }
}

/// `lc`/`wlc`: a backend's load from the sock_ops program's counts (no entry: no
/// open connection); `None` when the backend entry is missing.
#[inline(always)]
fn backend_load(id: u32) -> Option<u64> {
    let b = LB_BACKENDS_V1.get_ptr(id)?;
    let key = ConnKey::of_backend(unsafe { &*b });
    Some(match LB_CONNS_V1.get_ptr(key) {
        Some(c) => {
            let (active, inactive) = unsafe { (*c).get() };
            lc_overhead(active, inactive)
        }
        None => 0,
    })
}

/// A frontend's slot entries, read by the lc scan and two choices: the master key with
/// another slot number.
trait SlotKey: Copy {
    fn slot_backend(&self, slot: u16) -> Option<u32>;
}

impl SlotKey for Svc4Key {
    #[inline(always)]
    fn slot_backend(&self, slot: u16) -> Option<u32> {
        let mut k = *self;
        k.slot = slot;
        LB_SVC4_V1.get_ptr(k).map(|v| unsafe { (*v).backend_id })
    }
}

impl SlotKey for Svc6Key {
    #[inline(always)]
    fn slot_backend(&self, slot: u16) -> Option<u32> {
        let mut k = *self;
        k.slot = slot;
        LB_SVC6_V1.get_ptr(k).map(|v| unsafe { (*v).backend_id })
    }
}

/// The connect hooks hand an `lc`/`wlc` frontend to the family's lc program. Called
/// in the program's main function: the verifier refuses a tail call in a subprogram
/// that does not return `int`. Returns only when there is no lc program to run.
#[inline(always)]
fn lc_hand_over<const LC: u8>(
    ctx: &SockAddrContext,
    progs: &ProgramArray,
    master: Option<*mut SvcValue>,
) {
    if LC != lc::TAIL_CALL || !crate::compat::lc_loop() {
        return;
    }
    if let Some(m) = master
        && unsafe { (*m).flags } & SVC_FLAG_SCHED_LC != 0
    {
        // Returns only when the array holds no program (no agent running).
        unsafe { progs.tail_call(ctx, 0) };
    }
}

/// The slot of an `lc`/`wlc` frontend's least loaded backend (see [`lc`]); `key` is
/// its master key, `count` its slots (≥ 1).
#[inline(always)]
fn lc_least<const LC: u8, K: SlotKey>(key: K, count: u32) -> Option<u16> {
    let seed = unsafe { bpf_get_prandom_u32() };
    if LC == lc::RANDOM {
        return select_slot(seed, count);
    }
    if count <= lc_max::<LC>()
        && let Some(state) = LB_LCSCAN.get_ptr(0)
    {
        // `lc_prescan` left the choice there at the start of this program.
        let slot = unsafe { core::ptr::addr_of!((*state).pick).read_volatile() };
        if slot >= 1 && u32::from(slot) <= count {
            return Some(slot);
        }
    }
    Some(lc_two_choices(count, seed, |s| key.slot_backend(s), backend_load).slot)
}

/// The lc programs: the exact scan over slots `1..=count` (`count ≤ LC_SCAN_MAX`) of
/// an `lc`/`wlc` frontend, run at the start of the program, before anything else
/// (source ranges, affinity, the choice), so that the verifier walks it from one
/// state and not once per path that leads to the choice. The choice waits in
/// `LB_LCSCAN` for [`lc_least`]; a frontend that turns out to need no choice (an
/// affinity hit) paid for a scan it did not use.
///
/// The state is kept in `LB_LCSCAN` between the steps (see there): each step reads it
/// back (volatile, so that the compiler keeps it in map memory and not in registers)
/// and writes it again, and the verifier's paths through a step meet in equal states.
/// Another connect on this CPU may run between two steps (a preempted program) and
/// overwrite the state: the choice is then another frontend's run; a slot outside
/// `1..=count` is not taken (two random choices instead), one inside is still this
/// frontend's backend, only not exactly the least loaded.
#[inline(always)]
fn lc_prescan<const LC: u8, K: SlotKey>(key: K, master: Option<*mut SvcValue>) {
    if LC != lc::SCAN && LC != lc::SCAN_LOOP {
        return;
    }
    let Some(m) = master else {
        return;
    };
    let (flags, count) = unsafe { ((*m).flags, (*m).count) };
    if flags & SVC_FLAG_SCHED_LC == 0 || count == 0 || count > lc_max::<LC>() {
        return;
    }
    let Some(state) = LB_LCSCAN.get_ptr_mut(0) else {
        return;
    };
    let seed = unsafe { bpf_get_prandom_u32() };
    let first = key.slot_backend(1);
    let scan = unsafe { core::ptr::addr_of_mut!((*state).scan) };
    unsafe { scan.write_volatile(LcScan::new(seed, first, backend_load)) };
    if LC == lc::SCAN_LOOP {
        let mut steps = LcSteps { key, scan };
        // Slots 2..=count. An error (none is expected for this count and no flags)
        // leaves the best of the slots read so far, still this frontend's.
        unsafe {
            bpf_loop(
                count - 1,
                lc_loop_step::<K> as *mut c_void,
                (&mut steps as *mut LcSteps<K>).cast(),
                0,
            )
        };
    } else {
        for slot in 2..=LC_SCAN_MAX as u16 {
            if u32::from(slot) > count {
                break;
            }
            lc_step(key, scan, slot);
        }
    }
    let mut s = unsafe { scan.read_volatile() };
    s.conclude(count);
    unsafe { core::ptr::addr_of_mut!((*state).pick).write_volatile(s.best_slot()) };
}

/// The most slots the lc program `LC` scans (0: none, it has no scan).
#[inline(always)]
const fn lc_max<const LC: u8>() -> u32 {
    match LC {
        lc::SCAN => LC_SCAN_MAX,
        lc::SCAN_LOOP => LC_LOOP_MAX,
        _ => 0,
    }
}

/// One step of the scan: slot `slot` (2, 3, … in order), the state read back from and
/// written to `LB_LCSCAN` (see [`lc_prescan`]).
#[inline(always)]
fn lc_step<K: SlotKey>(key: K, scan: *mut LcScan, slot: u16) {
    let id = key.slot_backend(slot);
    let mut s = unsafe { scan.read_volatile() };
    s.step(slot, id, backend_load);
    unsafe { scan.write_volatile(s) };
}

/// What the `bpf_loop` callback [`lc_loop_step`] needs, on the lc program's stack.
#[repr(C)]
struct LcSteps<K> {
    key: K,
    scan: *mut LcScan,
}

/// `bpf_loop` callback of the `svclb_lcloop4`/`6` programs: iteration `index` reads
/// slot `index + 2`. A function of its own (the verifier walks it as a callback with
/// an unknown index, until its states converge: the state in map memory makes that
/// quick); 0 continues the loop.
#[inline(never)]
extern "C" fn lc_loop_step<K: SlotKey>(index: u64, ctx: *mut c_void) -> i64 {
    let steps = ctx as *const LcSteps<K>;
    let (key, scan) = unsafe { ((*steps).key, (*steps).scan) };
    // index < count - 1 ≤ LC_LOOP_MAX - 1: the slot fits.
    lc_step(key, scan, (index as u16).wrapping_add(2));
    0
}

/// What [`xlate4`] decided; the caller writes the backend back in its socket's form.
enum Xlate4 {
    /// Not a Service: leave the address alone.
    Pass,
    /// Refused; the errno is set, return this verdict.
    Refused(i32),
    /// Rewrite the destination to this backend (address and port in network order).
    To(u32, u16),
}

#[inline(always)]
fn forward4<const LC: u8>(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let sa = ctx.sock_addr;
    let (addr_be, port_be, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    match xlate4::<LC>(ctx, addr_be, port_be, proto, sendmsg, &LB_LCPROG4, || {
        source4(ctx, sendmsg)
    }) {
        Xlate4::Pass => ALLOW,
        Xlate4::Refused(verdict) => verdict,
        Xlate4::To(be_addr, be_port) => {
            unsafe {
                (*sa).user_ip4 = be_addr;
                (*sa).user_port = u32::from(be_port);
            }
            ALLOW
        }
    }
}

/// The IPv4 decision, shared by AF_INET sockets and AF_INET6 sockets dialling an
/// IPv4-mapped address: choose the backend, remember the reverse translation (always
/// in the IPv4 map, whatever the socket's family, so that one entry serves the replies
/// whichever hook sees them), count.
/// `source` gives the client's source address (0: not known yet); it is read only for
/// a load-balancer IP with source ranges. `LC`: how an `lc`/`wlc` frontend is served
/// ([`lc`]); `lc_progs` the program array of the calling program's family (a tail call
/// needs the caller's attach type: connect6 hands a mapped address to `svclb_lc6`).
#[inline(always)]
fn xlate4<const LC: u8>(
    ctx: &SockAddrContext,
    addr_be: u32,
    port_be: u16,
    proto: u8,
    sendmsg: bool,
    lc_progs: &ProgramArray,
    source: impl FnOnce() -> u32,
) -> Xlate4 {
    let mut key = Svc4Key {
        addr_be,
        port_be,
        slot: 0,
        proto,
        scope: SCOPE_ALL,
        _pad: [0; 2],
    };
    // The decision is svc-lb-common's `choose_backend`, which `svc-lb trace` also runs.
    let mut client = Client {
        netns: 0,
        entry: core::ptr::null_mut(),
    };
    let master = LB_SVC4_V1.get_ptr_mut(key);
    lc_hand_over::<LC>(ctx, lc_progs, master);
    lc_prescan::<LC, _>(key, master);
    let lc_key = key;
    let choice = choose_backend(
        master.map(|m| unsafe { &*m }),
        |rev_nat_id| src_allowed4(source(), rev_nat_id),
        || unsafe { bpf_ktime_get_ns() },
        |rev_nat_id| remembered(ctx, &mut client, rev_nat_id),
        is_member,
        || unsafe { bpf_get_prandom_u32() },
        || next_in_turn(master),
        |count| lc_least::<LC, _>(lc_key, count),
        |slot| {
            key.slot = slot;
            LB_SVC4_V1.get_ptr(key).map(|v| unsafe { (*v).backend_id })
        },
        |id| LB_BACKENDS_V1.get_ptr(id),
    );
    let (be, backend_id, rev_nat_id) = match choice {
        Choice::NotService | Choice::SourceUnknown { .. } => return Xlate4::Pass,
        Choice::Refuse { reason, .. } => return Xlate4::Refused(refuse(reason)),
        Choice::Backend {
            backend,
            backend_id,
            rev_nat_id,
            sticky,
            ..
        } => {
            remember(&client, rev_nat_id, backend_id, sticky);
            (backend, backend_id, rev_nat_id)
        }
    };
    let (be_addr, be_port) = unsafe { ((*be).addr_be[0], (*be).port_be) };
    let connected_udp = !sendmsg && proto == PROTO_UDP;
    if !crate::rnat::remember4(
        ctx,
        be_addr,
        be_port,
        addr_be,
        port_be,
        rev_nat_id,
        connected_udp,
    ) {
        // Replies would show the backend address; the connection itself still works.
        count(CTR_SOCK_RNAT_UPDATE_FAIL);
    }
    count(CTR_SOCK_XLATED);
    count_conn(rev_nat_id, backend_id);
    if sendmsg {
        count_datagram(rev_nat_id, be);
    }
    Xlate4::To(be_addr, be_port)
}

#[inline(always)]
fn forward6<const LC: u8>(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let sa = ctx.sock_addr;
    // bpf_sock_addr accepts only 4-byte loads, so copy the address word by word.
    let addr_be = unsafe {
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    };
    let (port_be, proto) = unsafe { ((*sa).user_port as u16, (*sa).protocol as u8) };
    // `::ffff:a.b.c.d` from a dual-stack socket: an IPv4 Service. The kernel turns the
    // connection into an IPv4 one after this hook, so the backend is written back in
    // the mapped form too (connect6; sendmsg6 never sees a mapped address, the kernel
    // hands those datagrams to sendmsg4).
    if let Some(v4) = v4_mapped(&addr_be) {
        // The bound IPv4 source only: sendmsg6 never sees a mapped destination.
        let progs = &LB_LCPROG6;
        return match xlate4::<LC>(ctx, v4, port_be, proto, sendmsg, progs, || bound4(ctx)) {
            Xlate4::Pass => ALLOW,
            Xlate4::Refused(verdict) => verdict,
            Xlate4::To(be_addr, be_port) => {
                unsafe {
                    // Words 0..2 already hold the mapped prefix.
                    (*sa).user_ip6[3] = be_addr;
                    (*sa).user_port = u32::from(be_port);
                }
                ALLOW
            }
        };
    }
    let mut key = Svc6Key {
        addr_be,
        port_be,
        slot: 0,
        proto,
        scope: SCOPE_ALL,
        _pad: [0; 2],
    };
    // The decision is svc-lb-common's `choose_backend`, which `svc-lb trace` also runs.
    let mut client = Client {
        netns: 0,
        entry: core::ptr::null_mut(),
    };
    let master = LB_SVC6_V1.get_ptr_mut(key);
    lc_hand_over::<LC>(ctx, &LB_LCPROG6, master);
    lc_prescan::<LC, _>(key, master);
    let lc_key = key;
    let choice = choose_backend(
        master.map(|m| unsafe { &*m }),
        |rev_nat_id| src_allowed6(source6(ctx, sendmsg), rev_nat_id),
        || unsafe { bpf_ktime_get_ns() },
        |rev_nat_id| remembered(ctx, &mut client, rev_nat_id),
        is_member,
        || unsafe { bpf_get_prandom_u32() },
        || next_in_turn(master),
        |count| lc_least::<LC, _>(lc_key, count),
        |slot| {
            key.slot = slot;
            LB_SVC6_V1.get_ptr(key).map(|v| unsafe { (*v).backend_id })
        },
        |id| LB_BACKENDS_V1.get_ptr(id),
    );
    let (be, backend_id, rev_nat_id) = match choice {
        Choice::NotService | Choice::SourceUnknown { .. } => return ALLOW,
        Choice::Refuse { reason, .. } => return refuse(reason),
        Choice::Backend {
            backend,
            backend_id,
            rev_nat_id,
            sticky,
            ..
        } => {
            remember(&client, rev_nat_id, backend_id, sticky);
            (backend, backend_id, rev_nat_id)
        }
    };
    let (be_addr, be_port) = unsafe { ((*be).addr_be, (*be).port_be) };
    let connected_udp = !sendmsg && proto == PROTO_UDP;
    if !crate::rnat::remember6(
        ctx,
        be_addr,
        be_port,
        addr_be,
        port_be,
        rev_nat_id,
        connected_udp,
    ) {
        count(CTR_SOCK_RNAT_UPDATE_FAIL);
    }
    unsafe {
        (*sa).user_ip6[0] = be_addr[0];
        (*sa).user_ip6[1] = be_addr[1];
        (*sa).user_ip6[2] = be_addr[2];
        (*sa).user_ip6[3] = be_addr[3];
        (*sa).user_port = u32::from(be_port);
    }
    count(CTR_SOCK_XLATED);
    count_conn(rev_nat_id, backend_id);
    if sendmsg {
        count_datagram(rev_nat_id, be);
    }
    ALLOW
}

/// recvmsg/getpeername: show the Service address instead of the backend's. These
/// hooks cannot refuse, so every path returns ALLOW.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    crate::rnat::reverse(ctx, family);
    ALLOW
}
