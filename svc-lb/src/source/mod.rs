//! Sources produce Kubernetes objects only. Every source feeds the same model, so the
//! manifest mode and the cluster mode cannot drift apart.
//!
//! A source keeps its objects as shared `Arc`s in persistent maps and publishes whole
//! [`Snapshot`]s through a [`Feed`]: a snapshot is cheap to clone (the maps share their
//! structure), and each one says which Services changed since the one before it, so
//! that the agent re-models only those ([`Changed`]).
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use imbl::OrdMap;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::model::{
    ANNOTATION_LB_SOURCE_RANGES, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ObjectRef, ServiceRef,
};

pub mod kube;
pub mod manifests;
pub mod metallb;
mod objects;

pub use objects::{
    AddressType, EndpointAddress, EndpointHintsObj, EndpointObj, EndpointPortObj, IngressObj,
    SliceObj, StrPairs, SvcObj, SvcPortObj, SvcSpec,
};

/// A complete, consistent view of the objects a source knows. Sources publish whole
/// snapshots, never partial updates, so the model never sees a half-read directory or
/// half of a watch batch.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Services by namespace/name. A source holds at most one object per name (the
    /// manifest source reports later definitions of a name as errors).
    pub services: OrdMap<ServiceRef, Arc<SvcObj>>,
    /// EndpointSlices by the Service they belong to (the slice's namespace and its
    /// `kubernetes.io/service-name` label), then by slice name. A slice without that
    /// label belongs to no Service: sources leave it out.
    pub slices: OrdMap<ServiceRef, SliceGroup>,
    /// This node's Node object, when the source knows it (the Kubernetes source).
    pub node: Option<Arc<Node>>,
    /// Where each object came from (a manifest file), for error messages; one shared
    /// path per file.
    pub origins: OrdMap<ObjectRef, Arc<Path>>,
    /// Input that could not be read or parsed, already named and explained.
    pub errors: Arc<Vec<SourceError>>,
    /// What differs from the snapshot published before this one.
    pub changed: Changed,
    /// Every Node by name (the manifest source's `v1` Node objects), for L2
    /// announcement; a change here changes no Service.
    pub nodes: OrdMap<String, Arc<Node>>,
    /// MetalLB `IPAddressPool`s and `L2Advertisement`s (see [`crate::lbipam`]). A change
    /// of these marks no Service changed by itself: the allocator marks the Services
    /// whose addresses it moves.
    pub pools: OrdMap<ObjectRef, Arc<metallb::IPAddressPool>>,
    pub l2_adverts: OrdMap<ObjectRef, Arc<metallb::L2Advertisement>>,
}

/// Which Services a snapshot changed, relative to the one published before it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Anything may differ (the first snapshot, a relist, a change of the Node): every
    /// Service is re-modelled.
    pub all: bool,
    /// Services whose Service object or EndpointSlices were added, changed or removed
    /// (a slice that moves to another Service changes both).
    pub services: BTreeSet<ServiceRef>,
}

impl Changed {
    pub fn all() -> Self {
        Self {
            all: true,
            services: BTreeSet::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }

    /// What changed over two steps: this, then `later`.
    pub fn merge(&mut self, later: Changed) {
        self.all |= later.all;
        if self.all {
            self.services.clear();
        } else {
            self.services.extend(later.services);
        }
    }

    /// Whether `service` must be re-modelled.
    pub fn contains(&self, service: &ServiceRef) -> bool {
        self.all || self.services.contains(service)
    }
}

impl Snapshot {
    /// Indexes plain object lists, as tests and one-shot loads have them; every
    /// Service counts as changed. A later object with the same name replaces an
    /// earlier one; slices without a `kubernetes.io/service-name` label are left out.
    /// Services may be k8s-openapi ones (converted here) or [`SvcObj`]s.
    pub fn from_lists(
        services: impl IntoIterator<Item = impl Into<SvcObj>>,
        slices: Vec<EndpointSlice>,
    ) -> Self {
        let mut snap = Snapshot {
            changed: Changed::all(),
            ..Snapshot::default()
        };
        for svc in services {
            let svc: SvcObj = svc.into();
            snap.services.insert(service_ref(&svc), Arc::new(svc));
        }
        for slice in slices {
            snap.insert_slice(Arc::new(slice.into()));
        }
        snap
    }

    /// Files `slice` under its Service; returns that Service, or `None` (and leaves the
    /// slice out) when it has no `kubernetes.io/service-name` label.
    pub fn insert_slice(&mut self, slice: Arc<SliceObj>) -> Option<ServiceRef> {
        let owner = slice_owner(&slice)?;
        self.slices.entry(owner.clone()).or_default().insert(slice);
        Some(owner)
    }

    /// Files `slice` under `owner`, its [`slice_owner`] as the caller already has it
    /// (sharing its strings with the caller's copy).
    pub(crate) fn insert_slice_under(&mut self, owner: ServiceRef, slice: Arc<SliceObj>) {
        self.slices.entry(owner).or_default().insert(slice);
    }

