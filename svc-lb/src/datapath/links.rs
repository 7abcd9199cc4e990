//! Attachment: the socket programs on a cgroup, the tc and XDP programs on devices
//! (TCX or XDP links, or netlink filters on kernels without TCX), each through a pin so
//! that the programs outlive the agent and a restarted agent swaps its programs in
//! place; and detaching all of it (`svc-lb cleanup`, a failed device attach).
use std::{
    fs,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink,
        tc::TcAttachOptions,
    },
};
use svc_lb_common::{
    MAP_XDP_MAC, MAP_XDP_MAC_HI, PROG_POD_EGRESS, PROG_POD_INGRESS, PROG_SOCKOPS, PROG_TC_EGRESS,
    PROG_TC_INGRESS, PROG_XDP, SOCK_PROGRAMS, XDP_MAC_ARRAY_MAX, XDP_MAC_SET,
};
use tracing::{debug, info, warn};

use super::{
    load::{sock_program, sockops_program},
    pins::{self, links_dir, tc_netlink_dir},
    probe::TcAttach,
    sys,
};

fn cgroup_id(cgroup: &Path) -> Result<u64> {
    // On cgroup v2 the cgroup id is the directory's inode number.
    Ok(fs::metadata(cgroup)
        .with_context(|| format!("stat cgroup {}", cgroup.display()))?
        .ino())
}

/// Attaches every socket program to `cgroup` through a pinned link. Where a pinned
/// link on that cgroup exists (a restart), the new program is swapped into it
/// atomically instead, so there is no moment without a program.
pub fn attach_sock_programs(ebpf: &mut Ebpf, bpffs: &Path, cgroup: &Path) -> Result<()> {
    let cg = fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
    for name in SOCK_PROGRAMS {
        let prog = sock_program(ebpf, name)?;
        let prog_fd = prog
            .fd()
            .with_context(|| format!("fd of {name}"))?
            .as_fd()
            .as_raw_fd();
        attach_cgroup_pinned(name, prog_fd, bpffs, cgroup, || {
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
            prog.take_link(id)
                .with_context(|| format!("take link of {name}"))?
                .try_into()
                .with_context(|| format!("link of {name} is not a bpf link"))
        })?;
    }
    Ok(())
}

/// The connection counts' sock_ops program on `cgroup`, as [`attach_sock_programs`]
/// does for the socket programs (swapped into a pinned link on restart). With `on`
/// false (the kernel lacks it, or it was forced off) a link pinned by an earlier run
/// is removed, so that nothing keeps counting while the agent reports the counts as
/// unavailable (its sockets keep their callback flag; no program runs for them).
pub fn attach_sockops(ebpf: &mut Ebpf, bpffs: &Path, cgroup: &Path, on: bool) -> Result<()> {
    let name = PROG_SOCKOPS;
    if !on {
        let pin = links_dir(bpffs).join(name);
        if pin.exists() {
            match sys::obj_get(&pin).and_then(|fd| sys::link_detach(&fd)) {
                Ok(()) => info!(
                    program = name,
                    "detached the connection counts of an earlier run (not used by this run)"
                ),
                Err(e) => {
                    warn!(pin = %pin.display(), error = %format!("{e:#}"), "could not detach link; removing the pin anyway")
                }
            }
            fs::remove_file(&pin).with_context(|| format!("remove {}", pin.display()))?;
        }
        return Ok(());
    }
    let cg = fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
    let prog = sockops_program(ebpf)?;
    let prog_fd = prog
        .fd()
        .with_context(|| format!("fd of {name}"))?
        .as_fd()
        .as_raw_fd();
    attach_cgroup_pinned(name, prog_fd, bpffs, cgroup, || {
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
        prog.take_link(id)
            .with_context(|| format!("take link of {name}"))?
            .try_into()
            .with_context(|| format!("link of {name} is not a bpf link"))
    })
}

