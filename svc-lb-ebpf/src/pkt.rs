//! One packet interface over the two contexts the external path runs in, so that the
//! parsing, conntrack, NAT and reject code exists once (`ext.rs`) and tc and XDP are
//! thin wrappers (`tc.rs`, `xdp.rs`) that cannot drift apart.
//!
//! - tc: every read and write goes through the skb helpers (`bpf_skb_load_bytes`,
//!   `bpf_skb_store_bytes`, `bpf_l3/l4_csum_replace`). The checksum helpers know the
//!   skb's `ip_summed`: with CHECKSUM_PARTIAL (a veth peer with tx offload) only the
//!   pseudo-header part of the L4 checksum is updated, as the device completes the rest.
//! - XDP: direct packet access with bounds checks, and checksums updated incrementally
//!   as full checksums (XDP has no offload state; a NIC hands it finished checksums).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{
        bpf_csum_update, bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_skb_change_tail,
        bpf_skb_load_bytes, bpf_skb_store_bytes, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};

use crate::csum;

/// `BPF_F_IPV6` for `bpf_l4_csum_replace` (kernel ≥ 6.16, probed by the agent; absent
/// from the bindings):
/// an IPv6 pseudo-header change must not touch `skb->csum` of a CHECKSUM_COMPLETE skb,
/// because IPv6 has no header checksum that would cancel the address change out.
const BPF_F_IPV6: u64 = 1 << 7;

/// What the shared code needs from a packet.
pub trait Pkt {
    /// Reads a `T` at byte `off` of the frame, or `None` past its end.
    fn load<T: Copy>(&self, off: usize) -> Option<T>;
    /// Writes `v` at byte `off`; false when it does not fit or the helper failed.
    fn store<T: Copy>(&self, off: usize, v: &T) -> bool;
    /// Copies `N` bytes from byte `off` of the frame into `dst`.
    fn load_bytes<const N: usize>(&self, off: usize, dst: &mut [u8; N]) -> bool;
    /// Copies `src` into the frame at byte `off`.
    fn store_bytes<const N: usize>(&self, off: usize, src: &[u8; N]) -> bool;
    /// Applies a checksum difference (see [`csum::diff`]) to the IPv4 header checksum
    /// at `off`.
    fn csum_l3(&self, off: usize, diff: u32) -> bool;
    /// Applies a checksum difference to the TCP/UDP/ICMPv6 checksum at `off`. `pseudo`:
    /// the difference comes from pseudo-header fields (addresses). `udp4`: an IPv4 UDP
    /// checksum, where 0 means "none" and must stay 0, and a computed 0 is sent as
    /// 0xffff.
    fn csum_l4(&self, off: usize, diff: u32, pseudo: bool, udp4: bool, v6: bool) -> bool;
    /// Makes the frame exactly `len` bytes long (the reject path); the caller rewrites
    /// all of it afterwards, so where the bytes are added or cut does not matter.
    fn resize(&self, len: u32) -> bool;
    /// Whether a reject built here can be sent back out the device. tc always can; XDP
    /// only where the agent marked XDP_TX as working (see `xdp::tx_trusted`).
    #[inline(always)]
    fn can_reject(&self) -> bool {
        true
    }
}

impl Pkt for TcContext {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        TcContext::load::<T>(self, off).ok()
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> bool {
        let ret = unsafe {
            bpf_skb_store_bytes(
                self.skb.skb,
                off as u32,
                (v as *const T).cast(),
                core::mem::size_of::<T>() as u32,
                0,
            )
        };
        ret == 0
    }

    #[inline(always)]
    fn load_bytes<const N: usize>(&self, off: usize, dst: &mut [u8; N]) -> bool {
        unsafe {
            bpf_skb_load_bytes(
                self.skb.skb as *const _,
                off as u32,
                dst.as_mut_ptr().cast(),
                N as u32,
            ) == 0
        }
    }

    #[inline(always)]
    fn store_bytes<const N: usize>(&self, off: usize, src: &[u8; N]) -> bool {
        unsafe {
            bpf_skb_store_bytes(self.skb.skb, off as u32, src.as_ptr().cast(), N as u32, 0) == 0
        }
    }

    #[inline(always)]
    fn csum_l3(&self, off: usize, diff: u32) -> bool {
        unsafe { bpf_l3_csum_replace(self.skb.skb, off as u32, 0, u64::from(diff), 0) == 0 }
    }