    /// Removes the slice `name` of Service `owner`; true when it was there.
    pub fn remove_slice(&mut self, owner: &ServiceRef, name: &str) -> bool {
        let Some(group) = self.slices.get_mut(owner) else {
            return false;
        };
        let removed = group.remove(name).is_some();
        if group.is_empty() {
            self.slices.remove(owner);
        }
        removed
    }

    /// Every slice, in (Service, slice name) order.
    pub fn all_slices(&self) -> impl Iterator<Item = &Arc<SliceObj>> {
        self.slices.values().flat_map(|group| group.values())
    }

    /// The number of slices.
    pub fn slice_count(&self) -> usize {
        self.slices.values().map(SliceGroup::len).sum()
    }
}

/// The EndpointSlices of one Service, by name. Most Services have one slice, so this
/// is a vector sorted by name (one small allocation) rather than a map (a tree node of
/// several hundred bytes per Service); the name is the slice's own `metadata.name`,
/// not a second copy of it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SliceGroup(Vec<Arc<SliceObj>>);

fn slice_name(slice: &SliceObj) -> &str {
    &slice.name
}

impl SliceGroup {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|s| slice_name(s).cmp(name))
    }

    /// The slice named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<SliceObj>> {
        self.find(name).ok().map(|i| &self.0[i])
    }

    /// Adds `slice`, or replaces the one of the same name (returned).
    pub fn insert(&mut self, slice: Arc<SliceObj>) -> Option<Arc<SliceObj>> {
        match self.find(slice_name(&slice)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i], slice)),
            Err(i) => {
                self.0.insert(i, slice);
                None
            }
        }
    }

    /// Removes the slice named `name`.
    pub fn remove(&mut self, name: &str) -> Option<Arc<SliceObj>> {
        let i = self.find(name).ok()?;
        let removed = self.0.remove(i);
        self.0.shrink_to_fit();
        Some(removed)
    }

    /// The slices in name order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<SliceObj>> {
        self.0.iter()
    }

    /// The slice names in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|s| slice_name(s))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The namespace/name of a Service ("default" namespace when unset, as the API server
/// fills it in).
pub fn service_ref(svc: &SvcObj) -> ServiceRef {
    ServiceRef {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
    }
}

/// The Service an EndpointSlice belongs to: its namespace and its
/// `kubernetes.io/service-name` label.
pub fn slice_owner(slice: &SliceObj) -> Option<ServiceRef> {
    Some(ServiceRef {
        namespace: objects::shared_name(&slice.namespace),
        name: slice.service_name.as_deref()?.into(),
    })
}

/// Service annotations kept by [`compact_service`]: the ones the model reads, svc-lb's
/// own (`svc-lb.io/…`) and MetalLB's (LB-IPAM reads those). A new reader of an
/// annotation adds it here.
const KEPT_SERVICE_ANNOTATIONS: &[&str] = &[ANNOTATION_LB_SOURCE_RANGES];
const KEPT_SERVICE_ANNOTATION_PREFIXES: &[&str] =
    &["svc-lb.io/", "metallb.io/", "metallb.universe.tf/"];

/// Service labels kept by [`compact_service`]: the ones the model reads. Nothing selects
/// Services by label (LB-IPAM refuses pools with `serviceSelectors`), and each label
/// map costs a 540-byte tree node: at 10 000 Services the labels and selectors were
/// 10 MiB of the agent's 67 MiB heap. A new reader of a label adds it here.
const KEPT_SERVICE_LABELS: &[&str] = &[LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME];

/// Whether `key` is an annotation something downstream reads (see
/// [`KEPT_SERVICE_ANNOTATIONS`]).
pub fn is_kept_service_annotation(key: &str) -> bool {
    KEPT_SERVICE_ANNOTATIONS.contains(&key)
        || KEPT_SERVICE_ANNOTATION_PREFIXES
            .iter()
            .any(|p| key.starts_with(p))
}

/// Whether `key` is a label something downstream reads (see [`KEPT_SERVICE_LABELS`]).
pub fn is_kept_service_label(key: &str) -> bool {
    KEPT_SERVICE_LABELS.contains(&key)
}

/// Converts a decoded Service into the sources' own small type, dropping what nothing
/// downstream reads (see [`SvcObj`] for what it keeps and why). Both sources convert
/// every object the same way, so equal input still compares equal.
pub fn compact_service(svc: Service) -> SvcObj {
    svc.into()
}

/// Like [`compact_service`], for an EndpointSlice: its own small type (see
/// [`SliceObj`] for what it keeps and why).
pub fn compact_slice(slice: EndpointSlice) -> SliceObj {
    slice.into()
}

