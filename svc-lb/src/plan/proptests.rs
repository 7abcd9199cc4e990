//! Property tests: random sequences of desired states, applied through `apply_plan`
//! on the fake maps (which check the datapath invariants after every op).
use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use svc_lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_TERMINATING, PROTO_TCP, PROTO_UDP, SCOPE_ALL,
    SCOPE_EXTERNAL,
};

use super::{
    tests::{Rig, Served, expect_served, served, svc},
    *,
};
use crate::{
    datapath::{
        MapStore,
        apply::{OpFailed, apply_plan, plan_and_apply_streamed},
        codec,
        fake::FakeError,
    },
    model::{BackendAddr, DesiredBackend, DesiredFrontend, DesiredState, FrontendKey, ServiceRef},
};

/// Frontends a desired state picks from: both families, two protocols on one address,
/// external-path frontends (node ports on the unspecified address, and the external
/// twin of a socket-path address).
const FRONTENDS: [(&str, u16, u8, u8); 9] = [
    ("10.96.0.1", 80, PROTO_TCP, SCOPE_ALL),
    ("10.96.0.1", 53, PROTO_UDP, SCOPE_ALL),
    ("10.96.0.2", 80, PROTO_TCP, SCOPE_ALL),
    ("10.96.0.3", 443, PROTO_TCP, SCOPE_ALL),
    ("fd00::1", 80, PROTO_TCP, SCOPE_ALL),
    ("fd00::2", 80, PROTO_TCP, SCOPE_ALL),
    ("0.0.0.0", 30080, PROTO_TCP, SCOPE_EXTERNAL),
    ("10.96.0.2", 80, PROTO_TCP, SCOPE_EXTERNAL),
    ("::", 30080, PROTO_TCP, SCOPE_EXTERNAL),
];
/// Source ranges an external frontend picks from, per family.
const V4_RANGES: [&str; 3] = ["10.0.0.0/8", "192.0.2.0/24", "203.0.113.7/32"];
const V6_RANGES: [&str; 2] = ["2001:db8::/32", "fd00::/8"];
/// Small backend pools, so that frontends share backends often.
const V4_POOL: [&str; 5] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"];
const V6_POOL: [&str; 3] = ["fd00:1::1", "fd00:1::2", "fd00:1::3"];
const SERVICES: [&str; 3] = ["alpha", "beta", "gamma"];

#[derive(Clone, Debug)]
struct FrontendSpec {
    present: bool,
    service: usize,
    backends: u8,
    terminating: u8,
    affinity: Option<u32>,
    /// External frontends: which source ranges, whether externalTrafficPolicy is Local.
    ranges: u8,
    ext_local: bool,
    /// External frontends: pool addresses (not among `backends`) that drain.
    draining: u8,
}

fn frontend_spec() -> impl Strategy<Value = FrontendSpec> {
    (
        prop::bool::weighted(0.7),
        0..SERVICES.len(),
        any::<u8>(),
        any::<u8>(),
        prop_oneof![3 => Just(None), 1 => Just(Some(10)), 1 => Just(Some(10_800))],
        any::<u8>(),
        prop::bool::ANY,
        any::<u8>(),
    )
        .prop_map(
            |(present, service, backends, terminating, affinity, ranges, ext_local, draining)| {
                FrontendSpec {
                    present,
                    service,
                    backends,
                    terminating,
                    affinity,
                    ranges,
                    ext_local,
                    draining,
                }
            },
        )
}

