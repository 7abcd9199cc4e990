//! Packet tests of the external path: the agent's own eBPF object, loaded with private
//! unpinned maps, runs `svclb_tc_in`, `svclb_tc_out` and `svclb_xdp` through
//! BPF_PROG_TEST_RUN on hand-built frames. Each case states the packet in, the verdict
//! and the packet out; every output frame is parsed by an independent parser that
//! verifies the IPv4 header checksum, the TCP/UDP/ICMP/ICMPv6 checksum and all length
//! fields (`svc_lb_tests` `src/pkt.rs`), so a wrong checksum fails the case.
//!
//! Needs root (CAP_BPF, CAP_SYS_ADMIN); a missing capability fails the tests. Run after
//! `cargo build --release -p svc-lb`:
//! `cargo test --release -p svc-lb-tests --features e2e --test pkt`.
#![cfg(feature = "e2e")]

#[path = "../src/pkt.rs"]
mod pkt;

use anyhow::{Context, Result, ensure};
use pkt::{
    ACK, CLIENT_MAC, Datapath, ICMP, ICMPV6, NODE_MAC, Parsed, SYN, Spec, TC_ACT_OK,
    TC_ACT_REDIRECT, TC_ACT_SHOT, TCP, UDP, XDP_DROP, XDP_PASS, XDP_TX, parse, words,
};
use svc_lb_common::{
    BACKEND_FLAG_LOCAL, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_SNAT, CT_REFRESH_WINDOW_NS,
    CTR_EXT_BACKEND_GONE, CTR_EXT_CT_HIT, CTR_EXT_DROP_NO_LOCAL, CTR_EXT_DROP_SRC_RANGE,
    CTR_EXT_FIB_REDIRECTED, CTR_EXT_FIB_TO_STACK, CTR_EXT_FORWARDED, CTR_EXT_REJECT_NO_BACKEND,
    CTR_EXT_REPLY_XLATED, CTR_EXT_XDP_FORWARDED, CTR_EXT_XDP_REJECT_TO_TC, CTR_EXT_XDP_TX,
    SNAT_PORT_MAX, SNAT_PORT_MIN, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXT_LOCAL, SVC_FLAG_SRC_RANGES,
    XDP_DEV_TX_OK,
};
use svc_lb_tests::ip;

const CLIENT4: &str = "198.51.100.10";
const CLIENT6: &str = "2001:db8:c::10";
const LB4: &str = "203.0.113.1";
const LB6: &str = "2001:db8:f::1";
const NODE4: &str = "192.0.2.1";
const NODE6: &str = "2001:db8:1::1";
const LOCAL4: &str = "10.0.1.1";
const REMOTE4: &str = "10.0.2.2";
const LOCAL6: &str = "fd00:1::1";
const REMOTE6: &str = "fd00:2::2";
const FE_PORT: u16 = 80;
const BE_PORT: u16 = 8080;
const NODE_PORT: u16 = 30080;
const MAGLEV_SIZE: u32 = 7;

/// Backend ids of [`lab`].
const BE_LOCAL4: u32 = 1;
const BE_REMOTE4: u32 = 2;
const BE_LOCAL6: u32 = 3;
const BE_REMOTE6: u32 = 4;
const BE_LOCAL4_B: u32 = 5;

/// A datapath with the node's config (SNAT addresses, Maglev size 7), node addresses
/// and five backends: local and remote of each family, and a second local IPv4 one.
///
/// The test's thread first moves to a netns of its own: tc ingress sends a SNAT flow's
/// packets out by FIB lookup, which BPF_PROG_TEST_RUN runs in the caller's netns. A new
/// one has no route (only a down loopback), so every lookup fails and those packets
/// take the fallback into the stack (TC_ACT_OK, counted) whatever the host's routes
/// and forwarding are.
fn lab() -> Datapath {
    // SAFETY: plain syscall; a thread may change its own network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    let mut dp = Datapath::load().expect("load the eBPF object and its programs");
    (|| -> Result<()> {
        dp.config(NODE4, NODE6, MAGLEV_SIZE)?;
        dp.node_addr(NODE4)?;
        dp.node_addr(NODE6)?;
        dp.backend(BE_LOCAL4, LOCAL4, BE_PORT, TCP, BACKEND_FLAG_LOCAL)?;
        dp.backend(BE_REMOTE4, REMOTE4, BE_PORT, TCP, 0)?;
        dp.backend(BE_LOCAL6, LOCAL6, BE_PORT, TCP, BACKEND_FLAG_LOCAL)?;
        dp.backend(BE_REMOTE6, REMOTE6, BE_PORT, TCP, 0)?;
        dp.backend(BE_LOCAL4_B, "10.0.1.2", BE_PORT, TCP, BACKEND_FLAG_LOCAL)?;
        Ok(())
    })()
    .expect("fill the lab's maps");
    dp
}

/// A frontend whose Maglev table sends every flow to `id` (rev-NAT id `rev`).
fn service(dp: &mut Datapath, addr: &str, port: u16, proto: u8, rev: u32, flags: u16, ids: &[u32]) {
    dp.frontend(addr, port, proto, rev, flags, ids)
        .expect("write frontend");
    if !ids.is_empty() {
        dp.maglev(rev, MAGLEV_SIZE as usize, &ids[..1])
            .expect("write Maglev table");
    }
}

fn run(dp: &Datapath, fd: i32, frame: &[u8]) -> (u32, Vec<u8>) {
    dp.run(fd, frame).expect("BPF_PROG_TEST_RUN")
}

/// Runs `spec` through `fd`, expects `verdict`, and parses (= checksum-verifies) the
/// output.
fn expect(dp: &Datapath, fd: i32, spec: &Spec, verdict: u32) -> Parsed {
    let (rc, out) = run(dp, fd, &spec.frame());
    assert_eq!(rc, verdict, "verdict for {spec:?}");
    parse(&out).unwrap_or_else(|e| panic!("output of {spec:?} is malformed: {e:#}"))
}

/// The packet out equals the packet in with new addresses and ports: everything else
/// (payload, TTL, TCP flags, MACs) is untouched.
fn assert_translated(out: &Parsed, spec: &Spec, src: (&str, u16), dst: (&str, u16)) {
    assert_eq!(
        (out.src, out.sport),
        (ip(src.0), src.1),
        "source of {spec:?}"
    );
    assert_eq!(
        (out.dst, out.dport),
        (ip(dst.0), dst.1),
        "destination of {spec:?}"
    );
    assert_eq!(out.proto, spec.proto);
    assert_eq!(out.payload(), spec.payload.as_slice());
    assert_eq!(out.ttl, 64);
    assert_eq!(out.tcp_flags, spec.tcp_flags);
    assert_eq!((out.dst_mac, out.src_mac), (NODE_MAC, CLIENT_MAC));
}

