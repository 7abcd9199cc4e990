//! Entry points of the fuzz targets in `tests/fuzz` (issue 12), kept here so that the
//! same code checks both the fuzzer's inputs and the saved regressions: the host test
//! `svc-lb/tests/fuzz_regressions.rs` replays every file under
//! `tests/fuzz/regressions/<target>/` through these functions on stable Rust.
//!
//! Each function takes arbitrary bytes and panics only when a property fails:
//! - [`manifest`]: a file's bytes through the manifest parser never panic, and with
//!   [`CountingAlloc`] as the global allocator, parsing allocates at most
//!   [`manifest_heap_bound`] bytes at its peak (the YAML budget holds);
//! - [`model`]: Services and EndpointSlices (generated from the bytes, or the bytes
//!   parsed as a YAML manifest) through `model::build`: no panic, the result does not
//!   depend on input order, no refused address becomes an external frontend, the
//!   per-Service limits hold; then the plan applied to the in-memory maps keeps their
//!   invariants, and a second plan is empty;
//! - [`codec`]: raw map keys and values decode without panicking, re-encode to the same
//!   bytes where the layout defines them, and rebuild a state the planner can plan from.
#![doc(hidden)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

use arbitrary::{Result as ArbResult, Unstructured};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Map, Value, json};
use svc_lb_common::{
    BACKEND_FLAG_LOCAL, Backend, FAMILY_V4, FAMILY_V6, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER,
    RevNat, SrcRange4Key, SrcRange6Key, Svc4Key, Svc6Key, SvcMeta, SvcValue,
};

use crate::{
    datapath::{
        MapStore as _,
        apply::apply_plan,
        codec::{self, SvcKey},
        fake::FakeMaps,
    },
    model::{self, DesiredState, ModelError, NodeInfo, ServiceLimits, ServiceRef},
    plan::{self, Capacity, CurrentState},
    source::{Changed, Snapshot, manifests},
};

// ---------------------------------------------------------------------------------
// Heap accounting

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting live and peak heap bytes, so that a fuzz target can
/// check that parsing stays within the YAML budget. Install it with
/// `#[global_allocator]` in a single-threaded binary.
pub struct CountingAlloc;

// SAFETY: every call is forwarded unchanged to `System`; only counters are added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded; `ptr` came from `System` with this layout.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grow(new_size);
        }
        p
    }
}

fn grow(size: usize) {
    let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
    ACTIVE.store(true, Ordering::Relaxed);
}

/// Starts a measurement: returns the live heap bytes now and makes them the peak.
fn peak_reset() -> usize {
    let now = CURRENT.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// The most heap a manifest file of `len` bytes may take while it is parsed: a bounded
/// multiple of its size. The parser's budget allows events, nodes and alias replays of
/// about the document's length (plus 4 KiB of slack per document); each of those costs
/// a few hundred bytes at most once decoded into JSON values and Kubernetes structs.
pub fn manifest_heap_bound(len: usize) -> usize {
    len.saturating_add(4096)
        .saturating_mul(MANIFEST_HEAP_FACTOR)
}

/// Bytes of heap per byte of input (plus slack) that [`manifest_heap_bound`] allows.
pub const MANIFEST_HEAP_FACTOR: usize = 256;

// ---------------------------------------------------------------------------------
// Targets

/// Manifest parser: the bytes as a YAML file and as a JSON file.
pub fn manifest(data: &[u8]) {
    for name in ["fuzz.yaml", "fuzz.json"] {
        let path = Path::new(name);
        let base = peak_reset();
        let snap = manifests::parse_bytes(path, data);
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        if ACTIVE.load(Ordering::Relaxed) {
            let bound = manifest_heap_bound(data.len());
            assert!(
                peak <= bound,
                "parsing {} bytes as {name} took {peak} bytes of heap, over the bound of {bound}",
                data.len()
            );
        }
        for e in snap.errors.iter() {
            assert!(!e.reason.is_empty(), "an error without a reason: {e:?}");
            assert_eq!(e.file.as_deref(), Some(path), "an error without its file");
        }
    }
}

/// Model, plan and in-memory maps. Bytes that parse as a YAML manifest holding objects
/// are used as that manifest (the seeds are the example manifests); any other bytes
/// drive a generator of two generations of objects, applied one after the other.
pub fn model(data: &[u8]) {
    let snap = manifests::parse_bytes(Path::new("fuzz.yaml"), data);
    if !snap.services.is_empty() || !snap.slices.is_empty() {
        let node = NodeInfo {
            name: Some("n1".into()),
            zone: Some("zone-a".into()),
            addresses: vec![
                "192.168.1.10".parse().expect("literal"),
                "fd00:1::10".parse().expect("literal"),
            ],
            external: true,
            ..NodeInfo::default()
        };
        let desired = check_build(&snap, &node);
        sync(&mut Rig::new(), &desired);
        return;
    }
    let mut u = Unstructured::new(data);
    let Ok(node) = gen_node(&mut u) else {
        return;
    };
    let mut rig = Rig::new();
    let mut cache = model::Cache::default();
    let mut before = Snapshot::default();
    for _ in 0..2 {
        let Ok((services, slices)) = gen_objects(&mut u) else {
            return;
        };
        let mut snap = Snapshot::from_lists(services, slices);
        let desired = check_build(&snap, &node);
        // The cache, told only what differs from the generation before, agrees.
        snap.changed = changed_between(&before, &snap);
        check_incremental(&mut cache, &snap, &node, &desired);
        sync(&mut rig, &desired);
        before = snap;
    }
}

/// Random sequences of edits (Services and slices added, changed and removed, several
/// coalesced into one snapshot as the feed does, node changes, spurious change marks),
/// each applied to a [`model::Cache`] and checked by [`check_incremental`] against a
/// full build. Object names and addresses come from small pools, so cluster IPs,
/// node ports and external addresses clash often.
pub fn model_edits(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mut node) = gen_node(&mut u) else {
        return;
    };
    let mut cache = model::Cache::default();
    let mut snap = Snapshot {
        changed: Changed::all(),
        ..Snapshot::default()
    };
    // Slice (namespace, name) → the Service it is filed under.
    let mut owners: BTreeMap<(String, String), ServiceRef> = BTreeMap::new();
    let full = model::build(&snap, &node).0;
    check_incremental(&mut cache, &snap, &node, &full);
    while !u.is_empty() {
        if edit(&mut u, &mut snap, &mut owners, &mut node).is_err() {
            break;
        }
        let full = model::build(&snap, &node).0;
        check_incremental(&mut cache, &snap, &node, &full);
        snap.changed = Changed::default();
    }
}

