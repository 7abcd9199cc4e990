//! The manifest-directory source: `*.yaml`, `*.yml` and `*.json` files holding `v1`
//! Services and `discovery.k8s.io/v1` EndpointSlices, as `kubectl get -o yaml` writes
//! them.
//!
//! Rules:
//! - Only the directory itself is read (not subdirectories). Hidden files (a leading
//!   `.`, which also hides a ConfigMap volume's `..data`) and editor droppings (`#…`,
//!   `…~`) are skipped; symlinks are followed.
//! - A YAML file may hold several `---`-separated documents, a JSON file several
//!   concatenated values. A document may be a single object or a list: `v1 List` (what
//!   `kubectl get svc,endpointslices -o yaml` writes), `v1 ServiceList` or
//!   `discovery.k8s.io/v1 EndpointSliceList` (what the raw API returns).
//! - A missing or empty `metadata.namespace` means `default`.
//! - Bad input never stops good input from loading: every problem becomes a
//!   [`SourceError`] naming the file, the object when it is known, and the reason, and
//!   only the bad document (or object in a list) is skipped.
//! - One object (kind, namespace, name) defined twice keeps its first definition in
//!   file-name order; the later one is reported.
//!
//! - Limits (issue 12): a file larger than [`Limits::max_file_bytes`] is not read; a YAML
//!   document may not expand (events, nodes, alias replays) to more than about its own
//!   size plus a small constant, so that no file costs more than a bounded multiple of
//!   its size. Such a file is reported with its name and reason.
//! - Last good state: a file that cannot be read or parsed (too large, not UTF-8, a
//!   syntax error or budget breach in any document), or that changes while it is read,
//!   keeps the content of its last good version in effect, with an error saying so. A
//!   file that a writer still holds open (inotify saw it modified but not yet closed) is
//!   not read until the writer closes it or has been idle for [`WRITER_IDLE`]; a file
//!   that changed without an event saying it is complete waits for [`SETTLE`]. A
//!   deleted file withdraws its objects at once.
//! - Withdrawing waits (see `hold`): a file read at once because its writer closed it
//!   may be the first of several write sessions, so such a read adds and changes at
//!   once, but what it would take away stays until the file has settled. A file renamed
//!   into place is whole and taken as it is.
//!
//! [`ManifestDir`] caches what each file parsed to, keyed by the file's stamp (device,
//! inode, length, mtime, ctime), so that a reload re-reads only the files that changed.
//! It keeps one persistent [`Snapshot`] and updates it in place for the objects of the
//! files that changed, so that a reload costs the changed files, not the directory, and
//! says exactly which Services changed ([`Snapshot::changed`]).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, hash_map},
    fs,
    hash::{DefaultHasher, Hasher},
    io::{self, Read as _},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind, RenameMode},
};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Changed, Snapshot, SourceError, metallb};
use crate::model::{ObjectRef, ServiceRef};

/// How long a changed file that the watch did not see completed (no close by its writer,
/// no rename into place) must stay unmodified before [`watch`] reads it (see
/// [`ManifestDir::set_settle`]). A completed file is read at once.
pub const SETTLE: Duration = Duration::from_millis(100);
/// How long a file that its writer closed must stay unmodified before what it no longer
/// holds is withdrawn (see `hold`). Longer than [`SETTLE`]: the second session of a
/// two-step writer (`cat a > f; cat b >> f`) can come late on a busy node (a 100 ms window
/// let a starved shell withdraw the second half), and a withdrawal one second late costs
/// little next to connections refused meanwhile. Files renamed into place are not held.
pub const WITHDRAW_SETTLE: Duration = Duration::from_secs(1);
/// How often [`watch`] rescans even without events, in case the kernel dropped some (an
/// inotify queue overflow) or the directory itself was replaced.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(2);

/// A file that a writer opened and modified but never closed is read anyway once it has
/// not changed for this long (a writer that keeps its file open).
pub const WRITER_IDLE: Duration = Duration::from_secs(5);

const DEFAULT_NAMESPACE: &str = "default";

/// The default of `--max-manifest-bytes`.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 16 << 20;

/// What one manifest file may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Larger files are not read (`--max-manifest-bytes`).
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

/// Slack added to every per-document YAML budget, so that tiny documents with a few
/// anchors still parse.
const YAML_BUDGET_SLACK: usize = 4096;

/// Reads every manifest in `dir` into one snapshot. Bad files and objects are reported
/// in `Snapshot::errors`; they never stop the others from loading. `Err` only when the
/// directory itself cannot be read.
pub fn load_dir(dir: &Path) -> anyhow::Result<Snapshot> {
    ManifestDir::new(dir).load()
}

/// What the directory watch last saw happen to one path.
#[derive(Clone, Copy, Debug)]
enum Seen {
    /// Modified and not yet closed, last at this time: possibly half-written.
    Writing(Instant),
    /// Its writer closed it, or it was renamed into place (its writer finished
    /// elsewhere): the version with this stamp is complete.
    Complete(Stamp),
    /// Renamed into place: complete, and the whole of what its writer meant (a close may
    /// end only the first of several write sessions; see `hold`).
    Renamed(Stamp),
}

/// How far a scan may trust a changed file, from what the watch saw of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trust {
    /// A writer still holds it open: leave it for later.
    Busy,
    /// Its current version is one the watch saw closed by its writer: read it now.
    Complete,
    /// Its current version was renamed into place: read it now, withdrawals included.
    Renamed,
    /// Changed without an event that says it is complete (a lost event, a symlink swap,
    /// no watch): read it once it has settled.
    Unknown,
}

/// What the directory watch has seen of each path: files a writer modified and has not
/// yet closed, and the versions seen completed (closed by their writer, or renamed into
/// place). Empty (nothing seen, everything settles) without a watch.
#[derive(Clone, Debug, Default)]
pub struct Writers(Arc<Mutex<Seens>>);

#[derive(Debug, Default)]
struct Seens {
    seen: HashMap<PathBuf, Seen>,
    /// Paths named by events since the last [`Writers::take_dirty`]; `None` when an
    /// event named none (or was lost) and only a full scan will do.
    dirty: Option<BTreeSet<PathBuf>>,
}

impl Writers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Seens> {
        // Plain data: a panic elsewhere while holding the lock leaves it usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The paths events named since the last call; `None`: scan everything (the first
    /// call, or an event that named no path or was lost).
    fn take_dirty(&self) -> Option<BTreeSet<PathBuf>> {
        self.lock().dirty.replace(BTreeSet::new())
    }

    /// Events were lost (a watch error, a queue overflow): the next scan lists all.
    fn lost(&self) {
        self.lock().dirty = None;
    }

    /// Records what one inotify event says about the files it names.
    pub fn observe(&self, event: &notify::Event) {
        let mut guard = self.lock();
        let Seens { seen: w, dirty } = &mut *guard;
        if event.paths.is_empty() || event.need_rescan() {
            *dirty = None;
        } else if let Some(d) = dirty {
            d.extend(event.paths.iter().cloned());
        }
        match event.kind {
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                for p in &event.paths {
                    w.insert(p.clone(), Seen::Writing(Instant::now()));
                }
            }
            // The writer is done with it: remember the version it left. A later write
            // changes the stamp (and sends its own event), so only this version counts.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for p in &event.paths {
                    complete(w, p, Seen::Complete);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                for p in &event.paths {
                    complete(w, p, Seen::Renamed);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                if let Some(from) = event.paths.first() {
                    w.remove(from);
                }
                if let Some(to) = event.paths.get(1) {
                    complete(w, to, Seen::Renamed);
                }
            }
            // A mode or owner change leaves the content alone: a complete version stays
            // complete (its ctime moved, so take the new stamp).
            EventKind::Modify(ModifyKind::Metadata(_)) => {
                for p in &event.paths {
                    let (was, renamed) = match w.get(p).copied() {
                        Some(Seen::Complete(was)) => (was, false),
                        Some(Seen::Renamed(was)) => (was, true),
                        _ => continue,
                    };
                    match fs::metadata(p).map(|m| Stamp::of(&m)) {
                        Ok(now) if now.same_content_as(&was) => {
                            let seen = if renamed {
                                Seen::Renamed(now)
                            } else {
                                Seen::Complete(now)
                            };
                            w.insert(p.clone(), seen);
                        }
                        _ => {
                            w.remove(p);
                        }
                    }
                }
            }
            // Gone, or renamed away: nothing of it is half-written any more.
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                for p in &event.paths {
                    w.remove(p);
                }
            }
            _ => {}
        }
    }

    /// What a scan may do with `path`, whose current version has `stamp`. A writer that
    /// was last active [`WRITER_IDLE`] ago no longer counts: its file settles.
    fn trust(&self, path: &Path, stamp: &Stamp) -> Trust {
        let w = &mut self.lock().seen;
        match w.get(path) {
            Some(Seen::Writing(t)) if t.elapsed() < WRITER_IDLE => Trust::Busy,
            Some(Seen::Writing(_)) => {
                w.remove(path);
                Trust::Unknown
            }
            Some(Seen::Complete(done)) if done == stamp => Trust::Complete,
            Some(Seen::Renamed(done)) if done == stamp => Trust::Renamed,
            _ => Trust::Unknown,
        }
    }
}

