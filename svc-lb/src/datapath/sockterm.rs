//! Socket termination: destroys the sockets that the socket programs connected to a
//! backend through a Service once that backend stops being usable for the Service.
//!
//! The socket programs rewrite a connected socket's destination once, at connect(). A
//! connected UDP socket (a resolver, statsd, QUIC) then keeps talking to its backend
//! for ever, even after the backend left the Service, unless someone ends the socket.
//! kube-proxy flushes the UDP conntrack entries of removed endpoints for the same
//! reason. Here the agent destroys the socket: the application's next send or recv
//! fails (ECONNABORTED on recv, EDESTADDRREQ on send: the socket is disconnected) and a
//! reconnect goes through the socket programs again, to a live backend.
//!
//! Which sockets: the socket programs record every translation with the socket, in its
//! socket-local storage (`LB_SKRNATSK_V2`), and for a connected UDP socket (or on
//! kernels without socket storage, for every socket) in the LRU maps
//! `LB_SKRNAT4_V1`/`LB_SKRNAT6_V1` keyed by (socket cookie, backend), with the Service
//! address as the value. The sock_diag dump reports each socket's destination and
//! cookie, and with `INET_DIAG_REQ_SK_BPF_STORAGES` (kernel 5.7) a TCP socket's own
//! storage value too; the kernel leaves it out for UDP sockets, hence their LRU entry.
//! Only connected UDP sockets write it, so a pod churning unconnected sockets cannot
//! push it out, and an eviction costs one missed destroy, never a reply. A socket is
//! destroyed only when
//! - its destination is a backend that left a Service (address, port, protocol),
//! - and its record (its storage, else the LRU entry of its cookie) maps that backend
//!   to that Service.
//!
//! A socket that dialled the backend directly has no such entry and is left alone.
//! Unconnected UDP sockets are never touched (they are not in the dump: only sockets
//! in state ESTABLISHED are asked for): destroying one would free its local port under
//! the application. TCP is left to its own end-to-end signalling unless
//! `--destroy-tcp` asks for it.
//!
//! How: netlink sock_diag (`SOCK_DIAG_BY_FAMILY` dumps, `SOCK_DESTROY`, kernel config
//! `CONFIG_INET_DIAG_DESTROY`). Both act on the network namespace of the netlink
//! socket, and pods live in their own namespaces, so a dedicated thread visits every
//! namespace that has a process (`/proc/*/task/*/ns/net`) or a name
//! (`/run/netns/*`), once each: it enters the namespace only to open a netlink socket
//! there (the socket stays bound to it) and returns at once. The work runs on that
//! thread, never on the async runtime.
//!
//! The BPF socket iterator with the `bpf_sock_destroy` kfunc (kernel 6.5+) would do
//! the same without visiting namespaces; aya 0.14 cannot load such a program (see the
//! README), so this is the one mechanism, and [`SockTermMode`] says whether it works.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use svc_lb_common::{
    MAP_SOCK_RNAT_SK, MAP_SOCK_RNAT4, MAP_SOCK_RNAT6, PROTO_TCP, PROTO_UDP, SCOPE_ALL, SK_RNAT_V4,
    SK_RNAT_V6, SockRevNat4Key, SockRevNat4Value, SockRevNat6Key, SockRevNat6Value,
    SockRevNatStore,
};
use tracing::{debug, info, warn};

use super::codec::{addr_words, port_be, port_from_be, v4_from_word, v6_from_words};
use crate::{
    model::{BackendAddr, FrontendKey},
    plan::{CurrentState, Op},
};

/// How the agent ends sockets pinned to removed backends. The kernel-feature probe
/// chooses; [`probe`] is the netlink check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockTermMode {
    /// sock_diag `SOCK_DESTROY`, namespace by namespace.
    Netlink,
    /// Nothing is destroyed (the kernel cannot, or the agent may not).
    Off,
}

/// A (Service frontend, backend) pair that stopped being usable: the backend left the
/// frontend's slots (deleted, no longer serving), or the frontend went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Stopped {
    pub frontend: FrontendKey,
    pub backend: BackendAddr,
}

/// The backend addresses in `fe`'s slots in `state`.
fn slot_backends(state: &CurrentState, fe: &FrontendKey) -> HashSet<BackendAddr> {
    state
        .frontends
        .get(fe)
        .map(|cf| {
            cf.backend_ids
                .iter()
                .filter_map(|id| state.backends.get(id).map(|b| b.addr))
                .collect()
        })
        .unwrap_or_default()
}

/// The pairs that are usable in `before` and stop being usable once `ops` (a plan) are
/// applied. Only the frontends the plan writes can lose a backend, so only they are
/// mirrored forward: the cost follows the plan, not the size of the maps.
pub fn stopped(before: &CurrentState, ops: &[Op]) -> Vec<Stopped> {
    // A frontend that is not programmed before the plan has no socket to end: leaving
    // it out keeps the first sync (every frontend new) from mirroring the whole plan.
    let touched: BTreeSet<FrontendKey> = ops
        .iter()
        .filter_map(Op::frontend)
        .filter(|fe| socket_frontend(fe) && before.frontends.contains_key(fe))
        .copied()
        .collect();
    if touched.is_empty() {
        return Vec::new();
    }
    let mut was = CurrentState::default();
    for fe in &touched {
        if let Some(cf) = before.frontends.get(fe) {
            was.frontends.insert(*fe, cf.clone());
        }
    }
    // The addresses behind every id these frontends name, before and after.
    let named = was
        .frontends
        .values()
        .flat_map(|cf| cf.backend_ids.iter().copied())
        .chain(ops.iter().filter_map(|op| match op {
            Op::UpsertSlot { backend_id, .. } => Some(*backend_id),
            _ => None,
        }));
    for id in named {
        if let Some(b) = before.backends.get(&id) {
            was.backends.insert(id, *b);
        }
    }
    let mut after = was.clone();
    for op in ops {
        let mine = match op {
            Op::UpsertBackend { .. } | Op::DeleteBackend { .. } => true,
            other => other.frontend().is_some_and(|fe| touched.contains(fe)),
        };
        if mine {
            after.apply(op);
        }
    }
    between(&was, &after)
}

