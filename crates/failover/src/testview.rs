//! A test failover's view of a replica: a past point, writable, with nothing copied.
//!
//! A read-only FUSE file system serves a [`PointView`] (the live replica plus its undo
//! journal, read lazily, see `doppel_apply::history::view`), and an overlay mount puts a
//! private upper directory over it: writes land there, never in the replica, and go with the
//! view. Starting one costs a mount whatever the replica's size, on any file system with file
//! handles (ext4 included, no reflinks needed), and apply goes on meanwhile.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use doppel_apply::history::Handle;
use doppel_apply::history::view::{ObjMeta, PointView};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use parking_lot::Mutex;

/// A point never changes: the kernel may cache what it was told.
const TTL: Duration = Duration::from_secs(3600);

/// Inode numbers for handles (1 is the root).
struct Inodes {
    by_handle: HashMap<Handle, u64>,
    by_ino: HashMap<u64, Handle>,
}

impl Inodes {
    fn ino(&mut self, h: &Handle) -> u64 {
        if let Some(i) = self.by_handle.get(h) {
            return *i;
        }
        let i = self.by_ino.len() as u64 + 1;
        self.by_handle.insert(h.clone(), i);
        self.by_ino.insert(i, h.clone());
        i
    }
}

/// The FUSE side of a view.
pub struct ViewFs {
    view: Mutex<PointView>,
    inodes: Mutex<Inodes>,
    statfs_root: PathBuf,
}

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn systime(t: doppel_proto::Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::from_nanos(u64::from(t.nanos))
    }
}