/// Records the version of `path` now on disk as complete. A file already gone again
/// (renamed away, removed) is forgotten: its own event follows.
fn complete(w: &mut HashMap<PathBuf, Seen>, path: &Path, seen: fn(Stamp) -> Seen) {
    match fs::metadata(path) {
        Ok(meta) => {
            w.insert(path.to_path_buf(), seen(Stamp::of(&meta)));
        }
        Err(_) => {
            w.remove(path);
        }
    }
}

/// What the last scan of a [`ManifestDir`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Manifest files in the directory.
    pub files: usize,
    /// Files whose bytes were read (new, changed stamp, or too recent to trust).
    pub read: usize,
    /// Files parsed: read and found different from what the cache held.
    pub parsed: usize,
    /// Files that disappeared since the previous scan.
    pub removed: usize,
    /// Whether the snapshot differs from the one of the previous scan.
    pub changed: bool,
    /// Changed files left for a later scan: a writer holds them open, or they changed
    /// within the settle window.
    pub deferred: usize,
}

/// A manifest directory with a per-file parse cache.
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// let mut dir = svc_lb::source::manifests::ManifestDir::new("/etc/svc-lb/manifests");
/// let first = dir.load()?; // reads and parses everything
/// if let Some(next) = dir.reload()? {
///     // only changed files were re-parsed
/// #   let _ = (first, next);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    /// The view of the last scan, updated in place for the files that changed.
    snap: Snapshot,
    /// Every definition of each object, in claim order (file path, then position in
    /// the file): the first is in effect, the others are reported as duplicates.
    defs: HashMap<ObjectRef, Vec<Def>>,
    /// The objects with more than one definition.
    duplicated: BTreeSet<ObjectRef>,
    /// The Service each published slice is filed under in `snap`.
    slice_owners: HashMap<ObjectRef, ServiceRef>,
    scanned: bool,
    stats: ScanStats,
    limits: Limits,
    writers: Writers,
    settle: Duration,
    withdraw_settle: Duration,
    /// Files the last scans left for later (see [`ScanStats::deferred`]).
    pending: BTreeSet<PathBuf>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_limits(dir, Limits::default())
    }

    pub fn with_limits(dir: impl Into<PathBuf>, limits: Limits) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            snap: Snapshot::default(),
            defs: HashMap::new(),
            duplicated: BTreeSet::new(),
            slice_owners: HashMap::new(),
            scanned: false,
            stats: ScanStats::default(),
            limits,
            writers: Writers::default(),
            settle: Duration::ZERO,
            withdraw_settle: Duration::ZERO,
            pending: BTreeSet::new(),
        }
    }

    /// A changed file is read only once its mtime is this old, so that a writer that
    /// is not seen by the watch (or not yet) is not caught half-way ([`SETTLE`] in
    /// [`watch`]; zero, the default, reads at once).
    /// The withdrawal window (see `hold`) follows it unless set apart with
    /// [`ManifestDir::set_withdraw_settle`].
    pub fn set_settle(&mut self, settle: Duration) {
        self.settle = settle;
        self.withdraw_settle = settle;
    }

    /// What a closed file no longer holds is withdrawn once its mtime is this old
    /// ([`WITHDRAW_SETTLE`] in [`watch`]).
    pub fn set_withdraw_settle(&mut self, settle: Duration) {
        self.withdraw_settle = settle;
    }

    /// Shares the watch's record of files still being written (see [`Writers`]).
    pub fn set_writers(&mut self, writers: Writers) {
        self.writers = writers;
    }

    /// Files whose last good content stands in for a version that could not be used.
    pub fn stale_files(&self) -> usize {
        self.files.values().filter(|f| f.stale.is_some()).count()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Scans the directory and returns the full snapshot, changed or not. `Err` only
    /// when the directory cannot be listed; the cache then keeps the previous state.
    pub fn load(&mut self) -> anyhow::Result<Snapshot> {
        self.scan()?;
        Ok(self.snapshot())
    }

    /// Like [`load`](Self::load), but `Ok(None)` when nothing changed since the previous
    /// scan (the first call always returns a snapshot). A file that was touched or
    /// rewritten with the same content is no change.
    pub fn reload(&mut self) -> anyhow::Result<Option<Snapshot>> {
        let first = !self.scanned;
        let changed = self.scan()?;
        Ok((first || changed).then(|| self.snapshot()))
    }

    /// What the last successful scan did.
    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// The snapshot of the last successful scan (empty before the first), with the
    /// Services that scan changed (all of them after the first scan). O(1): the maps
    /// share their structure with the source's own.
    pub fn snapshot(&self) -> Snapshot {
        self.snap.clone()
    }

    /// Brings the cache and the snapshot up to date; true when the snapshot changed.
    fn scan(&mut self) -> anyhow::Result<bool> {
        let listed = list_manifests(&self.dir)?;
        let mut stats = ScanStats {
            files: listed.len(),
            ..ScanStats::default()
        };
        let mut refreshed = false;
        let mut edits = Vec::new();
        let mut next = BTreeMap::new();
        self.pending.clear();
        let jobs: Vec<Job> = listed
            .into_iter()
            .map(|(path, meta)| {
                let old = self.files.remove(&path);
                self.job(path, meta, old)
            })
            .collect();
        for done in run_jobs(jobs) {
            let (path, file) = self.record(done, &mut stats, &mut edits, &mut refreshed);
            next.insert(path, file);
        }
        // Whatever is left in the old cache is gone from the directory.
        stats.removed = self.files.len();
        for (path, file) in std::mem::replace(&mut self.files, next) {
            edits.push(Edit {
                path: path.into(),
                before: Some(file.content),
                after: None,
            });
        }
        Ok(self.finish(stats, &edits, refreshed))
    }

    /// Like [`reload`](Self::reload), but looks only at `paths` (those the watch saw
    /// events for) and at the files left for later by earlier scans, instead of listing
    /// the directory: a change costs the files it touched. The first call, and any call
    /// after `load` was never made, scans everything.
    pub fn reload_paths(&mut self, paths: &BTreeSet<PathBuf>) -> anyhow::Result<Option<Snapshot>> {
        if !self.scanned {
            return self.reload();
        }
        let mut stats = ScanStats::default();
        let mut refreshed = false;
        let mut edits = Vec::new();
        if paths.iter().any(|p| p.parent() != Some(self.dir.as_path())) {
            // The directory itself, or a path spelled unlike ours: list everything.
            return self.reload();
        }
        let mut look: BTreeSet<PathBuf> = std::mem::take(&mut self.pending);
        look.extend(
            paths
                .iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(is_manifest_name)
                })
                .cloned(),
        );
        for path in look {
            // As `list_manifests` would see it: present unless the name is gone; a
            // dangling link is present with an error, a directory is not a manifest.
            let present = match fs::symlink_metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                _ => Some(fs::metadata(&path)),
            }
            .filter(|meta| !meta.as_ref().is_ok_and(|m| !m.is_file()));
            let old = self.files.remove(&path);
            match present {
                Some(meta) => {
                    let file =
                        self.refresh_one(&path, meta, old, &mut stats, &mut edits, &mut refreshed);
                    self.files.insert(path, file);
                }
                None => {
                    if let Some(old) = old {
                        stats.removed += 1;
                        edits.push(Edit {
                            path: path.into(),
                            before: Some(old.content),
                            after: None,
                        });
                    }
                }
            }
        }
        stats.files = self.files.len();
        let changed = self.finish(stats, &edits, refreshed);
        Ok(changed.then(|| self.snapshot()))
    }

    /// Brings one listed file's cache entry up to date, noting its edit and whether it
    /// was left for later.
    fn refresh_one(
        &mut self,
        path: &Path,
        meta: io::Result<fs::Metadata>,
        old: Option<CachedFile>,
        stats: &mut ScanStats,
        edits: &mut Vec<Edit>,
        refreshed: &mut bool,
    ) -> CachedFile {
        let done = self.job(path.to_path_buf(), meta, old).run();
        self.record(done, stats, edits, refreshed).1
    }

    /// What refreshing one listed file needs, decided before it is read.
    fn job(&self, path: PathBuf, meta: io::Result<fs::Metadata>, old: Option<CachedFile>) -> Job {
        let trust = meta
            .as_ref()
            .map_or(Trust::Unknown, |m| self.writers.trust(&path, &Stamp::of(m)));
        Job {
            before: old.as_ref().map(|f| f.content.clone()),
            ctx: Refresh {
                limits: self.limits,
                trust,
                settle: self.settle,
                withdraw_settle: self.withdraw_settle,
            },
            path,
            meta,
            old,
        }
    }

    /// Takes in one refreshed file: its stats, its edit, and whether it was left for
    /// later. Returns its cache entry.
    fn record(
        &mut self,
        done: Done,
        stats: &mut ScanStats,
        edits: &mut Vec<Edit>,
        refreshed: &mut bool,
    ) -> (PathBuf, CachedFile) {
        let Done {
            path,
            before,
            file,
            changed,
            stats: own,
        } = done;
        stats.read += own.read;
        stats.parsed += own.parsed;
        stats.deferred += own.deferred;
        if own.deferred > 0 {
            self.pending.insert(path.clone());
        }
        *refreshed |= changed;
        // Content that parsed equal keeps its `Arc` (see `refresh`), so a pointer
        // comparison finds the files whose objects need a look.
        if before
            .as_ref()
            .is_none_or(|b| !Arc::ptr_eq(b, &file.content))
        {
            edits.push(Edit {
                path: path.as_path().into(),
                before,
                after: Some(file.content.clone()),
            });
        }
        (path, file)
    }

    /// Puts the scan's edits into the snapshot; true when the snapshot changed.
    fn finish(&mut self, mut stats: ScanStats, edits: &[Edit], refreshed: bool) -> bool {
        let first = !self.scanned;
        let mut changed = BTreeSet::new();
        let mut visible = first;
        if refreshed || !edits.is_empty() {
            visible |= self.apply(edits, &mut changed);
            let errors = self.errors();
            if *self.snap.errors != errors {
                self.snap.errors = Arc::new(errors);
                visible = true;
            }
        }
        self.snap.changed = if first {
            Changed::all()
        } else {
            Changed {
                all: false,
                services: changed,
            }
        };
        stats.changed = visible;
        stats.deferred = self.pending.len();
        self.stats = stats;
        self.scanned = true;
        visible
    }

    /// Takes the objects of the edited files' old content out of the claims and puts
    /// their new content in, then updates the snapshot for every object they define.
    /// Collects the Services that changed; true when anything in the snapshot did.
    fn apply(&mut self, edits: &[Edit], changed: &mut BTreeSet<ServiceRef>) -> bool {
        let mut touched = BTreeSet::new();
        for edit in edits {
            for (obj, _) in edit.before.iter().flat_map(|c| c.objects()) {
                if let Some(defs) = self.defs.get_mut(obj) {
                    defs.retain(|d| d.path != edit.path);
                    if defs.is_empty() {
                        self.defs.remove(obj);
                    }
                }
                touched.insert(obj.clone());
            }
        }
        for edit in edits {
            for (obj, index) in edit.after.iter().flat_map(|c| c.objects()) {
                let def = Def {
                    path: edit.path.clone(),
                    index,
                };
                match self.defs.entry(obj.clone()) {
                    // Almost every object has one definition: a vector of exactly one
                    // (a doubling vector's first push reserves four).
                    hash_map::Entry::Vacant(v) => {
                        v.insert(vec![def]);
                    }
                    hash_map::Entry::Occupied(mut o) => {
                        let defs = o.get_mut();
                        let at =
                            defs.partition_point(|d| (&*d.path, d.index) < (&*edit.path, index));
                        defs.insert(at, def);
                    }
                }
                touched.insert(obj.clone());
            }
        }
        let mut visible = false;
        // Services before slices, so that a slice filed under its Service shares the
        // Service's key (see `shared_owner`); each object resolves on its own.
        let is_slice = |o: &&ObjectRef| o.kind == KIND_ENDPOINT_SLICE;
        for obj in touched.iter().filter(|o| !is_slice(o)) {
            visible |= self.resolve(obj, changed);
        }
        for obj in touched.iter().filter(is_slice) {
            visible |= self.resolve(obj, changed);
        }
        visible
    }

    /// Puts the definition of `obj` now in effect (if any) into the snapshot; true when
    /// the snapshot changed. A Service counts as changed when its object, one of its
    /// slices, or where one of those comes from changed.
    fn resolve(&mut self, obj: &ObjectRef, changed: &mut BTreeSet<ServiceRef>) -> bool {
        let defs = self.defs.get(obj).map(Vec::as_slice).unwrap_or_default();
        if defs.len() > 1 {
            self.duplicated.insert(obj.clone());
        } else {
            self.duplicated.remove(obj);
        }
        let winner = defs.first();
        let content = winner.and_then(|d| Some((d, &self.files.get(&*d.path)?.content)));
        let origin = winner.map(|d| &d.path);
        let moved = self.snap.origins.get(obj) != origin;
        match origin {
            Some(path) if moved => {
                self.snap.origins.insert(obj.clone(), path.clone());
            }
            None if moved => {
                self.snap.origins.remove(obj);
            }
            _ => {}
        }
        if obj.kind == KIND_NODE {
            // Nodes change no Service: they only feed L2 announcement.
            let new = content
                .and_then(|(d, c)| c.other.nodes.get(d.index))
                .map(|(_, n)| n);
            let same = match (self.snap.nodes.get(&*obj.name), new) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                _ => false,
            };
            if !same {
                match new {
                    Some(n) => self.snap.nodes.insert(obj.name.to_string(), n.clone()),
                    None => self.snap.nodes.remove(&*obj.name),
                };
            }
            return !same || moved;
        }
        if obj.kind == metallb::KIND_POOL {
            let new = content
                .and_then(|(d, c)| c.other.pools.get(d.index))
                .map(|(_, p)| p);
            return put(&mut self.snap.pools, obj, new) || moved;
        }
        if obj.kind == metallb::KIND_L2_ADVERTISEMENT {
            let new = content
                .and_then(|(d, c)| c.other.l2_adverts.get(d.index))
                .map(|(_, p)| p);
            return put(&mut self.snap.l2_adverts, obj, new) || moved;
        }
        if obj.kind == KIND_SERVICE {
            let key = ServiceRef {
                namespace: obj.namespace.clone(),
                name: obj.name.clone(),
            };
            let new = content
                .and_then(|(d, c)| c.services.get(d.index))
                .map(|(_, s)| s);
            let same = match (self.snap.services.get(&key), new) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                _ => false,
            };
            if !same {
                match new {
                    Some(svc) => self.snap.services.insert(key.clone(), svc.clone()),
                    None => self.snap.services.remove(&key),
                };
            }
            if !same || moved {
                changed.insert(key);
            }
            return !same || moved;
        }
        let new = content
            .and_then(|(d, c)| c.slices.get(d.index))
            .and_then(|(_, s)| Some((self.shared_owner(s)?, s)));
        let old_owner = self.slice_owners.get(obj);
        let old = old_owner.and_then(|o| Some((o, self.snap.slices.get(o)?.get(&obj.name)?)));
        let same = match (old, &new) {
            (None, None) => true,
            (Some((ao, a)), Some((bo, b))) => ao == bo && (Arc::ptr_eq(a, b) || a == *b),
            _ => false,
        };
        if !same {
            if let Some(owner) = self.slice_owners.remove(obj) {
                self.snap.remove_slice(&owner, &obj.name);
                changed.insert(owner);
            }
            if let Some((owner, slice)) = new {
                self.snap.insert_slice_under(owner.clone(), slice.clone());
                self.slice_owners.insert(obj.clone(), owner.clone());
                changed.insert(owner);
            }
        } else if moved && let Some(owner) = old_owner {
            changed.insert(owner.clone());
        }
        !same || moved
    }

    /// The Service `slice` belongs to, as the key of that Service when the snapshot
    /// has it: the snapshot's slice index, `slice_owners` and the change set then hold
    /// one copy of its name, not one per place (at 100 000 Services, 13 MB).
    fn shared_owner(&self, slice: &super::SliceObj) -> Option<ServiceRef> {
        let owner = super::slice_owner(slice)?;
        Some(match self.snap.services.get_key_value(&owner) {
            Some((key, _)) => key.clone(),
            None => owner,
        })
    }

    /// Every problem, in file order: per file its stale-content error, its own errors,
    /// then its duplicate definitions (Services, then slices, each in file order).
    fn errors(&self) -> Vec<SourceError> {
        let mut dups = Vec::new();
        for obj in &self.duplicated {
            let Some((first, later)) = self.defs.get(obj).and_then(|d| d.split_first()) else {
                continue;
            };
            for d in later {
                let reason = format!(
                    "already defined in {}; this definition is ignored",
                    first.path.display()
                );
                let rank = u8::from(obj.kind != KIND_SERVICE);
                dups.push((&*d.path, rank, d.index, obj, reason));
            }
        }
        dups.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        let mut dups = dups.into_iter().peekable();
        let mut out = Vec::new();
        for (path, file) in &self.files {
            out.extend(file.stale.iter().cloned());
            out.extend(file.content.errors.iter().cloned());
            while let Some((_, _, _, obj, reason)) = dups.next_if(|d| d.0 == path) {
                out.push(source_error(path, Some(obj.clone()), reason));
            }
        }
        out
    }
}

