//! Kubernetes mode with `--l2-announce`: every Node, so that announcement can choose
//! among the live ones (see [`crate::announce`]). Without it the source watches only
//! this node's Node: a cluster's Nodes change every few seconds (heartbeats), and a
//! watch of all of them on every agent costs the API server M² events.
use std::sync::Arc;

use imbl::OrdMap;
use k8s_openapi::api::core::v1::{Node, NodeCondition};

use super::Delta;

/// [`super::trim_node`], plus the Ready condition's type and status (not its
/// timestamps, which the kubelet bumps every heartbeat: a trimmed Node changes only
/// when its readiness, labels or addresses do).
pub(super) fn trim_node_all(node: &mut Node) {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| NodeCondition {
            type_: c.type_.clone(),
            status: c.status.clone(),
            ..NodeCondition::default()
        });
    super::trim_node(node);
    if let Some(ready) = ready {
        node.status.get_or_insert_default().conditions = Some(vec![ready]);
    }
}

/// Applies the Node store's deltas to the snapshot's map of every Node; true when it
/// changed.
pub(super) fn put(map: &mut OrdMap<String, Arc<Node>>, deltas: &[Delta<Node>]) -> bool {
    for (old, new) in deltas {
        if let Some(old) = old {
            map.remove(old.metadata.name.as_deref().unwrap_or_default());
        }
        if let Some(new) = new {
            map.insert(
                new.metadata.name.clone().unwrap_or_default(),
                new.clone(),
            );
        }
    }
    !deltas.is_empty()
}