fn spec(proto: u8, src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Spec {
    if proto == TCP {
        Spec::tcp(src, sport, dst, dport, flags)
    } else {
        Spec::udp(src, sport, dst, dport)
    }
}

/// DNAT to a local backend, TCP and UDP over IPv4 and IPv6: only the destination
/// changes (the client address is preserved), the forward and reply conntrack entries
/// exist, and the reply leaving through tc egress gets the frontend back as source.
#[test]
fn dnat_to_local_backend_and_egress_reverse_nat_tcp_udp_v4_v6() {
    let mut dp = lab();
    let cases = [
        (TCP, CLIENT4, LB4, LOCAL4, BE_LOCAL4, 1),
        (UDP, CLIENT4, LB4, LOCAL4, BE_LOCAL4, 2),
        (TCP, CLIENT6, LB6, LOCAL6, BE_LOCAL6, 3),
        (UDP, CLIENT6, LB6, LOCAL6, BE_LOCAL6, 4),
    ];
    for (proto, client, lb, backend, id, rev) in cases {
        service(&mut dp, lb, FE_PORT, proto, rev, 0, &[id]);
        let s = spec(proto, client, 40_000, lb, FE_PORT, SYN);
        let out = expect(&dp, dp.tc_in, &s, TC_ACT_OK);
        assert_translated(&out, &s, (client, 40_000), (backend, BE_PORT));

        let ct = dp.ct().expect("read conntrack");
        let fwd = ct
            .iter()
            .find(|(k, _)| {
                k.dir == CT_DIR_FORWARD && k.proto == proto && k.saddr_be == words(client)
            })
            .expect("forward entry");
        assert_eq!(fwd.1.backend_id, id);
        assert_eq!(
            fwd.1.flags & CT_FLAG_SNAT,
            0,
            "a local backend is never SNATed"
        );
        let reply = ct
            .iter()
            .find(|(k, _)| {
                k.dir == CT_DIR_REPLY && k.proto == proto && k.saddr_be == words(backend)
            })
            .expect("reply entry keyed backend → client");
        assert_eq!(reply.0.daddr_be, words(client));
        assert_eq!(reply.1.nat_addr_be, words(lb));

        // The backend's answer, leaving through the device.
        let r = spec(proto, backend, BE_PORT, client, 40_000, SYN | ACK);
        let out = expect(&dp, dp.tc_out, &r, TC_ACT_OK);
        assert_translated(&out, &r, (lb, FE_PORT), (client, 40_000));
        // tc ingress does not translate a local backend's reply (it is not SNATed).
        let (rc, raw) = run(&dp, dp.tc_in, &r.frame());
        assert_eq!((rc, raw), (TC_ACT_OK, r.frame()));
    }
    assert_eq!(dp.counter(CTR_EXT_FORWARDED).expect("counter"), 4);
    assert_eq!(dp.counter(CTR_EXT_REPLY_XLATED).expect("counter"), 4);
}

/// A remote backend (externalTrafficPolicy Cluster): DNAT + SNAT to the node address.
/// A client port inside the SNAT range (the default SNAT_PORT_MIN..=SNAT_PORT_MAX here) is
/// kept; an ephemeral one is mapped into the range. The reply (backend → node:port) is
/// reverse-translated on tc ingress to frontend → client; tc egress leaves it alone.
#[test]
fn snat_to_remote_backend_and_ingress_reverse_nat_v4_v6() {
    let mut dp = lab();
    for (proto, client, lb, node, backend, id, rev) in [
        (TCP, CLIENT4, LB4, NODE4, REMOTE4, BE_REMOTE4, 1),
        (UDP, CLIENT4, LB4, NODE4, REMOTE4, BE_REMOTE4, 2),
        (TCP, CLIENT6, LB6, NODE6, REMOTE6, BE_REMOTE6, 3),
    ] {
        service(&mut dp, lb, FE_PORT, proto, rev, 0, &[id]);
        for client_port in [62_000u16, 40_000] {
            let s = spec(proto, client, client_port, lb, FE_PORT, SYN);
            let out = expect(&dp, dp.tc_in, &s, TC_ACT_OK);
            assert_eq!(out.src, ip(node), "SNAT source of {s:?}");
            assert_eq!((out.dst, out.dport), (ip(backend), BE_PORT));
            let snat_port = out.sport;
            if client_port == 62_000 {
                assert_eq!(
                    snat_port, 62_000,
                    "a client port inside the SNAT range is kept"
                );
            } else {
                assert!(
                    (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat_port),
                    "SNAT port {snat_port} outside the SNAT range"
                );
            }
            assert_eq!(out.payload(), s.payload.as_slice());
            assert_eq!(out.ttl, 64, "the stack, not tc, forwards {s:?} here");

            // The same flow's next packet uses the same SNAT port (conntrack).
            let next = spec(proto, client, client_port, lb, FE_PORT, ACK);
            let out2 = expect(&dp, dp.tc_in, &next, TC_ACT_OK);
            assert_eq!((out2.src, out2.sport), (ip(node), snat_port));

            // The reply arrives on the device, addressed to the node.
            let r = spec(proto, backend, BE_PORT, node, snat_port, SYN | ACK);
            let (rc, raw) = run(&dp, dp.tc_out, &r.frame());
            assert_eq!(
                (rc, raw),
                (TC_ACT_OK, r.frame()),
                "egress ignores SNAT replies"
            );
            let back = expect(&dp, dp.tc_in, &r, TC_ACT_OK);
            assert_translated(&back, &r, (lb, FE_PORT), (client, client_port));
        }
    }
    // 3 families/protocols × 2 client ports × (first, next, reply): each tried the FIB,
    // found no route in the test's netns and went into the stack untouched beyond the
    // NAT (TTL 64 checked above).
    assert_eq!(dp.counter(CTR_EXT_FIB_TO_STACK).expect("counter"), 18);
    assert_eq!(dp.counter(CTR_EXT_FIB_REDIRECTED).expect("counter"), 0);
}

/// Conntrack keeps an established flow on its backend when the Maglev table changes
/// (a backend was added); a new flow follows the new table.
#[test]
fn established_flow_keeps_backend_after_maglev_change() {
    let mut dp = lab();
    service(&mut dp, LB4, FE_PORT, TCP, 1, 0, &[BE_LOCAL4]);
    let first = Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, SYN);
    let out = expect(&dp, dp.tc_in, &first, TC_ACT_OK);
    assert_eq!(out.dst, ip(LOCAL4));

    // The Service gains a backend; the new table sends everything to it.
    dp.frontend(LB4, FE_PORT, TCP, 1, 0, &[BE_LOCAL4, BE_LOCAL4_B])
        .expect("frontend");
    dp.maglev(1, MAGLEV_SIZE as usize, &[BE_LOCAL4_B])
        .expect("table");

    let established = Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, ACK);
    let out = expect(&dp, dp.tc_in, &established, TC_ACT_OK);
    assert_eq!(out.dst, ip(LOCAL4), "established flow moved");
    assert_eq!(dp.counter(CTR_EXT_CT_HIT).expect("counter"), 1);

    let other = Spec::tcp(CLIENT4, 40_001, LB4, FE_PORT, SYN);
    let out = expect(&dp, dp.tc_in, &other, TC_ACT_OK);
    assert_eq!(out.dst, ip("10.0.1.2"), "new flow ignores the new table");
}

