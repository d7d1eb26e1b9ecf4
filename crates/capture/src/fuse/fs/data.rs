//! Open files: open, read, write, fallocate, sync, release.
//!
//! A write holds the namespace lock shared and its file's lock across: recording the extent
//! as dirty, writing the bytes to the underlying file, and sequencing the write op. Reads of
//! files opened read-only go through kernel passthrough when the kernel offers it (the daemon
//! never sees them); once an inode is in passthrough mode, later writers open it with direct
//! I/O on the same backing file, so their writes still come through the daemon.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use doppel_proto::Op;
use fuser::{Errno, FileHandle, FopenFlags, INodeNo, ReplyOpen};
use rustix::fs::{Mode, OFlags};

use super::{DoppelFs, Handle, OpenFile, errno};
use crate::fuse::locks::WriteGuard;
use crate::fuse::{CaptureSink, Dirty};

impl<S: CaptureSink> DoppelFs<S> {
    pub(super) fn do_open(&self, ino: INodeNo, flags: i32, reply: ReplyOpen) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let access = flags & libc::O_ACCMODE;
        let keep = flags & (libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME);
        let oflags = OFlags::from_bits_retain((self.daemon_access(access) | keep) as u32) | OFlags::CLOEXEC;
        let opened = node.fd().map_err(errno).and_then(|nfd| {
            self.nodes
                .cache()
                .retry(|| rustix::fs::open(nfd.proc_path(), oflags, Mode::empty()))
                .map_err(errno)
        });
        let file = match opened {
            Ok(fd) => std::fs::File::from(fd),
            Err(e) => return reply.error(e),
        };
        let writable = access != libc::O_RDONLY;
        let sync = keep & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let mut io = node.io.lock();
        // Passthrough is possible for readers while nobody writes through the page cache,
        // and required (as direct I/O) for writers once the inode is in passthrough mode.
        let backing = if let Some(b) = &io.backing {
            Some(b.clone())
        } else if !writable && io.writers == 0 && self.passthrough.load(Ordering::Relaxed) {
            match reply.open_backing(&file) {
                Ok(b) => {
                    let b = Arc::new(b);
                    io.backing = Some(b.clone());
                    Some(b)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "passthrough unavailable for this file");
                    None
                }
            }
        } else {
            None
        };
        if writable {
            io.writers += 1;
        }
        if backing.is_some() {
            io.passthrough += 1;
        }
        let cached = if backing.is_none() {
            let stale = std::mem::take(&mut io.stale_cache);
            if self.writeback.load(Ordering::Relaxed) && !stale {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            }
        } else {
            FopenFlags::empty()
        };
        drop(io);
        let passthrough = backing.is_some();
        let fh = self.add_handle(Handle::File(OpenFile {
            file,
            node,
            writable,
            sync,
            passthrough,
            wrote: false.into(),
        }));
        match backing {
            Some(b) if writable => reply.opened_passthrough(fh, FopenFlags::FOPEN_DIRECT_IO, &b),
            Some(b) => reply.opened_passthrough(fh, FopenFlags::empty(), &b),
            None => reply.opened(fh, cached),
        }
    }

    pub(super) fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let (h, _) = self.file(fh)?;
        let Handle::File(f) = &*h else { return Err(Errno::EISDIR) };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// A write; `from_cache`: pages the kernel writes back from its write-back cache; `kill`:
    /// the writer lacks `CAP_FSETID` (see [`super::privs`]).
    pub(super) fn do_write(
        &self,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        from_cache: bool,
        kill: Option<super::privs::Caller>,
    ) -> Result<u32, Errno> {
        let (h, writable) = self.file(fh)?;
        let Handle::File(f) = &*h else { return Err(Errno::EISDIR) };
        if !writable {
            return Err(Errno::EBADF);
        }
        let seq = {
            let _ns = self.locks.shared();
            let mut _file = WriteGuard::Range(f.node.data.lock_range(offset, data.len() as u64));
            // Set-id bits or capabilities: the write drops them (an attribute change too, so
            // it takes the whole file).
            let mut had_privs = self.has_privs(&f.node, f.file.as_fd());
            if had_privs {
                drop(_file);
                _file = WriteGuard::Whole(f.node.data.lock());
                had_privs = self.has_privs(&f.node, f.file.as_fd());
            }
            let path = self.nodes.path(&f.node);
            let prep = match &path {
                Some(p) => {
                    let extent = Dirty::Extent { path: p, offset, len: data.len() as u64 };
                    Some(if had_privs {
                        self.prepare(&[extent, Dirty::Name(p)])?
                    } else {
                        self.prepare(&[extent])?
                    })
                }
                None => None,
            };
            if from_cache {
                // With the write-back cache the kernel owns the file's times: it changed them
                // when the application wrote, and sends them (setattr) when it writes the
                // inode back. The daemon's own write, later, must not move the mtime.
                let before = rustix::fs::fstat(&f.file).map_err(errno)?;
                f.file.write_all_at(data, offset).map_err(errno)?;
                let keep = rustix::fs::Timestamps {
                    last_access: rustix::fs::Timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                    last_modification: rustix::fs::Timespec {
                        tv_sec: before.st_mtime,
                        tv_nsec: before.st_mtime_nsec as _,
                    },
                };
                rustix::fs::futimens(&f.file, &keep).map_err(errno)?;
            } else {
                f.file.write_all_at(data, offset).map_err(errno)?;
            }
            if f.passthrough {
                // Around the kernel's page cache of the inode: not to be trusted at the next
                // cached open.
                f.node.io.lock().stale_cache = true;
            }
            f.wrote.store(true, Ordering::Relaxed);
            f.node.mtime_dirty.store(true, Ordering::Relaxed);
            let privs = had_privs.then(|| self.dropped_privs(&f.node, f.file.as_fd(), kill));
            match (path, prep) {
                (Some(p), Some(prep)) => {
                    let mut ops = vec![Op::Write { path: p.to_wire(), offset, data: data.to_vec() }];
                    if let Some(attrs) = privs {
                        ops.push(Op::SetAttr { path: p.to_wire(), attrs });
                    }
                    if f.sync {
                        // The application asked for durability with this write: the target
                        // commits at once after an Fsync op instead of at its next interval.
                        ops.push(Op::Fsync { path: Some(p.to_wire()) });
                    }
                    self.commit(prep, ops)
                }
                _ => None,
            }
        };
        // Waiting for the target happens outside the locks, so other writers go on.
        if f.sync
            && let Some(seq) = seq
        {
            self.sink.barrier(seq);
        }
        Ok(data.len() as u32)
    }

    pub(super) fn do_fallocate(&self, fh: FileHandle, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let (h, writable) = self.file(fh)?;
        let Handle::File(f) = &*h else { return Err(Errno::EISDIR) };
        if !writable {
            return Err(Errno::EBADF);
        }
        let _ns = self.locks.shared();
        let _file = f.node.data.lock();
        let path = self.nodes.path(&f.node);
        let prep = match &path {
            Some(p) => Some(self.prepare(&[Dirty::Extent { path: p, offset, len }, Dirty::Name(p)])?),
            None => None,
        };
        rustix::fs::fallocate(
            &f.file,
            rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
            offset,
            len,
        )
        .map_err(errno)?;
        if f.passthrough {
            f.node.io.lock().stale_cache = true;
        }
        f.wrote.store(true, Ordering::Relaxed);
        // The allocation moved the source's mtime as a write does; the replica's apply would
        // set its own clock's.
        f.node.mtime_dirty.store(true, Ordering::Relaxed);
        if let (Some(p), Some(prep)) = (path, prep) {
            self.commit(prep, vec![Op::Fallocate { path: p.to_wire(), mode: mode as u32, offset, len }]);
        }
        Ok(())
    }

    pub(super) fn do_lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> Result<i64, Errno> {
        let (h, _) = self.file(fh)?;
        let Handle::File(f) = &*h else { return Err(Errno::EISDIR) };
        let pos = match whence {
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
            _ => return Err(Errno::EINVAL),
        };
        rustix::fs::seek(&f.file, pos).map(|o| o as i64).map_err(errno)
    }

    /// Sends the file's modification time if it wrote: after the last write of a session the
    /// replica must end with the source's mtime, not the time it applied the bytes.
    fn flush_mtime(&self, f: &OpenFile) -> Option<u64> {
        if !f.node.mtime_dirty.swap(false, Ordering::Relaxed) {
            return None;
        }
        let _ns = self.locks.shared();
        let _file = f.node.data.lock();
        let path = self.nodes.path(&f.node)?;
        let op = Self::mtime_op(&f.node, &path)?;
        let prep = self.prepare(&[]).ok()?;
        self.commit(prep, vec![op])
    }

    pub(super) fn do_release(&self, fh: FileHandle) {
        let Some(h) = self.handles.lock().remove(&fh.0) else { return };
        let Handle::File(f) = &*h else { return };
        if f.wrote.load(Ordering::Relaxed) {
            self.flush_mtime(f);
        }
        let mut io = f.node.io.lock();
        if f.writable {
            io.writers -= 1;
        }
        if f.passthrough {
            io.passthrough -= 1;
            if io.passthrough == 0 {
                io.backing = None;
            }
        }
    }

    pub(super) fn do_fsync(&self, fh: FileHandle, datasync: bool) -> Result<(), Errno> {
        let (h, _) = self.file(fh)?;
        let Handle::File(f) = &*h else { return Err(Errno::EISDIR) };
        if datasync { f.file.sync_data() } else { f.file.sync_all() }.map_err(errno)?;
        self.flush_mtime(f);
        let path = {
            let _ns = self.locks.shared();
            self.nodes.path(&f.node)
        };
        self.barrier_op(path)
    }

    pub(super) fn do_fsyncdir(&self, ino: INodeNo) -> Result<(), Errno> {
        let node = self.node(ino)?;
        let nfd = node.fd().map_err(errno)?;
        let dir = self
            .nodes
            .cache()
            .retry(|| {
                rustix::fs::open(
                    nfd.proc_path(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            })
            .map_err(errno)?;
        rustix::fs::fsync(dir).map_err(errno)?;
        let path = {
            let _ns = self.locks.shared();
            self.nodes.path(&node)
        };
        self.barrier_op(path)
    }

    /// Sequences an `Fsync` barrier and waits for it in sync mode.
    fn barrier_op(&self, path: Option<doppel_proto::RelPath>) -> Result<(), Errno> {
        let prep = self.prepare(&[])?;
        if let Some(seq) = self.commit(prep, vec![Op::Fsync { path: path.map(|p| p.to_wire()) }]) {
            self.sink.barrier(seq);
        }
        Ok(())
    }
}
