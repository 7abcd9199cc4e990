//! svc-lb eBPF programs. Entry points live here, maps in `maps.rs`; the logic is in
//! `sock.rs` (socket path) and `ext.rs` (external path, wrapped by `tc.rs` and `xdp.rs`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `asm!` for the `rr` cursor's atomic fetch-add (sock.rs `next_in_turn`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod compat;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod debug;
#[cfg(target_arch = "bpf")]
mod ext;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod pkt;
#[cfg(target_arch = "bpf")]
mod pod;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod rnat;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod sockops;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
mod entry {
    use aya_ebpf::{
        macros::{cgroup_sock_addr, classifier, sock_ops, xdp},
        programs::{SockAddrContext, SockOpsContext, TcContext, XdpContext},
    };

    use crate::{
        debug,
        sock::{self, Family, lc},
    };

    /// Runs a forward hook, logging its decision when `--bpf-log` is on. The flag is
    /// read once; when it is off the verifier drops both branches (see `debug.rs`).
    #[inline(always)]
    fn forward_logged<const LC: u8>(
        ctx: &SockAddrContext,
        family: Family,
        hook: &str,
        sendmsg: bool,
    ) -> i32 {
        let log = debug::enabled();
        let before = match (log, family) {
            (false, _) => None,
            (true, Family::V4) => Some(debug::dest4(ctx)),
            (true, Family::V6) => Some(debug::dest6(ctx)),
        };
        let verdict = sock::forward::<LC>(ctx, family, sendmsg);
        if let Some(before) = before {
            match family {
                Family::V4 => debug::forward4(ctx, hook, before, verdict),
                Family::V6 => debug::forward6(ctx, hook, before, verdict),
            }
        }
        verdict
    }

    #[cgroup_sock_addr(connect4)]
    pub fn svclb_connect4(ctx: SockAddrContext) -> i32 {
        forward_logged::<{ lc::TAIL_CALL }>(&ctx, Family::V4, "connect4", false)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn svclb_connect6(ctx: SockAddrContext) -> i32 {
        forward_logged::<{ lc::TAIL_CALL }>(&ctx, Family::V6, "connect6", false)
    }

    /// `lc`/`wlc` frontends: the connect hooks tail-call these (program arrays
    /// `LB_LCPROG4`/`6`), which the agent loads where it keeps connection counts. The
    /// connect hook's code with the exact scan; the attach type is the caller's, as a
    /// tail call requires.
    #[cgroup_sock_addr(connect4)]
    pub fn svclb_lc4(ctx: SockAddrContext) -> i32 {
        forward_logged::<{ lc::SCAN }>(&ctx, Family::V4, "connect4", false)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn svclb_lc6(ctx: SockAddrContext) -> i32 {
        forward_logged::<{ lc::SCAN }>(&ctx, Family::V6, "connect6", false)
    }

    /// The lc programs of kernels with `bpf_loop` (5.17): every slot of a frontend
    /// compared, a callback per step (`sock::lc::SCAN_LOOP`). The agent loads these
    /// instead of `svclb_lc4`/`6` where its probe finds the helper.
    #[cgroup_sock_addr(connect4)]
    pub fn svclb_lcloop4(ctx: SockAddrContext) -> i32 {
        forward_logged::<{ lc::SCAN_LOOP }>(&ctx, Family::V4, "connect4", false)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn svclb_lcloop6(ctx: SockAddrContext) -> i32 {
        forward_logged::<{ lc::SCAN_LOOP }>(&ctx, Family::V6, "connect6", false)
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn svclb_sendmsg4(ctx: SockAddrContext) -> i32 {
        forward_logged::<{ lc::RANDOM }>(&ctx, Family::V4, "sendmsg4", true)
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn svclb_sendmsg6(ctx: SockAddrContext) -> i32 {
        forward_logged::<{ lc::RANDOM }>(&ctx, Family::V6, "sendmsg6", true)
    }

    #[cgroup_sock_addr(recvmsg4)]
    pub fn svclb_recvmsg4(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx, Family::V4)
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn svclb_recvmsg6(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx, Family::V6)
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn svclb_getpeer4(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx, Family::V4)
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn svclb_getpeer6(ctx: SockAddrContext) -> i32 {
        sock::reverse(&ctx, Family::V6)
    }

    /// Connection counts: TCP state changes of the sockets the connect hooks
    /// translated (attached to the same cgroup, only when the kernel has it).
    #[sock_ops]
    pub fn svclb_sockops(ctx: SockOpsContext) -> u32 {
        crate::sockops::handle(&ctx)
    }

    /// External path, TCX ingress on each device.
    #[classifier]
    pub fn svclb_tc_in(ctx: TcContext) -> i32 {
        crate::tc::ingress(&ctx)
    }

    /// External path, TCX egress on each device.
    #[classifier]
    pub fn svclb_tc_out(ctx: TcContext) -> i32 {
        crate::tc::egress(&ctx)
    }

    /// Per-packet path for pod traffic, TCX ingress on each pod device (from the pod).
    #[classifier]
    pub fn svclb_pod_in(ctx: TcContext) -> i32 {
        crate::pod::from_pod(&ctx)
    }

    /// Per-packet path for pod traffic, TCX egress on each pod device (into the pod).
    #[classifier]
    pub fn svclb_pod_out(ctx: TcContext) -> i32 {
        crate::pod::to_pod(&ctx)
    }

    /// External path, forward direction in native XDP (`--xdp`).
    #[xdp]
    pub fn svclb_xdp(ctx: XdpContext) -> u32 {
        crate::xdp::forward(&ctx)
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

// Host builds (cargo check/clippy --workspace) see an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
