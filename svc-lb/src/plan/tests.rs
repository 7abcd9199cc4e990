//! Hand-written transitions with their exact operation lists, capacity admission, and
//! the mirror. Shared helpers are `pub(super)` for the property tests.
use std::collections::{BTreeMap, BTreeSet};

use svc_lb_common::{
    BACKEND_ACTIVE, BACKEND_TERMINATING, MAX_BACKENDS_PER_FRONTEND, PROTO_TCP, PROTO_UDP,
    SCOPE_ALL, SVC_FLAG_AFFINITY,
};

use super::*;
use crate::{
    datapath::{
        MapStore,
        apply::apply_plan,
        codec,
        fake::{FakeError, FakeMaps},
    },
    model::{BackendAddr, DesiredBackend, DesiredFrontend, DesiredState, FrontendKey, ServiceRef},
};

pub(super) fn svc(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "default".into(),
        name: name.into(),
    }
}

pub(super) fn fe(addr: &str, port: u16) -> FrontendKey {
    FrontendKey {
        addr: addr.parse().unwrap(),
        port,
        proto: PROTO_TCP,
        scope: SCOPE_ALL,
    }
}

pub(super) fn baddr(addr: &str) -> BackendAddr {
    BackendAddr {
        addr: addr.parse().unwrap(),
        port: 8080,
        proto: PROTO_TCP,
    }
}

pub(super) fn be(addr: &str) -> DesiredBackend {
    DesiredBackend {
        addr: baddr(addr),
        state: BACKEND_ACTIVE,
        local: false,
    }
}

fn term(addr: &str) -> DesiredBackend {
    DesiredBackend {
        addr: baddr(addr),
        state: BACKEND_TERMINATING,
        local: false,
    }
}

pub(super) fn frontend(
    service: &str,
    key: FrontendKey,
    backends: &[DesiredBackend],
) -> DesiredFrontend {
    let mut backends = backends.to_vec();
    backends.sort_unstable();
    DesiredFrontend {
        key,
        service: svc(service),
        port_name: String::new(),
        backends,
        affinity_timeout_s: None,
        kind: svc_lb_common::KIND_CLUSTER_IP,
        meta_flags: 0,
        flags: 0,
        src_ranges: Vec::new(),
        scheduler: Default::default(),
        slots: None,
    }
}

pub(super) fn state(frontends: Vec<DesiredFrontend>) -> DesiredState {
    DesiredState {
        frontends: frontends.into_iter().map(|f| (f.key, f)).collect(),
        ..Default::default()
    }
}

pub(super) fn big() -> Capacity {
    Capacity {
        svc4_entries: 1 << 16,
        svc6_entries: 1 << 16,
        backends: 1 << 16,
        rev_nats: 1 << 16,
        maglev_tables: 1 << 16,
        src_ranges4: 1 << 16,
        src_ranges6: 1 << 16,
    }
}

fn ub(id: u32, b: DesiredBackend) -> Op {
    Op::UpsertBackend {
        id,
        backend: BackendEntry {
            addr: b.addr,
            state: b.state,
            local: false,
        },
    }
}
fn ur(id: u32, frontend: FrontendKey) -> Op {
    Op::UpsertRevNat { id, frontend }
}
fn us(frontend: FrontendKey, slot: u16, backend_id: u32) -> Op {
    Op::UpsertSlot {
        frontend,
        slot,
        backend_id,
    }
}
fn um(frontend: FrontendKey, count: u32, rev_nat_id: u32) -> Op {
    Op::UpsertMaster {
        frontend,
        count,
        rev_nat_id,
        flags: 0,
        affinity_timeout_s: 0,
    }
}
fn ds(frontend: FrontendKey, slot: u16) -> Op {
    Op::DeleteSlot { frontend, slot }
}
fn dm(frontend: FrontendKey) -> Op {
    Op::DeleteMaster { frontend }
}
fn dr(id: u32) -> Op {
    Op::DeleteRevNat { id }
}
fn db(id: u32) -> Op {
    Op::DeleteBackend { id }
}

/// What a frontend serves, read from the raw maps the way the eBPF programs read them:
/// master, slots `1..=count`, backends, reverse NAT.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Served {
    pub backends: Vec<DesiredBackend>,
    pub flags: u16,
    pub affinity_timeout_s: u32,
    pub rev_nat: FrontendKey,
    /// The frontend's source ranges.
    pub src_ranges: Vec<ipnet::IpNet>,
    /// Its Maglev table, entry by entry, as backend addresses (empty: no table).
    pub table: Vec<BackendAddr>,
}

pub(super) fn served(fake: &FakeMaps, key: &FrontendKey) -> Option<Served> {
    let master = fake.svc().get(&codec::svc_key(key, 0))?;
    let backends = (1..=master.count)
        .map(|s| {
            let slot = fake.svc()[&codec::svc_key(key, u16::try_from(s).unwrap())];
            let b = codec::backend_from_raw(&fake.backends()[&slot.backend_id]).unwrap();
            DesiredBackend {
                addr: b.addr,
                state: b.state,
                local: b.local,
            }
        })
        .collect();
    let id = master.rev_nat_id;
    Some(Served {
        backends,
        flags: master.flags,
        affinity_timeout_s: master.affinity_timeout_s,
        rev_nat: codec::revnat_from_raw(&fake.rev_nats()[&id]).unwrap(),
        src_ranges: fake
            .src_ranges()
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, r)| *r)
            .collect(),
        table: fake
            .maglev()
            .get(&id)
            .into_iter()
            .flatten()
            .map(|b| codec::backend_from_raw(&fake.backends()[b]).unwrap().addr)
            .collect(),
    })
}

pub(super) fn expect_served(d: &DesiredFrontend) -> Served {
    Served {
        backends: d.backends.clone(),
        flags: d.flags
            | if d.affinity_timeout_s.is_some() {
                SVC_FLAG_AFFINITY
            } else {
                0
            },
        affinity_timeout_s: d.affinity_timeout_s.unwrap_or(0),
        rev_nat: FrontendKey {
            scope: SCOPE_ALL,
            ..d.key
        },
        src_ranges: d.src_ranges.clone(),
        table: expected_table(d),
    }
}

/// The Maglev table an external frontend must have, as addresses: it depends on the
/// backend addresses only, so any ids will do.
fn expected_table(d: &DesiredFrontend) -> Vec<BackendAddr> {
    if d.key.scope != svc_lb_common::SCOPE_EXTERNAL || d.backends.is_empty() {
        return Vec::new();
    }
    let pairs: Vec<(u32, BackendAddr)> = d
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| (i as u32 + 1, b.addr))
        .collect();
    crate::maglev::populate(&pairs, crate::datapath::fake::FAKE_MAGLEV_SIZE)
        .iter()
        .map(|id| pairs[*id as usize - 1].1)
        .collect()
}

/// A fake and its mirror, driven the way the agent drives them.
pub(super) struct Rig {
    pub fake: FakeMaps,
    pub current: CurrentState,
}

impl Rig {
    pub fn new(cap: Capacity) -> Self {
        Self {
            fake: FakeMaps::new(cap),
            current: CurrentState::default(),
        }
    }

    pub fn plan(&self, desired: &DesiredState) -> Plan {
        plan(&self.current, desired, &self.fake.capacity())
    }

    /// Plans, applies, and checks that the mirror equals a read-back and that a second
    /// plan (from the mirror and from a read-back, as after a restart) is empty.
    pub fn sync(&mut self, desired: &DesiredState) -> Plan {
        let p = self.plan(desired);
        let n = apply_plan(&mut self.fake, &mut self.current, &p).unwrap();
        assert_eq!(n, p.ops.len());
        assert_eq!(
            self.current,
            self.fake.read_current().unwrap(),
            "mirror drifted from the maps"
        );
        self.fake.check_invariants().unwrap();
        assert_eq!(self.plan(desired).ops, vec![], "second plan not empty");
        let restarted = plan(
            &self.fake.read_current().unwrap(),
            desired,
            &self.fake.capacity(),
        );
        assert_eq!(restarted.ops, vec![], "plan after a restart not empty");
        p
    }
}

fn fe1() -> FrontendKey {
    fe("10.96.0.1", 80)
}
fn fe2() -> FrontendKey {
    fe("10.96.0.2", 80)
}

