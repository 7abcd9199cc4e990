//! In-memory fake of the maps, for tests. It stores the raw map types through
//! [`codec`], so it holds exactly the bytes the kernel maps would, and it behaves like
//! the kernel where a plan could notice: inserting a new key into a full map fails,
//! updating an existing key does not.
//!
//! It is also stricter than the kernel, to catch planner mistakes as they happen:
//! - deleting a key that is not there fails (the kernel's ENOENT, which the real
//!   datapath forgives), because an exact mirror never asks for it;
//! - after every single operation it checks the datapath invariants, and an operation
//!   that would break one fails with [`FakeError::Invariant`] and is rolled back, so
//!   the maps always hold a state the eBPF programs could safely read.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use anyhow::Result;
use ipnet::IpNet;
use svc_lb_common::{
    AffinityMatchKey, Backend, MAP_AFF_MATCH, MAP_BACKENDS, MAP_MAGLEV, MAP_REVNAT, MAP_SRC_RANGE4,
    MAP_SRC_RANGE6, MAP_SVC_META, MAP_SVC4, MAP_SVC6, MAX_BACKENDS_PER_FRONTEND, RevNat,
    SCOPE_EXTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_SRC_RANGES, SvcMeta, SvcValue,
};

use super::{
    MapStore,
    codec::{self, SvcKey, Write},
};
use crate::{
    model::BackendAddr,
    plan::{Capacity, CurrentState, MaglevDigest, Op},
};

/// Why the fake refused an operation. Tests tell the cases apart with
/// `anyhow::Error::downcast_ref::<FakeError>()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeError {
    /// A new key did not fit (the kernel's E2BIG).
    MapFull { map: &'static str, capacity: usize },
    /// A delete named a key that is not there (the kernel's ENOENT).
    NotFound { map: &'static str, key: String },
    /// The operation would leave the maps in a state the datapath must never see.
    Invariant(String),
    /// Failure injected with [`FakeMaps::fail_after`].
    Injected,
}

impl fmt::Display for FakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MapFull { map, capacity } => write!(f, "map {map} full (capacity {capacity})"),
            Self::NotFound { map, key } => write!(f, "map {map}: no entry {key}"),
            Self::Invariant(what) => write!(f, "invariant violated: {what}"),
            Self::Injected => f.write_str("injected failure"),
        }
    }
}

impl std::error::Error for FakeError {}

/// One changed entry and its value before the change, to undo an operation.
enum Undo {
    Svc(SvcKey, Option<SvcValue>),
    Backend(u32, Option<Backend>),
    RevNat(u32, Option<RevNat>),
    Maglev(u32, Option<Vec<u32>>),
    SrcRange((u32, IpNet), bool),
    AffMatch(AffinityMatchKey, bool),
    Meta(u32, Option<SvcMeta>),
    Clients(Vec<((u32, u64), u32)>),
    Nothing,
}

/// Table size of the fake's Maglev tables: the smallest `--maglev-table-size`, which
/// keeps property tests fast.
pub const FAKE_MAGLEV_SIZE: u32 = 251;

/// The service, backend and reverse-NAT maps, in memory.
#[derive(Clone, Debug)]
pub struct FakeMaps {
    svc: BTreeMap<SvcKey, SvcValue>,
    backends: BTreeMap<u32, Backend>,
    rev_nats: BTreeMap<u32, RevNat>,
    /// Maglev tables (all `maglev_size` entries) by reverse-NAT id.
    maglev: BTreeMap<u32, Vec<u32>>,
    /// What each table was last written from, so that [`MapStore::read_current`]
    /// returns what the planner's mirror holds; [`FakeMaps::read_current_as_kernel`]
    /// decodes the tables instead, as the real datapath does.
    layouts: BTreeMap<u32, MaglevDigest>,
    src_ranges: BTreeSet<(u32, IpNet)>,
    aff_match: BTreeSet<AffinityMatchKey>,
    meta: BTreeMap<u32, SvcMeta>,
    /// `LB_AFFINITY_V1`: (reverse-NAT id, netns cookie) → backend id.
    clients: BTreeMap<(u32, u64), u32>,
    maglev_size: u32,
    cap: Capacity,
    /// Successful applies still allowed before the injected failure.
    fail_in: Option<usize>,
    applied: usize,
}

