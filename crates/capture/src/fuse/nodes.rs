//! The node table: FUSE inode numbers to objects of the underlying tree.
//!
//! Each node holds an `O_PATH` handle to its underlying object (as libfuse's passthrough
//! example does), so the daemon works on the real tree beneath the mount without ever going
//! through the mount itself. Nodes also remember the names they are known by (a parent node and
//! a name), which is how an op on an inode gets the path it must carry on the wire: walking the
//! parents up to the root. Directories have exactly one name; files may have several (hard
//! links) or none (unlinked while open: writes to those change nothing on the replica).
//!
//! Names change only under the namespace lock held exclusively, and paths are read under it
//! held shared, so a path is always consistent with the ops sequenced around it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use doppel_proto::RelPath;
use parking_lot::{Mutex, RwLock};
use rustix::fs::{AtFlags, OFlags, Stat};

use super::locks::FileLock;

/// The FUSE root inode number.
pub const ROOT: u64 = 1;

/// One name of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// Parent directory node.
    pub parent: u64,
    /// Name within it.
    pub name: Vec<u8>,
}

/// Per-node open-file bookkeeping (for passthrough and mtime flushing).
#[derive(Default)]
pub struct IoState {
    /// Opens that write through the daemon.
    pub writers: u32,
    /// Opens served by kernel passthrough (including writers opened alongside them).
    pub passthrough: u32,
    /// The backing file registered for passthrough while any passthrough open exists.
    pub backing: Option<Arc<fuser::BackingId>>,
}

/// One object of the underlying tree known to the kernel.
pub struct Node {
    /// FUSE inode number.
    pub id: u64,
    /// `O_PATH | O_NOFOLLOW` handle to the underlying object.
    pub fd: OwnedFd,
    /// Underlying device and inode: the object's identity.
    pub key: (u64, u64),
    /// `st_mode & S_IFMT`.
    pub kind: u32,
    /// Kernel lookup count (`forget` decrements it).
    pub lookups: AtomicU64,
    /// Names it is known by.
    pub places: Mutex<Vec<Place>>,
    /// Serializes data ops on the object, shared with the mirror (see `locks`).
    pub data: FileLock,
    /// Open-file bookkeeping.
    pub io: Mutex<IoState>,
    /// Content or attributes changed since the mtime was last sent.
    pub mtime_dirty: AtomicBool,
}

impl Node {
    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// `/proc/self/fd/N` for the node's handle: reaches exactly this object for calls that
    /// take a path.
    pub fn proc_path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }

    /// Current metadata of the underlying object.
    pub fn stat(&self) -> io::Result<Stat> {
        rustix::fs::fstat(&self.fd).map_err(io::Error::from)
    }
}

#[derive(Default)]
struct Tables {
    by_id: HashMap<u64, Arc<Node>>,
    by_key: HashMap<(u64, u64), u64>,
}

/// All nodes.
pub struct Nodes {
    tables: RwLock<Tables>,
    next: AtomicU64,
    locks: Arc<super::locks::Locks>,
}

impl Nodes {
    /// A table holding just the root, whose underlying directory is `root_fd`.
    pub fn new(root_fd: &OwnedFd, locks: Arc<super::locks::Locks>) -> io::Result<Nodes> {
        let fd =
            rustix::fs::openat(root_fd, ".", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, 0.into())?;
        let st = rustix::fs::fstat(&fd)?;
        let key = (st.st_dev, st.st_ino);
        let root = Arc::new(Node {
            id: ROOT,
            fd,
            key,
            kind: libc::S_IFDIR,
            lookups: AtomicU64::new(1),
            places: Mutex::new(Vec::new()),
            data: locks.file(key),
            io: Mutex::new(IoState::default()),
            mtime_dirty: AtomicBool::new(false),
        });
        let mut t = Tables::default();
        t.by_key.insert(key, ROOT);
        t.by_id.insert(ROOT, root);
        Ok(Nodes { tables: RwLock::new(t), next: AtomicU64::new(ROOT + 1), locks })
    }