/// One to three edits of `snap`, recorded in `snap.changed`.
fn edit(
    u: &mut Unstructured<'_>,
    snap: &mut Snapshot,
    owners: &mut BTreeMap<(String, String), ServiceRef>,
    node: &mut NodeInfo,
) -> ArbResult<()> {
    for _ in 0..u.int_in_range(1..=3)? {
        match u.int_in_range(0u8..=19)? {
            0..=6 => {
                let svc: Service =
                    serde_json::from_value(gen_service(u)?).expect("generated Service decodes");
                let svc = crate::source::compact_service(svc);
                let sref = crate::source::service_ref(&svc);
                snap.services.insert(sref.clone(), std::sync::Arc::new(svc));
                snap.changed.services.insert(sref);
            }
            7..=9 => {
                if snap.services.is_empty() {
                    continue;
                }
                let at = u.choose_index(snap.services.len())?;
                let sref = snap.services.keys().nth(at).cloned().expect("in range");
                snap.services.remove(&sref);
                snap.changed.services.insert(sref);
            }
            10..=15 => {
                let slice: EndpointSlice =
                    serde_json::from_value(gen_slice(u)?).expect("generated slice decodes");
                let ns = match slice.metadata.namespace.as_deref() {
                    None | Some("") => "default".to_owned(),
                    Some(ns) => ns.to_owned(),
                };
                let id = (ns, slice.metadata.name.clone().unwrap_or_default());
                if let Some(old) = owners.remove(&id) {
                    snap.remove_slice(&old, &id.1);
                    snap.changed.services.insert(old);
                }
                if let Some(owner) = snap.insert_slice(std::sync::Arc::new(slice.into())) {
                    snap.changed.services.insert(owner.clone());
                    owners.insert(id, owner);
                }
            }
            16 | 17 => {
                if owners.is_empty() {
                    continue;
                }
                let at = u.choose_index(owners.len())?;
                let id = owners.keys().nth(at).cloned().expect("in range");
                let owner = owners.remove(&id).expect("present");
                snap.remove_slice(&owner, &id.1);
                snap.changed.services.insert(owner);
            }
            18 => {
                // A Service marked changed that did not change (allowed: a superset).
                snap.changed.services.insert(ServiceRef {
                    namespace: (*pick(u, &["default", "x"])?).into(),
                    name: (*pick(u, NAMES)?).into(),
                });
            }
            _ => *node = gen_node(u)?,
        }
    }
    Ok(())
}

/// The Services whose object or slices differ between two snapshots.
pub fn changed_between(a: &Snapshot, b: &Snapshot) -> Changed {
    let mut services = std::collections::BTreeSet::new();
    for sref in a.services.keys().chain(b.services.keys()) {
        if a.services.get(sref) != b.services.get(sref) {
            services.insert(sref.clone());
        }
    }
    for sref in a.slices.keys().chain(b.slices.keys()) {
        if a.slices.get(sref) != b.slices.get(sref) {
            services.insert(sref.clone());
        }
    }
    Changed {
        all: false,
        services,
    }
}

/// Updates `cache` with `snap` (whose `changed` must name what differs from the
/// snapshot it saw last) and checks it against a full build: the same desired state,
/// the same errors, and every frontend whose entry differs from before is touched.
pub fn check_incremental(
    cache: &mut model::Cache,
    snap: &Snapshot,
    node: &NodeInfo,
    full: &DesiredState,
) {
    let old = cache.desired().clone();
    let touched = cache.update(snap, node);
    let (_, errors) = model::build(snap, node);
    assert_eq!(cache.desired(), full, "the cache differs from a full build");
    let cached: Vec<&ModelError> = cache.errors().collect();
    let errors: Vec<&ModelError> = errors.iter().collect();
    assert_eq!(
        cached, errors,
        "the cache's errors differ from a full build's"
    );
    assert_eq!(cache.error_count(), errors.len());
    if touched.all {
        return;
    }
    let keys: std::collections::BTreeSet<_> = old
        .frontends
        .keys()
        .chain(full.frontends.keys())
        .chain(old.draining.keys())
        .chain(full.draining.keys())
        .collect();
    for key in keys {
        if old.frontends.get(key) != full.frontends.get(key)
            || old.draining.get(key) != full.draining.get(key)
        {
            assert!(
                touched.frontends.contains(key),
                "{key:?} changed but is not touched"
            );
        }
    }
}

