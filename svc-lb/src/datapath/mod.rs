//! The datapath: the only code that touches BPF maps. [`MapStore`] hides the maps so
//! that an in-memory fake can run every plan in tests.
use anyhow::Result;

use crate::{
    model::DesiredState,
    plan::{Capacity, CurrentState, Op},
};

pub mod apply;
pub mod bpf;
pub mod codec;
pub mod fake;
pub mod sys;

/// The map layer the agent programs through.
pub trait MapStore {
    /// Reads the programmed state back from the maps (used at start-up, so a restarted
    /// agent adopts what is there instead of wiping it).
    fn read_current(&self) -> Result<CurrentState>;
    /// Applies one operation. On error the maps are as they were before this operation.
    fn apply(&mut self, op: &Op) -> Result<()>;
    fn capacity(&self) -> Capacity;
    /// Records which Service each programmed frontend belongs to, for the CLI and
    /// metrics. The datapath never reads it, so it is written after the plan.
    fn sync_meta(&mut self, _current: &CurrentState, _desired: &DesiredState) -> Result<()> {
        Ok(())
    }
}