/// The ops of a plan without its affinity and metadata ops (`extras`), which the
/// tests of those check on their own.
fn core(ops: &[Op]) -> Vec<Op> {
    ops.iter()
        .filter(|op| {
            !matches!(
                op,
                Op::UpsertAffinityMatch { .. }
                    | Op::DeleteAffinityMatch { .. }
                    | Op::ForgetAffinity { .. }
                    | Op::UpsertMeta { .. }
                    | Op::DeleteMeta { .. }
            )
        })
        .cloned()
        .collect()
}

fn one(backends: &[DesiredBackend]) -> DesiredState {
    state(vec![frontend("a", fe1(), backends)])
}

#[test]
fn add_service_writes_backends_revnat_slots_then_master() {
    let mut rig = Rig::new(big());
    let p = rig.sync(&one(&[be("10.0.0.2"), be("10.0.0.1")]));
    assert_eq!(
        core(&p.ops),
        vec![
            ub(1, be("10.0.0.1")),
            ub(2, be("10.0.0.2")),
            ur(1, fe1()),
            us(fe1(), 1, 1),
            us(fe1(), 2, 2),
            um(fe1(), 2, 1),
        ]
    );
    assert_eq!(p.rejected, vec![]);
    assert_eq!(
        served(&rig.fake, &fe1()),
        Some(expect_served(
            &one(&[be("10.0.0.1"), be("10.0.0.2")]).frontends[&fe1()]
        ))
    );
}

#[test]
fn unchanged_desired_state_plans_nothing() {
    let mut rig = Rig::new(big());
    let d = state(vec![
        frontend("a", fe1(), &[be("10.0.0.1")]),
        frontend("b", fe2(), &[be("10.0.0.2")]),
    ]);
    rig.sync(&d);
    assert_eq!(rig.plan(&d), Plan::default());
}

#[test]
fn backend_changes_touch_only_what_differs() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    // (from, to, expected ops); each step starts from a fresh [b1, b2] service.
    let cases: Vec<(&str, Vec<DesiredBackend>, Vec<Op>)> = vec![
        (
            "add a backend",
            vec![b(1), b(2), b(3)],
            vec![ub(3, b(3)), us(fe1(), 3, 3), um(fe1(), 3, 1)],
        ),
        (
            "remove the first backend",
            vec![b(2)],
            vec![us(fe1(), 1, 2), um(fe1(), 1, 1), ds(fe1(), 2), db(1)],
        ),
        (
            "remove the last backend",
            vec![b(1)],
            vec![um(fe1(), 1, 1), ds(fe1(), 2), db(2)],
        ),
        (
            "replace a backend",
            vec![b(1), b(3)],
            vec![ub(3, b(3)), us(fe1(), 2, 3), db(2)],
        ),
        (
            "no backends: refuse",
            vec![],
            vec![um(fe1(), 0, 1), ds(fe1(), 1), ds(fe1(), 2), db(1), db(2)],
        ),
        (
            "one becomes terminating",
            vec![b(1), term("10.0.0.2")],
            vec![ub(2, term("10.0.0.2"))],
        ),
    ];
    for (what, to, want) in cases {
        let mut rig = Rig::new(big());
        rig.sync(&one(&[b(1), b(2)]));
        let p = rig.sync(&one(&to));
        assert_eq!(p.ops, want, "{what}");
        assert_eq!(
            served(&rig.fake, &fe1()),
            Some(expect_served(&one(&to).frontends[&fe1()])),
            "{what}"
        );
    }
}

#[test]
fn scale_down_and_up_keep_every_counted_slot_valid() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    let mut rig = Rig::new(big());
    rig.sync(&one(&[b(1), b(2), b(3)]));
    // 3 → 1: the master shrinks before the slots above it go, backends go last.
    assert_eq!(
        rig.sync(&one(&[b(1)])).ops,
        vec![um(fe1(), 1, 1), ds(fe1(), 2), ds(fe1(), 3), db(2), db(3)]
    );
    // 1 → 3: freed ids come back lowest first; slots are written before the master.
    assert_eq!(
        rig.sync(&one(&[b(1), b(4), b(5)])).ops,
        vec![
            ub(2, b(4)),
            ub(3, b(5)),
            us(fe1(), 2, 2),
            us(fe1(), 3, 3),
            um(fe1(), 3, 1)
        ]
    );
}

#[test]
fn remove_service_deletes_master_first_and_backends_last() {
    let mut rig = Rig::new(big());
    rig.sync(&one(&[be("10.0.0.1"), be("10.0.0.2")]));
    let p = rig.sync(&DesiredState::default());
    assert_eq!(
        core(&p.ops),
        vec![dm(fe1()), ds(fe1(), 1), ds(fe1(), 2), dr(1), db(1), db(2)]
    );
    assert_eq!(rig.current, CurrentState::default());
    assert!(
        rig.fake.svc().is_empty()
            && rig.fake.backends().is_empty()
            && rig.fake.rev_nats().is_empty()
    );
}

#[test]
fn shared_backend_has_one_id_and_outlives_one_of_its_frontends() {
    let mut rig = Rig::new(big());
    let both = state(vec![
        frontend("a", fe1(), &[be("10.0.0.1")]),
        frontend("b", fe2(), &[be("10.0.0.1"), be("10.0.0.2")]),
    ]);
    assert_eq!(
        core(&rig.sync(&both).ops),
        vec![
            ub(1, be("10.0.0.1")),
            ub(2, be("10.0.0.2")),
            ur(1, fe1()),
            ur(2, fe2()),
            us(fe1(), 1, 1),
            um(fe1(), 1, 1),
            us(fe2(), 1, 1),
            us(fe2(), 2, 2),
            um(fe2(), 2, 2),
        ]
    );
    let only_b = state(vec![frontend(
        "b",
        fe2(),
        &[be("10.0.0.1"), be("10.0.0.2")],
    )]);
    assert_eq!(
        core(&rig.sync(&only_b).ops),
        vec![dm(fe1()), ds(fe1(), 1), dr(1)]
    );
    assert_eq!(
        served(&rig.fake, &fe2()),
        Some(expect_served(&only_b.frontends[&fe2()]))
    );
    // A new frontend gets the lowest free reverse-NAT id again.
    let fe3 = fe("10.96.0.3", 53);
    let again = state(vec![
        frontend("b", fe2(), &[be("10.0.0.1"), be("10.0.0.2")]),
        frontend("c", fe3, &[]),
    ]);
    assert_eq!(core(&rig.sync(&again).ops), vec![ur(1, fe3), um(fe3, 0, 1)]);
}

#[test]
fn ipv6_and_dual_stack_frontends() {
    let mut rig = Rig::new(big());
    let fe6 = fe("fd00::a", 80);
    let d = state(vec![
        frontend("a", fe1(), &[be("10.0.0.1")]),
        frontend("a", fe6, &[be("fd00:1::2"), be("fd00:1::1")]),
    ]);
    assert_eq!(
        core(&rig.sync(&d).ops),
        vec![
            ub(1, be("10.0.0.1")),
            ub(2, be("fd00:1::1")),
            ub(3, be("fd00:1::2")),
            ur(1, fe1()),
            ur(2, fe6),
            us(fe1(), 1, 1),
            um(fe1(), 1, 1),
            us(fe6, 1, 2),
            us(fe6, 2, 3),
            um(fe6, 2, 2),
        ]
    );
    assert_eq!(
        rig.fake.usage(),
        Capacity {
            svc4_entries: 2,
            svc6_entries: 3,
            backends: 3,
            rev_nats: 2,
            maglev_tables: 0,
            src_ranges4: 0,
            src_ranges6: 0,
        }
    );
    assert_eq!(
        served(&rig.fake, &fe6),
        Some(expect_served(&d.frontends[&fe6]))
    );
    let v4_only = state(vec![frontend("a", fe1(), &[be("10.0.0.1")])]);
    assert_eq!(
        core(&rig.sync(&v4_only).ops),
        vec![dm(fe6), ds(fe6, 1), ds(fe6, 2), dr(2), db(2), db(3)]
    );
}

