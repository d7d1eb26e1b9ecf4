//! The reconciler: brings the replica (as the index describes it) in line with the source.
//!
//! Invariant: the index always describes the replica as it will be once every op emitted so
//! far is applied. Every method keeps it, so any sequence of calls converges: events only
//! decide *which* names get looked at and whether a rename can be sent as a rename.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use doppel_fs::readahead::ReadAhead;
use doppel_fs::{Meta, Selection};
use doppel_proto::{Attrs, Entry, EntryKind, Op, RelPath, RenameFlags};

use crate::error::MirrorError;
use crate::index::{Index, IndexEntry, walk_order};
use crate::prehash::Prehashed;

mod file;

/// Anything held as a lock guard.
pub trait Held {}
impl<T> Held for T {}

/// Locks to take while reading a tree that applications are changing under a `fuse` capture
/// mount: without them a block could be read half-written while its write op is sequenced
/// before the mirror's, and the replica would keep the torn copy.
pub trait Guard: Send + Sync {
    /// Held while one name is compared and its ops emitted.
    fn entry(&self) -> Box<dyn Held + '_>;
    /// Held while one block of the file `(dev, ino)` is read and its op emitted.
    fn file(&self, dev: u64, ino: u64) -> Box<dyn Held + '_>;
    /// Whether the file `(dev, ino)`, just opened, may be read as the source's content. The vm
    /// capture vouches only for QEMU's live views of the guest's disks: a view whose export
    /// vanished uncovers the empty file beneath it, which read as the disk would empty the
    /// replica's image.
    fn vouch(&self, _dev: u64, _ino: u64) -> Result<(), String> {
        Ok(())
    }
    /// Whether the source's file times are its own. QEMU's FUSE export of a disk answers
    /// every `stat` with the current time: there a file's mtime goes to the replica only with
    /// the content it came with (created, or written), and a differing mtime alone is no
    /// difference (verify called every such replica different once a second had passed).
    fn times_kept(&self) -> bool {
        true
    }
}

/// Where emitted ops go (the spool, or a report for verify).
pub trait OpSink {
    /// Takes one op.
    fn emit(&mut self, op: Op) -> Result<(), MirrorError>;
}

impl OpSink for Vec<Op> {
    fn emit(&mut self, op: Op) -> Result<(), MirrorError> {
        self.push(op);
        Ok(())
    }
}

/// Running totals, shared with status and progress displays while a long mirror runs.
#[derive(Debug, Default)]
pub struct ReconcileStats {
    /// Names examined.
    pub entries_seen: AtomicU64,
    /// Regular files read and hashed.
    pub files_hashed: AtomicU64,
    /// Bytes read and hashed.
    pub bytes_hashed: AtomicU64,
    /// Regular files taken as equal without being read: the other side vouched for their
    /// content and their size and modification time match ([`IndexEntry::vouched_same`]).
    pub files_vouched: AtomicU64,
    /// Ops emitted.
    pub ops: AtomicU64,
    /// Payload bytes in emitted ops.
    pub bytes_emitted: AtomicU64,
    /// The whole-tree comparison under way, for progress displays (shared with a verify's
    /// reconciler, so the job's status shows that comparison too).
    pub tree: Arc<TreeProgress>,
}

/// How far the whole-tree comparison under way (a difference mirror, a verify, a local scan)
/// has come: the regular files and bytes its walk found, and how many of them were compared.
/// Bytes count as compared when read and hashed, or at once when a file's metadata shows it
/// unchanged.
#[derive(Debug, Default)]
pub struct TreeProgress {
    running: AtomicBool,
    counted: AtomicBool,
    files: AtomicU64,
    bytes: AtomicU64,
    files_done: AtomicU64,
    bytes_done: AtomicU64,
}

/// A look at a [`TreeProgress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeCounts {
    /// Regular files and their bytes in the tree (`None` while the walk still counts them).
    pub total: Option<(u64, u64)>,
    /// Regular files compared so far.
    pub files_done: u64,
    /// Bytes of them compared so far.
    pub bytes_done: u64,
}

