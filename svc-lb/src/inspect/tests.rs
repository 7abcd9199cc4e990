//! Host tests of `list`, `trace` and the metrics on a known datapath state. The state
//! goes through the in-memory fake of the maps, so it holds exactly the bytes the
//! kernel maps would.
//!
//! Golden files live in `testdata/`; after an intended change of the output, rewrite
//! them with `UPDATE_GOLDEN=1 cargo test -p svc-lb inspect::` and review the diff.
use std::{collections::HashMap, net::IpAddr, path::PathBuf};

use clap::Parser;
use svc_lb_common::{
    AffinityKey, AffinityValue, BACKEND_ACTIVE, BACKEND_TERMINATING, COUNTER_NAMES, COUNTERS_MAX,
    CTR_EXT_DROP_NO_LOCAL, CTR_EXT_FORWARDED, CTR_SOCK_NO_BACKEND, CTR_SOCK_RNAT_HIT,
    CTR_SOCK_XLATED, KIND_CLUSTER_IP, KIND_LOAD_BALANCER, KIND_NODE_PORT, META_EXTERNAL_LOCAL,
    PROTO_TCP, PROTO_UDP, SCOPE_ALL, SCOPE_EXTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY,
    SVC_FLAG_EXT_LOCAL, SVC_FLAG_SRC_RANGES,
};

use super::{
    list,
    trace::{self, ClientNetns, TraceMaps, TraceRequest},
    view::DatapathView,
};
use crate::{
    datapath::pinned::{MapStatus, ProgramStatus},
    datapath::{MapStore, codec::FrontendMeta, fake::FakeMaps},
    metrics::{self, ScrapeData},
    model::{BackendAddr, FrontendKey, ServiceRef},
    plan::{BackendEntry, Op},
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

struct Fe {
    addr: &'static str,
    port: u16,
    proto: u8,
    rev_nat_id: u32,
    service: (&'static str, &'static str, &'static str),
    kind: u8,
    meta_flags: u8,
    affinity_s: Option<u32>,
    backends: &'static [u32],
    conns: u64,
    scope: u8,
    /// `SVC_FLAG_*` besides affinity (which `affinity_s` sets).
    svc_flags: u16,
}

/// Backends: id → (address, port, proto, state, new connections).
const BACKENDS: &[(u32, &str, u16, u8, u8, u64)] = &[
    (1, "10.244.1.5", 8080, PROTO_TCP, BACKEND_ACTIVE, 7),
    (2, "10.244.2.9", 8080, PROTO_TCP, BACKEND_ACTIVE, 5),
    (3, "10.244.3.2", 8080, PROTO_TCP, BACKEND_TERMINATING, 0),
    (4, "10.244.1.5", 8443, PROTO_TCP, BACKEND_ACTIVE, 2),
    (5, "10.244.2.9", 8443, PROTO_TCP, BACKEND_ACTIVE, 0),
    (6, "10.244.0.3", 53, PROTO_UDP, BACKEND_ACTIVE, 40),
    (7, "fd00:244::7", 8080, PROTO_TCP, BACKEND_ACTIVE, 1),
];

fn frontends() -> Vec<Fe> {
    vec![
        Fe {
            addr: "10.96.0.10",
            port: 80,
            proto: PROTO_TCP,
            rev_nat_id: 1,
            service: ("shop", "web", "http"),
            kind: KIND_CLUSTER_IP,
            meta_flags: META_EXTERNAL_LOCAL,
            affinity_s: None,
            backends: &[1, 2, 3],
            conns: 10,
            scope: SCOPE_ALL,
            svc_flags: 0,
        },
        Fe {
            addr: "192.168.1.20",
            port: 30080,
            proto: PROTO_TCP,
            rev_nat_id: 2,
            service: ("shop", "web", "http"),
            kind: KIND_NODE_PORT,
            meta_flags: META_EXTERNAL_LOCAL,
            affinity_s: None,
            backends: &[1, 2],
            conns: 2,
            scope: SCOPE_ALL,
            svc_flags: 0,
        },
        Fe {
            addr: "10.96.0.20",
            port: 443,
            proto: PROTO_TCP,
            rev_nat_id: 3,
            service: ("shop", "cart", ""),
            kind: KIND_CLUSTER_IP,
            meta_flags: 0,
            affinity_s: Some(10800),
            backends: &[4, 5],
            conns: 2,
            scope: SCOPE_ALL,
            svc_flags: 0,
        },
        Fe {
            addr: "10.96.0.53",
            port: 53,
            proto: PROTO_UDP,
            rev_nat_id: 4,
            service: ("kube-system", "dns", "dns"),
            kind: KIND_CLUSTER_IP,
            meta_flags: 0,
            affinity_s: None,
            backends: &[6],
            conns: 40,
            scope: SCOPE_ALL,
            svc_flags: 0,
        },
        Fe {
            addr: "10.96.0.30",
            port: 80,
            proto: PROTO_TCP,
            rev_nat_id: 5,
            service: ("shop", "empty", "http"),
            kind: KIND_CLUSTER_IP,
            meta_flags: 0,
            affinity_s: None,
            backends: &[],
            conns: 0,
            scope: SCOPE_ALL,
            svc_flags: 0,
        },
        Fe {
            addr: "fd00:96::10",
            port: 80,
            proto: PROTO_TCP,
            rev_nat_id: 6,
            service: ("shop", "web6", "http"),
            kind: KIND_CLUSTER_IP,
            meta_flags: 0,
            affinity_s: None,
            backends: &[7],
            conns: 1,
            scope: SCOPE_ALL,
            svc_flags: 0,
        },
        // External path: the NodePort once per port with the unspecified address
        // (externalTrafficPolicy Local: only the local backend), a LoadBalancer IP with
        // source ranges, and an IPv6 NodePort with no local endpoint (dropped).
        Fe {
            addr: "0.0.0.0",
            port: 30080,
            proto: PROTO_TCP,
            rev_nat_id: 7,
            service: ("shop", "web", "http"),
            kind: KIND_NODE_PORT,
            meta_flags: META_EXTERNAL_LOCAL,
            affinity_s: None,
            backends: &[1],
            conns: 0,
            scope: SCOPE_EXTERNAL,
            svc_flags: SVC_FLAG_EXT_LOCAL,
        },
        Fe {
            addr: "192.0.2.10",
            port: 80,
            proto: PROTO_TCP,
            rev_nat_id: 8,
            service: ("shop", "web", "http"),
            kind: KIND_LOAD_BALANCER,
            meta_flags: 0,
            affinity_s: None,
            backends: &[1, 2],
            conns: 0,
            scope: SCOPE_EXTERNAL,
            svc_flags: SVC_FLAG_SRC_RANGES,
        },
        Fe {
            addr: "::",
            port: 30053,
            proto: PROTO_UDP,
            rev_nat_id: 9,
            service: ("kube-system", "dns", "dns"),
            kind: KIND_NODE_PORT,
            meta_flags: META_EXTERNAL_LOCAL,
            affinity_s: None,
            backends: &[],
            conns: 0,
            scope: SCOPE_EXTERNAL,
            svc_flags: SVC_FLAG_EXT_LOCAL | SVC_FLAG_DROP_EMPTY,
        },
    ]
}

fn key(f: &Fe) -> FrontendKey {
    FrontendKey {
        addr: ip(f.addr),
        port: f.port,
        proto: f.proto,
        scope: f.scope,
    }
}

/// The fixture, written into the fake maps in the planner's order.
fn fixture() -> (FakeMaps, DatapathView) {
    let mut maps = FakeMaps::with_default_capacity();
    let mut apply = |op: Op| maps.apply(&op).expect("fixture op");
    for (id, addr, port, proto, state, _) in BACKENDS {
        apply(Op::UpsertBackend {
            id: *id,
            backend: BackendEntry {
                addr: BackendAddr {
                    addr: ip(addr),
                    port: *port,
                    proto: *proto,
                },
                state: *state,
                local: false,
            },
        });
    }
    let mut meta = HashMap::new();
    let mut frontend_conns = HashMap::new();
    for f in frontends() {
        let fe = key(&f);
        apply(Op::UpsertRevNat {
            id: f.rev_nat_id,
            frontend: fe,
        });
        for (i, id) in f.backends.iter().enumerate() {
            apply(Op::UpsertSlot {
                frontend: fe,
                slot: i as u16 + 1,
                backend_id: *id,
            });
        }
        // The fake maps insist on what the datapath needs before an external master:
        // its Maglev table, and its source ranges.
        if fe.scope == svc_lb_common::SCOPE_EXTERNAL && !f.backends.is_empty() {
            let backends = f
                .backends
                .iter()
                .filter_map(|id| {
                    BACKENDS.iter().find(|b| b.0 == *id).map(|b| {
                        (
                            *id,
                            BackendAddr {
                                addr: ip(b.1),
                                port: b.2,
                                proto: b.3,
                            },
                        )
                    })
                })
                .collect();
            apply(Op::UpsertMaglev {
                rev_nat_id: f.rev_nat_id,
                backends,
            });
        }
        if f.svc_flags & SVC_FLAG_SRC_RANGES != 0 {
            apply(Op::UpsertSrcRange {
                rev_nat_id: f.rev_nat_id,
                range: "203.0.113.0/24".parse().expect("fixture range"),
            });
        }
        apply(Op::UpsertMaster {
            frontend: fe,
            count: f.backends.len() as u32,
            rev_nat_id: f.rev_nat_id,
            flags: f.svc_flags
                | if f.affinity_s.is_some() {
                    SVC_FLAG_AFFINITY
                } else {
                    0
                },
            affinity_timeout_s: f.affinity_s.unwrap_or(0),
        });
        meta.insert(
            f.rev_nat_id,
            FrontendMeta {
                service: ServiceRef {
                    namespace: f.service.0.into(),
                    name: f.service.1.into(),
                },
                port_name: f.service.2.to_owned(),
                kind: f.kind,
                flags: f.meta_flags,
            },
        );
        frontend_conns.insert(f.rev_nat_id, f.conns);
    }
    let view = DatapathView {
        state: maps.read_current().expect("read the fake back"),
        meta,
        frontend_conns,
        backend_conns: BACKENDS.iter().map(|b| (b.0, b.5)).collect(),
        // Open TCP connections by address (the sock_ops counts) and external flows by
        // backend id (conntrack); UDP backends are never counted by address.
        open_conns: Some(
            BACKENDS
                .iter()
                .map(|b| {
                    let addr = BackendAddr {
                        addr: ip(b.1),
                        port: b.2,
                        proto: b.3,
                    };
                    (
                        crate::inspect::view::conn_key(&addr),
                        (u64::from(b.0), u64::from(b.0 % 2)),
                    )
                })
                .collect(),
        ),
        ext_conns: [(2, (10, 1))].into_iter().collect(),
        ext_pairs: Default::default(),
        traffic: None,
        udp_traffic: None,
        ext_traffic: None,
        ext_totals: false,
    };
    (maps, view)
}

/// The fake plus the metadata and session affinity entries, as the real maps provide.
struct WithMeta<'a>(&'a FakeMaps, &'a DatapathView, Affinity);

/// Affinity entries and (backend, frontend) members.
#[derive(Default)]
struct Affinity {
    entries: HashMap<AffinityKey, AffinityValue>,
    members: Vec<(u32, u32)>,
}

impl TraceMaps for WithMeta<'_> {
    fn svc(
        &self,
        key: &crate::datapath::codec::SvcKey,
    ) -> anyhow::Result<Option<svc_lb_common::SvcValue>> {
        TraceMaps::svc(self.0, key)
    }
    fn backend(&self, id: u32) -> anyhow::Result<Option<svc_lb_common::Backend>> {
        TraceMaps::backend(self.0, id)
    }
    fn meta(&self, rev_nat_id: u32) -> anyhow::Result<Option<FrontendMeta>> {
        Ok(self.1.meta.get(&rev_nat_id).cloned())
    }
    fn frontends_at(&self, addr: IpAddr) -> anyhow::Result<Vec<FrontendKey>> {
        self.0.frontends_at(addr)
    }
    fn affinity(&self, key: &AffinityKey) -> anyhow::Result<Option<AffinityValue>> {
        Ok(self.2.entries.get(key).copied())
    }
    fn affinity_member(&self, backend_id: u32, rev_nat_id: u32) -> anyhow::Result<bool> {
        Ok(self.2.members.contains(&(backend_id, rev_nat_id)))
    }
}

fn golden(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/inspect/testdata")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).expect("write golden file");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "read {}: {e} (create it with UPDATE_GOLDEN=1)",
            path.display()
        )
    });
    assert!(
        got == want,
        "{name} differs from the golden file {}.\n--- got ---\n{got}\n--- want ---\n{want}",
        path.display()
    );
}