impl FakeMaps {
    pub fn new(cap: Capacity) -> Self {
        Self {
            svc: BTreeMap::new(),
            backends: BTreeMap::new(),
            rev_nats: BTreeMap::new(),
            maglev: BTreeMap::new(),
            layouts: BTreeMap::new(),
            src_ranges: BTreeSet::new(),
            aff_match: BTreeSet::new(),
            meta: BTreeMap::new(),
            clients: BTreeMap::new(),
            maglev_size: FAKE_MAGLEV_SIZE,
            cap,
            fail_in: None,
            applied: 0,
        }
    }

    /// Maps as large as the kernel defaults.
    pub fn with_default_capacity() -> Self {
        Self::new(Capacity {
            svc4_entries: svc_lb_common::SVC_MAP_MAX as usize,
            svc6_entries: svc_lb_common::SVC_MAP_MAX as usize,
            backends: svc_lb_common::BACKEND_MAP_MAX as usize,
            rev_nats: svc_lb_common::REVNAT_MAP_MAX as usize,
            maglev_tables: svc_lb_common::MAGLEV_MAP_MAX as usize,
            src_ranges4: svc_lb_common::SRC_RANGE_MAP_MAX as usize,
            src_ranges6: svc_lb_common::SRC_RANGE_MAP_MAX as usize,
        })
    }

    /// Makes the `(n+1)`-th apply from now fail with [`FakeError::Injected`], once,
    /// leaving the maps untouched; later applies succeed again.
    pub fn fail_after(&mut self, n: usize) {
        self.fail_in = Some(n);
    }

    /// Operations applied successfully so far.
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// Entry counts of the maps, in the shape of a [`Capacity`].
    pub fn usage(&self) -> Capacity {
        let v4 = self
            .svc
            .keys()
            .filter(|k| matches!(k, SvcKey::V4(_)))
            .count();
        let src4 = self.src_ranges_of(false);
        Capacity {
            svc4_entries: v4,
            svc6_entries: self.svc.len() - v4,
            backends: self.backends.len(),
            rev_nats: self.rev_nats.len(),
            maglev_tables: self.maglev.len(),
            src_ranges4: src4,
            src_ranges6: self.src_ranges.len() - src4,
        }
    }

    /// Source-range entries of one family's map.
    fn src_ranges_of(&self, v6: bool) -> usize {
        self.src_ranges
            .iter()
            .filter(|(_, r)| matches!(r, IpNet::V6(_)) == v6)
            .count()
    }

    fn src_range_map(range: &IpNet) -> (&'static str, bool, fn(&Capacity) -> usize) {
        match range {
            IpNet::V4(_) => (MAP_SRC_RANGE4, false, |c| c.src_ranges4),
            IpNet::V6(_) => (MAP_SRC_RANGE6, true, |c| c.src_ranges6),
        }
    }

    pub fn svc(&self) -> &BTreeMap<SvcKey, SvcValue> {
        &self.svc
    }

    pub fn backends(&self) -> &BTreeMap<u32, Backend> {
        &self.backends
    }

    pub fn rev_nats(&self) -> &BTreeMap<u32, RevNat> {
        &self.rev_nats
    }

    pub fn maglev(&self) -> &BTreeMap<u32, Vec<u32>> {
        &self.maglev
    }

    /// A read-back as the real datapath makes it after a restart: Maglev tables are
    /// known by their entries per backend ([`MaglevDigest::of_table`]).
    pub fn read_current_as_kernel(&self) -> Result<CurrentState> {
        let mut state = self.read_current()?;
        state.maglev = self
            .maglev
            .iter()
            .map(|(id, t)| (*id, MaglevDigest::of_table(t, self.maglev_size)))
            .collect();
        Ok(state)
    }

    pub fn src_ranges(&self) -> &BTreeSet<(u32, IpNet)> {
        &self.src_ranges
    }