fn desired_state() -> impl Strategy<Value = DesiredState> {
    prop::collection::vec(frontend_spec(), FRONTENDS.len()).prop_map(|specs| {
        let mut d = DesiredState::default();
        for ((addr, port, proto, scope), spec) in FRONTENDS.iter().zip(specs) {
            if !spec.present {
                continue;
            }
            let key = FrontendKey {
                addr: addr.parse().unwrap(),
                port: *port,
                proto: *proto,
                scope: *scope,
            };
            let pool: &[&str] = if key.addr.is_ipv4() {
                &V4_POOL
            } else {
                &V6_POOL
            };
            let mut backends: Vec<DesiredBackend> = pool
                .iter()
                .enumerate()
                .filter(|(i, _)| spec.backends & (1 << i) != 0)
                .map(|(i, a)| DesiredBackend {
                    addr: BackendAddr {
                        addr: a.parse().unwrap(),
                        port: 8080,
                        proto: *proto,
                    },
                    state: if spec.terminating & (1 << i) != 0 {
                        BACKEND_TERMINATING
                    } else {
                        BACKEND_ACTIVE
                    },
                    local: i % 2 == 0,
                })
                .collect();
            backends.sort_unstable();
            let (mut flags, mut src_ranges) = (0, Vec::new());
            if *scope == SCOPE_EXTERNAL {
                let pool: &[&str] = if key.addr.is_ipv4() {
                    &V4_RANGES
                } else {
                    &V6_RANGES
                };
                src_ranges = pool
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| spec.ranges & (1 << i) != 0)
                    .map(|(_, r)| r.parse::<ipnet::IpNet>().unwrap())
                    .collect();
                src_ranges.sort_unstable();
                if !src_ranges.is_empty() {
                    flags |= svc_lb_common::SVC_FLAG_SRC_RANGES;
                }
                let backend_pool: &[&str] = if key.addr.is_ipv4() {
                    &V4_POOL
                } else {
                    &V6_POOL
                };
                let draining: Vec<DesiredBackend> = backend_pool
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| spec.draining & !spec.backends & (1 << i) != 0)
                    .map(|(i, a)| DesiredBackend {
                        addr: BackendAddr {
                            addr: a.parse().unwrap(),
                            port: 8080,
                            proto: *proto,
                        },
                        state: BACKEND_DRAINING,
                        local: i % 2 == 0,
                    })
                    .collect();
                if !draining.is_empty() {
                    d.draining.insert(key, draining);
                }
                if spec.ext_local {
                    flags |= svc_lb_common::SVC_FLAG_EXT_LOCAL;
                    if backends.is_empty() && spec.ranges & 0x80 != 0 {
                        flags |= svc_lb_common::SVC_FLAG_DROP_EMPTY;
                    }
                }
            }
            d.frontends.insert(
                key,
                DesiredFrontend {
                    key,
                    service: svc(SERVICES[spec.service]),
                    port_name: String::new(),
                    backends,
                    affinity_timeout_s: spec.affinity,
                    kind: svc_lb_common::KIND_CLUSTER_IP,
                    meta_flags: 0,
                    flags,
                    src_ranges,
                    scheduler: Default::default(),
                    slots: None,
                },
            );
        }
        d
    })
}

/// Tight capacities. The external-path maps are often roomy, so that the socket-path
/// maps are still the ones that fill first in many cases.
fn capacity() -> impl Strategy<Value = Capacity> {
    let extra = |max: usize| prop_oneof![2 => 0..max, 1 => Just(1000usize)];
    (
        (0usize..14, 0usize..9, 0usize..9, 0usize..6),
        (extra(4), extra(6), extra(4)),
    )
        .prop_map(
            |((svc4, svc6, backends, rev_nats), (maglev_tables, src_ranges4, src_ranges6))| {
                Capacity {
                    svc4_entries: svc4,
                    svc6_entries: svc6,
                    backends,
                    rev_nats,
                    maglev_tables,
                    src_ranges4,
                    src_ranges6,
                }
            },
        )
}

fn roomy() -> Capacity {
    Capacity {
        svc4_entries: 1000,
        svc6_entries: 1000,
        backends: 1000,
        rev_nats: 1000,
        maglev_tables: 1000,
        src_ranges4: 1000,
        src_ranges6: 1000,
    }
}

fn empty() -> Capacity {
    Capacity {
        svc4_entries: 0,
        svc6_entries: 0,
        backends: 0,
        rev_nats: 0,
        maglev_tables: 0,
        src_ranges4: 0,
        src_ranges6: 0,
    }
}

/// Everything every frontend serves, read from the raw maps.
fn all_served(
    rig: &Rig,
    keys: impl IntoIterator<Item = FrontendKey>,
) -> BTreeMap<FrontendKey, Option<Served>> {
    keys.into_iter()
        .map(|k| (k, served(&rig.fake, &k)))
        .collect()
}

/// Frontends with any key (master or slot) in the service maps.
fn frontends_in_maps(rig: &Rig) -> BTreeSet<FrontendKey> {
    rig.fake
        .svc()
        .keys()
        .map(|k| codec::frontend_of(k).0)
        .collect()
}

