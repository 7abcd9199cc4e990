//! `svc-lb status`: the attached programs, the maps' fill levels, and the agent's last
//! sync. Programs and maps are read from bpffs, so they show even when the agent is
//! down; the agent's own state comes from its `/status` endpoint.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, MapType};
use serde::Serialize;

use crate::{
    datapath::{pins::links_dir, sys},
    status::{AgentStatus, format_age, format_utc},
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

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct AgentReport {
    /// Where `status` asked.
    pub address: String,
    pub reachable: bool,
    /// Why the agent could not be reached, or a warning about the one that answered
    /// (for example, it serves another pin directory).
    pub error: Option<String>,
    pub status: Option<AgentStatus>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Status {
    /// This CLI's version.
    pub version: String,
    pub bpffs: String,
    pub bpf_stats_enabled: bool,
    pub programs: Vec<ProgramStatus>,
    /// Why the programs could not be listed (for example, no pins).
    pub programs_error: Option<String>,
    pub maps: Vec<MapStatus>,
    pub agent: AgentReport,
    /// The kernel and its features: the agent's probe (with its forced switches) when
    /// it answers, else a probe run by this command.
    pub kernel: KernelReport,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct KernelReport {
    pub release: String,
    /// `agent` or `this command`.
    pub probed_by: String,
    pub tc_attach: Option<crate::datapath::probe::TcAttach>,
    pub features: Vec<crate::datapath::probe::FeatureStatus>,
    /// Why the agent turned the external path off, if it did.
    pub external_error: Option<String>,
}

/// The agent's probe results, or a fresh probe when no agent answered (an agent
/// older than the probe reports no features).
fn kernel_report(agent: &AgentReport) -> KernelReport {
    if let Some(st) = agent.status.as_ref().filter(|s| !s.features.is_empty()) {
        return KernelReport {
            release: st.kernel.clone(),
            probed_by: "agent".to_owned(),
            tc_attach: st.tc_attach,
            features: st.features.clone(),
            external_error: st.external_error.clone(),
        };
    }
    let probe = crate::datapath::probe::Probe::run(&crate::datapath::probe::KernelProber, &[]);
    KernelReport {
        release: probe.kernel.clone(),
        probed_by: "this command".to_owned(),
        tc_attach: Some(probe.choices().tc_attach),
        features: probe.report(),
        external_error: None,
    }
}

/// The kernel section of the text output.
pub fn render_kernel(k: &KernelReport) -> String {
    let mut out = format!("\nKernel {} (probed by {})\n", k.release, k.probed_by);
    let mut rows = vec![vec![
        "FEATURE".to_owned(),
        "STATE".to_owned(),
        "SINCE".to_owned(),
        "WITHOUT IT".to_owned(),
    ]];
    for f in &k.features {
        let state = match &f.state {
            crate::datapath::probe::State::Found => "found".to_owned(),
            crate::datapath::probe::State::Missing => "MISSING".to_owned(),
            crate::datapath::probe::State::ForcedOff => "FORCED OFF".to_owned(),
            crate::datapath::probe::State::Unknown(e) => format!("UNKNOWN ({e})"),
        };
        rows.push(vec![
            f.name.clone(),
            state,
            f.since.clone(),
            if f.consequence.is_empty() {
                "-".to_owned()
            } else {
                f.consequence.clone()
            },
        ]);
    }
    out.push_str(&table(&rows, &[]));
    if let Some(t) = k.tc_attach {
        out.push_str(&format!(
            "  tc programs attach through {}\n",
            match t {
                crate::datapath::probe::TcAttach::Tcx => "TCX links",
                crate::datapath::probe::TcAttach::Netlink =>
                    "netlink (clsact qdisc, cls_bpf filter)",
            }
        ));
    }
    if let Some(e) = &k.external_error {
        out.push_str(&format!("  EXTERNAL PATH OFF: {e}\n"));
    }
    out
}

/// `bpf_attach_type` names (linux/bpf.h) for the hooks svc-lb uses or may use.
fn attach_type_name(t: u32) -> String {
    match t {
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
    let dir = crate::datapath::pins::tc_netlink_dir(bpffs);
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

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// Counts a map's keys with BPF_MAP_GET_NEXT_KEY: one syscall per entry, works for
/// every hash type whatever its key and value layout.
fn count_keys(fd: BorrowedFd<'_>, key_size: usize) -> Result<u64> {
    let mut cur = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut first = true;
    let mut n = 0u64;
    loop {
        let mut attr = NextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: if first { 0 } else { cur.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: attr points at buffers of the map's key size that outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                std::ptr::from_mut(&mut attr).cast::<libc::c_void>(),
                size_of::<NextKeyAttr>(),
            )
        };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(n);
            }
            return Err(e).context("BPF_MAP_GET_NEXT_KEY");
        }
        n += 1;
        first = false;
        std::mem::swap(&mut cur, &mut next);
    }
}

/// Entries against capacity for each pinned map in `names`. A missing pin is an error:
/// the maps are created together, so one missing means the install is broken.
pub fn maps(bpffs: &Path, names: &[&str]) -> Result<Vec<MapStatus>> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let path = bpffs.join(name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("open pinned map {}", path.display()))?;
        let info = data
            .info()
            .with_context(|| format!("info of map {}", path.display()))?;
        let map_type = info.map_type().ok();
        let capacity = u64::from(info.max_entries());
        let entries = match map_type {
            Some(MapType::Array | MapType::PerCpuArray) => capacity,
            _ => count_keys(data.fd().as_fd(), info.key_size() as usize)
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

/// `GET path` over HTTP/1.0 (one request, no keep-alive, no chunked body), enough
/// for the agent's own endpoints without an HTTP client dependency.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(timeout)).context("set timeout")?;
    s.set_write_timeout(Some(timeout)).context("set timeout")?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .with_context(|| format!("send a request to {addr}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("read the answer of {addr}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .context("malformed HTTP status line")?;
    if code != 200 {
        bail!("{addr}{path} answered HTTP {code}");
    }
    Ok(body.to_owned())
}

pub fn fetch_agent(addr: SocketAddr) -> AgentReport {
    let got = http_get(addr, "/status", Duration::from_secs(2)).and_then(|body| {
        serde_json::from_str::<AgentStatus>(&body).context("the answer is not an svc-lb status")
    });
    match got {
        Ok(st) => AgentReport {
            address: addr.to_string(),
            reachable: true,
            error: None,
            status: Some(st),
        },
        Err(e) => AgentReport {
            address: addr.to_string(),
            reachable: false,
            error: Some(format!("{e:#}")),
            status: None,
        },
    }
}

pub fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

pub fn collect(bpffs: &Path, agent_addr: Option<SocketAddr>) -> Result<Status> {
    let (programs, programs_error) = match programs(bpffs) {
        Ok(p) => (p, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let agent = match agent_addr {
        Some(a) => {
            let mut r = fetch_agent(a);
            // Several agents may run on one machine (tests, a second pin directory):
            // say so when the one that answered serves other pins.
            if let Some(st) = &r.status {
                let same =
                    |p: &str| std::fs::canonicalize(p).ok() == std::fs::canonicalize(bpffs).ok();
                if !same(&st.bpffs) {
                    r.error = Some(format!(
                        "the agent at {a} serves the pins in {}, not {}",
                        st.bpffs,
                        bpffs.display()
                    ));
                }
            }
            r
        }
        None => AgentReport {
            address: String::new(),
            reachable: false,
            error: Some("not asked (--metrics-addr off)".to_owned()),
            status: None,
        },
    };
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        bpffs: bpffs.display().to_string(),
        bpf_stats_enabled: bpf_stats_enabled(),
        programs,
        programs_error,
        maps: maps(bpffs, &svc_lb_common::ALL_MAPS)?,
        kernel: kernel_report(&agent),
        agent,
    })
}

fn table(rows: &[Vec<String>], right: &[usize]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut width = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::from("  ");
        for (i, c) in r.iter().enumerate() {
            let w = width[i];
            if right.contains(&i) {
                line.push_str(&format!("{c:>w$}  "));
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn render_text(st: &Status, now_ms: u64) -> String {
    let mut out = format!("svc-lb {} — pins in {}\n\n", st.version, st.bpffs);
    out.push_str("Programs\n");
    if let Some(e) = &st.programs_error {
        out.push_str(&format!("  none found: {e}\n"));
    } else if st.programs.is_empty() {
        out.push_str("  none attached (the agent attaches them after its first sync)\n");
    } else {
        let mut rows = vec![vec![
            "NAME".to_owned(),
            "PROG ID".to_owned(),
            "LINK ID".to_owned(),
            "HOOK".to_owned(),
            "ATTACHED TO".to_owned(),
            "XLATED".to_owned(),
            "RUNS".to_owned(),
            "AVG NS".to_owned(),
        ]];
        for p in &st.programs {
            let (runs, avg) = if st.bpf_stats_enabled || p.run_count > 0 {
                (
                    p.run_count.to_string(),
                    p.run_time_ns
                        .checked_div(p.run_count)
                        .map_or_else(|| "-".to_owned(), |avg| avg.to_string()),
                )
            } else {
                ("-".to_owned(), "-".to_owned())
            };
            rows.push(vec![
                p.name.clone(),
                p.prog_id.to_string(),
                p.link_id.to_string(),
                p.attach_type.clone(),
                p.attached_to.clone(),
                format!("{}B", p.xlated_bytes),
                runs,
                avg,
            ]);
        }
        out.push_str(&table(&rows, &[1, 2, 5, 6, 7]));
        if !st.bpf_stats_enabled {
            out.push_str(
                "  (run counts need kernel.bpf_stats_enabled=1; it costs a little on every run, so it is off by default)\n",
            );
        }
    }
    out.push_str("\nMaps\n");
    let mut rows = vec![vec![
        "NAME".to_owned(),
        "ID".to_owned(),
        "TYPE".to_owned(),
        "ENTRIES".to_owned(),
        "CAPACITY".to_owned(),
        "FILL".to_owned(),
    ]];
    for m in &st.maps {
        let fill = if m.map_type.ends_with("array") {
            "(array)".to_owned()
        } else if m.capacity == 0 {
            "-".to_owned()
        } else {
            format!("{:.1}%", m.entries as f64 * 100.0 / m.capacity as f64)
        };
        rows.push(vec![
            m.name.clone(),
            m.map_id.to_string(),
            m.map_type.clone(),
            m.entries.to_string(),
            m.capacity.to_string(),
            fill,
        ]);
    }
    out.push_str(&table(&rows, &[1, 3, 4, 5]));
    out.push_str("\nAgent\n");
    match &st.agent.status {
        Some(a) => {
            if let Some(e) = &st.agent.error {
                out.push_str(&format!("  WARNING      {e}\n"));
            }
            let age = |ms: u64| format_age(Duration::from_millis(now_ms.saturating_sub(ms)));
            out.push_str(&format!(
                "  running      pid {}, version {}, up {} (asked {})\n",
                a.pid,
                a.version,
                age(a.started_at_ms),
                st.agent.address
            ));
            out.push_str(&format!("  source       {}\n", a.source));
            out.push_str(&format!(
                "  attached     {}\n",
                if a.attached {
                    format!("yes, to {}", a.cgroup)
                } else {
                    "not yet (waiting for the first sync)".to_owned()
                }
            ));
            match &a.last_sync {
                Some(s) => {
                    let result = if s.ok {
                        format!(
                            "ok: {} ops in {} µs; {} frontends, {} backends; {} Services rejected, {} objects skipped",
                            s.ops, s.duration_us, s.frontends, s.backends, s.rejected, s.skipped
                        )
                    } else {
                        format!(
                            "FAILED after {} µs: {}",
                            s.duration_us,
                            s.error.as_deref().unwrap_or("unknown error")
                        )
                    };
                    out.push_str(&format!(
                        "  last sync    {} ({} ago): {result}\n",
                        format_utc(s.at_ms),
                        age(s.at_ms)
                    ));
                    if !s.ok
                        && let Some(ok) = &a.last_success
                    {
                        out.push_str(&format!(
                            "  last success {} ({} ago)\n",
                            format_utc(ok.at_ms),
                            age(ok.at_ms)
                        ));
                    }
                }
                None => out.push_str("  last sync    none yet\n"),
            }
            out.push_str(&format!(
                "  syncs        {} ({} failed)\n",
                a.syncs, a.sync_errors
            ));
            if a.problems_total > 0 {
                let shown = if a.problems.len() < a.problems_total {
                    format!(" (first {})", a.problems.len())
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "  left out     {} objects{shown}:\n",
                    a.problems_total
                ));
                for p in &a.problems {
                    out.push_str(&format!("    {p}\n"));
                }
            }
        }
        None => {
            out.push_str(&format!(
                "  not reachable at {}: {}\n",
                if st.agent.address.is_empty() {
                    "-"
                } else {
                    &st.agent.address
                },
                st.agent.error.as_deref().unwrap_or("unknown")
            ));
            out.push_str(
                "  The programs and maps above keep serving traffic without the agent; they are just not updated.\n",
            );
        }
    }
    out.push_str(&render_kernel(&st.kernel));
    out
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

    #[test]
    fn kernel_section_names_each_feature_state_and_consequence() {
        use crate::datapath::probe::{FeatureStatus, State, TcAttach};
        let row = |name: &str, state: State, consequence: &str| FeatureStatus {
            name: name.to_owned(),
            state,
            since: "6.6".to_owned(),
            used_by: "external path".to_owned(),
            consequence: consequence.to_owned(),
        };
        let k = KernelReport {
            release: "5.15.0-91-generic".to_owned(),
            probed_by: "agent".to_owned(),
            tc_attach: Some(TcAttach::Netlink),
            features: vec![
                row("cgroup_link", State::Found, ""),
                row("tcx", State::Missing, "tc programs attach through netlink"),
                row("set_retval", State::ForcedOff, "EPERM instead"),
            ],
            external_error: Some("attach svclb_tc_in: verifier".to_owned()),
        };
        let text = render_kernel(&k);
        assert!(
            text.contains("Kernel 5.15.0-91-generic (probed by agent)"),
            "{text}"
        );
        let line = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line("cgroup_link").contains("found"), "{text}");
        assert!(
            line("tcx").contains("MISSING") && line("tcx").contains("netlink"),
            "{text}"
        );
        assert!(line("set_retval").contains("FORCED OFF"), "{text}");
        assert!(text.contains("through netlink"), "{text}");
        assert!(
            text.contains("EXTERNAL PATH OFF: attach svclb_tc_in"),
            "{text}"
        );
    }
}
