//! Address and port rewrite with incremental checksum updates, for both contexts.
use svc_lb_common::{FAMILY_V4, PROTO_UDP};

use crate::{
    csum,
    parse::{ETH_HLEN, Flow},
    pkt::Pkt,
};

/// The packet's new source and destination (network order; IPv4 in word 0).
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub saddr: [u32; 4],
    pub sport: u16,
    pub daddr: [u32; 4],
    pub dport: u16,
}

/// Rewrites `f`'s addresses and ports to `to`, fixing the IPv4 header checksum and the
/// L4 checksum (pseudo-header part for addresses, plain part for ports). Fields that do
/// not change are not written. False when a store or checksum helper failed; the
/// packet may then be half-written and the caller drops it.
#[inline(always)]
pub fn rewrite<C: Pkt>(c: &C, f: &Flow, to: &Rewrite) -> bool {
    let v4 = f.family == FAMILY_V4;
    let udp4 = v4 && f.proto == PROTO_UDP;
    let addr_diff = if v4 {
        csum::diff(&[f.saddr[0], f.daddr[0]], &[to.saddr[0], to.daddr[0]])
    } else {
        csum::add(
            csum::diff(&f.saddr, &to.saddr),
            csum::diff(&f.daddr, &to.daddr),
        )
    };
    let port_diff = csum::add(
        csum::diff16(f.sport, to.sport),
        csum::diff16(f.dport, to.dport),
    );
    let l4_csum = f.l4_csum_off();

    if f.saddr != to.saddr || f.daddr != to.daddr {
        let ok = if v4 {
            c.store(f.saddr_off(), &to.saddr[0])
                && c.store(f.daddr_off(), &to.daddr[0])
                && c.csum_l3(ETH_HLEN + 10, addr_diff)
        } else {
            c.store(f.saddr_off(), &to.saddr) && c.store(f.daddr_off(), &to.daddr)
        };
        if !ok || !c.csum_l4(l4_csum, addr_diff, true, udp4, !v4) {
            return false;
        }
    }
    if f.sport != to.sport || f.dport != to.dport {
        let ports = [to.sport, to.dport];
        if !c.store(f.l4_off as usize, &ports) || !c.csum_l4(l4_csum, port_diff, false, udp4, !v4) {
            return false;
        }
    }
    true
}
