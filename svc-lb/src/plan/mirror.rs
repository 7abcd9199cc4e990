//! The in-memory mirror of the maps: [`CurrentState::apply`] changes a
//! [`CurrentState`] exactly as `datapath::codec::decode_state` would see the maps
//! change after the same operation, so the agent never has to re-read the maps to
//! know what they hold.
use std::collections::BTreeMap;

use svc_lb_common::{SCOPE_ALL, SVC_FLAG_AFFINITY};

use super::{CurrentFrontend, CurrentState, FrontendMeta, Op};
use crate::model::FrontendKey;

/// Backend ids of slots that sit above their master's count.
///
/// [`CurrentState`] lists such slots by number only, because that is all a read-back
/// can report for them. But a plan writes slots `n+1..=N` before the master that grows
/// from `n` to `N` (for a new frontend, every slot is written before any master), and
/// that master makes their ids visible again; so a mirror that must stay equal to a
/// read-back has to remember them in between. After a restart the ledger starts empty,
/// which is fine: the planner rewrites every slot above the count that it wants to keep.
///
/// It is a cache of what the mirror has seen, not state: every ledger equals every
/// other, so `CurrentState`'s `==` compares what a read-back can compare.
#[derive(Clone, Debug, Default)]
pub struct SlotIdsAboveCount {
    ids: BTreeMap<(FrontendKey, u16), u32>,
}

impl PartialEq for SlotIdsAboveCount {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SlotIdsAboveCount {}

impl SlotIdsAboveCount {
    fn forget_frontend(&mut self, fe: &FrontendKey) {
        self.ids.retain(|(k, _), _| k != fe);
    }
}

/// What a read-back reports for a frontend whose slot 0 is missing.
fn masterless() -> CurrentFrontend {
    CurrentFrontend {
        rev_nat_id: 0,
        flags: 0,
        affinity_timeout_s: 0,
        backend_ids: Vec::new(),
        stale_slots: Vec::new(),
    }
}

/// Whether slot 0 exists. A read-back cannot tell "no master" from a master with
/// count 0, no flags and reverse-NAT id 0; the planner never writes such a master (id 0
/// is never valid), so the ambiguous shape is taken to mean "no master".
pub(super) fn has_master(cf: &CurrentFrontend) -> bool {
    cf.rev_nat_id != 0 || cf.flags != 0 || !cf.backend_ids.is_empty() || cf.stale_slots.is_empty()
}

/// Slot numbers present in the map, ascending. A 0 in `backend_ids` is a hole (a
/// read-back cannot tell it from a slot holding the never-valid id 0).
pub(super) fn present_slots(cf: &CurrentFrontend) -> impl Iterator<Item = u16> + '_ {
    let below = cf
        .backend_ids
        .iter()
        .enumerate()
        .filter(|(_, id)| **id != 0)
        .filter_map(|(i, _)| u16::try_from(i + 1).ok());
    below.chain(cf.stale_slots.iter().copied())
}

fn insert_sorted(v: &mut Vec<u16>, slot: u16) {
    if let Err(at) = v.binary_search(&slot) {
        v.insert(at, slot);
    }
}

impl CurrentState {
    /// Mirrors one successfully applied operation: afterwards `self` equals what a
    /// read-back of the maps would return. (The one thing it cannot know: ids of slots
    /// that were above the count when this mirror was read back, should a master grow
    /// over them without rewriting them; the planner never emits that.)
    pub fn apply(&mut self, op: &Op) {
        let mut index = self.index_cache.0.take();
        if let Some(ix) = index.as_mut() {
            ix.account(self, op, false);
        }
        self.apply_to_maps(op);
        if let Some(ix) = index.as_mut() {
            ix.account(self, op, true);
        }
        self.index_cache.0 = index;
    }

    /// [`Self::apply`] of each op of `ops` in order, on a state without an index (the
    /// first apply after start-up, which builds the index afterwards). The slots a plan
    /// writes for a frontend the mirror does not hold, followed by that frontend's
    /// master, are mirrored in one step instead of each slot passing through the ledger
    /// of slots above the count: the same state, with a fraction of the tree searches.
    pub fn apply_bulk(&mut self, ops: &[Op]) {
        if self.index_cache.0.is_some() {
            for op in ops {
                self.apply(op);
            }
            return;
        }
        self.apply_bulk_part(ops);
        self.compact_maps();
    }

