//! Deterministic tree walks.
//!
//! Both ends of a difference mirror walk their trees; visiting names in the same (bytewise)
//! order lets results be compared and reports read the same on every run. A walk stays on the
//! root's file system (mount points inside the tree are skipped, as `rsync -x` does) because
//! capture watches one file system per job.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use doppel_proto::{EntryKind, RelPath};

use crate::meta::Meta;
use crate::readahead::ReadAhead;
use crate::select::Selection;

/// One visited entry.
#[derive(Debug, Clone)]
pub struct WalkEntry {
    /// Path relative to the walk's root.
    pub path: RelPath,
    /// Its metadata (from `lstat`).
    pub meta: Meta,
}

/// Walks the subtree `start` of the tree at `root` in pre-order (a directory before its
/// contents; names in bytewise order), calling `visit` for every selected entry, `start`
/// included. Entries that vanish during the walk are skipped; so are names that are not valid
/// [`RelPath`] components (logged).
pub fn walk(
    root: &Path,
    start: &RelPath,
    selection: &Selection,
    visit: &mut dyn FnMut(WalkEntry) -> io::Result<()>,
) -> io::Result<()> {
    walk_reading_ahead(root, start, selection, None, visit)
}

/// [`walk`], telling `ahead` what each directory holds and each name the walk reaches, so it
/// can read the files ahead of the visits that read them.
pub fn walk_reading_ahead(
    root: &Path,
    start: &RelPath,
    selection: &Selection,
    ahead: Option<&ReadAhead>,
    visit: &mut dyn FnMut(WalkEntry) -> io::Result<()>,
) -> io::Result<()> {
    let meta = match Meta::lstat(&root.join(start.as_path())) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let walk = Walk { root, root_dev: Meta::lstat(root)?.dev, selection, ahead };
    walk.inner(WalkEntry { path: start.clone(), meta }, visit)
}

struct Walk<'a> {
    root: &'a Path,
    root_dev: u64,
    selection: &'a Selection,
    ahead: Option<&'a ReadAhead>,
}

impl Walk<'_> {
    fn inner(&self, entry: WalkEntry, visit: &mut dyn FnMut(WalkEntry) -> io::Result<()>) -> io::Result<()> {
        let is_dir = entry.meta.kind == EntryKind::Dir;
        if !entry.path.is_root() && !self.selection.selects(&entry.path, is_dir) {
            return Ok(());
        }
        if is_dir && entry.meta.dev != self.root_dev {
            tracing::debug!(path = %entry.path, "skipping mount point");
            return Ok(());
        }
        let path = entry.path.clone();
        visit(entry)?;
        if !is_dir {
            return Ok(());
        }
        let dir = self.root.join(path.as_path());
        let Some(names) = self.list(&dir)? else { return Ok(()) };
        for name in names {
            if let Some(a) = self.ahead {
                a.reached();
            }
            self.child(&path, &name, visit)?;
        }
        Ok(())
    }

    /// The names in `dir`, sorted (`None`: it is gone), told to the read-ahead.
    fn list(&self, dir: &Path) -> io::Result<Option<Vec<Vec<u8>>>> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        };
        let mut names: Vec<(Vec<u8>, bool)> = Vec::new();
        for de in rd {
            match de {
                // The entry's type costs nothing (no stat) where the file system records it.
                Ok(de) => names
                    .push((de.file_name().as_bytes().to_vec(), de.file_type().is_ok_and(|t| t.is_file()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        names.sort_unstable();
        if let Some(a) = self.ahead {
            // Only a walk that reads ahead copies its names.
            a.listed(dir, names.clone());
        }
        Ok(Some(names.into_iter().map(|(n, _)| n).collect()))
    }

    fn child(
        &self,
        path: &RelPath,
        name: &[u8],
        visit: &mut dyn FnMut(WalkEntry) -> io::Result<()>,
    ) -> io::Result<()> {
        let child = match path.join(name) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(dir = %path, error = %e, "skipping an entry whose name cannot be replicated");
                return Ok(());
            }
        };
        let meta = match Meta::lstat(&self.root.join(child.as_path())) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if self.selection.excluded_here(&child, meta.kind == EntryKind::Dir) {
            return Ok(());
        }
        self.inner(WalkEntry { path: child, meta }, visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_preorder_with_selection() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("b/c")).unwrap();
        std::fs::create_dir_all(r.join("skip")).unwrap();
        std::fs::write(r.join("b/c/f"), b"x").unwrap();
        std::fs::write(r.join("a"), b"x").unwrap();
        std::fs::write(r.join("b/x.tmp"), b"x").unwrap();
        std::fs::write(r.join("skip/f"), b"x").unwrap();
        std::os::unix::fs::symlink("nowhere", r.join("l")).unwrap();
        let sel = Selection::new(&[], &["*.tmp".into(), "skip/".into()]).unwrap();
        let mut seen = Vec::new();
        walk(r, &RelPath::root(), &sel, &mut |e| {
            seen.push(e.path.to_string());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [".", "a", "b", "b/c", "b/c/f", "l"]);
    }
}