/// One cgroup program through its pinned link: swapped into the link pinned on this
/// cgroup (a restart: no moment without a program), else attached by `attach` and
/// pinned in place of any stale pin.
fn attach_cgroup_pinned(
    name: &str,
    prog_fd: i32,
    bpffs: &Path,
    cgroup: &Path,
    attach: impl FnOnce() -> Result<FdLink>,
) -> Result<()> {
    let pin = links_dir(bpffs).join(name);
    if pin.exists() {
        let link = sys::obj_get(&pin)?;
        let li = sys::link_info(&link)?;
        if li.link_type == sys::BPF_LINK_TYPE_CGROUP && li.cgroup_id == cgroup_id(cgroup)? {
            sys::link_update(&link, prog_fd)
                .with_context(|| format!("swap program {name} into {}", pin.display()))?;
            info!(
                program = name,
                link_id = li.id,
                "replaced program in pinned link"
            );
            return Ok(());
        }
        warn!(
            program = name,
            pinned_cgroup_id = li.cgroup_id,
            cgroup = %cgroup.display(),
            "pinned link is attached elsewhere; attaching to the requested cgroup"
        );
    }
    pin_link(attach()?, bpffs, &pin)?;
    info!(program = name, cgroup = %cgroup.display(), "attached program");
    Ok(())
}

fn ifindex(dev: &str) -> Result<u32> {
    let c = std::ffi::CString::new(dev).with_context(|| format!("device name {dev:?}"))?;
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("device {dev}: {}", std::io::Error::last_os_error());
    }
    Ok(idx)
}

/// Swaps `prog_fd` into the link pinned at `pin` when that link is of `link_type` on
/// `ifindex` (a restart): no moment without a program. Returns false when there is no
/// such link (nothing pinned, or a stale pin for another device, which is replaced).
fn swap_into_pinned(
    prog_fd: i32,
    pin: &Path,
    link_type: u32,
    ifindex: u32,
    name: &str,
) -> Result<bool> {
    if !pin.exists() {
        return Ok(false);
    }
    let link = sys::obj_get(pin)?;
    let li = sys::link_info(&link)?;
    // For XDP and TCX links the info union starts with the interface index.
    if li.link_type == link_type && li.cgroup_id as u32 == ifindex {
        sys::link_update(&link, prog_fd)
            .with_context(|| format!("swap program {name} into {}", pin.display()))?;
        info!(program = name, link_id = li.id, pin = %pin.display(), "replaced program in pinned link");
        return Ok(true);
    }
    warn!(program = name, pin = %pin.display(), "pinned link is stale (another device or type); attaching anew");
    Ok(false)
}

/// Pins a new link under a temporary name, then renames it over `pin`, so the pin path
/// always names an attached link.
fn pin_link(link: FdLink, bpffs: &Path, pin: &Path) -> Result<()> {
    let file = pin
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = links_dir(bpffs).join(format!("{file}_new"));
    let _ = fs::remove_file(&tmp);
    link.pin(&tmp)
        .with_context(|| format!("pin link {}", tmp.display()))?;
    fs::rename(&tmp, pin)
        .with_context(|| format!("rename {} to {}", tmp.display(), pin.display()))?;
    Ok(())
}

/// The cls_bpf filter svc-lb owns on each clsact hook: a fixed priority and handle, so
/// a restarted agent replaces its own filter in place (the kernel swaps the program
/// under RCU: no packet sees no program) instead of adding a second one.
pub const TC_NETLINK_PRIORITY: u16 = 100;
pub const TC_NETLINK_HANDLE: u16 = 1;