/// Map codec: the bytes are a sequence of raw map entries, each a tag byte then the
/// key and value bytes of one map.
pub fn codec(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut svc = Vec::new();
    let mut backends = Vec::new();
    let mut rev_nats = Vec::new();
    while !u.is_empty() {
        let mut step = |u: &mut Unstructured<'_>| -> ArbResult<()> {
            match u.int_in_range(0u8..=6)? {
                0 => {
                    let key = SvcKey::V4(raw(u)?);
                    check_svc_key(key);
                    svc.push((key, raw::<SvcValue>(u)?));
                }
                1 => {
                    let key = SvcKey::V6(raw(u)?);
                    check_svc_key(key);
                    svc.push((key, raw::<SvcValue>(u)?));
                }
                2 => {
                    let b: Backend = raw(u)?;
                    check_backend(&b);
                    backends.push((u.arbitrary::<u32>()?, b));
                }
                3 => {
                    let r: RevNat = raw(u)?;
                    check_rev_nat(&r);
                    rev_nats.push((u.arbitrary::<u32>()?, r));
                }
                4 => {
                    let meta = codec::meta_from_raw(&raw::<SvcMeta>(u)?);
                    for s in [
                        &*meta.service.namespace,
                        &*meta.service.name,
                        &*meta.port_name,
                    ] {
                        assert!(!s.contains('\0'), "a NUL inside a decoded name: {s:?}");
                    }
                }
                5 => {
                    let k: SrcRange4Key = raw(u)?;
                    let prefix = u.arbitrary::<u32>()?;
                    if let Ok((id, ipnet::IpNet::V4(net))) = codec::src_range4_from_raw(prefix, &k)
                    {
                        let (p2, k2) = codec::src_range4_key(id, &net);
                        assert_eq!(p2, prefix, "source range prefix length");
                        assert_eq!(k2.rev_nat_id_be, k.rev_nat_id_be);
                        assert_eq!(k2.addr_be, u32::from_ne_bytes(net.network().octets()));
                    }
                }
                _ => {
                    let k: SrcRange6Key = raw(u)?;
                    let prefix = u.arbitrary::<u32>()?;
                    if let Ok((id, ipnet::IpNet::V6(net))) = codec::src_range6_from_raw(prefix, &k)
                    {
                        let (p2, k2) = codec::src_range6_key(id, &net);
                        assert_eq!(p2, prefix, "source range prefix length");
                        assert_eq!(k2.rev_nat_id_be, k.rev_nat_id_be);
                    }
                }
            }
            Ok(())
        };
        if step(&mut u).is_err() {
            break;
        }
    }
    // What a restarted agent reads back from corrupt or foreign maps must plan: every
    // decoded frontend and entry is either kept or removed, never a crash.
    let current = codec::decode_state(svc, backends, rev_nats).expect("decode_state never fails");
    for fe in current.frontends.values() {
        assert!(
            fe.backend_ids.len() <= svc_lb_common::MAX_BACKENDS_PER_FRONTEND,
            "a frontend read back with {} slots",
            fe.backend_ids.len()
        );
    }
    let _ = plan::plan(&current, &DesiredState::default(), &capacity());
}

// ---------------------------------------------------------------------------------
// Codec checks

fn raw<T: bytemuck::Pod>(u: &mut Unstructured<'_>) -> ArbResult<T> {
    let bytes = u.bytes(size_of::<T>())?;
    Ok(bytemuck::pod_read_unaligned(bytes))
}

/// A service-map key decodes and encodes back to itself (padding aside).
fn check_svc_key(key: SvcKey) {
    let (fe, slot) = codec::frontend_of(&key);
    let want = match key {
        SvcKey::V4(k) => SvcKey::V4(Svc4Key { _pad: [0; 2], ..k }),
        SvcKey::V6(k) => SvcKey::V6(Svc6Key { _pad: [0; 2], ..k }),
    };
    assert_eq!(codec::svc_key(&fe, slot), want, "service key round trip");
}

/// A backend decodes exactly when its family is known, and then encodes back to itself
/// (padding, unknown flag bits and the unused words of an IPv4 address aside).
fn check_backend(b: &Backend) {
    match codec::backend_from_raw(b) {
        Ok(entry) => {
            let mut want = Backend {
                _pad: [0; 2],
                flags: b.flags & BACKEND_FLAG_LOCAL,
                ..*b
            };
            if b.family == FAMILY_V4 {
                want.addr_be[1..].fill(0);
            }
            assert_eq!(codec::backend_raw(&entry), want, "backend round trip");
        }
        Err(_) => assert!(
            b.family != FAMILY_V4 && b.family != FAMILY_V6,
            "a backend of a known family did not decode: {b:?}"
        ),
    }
}

fn check_rev_nat(r: &RevNat) {
    match codec::revnat_from_raw(r) {
        Ok(fe) => {
            let mut want = *r;
            if r.family == FAMILY_V4 {
                want.addr_be[1..].fill(0);
            }
            assert_eq!(codec::revnat_raw(&fe), want, "reverse NAT round trip");
        }
        Err(_) => assert!(
            r.family != FAMILY_V4 && r.family != FAMILY_V6,
            "a reverse NAT entry of a known family did not decode: {r:?}"
        ),
    }
}

// ---------------------------------------------------------------------------------
// Model checks

fn capacity() -> Capacity {
    FakeMaps::with_default_capacity().capacity()
}

struct Rig {
    fake: FakeMaps,
    current: CurrentState,
}

impl Rig {
    fn new() -> Self {
        Self {
            fake: FakeMaps::with_default_capacity(),
            current: CurrentState::default(),
        }
    }
}

/// Plans and applies as the agent does, checking the maps after every operation.
fn sync(rig: &mut Rig, desired: &DesiredState) {
    let p = plan::plan(&rig.current, desired, &rig.fake.capacity());
    let n = apply_plan(&mut rig.fake, &mut rig.current, &p).expect("the fake applies every op");
    assert_eq!(n, p.ops.len());
    rig.fake.check_invariants().expect("map invariants");
    rig.fake.check_settled().expect("settled maps");
    let read_back = rig.fake.read_current().expect("fake read-back");
    assert_eq!(rig.current, read_back, "mirror drifted from the maps");
    if p.rejected.is_empty() {
        let again = plan::plan(&rig.current, desired, &rig.fake.capacity());
        assert_eq!(again.ops, vec![], "second plan not empty");
    }
}

fn check_build(snap: &Snapshot, node: &NodeInfo) -> DesiredState {
    let (state, errors) = model::build(snap, node);
    check_state(&state, &errors, node);
    state
}

