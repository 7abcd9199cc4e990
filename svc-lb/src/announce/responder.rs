//! Answers ARP requests and Neighbor Solicitations for the addresses this node
//! announces, on one interface, from packet sockets (as MetalLB's speaker does), and
//! sends gratuitous ARP / unsolicited Neighbor Advertisements when it takes addresses
//! over. The addresses are never configured on the interface: the kernel would then
//! answer for them on every node.
//!
//! Two sockets per interface, each on its own thread: one bound to ARP frames only, one
//! to IPv6 with a classic BPF filter that lets through only ICMPv6 Neighbor
//! Solicitations (no extension headers, as senders write them), plus all-multicast
//! membership so that a NIC that filters multicast still delivers NS sent to the
//! solicited-node groups. Both sockets wake every [`POLL`] to notice a stop, and reopen
//! after an error (the interface went away or down).
use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use pnet_base::MacAddr;
use pnet_packet::{
    MutablePacket, Packet,
    arp::{ArpHardwareTypes, ArpOperations, ArpPacket, MutableArpPacket},
    ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket},
    icmpv6::{
        self, Icmpv6Code, Icmpv6Packet, Icmpv6Types,
        ndp::{
            MutableNeighborAdvertPacket, NdpOption, NdpOptionTypes, NeighborAdvertFlags,
            NeighborSolicitPacket,
        },
    },
    ip::IpNextHeaderProtocols,
    ipv6::{Ipv6Packet, MutableIpv6Packet},
};
use tracing::{debug, info, warn};

/// How often a blocked receive wakes up to check for a stop.
pub const POLL: Duration = Duration::from_millis(200);
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const NA_LEN: usize = 14 + 40 + 24 + 8;
/// ARP frames are padded to Ethernet's minimum (60 bytes without the FCS).
const ARP_LEN: usize = 60;

/// An interface's identity as the responder needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: i32,
    pub mac: [u8; 6],
}

/// Reads `iface`'s index and MAC address (netlink, so that it sees this network
/// namespace's interfaces).
pub fn link(iface: &str) -> Result<Link> {
    let mut ifindex = None;
    let mut mac = None;
    for a in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        if a.interface_name != iface {
            continue;
        }
        let Some(addr) = a.address else { continue };
        if let Some(l) = addr.as_link_addr() {
            ifindex = Some(l.ifindex());
            mac = l.addr();
        }
    }
    let ifindex = ifindex.with_context(|| format!("no interface {iface}"))?;
    let mac = mac.with_context(|| format!("interface {iface} has no MAC address"))?;
    Ok(Link {
        ifindex: i32::try_from(ifindex).context("interface index")?,
        mac,
    })
}

/// Counts of what a responder did, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub arp_replies: AtomicU64,
    pub na_replies: AtomicU64,
    pub announcements: AtomicU64,
}

/// The responder of one interface.
pub struct Responder {
    iface: String,
    owned: Arc<RwLock<BTreeSet<IpAddr>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub counters: Arc<Counters>,
}