/// Attaches `prog` to `dev` through netlink (clsact qdisc + direct-action filter), for
/// kernels without TCX: replaces svc-lb's filter when there is one, adds it otherwise.
fn attach_tc_netlink(
    prog: &mut SchedClassifier,
    bpffs: &Path,
    dev: &str,
    name: &str,
    attach_type: TcAttachType,
) -> Result<()> {
    if let Err(e) = aya::programs::tc::qdisc_add_clsact(dev) {
        let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(anyhow::Error::new(e))
                .with_context(|| format!("add the clsact qdisc to device {dev}"));
        }
    }
    let handle = aya::programs::tc::TcHandle::new(0, TC_NETLINK_HANDLE);
    let dir = tc_netlink_dir(bpffs);
    let record = dir.join(format!("{name}@{dev}"));
    // Replace only the filter an earlier run recorded (without NLM_F_CREATE the kernel
    // only changes an existing filter); otherwise create it exclusively, so that a
    // filter svc-lb does not own at that priority and handle (or a legacy `ingress`
    // qdisc, where ingress and egress are one hook) fails the attach instead of being
    // replaced.
    let replaced = if record.exists() {
        // Built only here: dropping an unused link handle would remove the filter.
        let ours = aya::programs::tc::SchedClassifierLink::attached(
            dev,
            attach_type,
            TC_NETLINK_PRIORITY,
            handle,
            None,
        )
        .with_context(|| format!("device {dev}"))?;
        prog.attach_to_link(ours).map_err(|e| e.to_string())
    } else {
        Err("no filter recorded by an earlier run".to_owned())
    };
    let id = match replaced {
        Ok(id) => {
            info!(program = name, device = %dev, priority = TC_NETLINK_PRIORITY, "replaced program in the netlink tc filter");
            id
        }
        Err(replace_err) => {
            let id = prog
                .attach_with_options(
                    dev,
                    attach_type,
                    TcAttachOptions::Netlink(aya::programs::tc::NlOptions {
                        priority: TC_NETLINK_PRIORITY,
                        handle,
                        classid: None,
                    }),
                )
                .map_err(anyhow::Error::new)
                .with_context(|| {
                    format!(
                        "attach {name} to device {dev} (netlink filter at priority {TC_NETLINK_PRIORITY}, handle {TC_NETLINK_HANDLE}; is that taken, or does the device have an `ingress` qdisc instead of clsact? not replaced: {replace_err})"
                    )
                })?;
            info!(program = name, device = %dev, priority = TC_NETLINK_PRIORITY, "attached tc program (netlink)");
            id
        }
    };
    // aya removes the filters of the links it holds when the program is dropped; the
    // filter must outlive the agent, like a pinned link.
    let link = prog
        .take_link(id)
        .with_context(|| format!("take link of {name}"))?;
    std::mem::forget(link);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!("{name}@{dev}_new"));
    let _ = fs::remove_file(&tmp);
    prog.pin(&tmp)
        .with_context(|| format!("pin program {}", tmp.display()))?;
    fs::rename(&tmp, &record)
        .with_context(|| format!("rename {} to {}", tmp.display(), record.display()))?;
    Ok(())
}

/// Removes svc-lb's netlink filter of `name` on `dev` and its record. Failures are
/// logged (the device may be gone); the record goes anyway.
fn detach_tc_netlink(record: &Path, dev: &str, name: &str, attach_type: TcAttachType) {
    match aya::programs::tc::qdisc_detach_program(dev, attach_type, name) {
        Ok(()) => info!(program = name, device = %dev, "removed the netlink tc filter"),
        Err(e) => {
            warn!(program = name, device = %dev, error = %format!("{:#}", anyhow::Error::new(e)), "could not remove the netlink tc filter")
        }
    }
    if let Err(e) = fs::remove_file(record) {
        warn!(pin = %record.display(), error = %e, "could not remove the record");
    }
}

/// Detaches the link pinned at `pin` and removes the pin; failures are logged.
fn detach_pin(pin: &Path) {
    match sys::obj_get(pin).and_then(|fd| sys::link_detach(&fd)) {
        Ok(()) => info!(pin = %pin.display(), "detached the link of an earlier run"),
        Err(e) => warn!(pin = %pin.display(), error = %format!("{e:#}"), "could not detach link"),
    }
    if let Err(e) = fs::remove_file(pin) {
        warn!(pin = %pin.display(), error = %e, "could not remove the pin");
    }
}

/// Detaches every tc and XDP program of svc-lb from `devices` (TCX and XDP links,
/// netlink filters), best effort: after a failed attach the external path is off, and a
/// half-attached device (ingress translating, egress not) would break its flows.
pub fn detach_devices(bpffs: &Path, devices: &[String]) {
    for dev in devices {
        for (name, t) in [
            (PROG_TC_INGRESS, TcAttachType::Ingress),
            (PROG_TC_EGRESS, TcAttachType::Egress),
            (PROG_POD_INGRESS, TcAttachType::Ingress),
            (PROG_POD_EGRESS, TcAttachType::Egress),
        ] {
            let record = tc_netlink_dir(bpffs).join(format!("{name}@{dev}"));
            if record.exists() {
                detach_tc_netlink(&record, dev, name, t);
            }
        }
        for name in [
            PROG_TC_INGRESS,
            PROG_TC_EGRESS,
            PROG_XDP,
            PROG_POD_INGRESS,
            PROG_POD_EGRESS,
        ] {
            let pin = links_dir(bpffs).join(format!("{name}@{dev}"));
            if pin.exists() {
                detach_pin(&pin);
            }
        }
    }
}

