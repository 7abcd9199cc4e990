//! Long-lived accounting beside the mirror, so that a plan for a few frontends never
//! scans the whole state: which ids are taken, which backend ids each address has, how
//! many slots and tables name each backend, which masters name each reverse-NAT id,
//! and how many entries each map holds. [`CurrentState::apply`] keeps it in step: before
//! an op it takes out what the objects the op writes contribute, after it adds them
//! back, so each op costs what its objects cost (a frontend: its slots).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use super::{
    CurrentState, Op,
    mirror::{has_master, present_slots},
};
use crate::model::{BackendAddr, FrontendKey};

/// Ids in use, as maximal runs `start..=end`, so that the lowest free id at or above
/// any point is one lookup away.
#[derive(Clone, Debug, Default)]
struct Runs(BTreeMap<u32, u32>);

impl Runs {
    fn insert(&mut self, id: u32) {
        let mut start = id;
        let mut end = id;
        if let Some((&s, &e)) = self.0.range(..=id).next_back() {
            if e >= id {
                return;
            }
            if e.checked_add(1) == Some(id) {
                start = s;
                self.0.remove(&s);
            }
        }
        if let Some(next) = id.checked_add(1)
            && let Some(e) = self.0.remove(&next)
        {
            end = e;
        }
        self.0.insert(start, end);
    }

    fn remove(&mut self, id: u32) {
        let Some((&s, &e)) = self.0.range(..=id).next_back() else {
            return;
        };
        if e < id {
            return;
        }
        self.0.remove(&s);
        if s < id {
            self.0.insert(s, id - 1);
        }
        if id < e {
            self.0.insert(id + 1, e);
        }
    }

    /// The lowest id ≥ `from` not in use; `None` when none is left below `u32::MAX`.
    fn free_from(&self, from: u32) -> Option<u32> {
        match self.0.range(..=from).next_back() {
            Some((_, &e)) if e >= from => e.checked_add(1),
            _ => Some(from),
        }
    }
}

/// Reference counts of ids, with the runs of ids whose count is not zero.
#[derive(Clone, Debug, Default)]
struct Refs {
    count: BTreeMap<u32, u32>,
    used: Runs,
}

impl Refs {
    fn add(&mut self, id: u32, up: bool) {
        if id == 0 {
            return;
        }
        if up {
            let n = self.count.entry(id).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.used.insert(id);
            }
        } else if let Some(n) = self.count.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.count.remove(&id);
                self.used.remove(id);
            }
        }
    }

    /// Free ids from 1 up, lowest first.
    fn fresh(&self) -> impl Iterator<Item = u32> + '_ {
        let mut next = Some(1u32);
        std::iter::from_fn(move || {
            let id = self.used.free_from(next?)?;
            next = id.checked_add(1);
            Some(id)
        })
    }
}

/// What a plan of a few frontends needs to know about all the others.
#[derive(Clone, Debug, Default)]
pub struct Index {
    /// Backend ids per address (several only after an interrupted apply).
    by_addr: BTreeSet<(BackendAddr, u32)>,
    /// Per backend id: 1 for its entry, plus one per slot (where its id is known) and
    /// per Maglev table that names it. An id with a count is taken.
    backend_refs: Refs,
    /// Slots and tables naming each backend id (its references besides the entry).
    backend_users: BTreeMap<u32, u32>,
    /// Backend ids with an entry that no slot or table names: draining entries and
    /// those a plan will delete. Kept so that a plan of a few frontends finds them
    /// without a pass over every backend.
    unused: BTreeSet<u32>,
    /// Per reverse-NAT id: its entry, the masters, the table and the source ranges
    /// that name it.
    rev_refs: Refs,
    /// Reverse-NAT ids per (address, port, protocol), the key of the entry.
    rev_by_key: BTreeSet<((IpAddr, u16, u8), u32)>,
    masters: BTreeSet<(u32, FrontendKey)>,
    /// Service-map entries per family (v4, v6) and source ranges per family.
    svc_entries: [usize; 2],
    src_ranges: [usize; 2],
}

/// One object an op writes; its contribution to the index is taken out before the op
/// and added back after it.
enum Object {
    Backend(u32),
    RevNat(u32),
    Maglev(u32),
    SrcRange(u32, IpNet),
    Frontend(FrontendKey),
}