/// A UDP flow whose backend is removed, or whose backend id now holds another address,
/// is chosen anew instead of being sent to a dead address: by the flow's first packet
/// in a new `CT_REFRESH_WINDOW_NS` window (the packets of a busy flow in between skip
/// the check), so each change is followed by a wait of one window. TCP is chosen anew
/// the same way: the new backend has no socket for the mid-stream segment and resets it.
#[test]
fn flow_rechosen_when_backend_removed_or_readdressed() {
    let mut dp = lab();
    // More than one window by the coarse clock, which lags by up to a tick.
    let window = std::time::Duration::from_nanos(CT_REFRESH_WINDOW_NS)
        + std::time::Duration::from_millis(30);
    for (proto, rev) in [(UDP, 1u32), (TCP, 2)] {
        dp.backend(BE_LOCAL4, LOCAL4, BE_PORT, TCP, BACKEND_FLAG_LOCAL)
            .expect("backend");
        service(&mut dp, LB4, FE_PORT, proto, rev, 0, &[BE_LOCAL4]);
        let s = spec(proto, CLIENT4, 40_000, LB4, FE_PORT, SYN);
        assert_eq!(expect(&dp, dp.tc_in, &s, TC_ACT_OK).dst, ip(LOCAL4));

        // Backend 1 leaves: the agent rewrites slots and table, then deletes it.
        dp.frontend(LB4, FE_PORT, proto, rev, 0, &[BE_LOCAL4_B])
            .expect("frontend");
        dp.maglev(rev, MAGLEV_SIZE as usize, &[BE_LOCAL4_B])
            .expect("table");
        dp.remove_backend(BE_LOCAL4).expect("remove backend");
        std::thread::sleep(window);
        let next = spec(proto, CLIENT4, 40_000, LB4, FE_PORT, ACK);
        let out = expect(&dp, dp.tc_in, &next, TC_ACT_OK);
        assert_eq!(
            out.dst,
            ip("10.0.1.2"),
            "{proto}: removed backend re-chosen"
        );

        // The id of the current backend is reused for another address.
        dp.backend(BE_LOCAL4_B, "10.0.1.9", BE_PORT, TCP, BACKEND_FLAG_LOCAL)
            .expect("backend");
        std::thread::sleep(window);
        let out = expect(&dp, dp.tc_in, &next, TC_ACT_OK);
        assert_eq!(
            out.dst,
            ip("10.0.1.9"),
            "{proto}: re-addressed id re-chosen"
        );
        dp.backend(BE_LOCAL4_B, "10.0.1.2", BE_PORT, TCP, BACKEND_FLAG_LOCAL)
            .expect("backend");
    }
    assert_eq!(dp.counter(CTR_EXT_BACKEND_GONE).expect("counter"), 4);
}

/// Checks a reject: ICMP (type 3 code 3) or ICMPv6 (type 1 code 4) from the frontend to
/// the client, MACs swapped, quoting the offending IP header and 8 bytes of its L4
/// header byte for byte.
fn assert_reject(out: &Parsed, offending: &Spec) {
    let orig = parse(&offending.frame()).expect("offending frame");
    assert_eq!((out.src, out.dst), (offending.dst, offending.src));
    assert_eq!((out.dst_mac, out.src_mac), (CLIENT_MAC, NODE_MAC));
    let (proto, ty, code) = if offending.src.is_ipv4() {
        (ICMP, 3, 3)
    } else {
        (ICMPV6, 1, 4)
    };
    assert_eq!(out.proto, proto);
    assert_eq!((out.l4[0], out.l4[1]), (ty, code));
    assert_eq!(&out.l4[4..8], &[0, 0, 0, 0], "unused field");
    let quote = &out.l4[8..];
    let hlen = orig.ip_header.len();
    assert_eq!(quote.len(), hlen + 8, "quote length");
    assert_eq!(
        &quote[..hlen],
        orig.ip_header.as_slice(),
        "quoted IP header"
    );
    assert_eq!(&quote[hlen..], &orig.l4[..8], "quoted L4 header");
    assert_eq!(out.ttl, 64);
}

/// A Service without endpoints answers ICMP / ICMPv6 port unreachable out the same
/// device (tc: TC_ACT_REDIRECT to the ingress device), for TCP and UDP.
#[test]
fn empty_service_rejects_with_port_unreachable_v4_v6() {
    let mut dp = lab();
    let mut n = 0;
    for (proto, client, lb, rev) in [
        (TCP, CLIENT4, LB4, 1),
        (UDP, CLIENT4, LB4, 2),
        (TCP, CLIENT6, LB6, 3),
        (UDP, CLIENT6, LB6, 4),
    ] {
        service(&mut dp, lb, FE_PORT, proto, rev, 0, &[]);
        let s = spec(proto, client, 40_000, lb, FE_PORT, SYN);
        let out = expect(&dp, dp.tc_in, &s, TC_ACT_REDIRECT);
        assert_reject(&out, &s);
        n += 1;
        assert_eq!(dp.counter(CTR_EXT_REJECT_NO_BACKEND).expect("counter"), n);
    }
    assert!(dp.ct().expect("ct").is_empty(), "a reject creates no flow");
}

/// `SVC_FLAG_DROP_EMPTY` (ETP Local, endpoints only on other nodes): dropped silently.
#[test]
fn drop_empty_drops_instead_of_rejecting() {
    let mut dp = lab();
    service(
        &mut dp,
        LB4,
        FE_PORT,
        TCP,
        1,
        SVC_FLAG_EXT_LOCAL | SVC_FLAG_DROP_EMPTY,
        &[],
    );
    let s = Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, SYN);
    let (rc, _) = run(&dp, dp.tc_in, &s.frame());
    assert_eq!(rc, TC_ACT_SHOT);
    let (rc, _) = run(&dp, dp.xdp, &s.frame());
    assert_eq!(rc, XDP_DROP);
    assert_eq!(dp.counter(CTR_EXT_DROP_NO_LOCAL).expect("counter"), 2);
    assert_eq!(dp.counter(CTR_EXT_REJECT_NO_BACKEND).expect("counter"), 0);
}

/// `loadBalancerSourceRanges`: a source inside a range of this frontend is served, one
/// outside (or inside another frontend's range) is dropped.
#[test]
fn source_ranges_allow_and_deny_v4_v6() {
    let mut dp = lab();
    service(
        &mut dp,
        LB4,
        FE_PORT,
        TCP,
        1,
        SVC_FLAG_SRC_RANGES,
        &[BE_LOCAL4],
    );
    service(
        &mut dp,
        LB6,
        FE_PORT,
        TCP,
        2,
        SVC_FLAG_SRC_RANGES,
        &[BE_LOCAL6],
    );
    dp.src_range(1, "198.51.100.0/24").expect("range");
    dp.src_range(2, "2001:db8:c::/48").expect("range");
    // Another frontend's range must not open this one.
    dp.src_range(7, "192.0.2.0/24").expect("range");

    let ok = Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, SYN);
    assert_eq!(expect(&dp, dp.tc_in, &ok, TC_ACT_OK).dst, ip(LOCAL4));
    let ok6 = Spec::tcp(CLIENT6, 40_000, LB6, FE_PORT, SYN);
    assert_eq!(expect(&dp, dp.tc_in, &ok6, TC_ACT_OK).dst, ip(LOCAL6));

    for bad in [
        Spec::tcp("192.0.2.99", 40_000, LB4, FE_PORT, SYN),
        Spec::tcp("198.51.101.10", 40_000, LB4, FE_PORT, SYN),
        Spec::tcp("2001:db8:d::10", 40_000, LB6, FE_PORT, SYN),
    ] {
        let (rc, _) = run(&dp, dp.tc_in, &bad.frame());
        assert_eq!(rc, TC_ACT_SHOT, "{bad:?} must be dropped");
    }
    assert_eq!(dp.counter(CTR_EXT_DROP_SRC_RANGE).expect("counter"), 3);
}