    /// What must hold once a whole plan is applied (in between, a frontend's table may
    /// still name backends its slots just dropped): every external master's table holds
    /// exactly the backends of its slots; masters without backends, socket-path masters
    /// and reverse-NAT ids no master names have no table; source ranges exist exactly
    /// for masters with `SVC_FLAG_SRC_RANGES`; the affinity match entries are exactly
    /// the (slot backend, id) pairs of masters with affinity; metadata exists exactly
    /// for the ids masters name.
    pub fn check_settled(&self) -> Result<(), FakeError> {
        let bad = |what: String| Err(FakeError::Invariant(what));
        let mut tables_wanted = BTreeSet::new();
        let mut ranges_wanted = BTreeSet::new();
        for (key, value) in &self.svc {
            let (fe, slot) = codec::frontend_of(key);
            if slot != 0 {
                continue;
            }
            if fe.scope == SCOPE_EXTERNAL && value.count > 0 {
                tables_wanted.insert(value.rev_nat_id);
                let slots: BTreeSet<u32> = (1..=value.count)
                    .filter_map(|s| u16::try_from(s).ok())
                    .filter_map(|s| self.svc.get(&codec::svc_key(&fe, s)))
                    .map(|v| v.backend_id)
                    .collect();
                let table: BTreeSet<u32> = self
                    .maglev
                    .get(&value.rev_nat_id)
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect();
                if slots != table {
                    return bad(format!(
                        "Maglev table of {fe:?} holds {table:?}, its slots {slots:?}"
                    ));
                }
                // The weights too: each backend holds the entries its slots give it.
                let pairs: Vec<(u32, BackendAddr)> = (1..=value.count)
                    .filter_map(|s| u16::try_from(s).ok())
                    .filter_map(|s| self.svc.get(&codec::svc_key(&fe, s)))
                    .filter_map(|v| {
                        let b = self.backends.get(&v.backend_id)?;
                        Some((v.backend_id, codec::backend_from_raw(b).ok()?.addr))
                    })
                    .collect();
                let have = self
                    .maglev
                    .get(&value.rev_nat_id)
                    .map(|t| MaglevDigest::of_table(t, self.maglev_size));
                if have.as_ref().is_some_and(|h| !h.matches(&pairs)) {
                    return bad(format!(
                        "Maglev table of {fe:?} holds {have:?}, its slots give {:?}",
                        crate::maglev::entry_counts(&pairs, self.maglev_size)
                    ));
                }
            }
            if value.flags & SVC_FLAG_SRC_RANGES != 0 {
                ranges_wanted.insert(value.rev_nat_id);
            }
        }
        let mut pairs_wanted = BTreeSet::new();
        let mut meta_wanted = BTreeSet::new();
        for (key, value) in &self.svc {
            let (fe, slot) = codec::frontend_of(key);
            if slot != 0 {
                continue;
            }
            meta_wanted.insert(value.rev_nat_id);
            if value.flags & SVC_FLAG_AFFINITY == 0 {
                continue;
            }
            for s in (1..=value.count).filter_map(|s| u16::try_from(s).ok()) {
                if let Some(v) = self.svc.get(&codec::svc_key(&fe, s)) {
                    pairs_wanted.insert(AffinityMatchKey {
                        backend_id: v.backend_id,
                        rev_nat_id: value.rev_nat_id,
                    });
                }
            }
        }
        if self.aff_match != pairs_wanted {
            return bad(format!(
                "affinity match entries {:?}, wanted {pairs_wanted:?}",
                self.aff_match
            ));
        }
        let meta: BTreeSet<u32> = self.meta.keys().copied().collect();
        if meta != meta_wanted {
            return bad(format!(
                "metadata for reverse NATs {meta:?}, wanted for {meta_wanted:?}"
            ));
        }
        let tables: BTreeSet<u32> = self.maglev.keys().copied().collect();
        if tables != tables_wanted {
            return bad(format!(
                "Maglev tables {tables:?}, wanted for {tables_wanted:?}"
            ));
        }
        let ranges: BTreeSet<u32> = self.src_ranges.iter().map(|(id, _)| *id).collect();
        if ranges != ranges_wanted {
            return bad(format!(
                "source ranges for {ranges:?}, wanted for {ranges_wanted:?}"
            ));
        }
        Ok(())
    }

