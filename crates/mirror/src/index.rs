//! The block-hash index of a job.
//!
//! For each protected name the index records what the replica holds once every op emitted so
//! far is applied, plus the source's stat fields (size, mtime, ctime, inode) at the moment the
//! name was last read. Comparing those stat fields with a fresh `lstat` tells, without reading
//! a byte, whether a name may have changed; comparing block hashes tells which blocks did.
//!
//! The index lives on disk, in a [redb] store, with a bounded page cache in memory: a file
//! server with millions of names needs a few MiB of the agent's memory for it, not a KiB per
//! name. Every change since the last [`Index::save`] sits in one open write transaction (redb
//! spills its dirty pages to the file, not to memory); `save` commits it durably. The index is
//! saved only together with a spool checkpoint (see the agent), so that a saved index never
//! describes ops that could be lost: after a crash the store opens as of the last save, and
//! every change it does not describe shows up as a stat difference.
//!
//! Keys are paths with `/` mapped to NUL (which no name holds), so the store's order is the
//! order of a tree walk (a directory, then its contents, names bytewise): a whole-tree
//! comparison merges the walk with the index in one pass, holding neither.

use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};

use doppel_fs::Meta;
use doppel_proto::{BlockHash, Entry, EntryKind, RelPath, Timestamp, Xattr};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::error::MirrorError;

/// Inode numbers with this bit set are not source inodes but hard-link groups seen on the
/// replica (from a listing): they never match a source inode, yet tell which replica names
/// share an inode.
pub const REPLICA_GROUP: u64 = 1 << 63;

/// The `ctime` of an entry seeded from a listing whose lister vouched for the file's content
/// ([`Entry::vouched`]). No source file has a change time 1 ns past the epoch, so
/// [`IndexEntry::unchanged`] is never true for it; kept in `ctime` (which a listing's entries
/// otherwise leave at zero) so that the store's layout stays as it is.
const VOUCHED_CTIME: Timestamp = Timestamp { secs: 0, nanos: 1 };

/// How close to an index's save a file may have been modified for its times not to tell
/// whether it changed after the save: Linux file systems stamp times from a coarse clock (a
/// few milliseconds), 100 ms leaves a wide margin (the "racy" entries of git's index).
pub const RACY_MARGIN_US: u64 = 100_000;

/// How the directories of throwaway indexes begin.
const SCRATCH_PREFIX: &str = ".index-";

/// The memory the index's page cache may use unless the job says otherwise.
pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;

/// The least cache the store is given (below this redb mostly rereads its own pages).
const MIN_CACHE_BYTES: usize = 1 << 20;

/// What the index knows about one name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Type.
    pub kind: EntryKind,
    /// Size (regular files).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, as on the replica.
    pub mtime: Timestamp,
    /// Source ctime when last read; zero when unknown (the entry came from a listing).
    pub ctime: Timestamp,
    /// Source inode when last read; 0 when unknown; see [`REPLICA_GROUP`].
    pub ino: u64,
    /// Symlink target.
    pub link_target: Vec<u8>,
    /// Per-block hashes (regular files).
    pub blocks: Vec<BlockHash>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<Xattr>,
}

impl IndexEntry {
    /// An entry for a name just read from the source.
    pub fn from_meta(meta: &Meta) -> IndexEntry {
        IndexEntry {
            kind: meta.kind,
            size: if meta.kind == EntryKind::File { meta.size } else { 0 },
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
            ctime: meta.ctime,
            ino: meta.ino,
            link_target: Vec::new(),
            blocks: Vec::new(),
            xattrs: Vec::new(),
        }
    }

    /// An entry describing what a replica listing says is there.
    pub fn from_listing(e: &Entry) -> IndexEntry {
        IndexEntry {
            kind: e.kind,
            size: e.size,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            ctime: if e.vouched && e.kind == EntryKind::File { VOUCHED_CTIME } else { Timestamp::default() },
            ino: e.link_group.map(|g| g | REPLICA_GROUP).unwrap_or(0),
            link_target: e.link_target.clone(),
            blocks: e.blocks.clone(),
            xattrs: e.xattrs.clone(),
        }
    }