/// A NodePort (stored once with the unspecified address) matches a packet only when
/// its destination is a node address; the reply restores the node address the client
/// used.
#[test]
fn nodeport_wildcard_matches_only_node_addresses() {
    let mut dp = lab();
    service(&mut dp, "0.0.0.0", NODE_PORT, TCP, 1, 0, &[BE_LOCAL4]);
    service(&mut dp, "::", NODE_PORT, UDP, 2, 0, &[BE_LOCAL6]);

    let s = Spec::tcp(CLIENT4, 40_000, NODE4, NODE_PORT, SYN);
    let out = expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    assert_translated(&out, &s, (CLIENT4, 40_000), (LOCAL4, BE_PORT));
    let r = Spec::tcp(LOCAL4, BE_PORT, CLIENT4, 40_000, SYN | ACK);
    let back = expect(&dp, dp.tc_out, &r, TC_ACT_OK);
    assert_translated(&back, &r, (NODE4, NODE_PORT), (CLIENT4, 40_000));

    let s6 = Spec::udp(CLIENT6, 40_000, NODE6, NODE_PORT);
    let out = expect(&dp, dp.tc_in, &s6, TC_ACT_OK);
    assert_translated(&out, &s6, (CLIENT6, 40_000), (LOCAL6, BE_PORT));

    for other in [
        Spec::tcp(CLIENT4, 40_000, "192.0.2.77", NODE_PORT, SYN),
        Spec::udp(CLIENT6, 40_000, "2001:db8:1::77", NODE_PORT),
        // The right address with another protocol has no frontend either.
        Spec::udp(CLIENT4, 40_000, NODE4, NODE_PORT),
    ] {
        let (rc, raw) = run(&dp, dp.tc_in, &other.frame());
        assert_eq!((rc, raw), (TC_ACT_OK, other.frame()), "{other:?} untouched");
    }
}

/// Packets that are not for an external frontend pass every program byte for byte:
/// another address or port, an ICMP-free non-IP frame (ARP), and a frontend address
/// with a `SCOPE_ALL`-only port.
#[test]
fn non_service_packets_pass_unchanged() {
    let mut dp = lab();
    service(&mut dp, LB4, FE_PORT, TCP, 1, 0, &[BE_LOCAL4]);
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let frames = [
        Spec::tcp(CLIENT4, 40_000, LB4, 81, SYN).frame(),
        Spec::tcp(CLIENT4, 40_000, "203.0.113.2", FE_PORT, SYN).frame(),
        Spec::udp(CLIENT6, 53, LB6, 53).frame(),
        arp,
    ];
    for f in &frames {
        for (fd, ok) in [
            (dp.tc_in, TC_ACT_OK),
            (dp.tc_out, TC_ACT_OK),
            (dp.xdp, XDP_PASS),
        ] {
            let (rc, out) = run(&dp, fd, f);
            assert_eq!((rc, &out), (ok, f));
        }
    }
    assert!(dp.ct().expect("ct").is_empty());
}

/// The XDP program makes the same decisions and the same packets as tc ingress
/// (forward path: DNAT, SNAT with a kept port, established flows, reject, drop), on
/// two datapaths filled alike. Verdicts map OK→PASS, REDIRECT→TX, SHOT→DROP.
#[test]
fn xdp_gives_the_same_packets_as_tc_ingress() {
    let setup = || {
        let mut dp = lab();
        service(&mut dp, LB4, FE_PORT, TCP, 1, 0, &[BE_LOCAL4]);
        service(&mut dp, LB4, 81, UDP, 2, 0, &[BE_REMOTE4]);
        service(&mut dp, LB6, FE_PORT, TCP, 3, 0, &[BE_REMOTE6]);
        service(&mut dp, LB6, FE_PORT, UDP, 4, 0, &[BE_LOCAL6]);
        service(&mut dp, LB4, 82, TCP, 5, 0, &[]);
        service(&mut dp, LB6, 82, UDP, 6, 0, &[]);
        service(&mut dp, "0.0.0.0", NODE_PORT, TCP, 7, 0, &[BE_LOCAL4]);
        service(&mut dp, LB4, 83, TCP, 8, SVC_FLAG_SRC_RANGES, &[BE_LOCAL4]);
        dp
    };
    let mut tc = setup();
    let mut xdp = setup();
    // The test run's device (lo) is marked as one where XDP_TX works.
    xdp.xdp_dev(LO_IFINDEX, XDP_DEV_TX_OK)
        .expect("mark lo in LB_XDPDEV_V1");
    let cases = [
        (Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, SYN), TC_ACT_OK),
        (Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, ACK), TC_ACT_OK),
        (Spec::udp(CLIENT4, 62_000, LB4, 81), TC_ACT_OK),
        (Spec::udp(CLIENT4, 62_000, LB4, 81), TC_ACT_OK),
        (Spec::tcp(CLIENT6, 62_345, LB6, FE_PORT, SYN), TC_ACT_OK),
        (Spec::udp(CLIENT6, 40_000, LB6, FE_PORT), TC_ACT_OK),
        (Spec::tcp(CLIENT4, 40_000, LB4, 82, SYN), TC_ACT_REDIRECT),
        (Spec::udp(CLIENT6, 40_000, LB6, 82), TC_ACT_REDIRECT),
        (Spec::tcp(CLIENT4, 40_000, NODE4, NODE_PORT, SYN), TC_ACT_OK),
        (Spec::tcp(CLIENT4, 40_000, LB4, 83, SYN), TC_ACT_SHOT),
        (
            Spec::tcp(CLIENT4, 40_000, "203.0.113.9", FE_PORT, SYN),
            TC_ACT_OK,
        ),
    ];
    let mut translated = 0;
    for (s, verdict) in &cases {
        let (rc_tc, out_tc) = run(&tc, tc.tc_in, &s.frame());
        let (rc_xdp, out_xdp) = run(&xdp, xdp.xdp, &s.frame());
        assert_eq!(rc_tc, *verdict, "tc verdict for {s:?}");
        let want_xdp = match *verdict {
            TC_ACT_OK => XDP_PASS,
            TC_ACT_REDIRECT => XDP_TX,
            _ => XDP_DROP,
        };
        assert_eq!(rc_xdp, want_xdp, "XDP verdict for {s:?}");
        if *verdict == TC_ACT_REDIRECT {
            // The reject grows the frame for these probes (a SYN without options and a
            // small datagram are shorter than their ICMP answer).
            assert!(out_xdp.len() > s.frame().len(), "reject grows: {s:?}");
            assert_reject(&parse(&out_xdp).expect("XDP reject well-formed"), s);
        }
        if *verdict != TC_ACT_SHOT {
            assert_eq!(out_xdp, out_tc, "XDP and tc differ for {s:?}");
            parse(&out_xdp)
                .with_context(|| format!("{s:?}"))
                .expect("XDP output well-formed");
            if *verdict == TC_ACT_OK && out_xdp != s.frame() {
                translated += 1;
            }
        }
    }
    assert_eq!(translated, 7);
    assert_eq!(xdp.counter(CTR_EXT_XDP_FORWARDED).expect("counter"), 7);
    assert_eq!(xdp.counter(CTR_EXT_XDP_TX).expect("counter"), 2);
    // The reply of the XDP-translated SNAT flow is reverse-translated by tc ingress.
    let r = Spec::tcp(REMOTE6, BE_PORT, NODE6, 62_345, SYN | ACK);
    let back = expect(&xdp, xdp.tc_in, &r, TC_ACT_OK);
    assert_translated(&back, &r, (LB6, FE_PORT), (CLIENT6, 62_345));
    ensure_ct_alike(&mut tc, &mut xdp).expect("conntrack alike");
}

