//! The external path's decisions, shared by tc (`tc.rs`) and XDP (`xdp.rs`): conntrack,
//! backend choice (svc-lb-common's `choose_external`, which `svc-lb trace` also runs),
//! DNAT/SNAT, reverse NAT of replies, and the reject.
//!
//! A flow has two conntrack entries (`LB_CT_V2`):
//! - forward, keyed by the client's packet (client → frontend): backend and SNAT source;
//! - reply, keyed by the backend's answer as it reaches this node: backend → client
//!   (local backend, translated at tc egress) or backend → node SNAT address:port
//!   (remote backend, translated at tc ingress).
//!
//! Every packet of a flow refreshes its entry's lifetime (`CT_*_TIMEOUT_S`) and, once
//! per `CT_REFRESH_WINDOW_NS` window or when it changes the entry's flags, the flow's
//! other entry (svc-lb-common explains the window); a TCP flow is half-open
//! (`CT_TCP_SYN_TIMEOUT_S`, extended only by the client's packets) until the handshake
//! completes (`CT_FLAG_ESTABLISHED`); a TCP FIN or RST shortens it to
//! `CT_TCP_CLOSE_TIMEOUT_S` (`CT_FLAG_CLOSING`). An expired entry is ignored, so the
//! next packet starts a new flow, and its SNAT port can be claimed by another.
//!
//! Each entry counts the packets and bytes of its direction (`CtEntry`, issue 15): the
//! forward entry the client's packets, the reply entry the backend's. Only the packet
//! the entry translates counts; the other entry of the flow is only kept alive.
// Keys and values in the per-CPU scratch map are passed by reference on purpose: by
// value they would be copied onto the 512-byte stack, which is what the scratch avoids.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::lpm_trie::Key, helpers::bpf_get_prandom_u32};
use svc_lb_common::{
    AffinityExtKey, AffinityMatchKey, AffinityValue, BACKEND_FLAG_LOCAL, CT_DIR_FORWARD,
    CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT,
    CT_REFRESH_WINDOW_SHIFT, CT_TCP_CLOSE_TIMEOUT_S, CT_TCP_SYN_TIMEOUT_S, CT_TCP_TIMEOUT_S,
    CT_UDP_TIMEOUT_S, CTR_EXT_AFF_HIT, CTR_EXT_AFF_UPDATE_FAIL, CTR_EXT_BACKEND_GONE,
    CTR_EXT_BACKEND_MISSING, CTR_EXT_CT_CLOSING, CTR_EXT_CT_HIT, CTR_EXT_CT_UPDATE_FAIL,
    CTR_EXT_FORWARDED, CTR_EXT_MAGLEV_MISSING, CTR_EXT_NO_SNAT_ADDR, CTR_EXT_REJECT_FAILED,
    CTR_EXT_REJECT_RATE_LIMITED, CTR_EXT_REPLY_XLATED, CTR_EXT_REWRITE_FAIL,
    CTR_EXT_SNAT_PORT_EXHAUSTED, CTR_EXT_XDP_REJECT_TO_TC, CtEntry, CtKey, CtValue, ExtChoice,
    ExtVia, FAMILY_V4, MAGLEV_TABLE_MAX, NodeAddrKey, PROTO_TCP, SCOPE_ALL, SCOPE_EXTERNAL,
    SNAT_PORT_TRIES, SVC_FLAG_EXT_LOCAL, SrcRange4Key, SrcRange6Key, Stickiness, Svc4Key, Svc6Key,
    SvcValue, choose_external, lookup::snat_port, maglev::flow_hash,
};

use crate::{
    compat,
    maps::{
        LB_AFFEXT_V1, LB_AFFMATCH_V1, LB_BACKENDS_V1, LB_CONFIG_V1, LB_CT_V2, LB_MAGLEV_V1,
        LB_NODEADDR_V1, LB_SCRATCH, LB_SRCRNG4_V1, LB_SRCRNG6_V1, LB_SVC4_V1, LB_SVC6_V1,
    },
    nat::{Rewrite, rewrite},
    parse::{ETH_HLEN, Flow, TCP_FIN, TCP_RST, TCP_SYN},
    pkt::Pkt,
    reject,
    sock::{count, count_conn},
};

