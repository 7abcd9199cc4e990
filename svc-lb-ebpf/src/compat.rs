//! Switches for kernels older than the newest helper a path uses, chosen by the agent's
//! feature probe (svc-lb/src/datapath/probe.rs) and set at load time with
//! `EbpfLoader::override_global`.
//!
//! Each is a global in `.rodata`, which aya freezes before loading: the verifier knows
//! its value, follows only the branch it selects and removes the other one before it
//! resolves helper calls, so a helper the kernel does not have may sit in the dead
//! branch (kernels ≥ 5.2 track frozen read-only maps this way). The defaults are the
//! modern choices, which the packet tests load.
use aya_ebpf::{
    Global,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};

/// 1: `bpf_set_retval` (5.18) chooses the errno of a refused connect (ECONNREFUSED);
/// 0: the refusal surfaces as EPERM.
#[unsafe(no_mangle)]
static SVCLB_SET_RETVAL: Global<u8> = Global::new(1);

/// 1: `bpf_l4_csum_replace` takes `BPF_F_IPV6` (6.16); 0: the flag is left out and the
/// skb checksum is corrected with `bpf_csum_update` afterwards (see `pkt.rs`).
#[unsafe(no_mangle)]
static SVCLB_CSUM_IPV6_FLAG: Global<u8> = Global::new(1);

/// 1: tc sends SNAT flows itself with `bpf_fib_lookup` + `bpf_redirect_neigh` (5.10)
/// and `bpf_check_mtu` (5.12); 0: they go to the stack's forwarding (`tc.rs`).
#[unsafe(no_mangle)]
static SVCLB_FIB_REDIRECT: Global<u8> = Global::new(1);

/// 1: sockets keep their reverse NAT in socket-local storage (`bpf_sk_storage_get` in
/// sock_addr programs, 5.3); 0: the LRU maps keyed by socket cookie (see `rnat.rs`).
#[unsafe(no_mangle)]
static SVCLB_SK_STORAGE: Global<u8> = Global::new(1);

/// 1: the pin of the pre-V2 socket store (`LB_SKRNATSK_V1`) existed when the agent
/// started: recvmsg/getpeername read it after a miss in `LB_SKRNATSK_V2`, for sockets
/// that dialled a Service before the upgrade; 0: no such sockets, nothing extra.
#[unsafe(no_mangle)]
static SVCLB_SK_RNAT_V1: Global<u8> = Global::new(0);

/// 1: BPF atomics with BPF_FETCH (5.12): the `rr`/`wrr` cursor is one atomic fetch-add;
/// 0: a plain read and write (see `sock.rs` `next_in_turn`).
#[unsafe(no_mangle)]
static SVCLB_ATOMIC_FETCH: Global<u8> = Global::new(1);

/// 1: the agent loads the `lc`/`wlc` programs into the program arrays (a node with
/// connection counts), and the connect hooks tail-call them for `lc`/`wlc` frontends;
/// 0: no tail call at all (the verifier removes it; no frontend is `lc`/`wlc` then).
#[unsafe(no_mangle)]
static SVCLB_LC_LOOP: Global<u8> = Global::new(1);

#[inline(always)]
pub fn lc_loop() -> bool {
    SVCLB_LC_LOOP.load() != 0
}

#[inline(always)]
pub fn atomic_fetch() -> bool {
    SVCLB_ATOMIC_FETCH.load() != 0
}

#[inline(always)]
pub fn sk_rnat_v1() -> bool {
    SVCLB_SK_RNAT_V1.load() != 0
}

#[inline(always)]
pub fn set_retval() -> bool {
    SVCLB_SET_RETVAL.load() != 0
}

#[inline(always)]
pub fn csum_ipv6_flag() -> bool {
    SVCLB_CSUM_IPV6_FLAG.load() != 0
}

#[inline(always)]
pub fn fib_redirect() -> bool {
    SVCLB_FIB_REDIRECT.load() != 0
}

#[inline(always)]
pub fn sk_storage() -> bool {
    SVCLB_SK_STORAGE.load() != 0
}

/// 1: the external path's conntrack and affinity times come from
/// `bpf_ktime_get_coarse_ns` (5.11), the clock of the last timer tick; 0:
/// `bpf_ktime_get_ns`. Both are CLOCK_MONOTONIC; the coarse one lags by at most one
/// tick (1 to 10 ms with HZ 1000 to 100), far below the lifetimes it measures (seconds),
/// and reading it costs a load where the precise one reads the clock source (about
/// 35 ns of an XDP packet in a VM).
#[unsafe(no_mangle)]
static SVCLB_COARSE_CLOCK: Global<u8> = Global::new(1);

/// CLOCK_MONOTONIC in ns for the external path (see `SVCLB_COARSE_CLOCK`).
#[inline(always)]
pub fn ext_now_ns() -> u64 {
    if SVCLB_COARSE_CLOCK.load() != 0 {
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        unsafe { bpf_ktime_get_ns() }
    }
}
