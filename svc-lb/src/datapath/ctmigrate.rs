//! Upgrade of the external path's conntrack from `LB_CT_V1` (no counters) to `LB_CT_V2`
//! ([`CtEntry`], issue 15): an agent restart must not drop or misroute a flow.
//!
//! The programs of the earlier run keep writing `LB_CT_V1` until the new ones replace
//! them on the devices; from then on only `LB_CT_V2` is read. So the entries are copied
//! twice: [`copy`] right before the new programs are attached (every flow known then),
//! and [`finish`] right after (the flows the old programs created meanwhile), which
//! then removes the old pin. Both copies insert only keys `LB_CT_V2` does not hold
//! (`BPF_NOEXIST`): an entry the new programs already wrote is newer. The counters of
//! copied entries start at 0. A flow whose first packets fall between the two copies
//! and whose next packet reaches a new program before [`finish`] runs (a few
//! milliseconds) is chosen again.
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError};
use svc_lb_common::{CtEntry, CtKey, CtValue, MAP_CT, MAP_CT_V1};
use tracing::info;

/// `BPF_NOEXIST`: insert only a key the map does not hold.
const BPF_NOEXIST: u64 = 1;

/// Copies the live entries of a pinned `LB_CT_V1` into `LB_CT_V2`; returns how many
/// were copied, `None` when there is no old pin (or no new map: external path off).
pub fn copy(bpffs: &Path, now_ns: u64) -> Result<Option<usize>> {
    let old_path = bpffs.join(MAP_CT_V1);
    let new_path = bpffs.join(MAP_CT);
    if !old_path.exists() || !new_path.exists() {
        return Ok(None);
    }
    let old: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(&old_path)
            .with_context(|| format!("open pinned map {}", old_path.display()))?,
    ))
    .with_context(|| format!("pinned map {MAP_CT_V1} has an unexpected layout"))?;
    let mut new: HashMap<MapData, CtKey, CtEntry> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(&new_path)
            .with_context(|| format!("open pinned map {}", new_path.display()))?,
    ))
    .with_context(|| format!("pinned map {MAP_CT} has an unexpected layout"))?;
    // Collected first: the old programs may still evict entries while we walk, which
    // restarts the kernel's walk (a key may come twice; the map dedups).
    let entries: std::collections::HashMap<CtKey, CtValue> =
        old.iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("read {MAP_CT_V1}"))?;
    let mut copied = 0usize;
    for (k, v) in entries {
        // An expired entry is ignored by the programs; copying it would only take room.
        if v.expires_ns <= now_ns {
            continue;
        }
        let e = CtEntry {
            ct: v,
            packets: 0,
            bytes: 0,
        };
        match new.insert(k, e, BPF_NOEXIST) {
            Ok(()) => copied += 1,
            // Already there: written by the new programs (newer) or by the first copy.
            Err(MapError::SyscallError(ref s))
                if s.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(|| format!("{MAP_CT}: insert {k:?}")),
        }
    }
    Ok(Some(copied))
}

/// The second copy (see the module doc), then the old pin goes: no program of this
/// version reads it.
pub fn finish(bpffs: &Path, now_ns: u64) -> Result<()> {
    let Some(copied) = copy(bpffs, now_ns)? else {
        return Ok(());
    };
    let old_path = bpffs.join(MAP_CT_V1);
    std::fs::remove_file(&old_path).with_context(|| format!("remove {}", old_path.display()))?;
    info!(
        copied_after_attach = copied,
        "conntrack upgraded from {MAP_CT_V1} to {MAP_CT}; old pin removed"
    );
    Ok(())
}
