//! Carrying out one op beneath the replica root.
//!
//! Every path is first checked as a [`RelPath`] (no `..`, no absolute path, no NUL, no empty
//! component) and then resolved with [`Beneath`] (no symlink on the way, no escape). The last
//! component is acted on through its parent directory handle and never followed. Ops are
//! written so that applying one a second time, right after it was applied, changes nothing:
//! that is what makes the replay of the single op that may have been in flight when a target
//! was killed exact. Most ops get there by looking at the tree (a `Create` finds its file, a
//! `Rename` finds its source gone and its destination present); a rename-exchange cannot,
//! because both names exist before and after the swap, so it leaves an [`ExchangeNote`]
//! first (see [`ExchangeNotes`]).
//!
//! Errors are classified for the caller: a condition that may go away (no space, I/O error,
//! read-only file system) is [`ApplyError::Io`] and the op will be retried; anything else
//! (a hostile path, a name of the wrong type, a missing parent) is [`ApplyError::Refused`]: the
//! op is skipped and the source is told, so one bad op cannot stall the stream.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use doppel_fs::Beneath;
use doppel_fs::beneath::is_escape;
use doppel_proto::{Attrs, Op, RelPath, RenameFlags, Timestamp, WirePath};
use rustix::fs::{AtFlags, Dev, FallocateFlags, FileType, Mode, OFlags, Timespec, Timestamps};

use crate::error::ApplyError;
use crate::state::{ExchangeNote, Progress};

/// Modes a source may create with `Mknod`: FIFOs and sockets. Device nodes would give
/// whoever can read the replica access to the target's own devices, so they are created only
/// when the source's privilege policy allows them (see [`crate::privilege`]).
const ALLOWED_NODES: [u32; 2] = [libc::S_IFIFO, libc::S_IFSOCK];

/// Device node types, created only if allowed.
const DEVICE_NODES: [u32; 2] = [libc::S_IFCHR, libc::S_IFBLK];

/// `fallocate` flags a source may use: those that only change the file's own space.
const ALLOWED_FALLOCATE: u32 =
    (libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) as u32;

/// A file kept open between consecutive writes to it.
#[derive(Default)]
pub struct OpenFile {
    held: Option<(RelPath, OwnedFd)>,
}

impl OpenFile {
    /// Forgets the held file (after any op that changes names).
    pub fn clear(&mut self) {
        self.held = None;
    }

    /// Holds `fd`, just made for `path` (a `Create`): the `Write` and `SetAttr` that follow a
    /// new file's `Create` then use it instead of resolving the path and opening the file again
    /// (five system calls of about thirty per small file).
    fn hold(&mut self, path: &RelPath, fd: OwnedFd) {
        self.held = Some((path.clone(), fd));
    }

    /// The held file, if it is `path`'s.
    fn held(&self, path: &RelPath) -> Option<&OwnedFd> {
        self.held.as_ref().filter(|(p, _)| p == path).map(|(_, fd)| fd)
    }

    pub(crate) fn get(&mut self, root: &Beneath, path: &RelPath) -> io::Result<&OwnedFd> {
        if !matches!(&self.held, Some((p, _)) if p == path) {
            // Non-blocking, so a FIFO without a reader fails at once instead of stalling the
            // whole replica; then only regular files are accepted.
            let fd = root.open_at(path, OFlags::WRONLY | OFlags::NONBLOCK, 0)?;
            let st = rustix::fs::fstat(&fd)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
            }
            self.held = Some((path.clone(), fd));
        }
        Ok(&self.held.as_ref().expect("just set").1)
    }
}

/// Where a rename-exchange notes, before it swaps, which object was at its `from` name.
///
/// An exchange applied twice swaps the names back, and the tree alone cannot tell a replay
/// (after a kill between the swap and the progress marker) from a first attempt: both names
/// exist either way. With the note, a replay that finds the noted object already at `to`
/// knows the swap happened and does nothing. The note must outlive a killed process exactly
/// as the progress marker does, so [`Progress`] keeps it next to the sequence.
pub trait ExchangeNotes {
    /// The note left for the exchange `seq` by an earlier attempt, if any.
    fn noted(&self, seq: u64) -> Option<ExchangeNote>;
    /// Leaves `note` (before the swap).
    fn note(&mut self, note: ExchangeNote) -> Result<(), ApplyError>;
}

