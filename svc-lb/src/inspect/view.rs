//! Everything `list` and the metrics show, read from the maps in one pass.
use std::collections::HashMap;

use anyhow::Result;
use svc_lb_common::{MAP_BE_STATS, MAP_FE_STATS};

use crate::{
    datapath::{codec::FrontendMeta, pinned::PinnedMaps},
    plan::CurrentState,
};

/// The programmed frontends and backends with their Service identity and counters.
#[derive(Clone, Debug, Default)]
pub struct DatapathView {
    pub state: CurrentState,
    /// Service identity per rev-NAT id (absent for a frontend programmed before the
    /// agent wrote its metadata, which it does right after each sync).
    pub meta: HashMap<u32, FrontendMeta>,
    /// New connections per rev-NAT id, summed over CPUs.
    pub frontend_conns: HashMap<u32, u64>,
    /// New connections per backend id, summed over CPUs and over every frontend that
    /// uses the backend.
    pub backend_conns: HashMap<u32, u64>,
    /// Open connections per backend address on the socket path (active, inactive);
    /// `None` when the node keeps no counts (see `PinnedMaps::conn_counts`).
    pub open_conns: Option<HashMap<svc_lb_common::ConnKey, (u64, u64)>>,
    /// External flows per backend id from the conntrack map (established, other).
    pub ext_conns: HashMap<u32, (u64, u64)>,
    /// (rev-NAT id, backend id) of every live external flow (conntrack).
    pub ext_pairs: std::collections::HashSet<(u32, u32)>,
    /// Traffic of closed socket-path TCP connections per (frontend, backend address)
    /// of TCP frontends; `None` when the node keeps none (no sock_ops program, see
    /// `PinnedMaps::sock_ops_attached`).
    pub traffic: Option<HashMap<svc_lb_common::TrafficKey, svc_lb_common::TrafficCount>>,
    /// Unconnected datagrams of UDP frontends on the socket path per (frontend,
    /// backend address), in `packets_in` (the sendmsg hooks count them; the other
    /// fields are not measured); `None` when the pins have no traffic map.
    pub udp_traffic: Option<HashMap<svc_lb_common::TrafficKey, svc_lb_common::TrafficCount>>,
    /// Packets and bytes of the external path per (frontend, backend address,
    /// protocol): the agent's lasting totals (`LB_EXTTOTAL_V1`, which never go
    /// down and lag the datapath by up to `--ext-stats-interval`) when it keeps them,
    /// else what the conntrack entries hold now (see `CtConns::traffic`); `None`
    /// without either. The key's backend address 0 holds departed backends.
    pub ext_traffic:
        Option<HashMap<crate::datapath::pinned::CtTrafficKey, svc_lb_common::TrafficCount>>,
    /// Whether `ext_traffic` holds the lasting totals (counters that never go down).
    pub ext_totals: bool,
}

impl DatapathView {
    /// Open connections to backend `id` (active, inactive): the socket path's counts
    /// of its address plus the external path's flows; `None` without socket counts.
    pub fn open_connections(&self, id: u32) -> Option<(u64, u64)> {
        let sock = self.open_conns.as_ref()?;
        let b = self.state.backends.get(&id)?;
        // The sock_ops program counts TCP only; a UDP backend on the same address and
        // port must not show the TCP one's connections.
        let (sa, si) = if b.addr.proto == svc_lb_common::PROTO_TCP {
            sock.get(&conn_key(&b.addr)).copied().unwrap_or((0, 0))
        } else {
            (0, 0)
        };
        let (ea, ei) = self.ext_conns.get(&id).copied().unwrap_or((0, 0));
        Some((sa + ea, si + ei))
    }
}

/// `MAP_TRAFFIC`'s entries split by the protocol of their frontend (the map's key has
/// none: a TCP and a UDP Service port on one backend address share the address key,
/// not the rev-NAT id): (TCP, UDP). Entries of frontends that are gone (the agent
/// prunes them with its full sync) are left out.
type TrafficMap = HashMap<svc_lb_common::TrafficKey, svc_lb_common::TrafficCount>;
pub(crate) fn split_traffic(
    all: Option<TrafficMap>,
    state: &CurrentState,
) -> (Option<TrafficMap>, Option<TrafficMap>) {
    let Some(all) = all else {
        return (None, None);
    };
    let proto: HashMap<u32, u8> = state
        .frontends
        .iter()
        .map(|(k, v)| (v.rev_nat_id, k.proto))
        .collect();
    let (mut tcp, mut udp) = (TrafficMap::new(), TrafficMap::new());
    for (k, v) in all {
        match proto.get(&k.rev_nat_id) {
            Some(&svc_lb_common::PROTO_TCP) => {
                tcp.insert(k, v);
            }
            Some(&svc_lb_common::PROTO_UDP) => {
                udp.insert(k, v);
            }
            _ => {}
        }
    }
    (Some(tcp), Some(udp))
}