/// Both datapaths hold the same conntrack keys and backends (expiry times differ).
/// `lo` in the test's network namespace: the device BPF_PROG_TEST_RUN gives XDP.
const LO_IFINDEX: u32 = 1;

/// On a device not marked for XDP_TX (a veth, or no mark at all) the XDP program leaves
/// a reject to tc: the packet passes unchanged, counted as handed to tc and not as a
/// reject; tc ingress then answers it and counts the reject once.
#[test]
fn xdp_leaves_rejects_to_tc_on_unmarked_devices() {
    for mark in [None, Some(0)] {
        let mut dp = lab();
        service(&mut dp, LB4, 82, TCP, 5, 0, &[]);
        service(&mut dp, LB6, 82, UDP, 6, 0, &[]);
        if let Some(flags) = mark {
            dp.xdp_dev(LO_IFINDEX, flags).expect("mark lo");
        }
        let probes = [
            Spec::tcp(CLIENT4, 40_000, LB4, 82, SYN),
            Spec::udp(CLIENT6, 40_000, LB6, 82),
        ];
        for s in &probes {
            let (rc, out) = run(&dp, dp.xdp, &s.frame());
            assert_eq!((rc, &out), (XDP_PASS, &s.frame()), "XDP on {mark:?}: {s:?}");
            let (rc, out) = run(&dp, dp.tc_in, &s.frame());
            assert_eq!(rc, TC_ACT_REDIRECT, "tc after XDP: {s:?}");
            assert_reject(&parse(&out).expect("tc reject well-formed"), s);
        }
        let n = probes.len() as u64;
        assert_eq!(dp.counter(CTR_EXT_XDP_REJECT_TO_TC).expect("counter"), n);
        assert_eq!(dp.counter(CTR_EXT_XDP_TX).expect("counter"), 0);
        assert_eq!(dp.counter(CTR_EXT_REJECT_NO_BACKEND).expect("counter"), n);
    }
}

/// A device of the test's netns whose ifindex lies beyond the `LB_XDPMAC` array, so
/// that its address lives in `LB_XDPMACHI`.
const HI_IFINDEX: u32 = svc_lb_common::XDP_MAC_ARRAY_MAX + 68_000;
/// Another host's MAC address.
const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x09];

/// XDP serves only frames sent to the receiving device's own address, whether the
/// device's ifindex puts it in the array (`lo`) or in the hash: a frame for another
/// host, or a broadcast, passes untouched and is not counted; a device the agent wrote
/// no address for is served. Rewriting the devices drops the entries of devices no
/// longer listed, in both maps.
#[test]
fn xdp_serves_only_frames_sent_to_the_devices_address() {
    let mut dp = lab();
    ip_cmd(&format!(
        "link add svclbhi0 index {HI_IFINDEX} type veth peer name svclbhi1"
    ));
    service(&mut dp, LB4, FE_PORT, TCP, 1, 0, &[BE_LOCAL4]);
    let mut sport = 40_000;
    let mut check = |dp: &mut Datapath, ifindex: u32, dst_mac: [u8; 6], served: bool| {
        sport += 1;
        let s = Spec::tcp(CLIENT4, sport, LB4, FE_PORT, SYN);
        let mut frame = s.frame();
        frame[..6].copy_from_slice(&dst_mac);
        let before = dp.counter(CTR_EXT_XDP_FORWARDED).expect("counter");
        let (rc, out) = dp
            .run_xdp_on(ifindex, &frame)
            .expect("test run on a device");
        let forwarded = dp.counter(CTR_EXT_XDP_FORWARDED).expect("counter") - before;
        let what = format!("ifindex {ifindex}, frame to {dst_mac:02x?}");
        assert_eq!(rc, XDP_PASS, "{what}");
        if served {
            let p = parse(&out).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert_eq!(
                (p.src, p.sport, p.dst, p.dport, p.dst_mac),
                (ip(CLIENT4), sport, ip(LOCAL4), BE_PORT, dst_mac),
                "{what}: translated"
            );
            assert_eq!(forwarded, 1, "{what}: served");
        } else {
            assert_eq!(out, frame, "{what}: must pass untouched");
            assert_eq!(forwarded, 0, "{what}: not served");
        }
    };
    let both = [LO_IFINDEX, HI_IFINDEX];
    for i in both {
        check(&mut dp, i, NODE_MAC, true);
    }
    dp.xdp_macs(&[(LO_IFINDEX, OTHER_MAC), (HI_IFINDEX, OTHER_MAC)])
        .expect("write addresses");
    for i in both {
        check(&mut dp, i, NODE_MAC, false);
        check(&mut dp, i, OTHER_MAC, true);
    }
    dp.xdp_macs(&[(LO_IFINDEX, NODE_MAC), (HI_IFINDEX, NODE_MAC)])
        .expect("write addresses");
    for i in both {
        check(&mut dp, i, NODE_MAC, true);
        check(&mut dp, i, OTHER_MAC, false);
        check(&mut dp, i, [0xff; 6], false);
    }
    // Each device left out of a rewrite loses its entry: served whatever the address.
    dp.xdp_macs(&[(LO_IFINDEX, OTHER_MAC)])
        .expect("write addresses");
    check(&mut dp, LO_IFINDEX, NODE_MAC, false);
    check(&mut dp, HI_IFINDEX, NODE_MAC, true);
    dp.xdp_macs(&[(HI_IFINDEX, OTHER_MAC)])
        .expect("write addresses");
    check(&mut dp, LO_IFINDEX, NODE_MAC, true);
    check(&mut dp, HI_IFINDEX, NODE_MAC, false);
}

fn ensure_ct_alike(a: &mut Datapath, b: &mut Datapath) -> Result<()> {
    let strip = |v: Vec<(svc_lb_common::CtKey, svc_lb_common::CtValue)>| {
        let mut v: Vec<_> = v
            .into_iter()
            .map(|(k, val)| {
                (
                    bytemuck::bytes_of(&k).to_vec(),
                    val.backend_id,
                    val.nat_addr_be,
                    val.snat_port_be,
                )
            })
            .collect();
        v.sort();
        v
    };
    let (ca, cb) = (strip(a.ct()?), strip(b.ct()?));
    ensure!(!ca.is_empty(), "no conntrack entries");
    ensure!(ca == cb, "conntrack differs:\n{ca:?}\n{cb:?}");
    Ok(())
}

/// Two clients with the same source port to the same remote backend: the second
/// cannot keep its port (the reply key is taken) and gets one from the SNAT range;
/// each reply goes back to its own client.
#[test]
fn snat_port_collision_picks_another_port() {
    let mut dp = lab();
    service(&mut dp, LB4, FE_PORT, UDP, 1, 0, &[BE_REMOTE4]);
    let a = Spec::udp(CLIENT4, 62_000, LB4, FE_PORT);
    let b = Spec::udp("198.51.100.11", 62_000, LB4, FE_PORT);
    let out_a = expect(&dp, dp.tc_in, &a, TC_ACT_OK);
    let out_b = expect(&dp, dp.tc_in, &b, TC_ACT_OK);
    assert_eq!(out_a.sport, 62_000);
    assert!(
        (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&out_b.sport),
        "second flow got port {}",
        out_b.sport
    );
    for (out, client) in [(&out_a, CLIENT4), (&out_b, "198.51.100.11")] {
        let r = Spec::udp(REMOTE4, BE_PORT, NODE4, out.sport);
        let back = expect(&dp, dp.tc_in, &r, TC_ACT_OK);
        assert_translated(&back, &r, (LB4, FE_PORT), (client, 62_000));
    }
}

