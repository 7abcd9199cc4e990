//! The `lc`/`wlc` scan programs on demand (issue 15). The connect hooks tail-call
//! `svclb_lc4`/`svclb_lc6` for an `lc`/`wlc` frontend; until those sit in the hooks'
//! program arrays the hooks take the lighter of two random slots. Their verification
//! is long (about 210 000 instructions on 6.18, minutes ending in a refusal on Debian's
//! 5.10 and 6.1), so a node pays for it only once a frontend needs them, on a thread of
//! its own while the agent keeps serving, and at most once per run: a refusal is
//! warned about once and not retried.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, ProgramArray};
use tracing::{info, warn};

use super::load::{self, LcPrograms, LoadOptions};

/// Where this run's lc programs are, for `svc-lb status` and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LcState {
    /// This kernel cannot run them (no connection counts): never loaded.
    Off,
    /// No frontend has needed them yet.
    NotNeeded,
    /// Going through the verifier.
    Loading,
    /// In the connect hooks' program arrays: lc/wlc choices over up to
    /// `LC_LOOP_MAX` slots (`bpf_loop`) or `LC_SCAN_MAX` are exact.
    Loaded,
    /// The verifier (or the insert) refused them; not retried in this run.
    Refused,
}

impl LcState {
    pub const ALL: [LcState; 5] = [
        LcState::Off,
        LcState::NotNeeded,
        LcState::Loading,
        LcState::Loaded,
        LcState::Refused,
    ];

    /// The word `svc-lb status` and the metrics' `state` label show.
    pub fn name(self) -> &'static str {
        match self {
            LcState::Off => "off",
            LcState::NotNeeded => "not_needed",
            LcState::Loading => "loading",
            LcState::Loaded => "loaded",
            LcState::Refused => "refused",
        }
    }
}

/// The lc programs of one agent run: the hooks' program arrays (taken from the object
/// the socket programs were loaded from) and the load, once started.
pub struct LcDemand {
    state: LcState,
    bpffs: PathBuf,
    opts: LoadOptions,
    /// Kept open for the whole run: the kernel empties a program array when its last
    /// user-space reference closes.
    arrays: Vec<(&'static str, ProgramArray<MapData>)>,
    loading: Option<mpsc::Receiver<Result<LcPrograms>>>,
    /// Woken when a load ends, so that the agent inserts the programs without waiting
    /// for its next sync.
    done: Arc<tokio::sync::Notify>,
    /// Why the load failed, once.
    error: Option<String>,
}

impl LcDemand {
    /// `enabled`: whether this kernel can run the lc programs at all (the probe's
    /// `lc_loop`, which needs the connection counts).
    pub fn new(
        enabled: bool,
        bpffs: &Path,
        opts: LoadOptions,
        arrays: Vec<(&'static str, ProgramArray<MapData>)>,
    ) -> Self {
        Self {
            state: if enabled {
                LcState::NotNeeded
            } else {
                LcState::Off
            },
            bpffs: bpffs.to_path_buf(),
            opts,
            arrays,
            loading: None,
            done: Arc::new(tokio::sync::Notify::new()),
            error: None,
        }
    }

    pub fn state(&self) -> LcState {
        self.state
    }

    /// The verifier's refusal (summarised), when the state is [`LcState::Refused`].
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Notified when a load started by [`Self::want`] has ended; then call
    /// [`Self::poll`].
    pub fn done(&self) -> Arc<tokio::sync::Notify> {
        self.done.clone()
    }

    /// A frontend needs the lc programs: starts their load on a thread of its own,
    /// unless it is running, done or refused (or this kernel cannot run them).
    pub fn want(&mut self) -> Result<()> {
        if self.state != LcState::NotNeeded {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        let (bpffs, opts, done) = (self.bpffs.clone(), self.opts, self.done.clone());
        std::thread::Builder::new()
            .name("svclb-verify-lc".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let result = load::load_lc_programs(&bpffs, &opts);
                if result.is_ok() {
                    info!(
                        took_us = started.elapsed().as_micros() as u64,
                        "lc/wlc: scan programs verified"
                    );
                }
                // The receiver is gone only when the agent is exiting.
                let _ = tx.send(result);
                done.notify_one();
            })
            .context("start the lc program-load thread")?;
        self.loading = Some(rx);
        self.state = LcState::Loading;
        info!(
            "lc/wlc: a frontend needs the scan programs; loading them (until then lc/wlc take the lighter of two random slots)"
        );
        Ok(())
    }

    /// Inserts the programs of a finished load into the connect hooks' program arrays;
    /// returns whether the state changed. A failed load is warned about here, once.
    pub fn poll(&mut self) -> bool {
        let Some(rx) = &self.loading else {
            return false;
        };
        let result = match rx.try_recv() {
            Ok(r) => r,
            Err(mpsc::TryRecvError::Empty) => return false,
            Err(mpsc::TryRecvError::Disconnected) => {
                Err(anyhow::anyhow!("the lc program-load thread panicked"))
            }
        };
        self.loading = None;
        match result.and_then(|programs| load::insert_lc_programs(&mut self.arrays, &programs)) {
            Ok(()) => {
                self.state = LcState::Loaded;
                info!("lc/wlc: scan programs loaded");
            }
            Err(e) => {
                let summary = load::verifier_summary(&format!("{e:#}"));
                warn!(error = %summary, "lc/wlc programs not loaded: lc/wlc frontends take the lighter of two random slots (not retried until the agent restarts)");
                self.error = Some(summary);
                self.state = LcState::Refused;
            }
        }
        true
    }
}

/// The lc programs (`svclb_lc4`/`svclb_lc6`, or `svclb_lcloop4`/`svclb_lcloop6`
/// where the kernel has `bpf_loop`) loaded in the kernel that read the
/// Service maps pinned in `bpffs`: those an agent on this bpffs has loaded (an lc
/// program lives only as long as the agent's program arrays). For `svc-lb trace`, which
/// runs beside the agent, and the tests.
pub fn lc_programs_loaded(bpffs: &Path) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for name in [svc_lb_common::MAP_SVC4, svc_lb_common::MAP_SVC6] {
        let path = bpffs.join(name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("open pinned map {}", path.display()))?;
        ids.push(
            data.info()
                .with_context(|| format!("info of pinned map {name}"))?
                .id(),
        );
    }
    let mut found = Vec::new();
    for p in aya::programs::loaded_programs() {
        // A program unloaded between the listing and its info.
        let Ok(p) = p else { continue };
        let name = p.name_as_str().unwrap_or_default();
        if ![
            svc_lb_common::PROG_LC4,
            svc_lb_common::PROG_LC6,
            svc_lb_common::PROG_LCLOOP4,
            svc_lb_common::PROG_LCLOOP6,
        ]
        .contains(&name)
        {
            continue;
        }
        let maps = p
            .map_ids()
            .with_context(|| format!("map ids of program {name} (id {})", p.id()))?
            .unwrap_or_default();
        if maps.iter().any(|m| ids.contains(m)) {
            found.push(name.to_owned());
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}