/// Bad input found by a source: the file (if any), the object (if known), the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    pub file: Option<PathBuf>,
    pub object: Option<ObjectRef>,
    pub reason: String,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(obj) = &self.object {
            write!(f, "{obj}: ")?;
        }
        f.write_str(&self.reason)
    }
}

/// A one-slot channel of snapshots from one source to the agent. Publishing while the
/// agent is busy replaces the waiting snapshot and merges what both changed, so the
/// agent always gets the newest view and never misses a changed Service.
pub fn feed() -> (Publisher, Subscriber) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            subscribed: true,
            ..Pending::default()
        }),
        notify: tokio::sync::Notify::new(),
        gone: tokio::sync::Notify::new(),
    });
    (
        Publisher {
            shared: shared.clone(),
        },
        Subscriber { shared },
    )
}

#[derive(Default)]
struct Pending {
    snapshot: Option<Snapshot>,
    closed: bool,
    subscribed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the subscriber: a snapshot or the end.
    notify: tokio::sync::Notify,
    /// Wakes the publisher: the subscriber is gone.
    gone: tokio::sync::Notify,
}

impl Shared {
    // A panic while holding the lock leaves a consistent `Pending` (each update is a
    // single assignment), so a poisoned lock is still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The source's end of a [`feed`].
pub struct Publisher {
    shared: Arc<Shared>,
}

/// The subscriber is gone (the agent stopped).
#[derive(Debug)]
pub struct Closed;

impl Publisher {
    pub fn publish(&self, mut snapshot: Snapshot) -> Result<(), Closed> {
        {
            let mut p = self.shared.lock();
            if !p.subscribed {
                return Err(Closed);
            }
            if let Some(older) = p.snapshot.take() {
                let mut changed = older.changed;
                changed.merge(std::mem::take(&mut snapshot.changed));
                snapshot.changed = changed;
            }
            p.snapshot = Some(snapshot);
        }
        self.shared.notify.notify_one();
        Ok(())
    }
}

impl Publisher {
    /// Resolves once the subscriber is gone, so that a source with nothing to publish
    /// still stops.
    pub async fn closed(&self) {
        while self.shared.lock().subscribed {
            self.shared.gone.notified().await;
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.notify.notify_one();
    }
}

/// The agent's end of a [`feed`].
pub struct Subscriber {
    shared: Arc<Shared>,
}

impl Subscriber {
    /// The newest snapshot not yet taken, waiting for one; `None` once the source has
    /// stopped and everything it published was taken.
    pub async fn next(&mut self) -> Option<Snapshot> {
        loop {
            {
                let mut p = self.shared.lock();
                p.subscribed = true;
                if let Some(s) = p.snapshot.take() {
                    return Some(s);
                }
                if p.closed {
                    return None;
                }
            }
            self.shared.notify.notified().await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.shared.lock().subscribed = false;
        self.shared.gone.notify_one();
    }
}

#[cfg(test)]
mod compact_tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("a Service")
    }

    #[test]
    fn compaction_keeps_what_is_read_and_drops_the_rest() {
        let full = svc(r#"
metadata:
  name: web
  uid: u1
  labels: {app: web, service.kubernetes.io/service-proxy-name: svc-lb}
  annotations:
    svc-lb.io/scheduler: maglev
    metallb.io/address-pool: edge
    kubectl.kubernetes.io/last-applied-configuration: "{}"
spec:
  type: ClusterIP
  selector: {app: web}
  clusterIP: 10.0.0.1
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.1, ipMode: VIP}, {hostname: lb.example}]
"#);
        let c = compact_service(full.clone());
        assert_eq!(&*c.name, "web");
        assert_eq!(&*c.namespace, "default");
        assert_eq!(c.uid, None, "the manifest source keeps no uid");
        assert_eq!(
            c.label(LABEL_SERVICE_PROXY_NAME),
            Some("svc-lb"),
            "{:?}",
            c.labels
        );
        assert_eq!(c.labels.len(), 1, "{:?}", c.labels);
        let kept: Vec<&str> = c.annotations.iter().map(|(k, _)| &**k).collect();
        assert_eq!(kept, ["metallb.io/address-pool", "svc-lb.io/scheduler"]);
        assert_eq!(c.annotation("svc-lb.io/scheduler"), Some("maglev"));
        let spec = c.spec.as_ref().expect("spec");
        assert_eq!(spec.selector, None, "no reader of a ClusterIP selector");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(spec.ports.len(), 1);
        assert_eq!(c.ingress.len(), 2);
        assert_eq!(c.ingress[0].ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(c.ingress[1].ip, None);

        // No label left: none kept.
        let mut plain = full.clone();
        plain.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
        assert!(compact_service(plain).labels.is_empty());

        // LB-IPAM compares the selectors of LoadBalancer Services that share.
        let mut lb = full;
        lb.spec.as_mut().expect("spec").type_ = Some("LoadBalancer".into());
        let c = compact_service(lb);
        assert!(c.spec.and_then(|s| s.selector).is_some());
    }
}
