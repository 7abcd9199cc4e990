//! Withdrawing is the dangerous direction. A file read at once because its writer
//! closed it may still be only the first half of what that writer means: `cat a > f;
//! cat b >> f`, or an editor that truncates in one session and writes in the next.
//! Such a read may add and change objects at once, but what it would withdraw (an
//! object, a Service port, an endpoint or a slice port) keeps its previous version until
//! the file has stayed unchanged for the settle window.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::FileContent;
use crate::{
    model::ObjectRef,
    source::{SliceObj, SvcObj as Service},
};

/// `new`, with the previous version of every object whose new version withdraws
/// something, and with the objects `old` had and `new` lacks put back at the end. True
/// when anything was held back: the file must be read again once it has settled.
pub(super) fn hold_withdrawals(old: &FileContent, mut new: FileContent) -> (FileContent, bool) {
    let services = hold(&old.services, &mut new.services, service_covers);
    let slices = hold(&old.slices, &mut new.slices, slice_covers);
    (new, services || slices)
}

fn hold<T>(
    old: &[(ObjectRef, Arc<T>)],
    new: &mut Vec<(ObjectRef, Arc<T>)>,
    covers: fn(&T, &T) -> bool,
) -> bool {
    // Within one file the first definition of a name is the one in effect.
    let mut before: HashMap<&ObjectRef, &Arc<T>> = HashMap::with_capacity(old.len());
    for (obj, value) in old {
        before.entry(obj).or_insert(value);
    }
    let mut held = false;
    let mut present = HashSet::with_capacity(new.len());
    for (obj, value) in new.iter_mut() {
        if !present.insert(obj.clone()) {
            continue;
        }
        if let Some(was) = before.get(obj)
            && !covers(was, value)
        {
            *value = Arc::clone(was);
            held = true;
        }
    }
    for (obj, value) in old {
        if present.insert(obj.clone()) {
            new.push((obj.clone(), Arc::clone(value)));
            held = true;
        }
    }
    held
}

/// Whether `new` still has every port of `old` (by protocol and number).
fn service_covers(old: &Service, new: &Service) -> bool {
    fn ports(s: &Service) -> HashSet<(&str, i32)> {
        s.spec
            .iter()
            .flat_map(|spec| spec.ports.iter())
            .map(|p| (p.protocol.as_deref().unwrap_or("TCP"), p.port))
            .collect()
    }
    ports(old).is_subset(&ports(new))
}

/// Whether `new` still has every endpoint of `old` (same address, same conditions)
/// and every port.
fn slice_covers(old: &SliceObj, new: &SliceObj) -> bool {
    let conditions = |e: &crate::source::EndpointObj| (e.ready, e.serving, e.terminating);
    let has_endpoints = old.endpoints.iter().all(|e| {
        new.endpoints
            .iter()
            .any(|n| n.address == e.address && conditions(n) == conditions(e))
    });
    let has_ports = old.ports.iter().all(|p| new.ports.iter().any(|n| n == p));
    has_endpoints && has_ports
}
