//! Which programs are attached to a cgroup or a device's TCX hooks, asked of the kernel
//! directly (BPF_PROG_QUERY). bpftool answers the same question but takes milliseconds to start;
//! this takes microseconds, which matters when a test checks the state at the exact
//! moment the agent claims to be ready.
use std::{collections::BTreeMap, fs::File, os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result};

const BPF_PROG_QUERY: libc::c_long = 16;

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

/// The `query` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    /// A cgroup's fd, or a device's interface index for TCX (a union in the kernel).
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Number of programs attached directly to `cgroup` at each of [`SOCK_ATTACH_TYPES`].
pub fn sock_program_counts(cgroup: &Path) -> Result<Vec<(&'static str, u32)>> {
    let dir = File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
    let mut out = Vec::with_capacity(SOCK_ATTACH_TYPES.len());
    for (attach_type, name) in SOCK_ATTACH_TYPES {
        let mut attr = QueryAttr {
            target_fd: u32::try_from(dir.as_raw_fd()).context("fd")?,
            attach_type,
            ..Default::default()
        };
        query(&mut attr)
            .with_context(|| format!("BPF_PROG_QUERY {name} on {}", cgroup.display()))?;
        out.push((name, attr.prog_cnt));
    }
    Ok(out)
}

/// `(link id, program id)` of every program at the TCX ingress and egress hooks of
/// interface `ifindex` (of the calling thread's namespace), keyed `tcx_ingress` /
/// `tcx_egress` like `svc-lb status`.
pub fn tcx_programs(ifindex: u32) -> Result<BTreeMap<String, Vec<(u64, u64)>>> {
    let mut out = BTreeMap::new();
    for (attach_type, hook) in [(46u32, "tcx_ingress"), (47, "tcx_egress")] {
        let mut progs = [0u32; 8];
        let mut links = [0u32; 8];
        let mut attr = QueryAttr {
            target_fd: ifindex,
            attach_type,
            prog_ids: progs.as_mut_ptr() as u64,
            prog_cnt: progs.len() as u32,
            link_ids: links.as_mut_ptr() as u64,
            ..Default::default()
        };
        query(&mut attr).with_context(|| format!("BPF_PROG_QUERY {hook} on ifindex {ifindex}"))?;
        let cnt = (attr.prog_cnt as usize).min(progs.len());
        out.insert(
            hook.to_owned(),
            (0..cnt)
                .map(|i| (u64::from(links[i]), u64::from(progs[i])))
                .collect(),
        );
    }
    Ok(out)
}

fn query(attr: &mut QueryAttr) -> std::io::Result<()> {
    // SAFETY: attr is a fully initialised bpf_attr prefix of the size passed; the kernel
    // writes prog_cnt and attach_flags back, and at most prog_cnt ids into the id arrays
    // the caller set (which outlive the call); with prog_ids = 0 it writes no ids.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
