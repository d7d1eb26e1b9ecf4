//! The undo journal on disk: segment files of [`UndoSet`] frames, and the attic.
//!
//! `history/NNNNNNNNNNNNNNNNNNNN.seg` holds the sets from sequence `N` on, appended with one
//! `write` per set (so a killed process leaves either the whole set in the page cache or a
//! torn tail that the next open cuts off). A set is written before its op touches the replica,
//! so every change in the replica has its undo in the journal, in the page cache at least;
//! [`Journal::sync`] makes the journal durable and runs first in every commit, so what the
//! replica holds durably has durable undo too. Objects an op removes or replaces are moved
//! into `attic/N/` (the attic of the segment whose set moved them) rather than deleted, and
//! go with their segment when retention drops it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use super::record::{self, Draft, PREFIX, Prefix, UndoSet};
use crate::quota::Usage;
use crate::retention::Segment;

/// A segment is closed and a new one started past this size by default.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// One segment, as the journal tracks it.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// What retention sees.
    pub seg: Segment,
    /// The segment file's length.
    pub file_len: u64,
    /// Sets it holds.
    pub sets: u64,
}

/// The name of the segment starting at `first`.
pub fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// The segments in `dir`, oldest first, by their first sequence.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".seg").and_then(|n| n.parse::<u64>().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// A set found by [`scan`]: where its frame and data start.
#[derive(Debug)]
pub struct Found {
    /// The set's header.
    pub set: UndoSet,
    /// Offset of its frame in the file.
    pub at: u64,
    /// Offset of its data part in the file.
    pub data_at: u64,
    /// Length of its frame.
    pub frame_len: u64,
}

/// Reads the sets of a segment file from `from` on, each whole and checked, calling `f` on
/// each; stops at the end or at the first frame that is incomplete or does not check (a tail
/// still being written, or torn by a kill). Returns the offset where it stopped.
pub fn scan(file: &File, from: u64, f: impl FnMut(Found)) -> io::Result<u64> {
    frames(file, from, true, f)
}

/// Reads the headers of a segment's sets from `from` on, seeking over their data (a listing
/// or a view must not read every old byte held): stops at the end, or at a frame that is not
/// complete in the file (still being written) or whose header does not decode. Whole frames
/// are trusted without their checksum: a torn tail exists only after a kill, and the writer
/// cuts it off when it opens the journal again ([`scan`] checks them there).
pub fn scan_headers(file: &File, from: u64, f: impl FnMut(Found)) -> io::Result<u64> {
    frames(file, from, false, f)
}

/// The frames of a segment from `from` on; with `check`, each one's data is read and its
/// checksum checked, else the data is skipped.
fn frames(file: &File, from: u64, check: bool, mut f: impl FnMut(Found)) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut r = io::BufReader::with_capacity(if check { 256 << 10 } else { 64 << 10 }, file);
    r.seek(SeekFrom::Start(from))?;
    let mut at = from;
    let mut buf = Vec::new();
    while at + PREFIX as u64 <= len {
        let mut p = [0u8; PREFIX];
        r.read_exact(&mut p)?;
        let Some(prefix) = Prefix::decode(&p) else { break };
        if at + prefix.frame_len() > len {
            break;
        }
        let header_len = prefix.header_len as usize;
        buf.resize(header_len + if check { prefix.data_len as usize } else { 0 }, 0);
        r.read_exact(&mut buf)?;
        let (header, data) = buf.split_at(header_len);
        if check && record::check(header, data) != prefix.check {
            break;
        }
        let Ok(set) = postcard::from_bytes::<UndoSet>(header) else { break };
        if !check {
            r.seek_relative(prefix.data_len as i64)?;
        }
        let data_at = at + PREFIX as u64 + u64::from(prefix.header_len);
        f(Found { set, at, data_at, frame_len: prefix.frame_len() });
        at += prefix.frame_len();
    }
    Ok(at)
}

