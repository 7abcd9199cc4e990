//! The model kept up to date one changed Service at a time, for the agent.
//!
//! Most rules look at one Service (with its slices) alone. The rules between Services
//! (a cluster IP, node port, load-balancer or external IP, or `healthCheckNodePort`
//! that two Services want: the first in namespace/name order wins, see
//! [`build`](super::build)) only ever compare Services that list the same key. So the
//! cache indexes who could claim which key ([`ClaimKey`]); a changed Service is
//! re-modelled together with every Service reachable from it through shared keys (its
//! old keys and its new ones), in order, by the same code as the full build. That group
//! shares no key with anyone else, so its result is the full build's; in a cluster
//! where addresses do not clash it is the changed Service alone.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::Entry};

use super::{
    DesiredBackend, DesiredFrontend, DesiredState, FrontendKey, ModelError, NodeInfo, ServiceRef,
    build::{ClaimKey, Input, Outcome, claim_keys, model_group},
};
use crate::source::Snapshot;

/// The desired state and the problems of every Service, long-lived in the agent and
/// updated in place by [`Cache::update`].
#[derive(Debug, Default)]
pub struct Cache {
    /// The node of the last update: any change of it re-models everything.
    node: Option<NodeInfo>,
    units: BTreeMap<ServiceRef, Unit>,
    /// Who lists each key, sorted. Most keys have one claimant.
    claimants: HashMap<ClaimKey, Vec<ServiceRef>>,
    desired: DesiredState,
    error_count: usize,
}

/// One Service's share of the state: what it may claim, what it holds in `desired`
/// (the values live there only), and its problems.
#[derive(Debug, Default)]
struct Unit {
    keys: Vec<ClaimKey>,
    frontends: Vec<FrontendKey>,
    health: Option<u16>,
    errors: Vec<ModelError>,
}

impl Unit {
    fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.frontends.is_empty()
            && self.health.is_none()
            && self.errors.is_empty()
    }
}

/// What an update changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// Everything was re-modelled: plan every frontend.
    pub all: bool,
    /// Frontends whose desired entry (or its draining endpoints) was added, changed or
    /// removed; empty when `all`.
    pub frontends: BTreeSet<FrontendKey>,
    /// The Services re-modelled, whose problems may have changed; empty when `all`.
    pub services: BTreeSet<ServiceRef>,
}

impl Touched {
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }
}

/// A desired entry as it was before an update.
type Before = HashMap<FrontendKey, (Option<DesiredFrontend>, Option<Vec<DesiredBackend>>)>;

impl Cache {
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn into_desired(self) -> DesiredState {
        self.desired
    }

    /// Every problem, per Service in namespace/name order.
    pub fn errors(&self) -> impl Iterator<Item = &ModelError> {
        self.units.values().flat_map(|u| u.errors.iter())
    }

    /// The problems of one Service (of it and of its slices).
    pub fn errors_of(&self, service: &ServiceRef) -> &[ModelError] {
        self.units.get(service).map_or(&[], |u| u.errors.as_slice())
    }

    /// The Services with problems.
    pub fn services_with_errors(&self) -> impl Iterator<Item = &ServiceRef> {
        self.units
            .iter()
            .filter(|(_, u)| !u.errors.is_empty())
            .map(|(sref, _)| sref)
    }

    pub fn error_count(&self) -> usize {
        self.error_count
    }

    /// Brings the state up to `snap`: re-models the Services `snap.changed` names (and
    /// the Services they contend with for an address), or everything when it says all
    /// or when `node` differs from the last call.
    pub fn update(&mut self, snap: &Snapshot, node: &NodeInfo) -> Touched {
        if snap.changed.all || self.node.as_ref() != Some(node) {
            self.rebuild(snap, node);
            return Touched::all();
        }
        if snap.changed.services.is_empty() {
            return Touched::default();
        }
        let mut frontier: Vec<ClaimKey> = Vec::new();
        for sref in &snap.changed.services {
            let keys = claim_keys(sref, snap.services.get(sref).map(|s| &**s), node);
            let unit = self.units.entry(sref.clone()).or_default();
            if unit.keys != keys {
                for k in &unit.keys {
                    unclaim(&mut self.claimants, k, sref);
                }
                for k in &keys {
                    claim(&mut self.claimants, *k, sref);
                }
                frontier.extend(&unit.keys);
            }
            frontier.extend(&keys);
            unit.keys = keys;
        }
        // Everyone reachable through a shared key, old or new.
        let mut group = snap.changed.services.clone();
        let mut seen: HashSet<ClaimKey> = HashSet::new();
        while let Some(key) = frontier.pop() {
            if !seen.insert(key) {
                continue;
            }
            for other in self.claimants.get(&key).into_iter().flatten() {
                if !group.contains(other) {
                    group.insert(other.clone());
                    if let Some(u) = self.units.get(other) {
                        frontier.extend(&u.keys);
                    }
                }
            }
        }
        let inputs: Vec<Input<'_>> = group.iter().map(|s| Input::of(snap, s)).collect();
        let outcomes = model_group(&inputs, node);
        let mut before = Before::new();
        for sref in &group {
            self.remove(sref, Some(&mut before));
        }
        for (sref, outcome) in group.iter().zip(outcomes) {
            self.install(sref, outcome, Some(&mut before));
            if self.units.get(sref).is_some_and(Unit::is_empty) {
                self.units.remove(sref);
            }
        }
        let frontends = before
            .into_iter()
            .filter(|(key, (fe, draining))| {
                self.desired.frontends.get(key) != fe.as_ref()
                    || self.desired.draining.get(key) != draining.as_ref()
            })
            .map(|(key, _)| key)
            .collect();
        Touched {
            all: false,
            frontends,
            services: group,
        }
    }

