//! Socket reverse NAT: what connect/sendmsg remember about a translation, so that
//! recvmsg and getpeername can show the Service address instead of the backend's.
//!
//! Two stores, chosen at load time (`compat::sk_storage`):
//! - socket-local storage (`LB_SKRNATSK_V2`): each socket holds its own few
//!   translations ([`SockRevNatStore`]), freed with the socket. Nothing global is
//!   written per connect, and no other socket's churn can push an entry out;
//! - the fallback, LRU maps keyed by (socket cookie, backend) (`LB_SKRNAT4_V1`,
//!   `LB_SKRNAT6_V1`): shared by every socket on the node, so a burst of new sockets
//!   anywhere can evict the entry of a socket still waiting for its reply.
//!
//! With socket storage, a connected UDP socket is also recorded in the LRU maps, for
//! the agent's socket termination only (`svc-lb/src/datapath/sockterm.rs`): the kernel's
//! sock_diag reports socket storage for TCP sockets but not for UDP ones. Nothing on the
//! reply path reads that entry, so its eviction costs at most one missed destroy, and
//! unconnected sends (the churn a pod can make cheaply) and TCP connects never write it.
//!
//! IPv4 translations are kept as IPv4 whatever the socket's family (an AF_INET6 socket
//! dialling `::ffff:a.b.c.d`), so one entry serves the replies whichever hook sees them.
use aya_ebpf::{helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use svc_lb_common::{
    CTR_SOCK_RNAT_HIT, SK_RNAT_V4, SK_RNAT_V6, SockRevNat4Key, SockRevNat4Value, SockRevNat6Key,
    SockRevNat6Value, SockRevNatSlot, lookup::v4_mapped,
};

use crate::{
    compat,
    maps::{LB_SKRNAT4_V1, LB_SKRNAT6_V1, LB_SKRNATSK_V1, LB_SKRNATSK_V2},
    sock::{Family, count},
};

/// Remembers that the socket's datagrams to `backend_be:backend_port_be` were meant
/// for `service_be:service_port_be` (IPv4). `false`: nothing could be stored for the
/// replies (they will show the backend address; the connection itself works).
/// `connected_udp`: a connected UDP socket, which socket termination finds through the
/// LRU maps only.
#[inline(always)]
pub fn remember4(
    ctx: &SockAddrContext,
    backend_be: u32,
    backend_port_be: u16,
    service_be: u32,
    service_port_be: u16,
    rev_nat_id: u32,
    connected_udp: bool,
) -> bool {
    let sk = compat::sk_storage();
    let stored = sk
        && remember_sk(
            ctx,
            SockRevNatSlot {
                backend_be: [backend_be, 0, 0, 0],
                service_be: [service_be, 0, 0, 0],
                backend_port_be,
                service_port_be,
                family: SK_RNAT_V4,
                _pad: [0; 3],
                rev_nat_id,
            },
        );
    if sk && !connected_udp {
        return stored;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockRevNat4Key {
        cookie,
        addr_be: backend_be,
        port_be: backend_port_be,
        _pad: 0,
    };
    let value = SockRevNat4Value {
        addr_be: service_be,
        port_be: service_port_be,
        _pad: 0,
        rev_nat_id,
    };
    let indexed = LB_SKRNAT4_V1.insert(key, value, 0).is_ok();
    // With socket storage the replies need only the storage.
    if sk { stored } else { indexed }
}

/// [`remember4`] for IPv6.
#[inline(always)]
pub fn remember6(
    ctx: &SockAddrContext,
    backend_be: [u32; 4],
    backend_port_be: u16,
    service_be: [u32; 4],
    service_port_be: u16,
    rev_nat_id: u32,
    connected_udp: bool,
) -> bool {
    let sk = compat::sk_storage();
    let stored = sk
        && remember_sk(
            ctx,
            SockRevNatSlot {
                backend_be,
                service_be,
                backend_port_be,
                service_port_be,
                family: SK_RNAT_V6,
                _pad: [0; 3],
                rev_nat_id,
            },
        );
    if sk && !connected_udp {
        return stored;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockRevNat6Key {
        cookie,
        addr_be: backend_be,
        port_be: backend_port_be,
        _pad: [0; 3],
    };
    let value = SockRevNat6Value {
        addr_be: service_be,
        port_be: service_port_be,
        _pad: 0,
        rev_nat_id,
    };
    let indexed = LB_SKRNAT6_V1.insert(key, value, 0).is_ok();
    if sk { stored } else { indexed }
}

#[inline(always)]
fn remember_sk(ctx: &SockAddrContext, slot: SockRevNatSlot) -> bool {
    // Created zeroed on the socket's first translation (all slots empty).
    let st = unsafe { LB_SKRNATSK_V2.get_or_insert_ptr_mut(ctx, None) };
    if st.is_null() {
        return false;
    }
    // Two threads sending on one socket at once may interleave here; the worst case is
    // one of this socket's own slots holding a mix of the two, never another socket's.
    unsafe { (*st).record(slot) };
    true
}

/// The Service address (words, port) that replies from `backend` on this socket
/// should show.
#[inline(always)]
fn lookup(
    ctx: &SockAddrContext,
    family: u8,
    backend_be: [u32; 4],
    port_be: u16,
) -> Option<([u32; 4], u16)> {
    if compat::sk_storage() {
        // Without the create flag: a socket that never dialled a Service has no store.
        let st = unsafe { LB_SKRNATSK_V2.get_ptr_mut(ctx) };
        if !st.is_null()
            && let Some(s) = unsafe { (*st).lookup(family, &backend_be, port_be) }
        {
            return Some((s.service_be, s.service_port_be));
        }
        if !compat::sk_rnat_v1() {
            return None;
        }
        // A socket that dialled its Service before the upgrade to V2.
        let old = unsafe { LB_SKRNATSK_V1.get_ptr_mut(ctx) };
        if old.is_null() {
            return None;
        }
        return unsafe { (*old).lookup(family, &backend_be, port_be) }
            .map(|s| (s.service_be, s.service_port_be));
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if family == SK_RNAT_V4 {
        let key = SockRevNat4Key {
            cookie,
            addr_be: backend_be[0],
            port_be,
            _pad: 0,
        };
        LB_SKRNAT4_V1
            .get_ptr(key)
            .map(|v| unsafe { ([(*v).addr_be, 0, 0, 0], (*v).port_be) })
    } else {
        let key = SockRevNat6Key {
            cookie,
            addr_be: backend_be,
            port_be,
            _pad: [0; 3],
        };
        LB_SKRNAT6_V1
            .get_ptr(key)
            .map(|v| unsafe { ((*v).addr_be, (*v).port_be) })
    }
}

/// recvmsg/getpeername: rewrites the peer address from a backend to its Service.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: Family) {
    let sa = ctx.sock_addr;
    match family {
        Family::V4 => {
            let (addr_be, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
            if let Some((svc, svc_port)) = lookup(ctx, SK_RNAT_V4, [addr_be, 0, 0, 0], port_be) {
                unsafe {
                    (*sa).user_ip4 = svc[0];
                    (*sa).user_port = u32::from(svc_port);
                }
                count(CTR_SOCK_RNAT_HIT);
            }
        }
        Family::V6 => {
            let (addr_be, port_be) = unsafe {
                (
                    [
                        (*sa).user_ip6[0],
                        (*sa).user_ip6[1],
                        (*sa).user_ip6[2],
                        (*sa).user_ip6[3],
                    ],
                    (*sa).user_port as u16,
                )
            };
            // A dual-stack socket's IPv4 peer (`::ffff:backend`): an IPv4 translation,
            // and the Service address goes back in the mapped form.
            if let Some(v4) = v4_mapped(&addr_be) {
                if let Some((svc, svc_port)) = lookup(ctx, SK_RNAT_V4, [v4, 0, 0, 0], port_be) {
                    unsafe {
                        // Words 0..2 already hold the mapped prefix.
                        (*sa).user_ip6[3] = svc[0];
                        (*sa).user_port = u32::from(svc_port);
                    }
                    count(CTR_SOCK_RNAT_HIT);
                }
                return;
            }
            if let Some((svc, svc_port)) = lookup(ctx, SK_RNAT_V6, addr_be, port_be) {
                unsafe {
                    (*sa).user_ip6[0] = svc[0];
                    (*sa).user_ip6[1] = svc[1];
                    (*sa).user_ip6[2] = svc[2];
                    (*sa).user_ip6[3] = svc[3];
                    (*sa).user_port = u32::from(svc_port);
                }
                count(CTR_SOCK_RNAT_HIT);
            }
        }
    }
}