/// The journal of one replica, as its writer (the process applying ops) holds it.
pub struct Journal {
    dir: PathBuf,
    attic: PathBuf,
    segments: Vec<SegmentInfo>,
    active: Option<(File, u64)>,
    unsynced: bool,
    attic_unsynced: Option<OwnedFd>,
    last: Option<(u64, u64)>,
    segment_bytes: u64,
    segment_age_us: u64,
    /// Allocated bytes of the open segment file, as last counted.
    active_blocks: u64,
    /// What the journal took since the last [`Journal::take_growth`] (for the quota).
    grown: Usage,
    /// The set of this sequence moved objects into the open segment's attic: it must be
    /// appended to that segment (they go together), even if that makes the segment full.
    attic_taken_for: Option<u64>,
}

impl Journal {
    /// Opens (or starts) the journal in `dir`, its attic in `attic`; cuts a torn tail off the
    /// newest segment.
    pub fn open(dir: &Path, attic: &Path) -> io::Result<Journal> {
        for d in [dir, attic] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(d)?;
        }
        let mut segments = Vec::new();
        let mut last = None;
        let firsts = list_segments(dir)?;
        for (i, &first) in firsts.iter().enumerate() {
            let path = dir.join(segment_name(first));
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let mut info = SegmentInfo {
                seg: Segment {
                    first_seq: first,
                    last_seq: first,
                    first_time_us: 0,
                    newest_time_us: 0,
                    bytes: 0,
                },
                file_len: 0,
                sets: 0,
            };
            let end = scan(&file, 0, |found| {
                if info.sets == 0 {
                    info.seg.first_time_us = found.set.time_us;
                }
                info.sets += 1;
                info.seg.last_seq = found.set.seq;
                info.seg.newest_time_us = info.seg.newest_time_us.max(found.set.time_us);
                last = Some((found.set.seq, found.set.op_hash));
            })?;
            if end < file.metadata()?.len() {
                if i + 1 != firsts.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: damaged at byte {end} (not the newest segment)", path.display()),
                    ));
                }
                tracing::warn!(segment = %path.display(), at = end, "cutting a torn tail off the undo journal");
                file.set_len(end)?;
                file.sync_all()?;
            }
            if info.sets == 0 {
                fs::remove_file(&path)?;
                continue;
            }
            info.file_len = end;
            info.seg.bytes = end + du(&attic.join(first.to_string()));
            segments.push(info);
        }
        // Sets go on being appended to the newest segment.
        let active = match segments.last() {
            Some(s) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dir.join(segment_name(s.seg.first_seq)))?;
                Some((f, s.file_len))
            }
            None => None,
        };
        let active_blocks = match &active {
            Some((f, _)) => f.metadata()?.blocks() * 512,
            None => 0,
        };
        Ok(Journal {
            dir: dir.to_path_buf(),
            attic: attic.to_path_buf(),
            segments,
            active,
            unsynced: false,
            attic_unsynced: None,
            last,
            segment_bytes: SEGMENT_BYTES,
            segment_age_us: u64::MAX,
            active_blocks,
            grown: Usage::default(),
            attic_taken_for: None,
        })
    }

    /// Starts new segments past `bytes`, journal and attic together (tests use small ones).
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes.max(1);
    }

    /// Starts a new segment once the open one's first set is older than `age_us`: retention
    /// drops whole segments by the age of their newest set, so the open one (whose newest set
    /// is always fresh) must close now and then for a time window to be honoured.
    pub fn set_segment_age(&mut self, age_us: u64) {
        self.segment_age_us = age_us.max(1);
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest set's sequence and op hash.
    pub fn last(&self) -> Option<(u64, u64)> {
        self.last
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> &[SegmentInfo] {
        &self.segments
    }

    /// Bytes the history takes (segments and attic).
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.seg.bytes).sum()
    }

    /// The attic directory of the segment the next set goes to, created if needed, and the
    /// segment's first sequence (what [`Journal::append`] will use for `seq`).
    pub fn attic_for(&mut self, seq: u64, time_us: u64) -> io::Result<(OwnedFd, u64)> {
        if self.attic_taken_for != Some(seq) {
            self.roll_if_full(seq, time_us)?;
        }
        self.attic_taken_for = Some(seq);
        let first = self.segments.last().filter(|_| self.active.is_some()).map_or(seq, |s| s.seg.first_seq);
        let dir = self.attic.join(first.to_string());
        let new = !dir.exists();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let fd = rustix::fs::open(&dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        if new {
            self.grown.files += 1;
            self.grown.bytes += rustix::fs::fstat(&fd)?.st_blocks as u64 * 512;
        }
        self.attic_unsynced = Some(fd.try_clone()?);
        Ok((fd, first))
    }

    /// Notes bytes moved into the attic for the segment the next set goes to.
    pub fn charge_attic(&mut self, bytes: u64) {
        // `attic_for` started the segment if there was none.
        if let Some(s) = self.segments.last_mut() {
            s.seg.bytes += bytes;
        }
    }

    fn roll_if_full(&mut self, seq: u64, time_us: u64) -> io::Result<()> {
        // A segment is named by its first sequence: one never starts at a sequence the newest
        // one already starts at (a mark journaled right after its op).
        let newest = self.segments.last();
        let same_start = newest.is_some_and(|s| s.seg.first_seq == seq);
        let full = newest.is_some_and(|s| {
            s.seg.bytes >= self.segment_bytes
                || (s.sets > 0 && time_us.saturating_sub(s.seg.first_time_us) >= self.segment_age_us)
        });
        if self.active.is_some() && full && !same_start {
            // The closed segment is synced with the next commit (`unsynced` stays set).
            let (f, _) = self.active.take().expect("checked");
            f.sync_data()?;
        }
        if self.active.is_none() {
            let path = self.dir.join(segment_name(seq));
            let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
            self.segments.push(SegmentInfo {
                seg: Segment { first_seq: seq, last_seq: seq, first_time_us: 0, newest_time_us: 0, bytes: 0 },
                file_len: 0,
                sets: 0,
            });
            self.active = Some((file, 0));
            self.active_blocks = 0;
            self.grown.files += 1;
            // The new name must survive with the data.
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Appends a set (one `write`), before its op is carried out.
    pub fn append(&mut self, draft: &Draft) -> io::Result<()> {
        let seq = draft.set.seq;
        if self.attic_taken_for.take() != Some(seq) {
            self.roll_if_full(seq, draft.set.time_us)?;
        }
        let head = draft.encode_head();
        let (file, len) = self.active.as_mut().expect("rolled");
        write_all_vectored_at(file, &head, &draft.data, *len)?;
        let frame_len = (head.len() + draft.data.len()) as u64;
        *len += frame_len;
        // Within the blocks already allocated, an append allocates none: asked only past them.
        if *len > self.active_blocks {
            let blocks = file.metadata()?.blocks() * 512;
            self.grown.bytes += blocks.saturating_sub(self.active_blocks);
            self.active_blocks = blocks;
        }
        let info = self.segments.last_mut().expect("an active segment is listed");
        if info.sets == 0 {
            info.seg.first_time_us = draft.set.time_us;
        }
        info.sets += 1;
        info.seg.last_seq = seq;
        info.seg.newest_time_us = info.seg.newest_time_us.max(draft.set.time_us);
        info.file_len += frame_len;
        info.seg.bytes += frame_len;
        self.unsynced = true;
        self.last = Some((seq, draft.set.op_hash));
        Ok(())
    }

    /// Makes every appended set (and every move into the attic) durable: the first step of a
    /// replica commit.
    pub fn sync(&mut self) -> io::Result<()> {
        self.take_sync()?.run()
    }

    /// A sync taken out failed: the next one syncs the open segment again.
    pub fn mark_unsynced(&mut self) {
        self.unsynced = true;
    }

    /// What [`Journal::sync`] does, to be done on another thread while more sets are
    /// appended (the open segment is synced through a descriptor of its own).
    pub fn take_sync(&mut self) -> io::Result<JournalSync> {
        let mut s = JournalSync::default();
        if let Some(fd) = self.attic_unsynced.take() {
            s.attic = Some((fd, self.attic.clone()));
        }
        if self.unsynced {
            if let Some((f, _)) = &self.active {
                s.active = Some(f.try_clone()?);
            }
            self.unsynced = false;
        }
        Ok(s)
    }

    /// What the journal took (allocated bytes, inodes) since this was last asked.
    pub fn take_growth(&mut self) -> Usage {
        std::mem::take(&mut self.grown)
    }

    /// Drops the `n` oldest segments with their attic; returns what that frees, as a walk of
    /// the history would no longer count it.
    pub fn drop_oldest(&mut self, n: usize) -> io::Result<Usage> {
        let n = n.min(self.segments.len());
        let mut freed = Usage::default();
        for info in self.segments.drain(..n) {
            let first = info.seg.first_seq;
            let attic = self.attic.join(first.to_string());
            let a = freed_by_removing(&attic);
            match fs::remove_dir_all(&attic) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let seg = self.dir.join(segment_name(first));
            let blocks = fs::metadata(&seg).map_or(0, |m| m.blocks() * 512);
            fs::remove_file(&seg)?;
            freed.bytes += a.bytes + blocks;
            freed.files += a.files + 1;
        }
        if self.segments.is_empty() {
            self.active = None;
            self.active_blocks = 0;
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(freed)
    }

    /// Opens the segment file starting at `first` for reading.
    pub fn open_segment(dir: &Path, first: u64) -> io::Result<File> {
        File::open(dir.join(segment_name(first)))
    }

    /// The attic directory (for opening objects moved aside).
    pub fn attic(&self) -> &Path {
        &self.attic
    }

    /// Drops every segment: the history is emptied (history turned off, or a rollback
    /// consumed it).
    pub fn clear(&mut self) -> io::Result<Usage> {
        self.drop_oldest(self.segments.len())
    }

    /// The device of the journal's attic (it must be the replica's, for renames into it).
    pub fn attic_dev(&self) -> io::Result<u64> {
        Ok(fs::metadata(&self.attic)?.dev())
    }

    /// The open file of the newest segment (for tests of torn tails).
    pub fn active_file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.active.as_ref().map(|(f, _)| f.as_fd())
    }
}

/// A journal's sync taken out of it ([`Journal::take_sync`]).
#[derive(Debug, Default)]
pub struct JournalSync {
    /// The attic's directory of the set that moved something aside, and the attic itself.
    attic: Option<(OwnedFd, PathBuf)>,
    /// The open segment.
    active: Option<File>,
}

impl JournalSync {
    /// Makes the journal's sets (and the attic's entries) taken so far durable.
    pub fn run(self) -> io::Result<()> {
        if let Some((fd, attic)) = self.attic {
            rustix::fs::fsync(&fd)?;
            File::open(&attic)?.sync_all()?;
        }
        if let Some(f) = self.active {
            f.sync_data()?;
        }
        Ok(())
    }
}

/// Writes `a` then `b` at `off` with `pwritev` (one system call, no copy into one buffer).
fn write_all_vectored_at(file: &File, a: &[u8], b: &[u8], off: u64) -> io::Result<()> {
    let (mut done, total) = (0usize, a.len() + b.len());
    while done < total {
        let (ra, rb) = if done < a.len() { (&a[done..], b) } else { (&[][..], &b[done - a.len()..]) };
        let bufs = [io::IoSlice::new(ra), io::IoSlice::new(rb)];
        match rustix::io::pwritev(file, &bufs, off + done as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What removing the tree at `dir` frees: each directory, and each inode all of whose names
/// are in it (one also named in the replica lives on).
fn freed_by_removing(dir: &Path) -> Usage {
    use std::collections::HashMap;
    let Ok(top) = fs::symlink_metadata(dir) else { return Usage::default() };
    let mut freed = Usage { bytes: top.blocks() * 512, files: 1 };
    let mut linked: HashMap<(u64, u64), (u64, u64, u64)> = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                freed.bytes += m.blocks() * 512;
                freed.files += 1;
                stack.push(e.path());
            } else if m.nlink() <= 1 {
                freed.bytes += m.blocks() * 512;
                freed.files += 1;
            } else {
                linked.entry((m.dev(), m.ino())).or_insert((0, m.nlink(), m.blocks() * 512)).0 += 1;
            }
        }
    }
    for (seen, nlink, bytes) in linked.into_values() {
        if seen >= nlink {
            freed.bytes += bytes;
            freed.files += 1;
        }
    }
    freed
}

/// Allocated bytes of everything beneath `dir` (0 if it is missing).
pub fn du(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => m.blocks() * 512 + du(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
