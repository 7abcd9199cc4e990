//! What is attached and how full the maps are, read from the pins: the programs
//! behind the pinned links and netlink records (with the kernel's run statistics) and
//! each pinned map's entries against its capacity. For `svc-lb status` and the metrics
//! collector; read-only like the rest of [`super`].
use std::{
    collections::HashMap,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, MapType};
use serde::Serialize;

use crate::datapath::{
    pins::{links_dir, tc_netlink_dir},
    sys,
};

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ProgramStatus {
    /// The program's kernel name, e.g. `svclb_connect4`.
    pub name: String,
    pub prog_id: u32,
    pub link_id: u32,
    /// e.g. `cgroup_sock_addr`.
    pub prog_type: String,
    /// The hook, e.g. `connect4`, `sendmsg6`.
    pub attach_type: String,
    /// What the link is attached to, e.g. the cgroup path.
    pub attached_to: String,
    pub pin: String,
    /// Size after the verifier rewrote it, in bytes.
    pub xlated_bytes: u32,
    pub jited_bytes: u32,
    /// Run count and time; they only grow while `kernel.bpf_stats_enabled=1`.
    pub run_count: u64,
    pub run_time_ns: u64,
    pub loaded_at_ms: Option<u64>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct MapStatus {
    pub name: String,
    pub map_id: u32,
    pub map_type: String,
    /// Entries in use. Arrays are always full, so for them this is the capacity.
    pub entries: u64,
    pub capacity: u64,
}

/// `bpf_attach_type` names (linux/bpf.h) for the hooks svc-lb uses or may use.
fn attach_type_name(t: u32) -> String {
    match t {
        3 => "sock_ops".into(),
        10 => "connect4".into(),
        11 => "connect6".into(),
        14 => "sendmsg4".into(),
        15 => "sendmsg6".into(),
        19 => "recvmsg4".into(),
        20 => "recvmsg6".into(),
        29 => "getpeername4".into(),
        30 => "getpeername6".into(),
        37 => "xdp".into(),
        46 => "tcx_ingress".into(),
        47 => "tcx_egress".into(),
        other => format!("attach_type {other}"),
    }
}

/// `bpf_link_type` names (linux/bpf.h).
fn link_type_name(t: u32) -> &'static str {
    match t {
        1 => "raw_tracepoint",
        2 => "tracing",
        3 => "cgroup",
        4 => "iter",
        5 => "netns",
        6 => "xdp",
        7 => "perf_event",
        8 => "kprobe_multi",
        9 => "struct_ops",
        10 => "netfilter",
        11 => "tcx",
        12 => "uprobe_multi",
        13 => "netkit",
        _ => "unknown",
    }
}

fn map_type_name(t: Option<MapType>) -> String {
    match t {
        Some(MapType::Hash) => "hash".into(),
        Some(MapType::LruHash) => "lru_hash".into(),
        Some(MapType::PerCpuHash) => "percpu_hash".into(),
        Some(MapType::LruPerCpuHash) => "lru_percpu_hash".into(),
        Some(MapType::Array) => "array".into(),
        Some(MapType::PerCpuArray) => "percpu_array".into(),
        Some(MapType::RingBuf) => "ringbuf".into(),
        Some(other) => format!("{other:?}").to_lowercase(),
        None => "unknown".into(),
    }
}

fn prog_type_name(t: impl std::fmt::Debug) -> String {
    let s = format!("{t:?}");
    s.strip_prefix("BPF_PROG_TYPE_")
        .unwrap_or(&s)
        .to_lowercase()
}

const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// The device of an XDP or TCX link, and the TCX attach type. `sys::LinkInfo` names
/// the union of `bpf_link_info` after its cgroup member; for these links the union
/// starts with `ifindex` (then, for TCX, `attach_type`), so its first 8 bytes are read
/// as two u32 in memory order.
fn device_link(li: &sys::LinkInfo) -> (u32, u32) {
    let b = li.cgroup_id.to_ne_bytes();
    (
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
    )
}

