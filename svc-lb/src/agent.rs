//! The agent: source → model → plan → datapath, one whole snapshot at a time.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{
    datapath::{MapStore, apply::apply_plan, bpf::BpfDatapath},
    model::{self, NodeInfo, Objects},
    plan::{self, CurrentState},
    source::{Snapshot, manifests},
};

pub struct AgentConfig {
    pub manifests: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup: PathBuf,
    pub node: NodeInfo,
}

/// After a failed apply, try again this soon even if nothing changes.
const RETRY: Duration = Duration::from_secs(1);

pub async fn run(cfg: AgentConfig) -> Result<()> {
    std::fs::read_dir(&cfg.manifests)
        .with_context(|| format!("manifest directory {}", cfg.manifests.display()))?;
    if !crate::datapath::sys::is_cgroup2(&cfg.cgroup)
        .with_context(|| format!("cgroup {}", cfg.cgroup.display()))?
    {
        anyhow::bail!("{} is not a cgroup v2 directory", cfg.cgroup.display());
    }
    let mut dp = BpfDatapath::open(&cfg.bpffs)?;
    // Adopt whatever a previous agent programmed: the first sync then changes only
    // what differs, so a restart never disturbs a working Service.
    let mut current = dp.read_current().context("read the pinned maps back")?;
    info!(
        bpffs = %cfg.bpffs.display(),
        cgroup = %cfg.cgroup.display(),
        frontends = current.frontends.len(),
        backends = current.backends.len(),
        "maps open; adopted pinned state"
    );

    let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
    let mut watcher = tokio::spawn(manifests::watch(cfg.manifests.clone(), tx));
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut reported = BTreeSet::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut attached = false;

    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The watcher only ends on error; it owns the sender.
                    return match (&mut watcher).await {
                        Ok(Err(e)) => Err(e).context("manifest watcher stopped"),
                        Ok(Ok(())) => Err(anyhow::anyhow!("manifest watcher stopped")),
                        Err(e) => Err(e).context("manifest watcher panicked"),
                    };
                }
            }
            () = retry => {}
            _ = sigterm.recv() => { info!("SIGTERM: exiting; programs and maps stay pinned"); return Ok(()); }
            _ = sigint.recv() => { info!("SIGINT: exiting; programs and maps stay pinned"); return Ok(()); }
        }
        let snap = rx.borrow_and_update().clone();
        let result = sync(&mut dp, &mut current, &snap, &cfg.node, &mut reported);
        if !attached {
            // Attach only once the first sync is in the maps, and before it is reported
            // as applied: "applied" means the kernel acts on it.
            dp.attach(&cfg.bpffs, &cfg.cgroup)?;
            attached = true;
            info!(cgroup = %cfg.cgroup.display(), "programs attached; datapath ready");
        }
        retry_at = match result {
            Ok(report) => {
                info!(
                    ops = report.ops,
                    frontends = report.frontends,
                    backends = report.backends,
                    rejected = report.rejected,
                    duration_us = report.duration.as_micros() as u64,
                    "sync applied"
                );
                None
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "sync failed; the datapath keeps its last consistent state, retrying");
                // The mirror tracks every op that succeeded; re-read in case the kernel
                // state moved under us (for example a map edited by hand).
                match dp.read_current() {
                    Ok(c) => current = c,
                    Err(e) => error!(error = %format!("{e:#}"), "re-reading the maps failed"),
                }
                Some(tokio::time::Instant::now() + RETRY)
            }
        };
    }
}

/// Logs each problem once while it persists, so a bad file does not flood the log on
/// every reload.
fn report_once(
    reported: &mut BTreeSet<String>,
    now: &mut BTreeSet<String>,
    msg: String,
    log: impl FnOnce(),
) {
    if !reported.contains(&msg) {
        log();
    }
    now.insert(msg);
}

fn origin(snap: &Snapshot, obj: &model::ObjectRef) -> String {
    snap.origins
        .get(obj)
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// What one applied sync did.
#[derive(Clone, Copy, Debug)]
pub struct SyncReport {
    pub ops: usize,
    pub frontends: usize,
    pub backends: usize,
    pub rejected: usize,
    pub duration: Duration,
}

/// One pass: model, plan, apply. Returns an error only when applying failed; a first
/// sync that fails still lets the programs attach, since the maps hold a consistent
/// (if older) state.
pub fn sync(
    dp: &mut dyn MapStore,
    current: &mut CurrentState,
    snap: &Snapshot,
    node: &NodeInfo,
    reported: &mut BTreeSet<String>,
) -> Result<SyncReport> {
    let started = Instant::now();
    let mut now = BTreeSet::new();
    for e in &snap.errors {
        let file = e
            .file
            .as_deref()
            .map(Path::display)
            .map(|d| d.to_string())
            .unwrap_or_default();
        let object = e
            .object
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        report_once(
            reported,
            &mut now,
            e.to_string(),
            || warn!(file, object, reason = %e.reason, "skipped bad input"),
        );
    }
    let (desired, errors) = model::build(
        Objects {
            services: &snap.services,
            slices: &snap.slices,
        },
        node,
    );
    for e in &errors {
        report_once(
            reported,
            &mut now,
            e.to_string(),
            || warn!(file = origin(snap, &e.object), object = %e.object, reason = %e.reason, "skipped bad input"),
        );
    }
    let plan = plan::plan(current, &desired, &dp.capacity());
    for r in &plan.rejected {
        report_once(
            reported,
            &mut now,
            format!("{}: {}", r.service, r.reason),
            || error!(service = %r.service, reason = %r.reason, "Service not programmed"),
        );
    }
    *reported = now;
    let ops = apply_plan(dp, current, &plan)?;
    dp.sync_meta(current, &desired)
        .context("write Service metadata")?;
    Ok(SyncReport {
        ops,
        frontends: current.frontends.len(),
        backends: current.backends.len(),
        rejected: plan.rejected.len(),
        duration: started.elapsed(),
    })
}