    /// The datapath invariants: every master's slots `1..=count` exist; every slot (at
    /// or above the count, with or without a master) names a live backend; every
    /// master's reverse-NAT id resolves; id 0 is used nowhere.
    pub fn check_invariants(&self) -> Result<(), FakeError> {
        let bad = |what: String| Err(FakeError::Invariant(what));
        for (key, value) in &self.svc {
            let (fe, slot) = codec::frontend_of(key);
            if slot != 0 {
                if value.backend_id == 0 || !self.backends.contains_key(&value.backend_id) {
                    return bad(format!(
                        "slot {slot} of {fe:?} names missing backend {}",
                        value.backend_id
                    ));
                }
                continue;
            }
            if value.count as usize > MAX_BACKENDS_PER_FRONTEND {
                return bad(format!("master of {fe:?} has count {}", value.count));
            }
            if value.rev_nat_id == 0 || !self.rev_nats.contains_key(&value.rev_nat_id) {
                return bad(format!(
                    "master of {fe:?} names missing reverse NAT {}",
                    value.rev_nat_id
                ));
            }
            for s in 1..=value.count {
                let s = u16::try_from(s).unwrap_or(u16::MAX);
                if !self.svc.contains_key(&codec::svc_key(&fe, s)) {
                    return bad(format!(
                        "master of {fe:?} has count {} but slot {s} is missing",
                        value.count
                    ));
                }
            }
            // The tc/XDP programs pick an external frontend's backend from its table.
            if fe.scope == SCOPE_EXTERNAL && value.count > 0 {
                let Some(table) = self.maglev.get(&value.rev_nat_id) else {
                    return bad(format!(
                        "external master of {fe:?} has count {} but no Maglev table",
                        value.count
                    ));
                };
                if let Some(id) = table
                    .iter()
                    .find(|id| **id == 0 || !self.backends.contains_key(id))
                {
                    return bad(format!("Maglev table of {fe:?} names missing backend {id}"));
                }
            }
            if value.flags & SVC_FLAG_SRC_RANGES != 0
                && !self
                    .src_ranges
                    .iter()
                    .any(|(id, _)| *id == value.rev_nat_id)
            {
                return bad(format!(
                    "master of {fe:?} has SVC_FLAG_SRC_RANGES but no source range"
                ));
            }
        }
        // A match entry lets a remembered backend be used: it must name a live backend
        // and a live frontend id, so that neither can be reused under it.
        for k in &self.aff_match {
            if !self.backends.contains_key(&k.backend_id)
                || !self.rev_nats.contains_key(&k.rev_nat_id)
            {
                return bad(format!(
                    "affinity match entry {k:?} names a missing backend or reverse NAT"
                ));
            }
        }
        if self.backends.contains_key(&0) {
            return bad("backend id 0 is in use".to_owned());
        }
        if self.rev_nats.contains_key(&0) {
            return bad("reverse-NAT id 0 is in use".to_owned());
        }
        Ok(())
    }

    fn svc_map(key: &SvcKey) -> (&'static str, fn(&Capacity) -> usize) {
        match key {
            SvcKey::V4(_) => (MAP_SVC4, |c| c.svc4_entries),
            SvcKey::V6(_) => (MAP_SVC6, |c| c.svc6_entries),
        }
    }

    fn put_svc(&mut self, key: SvcKey, value: SvcValue) -> Result<Undo, FakeError> {
        let (map, cap) = Self::svc_map(&key);
        if !self.svc.contains_key(&key) {
            let used = self
                .svc
                .keys()
                .filter(|k| Self::svc_map(k).0 == map)
                .count();
            if used >= cap(&self.cap) {
                return Err(FakeError::MapFull {
                    map,
                    capacity: cap(&self.cap),
                });
            }
        }
        Ok(Undo::Svc(key, self.svc.insert(key, value)))
    }

    fn del_svc(&mut self, key: SvcKey) -> Result<Undo, FakeError> {
        match self.svc.remove(&key) {
            Some(old) => Ok(Undo::Svc(key, Some(old))),
            None => Err(FakeError::NotFound {
                map: Self::svc_map(&key).0,
                key: format!("{key:?}"),
            }),
        }
    }