impl TreeProgress {
    /// The comparison under way, if one is.
    pub fn get(&self) -> Option<TreeCounts> {
        if !self.running.load(Ordering::Acquire) {
            return None;
        }
        let total = self
            .counted
            .load(Ordering::Acquire)
            .then(|| (self.files.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed)));
        Some(TreeCounts {
            total,
            files_done: self.files_done.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
        })
    }

    fn start(&self) {
        self.counted.store(false, Ordering::Release);
        for c in [&self.files, &self.bytes, &self.files_done, &self.bytes_done] {
            c.store(0, Ordering::Relaxed);
        }
        self.running.store(true, Ordering::Release);
    }

    fn counted(&self, files: u64, bytes: u64) {
        self.files.store(files, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        self.counted.store(true, Ordering::Release);
    }

    fn add_bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    fn file_done(&self) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        self.running.store(false, Ordering::Release);
    }
}

/// Ends the tree's progress when dropped (errors included).
struct TreeRun(Arc<TreeProgress>);

impl Drop for TreeRun {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl ReconcileStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Reconciles one job's tree.
pub struct Reconciler {
    root: PathBuf,
    selection: Selection,
    /// The job's index.
    pub index: Index,
    touched_dirs: BTreeSet<RelPath>,
    /// Parents of names looked at: their times are compared with the index when a round
    /// finishes. A name created and removed between two looks leaves no op behind, yet it
    /// moved its directory's mtime.
    recheck_dirs: BTreeSet<RelPath>,
    needs_scan: BTreeSet<RelPath>,
    /// Bytes of the file being compared counted in the tree's progress (`None`: not in a
    /// whole-tree comparison).
    tree_bytes: Option<u64>,
    stats: Arc<ReconcileStats>,
    guard: Option<Arc<dyn Guard>>,
    /// The source's files hashed while the replica was listed, for the comparison that follows.
    prehashed: Option<Prehashed>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MirrorError + '_ {
    move |source| MirrorError::Io { path: path.to_path_buf(), source }
}

/// Whether an lstat error means "not there (any more)".
fn vanished(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

impl Reconciler {
    /// A reconciler for the tree at `root` with the given index.
    pub fn new(root: &Path, selection: Selection, index: Index) -> Reconciler {
        Reconciler {
            root: root.to_path_buf(),
            selection,
            index,
            touched_dirs: BTreeSet::new(),
            recheck_dirs: BTreeSet::new(),
            needs_scan: BTreeSet::new(),
            tree_bytes: None,
            stats: Arc::default(),
            guard: None,
            prehashed: None,
        }
    }

    /// Takes `guard`'s locks while reading (for trees under a capture mount).
    pub fn with_guard(mut self, guard: Arc<dyn Guard>) -> Reconciler {
        self.guard = Some(guard);
        self
    }

    /// Reports whole-tree comparisons into `tree` (a verify's into its job's).
    pub fn with_tree_progress(mut self, tree: Arc<TreeProgress>) -> Reconciler {
        self.stats = Arc::new(ReconcileStats { tree, ..ReconcileStats::default() });
        self
    }

    /// Takes blocks from `prehashed` (the source's files hashed while the replica was listed)
    /// instead of reading unchanged files whole; `None` once the comparison is over.
    pub fn set_prehashed(&mut self, prehashed: Option<Prehashed>) {
        self.prehashed = prehashed;
    }

    /// The guard, if any.
    pub fn guard(&self) -> Option<Arc<dyn Guard>> {
        self.guard.clone()
    }

    /// The running totals.
    pub fn stats(&self) -> Arc<ReconcileStats> {
        self.stats.clone()
    }

    /// The source tree's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The job's selection rules.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    pub(crate) fn emit(&mut self, sink: &mut dyn OpSink, op: Op) -> Result<(), MirrorError> {
        ReconcileStats::add(&self.stats.ops, 1);
        ReconcileStats::add(&self.stats.bytes_emitted, op.data_len() as u64);
        if op.changes_names()
            && let Some(p) = op.path()
            && let Ok(p) = RelPath::try_from(p)
            && let Some((parent, _)) = p.split_last()
        {
            self.touched_dirs.insert(parent);
        }
        if let Op::Rename { from, .. } = &op
            && let Ok(p) = RelPath::try_from(from)
            && let Some((parent, _)) = p.split_last()
        {
            self.touched_dirs.insert(parent);
        }
        sink.emit(op)
    }

    fn lstat(&self, path: &RelPath) -> Result<Option<Meta>, MirrorError> {
        let full = self.root.join(path.as_path());
        match Meta::lstat(&full) {
            Ok(m) => Ok(Some(m)),
            Err(e) if vanished(&e) => Ok(None),
            Err(e) => Err(io_err(&full)(e)),
        }
    }

    /// Brings the single name `path` in line: creates, updates, replaces or removes it. A
    /// directory that is new to the replica is scanned in full.
    pub fn sync_entry(&mut self, path: &RelPath, sink: &mut dyn OpSink) -> Result<(), MirrorError> {
        self.recheck_parent(path);
        let is_new_dir = self.sync_path(path, sink)?;
        if is_new_dir && self.index.get(path)?.is_some() {
            self.sync_tree(path, sink)?;
        }
        Ok(())
    }

    /// Whether `path` is on the replica but gone from the source together with its parent
    /// directory: an ancestor was removed or renamed, and the event that says which may not
    /// have been read yet. Syncing it now would delete it from the replica, and if the ancestor
    /// was renamed, the rename then carries the subtree without it while the name (and the
    /// change that made it dirty) lives on at the new path on the source.
    pub fn orphaned(&self, path: &RelPath) -> Result<bool, MirrorError> {
        let Some((parent, _)) = path.split_last() else { return Ok(false) };
        if self.lstat(path)?.is_some() || self.index.get(path)?.is_none() {
            return Ok(false);
        }
        Ok(!self.lstat(&parent)?.is_some_and(|m| m.kind == EntryKind::Dir))
    }

    /// Has the parent directory of `path` compared with the index when the round finishes.
    fn recheck_parent(&mut self, path: &RelPath) {
        if let Some((parent, _)) = path.split_last() {
            self.recheck_dirs.insert(parent);
        }
    }

    /// Looks at `path` now (under the guard) and syncs it; returns whether it was a directory
    /// new to the replica.
    fn sync_path(&mut self, path: &RelPath, sink: &mut dyn OpSink) -> Result<bool, MirrorError> {
        let guard = self.guard.clone();
        let _held = guard.as_ref().map(|g| g.entry());
        let meta = self.lstat(path)?;
        let is_new_dir = meta.is_some_and(|m| m.kind == EntryKind::Dir)
            && !self.index.get(path)?.is_some_and(|e| e.kind == EntryKind::Dir);
        self.sync_with(path, meta, sink)?;
        Ok(is_new_dir)
    }

    /// Brings the whole subtree at `path` in line: every selected name on the source is
    /// synced, every indexed name no longer on the source (or no longer selected) is removed.
    ///
    /// One pass merges the source's walk with the index (both in walk order), so neither
    /// side is held in memory: a name the index has and the walk passed by is gone.
    pub fn sync_tree(&mut self, path: &RelPath, sink: &mut dyn OpSink) -> Result<(), MirrorError> {
        self.recheck_parent(path);
        // The whole tree's comparison reports its progress; the root is compared only so.
        let whole = path.is_root() && self.tree_bytes.is_none();
        let _run = whole.then(|| {
            self.stats.tree.start();
            TreeRun(self.stats.tree.clone())
        });
        let (root, selection) = (self.root.clone(), self.selection.clone());
        let done = AtomicBool::new(false);
        let tree = self.stats.tree.clone();
        // With nothing indexed beneath it (a first comparison, a directory moved in), every
        // file is read: read them ahead of the comparison.
        let ahead = (!self.index.has_children(path)?).then(ReadAhead::new);
        std::thread::scope(|s| {
            if whole {
                // Counting runs beside the comparison, so a progress display learns the total
                // without the comparison waiting for a walk of its own.
                s.spawn(|| count_tree(&root, &selection, &tree, &done));
            }
            // Finished however the comparison ends (a panic too), or the scope waits forever.
            let _finish = ahead.as_ref().map(|a| {
                let spawned =
                    std::thread::Builder::new().name("read-ahead".into()).spawn_scoped(s, || a.run());
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "no thread to read ahead of the comparison");
                }
                a.finish_on_drop()
            });
            let r = self.merge_tree(&root, path, &selection, whole, ahead.as_ref(), sink);
            done.store(true, Ordering::Relaxed);
            r
        })
    }

    /// The merge of [`Reconciler::sync_tree`].
    fn merge_tree(
        &mut self,
        root: &Path,
        path: &RelPath,
        selection: &Selection,
        whole: bool,
        ahead: Option<&ReadAhead>,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        let mut indexed = Merge::new(path);
        let mut failed = None;
        let walked = doppel_fs::walk::walk_reading_ahead(root, path, selection, ahead, &mut |e| {
            let r = self.gone_before(&mut indexed, Some(&e.path), sink).and_then(|()| {
                let size = (e.meta.kind == EntryKind::File).then_some(e.meta.size);
                self.sync_walked(&e.path, size, whole, sink)
            });
            r.map_err(|err| {
                failed = Some(err);
                io::Error::other("comparison stopped")
            })
        });
        if let Some(err) = failed {
            return Err(err);
        }
        walked.map_err(io_err(&root.join(path.as_path())))?;
        self.gone_before(&mut indexed, None, sink)
    }

    /// Looks again at the indexed names the walk has passed by (before `until`, or all that
    /// are left): gone from the source, unless a live mount brought them back meanwhile.
    fn gone_before(
        &mut self,
        indexed: &mut Merge,
        until: Option<&RelPath>,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        while let Some(p) = indexed.next_before(&self.index, until)? {
            if self.index.get(&p)?.is_some() {
                self.sync_path(&p, sink)?;
            }
        }
        Ok(())
    }

    /// Syncs one name the walk found, counting it in the tree's progress.
    fn sync_walked(
        &mut self,
        p: &RelPath,
        size: Option<u64>,
        whole: bool,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        ReconcileStats::add(&self.stats.entries_seen, 1);
        if whole {
            self.tree_bytes = Some(0);
        }
        let r = self.sync_path(p, sink);
        if let Some(read) = self.tree_bytes.take().filter(|_| whole) {
            // What was not read (unchanged, linked, shrunk) counts as compared now.
            if let Some(size) = size {
                self.stats.tree.add_bytes(size.saturating_sub(read));
                self.stats.tree.file_done();
            }
        }
        r.map(|_| ())
    }

    /// Syncs `path` given its current metadata (`None`: absent). Never scans directories.
    fn sync_with(
        &mut self,
        path: &RelPath,
        meta: Option<Meta>,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        let meta = meta.filter(|m| self.selection.selects(path, m.kind == EntryKind::Dir));
        let mut old = self.index.get(path)?;
        let Some(meta) = meta else {
            if old.is_some() {
                self.remove(path, sink)?;
            }
            return Ok(());
        };
        if let Some(o) = &old
            && (o.kind != meta.kind || (path.is_root() && o.kind != EntryKind::Dir))
        {
            self.remove(path, sink)?;
            old = None;
        }
        if let Some(o) = &old
            && o.unchanged(&meta)
        {
            return Ok(());
        }
        if !path.is_root() && !self.ensure_parent(path, sink)? {
            return Ok(());
        }
        if let Some(o) = old.as_ref().filter(|o| o.vouched_same(&meta) && self.guard.is_none()) {
            return self.adopt_vouched(path, o, &meta, sink);
        }
        match meta.kind {
            EntryKind::Dir => self.sync_dir(path, old, &meta, sink),
            EntryKind::File => self.sync_file(path, old, &meta, sink),
            EntryKind::Symlink => self.sync_symlink(path, old, &meta, sink),
            EntryKind::Fifo | EntryKind::Other => self.sync_special(path, old, &meta, sink),
        }
    }

    /// Makes sure the parent directory of `path` exists on the replica, creating missing
    /// ancestors (which are then scanned later). Returns false if the source parent is gone.
    fn ensure_parent(&mut self, path: &RelPath, sink: &mut dyn OpSink) -> Result<bool, MirrorError> {
        let Some((parent, _)) = path.split_last() else { return Ok(true) };
        if parent.is_root() || self.index.get(&parent)?.is_some_and(|e| e.kind == EntryKind::Dir) {
            return Ok(true);
        }
        let Some(meta) = self.lstat(&parent)?.filter(|m| m.kind == EntryKind::Dir) else {
            return Ok(false);
        };
        if !self.ensure_parent(&parent, sink)? {
            return Ok(false);
        }
        if self.index.get(&parent)?.is_some() {
            self.remove(&parent, sink)?;
        }
        self.emit(sink, Op::Mkdir { path: parent.to_wire(), mode: meta.mode })?;
        let mut e = IndexEntry::from_meta(&meta);
        // Attributes are settled when the directory itself is synced by the scan below.
        e.mtime = Default::default();
        self.index.insert(&parent, &e)?;
        self.needs_scan.insert(parent);
        Ok(true)
    }

    fn sync_dir(
        &mut self,
        path: &RelPath,
        old: Option<IndexEntry>,
        meta: &Meta,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        if old.is_none() && !path.is_root() {
            self.emit(sink, Op::Mkdir { path: path.to_wire(), mode: meta.mode })?;
        }
        let mut e = IndexEntry::from_meta(meta);
        self.sync_attrs(path, old.as_ref(), meta, &mut e, false, sink)?;
        // The directory's mtime moves with every name created in it: settle it last.
        if old.as_ref().is_none_or(|o| o.mtime != meta.mtime) {
            self.touched_dirs.insert(path.clone());
        }
        self.index.insert(path, &e)?;
        Ok(())
    }

    fn sync_symlink(
        &mut self,
        path: &RelPath,
        old: Option<IndexEntry>,
        meta: &Meta,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        let full = self.root.join(path.as_path());
        let target = match std::fs::read_link(&full) {
            Ok(t) => t.into_os_string().into_encoded_bytes(),
            Err(e) if vanished(&e) => return Ok(()),
            Err(e) => return Err(io_err(&full)(e)),
        };
        let changed = old.as_ref().is_none_or(|o| o.link_target != target);
        if changed {
            self.emit(sink, Op::Symlink { path: path.to_wire(), target: target.clone() })?;
        }
        let mut e = IndexEntry::from_meta(meta);
        e.link_target = target;
        let old = if changed { None } else { old };
        self.sync_attrs(path, old.as_ref(), meta, &mut e, changed, sink)?;
        self.index.insert(path, &e)?;
        Ok(())
    }

    fn sync_special(
        &mut self,
        path: &RelPath,
        old: Option<IndexEntry>,
        meta: &Meta,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        let full = self.root.join(path.as_path());
        let ft = std::fs::symlink_metadata(&full).map(|m| {
            use std::os::unix::fs::FileTypeExt;
            let t = m.file_type();
            if t.is_fifo() {
                Some(libc_mode::FIFO)
            } else if t.is_socket() {
                Some(libc_mode::SOCK)
            } else if t.is_char_device() {
                Some(libc_mode::CHR)
            } else if t.is_block_device() {
                Some(libc_mode::BLK)
            } else {
                None
            }
        });
        let Ok(Some(ft)) = ft else {
            tracing::debug!(%path, "vanished, or of a type with no name");
            return Ok(());
        };
        if old.is_none() {
            // Device nodes go as they are: the target's privilege policy decides (by default
            // it refuses them, and lists the name as not replicated).
            let rdev = if ft == libc_mode::CHR || ft == libc_mode::BLK { meta.rdev } else { 0 };
            self.emit(sink, Op::Mknod { path: path.to_wire(), mode: ft | meta.mode, rdev })?;
        }
        let mut e = IndexEntry::from_meta(meta);
        self.sync_attrs(path, old.as_ref(), meta, &mut e, false, sink)?;
        self.index.insert(path, &e)?;
        Ok(())
    }

    /// Emits the attribute changes between `old` (None: a name just created on the replica)
    /// and the source, and records the source's values in `e`.
    pub(crate) fn sync_attrs(
        &mut self,
        path: &RelPath,
        old: Option<&IndexEntry>,
        meta: &Meta,
        e: &mut IndexEntry,
        content_changed: bool,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        let mut a = Attrs::default();
        let is_link = meta.kind == EntryKind::Symlink;
        let created = old.is_none();
        // A new name gets its mode again after its owner: changing the owner clears set-id bits.
        if !is_link && old.is_none_or(|o| o.mode != meta.mode) {
            a.mode = Some(meta.mode);
        }
        if created || old.is_some_and(|o| o.uid != meta.uid || o.gid != meta.gid) {
            a.uid = Some(meta.uid);
            a.gid = Some(meta.gid);
        }
        if matches!(meta.kind, EntryKind::File | EntryKind::Dir) {
            let full = self.root.join(path.as_path());
            e.xattrs = match doppel_fs::xattr::read_all(&full) {
                Ok(x) => x,
                Err(err) if vanished(&err) => Vec::new(),
                Err(err) => return Err(io_err(&full)(err)),
            };
            let before: &[doppel_proto::Xattr] = old.map(|o| &o.xattrs[..]).unwrap_or(&[]);
            if e.xattrs != before {
                a.xattrs = Some(e.xattrs.clone());
            }
        }
        let times_kept = self.guard.as_ref().is_none_or(|g| g.times_kept());
        if meta.kind != EntryKind::Dir
            && (created || content_changed || (times_kept && old.is_some_and(|o| o.mtime != meta.mtime)))
        {
            a.mtime = Some(meta.mtime);
        }
        if !a.is_empty() {
            self.emit(sink, Op::SetAttr { path: path.to_wire(), attrs: a })?;
        }
        Ok(())
    }

    /// Removes `path` and everything beneath it from the replica (deepest first).
    pub fn remove(&mut self, path: &RelPath, sink: &mut dyn OpSink) -> Result<(), MirrorError> {
        loop {
            let batch = self.index.last_paths(path, 1024)?;
            if batch.is_empty() {
                break;
            }
            for p in batch {
                let Some(e) = self.index.remove(&p)? else { continue };
                let op = if e.kind == EntryKind::Dir {
                    Op::Rmdir { path: p.to_wire() }
                } else {
                    Op::Unlink { path: p.to_wire() }
                };
                if p.is_root() {
                    continue;
                }
                self.emit(sink, op)?;
            }
        }
        self.touched_dirs.remove(path);
        Ok(())
    }

    /// Sends a rename observed on the source as a rename, if the index allows it (the old
    /// name is on the replica, the new name can take it). Returns false when the caller must
    /// fall back to syncing both names.
    pub fn rename(
        &mut self,
        from: &RelPath,
        to: &RelPath,
        sink: &mut dyn OpSink,
    ) -> Result<bool, MirrorError> {
        let Some(old) = self.index.get(from)? else { return Ok(false) };
        if from == to || to.starts_with(from) || from.is_root() || to.is_root() {
            return Ok(false);
        }
        if !self.selection.selects(to, old.kind == EntryKind::Dir) {
            return Ok(false);
        }
        if let Some(dest) = self.index.get(to)? {
            let dest_is_dir = dest.kind == EntryKind::Dir;
            if dest_is_dir != (old.kind == EntryKind::Dir) || (dest_is_dir && self.index.has_children(to)?) {
                return Ok(false);
            }
        }
        if !self.ensure_parent(to, sink)? {
            return Ok(false);
        }
        self.emit(
            sink,
            Op::Rename { from: from.to_wire(), to: to.to_wire(), flags: RenameFlags::default() },
        )?;
        self.index.rename_subtree(from, to)?;
        // A rename moves the ctime of what moved; nothing else about it changed.
        if let Some(meta) = self.lstat(to)? {
            self.index.update(to, |e| {
                if e.ino == meta.ino
                    && e.mtime == meta.mtime
                    && (e.kind != EntryKind::File || e.size == meta.size)
                {
                    e.ctime = meta.ctime;
                }
            })?;
        }
        Ok(true)
    }

    /// Finishes a round of changes: scans directories created on the way, then sets the
    /// modification times of directories whose contents changed (on the replica, by the ops
    /// emitted, or on the source, as the parents of names looked at may show).
    pub fn finish(&mut self, sink: &mut dyn OpSink) -> Result<(), MirrorError> {
        while let Some(dir) = self.needs_scan.pop_first() {
            self.sync_tree(&dir, sink)?;
        }
        let touched = std::mem::take(&mut self.touched_dirs);
        let mut dirs = std::mem::take(&mut self.recheck_dirs);
        dirs.extend(touched.iter().cloned());
        let guard = self.guard.clone();
        for dir in dirs {
            let _held = guard.as_ref().map(|g| g.entry());
            let Some(e) = self.index.get(&dir)? else { continue };
            if e.kind != EntryKind::Dir {
                continue;
            }
            let indexed = e.mtime;
            let Some(meta) = self.lstat(&dir)?.filter(|m| m.kind == EntryKind::Dir) else { continue };
            // Untouched by any op, the replica's directory still has the time the index
            // records: only a different time on the source needs sending.
            if !touched.contains(&dir) && meta.mtime == indexed {
                continue;
            }
            let op = Op::SetAttr {
                path: dir.to_wire(),
                attrs: Attrs { mtime: Some(meta.mtime), ..Attrs::default() },
            };
            ReconcileStats::add(&self.stats.ops, 1);
            sink.emit(op)?;
            self.index.update(&dir, |e| {
                e.mtime = meta.mtime;
                e.ctime = meta.ctime;
            })?;
        }
        Ok(())
    }

    /// Replaces the whole index by what a replica listing describes (before a difference
    /// mirror of the whole tree).
    pub fn seed_all(&mut self, listing: impl IntoIterator<Item = Entry>) -> Result<(), MirrorError> {
        self.index.clear()?;
        listing.into_iter().try_for_each(|e| self.index.seed(&e))
    }

    /// Replaces the index entries of `paths` by what a listing of them describes (absent
    /// from the listing: absent from the replica).
    pub fn seed_paths(
        &mut self,
        paths: &[RelPath],
        listing: impl IntoIterator<Item = Entry>,
    ) -> Result<(), MirrorError> {
        for p in paths {
            self.index.remove(p)?;
        }
        listing.into_iter().try_for_each(|e| self.index.seed(&e))
    }

    /// Names that may differ from the index: new, changed or removed since it was recorded,
    /// or modified so close to `saved_at_us` that their timestamps cannot tell (the "racy"
    /// entries of git's index). Used after a crash, when the index may be behind the replica.
    pub fn suspects(&self, saved_at_us: u64) -> Result<Vec<RelPath>, MirrorError> {
        let mut out = Vec::new();
        let mut indexed = Merge::new(&RelPath::root());
        let mut failed = None;
        let walked = doppel_fs::walk::walk(&self.root, &RelPath::root(), &self.selection, &mut |w| {
            let r = (|| {
                // Indexed names the walk passed by are gone from the source.
                while let Some(p) = indexed.next_before(&self.index, Some(&w.path))? {
                    out.push(p);
                }
                let suspect = !self.index.get(&w.path)?.is_some_and(|e| e.settled(&w.meta, saved_at_us));
                if suspect {
                    out.push(w.path);
                }
                Ok(())
            })();
            r.map_err(|err: MirrorError| {
                failed = Some(err);
                io::Error::other("comparison stopped")
            })
        });
        if let Some(err) = failed {
            return Err(err);
        }
        walked.map_err(io_err(&self.root))?;
        while let Some(p) = indexed.next_before(&self.index, None)? {
            out.push(p);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

impl Reconciler {
    /// Makes the index describe the tree's names by their current stat fields, keeping the
    /// block hashes of entries whose stat shows no change since they were recorded (those
    /// still describe the file): what a stopped `fuse` job keeps, to find at its next start
    /// the names changed while nothing captured them, and for a failback to vouch for the
    /// files it did not write (see the agent's failback). The tree is walked at `root` (the
    /// reconciler's own root may reach it through a mount that is gone).
    pub fn restat_index(&mut self, root: &Path) -> Result<(), MirrorError> {
        let mut indexed = Merge::new(&RelPath::root());
        let mut failed = None;
        let selection = self.selection.clone();
        let index = &mut self.index;
        let walked = doppel_fs::walk::walk(root, &RelPath::root(), &selection, &mut |w| {
            let r = (|| {
                while let Some(gone) = indexed.next_before(index, Some(&w.path))? {
                    index.remove(&gone)?;
                }
                if !index.get(&w.path)?.is_some_and(|e| e.unchanged(&w.meta)) {
                    index.insert(&w.path, &IndexEntry::from_meta(&w.meta))?;
                }
                Ok(())
            })();
            r.map_err(|err: MirrorError| {
                failed = Some(err);
                io::Error::other("the index store failed")
            })
        });
        if let Some(err) = failed {
            return Err(err);
        }
        walked.map_err(io_err(root))?;
        while let Some(gone) = indexed.next_before(index, None)? {
            index.remove(&gone)?;
        }
        Ok(())
    }
}

/// The index's side of a merge with a tree walk: the indexed names of one subtree in walk
/// order, read from the store a chunk at a time.
struct Merge {
    tree: RelPath,
    chunk: VecDeque<RelPath>,
    /// The last name read from the store (`None`: none yet).
    read_to: Option<RelPath>,
    exhausted: bool,
}

impl Merge {
    const CHUNK: usize = 256;

    fn new(tree: &RelPath) -> Merge {
        Merge { tree: tree.clone(), chunk: VecDeque::new(), read_to: None, exhausted: false }
    }

    /// The next indexed name that sorts before `until` (all of them when `None`); the name
    /// `until` itself is passed over. Names are read ahead: the caller checks that a name is
    /// still indexed (changes made meanwhile only remove names ahead of the walk, or add names
    /// at or before it).
    fn next_before(
        &mut self,
        index: &Index,
        until: Option<&RelPath>,
    ) -> Result<Option<RelPath>, MirrorError> {
        loop {
            if self.chunk.is_empty() && !self.exhausted {
                let more = index.first_paths(&self.tree, self.read_to.as_ref(), Self::CHUNK)?;
                self.exhausted = more.len() < Self::CHUNK;
                self.read_to = more.last().cloned().or(self.read_to.take());
                self.chunk.extend(more);
            }
            let Some(front) = self.chunk.front() else { return Ok(None) };
            match until.map(|u| walk_order(front, u)) {
                None | Some(std::cmp::Ordering::Less) => return Ok(self.chunk.pop_front()),
                Some(std::cmp::Ordering::Equal) => {
                    self.chunk.pop_front();
                }
                Some(std::cmp::Ordering::Greater) => return Ok(None),
            }
        }
    }
}

/// Counts the regular files and bytes of the tree into `tree`'s progress (stops early once
/// `done`).
fn count_tree(root: &Path, selection: &Selection, tree: &TreeProgress, done: &AtomicBool) {
    let (mut files, mut bytes) = (0u64, 0u64);
    let walked = doppel_fs::walk::walk(root, &RelPath::root(), selection, &mut |e| {
        if done.load(Ordering::Relaxed) {
            return Err(io::Error::other("comparison over"));
        }
        if e.meta.kind == EntryKind::File {
            files += 1;
            bytes += e.meta.size;
        }
        Ok(())
    });
    if walked.is_ok() {
        tree.counted(files, bytes);
    }
}

mod libc_mode {
    pub const FIFO: u32 = 0o010000;
    pub const CHR: u32 = 0o020000;
    pub const BLK: u32 = 0o060000;
    pub const SOCK: u32 = 0o140000;
}

#[cfg(test)]
mod tests;
