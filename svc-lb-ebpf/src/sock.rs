//! Socket-level load balancing: rewrite the destination a local process dials (connect,
//! unconnected sendmsg) from a Service address to a backend, and make replies and
//! getpeername show the Service address again.
//!
//! Fail open: an address that is not a Service passes untouched. A Service with no
//! usable backend refuses with ECONNREFUSED, as kube-proxy's REJECT rule does.
use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use svc_lb_common::{
    CTR_SOCK_BACKEND_MISS, CTR_SOCK_NO_BACKEND, CTR_SOCK_RNAT_HIT, CTR_SOCK_RNAT_UPDATE_FAIL,
    CTR_SOCK_SLOT_MISS, CTR_SOCK_XLATED, SCOPE_ALL, SockRevNat4Key, SockRevNat4Value,
    SockRevNat6Key, SockRevNat6Value, Svc4Key, Svc6Key, SvcValue, select_slot,
};

use crate::maps::{
    LB_BACKENDS_V1, LB_BESTATS_V1, LB_COUNTERS_V1, LB_FESTATS_V1, LB_SKRNAT4_V1, LB_SKRNAT6_V1,
    LB_SVC4_V1, LB_SVC6_V1,
};

const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[derive(Clone, Copy)]
pub enum Family {
    V4,
    V6,
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = LB_COUNTERS_V1.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *c += 1 };
    }
}