/// "device eth0", or the index when the device is gone (or in another namespace).
fn device_label(ifindex: u32) -> String {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return format!("device ifindex {ifindex}");
    }
    let end = buf.iter().position(|c| *c == 0).unwrap_or(buf.len());
    format!("device {}", String::from_utf8_lossy(&buf[..end]))
}

/// The directory under the cgroup2 root whose inode is `id` (cgroup v2 ids are inode
/// numbers). A breadth-first walk, bounded so that a huge hierarchy cannot stall
/// `status`.
pub fn cgroup_path(id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let root = sys::cgroup2_root().ok()?;
    let mut queue = std::collections::VecDeque::from([root]);
    let mut seen = 0usize;
    while let Some(dir) = queue.pop_front() {
        seen += 1;
        if seen > 100_000 {
            return None;
        }
        if std::fs::metadata(&dir).ok()?.ino() == id {
            return Some(dir);
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    queue.push_back(e.path());
                }
            }
        }
    }
    None
}

/// Programs behind the links pinned under `bpffs/links`.
pub fn programs(bpffs: &Path) -> Result<Vec<ProgramStatus>> {
    let dir = links_dir(bpffs);
    let rd = std::fs::read_dir(&dir)
        .with_context(|| format!("read {} (is the agent installed here?)", dir.display()))?;
    let mut pins: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect::<Vec<_>>();
    // In the order the programs are declared (connect, sendmsg, recvmsg, getpeername),
    // then anything else by name (the external path's `svclb_tc_in@eth0`,
    // `svclb_tc_out@eth0`, `svclb_xdp@eth0`, grouped by program).
    let rank = |p: &PathBuf| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let i = svc_lb_common::SOCK_PROGRAMS
            .iter()
            .position(|n| *n == name)
            .unwrap_or(usize::MAX);
        (i, name.to_owned())
    };
    pins.sort_by_key(rank);
    let infos: HashMap<u32, aya::programs::ProgramInfo> = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .map(|p| (p.id(), p))
        .collect();
    let mut cgroups: HashMap<u64, String> = HashMap::new();
    let mut out = Vec::new();
    for pin in pins {
        let fd = sys::obj_get(&pin)?;
        let li = sys::link_info(&fd).with_context(|| format!("link info of {}", pin.display()))?;
        let (attach_type, attached_to) = if li.link_type == sys::BPF_LINK_TYPE_CGROUP {
            let cg = cgroups
                .entry(li.cgroup_id)
                .or_insert_with(|| match cgroup_path(li.cgroup_id) {
                    Some(p) => format!("cgroup {}", p.display()),
                    None => format!("cgroup id {}", li.cgroup_id),
                })
                .clone();
            (attach_type_name(li.attach_type), cg)
        } else if matches!(li.link_type, BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX) {
            let (ifindex, tcx_attach) = device_link(&li);
            let hook = if li.link_type == BPF_LINK_TYPE_TCX {
                attach_type_name(tcx_attach)
            } else {
                "xdp".to_owned()
            };
            (hook, device_label(ifindex))
        } else {
            (
                link_type_name(li.link_type).to_owned(),
                format!("{} link", link_type_name(li.link_type)),
            )
        };
        let info = infos.get(&li.prog_id);
        out.push(ProgramStatus {
            name: info
                .and_then(|i| i.name_as_str())
                .unwrap_or_default()
                .to_owned(),
            prog_id: li.prog_id,
            link_id: li.id,
            prog_type: info.map_or_else(
                || "unknown".to_owned(),
                |i| prog_type_name(i.program_type()),
            ),
            attach_type,
            attached_to,
            pin: pin.display().to_string(),
            xlated_bytes: info.and_then(|i| i.size_translated()).unwrap_or(0),
            jited_bytes: info.map_or(0, |i| i.size_jitted()),
            run_count: info.map_or(0, |i| i.run_count()),
            run_time_ns: info.map_or(0, |i| i.run_time().as_nanos() as u64),
            loaded_at_ms: info.and_then(|i| i.loaded_at()).and_then(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_millis() as u64)
            }),
        });
    }
    out.extend(netlink_programs(bpffs)?);
    Ok(out)
}