/// The pairs that are usable in `before` and not in `after`. Only socket-program
/// frontends (`SCOPE_ALL`) of UDP and TCP count: the external path has no sockets on
/// this node to end.
fn between(before: &CurrentState, after: &CurrentState) -> Vec<Stopped> {
    let mut out = Vec::new();
    for fe in before.frontends.keys() {
        if !socket_frontend(fe) {
            continue;
        }
        let now = slot_backends(after, fe);
        let mut was: Vec<BackendAddr> = slot_backends(before, fe)
            .into_iter()
            .filter(|b| !now.contains(b))
            .collect();
        was.sort();
        out.extend(was.into_iter().map(|backend| Stopped {
            frontend: *fe,
            backend,
        }));
    }
    out
}

fn socket_frontend(fe: &FrontendKey) -> bool {
    fe.scope == SCOPE_ALL && (fe.proto == PROTO_UDP || fe.proto == PROTO_TCP)
}

/// Keeps the pairs that are still unusable in `state` (the maps after an apply, which
/// may have stopped half way).
pub fn retain_unusable(pairs: &mut Vec<Stopped>, state: &CurrentState) {
    pairs.retain(|p| !slot_backends(state, &p.frontend).contains(&p.backend));
}

/// Which destinations are of interest, and through which Service addresses.
#[derive(Debug, Default)]
pub struct Matcher {
    /// (protocol, backend address, port) → the Service addresses (address, port) it
    /// left. Addresses are canonical: an IPv4-mapped IPv6 address is its IPv4 address.
    by_backend: HashMap<(u8, IpAddr, u16), Vec<SocketAddr>>,
}

impl Matcher {
    pub fn new(pairs: &[Stopped]) -> Self {
        let mut by_backend: HashMap<(u8, IpAddr, u16), Vec<SocketAddr>> = HashMap::new();
        for p in pairs {
            by_backend
                .entry((
                    p.backend.proto,
                    p.backend.addr.to_canonical(),
                    p.backend.port,
                ))
                .or_default()
                .push(SocketAddr::new(
                    p.frontend.addr.to_canonical(),
                    p.frontend.port,
                ));
        }
        Self { by_backend }
    }

    pub fn is_empty(&self) -> bool {
        self.by_backend.is_empty()
    }

    /// The protocols (`PROTO_*`) with at least one pair.
    pub fn protos(&self) -> HashSet<u8> {
        self.by_backend.keys().map(|(p, _, _)| *p).collect()
    }

    /// Whether the socket of protocol `proto` whose destination is `dst` and whose
    /// cookie is `cookie` was connected through a Service it left: `rnat` is the
    /// socket programs' record (cookie, backend) → Service address.
    pub fn should_destroy(
        &self,
        rnat: &dyn RevNatLookup,
        proto: u8,
        dst: SocketAddr,
        cookie: u64,
    ) -> bool {
        let canon = dst.ip().to_canonical();
        let Some(services) = self.by_backend.get(&(proto, canon, dst.port())) else {
            return false;
        };
        // The record sits in the map of the address form the program saw: the plain
        // form, or (for an IPv4-mapped destination) either family's map.
        let mut keys = vec![dst];
        if canon != dst.ip() {
            keys.push(SocketAddr::new(canon, dst.port()));
        }
        keys.into_iter()
            .filter_map(|k| rnat.service_of(cookie, k))
            .any(|svc| services.contains(&SocketAddr::new(svc.ip().to_canonical(), svc.port())))
    }
}

/// The socket programs' reverse-NAT record: the Service address a socket (by cookie)
/// was translated from, to `backend`.
pub trait RevNatLookup {
    fn service_of(&self, cookie: u64, backend: SocketAddr) -> Option<SocketAddr>;
}

/// The pinned `LB_SKRNAT4_V1`/`LB_SKRNAT6_V1` maps, read only.
pub struct PinnedRevNat {
    v4: BpfHashMap<MapData, SockRevNat4Key, SockRevNat4Value>,
    v6: BpfHashMap<MapData, SockRevNat6Key, SockRevNat6Value>,
}

impl PinnedRevNat {
    pub fn open(bpffs: &Path) -> Result<Self> {
        fn open<K: aya::Pod, V: aya::Pod>(
            bpffs: &Path,
            name: &str,
        ) -> Result<BpfHashMap<MapData, K, V>> {
            let path = bpffs.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("open pinned map {}", path.display()))?;
            // An LRU hash; aya's HashMap reads both kinds.
            BpfHashMap::try_from(Map::LruHashMap(data))
                .with_context(|| format!("pinned map {name} has an unexpected layout"))
        }
        Ok(Self {
            v4: open(bpffs, MAP_SOCK_RNAT4)?,
            v6: open(bpffs, MAP_SOCK_RNAT6)?,
        })
    }
}

fn found<V>(r: Result<V, MapError>) -> Option<V> {
    match r {
        Ok(v) => Some(v),
        Err(MapError::KeyNotFound) => None,
        Err(e) => {
            debug!(error = %e, "reverse-NAT lookup failed");
            None
        }
    }
}

impl RevNatLookup for PinnedRevNat {
    fn service_of(&self, cookie: u64, backend: SocketAddr) -> Option<SocketAddr> {
        match backend.ip() {
            IpAddr::V4(a) => {
                let key = SockRevNat4Key {
                    cookie,
                    addr_be: addr_words(IpAddr::V4(a))[0],
                    port_be: port_be(backend.port()),
                    _pad: 0,
                };
                found(self.v4.get(&key, 0)).map(|v| {
                    SocketAddr::new(v4_from_word(v.addr_be).into(), port_from_be(v.port_be))
                })
            }
            IpAddr::V6(a) => {
                let key = SockRevNat6Key {
                    cookie,
                    addr_be: addr_words(IpAddr::V6(a)),
                    port_be: port_be(backend.port()),
                    _pad: [0; 3],
                };
                found(self.v6.get(&key, 0)).map(|v| {
                    SocketAddr::new(v6_from_words(v.addr_be).into(), port_from_be(v.port_be))
                })
            }
        }
    }
}

