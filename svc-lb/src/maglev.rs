//! Maglev lookup tables for the external path (Eisenbud et al., NSDI 2016).
//!
//! A table has `m` (prime) entries, each a node-local backend id. It is filled from each
//! backend's permutation of `0..m` ([`svc_lb_common::maglev::permutation`], a function of
//! the backend's address, port and protocol only), taking turns in address order. So the
//! table maps every entry to the same backend *address* on every node, whatever ids the
//! nodes gave their backends and in whatever order they learnt them; and a change of one
//! backend moves only about `m / n` entries, which keeps most established flows where
//! they are on nodes that have no conntrack entry for them (ECMP in front of the nodes).
use svc_lb_common::maglev::permutation;

use crate::{datapath::codec::addr_words, model::BackendAddr};

/// Fills a table of `m` entries (a prime, `m >= 2`) from `(id, address)` pairs, one per
/// slot of the frontend's weighted layout: an address listed `k` times has weight `k`
/// (the planner's slots repeat a backend in proportion to its weight). The result
/// depends on the addresses and their counts only (and their ids), not on the order of
/// `backends`. Pairs with id 0 (never valid) are ignored; an address listed with two
/// ids keeps the smallest. Returns an empty table when no backend is left.
pub fn populate(backends: &[(u32, BackendAddr)], m: u32) -> Vec<u32> {
    populate_weighted(&weights_of(backends), m)
}

/// The `(id, address, weight)` triples [`populate`] fills from: an address's weight is
/// how often it is listed.
fn weights_of(backends: &[(u32, BackendAddr)]) -> Vec<(u32, BackendAddr, u16)> {
    let mut sorted: Vec<(BackendAddr, u32)> = backends
        .iter()
        .filter(|(id, _)| *id != 0)
        .map(|(id, a)| (*a, *id))
        .collect();
    sorted.sort_unstable();
    let mut weighted: Vec<(u32, BackendAddr, u16)> = Vec::with_capacity(sorted.len());
    for (addr, id) in sorted {
        match weighted.last_mut() {
            Some((_, a, w)) if *a == addr => *w = w.saturating_add(1),
            _ => weighted.push((id, addr, 1)),
        }
    }
    weighted
}

/// The backends [`populate_weighted`] takes turns with, in turn order (by address):
/// `(address, id, weight)`, first id of an address, no weight 0.
fn turn_order(backends: &[(u32, BackendAddr, u16)]) -> Vec<(BackendAddr, u32, u16)> {
    let mut sorted: Vec<(BackendAddr, u32, u16)> = backends
        .iter()
        .filter(|(id, _, _)| *id != 0)
        .map(|(id, addr, w)| (*addr, *id, *w))
        .collect();
    sorted.sort_unstable();
    sorted.dedup_by_key(|(addr, _, _)| *addr);
    sorted.retain(|(_, _, w)| *w != 0);
    sorted
}

