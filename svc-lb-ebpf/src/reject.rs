//! ICMP port unreachable (IPv4 type 3 code 3, ICMPv6 type 1 code 4) for a Service with
//! no endpoints, built in place from the offending packet: Ethernet addresses swapped, a
//! new IP header from the frontend (the address the client used) to the client, the
//! ICMP header, then the offending IP header and the first 8 bytes of its L4 header
//! (RFC 792's minimum; RFC 4443 asks for "as much as fits", 48 bytes is enough for
//! every stack to match the error to its socket). The caller sends the frame back out
//! the device it came in on. The frame is assembled in a per-CPU scratch buffer
//! (`LB_SCRATCH`), as it does not fit on the stack next to the rest of the path.
//!
//! Rejects are rate-limited node-wide ([`allowed`]).
//!
//! Limits: IPv4 packets with options are not answered (the caller drops them), as the
//! quote would need a variable length. On tc, an skb that is CHECKSUM_PARTIAL keeps
//! that state; only a locally generated packet (a veth peer in the same host) can be,
//! and its receiver trusts PARTIAL packets without checking them.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use svc_lb_common::{BucketTake, FAMILY_V4, reject_bucket};

use crate::{
    csum,
    maps::{LB_CONFIG_V1, LB_REJECT_RL, LB_SCRATCH},
    parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Flow, IPV4_HLEN, IPV6_HLEN},
    pkt::Pkt,
};

const ICMP_HLEN: usize = 8;
const QUOTE_L4: usize = 8;
const V4_ORIG: usize = ETH_HLEN + IPV4_HLEN + QUOTE_L4;
const V6_ORIG: usize = ETH_HLEN + IPV6_HLEN + QUOTE_L4;
const V4_LEN: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + IPV4_HLEN + QUOTE_L4;
const V6_LEN: usize = ETH_HLEN + IPV6_HLEN + ICMP_HLEN + IPV6_HLEN + QUOTE_L4;
const HOP_LIMIT: u8 = 64;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// A fixed-size view of the start of a scratch buffer.
#[inline(always)]
fn view<const N: usize>(buf: &mut [u8; 128]) -> &mut [u8; N] {
    const { assert!(N <= 128) };
    unsafe { &mut *(buf.as_mut_ptr() as *mut [u8; N]) }
}

/// Ethernet header with the addresses swapped, then the offending IP header and 8 bytes
/// of L4 header copied behind the new IP and ICMP headers (at `quote_at`).
#[inline(always)]
fn frame<const N: usize, const O: usize>(
    out: &mut [u8; N],
    orig: &[u8; O],
    ethertype: u16,
    quote_at: usize,
) {
    let mut i = 0;
    while i < 6 {
        out[i] = orig[6 + i];
        out[6 + i] = orig[i];
        i += 1;
    }
    let t = ethertype.to_be_bytes();
    out[12] = t[0];
    out[13] = t[1];
    let mut i = ETH_HLEN;
    while i < O && quote_at + i - ETH_HLEN < N {
        out[quote_at + i - ETH_HLEN] = orig[i];
        i += 1;
    }
}

#[inline(always)]
fn put_words<const N: usize>(out: &mut [u8; N], at: usize, words: &[u32; 4], n: usize) {
    let mut i = 0;
    while i < n && i < 4 && at + i * 4 + 3 < N {
        let b = words[i].to_ne_bytes();
        out[at + i * 4] = b[0];
        out[at + i * 4 + 1] = b[1];
        out[at + i * 4 + 2] = b[2];
        out[at + i * 4 + 3] = b[3];
        i += 1;
    }
}

