//! The Kubernetes source: `v1` Services and `discovery.k8s.io/v1` EndpointSlices of
//! every namespace, and this node's own `v1` Node, through kube-runtime watchers.
//!
//! How the watches behave, and why:
//! - **Initial sync.** Nothing is sent until every watch has finished its first list,
//!   and then everything goes in one snapshot. A Service listed before its
//!   EndpointSlices would otherwise be programmed with no backends for a moment, and a
//!   restarted agent would refuse connections that the pinned maps were serving.
//! - **Relists** (after a 410 Gone, or when a watch cannot be resumed) are buffered the
//!   same way: the objects of a relist replace the store in one step when the list is
//!   complete, so a relist never shows a partial list. When the relisted objects equal
//!   what the store held, nothing is sent at all.
//! - **After that**, changes are batched over [`BATCH_WINDOW`] from the first unsent
//!   change, so a rollout touching many slices becomes a few syncs, each a minimal diff.
//! - **Apiserver unreachable.** The stores keep their contents, so the datapath keeps
//!   the last programmed state. Each watch retries with a capped, jittered exponential
//!   backoff ([`RetryBackoff`]) and resumes (or relists) when the apiserver is back.
//! - **What changed.** Every snapshot names the Services whose Service object or
//!   EndpointSlices differ from the snapshot before (a slice whose
//!   `kubernetes.io/service-name` label changes counts for both Services); a change of the
//!   Node's zone label or addresses counts for all. The source keeps one persistent
//!   snapshot and updates it per event, so publishing costs O(1), not a copy of the
//!   cluster.
//! - **No-op updates** (status heartbeats, annotation churn) are dropped: objects are
//!   trimmed to the fields the model reads and compared, so only real changes reach the
//!   datapath.
use std::{
    collections::BTreeMap,
    fmt::Debug,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Node, NodeStatus, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, Event},
    },
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Changed, SliceObj, Snapshot, SvcObj, service_ref, slice_owner};
use crate::{
    model::ServiceRef,
    source::metallb::{IPAddressPool, L2Advertisement},
};

mod metallb;
mod nodes;

/// How long changes are collected, from the first unsent one, before they are sent
/// as one snapshot. Short enough that endpoint changes reach the kernel quickly, long
/// enough to fold a burst of slice updates (a rollout) into one sync.
pub const BATCH_WINDOW: Duration = Duration::from_millis(40);

/// One kind of API call the agent makes, for RBAC: `deploy/` must grant exactly these
/// (a test checks the ClusterRole against this list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group ("" for the core group).
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Every API call the agent makes. Watchers list, then watch. The only writes are the
/// LB-IPAM leader's: its Lease and the Services' `status.loadBalancer` (see
/// [`crate::lbipam::leader`]). No Events: a bad Service is the same problem on every
/// node, and one Event per node would flood a large cluster's API server.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "metallb.io",
        resource: "ipaddresspools",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "metallb.io",
        resource: "l2advertisements",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "services/status",
        verbs: &["patch"],
    },
    ApiAccess {
        group: "coordination.k8s.io",
        resource: "leases",
        // In the agent's namespace only (a Role, deploy/rbac.yaml).
        verbs: &["get", "list", "watch", "create", "update"],
    },
];

/// Builds the API client: from `kubeconfig` when given, else from `$KUBECONFIG` when
/// set, else the in-cluster service account (what a DaemonSet pod uses).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("use kubeconfig {}", path.display()))?
        }
        None => match Kubeconfig::from_env().context("read $KUBECONFIG")? {
            Some(kc) => Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .context("use $KUBECONFIG")?,
            None => Config::incluster().context(
                "in-cluster configuration (run as a pod, or pass --kubeconfig / set KUBECONFIG)",
            )?,
        },
    };
    info!(server = %config.cluster_url, "Kubernetes API client configured");
    Client::try_from(config).context("build the Kubernetes client")
}