/// Puts `new` (or nothing) in `map` at `obj`; true when that changed the map.
fn put<T: PartialEq>(
    map: &mut imbl::OrdMap<ObjectRef, Arc<T>>,
    obj: &ObjectRef,
    new: Option<&Arc<T>>,
) -> bool {
    match (map.get(obj), new) {
        (None, None) => false,
        (Some(a), Some(b)) if Arc::ptr_eq(a, b) || a == b => false,
        (_, Some(b)) => {
            map.insert(obj.clone(), b.clone());
            true
        }
        (Some(_), None) => {
            map.remove(obj);
            true
        }
    }
}

const KIND_SERVICE: &str = "Service";
const KIND_ENDPOINT_SLICE: &str = "EndpointSlice";
const KIND_NODE: &str = "Node";

/// One definition of an object: the file and its position among the file's objects of
/// that kind. The path is shared by every object of the file and by the snapshot's
/// `origins`, not copied per object.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Def {
    path: Arc<Path>,
    index: usize,
}

/// A file whose content changed: `None` for a file that is new, or gone.
struct Edit {
    path: Arc<Path>,
    before: Option<Arc<FileContent>>,
    after: Option<Arc<FileContent>>,
}

// ---------------------------------------------------------------------------------
// The per-file cache

/// Identifies one version of a file without reading it. The inode catches atomic
/// rename-into-place and symlink swaps even when length and mtime happen to match;
/// ctime catches writers that restore the mtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// A file modified within one timestamp tick of our read can change again without
    /// its stamp changing (the "racy git" problem), so its stamp cannot be trusted yet
    /// and the next scan re-reads it. Filesystems that store whole seconds get a wider
    /// window than those with nanoseconds.
    fn is_racy(&self, now: SystemTime) -> bool {
        let window = if self.mtime.1 == 0 {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(100)
        };
        self.modified_within(window, now)
    }

    /// Whether `self` and `other` are one version of one file: a change of mode or owner
    /// moves only the ctime.
    fn same_content_as(&self, other: &Self) -> bool {
        (self.dev, self.ino, self.len, self.mtime) == (other.dev, other.ino, other.len, other.mtime)
    }

    /// Whether the file was modified less than `window` before `now` (or in the future).
    fn modified_within(&self, window: Duration, now: SystemTime) -> bool {
        let Ok(now) = now.duration_since(UNIX_EPOCH) else {
            return true;
        };
        let now_ns = i128::try_from(now.as_nanos()).unwrap_or(i128::MAX);
        let mtime_ns = i128::from(self.mtime.0) * 1_000_000_000 + i128::from(self.mtime.1);
        now_ns - mtime_ns < i128::try_from(window.as_nanos()).unwrap_or(i128::MAX)
    }
}

