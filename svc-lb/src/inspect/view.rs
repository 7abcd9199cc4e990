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
}

impl DatapathView {
    pub fn read(maps: &PinnedMaps) -> Result<Self> {
        Ok(Self {
            state: maps.read_current()?,
            meta: maps.meta()?,
            frontend_conns: maps.conn_stats(MAP_FE_STATS)?,
            backend_conns: maps.conn_stats(MAP_BE_STATS)?,
        })
    }
}
