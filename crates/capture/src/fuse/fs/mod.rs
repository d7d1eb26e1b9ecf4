//! The pass-through file system served on the mount.
//!
//! Every request is carried out on the underlying tree through node handles (never through the
//! mount), then reported. The methods of the `fuser::Filesystem` implementation below only
//! dispatch; the work lives in [`names`] (ops that change names), [`data`] (open files: reads,
//! writes, sync) and [`meta`] (attributes, directories, extended attributes).

mod data;
mod meta;
mod names;
mod privs;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use doppel_proto::{Attrs, Op, RelPath, Timestamp};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use rustix::fs::Stat;

use super::locks::Locks;
use super::nodes::{Node, Nodes};
use super::{CaptureSink, Dirty};

/// How long the kernel may cache names and attributes. Everything that changes the tree goes
/// through this daemon, which answers with fresh attributes each time, and the kernel drops
/// what a change through the mount makes stale (a write: size and times; a write that drops
/// set-id bits: the mode; links, renames, unlinks: counts and ctime), so caching is safe. With
/// 1 s, a scan of an unchanged tree (`find`, a backup, a web server's `stat`s) paid a round
/// trip per name whenever it came back after a second: 38,700 `lstat`s/s against 293,600/s
/// with 60 s (15,000 files, native 220,000-330,000/s). Atimes the underlying file system moves
/// on passthrough reads show through the mount up to this late.
const TTL: Duration = Duration::from_secs(60);

/// [`TTL`] with the write-back cache: there, writes to a mount whose daemon died keep landing
/// in the page cache, and seem to succeed, until the kernel needs the daemon again, which an
/// expired attribute makes it do; with 60 s an application went on writing into a dead mount
/// for a minute instead of reopening its files on the new one (`fuse_crash.rs`).
const WRITEBACK_TTL: Duration = Duration::from_secs(1);

/// Largest write the kernel sends in one request.
const MAX_WRITE: u32 = 1 << 20;

/// A directory entry as readdir returns it: inode number, type, name.
pub(super) type DirEntry = (u64, FileType, Vec<u8>);

/// An open file or directory.
pub(super) enum Handle {
    File(OpenFile),
    Dir { node: Arc<Node>, entries: Mutex<Option<Vec<DirEntry>>> },
}

/// An open file.
pub(super) struct OpenFile {
    file: std::fs::File,
    node: Arc<Node>,
    writable: bool,
    /// `O_SYNC`/`O_DSYNC`: every write is a durability barrier.
    sync: bool,
    /// Served by kernel passthrough (counted in the node's io state).
    passthrough: bool,
    wrote: AtomicBool,
}

/// Kernel features asked for.
pub(super) struct Wanted {
    /// Kernel passthrough for read-only opens.
    pub passthrough: bool,
    /// The kernel write-back cache.
    pub writeback: bool,
}

/// The file system.
pub(super) struct DoppelFs<S: CaptureSink> {
    nodes: Nodes,
    locks: Arc<Locks>,
    sink: Arc<S>,
    root_fd: Arc<OwnedFd>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    want: Wanted,
    passthrough: Arc<AtomicBool>,
    /// The kernel write-back cache is on: buffered writes reach the daemon when the kernel
    /// writes pages back (see `FuseOptions::writeback`).
    writeback: Arc<AtomicBool>,
    /// The daemon drops set-id bits and file capabilities on writes (see [`privs`]).
    killpriv: AtomicBool,
}

impl<S: CaptureSink> DoppelFs<S> {
    pub(super) fn new(
        root_fd: &Arc<OwnedFd>,
        locks: Arc<Locks>,
        sink: Arc<S>,
        want: Wanted,
        passthrough: Arc<AtomicBool>,
        writeback: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        Ok(DoppelFs {
            nodes: Nodes::new(root_fd, locks.clone())?,
            locks,
            sink,
            root_fd: root_fd.clone(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            want,
            passthrough,
            writeback,
            killpriv: AtomicBool::new(false),
        })
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Node>, Errno> {
        self.nodes.get(ino.0).ok_or(Errno::ENOENT)
    }

    fn add_handle(&self, h: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(h));
        FileHandle(fh)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn file(&self, fh: FileHandle) -> Result<(Arc<Handle>, bool), Errno> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::File(f) => {
                let w = f.writable;
                Ok((h, w))
            }
            Handle::Dir { .. } => Err(Errno::EISDIR),
        }
    }