/// What the wrapper does with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Untouched: continue into the stack.
    Pass,
    /// Rewritten in place (NAT or reverse NAT): continue into the stack.
    Translated,
    /// Rewritten in place for a SNAT flow (the client's packet towards a backend on
    /// another node, or its reply back to the client): the node forwards it with one of
    /// its own addresses on one side. tc sends it out itself (FIB lookup + redirect),
    /// because the stack's forwarding drops it as martian (accept_local=0); XDP passes it
    /// into the stack like `Translated`.
    TranslatedSnat,
    Drop,
    /// The packet was replaced by an ICMP error: send it back out the same device.
    Reject,
}

const SEC: u64 = 1_000_000_000;

/// 1: `--route-cluster-ips`: a packet from outside the node to an address with no
/// external frontend is looked up among the `SCOPE_ALL` frontends too (cluster IPs that
/// routers send to the node). Read-only data: with 0 the verifier drops the lookup.
#[unsafe(no_mangle)]
static SVCLB_ROUTE_CLUSTER_IPS: aya_ebpf::Global<u8> = aya_ebpf::Global::new(0);

#[inline(always)]
fn ct_key(f: &Flow, dir: u8) -> CtKey {
    CtKey {
        saddr_be: f.saddr,
        daddr_be: f.daddr,
        sport_be: f.sport,
        dport_be: f.dport,
        proto: f.proto,
        family: f.family,
        dir,
        _pad: 0,
    }
}

/// Lifetime of an entry after this packet and the entry's flags after it (`flags`
/// already holds what the packet adds). TCP is half-open (`CT_TCP_SYN_TIMEOUT_S`) until
/// a packet without SYN follows the backend's answer (the client's handshake ACK, or
/// anything later): a flood of spoofed SYNs, whose SYN-ACKs go nowhere, never gets the
/// established lifetime, and neither does a flow opened by a stray ACK.
#[inline(always)]
fn lifetime(f: &Flow, flags: u8) -> (u64, u8) {
    if f.proto != PROTO_TCP {
        return (CT_UDP_TIMEOUT_S * SEC, flags);
    }
    if flags & CT_FLAG_CLOSING != 0 || f.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        return (CT_TCP_CLOSE_TIMEOUT_S * SEC, flags | CT_FLAG_CLOSING);
    }
    if flags & CT_FLAG_ESTABLISHED != 0
        || (f.tcp_flags & TCP_SYN == 0 && flags & CT_FLAG_SEEN_REPLY != 0)
    {
        return (CT_TCP_TIMEOUT_S * SEC, flags | CT_FLAG_ESTABLISHED);
    }
    (CT_TCP_SYN_TIMEOUT_S * SEC, flags)
}

/// Refreshes an entry for one more packet of its flow. `extra_flags` holding
/// `CT_FLAG_SEEN_REPLY` marks the backend's packet (both entries of the flow learn that
/// it answered); a backend's packet does not extend a half-open TCP entry, so that its
/// SYN-ACK retransmissions to a client that never answers (a spoofed source) let the
/// entry and its SNAT port go after `CT_TCP_SYN_TIMEOUT_S`.
#[inline(always)]
fn refresh(v: *mut CtValue, f: &Flow, now: u64, extra_flags: u8) {
    let flags = unsafe { (*v).flags };
    let (life, new_flags) = lifetime(f, flags | extra_flags);
    if new_flags & CT_FLAG_CLOSING != 0 && flags & CT_FLAG_CLOSING == 0 {
        count(CTR_EXT_CT_CLOSING);
    }
    let half_open_reply = f.proto == PROTO_TCP
        && extra_flags & CT_FLAG_SEEN_REPLY != 0
        && new_flags & (CT_FLAG_ESTABLISHED | CT_FLAG_CLOSING) == 0;
    unsafe {
        if !half_open_reply {
            (*v).expires_ns = now + life;
        }
        if new_flags != flags {
            (*v).flags = new_flags;
        }
    }
}

/// The conntrack value of an entry (its first field).
#[inline(always)]
fn val(e: *mut CtEntry) -> *mut CtValue {
    e.cast()
}

/// The packet's IP length (header included): what an entry's `bytes` counts. 0 when
/// the length field cannot be read (the parser already read past it, so never).
#[inline(always)]
fn ip_len<C: Pkt>(c: &C, f: &Flow) -> u64 {
    if f.family == FAMILY_V4 {
        c.load::<u16>(ETH_HLEN + 2)
            .map_or(0, |l| u64::from(u16::from_be(l)))
    } else {
        // IPv6 payload length, without the fixed header.
        c.load::<u16>(ETH_HLEN + 4)
            .map_or(0, |l| u64::from(u16::from_be(l)) + 40)
    }
}

