//! Applying a plan, op by op, keeping the in-memory mirror in step.
use std::fmt;

use anyhow::{Context, Result};

use super::MapStore;
use crate::plan::{CurrentState, Op, Plan, StaleSlotIds};

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
        write!(f, "op {} of {} failed ({} applied): {:?}", self.index, self.total, self.index, self.op)
    }
}

/// Applies `plan.ops` in order and returns how many were applied (all of them, on
/// success). `current` is updated after each op that succeeded, so when an op fails
/// (the error carries an [`OpFailed`] context) `current` still mirrors the maps
/// exactly and a new plan can start from it.
pub fn apply_plan(store: &mut dyn MapStore, current: &mut CurrentState, plan: &Plan) -> Result<usize> {
    // One ledger for the whole plan: a master that grows reveals slots written above the
    // old count earlier in the same plan.
    let mut ledger = StaleSlotIds::default();
    let total = plan.ops.len();
    for (index, op) in plan.ops.iter().enumerate() {
        store.apply(op).with_context(|| OpFailed { index, total, op: op.clone() })?;
        current.apply_tracked(op, &mut ledger);
    }
    Ok(total)
}