fn fam(addr: &IpAddr) -> usize {
    usize::from(addr.is_ipv6())
}

fn objects(op: &Op) -> Vec<Object> {
    match op {
        Op::UpsertBackend { id, .. } | Op::DeleteBackend { id } => vec![Object::Backend(*id)],
        Op::UpsertRevNat { id, .. } | Op::DeleteRevNat { id } => vec![Object::RevNat(*id)],
        Op::UpsertMaglev { rev_nat_id, .. } | Op::DeleteMaglev { rev_nat_id } => {
            vec![Object::Maglev(*rev_nat_id)]
        }
        Op::UpsertSrcRange { rev_nat_id, range } | Op::DeleteSrcRange { rev_nat_id, range } => {
            vec![Object::SrcRange(*rev_nat_id, *range)]
        }
        other => other
            .frontend()
            .map(|fe| vec![Object::Frontend(*fe)])
            .unwrap_or_default(),
    }
}

fn bump(map: &mut BTreeMap<u32, u32>, id: u32, up: bool) {
    if up {
        *map.entry(id).or_insert(0) += 1;
    } else if let Some(n) = map.get_mut(&id) {
        *n -= 1;
        if *n == 0 {
            map.remove(&id);
        }
    }
}

/// Counts of ids given as one item per reference (sorted here), and the runs of the
/// ids counted: each ordered collection built once from sorted input, which is linear
/// (an insert per reference costs a tree search and a run merge).
fn refs_from(mut ids: Vec<u32>) -> Refs {
    ids.sort_unstable();
    let mut count: Vec<(u32, u32)> = Vec::new();
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for id in ids.into_iter().filter(|id| *id != 0) {
        match count.last_mut() {
            Some((last, n)) if *last == id => *n += 1,
            _ => {
                count.push((id, 1));
                match runs.last_mut() {
                    Some((_, end)) if end.checked_add(1) == Some(id) => *end = id,
                    _ => runs.push((id, id)),
                }
            }
        }
    }
    Refs {
        count: count.into_iter().collect(),
        used: Runs(runs.into_iter().collect()),
    }
}

impl Index {
    /// The index of the whole state in one pass (the first sync after start-up builds
    /// it over every entry); equal to accounting each object with [`Self::count`], which
    /// the proptests check.
    pub fn build(state: &CurrentState) -> Self {
        let mut backend_refs: Vec<u32> = Vec::with_capacity(state.backends.len() * 2);
        let mut users: Vec<u32> = Vec::new();
        let mut rev_refs: Vec<u32> = Vec::with_capacity(state.rev_nats.len() * 2);
        let by_addr: BTreeSet<(BackendAddr, u32)> = {
            let mut v: Vec<(BackendAddr, u32)> =
                state.backends.iter().map(|(id, b)| (b.addr, *id)).collect();
            v.sort_unstable();
            v.into_iter().collect()
        };
        backend_refs.extend(state.backends.keys().copied());
        let rev_by_key: BTreeSet<((IpAddr, u16, u8), u32)> = {
            let mut v: Vec<_> = state
                .rev_nats
                .iter()
                .map(|(id, fe)| ((fe.addr, fe.port, fe.proto), *id))
                .collect();
            v.sort_unstable();
            v.into_iter().collect()
        };
        rev_refs.extend(state.rev_nats.keys().copied());
        for (id, table) in &state.maglev {
            rev_refs.push(*id);
            users.extend(table.ids());
        }
        let mut src_ranges = [0usize; 2];
        for (id, range) in &state.src_ranges {
            rev_refs.push(*id);
            src_ranges[usize::from(matches!(range, IpNet::V6(_)))] += 1;
        }
        let mut svc_entries = [0usize; 2];
        let mut masters: Vec<(u32, FrontendKey)> = Vec::new();
        for (fe, cf) in &state.frontends {
            svc_entries[fam(&fe.addr)] += usize::from(has_master(cf)) + present_slots(cf).count();
            if has_master(cf) && cf.rev_nat_id != 0 {
                masters.push((cf.rev_nat_id, *fe));
                rev_refs.push(cf.rev_nat_id);
            }
            users.extend(
                state
                    .slots_with_ids(fe)
                    .into_iter()
                    .map(|(_, id)| id)
                    .filter(|id| *id != 0),
            );
        }
        masters.sort_unstable();
        backend_refs.extend_from_slice(&users);
        let backend_refs = refs_from(backend_refs);
        let backend_users = refs_from(users).count;
        // An entry and no user: a count of exactly 1 that no slot or table makes.
        let unused: BTreeSet<u32> = backend_refs
            .count
            .iter()
            .filter(|(id, n)| **n == 1 && !backend_users.contains_key(id))
            .map(|(id, _)| *id)
            .collect();
        Self {
            by_addr,
            backend_refs,
            backend_users,
            unused,
            rev_refs: refs_from(rev_refs),
            rev_by_key,
            masters: masters.into_iter().collect(),
            svc_entries,
            src_ranges,
        }
    }