fn check_state(state: &DesiredState, errors: &[ModelError], node: &NodeInfo) {
    let mut per_service: BTreeMap<&ServiceRef, usize> = BTreeMap::new();
    for (key, fe) in &state.frontends {
        assert_eq!(*key, fe.key);
        *per_service.entry(&fe.service).or_default() += 1;
        if fe.kind == KIND_EXTERNAL_IP || fe.kind == KIND_LOAD_BALANCER {
            assert_eq!(
                model::never_a_frontend(&key.addr),
                None,
                "{key:?} of {} became a frontend",
                fe.service
            );
        }
        assert!(
            fe.backends.len() <= node.limits.max_backends,
            "{} has {} backends, over the limit",
            fe.service,
            fe.backends.len()
        );
        assert!(
            fe.backends.windows(2).all(|w| w[0].addr < w[1].addr),
            "backends of {key:?} not sorted and unique"
        );
    }
    for (svc, n) in per_service {
        assert!(
            n <= node.limits.max_frontends,
            "{svc} has {n} frontends, over the limit"
        );
    }
    for e in errors {
        assert!(!e.reason.is_empty(), "an error without a reason: {e}");
    }
}

// ---------------------------------------------------------------------------------
// Object generation: structurally valid objects whose values are often wrong.

const NAMES: &[&str] = &["a", "b", "web", "", "dns"];
const NAMESPACES: &[&str] = &["", "default", "x"];
const PORT_NAMES: &[&str] = &["", "http", "dns", "a", "Bad_Name", "8080"];
const IPS: &[&str] = &[
    "10.96.0.1",
    "10.96.0.2",
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "fd00::1",
    "fd00:96::1",
    "192.168.1.10",
    "fd00:1::10",
    "203.0.113.1",
    "127.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "169.254.169.254",
    "fe80::1",
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "10.0.0.999",
    "None",
    "bogus",
    "",
];
const PROTOCOLS: &[Option<&str>] = &[None, Some("TCP"), Some("UDP"), Some("SCTP"), Some("QUIC")];

fn pick<T: Copy>(u: &mut Unstructured<'_>, from: &[T]) -> ArbResult<T> {
    u.choose(from).copied()
}

fn ip(u: &mut Unstructured<'_>) -> ArbResult<Value> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 => Value::String(u.arbitrary::<String>()?),
        1 => Value::String(IpAddr::from(u.arbitrary::<[u8; 4]>()?).to_string()),
        _ => Value::String(pick(u, IPS)?.to_owned()),
    })
}

fn ips(u: &mut Unstructured<'_>, max: usize) -> ArbResult<Value> {
    let n = u.int_in_range(0..=max)?;
    (0..n)
        .map(|_| ip(u))
        .collect::<ArbResult<Vec<_>>>()
        .map(Value::Array)
}

fn port(u: &mut Unstructured<'_>) -> ArbResult<i32> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => u.arbitrary()?,
        1 => 0,
        2 => 65_536,
        3 => -1,
        4 => 30_000,
        5 => 8080,
        _ => u.int_in_range(79..=81)?,
    })
}

fn maybe<T>(
    u: &mut Unstructured<'_>,
    f: impl FnOnce(&mut Unstructured<'_>) -> ArbResult<T>,
) -> ArbResult<Option<T>> {
    if u.arbitrary()? {
        Ok(Some(f(u)?))
    } else {
        Ok(None)
    }
}

fn insert(map: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        map.insert(key.to_owned(), v);
    }
}

fn gen_service(u: &mut Unstructured<'_>) -> ArbResult<Value> {
    let mut labels = Map::new();
    if u.ratio(1, 8)? {
        labels.insert(model::LABEL_HEADLESS.into(), "".into());
    }
    if u.ratio(1, 8)? {
        let v = pick(u, &["svc-lb", "other", ""])?;
        labels.insert(model::LABEL_SERVICE_PROXY_NAME.into(), v.into());
    }
    let mut annotations = Map::new();
    if u.ratio(1, 8)? {
        let v = pick(
            u,
            &["10.0.0.0/8", "bogus", "10.0.0.0/8, fd00::/8", "0.0.0.0/0"],
        )?;
        annotations.insert(model::ANNOTATION_LB_SOURCE_RANGES.into(), v.into());
    }
    let mut spec = Map::new();
    let ty = pick(
        u,
        &[
            None,
            Some("ClusterIP"),
            Some("NodePort"),
            Some("LoadBalancer"),
            Some("ExternalName"),
            Some("Weird"),
        ],
    )?;
    insert(&mut spec, "type", ty.map(Value::from));
    insert(&mut spec, "clusterIP", maybe(u, ip)?);
    insert(&mut spec, "clusterIPs", maybe(u, |u| ips(u, 3))?);
    insert(&mut spec, "externalIPs", maybe(u, |u| ips(u, 3))?);
    insert(&mut spec, "externalName", maybe(u, ip)?);
    let n = u.int_in_range(0..=4)?;
    let mut ports = Vec::new();
    for _ in 0..n {
        let mut p = Map::new();
        p.insert("port".into(), port(u)?.into());
        insert(
            &mut p,
            "name",
            maybe(u, |u| pick(u, PORT_NAMES))?.map(Value::from),
        );
        insert(&mut p, "protocol", pick(u, PROTOCOLS)?.map(Value::from));
        let target = match u.int_in_range(0u8..=3)? {
            0 => None,
            1 => Some(Value::from(port(u)?)),
            _ => Some(Value::from(pick(u, PORT_NAMES)?)),
        };
        insert(&mut p, "targetPort", target);
        insert(&mut p, "nodePort", maybe(u, port)?.map(Value::from));
        ports.push(Value::Object(p));
    }
    spec.insert("ports".into(), Value::Array(ports));
    let affinity = pick(u, &[None, Some("None"), Some("ClientIP"), Some("Cookie")])?;
    insert(&mut spec, "sessionAffinity", affinity.map(Value::from));
    if u.arbitrary()? {
        let t = match u.int_in_range(0u8..=3)? {
            0 => u.arbitrary::<i32>()?,
            1 => 86_401,
            _ => u.int_in_range(0..=100)?,
        };
        spec.insert(
            "sessionAffinityConfig".into(),
            json!({"clientIP": {"timeoutSeconds": t}}),
        );
    }
    for key in ["internalTrafficPolicy", "externalTrafficPolicy"] {
        let v = pick(u, &[None, Some("Cluster"), Some("Local"), Some("Zonal")])?;
        insert(&mut spec, key, v.map(Value::from));
    }
    let ranges = maybe(u, |u| {
        let all = [
            "10.0.0.0/8",
            "fd00::/8",
            "0.0.0.0/0",
            "::/0",
            "bogus",
            "10.0.0.1/33",
        ];
        let n = u.int_in_range(0..=3)?;
        (0..n)
            .map(|_| pick(u, &all).map(Value::from))
            .collect::<ArbResult<Vec<_>>>()
    })?;
    insert(
        &mut spec,
        "loadBalancerSourceRanges",
        ranges.map(Value::Array),
    );
    insert(
        &mut spec,
        "healthCheckNodePort",
        maybe(u, port)?.map(Value::from),
    );
    insert(
        &mut spec,
        "publishNotReadyAddresses",
        maybe(u, |u| u.arbitrary::<bool>())?.map(Value::from),
    );
    let policy = pick(
        u,
        &[
            None,
            Some("SingleStack"),
            Some("PreferDualStack"),
            Some("RequireDualStack"),
            Some("Sometimes"),
        ],
    )?;
    insert(&mut spec, "ipFamilyPolicy", policy.map(Value::from));
    let n = u.int_in_range(0..=2)?;
    let mut ingress = Vec::new();
    for _ in 0..n {
        let mut i = Map::new();
        i.insert("ip".into(), ip(u)?);
        insert(
            &mut i,
            "ipMode",
            pick(u, &[None, Some("VIP"), Some("Proxy"), Some("Odd")])?.map(Value::from),
        );
        ingress.push(Value::Object(i));
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": pick(u, NAMES)?,
            "namespace": pick(u, NAMESPACES)?,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
        "status": {"loadBalancer": {"ingress": ingress}},
    }))
}

