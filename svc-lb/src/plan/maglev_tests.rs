//! Weighted Maglev tables through interrupted applies and restarts (issue 15).
//!
//! A weight change that keeps the slot count rewrites some slots, then the table, and
//! leaves the master alone. An apply cut between the slots and the table leaves slots
//! that are already right and a table with the old weights but the same backend ids;
//! the mirror's [`MaglevDigest`] holds the weights, so the retry still rewrites the
//! table. After a restart the digest is decoded from the table's entries.
use proptest::prelude::*;
use svc_lb_common::{PROTO_TCP, SCOPE_EXTERNAL};

use super::{
    tests::{Rig, be, big, frontend, served, state},
    *,
};
use crate::{
    datapath::{
        MapStore,
        apply::apply_plan,
        fake::{FAKE_MAGLEV_SIZE, FakeError},
    },
    model::{
        DesiredState,
        sched::{Scheduler, weighted_layout},
    },
};

const BACKENDS: [&str; 3] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];

fn ext() -> FrontendKey {
    FrontendKey {
        addr: "0.0.0.0".parse().unwrap(),
        port: 30080,
        proto: PROTO_TCP,
        scope: SCOPE_EXTERNAL,
    }
}

/// One external frontend (a node port) over the first `weights.len()` backends, with
/// these weights (each above 0), laid out as the model lays them out.
fn weighted(weights: &[u16]) -> DesiredState {
    let backends: Vec<_> = BACKENDS[..weights.len()].iter().map(|a| be(a)).collect();
    let mut f = frontend("web", ext(), &backends);
    f.scheduler = Scheduler::Maglev;
    let layout = weighted_layout(weights, Scheduler::Maglev);
    f.slots = Some(
        layout
            .slots
            .iter()
            .map(|i| u16::try_from(*i).unwrap())
            .collect(),
    );
    state(vec![f])
}

/// The table the frontend must hold, as backend addresses.
fn want_table(d: &DesiredState) -> Vec<BackendAddr> {
    let f = &d.frontends[&ext()];
    // Any ids do: the table is a function of the addresses and their weights.
    let id = |a: &BackendAddr| f.backends.iter().position(|b| b.addr == *a).unwrap() as u32 + 1;
    let pairs: Vec<(u32, BackendAddr)> = f.slot_backends().map(|b| (id(&b.addr), b.addr)).collect();
    crate::maglev::populate(&pairs, FAKE_MAGLEV_SIZE)
        .iter()
        .map(|id| f.backends[*id as usize - 1].addr)
        .collect()
}

/// Applies `p` with a failure injected at op `cut`.
fn apply_cut(rig: &mut Rig, p: &Plan, cut: usize) {
    rig.fake.fail_after(cut);
    let err = apply_plan(&mut rig.fake, &mut rig.current, p).unwrap_err();
    assert_eq!(
        err.downcast_ref::<FakeError>(),
        Some(&FakeError::Injected),
        "{err:#}"
    );
}

/// Plans and applies until a plan is empty; returns the number of non-empty plans.
fn converge(rig: &mut Rig, d: &DesiredState) -> Result<usize, TestCaseError> {
    for n in 0..3 {
        let p = rig.plan(d);
        prop_assert_eq!(&p.rejected, &vec![]);
        if p.ops.is_empty() {
            return Ok(n);
        }
        if let Err(e) = apply_plan(&mut rig.fake, &mut rig.current, &p) {
            return Err(TestCaseError::fail(format!("apply failed: {e:#}")));
        }
    }
    Err(TestCaseError::fail("plans did not converge"))
}

/// The frontend serves the table its weights give, and neither the mirror nor a
/// restart's read-back finds anything to do.
fn check_table(rig: &Rig, d: &DesiredState) -> Result<(), TestCaseError> {
    if let Err(e) = rig.fake.check_settled() {
        return Err(TestCaseError::fail(format!("not settled: {e}")));
    }
    let table = served(&rig.fake, &ext()).map(|s| s.table);
    prop_assert!(table == Some(want_table(d)), "table has the wrong weights");
    prop_assert_eq!(rig.plan(d).ops, vec![]);
    let restarted = rig.fake.read_current_as_kernel().unwrap();
    prop_assert_eq!(plan(&restarted, d, &big()).ops, vec![]);
    Ok(())
}