#[test]
fn affinity_is_a_master_only_change() {
    let mut rig = Rig::new(big());
    let mut d = one(&[be("10.0.0.1")]);
    rig.sync(&d);
    d.frontends.get_mut(&fe1()).unwrap().affinity_timeout_s = Some(10_800);
    let on = Op::UpsertMaster {
        frontend: fe1(),
        count: 1,
        rev_nat_id: 1,
        flags: SVC_FLAG_AFFINITY,
        affinity_timeout_s: 10_800,
    };
    // The match entry comes after the master: its slot is in by then.
    let pair = (1, 1);
    assert_eq!(
        rig.sync(&d).ops,
        vec![
            on,
            Op::UpsertAffinityMatch {
                backend_id: 1,
                rev_nat_id: 1
            }
        ]
    );
    assert_eq!(
        served(&rig.fake, &fe1()).unwrap().affinity_timeout_s,
        10_800
    );
    assert_eq!(rig.current.aff_match, BTreeSet::from([pair]));
    // A new backend joins: its pair after its slot and master; the old one stays.
    d = one(&[be("10.0.0.1"), be("10.0.0.2")]);
    d.frontends.get_mut(&fe1()).unwrap().affinity_timeout_s = Some(10_800);
    let p = rig.sync(&d);
    assert_eq!(
        p.ops.last(),
        Some(&Op::UpsertAffinityMatch {
            backend_id: 2,
            rev_nat_id: 1
        })
    );
    // Backend 1 leaves: its pair goes before anything else, so no remembered client
    // follows it out of the Service.
    d = one(&[be("10.0.0.2")]);
    d.frontends.get_mut(&fe1()).unwrap().affinity_timeout_s = Some(10_800);
    let p = rig.sync(&d);
    assert_eq!(
        p.ops.first(),
        Some(&Op::DeleteAffinityMatch {
            backend_id: 1,
            rev_nat_id: 1
        })
    );
    // Switched off: pairs go and the remembered clients are forgotten, first.
    rig.fake.remember_client(1, 42, 2);
    d.frontends.get_mut(&fe1()).unwrap().affinity_timeout_s = None;
    let p = rig.sync(&d);
    assert_eq!(
        p.ops,
        vec![
            Op::DeleteAffinityMatch {
                backend_id: 2,
                rev_nat_id: 1
            },
            Op::ForgetAffinity { rev_nat_id: 1 },
            um(fe1(), 1, 1)
        ]
    );
    assert!(rig.fake.clients().is_empty());
    assert!(rig.current.aff_match.is_empty());
}

#[test]
fn metadata_follows_the_frontends_it_names() {
    let mut rig = Rig::new(big());
    let mut d = one(&[be("10.0.0.1")]);
    let p = rig.sync(&d);
    let kind = d.frontends[&fe1()].kind;
    let meta = |port_name: &str| crate::plan::FrontendMeta {
        service: ServiceRef {
            namespace: "default".into(),
            name: "a".into(),
        },
        port_name: port_name.to_owned(),
        kind,
        flags: 0,
    };
    assert_eq!(
        p.ops.last(),
        Some(&Op::UpsertMeta {
            rev_nat_id: 1,
            meta: Box::new(meta(""))
        })
    );
    // Only the metadata changes: one op, nothing else.
    d.frontends.get_mut(&fe1()).unwrap().port_name = "http".to_owned();
    assert_eq!(
        rig.sync(&d).ops,
        vec![Op::UpsertMeta {
            rev_nat_id: 1,
            meta: Box::new(meta("http"))
        }]
    );
    assert_eq!(rig.current.meta[&1], meta("http"));
    // Removed: the metadata goes first, while the entry that leads to its id exists.
    let p = rig.sync(&DesiredState::default());
    assert_eq!(p.ops.first(), Some(&Op::DeleteMeta { rev_nat_id: 1 }));
    assert!(rig.fake.meta().is_empty());
}

#[test]
fn shrinking_frontends_go_before_growing_ones() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    let grows = fe("10.96.0.1", 80);
    let shrinks = fe("10.96.0.9", 80);
    let mut rig = Rig::new(big());
    rig.sync(&state(vec![
        frontend("a", grows, &[b(1)]),
        frontend("b", shrinks, &[b(1), b(2), b(3)]),
    ]));
    let p = rig.sync(&state(vec![
        frontend("a", grows, &[b(1), b(2), b(3)]),
        frontend("b", shrinks, &[b(1)]),
    ]));
    assert_eq!(
        p.ops,
        vec![
            um(shrinks, 1, 2),
            ds(shrinks, 2),
            ds(shrinks, 3),
            us(grows, 2, 2),
            us(grows, 3, 3),
            um(grows, 3, 1)
        ]
    );
}

#[test]
fn udp_frontend_on_the_same_address_and_port_is_separate() {
    let mut rig = Rig::new(big());
    let udp = FrontendKey {
        proto: PROTO_UDP,
        ..fe1()
    };
    let d = state(vec![
        frontend("a", fe1(), &[be("10.0.0.1")]),
        frontend("a", udp, &[]),
    ]);
    rig.sync(&d);
    assert_eq!(served(&rig.fake, &udp).unwrap().rev_nat, udp);
    assert_eq!(
        served(&rig.fake, &fe1()).unwrap().backends,
        vec![be("10.0.0.1")]
    );
}

#[test]
fn restart_plans_from_a_read_back_exactly_as_from_the_mirror() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    let mut rig = Rig::new(big());
    let mut d = state(vec![
        frontend("a", fe1(), &[b(1), b(2)]),
        frontend("b", fe2(), &[b(2), b(3)]),
        frontend("c", fe("fd00::1", 53), &[be("fd00:1::1")]),
    ]);
    d.frontends.get_mut(&fe2()).unwrap().affinity_timeout_s = Some(60);
    rig.sync(&d);
    // A new agent adopts the pinned maps: nothing to do for the same desired state...
    let adopted = rig.fake.read_current().unwrap();
    assert_eq!(plan(&adopted, &d, &big()), Plan::default());
    // ...and the same operations as the old agent for a new one.
    let next = state(vec![
        frontend("a", fe1(), &[b(1), b(3)]),
        frontend("c", fe("fd00::1", 53), &[]),
    ]);
    assert_eq!(plan(&adopted, &next, &big()), rig.plan(&next));
}

// ---------------------------------------------------------------------------------
// State left by an interrupted apply, or by hand-edited maps.

/// Applies `p` with the `(n+1)`-th op failing; checks the mirror still matches.
fn apply_interrupted(rig: &mut Rig, p: &Plan, n: usize) {
    rig.fake.fail_after(n);
    let err = apply_plan(&mut rig.fake, &mut rig.current, p).unwrap_err();
    assert_eq!(err.downcast_ref::<FakeError>(), Some(&FakeError::Injected));
    assert_eq!(rig.current, rig.fake.read_current().unwrap());
}

#[test]
fn interrupted_scale_down_leaves_stale_slots_that_the_next_plan_deletes() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    let mut rig = Rig::new(big());
    rig.sync(&one(&[b(1), b(2), b(3)]));
    let p = rig.plan(&one(&[b(1)]));
    apply_interrupted(&mut rig, &p, 1);
    assert_eq!(rig.current.frontends[&fe1()].backend_ids, vec![1]);
    assert_eq!(rig.current.frontends[&fe1()].stale_slots, vec![2, 3]);
    assert_eq!(
        rig.sync(&one(&[b(1)])).ops,
        vec![ds(fe1(), 2), ds(fe1(), 3), db(2), db(3)]
    );
}

#[test]
fn interrupted_add_adopts_the_written_backends_and_revnat() {
    let mut rig = Rig::new(big());
    let d = one(&[be("10.0.0.1"), be("10.0.0.2")]);
    let p = rig.plan(&d);
    // Backends and the reverse-NAT entry are written, no slot yet.
    apply_interrupted(&mut rig, &p, 3);
    rig.current = rig.fake.read_current().unwrap();
    assert_eq!(
        core(&rig.sync(&d).ops),
        vec![us(fe1(), 1, 1), us(fe1(), 2, 2), um(fe1(), 2, 1)]
    );
}

#[test]
fn interrupted_remove_finishes_without_the_master() {
    let mut rig = Rig::new(big());
    rig.sync(&one(&[be("10.0.0.1"), be("10.0.0.2")]));
    let p = rig.plan(&DesiredState::default());
    // Master and slot 1 gone; slot 2 and the reverse NAT remain.
    // (The first op deletes the metadata.)
    apply_interrupted(&mut rig, &p, 3);
    assert_eq!(rig.current.frontends[&fe1()].stale_slots, vec![2]);
    assert_eq!(
        core(&rig.sync(&DesiredState::default()).ops),
        vec![ds(fe1(), 2), dr(1), db(1), db(2)]
    );
}

