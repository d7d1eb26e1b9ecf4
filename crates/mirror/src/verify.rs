//! Verify: the comparison a difference mirror makes, without changing anything.
//!
//! A fresh reconciler seeded with the replica's listing compares the whole source tree with
//! it; the ops it would emit are exactly the differences, which are then described per name.
//! Repair is the same comparison run by the job's own reconciler for just those names.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use doppel_fs::Selection;
use doppel_proto::{Attrs, Entry, Op, RelPath, WirePath, Xattr};
use serde::{Deserialize, Serialize};

use crate::error::MirrorError;
use crate::index::{Index, IndexEntry, REPLICA_GROUP, Snapshot};
use crate::reconcile::{OpSink, Reconciler};

/// One name that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// The name (`.` for the root).
    pub path: String,
    /// What differs, in words.
    pub what: String,
}

/// The result of a comparison.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Names compared.
    pub entries_compared: u64,
    /// Bytes of source content hashed.
    pub bytes_compared: u64,
    /// Names that differ.
    pub differences: Vec<Difference>,
    /// Names whose repair was queued.
    pub repaired: Vec<String>,
    /// Names found differing for which a repair had nothing to send: they stay as they are.
    #[serde(default)]
    pub unrepaired: Vec<String>,
}

/// How a difference in privileged attributes only is described: a target whose privilege
/// policy strips them (`doppel_apply::privilege`) keeps them so on purpose, and the source
/// cannot tell that policy from damage, so it names the likely cause instead of alarming.
pub const PRIVILEGED: &str = "privileged attributes differ (the target's privilege policy strips these)";

/// Set-uid and set-gid bits.
const SETID: u32 = 0o6000;

/// Whether an attribute's name is one a target's privilege policy may strip (the same
/// namespaces as `doppel_apply::privilege::xattr_privilege`).
fn privileged_xattr(x: &Xattr) -> bool {
    [&b"security."[..], b"trusted.", b"system."].iter().any(|ns| x.name.starts_with(ns))
}

/// Whether setting `a` on the replica's entry `e` would change only privileged parts: set-id
/// bits, owners, privileged attributes.
fn privileged_only(a: &Attrs, e: &IndexEntry) -> bool {
    let mode = a.mode.is_none_or(|m| (m ^ e.mode) & 0o7777 & !SETID == 0);
    let plain = |x: &[Xattr]| x.iter().filter(|x| !privileged_xattr(x)).cloned().collect::<Vec<_>>();
    let xattrs = a.xattrs.as_ref().is_none_or(|x| plain(x) == plain(&e.xattrs));
    mode && xattrs && a.mtime.is_none_or(|t| t == e.mtime)
}

/// Whether setting `a` on the replica's entry `e` would change nothing but its times.
fn times_only(a: &Attrs, e: &IndexEntry) -> bool {
    a.mode.is_none_or(|m| (m ^ e.mode) & 0o7777 == 0)
        && a.uid.is_none_or(|u| u == e.uid)
        && a.gid.is_none_or(|g| g == e.gid)
        && a.xattrs.as_ref().is_none_or(|x| *x == e.xattrs)
}

/// The names that differ, as [`compare`] found them, each with what the replica holds there:
/// what [`repair`] seeds the job's index with before comparing them again.
#[derive(Debug, Default)]
pub struct Differing {
    /// Each name that differs, with the replica's entry (`None`: nothing there).
    pub names: Vec<(RelPath, Option<IndexEntry>)>,
    /// The replica's other names of the files among them that have several there. They share
    /// the damage (one inode), and the index must say so: left describing the source, they
    /// look sound, and the damaged name would be "repaired" by linking it to them again.
    pub linked: Vec<(RelPath, IndexEntry)>,
}

