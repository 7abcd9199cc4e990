use super::{Capacity, CurrentState, Plan};
use crate::model::DesiredState;

/// Diff `current` against `desired` into ordered operations (see the module docs).
pub fn plan(_current: &CurrentState, _desired: &DesiredState, _cap: &Capacity) -> Plan {
    // Filled in by the planner work item.
    Plan::default()
}