#[test]
fn interrupted_growth_resumes_from_a_read_back() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    let mut rig = Rig::new(big());
    rig.sync(&one(&[b(1)]));
    let d = one(&[b(1), b(2), b(3)]);
    let p = rig.plan(&d);
    // Backends and slot 2 written, slot 3 and the master not.
    apply_interrupted(&mut rig, &p, 3);
    rig.current = rig.fake.read_current().unwrap();
    assert_eq!(rig.current.frontends[&fe1()].stale_slots, vec![2]);
    // Slot 2's id cannot be read back above the count, so it is written again.
    assert_eq!(
        rig.sync(&d).ops,
        vec![us(fe1(), 2, 2), us(fe1(), 3, 3), um(fe1(), 3, 1)]
    );
}

#[test]
fn holes_and_foreign_ids_are_rewritten() {
    let b1 = BackendEntry {
        addr: baddr("10.0.0.1"),
        state: BACKEND_ACTIVE,
        local: false,
    };
    let b2 = BackendEntry {
        addr: baddr("10.0.0.2"),
        state: BACKEND_ACTIVE,
        local: false,
    };
    let current = CurrentState {
        frontends: BTreeMap::from([(
            fe1(),
            CurrentFrontend {
                rev_nat_id: 4,
                flags: 0,
                affinity_timeout_s: 0,
                // Slot 2 missing, as decode_state reports a hole.
                backend_ids: vec![1, 0],
                stale_slots: vec![],
            },
        )]),
        // Id 7 is a duplicate of backend 1's address.
        backends: BTreeMap::from([(1, b1), (2, b2), (7, b1)]),
        rev_nats: BTreeMap::from([(4, fe1())]),
        ..Default::default()
    };
    let p = plan(&current, &one(&[be("10.0.0.1"), be("10.0.0.2")]), &big());
    assert_eq!(core(&p.ops), vec![us(fe1(), 2, 2), db(7)]);
}

#[test]
fn mismatched_revnat_is_replaced_then_deleted() {
    let current = CurrentState {
        frontends: BTreeMap::from([(
            fe1(),
            CurrentFrontend {
                rev_nat_id: 1,
                flags: 0,
                affinity_timeout_s: 0,
                backend_ids: vec![],
                stale_slots: vec![],
            },
        )]),
        backends: BTreeMap::new(),
        // Entry 1 describes another frontend (a hand-edited map).
        rev_nats: BTreeMap::from([(1, fe2())]),
        ..Default::default()
    };
    let p = plan(&current, &one(&[]), &big());
    assert_eq!(core(&p.ops), vec![ur(2, fe1()), um(fe1(), 0, 2), dr(1)]);
}

// ---------------------------------------------------------------------------------
// Capacity.

fn cap(svc4: usize, backends: usize, rev_nats: usize) -> Capacity {
    Capacity {
        svc4_entries: svc4,
        backends,
        rev_nats,
        ..big()
    }
}

fn reasons(p: &Plan) -> Vec<(String, String)> {
    p.rejected
        .iter()
        .map(|r| (r.service.name.to_string(), r.reason.clone()))
        .collect()
}

#[test]
fn service_that_overflows_is_rejected_whole_and_the_next_one_tried() {
    let mut rig = Rig::new(cap(5, 100, 100));
    let fe3 = fe("10.96.0.3", 80);
    let fe4 = fe("10.96.0.4", 80);
    let d = state(vec![
        frontend("a", fe1(), &[be("10.0.0.1"), be("10.0.0.2")]),
        // b needs 3 entries in two frontends; after a, only 2 are left.
        frontend("b", fe2(), &[be("10.0.0.1")]),
        frontend("b", fe3, &[]),
        frontend("c", fe4, &[]),
    ]);
    let p = rig.sync(&d);
    assert_eq!(
        reasons(&p),
        vec![(
            "b".to_owned(),
            "map LB_SVC4_V1 full: needs 6 entries, capacity 5".to_owned()
        )]
    );
    assert!(served(&rig.fake, &fe2()).is_none() && served(&rig.fake, &fe3).is_none());
    assert_eq!(served(&rig.fake, &fe4).unwrap().backends, vec![]);
    assert_eq!(rig.fake.usage().svc4_entries, 4);
}

#[test]
fn rejected_service_refuses_connections_until_room_is_freed() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    let mut rig = Rig::new(cap(5, 100, 100));
    rig.sync(&state(vec![
        frontend("a", fe1(), &[b(1), b(2)]),
        frontend("z", fe2(), &[b(3)]),
    ]));
    assert_eq!(rig.fake.usage().svc4_entries, 5);

    // a wants one more slot; z frees one, but z is planned after a (name order).
    let d = state(vec![
        frontend("a", fe1(), &[b(1), b(2), b(4)]),
        frontend("z", fe2(), &[]),
    ]);
    let p = rig.sync_allowing_rejects(&d);
    assert_eq!(
        reasons(&p),
        vec![(
            "a".to_owned(),
            "map LB_SVC4_V1 full: needs 6 entries, capacity 5; its programmed frontends refuse connections until it fits".to_owned()
        )]
    );
    // Fail closed: a no longer routes to its old backends (they may belong to someone
    // else by now); its frontend stays, with no backends, so clients are refused.
    assert_eq!(served(&rig.fake, &fe1()).unwrap().backends, vec![]);
    assert_eq!(served(&rig.fake, &fe2()).unwrap().backends, vec![]);
    // Backend 10.0.0.4 was never written, and the old ones are gone.
    assert_eq!(rig.fake.usage().backends, 0);

    // The next pass has the room.
    let p = rig.sync(&d);
    assert_eq!(p.rejected, vec![]);
    assert_eq!(
        served(&rig.fake, &fe1()),
        Some(expect_served(&d.frontends[&fe1()]))
    );
}

#[test]
fn a_new_service_cannot_push_out_a_programmed_one() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    let mut rig = Rig::new(cap(5, 100, 100));
    rig.sync(&state(vec![frontend("z", fe2(), &[b(1), b(2)])]));
    // z grows by one slot (4 entries of 5); a new Service "a", first by name, needs 2.
    // Name order alone would admit a and reject (and empty) the working z.
    let d = state(vec![
        frontend("a", fe1(), &[b(5)]),
        frontend("z", fe2(), &[b(1), b(2), b(3)]),
    ]);
    let p = rig.sync_allowing_rejects(&d);
    assert_eq!(
        reasons(&p),
        vec![(
            "a".to_owned(),
            "map LB_SVC4_V1 full: needs 6 entries, capacity 5".to_owned()
        )]
    );
    assert_eq!(
        served(&rig.fake, &fe2()),
        Some(expect_served(&d.frontends[&fe2()]))
    );
    assert!(
        served(&rig.fake, &fe1()).is_none(),
        "a was never programmed"
    );
}

#[test]
fn emptying_a_rejected_service_keeps_its_ids_and_clears_drop_empty() {
    use svc_lb_common::{SCOPE_EXTERNAL, SVC_FLAG_DROP_EMPTY};
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    let mut rig = Rig::new(cap(100, 3, 100));
    let ext = FrontendKey {
        scope: SCOPE_EXTERNAL,
        ..fe1()
    };
    let mut f = frontend("a", ext, &[b(1)]);
    f.flags = SVC_FLAG_DROP_EMPTY;
    f.affinity_timeout_s = Some(60);
    rig.sync(&state(vec![f.clone()]));
    let rev = rig.current.frontends[&ext].rev_nat_id;
    // Four new backends do not fit in a backend map of 3.
    let mut grown = f.clone();
    grown.backends = vec![b(2), b(3), b(4), b(5)];
    let p = rig.sync_allowing_rejects(&state(vec![grown]));
    assert_eq!(p.rejected.len(), 1);
    let cf = &rig.current.frontends[&ext];
    assert_eq!(cf.rev_nat_id, rev);
    assert_eq!(cf.backend_ids, Vec::<u32>::new());
    assert_eq!(cf.flags & (SVC_FLAG_DROP_EMPTY | SVC_FLAG_AFFINITY), 0);
    assert!(rig.current.maglev.is_empty(), "no table without backends");
}

