//! tc (TCX) wrappers of the external path on the node's devices.
//! - ingress: replies to SNATed flows are reverse-translated; client packets go through
//!   the forward path (conntrack, choice, DNAT/SNAT, reject);
//! - egress: replies of local backends get the frontend back as their source.
//!
//! Everything else passes untouched (TC_ACT_OK).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use svc_lb_common::CTR_EXT_PASS_UNSUPPORTED;

use crate::{
    ext::{self, Verdict},
    parse::{Parsed, parse},
    sock::count,
};

// The bindings type these as u32 or i32 depending on the arch they were generated for.
#[allow(clippy::unnecessary_cast)]
const OK: i32 = TC_ACT_OK as i32;
#[allow(clippy::unnecessary_cast)]
const SHOT: i32 = TC_ACT_SHOT as i32;

#[inline(always)]
fn verdict(ctx: &TcContext, v: Verdict) -> i32 {
    match v {
        Verdict::Pass | Verdict::Translated => OK,
        Verdict::Drop => SHOT,
        // The reject goes back out the device the packet came in on.
        Verdict::Reject => unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 },
    }
}

#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let f = match parse(ctx) {
        Parsed::Flow(f) => f,
        Parsed::Other => return OK,
        Parsed::Unsupported => {
            count(CTR_EXT_PASS_UNSUPPORTED);
            return OK;
        }
    };
    if let Some(v) = ext::reply(ctx, &f, true) {
        return verdict(ctx, v);
    }
    verdict(ctx, ext::forward(ctx, &f))
}

#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Parsed::Flow(f) = parse(ctx) else {
        return OK;
    };
    match ext::reply(ctx, &f, false) {
        Some(v) => verdict(ctx, v),
        None => OK,
    }
}