fn gen_slice(u: &mut Unstructured<'_>) -> ArbResult<Value> {
    let mut labels = Map::new();
    if u.ratio(7, 8)? {
        labels.insert(model::LABEL_SERVICE_NAME.into(), pick(u, NAMES)?.into());
    }
    let n = u.int_in_range(0..=3)?;
    let mut ports = Vec::new();
    for _ in 0..n {
        let mut p = Map::new();
        insert(&mut p, "port", maybe(u, port)?.map(Value::from));
        insert(
            &mut p,
            "name",
            maybe(u, |u| pick(u, PORT_NAMES))?.map(Value::from),
        );
        insert(&mut p, "protocol", pick(u, PROTOCOLS)?.map(Value::from));
        ports.push(Value::Object(p));
    }
    let n = u.int_in_range(0..=6)?;
    let mut endpoints = Vec::new();
    for _ in 0..n {
        let mut conditions = Map::new();
        for c in ["ready", "serving", "terminating"] {
            insert(
                &mut conditions,
                c,
                maybe(u, |u| u.arbitrary::<bool>())?.map(Value::from),
            );
        }
        let mut e = Map::new();
        e.insert("addresses".into(), ips(u, 2)?);
        e.insert("conditions".into(), Value::Object(conditions));
        insert(
            &mut e,
            "nodeName",
            pick(u, &[None, Some("n1"), Some("n2")])?.map(Value::from),
        );
        insert(
            &mut e,
            "zone",
            pick(u, &[None, Some("zone-a"), Some("zone-b")])?.map(Value::from),
        );
        if u.ratio(1, 4)? {
            let zones: Vec<Value> = (0..u.int_in_range(0..=2)?)
                .map(|_| pick(u, &["zone-a", "zone-b", ""]).map(|z| json!({"name": z})))
                .collect::<ArbResult<_>>()?;
            e.insert("hints".into(), json!({"forZones": zones}));
        }
        endpoints.push(Value::Object(e));
    }
    let address_type = pick(u, &["IPv4", "IPv6", "FQDN", "Hostname"])?;
    let name = format!("s{}", u.int_in_range(0u8..=3)?);
    Ok(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": pick(u, NAMESPACES)?, "labels": labels},
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    }))
}

fn gen_objects(u: &mut Unstructured<'_>) -> ArbResult<(Vec<Service>, Vec<EndpointSlice>)> {
    let mut services = Vec::new();
    for _ in 0..u.int_in_range(0..=4)? {
        // Generated values always have the right shape, so decoding cannot fail; a
        // failure would mean the generator is wrong, which the fuzzer should show.
        let svc = serde_json::from_value(gen_service(u)?).expect("generated Service decodes");
        services.push(svc);
    }
    let mut slices = Vec::new();
    for _ in 0..u.int_in_range(0..=4)? {
        let slice = serde_json::from_value(gen_slice(u)?).expect("generated slice decodes");
        slices.push(slice);
    }
    Ok((services, slices))
}

fn gen_node(u: &mut Unstructured<'_>) -> ArbResult<NodeInfo> {
    let mut addresses: Vec<IpAddr> = Vec::new();
    for a in ["192.168.1.10", "fd00:1::10", "10.0.0.1"] {
        if u.arbitrary()? {
            addresses.push(a.parse().expect("literal"));
        }
    }
    addresses.sort_unstable();
    let limits = if u.arbitrary()? {
        ServiceLimits::default()
    } else {
        ServiceLimits {
            max_frontends: u.int_in_range(0..=16)?,
            max_backends: u.int_in_range(0..=8)?,
        }
    };
    let cidrs = pick(
        u,
        &[&[][..], &["203.0.113.0/24"][..], &["0.0.0.0/0", "::/0"][..]],
    )?;
    Ok(NodeInfo {
        name: pick(u, &[None, Some("n1")])?.map(str::to_owned),
        zone: pick(u, &[None, Some("zone-a")])?.map(str::to_owned),
        addresses,
        service_proxy_name: pick(u, &[None, Some("svc-lb")])?.map(str::to_owned),
        external: u.arbitrary()?,
        external_ip_cidrs: cidrs.iter().map(|c| c.parse().expect("literal")).collect(),
        limits,
        scheduler: pick(
            u,
            &[
                crate::model::sched::Scheduler::Random,
                crate::model::sched::Scheduler::Rr,
                crate::model::sched::Scheduler::Wrr,
                crate::model::sched::Scheduler::Wlc,
            ],
        )?,
        conn_counts: u.arbitrary()?,
    })
}