/// The tc programs attached through netlink (kernels without TCX): no link, so
/// `LINK ID` is 0; the record pin names program and device.
fn netlink_programs(bpffs: &Path) -> Result<Vec<ProgramStatus>> {
    let dir = tc_netlink_dir(bpffs);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut pins: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    pins.sort();
    let mut out = Vec::new();
    for pin in pins {
        let file = pin
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some((_, dev)) = file.split_once('@') else {
            continue;
        };
        let info = aya::programs::ProgramInfo::from_pin(&pin)
            .map_err(anyhow::Error::new)
            .with_context(|| format!("program pinned at {}", pin.display()))?;
        let name = info.name_as_str().unwrap_or_default().to_owned();
        let hook = if name == svc_lb_common::PROG_TC_INGRESS {
            "tc_ingress (netlink)"
        } else {
            "tc_egress (netlink)"
        };
        out.push(ProgramStatus {
            name,
            prog_id: info.id(),
            link_id: 0,
            prog_type: prog_type_name(info.program_type()),
            attach_type: hook.to_owned(),
            attached_to: format!("device {dev}"),
            pin: pin.display().to_string(),
            xlated_bytes: info.size_translated().unwrap_or(0),
            jited_bytes: info.size_jitted(),
            run_count: info.run_count(),
            run_time_ns: info.run_time().as_nanos() as u64,
            loaded_at_ms: info.loaded_at().and_then(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_millis() as u64)
            }),
        });
    }
    Ok(out)
}

/// Entries against capacity for each pinned map in `names`. A missing pin is an error:
/// the maps are created together, so one missing means the install is broken.
pub fn maps(bpffs: &Path, names: &[&str]) -> Result<Vec<MapStatus>> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let path = bpffs.join(name);
        // The one map no program holds: absent with `--ext-stats-interval 0` or under
        // an agent that predates it.
        if *name == svc_lb_common::MAP_EXT_TRAFFIC && !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path)
            .with_context(|| format!("open pinned map {}", path.display()))?;
        let info = data
            .info()
            .with_context(|| format!("info of map {}", path.display()))?;
        let map_type = info.map_type().ok();
        let capacity = u64::from(info.max_entries());
        let entries = match map_type {
            Some(MapType::Array | MapType::PerCpuArray) => capacity,
            _ => sys::count_keys(data.fd().as_fd(), info.key_size() as usize)
                .with_context(|| format!("count the entries of {name}"))?,
        };
        out.push(MapStatus {
            name: (*name).to_owned(),
            map_id: info.id(),
            map_type: map_type_name(map_type),
            entries,
            capacity,
        });
    }
    Ok(out)
}

/// Whether the kernel keeps per-program run statistics (`kernel.bpf_stats_enabled`).
pub fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_links_name_their_device() {
        // The loopback device always exists and has index 1.
        assert_eq!(device_label(1), "device lo");
        assert_eq!(
            device_label(u32::MAX),
            format!("device ifindex {}", u32::MAX)
        );
        // TCX: ifindex then attach_type in the union.
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&7u32.to_ne_bytes());
        raw[4..].copy_from_slice(&47u32.to_ne_bytes());
        let mut li = sys::LinkInfo::default();
        li.link_type = BPF_LINK_TYPE_TCX;
        li.cgroup_id = u64::from_ne_bytes(raw);
        assert_eq!(device_link(&li), (7, 47));
        assert_eq!(attach_type_name(device_link(&li).1), "tcx_egress");
    }
}
