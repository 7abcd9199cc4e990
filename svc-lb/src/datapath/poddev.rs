//! The per-packet path for pod traffic: `--socket-lb-scope` (which sockets the socket
//! programs translate) and `--pod-devices` (where the tc programs of
//! svc-lb-ebpf/src/pod.rs attach): an explicit list, or the node's veth devices whose
//! peers are in other network namespaces, found at start and followed through netlink
//! link events ([`PodPath`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};
use tracing::{error, info, warn};

use anyhow::{Context, Result, bail};
use aya::{Ebpf, programs::TcAttachType};
use clap::ValueEnum;
use svc_lb_common::{PROG_POD_EGRESS, PROG_POD_INGRESS};

use super::{links, pins, probe::TcAttach};

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

/// What `--pod-devices` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodDevices {
    /// No per-packet path for pods.
    Off,
    /// The node's veth devices whose peers are in other network namespaces, followed.
    Auto,
    /// These devices only.
    List(Vec<String>),
}

impl PodDevices {
    /// The flag's values: `auto`, `none`, or device names. Without the flag, `host`
    /// scope discovers (pods' traffic has no other path then) and `all` scope has none:
    /// the socket programs already translate every pod's connections, and a tc program
    /// on every pod device would only add a map lookup to each of their packets.
    pub fn from_flag(values: &[String], scope: SocketLbScope) -> Self {
        match values {
            [] if scope == SocketLbScope::Host => Self::Auto,
            [] => Self::Off,
            [v] if v == "auto" => Self::Auto,
            [v] if v == "none" => Self::Off,
            _ => Self::List(values.to_vec()),
        }
    }

    pub fn is_off(&self) -> bool {
        *self == Self::Off
    }

    /// The listed devices that are also external devices (`--devices`): the external
    /// path keeps them, so the per-packet path leaves them out.
    pub fn listed_external(&self, external: &[String]) -> Vec<String> {
        match self {
            Self::List(l) => l.iter().filter(|d| external.contains(d)).cloned().collect(),
            _ => Vec::new(),
        }
    }
}

/// The name and index of `link` when it is a pod device: a veth whose peer is in
/// another network namespace (the kernel then reports the peer's namespace id,
/// `IFLA_LINK_NETNSID`).
pub fn pod_link(link: &LinkMessage) -> Option<(String, u32)> {
    let veth = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    });
    let other_netns = link
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
    if !(veth && other_netns) {
        return None;
    }
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some((n.clone(), link.header.index)),
        _ => None,
    })
}

/// How long one netlink answer may take.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);
/// Without link events, the pod devices are looked at again this often: an attach that
/// failed is retried, an event lost to a full socket buffer is caught up.
pub const RESCAN_EVERY: Duration = Duration::from_secs(10);

fn route_socket(groups: u32, timeout: Duration) -> Result<netlink_sys::Socket> {
    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
        .context("open a NETLINK_ROUTE socket")?;
    sock.bind(&netlink_sys::SocketAddr::new(0, groups))
        .context("bind the NETLINK_ROUTE socket")?;
    super::sys::set_recv_timeout(&sock, timeout).context("set the netlink receive timeout")?;
    Ok(sock)
}

/// The pod devices of this network namespace now, with their indexes (an
/// `RTM_GETLINK` dump).
pub fn discover() -> Result<Vec<(String, u32)>> {
    let sock = route_socket(0, NETLINK_TIMEOUT)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(
        header,
        RouteNetlinkMessage::GetLink(LinkMessage::default()).into(),
    );
    msg.finalize();
    let mut req = vec![0; msg.buffer_len()];
    msg.serialize(&mut req);
    sock.send_to(&req, &netlink_sys::SocketAddr::new(0, 0), 0)
        .context("send the link dump request")?;
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        sock.recv(&mut buf, 0).context("receive the link dump")?;
        let mut off = 0;
        while off + 16 <= buf.len() {
            let len =
                u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
            if len < 16 || off + len > buf.len() {
                bail!("malformed netlink message (length {len} at offset {off})");
            }
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + len])
                .map_err(|e| anyhow::anyhow!("decode a link message: {e}"))?;
            off += (len + 3) & !3;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) if e.raw_code() != 0 => {
                    return Err(std::io::Error::from_raw_os_error(-e.raw_code()))
                        .context("link dump");
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    out.extend(pod_link(&link));
                }
                _ => {}
            }
        }
    }
}