#[derive(Debug)]
struct CachedFile {
    /// `None` when the file could not be read: it is retried on every scan.
    stamp: Option<Stamp>,
    racy: bool,
    /// Of the bytes last read, to tell a rewrite with equal content from a change.
    hash: u64,
    /// What the file contributes to the snapshot: its last good content when `stale`.
    content: Arc<FileContent>,
    /// Whether `content` came from a version that read and parsed in full (object-level
    /// errors aside): only such content is kept when a later version fails.
    good: bool,
    /// Why the file's current version is not used and `content` is its last good one.
    stale: Option<SourceError>,
    /// `content` keeps objects that a fast read would have withdrawn (see `hold`): read
    /// the file again once it has settled.
    held: bool,
}

/// What one file holds, in file order.
#[derive(Debug, Default, PartialEq)]
struct FileContent {
    services: Vec<(ObjectRef, Arc<super::SvcObj>)>,
    slices: Vec<(ObjectRef, Arc<super::SliceObj>)>,
    errors: Vec<SourceError>,
    /// Boxed: most files hold none, and [`Unusable`] carries a whole `FileContent`.
    other: Box<OtherKinds>,
}

/// The objects of one file that feed no Service directly, in file order: MetalLB's
/// kinds (LB-IPAM) and Nodes (L2 announcement).
#[derive(Debug, Default, PartialEq)]
struct OtherKinds {
    pools: Vec<(ObjectRef, Arc<metallb::IPAddressPool>)>,
    l2_adverts: Vec<(ObjectRef, Arc<metallb::L2Advertisement>)>,
    /// `v1` Nodes (cluster-scoped: their namespace is ignored).
    nodes: Vec<(ObjectRef, Arc<Node>)>,
}

impl FileContent {
    /// Without the slack of the lists grown by pushes: the content is kept until the
    /// file changes (at 100 000 Services the slack was 16 MB).
    fn shrunk(mut self) -> Self {
        self.services.shrink_to_fit();
        self.slices.shrink_to_fit();
        self
    }

    /// Every object with its position among the file's objects of its kind.
    fn objects(&self) -> impl Iterator<Item = (&ObjectRef, usize)> {
        let services = self.services.iter().enumerate().map(|(i, (o, _))| (o, i));
        let slices = self.slices.iter().enumerate().map(|(i, (o, _))| (o, i));
        let pools = self
            .other
            .pools
            .iter()
            .enumerate()
            .map(|(i, (o, _))| (o, i));
        let l2 = self
            .other
            .l2_adverts
            .iter()
            .enumerate()
            .map(|(i, (o, _))| (o, i));
        let nodes = self
            .other
            .nodes
            .iter()
            .enumerate()
            .map(|(i, (o, _))| (o, i));
        services.chain(slices).chain(nodes).chain(pools).chain(l2)
    }
}

