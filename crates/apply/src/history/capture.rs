//! Taking an op's undo before the op is carried out.
//!
//! Looks at what the op is about to change and records it: old bindings of the names it
//! touches (by inode handle), old bytes of the ranges it overwrites, old sizes, old attributes
//! and times. Whatever the op would remove or replace is moved into the attic now, so the op
//! itself then finds the name free (an unlink finds nothing to remove, which it accepts).
//! Anything the op will refuse (a missing parent, a name of the wrong type, a hostile path) is
//! left alone: the op fails as it would without history, and the set records nothing for it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use doppel_fs::Beneath;
use doppel_fs::handle::Handle;
use doppel_proto::{Attrs, Op, RelPath, Timestamp, WirePath};
use rustix::fs::{AtFlags, OFlags, Stat};

use super::journal::Journal;
use super::record::{Draft, Undo};

/// A file kept open for reading old bytes between consecutive writes to it, and the last
/// parent directory resolved (a burst of creates in one directory resolves it once).
#[derive(Default)]
pub struct Reader {
    held: Option<(RelPath, OwnedFd, Handle)>,
    dir: Option<(RelPath, std::sync::Arc<OwnedFd>, Handle)>,
    /// The handle of the last name a data op looked up through its directory: a new file's
    /// write, then its attributes, look it up once.
    named: Option<(RelPath, Handle)>,
}

impl Reader {
    /// Forgets the held file (after an op that changes names).
    pub fn clear(&mut self) {
        self.held = None;
        self.named = None;
    }

    /// The handle of the object at `path`, if an op since the last change of names found it.
    fn known_handle(&self, path: &RelPath) -> Option<Handle> {
        match (&self.held, &self.named) {
            (Some((p, _, h)), _) if p == path => Some(h.clone()),
            (_, Some((p, h))) if p == path => Some(h.clone()),
            _ => None,
        }
    }

    /// Forgets the cached directory too (after an op that may move or remove one).
    pub fn clear_dirs(&mut self) {
        self.dir = None;
    }

    /// The directory at `path` (resolved beneath the root, or cached) and its handle.
    fn dir(&mut self, root: &Beneath, path: RelPath) -> io::Result<(std::sync::Arc<OwnedFd>, Handle)> {
        if let Some((p, fd, h)) = &self.dir
            && *p == path
        {
            return Ok((fd.clone(), h.clone()));
        }
        let fd = std::sync::Arc::new(root.dir(&path)?);
        let h = Handle::of(fd.as_fd(), b"")?;
        self.dir = Some((path, fd.clone(), h.clone()));
        Ok((fd, h))
    }

    fn holds(&self, path: &RelPath) -> bool {
        matches!(&self.held, Some((p, _, _)) if p == path)
    }

    fn get(&mut self, root: &Beneath, path: &RelPath) -> io::Result<(&OwnedFd, &Handle)> {
        if !matches!(&self.held, Some((p, _, _)) if p == path) {
            self.held = None;
            let fd = root.open_at(path, OFlags::RDONLY | OFlags::NONBLOCK, 0)?;
            let st = rustix::fs::fstat(&fd)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
            }
            let h = Handle::of(fd.as_fd(), b"")?;
            self.held = Some((path.clone(), fd, h));
        }
        let (_, fd, h) = self.held.as_ref().expect("just set");
        Ok((fd, h))
    }
}

/// What taking an undo needs.
pub struct Taker<'a> {
    /// The replica tree.
    pub root: &'a Beneath,
    /// The journal (its attic takes what the op would remove).
    pub journal: &'a mut Journal,
    /// The file read for old bytes.
    pub reader: &'a mut Reader,
    /// The set being built.
    pub draft: Draft,
    /// Objects moved aside so far by this set.
    pub asides: usize,
    /// What the objects moved aside take, as the quota's measure of the op counted them
    /// freed (an unlink, a rmdir, a rename's victim): they stay, in the attic.
    pub kept: crate::quota::Usage,
    /// The op is one whose removals the quota's measure counts as freed.
    pub counted_freed: bool,
}