    /// [`Self::apply_bulk`] of one slice of a plan mirrored slice by slice (a streamed
    /// plan, see [`crate::plan::plan_streamed`]), without packing the maps: call
    /// [`Self::compact_maps`] once after the last slice. A frontend whose slots and
    /// master fall into two slices is mirrored op by op, to the same state.
    pub fn apply_bulk_part(&mut self, ops: &[Op]) {
        if self.index_cache.0.is_some() {
            for op in ops {
                self.apply(op);
            }
            return;
        }
        let mut at = 0;
        while at < ops.len() {
            at += self.new_frontend(&ops[at..]).unwrap_or_else(|| {
                self.apply_to_maps(&ops[at]);
                1
            });
        }
    }

    /// Packs the nodes of the large maps (see [`crate::mem::compact`]).
    pub fn compact_maps(&mut self) {
        // These maps live as long as the agent, and the start-up apply (often of
        // everything) is where they grow most.
        crate::mem::compact(&mut self.frontends);
        crate::mem::compact(&mut self.backends);
        crate::mem::compact(&mut self.rev_nats);
        crate::mem::compact(&mut self.meta);
    }

    /// Mirrors the run that `ops` starts with, if it is slots of one frontend the
    /// mirror does not hold followed by its master; returns the run's length.
    fn new_frontend(&mut self, ops: &[Op]) -> Option<usize> {
        let Some(Op::UpsertSlot { frontend, .. }) = ops.first() else {
            return None;
        };
        if self.frontends.contains_key(frontend) {
            return None;
        }
        let mut slots: Vec<(u16, u32)> = Vec::new();
        for (n, op) in ops.iter().enumerate() {
            match op {
                Op::UpsertSlot {
                    frontend: f,
                    slot,
                    backend_id,
                } if f == frontend && *slot != 0 => slots.push((*slot, *backend_id)),
                Op::UpsertMaster {
                    frontend: f,
                    count,
                    rev_nat_id,
                    flags,
                    affinity_timeout_s,
                } if f == frontend => {
                    // As the ledger would hold them: ascending, the last write of a slot
                    // winning.
                    slots.reverse();
                    slots.sort_by_key(|(slot, _)| *slot);
                    slots.dedup_by_key(|(slot, _)| *slot);
                    self.set_master_over(
                        frontend,
                        slots,
                        *count,
                        *rev_nat_id,
                        *flags,
                        *affinity_timeout_s,
                    );
                    return Some(n + 1);
                }
                _ => return None,
            }
        }
        None
    }

    fn apply_to_maps(&mut self, op: &Op) {
        match op {
            Op::UpsertBackend { id, backend } => {
                self.backends.insert(*id, *backend);
            }
            Op::DeleteBackend { id } => {
                self.backends.remove(id);
            }
            Op::UpsertMaglev {
                rev_nat_id,
                backends,
            } => {
                self.maglev
                    .insert(*rev_nat_id, super::MaglevDigest::of_pairs(backends));
            }
            Op::DeleteMaglev { rev_nat_id } => {
                self.maglev.remove(rev_nat_id);
            }
            Op::UpsertSrcRange { rev_nat_id, range } => {
                self.src_ranges.insert((*rev_nat_id, *range));
            }
            Op::DeleteSrcRange { rev_nat_id, range } => {
                self.src_ranges.remove(&(*rev_nat_id, *range));
            }
            Op::UpsertAffinityMatch {
                backend_id,
                rev_nat_id,
            } => {
                self.aff_match.insert((*rev_nat_id, *backend_id));
            }
            Op::DeleteAffinityMatch {
                backend_id,
                rev_nat_id,
            } => {
                self.aff_match.remove(&(*rev_nat_id, *backend_id));
            }
            // The remembered clients are the programs' state, not mirrored.
            Op::ForgetAffinity { .. } => {}
            Op::UpsertMeta { rev_nat_id, meta } => {
                self.meta.insert(*rev_nat_id, FrontendMeta::clone(meta));
            }
            Op::DeleteMeta { rev_nat_id } => {
                self.meta.remove(rev_nat_id);
            }
            Op::UpsertRevNat { id, frontend } => {
                // The reverse-NAT entry stores no scope; a read-back reports SCOPE_ALL.
                self.rev_nats.insert(
                    *id,
                    FrontendKey {
                        scope: SCOPE_ALL,
                        ..*frontend
                    },
                );
            }
            Op::DeleteRevNat { id } => {
                self.rev_nats.remove(id);
            }
            // Slot 0 is the master's key: a slot value written there reads back as a
            // master with count 0 and no reverse NAT.
            Op::UpsertSlot {
                frontend, slot: 0, ..
            } => self.set_master(frontend, 0, 0, 0, 0),
            Op::UpsertSlot {
                frontend,
                slot,
                backend_id,
            } => {
                let cf = self.frontends.entry(*frontend).or_insert_with(masterless);
                let at = usize::from(*slot);
                if at <= cf.backend_ids.len() {
                    cf.backend_ids[at - 1] = *backend_id;
                } else {
                    insert_sorted(&mut cf.stale_slots, *slot);
                    self.slots_above_count
                        .ids
                        .insert((*frontend, *slot), *backend_id);
                }
            }
            Op::UpsertMaster {
                frontend,
                count,
                rev_nat_id,
                flags,
                affinity_timeout_s,
            } => {
                self.set_master(frontend, *count, *rev_nat_id, *flags, *affinity_timeout_s);
            }
            Op::DeleteSlot { frontend, slot: 0 } | Op::DeleteMaster { frontend } => {
                self.delete_master(frontend);
            }
            Op::DeleteSlot { frontend, slot } => {
                let Some(cf) = self.frontends.get_mut(frontend) else {
                    return;
                };
                // Decided before the delete: without slots the shape says "master".
                let master = has_master(cf);
                let at = usize::from(*slot);
                if at <= cf.backend_ids.len() {
                    cf.backend_ids[at - 1] = 0;
                } else {
                    cf.stale_slots.retain(|s| s != slot);
                    self.slots_above_count.ids.remove(&(*frontend, *slot));
                }
                if !master && cf.stale_slots.is_empty() {
                    self.frontends.remove(frontend);
                }
            }
        }
    }