/// How many of the `m` entries of `populate(backends, m)` each backend id gets, sorted
/// by id (ids without an entry left out), without building the table: the count
/// depends on the weights and the turn order only, never on the permutations (every
/// turn places exactly one entry). This is what a table read back from the kernel can
/// still tell about the weights it was built with (see `plan::MaglevDigest`).
/// O(n log m) for n backends.
pub fn entry_counts(backends: &[(u32, BackendAddr)], m: u32) -> Vec<(u32, u32)> {
    let sorted = turn_order(&weights_of(backends));
    if sorted.is_empty() || m < 2 {
        return Vec::new();
    }
    let max_w = sorted
        .iter()
        .map(|(_, _, w)| u64::from(*w))
        .max()
        .unwrap_or(1);
    // Credit starts at 0 and grows by w each round, and a turn costs max_w: after r
    // rounds a backend has placed floor(r * w / max_w) entries.
    let placed = |r: u64, w: u16| r * u64::from(w) / max_w;
    let total = |r: u64| sorted.iter().map(|(_, _, w)| placed(r, *w)).sum::<u64>();
    let m64 = u64::from(m);
    // The largest number of whole rounds that fit: the heaviest backend places one
    // entry every round, so at most m rounds.
    let (mut lo, mut hi) = (0u64, m64);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if total(mid) <= m64 {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let rounds = lo;
    let mut left = m64 - total(rounds);
    let mut counts: Vec<(u32, u32)> = sorted
        .iter()
        .map(|(_, id, w)| {
            let mut n = placed(rounds, *w);
            // The round that fills the table: turns in address order until it is full.
            if left > 0 && placed(rounds + 1, *w) > n {
                n += 1;
                left -= 1;
            }
            (*id, u32::try_from(n).unwrap_or(u32::MAX))
        })
        .filter(|(_, n)| *n != 0)
        .collect();
    counts.sort_unstable();
    counts
}

/// [`populate`] with a weight per backend (Katran's weighted Maglev): each backend
/// gains its weight in credit every round and places an entry whenever its credit
/// reaches the largest weight, so its share of the table is in proportion to its
/// weight. Weight 0 (drain) places nothing; all weights 0 give an empty table.
pub fn populate_weighted(backends: &[(u32, BackendAddr, u16)], m: u32) -> Vec<u32> {
    let sorted = turn_order(backends);
    if sorted.is_empty() || m < 2 {
        return Vec::new();
    }
    let size = m as usize;
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|(a, _, _)| {
            let (offset, skip) = permutation(&addr_words(a.addr), a.port.to_be(), a.proto, m);
            (u64::from(offset), u64::from(skip))
        })
        .collect();
    let max_w = sorted
        .iter()
        .map(|(_, _, w)| u32::from(*w))
        .max()
        .unwrap_or(1);
    let mut credit = vec![0u32; sorted.len()];
    // 0 marks a free entry: backend id 0 was filtered out above.
    let mut table = vec![0u32; size];
    let mut next = vec![0u64; sorted.len()];
    let mut filled = 0usize;
    'fill: loop {
        for (i, (_, id, w)) in sorted.iter().enumerate() {
            // credit < max_w before the add and w <= max_w, so at most one turn per
            // round; the backend(s) with the largest weight take a turn every round.
            credit[i] += u32::from(*w);
            if credit[i] < max_w {
                continue;
            }
            credit[i] -= max_w;
            let (offset, skip) = perms[i];
            // Each permutation visits every entry (skip is in 1..m and m is prime), so
            // this ends within m steps while an entry is free.
            let mut c = ((offset + next[i] * skip) % u64::from(m)) as usize;
            while table[c] != 0 {
                next[i] += 1;
                c = ((offset + next[i] * skip) % u64::from(m)) as usize;
            }
            table[c] = *id;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::IpAddr};

    use svc_lb_common::{PROTO_TCP, PROTO_UDP, maglev::is_prime};

    use super::*;

    const M: u32 = 16_381;
    const SMALL: u32 = 251;

    fn addr(i: u32) -> BackendAddr {
        BackendAddr {
            addr: IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
            port: 8080,
            proto: PROTO_TCP,
        }
    }

    /// Backends 1..=n with ids equal to their index.
    fn set(n: u32) -> Vec<(u32, BackendAddr)> {
        (1..=n).map(|i| (i, addr(i))).collect()
    }

    /// The table as addresses, so tables with different ids can be compared.
    fn by_addr(table: &[u32], backends: &[(u32, BackendAddr)]) -> Vec<BackendAddr> {
        let ids: BTreeMap<u32, BackendAddr> = backends.iter().copied().collect();
        table.iter().map(|id| ids[id]).collect()
    }

    #[test]
    fn sizes_used_here_are_prime() {
        assert!(is_prime(M));
        assert!(is_prime(SMALL));
    }

    #[test]
    fn every_entry_is_a_backend_and_every_backend_has_entries() {
        for n in [1u32, 2, 3, 10, 100, 250] {
            let backends = set(n);
            let table = populate(&backends, SMALL);
            assert_eq!(table.len(), SMALL as usize);
            let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
            for id in &table {
                assert!((1..=n).contains(id), "entry {id} is not a backend (n={n})");
                *counts.entry(*id).or_default() += 1;
            }
            assert_eq!(counts.len(), n as usize, "every backend appears (n={n})");
        }
    }

    #[test]
    fn shares_are_even() {
        // Maglev's turn-taking gives each backend floor(M/N) or ceil(M/N) entries.
        for n in [3u32, 10, 37, 100] {
            let table = populate(&set(n), M);
            let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
            for id in &table {
                *counts.entry(*id).or_default() += 1;
            }
            let fair = M as f64 / f64::from(n);
            for (id, c) in counts {
                let dev = (c as f64 - fair).abs() / fair;
                assert!(
                    dev <= 0.03,
                    "backend {id} has {c} entries, fair share {fair:.1} (n={n})"
                );
            }
        }
    }

    /// Entries a one-backend change may move beyond the ones it must move. Maglev is
    /// not minimally disruptive: measured with M = 16381 the extra churn is about 0.5 %
    /// of M at 10 backends, 1.2 % at 50 and 1.5 % at 100 (the paper's observation: it
    /// shrinks as M/N grows). The bound allows 1 % up to 20 backends, 2 % up to 100.
    fn churn_bound(n: u32) -> usize {
        if n <= 20 {
            M as usize / 100
        } else {
            M as usize / 50
        }
    }

    /// Entries whose backend differs between two tables (compared by address).
    fn moved(a: &[BackendAddr], b: &[BackendAddr], except: Option<BackendAddr>) -> usize {
        a.iter()
            .zip(b)
            .filter(|(x, y)| x != y && Some(**x) != except && Some(**y) != except)
            .count()
    }

    #[test]
    fn removing_one_backend_moves_little_else() {
        for n in [10u32, 20, 50, 100] {
            let before_set = set(n);
            let before = by_addr(&populate(&before_set, M), &before_set);
            for gone in [1, n / 2, n] {
                let after_set: Vec<_> = before_set
                    .iter()
                    .copied()
                    .filter(|(id, _)| *id != gone)
                    .collect();
                let after = by_addr(&populate(&after_set, M), &after_set);
                // The removed backend's entries must move; they are ~M/n.
                let freed = before.iter().filter(|a| **a == addr(gone)).count();
                assert!(after.iter().all(|a| *a != addr(gone)));
                // Entries that belonged to a surviving backend and now go to another.
                let extra = moved(&before, &after, Some(addr(gone)));
                assert!(
                    extra <= churn_bound(n),
                    "n={n}, removed {gone}: {extra} extra entries moved (freed {freed})"
                );
            }
        }
    }

    #[test]
    fn adding_one_backend_moves_about_its_share() {
        for n in [10u32, 20, 50, 100] {
            let before_set = set(n);
            let mut after_set = before_set.clone();
            after_set.push((n + 1, addr(n + 1)));
            let before = by_addr(&populate(&before_set, M), &before_set);
            let after = by_addr(&populate(&after_set, M), &after_set);
            let total = moved(&before, &after, None);
            let to_new = after.iter().filter(|a| **a == addr(n + 1)).count();
            let share = M as usize / (n as usize + 1);
            assert!(
                to_new.abs_diff(share) <= share / 20 + 1,
                "n={n}: new backend got {to_new}, share {share}"
            );
            assert!(
                total <= to_new + churn_bound(n),
                "n={n}: {total} entries moved, {to_new} of them to the new backend"
            );
        }
    }

    #[test]
    fn order_and_ids_do_not_change_the_addresses() {
        let a = set(30);
        // Same addresses, reversed order, other ids.
        let b: Vec<(u32, BackendAddr)> = a
            .iter()
            .rev()
            .enumerate()
            .map(|(i, (_, addr))| (1000 + i as u32, *addr))
            .collect();
        assert_eq!(
            by_addr(&populate(&a, SMALL), &a),
            by_addr(&populate(&b, SMALL), &b)
        );
        assert_ne!(populate(&a, SMALL), populate(&b, SMALL), "ids do differ");
    }

    #[test]
    fn port_and_protocol_are_part_of_the_identity() {
        let a = set(10);
        let mut b = a.clone();
        b[0].1.proto = PROTO_UDP;
        b[1].1.port = 9090;
        assert_ne!(by_addr(&populate(&a, M), &a), by_addr(&populate(&b, M), &b));
    }

    #[test]
    fn ignores_id_zero_duplicates_and_empty_input() {
        assert!(populate(&[], SMALL).is_empty());
        assert!(populate(&[(0, addr(1))], SMALL).is_empty());
        let table = populate(&[(9, addr(1)), (7, addr(1)), (0, addr(2))], SMALL);
        assert!(table.iter().all(|id| *id == 7));
        let v6 = BackendAddr {
            addr: "fd00::1".parse().unwrap(),
            port: 80,
            proto: PROTO_TCP,
        };
        assert!(populate(&[(3, v6)], SMALL).iter().all(|id| *id == 3));
    }

    fn counts(table: &[u32]) -> BTreeMap<u32, usize> {
        let mut c: BTreeMap<u32, usize> = BTreeMap::new();
        for id in table {
            *c.entry(*id).or_default() += 1;
        }
        c
    }

    #[test]
    fn weighted_shares_follow_the_weights() {
        let backends: Vec<(u32, BackendAddr, u16)> =
            vec![(1, addr(1), 1), (2, addr(2), 2), (3, addr(3), 3)];
        let table = populate_weighted(&backends, M);
        let c = counts(&table);
        let total = table.len() as f64;
        for (id, w) in [(1u32, 1.0), (2, 2.0), (3, 3.0)] {
            let share = c.get(&id).copied().unwrap_or(0) as f64 / total;
            assert!(
                (share - w / 6.0).abs() < 0.01,
                "backend {id}: share {share}, want {}",
                w / 6.0
            );
        }
    }

    #[test]
    fn equal_weights_give_the_unweighted_table() {
        let plain = set(10);
        let weighted: Vec<(u32, BackendAddr, u16)> =
            plain.iter().map(|(id, a)| (*id, *a, 7)).collect();
        assert_eq!(populate(&plain, SMALL), populate_weighted(&weighted, SMALL));
    }

    /// The planner passes one pair per slot: repeats are the weight.
    #[test]
    fn repeated_pairs_count_as_weight() {
        let a = set(3);
        let mut slots = a.clone();
        slots.extend([a[2]; 2]);
        let repeated = populate(&slots, M);
        let weighted: Vec<(u32, BackendAddr, u16)> = a
            .iter()
            .enumerate()
            .map(|(i, (id, ad))| (*id, *ad, if i == 2 { 3 } else { 1 }))
            .collect();
        assert_eq!(repeated, populate_weighted(&weighted, M));
        assert_ne!(repeated, populate(&a, M));
    }

    #[test]
    fn weight_zero_gets_no_entry_and_all_zero_is_empty() {
        let backends: Vec<(u32, BackendAddr, u16)> =
            vec![(1, addr(1), 1), (2, addr(2), 0), (3, addr(3), 1)];
        let c = counts(&populate_weighted(&backends, SMALL));
        assert_eq!(c.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
        let drained: Vec<(u32, BackendAddr, u16)> = vec![(1, addr(1), 0), (2, addr(2), 0)];
        assert!(populate_weighted(&drained, SMALL).is_empty());
    }

    proptest::proptest! {
        /// `entry_counts` says exactly how many entries `populate` gives each id, for
        /// any layout (repeats, shuffled, several ids) and table size.
        #[test]
        fn entry_counts_match_the_table(
            slots in proptest::collection::vec(1u32..12, 0..40),
            m in proptest::sample::select(vec![2u32, 3, 5, 7, 13, 31, 251, 4093, M]),
        ) {
            // A backend's weight is how often its id repeats.
            let pairs: Vec<(u32, BackendAddr)> = slots.iter().map(|id| (*id, addr(*id))).collect();
            let want: Vec<(u32, u32)> = counts(&populate(&pairs, m))
                .into_iter()
                .map(|(id, n)| (id, n as u32))
                .collect();
            proptest::prop_assert_eq!(entry_counts(&pairs, m), want);
        }

        /// Every backend with weight w > 0 holds about w / sum(w) of the table (within
        /// 2 % of the table plus one entry per backend for rounding) and no drained
        /// backend holds any.
        #[test]
        fn weighted_proportions(weights in proptest::collection::vec(0u16..20, 1..30)) {
            let backends: Vec<(u32, BackendAddr, u16)> = weights.iter().enumerate()
                .map(|(i, w)| (i as u32 + 1, addr(i as u32 + 1), *w)).collect();
            let table = populate_weighted(&backends, M);
            let sum: u32 = weights.iter().map(|w| u32::from(*w)).sum();
            if sum == 0 {
                proptest::prop_assert!(table.is_empty());
                return Ok(());
            }
            proptest::prop_assert_eq!(table.len(), M as usize);
            let c = counts(&table);
            for (i, w) in weights.iter().enumerate() {
                let got = c.get(&(i as u32 + 1)).copied().unwrap_or(0) as f64;
                let want = f64::from(M) * f64::from(*w) / f64::from(sum);
                if *w == 0 {
                    proptest::prop_assert_eq!(got, 0.0);
                } else {
                    proptest::prop_assert!((got - want).abs() <= 0.02 * f64::from(M) + weights.len() as f64,
                        "backend {} weight {}: {} entries, want {}", i + 1, w, got, want);
                }
            }
        }
    }
}