/// Runs one plan on a copy of the maps, one op at a time, and checks after every op
/// that the mirror equals a read-back. The fake
/// itself refuses any op that would break a datapath invariant.
fn check_op_by_op(rig: &Rig, p: &Plan) -> Result<(), TestCaseError> {
    let mut fake = rig.fake.clone();
    let mut mirror = rig.current.clone();
    for (i, op) in p.ops.iter().enumerate() {
        if let Err(e) = fake.apply(op) {
            return Err(TestCaseError::fail(format!("op {i} {op:?} failed: {e:#}")));
        }
        mirror.apply(op);
        prop_assert_eq!(
            &mirror,
            &fake.read_current().unwrap(),
            "mirror drifted after op {} {:?}",
            i,
            op
        );
    }
    Ok(())
}

/// Plans and applies one desired state and checks the outcome against it:
/// - admitted Services serve exactly their desired backends (so a removed backend gets
///   no new connection), flags and reverse NAT;
/// - rejected Services serve no backend where they were programmed (fail closed) and
///   nothing elsewhere, and are named with a reason;
/// - nothing else is left in the service maps;
/// - the plan is deterministic, and the mirror equals a read-back.
fn step(rig: &mut Rig, desired: &DesiredState) -> Result<Plan, TestCaseError> {
    let p = rig.plan(desired);
    prop_assert_eq!(&p, &rig.plan(desired), "plan is not deterministic");
    let keys: BTreeSet<FrontendKey> = desired
        .frontends
        .keys()
        .copied()
        .chain(frontends_in_maps(rig))
        .collect();
    let before = all_served(rig, keys.iter().copied());
    // The id each address has before the plan (the lowest, which the planner keeps).
    let mut ids_before: BTreeMap<BackendAddr, u32> = BTreeMap::new();
    for (id, b) in &rig.current.backends {
        ids_before.entry(b.addr).or_insert(*id);
    }
    check_op_by_op(rig, &p)?;
    if let Err(e) = apply_plan(&mut rig.fake, &mut rig.current, &p) {
        return Err(TestCaseError::fail(format!("apply failed: {e:#}")));
    }
    prop_assert_eq!(&rig.current, &rig.fake.read_current().unwrap());
    if let Err(e) = rig.fake.check_settled() {
        return Err(TestCaseError::fail(format!("after the whole plan: {e}")));
    }
    let after = all_served(rig, keys.iter().copied());

    let rejected: BTreeSet<&ServiceRef> = p.rejected.iter().map(|r| &r.service).collect();
    prop_assert_eq!(rejected.len(), p.rejected.len(), "a Service rejected twice");
    for r in &p.rejected {
        prop_assert!(
            r.reason.starts_with("map LB_")
                || r.reason.contains("backends; one frontend holds at most"),
            "unclear reason {:?}",
            r.reason
        );
        prop_assert!(desired.frontends.values().any(|f| f.service == r.service));
    }
    // One backend entry serves every frontend that names its address; when admitted
    // frontends disagree on its state, active wins.
    let mut states: BTreeMap<BackendAddr, u8> = BTreeMap::new();
    for d in desired
        .frontends
        .values()
        .filter(|d| !rejected.contains(&d.service))
    {
        for b in &d.backends {
            let s = states.entry(b.addr).or_insert(b.state);
            *s = (*s).min(b.state);
        }
    }
    for (key, d) in &desired.frontends {
        if rejected.contains(&d.service) {
            // Fail closed: what it had programmed stays, under the same reverse NAT, with
            // no backend (connections are refused); what it had not stays out.
            match &before[key] {
                None => prop_assert!(
                    after[key].is_none(),
                    "rejected {} programmed at {:?}",
                    d.service,
                    key
                ),
                Some(old) => {
                    let now = after[key].as_ref();
                    prop_assert!(
                        now.is_some_and(|s| s.backends.is_empty() && s.rev_nat == old.rev_nat),
                        "rejected {} not emptied at {:?}: {:?}",
                        d.service,
                        key,
                        now
                    );
                }
            }
        } else {
            let mut want = expect_served(d);
            for b in &mut want.backends {
                b.state = states[&b.addr];
            }
            prop_assert_eq!(
                after[key].as_ref(),
                Some(&want),
                "admitted frontend {:?}",
                key
            );
        }
    }
    // Draining: an address an admitted external frontend drains keeps the entry it had
    // (same id, same address), so established flows keep their backend; every other
    // entry is named by a slot or a Maglev table.
    let mut drained: BTreeSet<BackendAddr> = BTreeSet::new();
    for (key, list) in &desired.draining {
        let Some(d) = desired.frontends.get(key) else {
            continue;
        };
        if rejected.contains(&d.service) {
            continue;
        }
        for b in list {
            drained.insert(b.addr);
            if let Some(id) = ids_before.get(&b.addr) {
                prop_assert_eq!(
                    rig.current.backends.get(id).map(|e| e.addr),
                    Some(b.addr),
                    "draining {:?} lost its entry {}",
                    b.addr,
                    id
                );
            }
        }
    }
    let mut named: BTreeSet<u32> = rig
        .fake
        .svc()
        .iter()
        .filter(|(k, _)| codec::frontend_of(k).1 != 0)
        .map(|(_, v)| v.backend_id)
        .collect();
    named.extend(rig.fake.maglev().values().flatten().copied());
    for (id, b) in &rig.current.backends {
        prop_assert!(
            named.contains(id) || drained.contains(&b.addr),
            "backend {} ({:?}) is neither named nor draining",
            id,
            b
        );
        if !named.contains(id) {
            prop_assert_eq!(b.state, BACKEND_DRAINING);
        }
    }
    let in_maps = frontends_in_maps(rig);
    for key in &in_maps {
        let owner = desired.frontends.get(key).map(|d| &d.service);
        prop_assert!(
            owner.is_some(),
            "removed frontend {:?} left in the maps",
            key
        );
    }
    // Admitted frontends hold exactly slots 0..=count; rejected ones what they had.
    for (key, d) in &desired.frontends {
        let slots = rig
            .fake
            .svc()
            .keys()
            .filter(|k| codec::frontend_of(k).0 == *key)
            .count();
        if !rejected.contains(&d.service) {
            prop_assert_eq!(slots, d.backends.len() + 1, "stray slots at {:?}", key);
        }
    }
    Ok(p)
}