#[test]
fn list_text_golden() {
    let (_, view) = fixture();
    golden("list.txt", &list::render_text(&list::entries(&view, None)));
}

#[test]
fn list_json_golden() {
    let (_, view) = fixture();
    golden(
        "list.json",
        &list::render_json(&list::entries(&view, None)).expect("json"),
    );
}

#[test]
fn list_yaml_golden() {
    let (_, view) = fixture();
    let svc = list::parse_service("shop/cart").expect("parse");
    golden(
        "list-cart.yaml",
        &list::render_yaml(&list::entries(&view, Some(&svc))).expect("yaml"),
    );
}

#[test]
fn list_filters_by_service() {
    let (_, view) = fixture();
    let web = list::parse_service("shop/web").expect("parse");
    let got: Vec<(String, u16, &str)> = list::entries(&view, Some(&web))
        .into_iter()
        .map(|e| (e.address, e.port, e.scope))
        .collect();
    assert_eq!(
        got,
        vec![
            ("0.0.0.0".to_owned(), 30080, "external"),
            ("10.96.0.10".to_owned(), 80, "socket"),
            ("192.0.2.10".to_owned(), 80, "external"),
            ("192.168.1.20".to_owned(), 30080, "socket"),
        ]
    );
    let none = list::parse_service("shop/nope").expect("parse");
    assert!(list::entries(&view, Some(&none)).is_empty());
    for bad in ["web", "/web", "shop/", "a/b/c"] {
        assert!(list::parse_service(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn list_shows_external_frontends_with_their_flags() {
    let (_, view) = fixture();
    let all = list::entries(&view, None);
    let find = |addr: &str, port: u16| {
        all.iter()
            .find(|e| e.address == addr && e.port == port)
            .unwrap_or_else(|| panic!("{addr}:{port} not listed"))
    };
    let np = find("0.0.0.0", 30080);
    assert_eq!(
        (np.scope, np.kind, np.external_traffic_policy),
        ("external", "NodePort", "Local")
    );
    assert_eq!(np.datapath_flags, vec!["external_local"]);
    let lb = find("192.0.2.10", 80);
    assert_eq!((lb.scope, lb.kind), ("external", "LoadBalancer"));
    assert_eq!(lb.datapath_flags, vec!["source_ranges"]);
    let dns = find("::", 30053);
    assert_eq!(dns.datapath_flags, vec!["external_local", "drop_empty"]);
    assert!(dns.backends.is_empty());
    let cart = find("10.96.0.20", 443);
    assert_eq!(
        (cart.scope, cart.datapath_flags.clone()),
        ("socket", vec!["affinity"])
    );
    let text = list::render_text(&all);
    for want in [
        "0.0.0.0:30080",
        "[::]:30053",
        "(no local endpoints: packets are dropped)",
        "(no backends: connections are refused)",
        "loadBalancerSourceRanges",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn list_shows_open_connections_or_says_why_not() {
    let (_, mut view) = fixture();
    let all = list::entries(&view, None);
    let web = all
        .iter()
        .find(|e| e.address == "10.96.0.10" && e.port == 80)
        .expect("web");
    let by_id = |id: u32| web.backends.iter().find(|b| b.id == id).expect("backend");
    // Backend 1: its address's socket counts (1, 1 % 2).
    assert_eq!(
        (by_id(1).active_connections, by_id(1).inactive_connections),
        (Some(1), Some(1))
    );
    // Backend 2: socket counts (2, 0) plus 10 established and 1 other external flow.
    assert_eq!(
        (by_id(2).active_connections, by_id(2).inactive_connections),
        (Some(12), Some(1))
    );
    let dns = all.iter().find(|e| e.protocol == "UDP").expect("udp");
    assert_eq!(
        dns.backends[0].active_connections,
        Some(0),
        "the TCP count of another port is never a UDP backend's"
    );
    view.open_conns = None;
    let all = list::entries(&view, None);
    assert!(
        all.iter()
            .flat_map(|e| &e.backends)
            .all(|b| b.active_connections.is_none() && b.inactive_connections.is_none())
    );
    let text = list::render_text(&all);
    assert!(
        text.contains("keeps no connection counts (kernel feature sock_ops_conn"),
        "{text}"
    );
    let json = list::render_json(&all).expect("json");
    assert!(json.contains("\"active_connections\": null"), "{json}");
}

#[test]
fn list_json_field_names_are_stable() {
    // The README documents these names; renaming one breaks users' scripts.
    let (_, view) = fixture();
    let v: serde_json::Value =
        serde_json::from_str(&list::render_json(&list::entries(&view, None)).expect("json"))
            .expect("parse");
    let fe = &v[0];
    let mut keys: Vec<&str> = fe
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "address",
            "affinity_timeout_seconds",
            "backends",
            "datapath_flags",
            "external_traffic_policy",
            "internal_traffic_policy",
            "kind",
            "namespace",
            "new_connections",
            "port",
            "port_name",
            "protocol",
            "rev_nat_id",
            "scheduler",
            "scope",
            "service",
            "session_affinity"
        ]
    );
    let mut bkeys: Vec<&str> = fe["backends"][0]
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    bkeys.sort_unstable();
    assert_eq!(
        bkeys,
        [
            "active_connections",
            "address",
            "id",
            "inactive_connections",
            "new_connections",
            "port",
            "shared",
            "state",
            "weight"
        ]
    );
}

fn req(to: &str, proto: u8) -> TraceRequest {
    TraceRequest {
        to: to.parse().expect("socket address"),
        proto,
        from: Some(ip("10.244.9.9")),
        client: None,
        now_ns: 0,
    }
}

#[test]
fn trace_text_golden() {
    let (maps, view) = fixture();
    let m = WithMeta(&maps, &view, Affinity::default());
    let mut out = String::new();
    for (to, proto, random) in [
        ("10.96.0.10:80", PROTO_TCP, 4u32),
        ("10.96.0.30:80", PROTO_TCP, 0),
        ("10.96.0.10:81", PROTO_TCP, 0),
        ("10.96.0.53:53", PROTO_UDP, 0),
        ("[fd00:96::10]:80", PROTO_TCP, 9),
    ] {
        let t = trace::trace(&m, &req(to, proto), random).expect("trace");
        out.push_str(&trace::render_text(&t));
        out.push('\n');
    }
    golden("trace.txt", &out);
}

const SEC: u64 = 1_000_000_000;

/// The sticky Service `shop/cart` (rev-NAT 3, backends 4 and 5, timeout 10800 s) for a
/// client whose netns cookie is 77, at monotonic time 20 000 s.
fn sticky(
    entry: Option<(u32, u64)>,
    members: &[(u32, u32)],
) -> (FakeMaps, DatapathView, Affinity, TraceRequest) {
    let (maps, view) = fixture();
    let mut aff = Affinity {
        members: members.to_vec(),
        ..Default::default()
    };
    if let Some((backend_id, age_s)) = entry {
        aff.entries.insert(
            AffinityKey {
                netns_cookie: 77,
                rev_nat_id: 3,
                _pad: 0,
            },
            AffinityValue {
                last_used_ns: 20_000 * SEC - age_s * SEC,
                backend_id,
                _pad: 0,
            },
        );
    }
    let mut r = req("10.96.0.20:443", PROTO_TCP);
    r.client = Some(ClientNetns {
        cookie: 77,
        label: "/run/netns/client".to_owned(),
    });
    r.now_ns = 20_000 * SEC;
    (maps, view, aff, r)
}

#[test]
fn trace_uses_the_clients_remembered_backend() {
    // Fresh entry for a member backend: used whatever the random number.
    let (maps, view, aff, r) = sticky(Some((5, 30)), &[(4, 3), (5, 3)]);
    let m = WithMeta(&maps, &view, aff);
    for random in [0, 1, 2] {
        let t = trace::trace(&m, &r, random).expect("trace");
        let b = t.verdict.backend.clone().expect("a backend");
        assert_eq!(
            (b.id, b.via, b.deterministic, b.slot),
            (5, "affinity", true, 0)
        );
        let a = t.affinity.expect("affinity step");
        assert!(a.used);
        assert_eq!(a.client_netns_cookie, Some(77));
        let e = a.entry.expect("entry");
        assert!(e.fresh && e.member);
        assert_eq!(e.age_seconds, 30.0);
    }
    // Expired, or no longer a member: a new random draw.
    for (entry, members) in [
        (Some((5, 10_801)), vec![(4, 3), (5, 3)]),
        (Some((5, 30)), vec![(4, 3)]),
        (None, vec![(4, 3), (5, 3)]),
    ] {
        let (maps, view, aff, r) = sticky(entry, &members);
        let m = WithMeta(&maps, &view, aff);
        let t = trace::trace(&m, &r, 0).expect("trace");
        let b = t.verdict.backend.clone().expect("a backend");
        assert_eq!(
            (b.id, b.via, b.deterministic, b.slot),
            (4, "random", false, 1)
        );
        assert!(!t.affinity.expect("affinity step").used);
    }
}

#[test]
fn trace_affinity_golden() {
    let mut out = String::new();
    for (entry, members) in [
        (Some((5, 30)), vec![(4, 3), (5, 3)]),
        (Some((5, 10_801)), vec![(4, 3), (5, 3)]),
        (Some((5, 30)), vec![(4, 3)]),
        (None, vec![]),
    ] {
        let (maps, view, aff, r) = sticky(entry, &members);
        let m = WithMeta(&maps, &view, aff);
        out.push_str(&trace::render_text(
            &trace::trace(&m, &r, 0).expect("trace"),
        ));
        out.push('\n');
    }
    let (maps, view, _, mut r) = sticky(None, &[]);
    r.client = None;
    let m = WithMeta(&maps, &view, Affinity::default());
    out.push_str(&trace::render_text(
        &trace::trace(&m, &r, 1).expect("trace"),
    ));
    golden("trace-affinity.txt", &out);
}

#[test]
fn trace_follows_the_shared_choice() {
    let (maps, view) = fixture();
    let m = WithMeta(&maps, &view, Affinity::default());
    // random % 3 + 1: 0 → slot 1, 1 → slot 2, 5 → slot 3.
    for (random, slot, backend) in [(0u32, 1u16, 1u32), (1, 2, 2), (5, 3, 3)] {
        let t = trace::trace(&m, &req("10.96.0.10:80", PROTO_TCP), random).expect("trace");
        assert_eq!(t.verdict.action, "rewrite");
        let b = t.verdict.backend.expect("a backend");
        assert_eq!((b.slot, b.id), (slot, backend));
        assert_eq!(b.via, "random");
        assert!(!b.deterministic);
    }
    let t = trace::trace(&m, &req("10.96.0.30:80", PROTO_TCP), 0).expect("trace");
    assert_eq!(t.verdict.action, "reject");
    assert_eq!(t.verdict.errno, Some("ECONNREFUSED"));
    assert_eq!(t.verdict.reason, Some("sock_rejected_no_backend"));
    let t = trace::trace(&m, &req("10.96.0.10:80", PROTO_UDP), 0).expect("trace");
    assert_eq!(t.verdict.action, "pass");
    assert!(t.frontend.is_none());
    let t = trace::trace(&m, &req("10.96.0.53:53", PROTO_UDP), 77).expect("trace");
    let b = t.verdict.backend.expect("a backend");
    assert!(b.deterministic, "a single backend is deterministic");
    assert_eq!(b.address, "10.244.0.3");
}

/// `[::ffff:VIP]:port` from a dual-stack socket is traced through the IPv4 frontend, as
/// the connect6/recvmsg6/getpeername6 programs handle it.
#[test]
fn trace_ipv4_mapped_uses_the_ipv4_frontend() {
    let (maps, view) = fixture();
    let m = WithMeta(&maps, &view, Affinity::default());
    for random in [0u32, 1, 5] {
        let v4 = trace::trace(&m, &req("10.96.0.10:80", PROTO_TCP), random).expect("trace");
        let v6 =
            trace::trace(&m, &req("[::ffff:10.96.0.10]:80", PROTO_TCP), random).expect("trace");
        assert_eq!(v6.verdict, v4.verdict, "same choice as the IPv4 address");
        assert_eq!(v6.frontend, v4.frontend);
        assert_eq!(v6.destination, "[::ffff:10.96.0.10]:80");
        assert_eq!(v6.steps[0].step, "address");
        assert!(v6.hooks.starts_with("connect6"), "{}", v6.hooks);
        let text = trace::render_text(&v6);
        assert!(text.contains("REWRITE to [::ffff:"), "{text}");
    }
    // Reject with no endpoints, and an unknown mapped address passes, as for IPv4.
    let t = trace::trace(&m, &req("[::ffff:10.96.0.30]:80", PROTO_TCP), 0).expect("trace");
    assert_eq!(t.verdict.action, "reject");
    assert_eq!(t.verdict.errno, Some("ECONNREFUSED"));
    let t = trace::trace(&m, &req("[::ffff:10.96.0.99]:80", PROTO_TCP), 0).expect("trace");
    assert_eq!(t.verdict.action, "pass");
    let t = trace::trace(&m, &req("[::ffff:10.96.0.53]:53", PROTO_UDP), 77).expect("trace");
    assert_eq!(t.verdict.action, "rewrite");
    assert!(t.hooks.starts_with("sendmsg4"), "{}", t.hooks);
}

/// Maps a hand edit left inconsistent, which the fake refuses to hold.
struct Broken {
    svc: HashMap<crate::datapath::codec::SvcKey, svc_lb_common::SvcValue>,
}

impl TraceMaps for Broken {
    fn svc(
        &self,
        key: &crate::datapath::codec::SvcKey,
    ) -> anyhow::Result<Option<svc_lb_common::SvcValue>> {
        Ok(self.svc.get(key).copied())
    }
    fn backend(&self, _id: u32) -> anyhow::Result<Option<svc_lb_common::Backend>> {
        Ok(None)
    }
    fn meta(&self, _rev_nat_id: u32) -> anyhow::Result<Option<FrontendMeta>> {
        Ok(None)
    }
    fn frontends_at(&self, _addr: IpAddr) -> anyhow::Result<Vec<FrontendKey>> {
        Ok(Vec::new())
    }
    fn affinity(&self, _key: &AffinityKey) -> anyhow::Result<Option<AffinityValue>> {
        Ok(None)
    }
    fn affinity_member(&self, _backend_id: u32, _rev_nat_id: u32) -> anyhow::Result<bool> {
        Ok(false)
    }
}

#[test]
fn trace_explains_inconsistent_maps() {
    use crate::datapath::codec::{master_value, slot_value, svc_key};
    let fe = FrontendKey {
        addr: ip("10.96.0.99"),
        port: 80,
        proto: PROTO_TCP,
        scope: SCOPE_ALL,
    };
    let mut svc = HashMap::new();
    svc.insert(svc_key(&fe, 0), master_value(2, 9, 0, 0));
    svc.insert(svc_key(&fe, 1), slot_value(42));
    let m = Broken { svc };
    let t = trace::trace(&m, &req("10.96.0.99:80", PROTO_TCP), 0).expect("trace");
    assert_eq!(t.verdict.reason, Some("sock_error_backend_missing"));
    let t = trace::trace(&m, &req("10.96.0.99:80", PROTO_TCP), 1).expect("trace");
    assert_eq!(t.verdict.reason, Some("sock_error_slot_missing"));
    assert_eq!(t.candidates.len(), 2);
    assert_eq!(t.candidates[1].state, "missing");
}

fn scrape() -> String {
    let (_, view) = fixture();
    let mut counters = vec![0u64; COUNTERS_MAX as usize];
    counters[CTR_SOCK_XLATED as usize] = 55;
    counters[CTR_SOCK_NO_BACKEND as usize] = 3;
    counters[CTR_SOCK_RNAT_HIT as usize] = 40;
    counters[CTR_EXT_FORWARDED as usize] = 9;
    counters[CTR_EXT_DROP_NO_LOCAL as usize] = 4;
    let data = ScrapeData {
        view: Some(view),
        counters,
        maps: vec![MapStatus {
            name: "LB_SVC4_V1".to_owned(),
            map_id: 1,
            map_type: "hash".to_owned(),
            entries: 16,
            capacity: 1024,
        }],
        programs: vec![ProgramStatus {
            name: "svclb_connect4".to_owned(),
            prog_id: 10,
            link_id: 3,
            prog_type: "cgroup_sock_addr".to_owned(),
            attach_type: "connect4".to_owned(),
            attached_to: "cgroup /x".to_owned(),
            pin: "/sys/fs/bpf/svc-lb/links/svclb_connect4".to_owned(),
            xlated_bytes: 100,
            jited_bytes: 80,
            run_count: 1000,
            run_time_ns: 250_000,
            loaded_at_ms: None,
        }],
        bpf_stats_enabled: true,
        errors: Vec::new(),
    };
    metrics::render(data).expect("render")
}

#[test]
fn metrics_exposition() {
    let text = scrape();
    for line in [
        r#"svclb_service_new_connections_total{namespace="shop",service="web"} 12"#,
        r#"svclb_service_new_connections_total{namespace="kube-system",service="dns"} 40"#,
        r#"svclb_frontend_new_connections_total{namespace="shop",service="web",port_name="http",kind="NodePort",scope="socket",frontend="192.168.1.20:30080/TCP"} 2"#,
        r#"svclb_frontend_new_connections_total{namespace="shop",service="web6",port_name="http",kind="ClusterIP",scope="socket",frontend="[fd00:96::10]:80/TCP"} 1"#,
        r#"svclb_backend_new_connections_total{namespace="shop",service="web",backend="10.244.1.5:8080/TCP"} 7"#,
        r#"svclb_datapath_translations_total{hook="sock",direction="forward"} 55"#,
        r#"svclb_datapath_translations_total{hook="sock",direction="reverse"} 40"#,
        r#"svclb_datapath_rejects_total{hook="sock",reason="no_backend"} 3"#,
        r#"svclb_datapath_rejects_total{hook="sock",reason="slot_missing"} 0"#,
        r#"svclb_datapath_errors_total{hook="sock",reason="revnat_update"} 0"#,
        r#"svclb_datapath_translations_total{hook="ext",direction="forward"} 9"#,
        r#"svclb_datapath_translations_total{hook="ext",direction="reverse"} 0"#,
        r#"svclb_datapath_drops_total{hook="ext",reason="no_local_endpoint"} 4"#,
        r#"svclb_datapath_drops_total{hook="ext",reason="source_range"} 0"#,
        r#"svclb_datapath_rejects_total{hook="ext",reason="no_backend"} 0"#,
        r#"svclb_datapath_errors_total{hook="ext",reason="conntrack_update"} 0"#,
        r#"svclb_frontend_new_connections_total{namespace="shop",service="web",port_name="http",kind="NodePort",scope="external",frontend="0.0.0.0:30080/TCP"} 0"#,
        "# TYPE svclb_healthcheck_bind_errors counter",
        "# TYPE svclb_healthcheck_node_ports gauge",
        "svclb_programmed_services 5",
        "svclb_programmed_frontends 9",
        "svclb_programmed_backends 7",
        r#"svclb_map_entries{map="LB_SVC4_V1"} 16"#,
        r#"svclb_map_capacity{map="LB_SVC4_V1"} 1024"#,
        r#"svclb_map_fill_ratio{map="LB_SVC4_V1"} 0.015625"#,
        r#"svclb_program_runs_total{program="svclb_connect4",hook="connect4"} 1000"#,
        r#"svclb_program_run_time_seconds_total{program="svclb_connect4",hook="connect4"} 0.00025"#,
        "svclb_datapath_readable 1",
        "# TYPE svclb_sync_duration_seconds histogram",
        "# TYPE svclb_sync_errors counter",
        r#"svclb_build_info{version=""#,
        "# EOF",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn every_datapath_counter_is_exported_once() {
    // Each counter gets a distinct value: its sample must appear exactly once, under
    // the hook its name says, whatever counters the eBPF programs add.
    let mut counters = vec![0u64; COUNTERS_MAX as usize];
    for (i, _) in COUNTER_NAMES {
        counters[i as usize] = 1_000_000 + u64::from(i);
    }
    let text = metrics::render(ScrapeData {
        counters,
        ..Default::default()
    })
    .expect("render");
    for (i, name) in COUNTER_NAMES {
        let suffix = format!("}} {}", 1_000_000 + u64::from(i));
        let hits: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("svclb_datapath_") && l.ends_with(&suffix))
            .collect();
        assert_eq!(hits.len(), 1, "{name}: {hits:?}\n{text}");
        let hook = if name.starts_with("ext_") {
            "ext"
        } else if name.starts_with("pod_") {
            "pod"
        } else {
            "sock"
        };
        assert!(
            hits[0].contains(&format!("hook=\"{hook}\"")),
            "{name}: {}",
            hits[0]
        );
    }
}

#[test]
fn metric_names_follow_conventions() {
    for line in scrape().lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            panic!("bad TYPE line {line}");
        };
        assert!(name.starts_with("svclb_"), "{name} lacks the svclb_ prefix");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name} is not snake_case"
        );
        // OpenMetrics names a counter family without `_total`; its samples carry it.
        assert!(!name.ends_with("_total"), "{name}: family with _total");
        if kind == "gauge" {
            assert!(
                !name.ends_with("_count") && !name.ends_with("_sum"),
                "{name}"
            );
        }
    }
}

#[test]
fn cli_parses_the_operability_commands() {
    use crate::cli::{Cli, Command};
    let c =
        Cli::try_parse_from(["svc-lb", "list", "-o", "yaml", "--service", "a/b"]).expect("list");
    assert!(matches!(c.command, Command::List { .. }));
    let c = Cli::try_parse_from([
        "svc-lb",
        "trace",
        "--to",
        "10.0.0.1:80",
        "--proto",
        "udp",
        "--from",
        "10.1.1.1",
    ])
    .expect("trace");
    assert!(matches!(c.command, Command::Trace { .. }));
    let c = Cli::try_parse_from(["svc-lb", "status", "--metrics-addr", "off", "-o", "json"])
        .expect("status");
    match c.command {
        Command::Status { metrics_addr, .. } => assert_eq!(metrics_addr.0, None),
        other => panic!("{other:?}"),
    }
    let c = Cli::try_parse_from([
        "svc-lb",
        "agent",
        "--manifests",
        "/tmp",
        "--metrics-addr",
        "127.0.0.1:0",
        "--bpf-log",
        "--log-format",
        "json",
    ])
    .expect("agent");
    match c.command {
        Command::Agent {
            metrics_addr,
            bpf_log,
            ..
        } => {
            assert_eq!(
                metrics_addr.and_then(|m| m.0),
                Some("127.0.0.1:0".parse().expect("addr"))
            );
            assert!(bpf_log);
        }
        other => panic!("{other:?}"),
    }
    let c = Cli::try_parse_from(["svc-lb", "agent", "--manifests", "/tmp"]).expect("agent");
    match c.command {
        // Not given: the agent applies DEFAULT_METRICS_ADDR (and only logs a bind error).
        Command::Agent { metrics_addr, .. } => assert_eq!(metrics_addr, None),
        other => panic!("{other:?}"),
    }
    assert!(Cli::try_parse_from(["svc-lb", "status", "--metrics-addr", "nope"]).is_err());
    let c = Cli::try_parse_from([
        "svc-lb",
        "conntrack",
        "-o",
        "json",
        "--bpffs",
        "/x",
        "--service",
        "a/b",
    ])
    .expect("conntrack");
    match c.command {
        Command::Conntrack { bpffs, service, .. } => {
            assert_eq!(bpffs, PathBuf::from("/x"));
            assert_eq!(service.as_deref(), Some("a/b"));
        }
        other => panic!("{other:?}"),
    }
}

mod conntrack {
    use std::net::SocketAddr;

    use svc_lb_common::{
        CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT, CtKey,
        CtValue, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
    };

    use super::{fixture, golden};
    use crate::{
        datapath::codec::{addr_words, port_be},
        inspect::conntrack,
    };

    const SEC: u64 = 1_000_000_000;
    /// Monotonic "now" of the fixture.
    const NOW: u64 = 50_000 * SEC;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test socket address")
    }

    fn key(src: &str, dst: &str, proto: u8, dir: u8) -> CtKey {
        let (s, d) = (sa(src), sa(dst));
        CtKey {
            saddr_be: addr_words(s.ip()),
            daddr_be: addr_words(d.ip()),
            sport_be: port_be(s.port()),
            dport_be: port_be(d.port()),
            proto,
            family: if s.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
            dir,
            _pad: 0,
        }
    }

    fn value(
        backend_id: u32,
        rev_nat_id: u32,
        nat: &str,
        snat: Option<&str>,
        flags: u8,
        ttl_s: i64,
    ) -> CtValue {
        let nat = sa(nat);
        let snat = snat.map(sa);
        CtValue {
            expires_ns: NOW.saturating_add_signed(ttl_s * SEC as i64),
            backend_id,
            rev_nat_id,
            nat_addr_be: addr_words(nat.ip()),
            snat_addr_be: snat.map_or([0; 4], |s| addr_words(s.ip())),
            nat_port_be: port_be(nat.port()),
            snat_port_be: snat.map_or(0, |s| port_be(s.port())),
            flags,
            _pad: [0; 3],
        }
    }

    /// Flows of the external path over the list fixture's Services.
    fn entries() -> Vec<(CtKey, CtValue)> {
        let (fwd, rep) = (CT_DIR_FORWARD, CT_DIR_REPLY);
        vec![
            // NodePort to a local backend: DNAT only, both halves, answered.
            (
                key("203.0.113.7:40000", "192.168.1.20:30080", PROTO_TCP, fwd),
                value(1, 2, "10.244.1.5:8080", None, CT_FLAG_SEEN_REPLY, 21_000),
            ),
            (
                key("10.244.1.5:8080", "203.0.113.7:40000", PROTO_TCP, rep),
                value(1, 2, "192.168.1.20:30080", None, CT_FLAG_SEEN_REPLY, 21_000),
            ),
            // The same NodePort to a remote backend: SNAT to the node, closing.
            (
                key("198.51.100.9:50000", "192.168.1.20:30080", PROTO_TCP, fwd),
                value(
                    2,
                    2,
                    "10.244.2.9:8080",
                    Some("192.168.1.20:61000"),
                    CT_FLAG_SNAT | CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING,
                    9,
                ),
            ),
            (
                key("10.244.2.9:8080", "192.168.1.20:61000", PROTO_TCP, rep),
                value(
                    2,
                    2,
                    "192.168.1.20:30080",
                    Some("198.51.100.9:50000"),
                    CT_FLAG_SNAT | CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING,
                    9,
                ),
            ),
            // A reply entry whose forward half was evicted (SNATed flow).
            (
                key("10.244.3.2:8080", "192.168.1.20:61001", PROTO_TCP, rep),
                value(
                    3,
                    2,
                    "192.168.1.20:30080",
                    Some("198.51.100.10:50001"),
                    CT_FLAG_SNAT,
                    30,
                ),
            ),
            // IPv6 UDP, no reply yet, already expired, Service unknown.
            (
                key("[2001:db8::5]:5353", "[2001:db8::100]:53", PROTO_UDP, fwd),
                value(7, 99, "[fd00:244::7]:53", None, 0, -3),
            ),
            // A reply entry that belongs to no forward entry of the listing is still
            // shown; an entry of an unknown family is counted, not shown.
            (
                CtKey {
                    family: 9,
                    ..key("1.2.3.4:1", "5.6.7.8:2", PROTO_TCP, fwd)
                },
                value(1, 2, "10.244.1.5:8080", None, 0, 10),
            ),
        ]
    }

    #[test]
    fn pairs_forward_and_reply_entries() {
        let (_, view) = fixture();
        let t = conntrack::flows(&entries(), &view.meta, NOW);
        assert_eq!(t.unreadable_entries, 1);
        let rows: Vec<(&str, &str, &str, Option<&str>, &str)> = t
            .flows
            .iter()
            .map(|f| {
                (
                    f.client.as_str(),
                    f.frontend.as_str(),
                    f.backend.as_str(),
                    f.snat.as_deref(),
                    f.direction,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (
                    "198.51.100.9:50000",
                    "192.168.1.20:30080",
                    "10.244.2.9:8080",
                    Some("192.168.1.20:61000"),
                    "both"
                ),
                (
                    "198.51.100.10:50001",
                    "192.168.1.20:30080",
                    "10.244.3.2:8080",
                    Some("192.168.1.20:61001"),
                    "reply"
                ),
                (
                    "203.0.113.7:40000",
                    "192.168.1.20:30080",
                    "10.244.1.5:8080",
                    None,
                    "both"
                ),
                (
                    "[2001:db8::5]:5353",
                    "[2001:db8::100]:53",
                    "[fd00:244::7]:53",
                    None,
                    "forward"
                ),
            ]
        );
        // Sorted by protocol, frontend, then client address (numerically).
        let snat = &t.flows[0];
        assert_eq!(snat.flags, vec!["snat", "closing", "seen-reply"]);
        assert_eq!(snat.forward_expires_in_seconds, Some(9.0));
        assert_eq!(snat.service.as_deref(), Some("web"));
        let v6 = &t.flows[3];
        assert_eq!(v6.forward_expires_in_seconds, Some(-3.0));
        assert_eq!(v6.reply_expires_in_seconds, None);
        assert_eq!(v6.service, None);
    }

    #[test]
    fn conntrack_text_golden() {
        let (_, view) = fixture();
        let t = conntrack::flows(&entries(), &view.meta, NOW);
        let mut out = conntrack::render_text(&t);
        out.push('\n');
        out.push_str(&conntrack::render_text(&conntrack::flows(
            &[],
            &view.meta,
            NOW,
        )));
        golden("conntrack.txt", &out);
    }

    #[test]
    fn conntrack_json_golden() {
        let (_, view) = fixture();
        let t = conntrack::flows(&entries(), &view.meta, NOW);
        golden("conntrack.json", &conntrack::render_json(&t).expect("json"));
        let y: serde_json::Value =
            serde_yaml::from_str(&conntrack::render_yaml(&t).expect("yaml")).expect("yaml");
        let j: serde_json::Value =
            serde_json::from_str(&conntrack::render_json(&t).expect("json")).expect("json");
        assert_eq!(y, j, "yaml and json carry the same document");
    }
}

/// `trace --external` over the list fixture's external frontends plus a few more, with
/// the external path's own maps (node addresses, conntrack, affinity, config) in memory.
mod external_trace {
    use std::{collections::HashMap, net::IpAddr};

    use svc_lb_common::{
        AffinityExtKey, AffinityKey, AffinityValue, Backend, CT_DIR_FORWARD, CT_FLAG_SNAT, CtKey,
        CtValue, ExtConfig, FAMILY_V4, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SVC_FLAG_AFFINITY,
        SvcValue, maglev::flow_hash,
    };

    use super::{BACKENDS, fixture, golden, ip};
    use crate::{
        datapath::{
            MapStore,
            codec::{FrontendMeta, SvcKey, addr_words, port_be},
            fake::{FAKE_MAGLEV_SIZE, FakeMaps},
        },
        inspect::{
            exttrace::{self, ExtTrace, ExtTraceMaps, ExtTraceRequest},
            trace::TraceMaps,
            view::DatapathView,
        },
        model::{BackendAddr, FrontendKey, ServiceRef},
        plan::{BackendEntry, Op},
    };

    const SEC: u64 = 1_000_000_000;
    const NOW: u64 = 90_000 * SEC;
    /// The node's address: it serves NodePorts and is the SNAT source.
    const NODE: &str = "192.168.1.20";

    struct ExtFake {
        maps: FakeMaps,
        view: DatapathView,
        node_addrs: Vec<IpAddr>,
        ct: HashMap<CtKey, CtValue>,
        aff: HashMap<AffinityExtKey, AffinityValue>,
        members: Vec<(u32, u32)>,
        config: Option<ExtConfig>,
    }

    impl TraceMaps for ExtFake {
        fn svc(&self, key: &SvcKey) -> anyhow::Result<Option<SvcValue>> {
            TraceMaps::svc(&self.maps, key)
        }
        fn backend(&self, id: u32) -> anyhow::Result<Option<Backend>> {
            TraceMaps::backend(&self.maps, id)
        }
        fn meta(&self, rev_nat_id: u32) -> anyhow::Result<Option<FrontendMeta>> {
            Ok(self.view.meta.get(&rev_nat_id).cloned())
        }
        fn frontends_at(&self, addr: IpAddr) -> anyhow::Result<Vec<FrontendKey>> {
            self.maps.frontends_at(addr)
        }
        fn affinity(&self, _key: &AffinityKey) -> anyhow::Result<Option<AffinityValue>> {
            Ok(None)
        }
        fn affinity_member(&self, backend_id: u32, rev_nat_id: u32) -> anyhow::Result<bool> {
            Ok(self.members.contains(&(backend_id, rev_nat_id)))
        }
    }

    impl ExtTraceMaps for ExtFake {
        fn is_node_addr(&self, addr: IpAddr) -> anyhow::Result<bool> {
            Ok(self.node_addrs.contains(&addr))
        }
        fn node_addrs(&self) -> anyhow::Result<Vec<IpAddr>> {
            Ok(self.node_addrs.clone())
        }
        // The kernel's LPM answer: some range of the frontend contains the source.
        fn src_allowed(&self, rev_nat_id: u32, src: IpAddr) -> anyhow::Result<bool> {
            Ok(self
                .maps
                .src_ranges()
                .iter()
                .any(|(id, net)| *id == rev_nat_id && net.contains(&src)))
        }
        fn src_ranges(&self, rev_nat_id: u32) -> anyhow::Result<Vec<ipnet::IpNet>> {
            Ok(self
                .maps
                .src_ranges()
                .iter()
                .filter(|(id, _)| *id == rev_nat_id)
                .map(|(_, n)| *n)
                .collect())
        }
        fn ct(&self, key: &CtKey) -> anyhow::Result<Option<CtValue>> {
            Ok(self.ct.get(key).copied())
        }
        fn affinity_ext(&self, key: &AffinityExtKey) -> anyhow::Result<Option<AffinityValue>> {
            Ok(self.aff.get(key).copied())
        }
        fn maglev_table(&self, rev_nat_id: u32) -> anyhow::Result<Option<Vec<u32>>> {
            Ok(self.maps.maglev().get(&rev_nat_id).cloned())
        }
        fn ext_config(&self) -> anyhow::Result<Option<ExtConfig>> {
            Ok(self.config)
        }
    }

    fn backend_addr(id: u32) -> BackendAddr {
        let b = BACKENDS
            .iter()
            .find(|b| b.0 == id)
            .expect("fixture backend");
        BackendAddr {
            addr: ip(b.1),
            port: b.2,
            proto: b.3,
        }
    }

    /// Adds an external frontend in the planner's order (backends, slots, table, master).
    fn add_frontend(
        maps: &mut FakeMaps,
        view: &mut DatapathView,
        (addr, port, proto): (&str, u16, u8),
        rev_nat_id: u32,
        name: &str,
        backends: &[u32],
        (flags, timeout): (u16, u32),
    ) {
        let fe = FrontendKey {
            addr: ip(addr),
            port,
            proto,
            scope: SCOPE_EXTERNAL,
        };
        let mut apply = |op: Op| maps.apply(&op).expect("fixture op");
        apply(Op::UpsertRevNat {
            id: rev_nat_id,
            frontend: fe,
        });
        for (i, id) in backends.iter().enumerate() {
            apply(Op::UpsertSlot {
                frontend: fe,
                slot: i as u16 + 1,
                backend_id: *id,
            });
        }
        if !backends.is_empty() {
            apply(Op::UpsertMaglev {
                rev_nat_id,
                backends: backends.iter().map(|id| (*id, backend_addr(*id))).collect(),
            });
        }
        apply(Op::UpsertMaster {
            frontend: fe,
            count: backends.len() as u32,
            rev_nat_id,
            flags,
            affinity_timeout_s: timeout,
        });
        view.meta.insert(
            rev_nat_id,
            FrontendMeta {
                service: ServiceRef {
                    namespace: "shop".into(),
                    name: name.into(),
                },
                port_name: "http".to_owned(),
                kind: svc_lb_common::KIND_LOAD_BALANCER,
                flags: 0,
            },
        );
    }

    /// The list fixture (NodePort 30080 Local → backend 1; LB 192.0.2.10:80 with source
    /// ranges 203.0.113.0/24 → backends 1, 2; IPv6 NodePort 30053/UDP dropped for no
    /// local endpoint) with backend 1 on this node, plus an LB IP with ClientIP
    /// affinity (rev-NAT 10) and one with no endpoints (rev-NAT 11).
    fn ext_fixture() -> ExtFake {
        let (mut maps, mut view) = fixture();
        maps.apply(&Op::UpsertBackend {
            id: 1,
            backend: BackendEntry {
                addr: backend_addr(1),
                state: svc_lb_common::BACKEND_ACTIVE,
                local: true,
            },
        })
        .expect("backend 1 local");
        add_frontend(
            &mut maps,
            &mut view,
            ("192.0.2.20", 443, PROTO_TCP),
            10,
            "sticky",
            &[4, 5],
            (SVC_FLAG_AFFINITY, 100),
        );
        add_frontend(
            &mut maps,
            &mut view,
            ("192.0.2.30", 80, PROTO_TCP),
            11,
            "empty",
            &[],
            (0, 0),
        );
        ExtFake {
            maps,
            view,
            node_addrs: vec![ip(NODE)],
            ct: HashMap::new(),
            aff: HashMap::new(),
            members: vec![(4, 10), (5, 10)],
            config: Some(ExtConfig {
                snat4_be: addr_words(ip(NODE))[0],
                snat6_be: [0; 4],
                maglev_size: FAKE_MAGLEV_SIZE,
                flags: 0,
                _pad: 0,
                snat_port_min: 0,
                snat_port_max: 0,
                reject_rate: 0,
                reject_burst: 0,
                _pad2: 0,
            }),
        }
    }

    fn req(from: &str, to: &str, proto: u8) -> ExtTraceRequest {
        ExtTraceRequest {
            from: from.parse().expect("from"),
            to: to.parse().expect("to"),
            proto,
            now_ns: NOW,
            pod: false,
        }
    }

    fn run(m: &ExtFake, from: &str, to: &str, proto: u8) -> ExtTrace {
        exttrace::trace(m, &req(from, to, proto)).expect("trace")
    }

    fn fwd_key(from: &str, to: &str, proto: u8) -> CtKey {
        let r = req(from, to, proto);
        CtKey {
            saddr_be: addr_words(r.from.ip()),
            daddr_be: addr_words(r.to.ip()),
            sport_be: port_be(r.from.port()),
            dport_be: port_be(r.to.port()),
            proto,
            family: FAMILY_V4,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        }
    }

    /// The backend the Maglev model picks: `table[flow_hash % size]` of the fake's
    /// table, built by the agent's populate from the backends' addresses.
    fn maglev_pick(m: &ExtFake, rev_nat_id: u32, from: &str, dport: u16, proto: u8) -> u32 {
        let from: std::net::SocketAddr = from.parse().expect("from");
        let h = flow_hash(
            &addr_words(from.ip()),
            port_be(from.port()),
            port_be(dport),
            proto,
        );
        m.maps.maglev()[&rev_nat_id][(h % FAKE_MAGLEV_SIZE) as usize]
    }

    #[test]
    fn pod_path_serves_cluster_ips_with_dnat_hairpin_and_a_tcp_reset() {
        let m = ext_fixture();
        let pod = |from: &str, to: &str, proto| {
            let r = ExtTraceRequest {
                pod: true,
                ..req(from, to, proto)
            };
            exttrace::trace(&m, &r).expect("trace")
        };
        // A cluster IP is no external frontend, but the pod path serves it: DNAT only.
        let t = run(&m, "10.244.1.9:40000", "10.96.0.10:80", PROTO_TCP);
        assert_eq!(t.verdict.action, "pass");
        let t = pod("10.244.1.9:40000", "10.96.0.10:80", PROTO_TCP);
        assert!(t.programs.contains("svclb_pod_in"), "{}", t.programs);
        assert_eq!(t.verdict.action, "forward");
        assert!(!t.verdict.nat.as_ref().expect("nat").snat);
        // Hairpin: the pod at backend 1's address, on a source port that picks it.
        let mut hairpins = 0;
        for port in 40000..40200 {
            let t = pod(&format!("10.244.1.5:{port}"), "10.96.0.10:80", PROTO_TCP);
            let b = t.verdict.backend.as_ref().expect("backend");
            let nat = t.verdict.nat.as_ref().expect("nat");
            if b.address == "10.244.1.5" {
                hairpins += 1;
                assert!(nat.snat, "hairpin rewrites the source");
                assert_eq!(nat.source_address.as_deref(), Some("10.96.0.10"));
                assert!(exttrace::render_text(&t).contains("hairpin"));
            } else {
                assert!(!nat.snat, "DNAT only to another pod");
            }
        }
        assert!(
            hairpins > 0,
            "no source port picked the client's own backend"
        );
        // No endpoints: TCP gets a RST.
        let t = pod("10.244.1.9:40000", "10.96.0.30:80", PROTO_TCP);
        assert_eq!(t.verdict.action, "reject");
        let text = exttrace::render_text(&t);
        assert!(text.contains("TCP RST"), "{text}");
    }

    #[test]
    fn nodeport_matches_node_addresses_only() {
        let m = ext_fixture();
        let t = run(&m, "198.51.100.7:40000", "192.168.1.20:30080", PROTO_TCP);
        let fe = t.frontend.as_ref().expect("frontend");
        assert_eq!(
            (
                fe.address.as_str(),
                fe.node_address.as_deref(),
                fe.rev_nat_id
            ),
            ("0.0.0.0", Some(NODE), 7)
        );
        assert_eq!(fe.external_traffic_policy, "Local");
        assert_eq!(t.verdict.action, "forward");
        let b = t.verdict.backend.as_ref().expect("backend");
        assert_eq!((b.id, b.via, b.local), (1, "maglev", true));
        let nat = t.verdict.nat.as_ref().expect("nat");
        assert!(!nat.snat, "Local policy preserves the client address");
        assert_eq!(nat.why, "externalTrafficPolicy Local");
        // The same port on an address that is not the node's: not a frontend.
        let t = run(&m, "198.51.100.7:40000", "192.168.1.99:30080", PROTO_TCP);
        assert_eq!(t.verdict.action, "pass");
        assert!(t.frontend.is_none());
        let text = exttrace::render_text(&t);
        assert!(
            text.contains("30080 is a NodePort, but 192.168.1.99 is not a node address"),
            "{text}"
        );
    }

    #[test]
    fn maglev_backend_follows_the_source_port_and_snat_is_reported() {
        let m = ext_fixture();
        let mut seen = std::collections::BTreeSet::new();
        let mut checked = 0;
        for port in 41_000u16..41_040 {
            let from = format!("203.0.113.5:{port}");
            let t = run(&m, &from, "192.0.2.10:80", PROTO_TCP);
            let want = maglev_pick(&m, 8, &from, 80, PROTO_TCP);
            let b = t.verdict.backend.as_ref().expect("backend");
            assert_eq!((b.id, b.via), (want, "maglev"), "source port {port}");
            let mg = t.maglev.as_ref().expect("maglev");
            assert_eq!(mg.index, Some(t.flow_hash % FAKE_MAGLEV_SIZE));
            assert_eq!(mg.backend_id, Some(want));
            let nat = t.verdict.nat.as_ref().expect("nat");
            if want == 1 {
                assert!(!nat.snat && nat.why == "backend on this node");
            } else {
                assert!(nat.snat && nat.source_address.as_deref() == Some(NODE));
                // 41000 is in the ephemeral range: a pseudo-random SNAT port.
                assert_eq!(nat.source_port, None);
            }
            seen.insert(want);
            checked += 1;
        }
        assert_eq!(checked, 40);
        assert_eq!(
            seen,
            [1, 2].into(),
            "40 source ports spread over both backends"
        );
        // A client port inside the SNAT range (the default 61000-65535 here) is kept when
        // free.
        let port = (61_000u16..62_000)
            .find(|p| maglev_pick(&m, 8, &format!("203.0.113.5:{p}"), 80, PROTO_TCP) == 2)
            .expect("a port that hashes to the remote backend");
        let t = run(
            &m,
            &format!("203.0.113.5:{port}"),
            "192.0.2.10:80",
            PROTO_TCP,
        );
        assert_eq!(
            t.verdict.nat.as_ref().and_then(|n| n.source_port),
            Some(port)
        );
    }

    #[test]
    fn source_ranges_drop_outside_sources_before_anything_else() {
        let m = ext_fixture();
        let t = run(&m, "198.51.100.7:40000", "192.0.2.10:80", PROTO_TCP);
        assert_eq!(t.verdict.action, "drop");
        assert_eq!(t.verdict.reason, Some("ext_dropped_source_range"));
        let sr = t.source_ranges.expect("source ranges");
        assert_eq!(
            (sr.ranges, sr.allowed),
            (vec!["203.0.113.0/24".to_owned()], false)
        );
        assert!(t.maglev.is_none(), "no Maglev lookup for a filtered source");
        let t = run(&m, "203.0.113.9:40000", "192.0.2.10:80", PROTO_TCP);
        assert!(t.source_ranges.expect("source ranges").allowed);
        assert_eq!(t.verdict.action, "forward");
    }

    #[test]
    fn no_endpoints_rejects_and_no_local_endpoint_drops() {
        let m = ext_fixture();
        let t = run(&m, "198.51.100.7:40000", "192.0.2.30:80", PROTO_TCP);
        assert_eq!(
            (t.verdict.action, t.verdict.reason),
            ("reject", Some("ext_rejected_no_backend"))
        );
        let mut m = m;
        m.node_addrs.push(ip("fd00::20"));
        let t = run(&m, "[2001:db8::5]:5353", "[fd00::20]:30053", PROTO_UDP);
        assert_eq!(
            (t.verdict.action, t.verdict.reason),
            ("drop", Some("ext_dropped_no_local_endpoint"))
        );
    }

    #[test]
    fn conntrack_keeps_an_established_flow_until_its_backend_goes() {
        let mut m = ext_fixture();
        let (from, to) = ("203.0.113.5:41000", "192.0.2.10:80");
        let other = 3 - maglev_pick(&m, 8, from, 80, PROTO_TCP);
        let b = backend_addr(other);
        let entry = |backend_id: u32, addr: IpAddr, ttl_s: i64| CtValue {
            expires_ns: NOW.saturating_add_signed(ttl_s * SEC as i64),
            backend_id,
            rev_nat_id: 8,
            nat_addr_be: addr_words(addr),
            snat_addr_be: addr_words(ip(NODE)),
            nat_port_be: port_be(b.port),
            snat_port_be: port_be(61_234),
            flags: CT_FLAG_SNAT,
            _pad: [0; 3],
        };
        m.ct.insert(fwd_key(from, to, PROTO_TCP), entry(other, b.addr, 100));
        let t = run(&m, from, to, PROTO_TCP);
        let chosen = t.verdict.backend.as_ref().expect("backend");
        assert_eq!((chosen.id, chosen.via), (other, "conntrack"));
        let nat = t.verdict.nat.as_ref().expect("nat");
        assert_eq!(
            (nat.source_address.as_deref(), nat.source_port),
            (Some(NODE), Some(61_234))
        );
        assert_eq!(t.conntrack.as_ref().map(|c| c.state), Some("established"));
        // Expired, or the id names another address now: Maglev chooses anew.
        for (e, state) in [
            (entry(other, b.addr, -5), "expired"),
            (entry(other, ip("10.9.9.9"), 100), "backend_gone"),
        ] {
            m.ct.insert(fwd_key(from, to, PROTO_TCP), e);
            let t = run(&m, from, to, PROTO_TCP);
            assert_eq!(t.conntrack.as_ref().map(|c| c.state), Some(state));
            assert_eq!(t.verdict.backend.as_ref().map(|b| b.via), Some("maglev"));
        }
    }

    #[test]
    fn external_affinity_is_keyed_by_source_address() {
        let mut m = ext_fixture();
        let from = "198.51.100.7:40000";
        let maglev = maglev_pick(&m, 10, from, 443, PROTO_TCP);
        let remembered = if maglev == 4 { 5 } else { 4 };
        let key = AffinityExtKey {
            addr_be: addr_words(ip("198.51.100.7")),
            rev_nat_id: 10,
            family: FAMILY_V4,
            _pad: [0; 3],
        };
        m.aff.insert(
            key,
            AffinityValue {
                last_used_ns: NOW - 30 * SEC,
                backend_id: remembered,
                _pad: 0,
            },
        );
        let t = run(&m, from, "192.0.2.20:443", PROTO_TCP);
        let b = t.verdict.backend.as_ref().expect("backend");
        assert_eq!((b.id, b.via), (remembered, "affinity"));
        assert!(t.affinity.as_ref().is_some_and(|a| a.used));
        // Another source port of the same client: still the remembered backend.
        let t = run(&m, "198.51.100.7:40001", "192.0.2.20:443", PROTO_TCP);
        assert_eq!(t.verdict.backend.as_ref().map(|b| b.id), Some(remembered));
        // Expired: Maglev.
        m.aff.get_mut(&key).expect("entry").last_used_ns = NOW - 101 * SEC;
        let t = run(&m, from, "192.0.2.20:443", PROTO_TCP);
        let b = t.verdict.backend.as_ref().expect("backend");
        assert_eq!((b.id, b.via), (maglev, "maglev"));
        assert!(t.affinity.as_ref().is_some_and(|a| !a.used));
    }

    #[test]
    fn no_snat_address_drops_flows_to_remote_backends() {
        let mut m = ext_fixture();
        m.config = m.config.map(|c| ExtConfig { snat4_be: 0, ..c });
        let port = (41_000u16..42_000)
            .find(|p| maglev_pick(&m, 8, &format!("203.0.113.5:{p}"), 80, PROTO_TCP) == 2)
            .expect("a port that hashes to the remote backend");
        let t = run(
            &m,
            &format!("203.0.113.5:{port}"),
            "192.0.2.10:80",
            PROTO_TCP,
        );
        assert_eq!(
            (t.verdict.action, t.verdict.reason),
            ("drop", Some("ext_dropped_no_snat_address"))
        );
    }

    #[test]
    fn trace_external_text_golden() {
        let mut m = ext_fixture();
        let from_local = (41_000u16..42_000)
            .find(|p| maglev_pick(&m, 8, &format!("203.0.113.5:{p}"), 80, PROTO_TCP) == 1)
            .expect("port");
        let from_remote = (1_000u16..2_000)
            .find(|p| maglev_pick(&m, 8, &format!("203.0.113.5:{p}"), 80, PROTO_TCP) == 2)
            .expect("port");
        let established = "203.0.113.6:50000";
        m.ct.insert(
            fwd_key(established, "192.0.2.10:80", PROTO_TCP),
            CtValue {
                expires_ns: NOW + 21_000 * SEC,
                backend_id: 2,
                rev_nat_id: 8,
                nat_addr_be: addr_words(ip("10.244.2.9")),
                snat_addr_be: addr_words(ip(NODE)),
                nat_port_be: port_be(8080),
                snat_port_be: port_be(61_500),
                flags: CT_FLAG_SNAT | svc_lb_common::CT_FLAG_SEEN_REPLY,
                _pad: [0; 3],
            },
        );
        m.node_addrs.push(ip("fd00::20"));
        let mut out = String::new();
        for (from, to, proto) in [
            (
                "198.51.100.7:40000".to_owned(),
                "192.168.1.20:30080",
                PROTO_TCP,
            ),
            (
                format!("203.0.113.5:{from_local}"),
                "192.0.2.10:80",
                PROTO_TCP,
            ),
            (
                format!("203.0.113.5:{from_remote}"),
                "192.0.2.10:80",
                PROTO_TCP,
            ),
            ("198.51.100.7:40000".to_owned(), "192.0.2.10:80", PROTO_TCP),
            (established.to_owned(), "192.0.2.10:80", PROTO_TCP),
            ("198.51.100.7:40000".to_owned(), "192.0.2.30:80", PROTO_TCP),
            ("198.51.100.7:40000".to_owned(), "192.0.2.20:443", PROTO_TCP),
            (
                "[2001:db8::5]:5353".to_owned(),
                "[fd00::20]:30053",
                PROTO_UDP,
            ),
            (
                "198.51.100.7:40000".to_owned(),
                "192.168.1.99:30080",
                PROTO_TCP,
            ),
            (
                "198.51.100.7:40000".to_owned(),
                "192.168.1.20:30081",
                PROTO_TCP,
            ),
        ] {
            out.push_str(&exttrace::render_text(&run(&m, &from, to, proto)));
            out.push('\n');
        }
        golden("trace-external.txt", &out);
    }

    #[test]
    fn trace_external_json_field_names_are_stable() {
        let m = ext_fixture();
        let t = run(&m, "203.0.113.5:41000", "192.0.2.10:80", PROTO_TCP);
        let v = serde_json::to_value(&t).expect("json");
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
            k.sort_unstable();
            k
        };
        assert_eq!(
            keys(&v),
            [
                "affinity",
                "candidates",
                "client",
                "conntrack",
                "destination",
                "flow_hash",
                "frontend",
                "maglev",
                "programs",
                "protocol",
                "source_ranges",
                "steps",
                "verdict"
            ]
        );
        assert_eq!(keys(&v["verdict"]), ["action", "backend", "nat", "reason"]);
        assert_eq!(
            keys(&v["verdict"]["backend"]),
            ["address", "id", "local", "port", "state", "via"]
        );
        assert_eq!(
            keys(&v["candidates"][0]),
            ["address", "backend_id", "local", "port", "slot", "state"]
        );
        let y: serde_json::Value =
            serde_yaml::from_str(&serde_yaml::to_string(&t).expect("yaml")).expect("yaml");
        assert_eq!(y, v, "yaml and json carry the same document");
    }

    #[test]
    fn cli_parses_trace_external() {
        use clap::Parser;

        use crate::cli::{Cli, Command, TraceFrom};
        let c = Cli::try_parse_from([
            "svc-lb",
            "trace",
            "--external",
            "--from",
            "[2001:db8::5]:5353",
            "--to",
            "[fd00::20]:30053",
            "--proto",
            "udp",
            "-o",
            "json",
        ])
        .expect("trace --external");
        match c.command {
            Command::Trace { external, from, .. } => {
                assert!(external);
                assert_eq!(
                    from,
                    Some(TraceFrom {
                        addr: ip("2001:db8::5"),
                        port: Some(5353)
                    })
                );
            }
            other => panic!("{other:?}"),
        }
        // --from stays an address for the socket path.
        let c = Cli::try_parse_from([
            "svc-lb",
            "trace",
            "--to",
            "10.0.0.1:80",
            "--from",
            "10.1.1.1",
        ])
        .expect("trace");
        assert!(matches!(
            c.command,
            Command::Trace {
                from: Some(TraceFrom { port: None, .. }),
                external: false,
                ..
            }
        ));
        // --external needs --from, and has no use for a network namespace.
        assert!(
            Cli::try_parse_from(["svc-lb", "trace", "--external", "--to", "10.0.0.1:80"]).is_err()
        );
        assert!(
            Cli::try_parse_from([
                "svc-lb",
                "trace",
                "--external",
                "--from",
                "1.2.3.4:5",
                "--to",
                "10.0.0.1:80",
                "--netns",
                "/x"
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from(["svc-lb", "trace", "--to", "10.0.0.1:80", "--from", "nope"])
                .is_err()
        );
    }
}

#[test]
fn list_names_the_pool_and_the_announcing_node_of_load_balancer_addresses() {
    use crate::status::{L2Announcer, LbAddress, LbStatus};
    let (_, view) = fixture();
    let mut all = list::entries(&view, None);
    list::set_pools(
        &mut all,
        &LbStatus {
            addresses: vec![LbAddress {
                service: "shop/web".into(),
                ip: "192.0.2.10".into(),
                pool: "edge".into(),
            }],
            ..Default::default()
        },
    );
    let node = |n: Option<&str>| L2Announcer {
        ip: "192.0.2.10".into(),
        service: "shop/web".into(),
        node: n.map(str::to_owned),
    };
    list::set_announcers(&mut all, &[node(Some("node-2"))]);
    let lb = all
        .iter()
        .find(|e| e.address == "192.0.2.10")
        .expect("the LoadBalancer entry");
    assert_eq!(lb.pool.as_deref(), Some("edge"));
    assert_eq!(lb.announced_by, Some(Some("node-2".to_owned())));
    let text = list::render_text(&all);
    let line = text
        .lines()
        .find(|l| l.contains("192.0.2.10:80"))
        .expect("the line");
    assert!(line.contains("pool=edge,l2=node-2"), "{line}");
    let json: serde_json::Value =
        serde_json::from_str(&list::render_json(&all).expect("json")).expect("parse");
    let e = json
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["address"] == "192.0.2.10")
        .expect("the entry");
    assert_eq!(
        (e["pool"].as_str(), e["announced_by"].as_str()),
        (Some("edge"), Some("node-2"))
    );
    // Other entries carry neither field.
    let other = json
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["address"] != "192.0.2.10");
    assert!(other.is_some_and(|o| o.get("announced_by").is_none() && o.get("pool").is_none()));

    // No live eligible node: JSON null, "l2=none" in the text.
    list::set_announcers(&mut all, &[node(None)]);
    let text = list::render_text(&all);
    assert!(text.contains("pool=edge,l2=none"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&list::render_json(&all).expect("json")).expect("parse");
    let e = json
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["address"] == "192.0.2.10")
        .expect("the entry");
    assert!(
        e.get("announced_by")
            .is_some_and(serde_json::Value::is_null),
        "{e}"
    );
}

