//! The replica as it was at a point, read lazily from the live tree and the undo journal.
//!
//! A set in the journal says what op `N` changed, as it was just before `N`. So for point `P`
//! the oldest set after `P` that mentions a name, a byte or an attribute holds its value at
//! `P`; anything no set after `P` mentions is unchanged since, and the live replica has it.
//! Nothing is copied: a view opens in the time it takes to index the sets after `P`, whatever
//! the replica's size.
//!
//! Apply goes on meanwhile. Every answer reads the live replica *first* and the journal
//! *after*: an op that changed what was read had its set written before it touched the
//! replica, so the second look finds it. Segments after `P` are pinned while the view is open
//! (a file under `history/pins/`), so retention never drops what it reads.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use doppel_fs::Beneath;
use doppel_fs::handle::Handle;
use doppel_proto::{Attrs, Timestamp, Xattr};
use rustix::fs::OFlags;

use super::journal::{self, Found};
use super::record::{Mark, Undo};

/// Why a view cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The point is outside the window the history holds.
    #[error("point {point} is outside the history held ({window})")]
    OutsideWindow {
        /// The point asked for.
        point: u64,
        /// The window, in words.
        window: String,
    },
    /// Reading the replica or its journal failed.
    #[error("{path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// A byte range of a file's old content in the journal.
#[derive(Debug, Clone, Copy)]
struct DataRef {
    seg: u64,
    file_at: u64,
    off: u64,
    len: u64,
    zero: bool,
}

#[derive(Default)]
struct Index {
    entries: HashMap<(Handle, Vec<u8>), Option<Handle>>,
    names: HashMap<Handle, Vec<Vec<u8>>>,
    attrs: HashMap<Handle, Attrs>,
    sizes: HashMap<Handle, u64>,
    data: HashMap<Handle, Vec<DataRef>>,
}

impl Index {
    /// Takes in one set (sets come oldest first: the first value seen for a key is the one
    /// at the point).
    fn add(&mut self, seg: u64, found: &Found) {
        for u in &found.set.undo {
            match u {
                Undo::Entry { dir, name, before } => {
                    let key = (dir.clone(), name.clone());
                    if !self.entries.contains_key(&key) {
                        self.names.entry(dir.clone()).or_default().push(name.clone());
                        self.entries.insert(key, before.clone());
                    }
                }
                Undo::Attrs { obj, old } => merge_first(self.attrs.entry(obj.clone()).or_default(), old),
                Undo::Content { obj, old_size, ranges } => {
                    self.sizes.entry(obj.clone()).or_insert(*old_size);
                    let refs = self.data.entry(obj.clone()).or_default();
                    refs.extend(ranges.iter().map(|r| DataRef {
                        seg,
                        file_at: found.data_at + r.data_at,
                        off: r.off,
                        len: r.len,
                        zero: r.zero,
                    }));
                }
                Undo::Aside { .. } | Undo::Created { .. } | Undo::Renamed { .. } | Undo::Exchanged { .. } => {
                }
            }
        }
    }
}

/// Keeps each field already set (an older value), takes the others from `old`.
fn merge_first(into: &mut Attrs, old: &Attrs) {
    into.mode = into.mode.or(old.mode);
    into.uid = into.uid.or(old.uid);
    into.gid = into.gid.or(old.gid);
    into.atime = into.atime.or(old.atime);
    into.mtime = into.mtime.or(old.mtime);
    if into.xattrs.is_none() {
        into.xattrs.clone_from(&old.xattrs);
    }
}

/// What a listing shows of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// The point (the state after this op).
    pub seq: u64,
    /// Its capture time (µs since the epoch).
    pub time_us: u64,
    /// What makes it worth naming.
    pub mark: Mark,
}

/// The window a history holds and its named points. Only these are kept in memory: a busy
/// day holds tens of millions of sets, whose times are read from the journal when a time must
/// be resolved ([`Summary::point_at`]).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The oldest point that can be restored, and the capture time of the first op held
    /// (`None`: no history yet).
    pub oldest: Option<(u64, u64)>,
    /// The newest set journaled and its time.
    pub newest: Option<(u64, u64)>,
    /// Named points, oldest first.
    pub points: Vec<Point>,
    /// Bytes the history takes.
    pub bytes: u64,
    /// Sets journaled.
    pub sets: u64,
    /// The journal's directory and its segments (first sequences), to read times from.
    dir: PathBuf,
    firsts: Vec<u64>,
}

