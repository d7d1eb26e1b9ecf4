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
use doppel_proto::{BLOCK_SIZE, BlockHash, Entry, EntryKind, ListScope, RelPath};
use rustix::fs::OFlags;

/// What a lister may already know of a regular file's blocks, so that it need not read the
/// file: the source side of a failback knows its tree from its agent's index.
pub trait KnownBlocks: Send + Sync + std::fmt::Debug {
    /// The block hashes of the regular file `path`, whose metadata is now `meta`, when they
    /// are known to describe it exactly and the side the listing goes to last received
    /// exactly this content (the entries are then [`Entry::vouched`]); `None` to read it.
    fn blocks(&self, path: &RelPath, meta: &Meta) -> Option<Vec<BlockHash>>;
}

/// Emits the entries of `path`: one, with its metadata (and a symlink's target, and
/// attributes); a regular file's block hashes go with it, split over consecutive entries of at
/// most `per` blocks with increasing `first_block`, hashed piece by piece (so no entry, and no
/// memory, grows with the file) and without reading its holes, unless `known` knows them.
fn entries_for(
    root: &Beneath,
    path: &RelPath,
    meta: &Meta,
    per: usize,
    known: Option<&dyn KnownBlocks>,
    emit: &mut dyn FnMut(Entry) -> io::Result<()>,
) -> io::Result<()> {
    let mut link_target = Vec::new();
    if meta.kind == EntryKind::Symlink {
        let (dir, name) = root.parent(path)?;
        link_target = rustix::fs::readlinkat(&dir, name, Vec::new())?.into_bytes();
    }
    let xattrs = match meta.kind {
        EntryKind::File | EntryKind::Dir => {
            doppel_fs::xattr::read_fd(root.open_at(path, OFlags::PATH, 0)?.as_fd())?
        }
        _ => Vec::new(),
    };
    let base = Entry {
        link_target,
        link_group: (meta.kind == EntryKind::File && meta.nlink > 1).then_some(meta.ino),
        xattrs,
        ..bare_entry(path, meta)
    };
    if meta.kind != EntryKind::File {
        return emit(base);
    }
    let count = meta.size.div_ceil(BLOCK_SIZE);
    if let Some(blocks) = known.and_then(|k| k.blocks(path, meta)).filter(|b| b.len() as u64 == count) {
        return known_pieces(Entry { vouched: true, ..base }, blocks, per, emit);
    }
    let f = File::from(root.open_at(path, OFlags::RDONLY, 0)?);
    hashed_pieces(&f, base, 0, count, per, emit)
}

/// Emits `base` with `blocks` (known, not read), in pieces of at most `per` blocks (at least
/// one entry, even for no blocks).
fn known_pieces(
    base: Entry,
    blocks: Vec<BlockHash>,
    per: usize,
    emit: &mut dyn FnMut(Entry) -> io::Result<()>,
) -> io::Result<()> {
    let per = per.max(1);
    if blocks.len() <= per {
        return emit(Entry { blocks, ..base });
    }
    for (i, piece) in blocks.chunks(per).enumerate() {
        emit(Entry { first_block: (i * per) as u64, blocks: piece.to_vec(), ..base.clone() })?;
    }
    Ok(())
}

/// The entry of `path` with its metadata only: no link target, link group, attributes or
/// block hashes.
fn bare_entry(path: &RelPath, meta: &Meta) -> Entry {
    Entry {
        path: path.to_wire(),
        kind: meta.kind,
        size: if meta.kind == EntryKind::File { meta.size } else { 0 },
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime,
        link_target: Vec::new(),
        link_group: None,
        first_block: 0,
        blocks: Vec::new(),
        xattrs: Vec::new(),
        vouched: false,
    }
}

/// Emits `base` with the hashes of `count` blocks of `f` from block `first`, in pieces of at
/// most `per` blocks (at least one entry, even for no blocks).
fn hashed_pieces(
    f: &File,
    base: Entry,
    first: u64,
    count: u64,
    per: usize,
    emit: &mut dyn FnMut(Entry) -> io::Result<()>,
) -> io::Result<()> {
    let per = per.max(1) as u64;
    let mut at = first;
    let end = first + count;
    loop {
        let n = per.min(end - at);
        let mut blocks = Vec::with_capacity(n as usize);
        doppel_fs::hash::hash_blocks_sparse(f, base.size, at, n, |h| {
            blocks.push(h);
            Ok(())
        })?;
        emit(Entry { first_block: at, blocks, ..base.clone() })?;
        at += n;
        if at >= end {
            return Ok(());
        }
    }
}