/// Counts one packet of `len` bytes in entry `e` (see `CtEntry` for why plain adds).
#[inline(always)]
fn account(e: *mut CtEntry, len: u64) {
    unsafe {
        (*e).packets += 1;
        (*e).bytes += len;
    }
}

#[inline(always)]
fn apply<C: Pkt>(c: &C, f: &Flow, to: &Rewrite, snat: bool) -> Verdict {
    if !rewrite(c, f, to) {
        count(CTR_EXT_REWRITE_FAIL);
        Verdict::Drop
    } else if snat {
        Verdict::TranslatedSnat
    } else {
        Verdict::Translated
    }
}

// ---- reply direction (tc only) ----

/// Reverse NAT of a backend's reply. `snat`: tc ingress handles replies to SNATed flows
/// (backend → node:port, restored to frontend → client); tc egress handles replies of
/// local backends (backend → client, source restored to the frontend). `None`: not a
/// reply this direction translates.
///
/// Not inlined (here and in [`forward`]): as separate BPF functions the reply and the
/// forward path each get their own stack frame instead of adding up in one 512-byte
/// frame.
#[inline(never)]
pub fn reply<C: Pkt>(c: &C, f: &Flow, snat: bool) -> Option<Verdict> {
    let e = LB_CT_V2.get_ptr_mut(ct_key(f, CT_DIR_REPLY))?;
    let v = val(e);
    let now = compat::ext_now_ns();
    let (expires, flags, nat_addr, nat_port, client_addr, client_port) = unsafe {
        (
            (*v).expires_ns,
            (*v).flags,
            (*v).nat_addr_be,
            (*v).nat_port_be,
            (*v).snat_addr_be,
            (*v).snat_port_be,
        )
    };
    if expires <= now || (flags & CT_FLAG_SNAT != 0) != snat {
        return None;
    }
    refresh(v, f, now, CT_FLAG_SEEN_REPLY);
    account(e, ip_len(c, f));
    // Keep the forward entry alive while the backend answers (a server-push flow), and
    // let it learn the flags this packet added. Like the reply entry from the client's
    // side (see [`established`]): only when this packet changed the reply entry's
    // flags or moved its expiry into another `CT_REFRESH_WINDOW_NS` window.
    let (new_expires, new_flags) = unsafe { ((*v).expires_ns, (*v).flags) };
    if (new_flags != flags || window_moved(expires, new_expires))
        && let Some(s) = LB_SCRATCH.get_ptr_mut(0)
    {
        // SAFETY: per-CPU scratch, only this program run uses it.
        let s = unsafe { &mut *s };
        s.fkey = CtKey {
            saddr_be: if snat { client_addr } else { f.daddr },
            daddr_be: nat_addr,
            sport_be: if snat { client_port } else { f.dport },
            dport_be: nat_port,
            proto: f.proto,
            family: f.family,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        if let Some(fwd) = LB_CT_V2.get_ptr_mut(&s.fkey) {
            refresh(val(fwd), f, now, CT_FLAG_SEEN_REPLY);
        }
    }
    let to = if snat {
        Rewrite {
            saddr: nat_addr,
            sport: nat_port,
            daddr: client_addr,
            dport: client_port,
        }
    } else {
        Rewrite {
            saddr: nat_addr,
            sport: nat_port,
            daddr: f.daddr,
            dport: f.dport,
        }
    };
    count(CTR_EXT_REPLY_XLATED);
    Some(apply(c, f, &to, snat))
}

// ---- forward direction (tc ingress and XDP) ----

/// Which clients a forward decision serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Clients outside the node (tc/XDP on `--devices`): `SCOPE_EXTERNAL` frontends,
    /// NodePorts, SNAT to remote backends.
    External,
    /// Pods of this node (tc on `--pod-devices`, `pod.rs`): `SCOPE_ALL` frontends (the
    /// socket programs' entries, with internalTrafficPolicy), DNAT only (a pod address
    /// is routable, so the reply comes back through this node), except hairpin.
    Pod,
}

/// A packet from a client: an established flow keeps its backend; a new one is chosen,
/// recorded and translated; a packet to no external frontend passes untouched.
#[inline(always)]
pub fn forward<C: Pkt>(c: &C, f: &Flow) -> Verdict {
    forward_on(c, f, Path::External)
}

/// [`forward`] for the clients of `path`.
#[inline(always)]
pub fn forward_on<C: Pkt>(c: &C, f: &Flow, path: Path) -> Verdict {
    let now = compat::ext_now_ns();
    match established(c, f, now) {
        Some(v) => v,
        None => new_flow(c, f, now, path),
    }
}