impl Rig {
    /// [`Rig::sync`] for a desired state some of which does not fit: the second plan
    /// may retry what was rejected, so only the mirror and the invariants are checked.
    fn sync_allowing_rejects(&mut self, desired: &DesiredState) -> Plan {
        let p = self.plan(desired);
        apply_plan(&mut self.fake, &mut self.current, &p).unwrap();
        assert_eq!(self.current, self.fake.read_current().unwrap());
        self.fake.check_invariants().unwrap();
        p
    }
}

#[test]
fn peak_counts_new_slots_before_old_ones_are_deleted() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    // Moving a service to another frontend: the old frontend goes in phase 1, before
    // the new one is written, so the entries of one frontend suffice.
    let mut rig = Rig::new(cap(3, 100, 100));
    rig.sync(&state(vec![frontend("a", fe1(), &[b(1), b(2)])]));
    let p = rig.sync(&state(vec![frontend("a", fe2(), &[b(1), b(2)])]));
    assert_eq!(p.rejected, vec![]);
    assert_eq!(core(&p.ops)[0], dm(fe1()));

    // Replacing both backends of a full frontend in place needs no extra entry in the
    // service map, but the backend map holds old and new backends together.
    let mut rig = Rig::new(cap(3, 3, 100));
    rig.sync(&state(vec![frontend("a", fe1(), &[b(1), b(2)])]));
    let p = rig.sync_allowing_rejects(&state(vec![frontend("a", fe1(), &[b(3), b(4)])]));
    assert_eq!(
        reasons(&p),
        vec![(
            "a".to_owned(),
            "map LB_BACKENDS_V1 full: needs 4 entries, capacity 3; its programmed frontends refuse connections until it fits".to_owned()
        )]
    );
    // Fail closed: emptied (master to 0, slots, then the unused backends).
    assert_eq!(
        p.ops,
        vec![um(fe1(), 0, 1), ds(fe1(), 1), ds(fe1(), 2), db(1), db(2)]
    );
}

#[test]
fn growth_fits_when_an_earlier_service_shrinks_first() {
    let b = |i: u8| be(&format!("10.0.0.{i}"));
    // a (sorted first by name) shrinks a frontend with the larger key, b grows one with
    // the smaller key: in key order the growth would overflow, shrink-first fits.
    let grows = fe("10.96.0.1", 80);
    let shrinks = fe("10.96.0.9", 80);
    let mut rig = Rig::new(cap(6, 100, 100));
    rig.sync(&state(vec![
        frontend("a", shrinks, &[b(1), b(2), b(3)]),
        frontend("b", grows, &[b(1)]),
    ]));
    let p = rig.sync(&state(vec![
        frontend("a", shrinks, &[b(1)]),
        frontend("b", grows, &[b(1), b(2), b(3)]),
    ]));
    assert_eq!(p.rejected, vec![]);
    assert_eq!(rig.fake.usage().svc4_entries, 6);
}

#[test]
fn shared_backends_count_once_and_revnats_have_their_own_limit() {
    let mut rig = Rig::new(cap(100, 2, 2));
    let fe3 = fe("10.96.0.3", 80);
    let d = state(vec![
        frontend("a", fe1(), &[be("10.0.0.1"), be("10.0.0.2")]),
        frontend("b", fe2(), &[be("10.0.0.3")]),
        // c reuses a's backend: no new backend entry.
        frontend("c", fe3, &[be("10.0.0.2")]),
        frontend("d", fe("10.96.0.4", 80), &[be("10.0.0.4")]),
    ]);
    let p = rig.sync_allowing_rejects(&d);
    let backends_full = "map LB_BACKENDS_V1 full: needs 3 entries, capacity 2";
    assert_eq!(
        reasons(&p),
        vec![
            ("b".to_owned(), backends_full.to_owned()),
            (
                "d".to_owned(),
                format!("{backends_full}; map LB_REVNAT_V1 full: needs 3 entries, capacity 2")
            ),
        ]
    );
    assert_eq!(
        served(&rig.fake, &fe3).unwrap().backends,
        vec![be("10.0.0.2")]
    );
}

#[test]
fn ipv6_entries_count_against_their_own_map() {
    let c = Capacity {
        svc4_entries: 100,
        svc6_entries: 2,
        backends: 100,
        rev_nats: 100,
        ..big()
    };
    let mut rig = Rig::new(c);
    let d = state(vec![
        frontend("a", fe("fd00::1", 80), &[be("fd00:1::1"), be("fd00:1::2")]),
        frontend("b", fe("fd00::2", 80), &[be("fd00:1::1")]),
        frontend("c", fe1(), &[be("10.0.0.1"), be("10.0.0.2")]),
    ]);
    let p = rig.sync_allowing_rejects(&d);
    assert_eq!(
        reasons(&p),
        vec![(
            "a".to_owned(),
            "map LB_SVC6_V1 full: needs 3 entries, capacity 2".to_owned()
        )]
    );
    assert_eq!(
        rig.fake.usage(),
        Capacity {
            svc4_entries: 3,
            svc6_entries: 2,
            backends: 3,
            rev_nats: 2,
            maglev_tables: 0,
            src_ranges4: 0,
            src_ranges6: 0,
        }
    );
}

#[test]
fn frontend_with_too_many_backends_rejects_its_service_and_empties_the_old_one() {
    let mut rig = Rig::new(big());
    let small = state(vec![
        frontend("a", fe1(), &[be("10.0.0.1")]),
        frontend("a", fe2(), &[]),
    ]);
    rig.sync(&small);
    let before = rig.current.clone();
    let many: Vec<DesiredBackend> = (0..=MAX_BACKENDS_PER_FRONTEND as u32)
        .map(|i| DesiredBackend {
            addr: BackendAddr {
                addr: std::net::Ipv4Addr::from(0x0a01_0000 + i).into(),
                port: 80,
                proto: PROTO_TCP,
            },
            state: BACKEND_ACTIVE,
            local: false,
        })
        .collect();
    let d = state(vec![
        frontend("a", fe1(), &many),
        frontend("a", fe2(), &[be("10.0.0.1")]),
    ]);
    let p = plan(&rig.current, &d, &rig.fake.capacity());
    assert_eq!(
        reasons(&p),
        vec![(
            "a".to_owned(),
            format!(
                "frontend 10.96.0.1:80/TCP has {} backends; one frontend holds at most 65535; its programmed frontends refuse connections until it fits",
                MAX_BACKENDS_PER_FRONTEND + 1
            )
        )]
    );
    // Emptied, not left routing to the old backend: master to 0, then its slot, then
    // the backend nothing uses any more.
    let id = before.frontends[&fe1()].rev_nat_id;
    assert_eq!(p.ops, vec![um(fe1(), 0, id), ds(fe1(), 1), db(1)]);
    apply_plan(&mut rig.fake, &mut rig.current, &p).unwrap();
    rig.fake.check_invariants().unwrap();
    assert_eq!(served(&rig.fake, &fe1()).unwrap().backends, vec![]);
    assert_eq!(served(&rig.fake, &fe2()).unwrap().backends, vec![]);
}

#[test]
fn rejection_is_deterministic_by_namespace_then_name() {
    let mk = |ns: &str, name: &str, key: FrontendKey| {
        let mut f = frontend(name, key, &[]);
        f.service.namespace = ns.into();
        f
    };
    // Only two masters fit: x/a and x/b win over y/a, whatever the frontend keys.
    let d = state(vec![
        mk("y", "a", fe("10.96.0.1", 80)),
        mk("x", "b", fe("10.96.0.2", 80)),
        mk("x", "a", fe("10.96.0.3", 80)),
    ]);
    let p = plan(&CurrentState::default(), &d, &cap(2, 100, 100));
    let who: Vec<String> = p.rejected.iter().map(|r| r.service.to_string()).collect();
    assert_eq!(who, vec!["y/a".to_owned()]);
}