    /// Carries out one raw write. Deletes of kernel-written counters are no-ops: the
    /// fake has no traffic to count.
    fn write(&mut self, w: Write) -> Result<Undo, FakeError> {
        match w {
            Write::Svc(key, Some(value)) => self.put_svc(key, value),
            Write::Svc(key, None) => self.del_svc(key),
            Write::Backend(id, Some(raw)) => {
                if !self.backends.contains_key(&id) && self.backends.len() >= self.cap.backends {
                    return Err(FakeError::MapFull {
                        map: MAP_BACKENDS,
                        capacity: self.cap.backends,
                    });
                }
                Ok(Undo::Backend(id, self.backends.insert(id, raw)))
            }
            Write::Backend(id, None) => match self.backends.remove(&id) {
                Some(old) => Ok(Undo::Backend(id, Some(old))),
                None => Err(FakeError::NotFound {
                    map: MAP_BACKENDS,
                    key: id.to_string(),
                }),
            },
            Write::RevNat(id, Some(raw)) => {
                if !self.rev_nats.contains_key(&id) && self.rev_nats.len() >= self.cap.rev_nats {
                    return Err(FakeError::MapFull {
                        map: MAP_REVNAT,
                        capacity: self.cap.rev_nats,
                    });
                }
                Ok(Undo::RevNat(id, self.rev_nats.insert(id, raw)))
            }
            Write::RevNat(id, None) => match self.rev_nats.remove(&id) {
                Some(old) => Ok(Undo::RevNat(id, Some(old))),
                None => Err(FakeError::NotFound {
                    map: MAP_REVNAT,
                    key: id.to_string(),
                }),
            },
            Write::Maglev(id, Some(table)) => {
                if !self.maglev.contains_key(&id) && self.maglev.len() >= self.cap.maglev_tables {
                    return Err(FakeError::MapFull {
                        map: MAP_MAGLEV,
                        capacity: self.cap.maglev_tables,
                    });
                }
                Ok(Undo::Maglev(id, self.maglev.insert(id, table)))
            }
            Write::Maglev(id, None) => match self.maglev.remove(&id) {
                Some(old) => Ok(Undo::Maglev(id, Some(old))),
                None => Err(FakeError::NotFound {
                    map: MAP_MAGLEV,
                    key: id.to_string(),
                }),
            },
            Write::SrcRange4(plen, k, put) => {
                let key = codec::src_range4_from_raw(plen, &k)
                    .map_err(|e| FakeError::Invariant(format!("source-range key: {e:#}")))?;
                self.src_range(key, put)
            }
            Write::SrcRange6(plen, k, put) => {
                let key = codec::src_range6_from_raw(plen, &k)
                    .map_err(|e| FakeError::Invariant(format!("source-range key: {e:#}")))?;
                self.src_range(key, put)
            }
            Write::AffMatch(key, true) => Ok(Undo::AffMatch(key, !self.aff_match.insert(key))),
            Write::AffMatch(key, false) => {
                if self.aff_match.remove(&key) {
                    Ok(Undo::AffMatch(key, true))
                } else {
                    Err(FakeError::NotFound {
                        map: MAP_AFF_MATCH,
                        key: format!("{key:?}"),
                    })
                }
            }
            Write::Meta(id, Some(raw)) => Ok(Undo::Meta(id, self.meta.insert(id, raw))),
            Write::Meta(id, None) => match self.meta.remove(&id) {
                Some(old) => Ok(Undo::Meta(id, Some(old))),
                None => Err(FakeError::NotFound {
                    map: MAP_SVC_META,
                    key: id.to_string(),
                }),
            },
            Write::ForgetClients(id) => {
                let gone: Vec<((u32, u64), u32)> = self
                    .clients
                    .range((id, 0)..=(id, u64::MAX))
                    .map(|(k, v)| (*k, *v))
                    .collect();
                for (k, _) in &gone {
                    self.clients.remove(k);
                }
                Ok(Undo::Clients(gone))
            }
            Write::ResetBackendStats(_) | Write::ResetFrontendStats(_) => Ok(Undo::Nothing),
        }
    }

