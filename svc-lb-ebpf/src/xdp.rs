//! XDP wrapper of the external path's forward direction (`--xdp`): new and established
//! client flows are translated (DNAT/SNAT + conntrack, the same code as tc ingress) and
//! passed to the stack, which routes the rewritten packet; a Service without endpoints
//! is answered here with XDP_TX. Replies are left to tc, which sees them after the
//! stack.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use svc_lb_common::{CTR_EXT_PASS_UNSUPPORTED, CTR_EXT_XDP_FORWARDED, CTR_EXT_XDP_TX};

use crate::{
    ext::{self, Verdict},
    parse::{Parsed, parse},
    sock::count,
};

#[inline(always)]
pub fn forward(ctx: &XdpContext) -> u32 {
    let f = match parse(ctx) {
        Parsed::Flow(f) => f,
        Parsed::Other => return xdp_action::XDP_PASS,
        Parsed::Unsupported => {
            count(CTR_EXT_PASS_UNSUPPORTED);
            return xdp_action::XDP_PASS;
        }
    };
    match ext::forward(ctx, &f) {
        Verdict::Pass => xdp_action::XDP_PASS,
        // The stack routes SNAT flows too (it needs accept_local=1 for that).
        Verdict::Translated | Verdict::TranslatedSnat => {
            count(CTR_EXT_XDP_FORWARDED);
            xdp_action::XDP_PASS
        }
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Reject => {
            count(CTR_EXT_XDP_TX);
            xdp_action::XDP_TX
        }
    }
}
