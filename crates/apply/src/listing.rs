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
        first_block: 0,
        blocks,
        xattrs,
    })
}

/// Block hashes per listing entry: a file with more blocks (more than 4 GiB) is described by
/// several consecutive entries with increasing `first_block`, so no message grows unbounded.
pub const BLOCKS_PER_ENTRY: usize = 1 << 16;

/// Emits `e`, split into pieces of at most `per` blocks.
fn emit_split(mut e: Entry, per: usize, emit: &mut dyn FnMut(Entry) -> io::Result<()>) -> io::Result<()> {
    if e.blocks.len() <= per {
        return emit(e);
    }
    let blocks = std::mem::take(&mut e.blocks);
    let base = e.first_block;
    for (i, chunk) in blocks.chunks(per).enumerate() {
        let mut piece = e.clone();
        piece.first_block = base + (i * per) as u64;
        piece.blocks = chunk.to_vec();
        emit(piece)?;
    }
    Ok(())
}

/// Lists `scope` of the tree beneath `root`, calling `emit` for each entry in walk order
/// (the root itself included for [`ListScope::All`]). Paths in a [`ListScope::Paths`] that
/// are invalid or absent are skipped.
pub fn list(
    root: &Beneath,
    scope: &ListScope,
    emit: &mut dyn FnMut(Entry) -> io::Result<()>,
) -> io::Result<()> {
    list_in_pieces(root, scope, BLOCKS_PER_ENTRY, emit)
}

/// [`list`], with big files split into pieces of `per` blocks.
pub fn list_in_pieces(
    root: &Beneath,
    scope: &ListScope,
    per: usize,
    emit: &mut dyn FnMut(Entry) -> io::Result<()>,
) -> io::Result<()> {
    match scope {
        ListScope::All => walk(root.path(), &RelPath::root(), &Selection::all(), &mut |e| {
            match entry_for(root, &e.path, &e.meta) {
                Ok(entry) => emit_split(entry, per, emit),
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
                emit_split(entry_for(root, &path, &meta)?, per, emit)?;
            }
            Ok(())
        }
        ListScope::Ranges(ranges) => {
            for (w, offset, len) in ranges {
                let Ok(path) = RelPath::try_from(w) else { continue };
                match range_entry(root, &path, *offset, *len) {
                    Ok(Some(e)) => emit_split(e, per, emit)?,
                    Ok(None) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound || doppel_fs::beneath::is_escape(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }
}

/// The entry of a regular file with the hashes of the blocks covering `offset..offset+len`
/// (`None` if `path` is not a regular file).
fn range_entry(root: &Beneath, path: &RelPath, offset: u64, len: u64) -> io::Result<Option<Entry>> {
    use std::os::unix::fs::FileExt;
    let f = File::from(root.open_at(path, OFlags::RDONLY, 0)?);
    let meta = Meta::from_stat(&rustix::fs::fstat(&f)?);
    if meta.kind != EntryKind::File {
        return Ok(None);
    }
    let bs = doppel_proto::BLOCK_SIZE;
    let first = offset / bs;
    let last = (offset + len.max(1) - 1) / bs;
    let mut blocks = Vec::new();
    let mut buf = vec![0u8; bs as usize];
    for i in first..=last {
        let at = i * bs;
        if at >= meta.size {
            break;
        }
        let n = (bs.min(meta.size - at)) as usize;
        f.read_exact_at(&mut buf[..n], at)?;
        blocks.push(doppel_proto::hash_block(&buf[..n]));
    }
    Ok(Some(Entry {
        path: path.to_wire(),
        kind: EntryKind::File,
        size: meta.size,
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime,
        link_target: Vec::new(),
        link_group: None,
        first_block: first,
        blocks,
        xattrs: Vec::new(),
    }))
}