    /// [`Self::build`] one object at a time, as the ops account them: the reference
    /// the bulk build is checked against.
    #[cfg(test)]
    pub fn build_by_objects(state: &CurrentState) -> Self {
        let mut ix = Self::default();
        for id in state.backends.keys() {
            ix.count(state, &Object::Backend(*id), true);
        }
        for id in state.rev_nats.keys() {
            ix.count(state, &Object::RevNat(*id), true);
        }
        for id in state.maglev.keys() {
            ix.count(state, &Object::Maglev(*id), true);
        }
        for (id, range) in &state.src_ranges {
            ix.count(state, &Object::SrcRange(*id, *range), true);
        }
        for fe in state.frontends.keys() {
            ix.count(state, &Object::Frontend(*fe), true);
        }
        ix
    }

    /// Takes out (`up == false`) or adds what `op`'s objects contribute in `state`.
    pub(super) fn account(&mut self, state: &CurrentState, op: &Op, up: bool) {
        for o in objects(op) {
            self.count(state, &o, up);
        }
    }

    fn backend_user(&mut self, id: u32, up: bool) {
        if id == 0 {
            return;
        }
        self.backend_refs.add(id, up);
        bump(&mut self.backend_users, id, up);
        self.note_unused(id);
    }

    /// Files `id` under `unused` when its only reference is its entry.
    fn note_unused(&mut self, id: u32) {
        let refs = self.backend_refs.count.get(&id).copied().unwrap_or(0);
        if refs == 1 && !self.backend_users.contains_key(&id) {
            self.unused.insert(id);
        } else {
            self.unused.remove(&id);
        }
    }

    fn count(&mut self, state: &CurrentState, o: &Object, up: bool) {
        match o {
            Object::Backend(id) => {
                if let Some(b) = state.backends.get(id) {
                    if up {
                        self.by_addr.insert((b.addr, *id));
                    } else {
                        self.by_addr.remove(&(b.addr, *id));
                    }
                    self.backend_refs.add(*id, up);
                    self.note_unused(*id);
                }
            }
            Object::RevNat(id) => {
                if let Some(fe) = state.rev_nats.get(id) {
                    let key = ((fe.addr, fe.port, fe.proto), *id);
                    if up {
                        self.rev_by_key.insert(key);
                    } else {
                        self.rev_by_key.remove(&key);
                    }
                    self.rev_refs.add(*id, up);
                }
            }
            Object::Maglev(id) => {
                if let Some(table) = state.maglev.get(id) {
                    self.rev_refs.add(*id, up);
                    for b in table.ids() {
                        self.backend_user(b, up);
                    }
                }
            }
            Object::SrcRange(id, range) => {
                if state.src_ranges.contains(&(*id, *range)) {
                    self.rev_refs.add(*id, up);
                    let f = usize::from(matches!(range, IpNet::V6(_)));
                    if up {
                        self.src_ranges[f] += 1;
                    } else {
                        self.src_ranges[f] -= 1;
                    }
                }
            }
            Object::Frontend(fe) => {
                let Some(cf) = state.frontends.get(fe) else {
                    return;
                };
                let n = usize::from(has_master(cf)) + present_slots(cf).count();
                if up {
                    self.svc_entries[fam(&fe.addr)] += n;
                } else {
                    self.svc_entries[fam(&fe.addr)] -= n;
                }
                if has_master(cf) && cf.rev_nat_id != 0 {
                    if up {
                        self.masters.insert((cf.rev_nat_id, *fe));
                    } else {
                        self.masters.remove(&(cf.rev_nat_id, *fe));
                    }
                    self.rev_refs.add(cf.rev_nat_id, up);
                }
                for (_, id) in state.slots_with_ids(fe) {
                    self.backend_user(id, up);
                }
            }
        }
    }

