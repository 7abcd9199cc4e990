//! tc (TCX) wrappers of the external path on the node's devices.
//! - ingress: replies to SNATed flows are reverse-translated; client packets go through
//!   the forward path (conntrack, choice, DNAT/SNAT, reject);
//! - egress: replies of local backends get the frontend back as their source.
//!
//! Everything else passes untouched (TC_ACT_OK).
//!
//! A translated packet of a SNAT flow (to a remote backend, or the reply back to the
//! client) has one of the node's addresses on one side. The stack's forwarding would
//! drop it as martian (IPv4 `accept_local=0`), so ingress forwards it itself: FIB
//! lookup with the rewritten addresses, TTL/hop limit decremented, `bpf_redirect_neigh`
//! to the next hop. Whatever the lookup cannot send (local destination, forwarding
//! off, no route, MTU, TTL/hop limit ≤ 1) goes into the stack as before, which owns
//! the ICMP errors and the local delivery.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
        bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{
        bpf_check_mtu, bpf_csum_update, bpf_fib_lookup as fib_lookup, bpf_redirect,
        bpf_redirect_neigh,
    },
    programs::TcContext,
};
use svc_lb_common::{
    CTR_EXT_FIB_REDIRECTED, CTR_EXT_FIB_TO_STACK, CTR_EXT_PASS_UNSUPPORTED, CTR_EXT_REWRITE_FAIL,
    FAMILY_V4,
};

use crate::{
    csum,
    ext::{self, Verdict},
    parse::{ETH_HLEN, Flow, Parsed, parse},
    pkt::Pkt,
    sock::count,
};

const AF_INET: u8 = 2;
/// `skb->pkt_type` of a frame sent to this device's own MAC address (linux/if_packet.h).
const PACKET_HOST: u32 = 0;
const AF_INET6: u8 = 10;

// The bindings type these as u32 or i32 depending on the arch they were generated for.
#[allow(clippy::unnecessary_cast)]
const OK: i32 = TC_ACT_OK as i32;
#[allow(clippy::unnecessary_cast)]
const SHOT: i32 = TC_ACT_SHOT as i32;

#[inline(always)]
fn verdict(ctx: &TcContext, f: &Flow, v: Verdict) -> i32 {
    match v {
        Verdict::Pass | Verdict::Translated => OK,
        Verdict::TranslatedSnat => send(ctx, f),
        Verdict::Drop => SHOT,
        // The reject goes back out the device the packet came in on.
        Verdict::Reject => unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 },
    }
}

#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    // Only frames sent to this device's MAC: broadcast, multicast and frames for other
    // hosts (a switch flooding unknown unicast, e.g. right after the owner's link died)
    // pass untouched, so only the node they were sent to answers; the stack drops them.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return OK;
    }
    let f = match parse(ctx) {
        Parsed::Flow(f) => f,
        Parsed::Other => return OK,
        Parsed::Unsupported => {
            count(CTR_EXT_PASS_UNSUPPORTED);
            return OK;
        }
    };
    if let Some(v) = ext::reply(ctx, &f, true) {
        return verdict(ctx, &f, v);
    }
    verdict(ctx, &f, ext::forward(ctx, &f))
}

#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Parsed::Flow(f) = parse(ctx) else {
        return OK;
    };
    match ext::reply(ctx, &f, false) {
        Some(v) => verdict(ctx, &f, v),
        None => OK,
    }
}