    /// Sequences `ops` for a change prepared with `prep`. A failure here means the change
    /// happened but could not be queued: the activity log still covers it, so it is logged,
    /// not reported to the application.
    fn commit(&self, prep: S::Prepared, ops: Vec<Op>) -> Option<u64> {
        if ops.is_empty() {
            drop(prep);
            return None;
        }
        match self.sink.commit(prep, ops) {
            Ok(seq) => Some(seq),
            Err(e) => {
                tracing::error!(error = %e, "a captured change could not be queued; it will be found again by comparison");
                None
            }
        }
    }

    /// How long the kernel may cache what this reply says (see [`TTL`], [`WRITEBACK_TTL`]).
    fn ttl(&self) -> Duration {
        if self.writeback.load(Ordering::Relaxed) { WRITEBACK_TTL } else { TTL }
    }

    /// The access mode the daemon opens the underlying file with for an application's
    /// `access`: with the write-back cache the kernel reads pages of files opened write-only
    /// (to fill partly written pages), so those are opened read-write.
    fn daemon_access(&self, access: i32) -> i32 {
        if access == libc::O_WRONLY && self.writeback.load(Ordering::Relaxed) { libc::O_RDWR } else { access }
    }

    /// Flags of an open of `node` served through the page cache: with the write-back cache the
    /// kernel's pages are the file's newest content (every change goes through the mount), so
    /// they are kept across opens instead of being dropped (and written back) at each one;
    /// unless writes went around them since (direct writes of an inode in passthrough mode).
    fn cached_open_flags(&self, node: &Node) -> fuser::FopenFlags {
        let stale = std::mem::take(&mut node.io.lock().stale_cache);
        if self.writeback.load(Ordering::Relaxed) && !stale {
            fuser::FopenFlags::FOPEN_KEEP_CACHE
        } else {
            fuser::FopenFlags::empty()
        }
    }