fn digest(bytes: &[u8]) -> u64 {
    // Fixed keys: stable for the life of the process, which is all the cache needs.
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// What [`refresh`] needs to know besides the file.
#[derive(Clone, Copy)]
struct Refresh {
    limits: Limits,
    /// What the watch saw of the file (see [`Writers`]).
    trust: Trust,
    settle: Duration,
    withdraw_settle: Duration,
}

/// Why a file's current version cannot be used as a whole.
enum Unusable {
    /// The file could not be stat'ed, opened or read, or is over a limit: nothing of it
    /// is read.
    Unreadable(String),
    /// It parsed only in part: the documents that parsed are used when the file has no
    /// good version yet.
    Partial(FileContent, String),
}

/// Brings one cache entry up to date; returns it and whether the snapshot it
/// contributes changed.
fn refresh(
    path: &Path,
    meta: io::Result<fs::Metadata>,
    old: Option<CachedFile>,
    stats: &mut ScanStats,
    ctx: Refresh,
) -> (CachedFile, bool) {
    let stamp = match meta {
        Ok(meta) => Stamp::of(&meta),
        Err(e) => {
            return fail(
                path,
                old,
                None,
                0,
                Unusable::Unreadable(format!("cannot read the file: {e}")),
            );
        }
    };
    let old = match old {
        Some(old) if old.stamp == Some(stamp) && !old.racy => return (old, false),
        other => other,
    };
    // Seen completed but still fresh: its writer may not be done with it (see `hold`).
    let fast = ctx.trust == Trust::Complete
        && stamp.modified_within(ctx.withdraw_settle, SystemTime::now());
    let wait = match ctx.trust {
        Trust::Busy => true,
        Trust::Complete | Trust::Renamed => false,
        Trust::Unknown => stamp.modified_within(ctx.settle, SystemTime::now()),
    };
    if wait {
        // Half-written, or too fresh to tell: leave everything as it is and look again
        // at a later scan.
        stats.deferred += 1;
        return match old {
            Some(mut old) => {
                old.racy = true;
                (old, false)
            }
            None => (
                CachedFile {
                    stamp: None,
                    racy: true,
                    hash: 0,
                    content: Arc::default(),
                    good: false,
                    stale: None,
                    held: false,
                },
                false,
            ),
        };
    }
    if stamp.len > ctx.limits.max_file_bytes {
        let reason = over_limit(stamp.len, ctx.limits);
        return fail(path, old, Some(stamp), 0, Unusable::Unreadable(reason));
    }
    let bytes = match read_stable(path, stamp, ctx.limits) {
        Ok(bytes) => bytes,
        Err(reason) => return fail(path, old, None, 0, Unusable::Unreadable(reason)),
    };
    stats.read += 1;
    let racy = stamp.is_racy(SystemTime::now());
    let hash = digest(&bytes);
    let (same, old) = match old {
        Some(o) if o.stamp.is_some() && o.hash == hash && !o.held => (Some(o), None),
        other => (None, other),
    };
    if let Some(old) = same {
        // Same bytes as last time: same content, same verdict.
        return (
            CachedFile {
                stamp: Some(stamp),
                racy,
                ..old
            },
            false,
        );
    }
    stats.parsed += 1;
    match parse_file(path, &bytes) {
        Ok(content) => {
            let (content, held) = match &old {
                Some(o) if fast => hold::hold_withdrawals(&o.content, content),
                _ => (content, false),
            };
            if held {
                stats.deferred += 1;
            }
            // Equal content keeps its `Arc`: the snapshot then need not look at it.
            let (content, changed) = match old {
                Some(o) if *o.content == content => (o.content, o.stale.is_some()),
                _ => (Arc::new(content), true),
            };
            tracing::debug!(file = %path.display(), changed, "manifest file parsed");
            (
                CachedFile {
                    stamp: Some(stamp),
                    racy: racy || held,
                    hash,
                    content,
                    good: true,
                    stale: None,
                    held,
                },
                changed,
            )
        }
        Err(unusable) => {
            let (mut file, changed) = fail(path, old, Some(stamp), hash, unusable);
            file.racy = racy;
            (file, changed)
        }
    }
}

/// One listed file to bring up to date (see [`ManifestDir::job`]).
struct Job {
    path: PathBuf,
    meta: io::Result<fs::Metadata>,
    old: Option<CachedFile>,
    /// The content the snapshot has from this file now.
    before: Option<Arc<FileContent>>,
    ctx: Refresh,
}

/// A [`Job`] done: the file's new cache entry and what reading it counted.
struct Done {
    path: PathBuf,
    before: Option<Arc<FileContent>>,
    file: CachedFile,
    changed: bool,
    stats: ScanStats,
}

impl Job {
    /// Whether the file will be read: its stamp is not the one cached.
    fn reads(&self) -> bool {
        match (&self.meta, &self.old) {
            (Ok(meta), Some(old)) => old.racy || old.stamp != Some(Stamp::of(meta)),
            _ => true,
        }
    }

    fn run(self) -> Done {
        let mut stats = ScanStats::default();
        let (file, changed) = refresh(&self.path, self.meta, self.old, &mut stats, self.ctx);
        Done {
            path: self.path,
            before: self.before,
            file,
            changed,
            stats,
        }
    }
}

/// The most threads a scan reads and parses files on.
const SCAN_THREADS: usize = 8;

/// Runs `jobs` and returns what they did in the same order. Reading and parsing is the
/// cost of a scan that finds many changed files (the first one: every file); it runs on
/// every core then, each thread taking the next file, since files differ in size.
/// Parsing is per file, so the results do not depend on the threads.
fn run_jobs(jobs: Vec<Job>) -> Vec<Done> {
    let reads = jobs.iter().filter(|j| j.reads()).count();
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(SCAN_THREADS)
        .min(reads);
    if threads < 2 {
        return jobs.into_iter().map(Job::run).collect();
    }
    let total = jobs.len();
    let queue = Mutex::new(jobs.into_iter().enumerate());
    let take = || {
        // A poisoned queue means a thread panicked, which the scope re-raises.
        queue.lock().ok().and_then(|mut q| q.next())
    };
    let mut slots: Vec<Option<Done>> = std::iter::repeat_with(|| None).take(total).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    while let Some((i, job)) = take() {
                        out.push((i, job.run()));
                    }
                    out
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(out) => {
                    for (i, done) in out {
                        slots[i] = Some(done);
                    }
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    slots.into_iter().flatten().collect()
}

fn over_limit(len: u64, limits: Limits) -> String {
    format!(
        "the file is {len} bytes, over the limit of {} bytes (--max-manifest-bytes); it is not read",
        limits.max_file_bytes
    )
}

/// Reads at most the byte limit, and fails when the file changed while it was read
/// (its stamp before and after differ): the next scan reads it again.
fn read_stable(path: &Path, before: Stamp, limits: Limits) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limits.max_file_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if len > limits.max_file_bytes {
        return Err(over_limit(len, limits));
    }
    let after = fs::metadata(path)
        .map(|m| Stamp::of(&m))
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if after != before || len != before.len {
        return Err("the file changed while it was read".to_owned());
    }
    Ok(bytes)
}

/// A version that cannot be used: keep the last good content when there is one (with an
/// error saying so), else publish what could be parsed (nothing for an unreadable file).
fn fail(
    path: &Path,
    old: Option<CachedFile>,
    stamp: Option<Stamp>,
    hash: u64,
    why: Unusable,
) -> (CachedFile, bool) {
    let (partial, reason) = match why {
        Unusable::Unreadable(reason) => (None, reason),
        Unusable::Partial(content, reason) => (Some(content), reason),
    };
    match old {
        Some(old) if old.good => {
            let stale = SourceError {
                file: Some(path.to_path_buf()),
                object: None,
                reason: format!("{reason}; its last good content stays in effect"),
            };
            let changed = old.stale.as_ref() != Some(&stale);
            tracing::debug!(file = %path.display(), reason, "manifest file kept at its last good content");
            (
                CachedFile {
                    // An unreadable file has no trustworthy stamp: retry every scan.
                    stamp,
                    racy: stamp.is_none(),
                    hash,
                    content: old.content,
                    good: true,
                    stale: Some(stale),
                    held: false,
                },
                changed,
            )
        }
        old => {
            let content = partial.unwrap_or_else(|| FileContent {
                errors: vec![source_error(path, None, reason)],
                ..FileContent::default()
            });
            let (content, changed) = match old {
                Some(o) if *o.content == content => (o.content, o.stale.is_some()),
                _ => (Arc::new(content), true),
            };
            (
                CachedFile {
                    stamp,
                    racy: stamp.is_none(),
                    hash,
                    content,
                    good: false,
                    stale: None,
                    held: false,
                },
                changed,
            )
        }
    }
}

/// Whether a directory entry is a manifest we read.
fn is_manifest_name(name: &str) -> bool {
    let hidden_or_temp = name.starts_with('.') || name.starts_with('#') || name.ends_with('~');
    let ext_ok = [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| name.len() > ext.len() && name.ends_with(ext));
    !hidden_or_temp && ext_ok
}

/// The manifest files of `dir`, sorted by path, each with its metadata (symlinks
/// followed; an error for a dangling link).
fn list_manifests(dir: &Path) -> anyhow::Result<Vec<(PathBuf, io::Result<fs::Metadata>)>> {
    let entries = fs::read_dir(dir)
        .with_context(|| format!("cannot read manifest directory {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry =
            entry.with_context(|| format!("cannot read manifest directory {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            tracing::debug!(file = ?name, "skipping a file name that is not UTF-8");
            continue;
        };
        if !is_manifest_name(name) {
            continue;
        }
        let path = entry.path();
        let meta = fs::metadata(&path);
        if meta.as_ref().is_ok_and(|m| !m.is_file()) {
            continue;
        }
        out.push((path, meta));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

// ---------------------------------------------------------------------------------
// Parsing

fn source_error(path: &Path, object: Option<ObjectRef>, reason: String) -> SourceError {
    SourceError {
        file: Some(path.to_path_buf()),
        object,
        reason,
    }
}

/// Parses one file. `Err` when some part of it could not be parsed (the file is then not
/// used as a whole while it has a good version, see [`fail`]).
fn parse_file(path: &Path, bytes: &[u8]) -> Result<FileContent, Unusable> {
    let mut out = FileContent::default();
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            return Err(Unusable::Unreadable(format!(
                "the file is not UTF-8 text: {e}"
            )));
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let json = path.extension().is_some_and(|e| e == "json");
    if json && let Some(content) = parse_json_fast(text) {
        return Ok(content.shrunk());
    }
    let fatal = if json {
        parse_json(path, text, &mut out)
    } else {
        parse_yaml(path, text, &mut out)
    };
    match fatal {
        None => Ok(out.shrunk()),
        Some(reason) => Err(Unusable::Partial(out, reason)),
    }
}

/// One file's bytes parsed exactly as the directory source parses them, without I/O
/// or the cache: the entry point of the manifest fuzz target (`tests/fuzz`). The file
/// name only chooses JSON (`.json`) or YAML.
#[doc(hidden)]
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Snapshot {
    let content = match parse_file(path, bytes) {
        Ok(content) | Err(Unusable::Partial(content, _)) => content,
        Err(Unusable::Unreadable(reason)) => FileContent {
            errors: vec![source_error(path, None, reason)],
            ..FileContent::default()
        },
    };
    // As `Snapshot::from_lists`: a later object with the same name replaces an earlier one.
    let mut snap = Snapshot {
        errors: Arc::new(content.errors),
        changed: Changed::all(),
        ..Snapshot::default()
    };
    for (_, svc) in content.services {
        snap.services.insert(super::service_ref(&svc), svc);
    }
    for (_, slice) in content.slices {
        snap.insert_slice(slice);
    }
    snap.pools.extend(content.other.pools);
    snap.l2_adverts.extend(content.other.l2_adverts);
    snap
}

/// The fast path for JSON files without any problem, as `kubectl get -o json` writes
/// them: each object is decoded straight from its text into its type, without building a
/// `serde_json::Value` tree first (most of the cost of the general path at 10 000
/// Services). `None` as soon as anything is unusual (a syntax error, an unsupported
/// kind, a field of the wrong type, a missing name, a duplicate key in an object's head);
/// the general path ([`parse_json`]) then reads the whole file again and reports the
/// problem exactly. Both paths agree on every file this one accepts.
fn parse_json_fast(text: &str) -> Option<FileContent> {
    let mut out = FileContent::default();
    for doc in serde_json::Deserializer::from_str(text)
        .into_iter::<Option<wire::MapOnly<wire::AnyWire<'_>>>>()
    {
        let Some(wire::MapOnly(doc)) = doc.ok()? else {
            continue;
        };
        match (doc.api_version.as_str()?, doc.kind.as_str()?) {
            ("v1", "List") => fast_items(&doc.items, None, &mut out)?,
            ("v1", "ServiceList") => fast_items(&doc.items, Some(("v1", KIND_SERVICE)), &mut out)?,
            ("discovery.k8s.io/v1", "EndpointSliceList") => fast_items(
                &doc.items,
                Some(("discovery.k8s.io/v1", KIND_ENDPOINT_SLICE)),
                &mut out,
            )?,
            (api, kind) => fast_object(&doc, api, kind, &mut out)?,
        }
    }
    Some(out)
}

/// The items of a list; `typed` is the apiVersion and kind that a typed list's items
/// may leave out.
fn fast_items(
    items: &Option<Vec<wire::MapOnly<wire::AnyWire<'_>>>>,
    typed: Option<(&str, &str)>,
    out: &mut FileContent,
) -> Option<()> {
    for wire::MapOnly(item) in items.iter().flatten() {
        let (api, kind) = match typed {
            Some((api, kind)) => (item.api_version.or_absent(api)?, item.kind.or_absent(kind)?),
            None => (item.api_version.as_str()?, item.kind.as_str()?),
        };
        fast_object(item, api, kind, out)?;
    }
    Some(())
}

fn fast_object(
    value: &wire::AnyWire<'_>,
    api: &str,
    kind: &str,
    out: &mut FileContent,
) -> Option<()> {
    match (api, kind) {
        ("v1", KIND_SERVICE) => {
            let svc = value.service();
            let object = service_object(&svc)?;
            out.services.push((object, Arc::new(svc)));
        }
        ("discovery.k8s.io/v1", KIND_ENDPOINT_SLICE) => {
            let slice = value.slice()?;
            if slice.name.is_empty() {
                return None;
            }
            let object = ObjectRef {
                kind: ObjectRef::kind_of(KIND_ENDPOINT_SLICE),
                namespace: super::objects::shared_name(&slice.namespace),
                name: (*slice.name).into(),
            };
            out.slices.push((object, Arc::new(slice)));
        }
        _ => return None,
    }
    Some(())
}

/// The Service's reference, sharing its name and namespace (already filled in as
/// [`add_object`] does); `None` without a name.
fn service_object(svc: &super::SvcObj) -> Option<ObjectRef> {
    (!svc.name.is_empty()).then(|| ObjectRef {
        kind: ObjectRef::kind_of(KIND_SERVICE),
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
    })
}

/// A string field of an object's head (`apiVersion`, `kind`), telling a missing field
/// from one of another type.
#[derive(Default)]
enum HeadStr {
    #[default]
    Absent,
    Str(String),
    Other,
}

impl HeadStr {
    fn as_str(&self) -> Option<&str> {
        match self {
            HeadStr::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value, or `default` when the field is missing (not when it is null).
    fn or_absent<'s>(&'s self, default: &'s str) -> Option<&'s str> {
        match self {
            HeadStr::Absent => Some(default),
            other => other.as_str(),
        }
    }
}

impl<'de> serde::Deserialize<'de> for HeadStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match <Value as serde::Deserialize>::deserialize(d)? {
            Value::String(s) => HeadStr::Str(s),
            _ => HeadStr::Other,
        })
    }
}

/// Returns the first error that stopped a value from parsing, if any.
fn parse_json(path: &Path, text: &str, out: &mut FileContent) -> Option<String> {
    let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    for (i, value) in stream.enumerate() {
        match value {
            Ok(value) => add_document(path, &format!("JSON value {}", i + 1), value, out),
            Err(e) => {
                // JSON has no document separators to resynchronise on.
                let reason = format!("invalid JSON: {e}");
                out.errors.push(source_error(path, None, reason.clone()));
                return Some(reason);
            }
        }
    }
    None
}

/// Returns the first error that stopped a document from parsing, if any; the other
/// documents still load.
fn parse_yaml(path: &Path, text: &str, out: &mut FileContent) -> Option<String> {
    let mut n = 0;
    let mut fatal = None;
    for (line, doc) in split_yaml_documents(text) {
        if is_blank_yaml(doc) {
            continue;
        }
        n += 1;
        let loc = format!("document {n} (line {line})");
        match yaml_to_value(doc, line) {
            Ok(value) => add_document(path, &loc, value, out),
            Err(msg) => {
                let reason = format!("{loc}: {msg}");
                out.errors.push(source_error(path, None, reason.clone()));
                fatal.get_or_insert(reason);
            }
        }
    }
    fatal
}

/// Parses one YAML document that starts on line `line` of its file, within a budget
/// proportional to its size: parser events, nodes and alias replays may each reach
/// about the document's length in bytes (plus [`YAML_BUDGET_SLACK`]), so an alias bomb
/// stops after work and memory of the order of its own size. Error positions count from
/// the top of the file, without parsing the document again.
fn yaml_to_value(doc: &str, line: usize) -> Result<Value, String> {
    let budget = doc.len().saturating_add(YAML_BUDGET_SLACK);
    let mut aliases = serde_saphyr::options::AliasLimits::default();
    aliases.max_total_replayed_events = budget;
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: budget,
            max_nodes: budget,
            max_total_scalar_bytes: budget,
        },
        alias_limits: aliases,
        // `.inf` and `.nan` stay text (a JSON value cannot hold them).
        non_finite_float_policy: serde_saphyr::options::NonFiniteFloatPolicy::AsString,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options::<Value>(doc, options).map_err(|e| {
        let rendered = e.render_with_options(serde_saphyr::render_options! {
            line_offset: u64::try_from(line.saturating_sub(1)).unwrap_or(0),
            snippets: serde_saphyr::SnippetMode::Off,
        });
        // The budget and alias-replay errors, by their (stable) message prefixes: the
        // error enum is non-exhaustive and may arrive wrapped.
        let over_budget = ["budget breached", "alias replay"]
            .iter()
            .any(|p| rendered.starts_with(p));
        if over_budget {
            format!(
                "over the YAML budget of {budget} events, nodes and alias expansions for a {}-byte document (an alias bomb?): {rendered}",
                doc.len()
            )
        } else {
            format!("invalid YAML: {rendered}")
        }
    })
}

/// Splits at `---` lines so that one broken document cannot hide the ones after it
/// (the YAML parser stops at its first error). A `---` at the start of a line always
/// starts a document, even inside a block scalar, so this agrees with the parser.
/// Yields each document with its first line number (1-based).
fn split_yaml_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 1, 0);
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if offset > start && is_document_marker(line) {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = i + 1;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

fn is_document_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// Only markers, comments and blank lines: what a trailing `---` leaves behind.
fn is_blank_yaml(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..." || l.starts_with("--- #")
    })
}

fn str_field<'v>(value: &'v Value, key: &str) -> Option<&'v str> {
    value.get(key).and_then(Value::as_str)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The list kinds we unpack.
