//! Packet tests of the external path (tc/XDP) through BPF_PROG_TEST_RUN: a frame
//! builder and a parser that checks every length and checksum independently of the
//! eBPF code (so a checksum bug there cannot hide behind the same bug here), and a
//! fixture that loads the agent's eBPF object with private, unpinned maps.
//!
//! Included by `tests/tests/pkt.rs` through `#[path]`.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, RawFd},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SchedClassifier, Xdp},
};
use svc_lb_common::{
    AffinityExtKey, AffinityMatchKey, AffinityValue, Backend, CtEntry, CtKey, CtValue, ExtConfig,
    MAGLEV_TABLE_MAX, MaglevTable, NodeAddrKey, RevNat, SrcRange4Key, SrcRange6Key, Svc4Key,
    Svc6Key, SvcValue,
};

/// The address of `lo`, the device BPF_PROG_TEST_RUN builds its skb on: the kernel sets
/// `pkt_type` from the destination MAC against it, and tc serves only PACKET_HOST frames.
pub const NODE_MAC: [u8; 6] = [0; 6];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

// ---------------------------------------------------------------------------------
// Checksums (RFC 1071), written here independently of svc-lb-ebpf's csum.rs.

fn sum16(bytes: &[u8]) -> u32 {
    let mut s = 0u32;
    for pair in bytes.chunks(2) {
        let w = if pair.len() == 2 {
            u16::from_be_bytes([pair[0], pair[1]])
        } else {
            u16::from_be_bytes([pair[0], 0])
        };
        s += u32::from(w);
    }
    s
}

fn finish(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            sum16(&s.octets()) + sum16(&d.octets()) + u32::from(proto) + len as u32
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            sum16(&s.octets())
                + sum16(&d.octets())
                + sum16(&(len as u32).to_be_bytes())
                + u32::from(proto)
        }
        _ => panic!("mixed families"),
    }
}

/// Checksum of an L4 segment (TCP/UDP/ICMPv6 with pseudo-header, ICMP without).
fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> u16 {
    let base = if proto == ICMP {
        0
    } else {
        pseudo(src, dst, proto, seg.len())
    };
    finish(base + sum16(seg))
}

// ---------------------------------------------------------------------------------
// Builder.

/// A TCP or UDP packet to build.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

impl Spec {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self {
            src: src.parse().expect("test address"),
            sport,
            dst: dst.parse().expect("test address"),
            dport,
            proto: TCP,
            tcp_flags: flags,
            payload: b"hello".to_vec(),
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self {
            proto: UDP,
            tcp_flags: 0,
            ..Self::tcp(src, sport, dst, dport, 0)
        }
    }