    fn prepare(&self, dirty: &[Dirty<'_>]) -> Result<S::Prepared, Errno> {
        self.sink.prepare(dirty).map_err(|e| {
            tracing::error!(error = %e, "cannot record a change in the activity log; refusing it");
            Errno::EIO
        })
    }

    /// An op setting the modification time of `node` (at `path`) to its current value: sent
    /// after the ops that moved it, so the replica ends with the source's times.
    fn mtime_op(node: &Node, path: &RelPath) -> Option<Op> {
        let st = node.stat().ok()?;
        Some(Op::SetAttr {
            path: path.to_wire(),
            attrs: Attrs { mtime: Some(ts(st.st_mtime, st.st_mtime_nsec)), ..Attrs::default() },
        })
    }
}

/// The errno of an I/O error.
fn errno(e: impl Into<io::Error>) -> Errno {
    Errno::from(e.into())
}

fn ts(secs: i64, nanos: impl TryInto<u32>) -> Timestamp {
    Timestamp { secs, nanos: nanos.try_into().unwrap_or(0) }
}

fn systime(secs: i64, nanos: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos as u64)
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Kernel attributes of node `id` from the underlying object's `st`.
fn attr(id: u64, st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: systime(st.st_atime, st.st_atime_nsec as i64),
        mtime: systime(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: systime(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: systime(st.st_mtime, st.st_mtime_nsec as i64),
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn bytes(name: &OsStr) -> &[u8] {
    name.as_bytes()
}

impl<S: CaptureSink> Filesystem for DoppelFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // Direct I/O submitted asynchronously (a VM's image with `cache=none`, libaio, io_uring)
        // reaches the daemon as it was queued, many requests at once, instead of each
        // submission waiting for the one before: without it a queue depth of 16 is served as 1.
        // Their order is unchanged: the kernel had them in flight together, and each is
        // sequenced when its effect lands (`locks::FileState`).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        if config.add_capabilities(fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2).is_ok() {
            self.killpriv.store(true, Ordering::Relaxed);
        }
        if self.want.writeback && config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE).is_ok() {
            self.writeback.store(true, Ordering::Relaxed);
        }
        if self.want.passthrough
            && config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, bytes(name)) {
            Ok((id, st)) => reply.entry(&self.ttl(), &attr(id, &st), fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.nodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // An open file answers through its own descriptor (it may have no name any more).
        let open = fh.and_then(|fh| self.handle(fh).ok());
        let st = match open.as_deref() {
            Some(Handle::File(f)) => rustix::fs::fstat(&f.file).map_err(errno),
            _ => self.node(ino).and_then(|n| n.stat().map_err(errno)),
        };
        match st {
            Ok(st) => reply.attr(&self.ttl(), &attr(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = meta::AttrChange { mode, uid, gid, size, atime, mtime };
        match self.do_setattr(ino, change, fh, privs::Caller::unprivileged(req)) {
            Ok(st) => reply.attr(&self.ttl(), &attr(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = self.node(ino).and_then(|n| {
            let fd = n.fd().map_err(errno)?;
            rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(errno)
        });
        match target {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let what = names::Make::Node { mode: mode & !umask, rdev };
        self.reply_entry(self.do_make(req, parent, bytes(name), what), reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let what = names::Make::Dir { mode: mode & !umask };
        self.reply_entry(self.do_make(req, parent, bytes(name), what), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.do_remove(parent, bytes(name), false), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.do_remove(parent, bytes(name), true), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let what = names::Make::Symlink { target: target.as_os_str().as_bytes().to_vec() };
        self.reply_entry(self.do_make(req, parent, bytes(link_name), what), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.do_rename(parent, bytes(name), newparent, bytes(newname), flags), reply);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.reply_entry(self.do_link(ino, newparent, bytes(newname)), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.do_open(ino, flags.0, reply);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(fh, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID).then(|| privs::Caller::of(req));
        match self.do_write(fh, offset, data, write_flags.contains(WriteFlags::FUSE_WRITE_CACHE), kill) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    /// Nothing to do at a close: every write was made (and sequenced) before it returned, the
    /// kernel writes back its cache (write-back mode) before it would send this, and POSIX
    /// locks are the kernel's own (`FUSE_POSIX_LOCKS` is not asked for). `ENOSYS` tells the
    /// kernel so once for all: it sends no `FLUSH` again, which saves a round trip per `close`.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.do_release(fh);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        reply_empty(self.do_fsync(fh, datasync), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(node) if node.is_dir() => {
                let fh = self.add_handle(Handle::Dir { node, entries: Mutex::new(None) });
                reply.opened(fh, fuser::FopenFlags::empty());
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.do_readdir(fh, offset, reply);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(self.do_fsyncdir(ino), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::fstatvfs(&*self.root_fd) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.do_setxattr(ino, bytes(name), Some((value, flags))), reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.do_getxattr(ino, Some(bytes(name)), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.do_getxattr(ino, None, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.do_setxattr(ino, bytes(name), None), reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (`default_permissions`).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.do_create(req, parent, bytes(name), mode & !umask, flags) {
            Ok((node, st, fh)) => {
                let open = self.cached_open_flags(&node);
                reply.created(&self.ttl(), &attr(node.id, &st), fuser::Generation(0), fh, open)
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.do_fallocate(fh, offset, length, mode), reply);
    }

    /// No ioctl reaches the underlying file: an ioctl may change data in ways no op can
    /// describe (`FICLONE`, `FS_IOC_SETFLAGS`), so they are refused the way a file system
    /// without them refuses (`ENOTTY`), which tools such as `mkfs` treat as "not a device".
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.do_lseek(fh, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }
}

impl<S: CaptureSink> DoppelFs<S> {
    fn reply_entry(&self, r: Result<(u64, Stat), Errno>, reply: ReplyEntry) {
        match r {
            Ok((id, st)) => reply.entry(&self.ttl(), &attr(id, &st), fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

fn reply_empty(r: Result<(), Errno>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}
