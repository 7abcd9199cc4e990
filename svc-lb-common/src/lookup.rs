//! The per-connection backend choice, shared by the eBPF socket programs and
//! `svc-lb trace`.
//!
//! Both sides call [`choose_backend`] with closures that read their own view of the
//! maps: the eBPF side passes kernel map lookups, the CLI passes lookups into a snapshot
//! read from the pinned maps. The decision itself (which entry is consulted in which
//! order, which refusal reason applies) exists once, so `trace` cannot explain a choice
//! the datapath would not make.
use crate::{
    AffinityValue, CTR_SOCK_BACKEND_MISS, CTR_SOCK_NO_BACKEND, CTR_SOCK_SLOT_MISS,
    SVC_FLAG_AFFINITY, SvcValue, select_slot,
};

/// Whether (and how) a backend choice is tied to the client (session affinity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stickiness {
    /// The Service has no session affinity.
    Off,
    /// The client's remembered backend was used. The caller refreshes the entry with
    /// `now_ns`, so the timeout counts from the last connection (kube-proxy's rule).
    Remembered { now_ns: u64 },
    /// A backend was picked at random; the caller remembers it for the client at
    /// `now_ns`. `stale` says a remembered entry existed but could not be used (it timed
    /// out, or its backend left the Service).
    New { now_ns: u64, stale: bool },
}

/// Whether a remembered entry may still be used at `now_ns`: within the Service's
/// timeout since its last use. A clock that went backwards (it cannot, it is
/// monotonic) counts as expired rather than as "used in the future".
#[inline(always)]
pub fn affinity_fresh(entry: &AffinityValue, now_ns: u64, timeout_s: u32) -> bool {
    match now_ns.checked_sub(entry.last_used_ns) {
        Some(age) => age <= u64::from(timeout_s) * 1_000_000_000,
        None => false,
    }
}

/// What the datapath does with one new connection (or unconnected datagram).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice<B> {
    /// No master entry for the destination: not a Service, pass it untouched.
    NotService,
    /// A known Service that refuses the connection. `reason` is a `CTR_*` counter index.
    Refuse {
        reason: u32,
        rev_nat_id: u32,
        /// The slot that was chosen before the refusal (0 when none was).
        slot: u16,
        /// The backend id the slot pointed at (0 when none was read).
        backend_id: u32,
    },
    /// Rewrite the destination to `backend`.
    Backend {
        backend: B,
        backend_id: u32,
        rev_nat_id: u32,
        /// The slot `1..=count` that was chosen, or 0 when the client's remembered
        /// backend was used (session affinity).
        slot: u16,
        sticky: Stickiness,
    },
}

