//! Ethernet → IPv4/IPv6 → TCP/UDP parsing for the external path, with every read
//! bounds-checked through [`Pkt::load`].
//!
//! Not handled (the packet passes untouched, counted as `CTR_EXT_PASS_UNSUPPORTED`
//! when it would otherwise be looked up): IPv4 fragments (the ports are only in the
//! first one, so translating it alone would break the datagram), and IPv6 packets whose
//! next header is not TCP/UDP directly (extension headers). VLAN tags are not parsed:
//! the programs attach to the devices that carry untagged traffic.
use svc_lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

use crate::pkt::Pkt;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// The IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len_be: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
}

/// One TCP/UDP packet as the external path sees it. Addresses and ports are in network
/// order; IPv4 uses word 0 of the addresses.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 header in the frame.
    pub l4_off: u32,
}

impl Flow {
    /// Offset of the TCP/UDP checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off as usize + if self.proto == PROTO_TCP { 16 } else { 6 }
    }

    /// Offsets of the source and destination addresses.
    #[inline(always)]
    pub fn saddr_off(&self) -> usize {
        if self.family == FAMILY_V4 {
            ETH_HLEN + 12
        } else {
            ETH_HLEN + 8
        }
    }

    #[inline(always)]
    pub fn daddr_off(&self) -> usize {
        if self.family == FAMILY_V4 {
            ETH_HLEN + 16
        } else {
            ETH_HLEN + 24
        }
    }
}

pub enum Parsed {
    /// Not IP, or not TCP/UDP: none of the external path's business.
    Other,
    /// IP that the external path cannot handle (see the module comment).
    Unsupported,
    Flow(Flow),
}

#[inline(always)]
pub fn parse<C: Pkt>(c: &C) -> Parsed {
    let Some(proto_be) = c.load::<u16>(12) else {
        return Parsed::Other;
    };
    match u16::from_be(proto_be) {
        ETH_P_IP => parse4(c),
        ETH_P_IPV6 => parse6(c),
        _ => Parsed::Other,
    }
}

#[inline(always)]
fn ports<C: Pkt>(c: &C, mut f: Flow) -> Parsed {
    let off = f.l4_off as usize;
    let Some(p) = c.load::<[u16; 2]>(off) else {
        return Parsed::Other;
    };
    f.sport = p[0];
    f.dport = p[1];
    if f.proto == PROTO_TCP {
        // The whole fixed header must be there: the checksum sits at offset 16.
        let Some(hdr) = c.load::<[u8; 20]>(off) else {
            return Parsed::Other;
        };
        f.tcp_flags = hdr[13];
    } else if c.load::<[u8; 8]>(off).is_none() {
        return Parsed::Other;
    }
    Parsed::Flow(f)
}

#[inline(always)]
fn parse4<C: Pkt>(c: &C) -> Parsed {
    let Some(ip) = c.load::<Ipv4Hdr>(ETH_HLEN) else {
        return Parsed::Other;
    };
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return Parsed::Other;
    }
    let ihl = usize::from(ip.ver_ihl & 0x0f) * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < IPV4_HLEN {
        return Parsed::Other;
    }
    // More-fragments flag or a fragment offset.
    if u16::from_be(ip.frag_be) & 0x3fff != 0 {
        return Parsed::Unsupported;
    }
    ports(
        c,
        Flow {
            saddr: [ip.saddr_be, 0, 0, 0],
            daddr: [ip.daddr_be, 0, 0, 0],
            sport: 0,
            dport: 0,
            proto: ip.proto,
            family: FAMILY_V4,
            tcp_flags: 0,
            l4_off: (ETH_HLEN + ihl) as u32,
        },
    )
}

#[inline(always)]
fn parse6<C: Pkt>(c: &C) -> Parsed {
    let Some(ip) = c.load::<Ipv6Hdr>(ETH_HLEN) else {
        return Parsed::Other;
    };
    match ip.next_hdr {
        PROTO_TCP | PROTO_UDP => {}
        // Hop-by-hop, routing, fragment, destination options: the L4 header is further
        // in; not followed.
        0 | 43 | 44 | 60 => return Parsed::Unsupported,
        _ => return Parsed::Other,
    }
    ports(
        c,
        Flow {
            saddr: ip.saddr_be,
            daddr: ip.daddr_be,
            sport: 0,
            dport: 0,
            proto: ip.next_hdr,
            family: FAMILY_V6,
            tcp_flags: 0,
            l4_off: (ETH_HLEN + IPV6_HLEN) as u32,
        },
    )
}
