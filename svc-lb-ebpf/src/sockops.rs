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
    lookup::v4_mapped,
};

use crate::maps::{LB_CONNS_V1, LB_SKRNATSK_V2};

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
fn atomic_add(field: *mut u64, v: u64) {
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

#[inline(always)]
fn connect(ctx: &SockOpsContext) {
    let Some((key, tag)) = peer(ctx) else {
        return;
    };
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // Without the create flag: a socket the connect hooks never translated has no
    // store and is not counted.
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
        return;
    }
    if unsafe { (*store).lookup(tag, &key.addr_be, key.port_be) }.is_none() {
        return;
    }
    // Flag first: a socket counted without the flag would never be taken off.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        return;
    }
    inc(&key, Class::Inactive);
}

#[inline(always)]
fn state(ctx: &SockOpsContext) {
    let (old, new) = (class(ctx.arg(0)), class(ctx.arg(1)));
    if old == new {
        return;
    }
    let Some((key, _)) = peer(ctx) else {
        return;
    };
    dec(&key, old);
    inc(&key, new);
}