impl Responder {
    /// Starts answering on `iface` (for no address yet). The interface may appear
    /// later: the threads retry.
    pub fn start(iface: &str) -> Result<Self> {
        let owned = Arc::new(RwLock::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut threads = Vec::new();
        for v6 in [false, true] {
            let (iface, owned, stop, counters) = (
                iface.to_owned(),
                owned.clone(),
                stop.clone(),
                counters.clone(),
            );
            let name = format!("l2-{}{}", if v6 { "ndp-" } else { "arp-" }, iface);
            let t = std::thread::Builder::new()
                .name(name.chars().take(15).collect())
                .spawn(move || serve(&iface, v6, &owned, &stop, &counters))
                .with_context(|| format!("start the L2 responder thread of {name}"))?;
            threads.push(t);
        }
        Ok(Self {
            iface: iface.to_owned(),
            owned,
            stop,
            threads,
            counters,
        })
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Answers for `ips` from now on; returns the addresses that are new.
    pub fn set(&self, ips: BTreeSet<IpAddr>) -> Vec<IpAddr> {
        let mut owned = self
            .owned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = ips.difference(&owned).copied().collect();
        *owned = ips;
        new
    }

    /// Sends a gratuitous ARP request (IPv4) or an unsolicited Neighbor Advertisement
    /// with the Override flag (IPv6) for each of `ips`, so that neighbours replace
    /// their cache entries now instead of when they expire.
    pub fn announce(&self, ips: &[IpAddr]) -> Result<()> {
        let l = link(&self.iface)?;
        let sock = open(l.ifindex, ETH_P_ARP, false)
            .with_context(|| format!("packet socket on {}", self.iface))?;
        for ip in ips {
            let frame = match ip {
                IpAddr::V4(a) => gratuitous_arp(l.mac, *a),
                IpAddr::V6(a) => {
                    neighbor_advert(&l, *a, None, ALL_NODES, NeighborAdvertFlags::Override)
                }
            };
            let frame = frame.context("build the announcement")?;
            send(&sock, &frame).with_context(|| format!("announce {ip} on {}", self.iface))?;
            self.counters.announcements.fetch_add(1, Ordering::Relaxed);
            crate::metrics::l2_gratuitous_sent(ip.is_ipv6());
        }
        Ok(())
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One socket's loop: open, answer until an error, reopen after a pause.
fn serve(
    iface: &str,
    v6: bool,
    owned: &RwLock<BTreeSet<IpAddr>>,
    stop: &AtomicBool,
    counters: &Counters,
) {
    let what = if v6 { "NDP" } else { "ARP" };
    let mut last_error = String::new();
    while !stop.load(Ordering::Relaxed) {
        let opened = link(iface).and_then(|l| {
            let proto = if v6 { ETH_P_IPV6 } else { ETH_P_ARP };
            Ok((l, open(l.ifindex, proto, v6)?))
        });
        let (l, sock) = match opened {
            Ok(x) => x,
            Err(e) => {
                let e = format!("{e:#}");
                if e != last_error {
                    warn!(iface, proto = what, error = %e, "L2 responder cannot open its socket; retrying");
                    last_error = e;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        info!(
            iface,
            proto = what,
            ifindex = l.ifindex,
            "L2 responder listening"
        );
        last_error.clear();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `buf` is valid for writes of its length for the call's duration.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                warn!(iface, proto = what, error = %e, "L2 responder receive failed; reopening");
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
            let frame = &buf[..usize::try_from(n).unwrap_or(0)];
            let reply = {
                let owned = owned
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if owned.is_empty() {
                    continue;
                }
                if v6 {
                    answer_ns(&l, frame, &owned)
                } else {
                    answer_arp(l.mac, frame, &owned)
                }
            };
            let Some(reply) = reply else { continue };
            match send(&sock, &reply) {
                Ok(()) if v6 => {
                    counters.na_replies.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::l2_reply_sent(true);
                }
                Ok(()) => {
                    counters.arp_replies.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::l2_reply_sent(false);
                }
                Err(e) => debug!(iface, proto = what, error = %e, "L2 reply not sent"),
            }
        }
    }
}

/// The ARP reply to `frame` when it asks for one of `owned`.
pub fn answer_arp(mac: [u8; 6], frame: &[u8], owned: &BTreeSet<IpAddr>) -> Option<Vec<u8>> {
    let eth = EthernetPacket::new(frame)?;
    if eth.get_ethertype() != EtherTypes::Arp {
        return None;
    }
    let arp = ArpPacket::new(eth.payload())?;
    if arp.get_operation() != ArpOperations::Request
        || arp.get_hardware_type() != ArpHardwareTypes::Ethernet
        || arp.get_protocol_type() != EtherTypes::Ipv4
    {
        return None;
    }
    let target = arp.get_target_proto_addr();
    // A request whose sender is the address itself is someone else's gratuitous ARP.
    if !owned.contains(&IpAddr::V4(target)) || arp.get_sender_proto_addr() == target {
        return None;
    }
    arp_frame(
        mac,
        arp.get_sender_hw_addr(),
        ArpOperations::Reply,
        target,
        arp.get_sender_hw_addr(),
        arp.get_sender_proto_addr(),
    )
}

fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Option<Vec<u8>> {
    arp_frame(
        mac,
        MacAddr::broadcast(),
        ArpOperations::Request,
        ip,
        MacAddr::zero(),
        ip,
    )
}

fn arp_frame(
    mac: [u8; 6],
    eth_dst: MacAddr,
    op: pnet_packet::arp::ArpOperation,
    sender_ip: Ipv4Addr,
    target_mac: MacAddr,
    target_ip: Ipv4Addr,
) -> Option<Vec<u8>> {
    let mac = MacAddr::from(mac);
    let mut buf = vec![0u8; ARP_LEN];
    let mut eth = MutableEthernetPacket::new(&mut buf)?;
    eth.set_destination(eth_dst);
    eth.set_source(mac);
    eth.set_ethertype(EtherTypes::Arp);
    let mut arp = MutableArpPacket::new(eth.payload_mut())?;
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_operation(op);
    arp.set_sender_hw_addr(mac);
    arp.set_sender_proto_addr(sender_ip);
    arp.set_target_hw_addr(target_mac);
    arp.set_target_proto_addr(target_ip);
    Some(buf)
}

/// The Neighbor Advertisement answering `frame` when it is a valid Neighbor
/// Solicitation for one of `owned`.
pub fn answer_ns(l: &Link, frame: &[u8], owned: &BTreeSet<IpAddr>) -> Option<Vec<u8>> {
    let eth = EthernetPacket::new(frame)?;
    if eth.get_ethertype() != EtherTypes::Ipv6 {
        return None;
    }
    let ip = Ipv6Packet::new(eth.payload())?;
    // RFC 4861 7.1.1: hop limit 255 proves the NS was not routed.
    if ip.get_next_header() != IpNextHeaderProtocols::Icmpv6 || ip.get_hop_limit() != 255 {
        return None;
    }
    let ns = NeighborSolicitPacket::new(ip.payload())?;
    if ns.get_icmpv6_type() != Icmpv6Types::NeighborSolicit || ns.get_icmpv6_code() != Icmpv6Code(0)
    {
        return None;
    }
    let target = ns.get_target_addr();
    if !owned.contains(&IpAddr::V6(target)) {
        return None;
    }
    let src = ip.get_source();
    if src.is_unspecified() {
        // Duplicate address detection: the answer goes to all nodes, unsolicited.
        return neighbor_advert(l, target, None, ALL_NODES, NeighborAdvertFlags::Override);
    }
    neighbor_advert(
        l,
        target,
        Some(eth.get_source()),
        src,
        NeighborAdvertFlags::Solicited | NeighborAdvertFlags::Override,
    )
}

fn neighbor_advert(
    l: &Link,
    target: Ipv6Addr,
    eth_dst: Option<MacAddr>,
    dst: Ipv6Addr,
    flags: u8,
) -> Option<Vec<u8>> {
    let eth_dst = eth_dst.unwrap_or_else(|| {
        // The Ethernet group of an IPv6 multicast address: 33:33 and its last 32 bits.
        let o = dst.octets();
        MacAddr::new(0x33, 0x33, o[12], o[13], o[14], o[15])
    });
    // The source is the target address itself, as Linux writes the advertisements for
    // its own addresses (ndisc_send_na). Not the interface's link-local address: a
    // client may drop an answer whose source has a scope its query had not; ndisc6
    // (1.0.5) does, and reported "No response" to our advertisements from fe80::/10
    // while taking the same advertisement from the target address.
    let src = target;
    let mut buf = vec![0u8; NA_LEN];
    let mut eth = MutableEthernetPacket::new(&mut buf)?;
    eth.set_destination(eth_dst);
    eth.set_source(MacAddr::from(l.mac));
    eth.set_ethertype(EtherTypes::Ipv6);
    let mut ip = MutableIpv6Packet::new(eth.payload_mut())?;
    ip.set_version(6);
    ip.set_payload_length(u16::try_from(NA_LEN - 54).ok()?);
    ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
    ip.set_hop_limit(255);
    ip.set_source(src);
    ip.set_destination(dst);
    let mut na = MutableNeighborAdvertPacket::new(ip.payload_mut())?;
    na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
    na.set_icmpv6_code(Icmpv6Code(0));
    na.set_flags(flags);
    na.set_target_addr(target);
    na.set_options(&[NdpOption {
        option_type: NdpOptionTypes::TargetLLAddr,
        length: 1,
        data: l.mac.to_vec(),
    }]);
    let sum = icmpv6::checksum(&Icmpv6Packet::new(na.packet())?, &src, &dst);
    na.set_checksum(sum);
    Some(buf)
}

/// A raw packet socket bound to `proto` frames of interface `ifindex`; with `ns_only`,
/// filtered to ICMPv6 Neighbor Solicitations and in all-multicast mode.
fn open(ifindex: i32, proto: u16, ns_only: bool) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_PACKET) (needs CAP_NET_RAW)");
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    if ns_only {
        // ldb [20] (IPv6 next header); jeq 58; ldb [54] (ICMPv6 type); jeq 135;
        // accept; drop.
        let mut code = [
            bpf(0x30, 0, 0, 20),
            bpf(0x15, 0, 3, 58),
            bpf(0x30, 0, 0, 54),
            bpf(0x15, 0, 1, 135),
            bpf(0x06, 0, 0, 0x0004_0000),
            bpf(0x06, 0, 0, 0),
        ];
        let prog = libc::sock_fprog {
            len: u16::try_from(code.len()).context("filter length")?,
            filter: code.as_mut_ptr(),
        };
        setsockopt(&sock, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
            .context("attach the Neighbor Solicitation filter")?;
        let mreq = libc::packet_mreq {
            mr_ifindex: ifindex,
            mr_type: u16::try_from(libc::PACKET_MR_ALLMULTI).context("mr_type")?,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        setsockopt(&sock, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
            .context("join all multicast groups")?;
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = u16::try_from(libc::AF_PACKET).context("AF_PACKET")?;
    sll.sll_protocol = proto.to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: `sll` is a valid sockaddr_ll and its size is passed along.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const sll).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).context("sockaddr size")?,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("bind the packet socket");
    }
    crate::datapath::sys::set_recv_timeout(&sock, POLL).context("receive timeout")?;
    Ok(sock)
}

fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn setsockopt<T>(sock: &OwnedFd, level: i32, name: i32, value: &T) -> Result<()> {
    // SAFETY: `value` points at a live T whose size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            u32::try_from(std::mem::size_of::<T>()).context("option size")?,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setsockopt");
    }
    Ok(())
}

fn send(sock: &OwnedFd, frame: &[u8]) -> Result<()> {
    // SAFETY: `frame` is valid for reads of its length for the call's duration.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("send");
    }
    if usize::try_from(n).ok() != Some(frame.len()) {
        bail!("short send: {n} of {} bytes", frame.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const PEER: [u8; 6] = [2, 0, 0, 0, 0, 9];

    fn owned(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn arp_request(target: Ipv4Addr, sender: Ipv4Addr) -> Vec<u8> {
        arp_frame(
            PEER,
            MacAddr::broadcast(),
            ArpOperations::Request,
            sender,
            MacAddr::zero(),
            target,
        )
        .unwrap()
    }

    #[test]
    fn arp_requests_for_owned_addresses_get_a_reply_to_the_asker() {
        let ips = owned(&["192.0.2.10"]);
        let q = arp_request(Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 99));
        let r = answer_arp(MAC, &q, &ips).expect("a reply");
        let eth = EthernetPacket::new(&r).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::from(PEER));
        assert_eq!(eth.get_source(), MacAddr::from(MAC));
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_operation(), ArpOperations::Reply);
        assert_eq!(arp.get_sender_hw_addr(), MacAddr::from(MAC));
        assert_eq!(arp.get_sender_proto_addr(), Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(arp.get_target_proto_addr(), Ipv4Addr::new(192, 0, 2, 99));
        // Other addresses, gratuitous ARP of others and replies: no answer.
        let other = arp_request(Ipv4Addr::new(192, 0, 2, 11), Ipv4Addr::new(192, 0, 2, 99));
        assert!(answer_arp(MAC, &other, &ips).is_none());
        let garp = gratuitous_arp(PEER, Ipv4Addr::new(192, 0, 2, 10)).unwrap();
        assert!(answer_arp(MAC, &garp, &ips).is_none());
        assert!(answer_arp(MAC, &r, &ips).is_none());
    }

    fn ns(target: Ipv6Addr, src: Ipv6Addr, hop_limit: u8) -> Vec<u8> {
        // Build an NS by rewriting an NA's type and source: same layout for our
        // purpose (the responder does not check the checksum: the kernel did).
        let l = Link {
            ifindex: 1,
            mac: PEER,
        };
        let mut f = neighbor_advert(&l, target, Some(MacAddr::from(MAC)), ALL_NODES, 0).unwrap();
        f[54] = 135;
        f[21] = hop_limit;
        f[22..38].copy_from_slice(&src.octets());
        f
    }

    #[test]
    fn neighbor_solicitations_get_a_solicited_override_advert() {
        let l = Link {
            ifindex: 1,
            mac: MAC,
        };
        let vip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let asker: Ipv6Addr = "2001:db8::99".parse().unwrap();
        let ips = owned(&["2001:db8::10"]);
        let r = answer_ns(&l, &ns(vip, asker, 255), &ips).expect("an advert");
        let eth = EthernetPacket::new(&r).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::from(PEER));
        let ip = Ipv6Packet::new(eth.payload()).unwrap();
        assert_eq!(ip.get_destination(), asker);
        assert_eq!(
            ip.get_source(),
            vip,
            "from the target address, as Linux answers"
        );
        assert_eq!(ip.get_hop_limit(), 255);
        let icmp = Icmpv6Packet::new(ip.payload()).unwrap();
        assert_eq!(icmp.get_icmpv6_type(), Icmpv6Types::NeighborAdvert);
        assert_eq!(
            icmp.get_checksum(),
            icmpv6::checksum(&icmp, &ip.get_source(), &ip.get_destination())
        );
        let na = pnet_packet::icmpv6::ndp::NeighborAdvertPacket::new(ip.payload()).unwrap();
        assert_eq!(na.get_target_addr(), vip);
        assert_eq!(
            na.get_flags(),
            NeighborAdvertFlags::Solicited | NeighborAdvertFlags::Override
        );
        let opts = na.get_options();
        assert_eq!(opts.len(), 1);
        assert_eq!(opts[0].data, MAC.to_vec());
        // Routed (hop limit < 255) or for another address: ignored.
        assert!(answer_ns(&l, &ns(vip, asker, 64), &ips).is_none());
        let other: Ipv6Addr = "2001:db8::11".parse().unwrap();
        assert!(answer_ns(&l, &ns(other, asker, 255), &ips).is_none());
        // Duplicate address detection: unsolicited, to all nodes.
        let dad = answer_ns(&l, &ns(vip, Ipv6Addr::UNSPECIFIED, 255), &ips).unwrap();
        let ip = Ipv6Packet::new(&dad[14..]).unwrap();
        assert_eq!(ip.get_destination(), ALL_NODES);
        assert_eq!(&dad[..6], &[0x33, 0x33, 0, 0, 0, 1]);
    }
}