#[derive(Clone, Copy)]
enum ListKind {
    /// `v1 List`, whose items carry their own apiVersion and kind.
    Untyped,
    /// A typed list, whose items may leave out this apiVersion and kind.
    Of(&'static str, &'static str),
}

fn list_kind(value: &Value) -> Option<ListKind> {
    match (str_field(value, "apiVersion")?, str_field(value, "kind")?) {
        ("v1", "List") => Some(ListKind::Untyped),
        ("v1", "ServiceList") => Some(ListKind::Of("v1", "Service")),
        ("discovery.k8s.io/v1", "EndpointSliceList") => {
            Some(ListKind::Of("discovery.k8s.io/v1", "EndpointSlice"))
        }
        _ => None,
    }
}

fn add_document(path: &Path, loc: &str, value: Value, out: &mut FileContent) {
    let value = match value {
        Value::Null => return,
        value @ Value::Object(_) => value,
        other => {
            let reason = format!(
                "{loc}: expected a Kubernetes object, found {}",
                type_name(&other)
            );
            out.errors.push(source_error(path, None, reason));
            return;
        }
    };
    let Some(list) = list_kind(&value) else {
        add_object(path, loc, value, out);
        return;
    };
    let items = match value {
        Value::Object(mut map) => map.remove("items").unwrap_or(Value::Null),
        _ => Value::Null,
    };
    let items = match items {
        Value::Null => Vec::new(),
        Value::Array(items) => items,
        other => {
            let reason = format!("{loc}: items must be a list, found {}", type_name(&other));
            out.errors.push(source_error(path, None, reason));
            return;
        }
    };
    for (i, mut item) in items.into_iter().enumerate() {
        let loc = format!("{loc}, items[{i}]");
        if let (ListKind::Of(api, kind), Value::Object(map)) = (list, &mut item) {
            // The raw API leaves apiVersion and kind out of typed-list items.
            map.entry("apiVersion").or_insert_with(|| api.into());
            map.entry("kind").or_insert_with(|| kind.into());
        }
        if list_kind(&item).is_some() {
            out.errors.push(source_error(
                path,
                None,
                format!("{loc}: a list inside a list is not supported"),
            ));
            continue;
        }
        add_object(path, &loc, item, out);
    }
}