    /// Whether `meta` shows no change since this entry was recorded (same type, size, times,
    /// inode, mode and owner).
    pub fn unchanged(&self, meta: &Meta) -> bool {
        self.kind == meta.kind
            && (self.kind != EntryKind::File || self.size == meta.size)
            && self.mtime == meta.mtime
            && self.ctime == meta.ctime
            && self.ino == meta.ino
            && self.mode == meta.mode
            && self.uid == meta.uid
            && self.gid == meta.gid
    }

    /// Whether `meta` shows no change since this entry was recorded, and the entry was recorded
    /// (or last confirmed) at least [`RACY_MARGIN_US`] before `saved_at_us`, when the index was
    /// saved: a change made after the save within the same tick of the file system's clock
    /// would leave the times as they were.
    pub fn settled(&self, meta: &Meta, saved_at_us: u64) -> bool {
        let racy_after = saved_at_us.saturating_sub(RACY_MARGIN_US) as i128 * 1000;
        let ns = |t: Timestamp| t.secs as i128 * 1_000_000_000 + t.nanos as i128;
        self.unchanged(meta) && ns(meta.mtime) < racy_after && ns(meta.ctime) < racy_after
    }

    /// Whether this entry came from a listing that vouched for the file's content, and the
    /// single-named regular file `meta` describes has the same size and modification time: the
    /// quick check rsync makes by default, here only where the other side vouched.
    pub fn vouched_same(&self, meta: &Meta) -> bool {
        self.ctime == VOUCHED_CTIME
            && self.kind == EntryKind::File
            && meta.kind == EntryKind::File
            && meta.nlink == 1
            && self.size == meta.size
            && self.mtime == meta.mtime
    }

    /// Whether this entry names a source inode that other names may share.
    fn linkable(&self) -> bool {
        self.kind == EntryKind::File && self.ino != 0
    }
}

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
/// `inode (8 bytes, big-endian) ++ key` of every linkable entry: the names of one inode.
const INODES: TableDefinition<&[u8], ()> = TableDefinition::new("inodes");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The store's layout; another value is refused (and the index rebuilt by the agent).
const VERSION: u64 = 2;

/// What [`Index::open`] returns besides the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// When it was saved (µs since the epoch): entries modified within the file system's
    /// timestamp granularity of this moment cannot be trusted by stat alone.
    pub saved_at_us: u64,
    /// The last op sequence the saved index accounts for.
    pub captured_seq: u64,
}

/// The store key of `path`.
fn key(path: &RelPath) -> Vec<u8> {
    path.as_bytes().iter().map(|&b| if b == b'/' { 0 } else { b }).collect()
}

/// The path of store key `k`.
fn path_of(k: &[u8]) -> Result<RelPath, MirrorError> {
    let bytes: Vec<u8> = k.iter().map(|&b| if b == 0 { b'/' } else { b }).collect();
    RelPath::new(bytes).map_err(|e| MirrorError::Store(format!("a key is not a path: {e}")))
}

/// Orders paths as a tree walk visits them (and as the index stores them): a directory, then
/// everything beneath it, then its next sibling.
pub fn walk_order(a: &RelPath, b: &RelPath) -> Ordering {
    let m = |x: &u8| if *x == b'/' { 0 } else { *x };
    a.as_bytes().iter().map(m).cmp(b.as_bytes().iter().map(m))
}

/// The first key past everything beneath (and including) `prefix`; `None` for the root.
fn subtree_end(prefix: &RelPath) -> Option<Vec<u8>> {
    (!prefix.is_root()).then(|| {
        let mut k = key(prefix);
        k.push(1);
        k
    })
}

fn ino_key(ino: u64, k: &[u8]) -> Vec<u8> {
    let mut v = ino.to_be_bytes().to_vec();
    v.extend_from_slice(k);
    v
}