/// Removes every netlink tc filter recorded under `bpffs` (`cleanup`); returns how
/// many records there were.
fn cleanup_tc_netlink(bpffs: &Path) -> Result<usize> {
    let dir = tc_netlink_dir(bpffs);
    if !dir.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("read {}", dir.display()))?
            .path();
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        match file.split_once('@') {
            Some((prog, dev))
                if [
                    PROG_TC_INGRESS,
                    PROG_TC_EGRESS,
                    PROG_POD_INGRESS,
                    PROG_POD_EGRESS,
                ]
                .contains(&prog) =>
            {
                let t = if prog == PROG_TC_INGRESS || prog == PROG_POD_INGRESS {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                detach_tc_netlink(&path, dev, prog, t);
                n += 1;
            }
            _ => fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?,
        }
    }
    fs::remove_dir(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(n)
}

/// The `LB_XDPMAC`/`LB_XDPMACHI` value of a device with address `mac`.
fn xdp_mac_value(mac: [u8; 6]) -> [u8; 8] {
    let mut value = [0u8; 8];
    value[..6].copy_from_slice(&mac);
    value[6] = XDP_MAC_SET;
    value
}

/// Makes `LB_XDPMAC` (ifindex below [`XDP_MAC_ARRAY_MAX`]) and `LB_XDPMACHI` (the
/// others) hold exactly the MAC address of each of `devices` (see [`MAP_XDP_MAC`]): XDP
/// serves only frames sent to it. A device without one (an L3 device) gets no entry. An
/// address changed after this only costs the acceleration: XDP then passes the device's
/// frames and tc, which asks the kernel (`pkt_type`), serves them.
fn set_xdp_macs(ebpf: &mut Ebpf, devices: &[String]) -> Result<()> {
    let mut want = Vec::new();
    for dev in devices {
        match crate::announce::responder::link(dev) {
            Ok(link) => {
                let ifindex = u32::try_from(link.ifindex).context("interface index")?;
                want.push((ifindex, link.mac));
            }
            Err(e) => {
                debug!(device = %dev, error = %format!("{e:#}"), "no MAC address; XDP serves every frame of this device");
            }
        }
    }
    write_xdp_macs(ebpf, &want)
}

/// Makes `LB_XDPMAC` and `LB_XDPMACHI` hold exactly `devices` (ifindex, MAC address):
/// the part of [`set_xdp_macs`] after the devices are resolved, public for the packet
/// tests.
pub fn write_xdp_macs(ebpf: &mut Ebpf, devices: &[(u32, [u8; 6])]) -> Result<()> {
    let (low, high): (Vec<_>, Vec<_>) = devices
        .iter()
        .map(|(i, mac)| (*i, xdp_mac_value(*mac)))
        .partition(|(i, _)| *i < XDP_MAC_ARRAY_MAX);
    {
        let map = ebpf
            .map_mut(MAP_XDP_MAC)
            .ok_or_else(|| anyhow!("map {MAP_XDP_MAC} missing from the eBPF object"))?;
        let mut map: aya::maps::Array<&mut aya::maps::MapData, [u8; 8]> =
            aya::maps::Array::try_from(map)
                .with_context(|| format!("map {MAP_XDP_MAC} has an unexpected type"))?;
        // Every index is written (the array has no deletion): the wanted devices' entries,
        // and zeroes over any other, left by an earlier attach of this object.
        let stale: Vec<u32> = map
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v {
                Ok(v) if v[6] != 0 => u32::try_from(i).ok(),
                _ => None,
            })
            .collect();
        for index in stale.iter().filter(|i| !low.iter().any(|(w, _)| w == *i)) {
            map.set(*index, [0u8; 8], 0)
                .with_context(|| format!("{MAP_XDP_MAC}: clear ifindex {index}"))?;
        }
        for (ifindex, value) in &low {
            map.set(*ifindex, value, 0)
                .with_context(|| format!("{MAP_XDP_MAC}: write ifindex {ifindex}"))?;
        }
    }
    let map = ebpf
        .map_mut(MAP_XDP_MAC_HI)
        .ok_or_else(|| anyhow!("map {MAP_XDP_MAC_HI} missing from the eBPF object"))?;
    let mut map: aya::maps::HashMap<&mut aya::maps::MapData, u32, [u8; 8]> =
        aya::maps::HashMap::try_from(map)
            .with_context(|| format!("map {MAP_XDP_MAC_HI} has an unexpected type"))?;
    for (ifindex, value) in &high {
        map.insert(*ifindex, value, 0)
            .with_context(|| format!("{MAP_XDP_MAC_HI}: write ifindex {ifindex}"))?;
    }
    let have: Vec<u32> = map
        .keys()
        .collect::<Result<_, _>>()
        .with_context(|| format!("read map {MAP_XDP_MAC_HI}"))?;
    for ifindex in have.iter().filter(|i| !high.iter().any(|(w, _)| w == *i)) {
        if let Err(e) = map.remove(ifindex) {
            warn!(ifindex, error = %e, map = MAP_XDP_MAC_HI, "delete stale entry");
        }
    }
    Ok(())
}

