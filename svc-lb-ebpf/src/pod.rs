//! Per-packet Service translation for pod traffic (`--pod-devices`): tc on the host-side
//! end of each pod's veth. It serves the packets no socket program translated: pods
//! outside `--socket-lb-scope` (service meshes, which must see the Service address),
//! and clients whose sockets live in another kernel (VMs, sandboxes).
//! - ingress (what the pod sends): a hairpin reply is reverse-translated; anything else
//!   goes through the external path's forward code with [`Path::Pod`]: conntrack, the
//!   shared choice over the `SCOPE_ALL` frontends, DNAT, reject;
//! - egress (what goes into the pod): a backend's reply gets the Service address back
//!   as its source (the flow's reply entry, as for local backends on the external path).
//!
//! Hairpin (the pod is the backend it was given): kube-proxy masquerades the source so
//! the pod does not see a packet from itself; here the source becomes the Service
//! address the pod dialled (with a port from the SNAT range), and the packet goes
//! straight back out the pod's own device: no node address is needed, and the pod's
//! reply to the Service address arrives here again, where the SNAT reply entry finds it.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use svc_lb_common::{
    CTR_POD_DROPPED, CTR_POD_HAIRPIN, CTR_POD_REJECTED, CTR_POD_REPLY_XLATED, CTR_POD_XLATED,
};

use crate::{
    ext::{self, Path, Verdict},
    parse::{Parsed, parse},
    pkt::Pkt,
    sock::count,
};

#[allow(clippy::unnecessary_cast)]
const OK: i32 = TC_ACT_OK as i32;
#[allow(clippy::unnecessary_cast)]
const SHOT: i32 = TC_ACT_SHOT as i32;

/// Sends the packet back out the device it came in on (towards the pod), with the
/// Ethernet addresses swapped: it came to the node's MAC from the pod's.
#[inline(always)]
fn back_to_pod(ctx: &TcContext) -> i32 {
    let Some(eth) = Pkt::load::<[u16; 6]>(ctx, 0) else {
        return SHOT;
    };
    let swapped = [eth[3], eth[4], eth[5], eth[0], eth[1], eth[2]];
    if !Pkt::store(ctx, 0, &swapped) {
        return SHOT;
    }
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    let Parsed::Flow(f) = parse(ctx) else {
        return OK;
    };
    // The pod's answer in a hairpin flow (pod → Service address it was reached from).
    if let Some(v) = ext::reply(ctx, &f, true) {
        return match v {
            Verdict::TranslatedSnat => {
                count(CTR_POD_REPLY_XLATED);
                back_to_pod(ctx)
            }
            Verdict::Drop => SHOT,
            _ => OK,
        };
    }
    match ext::forward_on(ctx, &f, Path::Pod) {
        Verdict::Pass => OK,
        Verdict::Translated => {
            count(CTR_POD_XLATED);
            OK
        }
        Verdict::TranslatedSnat => {
            count(CTR_POD_XLATED);
            count(CTR_POD_HAIRPIN);
            back_to_pod(ctx)
        }
        Verdict::Drop => {
            count(CTR_POD_DROPPED);
            SHOT
        }
        // The ICMP error goes back out the device the packet came in on.
        Verdict::Reject => {
            count(CTR_POD_REJECTED);
            unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
        }
    }
}

#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> i32 {
    let Parsed::Flow(f) = parse(ctx) else {
        return OK;
    };
    match ext::reply(ctx, &f, false) {
        Some(Verdict::Translated) => {
            count(CTR_POD_REPLY_XLATED);
            OK
        }
        Some(Verdict::Drop) => SHOT,
        _ => OK,
    }
}
