//! Writing a point's tree (or some paths of it) into a directory.
//!
//! Reads through a [`PointView`], so it works while apply goes on and copies exactly the
//! point's names, types, bytes (holes stay holes), modes, owners, xattrs and times; names of
//! one inode are restored as hard links of one file.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, symlink};
use std::path::{Path, PathBuf};

use doppel_fs::handle::Handle;
use rustix::fs::{AtFlags, Mode, Timespec, Timestamps};

use super::view::{ObjMeta, PointView};

/// What a restore wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Objects written (files, directories, links, nodes).
    pub objects: u64,
    /// File bytes written.
    pub bytes: u64,
    /// File bytes read, holes and zeros included (how far through [`measure`]'s bytes).
    pub read: u64,
}

/// What a restore of the same `paths` will write, from the point's metadata alone (no file
/// content is read): its objects, and in `bytes` (and `read`) the sizes of its files. A
/// progress display's total.
pub fn measure(view: &mut PointView, paths: &[Vec<u8>]) -> io::Result<Restored> {
    let mut m = Measure { view, links: std::collections::HashSet::new(), total: Restored::default() };
    if paths.is_empty() {
        let root = m.view.root()?;
        m.children(&root)?;
        return Ok(m.total);
    }
    for p in paths {
        // A path missing at the point is the restore's error to report.
        if let Some(obj) = m.view.resolve(p)? {
            m.object(&obj)?;
        }
    }
    Ok(m.total)
}

/// Counts what [`Run`] writes, in the same order and with the same rules.
struct Measure<'a> {
    view: &'a mut PointView,
    links: std::collections::HashSet<Handle>,
    total: Restored,
}

impl Measure<'_> {
    fn children(&mut self, dir: &Handle) -> io::Result<()> {
        for (_, obj) in self.view.read_dir(dir)? {
            self.object(&obj)?;
        }
        Ok(())
    }

    fn object(&mut self, obj: &Handle) -> io::Result<()> {
        let meta = self.view.meta(obj)?;
        if meta.kind != libc::S_IFDIR && meta.nlink > 1 && !self.links.insert(obj.clone()) {
            return Ok(());
        }
        match meta.kind {
            libc::S_IFDIR => self.children(obj)?,
            libc::S_IFREG => {
                self.total.bytes += meta.size;
                self.total.read += meta.size;
            }
            _ => {}
        }
        self.total.objects += 1;
        Ok(())
    }
}

/// Restores into `to` (an existing, empty directory): the whole tree when `paths` is empty,
/// else each path (with the directories leading to it). `progress` hears the objects and bytes
/// written so far (against [`measure`]'s total). A path that did not exist at the point is an error naming it.
pub fn restore(
    view: &mut PointView,
    paths: &[Vec<u8>],
    to: &Path,
    progress: &mut dyn FnMut(Restored),
) -> io::Result<Restored> {
    let mut r = Run { view, links: HashMap::new(), done: Restored::default(), progress };
    if paths.is_empty() {
        let root = r.view.root()?;
        r.children(&root, to)?;
        let meta = r.view.meta(&root)?;
        r.attrs(&root, &meta, to)?;
        return Ok(r.done);
    }
    for p in paths {
        let Some(obj) = r.view.resolve(p)? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} did not exist at point {}", String::from_utf8_lossy(p), r.view.point()),
            ));
        };
        let rel: PathBuf = Path::new(std::ffi::OsStr::from_bytes(p)).components().collect();
        let dest = to.join(&rel);
        r.parents(p, to)?;
        r.object(&obj, &dest)?;
    }
    Ok(r.done)
}

struct Run<'a> {
    view: &'a mut PointView,
    links: HashMap<Handle, PathBuf>,
    done: Restored,
    progress: &'a mut dyn FnMut(Restored),
}

impl Run<'_> {
    /// Creates the directories leading to `path` beneath `to`, with their modes and owners at
    /// the point.
    fn parents(&mut self, path: &[u8], to: &Path) -> io::Result<()> {
        let names: Vec<&[u8]> = path.split(|&b| b == b'/').filter(|n| !n.is_empty()).collect();
        let mut at = self.view.root()?;
        let mut dest = to.to_path_buf();
        for name in &names[..names.len().saturating_sub(1)] {
            at = self.view.lookup(&at, name)?.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            dest.push(std::ffi::OsStr::from_bytes(name));
            if !dest.exists() {
                fs::create_dir(&dest)?;
                let meta = self.view.meta(&at)?;
                self.attrs(&at, &meta, &dest)?;
            }
        }
        Ok(())
    }

    fn children(&mut self, dir: &Handle, dest: &Path) -> io::Result<()> {
        for (name, obj) in self.view.read_dir(dir)? {
            self.object(&obj, &dest.join(std::ffi::OsStr::from_bytes(&name)))?;
        }
        Ok(())
    }

    fn object(&mut self, obj: &Handle, dest: &Path) -> io::Result<()> {
        let meta = self.view.meta(obj)?;
        if meta.kind != libc::S_IFDIR
            && meta.nlink > 1
            && let Some(first) = self.links.get(obj)
        {
            fs::hard_link(first, dest)?;
            return Ok(());
        }
        match meta.kind {
            libc::S_IFDIR => {
                fs::create_dir(dest)?;
                self.children(obj, dest)?;
            }
            libc::S_IFREG => self.file(obj, &meta, dest)?,
            libc::S_IFLNK => symlink(std::ffi::OsStr::from_bytes(&self.view.readlink(obj)?), dest)?,
            kind => rustix::fs::mknodat(
                rustix::fs::CWD,
                dest,
                rustix::fs::FileType::from_raw_mode(kind),
                Mode::from_raw_mode(meta.mode),
                meta.rdev,
            )?,
        }
        if meta.kind != libc::S_IFDIR && meta.nlink > 1 {
            self.links.insert(obj.clone(), dest.to_path_buf());
        }
        self.attrs(obj, &meta, dest)?;
        self.done.objects += 1;
        (self.progress)(self.done);
        Ok(())
    }

    fn file(&mut self, obj: &Handle, meta: &ObjMeta, dest: &Path) -> io::Result<()> {
        let f = fs::File::create(dest)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < meta.size {
            let want = (meta.size - off).min(buf.len() as u64) as usize;
            let n = self.view.read(obj, off, &mut buf[..want])?;
            if n == 0 {
                break;
            }
            // Zeros are left as a hole.
            if buf[..n].iter().any(|&b| b != 0) {
                f.write_all_at(&buf[..n], off)?;
                self.done.bytes += n as u64;
            }
            off += n as u64;
            self.done.read += n as u64;
            (self.progress)(self.done);
        }
        f.set_len(meta.size)?;
        Ok(())
    }

    fn attrs(&mut self, obj: &Handle, meta: &ObjMeta, dest: &Path) -> io::Result<()> {
        let link = meta.kind == libc::S_IFLNK;
        rustix::fs::chownat(
            rustix::fs::CWD,
            dest,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if !link {
            rustix::fs::chmod(dest, Mode::from_raw_mode(meta.mode))?;
            for x in self.view.xattrs(obj)? {
                rustix::fs::lsetxattr(dest, &x.name[..], &x.value, rustix::fs::XattrFlags::empty())?;
            }
        }
        let ts = |t: doppel_proto::Timestamp| Timespec { tv_sec: t.secs, tv_nsec: t.nanos as _ };
        let times = Timestamps { last_access: ts(meta.atime), last_modification: ts(meta.mtime) };
        rustix::fs::utimensat(rustix::fs::CWD, dest, &times, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }
}
