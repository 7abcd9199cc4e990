//! The weighted slot layout through the planner (issue 15): slots follow
//! `DesiredFrontend::slots`, a weight change rewrites the slots and keeps the backends,
//! and a weight-0 endpoint (in the draining list) keeps its backend entry with no slot.
use svc_lb_common::BACKEND_DRAINING;

use super::{
    tests::{baddr, be, big, fe, frontend, state},
    *,
};
use crate::model::{DesiredBackend, DesiredState};

fn web(slots: Option<&[u16]>) -> DesiredState {
    let mut f = frontend(
        "web",
        fe("10.96.0.10", 80),
        &[be("10.0.0.1"), be("10.0.0.2")],
    );
    f.slots = slots.map(Into::into);
    state(vec![f])
}

fn step(cur: &mut CurrentState, desired: &DesiredState) -> Plan {
    let p = plan(cur, desired, &big());
    assert!(p.rejected.is_empty(), "{:?}", p.rejected);
    for op in &p.ops {
        cur.apply(op);
    }
    assert_eq!(
        plan(cur, desired, &big()).ops,
        [],
        "a second plan has work left"
    );
    p
}

fn slots(cur: &CurrentState) -> Vec<BackendAddr> {
    cur.frontends[&fe("10.96.0.10", 80)]
        .backend_ids
        .iter()
        .map(|id| cur.backends[id].addr)
        .collect()
}

#[test]
fn weighted_slots_follow_the_layout_and_a_weight_change_keeps_the_backends() {
    let (b1, b2) = (baddr("10.0.0.1"), baddr("10.0.0.2"));
    let mut cur = CurrentState::default();
    step(&mut cur, &web(Some(&[1, 0, 1])));
    assert_eq!(slots(&cur), [b2, b1, b2]);
    assert_eq!(cur.backends.len(), 2);

    // 1:2 → 1:1: the slots are rewritten and the count drops; no backend op.
    let p = step(&mut cur, &web(None));
    assert_eq!(slots(&cur), [b1, b2]);
    assert!(
        !p.ops
            .iter()
            .any(|o| matches!(o, Op::UpsertBackend { .. } | Op::DeleteBackend { .. })),
        "{:?}",
        p.ops
    );
}

#[test]
fn weight_zero_keeps_the_backend_entry_with_no_slot() {
    let (b1, b2) = (baddr("10.0.0.1"), baddr("10.0.0.2"));
    let mut cur = CurrentState::default();
    step(&mut cur, &web(None));
    let id1 = cur
        .backends
        .iter()
        .find(|(_, b)| b.addr == b1)
        .map(|(id, _)| *id)
        .expect("b1 programmed");

    // What the model emits for weights b1=0, b2=1.
    let key = fe("10.96.0.10", 80);
    let mut d = state(vec![frontend("web", key, &[be("10.0.0.2")])]);
    d.draining.insert(
        key,
        vec![DesiredBackend {
            state: BACKEND_DRAINING,
            ..be("10.0.0.1")
        }],
    );
    step(&mut cur, &d);
    assert_eq!(slots(&cur), [b2]);
    assert_eq!(
        cur.backends[&id1].state, BACKEND_DRAINING,
        "b1 stays, draining"
    );
}