#[test]
fn a_weight_change_cut_between_the_slots_and_the_table_is_finished_by_the_retry() {
    let (before, after) = (weighted(&[1, 2]), weighted(&[2, 1]));
    for restart in [false, true] {
        let mut rig = Rig::new(big());
        rig.sync(&before);
        let p = rig.plan(&after);
        // The scenario: same slot count, so slots change, then the table, and the
        // master stays as it is.
        let table = p
            .ops
            .iter()
            .position(|o| matches!(o, Op::UpsertMaglev { .. }))
            .expect("the weight change rewrites the table");
        assert!(
            p.ops[..table]
                .iter()
                .any(|o| matches!(o, Op::UpsertSlot { .. })),
            "{:#?}",
            p.ops
        );
        assert!(
            !p.ops.iter().any(|o| matches!(o, Op::UpsertMaster { .. })),
            "{:#?}",
            p.ops
        );
        apply_cut(&mut rig, &p, table);
        // The slots are right and the ids are the same, but the table is not.
        assert_eq!(
            served(&rig.fake, &ext()).unwrap().backends,
            {
                let f = &after.frontends[&ext()];
                f.slot_backends().cloned().collect::<Vec<_>>()
            },
            "restart={restart}"
        );
        assert_eq!(
            served(&rig.fake, &ext()).unwrap().table,
            want_table(&before)
        );
        if restart {
            rig.current = rig.fake.read_current_as_kernel().unwrap();
        }
        let retry = rig.plan(&after);
        assert!(
            retry
                .ops
                .iter()
                .any(|o| matches!(o, Op::UpsertMaglev { .. })),
            "restart={restart}: the retry must rewrite the table: {:#?}",
            retry.ops
        );
        assert_eq!(converge(&mut rig, &after).unwrap(), 1);
        check_table(&rig, &after).unwrap();
    }
}

#[test]
fn a_restart_rewrites_only_tables_whose_weights_changed() {
    let mut rig = Rig::new(big());
    rig.sync(&weighted(&[1, 3]));
    let restarted = rig.fake.read_current_as_kernel().unwrap();
    assert!(matches!(
        restarted.maglev.values().next(),
        Some(MaglevDigest::Entries(_))
    ));
    assert_eq!(plan(&restarted, &weighted(&[1, 3]), &big()).ops, []);
    // The weights changed while the agent was down.
    let p = plan(&restarted, &weighted(&[3, 1]), &big());
    assert!(
        p.ops.iter().any(|o| matches!(o, Op::UpsertMaglev { .. })),
        "{:#?}",
        p.ops
    );
    rig.current = restarted;
    converge(&mut rig, &weighted(&[3, 1])).unwrap();
    check_table(&rig, &weighted(&[3, 1])).unwrap();
}

#[test]
fn digests_of_tables_read_back() {
    // A free entry, or entries past the size in use: not a table of this size.
    assert_eq!(MaglevDigest::of_table(&[1, 0, 2], 3), MaglevDigest::Unknown);
    assert_eq!(
        MaglevDigest::of_table(&[1, 2, 2, 1], 3),
        MaglevDigest::Unknown
    );
    assert_eq!(MaglevDigest::of_table(&[1, 2], 3), MaglevDigest::Unknown);
    assert_eq!(
        MaglevDigest::of_table(&[2, 1, 2, 0], 3),
        MaglevDigest::Entries(vec![(1, 1), (2, 2)])
    );
    assert_eq!(MaglevDigest::of_table(&[2, 1, 2], 3).ids(), [1, 2]);
    assert!(!MaglevDigest::Unknown.matches(&[(1, be("10.0.0.1").addr)]));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random weight changes, each possibly cut at a random op; the agent then keeps
    /// its mirror, re-reads the maps, or restarts (a kernel-like read-back). Whatever
    /// happened, the table ends with the weights wanted, and nothing is left to do.
    #[test]
    fn interrupted_weight_changes_end_with_the_wanted_table(
        seq in prop::collection::vec(
            (
                prop::collection::vec(1u16..5, 1..=BACKENDS.len()),
                prop::option::of(any::<prop::sample::Index>()),
                0u8..3,
            ),
            1..6,
        ),
    ) {
        let mut rig = Rig::new(big());
        for (weights, cut, reread) in &seq {
            let d = weighted(weights);
            let p = rig.plan(&d);
            if let (Some(cut), false) = (cut, p.ops.is_empty()) {
                apply_cut(&mut rig, &p, cut.index(p.ops.len()));
                match reread {
                    0 => {}
                    1 => rig.current = rig.fake.read_current().unwrap(),
                    _ => rig.current = rig.fake.read_current_as_kernel().unwrap(),
                }
            }
            converge(&mut rig, &d)?;
            check_table(&rig, &d)?;
        }
    }
}
