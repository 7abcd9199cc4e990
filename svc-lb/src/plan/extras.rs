//! Session-affinity match entries and Service metadata: the plan operations that do
//! not steer a packet by themselves but must follow the frontends they describe.
//!
//! The socket programs remember, per client and frontend, the backend id a client was
//! sent to. Backend ids are shared by frontends and reused after they are freed, so an
//! id alone cannot say whether the backend still belongs to the frontend. The match map
//! says it: it holds exactly the (backend id, rev-NAT id) pairs of the frontends with
//! affinity, and the programs use a remembered backend only while its pair is there.
//!
//! Ordering, so that no connection ever follows a remembered backend out of its
//! Service:
//! 1. first in the plan: remove the pairs that are leaving, and forget the clients of
//!    frontends whose affinity is switched off or that go away (so that switching it
//!    on again starts afresh, and a reused rev-NAT id inherits no clients);
//! 2. the plan's slots, masters and backends;
//! 3. last: add the new pairs (their slots exist by then), and write the metadata of
//!    the frontends the plan leaves programmed (the CLI and the metrics read it; the
//!    datapath never does). Metadata of ids no master will name goes in step 1.
use std::collections::{BTreeMap, BTreeSet};

use svc_lb_common::SVC_FLAG_AFFINITY;

use super::{CurrentState, Op, mirror::has_master};
use crate::{datapath::codec, model::DesiredFrontend};

/// A frontend as the plan leaves it programmed (it has a master).
pub(super) struct Final<'a> {
    pub rev_nat_id: u32,
    pub flags: u16,
    pub ids: &'a [u32],
    pub desired: &'a DesiredFrontend,
}

/// The operations to put first and last in a plan that turns `current` into a state
/// whose programmed frontends are `finals`.
pub(super) fn plan_extras(current: &CurrentState, finals: &[Final<'_>]) -> (Vec<Op>, Vec<Op>) {
    let mut want_pairs: BTreeSet<(u32, u32)> = BTreeSet::new();
    let mut sticky_after: BTreeSet<u32> = BTreeSet::new();
    let mut want_meta: BTreeMap<u32, &DesiredFrontend> = BTreeMap::new();
    for f in finals {
        want_meta.insert(f.rev_nat_id, f.desired);
        if f.flags & SVC_FLAG_AFFINITY != 0 {
            sticky_after.insert(f.rev_nat_id);
            want_pairs.extend(
                f.ids
                    .iter()
                    .filter(|id| **id != 0)
                    .map(|id| (f.rev_nat_id, *id)),
            );
        }
    }
    let mut first = Vec::new();
    let mut last = Vec::new();
    first.extend(
        current
            .aff_match
            .iter()
            .filter(|p| !want_pairs.contains(p))
            .map(|&(rev_nat_id, backend_id)| Op::DeleteAffinityMatch {
                backend_id,
                rev_nat_id,
            }),
    );
    // Metadata of ids the plan stops using goes first too, while the reverse-NAT entry
    // that leads a plan of a few frontends to the id still exists.
    first.extend(
        current
            .meta
            .keys()
            .filter(|id| !want_meta.contains_key(id))
            .map(|&rev_nat_id| Op::DeleteMeta { rev_nat_id }),
    );
    let forget: BTreeSet<u32> = current
        .frontends
        .values()
        .filter(|cf| has_master(cf) && cf.flags & SVC_FLAG_AFFINITY != 0)
        .map(|cf| cf.rev_nat_id)
        .filter(|id| !sticky_after.contains(id))
        .collect();
    first.extend(
        forget
            .into_iter()
            .map(|rev_nat_id| Op::ForgetAffinity { rev_nat_id }),
    );
    last.extend(
        want_pairs
            .iter()
            .filter(|p| !current.aff_match.contains(p))
            .map(|&(rev_nat_id, backend_id)| Op::UpsertAffinityMatch {
                backend_id,
                rev_nat_id,
            }),
    );
    for (&rev_nat_id, d) in &want_meta {
        if !current
            .meta
            .get(&rev_nat_id)
            .is_some_and(|have| codec::meta_is(d, have))
        {
            last.push(Op::UpsertMeta {
                rev_nat_id,
                meta: Box::new(codec::meta_of(d)),
            });
        }
    }

    (first, last)
}