impl Differing {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Adds `path`, with the replica's entry from `replica` and the replica's other names of
    /// that entry's inode.
    fn add(&mut self, path: RelPath, replica: &Snapshot) -> Result<(), MirrorError> {
        let on_replica = replica.get(&path)?;
        if let Some(group) = on_replica.as_ref().map(|e| e.ino).filter(|i| i & REPLICA_GROUP != 0) {
            for other in replica.names_of(group)? {
                let known = other == path
                    || self.names.iter().any(|(p, _)| *p == other)
                    || self.linked.iter().any(|(p, _)| *p == other);
                if let Some(e) = replica.get(&other)?.filter(|_| !known) {
                    self.linked.push((other, e));
                }
            }
        }
        self.linked.retain(|(p, _)| *p != path);
        self.names.push((path, on_replica));
        Ok(())
    }
}

/// Brings the names of `differing` in line through the job's reconciler `rec`: its index
/// learns what the replica holds at each of them (and at the replica's other names of their
/// files), then they are compared again, and the round finished. Returns the names no op was
/// emitted for: their difference was found, yet nothing would change it.
pub fn repair(
    rec: &mut Reconciler,
    differing: &Differing,
    sink: &mut dyn OpSink,
) -> Result<Vec<RelPath>, MirrorError> {
    let seeds = differing.names.iter().map(|(p, e)| (p, e.as_ref()));
    for (p, on_replica) in seeds.chain(differing.linked.iter().map(|(p, e)| (p, Some(e)))) {
        rec.index.remove(p)?;
        if let Some(e) = on_replica {
            rec.index.insert(p, e)?;
        }
    }
    let mut touched = Touched { sink, paths: Default::default() };
    for (p, _) in &differing.names {
        rec.sync_entry(p, &mut touched)?;
    }
    for (p, _) in &differing.linked {
        rec.sync_entry(p, &mut touched)?;
    }
    // Directories' times are settled here.
    rec.finish(&mut touched)?;
    let mut untouched = Vec::new();
    for (p, on_replica) in &differing.names {
        // Gone from the source since it was compared: absent on both sides now.
        let gone = on_replica.is_none() && rec.index.get(p)?.is_none();
        if !touched.paths.contains(&p.to_wire()) && !gone {
            untouched.push(p.clone());
        }
    }
    Ok(untouched)
}

/// Passes ops on, noting the names they act on.
struct Touched<'a> {
    sink: &'a mut dyn OpSink,
    paths: std::collections::BTreeSet<WirePath>,
}

impl OpSink for Touched<'_> {
    fn emit(&mut self, op: Op) -> Result<(), MirrorError> {
        if let Some(p) = op.path() {
            self.paths.insert(p.clone());
        }
        self.sink.emit(op)
    }
}

/// Compares the tree at `root` with a replica `listing`. Returns the report and the names that
/// differ.
pub fn compare(
    root: &Path,
    selection: Selection,
    listing: impl IntoIterator<Item = Entry>,
    guard: Option<std::sync::Arc<dyn crate::reconcile::Guard>>,
) -> Result<(VerifyReport, Differing), MirrorError> {
    let scratch = std::env::temp_dir();
    compare_with(root, selection, listing, guard, Default::default(), &scratch)
}

/// Takes the ops a comparison would emit and keeps only what they say differs, per name:
/// nothing grows with the tree or with the bytes that differ.
#[derive(Default)]
struct Differences {
    per_path: BTreeMap<WirePath, Vec<&'static str>>,
    written: BTreeMap<WirePath, u64>,
    /// Attribute changes, judged once the comparison is over (privileged only or not).
    attrs: Vec<(WirePath, Attrs)>,
}

impl OpSink for Differences {
    fn emit(&mut self, op: Op) -> Result<(), MirrorError> {
        let (path, what) = match op {
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Mknod { path, .. } => (path, "missing on the replica"),
            Op::Link { path, .. } => (path, "hard link missing on the replica"),
            Op::Unlink { path } | Op::Rmdir { path } => (path, "only on the replica"),
            Op::Write { path, data, .. } => {
                *self.written.entry(path.clone()).or_default() += data.len() as u64;
                (path, "content differs")
            }
            Op::Truncate { path, .. } => (path, "size differs"),
            Op::SetAttr { path, attrs } => {
                self.attrs.push((path.clone(), attrs));
                (path, "attributes differ")
            }
            Op::Rename { to, .. } => (to, "name differs"),
            Op::Fsync { .. } | Op::Fallocate { .. } | Op::Point { .. } => return Ok(()),
        };
        let v = self.per_path.entry(path).or_default();
        if !v.contains(&what) {
            v.push(what);
        }
        Ok(())
    }
}