/// The point just before the first op, in sequence order, captured after `t_us` (`None`: no
/// op was): ordered by sequence, so an op whose time went back (a source clock stepped back)
/// after a later one never comes before it.
pub fn first_after(times: impl IntoIterator<Item = (u64, u64)>, t_us: u64) -> Option<u64> {
    times.into_iter().find(|(_, t)| *t > t_us).map(|(seq, _)| seq - 1)
}

impl Summary {
    /// The latest point at or before time `t_us` (see [`first_after`]); `None` if `t_us` is
    /// before the window's first op.
    pub fn point_at(&self, t_us: u64) -> io::Result<Option<u64>> {
        let Some((_, first_time)) = self.oldest else { return Ok(None) };
        if t_us < first_time {
            return Ok(None);
        }
        for &first in &self.firsts {
            let file = journal::Journal::open_segment(&self.dir, first)?;
            let mut times = Vec::new();
            journal::scan_headers(&file, 0, |f| times.push((f.set.seq, f.set.time_us)))?;
            if let Some(p) = first_after(times, t_us) {
                return Ok(Some(p));
            }
        }
        Ok(Some(self.newest.map_or(0, |n| n.0)))
    }

    /// The capture time of the op that made point `seq`, if it is held.
    pub fn time_of(&self, seq: u64) -> Option<u64> {
        let first = *self.firsts.iter().rev().find(|f| **f <= seq)?;
        let file = journal::Journal::open_segment(&self.dir, first).ok()?;
        let mut time = None;
        journal::scan_headers(&file, 0, |f| {
            if f.set.seq == seq && time.is_none() {
                time = Some(f.set.time_us);
            }
        })
        .ok()?;
        time
    }
}

/// Reads a history's window and named points from its directory (whether or not a process
/// is applying to the replica), headers only.
pub fn summary(dir: &Path, attic: &Path) -> io::Result<Summary> {
    let mut s = Summary { dir: dir.to_path_buf(), ..Summary::default() };
    for first in journal::list_segments(dir)? {
        let file = journal::Journal::open_segment(dir, first)?;
        s.bytes += file.metadata()?.len() + journal::du(&attic.join(first.to_string()));
        s.firsts.push(first);
        journal::scan_headers(&file, 0, |f| {
            if s.oldest.is_none() {
                s.oldest = Some((f.set.seq.saturating_sub(1), f.set.time_us));
            }
            s.newest = Some((f.set.seq, f.set.time_us));
            s.sets += 1;
            if let Some(m) = &f.set.mark {
                s.points.push(Point { seq: f.set.seq, time_us: f.set.time_us, mark: m.clone() });
            }
        })?;
    }
    Ok(s)
}

/// Metadata of an object at the point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjMeta {
    /// `st_mode & S_IFMT`.
    pub kind: u32,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size.
    pub size: u64,
    /// Access time.
    pub atime: Timestamp,
    /// Modification time.
    pub mtime: Timestamp,
    /// Device number (device nodes).
    pub rdev: u64,
    /// Hard links (live count: a restore links names by handle instead).
    pub nlink: u64,
}

