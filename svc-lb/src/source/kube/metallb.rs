//! Kubernetes mode: MetalLB's `metallb.io/v1beta1` `IPAddressPool` and
//! `L2Advertisement`, watched in every namespace with the same watcher machinery as
//! Services, and fed into the same snapshot fields the manifest source fills.
//!
//! Most clusters that never ran MetalLB have no such CRDs, and an agent upgraded
//! before its RBAC may not be allowed to list them. A 404 or 403 on the list therefore
//! counts as "no objects" once (logged once), so that the initial sync of Services never
//! waits for it, and the list is retried every [`MISSING_RETRY`].
use std::{
    borrow::Cow,
    fmt::Debug,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use imbl::OrdMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Resource,
    core::NamespaceResourceScope,
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, Event},
    },
};
use tracing::{info, warn};

use super::{Delta, RetryBackoff};
use crate::{
    model::ObjectRef,
    source::metallb::{IPAddressPool, KIND_L2_ADVERTISEMENT, KIND_POOL, L2Advertisement},
};

/// How often a list that found no CRD (or no permission) is tried again. Every agent
/// does it, so this is long: a CRD installed later is picked up within it.
pub const MISSING_RETRY: Duration = Duration::from_secs(30);

pub const GROUP: &str = "metallb.io";
pub const VERSION: &str = "v1beta1";

macro_rules! metallb_resource {
    ($ty:ty, $kind:expr, $plural:expr) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(GROUP)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(VERSION)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

metallb_resource!(IPAddressPool, KIND_POOL, "ipaddresspools");
metallb_resource!(L2Advertisement, KIND_L2_ADVERTISEMENT, "l2advertisements");

/// Name, namespace and labels (L2Advertisements select pools by label); the spec is
/// kept whole (it is small).
fn trim(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: meta.labels.take().filter(|l| !l.is_empty()),
        ..ObjectMeta::default()
    };
}

pub(super) fn trim_pool(p: &mut IPAddressPool) {
    trim(&mut p.metadata);
}

pub(super) fn trim_advert(a: &mut L2Advertisement) {
    trim(&mut a.metadata);
}

fn object_ref<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectRef {
    ObjectRef {
        kind: Cow::Owned(K::kind(&()).into_owned()),
        namespace: obj.meta().namespace.clone().unwrap_or_default().into(),
        name: obj.meta().name.clone().unwrap_or_default().into(),
    }
}

/// Applies a store's deltas to the snapshot's map of that kind; true when it changed.
pub(super) fn put<K: Resource<DynamicType = ()>>(
    map: &mut OrdMap<ObjectRef, Arc<K>>,
    deltas: Vec<Delta<K>>,
) -> bool {
    let changed = !deltas.is_empty();
    for (old, new) in deltas {
        if let Some(old) = old {
            map.remove(&object_ref(&*old));
        }
        if let Some(new) = new {
            map.insert(object_ref(&*new), new);
        }
    }
    changed
}

/// The answers that mean "this kind is not served to us": no CRD, or no permission.
fn is_missing(e: &watcher::Error) -> Option<u16> {
    let err = match e {
        watcher::Error::InitialListFailed(err) | watcher::Error::WatchStartFailed(err) => err,
        _ => return None,
    };
    match err {
        kube::Error::Api(status) if status.code == 404 || status.code == 403 => Some(status.code),
        _ => None,
    }
}

/// [`RetryBackoff`], but [`MISSING_RETRY`] after a missing-kind error.
struct CrdBackoff {
    inner: RetryBackoff,
    missing: Arc<AtomicBool>,
}

impl Iterator for CrdBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.missing.swap(false, Ordering::Relaxed) {
            // Still jittered, so that the agents do not retry in lockstep.
            let step = self.inner.next().unwrap_or_default();
            return Some(MISSING_RETRY + step);
        }
        self.inner.next()
    }
}

impl Backoff for CrdBackoff {
    fn reset(&mut self) {
        self.inner.reset();
    }
}

/// A watch of one MetalLB kind in every namespace. A missing CRD (or a 403) becomes,
/// once per outage, an empty complete list, so the store is ready (and a CRD deleted
/// while watched empties it); the errors that follow are swallowed until the kind is
/// served again.
pub(super) fn watch_kind<K>(
    client: kube::Client,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + Debug
        + Send
        + 'static,
{
    let expired = Arc::new(AtomicBool::new(false));
    let missing = Arc::new(AtomicBool::new(false));
    let (seen_expired, seen_missing) = (expired.clone(), missing.clone());
    let kind = K::kind(&()).into_owned();
    let mut absent = false;
    watcher::watcher(Api::<K>::all(client), watcher::Config::default())
        .inspect(move |ev| match ev {
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                seen_expired.store(true, Ordering::Relaxed);
            }
            Err(e) if is_missing(e).is_some() => seen_missing.store(true, Ordering::Relaxed),
            _ => {}
        })
        .backoff(CrdBackoff {
            inner: RetryBackoff::new(expired),
            missing,
        })
        .flat_map(move |ev| {
            let out = match &ev {
                Err(e) => match is_missing(e) {
                    Some(_) if absent => Vec::new(),
                    Some(code) => {
                        absent = true;
                        let why = if code == 404 {
                            "the API server does not serve it (MetalLB's CRDs are not installed)"
                        } else {
                            "the agent may not list it (RBAC)"
                        };
                        warn!(
                            kind = %kind,
                            code,
                            retry_secs = MISSING_RETRY.as_secs(),
                            "{why}: no {kind}s until it is; Services are not held up"
                        );
                        vec![Ok(Event::Init), Ok(Event::InitDone)]
                    }
                    None => vec![ev],
                },
                Ok(_) => {
                    if absent {
                        info!(kind = %kind, "served now");
                        absent = false;
                    }
                    vec![ev]
                }
            };
            futures::stream::iter(out)
        })
}
