//! Regular files: hard links, and block-by-block content deltas.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use doppel_fs::Meta;
use doppel_proto::{BLOCK_SIZE, BlockHash, Entry, EntryKind, Op, RelPath, hash_block};

use super::{Guard, OpSink, ReconcileStats, Reconciler, io_err, vanished};
use crate::error::MirrorError;
use crate::index::{IndexEntry, REPLICA_GROUP};

/// Largest write op emitted: big enough to amortise per-op costs, small enough to keep
/// batches flowing and memory bounded.
const MAX_WRITE: usize = 1 << 20;

impl Reconciler {
    pub(super) fn sync_file(
        &mut self,
        path: &RelPath,
        old: Option<IndexEntry>,
        meta: &Meta,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        let mut old = old;
        if let Some(o) = &mut old
            && o.ino & REPLICA_GROUP != 0
            && meta.nlink > 1
            && self.index.other_name(meta.ino, path)?.is_none()
        {
            // The first source name of this inode meets a hard-link group seen on the replica:
            // the group becomes this inode's. Names of the group that are not names of this
            // inode on the source are split off when they are reached.
            let group = o.ino;
            for name in self.index.names_of(group)? {
                if let Some(mut e) = self.index.remove(&name)? {
                    e.ino = meta.ino;
                    self.index.insert(&name, &e)?;
                }
            }
            o.ino = meta.ino;
        }
        if meta.nlink > 1 && self.try_link(path, old.as_ref(), meta, sink)? {
            return Ok(());
        }
        // The replica's file shares its inode with other names there: writing into it would
        // change them too, so it is replaced by a file of its own.
        if let Some(o) = &old
            && o.ino != meta.ino
            && o.ino != 0
            && self.index.names_of(o.ino)?.len() > 1
        {
            self.emit(sink, Op::Unlink { path: path.to_wire() })?;
            self.index.remove(path)?;
            old = None;
        }
        let full = self.root.join(path.as_path());
        let mut file = match File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(&full) {
            Ok(f) => f,
            // Gone or replaced since the stat: the event for that change will follow.
            Err(e) if vanished(&e) || e.raw_os_error() == Some(libc::ELOOP) => return Ok(()),
            Err(e) => return Err(io_err(&full)(e)),
        };
        vouch(self.guard.as_deref(), &file, &full)?;
        if old.is_none() {
            self.emit(sink, Op::Create { path: path.to_wire(), mode: meta.mode })?;
        }
        let before =
            old.as_ref().map_or(Old { blocks: &[], size: 0 }, |o| Old { blocks: &o.blocks, size: o.size });
        let mut delta = Delta { path, run_at: 0, run: Vec::new(), changed: false };
        // Hashed while the replica was listed: only blocks that differ are read.
        let known = match &self.prehashed {
            Some(p) if !before.blocks.is_empty() => p.blocks(path, meta)?,
            _ => None,
        };
        let (blocks, size) = match known {
            Some(known) => self.compare_known(&file, &full, meta, known, before, &mut delta, sink)?,
            None => self.compare_read(&mut file, &full, meta, before, &mut delta, sink)?,
        };
        let old_size = before.size;
        let guard = self.guard.clone();
        delta.flush(self, sink)?;
        ReconcileStats::add(&self.stats.files_hashed, 1);
        let mut changed = delta.changed;
        if let Some(g) = &guard {
            // The size now, under the lock, is the one the replica must end with: writes and
            // truncates made meanwhile were sequenced around the blocks read above.
            let _held = g.file(meta.dev, meta.ino);
            let now = file.metadata().map_err(io_err(&full))?.len();
            if now != size || size < old_size {
                self.emit(sink, Op::Truncate { path: path.to_wire(), size: now })?;
                changed = true;
            }
        } else if size < old_size {
            self.emit(sink, Op::Truncate { path: path.to_wire(), size })?;
            changed = true;
        }
        let mut e = IndexEntry::from_meta(meta);
        e.size = size;
        e.blocks = blocks;
        self.sync_attrs(path, old.as_ref(), meta, &mut e, changed, sink)?;
        // Other names of the same inode on the replica saw the same bytes.
        let others = if meta.nlink > 1 { self.index.names_of(meta.ino)? } else { Vec::new() };
        for other in others.iter().filter(|o| *o != path) {
            self.index.update(other, |o| {
                o.size = e.size;
                o.blocks = e.blocks.clone();
            })?;
        }
        self.index.insert(path, &e)?;
        Ok(())
    }

