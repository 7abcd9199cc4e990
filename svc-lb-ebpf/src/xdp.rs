//! XDP wrapper of the external path's forward direction (`--xdp`): new and established
//! client flows are translated (DNAT/SNAT + conntrack, the same code as tc ingress) and
//! passed to the stack, which routes the rewritten packet; a Service without endpoints
//! is answered here with XDP_TX where the device's XDP_TX works, else by tc (see
//! [`tx_trusted`]). Replies are left to tc, which sees them after the stack.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use svc_lb_common::{
    CTR_EXT_PASS_UNSUPPORTED, CTR_EXT_XDP_FORWARDED, CTR_EXT_XDP_TX, XDP_DEV_TX_OK,
    XDP_MAC_ARRAY_MAX,
};

use crate::{
    ext::{self, Verdict},
    maps::{LB_XDPDEV_V1, LB_XDPMAC, LB_XDPMACHI},
    parse::{Parsed, parse},
    sock::count,
};

/// Whether XDP_TX on the receiving device reaches the sender. The agent marks each
/// device from its driver (`LB_XDPDEV_V1`): a veth drops XDP_TX frames unless its peer
/// runs XDP or GRO, which nothing on this node controls. An unmarked device counts as
/// untrusted: tc answering costs a little speed, a lost reject costs the client a
/// timeout.
#[inline(always)]
pub fn tx_trusted(ctx: &XdpContext) -> bool {
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    match LB_XDPDEV_V1.get_ptr(ifindex) {
        Some(flags) => (unsafe { *flags } & XDP_DEV_TX_OK) != 0,
        None => false,
    }
}

/// Whether the frame was sent to the receiving device's own MAC address (what the
/// stack later calls PACKET_HOST). A switch flooding unknown unicast delivers frames for
/// other nodes here too; serving them would make two nodes answer one client. A device
/// the agent did not register (`LB_XDPMAC`, `BPF_PROG_TEST_RUN`) counts as addressed.
#[inline(always)]
fn addressed_here(ctx: &XdpContext) -> bool {
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // The array lookup is inlined by the kernel (a bounds check and an add); only a
    // device with a large ifindex pays for the hash.
    let mac = if ifindex < XDP_MAC_ARRAY_MAX {
        LB_XDPMAC.get_ptr(ifindex)
    } else {
        LB_XDPMACHI.get_ptr(ifindex)
    };
    let Some(mac) = mac else {
        return true;
    };
    let start = ctx.data();
    // parse() has already checked that the Ethernet header is there.
    if start + 6 > ctx.data_end() {
        return false;
    }
    // SAFETY: bounds checked above; the map value is 8 bytes (8-aligned, as every map
    // value). Three 16-bit words rather than byte-wise unaligned reads: see the comment
    // on `impl Pkt for XdpContext` (offsets 0, 2 and 4 are 2-aligned there).
    unsafe {
        let own = mac as *const u16;
        // Bytes 6 and 7: `XDP_MAC_SET` and 0 once the agent wrote the entry.
        if core::ptr::read(own.add(3)) == 0 {
            return true;
        }
        let dst = start as *const u16;
        core::ptr::read(dst) == core::ptr::read(own)
            && core::ptr::read(dst.add(1)) == core::ptr::read(own.add(1))
            && core::ptr::read(dst.add(2)) == core::ptr::read(own.add(2))
    }
}

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
    // Broadcast, multicast and other hosts' frames pass untouched (the stack drops
    // what is not for it).
    if !addressed_here(ctx) {
        return xdp_action::XDP_PASS;
    }
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
