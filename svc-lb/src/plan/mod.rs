//! The planner: a pure function from (current, desired) to an ordered list of map
//! operations. The order guarantees the kernel never sees a half-written Service:
//!
//! 1. upsert backends (and reverse-NAT entries) the new state needs;
//! 2. write slots `1..=N` of each changed frontend;
//! 3. write the master slot 0 with the new count;
//! 4. delete stale slots `N+1..=old N`;
//! 5. delete orphaned backends.
//!
//! Removed frontends lose their master slot first, so lookups miss before any of
//! their slots or backends go away. Id 0 is never valid.
//!
//! External frontends (`SCOPE_EXTERNAL`) also own, keyed by their reverse-NAT id, a
//! Maglev table (written after their backends, before the master that points at it,
//! deleted after the master stops pointing at it) and their source ranges (new ranges
//! before the master, leaving ones after it: for a moment both are allowed, never
//! neither).
use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::model::{BackendAddr, FrontendKey, ServiceRef};

mod diff;
mod extras;
pub mod index;
mod mirror;
mod touched;
pub use diff::{plan, plan_streamed};
pub use mirror::SlotIdsAboveCount;
pub use touched::plan_touched;

#[cfg(test)]
mod maglev_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod sched_tests;
#[cfg(test)]
mod tests;

/// A backend entry as stored in the backend map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendEntry {
    pub addr: BackendAddr,
    /// `svc_lb_common::BACKEND_*`.
    pub state: u8,
    /// On this node: written as `svc_lb_common::BACKEND_FLAG_LOCAL`.
    pub local: bool,
}

/// A frontend as it is programmed in the service map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentFrontend {
    pub rev_nat_id: u32,
    /// `svc_lb_common::SVC_FLAG_*`.
    pub flags: u16,
    pub affinity_timeout_s: u32,
    /// Backend id of slot `i + 1`; its length is the master's count.
    pub backend_ids: Vec<u32>,
    /// Slots above the count that are still in the map (left by an interrupted apply).
    pub stale_slots: Vec<u16>,
}

/// What the maps hold now: read back from the pins at start-up, then kept in step
/// with every applied operation by [`CurrentState::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CurrentState {
    pub frontends: BTreeMap<FrontendKey, CurrentFrontend>,
    pub backends: BTreeMap<u32, BackendEntry>,
    pub rev_nats: BTreeMap<u32, FrontendKey>,
    /// Backend ids of slots above their master's count, which the fields above list by
    /// number only. Kept by [`CurrentState::apply`]; ignored by `==` (a read-back cannot
    /// fill it). Build a `CurrentState` with `..Default::default()`.
    pub slots_above_count: SlotIdsAboveCount,
    /// Maglev tables by reverse-NAT id: what is known of each one's content (see
    /// [`MaglevDigest`]).
    pub maglev: BTreeMap<u32, MaglevDigest>,
    /// Source-range entries: (reverse-NAT id, prefix).
    pub src_ranges: BTreeSet<(u32, IpNet)>,
    /// Session-affinity match entries, as (reverse-NAT id, backend id): the backends a
    /// remembered choice may still be used for (see the `extras` module).
    pub aff_match: BTreeSet<(u32, u32)>,
    /// Service metadata by reverse-NAT id, as `list` and the metrics read it.
    pub meta: BTreeMap<u32, FrontendMeta>,
    /// The accounting [`plan_touched`] works from (see [`index::Index`]); ignored by
    /// `==`.
    pub index_cache: index::IndexSlot,
}

impl CurrentState {
    /// Whether the maps hold no entry at all (a first start on empty maps).
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.backends.is_empty()
            && self.rev_nats.is_empty()
            && self.maglev.is_empty()
            && self.src_ranges.is_empty()
            && self.aff_match.is_empty()
            && self.meta.is_empty()
    }
}

/// The Service identity of a frontend, as `list` and the metrics show it (stored in
/// `LB_SVC_META_V1`; the datapath never reads it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendMeta {
    pub service: ServiceRef,
    pub port_name: String,
    pub kind: u8,
    pub flags: u8,
}

/// One map write or delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    UpsertBackend {
        id: u32,
        backend: BackendEntry,
    },
    UpsertRevNat {
        id: u32,
        frontend: FrontendKey,
    },
    UpsertSlot {
        frontend: FrontendKey,
        slot: u16,
        backend_id: u32,
    },
    UpsertMaster {
        frontend: FrontendKey,
        count: u32,
        rev_nat_id: u32,
        flags: u16,
        affinity_timeout_s: u32,
    },
    DeleteSlot {
        frontend: FrontendKey,
        slot: u16,
    },
    DeleteMaster {
        frontend: FrontendKey,
    },
    DeleteRevNat {
        id: u32,
    },
    DeleteBackend {
        id: u32,
    },
    /// Writes the Maglev table of an external frontend, built by the datapath from
    /// these `(backend id, address)` pairs with its table size (see [`crate::maglev`]).
    UpsertMaglev {
        rev_nat_id: u32,
        backends: Vec<(u32, BackendAddr)>,
    },
    DeleteMaglev {
        rev_nat_id: u32,
    },
    UpsertSrcRange {
        rev_nat_id: u32,
        range: IpNet,
    },
    DeleteSrcRange {
        rev_nat_id: u32,
        range: IpNet,
    },
    /// Lets the socket programs use a remembered backend `backend_id` for the frontend
    /// with affinity `rev_nat_id`.
    UpsertAffinityMatch {
        backend_id: u32,
        rev_nat_id: u32,
    },
    DeleteAffinityMatch {
        backend_id: u32,
        rev_nat_id: u32,
    },
    /// Forgets every client the socket programs remember for `rev_nat_id` (affinity
    /// switched off, or the frontend goes away): a later frontend with affinity under
    /// this id starts afresh. The clients are not mirrored; the op is never planned
    /// twice for the same change because the mirror's masters say affinity is off.
    ForgetAffinity {
        rev_nat_id: u32,
    },
    UpsertMeta {
        rev_nat_id: u32,
        /// Boxed: the largest variant by far, it would set the size of every op (a
        /// full sync of 1 M backends holds over 2 M ops at once).
        meta: Box<FrontendMeta>,
    },
    DeleteMeta {
        rev_nat_id: u32,
    },
}

