//! The few BPF system calls the bench and the labs need, through the agent's own
//! `svc_lb::datapath::sys` where it has them and made directly otherwise (no loader library):
//! - read svc-lb's pinned maps, to see the moment the datapath stops picking a backend;
//! - switch the kernel's per-program run-time statistics on for a measured window;
//! - give a veth a pass-through XDP program (the two-node lab's wire, see [`xdp_pass`]);
//! - run the agent's tc/XDP programs on test packets (BPF_PROG_TEST_RUN), timed by the
//!   kernel, and sum the memory of the maps an agent holds.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use svc_lb::datapath::sys;
use svc_lb_common::{Backend, MAP_BACKENDS, MAP_SVC4, PROTO_TCP, SCOPE_ALL, Svc4Key, SvcValue};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_LINK_CREATE: libc::c_long = 28;
pub const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a fully initialised, correctly sized prefix of `union bpf_attr`
    // for `cmd`; the kernel reads it and writes only the fields the command defines.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: libc::c_long) -> Result<OwnedFd> {
    let fd = i32::try_from(fd).context("fd out of range")?;
    // SAFETY: the kernel just returned this descriptor to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub use svc_lb::datapath::sys::obj_get;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _pad: [u64; 4],
}

/// Attaches `return XDP_PASS` in native mode to interface `ifindex` of the calling
/// thread's network namespace; the program stays attached while the returned link lives.
///
/// Why a lab needs it: a veth hands frames sent with XDP_TX to its peer's ring, but only
/// wakes the peer to process them when the peer itself runs an XDP program (`veth_xdp_flush`
/// in drivers/net/veth.c). A physical NIC has no such condition: XDP_TX puts the frame on
/// the wire. Giving the LAN-side ends of the lab's veths this program makes them behave as
/// the wire does, without changing what they deliver.
pub fn xdp_pass(ifindex: u32) -> Result<OwnedFd> {
    let prog = load_trivial(BPF_PROG_TYPE_XDP, 2).context("load the pass-through XDP program")?;
    let mut link = LinkCreateAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).context("prog fd")?,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut link)
        .with_context(|| format!("attach the pass-through XDP program to ifindex {ifindex}"))?;
    owned(fd)
}

/// Loads `return <ret>;` as a program of `prog_type` (XDP or SCHED_CLS), unattached.
pub fn load_trivial(prog_type: u32, ret: i32) -> Result<OwnedFd> {
    let [r0, r1, r2, r3] = ret.to_le_bytes();
    // r0 = ret; exit.
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, r0, r1, r2, r3]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    let label: &[u8] = if prog_type == BPF_PROG_TYPE_XDP && ret == 2 {
        b"lab_wire"
    } else {
        b"bench_nop"
    };
    name[..label.len()].copy_from_slice(label);
    let mut load = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: if prog_type == BPF_PROG_TYPE_XDP {
            BPF_XDP
        } else {
            0
        },
        ..Default::default()
    };
    owned(sys_bpf(BPF_PROG_LOAD, &mut load).context("BPF_PROG_LOAD of a trivial program")?)
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// A descriptor of the loaded program with this id.
pub fn prog_fd_by_id(id: u32) -> Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    owned(
        sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
            .with_context(|| format!("open program id {id}"))?,
    )
}

/// One BPF_PROG_TEST_RUN of `frame`: the verdict, the frame after the program, and the
/// kernel's own measure of the run in ns (its timer reads included).
pub fn test_run(prog: &OwnedFd, frame: &[u8]) -> Result<(u32, Vec<u8>, u32)> {
    let r = sys::prog_test_run(prog.as_fd(), frame, frame.len() + 256, 1)?;
    Ok((r.retval, r.data_out, r.duration_ns))
}

/// Kernel memory of the BPF maps process `pid` holds descriptors of: the sum of
/// `memlock` over its map descriptors (each map id once), in bytes, and the map count.
pub fn map_memlock(pid: u32) -> Result<(u64, usize)> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0u64;
    for e in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        let Ok(text) = std::fs::read_to_string(e?.path()) else {
            // The descriptor closed in between.
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += memlock;
        }
    }
    Ok((total, seen.len()))
}

/// Looks `key` up; `Ok(false)` when absent.
fn lookup<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: &OwnedFd,
    key: &K,
    value: &mut V,
) -> Result<bool> {
    Ok(sys::map_lookup(map.as_fd(), key)?
        .map(|v| *value = v)
        .is_some())
}

/// svc-lb's service and backend maps, opened from the agent's pin directory.
pub struct SvcLbMaps {
    svc4: OwnedFd,
    backends: OwnedFd,
}

impl SvcLbMaps {
    pub fn open(bpffs: &Path) -> Result<Self> {
        Ok(Self {
            svc4: obj_get(&bpffs.join(MAP_SVC4))?,
            backends: obj_get(&bpffs.join(MAP_BACKENDS))?,
        })
    }