/// An external frontend (scope external) with these source ranges.
fn ext_frontend(
    service: &str,
    addr: &str,
    backends: &[DesiredBackend],
    ranges: &[&str],
) -> DesiredFrontend {
    let key = FrontendKey {
        scope: svc_lb_common::SCOPE_EXTERNAL,
        ..fe(addr, 80)
    };
    let mut f = frontend(service, key, backends);
    f.src_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
    f.src_ranges.sort_unstable();
    if !f.src_ranges.is_empty() {
        f.flags = svc_lb_common::SVC_FLAG_SRC_RANGES;
    }
    f
}

fn ext_cap(maglev_tables: usize, src_ranges4: usize, src_ranges6: usize) -> Capacity {
    Capacity {
        maglev_tables,
        src_ranges4,
        src_ranges6,
        ..big()
    }
}

#[test]
fn full_maglev_map_rejects_the_whole_service_and_others_keep_working() {
    let mut rig = Rig::new(ext_cap(1, 100, 100));
    let a = ext_frontend("a", "192.0.2.1", &[be("10.0.0.1")], &[]);
    // b's external frontend needs a second table; its cluster IP goes with it.
    let b_ext = ext_frontend("b", "192.0.2.2", &[be("10.0.0.2")], &[]);
    let b_cluster = frontend("b", fe2(), &[be("10.0.0.2")]);
    // c's external frontend has no backend, so no table: it fits.
    let c = ext_frontend("c", "192.0.2.3", &[], &[]);
    let d = state(vec![a.clone(), b_ext.clone(), b_cluster, c.clone()]);
    let p = rig.sync_allowing_rejects(&d);
    assert_eq!(
        reasons(&p),
        vec![(
            "b".to_owned(),
            "map LB_MAGLEV_V1 full: needs 2 entries, capacity 1".to_owned()
        )]
    );
    assert_eq!(served(&rig.fake, &a.key), Some(expect_served(&a)));
    assert_eq!(served(&rig.fake, &c.key), Some(expect_served(&c)));
    assert!(served(&rig.fake, &b_ext.key).is_none() && served(&rig.fake, &fe2()).is_none());
    // Nothing of b was written, not even its backend.
    assert_eq!(rig.fake.usage().backends, 1);
    assert_eq!(rig.fake.usage().maglev_tables, 1);
    // The same plan again rejects b again, and changes nothing else.
    let again = rig.plan(&d);
    assert_eq!(again.ops, vec![]);
    assert_eq!(reasons(&again), reasons(&p));
}

#[test]
fn maglev_tables_freed_earlier_in_the_plan_make_room() {
    let mut rig = Rig::new(ext_cap(1, 100, 100));
    let a = ext_frontend("a", "192.0.2.1", &[be("10.0.0.1")], &[]);
    rig.sync(&state(vec![a.clone()]));
    // Removed Service: its table goes in phase 1, before b's is written.
    let b = ext_frontend("b", "192.0.2.2", &[be("10.0.0.2")], &[]);
    let p = rig.sync(&state(vec![b.clone()]));
    assert_eq!(p.rejected, vec![]);
    assert_eq!(served(&rig.fake, &b.key), Some(expect_served(&b)));
    // A frontend losing its last backend drops its table after its master; it frees
    // service-map entries, so it goes before the frontend that grows a table.
    let b_empty = ext_frontend("b", "192.0.2.2", &[], &[]);
    let c = ext_frontend("c", "192.0.2.3", &[be("10.0.0.3")], &[]);
    let p = rig.sync(&state(vec![b_empty.clone(), c.clone()]));
    assert_eq!(p.rejected, vec![]);
    let pos = |pred: &dyn Fn(&Op) -> bool| p.ops.iter().position(pred).unwrap();
    assert!(
        pos(&|o| matches!(o, Op::DeleteMaglev { .. }))
            < pos(&|o| matches!(o, Op::UpsertMaglev { .. })),
        "{:#?}",
        p.ops
    );
    assert_eq!(
        served(&rig.fake, &b_empty.key),
        Some(expect_served(&b_empty))
    );
    assert_eq!(served(&rig.fake, &c.key), Some(expect_served(&c)));
    assert_eq!(rig.fake.usage().maglev_tables, 1);
}

#[test]
fn source_ranges_count_per_family_and_per_frontend() {
    // Two IPv4 range entries, one IPv6.
    let mut rig = Rig::new(ext_cap(100, 2, 1));
    let a = ext_frontend(
        "a",
        "192.0.2.1",
        &[be("10.0.0.1")],
        &["10.0.0.0/8", "192.0.2.0/24"],
    );
    // b's frontends: one range each; the IPv4 one no longer fits.
    let b4 = ext_frontend("b", "192.0.2.2", &[be("10.0.0.1")], &["10.0.0.0/8"]);
    let b6 = ext_frontend("b", "2001:db8::2", &[be("fd00:1::1")], &["2001:db8::/32"]);
    // c uses only the IPv6 map.
    let c = ext_frontend("c", "2001:db8::3", &[be("fd00:1::1")], &["fd00::/8"]);
    let p = rig.sync_allowing_rejects(&state(vec![a.clone(), b4.clone(), b6.clone(), c.clone()]));
    assert_eq!(
        reasons(&p),
        vec![(
            "b".to_owned(),
            "map LB_SRCRNG4_V1 full: needs 3 entries, capacity 2".to_owned()
        )]
    );
    assert_eq!(served(&rig.fake, &a.key), Some(expect_served(&a)));
    assert_eq!(served(&rig.fake, &c.key), Some(expect_served(&c)));
    assert!(served(&rig.fake, &b4.key).is_none() && served(&rig.fake, &b6.key).is_none());
    let used = rig.fake.usage();
    assert_eq!((used.src_ranges4, used.src_ranges6), (2, 1));
}

#[test]
fn replacing_a_source_range_needs_room_for_both_for_a_moment() {
    // New ranges go in before the master, leaving ones after it (never a moment
    // with neither): a full map cannot swap one range for another.
    let mut rig = Rig::new(ext_cap(100, 2, 100));
    let a = ext_frontend(
        "a",
        "192.0.2.1",
        &[be("10.0.0.1")],
        &["10.0.0.0/8", "192.0.2.0/24"],
    );
    rig.sync(&state(vec![a.clone()]));
    let swapped = ext_frontend(
        "a",
        "192.0.2.1",
        &[be("10.0.0.1")],
        &["10.0.0.0/8", "198.51.100.0/24"],
    );
    let p = rig.sync_allowing_rejects(&state(vec![swapped.clone()]));
    assert_eq!(
        reasons(&p),
        vec![(
            "a".to_owned(),
            "map LB_SRCRNG4_V1 full: needs 3 entries, capacity 2; its programmed frontends refuse connections until it fits".to_owned()
        )]
    );
    // Emptied under its old ranges: no backend, no new range entry.
    let now = served(&rig.fake, &a.key).expect("still programmed");
    assert_eq!(now.backends, vec![]);
    assert_eq!(now.src_ranges, expect_served(&a).src_ranges);
    // Dropping a range first and adding the other next works in two steps.
    let narrowed = ext_frontend("a", "192.0.2.1", &[be("10.0.0.1")], &["10.0.0.0/8"]);
    assert_eq!(rig.sync(&state(vec![narrowed])).rejected, vec![]);
    assert_eq!(rig.sync(&state(vec![swapped.clone()])).rejected, vec![]);
    assert_eq!(
        served(&rig.fake, &swapped.key),
        Some(expect_served(&swapped))
    );
}

// ---------------------------------------------------------------------------------
// The mirror on its own.

#[test]
fn mirror_remembers_ids_of_slots_above_the_count() {
    let mut fake = FakeMaps::new(big());
    let mut mirror = CurrentState::default();
    let ops = vec![
        ub(1, be("10.0.0.1")),
        ub(2, be("10.0.0.2")),
        ur(1, fe1()),
        // No master yet: a read-back lists both slots as stale, by number only.
        us(fe1(), 1, 1),
        us(fe1(), 2, 2),
        um(fe1(), 1, 1),
        um(fe1(), 2, 1),
        um(fe1(), 1, 1),
        dm(fe1()),
        um(fe1(), 2, 1),
    ];
    for op in &ops {
        fake.apply(op).unwrap();
        mirror.apply(op);
        assert_eq!(mirror, fake.read_current().unwrap(), "after {op:?}");
    }
    assert_eq!(mirror.frontends[&fe1()].backend_ids, vec![1, 2]);

    // A read-back cannot know the id of a slot above the count: a master growing over
    // it without rewriting it shows a hole, which the planner then rewrites.
    fake.apply(&um(fe1(), 1, 1)).unwrap();
    let mut read_back = fake.read_current().unwrap();
    read_back.apply(&um(fe1(), 2, 1));
    assert_eq!(read_back.frontends[&fe1()].backend_ids, vec![1, 0]);
    assert_eq!(
        core(&plan(&read_back, &one(&[be("10.0.0.1"), be("10.0.0.2")]), &big()).ops),
        vec![us(fe1(), 2, 2)]
    );
}