    /// Slots of `frontend` in the map, with their backend ids (0 if unknown).
    pub(super) fn slots_with_ids(&self, frontend: &FrontendKey) -> Vec<(u16, u32)> {
        let Some(cf) = self.frontends.get(frontend) else {
            return Vec::new();
        };
        present_slots(cf)
            .map(|slot| {
                let id = match cf.backend_ids.get(usize::from(slot) - 1) {
                    Some(id) => *id,
                    None => self
                        .slots_above_count
                        .ids
                        .get(&(*frontend, slot))
                        .copied()
                        .unwrap_or(0),
                };
                (slot, id)
            })
            .collect()
    }

    fn set_master(
        &mut self,
        frontend: &FrontendKey,
        count: u32,
        rev_nat_id: u32,
        flags: u16,
        affinity_timeout_s: u32,
    ) {
        let slots = self.slots_with_ids(frontend);
        self.set_master_over(
            frontend,
            slots,
            count,
            rev_nat_id,
            flags,
            affinity_timeout_s,
        );
    }

    /// [`Self::set_master`] over `slots`, the frontend's slots in the map with their
    /// ids, ascending.
    fn set_master_over(
        &mut self,
        frontend: &FrontendKey,
        slots: Vec<(u16, u32)>,
        count: u32,
        rev_nat_id: u32,
        flags: u16,
        affinity_timeout_s: u32,
    ) {
        let ledger = &mut self.slots_above_count.ids;
        let mut backend_ids = vec![0; usize::try_from(count).unwrap_or(usize::MAX)];
        let mut stale_slots = Vec::new();
        for (slot, id) in slots {
            if usize::from(slot) <= backend_ids.len() {
                backend_ids[usize::from(slot) - 1] = id;
                // Empty through a whole full sync: no search per slot then.
                if !ledger.is_empty() {
                    ledger.remove(&(*frontend, slot));
                }
            } else {
                stale_slots.push(slot);
                ledger.insert((*frontend, slot), id);
            }
        }
        self.frontends.insert(
            *frontend,
            CurrentFrontend {
                rev_nat_id,
                flags,
                // A read-back ignores the timeout unless affinity is on.
                affinity_timeout_s: if flags & SVC_FLAG_AFFINITY != 0 {
                    affinity_timeout_s
                } else {
                    0
                },
                backend_ids,
                stale_slots,
            },
        );
    }

    fn delete_master(&mut self, frontend: &FrontendKey) {
        let slots = self.slots_with_ids(frontend);
        if slots.is_empty() {
            self.frontends.remove(frontend);
            self.slots_above_count.forget_frontend(frontend);
            return;
        }
        let mut left = masterless();
        for (slot, id) in slots {
            insert_sorted(&mut left.stale_slots, slot);
            self.slots_above_count.ids.insert((*frontend, slot), id);
        }
        self.frontends.insert(*frontend, left);
    }
}