/// Block hashes per listing entry: a file with more blocks (more than 4 GiB) is described by
/// several consecutive entries with increasing `first_block`, so no message grows unbounded.
pub const BLOCKS_PER_ENTRY: usize = 1 << 16;

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
    list_knowing(root, scope, per, None, &Selection::all(), emit)
}

/// [`list_in_pieces`], taking the blocks of the files `known` knows from it instead of
/// reading them, and listing only the names `selection` selects.
///
/// A replica that is the source's own tree (a failback) holds names its job's rules leave
/// out; they are the source's, not the job's. The side comparing with this listing removes
/// every name it lists and its own tree lacks, so a name left out here is one it never
/// removes or replaces (see [`crate::outside`] for the ops that would).
pub fn list_knowing(
    root: &Beneath,
    scope: &ListScope,
    per: usize,
    known: Option<&dyn KnownBlocks>,
    selection: &Selection,
    emit: &mut dyn FnMut(Entry) -> io::Result<()>,
) -> io::Result<()> {
    let listed =
        |path: &RelPath, meta: &Meta| selection.outside_at(path, meta.kind == EntryKind::Dir).is_none();
    match scope {
        ListScope::All => walk(root.path(), &RelPath::root(), selection, &mut |e| {
            match entries_for(root, &e.path, &e.meta, per, known, emit) {
                // Gone between the walk and the hash: the entry simply does not exist.
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
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
                if listed(&path, &meta) {
                    entries_for(root, &path, &meta, per, known, emit)?;
                }
            }
            Ok(())
        }
        ListScope::Children(dirs) => {
            for w in dirs {
                let Ok(dir) = RelPath::try_from(w) else { continue };
                match children_of(root, &dir, &listed, emit) {
                    Err(e)
                        if e.kind() == io::ErrorKind::NotFound
                            || e.raw_os_error() == Some(libc::ENOTDIR)
                            || doppel_fs::beneath::is_escape(&e) => {}
                    r => r?,
                }
            }
            Ok(())
        }
        ListScope::Ranges(ranges) => {
            for (w, offset, len) in ranges {
                let Ok(path) = RelPath::try_from(w) else { continue };
                match range_entries(root, &path, *offset, *len, per, &listed, emit) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound || doppel_fs::beneath::is_escape(&e) => {}
                    r => r?,
                }
            }
            Ok(())
        }
    }
}

/// Emits an entry without block hashes (nor link target or attributes) for each name
/// directly beneath the directory `dir` that is `listed`.
fn children_of(
    root: &Beneath,
    dir: &RelPath,
    listed: &dyn Fn(&RelPath, &Meta) -> bool,
    emit: &mut dyn FnMut(Entry) -> io::Result<()>,
) -> io::Result<()> {
    let fd = root.open_at(dir, OFlags::RDONLY | OFlags::DIRECTORY, 0)?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let name = entry?.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            names.push(name);
        }
    }
    names.sort();
    for name in names {
        let st = match rustix::fs::statat(&fd, name.as_c_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let path = dir.join(name.as_bytes()).map_err(io::Error::other)?;
        let meta = Meta::from_stat(&st);
        if listed(&path, &meta) {
            emit(bare_entry(&path, &meta))?;
        }
    }
    Ok(())
}

/// The entries of a regular file with the hashes of the blocks covering
/// `offset..offset+len` (nothing if `path` is not a regular file, or not `listed`).
fn range_entries(
    root: &Beneath,
    path: &RelPath,
    offset: u64,
    len: u64,
    per: usize,
    listed: &dyn Fn(&RelPath, &Meta) -> bool,
    emit: &mut dyn FnMut(Entry) -> io::Result<()>,
) -> io::Result<()> {
    let f = File::from(root.open_at(path, OFlags::RDONLY, 0)?);
    let meta = Meta::from_stat(&rustix::fs::fstat(&f)?);
    if meta.kind != EntryKind::File || !listed(path, &meta) {
        return Ok(());
    }
    let bs = doppel_proto::BLOCK_SIZE;
    let first = offset / bs;
    let last = (offset.saturating_add(len.max(1)) - 1) / bs;
    // Only blocks that exist: a range past the end names none.
    let count = (last + 1).min(meta.size.div_ceil(bs)).saturating_sub(first);
    let base = Entry { first_block: first, ..bare_entry(path, &meta) };
    hashed_pieces(&f, base, first, count, per, emit)
}