#[test]
fn status_shows_which_node_announces_each_address_and_where_this_one_answers() {
    use crate::status::L2Announcer;
    let a = |ip: &str, node: Option<&str>| L2Announcer {
        ip: ip.into(),
        service: "shop/web".into(),
        node: node.map(str::to_owned),
    };
    let text = super::status::render_l2(
        &[
            a("192.0.2.1", Some("node-1")),
            a("192.0.2.10", Some("node-2")),
            a("2001:db8::1", None),
        ],
        &["192.0.2.1 on eth0".into(), "192.0.2.1 on eth1".into()],
    );
    assert!(
        text.contains("L2 announcement: this node answers for 1 of 3 addresses"),
        "{text}"
    );
    let line = |ip: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(ip))
            .unwrap_or_else(|| panic!("{ip} missing in {text}"))
            .to_owned()
    };
    assert!(
        line("192.0.2.1").contains("node-1") && line("192.0.2.1").ends_with("eth0,eth1"),
        "{text}"
    );
    // 192.0.2.10 is not "192.0.2.1 on ...": a prefix of another address is no match.
    assert!(line("192.0.2.10").trim_end().ends_with('-'), "{text}");
    assert!(
        line("2001:db8::1").contains("(no live eligible node)"),
        "{text}"
    );
}