/// The reverse NAT a socket keeps in its own storage (read from the sock_diag dump).
impl RevNatLookup for SockRevNatStore {
    fn service_of(&self, _cookie: u64, backend: SocketAddr) -> Option<SocketAddr> {
        let family = match backend.ip() {
            IpAddr::V4(_) => SK_RNAT_V4,
            IpAddr::V6(_) => SK_RNAT_V6,
        };
        let words = addr_words(backend.ip());
        let slot = self.lookup(family, &words, port_be(backend.port()))?;
        let port = port_from_be(slot.service_port_be);
        Some(if family == SK_RNAT_V4 {
            SocketAddr::new(v4_from_word(slot.service_be[0]).into(), port)
        } else {
            SocketAddr::new(v6_from_words(slot.service_be).into(), port)
        })
    }
}

/// Where a dumped socket's record is: its own storage when the dump carried one (TCP),
/// else the LRU maps (connected UDP sockets, and every socket on kernels without socket
/// storage).
fn record_of<'a>(s: &'a DumpedSocket, lru: &'a dyn RevNatLookup) -> &'a dyn RevNatLookup {
    match &s.rnat {
        Some(st) => st,
        None => lru,
    }
}

// ---- sock_diag messages ----

/// `INET_DIAG_REQ_SK_BPF_STORAGES` (request) and `INET_DIAG_SK_BPF_STORAGES` (answer).
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// The attributes in `buf`: (type without flags, payload).
fn nlas(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The value of the one socket storage a dump answer carries (the request names one
/// map), decoded; `None` when the socket has none or it has another size.
fn storage_value(storages: &[u8]) -> Option<SockRevNatStore> {
    let (_, stg) = nlas(storages).find(|(k, _)| *k == SK_DIAG_BPF_STORAGE)?;
    let (_, value) = nlas(stg).find(|(k, _)| *k == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
    (value.len() == size_of::<SockRevNatStore>()).then(|| bytemuck::pod_read_unaligned(value))
}

/// The socket cookie of a sock_diag socket id: the kernel writes it as two `u32`
/// halves in host order, low half first (`sock_diag_save_cookie`).
pub fn cookie_of(raw: &[u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let hi = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Socket states worth ending: a connected UDP socket is ESTABLISHED (an unconnected
/// one is CLOSE, and must never be touched); for TCP the states in which the
/// application still uses the connection.
fn states(proto: u8) -> StateFlags {
    if proto == PROTO_TCP {
        StateFlags::ESTABLISHED | StateFlags::SYN_SENT | StateFlags::CLOSE_WAIT
    } else {
        StateFlags::ESTABLISHED
    }
}

fn ipproto(proto: u8) -> u8 {
    if proto == PROTO_TCP {
        IPPROTO_TCP
    } else {
        IPPROTO_UDP
    }
}

fn empty_id(family: u8) -> SocketId {
    if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    }
}

/// A dump request for the sockets of `family` and `proto` (`PROTO_*`) in the states
/// worth ending; with `storage_fd` (a socket storage map) each answer also carries the
/// socket's value in that map.
pub fn dump_request(family: u8, proto: u8, seq: u32, storage_fd: Option<i32>) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: ipproto(proto),
            extensions: ExtensionFlags::empty(),
            states: states(proto),
            socket_id: empty_id(family),
        })
        .into(),
    );
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    if let Some(fd) = storage_fd {
        // INET_DIAG_REQ_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE_REQ_MAP_FD: fd }: the
        // sock_diag crate has no request attributes, so they are appended here.
        let inner_len: u16 = 4 + 4;
        buf.extend_from_slice(&(4 + inner_len).to_ne_bytes());
        buf.extend_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
        buf.extend_from_slice(&inner_len.to_ne_bytes());
        buf.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
        buf.extend_from_slice(&(fd as u32).to_ne_bytes());
        let total = buf.len() as u32;
        buf[..4].copy_from_slice(&total.to_ne_bytes());
    }
    buf
}

/// A `SOCK_DESTROY` request for one socket, identified exactly as the dump reported it
/// (addresses, ports, interface and cookie: the kernel checks the cookie, so a socket
/// that closed and whose 4-tuple was reused is not hit).
pub fn destroy_request(family: u8, proto: u8, id: &SocketId, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: ipproto(proto),
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id.clone(),
        }))
        .into(),
    );
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// One socket of a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedSocket {
    pub family: u8,
    pub state: u8,
    pub id: SocketId,
    /// The socket's reverse NAT from its own storage, when the dump asked for it and
    /// the socket has one.
    pub rnat: Option<SockRevNatStore>,
}

impl DumpedSocket {
    pub fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.id.destination_address, self.id.destination_port)
    }

    pub fn cookie(&self) -> u64 {
        cookie_of(&self.id.cookie)
    }
}

/// What one datagram from the sock_diag socket held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub sockets: Vec<DumpedSocket>,
    /// The dump ended (`NLMSG_DONE`).
    pub done: bool,
    /// Acknowledgements: 0 or a negative errno, per message.
    pub acks: Vec<i32>,
}