fn add_object(path: &Path, loc: &str, value: Value, out: &mut FileContent) {
    if !value.is_object() {
        let reason = format!(
            "{loc}: expected a Kubernetes object, found {}",
            type_name(&value)
        );
        out.errors.push(source_error(path, None, reason));
        return;
    }
    let api = str_field(&value, "apiVersion").map(str::to_owned);
    let Some(kind) = str_field(&value, "kind").map(str::to_owned) else {
        out.errors.push(source_error(
            path,
            None,
            format!("{loc}: the object has no kind"),
        ));
        return;
    };
    let meta = value.get("metadata");
    let field = |key| {
        meta.and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let namespace = field("namespace").unwrap_or(DEFAULT_NAMESPACE).to_owned();
    let name = field("name").map(str::to_owned);
    let object = name.map(|name| ObjectRef {
        kind: ObjectRef::kind_of(&kind),
        namespace: namespace.as_str().into(),
        name: name.into(),
    });

    let want = match kind.as_str() {
        "Service" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        KIND_NODE => "v1",
        metallb::KIND_POOL | metallb::KIND_L2_ADVERTISEMENT => metallb::API_VERSION,
        "Endpoints" if api.as_deref() == Some("v1") => {
            let reason = format!(
                "{loc}: v1 Endpoints are not read; write discovery.k8s.io/v1 EndpointSlices instead"
            );
            out.errors.push(source_error(path, object, reason));
            return;
        }
        other => {
            let reason = format!(
                "{loc}: kind {other} (apiVersion {}) is not supported; only v1 Service, v1 \
                 Node, discovery.k8s.io/v1 EndpointSlice and metallb.io/v1beta1 IPAddressPool \
                 and L2Advertisement are read",
                api.as_deref().unwrap_or("missing")
            );
            out.errors.push(source_error(path, object, reason));
            return;
        }
    };
    if api.as_deref() != Some(want) {
        let reason = format!(
            "{loc}: apiVersion {} is not supported for kind {kind} (want {want})",
            api.as_deref().unwrap_or("missing")
        );
        out.errors.push(source_error(path, object, reason));
        return;
    }
    let Some(object) = object else {
        let reason = format!("{loc}: {kind} in namespace {namespace} has no metadata.name");
        out.errors.push(source_error(path, None, reason));
        return;
    };
    let decoded = if kind == KIND_NODE {
        // Cluster-scoped: one Node per name whatever namespace a manifest gives it.
        let object = ObjectRef {
            namespace: "".into(),
            ..object.clone()
        };
        decode::<Node>(value).map(|mut node| {
            node.metadata.namespace = None;
            out.other.nodes.push((object, Arc::new(node)));
        })
    } else if kind == metallb::KIND_POOL {
        decode::<metallb::IPAddressPool>(value).map(|mut pool| {
            pool.metadata.namespace = Some(namespace);
            out.other.pools.push((object.clone(), Arc::new(pool)));
        })
    } else if kind == metallb::KIND_L2_ADVERTISEMENT {
        decode::<metallb::L2Advertisement>(value).map(|mut adv| {
            adv.metadata.namespace = Some(namespace);
            out.other.l2_adverts.push((object.clone(), Arc::new(adv)));
        })
    } else if kind == "Service" {
        // The namespace is filled in as above: the wire types default it the same way.
        decode::<wire::ServiceWire<'_>>(value).map(|svc| {
            out.services.push((object.clone(), Arc::new(svc.to_obj())));
        })
    } else {
        decode::<wire::SliceWire<'_>>(value).map(|slice| {
            out.slices.push((object.clone(), Arc::new(slice.to_obj())));
        })
    };
    if let Err(e) = decoded {
        let reason = format!("{loc}: not a valid {want} {kind}: {e}");
        out.errors.push(source_error(path, Some(object), reason));
    }
}