fn store<E: Into<redb::Error>>(e: E) -> MirrorError {
    MirrorError::Store(e.into().to_string())
}

fn encode(e: &IndexEntry) -> Vec<u8> {
    postcard::to_stdvec(e).expect("index entries serialize")
}

fn decode(v: &[u8]) -> Result<IndexEntry, MirrorError> {
    postcard::from_bytes(v).map_err(|e| MirrorError::Store(format!("an entry is unreadable: {e}")))
}

/// The index of one job (or a throwaway one, for a verify).
pub struct Index {
    db: Database,
    /// Everything changed since the last save; `None` only if beginning one failed.
    txn: Option<WriteTransaction>,
    path: PathBuf,
    cache_bytes: usize,
    /// A throwaway index: never durable, removed when dropped.
    scratch: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Index {
    /// Opens (or creates) the index stored at `path`, with a page cache of `cache_bytes`.
    /// Returns what its last save recorded, `None` if it was never saved. A store that is
    /// damaged or of another layout is a [`MirrorError::Index`].
    pub fn open(path: &Path, cache_bytes: usize) -> Result<(Index, Option<Saved>), MirrorError> {
        let bad = |reason: String| MirrorError::Index { path: path.to_path_buf(), reason };
        let cache_bytes = cache_bytes.max(MIN_CACHE_BYTES);
        // Every page's checksum is verified at open (a pass over the file, once per start): a
        // store damaged on disk is refused here, not met halfway through a comparison.
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|e| bad(store(e).to_string()))?;
        let mut index = Index { db, txn: None, path: path.to_path_buf(), cache_bytes, scratch: None };
        index.begin()?;
        let saved = index.saved().map_err(|e| bad(e.to_string()))?;
        Ok((index, saved))
    }

    /// A throwaway index in a temporary directory beneath `dir` (removed when dropped): what
    /// a verify compares against.
    pub fn scratch_in(dir: &Path, cache_bytes: usize) -> Result<Index, MirrorError> {
        let io = |source| MirrorError::Io { path: dir.to_path_buf(), source };
        let tmp = tempfile::Builder::new().prefix(SCRATCH_PREFIX).tempdir_in(dir).map_err(io)?;
        let (mut index, _) = Index::open(&tmp.path().join("index.redb"), cache_bytes)?;
        index.scratch = Some(tmp);
        index.txn = None;
        index.begin()?;
        Ok(index)
    }