impl ExchangeNotes for Progress {
    fn noted(&self, seq: u64) -> Option<ExchangeNote> {
        self.exchange_note(seq)
    }

    fn note(&mut self, note: ExchangeNote) -> Result<(), ApplyError> {
        self.note_exchange(note)
    }
}

/// Notes kept in memory: for callers with no progress file (nothing survives the process).
impl ExchangeNotes for Option<ExchangeNote> {
    fn noted(&self, seq: u64) -> Option<ExchangeNote> {
        self.filter(|n| n.seq == seq)
    }

    fn note(&mut self, note: ExchangeNote) -> Result<(), ApplyError> {
        *self = Some(note);
        Ok(())
    }
}

struct Ctx<'a> {
    seq: u64,
    kind: &'static str,
    root: &'a Beneath,
    devices: bool,
}

impl Ctx<'_> {
    fn path(&self, w: &WirePath) -> Result<RelPath, ApplyError> {
        RelPath::try_from(w).map_err(|e| self.refuse(e.to_string()))
    }

    fn named(&self, w: &WirePath) -> Result<RelPath, ApplyError> {
        let p = self.path(w)?;
        if p.is_root() {
            return Err(
                self.refuse("the replica root itself cannot be created, linked, renamed or removed".into())
            );
        }
        Ok(p)
    }

    fn refuse(&self, reason: String) -> ApplyError {
        ApplyError::Refused { seq: self.seq, kind: self.kind, reason }
    }

    /// Classifies an OS error on `path`.
    fn fail(&self, path: &RelPath, e: io::Error) -> ApplyError {
        if is_escape(&e) {
            return self
                .refuse(format!("{path}: the path leads through a symlink or out of the replica ({e})"));
        }
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EIO | libc::EROFS | libc::ENOMEM | libc::EAGAIN) => {
                ApplyError::Io { seq: self.seq, kind: self.kind, path: path.to_string(), source: e }
            }
            Some(libc::ENOTDIR) => self.refuse(format!(
                "{path}: a parent is not a directory (a file, or a symlink, which is never followed)"
            )),
            _ => self.refuse(format!("{path}: {e}")),
        }
    }

    fn parent<'p>(&self, path: &'p RelPath) -> Result<(OwnedFd, &'p [u8]), ApplyError> {
        self.root.parent(path).map_err(|e| self.fail(path, e))
    }

    fn lstat_at(&self, dir: &OwnedFd, name: &[u8]) -> io::Result<rustix::fs::Stat> {
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
    }
}

fn ts(t: Timestamp) -> Timespec {
    Timespec { tv_sec: t.secs, tv_nsec: t.nanos as _ }
}

fn file_type(mode: u32) -> u32 {
    mode & libc::S_IFMT
}

/// Applies `op` (sequence `seq`) to the tree beneath `root`; a rename-exchange leaves its note
/// in `notes` first. Device nodes are refused.
pub fn apply_op(
    root: &Beneath,
    open: &mut OpenFile,
    notes: &mut dyn ExchangeNotes,
    seq: u64,
    op: &Op,
) -> Result<(), ApplyError> {
    apply_op_with(root, open, notes, seq, op, false)
}

