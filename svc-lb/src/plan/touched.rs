//! The incremental planner: the full planner's rules, run on the part of the state a
//! few frontends touch.
//!
//! It cuts out of `current` what the touched frontends can reach (their entries,
//! reverse-NAT ids no other master names, those ids' tables, ranges, affinity pairs
//! and metadata, and every backend id of the addresses they use or used), shrinks the
//! capacity by what everything else occupies, and hands that to the full planner with
//! the index's free ids. Two things reach beyond the cut and are settled after it:
//! a backend that a frontend outside it still names is never deleted, and its state is
//! never lowered from active to draining (another frontend may select it; the full
//! plan, which sees every frontend, decides that).
use std::collections::{BTreeMap, BTreeSet};

use super::{
    Capacity, CurrentState, Op, Plan,
    diff::plan_with,
    mirror::{has_master, present_slots},
};
use crate::model::{BackendAddr, DesiredState, FrontendKey};

/// Plans only the frontends in `touched` (current or desired), in O(touched · log N)
/// once the state's index is built (see [`CurrentState::build_index`]); without an
/// index it is the full [`super::plan`]. When nothing outside `touched` differs from
/// `desired`, the maps it reaches are the ones the full plan reaches.
pub fn plan_touched(
    current: &CurrentState,
    desired: &DesiredState,
    touched: &BTreeSet<FrontendKey>,
    cap: &Capacity,
) -> Plan {
    let Some(ix) = current.index() else {
        return super::plan(current, desired, cap);
    };
    let mut part = CurrentState::default();
    let mut revs: BTreeSet<u32> = BTreeSet::new();
    let mut backend_ids: BTreeSet<u32> = BTreeSet::new();
    let only_touched = |id: u32| ix.masters_of(id).all(|fe| touched.contains(fe));
    for fe in touched {
        if let Some(cf) = current.frontends.get(fe) {
            part.frontends.insert(*fe, cf.clone());
            if has_master(cf) && cf.rev_nat_id != 0 && only_touched(cf.rev_nat_id) {
                revs.insert(cf.rev_nat_id);
            }
            backend_ids.extend(current.slots_with_ids(fe).into_iter().map(|(_, id)| id));
        }
        // Orphaned entries this frontend may adopt, as the full plan would.
        revs.extend(ix.rev_nats_at(fe).filter(|id| only_touched(*id)));
        let wanted = desired
            .frontends
            .get(fe)
            .into_iter()
            .flat_map(|d| &d.backends);
        let draining = desired.draining.get(fe).into_iter().flatten();
        for b in wanted.chain(draining) {
            backend_ids.extend(ix.backend_ids_of(&b.addr));
        }
    }
    // A draining entry is named by no slot or table, so nothing above reaches one whose
    // endpoint left the touched frontends altogether (found by the e2e drain test: the
    // flow kept its backend after it stopped serving). Take every entry that no slot or
    // table names (the index keeps that set), except those an untouched frontend still
    // lists as draining; the rest are what the full plan deletes as unused.
    let mut unused = ix.unused_backends().peekable();
    if unused.peek().is_some() {
        let draining_elsewhere: BTreeSet<BackendAddr> = desired
            .draining
            .iter()
            .filter(|(fe, _)| !touched.contains(*fe))
            .flat_map(|(_, list)| list.iter().map(|b| b.addr))
            .collect();
        for id in unused {
            if current
                .backends
                .get(&id)
                .is_some_and(|b| !draining_elsewhere.contains(&b.addr))
            {
                backend_ids.insert(id);
            }
        }
    }
    for id in &revs {
        if let Some(fe) = current.rev_nats.get(id) {
            part.rev_nats.insert(*id, *fe);
        }
        if let Some(table) = current.maglev.get(id) {
            part.maglev.insert(*id, table.clone());
            backend_ids.extend(table.ids());
        }
        part.src_ranges.extend(
            current
                .src_ranges
                .range((*id, ipnet::IpNet::V4(Default::default()))..)
                .take_while(|(i, _)| i == id)
                .copied(),
        );
        part.aff_match
            .extend(current.aff_match.range((*id, 0)..=(*id, u32::MAX)).copied());
        if let Some(m) = current.meta.get(id) {
            part.meta.insert(*id, m.clone());
        }
    }
    for id in &backend_ids {
        if let Some(b) = current.backends.get(id) {
            part.backends.insert(*id, *b);
        }
    }

    let want = DesiredState {
        frontends: touched
            .iter()
            .filter_map(|fe| desired.frontends.get(fe).map(|d| (*fe, d.clone())))
            .collect(),
        draining: touched
            .iter()
            .filter_map(|fe| desired.draining.get(fe).map(|d| (*fe, d.clone())))
            .collect(),
        ..DesiredState::default()
    };

    // Room left by everything outside the part.
    let mut part_svc = [0usize; 2];
    for (fe, cf) in &part.frontends {
        part_svc[usize::from(fe.addr.is_ipv6())] +=
            usize::from(has_master(cf)) + present_slots(cf).count();
    }
    let part_src6 = part
        .src_ranges
        .iter()
        .filter(|(_, r)| matches!(r, ipnet::IpNet::V6(_)))
        .count();
    let part_src4 = part.src_ranges.len() - part_src6;
    let outside = |total: usize, mine: usize| total.saturating_sub(mine);
    let room = Capacity {
        svc4_entries: cap
            .svc4_entries
            .saturating_sub(outside(ix.svc_entries(false), part_svc[0])),
        svc6_entries: cap
            .svc6_entries
            .saturating_sub(outside(ix.svc_entries(true), part_svc[1])),
        backends: cap
            .backends
            .saturating_sub(outside(current.backends.len(), part.backends.len())),
        rev_nats: cap
            .rev_nats
            .saturating_sub(outside(current.rev_nats.len(), part.rev_nats.len())),
        maglev_tables: cap
            .maglev_tables
            .saturating_sub(outside(current.maglev.len(), part.maglev.len())),
        src_ranges4: cap
            .src_ranges4
            .saturating_sub(outside(ix.src_ranges(false), part_src4)),
        src_ranges6: cap
            .src_ranges6
            .saturating_sub(outside(ix.src_ranges(true), part_src6)),
    };

    let mut plan = plan_with(&part, &want, &room, Some(ix));

    // Slots and tables of the part that name each backend id: the rest of its users
    // are outside.
    let mut inside: BTreeMap<u32, u32> = BTreeMap::new();
    for fe in part.frontends.keys() {
        for (_, id) in current.slots_with_ids(fe) {
            *inside.entry(id).or_default() += 1;
        }
    }
    for table in part.maglev.values() {
        for id in table.ids() {
            *inside.entry(id).or_default() += 1;
        }
    }
    let shared = |id: u32| ix.backend_users(id) > inside.get(&id).copied().unwrap_or(0);
    plan.ops.retain(|op| match op {
        Op::DeleteBackend { id } => !shared(*id),
        Op::UpsertBackend { id, backend } => match current.backends.get(id) {
            Some(have) if shared(*id) && have.addr == backend.addr => {
                backend.state < have.state || backend.local != have.local
            }
            _ => true,
        },
        _ => true,
    });
    plan
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Instant};

    use svc_lb_common::{BACKEND_ACTIVE, KIND_CLUSTER_IP, PROTO_TCP, SCOPE_ALL};

    use super::{super::plan, *};
    use crate::model::{BackendAddr, DesiredBackend, DesiredFrontend, ServiceRef};

    fn frontend(i: u32, backends: u32, salt: u32) -> DesiredFrontend {
        let key = FrontendKey {
            addr: Ipv4Addr::from(0x0a60_0000 + i).into(),
            port: 80,
            proto: PROTO_TCP,
            scope: SCOPE_ALL,
        };
        DesiredFrontend {
            key,
            service: ServiceRef {
                namespace: "bench".into(),
                name: format!("svc-{i}").into(),
            },
            port_name: String::new(),
            backends: (0..backends)
                .map(|b| DesiredBackend {
                    addr: BackendAddr {
                        addr: Ipv4Addr::from(0x0b00_0000 + i * 16 + b + salt).into(),
                        port: 8080,
                        proto: PROTO_TCP,
                    },
                    state: BACKEND_ACTIVE,
                    local: false,
                })
                .collect(),
            affinity_timeout_s: None,
            kind: KIND_CLUSTER_IP,
            meta_flags: 0,
            flags: 0,
            src_ranges: Vec::new(),
            scheduler: Default::default(),
            slots: None,
        }
    }

    /// Cost of the first full sync's agent stages that this crate owns, on an empty
    /// mirror: the plan, then the mirror's apply and the index build. Run with
    /// `cargo test --release -p svc-lb plan_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn plan_cost_empty_mirror() {
        // `PLAN_COST_N=10000` measures one size (for a profile).
        let sizes: Vec<u32> = match std::env::var("PLAN_COST_N") {
            Ok(n) => vec![n.parse().unwrap()],
            Err(_) => vec![10_000, 100_000],
        };
        for n in sizes {
            let cap = Capacity {
                svc4_entries: 1 << 22,
                svc6_entries: 1 << 10,
                backends: 1 << 21,
                rev_nats: 1 << 18,
                maglev_tables: 1 << 10,
                src_ranges4: 1 << 10,
                src_ranges6: 1 << 10,
            };
            let per = if n > 10_000 { 10 } else { 3 };
            let desired = DesiredState {
                frontends: (0..n)
                    .map(|i| frontend(i, per, 0))
                    .map(|f| (f.key, f))
                    .collect(),
                ..DesiredState::default()
            };
            for round in 0..3 {
                let mut current = CurrentState::default();
                let t = Instant::now();
                let p = plan(&current, &desired, &cap);
                let plan_t = t.elapsed();
                let t = Instant::now();
                for op in &p.ops {
                    current.apply(op);
                }
                let apply_t = t.elapsed();
                let t = Instant::now();
                current.build_index();
                let index_t = t.elapsed();
                println!(
                    "N={n}x{per} round {round}: plan {plan_t:?} ({} ops), mirror apply {apply_t:?}, index build {index_t:?}",
                    p.ops.len()
                );
                assert_eq!(current.frontends.len(), n as usize);
            }
        }
    }

    /// Plan cost with N frontends programmed: the full plan against one touched
    /// Service whose endpoint changed. Run with
    /// `cargo test --release -p svc-lb plan_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn plan_cost_full_against_one_touched_service() {
        for n in [10_000u32, 100_000] {
            let cap = Capacity {
                svc4_entries: 1 << 21,
                svc6_entries: 1 << 10,
                backends: 1 << 21,
                rev_nats: 1 << 18,
                maglev_tables: 1 << 10,
                src_ranges4: 1 << 10,
                src_ranges6: 1 << 10,
            };
            let mut current = CurrentState::default();
            let mut desired = DesiredState {
                frontends: (0..n)
                    .map(|i| frontend(i, 3, 0))
                    .map(|f| (f.key, f))
                    .collect(),
                ..DesiredState::default()
            };
            // The fake checks every invariant after each op (quadratic at this size):
            // the mirror alone stands for the maps here.
            let p = plan(&current, &desired, &cap);
            for op in &p.ops {
                current.apply(op);
            }
            let t = Instant::now();
            current.build_index();
            let index = t.elapsed();
            let changed = frontend(n / 2, 3, 1);
            let touched = BTreeSet::from([changed.key]);
            desired.frontends.insert(changed.key, changed);
            let t = Instant::now();
            let full = plan(&current, &desired, &cap);
            let full_t = t.elapsed();
            let t = Instant::now();
            let one = plan_touched(&current, &desired, &touched, &cap);
            let one_t = t.elapsed();
            assert_eq!(
                full.ops.len(),
                one.ops.len(),
                "{:?}\n{:?}",
                full.ops,
                one.ops
            );
            let t = Instant::now();
            for op in &one.ops {
                current.apply(op);
            }
            let apply_t = t.elapsed();
            println!(
                "N={n}: full plan {full_t:?}, touched plan {one_t:?} ({} ops), mirror+index apply {apply_t:?}, index build {index:?}",
                one.ops.len()
            );
            assert!(plan(&current, &desired, &cap).ops.is_empty());
        }
    }
}
