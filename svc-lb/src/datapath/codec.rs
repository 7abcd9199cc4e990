//! Conversions between the model's types and the raw map layout of svc-lb-common.
//! Shared by the real maps, the in-memory fake and the CLI, so all three read and
//! write exactly the same bytes.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail};
use svc_lb_common::{
    AffinityMatchKey, BACKEND_FLAG_LOCAL, Backend, FAMILY_V4, FAMILY_V6, RevNat, SVC_FLAG_AFFINITY,
    Svc4Key, Svc6Key, SvcMeta, SvcValue,
};
use tracing::warn;

use crate::{
    model::{BackendAddr, DesiredFrontend, FrontendKey, ServiceRef},
    plan::{BackendEntry, CurrentFrontend, CurrentState, Op},
};

/// One raw map write: `Some` puts the value under the key, `None` deletes the key. The
/// stores (the real maps and the fake) only carry these out; what an [`Op`] means in
/// bytes is decided once, by [`encode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Svc(SvcKey, Option<SvcValue>),
    Backend(u32, Option<Backend>),
    RevNat(u32, Option<RevNat>),
    /// A whole Maglev table (its first `--maglev-table-size` entries).
    Maglev(u32, Option<Vec<u32>>),
    /// LPM key (prefix length, key); `true` puts, `false` deletes.
    SrcRange4(u32, svc_lb_common::SrcRange4Key, bool),
    SrcRange6(u32, svc_lb_common::SrcRange6Key, bool),
    AffMatch(AffinityMatchKey, bool),
    Meta(u32, Option<SvcMeta>),
    /// Deletes every `LB_AFFINITY_V1` entry of this reverse-NAT id: the clients are
    /// keys the programs wrote, so only a walk of the map finds them.
    ForgetClients(u32),
    /// Deletes the kernel-written per-CPU counters of a backend id or reverse-NAT id
    /// (a missing key is fine), so that a reused id starts counting from zero.
    ResetBackendStats(u32),
    ResetFrontendStats(u32),
}

/// The raw writes that carry out `op`, in order. `maglev_size` is the table size of
/// the store. Fails only for an op no plan emits (a Maglev table without backends).
pub fn encode(op: &Op, maglev_size: u32) -> Result<Vec<Write>> {
    Ok(match op {
        single @ (Op::UpsertBackend { .. }
        | Op::UpsertRevNat { .. }
        | Op::UpsertSlot { .. }
        | Op::UpsertMaster { .. }
        | Op::UpsertAffinityMatch { .. }
        | Op::UpsertMeta { .. }) => single_put(single).into_iter().collect(),
        Op::DeleteBackend { id } => vec![Write::Backend(*id, None), Write::ResetBackendStats(*id)],
        Op::DeleteRevNat { id } => vec![Write::RevNat(*id, None), Write::ResetFrontendStats(*id)],
        Op::DeleteSlot { frontend, slot } => vec![Write::Svc(svc_key(frontend, *slot), None)],
        Op::DeleteMaster { frontend } => vec![Write::Svc(svc_key(frontend, 0), None)],
        Op::UpsertMaglev {
            rev_nat_id,
            backends,
        } => {
            let table = crate::maglev::populate(backends, maglev_size);
            if table.is_empty() {
                bail!(
                    "{}: no backend for the table of rev-NAT {rev_nat_id}",
                    svc_lb_common::MAP_MAGLEV
                );
            }
            vec![Write::Maglev(*rev_nat_id, Some(table))]
        }
        Op::DeleteMaglev { rev_nat_id } => vec![Write::Maglev(*rev_nat_id, None)],
        Op::UpsertSrcRange { rev_nat_id, range } | Op::DeleteSrcRange { rev_nat_id, range } => {
            let put = matches!(op, Op::UpsertSrcRange { .. });
            vec![match range {
                ipnet::IpNet::V4(net) => {
                    let (plen, k) = src_range4_key(*rev_nat_id, net);
                    Write::SrcRange4(plen, k, put)
                }
                ipnet::IpNet::V6(net) => {
                    let (plen, k) = src_range6_key(*rev_nat_id, net);
                    Write::SrcRange6(plen, k, put)
                }
            }]
        }
        Op::DeleteAffinityMatch {
            backend_id,
            rev_nat_id,
        } => vec![Write::AffMatch(
            AffinityMatchKey {
                backend_id: *backend_id,
                rev_nat_id: *rev_nat_id,
            },
            false,
        )],
        Op::ForgetAffinity { rev_nat_id } => vec![Write::ForgetClients(*rev_nat_id)],
        Op::DeleteMeta { rev_nat_id } => vec![Write::Meta(*rev_nat_id, None)],
    })
}