/// A flow that needs SNAT while the node has no SNAT address of its family is dropped
/// (and counted), not sent with the client's address to a remote backend.
#[test]
fn remote_backend_without_snat_address_drops() {
    let mut dp = lab();
    dp.config(NODE4, "", MAGLEV_SIZE).expect("config");
    service(&mut dp, LB6, FE_PORT, TCP, 1, 0, &[BE_REMOTE6]);
    let s = Spec::tcp(CLIENT6, 40_000, LB6, FE_PORT, SYN);
    let (rc, _) = run(&dp, dp.tc_in, &s.frame());
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(
        dp.counter(svc_lb_common::CTR_EXT_NO_SNAT_ADDR)
            .expect("counter"),
        1
    );
    assert!(dp.ct().expect("ct").is_empty());
    // ETP Local never SNATs, even to a backend not flagged local.
    service(&mut dp, LB6, 81, TCP, 2, SVC_FLAG_EXT_LOCAL, &[BE_REMOTE6]);
    let s = Spec::tcp(CLIENT6, 40_000, LB6, 81, SYN);
    let out = expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    assert_translated(&out, &s, (CLIENT6, 40_000), (REMOTE6, BE_PORT));
}

/// An expired conntrack entry is ignored: the packet is a new flow (here: the entry
/// points at backend 5, the table at backend 1).
#[test]
fn expired_conntrack_entry_starts_a_new_flow() {
    let mut dp = lab();
    service(&mut dp, LB4, FE_PORT, UDP, 1, 0, &[BE_LOCAL4]);
    let s = Spec::udp(CLIENT4, 40_000, LB4, FE_PORT);
    let key = svc_lb_common::CtKey {
        saddr_be: words(CLIENT4),
        daddr_be: words(LB4),
        sport_be: 40_000u16.to_be(),
        dport_be: FE_PORT.to_be(),
        proto: UDP,
        family: 4,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    let mut value = svc_lb_common::CtValue {
        expires_ns: Datapath::past_ns(),
        backend_id: BE_LOCAL4_B,
        rev_nat_id: 1,
        nat_addr_be: words("10.0.1.2"),
        snat_addr_be: [0; 4],
        nat_port_be: BE_PORT.to_be(),
        snat_port_be: 0,
        flags: 0,
        _pad: [0; 3],
    };
    dp.ct_insert(key, value).expect("ct");
    assert_eq!(expect(&dp, dp.tc_in, &s, TC_ACT_OK).dst, ip(LOCAL4));
    // The same entry within its lifetime is followed.
    value.expires_ns = Datapath::now_ns() + 60_000_000_000;
    dp.ct_insert(key, value).expect("ct");
    assert_eq!(expect(&dp, dp.tc_in, &s, TC_ACT_OK).dst, ip("10.0.1.2"));
}

/// TCP lifetimes: a SYN creates entries living CT_TCP_SYN_TIMEOUT_S, an established
/// segment extends them to CT_TCP_TIMEOUT_S, a FIN shortens both to
/// CT_TCP_CLOSE_TIMEOUT_S and marks them closing.
#[test]
fn tcp_lifetimes_follow_syn_established_and_fin() {
    let mut dp = lab();
    service(&mut dp, LB4, FE_PORT, TCP, 1, 0, &[BE_LOCAL4]);
    let sec = 1_000_000_000u64;
    let lifetimes = |dp: &mut Datapath| -> Vec<(u64, u8)> {
        let now = Datapath::now_ns();
        let mut v: Vec<_> = dp
            .ct()
            .expect("ct")
            .into_iter()
            .map(|(_, v)| ((v.expires_ns.saturating_sub(now) + sec / 2) / sec, v.flags))
            .collect();
        v.sort();
        v
    };
    let send = |flags| {
        let s = Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, flags);
        expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    };
    send(SYN);
    send(ACK);
    send(ACK | 0x01);
    let closing = svc_lb_common::CT_FLAG_CLOSING;
    let l = lifetimes(&mut dp);
    assert_eq!(l.len(), 2, "{l:?}");
    for (secs, flags) in &l {
        assert_eq!(*secs, svc_lb_common::CT_TCP_CLOSE_TIMEOUT_S, "{l:?}");
        assert_ne!(flags & closing, 0, "{l:?}");
    }
    // A new flow: SYN lifetime, then established.
    let s = Spec::tcp(CLIENT4, 40_001, LB4, FE_PORT, SYN);
    expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    let l = lifetimes(&mut dp);
    assert!(
        l.iter()
            .filter(|(secs, _)| *secs == svc_lb_common::CT_TCP_SYN_TIMEOUT_S)
            .count()
            == 2,
        "{l:?}"
    );
    // The client's ACK before the backend answered: still half-open (a stray or
    // spoofed ACK opens no long-lived flow).
    let s = Spec::tcp(CLIENT4, 40_001, LB4, FE_PORT, ACK);
    expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    let l = lifetimes(&mut dp);
    assert!(
        l.iter()
            .filter(|(secs, _)| *secs == svc_lb_common::CT_TCP_SYN_TIMEOUT_S)
            .count()
            == 2,
        "{l:?}"
    );
    // The backend's SYN-ACK (tc egress, local backend), then the client's ACK:
    // established.
    let r = Spec::tcp(LOCAL4, BE_PORT, CLIENT4, 40_001, SYN | ACK);
    expect(&dp, dp.tc_out, &r, TC_ACT_OK);
    expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    let l = lifetimes(&mut dp);
    let est = svc_lb_common::CT_FLAG_ESTABLISHED;
    assert!(
        l.iter()
            .filter(|(secs, f)| *secs == svc_lb_common::CT_TCP_TIMEOUT_S && f & est != 0)
            .count()
            == 2,
        "{l:?}"
    );
}

