//! The datapath: the only code that touches BPF maps. [`MapStore`] hides the maps so
//! that an in-memory fake can run every plan in tests.
use anyhow::Result;

use crate::plan::{Capacity, CurrentState, Op};

pub mod apply;
pub mod bpf;
pub mod codec;
pub mod ctmigrate;
pub mod devices;
pub mod exttotals;
pub mod fake;
pub mod lcdemand;
pub mod links;
pub mod load;
mod oldinsn;
pub mod pinned;
pub mod pins;
pub mod poddev;
pub mod probe;
pub mod sockterm;
pub mod sys;
pub mod xdpdev;

/// The map layer the agent programs through.
pub trait MapStore {
    /// Reads the programmed state back from the maps (used at start-up, so a restarted
    /// agent adopts what is there instead of wiping it).
    fn read_current(&self) -> Result<CurrentState>;
    /// Applies one operation: the raw writes [`codec::encode`] turns it into, and
    /// nothing else. On error the maps are as they were before this operation.
    fn apply(&mut self, op: &Op) -> Result<()>;
    /// Applies `ops` in order, as [`Self::apply`] one by one does, and returns how many
    /// were applied: all of them, or those before the one that failed, with its error.
    /// A store may write a run of consecutive ops that put entries into one map with one
    /// call (the kernel store batches them); the maps then go through the same states
    /// in the same order as with single writes.
    fn apply_all(&mut self, ops: &[Op]) -> (usize, Result<()>) {
        for (i, op) in ops.iter().enumerate() {
            if let Err(e) = self.apply(op) {
                return (i, Err(e));
            }
        }
        (ops.len(), Ok(()))
    }
    fn capacity(&self) -> Capacity;
}