/// A packet of a flow with a live forward entry whose backend is still there: the
/// flow's translation. `None`: no such entry (or its backend is gone), a new flow.
///
/// "Still there" is the backend entry under the flow's id with the flow's address, not
/// membership in the frontend's slots: an endpoint that still serves but is no longer
/// selected (terminating, outside the topology hints or the traffic policy) keeps its
/// entry as `BACKEND_DRAINING` with no slot, so its flows go on while new ones go
/// elsewhere. The agent deletes the entry once the endpoint stops serving. The check
/// runs once per `CT_REFRESH_WINDOW_NS` window of the flow (see below), so a removed
/// backend's flow is chosen anew within one window, not always by the next packet.
#[inline(never)]
fn established<C: Pkt>(c: &C, f: &Flow, now: u64) -> Option<Verdict> {
    let fe = LB_CT_V2.get_ptr_mut(ct_key(f, CT_DIR_FORWARD))?;
    let v = val(fe);
    let e = unsafe { *v };
    if e.expires_ns <= now {
        return None;
    }
    let snat = e.flags & CT_FLAG_SNAT != 0;
    let (saddr, sport) = if snat {
        (e.snat_addr_be, e.snat_port_be)
    } else {
        (f.saddr, f.sport)
    };
    // The flow's periodic work: the backend check and the reply entry's refresh. Only
    // when this packet changes the forward entry's flags, or moves its expiry into
    // another window of `CT_REFRESH_WINDOW_NS`: the other packets of a busy flow skip
    // both hash lookups (about half of an established packet's time).
    let (life, new_flags) = lifetime(f, e.flags);
    let due = new_flags != e.flags || window_moved(e.expires_ns, now + life);
    let same = !due
        || match LB_BACKENDS_V1.get_ptr(e.backend_id) {
            Some(b) => unsafe { (*b).addr_be == e.nat_addr_be && (*b).port_be == e.nat_port_be },
            None => false,
        };
    if !same {
        // The backend left the Service (or its id was reused for another address).
        // The flow is chosen anew below, for UDP and TCP alike. For TCP this is the
        // reset: the new backend has no socket for a mid-stream segment and answers
        // it with RST, which comes back through the reverse NAT with the frontend's
        // address, so the client sees its connection reset by the Service (a SYN
        // retransmission simply connects). Sending a RST from here would need a
        // second packet or a rebuilt one, for the same outcome.
        count(CTR_EXT_BACKEND_GONE);
        if let Some(s) = LB_SCRATCH.get_ptr_mut(0) {
            // SAFETY: per-CPU scratch, only this program run uses it.
            let s = unsafe { &mut *s };
            s.rkey = reply_key(&e, f, saddr, sport);
            let _ = LB_CT_V2.remove(&s.rkey);
        }
        return None;
    }
    count(CTR_EXT_CT_HIT);
    refresh(v, f, now, 0);
    account(fe, ip_len(c, f));
    // Keep the reply entry alive as long as the client sends (a one-way flow's late
    // answer must still be translated), and bring it back if the LRU evicted it.
    if due {
        let new_expires = unsafe { (*v).expires_ns };
        let Some(s) = LB_SCRATCH.get_ptr_mut(0) else {
            count(CTR_EXT_CT_UPDATE_FAIL);
            return Some(Verdict::Drop);
        };
        // SAFETY: per-CPU scratch, only this program run uses it.
        let s = unsafe { &mut *s };
        s.rkey = reply_key(&e, f, saddr, sport);
        match LB_CT_V2.get_ptr_mut(&s.rkey) {
            Some(r) => refresh(val(r), f, now, 0),
            None => {
                s.rval.packets = 0;
                s.rval.bytes = 0;
                s.rval.ct = CtValue {
                    expires_ns: new_expires,
                    backend_id: e.backend_id,
                    rev_nat_id: e.rev_nat_id,
                    nat_addr_be: f.daddr,
                    snat_addr_be: if snat { f.saddr } else { [0; 4] },
                    nat_port_be: f.dport,
                    snat_port_be: if snat { f.sport } else { 0 },
                    // The forward entry's state after this packet: a recreated reply
                    // entry of an established flow keeps the established lifetime,
                    // not the half-open one.
                    flags: new_flags
                        & (CT_FLAG_SNAT
                            | CT_FLAG_CLOSING
                            | CT_FLAG_SEEN_REPLY
                            | CT_FLAG_ESTABLISHED),
                    _pad: [0; 3],
                };
                if LB_CT_V2.insert(&s.rkey, &s.rval, 0).is_err() {
                    count(CTR_EXT_CT_UPDATE_FAIL);
                }
            }
        }
    }
    Some(apply(
        c,
        f,
        &Rewrite {
            saddr,
            sport,
            daddr: e.nat_addr_be,
            dport: e.nat_port_be,
        },
        snat,
    ))
}

