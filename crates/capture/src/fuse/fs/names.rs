//! Ops that change names: create, mkdir, mknod, symlink, link, unlink, rmdir, rename.
//!
//! Each holds the namespace lock exclusively across the system call and the sequencing of its
//! ops. New objects are created as the daemon (root) and then given to the caller, because the
//! kernel already checked the caller's permissions (`default_permissions`) with all of the
//! caller's groups, which a per-thread credential switch could not reproduce. Every name op also
//! sends the new modification time of the directories it changed.

use doppel_proto::{Attrs, Op, RelPath, RenameFlags as WireRenameFlags};
use fuser::{Errno, INodeNo, RenameFlags, Request};
use rustix::fs::{AtFlags, Mode, OFlags, Stat};

use super::{DoppelFs, Handle, OpenFile, errno, ts};
use crate::fuse::nodes::{Node, Place, stat_at};
use crate::fuse::{CaptureSink, Dirty};

/// What `do_make` creates.
pub(super) enum Make {
    Dir { mode: u32 },
    Node { mode: u32, rdev: u32 },
    Symlink { target: Vec<u8> },
}

/// The path of `name` in the directory at `dir`. Ops carry paths of at most 4,095 bytes from
/// the root: a name that would make a longer one (reachable only through a working directory
/// deep in the tree) is refused as too long, as the kernel refuses such a path.
fn joined(dir: &RelPath, name: &[u8]) -> Result<RelPath, Errno> {
    dir.join(name).map_err(|e| match e {
        doppel_proto::PathError::TooLong(_) => Errno::ENAMETOOLONG,
        _ => Errno::EINVAL,
    })
}

/// The mode a new object `st`, made with `want` (the caller's mode, after its umask), must be
/// given, if it has another (see `privs`): exactly the permission bits asked for (the daemon's
/// own umask may have removed some); a non-directory also the set-id bits asked for (the
/// kernel drops them when the daemon gives the object to its caller); a directory keeps the
/// set-id and sticky bits it got (a set-group-id parent's, and `mkdir` takes no set-id bits).
fn settled_mode(want: u32, st: &Stat) -> Option<u32> {
    let now = st.st_mode & 0o7777;
    let target = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        (now & 0o7000) | (want & 0o777)
    } else {
        want & 0o7777
    };
    (target != now).then_some(target)
}

impl<S: CaptureSink> DoppelFs<S> {
    pub(super) fn do_lookup(&self, parent: INodeNo, name: &[u8]) -> Result<(u64, Stat), Errno> {
        let _ns = self.locks.shared();
        let p = self.node(parent)?;
        let st = stat_at(&p.fd().map_err(errno)?, name).map_err(errno)?;
        let node = self.nodes.found(&p, name, &st).map_err(errno)?;
        Ok((node.id, st))
    }

    /// The owner a new object gets: the caller, with the group of a set-group-id parent.
    fn owner(req: &Request, parent: &Node) -> Result<(u32, u32), Errno> {
        let pst = parent.stat().map_err(errno)?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 { pst.st_gid } else { req.gid() };
        Ok((req.uid(), gid))
    }

