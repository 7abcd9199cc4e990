//! The datapath: the only code that touches BPF maps. [`MapStore`] hides the maps so
//! that an in-memory fake can run every plan in tests.
use anyhow::Result;

use crate::{
    model::DesiredState,
    plan::{Capacity, CurrentState, Op},
};

pub mod affinity;
pub mod apply;
pub mod bpf;
pub mod codec;
pub mod devices;
pub mod fake;
pub mod links;
pub mod load;
pub mod pinned;
pub mod pins;
pub mod probe;
pub mod sockterm;
pub mod sys;
pub mod xdpdev;

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
    /// Session affinity, before a plan that turns `before` into `after`: drops the
    /// (backend, frontend) pairs that are leaving and forgets the clients of frontends
    /// whose affinity goes away (see [`affinity`]). Maps without affinity do nothing.
    fn affinity_prepare(&mut self, _before: &CurrentState, _after: &CurrentState) -> Result<()> {
        Ok(())
    }
    /// Session affinity, after the plan: adds the new pairs of `after`.
    fn affinity_commit(&mut self, _after: &CurrentState) -> Result<()> {
        Ok(())
    }
}