impl Op {
    /// The frontend whose service-map entries this op writes, if any.
    pub fn frontend(&self) -> Option<&FrontendKey> {
        match self {
            Op::UpsertSlot { frontend, .. }
            | Op::UpsertMaster { frontend, .. }
            | Op::DeleteSlot { frontend, .. }
            | Op::DeleteMaster { frontend } => Some(frontend),
            _ => None,
        }
    }
}

/// What the mirror knows of one Maglev table's content. The set of backend ids is not
/// enough: a weight change keeps it, so a retry after an apply that wrote the slots but
/// not the table would leave the old weights in the table (issue 15). The digest holds
/// the weights too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaglevDigest {
    /// Written by this agent: the backend id of every pair it was built from (one per
    /// slot of the weighted layout, so an id repeats as often as its weight), sorted.
    Layout(Vec<u32>),
    /// Read back from the kernel: entries per backend id, sorted by id; they add up to
    /// the table size. [`crate::maglev::entry_counts`] says what a layout gives, so a
    /// restart keeps tables that are already right.
    Entries(Vec<(u32, u32)>),
    /// Read back, but not a table of the size in use (a free entry, or entries past the
    /// size: `--maglev-table-size` changed): the planner rewrites it.
    Unknown,
}

impl MaglevDigest {
    /// The digest of a table written from `backends` (as in [`Op::UpsertMaglev`]).
    pub fn of_pairs(backends: &[(u32, BackendAddr)]) -> Self {
        let mut ids: Vec<u32> = backends
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| *id != 0)
            .collect();
        ids.sort_unstable();
        Self::Layout(ids)
    }

    /// The digest of a table read back from the kernel: `table` is the whole map value,
    /// of which the programs use the first `size` entries.
    pub fn of_table(table: &[u32], size: u32) -> Self {
        let size = size as usize;
        if size < 2 || size > table.len() {
            return Self::Unknown;
        }
        let (used, rest) = table.split_at(size);
        if used.contains(&0) || rest.iter().any(|id| *id != 0) {
            return Self::Unknown;
        }
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for id in used {
            *counts.entry(*id).or_default() += 1;
        }
        Self::Entries(counts.into_iter().collect())
    }

    /// The backend ids the table names: sorted, unique, no id 0.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::Layout(ids) => {
                let mut ids = ids.clone();
                ids.dedup();
                ids
            }
            Self::Entries(counts) => counts.iter().map(|(id, _)| *id).collect(),
            Self::Unknown => Vec::new(),
        }
    }

    /// Whether the table is the one `backends` (as in [`Op::UpsertMaglev`]) builds.
    /// For a read-back table: whether it gives every id the entries that layout gives
    /// at its size. Two layouts that give the same counts (weights whose ratios differ
    /// by less than one entry in the table size) are taken as the same table: their
    /// shares are equal, only a few entries may sit elsewhere.
    pub fn matches(&self, backends: &[(u32, BackendAddr)]) -> bool {
        match self {
            Self::Layout(have) => !have.is_empty() && *self == Self::of_pairs(backends),
            Self::Entries(counts) => {
                let size: u64 = counts.iter().map(|(_, n)| u64::from(*n)).sum();
                !counts.is_empty()
                    && u32::try_from(size)
                        .is_ok_and(|m| crate::maglev::entry_counts(backends, m) == *counts)
            }
            Self::Unknown => false,
        }
    }
}

/// Map capacities, in entries. The planner never emits a plan whose peak usage exceeds
/// them; Services that do not fit are rejected whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub svc4_entries: usize,
    pub svc6_entries: usize,
    pub backends: usize,
    pub rev_nats: usize,
    /// `LB_MAGLEV_V1`: one table per external frontend with backends.
    pub maglev_tables: usize,
    /// `LB_SRCRNG4_V1` / `LB_SRCRNG6_V1`: one entry per (external frontend, source
    /// range) of the range's family.
    pub src_ranges4: usize,
    pub src_ranges6: usize,
}

/// A Service that the plan leaves out, and why (for example a full map).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub service: ServiceRef,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub rejected: Vec<Rejected>,
}