    /// Removes the throwaway indexes ([`Index::scratch_in`]) a process that died (killed
    /// during a verify or a difference mirror) left in `dir`; returns how many. Only for a
    /// directory no other process uses (a job's, under its lock).
    pub fn remove_stale_scratch(dir: &Path) -> usize {
        let Ok(entries) = fs::read_dir(dir) else { return 0 };
        entries
            .flatten()
            .filter(|e| e.file_name().as_encoded_bytes().starts_with(SCRATCH_PREFIX.as_bytes()))
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| fs::remove_dir_all(e.path()).is_ok())
            .count()
    }

    /// A throwaway index in the system's temporary directory (tests, tools).
    pub fn temporary() -> Result<Index, MirrorError> {
        Index::scratch_in(&std::env::temp_dir(), MIN_CACHE_BYTES)
    }

    fn begin(&mut self) -> Result<(), MirrorError> {
        let mut t = self.db.begin_write().map_err(store)?;
        if self.scratch.is_some() {
            t.set_durability(Durability::None).map_err(|e| MirrorError::Store(e.to_string()))?;
        } else {
            // After a kill, the store reopens at once instead of walking every page.
            t.set_quick_repair(true);
        }
        self.txn = Some(t);
        Ok(())
    }

    fn w(&self) -> Result<&WriteTransaction, MirrorError> {
        self.txn.as_ref().ok_or_else(|| MirrorError::Store("the index store failed earlier".into()))
    }

    fn saved(&self) -> Result<Option<Saved>, MirrorError> {
        let meta = self.w()?.open_table(META).map_err(store)?;
        let get = |k: &str| meta.get(k).map(|v| v.map(|v| v.value())).map_err(store);
        let Some(version) = get("version")? else { return Ok(None) };
        if version != VERSION {
            return Err(MirrorError::Store(format!("layout {version} (this build reads {VERSION})")));
        }
        Ok(Some(Saved {
            saved_at_us: get("saved_at_us")?.unwrap_or(0),
            captured_seq: get("captured_seq")?.unwrap_or(0),
        }))
    }

    /// Number of entries.
    pub fn len(&self) -> Result<u64, MirrorError> {
        self.w()?.open_table(ENTRIES).map_err(store)?.len().map_err(store)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> Result<bool, MirrorError> {
        Ok(self.len()? == 0)
    }

    /// The entry for `path`.
    pub fn get(&self, path: &RelPath) -> Result<Option<IndexEntry>, MirrorError> {
        let t = self.w()?.open_table(ENTRIES).map_err(store)?;
        let v = t.get(key(path).as_slice()).map_err(store)?;
        v.map(|v| decode(v.value())).transpose()
    }

    /// Sets the entry for `path`.
    pub fn insert(&mut self, path: &RelPath, e: &IndexEntry) -> Result<(), MirrorError> {
        let k = key(path);
        let w = self.w()?;
        let mut entries = w.open_table(ENTRIES).map_err(store)?;
        let mut inodes = w.open_table(INODES).map_err(store)?;
        let old = entries.insert(k.as_slice(), encode(e).as_slice()).map_err(store)?;
        if let Some(old) = old.map(|v| decode(v.value())).transpose()?
            && old.linkable()
        {
            inodes.remove(ino_key(old.ino, &k).as_slice()).map_err(store)?;
        }
        if e.linkable() {
            inodes.insert(ino_key(e.ino, &k).as_slice(), ()).map_err(store)?;
        }
        Ok(())
    }

    /// Removes the entry for `path` alone.
    pub fn remove(&mut self, path: &RelPath) -> Result<Option<IndexEntry>, MirrorError> {
        let k = key(path);
        let w = self.w()?;
        let mut entries = w.open_table(ENTRIES).map_err(store)?;
        let Some(old) =
            entries.remove(k.as_slice()).map_err(store)?.map(|v| decode(v.value())).transpose()?
        else {
            return Ok(None);
        };
        if old.linkable() {
            w.open_table(INODES).map_err(store)?.remove(ino_key(old.ino, &k).as_slice()).map_err(store)?;
        }
        Ok(Some(old))
    }

    /// Changes the entry for `path` in place; returns whether there was one.
    pub fn update(&mut self, path: &RelPath, f: impl FnOnce(&mut IndexEntry)) -> Result<bool, MirrorError> {
        let Some(mut e) = self.get(path)? else { return Ok(false) };
        f(&mut e);
        self.insert(path, &e)?;
        Ok(true)
    }

    /// Up to `limit` paths of `prefix` and everything beneath it, in walk order, starting
    /// after `after` (from the subtree's start when `None`).
    pub fn first_paths(
        &self,
        prefix: &RelPath,
        after: Option<&RelPath>,
        limit: usize,
    ) -> Result<Vec<RelPath>, MirrorError> {
        let t = self.w()?.open_table(ENTRIES).map_err(store)?;
        let start = key(prefix);
        let from = after.map(key).filter(|a| a.as_slice() >= start.as_slice());
        let end = subtree_end(prefix);
        let lower = match &from {
            Some(a) => std::ops::Bound::Excluded(a.as_slice()),
            None => std::ops::Bound::Included(start.as_slice()),
        };
        let upper = match &end {
            Some(e) => std::ops::Bound::Excluded(e.as_slice()),
            None => std::ops::Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in t.range((lower, upper)).map_err(store)?.take(limit) {
            out.push(path_of(item.map_err(store)?.0.value())?);
        }
        Ok(out)
    }

    /// Up to `limit` of the last paths of `prefix` and everything beneath it, deepest first
    /// (reverse walk order).
    pub fn last_paths(&self, prefix: &RelPath, limit: usize) -> Result<Vec<RelPath>, MirrorError> {
        let t = self.w()?.open_table(ENTRIES).map_err(store)?;
        let start = key(prefix);
        let end = subtree_end(prefix);
        let upper = match &end {
            Some(e) => std::ops::Bound::Excluded(e.as_slice()),
            None => std::ops::Bound::Unbounded,
        };
        let range = (std::ops::Bound::Included(start.as_slice()), upper);
        let mut out = Vec::new();
        for item in t.range(range).map_err(store)?.rev().take(limit) {
            out.push(path_of(item.map_err(store)?.0.value())?);
        }
        Ok(out)
    }

    /// Whether `prefix` has anything beneath it in the index.
    pub fn has_children(&self, prefix: &RelPath) -> Result<bool, MirrorError> {
        Ok(self.first_paths(prefix, Some(prefix), 1)?.first().is_some_and(|p| p != prefix))
    }

    /// Moves `from` and everything beneath it to `to`, replacing whatever `to` held.
    pub fn rename_subtree(&mut self, from: &RelPath, to: &RelPath) -> Result<(), MirrorError> {
        loop {
            let doomed = self.last_paths(to, 1024)?;
            if doomed.is_empty() {
                break;
            }
            for p in doomed {
                self.remove(&p)?;
            }
        }
        loop {
            let moving = self.first_paths(from, None, 1024)?;
            if moving.is_empty() {
                return Ok(());
            }
            for p in moving {
                if let Some(e) = self.remove(&p)? {
                    let np = p.rebase(from, to).expect("path is beneath the renamed prefix");
                    self.insert(&np, &e)?;
                }
            }
        }
    }

    /// All names sharing the inode recorded as `ino` (a source inode, or a replica group).
    pub fn names_of(&self, ino: u64) -> Result<Vec<RelPath>, MirrorError> {
        names_in(&self.w()?.open_table(INODES).map_err(store)?, ino)
    }

    /// Another name of source inode `ino` in the index, if any.
    pub fn other_name(&self, ino: u64, except: &RelPath) -> Result<Option<RelPath>, MirrorError> {
        Ok(self.names_of(ino)?.into_iter().find(|p| p != except))
    }

    /// Removes everything.
    pub fn clear(&mut self) -> Result<(), MirrorError> {
        let w = self.w()?;
        w.delete_table(ENTRIES).map_err(store)?;
        w.delete_table(INODES).map_err(store)?;
        Ok(())
    }

    /// Seeds the index with a listing entry: a big file's later pieces extend the blocks of
    /// the entry its first piece made.
    pub fn seed(&mut self, e: &Entry) -> Result<(), MirrorError> {
        let Ok(p) = RelPath::try_from(&e.path) else { return Ok(()) };
        if e.first_block > 0
            && let Some(mut prev) = self.get(&p)?
            && prev.blocks.len() as u64 == e.first_block
        {
            prev.blocks.extend_from_slice(&e.blocks);
            return self.insert(&p, &prev);
        }
        self.insert(&p, &IndexEntry::from_listing(e))
    }

    /// Commits every change durably, recording when and up to which op.
    pub fn save(&mut self, saved_at_us: u64, captured_seq: u64) -> Result<(), MirrorError> {
        {
            let mut meta = self.w()?.open_table(META).map_err(store)?;
            for (k, v) in [("version", VERSION), ("saved_at_us", saved_at_us), ("captured_seq", captured_seq)]
            {
                meta.insert(k, v).map_err(store)?;
            }
        }
        self.commit()
    }

    fn commit(&mut self) -> Result<(), MirrorError> {
        let t = self.txn.take().ok_or_else(|| MirrorError::Store("the index store failed earlier".into()))?;
        t.commit().map_err(store)?;
        self.begin()
    }

    /// Takes over the whole-file index of job format 1 (`index.bin`: postcard, every entry),
    /// saving it as this store's content with the old save's time and sequence, so an upgrade
    /// in place compares nothing it would not have compared before. `None` if there is no such
    /// file; a file that cannot be read is a [`MirrorError::Index`].
    pub fn import_whole_file(&mut self, old: &Path) -> Result<Option<Saved>, MirrorError> {
        #[derive(Deserialize)]
        struct OnDisk {
            version: u32,
            saved_at_us: u64,
            captured_seq: u64,
            entries: Vec<(Vec<u8>, IndexEntry)>,
        }
        let bytes = match fs::read(old) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(MirrorError::Io { path: old.to_path_buf(), source: e }),
        };
        let bad = |reason: String| MirrorError::Index { path: old.to_path_buf(), reason };
        let disk: OnDisk = postcard::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        if disk.version != 1 {
            return Err(bad(format!("whole-file index version {} (this build takes over 1)", disk.version)));
        }
        self.clear()?;
        for (k, e) in disk.entries {
            let p = RelPath::new(k).map_err(|e| bad(e.to_string()))?;
            self.insert(&p, &e)?;
        }
        self.save(disk.saved_at_us, disk.captured_seq)?;
        Ok(Some(Saved { saved_at_us: disk.saved_at_us, captured_seq: disk.captured_seq }))
    }

    /// Forgets every change since the last save.
    pub fn rollback(&mut self) -> Result<(), MirrorError> {
        if let Some(t) = self.txn.take() {
            t.abort().map_err(store)?;
        }
        self.begin()
    }

    /// A frozen view of the index as it is now, unaffected by later changes (for a verify,
    /// which needs the replica's entries after comparing has overwritten them). Commits, so
    /// only for throwaway indexes.
    pub fn snapshot(&mut self) -> Result<Snapshot, MirrorError> {
        debug_assert!(self.scratch.is_some(), "snapshots commit: throwaway indexes only");
        self.commit()?;
        Ok(Snapshot(self.db.begin_read().map_err(store)?))
    }

    /// A read-only view of the index as last saved (what was changed since is not in it).
    pub fn saved_view(&self) -> Result<Snapshot, MirrorError> {
        Ok(Snapshot(self.db.begin_read().map_err(store)?))
    }

    /// The store's size on disk, and the most memory its cache may use.
    pub fn footprint(&self) -> IndexFootprint {
        IndexFootprint {
            disk_bytes: fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0),
            cache_bytes: self.cache_bytes as u64,
        }
    }
}