/// Wakes the returned receiver on every link event of this network namespace (and
/// every [`RESCAN_EVERY`] without one), from a thread that ends with the receiver.
pub fn watch_links() -> Result<tokio::sync::mpsc::Receiver<()>> {
    const RTMGRP_LINK: u32 = 1;
    let sock = route_socket(RTMGRP_LINK, RESCAN_EVERY)?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("pod-devices".to_owned())
        .spawn(move || {
            let mut buf = Vec::with_capacity(64 * 1024);
            loop {
                buf.clear();
                if let Err(e) = sock.recv(&mut buf, 0) {
                    let timeout = matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    );
                    if !timeout {
                        // ENOBUFS (events lost): the rescan below catches up.
                        warn!(error = %e, "link events: receive failed; rescanning");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                // A full channel already holds a wake-up.
                if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        })
        .context("start the link event thread")?;
    Ok(rx)
}

/// The per-packet path's devices at run time: which are attached, which failed (and
/// are tried again on the next link event or rescan).
pub struct PodPath {
    mode: PodDevices,
    /// Device name → interface index when attached (0: a pin of an earlier run).
    attached: BTreeMap<String, u32>,
    failed: BTreeMap<String, String>,
    events: Option<tokio::sync::mpsc::Receiver<()>>,
    adopted: bool,
    /// Discovered devices already reported as left to the external path.
    external_said: BTreeSet<String>,
}

impl PodPath {
    /// Starts following link events, unless the path is off.
    pub fn new(mode: PodDevices) -> Self {
        let events = if mode.is_off() {
            None
        } else {
            match watch_links() {
                Ok(rx) => Some(rx),
                Err(e) => {
                    error!(error = %format!("{e:#}"), "pod devices: cannot follow link events; looked at once, at start");
                    None
                }
            }
        };
        Self {
            mode,
            attached: BTreeMap::new(),
            failed: BTreeMap::new(),
            events,
            adopted: false,
            external_said: BTreeSet::new(),
        }
    }

    pub fn mode(&self) -> &PodDevices {
        &self.mode
    }

    /// The next link event (or rescan); never, without a watcher.
    pub async fn changed(&mut self) {
        match self.events.as_mut() {
            Some(rx) => {
                if rx.recv().await.is_none() {
                    self.events = None;
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// The devices the path should be on now; never one of `exclude` (the external
    /// devices: a node's own uplink may be a veth too, in a container-based node).
    /// A listed device that is missing has index 0 (its attach then fails and is retried).
    /// A discovered device left out that way is logged once (a listed one is warned
    /// about at start, in [`PodPath::reconcile`]).
    fn wanted(&mut self, exclude: &[String]) -> Result<BTreeMap<String, u32>> {
        let all = match &self.mode {
            PodDevices::Off => Vec::new(),
            PodDevices::List(l) => l.iter().map(|d| (d.clone(), index_of(d))).collect(),
            PodDevices::Auto => discover().context("pod devices: list the links")?,
        };
        let (external, pods): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|(d, _)| exclude.contains(d));
        if self.mode == PodDevices::Auto {
            for dev in first_said(&mut self.external_said, &external) {
                info!(
                    device = %dev,
                    "--pod-devices auto: this veth is also in --devices; it stays on the external path only, without the per-packet path for pods"
                );
            }
        }
        Ok(pods.into_iter().collect())
    }

    /// Attaches the programs to new pod devices (each on its own: one failing device
    /// keeps the others served), forgets the pins of devices that went away, and tells
    /// `status`. `attach` attaches to one device.
    pub fn reconcile(
        &mut self,
        bpffs: &Path,
        exclude: &[String],
        mut attach: impl FnMut(&str) -> Result<()>,
    ) {
        // The first time, the pins of an earlier run: a device still wanted gets this
        // run's programs swapped into its links, one no longer wanted loses them.
        let first = !self.adopted;
        if first {
            self.attached = pinned_devices(bpffs).into_iter().map(|d| (d, 0)).collect();
            self.adopted = true;
            // Said once: otherwise the name would silently do nothing on this path.
            let both = self.mode.listed_external(exclude);
            if !both.is_empty() {
                warn!(
                    devices = ?both,
                    "--pod-devices names devices that are also in --devices: they stay on the external path only, without the per-packet path for pods"
                );
            }
        }
        let wanted = match self.wanted(exclude) {
            Ok(w) => w,
            Err(e) => {
                error!(error = %format!("{e:#}"), "pod devices unchanged");
                return;
            }
        };
        let gone: Vec<String> = self
            .attached
            .keys()
            .filter(|d| !wanted.contains_key(*d))
            .cloned()
            .collect();
        if !gone.is_empty() {
            links::detach_devices(bpffs, &gone);
            info!(devices = ?gone, "per-packet path: pod devices gone");
            for d in &gone {
                self.attached.remove(d);
            }
        }
        self.failed.retain(|d, _| wanted.contains_key(d));
        // New devices, and a name that now belongs to another device (a pod's veth
        // deleted and created again between two looks): its old links went with it.
        let todo: Vec<(String, u32)> = wanted
            .iter()
            .filter(|(d, i)| first || self.attached.get(*d) != Some(*i))
            .map(|(d, i)| (d.clone(), *i))
            .collect();
        for (dev, ifindex) in &todo {
            match attach(dev) {
                Ok(()) => {
                    info!(device = %dev, ifindex, "per-packet path attached to pod device");
                    self.attached.insert(dev.clone(), *ifindex);
                    self.failed.remove(dev);
                }
                Err(e) => {
                    // Half attached (ingress translating, egress not) would break flows.
                    links::detach_devices(bpffs, std::slice::from_ref(dev));
                    let e = format!("{e:#}");
                    error!(device = %dev, error = %e, "per-packet path: attach failed; retried on the next link event");
                    self.attached.remove(dev);
                    self.failed.insert(dev.clone(), e);
                }
            }
        }
        let devices: Vec<String> = self.attached.keys().cloned().collect();
        let pod_error = (!self.failed.is_empty()).then(|| {
            self.failed
                .iter()
                .map(|(d, e)| format!("{d}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
        let discovery = self.mode == PodDevices::Auto;
        crate::status::update(|st| {
            st.pod_devices = devices;
            st.pod_error = pod_error;
            st.pod_discovery = discovery;
        });
    }
}

/// The devices of `found` not in `said` yet, which they are added to: each is named
/// once per run, however often it is found again.
fn first_said(said: &mut BTreeSet<String>, found: &[(String, u32)]) -> Vec<String> {
    found
        .iter()
        .filter(|(d, _)| said.insert(d.clone()))
        .map(|(d, _)| d.clone())
        .collect()
}

/// The interface index of `dev`; 0 when there is no such device.
fn index_of(dev: &str) -> u32 {
    std::ffi::CString::new(dev)
        // SAFETY: a valid NUL-terminated string.
        .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) })
        .unwrap_or(0)
}

/// Devices with a pin or record of the per-packet programs under `bpffs`.
fn pinned_devices(bpffs: &Path) -> BTreeSet<String> {
    devices_with(bpffs, &[PROG_POD_INGRESS, PROG_POD_EGRESS])
}

/// Devices with a pin (TCX link) or record (netlink filter) of one of `programs`
/// under `bpffs`: where those programs run (`list` tells which path serves what).
pub fn devices_with(bpffs: &Path, programs: &[&str]) -> BTreeSet<String> {
    let dirs: [PathBuf; 2] = [pins::links_dir(bpffs), pins::tc_netlink_dir(bpffs)];
    let mut out = BTreeSet::new();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((prog, dev)) = name.split_once('@')
                && programs.contains(&prog)
                && !dev.ends_with("_new")
            {
                out.insert(dev.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_devices_flag_defaults_follow_the_scope() {
        let v = |s: &[&str]| s.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            PodDevices::from_flag(&[], SocketLbScope::Host),
            PodDevices::Auto
        );
        assert_eq!(
            PodDevices::from_flag(&[], SocketLbScope::All),
            PodDevices::Off
        );
        assert_eq!(
            PodDevices::from_flag(&v(&["auto"]), SocketLbScope::All),
            PodDevices::Auto
        );
        assert_eq!(
            PodDevices::from_flag(&v(&["none"]), SocketLbScope::Host),
            PodDevices::Off
        );
        assert_eq!(
            PodDevices::from_flag(&v(&["p1", "p2"]), SocketLbScope::Host),
            PodDevices::List(v(&["p1", "p2"]))
        );
        // A name in both lists is named (the external path keeps it).
        let list = PodDevices::from_flag(&v(&["p1", "eth0", "p2"]), SocketLbScope::Host);
        assert_eq!(list.listed_external(&v(&["eth0", "eth1"])), v(&["eth0"]));
        assert!(list.listed_external(&v(&["eth1"])).is_empty());
        assert!(PodDevices::Auto.listed_external(&v(&["eth0"])).is_empty());
    }

    #[test]
    fn external_devices_found_by_discovery_are_named_once() {
        let mut said = BTreeSet::new();
        let found = |names: &[&str]| -> Vec<(String, u32)> {
            names.iter().map(|n| ((*n).to_owned(), 3)).collect()
        };
        assert_eq!(first_said(&mut said, &found(&["veth0"])), vec!["veth0"]);
        assert!(first_said(&mut said, &found(&["veth0"])).is_empty());
        assert_eq!(
            first_said(&mut said, &found(&["veth0", "veth1"])),
            vec!["veth1"]
        );
        assert!(first_said(&mut said, &[]).is_empty());
    }

    #[test]
    fn pod_links_are_veths_with_a_peer_in_another_namespace() {
        let link = |kind: InfoKind, netns: bool| {
            let mut m = LinkMessage::default();
            m.header.index = 7;
            m.attributes.push(LinkAttribute::IfName("veth7".to_owned()));
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
            if netns {
                m.attributes.push(LinkAttribute::LinkNetNsId(3));
            }
            m
        };
        assert_eq!(
            pod_link(&link(InfoKind::Veth, true)),
            Some(("veth7".to_owned(), 7))
        );
        // Both ends here (a veth pair inside the node), or another kind of device.
        assert_eq!(pod_link(&link(InfoKind::Veth, false)), None);
        assert_eq!(pod_link(&link(InfoKind::Bridge, true)), None);
    }

    /// The dump itself works in any namespace (the test's may have no pod devices).
    #[test]
    fn discover_lists_links_without_error() {
        let found = discover().expect("RTM_GETLINK dump");
        assert!(
            found
                .iter()
                .all(|(name, index)| !name.is_empty() && *index > 0)
        );
    }

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