/// The reply entry's key of the flow whose forward entry is `e` (backend → client, or
/// backend → SNAT address); `saddr`/`sport` is the packet's source after translation.
#[inline(always)]
fn reply_key(e: &CtValue, f: &Flow, saddr: [u32; 4], sport: u16) -> CtKey {
    CtKey {
        saddr_be: e.nat_addr_be,
        daddr_be: saddr,
        sport_be: e.nat_port_be,
        dport_be: sport,
        proto: f.proto,
        family: f.family,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

/// Whether a packet that moved its entry's expiry from `old` to `new` (flags unchanged)
/// does the flow's periodic work (see [`established`] and [`reply`]): when the two
/// times lie in different windows of `CT_REFRESH_WINDOW_NS` (svc-lb-common). Two
/// packets of a flow further apart than one window always do. With the coarse clock,
/// which moves once a tick, that is about one packet per tick whatever the flow's rate.
#[inline(always)]
fn window_moved(old: u64, new: u64) -> bool {
    (old ^ new) >> CT_REFRESH_WINDOW_SHIFT != 0
}

/// The external frontend of a packet: exact (destination, port, protocol) first, then
/// the NodePort entry (unspecified address) when the destination is a node address.
/// Returns the master entry and the address its slots are keyed by.
/// `scope`: `SCOPE_EXTERNAL` (with the NodePort fallback) or `SCOPE_ALL` (exact only).
#[inline(always)]
fn frontend(f: &Flow, scope: u8) -> Option<(SvcValue, [u32; 4])> {
    if f.family == FAMILY_V4 {
        let mut key = Svc4Key {
            addr_be: f.daddr[0],
            port_be: f.dport,
            slot: 0,
            proto: f.proto,
            scope,
            _pad: [0; 2],
        };
        if let Some(v) = LB_SVC4_V1.get_ptr(key) {
            return Some((unsafe { *v }, f.daddr));
        }
        if scope != SCOPE_EXTERNAL || !is_node_addr(f) {
            return None;
        }
        key.addr_be = 0;
        LB_SVC4_V1.get_ptr(key).map(|v| (unsafe { *v }, [0; 4]))
    } else {
        let mut key = Svc6Key {
            addr_be: f.daddr,
            port_be: f.dport,
            slot: 0,
            proto: f.proto,
            scope,
            _pad: [0; 2],
        };
        if let Some(v) = LB_SVC6_V1.get_ptr(key) {
            return Some((unsafe { *v }, f.daddr));
        }
        if scope != SCOPE_EXTERNAL || !is_node_addr(f) {
            return None;
        }
        key.addr_be = [0; 4];
        LB_SVC6_V1.get_ptr(key).map(|v| (unsafe { *v }, [0; 4]))
    }
}

#[inline(always)]
fn is_node_addr(f: &Flow) -> bool {
    LB_NODEADDR_V1
        .get_ptr(NodeAddrKey {
            addr_be: f.daddr,
            family: f.family,
            _pad: [0; 3],
        })
        .is_some()
}

#[inline(always)]
fn slot_backend(f: &Flow, fe_addr: &[u32; 4], slot: u16, scope: u8) -> Option<u32> {
    let v = if f.family == FAMILY_V4 {
        LB_SVC4_V1.get_ptr(Svc4Key {
            addr_be: fe_addr[0],
            port_be: f.dport,
            slot,
            proto: f.proto,
            scope,
            _pad: [0; 2],
        })
    } else {
        LB_SVC6_V1.get_ptr(Svc6Key {
            addr_be: *fe_addr,
            port_be: f.dport,
            slot,
            proto: f.proto,
            scope,
            _pad: [0; 2],
        })
    }?;
    Some(unsafe { (*v).backend_id })
}

#[inline(always)]
fn src_allowed(f: &Flow, rev_nat_id: u32) -> bool {
    if f.family == FAMILY_V4 {
        let key = Key::new(
            64,
            SrcRange4Key {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr_be: f.saddr[0],
            },
        );
        LB_SRCRNG4_V1.get(&key).is_some()
    } else {
        let key = Key::new(
            160,
            SrcRange6Key {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr_be: f.saddr,
            },
        );
        LB_SRCRNG6_V1.get(&key).is_some()
    }
}

#[inline(always)]
fn aff_key(f: &Flow, rev_nat_id: u32) -> AffinityExtKey {
    AffinityExtKey {
        addr_be: f.saddr,
        rev_nat_id,
        family: f.family,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn remember(f: &Flow, rev_nat_id: u32, backend_id: u32, sticky: Stickiness) {
    let now_ns = match sticky {
        Stickiness::Off => return,
        Stickiness::Remembered { now_ns } => {
            count(CTR_EXT_AFF_HIT);
            now_ns
        }
        Stickiness::New { now_ns, .. } => now_ns,
    };
    let value = AffinityValue {
        last_used_ns: now_ns,
        backend_id,
        _pad: 0,
    };
    if LB_AFFEXT_V1
        .insert(aff_key(f, rev_nat_id), value, 0)
        .is_err()
    {
        count(CTR_EXT_AFF_UPDATE_FAIL);
    }
}

/// What [`decide`] found for the first packet of a flow.
#[derive(Clone, Copy)]
enum Decision {
    Pass,
    Drop,
    /// Refused; `reason` is the counter to raise where the reject is built (unless the
    /// reject rate limit drops it).
    Reject {
        reason: u32,
    },
    Backend {
        backend_id: u32,
        rev_nat_id: u32,
        /// DNAT only (local backend or externalTrafficPolicy Local).
        local: bool,
        /// A pod reaching itself through its Service (`Path::Pod`): the source becomes
        /// the Service address (see `pod.rs`).
        hairpin: bool,
    },
}

/// The first packet of a flow (or of a flow whose backend left): choice, conntrack,
/// translation; or the reject, the drop, or untouched when it is not for a frontend.
///
/// The choice, the reject and the conntrack/translation are three separate BPF
/// functions called one after the other, so their stack frames never add up.
#[inline(always)]
fn new_flow<C: Pkt>(c: &C, f: &Flow, now: u64, path: Path) -> Verdict {
    let hash = flow_hash(&f.saddr, f.sport, f.dport, f.proto);
    match decide(f, now, hash, path) {
        Decision::Pass => Verdict::Pass,
        Decision::Drop => Verdict::Drop,
        // A device whose XDP_TX frames may never arrive (a veth): the packet goes on
        // to tc ingress, which decides again and answers (and counts the reason).
        Decision::Reject { .. } if !c.can_reject() => {
            count(CTR_EXT_XDP_REJECT_TO_TC);
            Verdict::Pass
        }
        Decision::Reject { reason } => reject(c, f, reason, path),
        Decision::Backend {
            backend_id,
            rev_nat_id,
            local,
            hairpin,
        } => establish(
            c,
            f,
            &NewFlow {
                now,
                hash,
                backend_id,
                rev_nat_id,
                local,
                hairpin,
            },
        ),
    }
}

/// The arguments of [`establish`] (a BPF function takes at most five).
#[derive(Clone, Copy)]
struct NewFlow {
    now: u64,
    hash: u32,
    backend_id: u32,
    rev_nat_id: u32,
    local: bool,
    hairpin: bool,
}

/// Answers with an ICMP error, within the node-wide reject rate limit (beyond it the
/// packet is dropped and counted, as the kernel stops sending ICMP errors beyond
/// `icmp_msgs_per_sec`): a flood to a Service without endpoints must not turn the node
/// into an amplifier towards spoofed sources.
#[inline(never)]
fn reject<C: Pkt>(c: &C, f: &Flow, reason: u32, path: Path) -> Verdict {
    if !reject::allowed() {
        count(CTR_EXT_REJECT_RATE_LIMITED);
        return Verdict::Drop;
    }
    // The reason counts rejects that were answered (or failed to build, counted below
    // as well); a rate-limited one is a drop.
    count(reason);
    // Pods get kube-proxy's TCP reset (see reject.rs); external clients keep the ICMP
    // error, which needs no state and is what the external path's tests pin down.
    let built = if path == Path::Pod && f.proto == PROTO_TCP {
        reject::build_rst(c, f)
    } else {
        reject::build(c, f)
    };
    if built {
        Verdict::Reject
    } else {
        count(CTR_EXT_REJECT_FAILED);
        Verdict::Drop
    }
}

/// The choice for a new flow (svc-lb-common's `choose_external` over the maps); counts
/// the reason of a drop or reject, remembers an affinity choice. No packet access.
#[inline(never)]
fn decide(f: &Flow, now: u64, hash: u32, path: Path) -> Decision {
    let mut scope = if path == Path::Pod {
        SCOPE_ALL
    } else {
        SCOPE_EXTERNAL
    };
    let mut found = frontend(f, scope);
    if found.is_none() && scope == SCOPE_EXTERNAL && SVCLB_ROUTE_CLUSTER_IPS.load() != 0 {
        scope = SCOPE_ALL;
        found = frontend(f, scope);
    }
    let Some((master, fe_addr)) = found else {
        return Decision::Pass;
    };
    let maglev_size = match LB_CONFIG_V1.get(0) {
        Some(cfg) => cfg.maglev_size,
        None => 0,
    };
    let choice = choose_external(
        Some(&master),
        |rev| src_allowed(f, rev),
        hash,
        || now,
        |rev| unsafe { LB_AFFEXT_V1.get(aff_key(f, rev)) }.copied(),
        |backend_id, rev_nat_id| {
            LB_AFFMATCH_V1
                .get_ptr(AffinityMatchKey {
                    backend_id,
                    rev_nat_id,
                })
                .is_some()
        },
        maglev_size,
        |rev, index| {
            let t = LB_MAGLEV_V1.get_ptr(rev)?;
            // LLVM knows `index < size <= MAGLEV_TABLE_MAX` from the modulo and would
            // drop this check, but the verifier does not track bounds through a
            // modulo: the volatile read hides the value so the check stays.
            let i = unsafe { core::ptr::read_volatile(&index) } as usize;
            if i >= MAGLEV_TABLE_MAX {
                return None;
            }
            Some(unsafe { *(*t).backend_ids.as_ptr().add(i) })
        },
        |slot| slot_backend(f, &fe_addr, slot, scope),
        |id| LB_BACKENDS_V1.get_ptr(id),
    );
    match choice {
        ExtChoice::NotService => Decision::Pass,
        ExtChoice::Drop { reason, .. } => {
            count(reason);
            Decision::Drop
        }
        ExtChoice::Reject { reason, .. } => Decision::Reject { reason },
        ExtChoice::Backend {
            backend,
            backend_id,
            rev_nat_id,
            svc_flags,
            via,
            sticky,
        } => {
            // `SCOPE_ALL` frontends have no Maglev table: the slot is their choice.
            if let ExtVia::SlotFallback { .. } = via
                && scope == SCOPE_EXTERNAL
            {
                count(CTR_EXT_MAGLEV_MISSING);
            }
            remember(f, rev_nat_id, backend_id, sticky);
            let (flags, addr) = unsafe { ((*backend).flags, (*backend).addr_be) };
            if path == Path::Pod {
                let hairpin = addr == f.saddr;
                return Decision::Backend {
                    backend_id,
                    rev_nat_id,
                    local: !hairpin,
                    hairpin,
                };
            }
            Decision::Backend {
                backend_id,
                rev_nat_id,
                local: flags & BACKEND_FLAG_LOCAL != 0 || svc_flags & SVC_FLAG_EXT_LOCAL != 0,
                hairpin: false,
            }
        }
    }
}

/// Records a new flow (reply entry first, so that no translated packet can leave before
/// its reply can be translated back) and translates its first packet.
#[inline(never)]
fn establish<C: Pkt>(c: &C, f: &Flow, nf: &NewFlow) -> Verdict {
    let NewFlow {
        now,
        hash,
        backend_id,
        rev_nat_id,
        local,
        hairpin,
    } = *nf;
    // Read again here rather than passed along: keeps the caller's frame small. The
    // agent never deletes a backend that a slot or table still points at, so it is
    // there; if not, the flow is dropped like any other missing backend.
    let Some(b) = LB_BACKENDS_V1.get_ptr(backend_id) else {
        count(CTR_EXT_BACKEND_MISSING);
        return Verdict::Drop;
    };
    let b = unsafe { &*b };
    let cfg = LB_CONFIG_V1.get(0);
    let snat_addr = match (local, cfg) {
        // The Service address the pod dialled: its reply to that address comes back
        // to tc ingress on its device, where the SNAT reply entry finds it.
        _ if hairpin => f.daddr,
        (true, _) | (false, None) => [0; 4],
        (false, Some(cfg)) if f.family == FAMILY_V4 => [cfg.snat4_be, 0, 0, 0],
        (false, Some(cfg)) => cfg.snat6_be,
    };
    let (port_min, port_max) = match cfg {
        Some(cfg) => (cfg.snat_port_min, cfg.snat_port_max),
        None => (0, 0),
    };
    let (life, _) = lifetime(f, 0);
    let expires_ns = now + life;
    let Some(s) = LB_SCRATCH.get_ptr_mut(0) else {
        count(CTR_EXT_CT_UPDATE_FAIL);
        return Verdict::Drop;
    };
    // SAFETY: per-CPU scratch, only this program run uses it.
    let s = unsafe { &mut *s };
    s.fkey = ct_key(f, CT_DIR_FORWARD);
    // The forward entry counts this first packet; the reply entry starts at 0.
    s.fval.packets = 1;
    s.fval.bytes = ip_len(c, f);
    s.rval.packets = 0;
    s.rval.bytes = 0;
    s.fval.ct = CtValue {
        expires_ns,
        backend_id,
        rev_nat_id,
        nat_addr_be: b.addr_be,
        snat_addr_be: [0; 4],
        nat_port_be: b.port_be,
        snat_port_be: 0,
        flags: 0,
        _pad: [0; 3],
    };
    // The reply restores the frontend the client used (for a NodePort, the node address
    // it sent to, not the unspecified address of the entry).
    s.rval.ct = CtValue {
        expires_ns,
        backend_id,
        rev_nat_id,
        nat_addr_be: f.daddr,
        snat_addr_be: [0; 4],
        nat_port_be: f.dport,
        snat_port_be: 0,
        flags: 0,
        _pad: [0; 3],
    };
    s.rkey = CtKey {
        saddr_be: b.addr_be,
        daddr_be: f.saddr,
        sport_be: b.port_be,
        dport_be: f.sport,
        proto: f.proto,
        family: f.family,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let (saddr, sport) = if local {
        if LB_CT_V2.insert(&s.rkey, &s.rval, 0).is_err() {
            count(CTR_EXT_CT_UPDATE_FAIL);
            return Verdict::Drop;
        }
        (f.saddr, f.sport)
    } else {
        if snat_addr == [0; 4] {
            count(CTR_EXT_NO_SNAT_ADDR);
            return Verdict::Drop;
        }
        s.rkey.daddr_be = snat_addr;
        s.rval.ct.snat_addr_be = f.saddr;
        s.rval.ct.snat_port_be = f.sport;
        s.rval.ct.flags = CT_FLAG_SNAT;
        // Vary the pseudo-random ports between flows of the same hash (a retry after a
        // collision must not test the same ports again).
        let seed = hash ^ unsafe { bpf_get_prandom_u32() };
        let client_port = u16::from_be(f.sport);
        let mut port = 0u16;
        let mut attempt = 0u32;
        while attempt < SNAT_PORT_TRIES {
            let p = snat_port(client_port, seed, attempt, port_min, port_max).to_be();
            s.rkey.dport_be = p;
            if claim(&s.rkey, &s.rval, now) {
                port = p;
                break;
            }
            attempt += 1;
        }
        if port == 0 {
            count(CTR_EXT_SNAT_PORT_EXHAUSTED);
            return Verdict::Drop;
        }
        s.fval.ct.flags = CT_FLAG_SNAT;
        s.fval.ct.snat_addr_be = snat_addr;
        s.fval.ct.snat_port_be = port;
        (snat_addr, port)
    };
    if LB_CT_V2.insert(&s.fkey, &s.fval, 0).is_err() {
        let _ = LB_CT_V2.remove(&s.rkey);
        count(CTR_EXT_CT_UPDATE_FAIL);
        return Verdict::Drop;
    }
    count(CTR_EXT_FORWARDED);
    count_conn(rev_nat_id, backend_id);
    apply(
        c,
        f,
        &Rewrite {
            saddr,
            sport,
            daddr: b.addr_be,
            dport: b.port_be,
        },
        !local,
    )
}

/// Claims a SNAT reply key: free, or held by an expired flow.
#[inline(always)]
fn claim(rkey: &CtKey, rval: &CtEntry, now: u64) -> bool {
    if LB_CT_V2.insert(rkey, rval, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    match LB_CT_V2.get_ptr(rkey) {
        Some(v) if unsafe { (*v).ct.expires_ns } > now => false,
        _ => LB_CT_V2.insert(rkey, rval, 0).is_ok(),
    }
}