/// Native-mode XDP on each device. A driver that refuses it costs only the
/// acceleration: one warning per device, and the tc programs do the work.
fn attach_xdp(ebpf: &mut Ebpf, bpffs: &Path, devices: &[String]) -> Result<()> {
    set_xdp_macs(ebpf, devices)?;
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_XDP)
        .ok_or_else(|| {
            anyhow!(
                "program {PROG_XDP} missing from the eBPF object (built without the external path?)"
            )
        })?
        .try_into()
        .with_context(|| format!("program {PROG_XDP} is not an XDP program"))?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("load program {PROG_XDP} (kernel verifier)"))?;
    }
    for dev in devices {
        let pin = links_dir(bpffs).join(format!("{PROG_XDP}@{dev}"));
        let prog_fd = prog
            .fd()
            .with_context(|| format!("fd of {PROG_XDP}"))?
            .as_fd()
            .as_raw_fd();
        if swap_into_pinned(
            prog_fd,
            &pin,
            sys::BPF_LINK_TYPE_XDP,
            ifindex(dev)?,
            PROG_XDP,
        )? {
            continue;
        }
        let id = match prog.attach(dev, XdpMode::Driver) {
            Ok(id) => id,
            Err(e) => {
                // Through anyhow so that the kernel's reason (the error's source) is shown.
                let error = format!("{:#}", anyhow::Error::new(e));
                warn!(device = %dev, %error, "native XDP refused by the driver; this device runs tc only");
                continue;
            }
        };
        let link = prog
            .take_link(id)
            .with_context(|| format!("take link of {PROG_XDP}"))?;
        match FdLink::try_from(link) {
            Ok(link) => {
                pin_link(link, bpffs, &pin)?;
                info!(program = PROG_XDP, device = %dev, "attached XDP program (native mode)");
            }
            Err(e) => {
                // A netlink attachment (no bpf link on this kernel) cannot be pinned,
                // so a restart could not find it; rather run tc-only. Dropping the
                // link detaches it.
                warn!(device = %dev, error = %e, "XDP attached without a bpf link; detached, this device runs tc only");
            }
        }
    }
    Ok(())
}

/// Attaches (or swaps in) the tc programs on each device, and with `xdp` the XDP
/// program in native mode; call after the first sync, like [`attach_sock_programs`]. Links
/// are pinned as `links/<program>@<device>`. A device whose driver refuses native
/// XDP gets one warning and stays tc-only.
/// `tc` chooses TCX links or, on kernels without TCX, netlink filters (see
/// [`attach_tc_netlink`]).
pub fn attach_devices(
    ebpf: &mut Ebpf,
    bpffs: &Path,
    devices: &[String],
    xdp: bool,
    tc: TcAttach,
) -> Result<()> {
    attach_tc_programs(
        ebpf,
        bpffs,
        devices,
        &[
            (PROG_TC_INGRESS, TcAttachType::Ingress),
            (PROG_TC_EGRESS, TcAttachType::Egress),
        ],
        tc,
    )?;
    if xdp {
        attach_xdp(ebpf, bpffs, devices)?;
    }
    Ok(())
}

