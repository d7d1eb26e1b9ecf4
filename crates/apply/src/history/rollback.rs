//! Taking the replica itself back to a point: the undo sets after it, newest first, each
//! undone step by step in reverse (a failover to a chosen point).
//!
//! Each step is safe to repeat (a name already moved back is left alone, bytes and attributes
//! are absolute), except an exchange; the point reached is recorded after every set (in the
//! page cache, like apply's progress) so a rollback cut short by a kill resumes at the set it
//! was undoing. Once done, the sets after the point are cut from the journal: the history
//! before the point stays.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use doppel_fs::Beneath;
use doppel_proto::{Attrs, RelPath};
use rustix::fs::{AtFlags, FallocateFlags, OFlags, Timespec, Timestamps};

use super::journal::{self, Found};
use super::record::Undo;

/// Where a rollback in progress has got to (`history/rollback`): `target reached`.
fn progress_path(dir: &Path) -> std::path::PathBuf {
    dir.join("rollback")
}

/// The point of a rollback that was cut short, if one was.
pub fn in_progress(dir: &Path) -> Option<(u64, u64)> {
    let s = fs::read_to_string(progress_path(dir)).ok()?;
    let mut it = s.split_whitespace().map(|w| w.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// Rolls the replica at `root` (history in `dir`, attic in `attic`) back to `point`. Nothing
/// else may write the replica meanwhile. Returns how many sets were undone.
pub fn roll_back(root: &Beneath, dir: &Path, attic: &Path, point: u64) -> io::Result<u64> {
    let mut sets: Vec<(u64, Found)> = Vec::new();
    for first in after(dir, point)? {
        let file = journal::Journal::open_segment(dir, first)?;
        journal::scan(&file, 0, |f| {
            if f.set.seq > point {
                sets.push((first, f));
            }
        })?;
    }
    let reached = in_progress(dir).filter(|(p, _)| *p == point).map(|(_, r)| r);
    let mut undone = 0;
    for (seg, found) in sets.iter().rev() {
        if reached.is_some_and(|r| found.set.seq > r) {
            continue;
        }
        let file = journal::Journal::open_segment(dir, *seg)?;
        for u in found.set.undo.iter().rev() {
            step(root, &attic.join(seg.to_string()), &file, found.data_at, u)?;
        }
        fs::write(progress_path(dir), format!("{point} {}", found.set.seq - 1))?;
        undone += 1;
    }
    rustix::fs::syncfs(root.root_fd())?;
    cut(dir, attic, point)?;
    fs::remove_file(progress_path(dir))
        .or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) })?;
    Ok(undone)
}

/// Removes every set after `point` from the journal (and their segments' attics when whole
/// segments go).
fn cut(dir: &Path, attic: &Path, point: u64) -> io::Result<()> {
    for first in after(dir, point)? {
        let path = dir.join(journal::segment_name(first));
        let file = fs::OpenOptions::new().read(true).write(true).open(&path)?;
        let mut keep_to = None;
        journal::scan(&file, 0, |f| {
            if f.set.seq > point && keep_to.is_none() {
                keep_to = Some(f.at);
            }
        })?;
        match keep_to {
            Some(0) => {
                fs::remove_file(&path)?;
                let _ = fs::remove_dir_all(attic.join(first.to_string()));
            }
            Some(at) => {
                file.set_len(at)?;
                file.sync_all()?;
            }
            None => {}
        }
    }
    File::open(dir)?.sync_all()
}

/// The segments that may hold sets after `point` (a segment followed by one that starts at or
/// before `point + 1` holds none).
fn after(dir: &Path, point: u64) -> io::Result<Vec<u64>> {
    let firsts = journal::list_segments(dir)?;
    Ok(firsts
        .iter()
        .enumerate()
        .filter(|(i, _)| firsts.get(i + 1).is_none_or(|&next| next > point + 1))
        .map(|(_, &f)| f)
        .collect())
}