    /// Reads the file whole, comparing each block with `old`'s; returns its blocks and size.
    fn compare_read(
        &mut self,
        file: &mut File,
        full: &Path,
        meta: &Meta,
        old: Old<'_>,
        delta: &mut Delta<'_>,
        sink: &mut dyn OpSink,
    ) -> Result<(Vec<BlockHash>, u64), MirrorError> {
        let mut blocks = Vec::with_capacity(meta.size.div_ceil(BLOCK_SIZE) as usize);
        let guard = self.guard.clone();
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let mut size = 0u64;
        loop {
            let i = blocks.len() as u64;
            let _held = guard.as_ref().map(|g| g.file(meta.dev, meta.ino));
            let n = doppel_fs::hash::read_full(file, &mut buf).map_err(io_err(full))?;
            if n == 0 {
                break;
            }
            self.count_compared(n as u64);
            ReconcileStats::add(&self.stats.bytes_hashed, n as u64);
            let h = hash_block(&buf[..n]);
            blocks.push(h);
            size += n as u64;
            self.compare_block(i, &buf[..n], h, old, delta, sink)?;
            if n < buf.len() {
                break;
            }
        }
        Ok((blocks, size))
    }

    /// Like [`Self::compare_read`] for a file whose blocks were hashed while the replica was
    /// listed (`known`): reads only the blocks that differ from `old`'s.
    #[allow(clippy::too_many_arguments)]
    fn compare_known(
        &mut self,
        file: &File,
        full: &Path,
        meta: &Meta,
        mut known: Vec<BlockHash>,
        old: Old<'_>,
        delta: &mut Delta<'_>,
        sink: &mut dyn OpSink,
    ) -> Result<(Vec<BlockHash>, u64), MirrorError> {
        let guard = self.guard.clone();
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for i in 0..known.len() {
            let at = i as u64 * BLOCK_SIZE;
            let n = BLOCK_SIZE.min(meta.size - at) as usize;
            self.count_compared(n as u64);
            if old.blocks.get(i) == Some(&known[i]) {
                delta.flush(self, sink)?;
                continue;
            }
            let _held = guard.as_ref().map(|g| g.file(meta.dev, meta.ino));
            let got = read_at_full(file, &mut buf[..n], at).map_err(io_err(full))?;
            ReconcileStats::add(&self.stats.bytes_hashed, got as u64);
            if got > 0 {
                // What is read is what goes, and what the index records.
                known[i] = hash_block(&buf[..got]);
                self.compare_block(i as u64, &buf[..got], known[i], old, delta, sink)?;
            }
            if got < n {
                // Shorter than its stat said: changed since, and that change's event follows.
                known.truncate(i + usize::from(got > 0));
                return Ok((known, at + got as u64));
            }
        }
        Ok((known, meta.size))
    }

    /// Counts `n` bytes of the file under comparison as compared, in a whole-tree comparison.
    fn count_compared(&mut self, n: u64) {
        if let Some(read) = &mut self.tree_bytes {
            *read += n;
            self.stats.tree.add_bytes(n);
        }
    }

    /// Compares block `i`, holding `data` hashed to `h`, with `old`'s, extending `delta` with
    /// what differs.
    fn compare_block(
        &mut self,
        i: u64,
        data: &[u8],
        h: BlockHash,
        old: Old<'_>,
        delta: &mut Delta<'_>,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        if old.blocks.get(i as usize) == Some(&h) {
            return delta.flush(self, sink);
        }
        let at = i * BLOCK_SIZE;
        let mut skip = 0usize;
        // An append into a short last block: when the old bytes are unchanged, only the new
        // ones go.
        if i + 1 == old.blocks.len() as u64 && old.size > at && old.size - at < data.len() as u64 {
            let old_len = (old.size - at) as usize;
            if hash_block(&data[..old_len]) == old.blocks[i as usize] {
                skip = old_len;
            }
        }
        delta.add(self, sink, at + skip as u64, &data[skip..])?;
        // Under a guard, each block's op must be sequenced while its lock is held.
        if self.guard.is_some() {
            delta.flush(self, sink)?;
        }
        Ok(())
    }

    /// A file whose content the listing's side vouched for ([`IndexEntry::vouched_same`]):
    /// taken as equal without being read; only its attributes are compared. Its blocks are the
    /// listing's, so later changes still travel as block deltas.
    pub(super) fn adopt_vouched(
        &mut self,
        path: &RelPath,
        old: &IndexEntry,
        meta: &Meta,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        let mut e = IndexEntry::from_meta(meta);
        e.blocks = old.blocks.clone();
        self.sync_attrs(path, Some(old), meta, &mut e, false, sink)?;
        ReconcileStats::add(&self.stats.files_vouched, 1);
        self.index.insert(path, &e)?;
        Ok(())
    }

    /// For a file with several names: if another name of the same source inode is already on
    /// the replica, makes `path` a hard link to it. Returns whether it did (or needed nothing).
    fn try_link(
        &mut self,
        path: &RelPath,
        old: Option<&IndexEntry>,
        meta: &Meta,
        sink: &mut dyn OpSink,
    ) -> Result<bool, MirrorError> {
        let Some(other) = self.index.other_name(meta.ino, path)? else { return Ok(false) };
        let Some(other_meta) = self.lstat(&other)? else { return Ok(false) };
        if other_meta.ino != meta.ino || other_meta.kind != EntryKind::File {
            return Ok(false);
        }
        let Some(shared) = self.index.get(&other)? else { return Ok(false) };
        if old.is_some_and(|o| o.ino == meta.ino) {
            if !shared.unchanged(meta) {
                // Already linked, but the shared content changed and the other name has not
                // been looked at yet: compare through this name (which updates all names).
                return Ok(false);
            }
            self.index.insert(path, &shared)?;
            return Ok(true);
        }
        if old.is_some() {
            self.emit(sink, Op::Unlink { path: path.to_wire() })?;
            self.index.remove(path)?;
        }
        self.emit(sink, Op::Link { path: path.to_wire(), existing: other.to_wire() })?;
        self.index.insert(path, &shared)?;
        Ok(true)
    }
}