fn times_of(st: &Stat) -> Attrs {
    let t = |secs: i64, nanos: i64| Some(Timestamp { secs, nanos: nanos as u32 });
    Attrs {
        atime: t(st.st_atime, st.st_atime_nsec as i64),
        mtime: t(st.st_mtime, st.st_mtime_nsec as i64),
        ..Attrs::default()
    }
}

fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn kind(st: &Stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

/// A name's parent directory, resolved beneath the root, and facts about it.
struct Parent<'p> {
    fd: std::sync::Arc<OwnedFd>,
    name: &'p [u8],
    handle: Handle,
    here: Option<Stat>,
}

impl Taker<'_> {
    /// Takes the undo of `op`. Errors are the ones the op itself could hit (space, I/O) and
    /// stop it; conditions the op will refuse just leave the set without facts for it.
    pub fn take(&mut self, op: &Op) -> io::Result<()> {
        if op.changes_names() {
            self.reader.clear();
        }
        if matches!(op, Op::Rename { .. } | Op::Rmdir { .. }) {
            self.reader.clear_dirs();
        }
        // The quota's measure counts an unlink's, a rmdir's and a rename victim's inode as
        // freed, and a symlink over an old one as no change (one inode for another): with the
        // old one kept in the attic, each of these takes its footprint more than measured.
        self.counted_freed = matches!(op, Op::Unlink { .. } | Op::Rmdir { .. } | Op::Symlink { .. })
            || matches!(op, Op::Rename { flags, .. } if !flags.exchange);
        let r = match op {
            Op::Create { path, .. } | Op::Mkdir { path, .. } | Op::Mknod { path, .. } => {
                self.create(path, matches!(op, Op::Mkdir { .. }), false)
            }
            Op::Symlink { path, .. } | Op::Link { path, .. } => self.create(path, false, true),
            Op::Rename { from, to, flags } if flags.exchange => self.exchange(from, to),
            Op::Rename { from, to, flags } => self.rename(from, to, flags.noreplace),
            Op::Unlink { path } => self.remove(path, false),
            Op::Rmdir { path } => self.remove(path, true),
            Op::Write { path, offset, data } => self.content(path, *offset, data.len() as u64),
            Op::Truncate { path, size } => self.content(path, *size, u64::MAX),
            Op::Fallocate { path, mode, offset, len } => {
                let changes_bytes =
                    mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) as u32 != 0;
                let len = if changes_bytes { *len } else { 0 };
                self.content(path, *offset, len)
            }
            Op::SetAttr { path, attrs } => self.attrs(path, attrs),
            Op::Fsync { .. } | Op::Point { .. } => Ok(()),
        };
        match r {
            Err(e) if !stops(&e) => Ok(()),
            r => r,
        }
    }

    fn parent<'p>(&mut self, path: &'p RelPath) -> io::Result<Parent<'p>> {
        let (dir, _) = path.split_last().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let name = path.name();
        let (fd, handle) = self.reader.dir(self.root, dir)?;
        let here = lstat_at(fd.as_fd(), name)?;
        Ok(Parent { fd, name, handle, here })
    }

    fn rel(w: &WirePath) -> io::Result<RelPath> {
        let p =
            RelPath::try_from(w).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        if p.is_root() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the root"));
        }
        Ok(p)
    }

    fn dir_times(&mut self, p: &Parent<'_>) -> io::Result<()> {
        let st = rustix::fs::fstat(&*p.fd)?;
        self.draft.set.undo.push(Undo::Attrs { obj: p.handle.clone(), old: times_of(&st) });
        Ok(())
    }

    fn entry(&mut self, p: &Parent<'_>, before: Option<Handle>) {
        self.draft.set.undo.push(Undo::Entry { dir: p.handle.clone(), name: p.name.to_vec(), before });
    }

    /// Moves the object at `p` into the attic, noting it.
    fn aside(&mut self, p: &Parent<'_>, path: &RelPath) -> io::Result<Handle> {
        let handle = Handle::of(p.fd.as_fd(), p.name)?;
        let (attic, _) = self.journal.attic_for(self.draft.set.seq, self.draft.set.time_us)?;
        let name = format!("{}-{}", self.draft.set.seq, self.asides);
        self.asides += 1;
        let bytes = p.here.as_ref().map_or(0, |st| st.st_blocks as u64 * 512);
        if self.counted_freed
            && let Some(st) = &p.here
        {
            let f = crate::quota::Footprint::of(st).freed();
            self.kept.bytes += f.bytes;
            self.kept.files += f.files;
        }
        // Recorded first: a kill right after the move leaves the set that says where it went.
        self.draft.set.undo.push(Undo::Aside { path: path.as_bytes().to_vec(), attic: name.clone() });
        rustix::fs::renameat_with(&p.fd, p.name, &attic, name.as_str(), rustix::fs::RenameFlags::NOREPLACE)?;
        self.journal.charge_attic(bytes);
        Ok(handle)
    }

    fn create(&mut self, path: &WirePath, dir: bool, replaces: bool) -> io::Result<()> {
        let rel = Self::rel(path)?;
        let p = self.parent(&rel)?;
        let before = match &p.here {
            None => None,
            // Creating what exists changes nothing (or is refused); a symlink or hard link
            // replaces a non-directory, which goes to the attic.
            Some(st) if replaces && kind(st) != libc::S_IFDIR => Some(st),
            Some(_) => return Ok(()),
        };
        self.dir_times(&p)?;
        let before = match before {
            Some(_) => Some(self.aside(&p, &rel)?),
            None => None,
        };
        self.entry(&p, before);
        self.draft.set.undo.push(Undo::Created { path: rel.as_bytes().to_vec(), dir });
        Ok(())
    }

    fn rename(&mut self, from: &WirePath, to: &WirePath, noreplace: bool) -> io::Result<()> {
        let (f, t) = (Self::rel(from)?, Self::rel(to)?);
        let pf = self.parent(&f)?;
        let pt = self.parent(&t)?;
        let Some(fst) = pf.here else { return Ok(()) };
        let moved = Handle::of(pf.fd.as_fd(), pf.name)?;
        let victim = match &pt.here {
            Some(tst) if (tst.st_dev, tst.st_ino) == (fst.st_dev, fst.st_ino) => return Ok(()),
            Some(_) if noreplace => return Ok(()),
            Some(tst) if kind(tst) == libc::S_IFDIR && !(kind(&fst) == libc::S_IFDIR && empty_dir(&pt)?) => {
                return Ok(());
            }
            Some(_) => true,
            None => false,
        };
        self.dir_times(&pf)?;
        self.dir_times(&pt)?;
        let before_to = if victim { Some(self.aside(&pt, &t)?) } else { None };
        self.draft.set.undo.push(Undo::Entry {
            dir: pf.handle.clone(),
            name: pf.name.to_vec(),
            before: Some(moved),
        });
        self.entry(&pt, before_to);
        self.draft.set.undo.push(Undo::Renamed { from: f.as_bytes().to_vec(), to: t.as_bytes().to_vec() });
        Ok(())
    }

    fn exchange(&mut self, a: &WirePath, b: &WirePath) -> io::Result<()> {
        let (a, b) = (Self::rel(a)?, Self::rel(b)?);
        let pa = self.parent(&a)?;
        let pb = self.parent(&b)?;
        if pa.here.is_none() || pb.here.is_none() {
            return Ok(());
        }
        let ha = Handle::of(pa.fd.as_fd(), pa.name)?;
        let hb = Handle::of(pb.fd.as_fd(), pb.name)?;
        self.dir_times(&pa)?;
        self.dir_times(&pb)?;
        self.entry(&pa, Some(ha));
        self.entry(&pb, Some(hb));
        self.draft.set.undo.push(Undo::Exchanged { a: a.as_bytes().to_vec(), b: b.as_bytes().to_vec() });
        Ok(())
    }

    fn remove(&mut self, path: &WirePath, dir: bool) -> io::Result<()> {
        let rel = Self::rel(path)?;
        let p = self.parent(&rel)?;
        let Some(st) = &p.here else { return Ok(()) };
        if (kind(st) == libc::S_IFDIR) != dir || (dir && !empty_dir(&p)?) {
            return Ok(());
        }
        self.dir_times(&p)?;
        let h = self.aside(&p, &rel)?;
        self.entry(&p, Some(h));
        Ok(())
    }

    /// A data op on `path`: the old size and the old bytes of `[off, off + len)` within it.
    fn content(&mut self, path: &WirePath, off: u64, len: u64) -> io::Result<()> {
        let rel = RelPath::try_from(path)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        if !self.reader.holds(&rel) && !rel.is_root() {
            // Nothing to read when the op starts at or past the end (appends, new files,
            // growing truncates): the name's facts come from its directory, no open.
            let p = self.parent(&rel)?;
            let Some(st) = p.here.filter(|st| kind(st) == libc::S_IFREG) else { return Ok(()) };
            if off >= st.st_size as u64 {
                let obj = Handle::of(p.fd.as_fd(), p.name)?;
                self.reader.named = Some((rel.clone(), obj.clone()));
                self.draft.set.undo.push(Undo::Attrs { obj: obj.clone(), old: times_of(&st) });
                self.draft.set.undo.push(Undo::Content {
                    obj,
                    old_size: st.st_size as u64,
                    ranges: Vec::new(),
                });
                return Ok(());
            }
        }
        let (fd, h) = self.reader.get(self.root, &rel)?;
        let st = rustix::fs::fstat(fd)?;
        let old_size = st.st_size as u64;
        let end = off.saturating_add(len).min(old_size);
        let mut ranges = Vec::new();
        let mut at = off.min(end);
        while at < end {
            let n = ((end - at) as usize).min(1 << 20);
            let range = if n >= HOLE_CHECK_MIN && no_data(fd.as_fd(), at, at + n as u64) {
                Draft::zero_range(at, n)
            } else {
                self.draft.read_range(at, n, |buf| read_exact_at(fd, buf, at))?
            };
            ranges.push(range);
            at += n as u64;
        }
        let (obj, times) = (h.clone(), times_of(&st));
        self.draft.set.undo.push(Undo::Attrs { obj: obj.clone(), old: times });
        self.draft.set.undo.push(Undo::Content { obj, old_size, ranges });
        Ok(())
    }

    fn attrs(&mut self, path: &WirePath, a: &Attrs) -> io::Result<()> {
        let rel = RelPath::try_from(path)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let (fd, st) = if rel.is_root() {
            let fd = self.root.open_at(&rel, OFlags::PATH, 0)?;
            let st = rustix::fs::fstat(&fd)?;
            (fd, st)
        } else {
            // Through the (cached) parent: a burst of attribute changes in one directory
            // resolves it once.
            let p = self.parent(&rel)?;
            let Some(st) = p.here else { return Ok(()) };
            // Known from the op before (a new file's write): no descriptor needed unless the
            // extended attributes are read.
            if let Some(obj) = self.reader.known_handle(&rel).filter(|_| a.xattrs.is_none()) {
                let old = old_attrs(a, &st, None)?;
                self.draft.set.undo.push(Undo::Attrs { obj, old });
                return Ok(());
            }
            let fd = rustix::fs::openat(
                &*p.fd,
                p.name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?;
            (fd, st)
        };
        let obj = Handle::of(fd.as_fd(), b"")?;
        let old = old_attrs(a, &st, Some(fd.as_fd()))?;
        self.draft.set.undo.push(Undo::Attrs { obj, old });
        Ok(())
    }
}