    fn src_range(&mut self, key: (u32, IpNet), put: bool) -> Result<Undo, FakeError> {
        let (map, v6, cap) = Self::src_range_map(&key.1);
        if put {
            if !self.src_ranges.contains(&key) && self.src_ranges_of(v6) >= cap(&self.cap) {
                return Err(FakeError::MapFull {
                    map,
                    capacity: cap(&self.cap),
                });
            }
            Ok(Undo::SrcRange(key, !self.src_ranges.insert(key)))
        } else if self.src_ranges.remove(&key) {
            Ok(Undo::SrcRange(key, true))
        } else {
            Err(FakeError::NotFound {
                map,
                key: format!("{} {}", key.0, key.1),
            })
        }
    }

    /// Carries out the raw writes of `op`; on error, undoes those already done.
    fn change(&mut self, op: &Op) -> Result<Vec<Undo>, FakeError> {
        let writes = codec::encode(op, self.maglev_size)
            .map_err(|e| FakeError::Invariant(format!("{e:#}")))?;
        let mut undos = Vec::with_capacity(writes.len());
        for w in writes {
            match self.write(w) {
                Ok(u) => undos.push(u),
                Err(e) => {
                    self.undo_all(undos);
                    return Err(e);
                }
            }
        }
        Ok(undos)
    }

    fn undo_all(&mut self, undos: Vec<Undo>) {
        for u in undos.into_iter().rev() {
            self.undo(u);
        }
    }

    /// A client the socket programs remember for frontend `rev_nat_id` (the fake's
    /// stand-in for `LB_AFFINITY_V1`, which only the programs write).
    pub fn remember_client(&mut self, rev_nat_id: u32, netns_cookie: u64, backend_id: u32) {
        self.clients.insert((rev_nat_id, netns_cookie), backend_id);
    }

    /// Remembered clients: (reverse-NAT id, netns cookie) → backend id.
    pub fn clients(&self) -> &BTreeMap<(u32, u64), u32> {
        &self.clients
    }

    pub fn aff_match(&self) -> &BTreeSet<AffinityMatchKey> {
        &self.aff_match
    }

    pub fn meta(&self) -> &BTreeMap<u32, SvcMeta> {
        &self.meta
    }

    fn undo(&mut self, undo: Undo) {
        fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, old: Option<V>) {
            match old {
                Some(v) => map.insert(key, v),
                None => map.remove(&key),
            };
        }
        match undo {
            Undo::Svc(k, old) => restore(&mut self.svc, k, old),
            Undo::Backend(k, old) => restore(&mut self.backends, k, old),
            Undo::RevNat(k, old) => restore(&mut self.rev_nats, k, old),
            Undo::Maglev(k, old) => restore(&mut self.maglev, k, old),
            Undo::SrcRange(k, present) => {
                if present {
                    self.src_ranges.insert(k);
                } else {
                    self.src_ranges.remove(&k);
                }
            }
            Undo::AffMatch(k, present) => {
                if present {
                    self.aff_match.insert(k);
                } else {
                    self.aff_match.remove(&k);
                }
            }
            Undo::Meta(k, old) => restore(&mut self.meta, k, old),
            Undo::Clients(gone) => self.clients.extend(gone),
            Undo::Nothing => {}
        }
    }
}

impl MapStore for FakeMaps {
    fn read_current(&self) -> Result<CurrentState> {
        let mut state = codec::decode_state(
            self.svc.iter().map(|(k, v)| (*k, *v)),
            self.backends.iter().map(|(k, v)| (*k, *v)),
            self.rev_nats.iter().map(|(k, v)| (*k, *v)),
        )?;
        // Unlike the real datapath (which decodes entry counts from the tables, see
        // `read_current_as_kernel`), the fake remembers what it wrote each table from,
        // so a read-back equals the planner's mirror.
        state.maglev = self.layouts.clone();
        state.src_ranges = self.src_ranges.clone();
        codec::decode_extras(
            &mut state,
            self.aff_match.iter().copied(),
            self.meta.iter().map(|(id, m)| (*id, *m)),
        );
        Ok(state)
    }