/// Attaches (or swaps in) each tc program of `programs` on each device: the external
/// path's, and the per-packet path's on the pod devices (`poddev.rs`).
pub fn attach_tc_programs(
    ebpf: &mut Ebpf,
    bpffs: &Path,
    devices: &[String],
    programs: &[(&str, TcAttachType)],
    tc: TcAttach,
) -> Result<()> {
    for &(name, attach_type) in programs {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| {
                anyhow!(
                    "program {name} missing from the eBPF object (built without the external path?)"
                )
            })?
            .try_into()
            .with_context(|| format!("program {name} is not a tc program"))?;
        if prog.fd().is_err() {
            prog.load()
                .with_context(|| format!("load program {name} (kernel verifier)"))?;
        }
        for dev in devices {
            let pin = links_dir(bpffs).join(format!("{name}@{dev}"));
            if tc == TcAttach::Netlink {
                attach_tc_netlink(prog, bpffs, dev, name, attach_type)?;
                // A TCX link of an earlier run (another kernel, or the switch
                // forced): the filter is in place now, so it goes.
                if pin.exists() {
                    detach_pin(&pin);
                }
                continue;
            }
            let ifindex = ifindex(dev)?;
            if swap_into_pinned(
                prog.fd()
                    .with_context(|| format!("fd of {name}"))?
                    .as_fd()
                    .as_raw_fd(),
                &pin,
                sys::BPF_LINK_TYPE_TCX,
                ifindex,
                name,
            )? {
                continue;
            }
            let id = prog
                .attach_with_options(
                    dev,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attach {name} to device {dev} (TCX)"))?;
            let link: FdLink = prog
                .take_link(id)
                .with_context(|| format!("take link of {name}"))?
                .try_into()
                .with_context(|| format!("link of {name} on {dev} is not a bpf link"))?;
            pin_link(link, bpffs, &pin)?;
            info!(program = name, device = %dev, "attached tc program");
        }
        // Netlink filters of an earlier run go once the TCX links are in place.
        for dev in devices.iter().filter(|_| tc == TcAttach::Tcx) {
            let record = tc_netlink_dir(bpffs).join(format!("{name}@{dev}"));
            if record.exists() {
                detach_tc_netlink(&record, dev, name, attach_type);
            }
        }
    }
    Ok(())
}

/// Detaches every program and removes every pin under `bpffs`. With `cgroup`, also
/// detaches svc-lb links on that cgroup whose pins were lost.
pub fn cleanup(bpffs: &Path, cgroup: Option<&Path>) -> Result<usize> {
    let mut detached = 0;
    let links = links_dir(bpffs);
    if links.exists() {
        for entry in fs::read_dir(&links).with_context(|| format!("read {}", links.display()))? {
            let path = entry
                .with_context(|| format!("read {}", links.display()))?
                .path();
            match sys::obj_get(&path).and_then(|fd| sys::link_detach(&fd)) {
                Ok(()) => detached += 1,
                Err(e) => {
                    warn!(pin = %path.display(), error = %format!("{e:#}"), "could not detach link; removing the pin anyway")
                }
            }
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        fs::remove_dir(&links).with_context(|| format!("remove {}", links.display()))?;
    }
    detached += cleanup_tc_netlink(bpffs)?;
    if let Some(cg) = cgroup {
        detached += sys::detach_orphan_links(cgroup_id(cg)?, "svclb_")?;
    }
    for name in svc_lb_common::ALL_MAPS
        .iter()
        .chain(svc_lb_common::SOCKET_MAPS.iter())
        .chain(svc_lb_common::OLD_SOCKET_MAPS.iter())
        .chain(std::iter::once(&svc_lb_common::MAP_CT_V1))
    {
        let path = bpffs.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
    }
    pins::remove_retired_pins(bpffs)?;
    if bpffs.exists() {
        fs::remove_dir(bpffs)
            .with_context(|| format!("remove {} (not empty?)", bpffs.display()))?;
    }
    Ok(detached)
}