// ---------------------------------------------------------------------------------
// LoadBalancer pools and L2 announcement

/// MetalLB `IPAddressPool`s, `L2Advertisement`s, Nodes and LoadBalancer Services through
/// pool validation, allocation and the choice of announcing node. Bytes that parse as a
/// YAML manifest with any of those kinds are that manifest; other bytes drive a generator
/// of hostile ones (CIDRs of every prefix length up to /0, reversed and cross-family
/// ranges, garbage, overlapping pools, requested and shared addresses, selectors with
/// unknown operators). Properties: no panic; bad pools are named in their error; the
/// valid ones are disjoint; the allocation is valid ([`crate::lbipam::validate`]), does
/// not depend on input order and is a fixed point (one pass is enough); every
/// announced address has exactly one winner, the same whichever node computes it.
pub fn lbipam(data: &[u8]) {
    let mut snap = manifests::parse_bytes(Path::new("fuzz.yaml"), data);
    if snap.pools.is_empty() && snap.l2_adverts.is_empty() && snap.nodes.is_empty() {
        let mut u = Unstructured::new(data);
        let Ok(doc) = gen_lb_objects(&mut u) else {
            return;
        };
        let text = serde_json::to_vec(&doc).expect("a JSON value serializes");
        snap = manifests::parse_bytes(Path::new("fuzz.json"), &text);
    }
    check_lbipam(&snap);
}

fn check_lbipam(snap: &Snapshot) {
    use crate::{announce, lbipam};
    let (pools, errors) = lbipam::pools(snap.pools.values().cloned());
    for e in &errors {
        assert!(
            e.starts_with("IPAddressPool "),
            "an error without its pool: {e}"
        );
    }
    for (i, a) in pools.iter().enumerate() {
        for b in &pools[i + 1..] {
            assert_ne!(a.name, b.name, "two valid pools named alike");
            for ra in &a.ranges {
                assert!(
                    !b.ranges.iter().any(|rb| ra.overlaps(rb)),
                    "valid pools {} and {} overlap",
                    a.name,
                    b.name
                );
            }
        }
    }
    let services: Vec<(&ServiceRef, &crate::source::SvcObj)> =
        snap.services.iter().map(|(r, s)| (r, &**s)).collect();
    let a = lbipam::allocate(&pools, services.iter().copied(), None);
    if let Err(e) = lbipam::validate(&pools, services.iter().copied(), &a) {
        panic!("invalid allocation: {e}");
    }
    let reversed = lbipam::allocate(&pools, services.iter().rev().copied(), None);
    assert_eq!(reversed, a, "the allocation depends on input order");
    // A fixed point: the same addresses and pending Services (a pending reason may
    // name another missing family once the others hold their addresses).
    let again = lbipam::allocate(&pools, services.iter().copied(), Some(&a));
    assert_eq!(
        again.assigned, a.assigned,
        "the allocation is not a fixed point"
    );
    assert!(
        again.pending.keys().eq(a.pending.keys()),
        "the pending Services are not a fixed point"
    );

    let adverts = lbipam::advertisements(snap.l2_adverts.values().cloned(), &pools);
    let nodes = announce::NodeView::all(&snap.nodes);
    let targets: Vec<announce::Target> = a
        .addresses()
        .map(|x| {
            let t = announce::Target {
                ip: x.ip,
                service: x.service.clone(),
                interfaces: Vec::new(),
                local_only: false,
                endpoint_nodes: Default::default(),
                node_selectors: Vec::new(),
            };
            (x.ip, t)
        })
        .collect::<BTreeMap<IpAddr, announce::Target>>()
        .into_values()
        .collect();
    let targets = announce::apply_adverts(targets, Some(&a), &adverts);
    let ifaces = ["eth0".to_owned()];
    let winners = announce::winners(&targets, &nodes, |_| true);
    let mut won: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for n in &nodes {
        let mine: std::collections::BTreeSet<IpAddr> =
            announce::assign(&targets, &nodes, &n.name, &ifaces, |_| true)
                .into_values()
                .flatten()
                .collect();
        for ip in mine {
            *won.entry(ip).or_default() += 1;
        }
    }
    for (node, ip) in &winners {
        assert!(
            nodes.iter().any(|n| n.name == *node && n.usable),
            "{ip} won by {node}, which is not a usable node"
        );
    }
    // Node names may repeat in hostile input; then both copies compute the same.
    let unique = nodes
        .iter()
        .map(|n| &n.name)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        == nodes.len();
    if unique {
        for (_, ip) in &winners {
            assert_eq!(
                won.get(ip),
                Some(&1),
                "{ip} is announced by {:?} nodes",
                won.get(ip)
            );
        }
        assert_eq!(
            won.len(),
            winners.len(),
            "an address is announced with no winner"
        );
    }
}

fn gen_pool_address(u: &mut Unstructured<'_>) -> ArbResult<String> {
    Ok(match u.int_in_range(0u8..=6)? {
        0 => u.arbitrary::<String>()?,
        1 => format!(
            "{}/{}",
            IpAddr::from(u.arbitrary::<[u8; 4]>()?),
            u.int_in_range(0u8..=34)?
        ),
        2 => format!(
            "{}/{}",
            IpAddr::from(u.arbitrary::<[u8; 16]>()?),
            u.int_in_range(0u8..=130)?
        ),
        3 => format!(
            "10.{}.0.{}/{}",
            u.int_in_range(0u8..=3)?,
            u.int_in_range(0u8..=255)?,
            pick(u, &[8u8, 16, 24, 28, 30, 31, 32])?
        ),
        4 => format!(
            "fd00:{:x}::{:x}/{}",
            u.int_in_range(0u16..=3)?,
            u.int_in_range(0u16..=255)?,
            pick(u, &[0u8, 48, 64, 120, 126, 127, 128])?
        ),
        5 => format!(
            "10.0.0.{}-10.0.{}.{}",
            u.int_in_range(0u8..=255)?,
            u.int_in_range(0u8..=1)?,
            u.int_in_range(0u8..=255)?
        ),
        _ => format!(
            "{}-{}",
            pick(
                u,
                &["10.0.0.1", "fd00::1", "::", "0.0.0.0", "255.255.255.255"]
            )?,
            pick(
                u,
                &[
                    "10.0.0.9",
                    "fd00::ffff",
                    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                    "10.0.0.0"
                ]
            )?
        ),
    })
}