/// Retry delays for a watch that failed: exponential from 250 ms, capped at 5 s, each
/// with ±20 % jitter so that the agents of a large cluster do not retry in lockstep when
/// the apiserver comes back. The cap is lower than client-go's 30 s because a node
/// agent's stale state is what users see: after an outage we want to converge in
/// seconds. The stream resets the backoff on the first event that succeeds.
///
/// A 410 Gone is not a failure: the apiserver is up and says "relist". The watch stream
/// raises `expired` when it passes one, and the next delay is then zero (client-go's
/// reflector also relists at once), so that recovering from an outage costs one
/// backoff, not two.
#[derive(Clone, Debug)]
pub struct RetryBackoff {
    next: Duration,
    seed: u64,
    expired: Arc<AtomicBool>,
}

impl RetryBackoff {
    pub const MIN: Duration = Duration::from_millis(250);
    pub const MAX: Duration = Duration::from_secs(5);

    /// `expired` is raised by the stream when the error it passes is a 410 Gone.
    pub fn new(expired: Arc<AtomicBool>) -> Self {
        // Any value that differs between agents works as a seed: the start time does.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Self {
            next: Self::MIN,
            seed: seed | 1,
            expired,
        }
    }

    /// xorshift64: plenty for jitter.
    fn random(&mut self) -> u64 {
        let mut x = self.seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed = x;
        x
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.expired.swap(false, Ordering::Relaxed) {
            return Some(Duration::ZERO);
        }
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // base × [0.8, 1.2)
        let permille = 800 + self.random() % 400;
        Some(base * permille as u32 / 1000)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

type Key = (String, String);

fn key(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Keeps only what identifies an object and what the model reads from its metadata.
/// The rest (managed fields, annotations such as last-applied-configuration, resource
/// versions) would cost memory and make every no-op update look like a change.
fn trim_meta(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: meta.labels.take(),
        uid: meta.uid.take(),
        ..ObjectMeta::default()
    };
}

/// The same compaction as the manifest source's (see [`super::compact_service`]), so
/// the two modes keep the same fields; the uid stays, so that a Service deleted and
/// created again is a change.
fn trim_service(mut svc: Service) -> SvcObj {
    let uid = svc.metadata.uid.take();
    let mut svc = super::compact_service(svc);
    svc.uid = uid.map(String::into_boxed_str);
    svc
}

/// The same conversion as the manifest source's. No uid: a slice deleted and created
/// again with the same content programs the same backends.
fn trim_slice(slice: EndpointSlice) -> SliceObj {
    super::compact_slice(slice)
}

/// A Node is updated every few seconds (heartbeats, conditions, images); only its zone
/// label, its addresses, its deletion and the cluster autoscaler's to-be-deleted taint
/// matter here (the last two for the health endpoint, see `health.rs`).
fn trim_node(node: &mut Node) {
    let deletion = node.metadata.deletion_timestamp.take();
    trim_meta(&mut node.metadata);
    node.metadata.deletion_timestamp = deletion;
    let taints: Vec<_> = node
        .spec
        .take()
        .and_then(|s| s.taints)
        .into_iter()
        .flatten()
        .filter(|t| t.key == crate::health::TO_BE_DELETED_TAINT)
        .collect();
    node.spec = (!taints.is_empty()).then(|| k8s_openapi::api::core::v1::NodeSpec {
        taints: Some(taints),
        ..Default::default()
    });
    let addresses = node.status.take().and_then(|s| s.addresses);
    node.status = Some(NodeStatus {
        addresses,
        ..NodeStatus::default()
    });
}

/// What one event did to one object: the object before and after it (`None`: absent).
/// A store reports only real differences, so `before != after` always holds.
type Delta<K> = (Option<Arc<K>>, Option<Arc<K>>);

/// One watched resource: the objects as of the last complete list plus the changes
/// since, and the objects of a relist in progress. Objects are trimmed (into `T`, the
/// type the source keeps) and shared: the published snapshots hold the same `Arc`s.
struct Store<K, T = K> {
    kind: &'static str,
    live: BTreeMap<Key, Arc<T>>,
    /// `Some` between `Init` and `InitDone`: the relist being collected.
    relist: Option<BTreeMap<Key, Arc<T>>>,
    /// A first list completed.
    ready: bool,
    trim: fn(K) -> T,
}

impl<K: Resource, T: PartialEq> Store<K, T> {
    fn new(kind: &'static str, trim: fn(K) -> T) -> Self {
        Self {
            kind,
            live: BTreeMap::new(),
            relist: None,
            ready: false,
            trim,
        }
    }

    /// Applies one watcher event; returns the objects it changed.
    fn apply(&mut self, event: Result<Event<K>, watcher::Error>) -> Vec<Delta<T>> {
        match event {
            Ok(Event::Init) => {
                if self.ready {
                    // A watch that cannot resume relists: after a 410 Gone, or after an
                    // outage longer than the apiserver's watch cache keeps history.
                    info!(
                        kind = self.kind,
                        "relisting; the datapath keeps its state until the list is complete"
                    );
                    crate::metrics::watch_restarted("kubernetes", "relist");
                }
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            Ok(Event::InitApply(obj)) => {
                let k = key(obj.meta());
                let obj = (self.trim)(obj);
                self.relist.get_or_insert_default().insert(k, Arc::new(obj));
                Vec::new()
            }
            Ok(Event::InitDone) => {
                let listed = self.relist.take().unwrap_or_default();
                let first = !self.ready;
                self.ready = true;
                let deltas = self.replace(listed);
                if first {
                    info!(
                        kind = self.kind,
                        objects = self.live.len(),
                        "initial list complete"
                    );
                } else {
                    info!(
                        kind = self.kind,
                        objects = self.live.len(),
                        changed = deltas.len(),
                        "relist complete"
                    );
                }
                deltas
            }
            Ok(Event::Apply(obj)) => {
                let k = key(obj.meta());
                let obj = (self.trim)(obj);
                if self.live.get(&k).is_some_and(|old| **old == obj) {
                    return Vec::new();
                }
                let new = Arc::new(obj);
                let old = self.live.insert(k, new.clone());
                vec![(old, Some(new))]
            }
            Ok(Event::Delete(obj)) => match self.live.remove(&key(obj.meta())) {
                Some(old) => vec![(Some(old), None)],
                None => Vec::new(),
            },
            Err(e) => {
                // Retried by the watcher after the backoff; the store keeps its state.
                warn!(
                    kind = self.kind,
                    error = %e,
                    "watch failed; keeping the last known state and retrying"
                );
                crate::metrics::watch_restarted("kubernetes", error_reason(&e));
                Vec::new()
            }
        }
    }

    /// Makes a complete list the live state; returns only what differs from before.
    /// Objects equal to the live ones keep the live `Arc`, so a relist that finds the
    /// same cluster changes nothing downstream.
    fn replace(&mut self, mut listed: BTreeMap<Key, Arc<T>>) -> Vec<Delta<T>> {
        let mut old = std::mem::take(&mut self.live);
        let mut deltas = Vec::new();
        for (k, new) in listed.iter_mut() {
            match old.remove(k) {
                Some(prev) if *prev == **new => *new = prev,
                prev => deltas.push((prev, Some(new.clone()))),
            }
        }
        deltas.extend(old.into_values().map(|prev| (Some(prev), None)));
        self.live = listed;
        deltas
    }
}

/// What the model reads from the Node: its zone label and its addresses (see
/// `model::node_info`). A change of anything else (other labels, the health endpoint's
/// deletion and taint) re-models nothing.
fn node_model_fields(node: Option<&Node>) -> (Option<&String>, Option<&NodeStatus>) {
    (
        node.and_then(|n| {
            n.metadata
                .labels
                .as_ref()?
                .get(crate::model::LABEL_TOPOLOGY_ZONE)
        }),
        node.and_then(|n| n.status.as_ref()),
    )
}

/// The source's view: one persistent [`Snapshot`] updated in place by every change, and
/// whether it differs from the one published last. Publishing clones it, which costs
/// O(1) whatever the cluster's size.
#[derive(Default)]
struct View {
    snap: Snapshot,
    /// Something a snapshot carries differs from the last published one. Usually that
    /// is a changed Service, but a Node change that only the health endpoint reads (its
    /// deletion, a taint) is sent too, with no Service changed.
    dirty: bool,
}

impl View {
    fn new() -> Self {
        Self {
            // The first snapshot lets the agent compare everything with the pinned maps.
            snap: Snapshot {
                changed: Changed::all(),
                ..Snapshot::default()
            },
            dirty: false,
        }
    }

    fn mark(&mut self, service: ServiceRef) {
        self.dirty = true;
        if !self.snap.changed.all {
            self.snap.changed.services.insert(service);
        }
    }

    fn services(&mut self, deltas: Vec<Delta<SvcObj>>) {
        for (old, new) in deltas {
            if let Some(old) = old {
                let r = service_ref(&old);
                self.snap.services.remove(&r);
                self.mark(r);
            }
            if let Some(new) = new {
                let r = service_ref(&new);
                self.snap.services.insert(r.clone(), new);
                self.mark(r);
            }
        }
    }

    /// A slice's owner comes from its label, which an update can change: the slice
    /// then leaves one Service and joins another, and both are changed.
    fn slices(&mut self, deltas: Vec<Delta<SliceObj>>) {
        for (old, new) in deltas {
            if let Some(old) = old
                && let Some(owner) = slice_owner(&old)
            {
                self.snap.remove_slice(&owner, &old.name);
                self.mark(owner);
            }
            if let Some(new) = new
                && let Some(owner) = self.snap.insert_slice(new)
            {
                self.mark(owner);
            }
        }
    }

    /// The watch selects this node by name, so the store holds at most one Node.
    fn node(&mut self, current: Option<&Arc<Node>>) {
        if self.snap.node.as_ref().map(Arc::as_ptr) == current.map(Arc::as_ptr) {
            return;
        }
        self.dirty = true;
        if node_model_fields(self.snap.node.as_deref()) != node_model_fields(current.map(|n| &**n))
        {
            self.snap.changed.merge(Changed::all());
        }
        self.snap.node = current.cloned();
    }

    /// The snapshot to publish now; what changes next is relative to it.
    fn publish(&mut self) -> Snapshot {
        self.dirty = false;
        let changed = std::mem::take(&mut self.snap.changed);
        Snapshot {
            changed,
            ..self.snap.clone()
        }
    }
}

/// What the source watches besides Services and EndpointSlices.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// This node's name: its Node object.
    pub node_name: Option<String>,
    /// Watch every Node (for `--l2-announce`), not only this node's.
    pub all_nodes: bool,
}

/// The stores and the view they feed.
struct State {
    services: Store<Service, SvcObj>,
    slices: Store<EndpointSlice, SliceObj>,
    nodes: Store<Node>,
    pools: Store<IPAddressPool>,
    adverts: Store<L2Advertisement>,
    /// `Some(this node's name)` when `nodes` holds every Node.
    all_nodes: Option<String>,
    view: View,
}

impl State {
    fn new() -> Self {
        Self {
            services: Store::new("Service", trim_service),
            slices: Store::new("EndpointSlice", trim_slice),
            nodes: Store::new("Node", |mut node| {
                trim_node(&mut node);
                node
            }),
            pools: Store::new("IPAddressPool", |mut p| {
                metallb::trim_pool(&mut p);
                p
            }),
            adverts: Store::new("L2Advertisement", |mut a| {
                metallb::trim_advert(&mut a);
                a
            }),
            all_nodes: None,
            view: View::new(),
        }
    }

    fn ready(&self) -> bool {
        self.services.ready
            && self.slices.ready
            && self.nodes.ready
            && self.pools.ready
            && self.adverts.ready
    }

    fn pool(&mut self, ev: Result<Event<IPAddressPool>, watcher::Error>) {
        let deltas = self.pools.apply(ev);
        self.view.dirty |= metallb::put(&mut self.view.snap.pools, deltas);
    }

    fn advert(&mut self, ev: Result<Event<L2Advertisement>, watcher::Error>) {
        let deltas = self.adverts.apply(ev);
        self.view.dirty |= metallb::put(&mut self.view.snap.l2_adverts, deltas);
    }

    fn service(&mut self, ev: Result<Event<Service>, watcher::Error>) {
        let deltas = self.services.apply(ev);
        self.view.services(deltas);
    }

    fn slice(&mut self, ev: Result<Event<EndpointSlice>, watcher::Error>) {
        let deltas = self.slices.apply(ev);
        self.view.slices(deltas);
    }

    fn node(&mut self, ev: Result<Event<Node>, watcher::Error>) {
        let deltas = self.nodes.apply(ev);
        if deltas.is_empty() {
            return;
        }
        match &self.all_nodes {
            Some(me) => {
                self.view.dirty |= nodes::put(&mut self.view.snap.nodes, &deltas);
                let mine = self.nodes.live.get(&(String::new(), me.clone()));
                self.view.node(mine);
            }
            None => self.view.node(self.nodes.live.values().next()),
        }
    }
}

/// A short, bounded label for the metrics.
fn error_reason(e: &watcher::Error) -> &'static str {
    match e {
        watcher::Error::WatchError(status) if status.code == 410 => "expired",
        watcher::Error::InitialListFailed(_) => "list_failed",
        watcher::Error::WatchStartFailed(_) => "watch_failed",
        watcher::Error::WatchError(_) => "watch_error",
        watcher::Error::WatchFailed(_) => "stream_failed",
        watcher::Error::NoResourceVersion => "no_resource_version",
    }
}

