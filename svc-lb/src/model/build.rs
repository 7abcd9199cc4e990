use super::{DesiredState, ModelError, NodeInfo, Objects};

/// Turns Services and EndpointSlices into the desired datapath state. Objects that
/// cannot be programmed are skipped and reported; they never affect other Services.
pub fn build(_objects: Objects<'_>, _node: &NodeInfo) -> (DesiredState, Vec<ModelError>) {
    // Filled in by the model work item.
    (DesiredState::default(), Vec::new())
}