/// [`apply_op`], creating device nodes if `devices` (the source's privilege policy allows
/// them; every other privileged part was already decided on by that policy).
pub fn apply_op_with(
    root: &Beneath,
    open: &mut OpenFile,
    notes: &mut dyn ExchangeNotes,
    seq: u64,
    op: &Op,
    devices: bool,
) -> Result<(), ApplyError> {
    let c = Ctx { seq, kind: op.kind(), root, devices };
    if op.changes_names() {
        open.clear();
    }
    match op {
        Op::Create { path, mode } => create(&c, open, &c.named(path)?, *mode),
        Op::Mkdir { path, mode } => mkdir(&c, &c.named(path)?, *mode),
        Op::Symlink { path, target } => symlink(&c, &c.named(path)?, target),
        Op::Link { path, existing } => link(&c, &c.named(path)?, &c.named(existing)?),
        Op::Rename { from, to, flags } if flags.exchange => {
            exchange(&c, notes, &c.named(from)?, &c.named(to)?)
        }
        Op::Rename { from, to, flags } => rename(&c, &c.named(from)?, &c.named(to)?, *flags),
        Op::Unlink { path } => remove(&c, &c.named(path)?, false),
        Op::Rmdir { path } => remove(&c, &c.named(path)?, true),
        Op::Write { path, offset, data } => {
            let p = c.path(path)?;
            let fd = open.get(root, &p).map_err(|e| c.fail(&p, e))?;
            write_all_at(fd, data, *offset).map_err(|e| c.fail(&p, e))
        }
        Op::Truncate { path, size } => {
            let p = c.path(path)?;
            let fd = open.get(root, &p).map_err(|e| c.fail(&p, e))?;
            rustix::fs::ftruncate(fd, *size).map_err(|e| c.fail(&p, e.into()))
        }
        Op::Fallocate { path, mode, offset, len } => {
            let p = c.path(path)?;
            if mode & !ALLOWED_FALLOCATE != 0 {
                return Err(c.refuse(format!("fallocate mode {mode:#x} is not allowed")));
            }
            let fd = open.get(root, &p).map_err(|e| c.fail(&p, e))?;
            rustix::fs::fallocate(fd, FallocateFlags::from_bits_retain(*mode), *offset, *len)
                .map_err(|e| c.fail(&p, e.into()))
        }
        Op::SetAttr { path, attrs } => set_attrs(&c, open, &c.path(path)?, attrs),
        Op::Fsync { .. } | Op::Point { .. } => Ok(()),
        Op::Mknod { path, mode, rdev } => mknod(&c, &c.named(path)?, *mode, *rdev),
    }
}

fn write_all_at(fd: &OwnedFd, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Creates a regular file, and holds it open in `open` for the ops that usually follow.
fn create(c: &Ctx<'_>, open: &mut OpenFile, path: &RelPath, mode: u32) -> Result<(), ApplyError> {
    let (dir, name) = c.parent(path)?;
    match rustix::fs::openat(
        &dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o7777),
    ) {
        Ok(fd) => {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))
                .map_err(|e| c.fail(path, e.into()))?;
            open.hold(path, fd);
            Ok(())
        }
        Err(rustix::io::Errno::EXIST) => match c.lstat_at(&dir, name) {
            Ok(st) if file_type(st.st_mode) == libc::S_IFREG => Ok(()),
            Ok(_) => Err(c.refuse(format!("{path}: exists and is not a regular file"))),
            Err(e) => Err(c.fail(path, e)),
        },
        Err(e) => Err(c.fail(path, e.into())),
    }
}

fn mkdir(c: &Ctx<'_>, path: &RelPath, mode: u32) -> Result<(), ApplyError> {
    let (dir, name) = c.parent(path)?;
    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode & 0o7777)) {
        Ok(()) => {
            let fd = c.root.dir(path).map_err(|e| c.fail(path, e))?;
            chmod_fd(&fd, mode).map_err(|e| c.fail(path, e))
        }
        Err(rustix::io::Errno::EXIST) => match c.lstat_at(&dir, name) {
            Ok(st) if file_type(st.st_mode) == libc::S_IFDIR => Ok(()),
            Ok(_) => Err(c.refuse(format!("{path}: exists and is not a directory"))),
            Err(e) => Err(c.fail(path, e)),
        },
        Err(e) => Err(c.fail(path, e.into())),
    }
}

