//! The block-hash index of a job.
//!
//! For each protected name the index records what the replica holds once every op emitted so
//! far is applied, plus the source's stat fields (size, mtime, ctime, inode) at the moment the
//! name was last read. Comparing those stat fields with a fresh `lstat` tells, without reading
//! a byte, whether a name may have changed; comparing block hashes tells which blocks did.
//!
//! The index is saved to disk only together with a spool checkpoint (see the agent), so that a
//! saved index never describes ops that could be lost: after a restart, every change it does
//! not describe shows up as a stat difference.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::ops::Bound;
use std::path::Path;

use doppel_fs::Meta;
use doppel_proto::{BlockHash, Entry, EntryKind, RelPath, Timestamp, Xattr};
use serde::{Deserialize, Serialize};

use crate::error::MirrorError;

/// Inode numbers with this bit set are not source inodes but hard-link groups seen on the
/// replica (from a listing): they never match a source inode, yet tell which replica names
/// share an inode.
pub const REPLICA_GROUP: u64 = 1 << 63;

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
            ctime: Timestamp::default(),
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
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    saved_at_us: u64,
    captured_seq: u64,
    entries: Vec<(Vec<u8>, IndexEntry)>,
}

const VERSION: u32 = 1;

/// The index of one job.
#[derive(Debug, Default, Clone)]
pub struct Index {
    entries: BTreeMap<RelPath, IndexEntry>,
    by_ino: HashMap<u64, BTreeSet<RelPath>>,
}

/// What [`Index::load`] returns besides the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// When it was saved (µs since the epoch): entries modified within the file system's
    /// timestamp granularity of this moment cannot be trusted by stat alone.
    pub saved_at_us: u64,
    /// The last op sequence the saved index accounts for.
    pub captured_seq: u64,
}