/// A pin on a history: while it exists, retention keeps every set after its point.
pub struct Pin {
    path: PathBuf,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Pins `point` in the history at `dir`.
pub fn pin(dir: &Path, point: u64) -> io::Result<Pin> {
    let pins = dir.join("pins");
    std::fs::create_dir_all(&pins)?;
    let mut n = [0u8; 4];
    getrandom::fill(&mut n).map_err(io::Error::other)?;
    let path = pins.join(format!("{}-{}-{point}", std::process::id(), u32::from_le_bytes(n)));
    std::fs::write(&path, b"")?;
    Ok(Pin { path })
}

/// The oldest point pinned by a live process, if any (pins of dead processes are removed).
pub fn pins(dir: &Path) -> Option<u64> {
    let rd = std::fs::read_dir(dir.join("pins")).ok()?;
    let mut oldest: Option<u64> = None;
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let mut parts = name.split('-');
        let (Some(pid), Some(_), Some(point)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let (Ok(pid), Ok(point)) = (pid.parse::<i32>(), point.parse::<u64>()) else { continue };
        let alive = rustix::process::Pid::from_raw(pid)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
        if !alive {
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        oldest = Some(oldest.map_or(point, |o| o.min(point)));
    }
    oldest
}

/// The replica at one point.
pub struct PointView {
    root: Beneath,
    dir: PathBuf,
    point: u64,
    index: Index,
    segments: HashMap<u64, File>,
    tail: Option<(u64, u64)>,
    _pin: Pin,
}

impl PointView {
    /// Opens the view of the replica at `root` (history in `dir`) at `point`; `applied` is
    /// the newest point there is.
    pub fn open(root: &Path, dir: &Path, point: u64, applied: u64) -> Result<PointView, ViewError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ViewError::Io { path, source }
        };
        let pin = pin(dir, point).map_err(err(dir))?;
        let firsts = journal::list_segments(dir).map_err(err(dir))?;
        let oldest = firsts.first().map_or(applied, |f| f.saturating_sub(1));
        if point < oldest || point > applied {
            return Err(ViewError::OutsideWindow { point, window: format!("points {oldest} to {applied}") });
        }
        let root = Beneath::open(root).map_err(err(root))?;
        let mut v = PointView {
            root,
            dir: dir.to_path_buf(),
            point,
            index: Index::default(),
            segments: HashMap::new(),
            tail: None,
            _pin: pin,
        };
        v.refresh().map_err(err(dir))?;
        Ok(v)
    }

    /// The point.
    pub fn point(&self) -> u64 {
        self.point
    }

    /// Takes in the sets journaled since the last look.
    fn refresh(&mut self) -> io::Result<()> {
        let firsts = journal::list_segments(&self.dir)?;
        for (i, &first) in firsts.iter().enumerate() {
            let from = match self.tail {
                Some((seg, off)) if seg == first => off,
                Some((seg, _)) if seg > first => continue,
                _ => 0,
            };
            // Every set of a segment comes before the next segment's first: one followed by a
            // segment starting at or before the point holds nothing after it.
            if from == 0 && firsts.get(i + 1).is_some_and(|&next| next <= self.point + 1) {
                continue;
            }
            if !self.segments.contains_key(&first) {
                self.segments.insert(first, journal::Journal::open_segment(&self.dir, first)?);
            }
            let file = &self.segments[&first];
            let point = self.point;
            let index = &mut self.index;
            let end = journal::scan_headers(file, from, |found| {
                if found.set.seq > point {
                    index.add(first, &found);
                }
            })?;
            self.tail = Some((first, end));
        }
        Ok(())
    }

    fn open_obj(&self, h: &Handle, flags: OFlags) -> io::Result<OwnedFd> {
        h.open(self.root.root_fd(), flags)
    }

    /// The root directory.
    pub fn root(&self) -> io::Result<Handle> {
        Handle::of(self.root.root_fd(), b"")
    }

    /// What `name` in `dir` held at the point.
    pub fn lookup(&mut self, dir: &Handle, name: &[u8]) -> io::Result<Option<Handle>> {
        let live = self.live_lookup(dir, name)?;
        self.refresh()?;
        Ok(match self.index.entries.get(&(dir.clone(), name.to_vec())) {
            Some(before) => before.clone(),
            None => live,
        })
    }