/// Chooses the backend of a new connection: master entry (slot 0) → backend count →
/// [`select_slot`] → slot entry → backend id → backend entry. O(1), no loop over
/// backends.
///
/// - `master`: the slot-0 entry of the destination (address, port, protocol, scope), or
///   `None` when there is none.
/// - `random`: a uniform random number; called only when the Service has backends.
/// - `slot_backend`: the `backend_id` stored in slot `n` (`1..=count`) of the same
///   frontend, or `None` when that slot is missing.
/// - `backend`: the backend entry for an id, or `None` when it is missing. `B` is
///   whatever the caller reads the address from (a map value pointer in eBPF, a copy in
///   the CLI).
///
/// A missing slot or backend entry means a planner bug or a map edited by hand (the
/// planner writes backends, then slots, then the master count): refusing is safer than
/// letting the connection reach the Service address.
///
/// Session affinity (`master.flags & SVC_FLAG_AFFINITY`), after the `count == 0` check
/// (an empty Service refuses whatever a client remembers) and before `random`:
/// - `now_ns`: the monotonic clock; called only for Services with affinity;
/// - `remembered`: the affinity entry of this client for the frontend (`rev_nat_id`);
/// - `is_member`: whether backend `id` still belongs to this frontend (the agent's
///   match map). An entry is used only when it is fresh ([`affinity_fresh`]), its
///   backend is a member and the backend entry exists; otherwise a new backend is
///   picked at random. The caller records the result ([`Stickiness`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn choose_backend<B>(
    master: Option<&SvcValue>,
    now_ns: impl FnOnce() -> u64,
    remembered: impl FnOnce(u32) -> Option<AffinityValue>,
    is_member: impl FnOnce(u32, u32) -> bool,
    random: impl FnOnce() -> u32,
    slot_backend: impl FnOnce(u16) -> Option<u32>,
    mut backend: impl FnMut(u32) -> Option<B>,
) -> Choice<B> {
    let Some(master) = master else {
        return Choice::NotService;
    };
    let rev_nat_id = master.rev_nat_id;
    let count = master.count;
    let refuse_empty = Choice::Refuse {
        reason: CTR_SOCK_NO_BACKEND,
        rev_nat_id,
        slot: 0,
        backend_id: 0,
    };
    if count == 0 {
        return refuse_empty;
    }
    let mut sticky = Stickiness::Off;
    if master.flags & SVC_FLAG_AFFINITY != 0 {
        let now = now_ns();
        let mut stale = false;
        if let Some(entry) = remembered(rev_nat_id) {
            if affinity_fresh(&entry, now, master.affinity_timeout_s)
                && is_member(entry.backend_id, rev_nat_id)
                && let Some(b) = backend(entry.backend_id)
            {
                return Choice::Backend {
                    backend: b,
                    backend_id: entry.backend_id,
                    rev_nat_id,
                    slot: 0,
                    sticky: Stickiness::Remembered { now_ns: now },
                };
            }
            stale = true;
        }
        sticky = Stickiness::New { now_ns: now, stale };
    }
    let Some(slot) = select_slot(random(), count) else {
        return refuse_empty;
    };
    let Some(backend_id) = slot_backend(slot) else {
        return Choice::Refuse {
            reason: CTR_SOCK_SLOT_MISS,
            rev_nat_id,
            slot,
            backend_id: 0,
        };
    };
    match backend(backend_id) {
        Some(backend) => Choice::Backend {
            backend,
            backend_id,
            rev_nat_id,
            slot,
            sticky,
        },
        None => Choice::Refuse {
            reason: CTR_SOCK_BACKEND_MISS,
            rev_nat_id,
            slot,
            backend_id,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytemuck::Zeroable;

    fn master(count: u32) -> SvcValue {
        SvcValue {
            count,
            rev_nat_id: 7,
            ..SvcValue::zeroed()
        }
    }

    fn sticky_master(count: u32, timeout_s: u32) -> SvcValue {
        SvcValue {
            flags: SVC_FLAG_AFFINITY,
            affinity_timeout_s: timeout_s,
            ..master(count)
        }
    }

    /// `choose_backend` without session affinity: the affinity closures must not run.
    fn choose<B>(
        m: Option<&SvcValue>,
        random: impl FnOnce() -> u32,
        slot_backend: impl FnOnce(u16) -> Option<u32>,
        backend: impl FnMut(u32) -> Option<B>,
    ) -> Choice<B> {
        choose_backend(
            m,
            || panic!("clock read without affinity"),
            |_| panic!("affinity map read without affinity"),
            |_, _| panic!("match map read without affinity"),
            random,
            slot_backend,
            backend,
        )
    }

    #[test]
    fn no_master_is_not_a_service() {
        let c: Choice<u32> = choose(None, || 0, |_| Some(1), Some);
        assert_eq!(c, Choice::NotService);
    }

    #[test]
    fn empty_service_refuses_without_drawing_a_random_number() {
        let m = master(0);
        let c: Choice<u32> = choose(
            Some(&m),
            || panic!("random drawn for an empty Service"),
            |_| Some(1),
            Some,
        );
        assert_eq!(
            c,
            Choice::Refuse {
                reason: CTR_SOCK_NO_BACKEND,
                rev_nat_id: 7,
                slot: 0,
                backend_id: 0
            }
        );
    }

    #[test]
    fn random_picks_slot_then_backend() {
        let m = master(3);
        let slots = [0u32, 11, 12, 13];
        let c = choose(
            Some(&m),
            || 4,
            |s| slots.get(usize::from(s)).copied(),
            |id| Some(id * 10),
        );
        // 4 % 3 + 1 = slot 2 → backend 12.
        assert_eq!(
            c,
            Choice::Backend {
                backend: 120,
                backend_id: 12,
                rev_nat_id: 7,
                slot: 2,
                sticky: Stickiness::Off,
            }
        );
    }

    #[test]
    fn missing_slot_or_backend_refuses_with_its_reason() {
        let m = master(2);
        let c: Choice<u32> = choose(Some(&m), || 1, |_| None, Some);
        assert!(matches!(
            c,
            Choice::Refuse {
                reason: CTR_SOCK_SLOT_MISS,
                slot: 2,
                ..
            }
        ));
        let c: Choice<u32> = choose(Some(&m), || 1, |_| Some(5), |_| None);
        assert!(matches!(
            c,
            Choice::Refuse {
                reason: CTR_SOCK_BACKEND_MISS,
                slot: 2,
                backend_id: 5,
                ..
            }
        ));
    }

    const SEC: u64 = 1_000_000_000;

    fn entry(backend_id: u32, last_used_ns: u64) -> AffinityValue {
        AffinityValue {
            last_used_ns,
            backend_id,
            _pad: 0,
        }
    }

    /// Affinity on: the remembered backend when it is fresh, a member and exists;
    /// otherwise a random one, and the caller is told to remember it.
    fn sticky_choice(
        remembered: Option<AffinityValue>,
        member: bool,
        exists: bool,
        now: u64,
    ) -> Choice<u32> {
        let m = sticky_master(3, 10);
        let slots = [0u32, 11, 12, 13];
        choose_backend(
            Some(&m),
            || now,
            |rev| {
                assert_eq!(rev, 7, "the entry is looked up for this frontend");
                remembered
            },
            |id, rev| {
                assert_eq!((id, rev), (13, 7));
                member
            },
            || 0,
            |s| slots.get(usize::from(s)).copied(),
            |id| (id != 13 || exists).then_some(id * 10),
        )
    }

    #[test]
    fn affinity_uses_a_fresh_member_and_refreshes_it() {
        let now = 100 * SEC;
        assert_eq!(
            sticky_choice(Some(entry(13, now - 10 * SEC)), true, true, now),
            Choice::Backend {
                backend: 130,
                backend_id: 13,
                rev_nat_id: 7,
                slot: 0,
                sticky: Stickiness::Remembered { now_ns: now },
            }
        );
    }

    #[test]
    fn affinity_picks_anew_without_a_usable_entry() {
        let now = 100 * SEC;
        let random = |sticky| Choice::Backend {
            backend: 110,
            backend_id: 11,
            rev_nat_id: 7,
            slot: 1,
            sticky,
        };
        // No entry yet.
        assert_eq!(
            sticky_choice(None, true, true, now),
            random(Stickiness::New {
                now_ns: now,
                stale: false
            })
        );
        let stale = Stickiness::New {
            now_ns: now,
            stale: true,
        };
        // Timed out (one nanosecond past the timeout since the last connection).
        assert_eq!(
            sticky_choice(Some(entry(13, now - 10 * SEC - 1)), true, true, now),
            random(stale)
        );
        // The backend left the Service (or its id was reused elsewhere).
        assert_eq!(
            sticky_choice(Some(entry(13, now - SEC)), false, true, now),
            random(stale)
        );
        // The backend entry is gone.
        assert_eq!(
            sticky_choice(Some(entry(13, now - SEC)), true, false, now),
            random(stale)
        );
    }

    #[test]
    fn affinity_never_resurrects_an_empty_service() {
        let m = sticky_master(0, 10);
        let c: Choice<u32> = choose_backend(
            Some(&m),
            || panic!("clock read for an empty Service"),
            |_| Some(entry(13, 0)),
            |_, _| true,
            || 0,
            |_| Some(13),
            Some,
        );
        assert!(matches!(
            c,
            Choice::Refuse {
                reason: CTR_SOCK_NO_BACKEND,
                ..
            }
        ));
    }

    #[test]
    fn freshness_counts_from_the_last_use() {
        let e = entry(1, 5 * SEC);
        assert!(affinity_fresh(&e, 5 * SEC, 1));
        assert!(affinity_fresh(&e, 6 * SEC, 1));
        assert!(!affinity_fresh(&e, 6 * SEC + 1, 1));
        assert!(
            !affinity_fresh(&e, 4 * SEC, 1),
            "a clock going back is expired"
        );
        // The largest timeout cannot overflow.
        assert!(affinity_fresh(
            &e,
            5 * SEC + u64::from(u32::MAX) * SEC,
            u32::MAX
        ));
    }
}