/// Counts one new connection (or unconnected datagram) for a frontend and a backend.
#[inline(always)]
fn count_conn(rev_nat_id: u32, backend_id: u32) {
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

#[inline(always)]
fn refuse(reason: u32) -> i32 {
    count(reason);
    // Without this the syscall would fail with EPERM; kube-proxy's REJECT gives
    // ECONNREFUSED and clients treat the two differently.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// What the frontend lookup found for one connection.
enum Choice {
    NotService,
    Refuse(u32),
    Backend { backend_id: u32, rev_nat_id: u32 },
}

/// Master-slot lookup, then one random slot. No loop over backends: O(1).
#[inline(always)]
fn choose(
    master: Option<*const SvcValue>,
    mut slot_of: impl FnMut(u16) -> Option<*const SvcValue>,
) -> Choice {
    let Some(master) = master else {
        return Choice::NotService;
    };
    let (count, rev_nat_id) = unsafe { ((*master).count, (*master).rev_nat_id) };
    let Some(slot) = select_slot(unsafe { bpf_get_prandom_u32() }, count) else {
        return Choice::Refuse(CTR_SOCK_NO_BACKEND);
    };
    match slot_of(slot) {
        Some(v) => Choice::Backend {
            backend_id: unsafe { (*v).backend_id },
            rev_nat_id,
        },
        // The planner writes slots before the master count, so this means a bug or a
        // map edited by hand; refusing is safer than sending to the Service address.
        None => Choice::Refuse(CTR_SOCK_SLOT_MISS),
    }
}

#[inline(always)]
pub fn forward(ctx: &SockAddrContext, family: Family) -> i32 {
    match family {
        Family::V4 => forward4(ctx),
        Family::V6 => forward6(ctx),
    }
}

#[inline(always)]
fn forward4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (addr_be, port_be, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    let mut key = Svc4Key {
        addr_be,
        port_be,
        slot: 0,
        proto,
        scope: SCOPE_ALL,
        _pad: [0; 2],
    };
    let master = LB_SVC4_V1.get_ptr(key);
    let choice = choose(master, |slot| {
        key.slot = slot;
        LB_SVC4_V1.get_ptr(key)
    });
    let (backend_id, rev_nat_id) = match choice {
        Choice::NotService => return ALLOW,
        Choice::Refuse(reason) => return refuse(reason),
        Choice::Backend {
            backend_id,
            rev_nat_id,
        } => (backend_id, rev_nat_id),
    };
    let Some(be) = LB_BACKENDS_V1.get_ptr(backend_id) else {
        return refuse(CTR_SOCK_BACKEND_MISS);
    };
    let (be_addr, be_port) = unsafe { ((*be).addr_be[0], (*be).port_be) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rkey = SockRevNat4Key {
        cookie,
        addr_be: be_addr,
        port_be: be_port,
        _pad: 0,
    };
    let rval = SockRevNat4Value {
        addr_be,
        port_be,
        _pad: 0,
        rev_nat_id,
    };
    if LB_SKRNAT4_V1.insert(rkey, rval, 0).is_err() {
        // Replies would show the backend address; the connection itself still works.
        count(CTR_SOCK_RNAT_UPDATE_FAIL);
    }
    unsafe {
        (*sa).user_ip4 = be_addr;
        (*sa).user_port = u32::from(be_port);
    }
    count(CTR_SOCK_XLATED);
    count_conn(rev_nat_id, backend_id);
    ALLOW
}

#[inline(always)]
fn forward6(ctx: &SockAddrContext) -> i32 {
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
    let mut key = Svc6Key {
        addr_be,
        port_be,
        slot: 0,
        proto,
        scope: SCOPE_ALL,
        _pad: [0; 2],
    };
    let master = LB_SVC6_V1.get_ptr(key);
    let choice = choose(master, |slot| {
        key.slot = slot;
        LB_SVC6_V1.get_ptr(key)
    });
    let (backend_id, rev_nat_id) = match choice {
        Choice::NotService => return ALLOW,
        Choice::Refuse(reason) => return refuse(reason),
        Choice::Backend {
            backend_id,
            rev_nat_id,
        } => (backend_id, rev_nat_id),
    };
    let Some(be) = LB_BACKENDS_V1.get_ptr(backend_id) else {
        return refuse(CTR_SOCK_BACKEND_MISS);
    };
    let (be_addr, be_port) = unsafe { ((*be).addr_be, (*be).port_be) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rkey = SockRevNat6Key {
        cookie,
        addr_be: be_addr,
        port_be: be_port,
        _pad: [0; 3],
    };
    let rval = SockRevNat6Value {
        addr_be,
        port_be,
        _pad: 0,
        rev_nat_id,
    };
    if LB_SKRNAT6_V1.insert(rkey, rval, 0).is_err() {
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
    ALLOW
}

/// recvmsg/getpeername: show the Service address instead of the backend's. These
/// hooks cannot refuse, so every path returns ALLOW.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    let sa = ctx.sock_addr;
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    match family {
        Family::V4 => {
            let key = unsafe {
                SockRevNat4Key {
                    cookie,
                    addr_be: (*sa).user_ip4,
                    port_be: (*sa).user_port as u16,
                    _pad: 0,
                }
            };
            if let Some(v) = LB_SKRNAT4_V1.get_ptr(key) {
                unsafe {
                    (*sa).user_ip4 = (*v).addr_be;
                    (*sa).user_port = u32::from((*v).port_be);
                }
                count(CTR_SOCK_RNAT_HIT);
            }
        }
        Family::V6 => {
            let key = unsafe {
                SockRevNat6Key {
                    cookie,
                    addr_be: [
                        (*sa).user_ip6[0],
                        (*sa).user_ip6[1],
                        (*sa).user_ip6[2],
                        (*sa).user_ip6[3],
                    ],
                    port_be: (*sa).user_port as u16,
                    _pad: [0; 3],
                }
            };
            if let Some(v) = LB_SKRNAT6_V1.get_ptr(key) {
                unsafe {
                    let a = (*v).addr_be;
                    (*sa).user_ip6[0] = a[0];
                    (*sa).user_ip6[1] = a[1];
                    (*sa).user_ip6[2] = a[2];
                    (*sa).user_ip6[3] = a[3];
                    (*sa).user_port = u32::from((*v).port_be);
                }
                count(CTR_SOCK_RNAT_HIT);
            }
        }
    }
    ALLOW
}