/// Half-open flows are cheap: the backend's SYN-ACK retransmissions to a client that
/// never answers (a spoofed source) do not extend a SYN entry, so it and its SNAT port
/// are free again after CT_TCP_SYN_TIMEOUT_S; the client's own SYN retransmissions do.
#[test]
fn half_open_flow_is_not_kept_alive_by_the_backends_syn_ack() {
    let mut dp = lab();
    service(&mut dp, LB4, FE_PORT, TCP, 1, 0, &[BE_REMOTE4]);
    let sec = 1_000_000_000u64;
    let s = Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, SYN);
    let out = expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    let expiries = |dp: &mut Datapath| -> Vec<(u8, u64, u8)> {
        let mut v: Vec<_> = dp
            .ct()
            .expect("ct")
            .into_iter()
            .map(|(k, v)| (k.dir, v.expires_ns, v.flags))
            .collect();
        v.sort();
        v
    };
    let first = expiries(&mut dp);
    assert_eq!(first.len(), 2, "{first:?}");
    let now = Datapath::now_ns();
    for (_, exp, _) in &first {
        assert!(
            *exp <= now + svc_lb_common::CT_TCP_SYN_TIMEOUT_S * sec,
            "SYN lifetime: {first:?}"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    // The backend answers (and retransmits): translated, both entries learn it, but
    // neither lives longer.
    let r = Spec::tcp(REMOTE4, BE_PORT, NODE4, out.sport, SYN | ACK);
    for _ in 0..3 {
        let back = expect(&dp, dp.tc_in, &r, TC_ACT_OK);
        assert_eq!((back.dst, back.dport), (ip(CLIENT4), 40_000));
    }
    let after = expiries(&mut dp);
    for (a, b) in first.iter().zip(&after) {
        assert_eq!(
            a.1, b.1,
            "a SYN-ACK must not extend a half-open entry: {after:?}"
        );
        assert_ne!(b.2 & svc_lb_common::CT_FLAG_SEEN_REPLY, 0, "{after:?}");
        assert_eq!(b.2 & svc_lb_common::CT_FLAG_ESTABLISHED, 0, "{after:?}");
    }
    // The client's SYN retransmission extends it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    let again = expiries(&mut dp);
    for (a, b) in first.iter().zip(&again) {
        assert!(b.1 > a.1, "the client's SYN extends: {first:?} → {again:?}");
    }
    // Expired (moved into the past by hand, as waiting 5 s would): another client's
    // flow may claim the SNAT port, and the old flow's SYN-ACK is no longer translated.
    for (k, mut v) in dp.ct().expect("ct") {
        v.expires_ns = Datapath::past_ns();
        dp.ct_insert(k, v).expect("ct");
    }
    let (rc, raw) = run(&dp, dp.tc_in, &r.frame());
    assert_eq!(
        (rc, raw),
        (TC_ACT_OK, r.frame()),
        "an expired half-open flow's SYN-ACK passes untranslated"
    );
}

/// `ExtConfig`'s SNAT range is the only source of SNAT ports: a client port inside it
/// is kept, every other flow gets a port of it.
#[test]
fn snat_ports_come_from_the_configured_range() {
    let mut dp = lab();
    dp.limits((20_000, 20_063), 0, 0).expect("limits");
    service(&mut dp, LB4, FE_PORT, UDP, 1, 0, &[BE_REMOTE4]);
    let mut seen = std::collections::BTreeSet::new();
    for client_port in 40_000..40_012u16 {
        let s = Spec::udp(CLIENT4, client_port, LB4, FE_PORT);
        let out = expect(&dp, dp.tc_in, &s, TC_ACT_OK);
        assert!(
            (20_000..=20_063).contains(&out.sport),
            "SNAT port {} outside 20000-20063",
            out.sport
        );
        assert!(seen.insert(out.sport), "port {} given twice", out.sport);
    }
    let s = Spec::udp(CLIENT4, 20_063, LB4, FE_PORT);
    let out = expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    if !seen.contains(&20_063) {
        assert_eq!(out.sport, 20_063, "a client port inside the range is kept");
    }
}

/// The node-wide reject limit (here a burst of 3, 1 per second): the first 3 probes of a
/// burst to a Service without endpoints get their ICMP error, the rest are dropped and
/// counted as rate-limited, not as rejects.
#[test]
fn rejects_beyond_the_rate_limit_are_dropped_and_counted() {
    let mut dp = lab();
    dp.limits((0, 0), 1, 3).expect("limits");
    service(&mut dp, LB4, FE_PORT, TCP, 1, 0, &[]);
    let (mut rejected, mut dropped) = (0, 0);
    for i in 0..10u16 {
        let s = spec(TCP, CLIENT4, 40_000 + i, LB4, FE_PORT, SYN);
        let (rc, out) = run(&dp, dp.tc_in, &s.frame());
        match rc {
            TC_ACT_REDIRECT => {
                assert_reject(&parse(&out).expect("reject well-formed"), &s);
                rejected += 1;
            }
            TC_ACT_SHOT => dropped += 1,
            other => panic!("verdict {other} for {s:?}"),
        }
    }
    // A second may pass between the runs only on a very slow machine: then one more.
    assert!((3..=4).contains(&rejected), "rejected {rejected}");
    assert_eq!(rejected + dropped, 10);
    assert_eq!(
        dp.counter(CTR_EXT_REJECT_NO_BACKEND).expect("counter"),
        rejected
    );
    assert_eq!(
        dp.counter(svc_lb_common::CTR_EXT_REJECT_RATE_LIMITED)
            .expect("counter"),
        dropped
    );
    // XDP shares the bucket (one per node): still empty.
    let s = spec(TCP, CLIENT4, 41_000, LB4, FE_PORT, SYN);
    dp.xdp_dev(LO_IFINDEX, XDP_DEV_TX_OK).expect("mark lo");
    let (rc, _) = run(&dp, dp.xdp, &s.frame());
    assert_eq!(rc, XDP_DROP, "XDP: rate-limited reject is a drop");
}

/// The LRU may evict a flow's reply entry alone: the client's next packet once the
/// forward entry's expiry has moved into another `CT_REFRESH_WINDOW_NS` window (any
/// packet more than one window after the previous one) writes it again, so the
/// backend's answer is translated again. Packets in between skip the reply entry (the
/// established path's cost, issue 13) but are still forwarded. Through tc and XDP,
/// which share the code.
#[test]
fn evicted_reply_entry_is_recreated_by_the_next_packet_a_window_later() {
    let mut dp = lab();
    service(&mut dp, LB4, FE_PORT, UDP, 1, 0, &[BE_REMOTE4]);
    let s = Spec::udp(CLIENT4, 62_000, LB4, FE_PORT);
    let r = Spec::udp(REMOTE4, BE_PORT, NODE4, 62_000);
    // More than one window by the coarse clock, which lags by up to a tick (10 ms at
    // HZ 100).
    let window = std::time::Duration::from_nanos(CT_REFRESH_WINDOW_NS)
        + std::time::Duration::from_millis(30);
    expect(&dp, dp.tc_in, &s, TC_ACT_OK);
    for (prog, verdict) in [(dp.tc_in, TC_ACT_OK), (dp.xdp, XDP_PASS)] {
        let (rkey, _) = dp
            .ct()
            .expect("ct")
            .into_iter()
            .find(|(k, _)| k.dir == CT_DIR_REPLY)
            .expect("reply entry");
        dp.ct_remove(&rkey).expect("evict");
        let (rc, raw) = run(&dp, dp.tc_in, &r.frame());
        assert_eq!((rc, raw), (TC_ACT_OK, r.frame()), "no entry: untranslated");
        // Within the window the flow goes on (whether this packet lands in the next
        // window is timing, so only the forward translation is checked).
        let out = expect(&dp, prog, &s, verdict);
        assert_eq!((out.dst, out.dport), (ip(REMOTE4), BE_PORT));
        std::thread::sleep(window);
        let out = expect(&dp, prog, &s, verdict);
        assert_eq!((out.dst, out.dport), (ip(REMOTE4), BE_PORT));
        let back = expect(&dp, dp.tc_in, &r, TC_ACT_OK);
        assert_translated(&back, &r, (LB4, FE_PORT), (CLIENT4, 62_000));
    }
}

/// Session affinity (ClientIP) of external clients: a new flow from a remembered client
/// goes to its backend even after the Maglev table moved, while the backend is still a
/// member; once it is not, Maglev decides again.
#[test]
fn external_affinity_keeps_a_client_on_its_backend() {
    let mut dp = lab();
    service(
        &mut dp,
        LB4,
        FE_PORT,
        TCP,
        1,
        svc_lb_common::SVC_FLAG_AFFINITY,
        &[BE_LOCAL4, BE_LOCAL4_B],
    );
    dp.aff_match(BE_LOCAL4, 1).expect("match");
    dp.aff_match(BE_LOCAL4_B, 1).expect("match");
    let s = Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, SYN);
    assert_eq!(expect(&dp, dp.tc_in, &s, TC_ACT_OK).dst, ip(LOCAL4));
    let aff = dp.aff_ext().expect("affinity");
    assert_eq!(aff.len(), 1);
    assert_eq!(aff[0].0.addr_be, words(CLIENT4));
    assert_eq!(aff[0].1.backend_id, BE_LOCAL4);

    dp.maglev(1, MAGLEV_SIZE as usize, &[BE_LOCAL4_B])
        .expect("table");
    let s2 = Spec::tcp(CLIENT4, 40_001, LB4, FE_PORT, SYN);
    assert_eq!(expect(&dp, dp.tc_in, &s2, TC_ACT_OK).dst, ip(LOCAL4));
    // Another client follows the table.
    let other = Spec::tcp("198.51.100.11", 40_001, LB4, FE_PORT, SYN);
    assert_eq!(expect(&dp, dp.tc_in, &other, TC_ACT_OK).dst, ip("10.0.1.2"));
    assert_eq!(
        dp.counter(svc_lb_common::CTR_EXT_AFF_HIT).expect("counter"),
        1
    );
}