/// Draining backends (weight 0: entries no slot names) are listed, weight 0 and with
/// their live counts, under the frontends their connections link them to: 10.244.4.4
/// under web:http's ClusterIP (a socket-path connection, rev-NAT 1) and its
/// LoadBalancer (a conntrack flow, rev-NAT 8); 10.244.5.5, linked to no frontend, is
/// named by the text's footer only. A draining UDP backend is not linked to a TCP
/// frontend by its address.
#[test]
fn list_shows_draining_backends_under_the_frontends_of_their_connections() {
    let (mut maps, mut view) = fixture();
    let drained = |addr: &str, proto: u8| BackendEntry {
        addr: BackendAddr {
            addr: ip(addr),
            port: 8080,
            proto,
        },
        state: svc_lb_common::BACKEND_DRAINING,
        local: false,
    };
    for (id, addr, proto) in [
        (10, "10.244.4.4", PROTO_TCP),
        (11, "10.244.5.5", PROTO_TCP),
        (12, "10.244.4.4", PROTO_UDP),
    ] {
        maps.apply(&Op::UpsertBackend {
            id,
            backend: drained(addr, proto),
        })
        .expect("draining backend");
    }
    view.state = maps.read_current().expect("read back");
    let b10 = drained("10.244.4.4", PROTO_TCP).addr;
    view.traffic = Some(
        [(
            svc_lb_common::TrafficKey {
                rev_nat_id: 1,
                backend: crate::inspect::view::conn_key(&b10),
            },
            svc_lb_common::TrafficCount::default(),
        )]
        .into_iter()
        .collect(),
    );
    view.ext_pairs = [(8, 10), (4, 12)].into_iter().collect();
    // The socket path's counts of 10.244.4.4:8080 (one long-lived connection) and one
    // established external flow.
    if let Some(open) = view.open_conns.as_mut() {
        open.insert(crate::inspect::view::conn_key(&b10), (1, 0));
    }
    view.ext_conns.insert(10, (1, 0));

    let all = list::entries(&view, None);
    let of = |addr: &str, port: u16| -> Vec<(u32, &'static str, u32, Option<u64>)> {
        all.iter()
            .find(|e| e.address == addr && e.port == port)
            .unwrap_or_else(|| panic!("{addr}:{port} not listed"))
            .backends
            .iter()
            .map(|b| (b.id, b.state, b.weight, b.active_connections))
            .collect()
    };
    let draining = |v: Vec<(u32, &'static str, u32, Option<u64>)>| -> Vec<(u32, &'static str, u32, Option<u64>)> {
        v.into_iter().filter(|b| b.1 == "draining").collect()
    };
    assert_eq!(
        draining(of("10.96.0.10", 80)),
        vec![(10, "draining", 0, Some(2))]
    );
    assert_eq!(
        draining(of("192.0.2.10", 80)),
        vec![(10, "draining", 0, Some(2))]
    );
    // After the slotted backends, which are unchanged.
    assert_eq!(of("10.96.0.10", 80).len(), 4);
    assert_eq!(of("10.96.0.10", 80)[3].0, 10);
    // The UDP frontend with a flow to the UDP draining backend lists it; nothing else
    // lists a draining backend.
    assert_eq!(
        draining(of("10.96.0.53", 53)),
        vec![(12, "draining", 0, Some(0))]
    );
    for e in &all {
        if ![("10.96.0.10", 80), ("192.0.2.10", 80), ("10.96.0.53", 53)]
            .contains(&(e.address.as_str(), e.port))
        {
            assert!(
                e.backends.iter().all(|b| b.state != "draining"),
                "{}:{} lists a draining backend",
                e.address,
                e.port
            );
        }
    }
    let footer = list::unlisted_draining(&view, &all);
    assert_eq!(
        footer,
        "draining, without connections through any frontend listed: 10.244.5.5:8080/TCP\n"
    );
    golden("list-draining.txt", &(list::render_text(&all) + &footer));
    let json = list::render_json(&all).expect("json");
    let v: serde_json::Value = serde_json::from_str(&json).expect("parse");
    let web = v
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["address"] == "10.96.0.10")
        .expect("web");
    let d = &web["backends"][3];
    assert_eq!(
        (
            &d["state"],
            &d["weight"],
            &d["active_connections"],
            &d["shared"]
        ),
        (
            &serde_json::json!("draining"),
            &serde_json::json!(0),
            &serde_json::json!(2),
            &serde_json::json!(true)
        ),
        "{d}"
    );
    let yaml = list::render_yaml(&all).expect("yaml");
    assert!(yaml.contains("state: draining"), "{yaml}");
    // The metrics name the Service of a draining backend as `list` links it.
    let text = metrics::render(ScrapeData {
        view: Some(view.clone()),
        ..Default::default()
    })
    .expect("render");
    let line = r#"svclb_backend_active_connections{namespace="shop",service="web",backend="10.244.4.4:8080/TCP"} 2"#;
    assert!(text.contains(line), "missing {line:?} in:\n{text}");
    // A frontend whose every backend drains takes no new connection: the text says so
    // above the draining lines.
    let only: Vec<list::ListEntry> = all
        .iter()
        .filter(|e| e.address == "10.96.0.10")
        .cloned()
        .map(|mut e| {
            e.backends.retain(|b| b.state == "draining");
            e
        })
        .collect();
    let text = list::render_text(&only);
    assert!(
        text.contains("(no backends: connections are refused)") && text.contains("draining"),
        "{text}"
    );
}