/// Splits a datagram into its netlink messages and decodes the ones with sequence
/// number `seq` (others belong to an earlier, abandoned request).
pub fn parse(buf: &[u8], seq: u32) -> Result<Received> {
    let mut out = Received::default();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        if len < 16 || off + len > buf.len() {
            bail!(
                "malformed netlink message (length {len} at offset {off} of {})",
                buf.len()
            );
        }
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[off..off + len])
            .map_err(|e| anyhow!("decode a sock_diag message: {e}"))?;
        off += (len + 3) & !3;
        if msg.header.sequence_number != seq {
            continue;
        }
        match msg.payload {
            NetlinkPayload::Done(_) => out.done = true,
            NetlinkPayload::Error(e) => out.acks.push(e.raw_code()),
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                let rnat = r.nlas.iter().find_map(|nla| {
                    use netlink_packet_core::Nla as _;
                    if nla.kind() & NLA_TYPE_MASK != INET_DIAG_SK_BPF_STORAGES {
                        return None;
                    }
                    let mut raw = vec![0u8; nla.value_len()];
                    nla.emit_value(&mut raw);
                    storage_value(&raw)
                });
                out.sockets.push(DumpedSocket {
                    family: r.header.family,
                    state: r.header.state,
                    id: r.header.socket_id,
                    rnat,
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

// ---- the netlink socket ----

/// A sock_diag socket, bound to the network namespace it was opened in.
struct DiagSocket {
    sock: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// How long one answer may take before the namespace is given up.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

impl DiagSocket {
    fn open() -> Result<Self> {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_SOCK_DIAG)
            .context("open a NETLINK_SOCK_DIAG socket")?;
        sock.bind_auto().context("bind the sock_diag socket")?;
        super::sys::set_recv_timeout(&sock, RECV_TIMEOUT)
            .context("set the sock_diag receive timeout")?;
        Ok(Self {
            sock,
            seq: 0,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    fn send(&mut self, msg: &[u8]) -> Result<()> {
        let kernel = netlink_sys::SocketAddr::new(0, 0);
        self.sock
            .send_to(msg, &kernel, 0)
            .context("send to sock_diag")?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Received> {
        self.buf.clear();
        self.sock
            .recv(&mut self.buf, 0)
            .context("receive from sock_diag")?;
        parse(&self.buf, self.seq)
    }

    /// The sockets of `family` and `proto` in the states worth ending, each with its
    /// value in the socket storage map `storage_fd`.
    fn dump(
        &mut self,
        family: u8,
        proto: u8,
        storage_fd: Option<i32>,
    ) -> Result<Vec<DumpedSocket>> {
        self.seq = self.seq.wrapping_add(1);
        self.send(&dump_request(family, proto, self.seq, storage_fd))?;
        let mut out = Vec::new();
        loop {
            let r = self.recv()?;
            out.extend(r.sockets);
            if let Some(code) = r.acks.into_iter().find(|c| *c != 0) {
                return Err(std::io::Error::from_raw_os_error(-code)).context("sock_diag dump");
            }
            if r.done {
                return Ok(out);
            }
        }
    }

    /// Destroys one socket; `Ok(false)` when it is already gone.
    fn destroy(&mut self, s: &DumpedSocket, proto: u8) -> Result<bool, std::io::Error> {
        self.seq = self.seq.wrapping_add(1);
        let msg = destroy_request(s.family, proto, &s.id, self.seq);
        let kernel = netlink_sys::SocketAddr::new(0, 0);
        self.sock.send_to(&msg, &kernel, 0)?;
        loop {
            self.buf.clear();
            self.sock.recv(&mut self.buf, 0)?;
            let r = parse(&self.buf, self.seq).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e:#}"))
            })?;
            if let Some(code) = r.acks.first() {
                return match -code {
                    0 => Ok(true),
                    libc::ENOENT => Ok(false),
                    errno => Err(std::io::Error::from_raw_os_error(errno)),
                };
            }
        }
    }
}

// ---- network namespaces ----

/// A network namespace to visit: one path that names it (an nsfs file).
#[derive(Clone, Debug)]
struct Netns {
    path: PathBuf,
}

/// Every network namespace with a process or thread in it, or a name under
/// /run/netns, once each (by the nsfs inode). The agent's own comes first.
fn namespaces() -> Vec<Netns> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |path: PathBuf| {
        // stat follows the magic link to the nsfs inode that identifies the namespace.
        if let Ok(m) = std::fs::metadata(&path)
            && seen.insert((m.dev(), m.ino()))
        {
            out.push(Netns { path });
        }
    };
    add(PathBuf::from("/proc/thread-self/ns/net"));
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            add(e.path());
        }
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        // Threads may sit in another namespace than their process (setns on a thread).
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            add(t.path().join("ns/net"));
        }
    }
    out
}

/// Opens a sock_diag socket inside the namespace `ns`, from this thread, which must
/// be the terminator's own: it enters the namespace and comes back to `home`.
fn open_in(ns: &Netns, home: &File) -> Result<DiagSocket> {
    let target = File::open(&ns.path).with_context(|| format!("open {}", ns.path.display()))?;
    nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter the network namespace {}", ns.path.display()))?;
    let sock = DiagSocket::open();
    // The socket keeps the namespace it was created in; go home before anything else.
    if let Err(e) = nix::sched::setns(home, nix::sched::CloneFlags::CLONE_NEWNET) {
        return Err(ReturnFailed(e.to_string()).into());
    }
    sock
}

/// The terminator thread could not return to its own namespace: it must stop.
#[derive(Debug)]
struct ReturnFailed(String);

impl std::fmt::Display for ReturnFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "could not return to the agent's network namespace: {}",
            self.0
        )
    }
}

impl std::error::Error for ReturnFailed {}

/// The kernel refused SOCK_DESTROY as unsupported or not permitted.
#[derive(Debug)]
struct Unsupported(std::io::Error);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SOCK_DESTROY refused: {}", self.0)
    }
}

impl std::error::Error for Unsupported {}

/// What one termination round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub udp: u64,
    pub tcp: u64,
    pub namespaces: usize,
    /// Namespaces that could not be visited or dumped (usually a process that just
    /// exited), with the reason.
    pub skipped: Vec<String>,
}

/// The pinned socket storage map of the reverse NAT, for the dump requests. `None`
/// (the LRU maps alone are read) when it cannot be opened: an agent of an earlier
/// version created the pins.
fn open_storage_map(bpffs: &Path) -> Option<MapData> {
    let path = bpffs.join(MAP_SOCK_RNAT_SK);
    match MapData::from_pin(&path) {
        Ok(m) => Some(m),
        Err(e) => {
            debug!(pin = %path.display(), error = %e, "no socket storage map; reading the LRU maps only");
            None
        }
    }
}