/// Forwards a translated SNAT-flow packet as the stack would (see the module comment).
/// `f` holds the offsets; the addresses are read back from the rewritten packet.
///
/// Not inlined: the lookup parameters (64 bytes) get their own stack frame.
#[inline(never)]
fn send(ctx: &TcContext, f: &Flow) -> i32 {
    // Kernels without bpf_redirect_neigh (5.10) or bpf_check_mtu (5.12): the stack
    // forwards (with accept_local=1, which the agent sets on the devices).
    if !crate::compat::fib_redirect() {
        return to_stack();
    }
    let v4 = f.family == FAMILY_V4;
    // SAFETY: an all-zero bpf_fib_lookup is valid (plain integers and unions of them).
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    // TTL (IPv4 byte 8) or hop limit (IPv6 byte 7), as the 16-bit word it sits in for
    // the checksum update: [ttl, proto] / [next header, hop limit].
    let (word_off, hop_idx) = if v4 {
        (ETH_HLEN + 8, 0)
    } else {
        (ETH_HLEN + 6, 1)
    };
    let Some(word) = Pkt::load::<u16>(ctx, word_off) else {
        return to_stack();
    };
    let mut bytes = word.to_ne_bytes();
    // ≤ 1: the stack sends the Time Exceeded.
    if bytes[hop_idx] <= 1 {
        return to_stack();
    }
    p.l4_protocol = f.proto;
    if let Some(ports) = Pkt::load::<[u16; 2]>(ctx, f.l4_off as usize) {
        p.sport = ports[0];
        p.dport = ports[1];
    }
    // tot_len stays 0: the kernel then checks this skb (GSO included) against the
    // egress device's MTU on SUCCESS.
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if v4 {
        let (Some(s), Some(d), Some(tos)) = (
            Pkt::load::<u32>(ctx, f.saddr_off()),
            Pkt::load::<u32>(ctx, f.daddr_off()),
            Pkt::load::<u8>(ctx, ETH_HLEN + 1),
        ) else {
            return to_stack();
        };
        p.family = AF_INET;
        p.__bindgen_anon_2.tos = tos;
        p.__bindgen_anon_3.ipv4_src = s;
        p.__bindgen_anon_4.ipv4_dst = d;
    } else {
        let (Some(s), Some(d)) = (
            Pkt::load::<[u32; 4]>(ctx, f.saddr_off()),
            Pkt::load::<[u32; 4]>(ctx, f.daddr_off()),
        ) else {
            return to_stack();
        };
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = s;
        p.__bindgen_anon_4.ipv6_dst = d;
    }
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // The kernel checks the MTU only on SUCCESS; without a neighbour it stops
        // before, so check here (0: fits).
        let mut mtu = 0u32;
        if unsafe { bpf_check_mtu(ctx.skb.skb.cast(), p.ifindex, &mut mtu, 0, 0) } != 0 {
            return to_stack();
        }
    } else if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return to_stack();
    }
    // The next hop: the gateway, or the destination itself on a connected route (the
    // lookup wrote it into the destination; an IPv4 route via an IPv6 gateway switches
    // the family to AF_INET6).
    let mut nh = bpf_redir_neigh {
        nh_family: 0,
        __bindgen_anon_1: unsafe { core::mem::zeroed() },
    };
    if p.family == AF_INET {
        nh.nh_family = u32::from(AF_INET);
        nh.__bindgen_anon_1.ipv4_nh = unsafe { p.__bindgen_anon_4.ipv4_dst };
    } else {
        nh.nh_family = u32::from(AF_INET6);
        nh.__bindgen_anon_1.ipv6_nh = unsafe { p.__bindgen_anon_4.ipv6_dst };
    }
    bytes[hop_idx] -= 1;
    let new = u16::from_ne_bytes(bytes);
    let diff = csum::diff16(word, new);
    if !Pkt::store(ctx, word_off, &new) {
        // Nothing written: the stack can still take it.
        return to_stack();
    }
    if v4 {
        if !ctx.csum_l3(ETH_HLEN + 10, diff) {
            count(CTR_EXT_REWRITE_FAIL);
            return SHOT;
        }
    } else {
        // IPv6 has no header checksum to cancel the change out: keep a
        // CHECKSUM_COMPLETE skb's sum right (a no-op for any other skb).
        unsafe { bpf_csum_update(ctx.skb.skb, diff) };
    }
    count(CTR_EXT_FIB_REDIRECTED);
    unsafe {
        bpf_redirect_neigh(
            p.ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}

#[inline(always)]
fn to_stack() -> i32 {
    count(CTR_EXT_FIB_TO_STACK);
    OK
}
