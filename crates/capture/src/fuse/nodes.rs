//! The node table: FUSE inode numbers to objects of the underlying tree.
//!
//! Each node reaches its underlying object through an `O_PATH` handle (as libfuse's passthrough
//! example does), so the daemon works on the real tree beneath the mount without ever going
//! through the mount itself. Nodes also remember the names they are known by (a parent node and
//! a name), which is how an op on an inode gets the path it must carry on the wire: walking the
//! parents up to the root. Directories have exactly one name; files may have several (hard
//! links) or none (unlinked while open: writes to those change nothing on the replica).
//!
//! Names change only under the namespace lock held exclusively, and paths are read under it
//! held shared, so a path is always consistent with the ops sequenced around it.
//!
//! **Descriptors.** The kernel keeps an inode (and so a node) for as long as it caches it,
//! which is for every file an application touched lately: tens of thousands. Holding a
//! descriptor per node would make applications fail with `EMFILE` once the daemon's
//! `RLIMIT_NOFILE` is reached. So, as virtiofsd does, a node keeps the kernel's *file handle*
//! of its object (`name_to_handle_at`), and its `O_PATH` descriptor lives in a bounded cache
//! ([`FdCache`], a clock of recently used nodes): an evicted node reopens its object by handle
//! (`open_by_handle_at`, which finds exactly that inode or fails with `ESTALE`, never another
//! object). Where handles are unavailable (no `CAP_DAC_READ_SEARCH`, a file system without
//! export support, a node on another mount beneath the root) the node keeps its descriptor for
//! its lifetime, as before. Every open the daemon makes also survives running out of
//! descriptors once: on `EMFILE`/`ENFILE` the cache gives back half of what it holds and the
//! open is retried.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

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
    /// Written around the kernel's page cache (direct writes in passthrough mode): the next
    /// cached open must not keep the cache.
    pub stale_cache: bool,
}

/// A node's `O_PATH` descriptor, kept open for as long as this value lives (even if the cache
/// evicts it meanwhile).
#[derive(Clone)]
pub struct NodeFd(Arc<OwnedFd>);

impl NodeFd {
    /// `/proc/self/fd/N`: reaches exactly this object for calls that take a path. Valid while
    /// `self` lives.
    pub fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.0.as_raw_fd())
    }
}

impl AsFd for NodeFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// One object of the underlying tree known to the kernel.
pub struct Node {
    /// FUSE inode number.
    pub id: u64,
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
    /// Whether the object carries privileges a write must drop (see `fs::privs`):
    /// [`PRIVS_UNKNOWN`], [`PRIVS_NONE`] or [`PRIVS_SOME`].
    pub privs: std::sync::atomic::AtomicU8,
    /// The kernel's file handle of the object; `None`: the descriptor is never evicted.
    handle: Option<Box<[u8]>>,
    /// The `O_PATH | O_NOFOLLOW` descriptor, while cached.
    fd: Mutex<Option<NodeFd>>,
    /// Used since the clock last passed (second chance).
    referenced: AtomicBool,
    cache: Arc<FdCache>,
    me: Weak<Node>,
}

impl Node {
    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// The node's `O_PATH` descriptor: the cached one, or the object reopened by its handle
    /// (`ESTALE` if the object is gone).
    pub fn fd(&self) -> io::Result<NodeFd> {
        let mut g = self.fd.lock();
        if let Some(fd) = &*g {
            self.referenced.store(true, Ordering::Relaxed);
            return Ok(fd.clone());
        }
        let Some(handle) = &self.handle else {
            // Only nodes with a handle ever lose their descriptor.
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        };
        let fd = NodeFd(Arc::new(self.cache.open_by_handle(handle)?));
        *g = Some(fd.clone());
        drop(g);
        self.cache.cached(self.me.clone());
        Ok(fd)
    }

    /// Whether this node stands for the object whose metadata is `st` (same device and inode
    /// number). An inode number identifies an object only while it lives: once the node's
    /// object is gone, the file system may give its number to a new one. A node holding its
    /// descriptor pins its object, so its number cannot have been reused; one whose descriptor
    /// was evicted reopens by file handle, which names the object with its generation and
    /// fails (`ESTALE`) for a dead one.
    pub fn is(&self, st: &Stat) -> bool {
        if self.key != (st.st_dev, st.st_ino) || self.kind != st.st_mode & libc::S_IFMT {
            return false;
        }
        match self.fd() {
            Ok(_) => true,
            Err(e) => e.raw_os_error() != Some(libc::ESTALE),
        }
    }