/// Visits every namespace and destroys the sockets `matcher` selects. `storage` is
/// the socket storage map whose values the dumps carry.
fn terminate(
    matcher: &Matcher,
    rnat: &dyn RevNatLookup,
    storage: Option<&MapData>,
    home: &File,
) -> Result<Outcome> {
    let storage_fd = storage.map(|m| m.fd().as_fd().as_raw_fd());
    let mut out = Outcome::default();
    let protos = matcher.protos();
    for ns in namespaces() {
        let mut sock = match open_in(&ns, home) {
            Ok(s) => s,
            Err(e) if e.is::<ReturnFailed>() => return Err(e),
            Err(e) => {
                out.skipped.push(format!("{}: {e:#}", ns.path.display()));
                continue;
            }
        };
        out.namespaces += 1;
        for proto in [PROTO_UDP, PROTO_TCP] {
            if !protos.contains(&proto) {
                continue;
            }
            for family in [AF_INET, AF_INET6] {
                // The kernel returns socket storage with TCP sockets only.
                let stg = if proto == PROTO_TCP { storage_fd } else { None };
                let dumped = match sock.dump(family, proto, stg) {
                    Ok(d) => d,
                    Err(e) => {
                        out.skipped.push(format!("{}: {e:#}", ns.path.display()));
                        continue;
                    }
                };
                for s in dumped.iter().filter(|s| {
                    matcher.should_destroy(record_of(s, rnat), proto, s.dst(), s.cookie())
                }) {
                    match sock.destroy(s, proto) {
                        Ok(true) => {
                            debug!(netns = %ns.path.display(), proto, dst = %s.dst(), cookie = s.cookie(), "destroyed a socket");
                            if proto == PROTO_TCP {
                                out.tcp += 1;
                            } else {
                                out.udp += 1;
                            }
                        }
                        Ok(false) => {}
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::EOPNOTSUPP | libc::EPERM | libc::EACCES)
                            ) =>
                        {
                            return Err(Unsupported(e).into());
                        }
                        Err(e) => out.skipped.push(format!(
                            "{}: destroy {}: {e}",
                            ns.path.display(),
                            s.dst()
                        )),
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Checks that SOCK_DESTROY works here, on a socket of the agent's own: a UDP socket
/// connected on loopback (which sends nothing), destroyed by cookie. `Off` with the
/// reason when the kernel refuses; `Netlink` when it works, or when the probe itself
/// cannot be set up (the first real use then tells).
pub fn probe() -> (SockTermMode, Option<String>) {
    let sock = match std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.connect((Ipv4Addr::LOCALHOST, 9)).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "socket termination probe: no loopback socket; assuming netlink works");
            return (SockTermMode::Netlink, None);
        }
    };
    let run = || -> Result<()> {
        let cookie = super::sys::sockopt_u64(std::os::fd::AsFd::as_fd(&sock), libc::SO_COOKIE)
            .context("SO_COOKIE")?;
        let (local, peer) = (sock.local_addr()?, sock.peer_addr()?);
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        raw[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        let s = DumpedSocket {
            family: AF_INET,
            state: 1,
            id: SocketId {
                source_port: local.port(),
                destination_port: peer.port(),
                source_address: local.ip(),
                destination_address: peer.ip(),
                interface_id: 0,
                cookie: raw,
            },
            rnat: None,
        };
        let mut diag = DiagSocket::open()?;
        match diag.destroy(&s, PROTO_UDP) {
            Ok(true) => Ok(()),
            Ok(false) => bail!("SOCK_DESTROY did not find the probe socket"),
            Err(e) => Err(e).context("SOCK_DESTROY"),
        }
    };
    match run() {
        Ok(()) => (SockTermMode::Netlink, None),
        Err(e) => (SockTermMode::Off, Some(format!("{e:#}"))),
    }
}

/// Settings of the terminator.
#[derive(Clone, Debug)]
pub struct SockTermConfig {
    pub bpffs: PathBuf,
    pub mode: SockTermMode,
    /// `--destroy-tcp`: also end TCP sockets (default: UDP only).
    pub destroy_tcp: bool,
}

/// The handle the agent keeps: pairs handed to [`Terminator::submit`] are processed
/// in order on the terminator's own thread.
pub struct Terminator {
    tx: Option<mpsc::Sender<Vec<Stopped>>>,
    destroy_tcp: bool,
}

impl Terminator {
    /// Starts the thread (nothing when the mode is `Off`).
    pub fn start(cfg: SockTermConfig) -> Result<Self> {
        if cfg.mode == SockTermMode::Off {
            return Ok(Self {
                tx: None,
                destroy_tcp: cfg.destroy_tcp,
            });
        }
        let (tx, rx) = mpsc::channel::<Vec<Stopped>>();
        let destroy_tcp = cfg.destroy_tcp;
        std::thread::Builder::new()
            .name("svclb-sockterm".into())
            .spawn(move || run(cfg, rx))
            .context("start the socket termination thread")?;
        Ok(Self {
            tx: Some(tx),
            destroy_tcp,
        })
    }

    /// Queues the pairs that stopped being usable (after their removal is in the maps).
    pub fn submit(&self, mut pairs: Vec<Stopped>) {
        if !self.destroy_tcp {
            pairs.retain(|p| p.backend.proto != PROTO_TCP);
        }
        if pairs.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx
            && tx.send(pairs).is_err()
        {
            debug!("socket termination thread has stopped; nothing destroyed");
        }
    }
}

fn run(cfg: SockTermConfig, rx: mpsc::Receiver<Vec<Stopped>>) {
    let home = match File::open("/proc/thread-self/ns/net") {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "socket termination off: cannot open the agent's network namespace");
            return;
        }
    };
    while let Ok(mut pairs) = rx.recv() {
        // Rounds that queued up while the last one ran are done in one visit.
        while let Ok(more) = rx.try_recv() {
            pairs.extend(more);
        }
        let started = Instant::now();
        let matcher = Matcher::new(&pairs);
        let storage = open_storage_map(&cfg.bpffs);
        let result = PinnedRevNat::open(&cfg.bpffs)
            .and_then(|rnat| terminate(&matcher, &rnat, storage.as_ref(), &home));
        match result {
            Ok(o) => {
                crate::metrics::sockets_destroyed("udp", o.udp);
                crate::metrics::sockets_destroyed("tcp", o.tcp);
                info!(
                    pairs = pairs.len(),
                    udp = o.udp,
                    tcp = o.tcp,
                    namespaces = o.namespaces,
                    skipped = o.skipped.len(),
                    duration_us = started.elapsed().as_micros() as u64,
                    "sockets to removed backends destroyed"
                );
                for s in o.skipped.iter().take(3) {
                    debug!(reason = %s, "socket termination skipped a namespace");
                }
            }
            Err(e) if e.is::<Unsupported>() || e.is::<ReturnFailed>() => {
                warn!(error = %format!("{e:#}"), "socket termination off: sockets connected to removed backends stay connected until their applications reconnect");
                return;
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), pairs = pairs.len(), "socket termination round failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytemuck::Zeroable;
    use svc_lb_common::{BACKEND_ACTIVE, SCOPE_EXTERNAL};

    use super::*;
    use crate::plan::{BackendEntry, CurrentFrontend};

    fn fe(addr: &str, port: u16, proto: u8) -> FrontendKey {
        FrontendKey {
            addr: addr.parse().unwrap(),
            port,
            proto,
            scope: SCOPE_ALL,
        }
    }

    fn be(addr: &str, port: u16, proto: u8) -> BackendAddr {
        BackendAddr {
            addr: addr.parse().unwrap(),
            port,
            proto,
        }
    }

    /// A state with each frontend's backends in its slots (ids by first appearance).
    fn state(frontends: &[(FrontendKey, &[BackendAddr])]) -> CurrentState {
        let mut st = CurrentState::default();
        let mut ids: BTreeMap<BackendAddr, u32> = BTreeMap::new();
        for (i, (key, backends)) in frontends.iter().enumerate() {
            let mut backend_ids = Vec::new();
            for b in *backends {
                let next = ids.len() as u32 + 1;
                let id = *ids.entry(*b).or_insert(next);
                st.backends.insert(
                    id,
                    BackendEntry {
                        addr: *b,
                        state: BACKEND_ACTIVE,
                        local: false,
                    },
                );
                backend_ids.push(id);
            }
            let rev_nat_id = i as u32 + 1;
            st.rev_nats.insert(rev_nat_id, *key);
            st.frontends.insert(
                *key,
                CurrentFrontend {
                    rev_nat_id,
                    flags: 0,
                    affinity_timeout_s: 0,
                    backend_ids,
                    stale_slots: vec![],
                },
            );
        }
        st
    }

    #[test]
    fn a_backend_leaving_a_frontend_stops_that_pair_only() {
        let dns = fe("10.96.0.10", 53, PROTO_UDP);
        let other = fe("10.96.0.11", 53, PROTO_UDP);
        let (a, b, c) = (
            be("10.0.0.1", 53, PROTO_UDP),
            be("10.0.0.2", 53, PROTO_UDP),
            be("10.0.0.3", 53, PROTO_UDP),
        );
        let before = state(&[(dns, &[a, b]), (other, &[a])]);
        let after = state(&[(dns, &[b, c]), (other, &[a])]);
        assert_eq!(
            between(&before, &after),
            vec![Stopped {
                frontend: dns,
                backend: a
            }]
        );
        // Nothing left, nothing added: nothing stops.
        assert!(between(&before, &before).is_empty());
        assert!(between(&after, &before).contains(&Stopped {
            frontend: dns,
            backend: c
        }));
    }

    #[test]
    fn a_plan_stops_what_it_takes_out_of_the_frontends_it_writes() {
        let dns = fe("10.96.0.10", 53, PROTO_UDP);
        let other = fe("10.96.0.11", 53, PROTO_UDP);
        let (a, b) = (be("10.0.0.1", 53, PROTO_UDP), be("10.0.0.2", 53, PROTO_UDP));
        let before = state(&[(dns, &[a, b]), (other, &[a])]);
        let id_of = |addr| {
            *before
                .backends
                .iter()
                .find(|(_, e)| e.addr == addr)
                .unwrap()
                .0
        };
        // dns keeps b only: slot 1 gets b, the master shrinks, slot 2 goes.
        let ops = [
            Op::UpsertSlot {
                frontend: dns,
                slot: 1,
                backend_id: id_of(b),
            },
            Op::UpsertMaster {
                frontend: dns,
                count: 1,
                rev_nat_id: before.frontends[&dns].rev_nat_id,
                flags: 0,
                affinity_timeout_s: 0,
            },
            Op::DeleteSlot {
                frontend: dns,
                slot: 2,
            },
        ];
        assert_eq!(
            stopped(&before, &ops),
            vec![Stopped {
                frontend: dns,
                backend: a
            }]
        );
        assert!(stopped(&before, &[]).is_empty());
    }

    #[test]
    fn a_removed_frontend_stops_all_its_backends() {
        let dns = fe("fd00:96::10", 53, PROTO_UDP);
        let (a, b) = (be("fd00::1", 53, PROTO_UDP), be("fd00::2", 53, PROTO_UDP));
        let before = state(&[(dns, &[a, b])]);
        let got = between(&before, &CurrentState::default());
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|s| s.frontend == dns));
    }

    #[test]
    fn external_and_sctp_frontends_have_no_sockets_to_end() {
        let mut ext = fe("10.96.0.10", 53, PROTO_UDP);
        ext.scope = SCOPE_EXTERNAL;
        let sctp = fe("10.96.0.10", 99, svc_lb_common::PROTO_SCTP);
        let before = state(&[
            (ext, &[be("10.0.0.1", 53, PROTO_UDP)]),
            (sctp, &[be("10.0.0.1", 99, svc_lb_common::PROTO_SCTP)]),
        ]);
        assert!(between(&before, &CurrentState::default()).is_empty());
    }

    #[test]
    fn a_half_applied_plan_keeps_only_what_left_the_maps() {
        let dns = fe("10.96.0.10", 53, PROTO_UDP);
        let (a, b) = (be("10.0.0.1", 53, PROTO_UDP), be("10.0.0.2", 53, PROTO_UDP));
        let before = state(&[(dns, &[a, b])]);
        let planned = state(&[]);
        let mut pairs = between(&before, &planned);
        assert_eq!(pairs.len(), 2);
        // The apply stopped after removing b only.
        let partial = state(&[(dns, &[a])]);
        retain_unusable(&mut pairs, &partial);
        assert_eq!(
            pairs,
            vec![Stopped {
                frontend: dns,
                backend: b
            }]
        );
    }

    /// (cookie, backend) → Service, like the socket programs' maps.
    struct FakeRevNat(HashMap<(u64, SocketAddr), SocketAddr>);

    impl RevNatLookup for FakeRevNat {
        fn service_of(&self, cookie: u64, backend: SocketAddr) -> Option<SocketAddr> {
            self.0.get(&(cookie, backend)).copied()
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_sockets_connected_through_the_service_are_chosen() {
        let dns = fe("10.96.0.10", 53, PROTO_UDP);
        let other = fe("10.96.0.11", 53, PROTO_UDP);
        let a = be("10.0.0.1", 5353, PROTO_UDP);
        let m = Matcher::new(&[Stopped {
            frontend: dns,
            backend: a,
        }]);
        let rnat = FakeRevNat(HashMap::from([
            ((1, sa("10.0.0.1:5353")), sa("10.96.0.10:53")),
            ((2, sa("10.0.0.1:5353")), sa("10.96.0.11:53")),
            ((4, sa("10.0.0.1:5353")), sa("10.96.0.10:53")),
            (
                (5, sa("[::ffff:10.0.0.1]:5353")),
                sa("[::ffff:10.96.0.10]:53"),
            ),
        ]));
        let _ = other;
        let dst = sa("10.0.0.1:5353");
        // Connected through the Service that lost the backend.
        assert!(m.should_destroy(&rnat, PROTO_UDP, dst, 1));
        // Through another Service that still has it.
        assert!(!m.should_destroy(&rnat, PROTO_UDP, dst, 2));
        // Dialled the backend directly: no record.
        assert!(!m.should_destroy(&rnat, PROTO_UDP, dst, 3));
        // Another protocol or port on the same address.
        assert!(!m.should_destroy(&rnat, PROTO_TCP, dst, 4));
        assert!(!m.should_destroy(&rnat, PROTO_UDP, sa("10.0.0.1:53"), 4));
        // An AF_INET6 socket on the IPv4-mapped form, recorded in either map.
        assert!(m.should_destroy(&rnat, PROTO_UDP, sa("[::ffff:10.0.0.1]:5353"), 4));
        assert!(m.should_destroy(&rnat, PROTO_UDP, sa("[::ffff:10.0.0.1]:5353"), 5));
        assert!(!m.should_destroy(&rnat, PROTO_UDP, sa("[::ffff:10.0.0.1]:5353"), 3));
        assert_eq!(m.protos(), HashSet::from([PROTO_UDP]));
        assert!(Matcher::new(&[]).is_empty());
    }

    fn store(entries: &[(&str, &str)]) -> SockRevNatStore {
        let mut st = SockRevNatStore::zeroed();
        for (backend, service) in entries {
            let (b, v) = (sa(backend), sa(service));
            st.record(svc_lb_common::SockRevNatSlot {
                backend_be: addr_words(b.ip()),
                service_be: addr_words(v.ip()),
                backend_port_be: port_be(b.port()),
                service_port_be: port_be(v.port()),
                family: if b.is_ipv4() { SK_RNAT_V4 } else { SK_RNAT_V6 },
                _pad: [0; 3],
                rev_nat_id: 1,
            });
        }
        st
    }

    #[test]
    fn a_socket_with_its_own_store_is_judged_by_it_alone() {
        let dns = fe("10.96.0.10", 53, PROTO_UDP);
        let m = Matcher::new(&[Stopped {
            frontend: dns,
            backend: be("10.0.0.1", 5353, PROTO_UDP),
        }]);
        // The LRU maps say another Service: the socket's own store wins.
        let lru = FakeRevNat(HashMap::from([(
            (1, sa("10.0.0.1:5353")),
            sa("10.96.0.11:53"),
        )]));
        let mk = |rnat| DumpedSocket {
            family: AF_INET,
            state: 1,
            id: SocketId::new_v4(),
            rnat,
        };
        let own = mk(Some(store(&[("10.0.0.1:5353", "10.96.0.10:53")])));
        let dst = sa("10.0.0.1:5353");
        assert!(m.should_destroy(record_of(&own, &lru), PROTO_UDP, dst, 1));
        let other = mk(Some(store(&[("10.0.0.1:5353", "10.96.0.11:53")])));
        assert!(!m.should_destroy(record_of(&other, &lru), PROTO_UDP, dst, 1));
        // No store (the fallback programs): the LRU entry of the cookie decides.
        let none = mk(None);
        assert!(!m.should_destroy(record_of(&none, &lru), PROTO_UDP, dst, 1));
        let v6 = store(&[("[fd00::1]:53", "[fd00:96::10]:53")]);
        assert_eq!(
            v6.service_of(0, sa("[fd00::1]:53")),
            Some(sa("[fd00:96::10]:53"))
        );
        assert_eq!(v6.service_of(0, sa("[fd00::1]:54")), None);
    }

    #[test]
    fn a_dump_request_can_ask_for_one_socket_storage_map() {
        let plain = dump_request(AF_INET, PROTO_UDP, 7, None);
        let b = dump_request(AF_INET, PROTO_UDP, 7, Some(42));
        assert_eq!(b.len(), plain.len() + 12);
        assert_eq!(u32_at(&b, 0) as usize, b.len());
        let attr = &b[plain.len()..];
        assert_eq!(u16_at(attr, 0), 12);
        assert_eq!(
            u16_at(attr, 2),
            INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED
        );
        assert_eq!(u16_at(attr, 4), 8);
        assert_eq!(u16_at(attr, 6), SK_DIAG_BPF_STORAGE_REQ_MAP_FD);
        assert_eq!(u32_at(attr, 8), 42);
    }

    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn a_storage_answer_decodes_to_the_sockets_store() {
        let st = store(&[("10.0.0.1:5353", "10.96.0.10:53")]);
        // SK_DIAG_BPF_STORAGE { MAP_ID, PAD, MAP_VALUE }, as the kernel nests it.
        let mut inner = nla(2, &7u32.to_ne_bytes());
        inner.extend(nla(1, &[]));
        inner.extend(nla(SK_DIAG_BPF_STORAGE_MAP_VALUE, bytemuck::bytes_of(&st)));
        let outer = nla(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &inner);
        assert_eq!(storage_value(&outer), Some(st));
        // A value of another size (another layout) is not guessed at.
        let short = nla(
            SK_DIAG_BPF_STORAGE,
            &nla(SK_DIAG_BPF_STORAGE_MAP_VALUE, &[0; 8]),
        );
        assert_eq!(storage_value(&short), None);
        assert_eq!(storage_value(&[]), None);
        assert_eq!(storage_value(&[1, 2, 3]), None);
    }

    #[test]
    fn the_cookie_is_two_host_order_halves_low_first() {
        let c: u64 = 0x0102_0304_0a0b_0c0d;
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0x0a0b_0c0du32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x0102_0304u32.to_ne_bytes());
        assert_eq!(cookie_of(&raw), c);
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_ne_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    #[test]
    fn a_dump_request_asks_for_connected_sockets_of_one_family_and_protocol() {
        let b = dump_request(AF_INET, PROTO_UDP, 7, None);
        // nlmsghdr (16) + inet_diag_req_v2 (56).
        assert_eq!(b.len(), 72);
        assert_eq!(u32_at(&b, 0), 72);
        assert_eq!(u16_at(&b, 4), 20, "SOCK_DIAG_BY_FAMILY");
        assert_eq!(u16_at(&b, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(u32_at(&b, 8), 7);
        assert_eq!((b[16], b[17]), (AF_INET, IPPROTO_UDP));
        // UDP: ESTABLISHED only, so unconnected sockets (CLOSE) never come back.
        assert_eq!(u32_at(&b, 20), 1 << 1);
        let t = dump_request(AF_INET6, PROTO_TCP, 8, None);
        assert_eq!((t[16], t[17]), (AF_INET6, IPPROTO_TCP));
        assert_eq!(u32_at(&t, 20), (1 << 1) | (1 << 2) | (1 << 8));
    }

    #[test]
    fn a_destroy_request_names_the_socket_exactly() {
        let mut cookie = [0u8; 8];
        cookie[..4].copy_from_slice(&42u32.to_ne_bytes());
        let id = SocketId {
            source_port: 40000,
            destination_port: 53,
            source_address: "10.240.1.1".parse().unwrap(),
            destination_address: "10.240.2.2".parse().unwrap(),
            interface_id: 0,
            cookie,
        };
        let b = destroy_request(AF_INET, PROTO_UDP, &id, 9);
        assert_eq!(b.len(), 72);
        assert_eq!(u16_at(&b, 4), 21, "SOCK_DESTROY");
        assert_eq!(u16_at(&b, 6), NLM_F_REQUEST | NLM_F_ACK);
        // inet_diag_sockid at 16 + 8: ports in network order, then the addresses.
        let sid = 24;
        assert_eq!(&b[sid..sid + 2], &40000u16.to_be_bytes());
        assert_eq!(&b[sid + 2..sid + 4], &53u16.to_be_bytes());
        assert_eq!(&b[sid + 4..sid + 8], &[10, 240, 1, 1]);
        assert_eq!(&b[sid + 20..sid + 24], &[10, 240, 2, 2]);
        assert_eq!(&b[sid + 40..sid + 48], &cookie);
    }

    /// A kernel answer: one `inet_diag_msg` with the given destination and cookie.
    fn diag_msg(seq: u32, dst: [u8; 4], dport: u16, cookie: u64) -> Vec<u8> {
        let mut m = vec![0u8; 16 + 72];
        m[0..4].copy_from_slice(&88u32.to_ne_bytes());
        m[4..6].copy_from_slice(&20u16.to_ne_bytes());
        m[6..8].copy_from_slice(&2u16.to_ne_bytes());
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m[16] = AF_INET;
        m[17] = 1;
        let sid = 20;
        m[sid..sid + 2].copy_from_slice(&40000u16.to_be_bytes());
        m[sid + 2..sid + 4].copy_from_slice(&dport.to_be_bytes());
        m[sid + 4..sid + 8].copy_from_slice(&[10, 240, 1, 1]);
        m[sid + 20..sid + 24].copy_from_slice(&dst);
        m[sid + 40..sid + 44].copy_from_slice(&(cookie as u32).to_ne_bytes());
        m[sid + 44..sid + 48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        m
    }

    fn control(kind: u16, seq: u32, code: i32) -> Vec<u8> {
        let len: u32 = if kind == 2 { 16 + 4 + 16 } else { 16 + 4 };
        let mut m = vec![0u8; len as usize];
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m[16..20].copy_from_slice(&code.to_ne_bytes());
        m
    }

    #[test]
    fn a_dump_answer_decodes_to_destinations_and_cookies() {
        let mut buf = diag_msg(3, [10, 240, 2, 2], 5353, 0x1_0000_0002);
        buf.extend(diag_msg(2, [10, 240, 9, 9], 1, 1)); // an older request's
        buf.extend(control(3, 3, 0)); // NLMSG_DONE
        let r = parse(&buf, 3).unwrap();
        assert!(r.done);
        assert_eq!(r.sockets.len(), 1);
        assert_eq!(r.sockets[0].dst(), sa("10.240.2.2:5353"));
        assert_eq!(r.sockets[0].cookie(), 0x1_0000_0002);
        assert_eq!(r.sockets[0].state, 1);
        let ack = parse(&control(2, 5, 0), 5).unwrap();
        assert_eq!(ack.acks, vec![0]);
        let nack = parse(&control(2, 5, -libc::ENOENT), 5).unwrap();
        assert_eq!(nack.acks, vec![-libc::ENOENT]);
        assert!(
            parse(&buf[..20], 3).is_err(),
            "a truncated message is an error"
        );
    }
}