/// The `LB_CONNS_V1` key of a backend address (as the sock_ops program builds it).
pub fn conn_key(addr: &crate::model::BackendAddr) -> svc_lb_common::ConnKey {
    svc_lb_common::ConnKey {
        addr_be: crate::datapath::codec::addr_words(addr.addr),
        port_be: addr.port.to_be(),
        family: if addr.addr.is_ipv4() {
            svc_lb_common::FAMILY_V4
        } else {
            svc_lb_common::FAMILY_V6
        },
        _pad: 0,
    }
}

impl DatapathView {
    pub fn read(maps: &PinnedMaps) -> Result<Self> {
        let ct = maps.ct_conn_counts(crate::inspect::trace::monotonic_ns())?;
        let state = maps.read_current()?;
        let (traffic, udp_traffic) = split_traffic(maps.traffic()?, &state);
        let totals = maps.ext_totals()?;
        Ok(Self {
            traffic: traffic.filter(|_| maps.sock_ops_attached()),
            udp_traffic,
            ext_totals: totals.is_some(),
            state,
            meta: maps.meta()?,
            frontend_conns: maps.conn_stats(MAP_FE_STATS)?,
            backend_conns: maps.conn_stats(MAP_BE_STATS)?,
            open_conns: maps.conn_counts()?,
            ext_conns: ct.per_backend,
            ext_pairs: ct.pairs,
            // The totals when the agent keeps them: the live sums go down whenever
            // the LRU evicts an entry or a flow reuses one.
            ext_traffic: totals.or(ct.traffic),
        })
    }

    /// The traffic of (frontend `rev_nat_id`, backend `id`): 0s when nothing closed
    /// yet; `None` when the node keeps no traffic counts, or for a backend that is not
    /// TCP or not in the backend map (the counts are by address).
    pub fn pair_traffic(&self, rev_nat_id: u32, id: u32) -> Option<svc_lb_common::TrafficCount> {
        self.socket_pair(
            self.traffic.as_ref(),
            svc_lb_common::PROTO_TCP,
            rev_nat_id,
            id,
        )
    }

    /// The unconnected datagrams frontend `rev_nat_id` sent to backend `id` (in
    /// `packets_in`; 0 when none yet); `None` without the traffic map, or for a
    /// backend that is not UDP or not in the backend map.
    pub fn udp_pair_traffic(
        &self,
        rev_nat_id: u32,
        id: u32,
    ) -> Option<svc_lb_common::TrafficCount> {
        self.socket_pair(
            self.udp_traffic.as_ref(),
            svc_lb_common::PROTO_UDP,
            rev_nat_id,
            id,
        )
    }

    /// (frontend, backend `id`) in `map` of the socket path's traffic when the backend
    /// is of `proto`: 0s when nothing was counted yet.
    fn socket_pair(
        &self,
        map: Option<&HashMap<svc_lb_common::TrafficKey, svc_lb_common::TrafficCount>>,
        proto: u8,
        rev_nat_id: u32,
        id: u32,
    ) -> Option<svc_lb_common::TrafficCount> {
        let t = map?;
        let b = self.state.backends.get(&id)?;
        if b.addr.proto != proto {
            return None;
        }
        let key = svc_lb_common::TrafficKey {
            rev_nat_id,
            backend: conn_key(&b.addr),
        };
        Some(t.get(&key).copied().unwrap_or_default())
    }

    /// The unconnected datagrams per UDP frontend (rev-NAT id), over every backend
    /// address it reached; empty without the traffic map.
    pub fn udp_frontend_traffic(&self) -> HashMap<u32, svc_lb_common::TrafficCount> {
        let mut out: HashMap<u32, svc_lb_common::TrafficCount> = HashMap::new();
        for (k, v) in self.udp_traffic.iter().flatten() {
            out.entry(k.rev_nat_id).or_default().add(v);
        }
        out
    }