fn rel(p: &[u8]) -> io::Result<RelPath> {
    RelPath::new(p.to_vec()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

fn missing(root: &Beneath, p: &RelPath) -> io::Result<bool> {
    let (d, name) = root.parent(p)?;
    match rustix::fs::statat(&d, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(false),
        Err(rustix::io::Errno::NOENT) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

fn step(root: &Beneath, attic: &Path, seg: &File, data_at: u64, u: &Undo) -> io::Result<()> {
    match u {
        Undo::Entry { .. } => Ok(()),
        Undo::Aside { path, attic: name } => {
            let p = rel(path)?;
            let from = attic.join(name);
            if from.symlink_metadata().is_err() {
                return Ok(());
            }
            let adir = rustix::fs::open(
                attic,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?;
            let (d, n) = root.parent(&p)?;
            rustix::fs::renameat_with(&adir, name.as_str(), &d, n, rustix::fs::RenameFlags::NOREPLACE)?;
            Ok(())
        }
        Undo::Created { path, dir } => {
            let p = rel(path)?;
            let (d, n) = root.parent(&p)?;
            let flags = if *dir { AtFlags::REMOVEDIR } else { AtFlags::empty() };
            match rustix::fs::unlinkat(&d, n, flags) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Undo::Renamed { from, to } => {
            let (f, t) = (rel(from)?, rel(to)?);
            if missing(root, &t)? && !missing(root, &f)? {
                return Ok(());
            }
            let (fd, fname) = root.parent(&f)?;
            let (td, tname) = root.parent(&t)?;
            rustix::fs::renameat_with(&td, tname, &fd, fname, rustix::fs::RenameFlags::NOREPLACE)?;
            Ok(())
        }
        Undo::Exchanged { a, b } => {
            let (a, b) = (rel(a)?, rel(b)?);
            let (ad, an) = root.parent(&a)?;
            let (bd, bn) = root.parent(&b)?;
            rustix::fs::renameat_with(&ad, an, &bd, bn, rustix::fs::RenameFlags::EXCHANGE)?;
            Ok(())
        }
        Undo::Content { obj, old_size, ranges } => {
            let fd = obj.open(root.root_fd(), OFlags::RDWR | OFlags::NONBLOCK)?;
            rustix::fs::ftruncate(&fd, *old_size)?;
            let mut buf = Vec::new();
            for r in ranges {
                if r.zero {
                    let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                    if rustix::fs::fallocate(&fd, punch, r.off, r.len).is_err() {
                        write_all_at(&fd, &vec![0u8; r.len as usize], r.off)?;
                    }
                    continue;
                }
                buf.resize(r.len as usize, 0);
                seg.read_exact_at(&mut buf, data_at + r.data_at)?;
                write_all_at(&fd, &buf, r.off)?;
            }
            Ok(())
        }
        Undo::Attrs { obj, old } => set_attrs(root, obj, old),
    }
}

fn write_all_at(fd: &std::os::fd::OwnedFd, mut data: &[u8], mut off: u64) -> io::Result<()> {
    while !data.is_empty() {
        let n = rustix::io::pwrite(fd, data, off)?;
        data = &data[n..];
        off += n as u64;
    }
    Ok(())
}

fn set_attrs(root: &Beneath, obj: &doppel_fs::handle::Handle, a: &Attrs) -> io::Result<()> {
    let fd = match obj.open(root.root_fd(), OFlags::PATH) {
        Ok(fd) => fd,
        // An object created after the point and removed by this rollback.
        Err(e) if e.raw_os_error() == Some(libc::ESTALE) => return Ok(()),
        Err(e) => return Err(e),
    };
    let st = rustix::fs::fstat(&fd)?;
    let link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
    let here = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
    if a.uid.is_some() || a.gid.is_some() {
        rustix::fs::chownat(
            &fd,
            "",
            a.uid.map(rustix::fs::Uid::from_raw),
            a.gid.map(rustix::fs::Gid::from_raw),
            here,
        )?;
    }
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    if let Some(mode) = a.mode.filter(|_| !link) {
        rustix::fs::chmod(Path::new(&proc), rustix::fs::Mode::from_raw_mode(mode & 0o7777))?;
    }
    if let Some(x) = a.xattrs.as_ref().filter(|_| !link) {
        doppel_fs::xattr::replace_all(fd.as_fd(), x)?;
    }
    if a.atime.is_some() || a.mtime.is_some() {
        let omit = Timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT as _ };
        let ts = |t: doppel_proto::Timestamp| Timespec { tv_sec: t.secs, tv_nsec: t.nanos as _ };
        let t = Timestamps {
            last_access: a.atime.map(ts).unwrap_or(omit),
            last_modification: a.mtime.map(ts).unwrap_or(omit),
        };
        rustix::fs::utimensat(&fd, "", &t, here)?;
    }
    Ok(())
}