    /// Backend ids of `addr`, lowest first.
    pub fn backend_ids_of(&self, addr: &BackendAddr) -> impl Iterator<Item = u32> + '_ {
        self.by_addr
            .range((*addr, 0)..=(*addr, u32::MAX))
            .map(|(_, id)| *id)
    }

    /// Slots and Maglev tables that name backend `id`.
    pub fn backend_users(&self, id: u32) -> u32 {
        self.backend_users.get(&id).copied().unwrap_or(0)
    }

    /// Backend ids whose entry no slot or table names, lowest first.
    pub fn unused_backends(&self) -> impl Iterator<Item = u32> + '_ {
        self.unused.iter().copied()
    }

    /// Reverse-NAT ids whose entry holds this address, port and protocol.
    pub fn rev_nats_at(&self, fe: &FrontendKey) -> impl Iterator<Item = u32> + '_ {
        let k = (fe.addr, fe.port, fe.proto);
        self.rev_by_key
            .range((k, 0)..=(k, u32::MAX))
            .map(|(_, id)| *id)
    }

    /// Frontends whose master names reverse-NAT id `id`.
    pub fn masters_of(&self, id: u32) -> impl Iterator<Item = &FrontendKey> + '_ {
        let lo = FrontendKey {
            addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 0,
            proto: 0,
            scope: 0,
        };
        self.masters
            .range((id, lo)..)
            .take_while(move |(i, _)| *i == id)
            .map(|(_, fe)| fe)
    }

    pub fn svc_entries(&self, v6: bool) -> usize {
        self.svc_entries[usize::from(v6)]
    }

    pub fn src_ranges(&self, v6: bool) -> usize {
        self.src_ranges[usize::from(v6)]
    }

    /// Backend ids no entry, slot or table uses, lowest first.
    pub fn fresh_backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.backend_refs.fresh()
    }

    /// Reverse-NAT ids no entry, master, table or source range uses, lowest first.
    pub fn fresh_rev_nat_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.rev_refs.fresh()
    }
}

/// The index's place in [`CurrentState`]: like the slot ledger, a cache that `==`
/// ignores. `None` until [`CurrentState::build_index`]; a state changed other than by
/// [`CurrentState::apply`] must rebuild it.
#[derive(Clone, Debug, Default)]
pub struct IndexSlot(pub(super) Option<Box<Index>>);

impl PartialEq for IndexSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for IndexSlot {}

impl CurrentState {
    /// Builds the index of the whole state (once, at start-up: O(state)); from then on
    /// [`CurrentState::apply`] keeps it up to date.
    pub fn build_index(&mut self) {
        self.index_cache = IndexSlot(Some(Box::new(Index::build(self))));
    }

    pub fn index(&self) -> Option<&Index> {
        self.index_cache.0.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_find_the_lowest_free_id() {
        let mut r = Runs::default();
        for id in [1, 2, 3, 5, 7, 6] {
            r.insert(id);
        }
        assert_eq!(r.0, BTreeMap::from([(1, 3), (5, 7)]));
        assert_eq!(r.free_from(1), Some(4));
        assert_eq!(r.free_from(5), Some(8));
        r.remove(2);
        assert_eq!(r.free_from(1), Some(2));
        assert_eq!(r.0, BTreeMap::from([(1, 1), (3, 3), (5, 7)]));
        r.insert(u32::MAX);
        assert_eq!(r.free_from(u32::MAX), None);
        let mut refs = Refs::default();
        for id in [1, 1, 2, 4] {
            refs.add(id, true);
        }
        refs.add(1, false);
        assert_eq!(refs.fresh().take(3).collect::<Vec<_>>(), vec![3, 5, 6]);
        refs.add(1, false);
        assert_eq!(refs.fresh().take(2).collect::<Vec<_>>(), vec![1, 3]);
    }
}