/// The one write of an op that puts a single entry into a hash map (`None` for every
/// other op): what [`encode`] gives for it, without a vector, for the store that packs
/// runs of such puts into batches.
pub fn single_put(op: &Op) -> Option<Write> {
    Some(match op {
        Op::UpsertBackend { id, backend } => Write::Backend(*id, Some(backend_raw(backend))),
        Op::UpsertRevNat { id, frontend } => Write::RevNat(*id, Some(revnat_raw(frontend))),
        Op::UpsertSlot {
            frontend,
            slot,
            backend_id,
        } => Write::Svc(svc_key(frontend, *slot), Some(slot_value(*backend_id))),
        Op::UpsertMaster {
            frontend,
            count,
            rev_nat_id,
            flags,
            affinity_timeout_s,
        } => Write::Svc(
            svc_key(frontend, 0),
            Some(master_value(
                *count,
                *rev_nat_id,
                *flags,
                *affinity_timeout_s,
            )),
        ),
        Op::UpsertAffinityMatch {
            backend_id,
            rev_nat_id,
        } => Write::AffMatch(
            AffinityMatchKey {
                backend_id: *backend_id,
                rev_nat_id: *rev_nat_id,
            },
            true,
        ),
        Op::UpsertMeta { rev_nat_id, meta } => Write::Meta(*rev_nat_id, Some(meta_raw(meta))),
        _ => return None,
    })
}

/// Fills the map-only parts of `state` (affinity match entries, metadata) from raw
/// map contents, as [`decode_state`] does for the rest.
pub fn decode_extras(
    state: &mut CurrentState,
    aff_match: impl IntoIterator<Item = AffinityMatchKey>,
    meta: impl IntoIterator<Item = (u32, SvcMeta)>,
) {
    state
        .aff_match
        .extend(aff_match.into_iter().map(|k| (k.rev_nat_id, k.backend_id)));
    state
        .meta
        .extend(meta.into_iter().map(|(id, m)| (id, meta_from_raw(&m))));
}

/// A service-map key of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SvcKey {
    V4(Svc4Key),
    V6(Svc6Key),
}

/// Network-order words of an address, as the kernel's `user_ip4`/`user_ip6` hold them.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let mut w = [0u32; 4];
            for (i, chunk) in o.chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            w
        }
    }
}

pub fn v4_from_word(w: u32) -> Ipv4Addr {
    Ipv4Addr::from(w.to_ne_bytes())
}

