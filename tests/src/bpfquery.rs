//! Which programs are attached to a cgroup or a device's TCX hooks, asked of the kernel
//! directly (BPF_PROG_QUERY). bpftool answers the same question but takes milliseconds to start;
//! this takes microseconds, which matters when a test checks the state at the exact
//! moment the agent claims to be ready. The system call itself is the agent's
//! (`svc_lb::datapath::sys::prog_query`).
use std::{collections::BTreeMap, fs::File, os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result};
use svc_lb::datapath::sys;

/// The cgroup attach points of the agent's programs (enum bpf_attach_type), with names.
pub const SOCK_ATTACH_TYPES: [(u32, &str); 8] = [
    (10, "cgroup_inet4_connect"),
    (11, "cgroup_inet6_connect"),
    (14, "cgroup_udp4_sendmsg"),
    (15, "cgroup_udp6_sendmsg"),
    (19, "cgroup_udp4_recvmsg"),
    (20, "cgroup_udp6_recvmsg"),
    (29, "cgroup_inet4_getpeername"),
    (30, "cgroup_inet6_getpeername"),
];

/// Number of programs attached directly to `cgroup` at each of [`SOCK_ATTACH_TYPES`].
pub fn sock_program_counts(cgroup: &Path) -> Result<Vec<(&'static str, u32)>> {
    let dir = File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
    let fd = u32::try_from(dir.as_raw_fd()).context("fd")?;
    SOCK_ATTACH_TYPES
        .iter()
        .map(|(attach_type, name)| {
            let q = sys::prog_query(fd, *attach_type, 0)
                .with_context(|| format!("{name} on {}", cgroup.display()))?;
            Ok((*name, q.count))
        })
        .collect()
}

/// `(link id, program id)` of every program at the TCX ingress and egress hooks of
/// interface `ifindex` (of the calling thread's namespace), keyed `tcx_ingress` /
/// `tcx_egress` like `svc-lb status`.
pub fn tcx_programs(ifindex: u32) -> Result<BTreeMap<String, Vec<(u64, u64)>>> {
    let mut out = BTreeMap::new();
    for (attach_type, hook) in [(46u32, "tcx_ingress"), (47, "tcx_egress")] {
        let q = sys::prog_query(ifindex, attach_type, 8)
            .with_context(|| format!("{hook} on ifindex {ifindex}"))?;
        out.insert(
            hook.to_owned(),
            q.link_ids
                .iter()
                .zip(&q.prog_ids)
                .map(|(l, p)| (u64::from(*l), u64::from(*p)))
                .collect(),
        );
    }
    Ok(out)
}