fn watch_stream<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + serde::de::DeserializeOwned + Debug + Send + 'static,
{
    // Without a backoff the watcher retries a refused connection in a hot loop.
    let expired = Arc::new(AtomicBool::new(false));
    let seen = expired.clone();
    watcher::watcher(api, config)
        .inspect(move |ev| {
            if let Err(watcher::Error::WatchError(status)) = ev
                && status.code == 410
            {
                seen.store(true, Ordering::Relaxed);
            }
        })
        .backoff(RetryBackoff::new(expired))
}

/// Watches the cluster and sends a whole [`Snapshot`] on `tx` after the initial sync
/// and after every batch of changes. Runs until the receiver is dropped; watch errors
/// are retried forever (they are logged and counted, never fatal).
pub async fn watch(client: Client, opts: Options, tx: super::Publisher) -> Result<()> {
    let node_name = opts.node_name;
    let mut state = State::new();
    let mut pool_events = metallb::watch_kind::<IPAddressPool>(client.clone()).boxed();
    let mut advert_events = metallb::watch_kind::<L2Advertisement>(client.clone()).boxed();

    let mut svc_events = watch_stream(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .boxed();
    let mut slice_events = watch_stream(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .boxed();
    let mut node_events = match &node_name {
        Some(name) if opts.all_nodes => {
            state.all_nodes = Some(name.clone());
            state.nodes.trim = |mut node| {
                nodes::trim_node_all(&mut node);
                node
            };
            watch_stream(Api::<Node>::all(client.clone()), watcher::Config::default()).boxed()
        }
        Some(name) => watch_stream(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .boxed(),
        None => {
            warn!(
                "no node name: no Node to read node addresses and the zone from; node ports and zone hints are not used"
            );
            state.nodes.ready = true;
            futures::stream::pending().boxed()
        }
    };

    let mut sent_initial = false;
    let mut dirty_since: Option<Instant> = None;
    loop {
        let deadline = match (state.ready(), sent_initial, dirty_since) {
            (false, _, _) => None,
            (true, false, _) => Some(Instant::now()),
            (true, true, Some(t)) => Some(t + BATCH_WINDOW),
            (true, true, None) => None,
        };
        let flush = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(ev) = svc_events.next() => state.service(ev),
            Some(ev) = slice_events.next() => state.slice(ev),
            Some(ev) = node_events.next() => state.node(ev),
            Some(ev) = pool_events.next() => state.pool(ev),
            Some(ev) = advert_events.next() => state.advert(ev),
            () = flush => {
                let snap = state.view.publish();
                if !sent_initial {
                    info!(
                        services = snap.services.len(),
                        slices = snap.slice_count(),
                        node = snap.node.is_some(),
                        "initial sync: every watch has listed"
                    );
                    if node_name.is_some() && snap.node.is_none() {
                        warn!(node = node_name.as_deref().unwrap_or_default(), "this node's Node object does not exist (yet); node ports and zone hints wait for it");
                    }
                } else {
                    debug!(
                        services = snap.services.len(),
                        changed_all = snap.changed.all,
                        changed_services = snap.changed.services.len(),
                        "sending a batch of changes"
                    );
                }
                if tx.publish(snap).is_err() {
                    return Ok(());
                }
                sent_initial = true;
                dirty_since = None;
                continue;
            }
        };
        if state.view.dirty && dirty_since.is_none() {
            dirty_since = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests;