    #[inline(always)]
    fn csum_l4(&self, off: usize, diff: u32, pseudo: bool, udp4: bool, v6: bool) -> bool {
        let mut flags = 0u64;
        // Kernels < 6.16 reject BPF_F_IPV6 (EINVAL) and instead take an IPv6
        // pseudo-header change out of a CHECKSUM_COMPLETE skb's `csum` as if an IPv4
        // header checksum had absorbed it; adding the difference back afterwards
        // (bpf_csum_update, a no-op for other skbs) restores exactly what the flag keeps.
        let compat_v6 = pseudo && v6 && !crate::compat::csum_ipv6_flag();
        if pseudo {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
            if v6 && !compat_v6 {
                flags |= BPF_F_IPV6;
            }
        }
        if udp4 {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        let ok = unsafe {
            bpf_l4_csum_replace(self.skb.skb, off as u32, 0, u64::from(diff), flags) == 0
        };
        if ok && compat_v6 {
            unsafe { bpf_csum_update(self.skb.skb, diff) };
        }
        ok
    }

    #[inline(always)]
    fn resize(&self, len: u32) -> bool {
        unsafe { bpf_skb_change_tail(self.skb.skb, len, 0) == 0 }
    }
}

/// Largest header offset the XDP side reads or writes. Offsets come from `Flow` fields
/// kept in memory, whose range the verifier does not know: without this bound it
/// refuses the packet pointer arithmetic.
const MAX_OFF: usize = 1024;

/// `off` when it is at most [`MAX_OFF`], bounded in the register the packet pointer
/// arithmetic uses. Linux 5.10's and 6.1's verifiers narrow only the register a
/// comparison reads, not the stack slot it was filled from: when LLVM compared a fill of
/// `off` and later filled it again from the same slot for the pointer arithmetic, the
/// bound was gone and the XDP program was refused (`R1 offset is outside of the packet`,
/// found by `cargo xtask kernels`; 6.18 carries the bound to the slot). The mask, written
/// as an instruction so that LLVM cannot drop it as redundant after the comparison,
/// bounds the value the arithmetic gets whichever copy it is (an empty asm does not do:
/// it leaves two line-info records at one instruction, which the kernel refuses). One
/// ALU instruction per access; the mask never changes a value that passed the check.
#[inline(always)]
fn checked_off(off: usize) -> Option<usize> {
    if off > MAX_OFF {
        return None;
    }
    let mut off = off;
    // SAFETY: a register-only AND. Not `pure`: LLVM must not hoist it above the
    // comparison.
    unsafe { core::arch::asm!("{0} &= 2047", inout(reg) off, options(nomem, nostack)) };
    Some(off)
}

/// The mask of [`checked_off`] must keep every offset up to [`MAX_OFF`].
const _: () = assert!(MAX_OFF < 2048);

/// Header fields are read and written with plain loads and stores of their own width,
/// not `read_unaligned`: the BPF target cannot assume misaligned access (aya-build sets
/// no `allows-misaligned-mem-access`), so an unaligned `u32` read becomes four byte
/// loads, shifts and ors (plain loads cut the XDP program's parse and rewrite from 503
/// to 335 instructions; a few ns per packet, see README, Kernel support).
/// Every caller reads a field at its natural offset in the headers (IPv4/IPv6 header at
/// 14, L4 header at 14 plus a multiple of 4), which is aligned in the verifier's own
/// model of packet data (`NET_IP_ALIGN` = 2 bytes before the frame), so a kernel with
/// strict alignment accepts the same code, and the JITs of machines with efficient
/// unaligned access (x86-64, arm64) emit one load wherever the driver put the frame.
impl Pkt for XdpContext {
    #[inline(always)]
    fn can_reject(&self) -> bool {
        crate::xdp::tx_trusted(self)
    }

    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let Some(off) = checked_off(off) else {
            return None;
        };
        let start = self.data();
        let end = self.data_end();
        if start + off + core::mem::size_of::<T>() > end {
            return None;
        }
        // SAFETY: bounds checked above; a plain read of `T`'s width on purpose (see
        // the impl's comment).
        Some(unsafe { core::ptr::read((start + off) as *const T) })
    }

    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> bool {
        let Some(off) = checked_off(off) else {
            return false;
        };
        let start = self.data();
        let end = self.data_end();
        if start + off + core::mem::size_of::<T>() > end {
            return false;
        }
        // SAFETY: bounds checked above; a plain store on purpose (see the impl's comment).
        unsafe { core::ptr::write((start + off) as *mut T, *v) };
        true
    }

    #[inline(always)]
    fn load_bytes<const N: usize>(&self, off: usize, dst: &mut [u8; N]) -> bool {
        let Some(off) = checked_off(off) else {
            return false;
        };
        let start = self.data();
        if start + off + N > self.data_end() {
            return false;
        }
        unsafe { core::ptr::copy_nonoverlapping((start + off) as *const u8, dst.as_mut_ptr(), N) };
        true
    }

    #[inline(always)]
    fn store_bytes<const N: usize>(&self, off: usize, src: &[u8; N]) -> bool {
        let Some(off) = checked_off(off) else {
            return false;
        };
        let start = self.data();
        if start + off + N > self.data_end() {
            return false;
        }
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), (start + off) as *mut u8, N) };
        true
    }

    #[inline(always)]
    fn csum_l3(&self, off: usize, diff: u32) -> bool {
        let Some(old) = Pkt::load::<u16>(self, off) else {
            return false;
        };
        self.store(off, &csum::apply(old, diff))
    }

    #[inline(always)]
    fn csum_l4(&self, off: usize, diff: u32, _pseudo: bool, udp4: bool, _v6: bool) -> bool {
        let Some(old) = Pkt::load::<u16>(self, off) else {
            return false;
        };
        if udp4 && old == 0 {
            // IPv4 UDP without a checksum stays without one.
            return true;
        }
        let mut new = csum::apply(old, diff);
        if udp4 && new == 0 {
            new = 0xffff;
        }
        self.store(off, &new)
    }

    /// Grows at the head and shrinks at the tail. A frame that a veth built from an skb
    /// has no tailroom, so `bpf_xdp_adjust_tail` cannot grow it (a small UDP datagram
    /// is shorter than its ICMP reply), whereas every XDP frame has at least
    /// XDP_PACKET_HEADROOM (256 bytes) in front.
    #[inline(always)]
    fn resize(&self, len: u32) -> bool {
        let delta = len as i32 - (self.data_end() - self.data()) as i32;
        let ret = if delta > 0 {
            unsafe { bpf_xdp_adjust_head(self.ctx, -delta) }
        } else if delta < 0 {
            unsafe { bpf_xdp_adjust_tail(self.ctx, delta) }
        } else {
            0
        };
        ret == 0
    }
}