fn symlink(c: &Ctx<'_>, path: &RelPath, target: &[u8]) -> Result<(), ApplyError> {
    if target.is_empty() || target.contains(&0) {
        return Err(c.refuse(format!("{path}: a symlink target must be non-empty and free of NUL")));
    }
    let (dir, name) = c.parent(path)?;
    match rustix::fs::symlinkat(target, &dir, name) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => {
            let st = c.lstat_at(&dir, name).map_err(|e| c.fail(path, e))?;
            match file_type(st.st_mode) {
                libc::S_IFDIR => Err(c.refuse(format!("{path}: a directory is in the way of a symlink"))),
                libc::S_IFLNK
                    if rustix::fs::readlinkat(&dir, name, Vec::new())
                        .is_ok_and(|t| t.as_bytes() == target) =>
                {
                    Ok(())
                }
                _ => {
                    rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| c.fail(path, e.into()))?;
                    rustix::fs::symlinkat(target, &dir, name).map_err(|e| c.fail(path, e.into()))
                }
            }
        }
        Err(e) => Err(c.fail(path, e.into())),
    }
}

fn link(c: &Ctx<'_>, path: &RelPath, existing: &RelPath) -> Result<(), ApplyError> {
    let (edir, ename) = c.parent(existing)?;
    let (dir, name) = c.parent(path)?;
    match rustix::fs::linkat(&edir, ename, &dir, name, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => {
            let a = c.lstat_at(&edir, ename).map_err(|e| c.fail(existing, e))?;
            let b = c.lstat_at(&dir, name).map_err(|e| c.fail(path, e))?;
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) {
                return Ok(());
            }
            if file_type(b.st_mode) == libc::S_IFDIR {
                return Err(c.refuse(format!("{path}: a directory is in the way of a hard link")));
            }
            rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| c.fail(path, e.into()))?;
            rustix::fs::linkat(&edir, ename, &dir, name, AtFlags::empty()).map_err(|e| c.fail(path, e.into()))
        }
        Err(e) => Err(c.fail(path, e.into())),
    }
}

fn rename(c: &Ctx<'_>, from: &RelPath, to: &RelPath, flags: RenameFlags) -> Result<(), ApplyError> {
    if to.starts_with(from) && to != from {
        return Err(c.refuse(format!("cannot move {from} into itself ({to})")));
    }
    let (fdir, fname) = c.parent(from)?;
    let (tdir, tname) = c.parent(to)?;
    let f =
        if flags.noreplace { rustix::fs::RenameFlags::NOREPLACE } else { rustix::fs::RenameFlags::empty() };
    match rustix::fs::renameat_with(&fdir, fname, &tdir, tname, f) {
        Ok(()) => Ok(()),
        // Replayed after it took effect: the old name is gone and the new one exists.
        Err(rustix::io::Errno::NOENT)
            if c.lstat_at(&fdir, fname).is_err() && c.lstat_at(&tdir, tname).is_ok() =>
        {
            Ok(())
        }
        Err(e) => Err(c.fail(from, e.into())),
    }
}

/// `renameat2(RENAME_EXCHANGE)`, made harmless to replay: the object found at `from` is noted
/// before the swap, and a replay that finds that very object (device and inode) at `to`
/// already swapped, so it does nothing instead of swapping the names back. Two names of one
/// file are also left alone (swapping them changes nothing).
fn exchange(
    c: &Ctx<'_>,
    notes: &mut dyn ExchangeNotes,
    from: &RelPath,
    to: &RelPath,
) -> Result<(), ApplyError> {
    if (to.starts_with(from) || from.starts_with(to)) && to != from {
        return Err(c.refuse(format!("cannot exchange {from} with a name inside it ({to})")));
    }
    let (fdir, fname) = c.parent(from)?;
    let (tdir, tname) = c.parent(to)?;
    let a = c.lstat_at(&fdir, fname).map_err(|e| c.fail(from, e))?;
    let b = c.lstat_at(&tdir, tname).map_err(|e| c.fail(to, e))?;
    let swapped = notes.noted(c.seq).is_some_and(|n| (n.dev, n.ino) == (b.st_dev, b.st_ino));
    if swapped || (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) {
        return Ok(());
    }
    notes.note(ExchangeNote { seq: c.seq, dev: a.st_dev, ino: a.st_ino })?;
    rustix::fs::renameat_with(&fdir, fname, &tdir, tname, rustix::fs::RenameFlags::EXCHANGE)
        .map_err(|e| c.fail(from, e.into()))
}