    fn apply(&mut self, op: &Op) -> Result<()> {
        match self.fail_in {
            Some(0) => {
                self.fail_in = None;
                return Err(FakeError::Injected.into());
            }
            Some(n) => self.fail_in = Some(n - 1),
            None => {}
        }
        let undo = self.change(op)?;
        if let Err(e) = self.check_invariants() {
            self.undo_all(undo);
            return Err(e.into());
        }
        match op {
            Op::UpsertMaglev {
                rev_nat_id,
                backends,
            } => {
                self.layouts
                    .insert(*rev_nat_id, MaglevDigest::of_pairs(backends));
            }
            Op::DeleteMaglev { rev_nat_id } => {
                self.layouts.remove(rev_nat_id);
            }
            _ => {}
        }
        self.applied += 1;
        Ok(())
    }

    fn capacity(&self) -> Capacity {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use svc_lb_common::{BACKEND_ACTIVE, PROTO_TCP, SCOPE_ALL, Svc4Key};

    use super::*;
    use crate::{
        model::{BackendAddr, FrontendKey},
        plan::BackendEntry,
    };

    fn fe() -> FrontendKey {
        FrontendKey {
            addr: "10.96.0.1".parse().unwrap(),
            port: 80,
            proto: PROTO_TCP,
            scope: SCOPE_ALL,
        }
    }

    fn backend(last: u8) -> Op {
        Op::UpsertBackend {
            id: u32::from(last),
            backend: BackendEntry {
                addr: BackendAddr {
                    addr: format!("10.0.0.{last}").parse().unwrap(),
                    port: 8080,
                    proto: PROTO_TCP,
                },
                state: BACKEND_ACTIVE,
                local: false,
            },
        }
    }

    fn master(count: u32, rev_nat_id: u32) -> Op {
        Op::UpsertMaster {
            frontend: fe(),
            count,
            rev_nat_id,
            flags: 0,
            affinity_timeout_s: 0,
        }
    }

    fn slot(slot: u16, backend_id: u32) -> Op {
        Op::UpsertSlot {
            frontend: fe(),
            slot,
            backend_id,
        }
    }

    fn cap(n: usize) -> Capacity {
        Capacity {
            svc4_entries: n,
            svc6_entries: n,
            backends: n,
            rev_nats: n,
            maglev_tables: n,
            src_ranges4: n,
            src_ranges6: n,
        }
    }

    /// A frontend with one backend: backend 1, reverse NAT 1, slot 1, master.
    fn programmed(c: Capacity) -> FakeMaps {
        let mut f = FakeMaps::new(c);
        for op in [
            backend(1),
            Op::UpsertRevNat {
                id: 1,
                frontend: fe(),
            },
            slot(1, 1),
            master(1, 1),
        ] {
            f.apply(&op).unwrap();
        }
        f
    }

    fn fake_err(e: &anyhow::Error) -> FakeError {
        e.downcast_ref::<FakeError>().cloned().unwrap()
    }

    #[test]
    fn stores_the_kernel_layout() {
        let f = programmed(cap(8));
        let key = Svc4Key {
            addr_be: u32::from_ne_bytes([10, 96, 0, 1]),
            port_be: 80u16.to_be(),
            slot: 0,
            proto: PROTO_TCP,
            scope: SCOPE_ALL,
            _pad: [0; 2],
        };
        let master = f.svc()[&SvcKey::V4(key)];
        assert_eq!(
            (master.count, master.rev_nat_id, master.backend_id),
            (1, 1, 0)
        );
        assert_eq!(
            f.svc()[&SvcKey::V4(Svc4Key { slot: 1, ..key })].backend_id,
            1
        );
        assert_eq!(
            bytemuck::bytes_of(&f.backends()[&1].addr_be[0]),
            &[10, 0, 0, 1]
        );
        assert_eq!(
            f.read_current().unwrap().frontends[&fe()].backend_ids,
            vec![1]
        );
    }

    #[test]
    fn full_map_refuses_new_keys_but_updates_existing_ones() {
        let mut f = programmed(cap(2));
        assert_eq!(
            f.usage(),
            Capacity {
                svc4_entries: 2,
                svc6_entries: 0,
                backends: 1,
                rev_nats: 1,
                maglev_tables: 0,
                src_ranges4: 0,
                src_ranges6: 0,
            }
        );
        let err = f.apply(&slot(2, 1)).unwrap_err();
        assert_eq!(
            fake_err(&err),
            FakeError::MapFull {
                map: MAP_SVC4,
                capacity: 2
            }
        );
        f.apply(&slot(1, 1)).unwrap();
        f.apply(&backend(2)).unwrap();
        let err = f.apply(&backend(3)).unwrap_err();
        assert_eq!(
            fake_err(&err),
            FakeError::MapFull {
                map: MAP_BACKENDS,
                capacity: 2
            }
        );
        f.apply(&backend(2)).unwrap();
    }

    #[test]
    fn deleting_a_missing_key_fails() {
        let mut f = programmed(cap(8));
        for op in [
            Op::DeleteSlot {
                frontend: fe(),
                slot: 2,
            },
            Op::DeleteBackend { id: 9 },
            Op::DeleteRevNat { id: 9 },
        ] {
            assert!(
                matches!(
                    fake_err(&f.apply(&op).unwrap_err()),
                    FakeError::NotFound { .. }
                ),
                "{op:?}"
            );
        }
    }

    #[test]
    fn ops_that_break_an_invariant_are_refused_and_rolled_back() {
        let cases = [
            ("master counts a slot that is not there", master(2, 1)),
            ("master names a missing reverse NAT", master(1, 7)),
            ("slot names a missing backend", slot(2, 5)),
            ("slot names backend 0", slot(1, 0)),
            ("backend in use by a slot", Op::DeleteBackend { id: 1 }),
            ("reverse NAT in use by a master", Op::DeleteRevNat { id: 1 }),
            (
                "slot below the count",
                Op::DeleteSlot {
                    frontend: fe(),
                    slot: 1,
                },
            ),
            (
                "backend id 0",
                Op::UpsertBackend {
                    id: 0,
                    backend: BackendEntry {
                        addr: BackendAddr {
                            addr: "10.0.0.9".parse().unwrap(),
                            port: 1,
                            proto: PROTO_TCP,
                        },
                        state: 0,
                        local: false,
                    },
                },
            ),
            (
                "reverse-NAT id 0",
                Op::UpsertRevNat {
                    id: 0,
                    frontend: fe(),
                },
            ),
        ];
        for (what, op) in cases {
            let mut f = programmed(cap(8));
            let before = (f.svc().clone(), f.backends().clone(), f.rev_nats().clone());
            let err = f.apply(&op).unwrap_err();
            assert!(
                matches!(fake_err(&err), FakeError::Invariant(_)),
                "{what}: {err:#}"
            );
            assert_eq!(
                (f.svc().clone(), f.backends().clone(), f.rev_nats().clone()),
                before,
                "{what}: not rolled back"
            );
            assert_eq!(f.applied(), 4, "{what}");
        }
    }

    #[test]
    fn removal_in_the_planned_order_is_accepted() {
        let mut f = programmed(cap(8));
        for op in [
            Op::DeleteMaster { frontend: fe() },
            Op::DeleteSlot {
                frontend: fe(),
                slot: 1,
            },
            Op::DeleteRevNat { id: 1 },
            Op::DeleteBackend { id: 1 },
        ] {
            f.apply(&op).unwrap();
        }
        assert_eq!(f.read_current().unwrap(), CurrentState::default());
    }

    #[test]
    fn fail_after_fails_the_next_but_n_op_once() {
        let mut f = FakeMaps::new(cap(8));
        f.fail_after(1);
        f.apply(&backend(1)).unwrap();
        assert_eq!(
            fake_err(&f.apply(&backend(2)).unwrap_err()),
            FakeError::Injected
        );
        assert!(!f.backends().contains_key(&2));
        f.apply(&backend(2)).unwrap();
        assert_eq!(f.applied(), 2);
    }
}