    /// The backends the datapath can pick for a TCP frontend right now: the master
    /// slot's count, then slots 1..=count and their backend entries. A few map lookups,
    /// so this can be polled every few hundred microseconds.
    pub fn tcp_backends(&self, vip: Ipv4Addr, port: u16) -> Result<Vec<SocketAddrV4>> {
        let mut key = Svc4Key {
            addr_be: u32::from_ne_bytes(vip.octets()),
            port_be: port.to_be(),
            slot: 0,
            proto: PROTO_TCP,
            scope: SCOPE_ALL,
            _pad: [0; 2],
        };
        let mut master: SvcValue = bytemuck::Zeroable::zeroed();
        if !lookup(&self.svc4, &key, &mut master)? {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(master.count as usize);
        for slot in 1..=master.count {
            key.slot = u16::try_from(slot).context("slot out of range")?;
            let mut v: SvcValue = bytemuck::Zeroable::zeroed();
            if !lookup(&self.svc4, &key, &mut v)? {
                continue;
            }
            let mut b: Backend = bytemuck::Zeroable::zeroed();
            if lookup(&self.backends, &v.backend_id, &mut b)? {
                out.push(SocketAddrV4::new(
                    Ipv4Addr::from(b.addr_be[0].to_ne_bytes()),
                    u16::from_be(b.port_be),
                ));
            }
        }
        Ok(out)
    }
}

/// While this lives, the kernel accounts run time and run count for every BPF program.
/// It holds the descriptor of BPF_ENABLE_STATS: the kernel turns the statistics off
/// again when the last such descriptor closes, including when this process is killed,
/// so the switch can never stay on by accident. Where that command is unavailable it
/// falls back to the `kernel.bpf_stats_enabled` sysctl and restores the old value on drop.
pub enum StatsGuard {
    Fd(#[allow(dead_code)] OwnedFd),
    Sysctl { old: String },
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsGuard {
    pub fn enable() -> Result<Self> {
        match sys::enable_stats() {
            Ok(fd) => Ok(Self::Fd(fd)),
            Err(_) => {
                let old = std::fs::read_to_string(STATS_SYSCTL)
                    .with_context(|| format!("read {STATS_SYSCTL}"))?
                    .trim()
                    .to_owned();
                std::fs::write(STATS_SYSCTL, "1")
                    .with_context(|| format!("write {STATS_SYSCTL}"))?;
                Ok(Self::Sysctl { old })
            }
        }
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let Self::Sysctl { old } = self
            && let Err(e) = std::fs::write(STATS_SYSCTL, old.as_bytes())
        {
            eprintln!("svclb-bench: teardown: restore {STATS_SYSCTL}: {e}");
        }
    }
}

/// Run statistics of one program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// The programs attached to `cgroup` (by id → name), from `bpftool cgroup show`.
pub fn cgroup_programs(cgroup: &Path) -> Result<BTreeMap<u64, String>> {
    let out = crate::cmd::run(
        "bpftool",
        [
            "-j".as_ref(),
            "cgroup".as_ref(),
            "show".as_ref(),
            cgroup.as_os_str(),
        ],
    )?;
    if out.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let v: Value = serde_json::from_str(out.trim()).context("parse `bpftool cgroup show`")?;
    let mut m = BTreeMap::new();
    for p in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        if let (Some(id), Some(name)) = (p["id"].as_u64(), p["name"].as_str()) {
            m.insert(id, name.to_owned());
        }
    }
    Ok(m)
}

/// Current run statistics of the given programs (`bpftool prog show id N`).
pub fn prog_stats(ids: &BTreeMap<u64, String>) -> Result<BTreeMap<u64, ProgStats>> {
    let mut out = BTreeMap::new();
    for (id, name) in ids {
        let text = crate::cmd::run("bpftool", ["-j", "prog", "show", "id", &id.to_string()])?;
        let v: Value = serde_json::from_str(text.trim()).context("parse `bpftool prog show`")?;
        out.insert(
            *id,
            ProgStats {
                name: name.clone(),
                // bpftool leaves both fields out while they are zero.
                run_cnt: v["run_cnt"].as_u64().unwrap_or(0),
                run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0),
            },
        );
    }
    Ok(out)
}

/// `after − before` per program; fails if a program vanished in between (the agent
/// swapped it), because the difference would then be meaningless.
pub fn delta(
    before: &BTreeMap<u64, ProgStats>,
    after: &BTreeMap<u64, ProgStats>,
) -> Result<Vec<ProgStats>> {
    let mut out = Vec::new();
    for (id, a) in after {
        let Some(b) = before.get(id) else {
            bail!("program {id} ({}) appeared during the window", a.name);
        };
        out.push(ProgStats {
            name: a.name.clone(),
            run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
            run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
        });
    }
    Ok(out)
}
