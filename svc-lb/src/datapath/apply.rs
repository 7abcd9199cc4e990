//! Applying a plan in order, keeping the in-memory mirror in step.
use std::fmt;

use std::time::{Duration, Instant};

use anyhow::Result;

use super::MapStore;
use crate::{
    model::DesiredState,
    plan::{Capacity, CurrentState, Op, Plan, Rejected, plan_streamed},
};

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
    // The first apply (a full sync, often of everything) builds the planner's index
    // once, over the state it leaves: one pass instead of accounting each op. From then
    // on every op keeps it up to date.
    let first = current.index().is_none();
    let (applied, result) = if first && total >= OVERLAP_MIN_OPS {
        apply_overlapped(store, current, &plan.ops)
    } else {
        let (applied, result) = store.apply_all(&plan.ops);
        let applied = applied.min(total);
        if first {
            current.apply_bulk(&plan.ops[..applied]);
            current.build_index();
        } else {
            for op in &plan.ops[..applied] {
                current.apply(op);
            }
        }
        (applied, result)
    };
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

/// Below this many ops a second thread costs more than it hides.
const OVERLAP_MIN_OPS: usize = 4096;

/// [`apply_plan`]'s first large apply (a full sync into an empty datapath): the mirror
/// and the planner's index are built on a second thread from a copy of `current` while
/// this one waits for the kernel's inserts, which take longer. Should the store stop
/// at op `k`, the copy, which has every op, is dropped and `current` takes ops `..k`,
/// as without the overlap. Returns what [`MapStore::apply_all`] does, bounded.
fn apply_overlapped(
    store: &mut dyn MapStore,
    current: &mut CurrentState,
    ops: &[Op],
) -> (usize, Result<()>) {
    let before: &CurrentState = current;
    let (mirrored, (applied, result)) = std::thread::scope(|s| {
        let mirror = s.spawn(move || {
            let mut next = before.clone();
            next.apply_bulk(ops);
            next.build_index();
            next
        });
        let written = store.apply_all(ops);
        let mirrored = match mirror.join() {
            Ok(next) => next,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        (mirrored, written)
    });
    let applied = applied.min(ops.len());
    if applied == ops.len() {
        *current = mirrored;
    } else {
        current.apply_bulk(&ops[..applied]);
        current.build_index();
    }
    (applied, result)
}

/// Ops per slice of a streamed plan: a few MB of ops at a time, several kernel batches
/// each.
pub const STREAM_SLICE: usize = 65_536;

/// What [`plan_and_apply_streamed`] did.
#[derive(Debug)]
pub struct Streamed {
    /// Services the plan left out, as [`Plan::rejected`].
    pub rejected: Vec<Rejected>,
    /// Ops applied (every op planned, on success); on failure the error carries an
    /// [`OpFailed`] whose `total` counts the ops planned until then (planning stops at
    /// the first slice the maps refuse).
    pub result: Result<usize>,
    /// Time spent in the map writes, the rest of the call being planning and the wait
    /// for the mirror.
    pub writing: Duration,
}

/// A full sync into maps that hold nothing (`current` is empty: a first start): plans
/// and applies in slices of [`STREAM_SLICE`] ops instead of materialising the whole
/// plan (at 100 000 Services × 10 endpoints its ops alone are about 100 MB, held on
/// top of everything else at the agent's high-water mark). The slices are [`plan`]'s
/// ops in [`plan`]'s order (see [`plan_streamed`]), so the maps go through the states
/// [`apply_plan`] would take them through and a Service still becomes visible at
/// once. The mirror and the planner's index are built on a second thread from the
/// slices the maps took, as [`apply_plan`]'s first apply overlaps them with the
/// kernel's inserts; when a write fails, `current` mirrors exactly the ops applied.
///
/// [`plan`]: crate::plan::plan
pub fn plan_and_apply_streamed(
    store: &mut dyn MapStore,
    current: &mut CurrentState,
    desired: &DesiredState,
    cap: &Capacity,
) -> Streamed {
    debug_assert!(current.is_empty(), "a streamed plan starts from empty maps");
    let mut applied = 0usize;
    let mut planned = 0usize;
    let mut writing = Duration::ZERO;
    let mut failure: Option<(anyhow::Error, Option<Op>)> = None;
    // Two slices in flight: the mirror thread keeps up with the kernel's inserts, and
    // a slower mirror holds back planning rather than piling up slices.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Op>>(2);
    let (rejected, mirrored) = std::thread::scope(|s| {
        let mirror = s.spawn(move || {
            let mut next = CurrentState::default();
            for slice in rx {
                next.apply_bulk_part(&slice);
            }
            next.compact_maps();
            next.build_index();
            next
        });
        let rejected = plan_streamed(desired, cap, STREAM_SLICE, &mut |mut slice| {
            planned += slice.len();
            let started = Instant::now();
            let (done, result) = store.apply_all(&slice);
            writing += started.elapsed();
            let done = done.min(slice.len());
            applied += done;
            let go_on = match result {
                Ok(()) => true,
                Err(e) => {
                    failure = Some((e, slice.get(done).cloned()));
                    slice.truncate(done);
                    false
                }
            };
            // A send fails only if the mirror thread is gone (it panicked): the join
            // below reports that.
            let _ = tx.send(slice);
            go_on
        });
        drop(tx);
        let mirrored = match mirror.join() {
            Ok(next) => next,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        (rejected, mirrored)
    });
    *current = mirrored;
    let result = match failure {
        None => Ok(applied),
        Some((e, Some(op))) => Err(e.context(OpFailed {
            index: applied,
            total: planned,
            op,
        })),
        // A store that fails after applying every op of a slice has no op to blame.
        Some((e, None)) => Err(e),
    };
    Streamed {
        rejected,
        result,
        writing,
    }
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
                addr: std::net::Ipv4Addr::from(0x0a00_0000 + u32::from(i)).into(),
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

    /// A plan large enough for [`apply_overlapped`]: one frontend with `n` backends.
    fn large(n: u16) -> Plan {
        let plan = Plan {
            ops: ops(n),
            rejected: vec![],
        };
        assert!(plan.ops.len() >= OVERLAP_MIN_OPS);
        plan
    }

    /// `current` with `ops` applied one at a time and its index built: what the
    /// sequential path leaves.
    fn sequential(ops: &[Op]) -> CurrentState {
        let mut current = CurrentState::default();
        for op in ops {
            current.apply(op);
        }
        current.build_index();
        current
    }

    #[test]
    fn an_overlapped_apply_mirrors_like_the_sequential_one() {
        let mut fake = FakeMaps::with_default_capacity();
        let mut current = CurrentState::default();
        let plan = large(3000);
        assert_eq!(
            apply_plan(&mut fake, &mut current, &plan).unwrap(),
            plan.ops.len()
        );
        assert_eq!(current, fake.read_current().unwrap());
        assert_eq!(current, sequential(&plan.ops));
        assert_eq!(
            format!("{:?}", current.slots_above_count),
            format!("{:?}", sequential(&plan.ops).slots_above_count)
        );
        assert_eq!(
            format!("{:?}", current.index().unwrap()),
            format!("{:?}", sequential(&plan.ops).index().unwrap())
        );
        assert_eq!(current.frontends[&fe()].backend_ids.len(), 3000);
    }

    #[test]
    fn an_overlapped_apply_that_stops_mirrors_only_what_was_written() {
        // Room for 2000 slots of the 3000: the apply stops at slot 2001, after the
        // mirror thread has seen every op.
        let cap = Capacity {
            svc4_entries: 2000,
            svc6_entries: 0,
            backends: 4000,
            rev_nats: 8,
            maglev_tables: 0,
            src_ranges4: 0,
            src_ranges6: 0,
        };
        let mut fake = FakeMaps::new(cap);
        let mut current = CurrentState::default();
        let plan = large(3000);
        let err = apply_plan(&mut fake, &mut current, &plan).unwrap_err();
        let failed = err.downcast_ref::<OpFailed>().unwrap();
        assert_eq!(failed.index, fake.applied());
        assert!(matches!(failed.op, Op::UpsertSlot { slot: 2001, .. }));
        assert_eq!(current, fake.read_current().unwrap());
        let seq = sequential(&plan.ops[..failed.index]);
        assert_eq!(current, seq);
        assert_eq!(
            format!("{:?}", current.slots_above_count),
            format!("{:?}", seq.slots_above_count)
        );
        assert_eq!(
            format!("{:?}", current.index().unwrap()),
            format!("{:?}", seq.index().unwrap())
        );
        // The slots sit above a missing master; the mirror still knows their ids.
        assert_eq!(current.frontends[&fe()].stale_slots.len(), 2000);
    }

    #[test]
    fn the_bulk_mirror_equals_mirroring_op_by_op() {
        let other = FrontendKey { port: 81, ..fe() };
        let third = FrontendKey { port: 82, ..fe() };
        let slot = |frontend: FrontendKey, slot: u16, backend_id: u32| Op::UpsertSlot {
            frontend,
            slot,
            backend_id,
        };
        let master = |frontend: FrontendKey, count: u32| Op::UpsertMaster {
            frontend,
            count,
            rev_nat_id: 1,
            flags: 0,
            affinity_timeout_s: 0,
        };
        let cases: Vec<Vec<Op>> = vec![
            // A new frontend; one with a slot above its count; a slot written twice.
            vec![slot(fe(), 1, 5), slot(fe(), 2, 6), master(fe(), 2)],
            vec![slot(fe(), 1, 5), slot(fe(), 3, 7), master(fe(), 1)],
            vec![
                slot(fe(), 2, 5),
                slot(fe(), 2, 9),
                slot(fe(), 1, 4),
                master(fe(), 2),
            ],
            // Runs broken by another frontend, by slot 0, by a missing master.
            vec![
                slot(fe(), 1, 5),
                slot(other, 1, 6),
                master(fe(), 1),
                master(other, 1),
            ],
            vec![slot(fe(), 1, 5), slot(fe(), 0, 6), master(fe(), 1)],
            vec![slot(fe(), 1, 5), slot(fe(), 2, 6)],
            // A frontend the mirror holds, grown; one deleted and written again.
            vec![
                slot(fe(), 1, 5),
                master(fe(), 1),
                slot(fe(), 2, 6),
                master(fe(), 2),
                Op::DeleteMaster { frontend: fe() },
                Op::DeleteSlot {
                    frontend: fe(),
                    slot: 2,
                },
                slot(third, 1, 8),
                master(third, 1),
            ],
            vec![master(fe(), 0), slot(other, 4, 2), master(other, 3)],
        ];
        for ops in cases {
            let one_by_one = sequential(&ops);
            let mut bulk = CurrentState::default();
            bulk.apply_bulk(&ops);
            bulk.build_index();
            assert_eq!(bulk, one_by_one, "{ops:?}");
            assert_eq!(
                format!("{:?}", bulk.slots_above_count),
                format!("{:?}", one_by_one.slots_above_count),
                "{ops:?}"
            );
            assert_eq!(
                format!("{:?}", bulk.index().unwrap()),
                format!("{:?}", one_by_one.index().unwrap()),
                "{ops:?}"
            );
        }
    }
}
