//! Opt-in debug log of the socket programs' decisions (`svc-lb agent --bpf-log`),
//! through aya-log.
//!
//! Cost when off: [`SVCLB_BPF_LOG`] is a global in `.rodata`, which aya freezes before
//! loading, so the verifier knows it is 0, sees the logging branches as dead and removes
//! them (`bpftool prog show` reports the same xlated size as an object without them; the
//! README has the numbers).
use aya_ebpf::{Global, programs::SockAddrContext};
use aya_log_ebpf::debug;

/// 1 when the agent runs with `--bpf-log`; set at load time with
/// `EbpfLoader::override_global`.
#[unsafe(no_mangle)]
static SVCLB_BPF_LOG: Global<u8> = Global::new(0);

#[inline(always)]
pub fn enabled() -> bool {
    SVCLB_BPF_LOG.load() != 0
}

/// A socket address as the hook saw it: network-order words and port.
#[derive(Clone, Copy)]
pub struct Dest {
    pub addr_be: [u32; 4],
    pub port_be: u16,
}

#[inline(always)]
pub fn dest4(ctx: &SockAddrContext) -> Dest {
    let sa = ctx.sock_addr;
    // bpf_sock_addr accepts only 4-byte loads.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    Dest {
        addr_be: [ip, 0, 0, 0],
        port_be: port as u16,
    }
}

#[inline(always)]
pub fn dest6(ctx: &SockAddrContext) -> Dest {
    let sa = ctx.sock_addr;
    let (a, port) = unsafe {
        (
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port,
        )
    };
    Dest {
        addr_be: a,
        port_be: port as u16,
    }
}

#[inline(always)]
fn bytes16(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let x = w[i].to_ne_bytes();
        b[i * 4] = x[0];
        b[i * 4 + 1] = x[1];
        b[i * 4 + 2] = x[2];
        b[i * 4 + 3] = x[3];
        i += 1;
    }
    b
}

/// One line per decision: the hook, the address dialled, the address after the
/// program ran (the same one when it is not a Service), and the verdict (1 allow,
/// 0 reject).
#[inline(always)]
pub fn forward4(ctx: &SockAddrContext, hook: &str, before: Dest, verdict: i32) {
    let after = dest4(ctx);
    debug!(
        ctx,
        target: "svclb_ebpf",
        "{} {:i}:{} -> {:i}:{} verdict {}",
        hook,
        before.addr_be[0].to_ne_bytes(),
        u16::from_be(before.port_be),
        after.addr_be[0].to_ne_bytes(),
        u16::from_be(after.port_be),
        verdict
    );
}

#[inline(always)]
pub fn forward6(ctx: &SockAddrContext, hook: &str, before: Dest, verdict: i32) {
    let after = dest6(ctx);
    debug!(
        ctx,
        target: "svclb_ebpf",
        "{} [{:i}]:{} -> [{:i}]:{} verdict {}",
        hook,
        bytes16(before.addr_be),
        u16::from_be(before.port_be),
        bytes16(after.addr_be),
        u16::from_be(after.port_be),
        verdict
    );
}