fn subtree_end(prefix: &RelPath) -> Bound<RelPath> {
    // Children of `p` are `p/...`; `p0` is the first key past them ('0' follows '/').
    let mut end = prefix.as_bytes().to_vec();
    end.push(b'0');
    match RelPath::new(end) {
        Ok(p) => Bound::Excluded(p),
        Err(_) => Bound::Unbounded,
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Index {
        Index::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for `path`.
    pub fn get(&self, path: &RelPath) -> Option<&IndexEntry> {
        self.entries.get(path)
    }

    /// Sets the entry for `path`.
    pub fn insert(&mut self, path: RelPath, e: IndexEntry) {
        if let Some(old) = self.entries.get(&path) {
            let ino = old.ino;
            self.unlink_ino(ino, &path);
        }
        if e.kind == EntryKind::File && e.ino != 0 {
            self.by_ino.entry(e.ino).or_default().insert(path.clone());
        }
        self.entries.insert(path, e);
    }

    fn unlink_ino(&mut self, ino: u64, path: &RelPath) {
        if let Some(set) = self.by_ino.get_mut(&ino) {
            set.remove(path);
            if set.is_empty() {
                self.by_ino.remove(&ino);
            }
        }
    }

    /// Removes the entry for `path` alone.
    pub fn remove(&mut self, path: &RelPath) -> Option<IndexEntry> {
        let e = self.entries.remove(path)?;
        self.unlink_ino(e.ino, path);
        Some(e)
    }

    /// The paths of `prefix` and everything beneath it, in order.
    pub fn subtree(&self, prefix: &RelPath) -> Vec<RelPath> {
        if prefix.is_root() {
            return self.entries.keys().cloned().collect();
        }
        let mut out = Vec::new();
        if self.entries.contains_key(prefix) {
            out.push(prefix.clone());
        }
        // `p/\x01` sorts before every child of `p` (names cannot contain NUL).
        if let Ok(start) = prefix.join(b"\x01") {
            let range = (Bound::Included(start), subtree_end(prefix));
            out.extend(self.entries.range(range).map(|(k, _)| k.clone()).filter(|k| k.starts_with(prefix)));
        }
        out
    }

    /// Moves `from` and everything beneath it to `to`, replacing whatever `to` held.
    pub fn rename_subtree(&mut self, from: &RelPath, to: &RelPath) {
        for p in self.subtree(to) {
            self.remove(&p);
        }
        for p in self.subtree(from) {
            if let Some(e) = self.remove(&p) {
                let np = p.rebase(from, to).expect("path is beneath the renamed prefix");
                self.insert(np, e);
            }
        }
    }

    /// Another name of source inode `ino` in the index, if any.
    pub fn other_name(&self, ino: u64, except: &RelPath) -> Option<RelPath> {
        self.by_ino.get(&ino)?.iter().find(|p| *p != except).cloned()
    }

    /// All names sharing the replica inode recorded as `ino`.
    pub fn names_of(&self, ino: u64) -> Vec<RelPath> {
        self.by_ino.get(&ino).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Mutable access to an entry.
    pub fn get_mut(&mut self, path: &RelPath) -> Option<&mut IndexEntry> {
        self.entries.get_mut(path)
    }

    /// Iterates over all entries in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&RelPath, &IndexEntry)> {
        self.entries.iter()
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.by_ino.clear();
    }

    /// Saves atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path, saved_at_us: u64, captured_seq: u64) -> Result<(), MirrorError> {
        let disk = OnDisk {
            version: VERSION,
            saved_at_us,
            captured_seq,
            entries: self.entries.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.clone())).collect(),
        };
        let bytes = postcard::to_stdvec(&disk).expect("index serializes");
        let tmp = path.with_extension("tmp");
        let io = |e| MirrorError::Io { path: path.to_path_buf(), source: e };
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Loads a saved index; `None` if there is none.
    pub fn load(path: &Path) -> Result<Option<(Index, Saved)>, MirrorError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(MirrorError::Io { path: path.to_path_buf(), source: e }),
        };
        let bad = |reason: String| MirrorError::Index { path: path.to_path_buf(), reason };
        let disk: OnDisk = postcard::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        if disk.version != VERSION {
            return Err(bad(format!("version {} (this build reads {VERSION})", disk.version)));
        }
        let mut index = Index::new();
        for (k, v) in disk.entries {
            let p = RelPath::new(k).map_err(|e| bad(e.to_string()))?;
            index.insert(p, v);
        }
        Ok(Some((index, Saved { saved_at_us: disk.saved_at_us, captured_seq: disk.captured_seq })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn file(ino: u64) -> IndexEntry {
        IndexEntry {
            kind: EntryKind::File,
            size: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            ino,
            link_target: vec![],
            blocks: vec![],
            xattrs: vec![],
        }
    }

    #[test]
    fn subtrees_renames_and_inodes() {
        let mut i = Index::new();
        for (k, ino) in [("a", 1), ("a/b", 2), ("a/b/c", 3), ("a-x", 4), ("ab", 5), ("z", 3)] {
            i.insert(p(k), file(ino));
        }
        let names = |v: Vec<RelPath>| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(names(i.subtree(&p("a"))), ["a", "a/b", "a/b/c"]);
        assert_eq!(i.other_name(3, &p("z")), Some(p("a/b/c")));
        i.rename_subtree(&p("a"), &p("q/r"));
        assert_eq!(names(i.subtree(&RelPath::root())), ["a-x", "ab", "q/r", "q/r/b", "q/r/b/c", "z"]);
        assert_eq!(i.other_name(3, &p("z")), Some(p("q/r/b/c")));
        i.remove(&p("z"));
        assert_eq!(i.names_of(3), vec![p("q/r/b/c")]);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("index");
        i.save(&f, 42, 7).unwrap();
        let (j, saved) = Index::load(&f).unwrap().unwrap();
        assert_eq!(saved, Saved { saved_at_us: 42, captured_seq: 7 });
        assert_eq!(names(j.subtree(&RelPath::root())), names(i.subtree(&RelPath::root())));
        assert!(Index::load(&d.path().join("none")).unwrap().is_none());
    }
}