#[test]
fn mirror_of_revnat_has_no_scope_like_the_map() {
    let mut m = CurrentState::default();
    let scoped = FrontendKey { scope: 3, ..fe1() };
    m.apply(&ur(5, scoped));
    assert_eq!(m.rev_nats[&5], fe1());
}

#[test]
fn mirror_ignores_timeout_without_affinity_like_a_read_back() {
    let mut fake = FakeMaps::new(big());
    let mut m = CurrentState::default();
    for op in [
        ur(1, fe1()),
        Op::UpsertMaster {
            frontend: fe1(),
            count: 0,
            rev_nat_id: 1,
            flags: 0,
            affinity_timeout_s: 99,
        },
    ] {
        fake.apply(&op).unwrap();
        m.apply(&op);
    }
    assert_eq!(m.frontends[&fe1()].affinity_timeout_s, 0);
    assert_eq!(m, fake.read_current().unwrap());
}

/// External frontends: the Maglev table and source ranges go in after the backends and
/// before the master, and out after it; a restart rewrites tables and nothing else.
#[test]
fn external_tables_and_ranges_are_ordered_around_the_master() {
    let ext = FrontendKey {
        addr: "0.0.0.0".parse().unwrap(),
        port: 30080,
        proto: PROTO_TCP,
        scope: svc_lb_common::SCOPE_EXTERNAL,
    };
    let mut f = frontend("web", ext, &[be("10.0.0.1"), be("10.0.0.2")]);
    f.flags = svc_lb_common::SVC_FLAG_SRC_RANGES;
    f.src_ranges = vec!["192.0.2.0/24".parse().unwrap()];
    let d = state(vec![f.clone()]);
    let mut rig = Rig::new(big());
    let p = rig.plan(&d);
    let pos = |p: &Plan, pred: &dyn Fn(&Op) -> bool| p.ops.iter().position(pred).unwrap();
    let master = pos(&p, &|o| matches!(o, Op::UpsertMaster { .. }));
    let table = pos(&p, &|o| matches!(o, Op::UpsertMaglev { .. }));
    let range = pos(&p, &|o| matches!(o, Op::UpsertSrcRange { .. }));
    let last_backend = p
        .ops
        .iter()
        .rposition(|o| matches!(o, Op::UpsertBackend { .. }))
        .unwrap();
    assert!(
        last_backend < table && table < master && range < master,
        "{:#?}",
        p.ops
    );
    apply_plan(&mut rig.fake, &mut rig.current, &p).unwrap();
    rig.fake.check_settled().unwrap();
    assert_eq!(rig.fake.maglev().len(), 1);

    // A restart: the real datapath decodes tables to entries per backend, which
    // match, so nothing is rewritten; a table it cannot place ("unknown": another
    // table size) is rewritten, and only it.
    let mut restarted = rig.fake.read_current_as_kernel().unwrap();
    assert!(matches!(
        restarted.maglev.values().next(),
        Some(MaglevDigest::Entries(_))
    ));
    assert_eq!(plan(&restarted, &d, &big()).ops, []);
    for t in restarted.maglev.values_mut() {
        *t = MaglevDigest::Unknown;
    }
    let again = plan(&restarted, &d, &big());
    assert_eq!(again.ops.len(), 1, "{:#?}", again.ops);
    assert!(matches!(again.ops[0], Op::UpsertMaglev { .. }));

    // Another range replaces the first: the new one goes in before the master would
    // change, the old one out after it; a backend leaving rewrites the table.
    let mut g = frontend("web", ext, &[be("10.0.0.1")]);
    g.flags = svc_lb_common::SVC_FLAG_SRC_RANGES;
    g.src_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    let p = rig.plan(&state(vec![g]));
    let add = pos(&p, &|o| matches!(o, Op::UpsertSrcRange { .. }));
    let del = pos(&p, &|o| matches!(o, Op::DeleteSrcRange { .. }));
    let table = pos(&p, &|o| matches!(o, Op::UpsertMaglev { .. }));
    let master = pos(&p, &|o| matches!(o, Op::UpsertMaster { .. }));
    let gone = pos(&p, &|o| matches!(o, Op::DeleteBackend { .. }));
    assert!(
        add < master && table < master && master < del && table < gone,
        "{:#?}",
        p.ops
    );
    apply_plan(&mut rig.fake, &mut rig.current, &p).unwrap();
    rig.fake.check_settled().unwrap();

    // Removal: master first, then table and ranges, backends last.
    let p = rig.plan(&DesiredState::default());
    let master = pos(&p, &|o| matches!(o, Op::DeleteMaster { .. }));
    let table = pos(&p, &|o| matches!(o, Op::DeleteMaglev { .. }));
    let range = pos(&p, &|o| matches!(o, Op::DeleteSrcRange { .. }));
    let backend = pos(&p, &|o| matches!(o, Op::DeleteBackend { .. }));
    assert!(
        master < table && master < range && table < backend,
        "{:#?}",
        p.ops
    );
    apply_plan(&mut rig.fake, &mut rig.current, &p).unwrap();
    assert!(rig.fake.maglev().is_empty() && rig.fake.src_ranges().is_empty());
}

/// The fake refuses an external master without a table, and a SRC_RANGES master
/// without ranges.
#[test]
fn fake_checks_external_invariants() {
    let ext = FrontendKey {
        addr: "192.0.2.10".parse().unwrap(),
        port: 80,
        proto: PROTO_TCP,
        scope: svc_lb_common::SCOPE_EXTERNAL,
    };
    let mut fake = FakeMaps::new(big());
    for op in [
        ub(1, be("10.0.0.1")),
        Op::UpsertRevNat {
            id: 1,
            frontend: ext,
        },
        Op::UpsertSlot {
            frontend: ext,
            slot: 1,
            backend_id: 1,
        },
    ] {
        fake.apply(&op).unwrap();
    }
    let master = |flags| Op::UpsertMaster {
        frontend: ext,
        count: 1,
        rev_nat_id: 1,
        flags,
        affinity_timeout_s: 0,
    };
    for (what, op) in [
        ("no Maglev table", master(0)),
        (
            "no source range",
            master(svc_lb_common::SVC_FLAG_SRC_RANGES),
        ),
    ] {
        let err = fake.apply(&op).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<FakeError>(),
                Some(FakeError::Invariant(_))
            ),
            "{what}: {err:#}"
        );
    }
    fake.apply(&Op::UpsertMaglev {
        rev_nat_id: 1,
        backends: vec![(1, baddr("10.0.0.1"))],
    })
    .unwrap();
    fake.apply(&master(0)).unwrap();
    // The table names backend 1: it cannot go while the master uses the table.
    fake.apply(&Op::DeleteSlot {
        frontend: ext,
        slot: 1,
    })
    .unwrap_err();
    let err = fake.apply(&Op::DeleteMaglev { rev_nat_id: 1 }).unwrap_err();
    assert!(matches!(
        err.downcast_ref::<FakeError>(),
        Some(FakeError::Invariant(_))
    ));
}

// ---- Draining backends of external frontends (issue 11, item 3) ----

mod draining {
    use svc_lb_common::{BACKEND_DRAINING, SCOPE_EXTERNAL};

    use super::*;

    fn ext() -> FrontendKey {
        FrontendKey {
            scope: SCOPE_EXTERNAL,
            ..fe("0.0.0.0", 30080)
        }
    }

    fn drain(addr: &str) -> DesiredBackend {
        DesiredBackend {
            state: BACKEND_DRAINING,
            ..be(addr)
        }
    }

