//! Attributes, directories and extended attributes.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use doppel_proto::{Attrs, Op, Xattr};
use fuser::{Errno, FileHandle, FileType, INodeNo, ReplyDirectory, ReplyXattr, TimeOrNow};
use rustix::fs::{AtFlags, Mode, OFlags, Stat, Timespec, Timestamps};

use super::{DoppelFs, Handle, errno, kind, ts};
use crate::fuse::{CaptureSink, Dirty};

/// What a `setattr` request asks to change.
pub(super) struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

fn timespec(t: Option<TimeOrNow>) -> Timespec {
    match t {
        None => Timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        Some(TimeOrNow::Now) => Timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as _ },
            Err(e) => {
                let d = e.duration();
                let (s, n) = (d.as_secs() as i64, d.subsec_nanos() as i64);
                if n == 0 {
                    Timespec { tv_sec: -s, tv_nsec: 0 }
                } else {
                    Timespec { tv_sec: -s - 1, tv_nsec: (1_000_000_000 - n) as _ }
                }
            }
        },
    }
}

impl<S: CaptureSink> DoppelFs<S> {
    pub(super) fn do_setattr(
        &self,
        ino: INodeNo,
        c: AttrChange,
        fh: Option<FileHandle>,
        caller: Option<super::privs::Caller>,
    ) -> Result<Stat, Errno> {
        let node = self.node(ino)?;
        let _ns = self.locks.shared();
        let _file = node.data.lock();
        let path = self.nodes.path(&node);
        // `chown(f, -1, -1)` changes no owner but drops set-id bits and capabilities like any
        // chown; with `FUSE_HANDLE_KILLPRIV_V2` the kernel leaves that to the daemon and sends
        // a request changing nothing (the change time at most), which is done as such a chown.
        let chown = c.uid.is_some()
            || c.gid.is_some()
            || (c.mode.is_none() && c.size.is_none() && c.atime.is_none() && c.mtime.is_none());
        // Which set-id bits the caller's chown drops: the daemon's own chown (as root) drops
        // set-group-id only of a group-executable file, the caller's also where the caller is
        // outside the file's group. (The empty request is also how the write-back cache drops
        // privileges before a write, by the same rule and with no permission check. So a
        // `chown(f, -1, -1)` by someone other than the owner, which the kernel refuses natively
        // when it would drop bits, cannot be told apart and drops them here.)
        let kills = match (chown && !node.is_dir(), caller) {
            (true, Some(caller)) => {
                let st = node.stat().map_err(errno)?;
                caller.chown_kills(st.st_mode, st.st_gid)
            }
            _ => 0,
        };
        // A truncate or chown drops privileges (see `privs`): an open descriptor to look.
        let privfd = if self.killpriv.load(Ordering::Relaxed)
            && node.kind == libc::S_IFREG
            && (c.size.is_some() || chown)
        {
            let nfd = node.fd().map_err(errno)?;
            let fd = self
                .nodes
                .cache()
                .retry(|| rustix::fs::open(nfd.proc_path(), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()))
                .map_err(errno)?;
            self.has_privs(&node, fd.as_fd()).then_some(fd)
        } else {
            None
        };
        let prep = match &path {
            Some(p) => Some(self.prepare(&[Dirty::Name(p)])?),
            None => None,
        };
        let mut ops = Vec::new();
        if let Some(size) = c.size {
            let via_handle = fh.and_then(|fh| self.handle(fh).ok());
            match via_handle.as_deref() {
                Some(Handle::File(f)) if f.writable => f.file.set_len(size).map_err(errno)?,
                _ => {
                    let nfd = node.fd().map_err(errno)?;
                    let fd = self
                        .nodes
                        .cache()
                        .retry(|| {
                            rustix::fs::open(nfd.proc_path(), OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
                        })
                        .map_err(errno)?;
                    rustix::fs::ftruncate(&fd, size).map_err(errno)?;
                }
            }
            node.mtime_dirty.store(true, Ordering::Relaxed);
            if let Some(p) = &path {
                ops.push(Op::Truncate { path: p.to_wire(), size });
            }
        }
        let mut attrs = Attrs::default();
        let nfd = node.fd().map_err(errno)?;
        if chown {
            let uid = c.uid.map(rustix::fs::Uid::from_raw);
            let gid = c.gid.map(rustix::fs::Gid::from_raw);
            rustix::fs::chownat(&nfd, "", uid, gid, AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW)
                .map_err(errno)?;
        }
        if kills & libc::S_ISGID != 0 {
            let now = rustix::fs::fstat(&nfd).map_err(errno)?.st_mode;
            if now & libc::S_ISGID != 0 {
                let mode = now & 0o7777 & !libc::S_ISGID;
                rustix::fs::chmod(nfd.proc_path(), Mode::from_raw_mode(mode)).map_err(errno)?;
            }
        }
        if let Some(mode) = c.mode {
            rustix::fs::chmod(nfd.proc_path(), Mode::from_raw_mode(mode & 0o7777)).map_err(errno)?;
        }
        if c.atime.is_some() || c.mtime.is_some() {
            let t = Timestamps { last_access: timespec(c.atime), last_modification: timespec(c.mtime) };
            rustix::fs::utimensat(&nfd, "", &t, AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW)
                .map_err(errno)?;
        }
        if c.mode.is_some() || chown {
            node.privs.store(crate::fuse::nodes::PRIVS_UNKNOWN, Ordering::Relaxed);
        }
        if let Some(fd) = &privfd {
            let kill = if c.size.is_some() { caller } else { None };
            let dropped = self.dropped_privs(&node, fd.as_fd(), kill);
            attrs.xattrs = dropped.xattrs;
        }
        let st = rustix::fs::fstat(&nfd).map_err(errno)?;
        // Send what the object has now: the kernel may have adjusted what was asked (a
        // chown clearing set-id bits, "now" becoming a time).
        if c.uid.is_some() || c.gid.is_some() {
            attrs.uid = Some(st.st_uid);
            attrs.gid = Some(st.st_gid);
        }
        if (c.mode.is_some() || chown || privfd.is_some()) && st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            attrs.mode = Some(st.st_mode & 0o7777);
        }
        if c.atime.is_some() {
            attrs.atime = Some(ts(st.st_atime, st.st_atime_nsec));
        }
        if c.mtime.is_some() || c.size.is_some() {
            attrs.mtime = Some(ts(st.st_mtime, st.st_mtime_nsec));
        }
        if let Some(p) = &path
            && !attrs.is_empty()
        {
            ops.push(Op::SetAttr { path: p.to_wire(), attrs });
        }
        if let Some(prep) = prep {
            self.commit(prep, ops);
        }
        Ok(st)
    }