/// What `a` is about to change, as `st` (and, for extended attributes, `fd`) shows it now.
fn old_attrs(a: &Attrs, st: &Stat, fd: Option<BorrowedFd<'_>>) -> io::Result<Attrs> {
    let mut old = Attrs::default();
    if a.mode.is_some() || a.uid.is_some() || a.gid.is_some() {
        // A change of owner clears set-id bits: the mode is restored with the owner.
        old.mode = Some(st.st_mode & 0o7777);
    }
    if a.uid.is_some() || a.gid.is_some() {
        (old.uid, old.gid) = (Some(st.st_uid), Some(st.st_gid));
    }
    if a.atime.is_some() || a.mtime.is_some() {
        let t = times_of(st);
        (old.atime, old.mtime) = (t.atime, t.mtime);
    }
    if a.xattrs.is_some()
        && kind(st) != libc::S_IFLNK
        && let Some(fd) = fd
    {
        old.xattrs = Some(doppel_fs::xattr::read_fd(fd)?);
    }
    Ok(old)
}

fn empty_dir(p: &Parent<'_>) -> io::Result<bool> {
    let fd = rustix::fs::openat(
        &p.fd,
        p.name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let mut dir = rustix::fs::Dir::read_from(&fd)?;
    while let Some(e) = dir.read() {
        let e = e?;
        if !matches!(e.file_name().to_bytes(), b"." | b"..") {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Ranges at least this long are first asked whether they hold any data at all: one `lseek`
/// is cheap next to reading them, not next to reading 4 KiB.
const HOLE_CHECK_MIN: usize = 64 << 10;

/// Whether `[from, to)` of `fd` holds no data: a hole, or extents allocated but never written
/// (`fallocate`, as `fio`, databases and `qemu-img create -o preallocation=falloc` lay out
/// files), which read as zeros. The kernel answers from the extent map and the page cache
/// (pages written but not yet on disk count as data), so nothing is read: overwriting a
/// preallocated image had the target read every old byte of it (zeros, through the page cache)
/// before writing the new ones. Where the file system cannot tell, everything is data.
fn no_data(fd: BorrowedFd<'_>, from: u64, to: u64) -> bool {
    match rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(from)) {
        Ok(next) => next >= to,
        // No data from `from` to the end of the file.
        Err(rustix::io::Errno::NXIO) => true,
        Err(_) => false,
    }
}

fn read_exact_at(fd: &OwnedFd, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pread(fd, &mut *buf, off) {
            Ok(0) => {
                // The file is shorter than it said (nothing else writes it): the rest is zero.
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether an error while taking an undo must stop the op (it would hit the same condition,
/// or the journal cannot be written); other errors mean the op will be refused anyway.
fn stops(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EIO | libc::EROFS | libc::ENOMEM | libc::EAGAIN)
    )
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    use super::no_data;

    /// Holes and never-written preallocated space hold no data; anything written does, on
    /// disk or only in the page cache.
    #[test]
    fn only_holes_and_unwritten_space_hold_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let mib = 1u64 << 20;
        let pre = std::fs::File::create_new(dir.path().join("pre")).unwrap();
        rustix::fs::fallocate(pre.as_fd(), rustix::fs::FallocateFlags::empty(), 0, 4 * mib).unwrap();
        assert!(no_data(pre.as_fd(), 0, 4 * mib), "preallocated, never written");
        pre.write_all_at(&[7u8; 4096], mib).unwrap();
        assert!(!no_data(pre.as_fd(), 0, 2 * mib), "written, only in the page cache");
        assert!(!no_data(pre.as_fd(), mib + 4095, mib + 4096));
        assert!(no_data(pre.as_fd(), 2 * mib, 4 * mib));
        pre.sync_all().unwrap();
        assert!(!no_data(pre.as_fd(), mib, mib + 1), "written, on disk");
        assert!(no_data(pre.as_fd(), mib + (64 << 10), 4 * mib));

        let sparse = std::fs::File::create_new(dir.path().join("sparse")).unwrap();
        sparse.set_len(8 * mib).unwrap();
        sparse.write_all_at(b"end", 8 * mib - 3).unwrap();
        assert!(no_data(sparse.as_fd(), 0, 4 * mib), "a hole");
        assert!(!no_data(sparse.as_fd(), 0, 8 * mib), "the last bytes are data");
    }
}
