//! Active connection counts of the socket path (issue 15): a sock_ops program on the
//! socket programs' cgroup follows the TCP state of every socket that a connect hook
//! translated and keeps `LB_CONNS_V1` per backend address, as IPVS shows them:
//! `active` (ESTABLISHED) and `inactive` (every other state before the close).
//!
//! Every increment has exactly one decrement, without any per-socket record of what
//! was counted:
//! - `TCP_CONNECT_CB` (the SYN is about to leave, state SYN_SENT): a socket whose peer
//!   is a translation in its own reverse-NAT store (so it dialled a Service through the
//!   connect hook) gets the state callback flag and one `inactive`;
//! - `STATE_CB` (only for flagged sockets): the old state's class loses one and the new
//!   state's class gains one; the move to CLOSE only takes one away. A socket whose
//!   connect never got as far as the SYN is never flagged, so never counted.
//!
//! At `TCP_CONNECT_CB` the socket's (frontend, backend address) entry of
//! `LB_TRAFFIC_V1` is created (zeros) when missing, so that the pair is known while the
//! connection is open (`list` shows a draining backend under it).
//! At the move to CLOSE the socket's traffic (segments and payload bytes each way)
//! is added to `LB_TRAFFIC_V1` under its frontend (the rev-NAT id of its reverse-NAT
//! slot) and backend address (decision: live connections' traffic counts when they
//! close, not on a per-ACK callback, so that no packet of an open connection runs a
//! program for it).
//!
//! The key is the socket's peer address, which a connected TCP socket never changes,
//! so the decrement finds the entry the increment used. Adds are atomic (`lock xadd`):
//! sockets on every CPU change the same entry.
use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED,
    },
    helpers::generated::bpf_sk_storage_get,
    programs::SockOpsContext,
};
use svc_lb_common::{
    ConnCount, ConnKey, FAMILY_V4, FAMILY_V6, SK_RNAT_V4, SK_RNAT_V6, SockRevNatStore,
    TrafficCount, TrafficKey, lookup::v4_mapped, payload_bytes,
};

use crate::maps::{LB_CONNS_V1, LB_SKRNATSK_V2, LB_TRAFFIC_V1};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Which counter a TCP state belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    None,
    Active,
    Inactive,
}

#[inline(always)]
fn class(state: u32) -> Class {
    match state {
        BPF_TCP_ESTABLISHED => Class::Active,
        BPF_TCP_CLOSE => Class::None,
        _ => Class::Inactive,
    }
}

#[inline(always)]
pub fn handle(ctx: &SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => connect(ctx),
        BPF_SOCK_OPS_STATE_CB => state(ctx),
        _ => {}
    }
    // The reply of the callbacks used here is ignored by the kernel.
    1
}

/// The socket's peer as a counter key, with the reverse-NAT store's family tag.
#[inline(always)]
fn peer(ctx: &SockOpsContext) -> Option<(ConnKey, u8)> {
    // `remote_port` holds the port in network order in its upper 16 bits.
    let port_be = (ctx.remote_port() >> 16) as u16;
    let (addr_be, family, tag) = match ctx.family() {
        AF_INET => ([ctx.remote_ip4(), 0, 0, 0], FAMILY_V4, SK_RNAT_V4),
        AF_INET6 => {
            let a = ctx.remote_ip6();
            // A dual-stack socket's IPv4 peer: the connect hook recorded it as IPv4.
            match v4_mapped(&a) {
                Some(v4) => ([v4, 0, 0, 0], FAMILY_V4, SK_RNAT_V4),
                None => (a, FAMILY_V6, SK_RNAT_V6),
            }
        }
        _ => return None,
    };
    Some((
        ConnKey {
            addr_be,
            port_be,
            family,
            _pad: 0,
        },
        tag,
    ))
}

/// One atomic add to a counter in map memory (a decrement adds `u64::MAX`). The
/// instruction is written out: the object is built for cpu v1, where this (BPF_XADD,
/// no fetch) is the atomic the kernel has accepted since 4.x.
#[inline(always)]
pub(crate) fn atomic_add(field: *mut u64, v: u64) {
    // Safety: `field` points into a map value, valid and 8-byte aligned for this run.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)(r1 + 0) += r2",
            in("r1") field,
            in("r2") v,
            options(nostack),
        );
    }
}

#[inline(always)]
fn field(c: *mut ConnCount, class: Class) -> Option<*mut u64> {
    match class {
        Class::Active => Some(unsafe { &raw mut (*c).active }),
        Class::Inactive => Some(unsafe { &raw mut (*c).inactive }),
        Class::None => None,
    }
}