/// The fixture with traffic counts: web:http (rev-NAT 1) closed 3 connections through
/// backend 1 and 1 through backend 2, cart (rev-NAT 3) 2 through backend 4; the
/// external path's conntrack holds 12 packets (900 bytes) in and 10 (4000 bytes) out of
/// the NodePort 30080 (rev-NAT 7) to backend 1, one of its flows over; dns (rev-NAT 4,
/// UDP) sent 40 unconnected datagrams to backend 6.
fn with_traffic(view: &mut DatapathView) {
    let key = |rev_nat_id: u32, id: u32| {
        let b = BACKENDS.iter().find(|b| b.0 == id).expect("backend");
        svc_lb_common::TrafficKey {
            rev_nat_id,
            backend: crate::inspect::view::conn_key(&BackendAddr {
                addr: ip(b.1),
                port: b.2,
                proto: b.3,
            }),
        }
    };
    let t = |closed: u64, bytes_in: u64, bytes_out: u64| svc_lb_common::TrafficCount {
        closed,
        packets_in: closed * 5,
        packets_out: closed * 4,
        bytes_in,
        bytes_out,
    };
    view.traffic = Some(
        [
            (key(1, 1), t(3, 3000, 600)),
            (key(1, 2), t(1, 1000, 200)),
            (key(3, 4), t(2, 20, 10)),
        ]
        .into_iter()
        .collect(),
    );
    view.udp_traffic = Some(
        [(
            key(4, 6),
            svc_lb_common::TrafficCount {
                packets_in: 40,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
    );
    let k = key(7, 1);
    view.ext_traffic = Some(
        [(
            (k.rev_nat_id, k.backend, PROTO_TCP),
            svc_lb_common::TrafficCount {
                closed: 1,
                packets_in: 12,
                packets_out: 10,
                bytes_in: 900,
                bytes_out: 4000,
            },
        )]
        .into_iter()
        .collect(),
    );
}

#[test]
fn list_stats_golden_and_fields() {
    let (_, mut view) = fixture();
    with_traffic(&mut view);
    let mut all = list::entries(&view, None);
    list::set_stats(&mut all, &view);
    golden(
        "list-stats.txt",
        &list::render_counters(&all, list::Counters::Stats),
    );
    let web = all
        .iter()
        .find(|e| e.address == "10.96.0.10" && e.port == 80)
        .expect("web");
    let st = web.stats.expect("stats");
    assert_eq!(
        (
            st.connections,
            st.closed_connections,
            st.bytes_in,
            st.bytes_out
        ),
        (10, Some(4), Some(4000), Some(800))
    );
    let b1 = web.backends.iter().find(|b| b.id == 1).expect("b1");
    assert_eq!(b1.stats.and_then(|s| s.bytes_in), Some(3000));
    // A backend with no closed connection yet: 0, not unknown.
    let b3 = web.backends.iter().find(|b| b.id == 3).expect("b3");
    assert_eq!(b3.stats.and_then(|s| s.bytes_in), Some(0));
    // The external path's entries: what conntrack holds, 0 where it holds nothing
    // (the LoadBalancer IP, the UDP NodePort).
    let np = all
        .iter()
        .find(|e| e.address == "0.0.0.0" && e.port == 30080)
        .expect("nodeport");
    let st = np.stats.expect("stats");
    assert_eq!(
        (
            st.closed_connections,
            st.packets_in,
            st.packets_out,
            st.bytes_in,
            st.bytes_out
        ),
        (Some(1), Some(12), Some(10), Some(900), Some(4000))
    );
    assert_eq!(np.backends[0].stats.and_then(|s| s.bytes_out), Some(4000));
    for e in all.iter().filter(|e| e.scope == "external") {
        assert!(e.stats.expect("stats").bytes_in.is_some(), "{}", e.address);
    }
    // UDP socket entries: the datagrams sent (packets in), everything else unknown,
    // never 0.
    let dns = all
        .iter()
        .find(|e| e.protocol == "UDP" && e.scope != "external")
        .expect("dns");
    let unmeasured =
        |s: list::Stats| (s.closed_connections, s.packets_out, s.bytes_in, s.bytes_out);
    let st = dns.stats.expect("stats");
    assert_eq!(st.packets_in, Some(40));
    assert_eq!(unmeasured(st), (None, None, None, None));
    assert_eq!(dns.backends.len(), 1);
    let b6 = dns.backends[0].stats.expect("stats");
    assert_eq!(b6.packets_in, Some(40));
    assert_eq!(unmeasured(b6), (None, None, None, None));
    let text = list::render_counters(&all, list::Counters::Stats);
    assert!(text.contains("unconnected datagrams sent"), "{text}");
    // Without the traffic map (pins of an older agent): unknown.
    let mut no_map = view.clone();
    no_map.udp_traffic = None;
    let mut old = list::entries(&no_map, None);
    list::set_stats(&mut old, &no_map);
    let dns = old
        .iter()
        .find(|e| e.protocol == "UDP" && e.scope != "external")
        .expect("dns");
    assert_eq!(dns.stats.expect("stats").packets_in, None);
    assert_eq!(dns.backends[0].stats.expect("stats").packets_in, None);
    let json = list::render_json(&all).expect("json");
    let v: serde_json::Value = serde_json::from_str(&json).expect("parse");
    let mut keys: Vec<&str> = v[0]["stats"]
        .as_object()
        .expect("stats object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "bytes_in",
            "bytes_out",
            "closed_connections",
            "connections",
            "packets_in",
            "packets_out"
        ]
    );
    assert!(v[0].get("rate").is_none());
    let mut no_ct = view.clone();
    no_ct.ext_traffic = None;
    let mut all = list::entries(&no_ct, None);
    list::set_stats(&mut all, &no_ct);
    for e in all.iter().filter(|e| e.scope == "external") {
        assert_eq!(e.stats.expect("stats").bytes_in, None, "{}", e.address);
    }
    // Without the sock_ops program (and conntrack): TCP socket entries unknown too, and
    // the text says why; UDP datagrams are still counted (the sendmsg hooks).
    view.traffic = None;
    view.ext_traffic = None;
    let mut all = list::entries(&view, None);
    list::set_stats(&mut all, &view);
    assert!(
        all.iter()
            .all(|e| e.stats.expect("stats").bytes_in.is_none())
    );
    assert!(all.iter().all(|e| {
        let counted = e.stats.expect("stats").packets_in.is_some();
        counted == (e.protocol == "UDP" && e.scope == "socket")
    }));
    let text = list::render_counters(&all, list::Counters::Stats);
    assert!(text.contains("keeps no traffic counts"), "{text}");
}

#[test]
fn list_rate_is_the_change_per_second_and_survives_resets() {
    let (_, mut view) = fixture();
    with_traffic(&mut view);
    let mut before = list::entries(&view, None);
    list::set_stats(&mut before, &view);
    // Two seconds later: web:http has 6 more connections and 2 more closed through
    // backend 1 with 4000 bytes in; cart's counts were deleted and started again.
    view.frontend_conns.insert(1, 16);
    view.backend_conns.insert(1, 13);
    if let Some(t) = view.traffic.as_mut() {
        for (k, v) in t.iter_mut() {
            if k.rev_nat_id == 1 && v.closed == 3 {
                v.closed += 2;
                v.bytes_in += 4000;
            }
            if k.rev_nat_id == 3 {
                *v = svc_lb_common::TrafficCount {
                    closed: 1,
                    bytes_in: 8,
                    ..Default::default()
                };
            }
        }
    }
    // dns sent 10 more datagrams.
    if let Some(t) = view.udp_traffic.as_mut() {
        for v in t.values_mut() {
            v.packets_in += 10;
        }
    }
    let mut after = list::entries(&view, None);
    list::set_stats(&mut after, &view);
    list::set_rate(&mut after, &before, 2.0);
    let find = |addr: &str, port: u16| {
        after
            .iter()
            .find(|e| e.address == addr && e.port == port && e.scope == "socket")
            .expect("entry")
    };
    let web = find("10.96.0.10", 80);
    let r = web.rate.expect("rate");
    assert_eq!(r.connections_per_second, 3.0);
    assert_eq!(r.bytes_in_per_second, Some(2000.0));
    assert_eq!(r.bytes_out_per_second, Some(0.0));
    let b1 = web.backends.iter().find(|b| b.id == 1).expect("b1");
    assert_eq!(b1.rate.and_then(|r| r.bytes_in_per_second), Some(2000.0));
    assert_eq!(b1.rate.map(|r| r.connections_per_second), Some(3.0));
    // Reset counters count from 0: 8 bytes over 2 s.
    let cart = find("10.96.0.20", 443);
    assert_eq!(cart.rate.and_then(|r| r.bytes_in_per_second), Some(4.0));
    // UDP: datagrams per second in, the rest unknown.
    let dns = find("10.96.0.53", 53);
    let r = dns.rate.expect("rate");
    assert_eq!(r.packets_in_per_second, Some(5.0));
    assert_eq!(
        (
            r.packets_out_per_second,
            r.bytes_in_per_second,
            r.bytes_out_per_second
        ),
        (None, None, None)
    );
    assert_eq!(
        dns.backends[0].rate.and_then(|r| r.packets_in_per_second),
        Some(5.0)
    );
    let text = list::render_counters(&after, list::Counters::Rate);
    for want in [
        "CPS",
        "InPPS",
        "OutPPS",
        "InBPS",
        "OutBPS",
        "per second over the interval",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let web_line = text
        .lines()
        .find(|l| l.contains("10.96.0.10:80"))
        .expect("web line");
    assert!(web_line.contains("2000"), "{web_line}");
}

#[test]
fn metrics_export_traffic_only_where_it_is_counted() {
    let (_, mut view) = fixture();
    let render = |view: DatapathView| {
        metrics::render(ScrapeData {
            view: Some(view),
            ..Default::default()
        })
        .expect("render")
    };
    // Without the sock_ops program: no series at all (unknown is not idle).
    let text = render(view.clone());
    assert!(!text.contains("svclb_backend_bytes"), "{text}");
    with_traffic(&mut view);
    let text = render(view);
    for line in [
        r#"svclb_frontend_bytes_total{namespace="shop",service="web",port_name="http",kind="ClusterIP",scope="socket",frontend="10.96.0.10:80/TCP",direction="in"} 4000"#,
        r#"svclb_frontend_bytes_total{namespace="shop",service="web",port_name="http",kind="ClusterIP",scope="socket",frontend="10.96.0.10:80/TCP",direction="out"} 800"#,
        r#"svclb_frontend_packets_total{namespace="shop",service="web",port_name="http",kind="ClusterIP",scope="socket",frontend="10.96.0.10:80/TCP",direction="in"} 20"#,
        r#"svclb_backend_bytes_total{namespace="shop",service="web",backend="10.244.1.5:8080/TCP",direction="in"} 3000"#,
        r#"svclb_backend_packets_total{namespace="shop",service="web",backend="10.244.1.5:8080/TCP",direction="out"} 12"#,
        // A TCP backend with nothing closed yet: 0.
        r#"svclb_backend_bytes_total{namespace="shop",service="web",backend="10.244.3.2:8080/TCP",direction="in"} 0"#,
        // UDP: the unconnected datagrams, direction in.
        r#"svclb_frontend_packets_total{namespace="kube-system",service="dns",port_name="dns",kind="ClusterIP",scope="socket",frontend="10.96.0.53:53/UDP",direction="in"} 40"#,
        r#"svclb_backend_packets_total{namespace="kube-system",service="dns",backend="10.244.0.3:53/UDP",direction="in"} 40"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // UDP: no `out` packets (replies are not counted).
    assert!(
        !text
            .lines()
            .any(|l| l.contains("/UDP") && l.contains("direction=\"out\"")),
        "{text}"
    );
    // External and UDP: no bytes series.
    for l in text
        .lines()
        .filter(|l| l.starts_with("svclb_frontend_bytes") || l.starts_with("svclb_backend_bytes"))
    {
        assert!(
            !l.contains("scope=\"external\"") && !l.contains("/UDP"),
            "{l}"
        );
    }
}

#[test]
fn metrics_export_external_traffic_from_the_totals_only() {
    let (_, mut view) = fixture();
    with_traffic(&mut view);
    let render = |view: DatapathView| {
        metrics::render(ScrapeData {
            view: Some(view),
            ..Default::default()
        })
        .expect("render")
    };
    // Live conntrack sums (no totals map): they go down, so they are no counter.
    let text = render(view.clone());
    assert!(!text.contains("_external_packets"), "{text}");
    view.ext_totals = true;
    let text = render(view);
    for line in [
        r#"svclb_backend_external_packets_total{namespace="shop",service="web",backend="10.244.1.5:8080/TCP",direction="in"} 12"#,
        r#"svclb_backend_external_bytes_total{namespace="shop",service="web",backend="10.244.1.5:8080/TCP",direction="out"} 4000"#,
        // A backend the external path never reached: 0.
        r#"svclb_backend_external_bytes_total{namespace="shop",service="web",backend="10.244.3.2:8080/TCP",direction="in"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    let fe: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("svclb_frontend_external_packets_total") && l.ends_with(" 12"))
        .collect();
    assert_eq!(fe.len(), 1, "one frontend carried 12 packets in:\n{text}");
    // The socket path's series are unchanged by the external counts.
    assert!(
        text.contains(r#"svclb_frontend_packets_total{namespace="shop",service="web",port_name="http",kind="ClusterIP",scope="socket",frontend="10.96.0.10:80/TCP",direction="in"} 20"#),
        "{text}"
    );
}

/// `LB_TRAFFIC_V1` has no protocol in its key: a TCP and a UDP frontend reaching the
/// same backend address (10.244.0.3:53, TCP and UDP DNS) keep their counts apart by
/// the frontend's rev-NAT id; entries of gone frontends are left out.
#[test]
fn traffic_is_split_by_the_protocol_of_its_frontend() {
    let (_, view) = fixture();
    let addr = |proto| {
        crate::inspect::view::conn_key(&BackendAddr {
            addr: ip("10.244.0.3"),
            port: 53,
            proto,
        })
    };
    let n = |packets_in| svc_lb_common::TrafficCount {
        packets_in,
        ..Default::default()
    };
    let key = |rev_nat_id, proto| svc_lb_common::TrafficKey {
        rev_nat_id,
        backend: addr(proto),
    };
    // rev-NAT 1: TCP web; 4: UDP dns; 99: no frontend.
    let all: HashMap<_, _> = [
        (key(1, PROTO_TCP), n(7)),
        (key(4, PROTO_UDP), n(40)),
        (key(99, PROTO_UDP), n(3)),
    ]
    .into_iter()
    .collect();
    let (tcp, udp) = crate::inspect::view::split_traffic(Some(all), &view.state);
    let tcp = tcp.expect("tcp");
    let udp = udp.expect("udp");
    assert_eq!(tcp.len(), 1);
    assert_eq!(tcp.get(&key(1, PROTO_TCP)).map(|t| t.packets_in), Some(7));
    assert_eq!(udp.len(), 1);
    assert_eq!(udp.get(&key(4, PROTO_UDP)).map(|t| t.packets_in), Some(40));
    let (tcp, udp) = crate::inspect::view::split_traffic(None, &view.state);
    assert!(tcp.is_none() && udp.is_none());
}