impl Reconciler {
    /// Compares bytes `offset..offset+len` of the file at `path` with `remote` (the replica's
    /// hashes of the blocks covering that range, as a ranges listing gives them) and sends the
    /// blocks that differ, then the file's size and time. Names are not created or removed
    /// here: a file missing on either side is left to the comparison of its name.
    pub fn sync_range(
        &mut self,
        path: &RelPath,
        offset: u64,
        len: u64,
        remote: &Entry,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        let guard = self.guard.clone();
        let _entry = guard.as_ref().map(|g| g.entry());
        let full = self.root.join(path.as_path());
        let Some(meta) = self.lstat(path)?.filter(|m| m.kind == EntryKind::File) else { return Ok(()) };
        let file = match File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(&full) {
            Ok(f) => f,
            Err(e) if vanished(&e) => return Ok(()),
            Err(e) => return Err(io_err(&full)(e)),
        };
        vouch(guard.as_deref(), &file, &full)?;
        let first = offset / BLOCK_SIZE;
        let last = (offset + len.max(1) - 1) / BLOCK_SIZE;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for i in first..=last {
            let _held = guard.as_ref().map(|g| g.file(meta.dev, meta.ino));
            let at = i * BLOCK_SIZE;
            let n = read_at_full(&file, &mut buf, at).map_err(io_err(&full))?;
            if n == 0 {
                break;
            }
            ReconcileStats::add(&self.stats.bytes_hashed, n as u64);
            let theirs = i.checked_sub(remote.first_block).and_then(|k| remote.blocks.get(k as usize));
            if theirs != Some(&hash_block(&buf[..n])) {
                self.emit(sink, Op::Write { path: path.to_wire(), offset: at, data: buf[..n].to_vec() })?;
            }
        }
        let _held = guard.as_ref().map(|g| g.file(meta.dev, meta.ino));
        let now = file.metadata().map_err(io_err(&full))?;
        if now.len() != remote.size {
            self.emit(sink, Op::Truncate { path: path.to_wire(), size: now.len() })?;
        }
        let mtime = doppel_fs::Meta::from_std(&now).mtime;
        if mtime != remote.mtime {
            self.emit(
                sink,
                Op::SetAttr {
                    path: path.to_wire(),
                    attrs: doppel_proto::Attrs { mtime: Some(mtime), ..Default::default() },
                },
            )?;
        }
        Ok(())
    }
}

fn read_at_full(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// What the replica's file held, as the index says.
#[derive(Clone, Copy)]
struct Old<'a> {
    blocks: &'a [BlockHash],
    size: u64,
}

/// A run of contiguous changed bytes, emitted as write ops of at most [`MAX_WRITE`].
struct Delta<'p> {
    path: &'p RelPath,
    run_at: u64,
    run: Vec<u8>,
    changed: bool,
}

impl Delta<'_> {
    fn add(
        &mut self,
        r: &mut Reconciler,
        sink: &mut dyn OpSink,
        at: u64,
        data: &[u8],
    ) -> Result<(), MirrorError> {
        if !self.run.is_empty() && self.run_at + self.run.len() as u64 != at {
            self.flush(r, sink)?;
        }
        if self.run.is_empty() {
            self.run_at = at;
        }
        self.run.extend_from_slice(data);
        if self.run.len() >= MAX_WRITE {
            self.flush(r, sink)?;
        }
        Ok(())
    }

    fn flush(&mut self, r: &mut Reconciler, sink: &mut dyn OpSink) -> Result<(), MirrorError> {
        if self.run.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.run);
        let offset = self.run_at;
        self.run_at += data.len() as u64;
        self.changed = true;
        r.emit(sink, Op::Write { path: self.path.to_wire(), offset, data })
    }
}

/// Asks the guard whether `file` (at `full`) may be read as the source's content.
fn vouch(guard: Option<&dyn Guard>, file: &File, full: &std::path::Path) -> Result<(), MirrorError> {
    let Some(g) = guard else { return Ok(()) };
    let md = file.metadata().map_err(io_err(full))?;
    g.vouch(std::os::unix::fs::MetadataExt::dev(&md), std::os::unix::fs::MetadataExt::ino(&md))
        .map_err(|reason| MirrorError::Unvouched { path: full.to_path_buf(), reason })
}