fn gen_selector(u: &mut Unstructured<'_>) -> ArbResult<Value> {
    let mut sel = Map::new();
    if u.arbitrary()? {
        let mut labels = Map::new();
        labels.insert(
            pick(u, &["zone", "role", "x"])?.to_owned(),
            json!(pick(u, &["a", "b", ""])?),
        );
        sel.insert("matchLabels".into(), Value::Object(labels));
    }
    if u.arbitrary()? {
        sel.insert(
            "matchExpressions".into(),
            json!([{
                "key": pick(u, &["zone", "role", "x"])?,
                "operator": pick(u, &["In", "NotIn", "Exists", "DoesNotExist", "Gt", ""])?,
                "values": [pick(u, &["a", "b"])?],
            }]),
        );
    }
    Ok(Value::Object(sel))
}

/// A `kind: List` of hostile pools, advertisements, Nodes and LoadBalancer Services.
fn gen_lb_objects(u: &mut Unstructured<'_>) -> ArbResult<Value> {
    const POOLS: [&str; 4] = ["p0", "p1", "p2", "p1"];
    let mut items = Vec::new();
    for name in POOLS.iter().take(u.int_in_range(0usize..=4)?) {
        let mut addresses = Vec::new();
        for _ in 0..u.int_in_range(0u8..=3)? {
            addresses.push(Value::String(gen_pool_address(u)?));
        }
        let mut spec = json!({ "addresses": addresses });
        if u.arbitrary()? {
            spec["avoidBuggyIPs"] = json!(true);
        }
        if u.arbitrary()? {
            spec["autoAssign"] = json!(u.arbitrary::<bool>()?);
        }
        if u.arbitrary()? {
            spec["serviceAllocation"] = json!({ "namespaces": [pick(u, &["a", "b"])?] });
        }
        items.push(json!({
            "apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
            "metadata": { "name": name, "namespace": pick(u, &["metallb-system", "other"])?,
                          "labels": { "tier": pick(u, &["edge", "core"])? } },
            "spec": spec,
        }));
    }
    for i in 0..u.int_in_range(0u8..=2)? {
        let mut spec = Map::new();
        if u.arbitrary()? {
            spec.insert(
                "ipAddressPools".into(),
                json!([pick(u, &POOLS)?, pick(u, &["p2", "none"])?]),
            );
        }
        if u.arbitrary()? {
            spec.insert(
                "ipAddressPoolSelectors".into(),
                json!([{ "matchLabels": { "tier": pick(u, &["edge", "core"])? } }]),
            );
        }
        if u.arbitrary()? {
            spec.insert("interfaces".into(), json!([pick(u, &["eth0", "eth1"])?]));
        }
        if u.arbitrary()? {
            spec.insert("nodeSelectors".into(), json!([gen_selector(u)?]));
        }
        items.push(json!({
            "apiVersion": "metallb.io/v1beta1", "kind": "L2Advertisement",
            "metadata": { "name": format!("l2-{i}"), "namespace": "metallb-system" },
            "spec": spec,
        }));
    }
    for i in 0..u.int_in_range(0u8..=4)? {
        let mut labels = Map::new();
        if u.arbitrary()? {
            labels.insert("zone".into(), json!(pick(u, &["a", "b"])?));
        }
        if u.arbitrary()? {
            labels.insert(crate::announce::LABEL_EXCLUDE_LB.into(), json!(""));
        }
        items.push(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": format!("n{i}"), "labels": labels },
            "status": {
                "addresses": [{ "type": pick(u, &["InternalIP", "ExternalIP", "Hostname"])?, "address": ip(u)? }],
                "conditions": [{ "type": "Ready", "status": pick(u, &["True", "False", "Unknown"])? }],
            },
        }));
    }
    for i in 0..u.int_in_range(0u8..=12)? {
        let mut ann = Map::new();
        if u.ratio(1u8, 4)? {
            let req = match u.int_in_range(0u8..=3)? {
                0 => u.arbitrary::<String>()?,
                1 => format!("10.0.0.{}", u.int_in_range(0u8..=9)?),
                2 => format!("fd00::{:x}", u.int_in_range(0u8..=9)?),
                _ => format!(
                    "10.0.0.{},fd00::{:x}",
                    u.int_in_range(0u8..=9)?,
                    u.int_in_range(0u8..=9)?
                ),
            };
            ann.insert("metallb.io/loadBalancerIPs".into(), json!(req));
        }
        if u.ratio(1u8, 3)? {
            ann.insert(
                "metallb.universe.tf/allow-shared-ip".into(),
                json!(pick(u, &["k", "j"])?),
            );
        }
        if u.ratio(1u8, 6)? {
            ann.insert(
                "metallb.universe.tf/address-pool".into(),
                json!(pick(u, &POOLS)?),
            );
        }
        let families: &[&str] = pick(
            u,
            &[
                &["IPv4"][..],
                &["IPv6"][..],
                &["IPv4", "IPv6"][..],
                &["IPv6", "IPv4"][..],
                &[][..],
            ],
        )?;
        let mut status = json!({});
        if u.ratio(1u8, 6)? {
            status = json!({ "loadBalancer": { "ingress": [{ "ip": ip(u)? }] } });
        }
        items.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": format!("s{i}"), "namespace": pick(u, &["a", "b"])?, "annotations": ann },
            "spec": {
                "type": pick(u, &["LoadBalancer", "LoadBalancer", "LoadBalancer", "ClusterIP"])?,
                "clusterIP": "None",
                "ipFamilies": families,
                "ipFamilyPolicy": pick(u, &["SingleStack", "PreferDualStack", "RequireDualStack"])?,
                "externalTrafficPolicy": pick(u, &["Cluster", "Local"])?,
                "selector": { "app": pick(u, &["x", "y"])? },
                "ports": [{ "port": u.int_in_range(1u16..=4)?, "protocol": pick(u, &["TCP", "UDP"])? }],
            },
            "status": status,
        }));
    }
    Ok(json!({ "apiVersion": "v1", "kind": "List", "items": items }))
}