/// Whether the node-wide reject token bucket (`ExtConfig.reject_rate`/`reject_burst`,
/// svc-lb-common's `reject_bucket`) lets one more reject out. One bucket for every CPU,
/// as the kernel's `icmp_global`, without a lock: CPUs racing on it may let a few more
/// through, which the kernel accepts for its own limit too.
#[inline(always)]
pub fn allowed() -> bool {
    let (rate, burst) = match LB_CONFIG_V1.get(0) {
        Some(cfg) => (cfg.reject_rate, cfg.reject_burst),
        None => (0, 0),
    };
    if rate == 0 {
        return true;
    }
    let Some(b) = LB_REJECT_RL.get_ptr_mut(0) else {
        return true;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    match reject_bucket(unsafe { &*b }, now, rate, burst) {
        BucketTake::Consume => {
            // A plain decrement: two CPUs taking the same credit at once lose one
            // decrement, so a burst across CPUs may get a few more than `burst` out.
            unsafe { (*b).credit -= 1 };
            true
        }
        BucketTake::Refill { stamp_ns, credit } => {
            unsafe {
                (*b).stamp_ns = stamp_ns;
                (*b).credit = credit;
            }
            true
        }
        BucketTake::Empty => false,
    }
}

/// Replaces the packet by the reject. False when it cannot be built (then the caller
/// drops the packet).
#[inline(always)]
pub fn build<C: Pkt>(c: &C, f: &Flow) -> bool {
    let Some(s) = LB_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let s = unsafe { &mut *s };
    if f.family == FAMILY_V4 {
        build4(
            c,
            f,
            view::<V4_LEN>(&mut s.out),
            view::<V4_ORIG>(&mut s.orig),
        )
    } else {
        build6(
            c,
            f,
            view::<V6_LEN>(&mut s.out),
            view::<V6_ORIG>(&mut s.orig),
        )
    }
}

#[inline(always)]
fn build4<C: Pkt>(c: &C, f: &Flow, out: &mut [u8; V4_LEN], orig: &mut [u8; V4_ORIG]) -> bool {
    if f.l4_off as usize != ETH_HLEN + IPV4_HLEN || !c.load_bytes(0, orig) {
        return false;
    }
    *out = [0; V4_LEN];
    let ip = ETH_HLEN;
    let icmp = ip + IPV4_HLEN;
    frame(out, orig, ETH_P_IP, icmp + ICMP_HLEN);
    out[ip] = 0x45;
    let tot = ((V4_LEN - ETH_HLEN) as u16).to_be_bytes();
    out[ip + 2] = tot[0];
    out[ip + 3] = tot[1];
    out[ip + 8] = HOP_LIMIT;
    out[ip + 9] = IPPROTO_ICMP;
    // From the frontend (the address the client sent to) back to the client.
    put_words(out, ip + 12, &f.daddr, 1);
    put_words(out, ip + 16, &f.saddr, 1);
    out[icmp] = 3; // destination unreachable
    out[icmp + 1] = 3; // port unreachable
    let ic = csum::of_bytes(&out[icmp..], 0).to_ne_bytes();
    out[icmp + 2] = ic[0];
    out[icmp + 3] = ic[1];
    let hc = csum::of_bytes(&out[ip..icmp], 0).to_ne_bytes();
    out[ip + 10] = hc[0];
    out[ip + 11] = hc[1];
    c.resize(V4_LEN as u32) && c.store_bytes(0, out)
}

#[inline(always)]
fn build6<C: Pkt>(c: &C, f: &Flow, out: &mut [u8; V6_LEN], orig: &mut [u8; V6_ORIG]) -> bool {
    if !c.load_bytes(0, orig) {
        return false;
    }
    *out = [0; V6_LEN];
    let ip = ETH_HLEN;
    let icmp = ip + IPV6_HLEN;
    frame(out, orig, ETH_P_IPV6, icmp + ICMP_HLEN);
    out[ip] = 0x60;
    let plen = (V6_LEN - icmp) as u16;
    let pl = plen.to_be_bytes();
    out[ip + 4] = pl[0];
    out[ip + 5] = pl[1];
    out[ip + 6] = IPPROTO_ICMPV6;
    out[ip + 7] = HOP_LIMIT;
    put_words(out, ip + 8, &f.daddr, 4);
    put_words(out, ip + 24, &f.saddr, 4);
    out[icmp] = 1; // destination unreachable
    out[icmp + 1] = 4; // port unreachable
    // Pseudo-header: source, destination, upper-layer length, next header.
    let pseudo = csum::sum_words(&f.daddr)
        + csum::sum_words(&f.saddr)
        + csum::sum_words(&[u32::from(plen).to_be(), u32::from(IPPROTO_ICMPV6).to_be()]);
    let ic = csum::of_bytes(&out[icmp..], pseudo).to_ne_bytes();
    out[icmp + 2] = ic[0];
    out[icmp + 3] = ic[1];
    c.resize(V6_LEN as u32) && c.store_bytes(0, out)
}