/// Where an index's bytes are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexFootprint {
    /// Size of the store's file.
    pub disk_bytes: u64,
    /// The bound of its page cache in memory.
    pub cache_bytes: u64,
}

/// A frozen view of an index (see [`Index::snapshot`]).
pub struct Snapshot(ReadTransaction);

impl Snapshot {
    /// The entry for `path` as it was.
    pub fn get(&self, path: &RelPath) -> Result<Option<IndexEntry>, MirrorError> {
        let t = match self.0.open_table(ENTRIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(store(e)),
        };
        let v = t.get(key(path).as_slice()).map_err(store)?;
        v.map(|v| decode(v.value())).transpose()
    }

    /// The names of inode (or replica hard-link group) `ino` as they were.
    pub fn names_of(&self, ino: u64) -> Result<Vec<RelPath>, MirrorError> {
        match self.0.open_table(INODES) {
            Ok(t) => names_in(&t, ino),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
            Err(e) => Err(store(e)),
        }
    }
}

/// The names of `ino` in the inode table `t`.
fn names_in(t: &impl ReadableTable<&'static [u8], ()>, ino: u64) -> Result<Vec<RelPath>, MirrorError> {
    let lo = ino.to_be_bytes();
    let mut out = Vec::new();
    for item in t.range(lo.as_slice()..).map_err(store)? {
        let item = item.map_err(store)?;
        let k = item.0.value();
        if k[..8] != lo {
            break;
        }
        out.push(path_of(&k[8..])?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