    /// Current metadata of the underlying object.
    pub fn stat(&self) -> io::Result<Stat> {
        rustix::fs::fstat(self.fd()?).map_err(io::Error::from)
    }

    /// Drops the cached descriptor, unless the node cannot reopen its object or someone is
    /// using the slot right now.
    fn evict(&self) -> Evicted {
        if self.handle.is_none() {
            return Evicted::Empty;
        }
        match self.fd.try_lock() {
            Some(mut g) => match g.take() {
                Some(_) => Evicted::Yes,
                None => Evicted::Empty,
            },
            None => Evicted::Busy,
        }
    }
}

/// Not looked at since the node was created or its attributes changed.
pub const PRIVS_UNKNOWN: u8 = 0;
/// No set-id bits, no file capabilities.
pub const PRIVS_NONE: u8 = 1;
/// Set-id bits or file capabilities.
pub const PRIVS_SOME: u8 = 2;

/// What [`Node::evict`] did.
enum Evicted {
    /// Closed its descriptor (unless in use elsewhere).
    Yes,
    /// Had none to close (or may never close it).
    Empty,
    /// Contended.
    Busy,
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.handle.is_some() && self.fd.get_mut().is_some() {
            self.cache.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The bounded cache of descriptors of nodes that have a file handle: a clock (second-chance)
/// queue of the nodes holding one.
pub struct FdCache {
    /// Any descriptor on the root's mount, for `open_by_handle_at`.
    mount: Arc<OwnedFd>,
    /// The root's mount id: only objects on that mount get handles.
    mount_id: Option<i32>,
    /// Descriptors held by evictable nodes.
    open: AtomicUsize,
    /// How many of those to keep: at most `limit`, less after running out of descriptors,
    /// and never more than the open-file limit allows (re-read now and then: it may be
    /// changed from outside, `prlimit`).
    capacity: AtomicUsize,
    /// The capacity asked for.
    limit: usize,
    /// Descriptors cached since the open-file limit was last read.
    since_rlimit: AtomicUsize,
    /// What the open-file limit allowed when last read.
    allowed: AtomicUsize,
    clock: Mutex<VecDeque<Weak<Node>>>,
}

/// Largest file handle asked for (`MAX_HANDLE_SZ`).
const MAX_HANDLE: usize = 128;

/// `struct file_handle` header: `handle_bytes` and `handle_type`.
const HANDLE_HEADER: usize = 8;

impl FdCache {
    /// A cache keeping about `capacity` descriptors, reopening by handle on `mount`'s file
    /// system. File handles are used only if they work here (they need `CAP_DAC_READ_SEARCH`
    /// and a file system that supports them).
    pub fn new(mount: Arc<OwnedFd>, capacity: usize) -> FdCache {
        let mut cache = FdCache {
            mount,
            mount_id: None,
            open: AtomicUsize::new(0),
            capacity: AtomicUsize::new(capacity.max(16).min(rlimit_capacity())),
            limit: capacity.max(16),
            since_rlimit: AtomicUsize::new(0),
            allowed: AtomicUsize::new(rlimit_capacity()),
            clock: Mutex::new(VecDeque::new()),
        };
        let probe = handle_of(cache.mount.as_fd()).and_then(|(h, id)| {
            let fd = cache.open_by_handle(&h)?;
            let (a, b) = (rustix::fs::fstat(&fd)?, rustix::fs::fstat(&*cache.mount)?);
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
                return Err(io::Error::other("the root's handle opened another object"));
            }
            Ok(id)
        });
        match probe {
            Ok(id) => cache.mount_id = Some(id),
            Err(e) => tracing::warn!(
                error = %e,
                "file handles unavailable under the capture root: the daemon keeps one descriptor per inode the kernel caches (bounded by RLIMIT_NOFILE)"
            ),
        }
        cache
    }

    /// Whether nodes get file handles (and their descriptors may be evicted).
    pub fn handles(&self) -> bool {
        self.mount_id.is_some()
    }

    /// Descriptors currently held by evictable nodes.
    pub fn held(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The file handle of the object `fd` refers to, if it is on the root's mount.
    fn handle_for(&self, fd: BorrowedFd<'_>) -> Option<Box<[u8]>> {
        let want = self.mount_id?;
        match handle_of(fd) {
            Ok((h, id)) if id == want => Some(h),
            _ => None,
        }
    }

    fn open_by_handle(&self, handle: &[u8]) -> io::Result<OwnedFd> {
        let mut buf = handle.to_vec();
        self.retry(|| {
            // SAFETY: `buf` holds a `struct file_handle` as `name_to_handle_at` filled it
            // (header and `handle_bytes` bytes); the kernel only reads it.
            let fd = unsafe {
                libc::open_by_handle_at(
                    self.mount.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::file_handle>(),
                    libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(rustix::io::Errno::from_raw_os_error(
                    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO),
                ));
            }
            // SAFETY: a descriptor the kernel just returned, owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .map_err(io::Error::from)
    }

    /// Runs `open`, and once more after giving back half of the cache if it failed for lack of
    /// descriptors.
    pub fn retry<T>(&self, mut open: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
        match open() {
            Err(e) if e == rustix::io::Errno::MFILE || e == rustix::io::Errno::NFILE => {
                let held = self.held();
                let keep = held / 2;
                tracing::debug!(held, keep, "out of descriptors: shrinking the node descriptor cache");
                self.capacity.store(keep.max(16), Ordering::Relaxed);
                self.shrink(keep, true);
                open()
            }
            r => r,
        }
    }

    /// A node now holds a cached descriptor.
    fn cached(&self, node: Weak<Node>) {
        if self.since_rlimit.fetch_add(1, Ordering::Relaxed) % 32 == 31 {
            // The limit changed (`prlimit`): follow it.
            let allowed = rlimit_capacity();
            if self.allowed.swap(allowed, Ordering::Relaxed) != allowed {
                self.capacity.store(allowed.min(self.limit), Ordering::Relaxed);
            }
        }
        let n = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let mut clock = self.clock.lock();
        clock.push_back(node);
        let cap = self.capacity.load(Ordering::Relaxed);
        if n > cap {
            drop(clock);
            self.shrink(cap - cap / 4, false);
        } else if clock.len() > 2 * cap + 1024 {
            // Entries of forgotten nodes accumulate while nothing needs evicting.
            clock.retain(|w| w.upgrade().is_some_and(|n| n.fd.lock().is_some()));
        }
    }

    /// Evicts until at most `keep` descriptors are held: least recently used first, skipping
    /// (once) those used since the clock last passed, unless `hard`.
    fn shrink(&self, keep: usize, hard: bool) {
        let mut clock = self.clock.lock();
        let mut budget = 2 * clock.len() + 1;
        while self.open.load(Ordering::Relaxed) > keep && budget > 0 {
            budget -= 1;
            let Some(w) = clock.pop_front() else { break };
            let Some(node) = w.upgrade() else { continue };
            if !hard && node.referenced.swap(false, Ordering::Relaxed) {
                clock.push_back(w);
                continue;
            }
            match node.evict() {
                Evicted::Yes => {
                    self.open.fetch_sub(1, Ordering::Relaxed);
                }
                Evicted::Empty => {}
                Evicted::Busy => clock.push_back(w),
            }
        }
    }
}

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the object's handle and its mount id.
fn handle_of(fd: BorrowedFd<'_>) -> io::Result<(Box<[u8]>, i32)> {
    let mut buf = vec![0u8; HANDLE_HEADER + MAX_HANDLE];
    buf[..4].copy_from_slice(&(MAX_HANDLE as u32).to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is a `struct file_handle` with room for MAX_HANDLE bytes, as its
    // `handle_bytes` says; the path is a NUL-terminated empty string.
    let r = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    buf.truncate(HANDLE_HEADER + len.min(MAX_HANDLE));
    Ok((buf.into_boxed_slice(), mount_id))
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
    cache: Arc<FdCache>,
}

/// Descriptors the cache may hold by default; [`rlimit_capacity`] bounds it further.
const DEFAULT_CAPACITY: usize = 65_536;

/// A quarter of the open-file limit: the rest is for files applications open through the
/// mount, the spool, the link and the replica of an embedded target.
fn rlimit_capacity() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1 << 20);
    (soft / 4).clamp(16, 1 << 30) as usize
}

impl Nodes {
    /// A table holding just the root, whose underlying directory is `root_fd`.
    pub fn new(root_fd: &Arc<OwnedFd>, locks: Arc<super::locks::Locks>) -> io::Result<Nodes> {
        Nodes::with_capacity(root_fd, locks, DEFAULT_CAPACITY)
    }

    /// [`Nodes::new`] keeping about `capacity` node descriptors open.
    pub fn with_capacity(
        root_fd: &Arc<OwnedFd>,
        locks: Arc<super::locks::Locks>,
        capacity: usize,
    ) -> io::Result<Nodes> {
        let cache = Arc::new(FdCache::new(root_fd.clone(), capacity));
        let fd =
            rustix::fs::openat(root_fd, ".", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, 0.into())?;
        let st = rustix::fs::fstat(&fd)?;
        let key = (st.st_dev, st.st_ino);
        let root = Arc::new_cyclic(|me| Node {
            id: ROOT,
            key,
            kind: libc::S_IFDIR,
            lookups: AtomicU64::new(1),
            places: Mutex::new(Vec::new()),
            data: locks.file(key),
            io: Mutex::new(IoState::default()),
            mtime_dirty: AtomicBool::new(false),
            privs: std::sync::atomic::AtomicU8::new(PRIVS_UNKNOWN),
            handle: None,
            fd: Mutex::new(Some(NodeFd(Arc::new(fd)))),
            referenced: AtomicBool::new(false),
            cache: cache.clone(),
            me: me.clone(),
        });
        let mut t = Tables::default();
        t.by_key.insert(key, ROOT);
        t.by_id.insert(ROOT, root);
        Ok(Nodes { tables: RwLock::new(t), next: AtomicU64::new(ROOT + 1), locks, cache })
    }

    /// The descriptor cache.
    pub fn cache(&self) -> &FdCache {
        &self.cache
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.tables.read().by_id.len()
    }

    /// Whether only the root is known.
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
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
        let known = match known {
            Some(node) if !node.is(st) => {
                // A dead object whose inode number the file system gave to this new one: the
                // kernel may still hold the old node (a file open after its unlink, a removed
                // directory some process is in), but it must not stand for the new object.
                let mut t = self.tables.write();
                // The lookup counted above is taken back under the write lock, as `forget`
                // counts, so a node the kernel forgot meanwhile does not linger.
                let left = node.lookups.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
                if t.by_key.get(&key) == Some(&node.id) {
                    t.by_key.remove(&key);
                }
                if left == 0 {
                    t.by_id.remove(&node.id);
                }
                None
            }
            known => known,
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
        let pfd = parent.fd()?;
        let fd = self.cache.retry(|| {
            rustix::fs::openat(&pfd, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, 0.into())
        })?;
        let st2 = rustix::fs::fstat(&fd)?;
        if (st2.st_dev, st2.st_ino) != key {
            // Replaced between the stat and the open: report the race as a stale entry.
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        let handle = self.cache.handle_for(fd.as_fd());
        let mut t = self.tables.write();
        if let Some(&id) = t.by_key.get(&key) {
            let node = t.by_id[&id].clone();
            drop(t);
            node.lookups.fetch_add(1, Ordering::Relaxed);
            node.places.lock().push(place);
            return Ok(node);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evictable = handle.is_some();
        let node = Arc::new_cyclic(|me| Node {
            id,
            key,
            kind: st.st_mode & libc::S_IFMT,
            lookups: AtomicU64::new(1),
            places: Mutex::new(vec![place]),
            data: self.locks.file(key),
            io: Mutex::new(IoState::default()),
            mtime_dirty: AtomicBool::new(false),
            privs: std::sync::atomic::AtomicU8::new(PRIVS_UNKNOWN),
            handle,
            fd: Mutex::new(Some(NodeFd(Arc::new(fd)))),
            referenced: AtomicBool::new(true),
            cache: self.cache.clone(),
            me: me.clone(),
        });
        t.by_key.insert(key, id);
        t.by_id.insert(id, node.clone());
        drop(t);
        if evictable {
            self.cache.cached(Arc::downgrade(&node));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table(dir: &std::path::Path, capacity: usize) -> Nodes {
        let root = Arc::new(
            rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, 0.into()).unwrap(),
        );
        Nodes::with_capacity(&root, Arc::new(super::super::locks::Locks::default()), capacity).unwrap()
    }

    #[test]
    fn descriptors_stay_bounded_and_evicted_nodes_reopen_their_object() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..300 {
            std::fs::write(d.path().join(format!("f{i}")), format!("{i}")).unwrap();
        }
        let nodes = table(d.path(), 32);
        // Handles depend on the file system under TMPDIR (ext4, xfs and btrfs have them);
        // CI puts TMPDIR on disk, so their absence fails there.
        if !doppel_testkit::require(nodes.cache().handles(), "file handles are not available here") {
            return;
        }
        let root = nodes.get(ROOT).unwrap();
        let rfd = root.fd().unwrap();
        let mut all = Vec::new();
        for i in 0..300 {
            let name = format!("f{i}");
            let st = stat_at(&rfd, name.as_bytes()).unwrap();
            all.push((nodes.found(&root, name.as_bytes(), &st).unwrap(), st));
            assert!(nodes.cache().held() <= 32, "{} descriptors held", nodes.cache().held());
        }
        // Renamed while evicted: the handle still finds the very same object.
        std::fs::rename(d.path().join("f0"), d.path().join("renamed")).unwrap();
        for (node, st) in &all {
            let now = node.stat().unwrap();
            assert_eq!((now.st_dev, now.st_ino), (st.st_dev, st.st_ino));
            assert!(nodes.cache().held() <= 32);
        }
        // Gone: stale, never another object.
        std::fs::remove_file(d.path().join("f1")).unwrap();
        let gone = &all[1].0;
        assert!(!matches!(gone.evict(), Evicted::Busy));
        let e = gone.fd().err().map(|e| e.raw_os_error());
        assert_eq!(e, Some(Some(libc::ESTALE)));
    }

    /// An inode number names an object only while it lives: a new object given the number of
    /// a dead one that the kernel still holds (open after its unlink, evicted from the
    /// descriptor cache) gets a node of its own, never the dead one's (whose descriptor would
    /// reach the dead object, and whose kernel inode the new name would share).
    #[test]
    fn a_reused_inode_number_gets_a_new_node() {
        let d = tempfile::tempdir().unwrap();
        let nodes = table(d.path(), 16);
        if !doppel_testkit::require(nodes.cache().handles(), "file handles are not available here") {
            return;
        }
        let root = nodes.get(ROOT).unwrap();
        let rfd = root.fd().unwrap();
        let mut reused = None;
        for i in 0..50 {
            let old = format!("old{i}");
            std::fs::create_dir(d.path().join(&old)).unwrap();
            let st = stat_at(&rfd, old.as_bytes()).unwrap();
            let dead = nodes.found(&root, old.as_bytes(), &st).unwrap();
            nodes.cache().shrink(0, true);
            std::fs::remove_dir(d.path().join(&old)).unwrap();
            nodes.unnamed(ROOT, old.as_bytes(), Some((st.st_dev, st.st_ino)));
            let new = format!("new{i}");
            std::fs::create_dir(d.path().join(&new)).unwrap();
            let st2 = stat_at(&rfd, new.as_bytes()).unwrap();
            if st2.st_ino == st.st_ino {
                reused = Some((dead, new, st2));
                break;
            }
        }
        // A file system that never gives a number back at once has nothing to check; ext4
        // (CI's) reuses the number of a directory just removed.
        let Some((dead, new, st2)) = doppel_testkit::require_ok(
            reused.ok_or_else(|| "the file system reused no inode number in 50 tries".to_string()),
        ) else {
            return;
        };
        let node = nodes.found(&root, new.as_bytes(), &st2).unwrap();
        assert_ne!(node.id, dead.id, "the new object got the dead one's node");
        let now = node.stat().unwrap();
        assert_eq!((now.st_dev, now.st_ino), (st2.st_dev, st2.st_ino));
        assert_eq!(nodes.path(&node).unwrap().to_wire().0, new.as_bytes());
        // The dead node stays until the kernel forgets it, then goes.
        assert!(nodes.get(dead.id).is_some());
        nodes.forget(dead.id, 1);
        assert!(nodes.get(dead.id).is_none());
        assert_eq!(nodes.found(&root, new.as_bytes(), &st2).unwrap().id, node.id, "known from now on");
    }
}