/// Adds one to `class` of `key`, creating the entry on first use.
#[inline(always)]
fn inc(key: &ConnKey, class: Class) {
    if class == Class::None {
        return;
    }
    let mut c = LB_CONNS_V1.get_ptr_mut(key);
    if c.is_none() {
        // Another CPU may create it first: then the lookup below finds theirs.
        let _ = LB_CONNS_V1.insert(
            key,
            ConnCount {
                active: 0,
                inactive: 0,
            },
            u64::from(BPF_NOEXIST),
        );
        c = LB_CONNS_V1.get_ptr_mut(key);
    }
    if let Some(c) = c
        && let Some(f) = field(c, class)
    {
        atomic_add(f, 1);
    }
}

/// Takes one from `class` of `key`. An entry the agent deleted meanwhile (its backend
/// left and the count read 0) is not created again.
#[inline(always)]
fn dec(key: &ConnKey, class: Class) {
    if let Some(c) = LB_CONNS_V1.get_ptr_mut(key)
        && let Some(f) = field(c, class)
    {
        atomic_add(f, u64::MAX);
    }
}

/// The rev-NAT id of the socket's translation to `key`, when the connect hook made
/// one (the socket's own reverse-NAT store; read without the create flag, so a socket
/// the connect hooks never translated gets no store).
#[inline(always)]
fn translated(ctx: &SockOpsContext, key: &ConnKey, tag: u8) -> Option<u32> {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let store = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&LB_SKRNATSK_V2).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockRevNatStore>();
    if store.is_null() {
        return None;
    }
    unsafe { (*store).lookup(tag, &key.addr_be, key.port_be) }.map(|s| s.rev_nat_id)
}

#[inline(always)]
fn connect(ctx: &SockOpsContext) {
    let Some((key, tag)) = peer(ctx) else {
        return;
    };
    let Some(rev_nat_id) = translated(ctx, &key, tag) else {
        return;
    };
    // Flag first: a socket counted without the flag would never be taken off.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        return;
    }
    inc(&key, Class::Inactive);
    // The (frontend, backend) entry exists from the first connect on, not only after a
    // close: it is how `list` knows which frontends a draining backend (weight 0: named
    // by no slot) still has connections from. One lookup per new connection; the entry
    // is the one `closed` adds to, so no key is made that would not be made anyway.
    let pair = TrafficKey {
        rev_nat_id,
        backend: key,
    };
    if LB_TRAFFIC_V1.get_ptr(&pair).is_none() {
        let _ = LB_TRAFFIC_V1.insert(&pair, TrafficCount::default(), u64::from(BPF_NOEXIST));
    }
}

#[inline(always)]
fn state(ctx: &SockOpsContext) {
    let (last, next) = (ctx.arg(0), ctx.arg(1));
    let (old, new) = (class(last), class(next));
    if old == new {
        return;
    }
    let Some((key, tag)) = peer(ctx) else {
        return;
    };
    dec(&key, old);
    inc(&key, new);
    if next == BPF_TCP_CLOSE {
        closed(ctx, key, tag, last);
    }
}

/// Adds a closing socket's traffic to its (frontend, backend) entry.
#[inline(always)]
fn closed(ctx: &SockOpsContext, backend: ConnKey, tag: u8, last: u32) {
    let Some(rev_nat_id) = translated(ctx, &backend, tag) else {
        return;
    };
    // The state callback runs on a full socket, where the TCP fields read true. Each
    // field is one volatile load of its own size: the kernel checks the size of every
    // context access, and the compiler may otherwise merge neighbouring fields.
    let ops = ctx.ops;
    let (acked, received, una, nxt, segs_in, segs_out) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ops).bytes_acked),
            core::ptr::read_volatile(&raw const (*ops).bytes_received),
            core::ptr::read_volatile(&raw const (*ops).snd_una),
            core::ptr::read_volatile(&raw const (*ops).snd_nxt),
            core::ptr::read_volatile(&raw const (*ops).segs_in),
            core::ptr::read_volatile(&raw const (*ops).segs_out),
        )
    };
    let (bytes_in, bytes_out) = payload_bytes(acked, received, last, una, nxt);
    let add = TrafficCount {
        closed: 1,
        packets_in: u64::from(segs_out),
        packets_out: u64::from(segs_in),
        bytes_in,
        bytes_out,
    };
    let key = TrafficKey {
        rev_nat_id,
        backend,
    };
    let mut t = LB_TRAFFIC_V1.get_ptr_mut(&key);
    if t.is_none() {
        // Another CPU may create it first: then the lookup below finds theirs. A full
        // map leaves this connection uncounted.
        let _ = LB_TRAFFIC_V1.insert(&key, TrafficCount::default(), u64::from(BPF_NOEXIST));
        t = LB_TRAFFIC_V1.get_ptr_mut(&key);
    }
    if let Some(t) = t {
        unsafe {
            atomic_add(&raw mut (*t).closed, add.closed);
            atomic_add(&raw mut (*t).packets_in, add.packets_in);
            atomic_add(&raw mut (*t).packets_out, add.packets_out);
            atomic_add(&raw mut (*t).bytes_in, add.bytes_in);
            atomic_add(&raw mut (*t).bytes_out, add.bytes_out);
        }
    }
}