    /// The node with inode number `id`.
    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.tables.read().by_id.get(&id).cloned()
    }

    /// The node for `name` in directory `parent`, whose metadata is `st`: the known node of
    /// that object (gaining the name) or a new one. Counts one kernel lookup.
    pub fn found(&self, parent: &Node, name: &[u8], st: &Stat) -> io::Result<Arc<Node>> {
        let key = (st.st_dev, st.st_ino);
        let place = Place { parent: parent.id, name: name.to_vec() };
        let known = {
            let t = self.tables.read();
            let n = t.by_key.get(&key).and_then(|id| t.by_id.get(id)).cloned();
            // Counted under the table lock, so `forget` cannot interleave.
            if let Some(n) = &n {
                n.lookups.fetch_add(1, Ordering::Relaxed);
            }
            n
        };
        if let Some(node) = known {
            {
                let mut places = node.places.lock();
                if node.is_dir() {
                    places.clear();
                }
                if !places.contains(&place) {
                    places.push(place);
                }
            }
            return Ok(node);
        }
        let fd = rustix::fs::openat(
            &parent.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            0.into(),
        )?;
        let st2 = rustix::fs::fstat(&fd)?;
        if (st2.st_dev, st2.st_ino) != key {
            // Replaced between the stat and the open: report the race as a stale entry.
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        let mut t = self.tables.write();
        if let Some(&id) = t.by_key.get(&key) {
            let node = t.by_id[&id].clone();
            drop(t);
            node.lookups.fetch_add(1, Ordering::Relaxed);
            node.places.lock().push(place);
            return Ok(node);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(Node {
            id,
            fd,
            key,
            kind: st.st_mode & libc::S_IFMT,
            lookups: AtomicU64::new(1),
            places: Mutex::new(vec![place]),
            data: self.locks.file(key),
            io: Mutex::new(IoState::default()),
            mtime_dirty: AtomicBool::new(false),
        });
        t.by_key.insert(key, id);
        t.by_id.insert(id, node.clone());
        Ok(node)
    }

    fn by_key(&self, key: (u64, u64)) -> Option<Arc<Node>> {
        let t = self.tables.read();
        t.by_key.get(&key).and_then(|id| t.by_id.get(id)).cloned()
    }

    /// The kernel dropped `n` lookups of `id`; the node goes when none are left.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT {
            return;
        }
        let mut t = self.tables.write();
        let Some(node) = t.by_id.get(&id) else { return };
        let left = node.lookups.load(Ordering::Relaxed).saturating_sub(n);
        node.lookups.store(left, Ordering::Relaxed);
        if left == 0 {
            let key = node.key;
            t.by_id.remove(&id);
            if t.by_key.get(&key) == Some(&id) {
                t.by_key.remove(&key);
            }
        }
    }

    /// The path of `node` relative to the root, through its first valid name; `None` if it
    /// has no name any more (unlinked while open) or a name cannot be expressed as a path.
    pub fn path(&self, node: &Node) -> Option<RelPath> {
        if node.id == ROOT {
            return Some(RelPath::root());
        }
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut cur = node.places.lock().first().cloned()?;
        loop {
            names.push(cur.name);
            if cur.parent == ROOT {
                break;
            }
            let parent = self.get(cur.parent)?;
            cur = parent.places.lock().first().cloned()?;
            if names.len() > 4096 {
                return None;
            }
        }
        let mut p = RelPath::root();
        for n in names.iter().rev() {
            p = p.join(n).ok()?;
        }
        Some(p)
    }

    /// The path of `name` in directory `parent`.
    pub fn child_path(&self, parent: &Node, name: &[u8]) -> Option<RelPath> {
        self.path(parent)?.join(name).ok()
    }

    /// The object named `name` in `parent` lost that name (unlink, or replaced by a rename).
    pub fn unnamed(&self, parent: u64, name: &[u8], key: Option<(u64, u64)>) {
        let Some(node) = key.and_then(|k| self.by_key(k)) else { return };
        node.places.lock().retain(|p| !(p.parent == parent && p.name == name));
    }

    /// The object at `from` is now at `to` (a rename); `replaced` was at `to` before.
    pub fn renamed(&self, moved: Option<(u64, u64)>, from: Place, to: Place, replaced: Option<(u64, u64)>) {
        if let Some(k) = replaced
            && Some(k) != moved
        {
            self.unnamed(to.parent, &to.name, Some(k));
        }
        if let Some(node) = moved.and_then(|k| self.by_key(k)) {
            let mut places = node.places.lock();
            places.retain(|p| *p != from);
            if !places.contains(&to) {
                places.insert(0, to);
            }
        }
    }

    /// `RENAME_EXCHANGE`: the two objects swapped names.
    pub fn exchanged(&self, a: Option<(u64, u64)>, pa: Place, b: Option<(u64, u64)>, pb: Place) {
        for (k, from, to) in [(a, pa.clone(), pb.clone()), (b, pb, pa)] {
            if let Some(node) = k.and_then(|k| self.by_key(k)) {
                let mut places = node.places.lock();
                places.retain(|p| *p != from);
                places.insert(0, to);
            }
        }
    }
}

/// `lstat` of `name` in directory `dir`.
pub fn stat_at(dir: &impl AsFd, name: &[u8]) -> io::Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
}
