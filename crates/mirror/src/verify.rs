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
use crate::index::Index;
use crate::reconcile::Reconciler;

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
fn privileged_only(a: &Attrs, e: &Entry) -> bool {
    let mode = a.mode.is_none_or(|m| (m ^ e.mode) & 0o7777 & !SETID == 0);
    let plain = |x: &[Xattr]| x.iter().filter(|x| !privileged_xattr(x)).cloned().collect::<Vec<_>>();
    let xattrs = a.xattrs.as_ref().is_none_or(|x| plain(x) == plain(&e.xattrs));
    mode && xattrs && a.mtime.is_none_or(|t| t == e.mtime)
}

/// An entry's metadata, without its block hashes (not needed to compare attributes).
fn without_blocks(e: &Entry) -> Entry {
    Entry { blocks: Vec::new(), ..e.clone() }
}

/// Compares the tree at `root` with a replica `listing`. Returns the report and the names that
/// differ.
pub fn compare(
    root: &Path,
    selection: Selection,
    listing: Vec<Entry>,
    guard: Option<std::sync::Arc<dyn crate::reconcile::Guard>>,
) -> Result<(VerifyReport, Vec<RelPath>), MirrorError> {
    compare_with(root, selection, listing, guard, Default::default())
}

/// [`compare`], reporting how far it has come into `tree` (its job's, so the job's status
/// shows the verify's progress).
pub fn compare_with(
    root: &Path,
    selection: Selection,
    listing: Vec<Entry>,
    guard: Option<std::sync::Arc<dyn crate::reconcile::Guard>>,
    tree: std::sync::Arc<crate::reconcile::TreeProgress>,
) -> Result<(VerifyReport, Vec<RelPath>), MirrorError> {
    let mut rec = Reconciler::new(root, selection, Index::new()).with_tree_progress(tree);
    if let Some(g) = guard {
        rec = rec.with_guard(g);
    }
    let on_replica: BTreeMap<WirePath, Entry> =
        listing.iter().filter(|e| e.first_block == 0).map(|e| (e.path.clone(), without_blocks(e))).collect();
    rec.seed_all(listing);
    let mut ops: Vec<Op> = Vec::new();
    rec.sync_tree(&RelPath::root(), &mut ops)?;
    rec.finish(&mut ops)?;
    let stats = rec.stats();
    let mut per_path: BTreeMap<WirePath, Vec<&'static str>> = BTreeMap::new();
    let mut written: BTreeMap<WirePath, u64> = BTreeMap::new();
    for op in &ops {
        let (path, what) = match op {
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Mknod { path, .. } => (path, "missing on the replica"),
            Op::Link { path, .. } => (path, "hard link missing on the replica"),
            Op::Unlink { path } | Op::Rmdir { path } => (path, "only on the replica"),
            Op::Write { path, data, .. } => {
                *written.entry(path.clone()).or_default() += data.len() as u64;
                (path, "content differs")
            }
            Op::Truncate { path, .. } => (path, "size differs"),
            Op::SetAttr { path, attrs }
                if on_replica.get(path).is_some_and(|e| privileged_only(attrs, e)) =>
            {
                (path, PRIVILEGED)
            }
            Op::SetAttr { path, .. } => (path, "attributes differ"),
            Op::Rename { to, .. } => (to, "name differs"),
            Op::Fsync { .. } | Op::Fallocate { .. } | Op::Point { .. } => continue,
        };
        let v = per_path.entry(path.clone()).or_default();
        if !v.contains(&what) {
            v.push(what);
        }
    }
    let mut differences = Vec::new();
    let mut paths = Vec::new();
    for (path, whats) in per_path {
        let mut what = whats.join(", ");
        // A name removed and created again differs in type; attribute changes of a name
        // created here are part of creating it.
        if whats.contains(&"only on the replica") && whats.contains(&"missing on the replica") {
            what = "type differs".into();
        } else if whats.contains(&"missing on the replica") {
            what = "missing on the replica".into();
        }
        if let Some(n) = written.get(&path) {
            what = what.replace("content differs", &format!("content differs ({n} bytes)"));
        }
        let name = if path.0.is_empty() { ".".to_string() } else { path.display() };
        differences.push(Difference { path: name, what });
        if let Ok(p) = RelPath::try_from(&path) {
            paths.push(p);
        }
    }
    let report = VerifyReport {
        entries_compared: stats.entries_seen.load(Ordering::Relaxed),
        bytes_compared: stats.bytes_hashed.load(Ordering::Relaxed),
        differences,
        repaired: Vec::new(),
    };
    Ok((report, paths))
}
