use std::net::{IpAddr, Ipv4Addr};

use svc_lb_common::{CT_DIR_REPLY, CtValue, FAMILY_V4, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL};

use super::*;

const NOW: u64 = 1_000_000_000;

fn be(a: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(a), 0, 0, 0]
}

/// A forward entry of client port `sport` to backend 10.0.0.`backend`:8080 through
/// frontend `rev`, with `packets` packets of 100 bytes.
fn fwd(sport: u16, rev: u32, backend: u8, packets: u64) -> (CtKey, CtEntry) {
    let k = CtKey {
        saddr_be: be([198, 51, 100, 7]),
        daddr_be: be([192, 0, 2, 1]),
        sport_be: sport.to_be(),
        dport_be: 30080u16.to_be(),
        proto: PROTO_UDP,
        family: FAMILY_V4,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    let e = CtEntry {
        ct: CtValue {
            expires_ns: NOW + 1_000_000_000,
            backend_id: u32::from(backend),
            rev_nat_id: rev,
            nat_addr_be: be([10, 0, 0, backend]),
            snat_addr_be: [0; 4],
            nat_port_be: 8080u16.to_be(),
            snat_port_be: 0,
            flags: 0,
            _pad: [0; 3],
        },
        packets,
        bytes: packets * 100,
    };
    (k, e)
}

/// The reply entry of the same flow (keyed by the backend's packet).
fn rep(sport: u16, rev: u32, backend: u8, packets: u64) -> (CtKey, CtEntry) {
    let (mut k, mut e) = fwd(sport, rev, backend, packets);
    k.saddr_be = be([10, 0, 0, backend]);
    k.sport_be = 8080u16.to_be();
    k.daddr_be = be([198, 51, 100, 7]);
    k.dport_be = sport.to_be();
    k.dir = CT_DIR_REPLY;
    e.ct.nat_addr_be = be([192, 0, 2, 1]);
    e.ct.nat_port_be = 30080u16.to_be();
    (k, e)
}

fn tkey(rev: u32, backend: u8) -> ExtTrafficKey {
    ExtTrafficKey {
        rev_nat_id: rev,
        backend: ConnKey {
            addr_be: be([10, 0, 0, backend]),
            port_be: 8080u16.to_be(),
            family: FAMILY_V4,
            _pad: 0,
        },
        proto: PROTO_UDP,
        _pad: [0; 3],
    }
}

/// One pass over `entries`.
fn pass(f: &mut Fold, entries: &[(CtKey, CtEntry)]) -> Deltas {
    let mut d = Deltas::new();
    for (k, e) in entries {
        f.entry(k, e, NOW, &mut d);
    }
    f.finish();
    d
}

fn count(packets_in: u64, packets_out: u64) -> TrafficCount {
    TrafficCount {
        closed: 0,
        packets_in,
        packets_out,
        bytes_in: packets_in * 100,
        bytes_out: packets_out * 100,
    }
}

#[test]
fn fold_adds_increases_of_both_directions() {
    let mut f = Fold::new(false);
    let d = pass(&mut f, &[fwd(1000, 7, 1, 3), rep(1000, 7, 1, 2)]);
    assert_eq!(d, Deltas::from([(tkey(7, 1), count(3, 2))]));
    let d = pass(&mut f, &[fwd(1000, 7, 1, 5), rep(1000, 7, 1, 2)]);
    assert_eq!(d, Deltas::from([(tkey(7, 1), count(2, 0))]));
    // Nothing new: nothing added.
    let d = pass(&mut f, &[fwd(1000, 7, 1, 5), rep(1000, 7, 1, 2)]);
    assert!(d.is_empty(), "{d:?}");
    // An entry seen twice in one pass (a key walk that started over) counts once.
    let d = pass(&mut f, &[fwd(1000, 7, 1, 6), fwd(1000, 7, 1, 6)]);
    assert_eq!(d, Deltas::from([(tkey(7, 1), count(1, 0))]));
}

#[test]
fn a_lower_count_is_a_new_flow_on_the_same_key_and_counts_whole() {
    let mut f = Fold::new(false);
    pass(&mut f, &[fwd(1000, 7, 1, 10)]);
    let d = pass(&mut f, &[fwd(1000, 7, 1, 2)]);
    assert_eq!(d, Deltas::from([(tkey(7, 1), count(2, 0))]));
    // Reused for another backend with a higher count: also a new flow, counted whole,
    // and for the backend it now names.
    let d = pass(&mut f, &[fwd(1000, 7, 2, 4)]);
    assert_eq!(d, Deltas::from([(tkey(7, 2), count(4, 0))]));
}

#[test]
fn a_disappeared_entry_is_forgotten_and_a_new_one_on_its_key_counts_whole() {
    let mut f = Fold::new(false);
    pass(&mut f, &[fwd(1000, 7, 1, 10), fwd(1001, 7, 1, 4)]);
    assert_eq!(f.remembered(), 2);
    // 1000 evicted.
    let d = pass(&mut f, &[fwd(1001, 7, 1, 4)]);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(f.remembered(), 1);
    // A new flow on 1000's key with more packets than the old one had: all of it.
    let d = pass(&mut f, &[fwd(1000, 7, 1, 12), fwd(1001, 7, 1, 4)]);
    assert_eq!(d, Deltas::from([(tkey(7, 1), count(12, 0))]));
}

#[test]
fn a_restarted_agent_takes_the_live_entries_as_its_baseline() {
    let mut f = Fold::new(true);
    let d = pass(&mut f, &[fwd(1000, 7, 1, 10), rep(1000, 7, 1, 9)]);
    assert!(d.is_empty(), "the baseline adds nothing: {d:?}");
    let d = pass(
        &mut f,
        &[fwd(1000, 7, 1, 11), rep(1000, 7, 1, 9), fwd(1001, 7, 1, 1)],
    );
    assert_eq!(d, Deltas::from([(tkey(7, 1), count(2, 0))]));
    // A fresh totals map (no baseline) counts what the entries hold.
    let mut f = Fold::new(false);
    let d = pass(&mut f, &[fwd(1000, 7, 1, 10)]);
    assert_eq!(d, Deltas::from([(tkey(7, 1), count(10, 0))]));
}

#[test]
fn a_flow_is_counted_closed_once() {
    let mut f = Fold::new(false);
    let (k, mut e) = fwd(1000, 7, 1, 3);
    e.ct.flags = CT_FLAG_CLOSING;
    let d = pass(&mut f, &[(k, e)]);
    assert_eq!(d[&tkey(7, 1)].closed, 1);
    let d = pass(&mut f, &[(k, e)]);
    assert!(d.is_empty(), "{d:?}");
    // Expired (not closing) counts too; a reply entry never does.
    let (k2, mut e2) = fwd(1001, 7, 1, 3);
    e2.ct.expires_ns = NOW - 1;
    let (k3, mut e3) = rep(1001, 7, 1, 3);
    e3.ct.expires_ns = NOW - 1;
    let d = pass(&mut f, &[(k, e), (k2, e2), (k3, e3)]);
    assert_eq!(d[&tkey(7, 1)].closed, 1);
}

fn fe(port: u16) -> FrontendKey {
    FrontendKey {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        port,
        proto: PROTO_UDP,
        scope: SCOPE_EXTERNAL,
    }
}

fn programmed(frontends: &[(u32, u16)], backends: &[u8]) -> Programmed {
    Programmed {
        frontends: frontends.iter().map(|(id, p)| (*id, fe(*p))).collect(),
        backends: backends
            .iter()
            .map(|b| (tkey(0, *b).backend, PROTO_UDP))
            .collect(),
    }
}

#[test]
fn totals_keep_their_sum_while_entries_go_and_drop_frontends_that_go() {
    let mut totals = HashMap::new();
    let p = programmed(&[(7, 30080), (8, 30081)], &[1, 2]);
    let d = Deltas::from([(tkey(7, 1), count(5, 4)), (tkey(8, 2), count(1, 1))]);
    settle(&mut totals, &d, &p, None);
    settle(&mut totals, &Deltas::new(), &p, Some(&p));
    assert_eq!(
        totals[&tkey(7, 1)],
        count(5, 4),
        "no deltas: totals unchanged"
    );
    settle(
        &mut totals,
        &Deltas::from([(tkey(7, 1), count(1, 0))]),
        &p,
        Some(&p),
    );
    assert_eq!(totals[&tkey(7, 1)], count(6, 4));
    // Frontend 8 removed: its totals go; deltas of an id not programmed are dropped.
    let p2 = programmed(&[(7, 30080)], &[1, 2]);
    settle(
        &mut totals,
        &Deltas::from([(tkey(9, 1), count(1, 0))]),
        &p2,
        Some(&p),
    );
    assert_eq!(totals.len(), 1, "{totals:?}");
    // Backend 1 leaves the backend map: its totals move to the frontend's departed
    // entry, the frontend's sum unchanged.
    let p3 = programmed(&[(7, 30080)], &[2]);
    settle(
        &mut totals,
        &Deltas::from([(tkey(7, 1), count(1, 1))]),
        &p3,
        Some(&p2),
    );
    let gone = ExtTrafficKey {
        backend: departed(),
        ..tkey(7, 1)
    };
    assert_eq!(totals, HashMap::from([(gone, count(7, 5))]));
}

#[test]
fn a_reused_rev_nat_id_starts_from_zero() {
    let mut totals = HashMap::new();
    let a = programmed(&[(7, 30080)], &[1]);
    settle(
        &mut totals,
        &Deltas::from([(tkey(7, 1), count(5, 5))]),
        &a,
        None,
    );
    // Between two folds id 7 went to another frontend (another Service).
    let b = programmed(&[(7, 30099)], &[1]);
    settle(
        &mut totals,
        &Deltas::from([(tkey(7, 1), count(1, 0))]),
        &b,
        Some(&a),
    );
    assert_eq!(totals, HashMap::from([(tkey(7, 1), count(1, 0))]));
    // A TCP key of the same backend address is another key.
    assert_ne!(
        tkey(7, 1),
        ExtTrafficKey {
            proto: PROTO_TCP,
            ..tkey(7, 1)
        }
    );
}