    pub(super) fn do_readdir(&self, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let Handle::Dir { node, entries } = &*h else { return reply.error(Errno::ENOTDIR) };
        let mut entries = entries.lock();
        if offset == 0 || entries.is_none() {
            match read_dir(node, self.nodes.cache()) {
                Ok(e) => *entries = Some(e),
                Err(e) => return reply.error(e),
            }
        }
        let list = entries.as_ref().expect("just filled");
        for (i, (ino, k, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(*ino),
                (i + 1) as u64,
                *k,
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    /// Sets (`Some`) or removes (`None`) an extended attribute, then sends the full set.
    pub(super) fn do_setxattr(
        &self,
        ino: INodeNo,
        name: &[u8],
        value: Option<(&[u8], i32)>,
    ) -> Result<(), Errno> {
        let node = self.node(ino)?;
        if node.kind == libc::S_IFLNK {
            return Err(Errno::EPERM);
        }
        let _ns = self.locks.shared();
        let _file = node.data.lock();
        let path = self.nodes.path(&node);
        let prep = match &path {
            Some(p) => Some(self.prepare(&[Dirty::Name(p)])?),
            None => None,
        };
        let nfd = node.fd().map_err(errno)?;
        let proc = nfd.proc_path();
        node.privs.store(crate::fuse::nodes::PRIVS_UNKNOWN, Ordering::Relaxed);
        match value {
            Some((v, flags)) => {
                rustix::fs::setxattr(&proc, name, v, rustix::fs::XattrFlags::from_bits_retain(flags as u32))
            }
            None => rustix::fs::removexattr(&proc, name),
        }
        .map_err(errno)?;
        let all = doppel_fs_xattrs(&proc);
        if let (Some(p), Some(prep)) = (path, prep) {
            self.commit(
                prep,
                vec![Op::SetAttr {
                    path: p.to_wire(),
                    attrs: Attrs { xattrs: Some(all), ..Attrs::default() },
                }],
            );
        }
        Ok(())
    }

    /// `getxattr` (a name) or `listxattr` (`None`), with the size-query convention.
    pub(super) fn do_getxattr(&self, ino: INodeNo, name: Option<&[u8]>, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if node.kind == libc::S_IFLNK {
            // No attributes on symlinks: an empty list. With a buffer (`size > 0`) the kernel
            // expects the list itself; a size reply there reads as a malformed list (EIO).
            return match name {
                Some(_) => reply.error(Errno::from_i32(libc::ENODATA)),
                None if size == 0 => reply.size(0),
                None => reply.data(&[]),
            };
        }
        let nfd = match node.fd() {
            Ok(fd) => fd,
            Err(e) => return reply.error(errno(e)),
        };
        let proc = nfd.proc_path();
        let mut buf = vec![0u8; 64 * 1024];
        let r = match name {
            Some(n) => rustix::fs::getxattr(&proc, n, &mut buf[..]),
            None => rustix::fs::listxattr(&proc, &mut buf[..]),
        };
        match r {
            Ok(n) if size == 0 => reply.size(n as u32),
            Ok(n) if n > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// The full, sorted xattr set of the object behind a `/proc/self/fd` path.
fn doppel_fs_xattrs(proc: &str) -> Vec<Xattr> {
    let mut names = vec![0u8; 64 * 1024];
    let Ok(n) = rustix::fs::listxattr(proc, &mut names[..]) else { return Vec::new() };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut v = vec![0u8; 64 * 1024];
        if let Ok(len) = rustix::fs::getxattr(proc, name, &mut v[..]) {
            v.truncate(len);
            out.push(Xattr { name: name.to_vec(), value: v });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Every entry of a directory: inode number, type, name.
fn read_dir(
    node: &crate::fuse::nodes::Node,
    cache: &crate::fuse::nodes::FdCache,
) -> Result<Vec<super::DirEntry>, Errno> {
    let nfd = node.fd().map_err(errno)?;
    let fd = cache
        .retry(|| {
            rustix::fs::openat(&nfd, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        })
        .map_err(errno)?;
    let mut dir = rustix::fs::Dir::read_from(&fd).map_err(errno)?;
    let mut out = Vec::new();
    while let Some(e) = dir.read() {
        let e = e.map_err(errno)?;
        let k = match e.file_type() {
            rustix::fs::FileType::Directory => FileType::Directory,
            rustix::fs::FileType::Symlink => FileType::Symlink,
            rustix::fs::FileType::Fifo => FileType::NamedPipe,
            rustix::fs::FileType::Socket => FileType::Socket,
            rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
            rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
            rustix::fs::FileType::RegularFile => FileType::RegularFile,
            rustix::fs::FileType::Unknown => {
                match rustix::fs::statat(&fd, e.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => kind(st.st_mode),
                    Err(_) => continue,
                }
            }
        };
        out.push((e.ino(), k, e.file_name().to_bytes().to_vec()));
    }
    Ok(out)
}
