//! Applying a plan in order, keeping the in-memory mirror in step.
use std::fmt;

use anyhow::Result;

use super::MapStore;
use crate::plan::{CurrentState, Op, Plan};

/// The context of an error from [`apply_plan`]: which op failed. Ops `0..index` were
/// applied and are mirrored in the `current` state; this one and the rest were not.
/// Callers can `downcast_ref::<OpFailed>()` the error to find it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpFailed {
    pub index: usize,
    pub total: usize,
    pub op: Op,
}

impl fmt::Display for OpFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "op {} of {} failed ({} applied): {:?}",
            self.index, self.total, self.index, self.op
        )
    }
}

/// Applies `plan.ops` in order and returns how many were applied (all of them, on
/// success). `current` is updated with each op that succeeded, so when an op fails
/// (the error carries an [`OpFailed`] context) `current` still mirrors the maps
/// exactly and a new plan can start from it.
pub fn apply_plan(
    store: &mut dyn MapStore,
    current: &mut CurrentState,
    plan: &Plan,
) -> Result<usize> {
    let total = plan.ops.len();
    let (applied, result) = store.apply_all(&plan.ops);
    let applied = applied.min(total);
    // The first apply (a full sync, often of everything) builds the planner's index
    // once, over the state it leaves: one pass instead of accounting each op. From then
    // on every op keeps it up to date.
    let first = current.index().is_none();
    for op in &plan.ops[..applied] {
        current.apply(op);
    }
    if first {
        current.build_index();
    }
    if let Err(e) = result {
        let op = plan.ops.get(applied).cloned();
        return Err(match op {
            Some(op) => e.context(OpFailed {
                index: applied,
                total,
                op,
            }),
            // A store that fails after applying every op has no op to blame.
            None => e,
        });
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use svc_lb_common::{BACKEND_ACTIVE, MAP_SVC4, PROTO_TCP, SCOPE_ALL};

    use super::*;
    use crate::{
        datapath::fake::{FakeError, FakeMaps},
        model::{BackendAddr, FrontendKey},
        plan::{BackendEntry, Capacity},
    };

    fn fe() -> FrontendKey {
        FrontendKey {
            addr: "10.96.0.1".parse().unwrap(),
            port: 80,
            proto: PROTO_TCP,
            scope: SCOPE_ALL,
        }
    }

    fn ops(n: u16) -> Vec<Op> {
        let mut ops = vec![Op::UpsertRevNat {
            id: 1,
            frontend: fe(),
        }];
        for i in 1..=n {
            let addr = BackendAddr {
                addr: format!("10.0.0.{i}").parse().unwrap(),
                port: 80,
                proto: PROTO_TCP,
            };
            ops.push(Op::UpsertBackend {
                id: u32::from(i),
                backend: BackendEntry {
                    addr,
                    state: BACKEND_ACTIVE,
                    local: false,
                },
            });
            ops.push(Op::UpsertSlot {
                frontend: fe(),
                slot: i,
                backend_id: u32::from(i),
            });
        }
        ops.push(Op::UpsertMaster {
            frontend: fe(),
            count: u32::from(n),
            rev_nat_id: 1,
            flags: 0,
            affinity_timeout_s: 0,
        });
        ops
    }

    #[test]
    fn applies_every_op_and_mirrors_them() {
        let mut fake = FakeMaps::with_default_capacity();
        let mut current = CurrentState::default();
        let plan = Plan {
            ops: ops(3),
            rejected: vec![],
        };
        assert_eq!(apply_plan(&mut fake, &mut current, &plan).unwrap(), 8);
        assert_eq!(current, fake.read_current().unwrap());
        assert_eq!(current.frontends[&fe()].backend_ids, vec![1, 2, 3]);
    }

    #[test]
    fn stops_at_the_first_failure_and_names_it() {
        // Room for the master and two slots only: the third slot fails.
        let cap = Capacity {
            svc4_entries: 2,
            svc6_entries: 0,
            backends: 8,
            rev_nats: 8,
            maglev_tables: 0,
            src_ranges4: 0,
            src_ranges6: 0,
        };
        let mut fake = FakeMaps::new(cap);
        let mut current = CurrentState::default();
        let plan = Plan {
            ops: ops(3),
            rejected: vec![],
        };
        let err = apply_plan(&mut fake, &mut current, &plan).unwrap_err();
        let failed = err.downcast_ref::<OpFailed>().unwrap();
        assert_eq!((failed.index, failed.total), (6, 8));
        assert_eq!(failed.op, plan.ops[6]);
        assert_eq!(
            err.downcast_ref::<FakeError>(),
            Some(&FakeError::MapFull {
                map: MAP_SVC4,
                capacity: 2
            })
        );
        assert!(
            format!("{err:#}").starts_with("op 6 of 8 failed (6 applied): UpsertSlot"),
            "{err:#}"
        );
        assert_eq!(fake.applied(), 6);
        assert_eq!(current, fake.read_current().unwrap());
        assert_eq!(current.frontends[&fe()].stale_slots, vec![1, 2]);
    }
}