/// Syncs until a plan is empty; with enough room that is the first re-plan, with
/// tight capacity a Service rejected in one pass may fit once another one shrank.
fn converge(rig: &mut Rig, desired: &DesiredState) -> Result<(), TestCaseError> {
    let services: BTreeSet<&ServiceRef> = desired.frontends.values().map(|f| &f.service).collect();
    // One pass to apply, one to see it empty, and at most one more per Service that
    // only fits once others made room.
    for _ in 0..services.len() + 2 {
        let p = step(rig, desired)?;
        if p.ops.is_empty() {
            // A restarted agent sees the same maps and plans the same nothing.
            let fresh = plan(
                &rig.fake.read_current().unwrap(),
                desired,
                &rig.fake.capacity(),
            );
            prop_assert_eq!(fresh.ops, vec![]);
            return Ok(());
        }
    }
    Err(TestCaseError::fail("plans did not converge"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_transitions_program_exactly_the_desired_state(
        seq in prop::collection::vec(desired_state(), 1..7),
    ) {
        let mut rig = Rig::new(roomy());
        for desired in &seq {
            let p = step(&mut rig, desired)?;
            prop_assert_eq!(p.rejected, vec![]);
            // With room to spare the second plan is empty right away.
            prop_assert_eq!(rig.plan(desired).ops, vec![]);
            let fresh = plan(&rig.fake.read_current().unwrap(), desired, &rig.fake.capacity());
            prop_assert_eq!(fresh.ops, vec![]);
        }
        // Ending with nothing desired leaves nothing in any map.
        step(&mut rig, &DesiredState::default())?;
        prop_assert_eq!(rig.fake.usage(), empty());
    }

    #[test]
    fn interrupted_applies_converge_from_a_read_back(
        seq in prop::collection::vec((desired_state(), any::<prop::sample::Index>()), 1..6),
    ) {
        let mut rig = Rig::new(roomy());
        for (desired, cut) in &seq {
            let p = rig.plan(desired);
            if !p.ops.is_empty() {
                let n = cut.index(p.ops.len());
                let applied_before = rig.fake.applied();
                rig.fake.fail_after(n);
                let err = apply_plan(&mut rig.fake, &mut rig.current, &p).unwrap_err();
                prop_assert_eq!(err.downcast_ref::<FakeError>(), Some(&FakeError::Injected), "{:#}", err);
                prop_assert_eq!(err.downcast_ref::<OpFailed>().map(|f| f.index), Some(n));
                prop_assert_eq!(rig.fake.applied() - applied_before, n);
                prop_assert_eq!(&rig.current, &rig.fake.read_current().unwrap());
                // The agent re-reads after a failure.
                rig.current = rig.fake.read_current().unwrap();
            }
            converge(&mut rig, desired)?;
        }
    }

    #[test]
    fn tight_capacity_rejects_whole_services_and_never_overflows(
        cap in capacity(),
        seq in prop::collection::vec((desired_state(), prop::option::weighted(0.3, any::<prop::sample::Index>())), 1..6),
    ) {
        let mut rig = Rig::new(cap);
        for (desired, cut) in &seq {
            // Sometimes a plan is cut short first: stale slots and orphans then meet
            // rejected Services and full maps.
            let p = rig.plan(desired);
            if let (Some(cut), false) = (cut, p.ops.is_empty()) {
                rig.fake.fail_after(cut.index(p.ops.len()));
                let err = apply_plan(&mut rig.fake, &mut rig.current, &p).unwrap_err();
                prop_assert_eq!(err.downcast_ref::<FakeError>(), Some(&FakeError::Injected), "{:#}", err);
                rig.current = rig.fake.read_current().unwrap();
            }
            converge(&mut rig, desired)?;
            let used = rig.fake.usage();
            prop_assert!(used.svc4_entries <= cap.svc4_entries && used.svc6_entries <= cap.svc6_entries);
            prop_assert!(used.backends <= cap.backends && used.rev_nats <= cap.rev_nats);
            prop_assert!(used.maglev_tables <= cap.maglev_tables);
            prop_assert!(used.src_ranges4 <= cap.src_ranges4 && used.src_ranges6 <= cap.src_ranges6);
        }
    }

    #[test]
    fn capacity_never_rejects_what_fits_alone(
        desired in desired_state(),
    ) {
        // Exactly the room the whole desired state needs from empty maps: every Service
        // must be admitted, so the bound the planner uses is not too pessimistic there.
        let need = {
            let mut rig = Rig::new(roomy());
            step(&mut rig, &desired)?;
            rig.fake.usage()
        };
        let mut rig = Rig::new(need);
        let p = step(&mut rig, &desired)?;
        prop_assert_eq!(p.rejected, vec![]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// A first sync streamed in slices (of a few ops here, to cut Services and their
    /// runs of slots in every place) plans exactly the whole plan's ops, mirrors what
    /// reached the maps with the index a sequential apply builds, and, cut short at any
    /// op, converges from there like any interrupted apply.
    #[test]
    fn streamed_first_syncs_are_the_plan_in_slices(
        desired in desired_state(),
        cap in prop_oneof![Just(roomy()), capacity()],
        slice in 1usize..8,
        cut in prop::option::weighted(0.5, any::<prop::sample::Index>()),
    ) {
        let whole = plan(&CurrentState::default(), &desired, &cap);
        let mut slices: Vec<Vec<Op>> = Vec::new();
        let rejected = plan_streamed(&desired, &cap, slice, &mut |s| {
            slices.push(s);
            true
        });
        prop_assert_eq!(&rejected, &whole.rejected);
        prop_assert!(slices.iter().all(|s| !s.is_empty() && s.len() <= slice));
        prop_assert_eq!(&slices.concat(), &whole.ops);

        let mut rig = Rig::new(cap);
        let cut = cut.filter(|_| !whole.ops.is_empty()).map(|c| c.index(whole.ops.len()));
        if let Some(n) = cut {
            rig.fake.fail_after(n);
        }
        let streamed = plan_and_apply_streamed(&mut rig.fake, &mut rig.current, &desired, &cap);
        prop_assert_eq!(&streamed.rejected, &whole.rejected);
        let applied = match (cut, streamed.result) {
            (None, Ok(n)) => n,
            (Some(n), Err(err)) => {
                prop_assert_eq!(err.downcast_ref::<FakeError>(), Some(&FakeError::Injected), "{:#}", err);
                let failed = err.downcast_ref::<OpFailed>();
                prop_assert_eq!(failed.map(|f| (f.index, &f.op)), Some((n, &whole.ops[n])));
                n
            }
            (cut, result) => {
                return Err(TestCaseError::fail(format!("cut {cut:?}, result {result:?}")));
            }
        };
        prop_assert_eq!(rig.fake.applied(), applied);
        prop_assert_eq!(&rig.current, &rig.fake.read_current().unwrap());
        let mut sequential = CurrentState::default();
        for op in &whole.ops[..applied] {
            sequential.apply(op);
        }
        sequential.build_index();
        prop_assert_eq!(
            format!("{:?}", rig.current.slots_above_count),
            format!("{:?}", sequential.slots_above_count)
        );
        prop_assert_eq!(
            format!("{:?}", rig.current.index()),
            format!("{:?}", sequential.index())
        );
        if cut.is_some() {
            // The agent re-reads after a failure.
            rig.current = rig.fake.read_current().unwrap();
        }
        converge(&mut rig, &desired)?;
    }
}

/// Any operation on two frontends, with ids the setup below makes valid.
fn any_op() -> impl Strategy<Value = Op> {
    let key =
        prop_oneof![Just(("10.96.0.1", 80u16)), Just(("fd00::1", 80u16))].prop_map(|(a, p)| {
            FrontendKey {
                addr: a.parse().unwrap(),
                port: p,
                proto: PROTO_TCP,
                scope: SCOPE_ALL,
            }
        });
    prop_oneof![
        (key.clone(), 1u16..6, 1u32..4).prop_map(|(frontend, slot, backend_id)| Op::UpsertSlot {
            frontend,
            slot,
            backend_id
        }),
        (key.clone(), 0u32..6, 1u32..3, prop::bool::ANY).prop_map(
            |(frontend, count, rev_nat_id, aff)| Op::UpsertMaster {
                frontend,
                count,
                rev_nat_id,
                flags: if aff {
                    svc_lb_common::SVC_FLAG_AFFINITY
                } else {
                    0
                },
                affinity_timeout_s: 30,
            }
        ),
        (key.clone(), 1u16..6).prop_map(|(frontend, slot)| Op::DeleteSlot { frontend, slot }),
        key.prop_map(|frontend| Op::DeleteMaster { frontend }),
        (1u32..3, prop::collection::vec(1u32..5, 0..4)).prop_map(|(rev_nat_id, ids)| {
            Op::UpsertMaglev {
                rev_nat_id,
                backends: ids
                    .into_iter()
                    .map(|id| {
                        (
                            id,
                            BackendAddr {
                                addr: format!("10.0.0.{id}").parse().unwrap(),
                                port: 80,
                                proto: PROTO_TCP,
                            },
                        )
                    })
                    .collect(),
            }
        }),
        (1u32..3).prop_map(|rev_nat_id| Op::DeleteMaglev { rev_nat_id }),
        (1u32..3, prop::bool::ANY).prop_map(|(rev_nat_id, v6)| Op::UpsertSrcRange {
            rev_nat_id,
            range: if v6 { "fd00::/8" } else { "10.0.0.0/8" }.parse().unwrap(),
        }),
        (1u32..3, prop::bool::ANY).prop_map(|(rev_nat_id, v6)| Op::DeleteSrcRange {
            rev_nat_id,
            range: if v6 { "fd00::/8" } else { "10.0.0.0/8" }.parse().unwrap(),
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Not only planner-made sequences: masters that shrink below written slots, grow
    /// back over them, vanish while slots remain. Ops the fake refuses (they would break
    /// an invariant, or delete nothing) are not mirrored, as `apply_plan` would not.
    #[test]
    fn mirror_equals_read_back_after_any_accepted_op(ops in prop::collection::vec(any_op(), 1..40)) {
        let mut fake = crate::datapath::fake::FakeMaps::with_default_capacity();
        let mut mirror = CurrentState::default();
        let setup = (1..4)
            .map(|id| Op::UpsertBackend {
                id,
                backend: BackendEntry {
                    addr: BackendAddr { addr: format!("10.0.0.{id}").parse().unwrap(), port: 80, proto: PROTO_TCP },
                    state: BACKEND_ACTIVE,
                    local: false,
                },
            })
            .chain((1..3).map(|id| Op::UpsertRevNat { id, frontend: FrontendKey {
                addr: "10.96.0.9".parse().unwrap(), port: 80, proto: PROTO_TCP, scope: SCOPE_ALL,
            } }));
        for op in setup.chain(ops) {
            if fake.apply(&op).is_ok() {
                mirror.apply(&op);
            }
            prop_assert_eq!(&mirror, &fake.read_current().unwrap(), "after {:?}", op);
        }
    }
}

/// `prev` with the frontends in `touched` (and their draining lists) taken from `cand`.
fn touch(
    prev: &DesiredState,
    cand: &DesiredState,
    touched: &BTreeSet<FrontendKey>,
) -> DesiredState {
    let mut next = prev.clone();
    for fe in touched {
        match cand.frontends.get(fe) {
            Some(d) => next.frontends.insert(*fe, d.clone()),
            None => next.frontends.remove(fe),
        };
        match cand.draining.get(fe) {
            Some(d) => next.draining.insert(*fe, d.clone()),
            None => next.draining.remove(fe),
        };
    }
    next
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn touched_plans_reach_what_the_full_plan_would(
        seq in prop::collection::vec(
            (desired_state(), any::<u16>(), prop::option::weighted(0.4, any::<prop::sample::Index>())),
            1..8,
        ),
    ) {
        let mut rig = Rig::new(roomy());
        let mut desired = DesiredState::default();
        for (cand, mask, cut) in &seq {
            let keys: BTreeSet<FrontendKey> =
                desired.frontends.keys().chain(cand.frontends.keys()).copied().collect();
            let touched: BTreeSet<FrontendKey> = keys
                .into_iter()
                .enumerate()
                .filter(|(i, _)| mask >> (i % 16) & 1 == 1)
                .map(|(_, k)| k)
                .collect();
            desired = touch(&desired, cand, &touched);
            let cap = rig.fake.capacity();
            if let Some(cut) = cut {
                let p = plan_touched(&rig.current, &desired, &touched, &cap);
                if !p.ops.is_empty() {
                    rig.fake.fail_after(cut.index(p.ops.len()));
                    let err = apply_plan(&mut rig.fake, &mut rig.current, &p).unwrap_err();
                    prop_assert_eq!(err.downcast_ref::<FakeError>(), Some(&FakeError::Injected), "{:#}", err);
                    prop_assert_eq!(&rig.current, &rig.fake.read_current().unwrap());
                    // Half the time the agent keeps its mirror (and index), half the
                    // time it re-reads the maps.
                    if cut.index(2) == 0 {
                        rig.current = rig.fake.read_current().unwrap();
                    }
                }
            }
            let mut settled = false;
            for _ in 0..3 {
                let p = plan_touched(&rig.current, &desired, &touched, &cap);
                prop_assert_eq!(&p.rejected, &vec![]);
                if p.ops.is_empty() {
                    settled = true;
                    break;
                }
                if let Err(e) = apply_plan(&mut rig.fake, &mut rig.current, &p) {
                    return Err(TestCaseError::fail(format!("apply failed: {e:#}")));
                }
            }
            prop_assert!(settled, "touched plans did not converge");
            if let Err(e) = rig.fake.check_settled() {
                return Err(TestCaseError::fail(format!("after touched plans: {e}")));
            }
            prop_assert_eq!(&rig.current, &rig.fake.read_current().unwrap());
            // The index kept by every op equals one built afresh.
            if let Some(kept) = rig.current.index() {
                let mut fresh = rig.current.clone();
                fresh.build_index();
                prop_assert_eq!(format!("{kept:?}"), format!("{:?}", fresh.index().unwrap()));
                // The bulk build equals accounting the objects one at a time.
                prop_assert_eq!(
                    format!("{kept:?}"),
                    format!("{:?}", super::index::Index::build_by_objects(&rig.current))
                );
            }
            // Converged: the full plan (the periodic safety net) finds nothing to do.
            // Converged up to two known things the full plan settles: a backend entry
            // that an interrupted touched plan left with no user and no address any
            // touched frontend wants is out of the touched plans' sight; and the state
            // and locality of an entry shared with untouched frontends are decided
            // from every frontend's wishes, which only the full plan sees.
            let full = plan(&rig.current, &desired, &cap);
            prop_assert!(
                full.ops.iter().all(|op| match op {
                    Op::DeleteBackend { id } => rig.current.index().is_none_or(|ix| ix.backend_users(*id) == 0),
                    Op::UpsertBackend { id, backend } => rig.current.backends.get(id).is_some_and(|b| b.addr == backend.addr),
                    _ => false,
                }),
                "full plan after touched plans: {:?}", full.ops
            );
            if let Err(e) = apply_plan(&mut rig.fake, &mut rig.current, &full) {
                return Err(TestCaseError::fail(format!("apply failed: {e:#}")));
            }
            prop_assert_eq!(plan(&rig.current, &desired, &cap).ops, vec![]);
        }
    }
}