// ---------------------------------------------------------------------------------
// Endpoint weights (issue 15)

/// Bytes of heap per byte of annotation (plus 4 KiB) that parsing `svc-lb.io/weights`
/// may take at its peak: each bad entry keeps a reason that quotes it.
pub const WEIGHTS_HEAP_FACTOR: usize = 128;

/// The `svc-lb.io/weights` annotation of an EndpointSlice (`ADDRESS=WEIGHT,...`, any
/// text a namespace owner writes) through its parser, the slot layout of every
/// scheduler and the weighted Maglev table. Properties: no panic; parsing takes at most
/// [`WEIGHTS_HEAP_FACTOR`] × (size + 4 KiB) bytes of heap; every bad entry is reported
/// with the entry quoted and a reason, and no entry gives both a weight and an error;
/// the weights written back as an annotation parse to the same weights with no error;
/// the layout gives each endpoint with weight 0 no slot and every other endpoint at
/// least one (exactly `w / gcd` for weighted schedulers unless the layout says it was
/// scaled down, one for `rr`), heavier endpoints never fewer slots, and no more than
/// [`crate::model::sched::MAX_WEIGHTED_SLOTS`] slots (or one per endpoint); the Maglev
/// table built from the layout gives each endpoint the entries
/// [`crate::maglev::entry_counts`] predicts, which is what the planner's digest of a
/// table read back after a restart relies on.
pub fn weights(data: &[u8]) {
    use crate::model::sched::{MAX_WEIGHTED_SLOTS, Scheduler, parse_weights, weighted_layout};

    let text = String::from_utf8_lossy(data);
    let base = peak_reset();
    let parsed = parse_weights(&text);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    if ACTIVE.load(Ordering::Relaxed) {
        let bound = data
            .len()
            .saturating_add(4096)
            .saturating_mul(WEIGHTS_HEAP_FACTOR);
        assert!(
            peak <= bound,
            "parsing {} bytes of weights took {peak} bytes of heap, over the bound of {bound}",
            data.len()
        );
    }
    let entries = text.split(',').filter(|e| !e.trim().is_empty()).count();
    assert!(
        parsed.weights.len() + parsed.bad.len() <= entries,
        "{} weights and {} errors from {entries} entries",
        parsed.weights.len(),
        parsed.bad.len()
    );
    for reason in &parsed.bad {
        assert!(
            reason.starts_with('\'') && reason.contains("': "),
            "an error that does not quote its entry: {reason:?}"
        );
    }
    let canonical: Vec<String> = parsed
        .weights
        .iter()
        .map(|(a, w)| format!("{a}={w}"))
        .collect();
    let again = parse_weights(&canonical.join(","));
    assert_eq!(again.weights, parsed.weights, "weights do not round-trip");
    assert!(
        again.bad.is_empty(),
        "written-back weights refused: {:?}",
        again.bad
    );

    // The endpoints in address order, as a slice lists them.
    let weights: Vec<u16> = parsed.weights.values().copied().collect();
    let live = weights.iter().filter(|w| **w != 0).count();
    for sched in [
        Scheduler::Random,
        Scheduler::Rr,
        Scheduler::Wrr,
        Scheduler::Maglev,
    ] {
        let layout = weighted_layout(&weights, sched);
        let mut slots = vec![0usize; weights.len()];
        for i in &layout.slots {
            assert!(*i < weights.len(), "{sched}: slot names endpoint {i}");
            slots[*i] += 1;
        }
        assert!(
            layout.slots.len() <= MAX_WEIGHTED_SLOTS.max(live),
            "{sched}: {} slots",
            layout.slots.len()
        );
        let g = weights
            .iter()
            .filter(|w| **w != 0)
            .fold(0u16, |g, w| gcd16(g, *w));
        for (i, w) in weights.iter().enumerate() {
            let n = slots[i];
            match (*w, sched) {
                (0, _) => assert_eq!(n, 0, "{sched}: drained endpoint {i} has {n} slots"),
                (_, Scheduler::Rr) => assert_eq!(n, 1, "rr: endpoint {i} has {n} slots"),
                _ if layout.scaled.is_none() => {
                    assert_eq!(n, usize::from(*w / g), "{sched}: endpoint {i} weight {w}");
                }
                _ => assert!(n >= 1, "{sched}: endpoint {i} lost its slots"),
            }
            for (j, v) in weights.iter().enumerate() {
                if sched.weighted() && w > v {
                    assert!(
                        n >= slots[j],
                        "{sched}: weight {w} has {n} slots, weight {v} has {}",
                        slots[j]
                    );
                }
            }
        }
        if sched == Scheduler::Maglev && !layout.slots.is_empty() {
            let addrs: Vec<IpAddr> = parsed.weights.keys().copied().collect();
            let pairs: Vec<(u32, crate::model::BackendAddr)> = layout
                .slots
                .iter()
                .map(|i| {
                    let id = u32::try_from(*i).unwrap_or(u32::MAX - 1) + 1;
                    let addr = crate::model::BackendAddr {
                        addr: addrs[*i],
                        port: 8080,
                        proto: svc_lb_common::PROTO_TCP,
                    };
                    (id, addr)
                })
                .collect();
            const M: u32 = 251;
            let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
            for id in crate::maglev::populate(&pairs, M) {
                *counts.entry(id).or_default() += 1;
            }
            let counts: Vec<(u32, u32)> = counts.into_iter().collect();
            assert_eq!(
                crate::maglev::entry_counts(&pairs, M),
                counts,
                "Maglev entries per endpoint"
            );
        }
    }
}

fn gcd16(mut a: u16, mut b: u16) -> u16 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