fn kind(k: u32) -> FileType {
    match k {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, m: &ObjMeta) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: m.size,
        blocks: m.size.div_ceil(512),
        atime: systime(m.atime),
        mtime: systime(m.mtime),
        ctime: systime(m.mtime),
        crtime: systime(m.mtime),
        kind: kind(m.kind),
        perm: (m.mode & 0o7777) as u16,
        nlink: m.nlink.max(1) as u32,
        uid: m.uid,
        gid: m.gid,
        rdev: m.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

impl ViewFs {
    /// Serves `view`; `statfs_root` answers `statfs` (the replica's file system).
    pub fn new(view: PointView, statfs_root: &Path) -> io::Result<ViewFs> {
        let root = view.root()?;
        let mut inodes = Inodes { by_handle: HashMap::new(), by_ino: HashMap::new() };
        inodes.ino(&root);
        Ok(ViewFs {
            view: Mutex::new(view),
            inodes: Mutex::new(inodes),
            statfs_root: statfs_root.to_path_buf(),
        })
    }

    fn handle(&self, ino: INodeNo) -> Result<Handle, Errno> {
        self.inodes.lock().by_ino.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn entry(&self, h: &Handle) -> Result<FileAttr, Errno> {
        let m = self.view.lock().meta(h).map_err(errno)?;
        Ok(attr(self.inodes.lock().ino(h), &m))
    }

    fn xattrs(&self, ino: INodeNo) -> Result<Vec<doppel_proto::Xattr>, Errno> {
        let h = self.handle(ino)?;
        self.view.lock().xattrs(&h).map_err(errno)
    }
}

impl Filesystem for ViewFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.handle(parent).and_then(|p| {
            let child = self.view.lock().lookup(&p, name.as_bytes()).map_err(errno)?.ok_or(Errno::ENOENT)?;
            self.entry(&child)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.handle(ino).and_then(|h| self.entry(&h)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.handle(ino).and_then(|h| self.view.lock().readlink(&h).map_err(errno)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), fuser::FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.handle(ino).and_then(|h| {
            let mut buf = vec![0u8; size as usize];
            let n = self.view.lock().read(&h, offset, &mut buf).map_err(errno)?;
            buf.truncate(n);
            Ok(buf)
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), fuser::FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let r = self.handle(ino).and_then(|h| {
            let list = self.view.lock().read_dir(&h).map_err(errno)?;
            let mut out = Vec::with_capacity(list.len());
            for (name, child) in list {
                let k = self.view.lock().meta(&child).map(|m| kind(m.kind)).unwrap_or(FileType::RegularFile);
                out.push((self.inodes.lock().ino(&child), k, name));
            }
            Ok(out)
        });
        match r {
            Ok(list) => {
                for (i, (ino, k, name)) in list.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), (i + 1) as u64, *k, OsStr::from_bytes(name)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.xattrs(ino) {
            Ok(list) => match list.into_iter().find(|x| x.name == name.as_bytes()) {
                Some(x) if size == 0 => reply.size(x.value.len() as u32),
                Some(x) if x.value.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
                Some(x) => reply.data(&x.value),
                None => reply.error(Errno::from_i32(libc::ENODATA)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.xattrs(ino) {
            Ok(list) => {
                let mut names = Vec::new();
                for x in list {
                    names.extend_from_slice(&x.name);
                    names.push(0);
                }
                if size == 0 {
                    reply.size(names.len() as u32);
                } else if names.len() > size as usize {
                    reply.error(Errno::from_i32(libc::ERANGE));
                } else {
                    reply.data(&names);
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::statvfs(&self.statfs_root) {
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
            Err(e) => reply.error(errno(e.into())),
        }
    }
}

/// A mounted view: the FUSE point view under an overlay with a private upper directory.
pub struct MountedView {
    /// Where the workload sees it.
    pub view: PathBuf,
    lower: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl MountedView {
    /// Mounts `view` (a point of the replica at `replica`) under `dir`: `dir/lower` (the point,
    /// read-only), `dir/upper` and `dir/work` (the view's own writes), `dir/view` (what the
    /// test uses).
    pub fn mount(view: PointView, replica: &Path, dir: &Path) -> io::Result<MountedView> {
        let (lower, upper, work, top) =
            (dir.join("lower"), dir.join("upper"), dir.join("work"), dir.join("view"));
        for d in [&lower, &upper, &work, &top] {
            std::fs::create_dir_all(d)?;
        }
        let fs = ViewFs::new(view, replica)?;
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("doppel-view".into()),
            fuser::MountOption::Subtype("doppel-view".into()),
            fuser::MountOption::RO,
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::Dev,
            fuser::MountOption::Suid,
            fuser::MountOption::Exec,
        ];
        config.acl = fuser::SessionACL::All;
        let session = fuser::Session::new(fs, &lower, &config)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot mount the point view on {}: {e}", lower.display()))
            })?
            .spawn()?;
        let mut m = MountedView { view: top.clone(), lower: lower.clone(), session: Some(session) };
        // An overlay's root takes its upper directory's attributes: give it the point's.
        if let Err(e) = copy_attrs(&lower, &upper) {
            m.unmount();
            return Err(e);
        }
        let data =
            format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
        let data = std::ffi::CString::new(data).map_err(|_| io::ErrorKind::InvalidInput)?;
        let flags = rustix::mount::MountFlags::empty();
        if let Err(e) = rustix::mount::mount("doppel-test", &top, "overlay", flags, Some(data.as_c_str())) {
            m.unmount();
            return Err(io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot put a writable overlay on the point view at {}: {e}", top.display()),
            ));
        }
        Ok(m)
    }

    /// Unmounts the overlay and the point view (detaching: a process still inside them keeps
    /// what it holds, and nothing else sees them).
    pub fn unmount(&mut self) {
        let _ = rustix::mount::unmount(&self.view, rustix::mount::UnmountFlags::DETACH);
        let _ = rustix::mount::unmount(&self.lower, rustix::mount::UnmountFlags::DETACH);
        drop(self.session.take());
    }
}

impl Drop for MountedView {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Makes `to`'s mode, owner, times and extended attributes those of `from`.
fn copy_attrs(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(from)?;
    std::os::unix::fs::chown(to, Some(m.uid()), Some(m.gid()))?;
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(m.mode() & 0o7777))?;
    let dir = rustix::fs::open(
        to,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )?;
    doppel_fs::xattr::replace_all(std::os::fd::AsFd::as_fd(&dir), &doppel_fs::xattr::read_all(from)?)?;
    let ts = |s: i64, n: i64| rustix::fs::Timespec { tv_sec: s, tv_nsec: n as _ };
    let times = rustix::fs::Timestamps {
        last_access: ts(m.atime(), m.atime_nsec()),
        last_modification: ts(m.mtime(), m.mtime_nsec()),
    };
    rustix::fs::utimensat(rustix::fs::CWD, to, &times, rustix::fs::AtFlags::empty())?;
    Ok(())
}

/// Detaches whatever is still mounted beneath `dir` (views left by a killed target).
pub fn detach_beneath(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first: the overlay before the view beneath it.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
    }
}