pub fn v6_from_words(w: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

pub fn port_be(port: u16) -> u16 {
    port.to_be()
}

pub fn port_from_be(port_be: u16) -> u16 {
    u16::from_be(port_be)
}

pub fn svc_key(fe: &FrontendKey, slot: u16) -> SvcKey {
    let w = addr_words(fe.addr);
    match fe.addr {
        IpAddr::V4(_) => SvcKey::V4(Svc4Key {
            addr_be: w[0],
            port_be: port_be(fe.port),
            slot,
            proto: fe.proto,
            scope: fe.scope,
            _pad: [0; 2],
        }),
        IpAddr::V6(_) => SvcKey::V6(Svc6Key {
            addr_be: w,
            port_be: port_be(fe.port),
            slot,
            proto: fe.proto,
            scope: fe.scope,
            _pad: [0; 2],
        }),
    }
}

/// The frontend and slot a raw key stands for.
pub fn frontend_of(key: &SvcKey) -> (FrontendKey, u16) {
    match key {
        SvcKey::V4(k) => (
            FrontendKey {
                addr: IpAddr::V4(v4_from_word(k.addr_be)),
                port: port_from_be(k.port_be),
                proto: k.proto,
                scope: k.scope,
            },
            k.slot,
        ),
        SvcKey::V6(k) => (
            FrontendKey {
                addr: IpAddr::V6(v6_from_words(k.addr_be)),
                port: port_from_be(k.port_be),
                proto: k.proto,
                scope: k.scope,
            },
            k.slot,
        ),
    }
}

pub fn master_value(count: u32, rev_nat_id: u32, flags: u16, affinity_timeout_s: u32) -> SvcValue {
    SvcValue {
        backend_id: 0,
        count,
        rev_nat_id,
        flags,
        _pad: 0,
        affinity_timeout_s,
    }
}

pub fn slot_value(backend_id: u32) -> SvcValue {
    SvcValue {
        backend_id,
        count: 0,
        rev_nat_id: 0,
        flags: 0,
        _pad: 0,
        affinity_timeout_s: 0,
    }
}

fn family_of(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

fn addr_from(family: u8, w: [u32; 4]) -> Result<IpAddr> {
    Ok(match family {
        FAMILY_V4 => IpAddr::V4(v4_from_word(w[0])),
        FAMILY_V6 => IpAddr::V6(v6_from_words(w)),
        other => bail!("unknown address family {other}"),
    })
}

pub fn backend_raw(b: &BackendEntry) -> Backend {
    Backend {
        addr_be: addr_words(b.addr.addr),
        port_be: port_be(b.addr.port),
        proto: b.addr.proto,
        family: family_of(b.addr.addr),
        state: b.state,
        flags: if b.local { BACKEND_FLAG_LOCAL } else { 0 },
        _pad: [0; 2],
    }
}

pub fn backend_from_raw(b: &Backend) -> Result<BackendEntry> {
    Ok(BackendEntry {
        addr: BackendAddr {
            addr: addr_from(b.family, b.addr_be)?,
            port: port_from_be(b.port_be),
            proto: b.proto,
        },
        state: b.state,
        local: b.flags & BACKEND_FLAG_LOCAL != 0,
    })
}

pub fn revnat_raw(fe: &FrontendKey) -> RevNat {
    RevNat {
        addr_be: addr_words(fe.addr),
        port_be: port_be(fe.port),
        family: family_of(fe.addr),
        proto: fe.proto,
    }
}

pub fn revnat_from_raw(r: &RevNat) -> Result<FrontendKey> {
    Ok(FrontendKey {
        addr: addr_from(r.family, r.addr_be)?,
        port: port_from_be(r.port_be),
        proto: r.proto,
        scope: svc_lb_common::SCOPE_ALL,
    })
}

fn put_str<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    // Kubernetes names are ASCII and within these limits; a longer one is cut rather
    // than refused, since the metadata never steers traffic.
    let n = s.len().min(N);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

fn get_str(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub use crate::plan::FrontendMeta;

pub fn meta_raw(m: &FrontendMeta) -> SvcMeta {
    SvcMeta {
        namespace: put_str(&m.service.namespace),
        name: put_str(&m.service.name),
        port_name: put_str(&m.port_name),
        kind: m.kind,
        flags: m.flags,
        _pad: [0; 6],
    }
}

/// The metadata of a desired frontend exactly as a read-back of the map returns it
/// (names cut to the field sizes), so that the planner's comparison with the mirror
/// settles.
pub fn meta_of(d: &DesiredFrontend) -> FrontendMeta {
    let meta = FrontendMeta {
        service: d.service.clone(),
        port_name: d.port_name.clone(),
        kind: d.kind,
        flags: d.meta_flags,
    };
    if meta_stored_whole(d) {
        // Shares the Service's names: no copy, no encode and decode per frontend.
        return meta;
    }
    meta_from_raw(&meta_raw(&meta))
}

/// Whether `have` is what [`meta_of`] returns for `d`, without building it when the
/// names are stored whole (every valid Kubernetes name is).
pub fn meta_is(d: &DesiredFrontend, have: &FrontendMeta) -> bool {
    if meta_stored_whole(d) {
        have.kind == d.kind
            && have.flags == d.meta_flags
            && *have.service.namespace == *d.service.namespace
            && *have.service.name == *d.service.name
            && have.port_name == d.port_name
    } else {
        meta_of(d) == *have
    }
}

/// Whether `d`'s names read back from `SvcMeta` unchanged: they fit their fields and
/// hold no NUL (which would end them early).
fn meta_stored_whole(d: &DesiredFrontend) -> bool {
    fn whole(s: &str, field: usize) -> bool {
        s.len() <= field && !s.as_bytes().contains(&0)
    }
    let raw = <SvcMeta as bytemuck::Zeroable>::zeroed();
    whole(&d.service.namespace, raw.namespace.len())
        && whole(&d.service.name, raw.name.len())
        && whole(&d.port_name, raw.port_name.len())
}

pub fn meta_from_raw(m: &SvcMeta) -> FrontendMeta {
    FrontendMeta {
        service: ServiceRef {
            namespace: get_str(&m.namespace).into(),
            name: get_str(&m.name).into(),
        },
        port_name: get_str(&m.port_name),
        kind: m.kind,
        flags: m.flags,
    }
}

/// Rebuilds [`CurrentState`] from raw map contents. Slots above a master's count are
/// reported as stale (an interrupted apply) so the planner deletes them; slots with no
/// master at all form a frontend with an empty, already-unreachable slot list.
pub fn decode_state(
    svc: impl IntoIterator<Item = (SvcKey, SvcValue)>,
    backends: impl IntoIterator<Item = (u32, Backend)>,
    rev_nats: impl IntoIterator<Item = (u32, RevNat)>,
) -> Result<CurrentState> {
    let mut state = CurrentState::default();
    let mut slots: std::collections::BTreeMap<FrontendKey, Vec<(u16, u32)>> = Default::default();
    let mut masters = std::collections::BTreeMap::new();
    for (key, value) in svc {
        let (fe, slot) = frontend_of(&key);
        if slot == 0 {
            masters.insert(fe, value);
        } else {
            slots.entry(fe).or_default().push((slot, value.backend_id));
        }
    }
    let all: std::collections::BTreeSet<FrontendKey> =
        masters.keys().chain(slots.keys()).copied().collect();
    for fe in all {
        let mut fe_slots = slots.remove(&fe).unwrap_or_default();
        fe_slots.sort_unstable();
        let (count, cur) = match masters.get(&fe) {
            Some(m) => (
                m.count,
                CurrentFrontend {
                    rev_nat_id: m.rev_nat_id,
                    flags: m.flags,
                    affinity_timeout_s: if m.flags & SVC_FLAG_AFFINITY != 0 {
                        m.affinity_timeout_s
                    } else {
                        0
                    },
                    backend_ids: Vec::new(),
                    stale_slots: Vec::new(),
                },
            ),
            None => (
                0,
                CurrentFrontend {
                    rev_nat_id: 0,
                    flags: 0,
                    affinity_timeout_s: 0,
                    backend_ids: Vec::new(),
                    stale_slots: Vec::new(),
                },
            ),
        };
        let mut cur = cur;
        // A hole (slot missing below the count) is kept as id 0, which is never valid,
        // so the planner sees a difference and rewrites the frontend. Slots are u16, so a
        // larger count (a corrupt or foreign entry) is holes up to the last slot: it must
        // not size the list (up to 16 GiB for a count of u32::MAX).
        let len = usize::try_from(count)
            .unwrap_or(usize::MAX)
            .min(svc_lb_common::MAX_BACKENDS_PER_FRONTEND);
        cur.backend_ids = vec![0; len];
        for (slot, id) in fe_slots {
            if u32::from(slot) <= count {
                cur.backend_ids[usize::from(slot) - 1] = id;
            } else {
                cur.stale_slots.push(slot);
            }
        }
        state.frontends.insert(fe, cur);
    }
    // Entries that do not decode are read as placeholders (see `backend_read_back`).
    for (id, raw) in backends {
        state.backends.insert(id, backend_read_back(id, &raw));
    }
    for (id, raw) in rev_nats {
        state.rev_nats.insert(id, revnat_read_back(id, &raw));
    }
    Ok(state)
}

/// Backend entry `id` as read back from the map. One that does not decode (a corrupt
/// or foreign write; an agent that failed on it would fail again on every restart) is
/// read as a placeholder that no desired state contains, so the next plan deletes it
/// and writes what belongs there.
pub fn backend_read_back(id: u32, raw: &Backend) -> BackendEntry {
    backend_from_raw(raw).unwrap_or_else(|e| {
        warn!(map = svc_lb_common::MAP_BACKENDS, id, error = %format!("{e:#}"), "undecodable entry: the next sync removes and rewrites it");
        BackendEntry {
            addr: BackendAddr {
                addr: undecodable_addr(id),
                port: 0,
                proto: 0,
            },
            state: 0,
            local: false,
        }
    })
}

/// Reverse-NAT entry `id` as read back from the map, a placeholder when it does not
/// decode (as [`backend_read_back`]).
pub fn revnat_read_back(id: u32, raw: &RevNat) -> FrontendKey {
    revnat_from_raw(raw).unwrap_or_else(|e| {
        warn!(map = svc_lb_common::MAP_REVNAT, id, error = %format!("{e:#}"), "undecodable entry: the next sync removes and rewrites it");
        FrontendKey {
            addr: undecodable_addr(id),
            port: 0,
            proto: 0,
            scope: svc_lb_common::SCOPE_ALL,
        }
    })
}

/// A placeholder address for entry `id`, unique per id: in 100::/64, the discard-only
/// prefix (RFC 6666), which no Service or endpoint uses.
fn undecodable_addr(id: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x100,
        0,
        0,
        0,
        0,
        0,
        (id >> 16) as u16,
        (id & 0xffff) as u16,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::MapStore as _;

    /// The one frontend-key builder of these tests.
    fn fe(addr: &str, port: u16, proto: u8, scope: u8) -> FrontendKey {
        FrontendKey {
            addr: addr.parse().unwrap(),
            port,
            proto,
            scope,
        }
    }

    /// A ClusterIP frontend of `default/a` at `key` with these backends: the one
    /// desired-frontend builder; tests override the fields they are about.
    fn desired(key: FrontendKey, backends: &[BackendEntry]) -> DesiredFrontend {
        DesiredFrontend {
            key,
            service: ServiceRef {
                namespace: "default".into(),
                name: "a".into(),
            },
            port_name: String::new(),
            backends: backends
                .iter()
                .map(|b| crate::model::DesiredBackend {
                    addr: b.addr,
                    state: b.state,
                    local: b.local,
                })
                .collect(),
            affinity_timeout_s: None,
            kind: svc_lb_common::KIND_CLUSTER_IP,
            meta_flags: 0,
            flags: 0,
            src_ranges: Vec::new(),
            scheduler: Default::default(),
            slots: None,
        }
    }

    #[test]
    fn metadata_shortcut_equals_the_read_back() {
        let long = "n".repeat(70);
        let cases = [
            ("default", "web", "http"),
            ("default", long.as_str(), "http"),
            ("ns", "web", "a-port-name-over-16"),
            ("ns\0x", "web", ""),
            (long.as_str(), "web\0", "p\0"),
        ];
        for (namespace, name, port_name) in cases {
            let d = DesiredFrontend {
                service: ServiceRef {
                    namespace: namespace.into(),
                    name: name.into(),
                },
                port_name: port_name.into(),
                meta_flags: 1,
                ..desired(fe("10.96.0.1", 80, 6, svc_lb_common::SCOPE_ALL), &[])
            };
            let full = FrontendMeta {
                service: d.service.clone(),
                port_name: d.port_name.clone(),
                kind: d.kind,
                flags: d.meta_flags,
            };
            let read_back = meta_from_raw(&meta_raw(&full));
            assert_eq!(
                meta_of(&d),
                read_back,
                "{namespace:?}/{name:?} {port_name:?}"
            );
            assert!(
                meta_is(&d, &read_back),
                "{namespace:?}/{name:?} {port_name:?}"
            );
            let other = FrontendMeta {
                flags: 0,
                ..read_back.clone()
            };
            assert!(!meta_is(&d, &other));
            let renamed = FrontendMeta {
                port_name: "x".into(),
                ..read_back
            };
            assert!(!meta_is(&d, &renamed));
        }
    }

    #[test]
    fn an_undecodable_entry_is_removed_and_rewritten_by_the_next_plan() {
        use crate::plan::{Op, plan};
        let fe = fe("10.96.0.10", 80, 6, svc_lb_common::SCOPE_ALL);
        let good = BackendEntry {
            addr: BackendAddr {
                addr: "10.0.0.1".parse().unwrap(),
                port: 8080,
                proto: 6,
            },
            state: svc_lb_common::BACKEND_ACTIVE,
            local: false,
        };
        let mut bad = backend_raw(&good);
        bad.family = 9;
        let mut bad_rev = revnat_raw(&fe);
        bad_rev.family = 7;
        let master = SvcValue {
            backend_id: 0,
            count: 1,
            rev_nat_id: 1,
            flags: 0,
            _pad: 0,
            affinity_timeout_s: 0,
        };
        let slot = SvcValue {
            backend_id: 1,
            ..master
        };
        let current = decode_state(
            [(svc_key(&fe, 0), master), (svc_key(&fe, 1), slot)],
            [(1, bad)],
            [(1, bad_rev)],
        )
        .expect("an undecodable entry is not an error");
        assert_eq!(current.backends.len(), 1);
        assert_eq!(current.rev_nats.len(), 1);

        let desired = crate::model::DesiredState {
            frontends: [(fe, desired(fe, &[good]))].into_iter().collect(),
            ..Default::default()
        };
        let cap = crate::datapath::fake::FakeMaps::with_default_capacity().capacity();
        let p = plan(&current, &desired, &cap);
        let upserted = p
            .ops
            .iter()
            .any(|op| matches!(op, Op::UpsertBackend { backend, .. } if backend.addr == good.addr));
        assert!(upserted, "the backend is written again: {:?}", p.ops);
        let deleted = |want: &Op| p.ops.iter().any(|op| op == want);
        let rewritten_in_place = p
            .ops
            .iter()
            .any(|op| matches!(op, Op::UpsertBackend { id: 1, .. }));
        assert!(
            rewritten_in_place || deleted(&Op::DeleteBackend { id: 1 }),
            "the undecodable backend is overwritten or removed: {:?}",
            p.ops
        );
        let rev_rewritten = p
            .ops
            .iter()
            .any(|op| matches!(op, Op::UpsertRevNat { frontend, .. } if *frontend == fe));
        assert!(
            rev_rewritten,
            "the reverse-NAT entry is written again: {:?}",
            p.ops
        );
    }

    #[test]
    fn v4_key_uses_kernel_byte_order() {
        let fe = fe("10.96.0.10", 53, 17, 0);
        let SvcKey::V4(k) = svc_key(&fe, 0) else {
            panic!("v4 expected")
        };
        // user_ip4 holds the address bytes in memory order; port likewise.
        assert_eq!(k.addr_be.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(k.port_be.to_ne_bytes(), [0, 53]);
        assert_eq!(frontend_of(&SvcKey::V4(k)), (fe, 0));
    }

    #[test]
    fn v6_round_trip() {
        let fe = fe("fd00::1:2", 8080, 6, 0);
        let key = svc_key(&fe, 3);
        assert_eq!(frontend_of(&key), (fe, 3));
        let b = BackendEntry {
            addr: BackendAddr {
                addr: "fd00::99".parse().unwrap(),
                port: 9,
                proto: 6,
            },
            state: 1,
            local: true,
        };
        assert_eq!(backend_raw(&b).flags, BACKEND_FLAG_LOCAL);
        assert_eq!(backend_from_raw(&backend_raw(&b)).unwrap(), b);
        let remote = BackendEntry { local: false, ..b };
        assert_eq!(backend_raw(&remote).flags, 0);
        assert_eq!(backend_from_raw(&backend_raw(&remote)).unwrap(), remote);
        assert_eq!(revnat_from_raw(&revnat_raw(&fe)).unwrap(), fe);
    }

    #[test]
    fn decode_reports_stale_slots_and_marks_holes() {
        let fe = fe("10.0.0.1", 80, 6, 0);
        let svc = vec![
            (svc_key(&fe, 0), master_value(2, 7, 0, 0)),
            (svc_key(&fe, 1), slot_value(11)),
            (svc_key(&fe, 2), slot_value(12)),
            (svc_key(&fe, 3), slot_value(13)),
        ];
        let st = decode_state(svc, [], []).unwrap();
        let cur = &st.frontends[&fe];
        assert_eq!(cur.backend_ids, vec![11, 12]);
        assert_eq!(cur.stale_slots, vec![3]);
        assert_eq!(cur.rev_nat_id, 7);

        let holed = vec![
            (svc_key(&fe, 0), master_value(2, 7, 0, 0)),
            (svc_key(&fe, 2), slot_value(12)),
        ];
        assert_eq!(
            decode_state(holed, [], []).unwrap().frontends[&fe].backend_ids,
            vec![0, 12]
        );
    }

    #[test]
    fn a_master_count_beyond_any_slot_is_bounded() {
        use crate::plan::{Op, plan};
        // A corrupt or foreign master (found by the codec fuzz target): its count alone
        // must not size the slot list (16 GiB here); slots are u16, so no more exist.
        let fe = fe("10.96.0.1", 80, 6, svc_lb_common::SCOPE_ALL);
        let svc = [
            (svc_key(&fe, 0), master_value(u32::MAX, 1, 0, 0)),
            (svc_key(&fe, 1), slot_value(7)),
        ];
        let current = decode_state(svc, [], []).unwrap();
        let cur = &current.frontends[&fe];
        assert_eq!(
            cur.backend_ids.len(),
            svc_lb_common::MAX_BACKENDS_PER_FRONTEND
        );
        assert_eq!(cur.backend_ids[0], 7);
        assert!(cur.backend_ids[1..].iter().all(|id| *id == 0));
        // With nothing desired, the next plan deletes the frontend.
        let cap = crate::datapath::fake::FakeMaps::with_default_capacity().capacity();
        let p = plan(&current, &crate::model::DesiredState::default(), &cap);
        assert!(
            p.ops.contains(&Op::DeleteMaster { frontend: fe }),
            "{:?}",
            p.ops
        );
    }
}

/// The LPM key of a source range of `rev_nat_id` (prefix length `32 + prefix`).
pub fn src_range4_key(rev_nat_id: u32, net: &ipnet::Ipv4Net) -> (u32, svc_lb_common::SrcRange4Key) {
    (
        32 + u32::from(net.prefix_len()),
        svc_lb_common::SrcRange4Key {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr_be: u32::from_ne_bytes(net.network().octets()),
        },
    )
}

pub fn src_range6_key(rev_nat_id: u32, net: &ipnet::Ipv6Net) -> (u32, svc_lb_common::SrcRange6Key) {
    (
        32 + u32::from(net.prefix_len()),
        svc_lb_common::SrcRange6Key {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr_be: addr_words(IpAddr::V6(net.network())),
        },
    )
}

/// The (rev-NAT id, prefix) a raw IPv4 source-range key stands for.
pub fn src_range4_from_raw(
    prefix_len: u32,
    k: &svc_lb_common::SrcRange4Key,
) -> Result<(u32, ipnet::IpNet)> {
    // The agent writes 32 bits of rev-NAT id before the address; a shorter key covers
    // several Services' ids and is nothing it wrote.
    if prefix_len < 32 {
        anyhow::bail!("prefix length {prefix_len} is shorter than the rev-NAT id (32)");
    }
    let net = ipnet::Ipv4Net::new(
        v4_from_word(k.addr_be),
        prefix_len.saturating_sub(32).try_into()?,
    )?;
    Ok((u32::from_be(k.rev_nat_id_be), ipnet::IpNet::V4(net)))
}

pub fn src_range6_from_raw(
    prefix_len: u32,
    k: &svc_lb_common::SrcRange6Key,
) -> Result<(u32, ipnet::IpNet)> {
    // The agent writes 32 bits of rev-NAT id before the address; a shorter key covers
    // several Services' ids and is nothing it wrote.
    if prefix_len < 32 {
        anyhow::bail!("prefix length {prefix_len} is shorter than the rev-NAT id (32)");
    }
    let net = ipnet::Ipv6Net::new(
        v6_from_words(k.addr_be),
        prefix_len.saturating_sub(32).try_into()?,
    )?;
    Ok((u32::from_be(k.rev_nat_id_be), ipnet::IpNet::V6(net)))
}

/// The `LB_NODEADDR_V1` key of a node address.
pub fn node_addr_key(addr: IpAddr) -> svc_lb_common::NodeAddrKey {
    svc_lb_common::NodeAddrKey {
        addr_be: addr_words(addr),
        family: family_of(addr),
        _pad: [0; 3],
    }
}

#[cfg(test)]
mod ext_tests {
    use super::*;

    fn k4_any() -> svc_lb_common::SrcRange4Key {
        src_range4_key(7, &"192.0.2.0/24".parse().unwrap()).1
    }

    #[test]
    fn source_range_keys_round_trip_in_lpm_layout() {
        let v4: ipnet::Ipv4Net = "192.0.2.0/24".parse().unwrap();
        let (plen, k) = src_range4_key(7, &v4);
        assert_eq!(plen, 56);
        // The id leads in network order, so the trie matches it first, in full.
        assert_eq!(bytemuck::bytes_of(&k)[..4], [0, 0, 0, 7]);
        assert_eq!(bytemuck::bytes_of(&k)[4..], [192, 0, 2, 0]);
        assert_eq!(
            src_range4_from_raw(plen, &k).unwrap(),
            (7, ipnet::IpNet::V4(v4))
        );
        let v6: ipnet::Ipv6Net = "2001:db8::/32".parse().unwrap();
        let (plen, k) = src_range6_key(9, &v6);
        assert_eq!(plen, 64);
        assert_eq!(bytemuck::bytes_of(&k)[4..8], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(
            src_range6_from_raw(plen, &k).unwrap(),
            (9, ipnet::IpNet::V6(v6))
        );
        // Keys the agent never writes are refused (the map read-back removes them):
        // shorter than the id, or longer than id + address.
        assert!(src_range4_from_raw(31, &k4_any()).is_err());
        assert!(src_range4_from_raw(65, &k4_any()).is_err());
        assert!(src_range6_from_raw(0, &k).is_err());
        assert!(src_range6_from_raw(161, &k).is_err());
        let n = node_addr_key("10.1.2.3".parse().unwrap());
        assert_eq!(
            (n.addr_be[0].to_ne_bytes(), n.family),
            ([10, 1, 2, 3], FAMILY_V4)
        );
    }
}
