//! Describing a replica for a difference mirror: each entry's metadata, and per-block hashes
//! of regular files.
//!
//! Files are opened through [`Beneath`], so even a listing cannot be steered outside the
//! replica by a symlink.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use doppel_fs::meta::Meta;
use doppel_fs::walk::walk;
use doppel_fs::{Beneath, Selection};
use doppel_proto::{Entry, EntryKind, ListScope, RelPath};
use rustix::fs::OFlags;

/// Builds the entry for `path` from its metadata, hashing it if it is a regular file.
pub fn entry_for(root: &Beneath, path: &RelPath, meta: &Meta) -> io::Result<Entry> {
    let mut blocks = Vec::new();
    let mut link_target = Vec::new();
    match meta.kind {
        EntryKind::File => {
            let mut f = File::from(root.open_at(path, OFlags::RDONLY, 0)?);
            blocks = doppel_fs::hash::hash_file(&mut f)?.0;
        }
        EntryKind::Symlink => {
            let (dir, name) = root.parent(path)?;
            link_target = rustix::fs::readlinkat(&dir, name, Vec::new())?.into_bytes();
        }
        _ => {}
    }
    let xattrs = match meta.kind {
        EntryKind::File | EntryKind::Dir => {
            doppel_fs::xattr::read_fd(root.open_at(path, OFlags::PATH, 0)?.as_fd())?
        }
        _ => Vec::new(),
    };
    Ok(Entry {
        path: path.to_wire(),
        kind: meta.kind,
        size: if meta.kind == EntryKind::File { meta.size } else { 0 },
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime,
        link_target,
        link_group: (meta.kind == EntryKind::File && meta.nlink > 1).then_some(meta.ino),
        blocks,
        xattrs,
    })
}

/// Lists `scope` of the tree beneath `root`, calling `emit` for each entry in walk order
/// (the root itself included for [`ListScope::All`]). Paths in a [`ListScope::Paths`] that
/// are invalid or absent are skipped.
pub fn list(
    root: &Beneath,
    scope: &ListScope,
    emit: &mut dyn FnMut(Entry) -> io::Result<()>,
) -> io::Result<()> {
    match scope {
        ListScope::All => walk(root.path(), &RelPath::root(), &Selection::all(), &mut |e| {
            match entry_for(root, &e.path, &e.meta) {
                Ok(entry) => emit(entry),
                // Gone between the walk and the hash: the entry simply does not exist.
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(err),
            }
        }),
        ListScope::Paths(paths) => {
            for w in paths {
                let Ok(path) = RelPath::try_from(w) else { continue };
                let fd = match root.open_at(&path, OFlags::PATH, 0) {
                    Ok(fd) => fd,
                    Err(e) if e.kind() == io::ErrorKind::NotFound || doppel_fs::beneath::is_escape(&e) => {
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let meta = Meta::from_stat(&rustix::fs::fstat(&fd)?);
                emit(entry_for(root, &path, &meta)?)?;
            }
            Ok(())
        }
    }
}
