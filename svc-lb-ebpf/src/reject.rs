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
//! On the per-packet path for pods a TCP packet is answered with a TCP RST instead
//! ([`build_rst`]), as kube-proxy's `--reject-with tcp-reset` effectively does: a
//! client's `connect()` owns its socket while the SYN leaves, so an ICMP error arriving
//! in that window is only a soft error (IPv6 TCP then waits for its SYN timeouts),
//! where a RST is queued to the socket's backlog and refuses the connection at once.
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
const TCP_HLEN: usize = 20;
const V4_TCP: usize = ETH_HLEN + IPV4_HLEN + TCP_HLEN;
const V6_TCP: usize = ETH_HLEN + IPV6_HLEN + TCP_HLEN;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;
const IPPROTO_TCP: u8 = 6;
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

/// Replaces a TCP packet by a RST from the address it was sent to (RFC 9293 3.10.7.1:
/// the acknowledged packet's ACK number as sequence number, or sequence 0 acknowledging
/// everything it carried). False when it cannot be built (then the caller drops it).
#[inline(always)]
pub fn build_rst<C: Pkt>(c: &C, f: &Flow) -> bool {
    let Some(s) = LB_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let s = unsafe { &mut *s };
    if f.family == FAMILY_V4 {
        if f.l4_off as usize != ETH_HLEN + IPV4_HLEN {
            return false;
        }
        let orig = view::<V4_TCP>(&mut s.orig);
        let out = view::<V4_TCP>(&mut s.out);
        if !c.load_bytes(0, orig) {
            return false;
        }
        *out = [0; V4_TCP];
        let ip = ETH_HLEN;
        frame(out, orig, ETH_P_IP, V4_TCP);
        out[ip] = 0x45;
        out[ip + 3] = (IPV4_HLEN + TCP_HLEN) as u8;
        out[ip + 8] = HOP_LIMIT;
        out[ip + 9] = IPPROTO_TCP;
        put_words(out, ip + 12, &f.daddr, 1);
        put_words(out, ip + 16, &f.saddr, 1);
        let tot = u16::from_be_bytes([orig[ip + 2], orig[ip + 3]]) as u32;
        let payload = tot.saturating_sub((IPV4_HLEN + tcp_hlen(orig, ETH_HLEN + IPV4_HLEN)) as u32);
        rst_header(out, orig, ETH_HLEN + IPV4_HLEN, payload);
        let pseudo = csum::sum_words(&[f.daddr[0], f.saddr[0]])
            + csum::sum_words(&[(TCP_HLEN as u32).to_be(), u32::from(IPPROTO_TCP).to_be()]);
        let tc = csum::of_bytes(&out[ip + IPV4_HLEN..], pseudo).to_ne_bytes();
        out[ip + IPV4_HLEN + 16] = tc[0];
        out[ip + IPV4_HLEN + 17] = tc[1];
        let hc = csum::of_bytes(&out[ip..ip + IPV4_HLEN], 0).to_ne_bytes();
        out[ip + 10] = hc[0];
        out[ip + 11] = hc[1];
        c.resize(V4_TCP as u32) && c.store_bytes(0, out)
    } else {
        if f.l4_off as usize != ETH_HLEN + IPV6_HLEN {
            return false;
        }
        let orig = view::<V6_TCP>(&mut s.orig);
        let out = view::<V6_TCP>(&mut s.out);
        if !c.load_bytes(0, orig) {
            return false;
        }
        *out = [0; V6_TCP];
        let ip = ETH_HLEN;
        frame(out, orig, ETH_P_IPV6, V6_TCP);
        out[ip] = 0x60;
        out[ip + 5] = TCP_HLEN as u8;
        out[ip + 6] = IPPROTO_TCP;
        out[ip + 7] = HOP_LIMIT;
        put_words(out, ip + 8, &f.daddr, 4);
        put_words(out, ip + 24, &f.saddr, 4);
        let plen = u16::from_be_bytes([orig[ip + 4], orig[ip + 5]]) as u32;
        let payload = plen.saturating_sub(tcp_hlen(orig, ETH_HLEN + IPV6_HLEN) as u32);
        rst_header(out, orig, ETH_HLEN + IPV6_HLEN, payload);
        let pseudo = csum::sum_words(&f.daddr)
            + csum::sum_words(&f.saddr)
            + csum::sum_words(&[(TCP_HLEN as u32).to_be(), u32::from(IPPROTO_TCP).to_be()]);
        let tc = csum::of_bytes(&out[ip + IPV6_HLEN..], pseudo).to_ne_bytes();
        out[ip + IPV6_HLEN + 16] = tc[0];
        out[ip + IPV6_HLEN + 17] = tc[1];
        c.resize(V6_TCP as u32) && c.store_bytes(0, out)
    }
}

/// The offending segment's TCP header length (its data offset).
#[inline(always)]
fn tcp_hlen<const N: usize>(orig: &[u8; N], l4: usize) -> usize {
    if l4 + 12 < N {
        usize::from(orig[l4 + 12] >> 4) * 4
    } else {
        TCP_HLEN
    }
}

/// The RST's TCP header at `l4` (the same offset in both frames): ports swapped, then
/// the sequence and acknowledgment numbers RFC 9293 asks for; checksum left at 0.
#[inline(always)]
fn rst_header<const N: usize>(out: &mut [u8; N], orig: &[u8; N], l4: usize, payload: u32) {
    if l4 + TCP_HLEN > N {
        return;
    }
    out[l4] = orig[l4 + 2];
    out[l4 + 1] = orig[l4 + 3];
    out[l4 + 2] = orig[l4];
    out[l4 + 3] = orig[l4 + 1];
    let flags = orig[l4 + 13];
    if flags & TCP_FLAG_ACK != 0 {
        // seq = the segment's ACK number; no ACK.
        let mut i = 0;
        while i < 4 {
            out[l4 + 4 + i] = orig[l4 + 8 + i];
            i += 1;
        }
        out[l4 + 13] = TCP_FLAG_RST;
    } else {
        let seq = u32::from_be_bytes([orig[l4 + 4], orig[l4 + 5], orig[l4 + 6], orig[l4 + 7]]);
        let len =
            payload + u32::from(flags & TCP_FLAG_SYN != 0) + u32::from(flags & TCP_FLAG_FIN != 0);
        let ack = seq.wrapping_add(len).to_be_bytes();
        let mut i = 0;
        while i < 4 {
            out[l4 + 8 + i] = ack[i];
            i += 1;
        }
        out[l4 + 13] = TCP_FLAG_RST | TCP_FLAG_ACK;
    }
    out[l4 + 12] = ((TCP_HLEN / 4) as u8) << 4;
}
