//! The per-packet path for pod traffic: `--socket-lb-scope` (which sockets the socket
//! programs translate) and `--pod-devices` (where the tc programs of
//! svc-lb-ebpf/src/pod.rs attach).
use std::os::fd::AsRawFd;

use anyhow::{Context, Result, bail};
use aya::{Ebpf, programs::TcAttachType};
use clap::ValueEnum;
use svc_lb_common::{PROG_POD_EGRESS, PROG_POD_INGRESS};

use super::{links, probe::TcAttach};

/// `--socket-lb-scope`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SocketLbScope {
    /// Every socket on the node (in every network namespace of the cgroup).
    #[default]
    All,
    /// Only sockets in the host network namespace (the agent's); pods' traffic is
    /// translated per packet on `--pod-devices`.
    Host,
}

impl SocketLbScope {
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Host => "host",
        }
    }
}

/// The cookie of this process's network namespace, as `bpf_get_netns_cookie` returns it
/// in the socket programs. `SO_NETNS_COOKIE` exists since Linux 5.14.
pub fn own_netns_cookie() -> Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .context("open a socket to read the network namespace cookie")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    if cookie == 0 {
        bail!("getsockopt(SO_NETNS_COOKIE) returned 0");
    }
    Ok(cookie)
}

/// The value of the programs' `SVCLB_HOST_NETNS`: 0 translates every socket.
pub fn host_netns_cookie(scope: SocketLbScope) -> Result<u64> {
    match scope {
        SocketLbScope::All => Ok(0),
        SocketLbScope::Host => own_netns_cookie().context(
            "--socket-lb-scope host needs the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14 or later); use --socket-lb-scope all on this kernel",
        ),
    }
}

/// The tc programs of the per-packet path and their hooks.
pub const POD_PROGRAMS: [(&str, TcAttachType); 2] = [
    (PROG_POD_INGRESS, TcAttachType::Ingress),
    (PROG_POD_EGRESS, TcAttachType::Egress),
];

/// Attaches (or swaps in) the per-packet programs on each pod device, pinned as
/// `links/<program>@<device>` like the external path's.
pub fn attach(
    ebpf: &mut Ebpf,
    bpffs: &std::path::Path,
    devices: &[String],
    tc: TcAttach,
) -> Result<()> {
    links::attach_tc_programs(ebpf, bpffs, devices, &POD_PROGRAMS, tc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_scope_needs_no_cookie_and_host_scope_reads_a_nonzero_one() {
        assert_eq!(host_netns_cookie(SocketLbScope::All).unwrap(), 0);
        // Kernels before 5.14 refuse the option: the error names the flag.
        match host_netns_cookie(SocketLbScope::Host) {
            Ok(c) => assert_ne!(c, 0),
            Err(e) => assert!(format!("{e:#}").contains("--socket-lb-scope"), "{e:#}"),
        }
    }
}
