//! Session affinity bookkeeping around a plan (pure; the maps are written by the
//! [`super::MapStore`] implementations).
//!
//! The socket programs remember, per client and frontend, the backend id a client was
//! sent to. Backend ids are shared by frontends and reused after they are freed, so an
//! id alone cannot say whether the backend still belongs to the frontend. The match map
//! says it: it holds exactly the (backend id, rev-NAT id) pairs of the frontends with
//! affinity, and the programs use a remembered backend only while its pair is there.
//!
//! Ordering, so that no connection ever follows a remembered backend out of its
//! Service:
//! 1. before the plan: remove the pairs that are leaving, and forget the clients of
//!    frontends whose affinity is switched off or that go away (so that switching it on
//!    again starts afresh, and a reused rev-NAT id inherits no clients);
//! 2. the plan;
//! 3. after the plan: add the new pairs (their slots exist by then).
use std::collections::{BTreeMap, BTreeSet};

use svc_lb_common::{AffinityMatchKey, SVC_FLAG_AFFINITY};

use crate::plan::CurrentState;

/// Every (backend, frontend) pair a remembered backend may use in `state`.
pub fn pairs(state: &CurrentState) -> BTreeSet<AffinityMatchKey> {
    state
        .frontends
        .values()
        .filter(|f| f.flags & SVC_FLAG_AFFINITY != 0)
        .flat_map(|f| {
            f.backend_ids
                .iter()
                .filter(|id| **id != 0)
                .map(|&backend_id| AffinityMatchKey {
                    backend_id,
                    rev_nat_id: f.rev_nat_id,
                })
        })
        .collect()
}

/// Rev-NAT ids of the frontends with affinity, with their timeouts.
fn sticky(state: &CurrentState) -> BTreeMap<u32, u32> {
    state
        .frontends
        .values()
        .filter(|f| f.flags & SVC_FLAG_AFFINITY != 0)
        .map(|f| (f.rev_nat_id, f.affinity_timeout_s))
        .collect()
}

/// What to do before a plan that turns `before` into `after`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prepare {
    /// Pairs to delete from the match map (`have` minus the pairs of `after`).
    pub remove: Vec<AffinityMatchKey>,
    /// Rev-NAT ids whose remembered clients to forget: affinity was on in `before` and
    /// is off, or the frontend is gone, in `after`.
    pub forget: BTreeSet<u32>,
}

/// `have` is what the match map holds now.
pub fn prepare(
    have: &BTreeSet<AffinityMatchKey>,
    before: &CurrentState,
    after: &CurrentState,
) -> Prepare {
    let keep = pairs(after);
    let still = sticky(after);
    Prepare {
        remove: have.difference(&keep).copied().collect(),
        forget: sticky(before)
            .into_keys()
            .filter(|id| !still.contains_key(id))
            .collect(),
    }
}

/// Pairs to add after the plan: those of `after` the match map lacks.
pub fn commit(have: &BTreeSet<AffinityMatchKey>, after: &CurrentState) -> Vec<AffinityMatchKey> {
    pairs(after).difference(have).copied().collect()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use svc_lb_common::{PROTO_TCP, SCOPE_ALL};

    use super::*;
    use crate::{model::FrontendKey, plan::CurrentFrontend};

    fn fe(last: u8) -> FrontendKey {
        FrontendKey {
            addr: IpAddr::from([10, 96, 0, last]),
            port: 80,
            proto: PROTO_TCP,
            scope: SCOPE_ALL,
        }
    }

    fn state(frontends: &[(u8, u32, bool, &[u32])]) -> CurrentState {
        CurrentState {
            frontends: frontends
                .iter()
                .map(|&(last, rev_nat_id, affinity, ids)| {
                    (
                        fe(last),
                        CurrentFrontend {
                            rev_nat_id,
                            flags: if affinity { SVC_FLAG_AFFINITY } else { 0 },
                            affinity_timeout_s: if affinity { 10 } else { 0 },
                            backend_ids: ids.to_vec(),
                            stale_slots: Vec::new(),
                        },
                    )
                })
                .collect(),
            ..CurrentState::default()
        }
    }

    fn key(backend_id: u32, rev_nat_id: u32) -> AffinityMatchKey {
        AffinityMatchKey {
            backend_id,
            rev_nat_id,
        }
    }

    #[test]
    fn pairs_cover_only_frontends_with_affinity() {
        let s = state(&[(1, 1, true, &[5, 6]), (2, 2, false, &[5, 7])]);
        assert_eq!(pairs(&s), BTreeSet::from([key(5, 1), key(6, 1)]));
    }

    #[test]
    fn leaving_pairs_go_before_the_plan_and_new_ones_after() {
        let before = state(&[(1, 1, true, &[5, 6]), (2, 2, true, &[8])]);
        // Backend 6 leaves frontend 1, backend 9 joins; frontend 2 switches affinity
        // off; frontend 3 is new with affinity.
        let after = state(&[
            (1, 1, true, &[5, 9]),
            (2, 2, false, &[8]),
            (3, 3, true, &[5]),
        ]);
        let have = pairs(&before);
        let p = prepare(&have, &before, &after);
        assert_eq!(p.remove, vec![key(6, 1), key(8, 2)]);
        assert_eq!(p.forget, BTreeSet::from([2]));
        let have: BTreeSet<_> = have
            .difference(&p.remove.iter().copied().collect())
            .copied()
            .collect();
        assert_eq!(commit(&have, &after), vec![key(5, 3), key(9, 1)]);
    }

    #[test]
    fn a_removed_frontend_forgets_its_clients_and_stray_pairs_are_cleaned() {
        let before = state(&[(1, 1, true, &[5])]);
        let after = CurrentState::default();
        // A pair left by an agent that died half-way is removed too.
        let have = BTreeSet::from([key(5, 1), key(99, 42)]);
        let p = prepare(&have, &before, &after);
        assert_eq!(p.remove, vec![key(5, 1), key(99, 42)]);
        assert_eq!(p.forget, BTreeSet::from([1]));
        assert!(commit(&BTreeSet::new(), &after).is_empty());
    }
}