/// Deserializes with the path of the offending field in the error, e.g.
/// `spec.ports[0].port: invalid type: string "http", expected i32`.
fn decode<'de, T: serde::Deserialize<'de>>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

// ---------------------------------------------------------------------------------
// Watching

/// Identity of the directory itself, to notice it being replaced (its watch would then
/// point at the old inode).
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// Opens, reads and closes are our own reads or plain readers: no change.
fn is_noise(event: &notify::Event) -> bool {
    matches!(event.kind, EventKind::Access(kind) if !matches!(kind, AccessKind::Close(notify::event::AccessMode::Write)))
}

/// Runs one scan off the async threads: parsing a large directory takes a while.
async fn scan_blocking<T: Send + 'static>(
    mut dir: ManifestDir,
    f: impl FnOnce(&mut ManifestDir) -> T + Send + 'static,
) -> anyhow::Result<(ManifestDir, T)> {
    tokio::task::spawn_blocking(move || {
        let out = f(&mut dir);
        (dir, out)
    })
    .await
    .context("the manifest scan task failed")
}

fn log_snapshot(dir: &Path, snap: &Snapshot, stats: ScanStats) {
    // Counting the slices walks every Service: only for a complete snapshot, not on
    // each change.
    let slices = snap.changed.all.then(|| snap.slice_count());
    tracing::info!(
        dir = %dir.display(),
        files = stats.files,
        parsed = stats.parsed,
        removed = stats.removed,
        deferred = stats.deferred,
        services = snap.services.len(),
        slices,
        errors = snap.errors.len(),
        changed_all = snap.changed.all,
        changed_services = snap.changed.services.len(),
        "manifest snapshot"
    );
}

/// Watches `dir` and publishes a complete [`Snapshot`] on `tx`: the first one at once,
/// then one after each change (create, modify, delete, rename, symlink swap). A file
/// event starts a scan at once; events that arrive during a scan are coalesced into
/// the next one. A file whose writer closed it or renamed it into place is read at
/// once (a closed one withdraws only once settled, see `hold`); one still held open by its writer waits for its close (or [`WRITER_IDLE`]);
/// one that changed without such an event (a lost event, a symlink swap) is read once
/// it has not changed for [`SETTLE`]. A rescan every [`RESCAN_INTERVAL`] covers lost
/// events and a replaced directory. Nothing is sent when a scan finds no change.
///
/// Returns `Err` if the first scan fails (the directory cannot be read); later failures
/// are logged and the last snapshot stays in force. Returns `Ok` once every receiver of
/// `tx` is gone.
pub async fn watch(dir: PathBuf, limits: Limits, tx: super::Publisher) -> anyhow::Result<()> {
    // A pending wake-up is all the loop needs to know; capacity 1 coalesces the rest.
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    let writers = Writers::default();
    let seen = writers.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(event) if is_noise(&event) => return,
            Ok(event) => seen.observe(&event),
            Err(e) => {
                seen.lost();
                crate::metrics::watch_restarted("manifests", "error");
                tracing::warn!(error = %e, "manifest directory watch error; rescanning");
            }
        }
        // Full means a rescan is already pending.
        let _ = wake_tx.try_send(());
    })
    .context("cannot create the manifest directory watcher")?;

    // Watch before the first scan, so that no change falls between the two.
    let mut watched = watch_dir(&mut watcher, &dir, None);
    let mut source = ManifestDir::with_limits(&dir, limits);
    source.set_writers(writers.clone());
    let (mut source, first) = scan_blocking(source, |d: &mut ManifestDir| {
        let started = Instant::now();
        let first = d.load();
        // Logged from the scan's own thread, when it ends: the task that publishes the
        // snapshot may wait for the agent's program load to yield, and the full sync's
        // share of the scan is only visible here.
        tracing::info!(
            files = d.stats().files,
            scan_us = started.elapsed().as_micros() as u64,
            "manifest directory scanned"
        );
        first
    })
    .await?;
    let first = first?;
    // Not for the first scan: files that exist when the agent starts are taken as they
    // are, so that its first sync is complete.
    source.set_settle(SETTLE);
    source.set_withdraw_settle(WITHDRAW_SETTLE);
    log_snapshot(&dir, &first, source.stats());
    if tx.publish(first).is_err() {
        return Ok(());
    }

    let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescan.tick().await;
    let mut settle_at: Option<tokio::time::Instant> = None;
    loop {
        let settled = async {
            match settle_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        // Which files to look at: those the events named (and those left for later),
        // or all of them after a timer or lost events.
        let mut everything = true;
        tokio::select! {
            () = tx.closed() => return Ok(()),
            // The files left for later are in the next scan of named paths.
            () = settled => everything = false,
            // No debounce: a file seen complete is read at once, and a burst's later
            // events wake the next scan, which reads only what changed.
            Some(()) = wake_rx.recv() => everything = false,
            _ = rescan.tick() => {
                let now = dir_identity(&dir);
                if now.is_some() && now != watched {
                    watched = watch_dir(&mut watcher, &dir, watched);
                }
            }
        }
        let dirty = if everything {
            None
        } else {
            writers.take_dirty()
        };
        let (next, result) = scan_blocking(source, move |d: &mut ManifestDir| match dirty {
            Some(paths) => d.reload_paths(&paths),
            None => d.reload(),
        })
        .await?;
        source = next;
        if source.stats().changed {
            // A file turning stale (or back) changes the snapshot's errors.
            crate::metrics::set_manifest_files_stale(source.stale_files());
        }
        // Files left for later are looked at again once they may have settled; one
        // still held open by its writer is woken by its close event as well. A timer
        // already running is kept, so that events do not push it back for ever.
        settle_at = match settle_at {
            _ if source.stats().deferred == 0 => None,
            Some(t) if t > tokio::time::Instant::now() => Some(t),
            _ => Some(tokio::time::Instant::now() + SETTLE),
        };
        match result {
            Ok(Some(snap)) => {
                if tx.publish(snap.clone()).is_err() {
                    return Ok(());
                }
                // After the publish: the agent syncs while this logs.
                log_snapshot(&dir, &snap, source.stats());
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(
                    dir = %dir.display(),
                    error = %format!("{e:#}"),
                    "cannot rescan the manifest directory; keeping the last snapshot"
                );
            }
        }
    }
}

/// (Re)starts watching `dir` and returns the identity now watched. `previous` is the
/// identity watched so far, if any. On failure only the periodic rescan notices
/// changes; the next tick tries again.
fn watch_dir(
    watcher: &mut notify::RecommendedWatcher,
    dir: &Path,
    previous: Option<(u64, u64)>,
) -> Option<(u64, u64)> {
    let id = dir_identity(dir)?;
    if previous.is_some() {
        // The old watch follows the old inode; it may already be gone with it.
        let _ = watcher.unwatch(dir);
        crate::metrics::watch_restarted("manifests", "replaced");
        tracing::info!(dir = %dir.display(), "manifest directory replaced; watching the new one");
    }
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(id),
        Err(e) => {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot watch the manifest directory; changes show up at the next periodic rescan"
            );
            None
        }
    }
}

mod hold;
mod wire;

#[cfg(test)]
mod tests;