    /// The Ethernet frame, with correct lengths and checksums.
    pub fn frame(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        let csum_at = if self.proto == TCP {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(5 << 4); // data offset
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&64240u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            16
        } else {
            let len = 8 + self.payload.len() as u16;
            l4.extend_from_slice(&len.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            6
        };
        l4.extend_from_slice(&self.payload);
        let c = l4_checksum(self.src, self.dst, self.proto, &l4);
        l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());

        let mut f = Vec::new();
        f.extend_from_slice(&NODE_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut ip = vec![0x45, 0];
                ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
                ip.extend_from_slice(&[64, self.proto, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                let c = finish(sum16(&ip));
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                f.extend_from_slice(&[self.proto, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

// ---------------------------------------------------------------------------------
// Parser: every length and checksum is verified, so a test that parses a frame also
// proves it is well-formed.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub ttl: u8,
    /// The IP header (20 bytes for IPv4 without options, 40 for IPv6).
    pub ip_header: Vec<u8>,
    /// TCP/UDP ports (0 for ICMP).
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// The L4 segment (header and payload).
    pub l4: Vec<u8>,
}

impl Parsed {
    pub fn payload(&self) -> &[u8] {
        match self.proto {
            TCP => &self.l4[usize::from(self.l4[12] >> 4) * 4..],
            _ => &self.l4[8..],
        }
    }
}

pub fn parse(frame: &[u8]) -> Result<Parsed> {
    ensure!(frame.len() >= 14, "frame of {} bytes", frame.len());
    let mut dst_mac = [0u8; 6];
    let mut src_mac = [0u8; 6];
    dst_mac.copy_from_slice(&frame[0..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = &frame[14..];
    let (src, dst, proto, ttl, hlen, l4) = match ethertype {
        0x0800 => {
            ensure!(ip.len() >= 20 && ip[0] == 0x45, "IPv4 header {:02x?}", ip);
            let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            ensure!(
                tot == ip.len(),
                "IPv4 total length {tot} != {} bytes",
                ip.len()
            );
            ensure!(finish(sum16(&ip[..20])) == 0, "IPv4 header checksum wrong");
            let s = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let d = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            (IpAddr::V4(s), IpAddr::V4(d), ip[9], ip[8], 20, &ip[20..])
        }
        0x86dd => {
            ensure!(ip.len() >= 40 && ip[0] >> 4 == 6, "IPv6 header");
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            ensure!(
                plen == ip.len() - 40,
                "IPv6 payload length {plen} != {}",
                ip.len() - 40
            );
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&ip[8..24]);
            d.copy_from_slice(&ip[24..40]);
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                ip[6],
                ip[7],
                40,
                &ip[40..],
            )
        }
        t => bail!("ethertype {t:#06x}"),
    };
    let (mut sport, mut dport, mut tcp_flags) = (0, 0, 0);
    match proto {
        TCP => {
            ensure!(l4.len() >= 20, "short TCP header");
            tcp_flags = l4[13];
        }
        UDP => {
            ensure!(l4.len() >= 8, "short UDP header");
            let ulen = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
            ensure!(ulen == l4.len(), "UDP length {ulen} != {}", l4.len());
        }
        ICMP | ICMPV6 => ensure!(l4.len() >= 8, "short ICMP header"),
        p => bail!("protocol {p}"),
    }
    if proto == TCP || proto == UDP {
        sport = u16::from_be_bytes([l4[0], l4[1]]);
        dport = u16::from_be_bytes([l4[2], l4[3]]);
    }
    let udp_no_csum = proto == UDP && src.is_ipv4() && l4[6] == 0 && l4[7] == 0;
    if !udp_no_csum {
        ensure!(
            l4_checksum(src, dst, proto, l4) == 0,
            "L4 checksum wrong (protocol {proto})"
        );
    }
    Ok(Parsed {
        dst_mac,
        src_mac,
        src,
        dst,
        proto,
        ttl,
        ip_header: ip[..hlen].to_vec(),
        sport,
        dport,
        tcp_flags,
        l4: l4.to_vec(),
    })
}

// ---------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN (aya 0.14 has no wrapper; the agent's sys module has one).

/// Runs a program once on `frame`: (return value, frame after the program).
pub fn test_run(prog_fd: RawFd, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    // SAFETY: the descriptor belongs to a program the fixture keeps loaded for as long
    // as it lives, which outlasts this call.
    let prog = unsafe { std::os::fd::BorrowedFd::borrow_raw(prog_fd) };
    let r = svc_lb::datapath::sys::prog_test_run(prog, frame, 4096, 1)?;
    Ok((r.retval, r.data_out))
}

// ---------------------------------------------------------------------------------
// Fixture: the agent's object with fresh, private maps.

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub fn v4(a: &str) -> u32 {
    u32::from(a.parse::<Ipv4Addr>().expect("test IPv4 address")).to_be()
}

pub fn v6(a: &str) -> [u32; 4] {
    let o = a.parse::<Ipv6Addr>().expect("test IPv6 address").octets();
    let mut w = [0u32; 4];
    for (i, c) in o.chunks(4).enumerate() {
        w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    }
    w
}

/// Address words of an address string (IPv4 in word 0).
pub fn words(a: &str) -> [u32; 4] {
    if a.contains(':') {
        v6(a)
    } else {
        [v4(a), 0, 0, 0]
    }
}

pub struct Datapath {
    pub ebpf: Ebpf,
    pub tc_in: RawFd,
    pub tc_out: RawFd,
    pub xdp: RawFd,
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))
}

impl Datapath {
    /// Loads the object (no pins: every fixture has its own maps) and its three
    /// external programs. The big maps are shrunk: LRU maps are preallocated.
    pub fn load() -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for (name, max) in [
            (svc_lb_common::MAP_CT, 4096u32),
            (svc_lb_common::MAP_AFFINITY, 256),
            (svc_lb_common::MAP_AFFINITY_EXT, 256),
            (svc_lb_common::MAP_SOCK_RNAT4, 256),
            (svc_lb_common::MAP_SOCK_RNAT6, 256),
            ("AYA_LOGS", 4096),
        ] {
            loader.map_max_entries(name, max);
        }
        let mut ebpf = loader
            .load(svc_lb::datapath::load::OBJECT)
            .context("load the eBPF object (needs root)")?;
        let mut fd = |name: &str, xdp: bool| -> Result<RawFd> {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?;
            if xdp {
                let p: &mut Xdp = prog.try_into()?;
                p.load()
                    .with_context(|| format!("load {name} (verifier)"))?;
                Ok(p.fd()?.as_fd().as_raw_fd())
            } else {
                let p: &mut SchedClassifier = prog.try_into()?;
                p.load()
                    .with_context(|| format!("load {name} (verifier)"))?;
                Ok(p.fd()?.as_fd().as_raw_fd())
            }
        };
        let tc_in = fd(svc_lb_common::PROG_TC_INGRESS, false)?;
        let tc_out = fd(svc_lb_common::PROG_TC_EGRESS, false)?;
        let xdp = fd(svc_lb_common::PROG_XDP, true)?;
        Ok(Self {
            ebpf,
            tc_in,
            tc_out,
            xdp,
        })
    }

    pub fn run(&self, fd: RawFd, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        test_run(fd, frame)
    }

    /// Writes `ExtConfig` (SNAT addresses and Maglev table size).
    pub fn config(&mut self, snat4: &str, snat6: &str, maglev_size: u32) -> Result<()> {
        let mut a: Array<&mut MapData, ExtConfig> =
            Array::try_from(map(&mut self.ebpf, svc_lb_common::MAP_CONFIG)?)?;
        let cfg = ExtConfig {
            snat4_be: if snat4.is_empty() { 0 } else { v4(snat4) },
            snat6_be: if snat6.is_empty() { [0; 4] } else { v6(snat6) },
            maglev_size,
            flags: 0,
            _pad: 0,
            snat_port_min: 0,
            snat_port_max: 0,
            reject_rate: 0,
            reject_burst: 0,
            _pad2: 0,
        };
        a.set(0, cfg, 0)?;
        Ok(())
    }

    /// Sets the limits of `ExtConfig` (after [`Self::config`]): SNAT ports (0, 0: the
    /// default range) and the reject token bucket (`rate` 0: no limit).
    pub fn limits(&mut self, snat_ports: (u16, u16), rate: u32, burst: u32) -> Result<()> {
        let mut a: Array<&mut MapData, ExtConfig> =
            Array::try_from(map(&mut self.ebpf, svc_lb_common::MAP_CONFIG)?)?;
        let mut cfg = a.get(&0, 0)?;
        cfg.snat_port_min = snat_ports.0;
        cfg.snat_port_max = snat_ports.1;
        cfg.reject_rate = rate;
        cfg.reject_burst = burst;
        a.set(0, cfg, 0)?;
        Ok(())
    }

    /// Marks device `ifindex` in `LB_XDPDEV_V1` (`XDP_DEV_*` flags). BPF_PROG_TEST_RUN
    /// runs XDP on the loopback device's queue, so the programs see `lo`'s index.
    pub fn xdp_dev(&mut self, ifindex: u32, flags: u32) -> Result<()> {
        let mut m: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_XDP_DEV)?)?;
        m.insert(ifindex, flags, 0)?;
        Ok(())
    }

    /// Makes the XDP program's device addresses exactly `devices` (ifindex, MAC), with
    /// the agent's own code (`LB_XDPMAC`, `LB_XDPMACHI`).
    pub fn xdp_macs(&mut self, devices: &[(u32, [u8; 6])]) -> Result<()> {
        svc_lb::datapath::links::write_xdp_macs(&mut self.ebpf, devices)
    }

    /// Runs XDP on `frame` as received by device `ifindex` (which must exist in the
    /// caller's netns), queue 0: a `struct xdp_md` as the test run's context.
    pub fn run_xdp_on(&self, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, u32::try_from(frame.len())?, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        // SAFETY: the descriptor belongs to a program this fixture keeps loaded.
        let prog = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.xdp) };
        let r = svc_lb::datapath::sys::prog_test_run_ctx(prog, frame, 4096, 1, &ctx)?;
        Ok((r.retval, r.data_out))
    }

    pub fn backend(&mut self, id: u32, addr: &str, port: u16, proto: u8, flags: u8) -> Result<()> {
        let mut m: HashMap<&mut MapData, u32, Backend> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_BACKENDS)?)?;
        let b = Backend {
            addr_be: words(addr),
            port_be: port.to_be(),
            proto,
            family: if addr.contains(':') { 6 } else { 4 },
            state: 0,
            flags,
            _pad: [0; 2],
        };
        m.insert(id, b, 0)?;
        Ok(())
    }

    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        let mut m: HashMap<&mut MapData, u32, Backend> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_BACKENDS)?)?;
        m.remove(&id)?;
        Ok(())
    }

    /// An external frontend: master slot, slots `1..=ids.len()`, rev-NAT entry. An
    /// empty `addr` of a family is the NodePort wildcard ("0.0.0.0" / "::").
    pub fn frontend(
        &mut self,
        addr: &str,
        port: u16,
        proto: u8,
        rev_nat_id: u32,
        flags: u16,
        ids: &[u32],
    ) -> Result<()> {
        let master = SvcValue {
            backend_id: 0,
            count: ids.len() as u32,
            rev_nat_id,
            flags,
            _pad: 0,
            affinity_timeout_s: 10_800,
        };
        let slot = |id: u32| SvcValue {
            backend_id: id,
            count: 0,
            rev_nat_id,
            flags: 0,
            _pad: 0,
            affinity_timeout_s: 0,
        };
        if addr.contains(':') {
            let mut m: HashMap<&mut MapData, Svc6Key, SvcValue> =
                HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_SVC6)?)?;
            let key = |s: u16| Svc6Key {
                addr_be: v6(addr),
                port_be: port.to_be(),
                slot: s,
                proto,
                scope: svc_lb_common::SCOPE_EXTERNAL,
                _pad: [0; 2],
            };
            for (i, id) in ids.iter().enumerate() {
                m.insert(key(i as u16 + 1), slot(*id), 0)?;
            }
            m.insert(key(0), master, 0)?;
        } else {
            let mut m: HashMap<&mut MapData, Svc4Key, SvcValue> =
                HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_SVC4)?)?;
            let key = |s: u16| Svc4Key {
                addr_be: v4(addr),
                port_be: port.to_be(),
                slot: s,
                proto,
                scope: svc_lb_common::SCOPE_EXTERNAL,
                _pad: [0; 2],
            };
            for (i, id) in ids.iter().enumerate() {
                m.insert(key(i as u16 + 1), slot(*id), 0)?;
            }
            m.insert(key(0), master, 0)?;
        }
        let mut r: HashMap<&mut MapData, u32, RevNat> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_REVNAT)?)?;
        r.insert(
            rev_nat_id,
            RevNat {
                addr_be: words(addr),
                port_be: port.to_be(),
                family: if addr.contains(':') { 6 } else { 4 },
                proto,
            },
            0,
        )?;
        Ok(())
    }

    /// A Maglev table whose first `size` entries cycle through `ids`.
    pub fn maglev(&mut self, rev_nat_id: u32, size: usize, ids: &[u32]) -> Result<()> {
        let mut t = Box::new(<MaglevTable as bytemuck::Zeroable>::zeroed());
        for i in 0..size.min(MAGLEV_TABLE_MAX) {
            t.backend_ids[i] = ids[i % ids.len()];
        }
        let mut m: HashMap<&mut MapData, u32, MaglevTable> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_MAGLEV)?)?;
        m.insert(rev_nat_id, t.as_ref(), 0)?;
        Ok(())
    }

    pub fn node_addr(&mut self, addr: &str) -> Result<()> {
        let mut m: HashMap<&mut MapData, NodeAddrKey, u32> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_NODE_ADDR)?)?;
        let key = NodeAddrKey {
            addr_be: words(addr),
            family: if addr.contains(':') { 6 } else { 4 },
            _pad: [0; 3],
        };
        m.insert(key, 0, 0)?;
        Ok(())
    }

    /// A `loadBalancerSourceRanges` entry ("a.b.c.d/len" or "x::/len").
    pub fn src_range(&mut self, rev_nat_id: u32, cidr: &str) -> Result<()> {
        let (addr, len) = cidr.split_once('/').context("CIDR")?;
        let len: u32 = len.parse()?;
        if addr.contains(':') {
            let mut m: LpmTrie<&mut MapData, SrcRange6Key, u32> =
                LpmTrie::try_from(map(&mut self.ebpf, svc_lb_common::MAP_SRC_RANGE6)?)?;
            let data = SrcRange6Key {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr_be: v6(addr),
            };
            m.insert(&Key::new(32 + len, data), 1, 0)?;
        } else {
            let mut m: LpmTrie<&mut MapData, SrcRange4Key, u32> =
                LpmTrie::try_from(map(&mut self.ebpf, svc_lb_common::MAP_SRC_RANGE4)?)?;
            let data = SrcRange4Key {
                rev_nat_id_be: rev_nat_id.to_be(),
                addr_be: v4(addr),
            };
            m.insert(&Key::new(32 + len, data), 1, 0)?;
        }
        Ok(())
    }

    pub fn ct(&mut self) -> Result<Vec<(CtKey, CtValue)>> {
        Ok(self
            .ct_entries()?
            .into_iter()
            .map(|(k, e)| (k, e.ct))
            .collect())
    }

    /// The conntrack entries with their traffic counters.
    pub fn ct_entries(&mut self) -> Result<Vec<(CtKey, CtEntry)>> {
        let m: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_CT)?)?;
        Ok(m.iter().collect::<Result<Vec<_>, _>>()?)
    }

    pub fn ct_remove(&mut self, key: &CtKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_CT)?)?;
        m.remove(key)?;
        Ok(())
    }

    pub fn ct_insert(&mut self, key: CtKey, value: CtValue) -> Result<()> {
        let mut m: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_CT)?)?;
        let entry = CtEntry {
            ct: value,
            packets: 0,
            bytes: 0,
        };
        m.insert(key, entry, 0)?;
        Ok(())
    }

    /// Session affinity membership (the agent's `LB_AFFMATCH_V1`).
    pub fn aff_match(&mut self, backend_id: u32, rev_nat_id: u32) -> Result<()> {
        let mut m: HashMap<&mut MapData, AffinityMatchKey, u32> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_AFF_MATCH)?)?;
        m.insert(
            AffinityMatchKey {
                backend_id,
                rev_nat_id,
            },
            1,
            0,
        )?;
        Ok(())
    }

    pub fn aff_ext(&mut self) -> Result<Vec<(AffinityExtKey, AffinityValue)>> {
        let m: HashMap<&mut MapData, AffinityExtKey, AffinityValue> =
            HashMap::try_from(map(&mut self.ebpf, svc_lb_common::MAP_AFFINITY_EXT)?)?;
        Ok(m.iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// Monotonic clock, as `bpf_ktime_get_ns` reads it (and `bpf_ktime_get_coarse_ns`,
    /// up to a tick later).
    pub fn now_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// A time the datapath's clock has passed: one second ago. The external path may
    /// read the coarse clock (`coarse_clock`), which lags CLOCK_MONOTONIC by up to a
    /// timer tick (10 ms at HZ 100), so "now minus 1 ns" could still lie ahead of it.
    pub fn past_ns() -> u64 {
        Self::now_ns() - 1_000_000_000
    }

    /// Sum over CPUs of a counter.
    pub fn counter(&mut self, index: u32) -> Result<u64> {
        let m: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(map(&mut self.ebpf, svc_lb_common::MAP_COUNTERS)?)?;
        Ok(m.get(&index, 0)?.iter().sum())
    }
}