impl Differences {
    /// Names whose only difference is privileged attributes (judged against the replica's
    /// entries as the listing gave them) say so.
    ///
    /// The attributes sent after a file's content are the content's own modification time:
    /// where nothing else of them differs, the content's difference says it all.
    fn judge_privileged(&mut self, replica: &Snapshot) -> Result<(), MirrorError> {
        for (path, attrs) in std::mem::take(&mut self.attrs) {
            let Ok(p) = RelPath::try_from(&path) else { continue };
            let Some(e) = replica.get(&p)? else { continue };
            let Some(v) = self.per_path.get_mut(&path) else { continue };
            let content = v.iter().any(|w| *w == "content differs" || *w == "size differs");
            if content && times_only(&attrs, &e) {
                v.retain(|w| *w != "attributes differ");
            } else if privileged_only(&attrs, &e)
                && let Some(w) = v.iter_mut().find(|w| **w == "attributes differ")
            {
                *w = PRIVILEGED;
            }
        }
        Ok(())
    }
}

/// [`compare`], reporting how far it has come into `tree` (its job's, so the job's status
/// shows the verify's progress), with its throwaway index in a directory beneath `scratch`.
pub fn compare_with(
    root: &Path,
    selection: Selection,
    listing: impl IntoIterator<Item = Entry>,
    guard: Option<std::sync::Arc<dyn crate::reconcile::Guard>>,
    tree: std::sync::Arc<crate::reconcile::TreeProgress>,
    scratch: &Path,
) -> Result<(VerifyReport, Differing), MirrorError> {
    let index = Index::scratch_in(scratch, crate::index::DEFAULT_CACHE_BYTES)?;
    let mut rec = Reconciler::new(root, selection, index).with_tree_progress(tree);
    if let Some(g) = guard {
        rec = rec.with_guard(g);
    }
    rec.seed_all(listing)?;
    let replica = rec.index.snapshot()?;
    let mut diff = Differences::default();
    rec.sync_tree(&RelPath::root(), &mut diff)?;
    rec.finish(&mut diff)?;
    diff.judge_privileged(&replica)?;
    let stats = rec.stats();
    let mut differences = Vec::new();
    let mut differing = Differing::default();
    for (path, whats) in diff.per_path {
        let mut what = whats.join(", ");
        // A name removed and created again differs in type; attribute changes of a name
        // created here are part of creating it.
        if whats.contains(&"only on the replica") && whats.contains(&"missing on the replica") {
            what = "type differs".into();
        } else if whats.contains(&"missing on the replica") {
            // Made again over what the replica has there: a symlink pointing elsewhere.
            let there = RelPath::try_from(&path).ok().map(|p| replica.get(&p)).transpose()?.flatten();
            what = match there.map(|e| e.kind) {
                Some(doppel_proto::EntryKind::Symlink) => "link target differs".into(),
                Some(_) => "type differs".into(),
                None => "missing on the replica".into(),
            };
        }
        if let Some(n) = diff.written.get(&path) {
            what = what.replace("content differs", &format!("content differs ({n} bytes)"));
        }
        let name = if path.0.is_empty() { ".".to_string() } else { path.display() };
        differences.push(Difference { path: name, what });
        if let Ok(p) = RelPath::try_from(&path) {
            differing.add(p, &replica)?;
        }
    }
    let report = VerifyReport {
        entries_compared: stats.entries_seen.load(Ordering::Relaxed),
        bytes_compared: stats.bytes_hashed.load(Ordering::Relaxed),
        differences,
        ..Default::default()
    };
    Ok((report, differing))
}