    /// The external path's traffic of (frontend `rev_nat_id`, backend `id`) from the
    /// conntrack entries; `None` without a conntrack map or for a backend not in the
    /// backend map.
    pub fn ext_pair_traffic(
        &self,
        rev_nat_id: u32,
        id: u32,
    ) -> Option<svc_lb_common::TrafficCount> {
        let t = self.ext_traffic.as_ref()?;
        let b = self.state.backends.get(&id)?;
        let key = (rev_nat_id, conn_key(&b.addr), b.addr.proto);
        Some(t.get(&key).copied().unwrap_or_default())
    }

    /// The external path's traffic per frontend (rev-NAT id) from the conntrack
    /// entries; empty without a conntrack map.
    pub fn ext_frontend_traffic(&self) -> HashMap<u32, svc_lb_common::TrafficCount> {
        let mut out: HashMap<u32, svc_lb_common::TrafficCount> = HashMap::new();
        for ((rev_nat_id, _, _), v) in self.ext_traffic.iter().flatten() {
            out.entry(*rev_nat_id).or_default().add(v);
        }
        out
    }

    /// The external path's traffic per backend (address, protocol), over every
    /// frontend; empty without counts.
    pub fn ext_backend_traffic(
        &self,
    ) -> HashMap<(svc_lb_common::ConnKey, u8), svc_lb_common::TrafficCount> {
        let mut out: HashMap<_, svc_lb_common::TrafficCount> = HashMap::new();
        for ((_, addr, proto), v) in self.ext_traffic.iter().flatten() {
            out.entry((*addr, *proto)).or_default().add(v);
        }
        out
    }

    /// The traffic per frontend (rev-NAT id), over every backend address it reached,
    /// including backends that have left it since; empty without traffic counts.
    pub fn frontend_traffic(&self) -> HashMap<u32, svc_lb_common::TrafficCount> {
        let mut out: HashMap<u32, svc_lb_common::TrafficCount> = HashMap::new();
        for (k, v) in self.traffic.iter().flatten() {
            out.entry(k.rev_nat_id).or_default().add(v);
        }
        out
    }
}

impl DatapathView {
    /// The draining backends: `BACKEND_DRAINING` entries that no slot names (weight 0,
    /// or an external frontend's endpoint that stopped being ready but still serves).
    /// Usually none or a few; computed once, then matched per frontend by
    /// [`DatapathView::draining_of`].
    pub fn draining(&self) -> Vec<(u32, crate::plan::BackendEntry)> {
        let candidates: Vec<(u32, crate::plan::BackendEntry)> = self
            .state
            .backends
            .iter()
            .filter(|(_, b)| b.state == svc_lb_common::BACKEND_DRAINING)
            .map(|(id, b)| (*id, *b))
            .collect();
        if candidates.is_empty() {
            return candidates;
        }
        let slotted: std::collections::HashSet<u32> = self
            .state
            .frontends
            .values()
            .flat_map(|f| f.backend_ids.iter().copied())
            .collect();
        candidates
            .into_iter()
            .filter(|(id, _)| !slotted.contains(id))
            .collect()
    }

    /// The backends of `draining` (see [`DatapathView::draining`]) that frontend
    /// `rev_nat_id` still has connections through: a live external flow (conntrack),
    /// or a socket-path TCP connection since the entry was made (the sock_ops program
    /// records the (frontend, backend address) pair at the connect). The maps keep no
    /// other link between a draining backend and its frontends.
    pub fn draining_of(
        &self,
        rev_nat_id: u32,
        proto: u8,
        draining: &[(u32, crate::plan::BackendEntry)],
    ) -> Vec<u32> {
        draining
            .iter()
            .filter(|(id, b)| {
                b.addr.proto == proto
                    && (self.ext_pairs.contains(&(rev_nat_id, *id))
                        || (proto == svc_lb_common::PROTO_TCP
                            && self.traffic.as_ref().is_some_and(|t| {
                                t.contains_key(&svc_lb_common::TrafficKey {
                                    rev_nat_id,
                                    backend: conn_key(&b.addr),
                                })
                            })))
            })
            .map(|(id, _)| *id)
            .collect()
    }
}