    /// Re-models every Service from scratch. Returns whether the desired state or the
    /// number of problems differs from before: after an update of the same snapshot
    /// and node, that would be a fault of the incremental path.
    pub fn rebuild(&mut self, snap: &Snapshot, node: &NodeInfo) -> bool {
        let refs: BTreeSet<&ServiceRef> = snap.services.keys().chain(snap.slices.keys()).collect();
        let inputs: Vec<Input<'_>> = refs.iter().map(|s| Input::of(snap, s)).collect();
        let outcomes = model_group(&inputs, node);
        let old = std::mem::take(self);
        self.node = Some(node.clone());
        for (input, mut outcome) in inputs.iter().zip(outcomes) {
            let keys = std::mem::take(&mut outcome.keys);
            for k in &keys {
                claim(&mut self.claimants, *k, input.sref);
            }
            self.units.entry(input.sref.clone()).or_default().keys = keys;
            self.install(input.sref, outcome, None);
            if self.units.get(input.sref).is_some_and(Unit::is_empty) {
                self.units.remove(input.sref);
            }
        }
        // Kept until the next rebuild and grown here by scattered inserts: pack their
        // nodes (see `mem::compact`).
        crate::mem::compact(&mut self.units);
        crate::mem::compact(&mut self.desired.frontends);
        crate::mem::compact(&mut self.desired.draining);
        old.desired != self.desired || old.error_count != self.error_count
    }

    /// Takes what `sref` holds out of `desired`, noting the old entries in `before`.
    fn remove(&mut self, sref: &ServiceRef, mut before: Option<&mut Before>) {
        self.desired.skipped.remove(sref);
        self.desired.over_limit.remove(sref);
        let Some(unit) = self.units.get_mut(sref) else {
            return;
        };
        for key in std::mem::take(&mut unit.frontends) {
            let fe = self.desired.frontends.remove(&key);
            let draining = self.desired.draining.remove(&key);
            if let Some(b) = before.as_deref_mut() {
                b.entry(key).or_insert((fe, draining));
            }
        }
        if let Some(port) = unit.health.take() {
            self.desired.health_checks.remove(&port);
        }
        self.error_count -= unit.errors.len();
        unit.errors.clear();
    }

    /// Puts a fresh outcome of `sref` (whose old one was removed) into `desired`.
    fn install(&mut self, sref: &ServiceRef, outcome: Outcome, mut before: Option<&mut Before>) {
        let unit = self.units.entry(sref.clone()).or_default();
        let mut draining: HashMap<FrontendKey, Vec<DesiredBackend>> =
            outcome.draining.into_iter().collect();
        for fe in outcome.frontends {
            let key = fe.key;
            if let Some(b) = before.as_deref_mut() {
                // A key that no one in the group held before.
                b.entry(key).or_insert_with(|| {
                    (
                        self.desired.frontends.get(&key).cloned(),
                        self.desired.draining.get(&key).cloned(),
                    )
                });
            }
            unit.frontends.push(key);
            self.desired.frontends.insert(key, fe);
            if let Some(d) = draining.remove(&key) {
                self.desired.draining.insert(key, d);
            }
        }
        if let Some((port, check)) = outcome.health {
            unit.health = Some(port);
            self.desired.health_checks.insert(port, check);
        }
        if let Some(skipped) = outcome.skipped {
            self.desired.skipped.insert(sref.clone(), skipped);
        }
        if outcome.over_limit {
            self.desired.over_limit.insert(sref.clone());
        }
        self.error_count += outcome.errors.len();
        unit.errors = outcome.errors;
        // Long-lived: keep no doubling slack (one Service usually has one to three
        // frontends, and a vector grown by pushes holds four).
        unit.frontends.shrink_to_fit();
    }
}

fn claim(claimants: &mut HashMap<ClaimKey, Vec<ServiceRef>>, key: ClaimKey, sref: &ServiceRef) {
    match claimants.entry(key) {
        // Most keys have one claimant: a vector of exactly one, not a doubling
        // vector's first four slots (at 10 000 Services the difference was 1 MiB).
        Entry::Vacant(v) => {
            v.insert(vec![sref.clone()]);
        }
        Entry::Occupied(mut o) => {
            let owners = o.get_mut();
            if let Err(at) = owners.binary_search(sref) {
                owners.insert(at, sref.clone());
            }
        }
    }
}

fn unclaim(claimants: &mut HashMap<ClaimKey, Vec<ServiceRef>>, key: &ClaimKey, sref: &ServiceRef) {
    if let Entry::Occupied(mut owners) = claimants.entry(*key) {
        owners.get_mut().retain(|o| o != sref);
        if owners.get().is_empty() {
            owners.remove();
        }
    }
}