    fn live_lookup(&self, dir: &Handle, name: &[u8]) -> io::Result<Option<Handle>> {
        let d = self.open_obj(dir, OFlags::PATH | OFlags::DIRECTORY)?;
        match Handle::of(d.as_fd(), name) {
            Ok(h) => Ok(Some(h)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The entries of `dir` at the point, sorted by name.
    pub fn read_dir(&mut self, dir: &Handle) -> io::Result<Vec<(Vec<u8>, Handle)>> {
        let d = self.open_obj(dir, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut live = Vec::new();
        let mut it = rustix::fs::Dir::read_from(&d)?;
        while let Some(e) = it.read() {
            let e = e?;
            let name = e.file_name().to_bytes();
            if name != b"." && name != b".." {
                live.push((name.to_vec(), Handle::of(d.as_fd(), name).ok()));
            }
        }
        self.refresh()?;
        let mut out: HashMap<Vec<u8>, Option<Handle>> = HashMap::new();
        for (name, h) in live {
            out.insert(name, h);
        }
        for name in self.index.names.get(dir).into_iter().flatten() {
            out.insert(name.clone(), None);
        }
        let mut list = Vec::new();
        for (name, live) in out {
            let at = match self.index.entries.get(&(dir.clone(), name.clone())) {
                Some(before) => before.clone(),
                None => live,
            };
            if let Some(h) = at {
                list.push((name, h));
            }
        }
        list.sort();
        Ok(list)
    }

    /// The object's metadata at the point.
    pub fn meta(&mut self, obj: &Handle) -> io::Result<ObjMeta> {
        let fd = self.open_obj(obj, OFlags::PATH)?;
        let st = rustix::fs::fstat(&fd)?;
        self.refresh()?;
        let a = self.index.attrs.get(obj);
        let ts = |secs: i64, nanos: i64| Timestamp { secs, nanos: nanos as u32 };
        Ok(ObjMeta {
            kind: st.st_mode & libc::S_IFMT,
            mode: a.and_then(|a| a.mode).unwrap_or(st.st_mode & 0o7777),
            uid: a.and_then(|a| a.uid).unwrap_or(st.st_uid),
            gid: a.and_then(|a| a.gid).unwrap_or(st.st_gid),
            size: self.index.sizes.get(obj).copied().unwrap_or(st.st_size as u64),
            atime: a.and_then(|a| a.atime).unwrap_or(ts(st.st_atime, st.st_atime_nsec as i64)),
            mtime: a.and_then(|a| a.mtime).unwrap_or(ts(st.st_mtime, st.st_mtime_nsec as i64)),
            rdev: st.st_rdev,
            nlink: st.st_nlink,
        })
    }

    /// The object's extended attributes at the point.
    pub fn xattrs(&mut self, obj: &Handle) -> io::Result<Vec<Xattr>> {
        let fd = self.open_obj(obj, OFlags::PATH)?;
        let st = rustix::fs::fstat(&fd)?;
        let live = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            Vec::new()
        } else {
            doppel_fs::xattr::read_fd(fd.as_fd())?
        };
        self.refresh()?;
        Ok(self.index.attrs.get(obj).and_then(|a| a.xattrs.clone()).unwrap_or(live))
    }

    /// A symlink's target (targets never change: a new target is a new link).
    pub fn readlink(&self, obj: &Handle) -> io::Result<Vec<u8>> {
        let fd = self.open_obj(obj, OFlags::PATH)?;
        Ok(rustix::fs::readlinkat(&fd, "", Vec::new())?.into_bytes())
    }

    /// Reads up to `buf.len()` bytes at `off` of the file's content at the point; returns how
    /// many (fewer only at the end).
    pub fn read(&mut self, obj: &Handle, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.open_obj(obj, OFlags::RDONLY | OFlags::NONBLOCK)?;
        buf.fill(0);
        let mut got = 0;
        while got < buf.len() {
            match rustix::io::pread(&fd, &mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.refresh()?;
        let size = self.index.sizes.get(obj).copied().unwrap_or_else(|| {
            rustix::fs::fstat(&fd).map(|st| st.st_size as u64).unwrap_or(off + got as u64)
        });
        let n = size.saturating_sub(off).min(buf.len() as u64) as usize;
        let end = off + n as u64;
        // Newest first, so the oldest set after the point has the last word.
        for r in self.index.data.get(obj).into_iter().flatten().rev() {
            let (from, to) = (r.off.max(off), (r.off + r.len).min(end));
            if from >= to {
                continue;
            }
            let dst = &mut buf[(from - off) as usize..(to - off) as usize];
            if r.zero {
                dst.fill(0);
            } else {
                self.segments[&r.seg].read_exact_at(dst, r.file_at + (from - r.off))?;
            }
        }
        Ok(n)
    }

    /// A path's object at the point (`None`: it did not exist).
    pub fn resolve(&mut self, path: &[u8]) -> io::Result<Option<Handle>> {
        let mut at = self.root()?;
        for name in path.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            match self.lookup(&at, name)? {
                Some(h) => at = h,
                None => return Ok(None),
            }
        }
        Ok(Some(at))
    }

    /// Whether an error means the object is gone (removed for good after the point was
    /// dropped from the window, or never existed).
    pub fn is_stale(e: &io::Error) -> bool {
        e.raw_os_error() == Some(libc::ESTALE)
    }

    /// The live root, for callers that need its file system.
    pub fn live_root(&self) -> &Beneath {
        &self.root
    }
}