    /// One external frontend selecting `backends` and draining `draining`, plus an
    /// optional socket-path frontend of the same Service.
    fn desired(
        backends: &[DesiredBackend],
        draining: &[DesiredBackend],
        socket: Option<&[DesiredBackend]>,
    ) -> DesiredState {
        let mut fronts = vec![frontend("a", ext(), backends)];
        if let Some(s) = socket {
            fronts.push(frontend("a", fe1(), s));
        }
        let mut d = state(fronts);
        if !draining.is_empty() {
            d.draining.insert(ext(), draining.to_vec());
        }
        d
    }

    fn id_of(rig: &Rig, addr: &str) -> Option<u32> {
        rig.current
            .backends
            .iter()
            .find(|(_, b)| b.addr == baddr(addr))
            .map(|(id, _)| *id)
    }

    #[test]
    fn a_backend_that_leaves_the_selection_but_serves_keeps_its_entry_and_id() {
        let mut rig = Rig::new(big());
        rig.sync(&desired(&[be("10.0.0.1"), be("10.0.0.2")], &[], None));
        let old = id_of(&rig, "10.0.0.1").unwrap();

        let p = rig.sync(&desired(&[be("10.0.0.2")], &[drain("10.0.0.1")], None));
        assert!(
            !p.ops.contains(&Op::DeleteBackend { id: old }),
            "{:?}",
            p.ops
        );
        assert!(p.ops.contains(&Op::UpsertBackend {
            id: old,
            backend: BackendEntry {
                addr: baddr("10.0.0.1"),
                state: BACKEND_DRAINING,
                local: false,
            },
        }));
        // Same id, same address: the external path's conntrack check passes. New flows
        // cannot reach it: neither the slots nor the Maglev table name it.
        assert_eq!(id_of(&rig, "10.0.0.1"), Some(old));
        let s = served(&rig.fake, &ext()).unwrap();
        assert_eq!(s.backends, vec![be("10.0.0.2")]);
        assert!(s.table.iter().all(|a| *a == baddr("10.0.0.2")));
        assert!(rig.current.aff_match.iter().all(|(_, b)| *b != old));

        // Ready again: selected under the very same id.
        rig.sync(&desired(&[be("10.0.0.1"), be("10.0.0.2")], &[], None));
        assert_eq!(id_of(&rig, "10.0.0.1"), Some(old));
        assert_eq!(rig.current.backends[&old].state, BACKEND_ACTIVE);

        // Drained, then no longer serving: the entry goes, and so do established flows.
        rig.sync(&desired(&[be("10.0.0.2")], &[drain("10.0.0.1")], None));
        let p = rig.sync(&desired(&[be("10.0.0.2")], &[], None));
        assert!(
            p.ops.contains(&Op::DeleteBackend { id: old }),
            "{:?}",
            p.ops
        );
        assert_eq!(id_of(&rig, "10.0.0.1"), None);
    }

    #[test]
    fn draining_never_creates_an_entry() {
        // No flow can be using an endpoint that never had an entry (fresh maps after a
        // wipe, or an endpoint a topology hint always left out).
        let mut rig = Rig::new(big());
        let p = rig.sync(&desired(&[be("10.0.0.2")], &[drain("10.0.0.1")], None));
        assert_eq!(id_of(&rig, "10.0.0.1"), None, "{:?}", p.ops);
        assert_eq!(rig.current.backends.len(), 1);
    }

    #[test]
    fn a_backend_selected_elsewhere_stays_active() {
        // The socket path still selects it (for example externalTrafficPolicy Local
        // leaves a remote endpoint out of the external frontend only): one shared
        // entry, and the state of the frontend that selects it wins.
        let mut rig = Rig::new(big());
        let both = [be("10.0.0.1"), be("10.0.0.2")];
        rig.sync(&desired(&both, &[], Some(&both)));
        let id = id_of(&rig, "10.0.0.1").unwrap();
        rig.sync(&desired(
            &[be("10.0.0.2")],
            &[drain("10.0.0.1")],
            Some(&both),
        ));
        assert_eq!(rig.current.backends[&id].state, BACKEND_ACTIVE);
        assert_eq!(
            served(&rig.fake, &ext()).unwrap().backends,
            vec![be("10.0.0.2")]
        );
        // The socket path drops it too: now only the draining entry holds it.
        rig.sync(&desired(
            &[be("10.0.0.2")],
            &[drain("10.0.0.1")],
            Some(&[be("10.0.0.2")]),
        ));
        assert_eq!(rig.current.backends[&id].state, BACKEND_DRAINING);
        assert_eq!(
            served(&rig.fake, &fe1()).unwrap().backends,
            vec![be("10.0.0.2")]
        );
    }

    #[test]
    fn a_removed_frontend_drains_nothing() {
        let mut rig = Rig::new(big());
        rig.sync(&desired(&[be("10.0.0.1"), be("10.0.0.2")], &[], None));
        // A stale draining list for a frontend that is gone keeps nothing alive.
        let mut d = DesiredState::default();
        d.draining.insert(ext(), vec![drain("10.0.0.1")]);
        rig.sync(&d);
        assert!(rig.current.backends.is_empty());
    }
}

/// The planner's and the mirror's share of a full sync at the bench's 10 000 Services ×
/// 3 endpoints (no store: the fake's invariant checks would dominate): prints the time
/// of each stage and checks that the mirror ends in the desired state, so that a second
/// plan is empty. Run it with
/// `cargo test --release -p svc-lb --lib full_sync_stages -- --ignored --nocapture`.
#[test]
#[ignore = "a timing run, not a unit test"]
fn full_sync_stages_at_10000_services() {
    use std::time::Instant;
    let n: u32 = 10_000;
    let frontends = (0..n)
        .map(|i| {
            let key = FrontendKey {
                addr: std::net::Ipv4Addr::from(0x0a60_0000 + i).into(),
                port: 80,
                proto: PROTO_TCP,
                scope: SCOPE_ALL,
            };
            let backends: Vec<DesiredBackend> = (0..3)
                .map(|j| DesiredBackend {
                    addr: BackendAddr {
                        addr: std::net::Ipv4Addr::from(0x0a00_0000 + i * 3 + j).into(),
                        port: 8080,
                        proto: PROTO_TCP,
                    },
                    state: BACKEND_ACTIVE,
                    local: false,
                })
                .collect();
            let mut f = frontend(&format!("svc-{i}"), key, &backends);
            f.service.namespace = format!("bench-{}", i % 100).into();
            f.port_name = "http".into();
            f
        })
        .collect();
    let desired = state(frontends);
    let cap = FakeMaps::with_default_capacity().capacity();
    for round in 0..5 {
        let t = Instant::now();
        let p = plan(&CurrentState::default(), &desired, &cap);
        let planned = t.elapsed();
        let t = Instant::now();
        let writes: usize = p
            .ops
            .iter()
            .map(|op| usize::from(codec::single_put(op).is_some()))
            .sum();
        let encoded = t.elapsed();
        let t = Instant::now();
        let mut one_by_one = CurrentState::default();
        for op in &p.ops {
            one_by_one.apply(op);
        }
        one_by_one.build_index();
        let op_by_op = t.elapsed();
        // What the first apply does (datapath::apply_plan).
        let t = Instant::now();
        let mut current = CurrentState::default();
        current.apply_bulk(&p.ops);
        current.build_index();
        let mirrored = t.elapsed();
        assert_eq!(current, one_by_one);
        let t = Instant::now();
        let again = plan(&current, &desired, &cap);
        let replanned = t.elapsed();
        println!(
            "round {round}: {} ops ({writes} puts): plan {planned:?}, encode {encoded:?}, \
             mirror {mirrored:?} (op by op {op_by_op:?}), plan again (no change) {replanned:?}",
            p.ops.len()
        );
        assert!(
            again.ops.is_empty(),
            "{:?}",
            &again.ops[..3.min(again.ops.len())]
        );
        assert_eq!(current.frontends.len(), n as usize);
        assert_eq!(current.backends.len(), 3 * n as usize);
        assert_eq!(current.meta.len(), n as usize);
    }
}

/// A full sync of 1 M backends holds over 2 M ops at once: their size is the plan's
/// memory high-water mark, so no variant may grow them back (a boxed metadata entry).
#[test]
fn an_op_stays_small() {
    assert!(
        std::mem::size_of::<Op>() <= 40,
        "size_of::<Op>() = {}",
        std::mem::size_of::<Op>()
    );
}