/// The parser every case relies on really checks: a built frame parses, and one wrong
/// bit in the IPv4 header checksum, the TCP/UDP/ICMPv6-style L4 checksum (through a
/// changed address in the pseudo-header or a changed port) or a length field fails.
#[test]
fn parser_rejects_wrong_checksums_and_lengths() {
    for s in [
        Spec::tcp(CLIENT4, 40_000, LB4, FE_PORT, SYN),
        Spec::udp(CLIENT4, 40_000, LB4, FE_PORT),
        Spec::tcp(CLIENT6, 40_000, LB6, FE_PORT, SYN),
        Spec::udp(CLIENT6, 40_000, LB6, FE_PORT),
    ] {
        let good = s.frame();
        let p = parse(&good).expect("a built frame parses");
        assert_eq!(
            (p.src, p.sport, p.dst, p.dport),
            (s.src, s.sport, s.dst, s.dport)
        );
        let l4 = if s.src.is_ipv4() { 34 } else { 54 };
        let daddr_last = if s.src.is_ipv4() { 33 } else { 53 };
        let mut bad = vec![
            // Destination address (IPv4 header checksum and pseudo-header).
            (daddr_last, "address"),
            // Destination port (L4 checksum only).
            (l4 + 3, "port"),
        ];
        if s.src.is_ipv4() {
            // Total length.
            bad.push((17, "length"));
        } else {
            bad.push((19, "payload length"));
        }
        for (at, what) in bad {
            let mut f = good.clone();
            f[at] ^= 0x01;
            assert!(parse(&f).is_err(), "{what} change not detected in {s:?}");
        }
    }
}

/// Runs `cmd` (an `ip` command line) in the calling thread's netns.
fn ip_cmd(args: &str) {
    let out = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| panic!("run ip {args}: {e}"));
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With a route and forwarding on in the test's netns, tc ingress sends a SNAT flow's
/// packets out itself, both directions: TC_ACT_REDIRECT (bpf_redirect_neigh), the
/// TTL/hop limit decremented (the parser verifies the IPv4 header checksum that goes
/// with it), counted. A packet whose hop limit would expire is left to the stack.
#[test]
fn snat_flow_is_sent_by_fib_lookup_when_routed() {
    let mut dp = lab();
    // All in this test thread's own netns (see `lab`), which takes the veth pair with it
    // when the thread ends.
    ip_cmd("link set lo up");
    ip_cmd("link add fib0 type veth peer name fib1");
    ip_cmd("link set fib1 up");
    ip_cmd("link set fib0 up");
    ip_cmd("addr add 10.0.2.1/24 dev fib0");
    ip_cmd("-6 addr add fd00:2::1/64 dev fib0 nodad");
    ip_cmd("neigh add 10.0.2.2 lladdr 02:00:00:00:02:02 dev fib0 nud permanent");
    ip_cmd("-6 neigh add fd00:2::2 lladdr 02:00:00:00:02:02 dev fib0 nud permanent");
    ip_cmd("route add 198.51.100.0/24 via 10.0.2.2 dev fib0");
    ip_cmd("-6 route add 2001:db8:c::/64 via fd00:2::2 dev fib0");
    for path in [
        "/proc/sys/net/ipv4/conf/all/forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        std::fs::write(path, "1").unwrap_or_else(|e| panic!("write 1 to {path}: {e}"));
    }
    let mut sent = 0;
    for (proto, client, lb, node, backend, id, rev) in [
        (TCP, CLIENT4, LB4, NODE4, REMOTE4, BE_REMOTE4, 1),
        (UDP, CLIENT4, LB4, NODE4, REMOTE4, BE_REMOTE4, 2),
        (TCP, CLIENT6, LB6, NODE6, REMOTE6, BE_REMOTE6, 3),
    ] {
        service(&mut dp, lb, FE_PORT, proto, rev, 0, &[id]);
        let s = spec(proto, client, 62_000, lb, FE_PORT, SYN);
        let out = expect(&dp, dp.tc_in, &s, TC_ACT_REDIRECT);
        assert_eq!((out.src, out.sport), (ip(node), 62_000), "SNAT of {s:?}");
        assert_eq!((out.dst, out.dport), (ip(backend), BE_PORT));
        assert_eq!(out.ttl, 63, "{s:?} forwarded: TTL/hop limit decremented");
        assert_eq!(out.payload(), s.payload.as_slice());

        let r = spec(proto, backend, BE_PORT, node, 62_000, SYN | ACK);
        let back = expect(&dp, dp.tc_in, &r, TC_ACT_REDIRECT);
        assert_eq!((back.src, back.sport), (ip(lb), FE_PORT), "reply {r:?}");
        assert_eq!((back.dst, back.dport), (ip(client), 62_000));
        assert_eq!(back.ttl, 63);
        assert_eq!(back.payload(), r.payload.as_slice());
        sent += 2;
    }
    assert_eq!(dp.counter(CTR_EXT_FIB_REDIRECTED).expect("counter"), sent);
    assert_eq!(dp.counter(CTR_EXT_FIB_TO_STACK).expect("counter"), 0);

    // Hop limit 1 (IPv6: no header checksum to fix in the hand-edited frame): the
    // stack forwards nothing with it, and sends the Time Exceeded itself.
    let s = spec(TCP, CLIENT6, 62_000, LB6, FE_PORT, ACK);
    let mut frame = s.frame();
    frame[14 + 7] = 1;
    let (rc, raw) = run(&dp, dp.tc_in, &frame);
    assert_eq!(rc, TC_ACT_OK, "hop limit 1 goes to the stack");
    let out = parse(&raw).expect("output of the hop-limit-1 packet");
    assert_eq!((out.dst, out.ttl), (ip(REMOTE6), 1));
    assert_eq!(dp.counter(CTR_EXT_FIB_TO_STACK).expect("counter"), 1);
    assert_eq!(dp.counter(CTR_EXT_FIB_REDIRECTED).expect("counter"), sent);
}