fn remove(c: &Ctx<'_>, path: &RelPath, dir_wanted: bool) -> Result<(), ApplyError> {
    let (dir, name) = c.parent(path)?;
    let flags = if dir_wanted { AtFlags::REMOVEDIR } else { AtFlags::empty() };
    match rustix::fs::unlinkat(&dir, name, flags) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(c.fail(path, e.into())),
    }
}

fn mknod(c: &Ctx<'_>, path: &RelPath, mode: u32, rdev: u64) -> Result<(), ApplyError> {
    let ft = file_type(mode);
    if !(ALLOWED_NODES.contains(&ft) || c.devices && DEVICE_NODES.contains(&ft)) {
        let what = if c.devices { "FIFOs, sockets and device nodes" } else { "FIFOs and sockets" };
        return Err(c.refuse(format!("{path}: only {what} may be created, not mode {mode:#o}")));
    }
    let (dir, name) = c.parent(path)?;
    match rustix::fs::mknodat(
        &dir,
        name,
        FileType::from_raw_mode(ft),
        Mode::from_raw_mode(mode & 0o7777),
        rdev as Dev,
    ) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => match c.lstat_at(&dir, name) {
            Ok(st) if file_type(st.st_mode) == ft => Ok(()),
            Ok(_) => Err(c.refuse(format!("{path}: exists with another type"))),
            Err(e) => Err(c.fail(path, e)),
        },
        Err(e) => Err(c.fail(path, e.into())),
    }
}

/// `chmod` through an `O_PATH` handle (via its `/proc/self/fd` name, which reaches exactly
/// that inode).
fn chmod_fd(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::chmod(Path::new(&proc), Mode::from_raw_mode(mode & 0o7777)).map_err(io::Error::from)
}

/// Sets attributes through the file held open for `path` (a file just created) or, failing
/// that, an `O_PATH` handle resolved beneath the root.
fn set_attrs(c: &Ctx<'_>, open: &OpenFile, path: &RelPath, a: &Attrs) -> Result<(), ApplyError> {
    let resolved;
    let fd = match open.held(path) {
        Some(fd) => fd,
        None => {
            resolved = c.root.open_at(path, OFlags::PATH, 0).map_err(|e| c.fail(path, e))?;
            &resolved
        }
    };
    let st = rustix::fs::fstat(fd).map_err(|e| c.fail(path, e.into()))?;
    let is_link = file_type(st.st_mode) == libc::S_IFLNK;
    let here = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
    // Owner first: changing it clears set-id bits, which the mode then restores.
    let mut chowned = false;
    if a.uid.is_some() || a.gid.is_some() {
        let uid = a.uid.filter(|&u| u != st.st_uid).map(rustix::fs::Uid::from_raw);
        let gid = a.gid.filter(|&g| g != st.st_gid).map(rustix::fs::Gid::from_raw);
        if uid.is_some() || gid.is_some() {
            rustix::fs::chownat(fd, "", uid, gid, here).map_err(|e| c.fail(path, e.into()))?;
            chowned = true;
        }
    }
    // A mode the file already has (a file just created with it) is not set again: a `chmod`
    // through /proc costs a path lookup and an inode update per file.
    if let Some(mode) = a.mode
        && !is_link
        && (chowned || mode & 0o7777 != st.st_mode & 0o7777)
    {
        chmod_fd(fd, mode).map_err(|e| c.fail(path, e))?;
    }
    if let Some(x) = &a.xattrs
        && !is_link
    {
        doppel_fs::xattr::replace_all(fd.as_fd(), x).map_err(|e| c.fail(path, e))?;
    }
    if a.atime.is_some() || a.mtime.is_some() {
        let omit = Timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT as _ };
        let t = Timestamps {
            last_access: a.atime.map(ts).unwrap_or(omit),
            last_modification: a.mtime.map(ts).unwrap_or(omit),
        };
        rustix::fs::utimensat(fd, "", &t, here).map_err(|e| c.fail(path, e.into()))?;
    }
    Ok(())
}