    /// The ops that give a new object its owner and time, and its parent its new time.
    fn created_ops(
        &self,
        path: &RelPath,
        st: &Stat,
        owner: (u32, u32),
        parent: &Node,
        ppath: &RelPath,
    ) -> Vec<Op> {
        let mut attrs = Attrs { mtime: Some(ts(st.st_mtime, st.st_mtime_nsec)), ..Attrs::default() };
        if owner != (0, 0) {
            attrs.uid = Some(owner.0);
            attrs.gid = Some(owner.1);
        }
        // The mode the object has, whatever the umask of whoever applies the ops (and a
        // directory's set-group-id bit, inherited from its parent).
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            attrs.mode = Some(st.st_mode & 0o7777);
        }
        let mut ops = vec![Op::SetAttr { path: path.to_wire(), attrs }];
        ops.extend(Self::mtime_op(parent, ppath));
        ops
    }

    pub(super) fn do_make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &[u8],
        what: Make,
    ) -> Result<(u64, Stat), Errno> {
        let _ns = self.locks.names();
        let p = self.node(parent)?;
        let ppath = self.nodes.path(&p).ok_or(Errno::ENOENT)?;
        let path = joined(&ppath, name)?;
        let owner = Self::owner(req, &p)?;
        let pfd = p.fd().map_err(errno)?;
        let prep = self.prepare(&[Dirty::New(&path), Dirty::Name(&ppath)])?;
        let first = match &what {
            Make::Dir { mode } => {
                rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(*mode & 0o7777)).map_err(errno)?;
                Op::Mkdir { path: path.to_wire(), mode: mode & 0o7777 }
            }
            Make::Node { mode, rdev } => {
                let ft = rustix::fs::FileType::from_raw_mode(*mode);
                rustix::fs::mknodat(&pfd, name, ft, Mode::from_raw_mode(*mode & 0o7777), *rdev as u64)
                    .map_err(errno)?;
                Op::Mknod { path: path.to_wire(), mode: *mode, rdev: *rdev as u64 }
            }
            Make::Symlink { target } => {
                rustix::fs::symlinkat(target.as_slice(), &pfd, name).map_err(errno)?;
                Op::Symlink { path: path.to_wire(), target: target.clone() }
            }
        };
        if owner != (0, 0) {
            let (uid, gid) = (rustix::fs::Uid::from_raw(owner.0), rustix::fs::Gid::from_raw(owner.1));
            rustix::fs::chownat(&pfd, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(errno)?;
        }
        let mut st = stat_at(&pfd, name).map_err(errno)?;
        let want = match what {
            Make::Dir { mode } | Make::Node { mode, .. } => Some(mode),
            Make::Symlink { .. } => None,
        };
        if let Some(mode) = want.and_then(|want| settled_mode(want, &st)) {
            rustix::fs::chmodat(&pfd, name, Mode::from_raw_mode(mode), AtFlags::empty()).map_err(errno)?;
            st = stat_at(&pfd, name).map_err(errno)?;
        }
        let node = self.nodes.found(&p, name, &st).map_err(errno)?;
        let mut ops = vec![first];
        ops.extend(self.created_ops(&path, &st, owner, &p, &ppath));
        self.commit(prep, ops);
        Ok((node.id, st))
    }

    pub(super) fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<(std::sync::Arc<Node>, Stat, fuser::FileHandle), Errno> {
        let _ns = self.locks.names();
        let p = self.node(parent)?;
        let ppath = self.nodes.path(&p).ok_or(Errno::ENOENT)?;
        let path = joined(&ppath, name)?;
        let owner = Self::owner(req, &p)?;
        let pfd = p.fd().map_err(errno)?;
        let mut prep = self.prepare(&[Dirty::New(&path), Dirty::Name(&ppath)])?;
        let access = flags & libc::O_ACCMODE;
        let keep = flags & (libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME);
        let base = OFlags::from_bits_retain((self.daemon_access(access) | keep) as u32)
            | OFlags::CLOEXEC
            | OFlags::NOFOLLOW;
        let perm = Mode::from_raw_mode(mode & 0o7777);
        let cache = self.nodes.cache();
        let (fd, created) = match cache
            .retry(|| rustix::fs::openat(&pfd, name, base | OFlags::CREATE | OFlags::EXCL, perm))
        {
            Ok(fd) => (fd, true),
            Err(rustix::io::Errno::EXIST) if flags & libc::O_EXCL == 0 => {
                let trunc = if flags & libc::O_TRUNC != 0 {
                    // Emptying a file that exists changes it, not its directory's names: its
                    // own name stands for that.
                    prep = self.prepare(&[Dirty::Name(&path)])?;
                    OFlags::TRUNC
                } else {
                    OFlags::empty()
                };
                (cache.retry(|| rustix::fs::openat(&pfd, name, base | trunc, perm)).map_err(errno)?, false)
            }
            Err(e) => return Err(errno(e)),
        };
        if created && owner != (0, 0) {
            let (uid, gid) = (rustix::fs::Uid::from_raw(owner.0), rustix::fs::Gid::from_raw(owner.1));
            rustix::fs::fchown(&fd, Some(uid), Some(gid)).map_err(errno)?;
        }
        let mut st = rustix::fs::fstat(&fd).map_err(errno)?;
        if created && let Some(mode) = settled_mode(mode, &st) {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(errno)?;
            st = rustix::fs::fstat(&fd).map_err(errno)?;
        }
        let node = self.nodes.found(&p, name, &st).map_err(errno)?;
        let ops = if created {
            let mut v = vec![Op::Create { path: path.to_wire(), mode: st.st_mode & 0o7777 }];
            v.extend(self.created_ops(&path, &st, owner, &p, &ppath));
            v
        } else if flags & libc::O_TRUNC != 0 {
            let mut v = vec![Op::Truncate { path: path.to_wire(), size: 0 }];
            v.extend(Self::mtime_op(&node, &path));
            if self.killpriv.load(std::sync::atomic::Ordering::Relaxed) && node.kind == libc::S_IFREG {
                // Truncated before its privileges could be looked at: drop and send them.
                use std::os::fd::AsFd;
                let attrs = self.dropped_privs(&node, fd.as_fd(), super::privs::Caller::unprivileged(req));
                v.push(Op::SetAttr { path: path.to_wire(), attrs });
            }
            v
        } else {
            Vec::new()
        };
        self.commit(prep, ops);
        let writable = access != libc::O_RDONLY;
        if writable {
            node.io.lock().writers += 1;
        }
        let sync = keep & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let file = std::fs::File::from(fd);
        let fh = self.add_handle(Handle::File(OpenFile {
            file,
            node: node.clone(),
            writable,
            sync,
            passthrough: false,
            wrote: false.into(),
        }));
        Ok((node, st, fh))
    }

    pub(super) fn do_remove(&self, parent: INodeNo, name: &[u8], dir: bool) -> Result<(), Errno> {
        let _ns = self.locks.names();
        let p = self.node(parent)?;
        let ppath = self.nodes.path(&p).ok_or(Errno::ENOENT)?;
        let path = joined(&ppath, name)?;
        let pfd = p.fd().map_err(errno)?;
        let st = stat_at(&pfd, name).map_err(errno)?;
        let prep = self.prepare(&[Dirty::Gone(&path), Dirty::Name(&ppath)])?;
        let flags = if dir { AtFlags::REMOVEDIR } else { AtFlags::empty() };
        rustix::fs::unlinkat(&pfd, name, flags).map_err(errno)?;
        self.nodes.unnamed(p.id, name, Some((st.st_dev, st.st_ino)));
        let op = if dir { Op::Rmdir { path: path.to_wire() } } else { Op::Unlink { path: path.to_wire() } };
        let mut ops = vec![op];
        ops.extend(Self::mtime_op(&p, &ppath));
        self.commit(prep, ops);
        Ok(())
    }

    pub(super) fn do_rename(
        &self,
        parent: INodeNo,
        name: &[u8],
        newparent: INodeNo,
        newname: &[u8],
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let _ns = self.locks.names();
        let (p, np) = (self.node(parent)?, self.node(newparent)?);
        let (ppath, nppath) =
            (self.nodes.path(&p).ok_or(Errno::ENOENT)?, self.nodes.path(&np).ok_or(Errno::ENOENT)?);
        let from = joined(&ppath, name)?;
        let to = joined(&nppath, newname)?;
        let (pfd, npfd) = (p.fd().map_err(errno)?, np.fd().map_err(errno)?);
        let moved = stat_at(&pfd, name).map_err(errno)?;
        let replaced = stat_at(&npfd, newname).ok().map(|s| (s.st_dev, s.st_ino));
        let prep =
            self.prepare(&[Dirty::Name(&from), Dirty::Name(&to), Dirty::Name(&ppath), Dirty::Name(&nppath)])?;
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let mut rf = rustix::fs::RenameFlags::empty();
        if exchange {
            rf |= rustix::fs::RenameFlags::EXCHANGE;
        }
        if noreplace {
            rf |= rustix::fs::RenameFlags::NOREPLACE;
        }
        rustix::fs::renameat_with(&pfd, name, &npfd, newname, rf).map_err(errno)?;
        let (pf, pt) =
            (Place { parent: p.id, name: name.to_vec() }, Place { parent: np.id, name: newname.to_vec() });
        let key = Some((moved.st_dev, moved.st_ino));
        if exchange {
            self.nodes.exchanged(key, pf, replaced, pt);
        } else {
            self.nodes.renamed(key, pf, pt, replaced);
        }
        let mut ops = vec![Op::Rename {
            from: from.to_wire(),
            to: to.to_wire(),
            flags: WireRenameFlags { noreplace, exchange },
        }];
        ops.extend(Self::mtime_op(&p, &ppath));
        if np.id != p.id {
            ops.extend(Self::mtime_op(&np, &nppath));
        }
        self.commit(prep, ops);
        Ok(())
    }

    pub(super) fn do_link(
        &self,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &[u8],
    ) -> Result<(u64, Stat), Errno> {
        let _ns = self.locks.names();
        let node = self.node(ino)?;
        let np = self.node(newparent)?;
        let nppath = self.nodes.path(&np).ok_or(Errno::ENOENT)?;
        let path = joined(&nppath, newname)?;
        let existing = self.nodes.path(&node);
        let (fd, npfd) = (node.fd().map_err(errno)?, np.fd().map_err(errno)?);
        let prep = self.prepare(&[Dirty::New(&path), Dirty::Name(&nppath)])?;
        rustix::fs::linkat(&fd, "", &npfd, newname, AtFlags::EMPTY_PATH).map_err(errno)?;
        let st = stat_at(&npfd, newname).map_err(errno)?;
        let linked = self.nodes.found(&np, newname, &st).map_err(errno)?;
        let mut ops = match existing {
            Some(existing) => vec![Op::Link { path: path.to_wire(), existing: existing.to_wire() }],
            // No name of this file is known (all of the ones we saw were removed): send the
            // new name as a copy; the file is the same inode on the source only.
            None => self.copy_ops(&linked, &path).map_err(errno)?,
        };
        ops.extend(Self::mtime_op(&np, &nppath));
        self.commit(prep, ops);
        Ok((linked.id, st))
    }

    /// Ops recreating a file from scratch (create, contents, attributes).
    fn copy_ops(&self, node: &Node, path: &RelPath) -> std::io::Result<Vec<Op>> {
        let fd = node.fd()?;
        let f =
            std::fs::File::from(self.nodes.cache().retry(|| {
                rustix::fs::open(fd.proc_path(), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            })?);
        let st = rustix::fs::fstat(&f)?;
        let mut ops = vec![Op::Create { path: path.to_wire(), mode: st.st_mode & 0o7777 }];
        let mut off = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::os::unix::fs::FileExt::read_at(&f, &mut buf, off)?;
            if n == 0 {
                break;
            }
            ops.push(Op::Write { path: path.to_wire(), offset: off, data: buf[..n].to_vec() });
            off += n as u64;
        }
        ops.push(Op::SetAttr {
            path: path.to_wire(),
            attrs: Attrs {
                uid: Some(st.st_uid),
                gid: Some(st.st_gid),
                mode: Some(st.st_mode & 0o7777),
                mtime: Some(ts(st.st_mtime, st.st_mtime_nsec)),
                ..Attrs::default()
            },
        });
        Ok(ops)
    }
}
