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
            map.insert(new.metadata.name.clone().unwrap_or_default(), new.clone());
        }
    }
    !deltas.is_empty()
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::super::State;
    use super::*;

    /// `heartbeat` stands for what the kubelet changes every few seconds (timestamps,
    /// messages) in the conditions.
    fn node(name: &str, ready: &str, heartbeat: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}, "resourceVersion": heartbeat},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "192.0.2.1"}],
                "conditions": [
                    {"type": "Ready", "status": ready, "message": heartbeat},
                    {"type": "MemoryPressure", "status": "False", "message": heartbeat},
                ],
            },
        }))
        .expect("a node")
    }

    /// Every store listed; the Node store holds every Node, this node is "n1".
    fn all_nodes_state() -> State {
        let mut st = State::new();
        st.all_nodes = Some("n1".into());
        st.nodes.trim = |mut node| {
            trim_node_all(&mut node);
            node
        };
        st.service(Ok(Event::Init));
        st.service(Ok(Event::InitDone));
        st.slice(Ok(Event::Init));
        st.slice(Ok(Event::InitDone));
        st.pool(Ok(Event::Init));
        st.pool(Ok(Event::InitDone));
        st.advert(Ok(Event::Init));
        st.advert(Ok(Event::InitDone));
        st.node(Ok(Event::Init));
        st.node(Ok(Event::InitApply(node(
            "n1",
            "True",
            "2025-01-15T09:30:00Z",
        ))));
        st.node(Ok(Event::InitApply(node(
            "n2",
            "True",
            "2025-01-15T09:30:00Z",
        ))));
        st.node(Ok(Event::InitDone));
        st
    }

    #[test]
    fn every_node_is_kept_with_its_readiness_and_heartbeats_are_no_change() {
        let mut st = all_nodes_state();
        assert!(st.ready());
        let snap = st.view.publish();
        assert_eq!(snap.nodes.keys().collect::<Vec<_>>(), ["n1", "n2"]);
        assert_eq!(
            snap.node.as_ref().and_then(|n| n.metadata.name.as_deref()),
            Some("n1"),
            "this node's Node"
        );
        let n2 = &snap.nodes["n2"];
        let conditions = n2
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .expect("conditions");
        assert_eq!(conditions.len(), 1, "only Ready: {conditions:?}");
        assert_eq!(
            (conditions[0].type_.as_str(), conditions[0].status.as_str()),
            ("Ready", "True")
        );
        assert!(
            conditions[0].message.is_none(),
            "what heartbeats change is dropped"
        );

        // A heartbeat changes nothing the source keeps.
        st.node(Ok(Event::Apply(node("n2", "True", "2025-01-15T09:31:00Z"))));
        assert!(!st.view.dirty);
        // Readiness does, and announcement sees it.
        st.node(Ok(Event::Apply(node(
            "n2",
            "False",
            "2025-01-15T09:32:00Z",
        ))));
        assert!(st.view.dirty);
        let snap = st.view.publish();
        assert!(
            !crate::announce::NodeView::of(&snap.nodes["n2"])
                .expect("a view")
                .usable
        );
        st.node(Ok(Event::Delete(node(
            "n2",
            "False",
            "2025-01-15T09:33:00Z",
        ))));
        assert_eq!(st.view.publish().nodes.len(), 1);
    }

    #[test]
    fn pools_and_advertisements_reach_the_snapshot() {
        let mut st = all_nodes_state();
        let _ = st.view.publish();
        let pool: crate::source::metallb::IPAddressPool = serde_json::from_value(json!({
            "metadata": {"name": "edge", "namespace": "metallb-system", "resourceVersion": "9"},
            "spec": {"addresses": ["192.0.2.0/28"]},
        }))
        .expect("a pool");
        st.pool(Ok(Event::Apply(pool.clone())));
        assert!(st.view.dirty);
        let snap = st.view.publish();
        let (r, p) = snap.pools.iter().next().expect("one pool");
        assert_eq!((&*r.namespace, &*r.name), ("metallb-system", "edge"));
        assert_eq!(r.kind, "IPAddressPool");
        assert!(p.metadata.resource_version.is_none(), "trimmed");
        st.pool(Ok(Event::Apply(pool.clone())));
        assert!(!st.view.dirty, "the same pool again is no change");
        st.pool(Ok(Event::Delete(pool)));
        assert!(st.view.publish().pools.is_empty());
    }
}
