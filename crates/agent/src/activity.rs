//! The activity log: regions that may differ between source and replica, kept on disk.
//!
//! In `fuse` mode a change reaches the spool only after it was made on the source; a crash in
//! between (or of the whole machine, taking un-synced spool pages with it) would leave the
//! replica without a change the source has. So before a change is made, the region it touches
//! (a 4 MiB extent of a file, or a name) is recorded here, durably; the record costs a write
//! and an fdatasync only when the region was not already hot, as in block-replication systems.
//! A region cools (is forgotten) once every op that touched it is acknowledged by the target
//! and it has been idle for a while, so a busy region is not logged over and over.
//!
//! After an unclean stop the hot regions are exactly what must be compared with the replica:
//! bounded by the recent activity, not by the size of the tree. A clean stop empties the log.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use doppel_capture::fuse::Dirty;
use doppel_proto::RelPath;
use doppel_proto::frame::{HEADER_LEN, check_payload, header_for, parse_header};
use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

/// Size of one extent.
pub const EXTENT: u64 = 4 << 20;

/// A region that may differ.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Region {
    /// A name: its existence, type and attributes (and, for a file new to the replica, all of
    /// its content).
    Name(Vec<u8>),
    /// Extent number `1` (of [`EXTENT`] bytes) of the file at path `0`.
    Extent(Vec<u8>, u64),
    /// Everything beneath a directory (events were lost there).
    Tree(Vec<u8>),
    /// The names made or removed in directory `0` since `1` (microseconds since the epoch):
    /// after a crash, every entry of the source's directory made since then (see
    /// [`made_since`]) is compared, and every name the replica's directory holds that the
    /// source's does not. One record for a directory where files come and go stands for all
    /// of them, instead of one record (and one `fdatasync`) per name.
    Children(Vec<u8>, u64),
}

impl Region {
    /// The regions covering a dirty mark.
    pub fn of(d: &Dirty<'_>) -> Vec<Region> {
        match d {
            Dirty::Name(p) | Dirty::New(p) | Dirty::Gone(p) => vec![Region::Name(p.as_bytes().to_vec())],
            Dirty::Extent { path, offset, len } => {
                let first = offset / EXTENT;
                let last = (offset + len.max(&1) - 1) / EXTENT;
                (first..=last).map(|i| Region::Extent(path.as_bytes().to_vec(), i)).collect()
            }
        }
    }

    /// The path the region is about.
    pub fn path(&self) -> Option<RelPath> {
        match self {
            Region::Name(p) | Region::Extent(p, _) | Region::Tree(p) | Region::Children(p, _) => {
                RelPath::new(p.clone()).ok()
            }
        }
    }
}

/// The entries of directory `dir` (beneath `root`) made at or after `since_us`: what a
/// [`Region::Children`] stands for after a crash. A directory that is gone has none (its own
/// name, compared too, takes it off the replica).
///
/// An entry was made then if its inode was born then, or, for a hard link (an old inode with
/// a new name), if the inode changed then. Where the file system keeps no birth time, any
/// inode changed then counts. An older file merely written since is not taken (its writes
/// have regions of their own): a busy disk image beside a directory's new files is not
/// compared whole after a crash.
pub fn made_since(root: &Path, dir: &RelPath, since_us: u64) -> io::Result<Vec<RelPath>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let since_ns = i128::from(since_us) * 1000;
    let ns = |t: std::time::SystemTime| match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    let entries = match std::fs::read_dir(root.join(dir.as_path())) {
        Ok(entries) => entries,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let changed = i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()) >= since_ns;
        let made = match meta.created() {
            Ok(born) => ns(born) >= since_ns || (meta.nlink() > 1 && changed),
            Err(_) => changed,
        };
        if made {
            let path = dir.join(entry.file_name().as_bytes()).map_err(io::Error::other)?;
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

struct Hot {
    last_seq: u64,
    pending: u32,
    touched: Instant,
    /// Changed while the spool was full (its op was dropped): stays until a comparison.
    sticky: bool,
    /// The group of records whose write makes this region's record durable (see
    /// [`Inner::durable`]).
    batch: u64,
}

/// How long after a file's creation the region standing for its name stands for writes to
/// it too. Bounded so that a file written without pause for days is not compared whole after
/// a crash because it was new once: after the window its writes mark extents again, and the
/// region can cool.
pub const COVER_WINDOW: Duration = Duration::from_secs(10);

/// How much older than the moment a [`Region::Children`] is recorded its `since` is: inode
/// times come from the kernel's coarse clock, which lags the precise one by up to a tick, and
/// a small step of the clock must not hide a new name.
const CHANGE_TIME_SLACK_US: u64 = 2_000_000;

/// Age past which names made in a directory go to a new [`Region::Children`] (one more record
/// a minute for a busy directory): the old one then cools, and what a crash makes us compare
/// stays bounded by the last minute or so, not by how long files have been made there.
const CHILDREN_ROTATE_US: u64 = 60_000_000;

struct Inner {
    hot: HashMap<Region, Hot>,
    file: Arc<File>,
    written: u64,
    /// Frames of new regions not yet written, to go out as group `open`.
    queued: Vec<u8>,
    /// The group the queued frames belong to.
    open: u64,
    /// Every group up to this one is on disk.
    durable: u64,
    /// A group is being written and synced (outside the lock).
    syncing: bool,
    /// Groups whose write or sync failed: their marks are refused.
    failed: Vec<u64>,
    /// The `since` of each directory's [`Region::Children`] (hot or lately hot).
    children: HashMap<Vec<u8>, u64>,
    /// Files lately created (or emptied): the region whose comparison takes in all of the
    /// file, so writes to it within [`COVER_WINDOW`] need no extent (and no sync) of their own.
    covered: HashMap<Vec<u8>, (Region, Instant)>,
}

impl Inner {
    /// The region standing for names made in `dir`: the hot one, or a new one from now.
    fn children_of(&mut self, dir: &[u8]) -> Region {
        let now = doppel_target::registry::now_us();
        if let Some(&since) = self.children.get(dir) {
            let r = Region::Children(dir.to_vec(), since);
            if self.hot.contains_key(&r) && now < since + CHILDREN_ROTATE_US {
                return r;
            }
        }
        let since = now.saturating_sub(CHANGE_TIME_SLACK_US);
        self.children.insert(dir.to_vec(), since);
        Region::Children(dir.to_vec(), since)
    }

    /// The hot region covering writes to the lately created file `path`, if any.
    fn covering(&self, path: &[u8]) -> Option<&Region> {
        let (r, at) = self.covered.get(path)?;
        (at.elapsed() < COVER_WINDOW && self.hot.contains_key(r)).then_some(r)
    }

    /// Forgets what refers to regions no longer hot.
    fn prune(&mut self) {
        let Inner { hot, children, covered, .. } = self;
        children.retain(|d, s| hot.contains_key(&Region::Children(d.clone(), *s)));
        covered.retain(|_, (r, at)| at.elapsed() < COVER_WINDOW && hot.contains_key(r));
    }
}

/// The activity log of one job.
///
/// Marking is a group commit: the records of regions that became hot while a write and
/// `fdatasync` of the log was under way go out together in the next one, so concurrent
/// changes share a sync instead of queueing for one each; a mark returns once the records of
/// its regions (whoever wrote them) are on disk.
pub struct ActivityLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    synced: Condvar,
}

fn read_records(path: &Path) -> io::Result<Vec<Region>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= HEADER_LEN {
        let Ok((len, crc)) = parse_header(rest[..HEADER_LEN].try_into().expect("header"), 1 << 20) else {
            break;
        };
        let end = HEADER_LEN + len as usize;
        if rest.len() < end || check_payload(&rest[HEADER_LEN..end], crc).is_err() {
            break;
        }
        let Ok(r) = postcard::from_bytes::<Region>(&rest[HEADER_LEN..end]) else { break };
        out.push(r);
        rest = &rest[end..];
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn frame(r: &Region) -> Vec<u8> {
    let payload = postcard::to_stdvec(r).expect("a region serializes");
    let mut v = header_for(&payload).to_vec();
    v.extend_from_slice(&payload);
    v
}

impl ActivityLog {
    /// Opens the log at `path`; returns it and the regions left hot by the previous run.
    pub fn open(path: &Path) -> io::Result<(ActivityLog, Vec<Region>)> {
        let left = read_records(path)?;
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let now = Instant::now();
        let hot = left
            .iter()
            .map(|r| {
                let h = Hot { last_seq: 0, pending: 0, touched: now, sticky: true, batch: 0 };
                (r.clone(), h)
            })
            .collect();
        let children = left
            .iter()
            .filter_map(|r| match r {
                Region::Children(d, since) => Some((d.clone(), *since)),
                _ => None,
            })
            .collect();
        let inner = Inner {
            hot,
            file: Arc::new(file),
            written: 0,
            queued: Vec::new(),
            open: 1,
            durable: 0,
            syncing: false,
            failed: Vec::new(),
            children,
            covered: HashMap::new(),
        };
        let log = ActivityLog { path: path.to_path_buf(), inner: Mutex::new(inner), synced: Condvar::new() };
        log.compact()?;
        Ok((log, left))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Marks `regions` as about to change; returns once any that were not hot are on disk.
    pub fn mark(&self, regions: &[Region]) -> io::Result<()> {
        let mut g = self.lock();
        let need = Self::add(&mut g, regions);
        self.wait_durable(g, need)
    }

    /// Marks the regions covering `dirty` as about to change, as [`ActivityLog::mark`] does,
    /// and returns them. A new name is covered by its directory's [`Region::Children`]. A
    /// write to a file created (or emptied) lately is covered by the region standing for its
    /// name, whose comparison takes in all of the file: no extent (and no sync) of its own.
    pub fn mark_dirty(&self, dirty: &[Dirty<'_>]) -> io::Result<Vec<Region>> {
        let mut g = self.lock();
        let mut regions = Vec::new();
        for d in dirty {
            match d {
                Dirty::Extent { path, .. } if let Some(r) = g.covering(path.as_bytes()) => {
                    regions.push(r.clone());
                }
                Dirty::New(path) | Dirty::Gone(path) if let Some((dir, _)) = path.split_last() => {
                    regions.push(g.children_of(dir.as_bytes()));
                }
                _ => regions.extend(Region::of(d)),
            }
        }
        let need = Self::add(&mut g, &regions);
        self.wait_durable(g, need)?;
        Ok(regions)
    }

    /// The file at `path` was just created (`new`) or emptied: while the region standing for
    /// its name (the name's own, else, for a new file, its directory's) stays hot, it covers
    /// the file's content for a while (see [`ActivityLog::mark_dirty`]). An emptied file is
    /// not a name made in its directory (see [`made_since`]): only its own name covers it.
    pub fn created(&self, path: &[u8], new: bool) {
        let mut g = self.lock();
        let name = Region::Name(path.to_vec());
        let region = if g.hot.contains_key(&name) {
            name
        } else if !new {
            return;
        } else {
            // The directory of a relative path: what precedes its last '/', else the root.
            let dir = &path[..path.iter().rposition(|&b| b == b'/').unwrap_or(0)];
            match g.children.get(dir) {
                Some(&since) => Region::Children(dir.to_vec(), since),
                None => return,
            }
        };
        if g.hot.contains_key(&region) {
            g.covered.insert(path.to_vec(), (region, Instant::now()));
        }
    }

    /// Counts a change over `regions`, queueing records for those not hot; returns the groups
    /// (not yet on disk) that must be before the change may be made.
    fn add(g: &mut Inner, regions: &[Region]) -> Vec<u64> {
        let now = Instant::now();
        let mut need = Vec::new();
        let durable = g.durable;
        let mut needs = |b: u64| {
            if b > durable && !need.contains(&b) {
                need.push(b);
            }
        };
        for r in regions {
            match g.hot.get_mut(r) {
                Some(h) => {
                    h.pending += 1;
                    h.touched = now;
                    needs(h.batch);
                }
                None => {
                    let f = frame(r);
                    g.queued.extend_from_slice(&f);
                    let batch = g.open;
                    g.hot.insert(
                        r.clone(),
                        Hot { last_seq: 0, pending: 1, touched: now, sticky: false, batch },
                    );
                    needs(batch);
                }
            }
        }
        need
    }

    /// Returns once the groups `need` are on disk: writes and syncs the queued records itself
    /// if nobody else is, else waits for whoever is (and goes next if that was not enough).
    fn wait_durable<'a>(&'a self, mut g: MutexGuard<'a, Inner>, need: Vec<u64>) -> io::Result<()> {
        loop {
            if need.iter().any(|b| g.failed.contains(b)) {
                return Err(io::Error::other("writing the activity log failed"));
            }
            if need.iter().all(|&b| g.durable >= b) {
                return Ok(());
            }
            if g.syncing {
                self.synced.wait(&mut g);
                continue;
            }
            let batch = g.open;
            g.open += 1;
            g.syncing = true;
            let buf = std::mem::take(&mut g.queued);
            let file = g.file.clone();
            drop(g);
            let result = (&*file).write_all(&buf).and_then(|()| file.sync_data());
            g = self.lock();
            g.syncing = false;
            match &result {
                Ok(()) => {
                    g.durable = batch;
                    g.written += buf.len() as u64;
                }
                Err(_) => {
                    // Those regions are not recorded: forget them (their changes are refused).
                    g.hot.retain(|_, h| h.batch != batch);
                    g.failed.push(batch);
                    if g.failed.len() > 64 {
                        g.failed.remove(0);
                    }
                }
            }
            self.synced.notify_all();
            result?;
        }
    }

    /// The change over `regions` was made but its ops were dropped (the spool is full): the
    /// regions stay hot until [`ActivityLog::recovered`], whatever the acks say.
    pub fn dropped(&self, regions: &[Region]) {
        let mut g = self.lock();
        for r in regions {
            if let Some(h) = g.hot.get_mut(r) {
                h.pending = h.pending.saturating_sub(1);
                h.sticky = true;
            }
        }
    }

    /// Adds regions that must be compared later (names that changed while the spool was
    /// full), durably.
    pub fn add_sticky(&self, regions: &[Region]) -> io::Result<()> {
        self.mark(regions)?;
        self.dropped(regions);
        Ok(())
    }

    /// The regions waiting for a comparison.
    pub fn sticky(&self) -> Vec<Region> {
        let mut v: Vec<Region> =
            self.lock().hot.iter().filter(|(_, h)| h.sticky).map(|(r, _)| r.clone()).collect();
        v.sort();
        v
    }

    /// The change over `regions` was sequenced up to `seq` (or abandoned: `None`).
    pub fn done(&self, regions: &[Region], seq: Option<u64>) {
        let mut g = self.lock();
        for r in regions {
            if let Some(h) = g.hot.get_mut(r) {
                h.pending = h.pending.saturating_sub(1);
                if let Some(s) = seq {
                    h.last_seq = h.last_seq.max(s);
                }
            }
        }
    }

    /// Forgets regions whose changes are all acknowledged (`acked`) and that have been idle
    /// for `idle`, and rewrites the file without them.
    pub fn cool(&self, acked: u64, idle: Duration) -> io::Result<()> {
        let compact = {
            let mut g = self.lock();
            let now = Instant::now();
            let before = g.hot.len();
            g.hot.retain(|_, h| {
                h.sticky || h.pending > 0 || h.last_seq > acked || now.duration_since(h.touched) < idle
            });
            g.prune();
            // Rewriting costs two syncs and happens at most once per cooling pass; it keeps
            // what a crash would make us compare to what is really hot.
            before > g.hot.len()
        };
        if compact { self.compact() } else { Ok(()) }
    }

    /// Rewrites the file with just the hot regions (which makes every queued record durable
    /// too). Waits for a group being written, which must not land in the replaced file.
    fn compact(&self) -> io::Result<()> {
        let mut g = self.lock();
        while g.syncing {
            self.synced.wait(&mut g);
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        let mut regions: Vec<&Region> = g.hot.keys().collect();
        regions.sort();
        let mut buf = Vec::new();
        for r in regions {
            buf.extend(frame(r));
        }
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        g.file = Arc::new(OpenOptions::new().append(true).open(&self.path)?);
        g.written = buf.len() as u64;
        // Everything hot, queued records included, is in the new file.
        g.queued.clear();
        g.durable = g.open;
        g.open += 1;
        drop(g);
        self.synced.notify_all();
        Ok(())
    }

    /// These regions (left by the previous run, or changed while the spool was full) have
    /// been compared with the replica: they may now cool like any other.
    pub fn compared(&self, regions: &[Region]) {
        let mut g = self.lock();
        for r in regions {
            if let Some(h) = g.hot.get_mut(r) {
                h.sticky = false;
            }
        }
    }

    /// Empties the log (a clean stop: spool and index describe everything).
    pub fn clear(&self) -> io::Result<()> {
        self.lock().hot.clear();
        self.compact()
    }

    /// Number of hot regions.
    pub fn len(&self) -> usize {
        self.lock().hot.len()
    }

    /// Whether nothing is hot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_target::registry::now_us;

    fn name(s: &str) -> Region {
        Region::Name(s.as_bytes().to_vec())
    }

    #[test]
    fn extents_cover_the_written_range() {
        let p = RelPath::new("f").unwrap();
        let r = Region::of(&Dirty::Extent { path: &p, offset: EXTENT - 1, len: 2 });
        assert_eq!(r, vec![Region::Extent(b"f".to_vec(), 0), Region::Extent(b"f".to_vec(), 1)]);
        assert_eq!(Region::of(&Dirty::Extent { path: &p, offset: 5, len: 0 }).len(), 1);
    }

    #[test]
    fn survives_a_crash_and_cools_after_acks() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("activity");
        {
            let (log, left) = ActivityLog::open(&path).unwrap();
            assert!(left.is_empty());
            log.mark(&[name("a"), name("b")]).unwrap();
            log.done(&[name("a"), name("b")], Some(7));
            // Dropped without cooling, as a killed process.
        }
        let (log, left) = ActivityLog::open(&path).unwrap();
        assert_eq!(left, vec![name("a"), name("b")]);
        // Recovered regions do not cool before the comparison was made.
        log.cool(u64::MAX - 1, Duration::ZERO).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log.sticky(), vec![name("a"), name("b")]);
        log.compared(&[name("a"), name("b")]);
        log.mark(&[name("c")]).unwrap();
        log.done(&[name("c")], Some(10));
        log.cool(9, Duration::ZERO).unwrap();
        assert_eq!(log.len(), 1, "c waits for its ack");
        log.cool(10, Duration::ZERO).unwrap();
        assert!(log.is_empty());
        drop(log);
        let (_, left) = ActivityLog::open(&path).unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn writes_to_a_new_file_are_covered_by_its_name() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a");
        let (log, _) = ActivityLog::open(&path).unwrap();
        let p = RelPath::new("dir/new").unwrap();
        let parent = RelPath::new("dir").unwrap();
        let marked = log.mark_dirty(&[Dirty::Name(&p), Dirty::Name(&parent)]).unwrap();
        log.created(p.as_bytes(), true);
        log.done(&marked, Some(1));
        let size = std::fs::metadata(&path).unwrap().len();
        // The first write and one far into the file: no extent, nothing written to the log.
        let w = log.mark_dirty(&[Dirty::Extent { path: &p, offset: 0, len: 4096 }]).unwrap();
        assert_eq!(w, vec![name("dir/new")]);
        let w2 = log.mark_dirty(&[Dirty::Extent { path: &p, offset: 9 * EXTENT, len: 10 }]).unwrap();
        assert_eq!(w2, vec![name("dir/new")]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size, "no record written for covered writes");
        // The name cannot cool while the write it stands for is unacknowledged.
        log.done(&w, Some(2));
        log.cool(1, Duration::ZERO).unwrap();
        assert!(log.sticky().is_empty() && !log.is_empty());
        log.done(&w2, Some(3));
        log.cool(3, Duration::ZERO).unwrap();
        assert!(log.is_empty());
        // An existing file's writes still mark their extents.
        let old = RelPath::new("old").unwrap();
        let m = log.mark_dirty(&[Dirty::Name(&old)]).unwrap();
        let e = log.mark_dirty(&[Dirty::Extent { path: &old, offset: 0, len: 1 }]).unwrap();
        assert_eq!(e, vec![Region::Extent(b"old".to_vec(), 0)]);
        log.done(&m, None);
        log.done(&e, None);
    }

    #[test]
    fn names_made_in_one_directory_share_one_record_and_cover_their_first_writes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a");
        let (log, _) = ActivityLog::open(&path).unwrap();
        let dir = RelPath::new("dir").unwrap();
        let (a, b) = (RelPath::new("dir/a").unwrap(), RelPath::new("dir/b").unwrap());
        let before = now_us();
        let first = log.mark_dirty(&[Dirty::New(&a), Dirty::Name(&dir)]).unwrap();
        let Region::Children(ref d0, since) = first[0] else { panic!("{first:?}") };
        assert_eq!(d0, b"dir");
        assert!(since <= before && since + 10_000_000 > before, "since {since}, now {before}");
        log.created(a.as_bytes(), true);
        log.done(&first, Some(1));
        let size = std::fs::metadata(&path).unwrap().len();
        // The second name, and writes to the new file: the same record, nothing written.
        let second = log.mark_dirty(&[Dirty::New(&b), Dirty::Name(&dir)]).unwrap();
        assert_eq!(second, first);
        let w = log.mark_dirty(&[Dirty::Extent { path: &a, offset: 5 * EXTENT, len: 10 }]).unwrap();
        assert_eq!(w, vec![first[0].clone()]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size, "no record for the second name");
        // A removal in the same directory: the same record.
        let gone = RelPath::new("dir/old").unwrap();
        assert_eq!(log.mark_dirty(&[Dirty::Gone(&gone)]).unwrap(), vec![first[0].clone()]);
        // b was not reported created: its writes mark extents.
        let wb = log.mark_dirty(&[Dirty::Extent { path: &b, offset: 0, len: 1 }]).unwrap();
        assert_eq!(wb, vec![Region::Extent(b"dir/b".to_vec(), 0)]);
        drop(log);
        let (_, left) = ActivityLog::open(&path).unwrap();
        assert!(left.contains(&first[0]), "{left:?}");
    }

    #[test]
    fn a_directory_region_a_minute_old_gives_way_to_a_new_one() {
        let d = tempfile::tempdir().unwrap();
        let (log, _) = ActivityLog::open(&d.path().join("a")).unwrap();
        let (a, b) = (RelPath::new("dir/a").unwrap(), RelPath::new("dir/b").unwrap());
        let first = log.mark_dirty(&[Dirty::New(&a)]).unwrap();
        // Make it a minute older than it is.
        let old = {
            let mut g = log.lock();
            let h = g.hot.remove(&first[0]).unwrap();
            let Region::Children(dir, since) = &first[0] else { panic!("{first:?}") };
            let old = Region::Children(dir.clone(), since - CHILDREN_ROTATE_US);
            g.hot.insert(old.clone(), h);
            g.children.insert(dir.clone(), since - CHILDREN_ROTATE_US);
            old
        };
        let second = log.mark_dirty(&[Dirty::New(&b)]).unwrap();
        let Region::Children(_, since) = second[0] else { panic!("{second:?}") };
        assert!(since + CHILDREN_ROTATE_US / 2 > now_us(), "a new region from now: {second:?}");
        // The old one cools on its own once its change is done.
        log.done(&[old], Some(1));
        log.done(&second, Some(2));
        log.cool(1, Duration::ZERO).unwrap();
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn a_directory_region_stands_for_the_entries_changed_since_it() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("dir")).unwrap();
        std::fs::write(d.path().join("dir/old"), b"x").unwrap();
        std::fs::write(d.path().join("x"), b"x").unwrap();
        let m = std::fs::metadata(d.path().join("dir/old")).unwrap();
        let since = (m.ctime() as u64 * 1_000_000_000 + m.ctime_nsec() as u64) / 1000 + 1;
        // Change times come from a coarse clock: wait (changing a probe outside the directory)
        // until it is past `since`; everything made from then on is.
        let ctime_us = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.ctime() as u64 * 1_000_000_000 + m.ctime_nsec() as u64) / 1000
        };
        let (probe, deadline) = (d.path().join("probe"), Instant::now() + Duration::from_secs(10));
        std::fs::write(&probe, b"").unwrap();
        while ctime_us(&probe) < since {
            assert!(Instant::now() < deadline, "the clock did not move");
            std::thread::yield_now();
            std::fs::set_permissions(&probe, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        }
        let made = ["dir/new0", "dir/new1"];
        std::fs::create_dir(d.path().join(made[0])).unwrap();
        std::fs::write(d.path().join(made[1]), b"new").unwrap();
        // Changed since (written, given a new name) but older than `since`.
        std::fs::write(d.path().join("dir/old"), b"written since").unwrap();
        std::fs::hard_link(d.path().join("x"), d.path().join("dir/linked")).unwrap();
        let dir = RelPath::new("dir").unwrap();
        let found: Vec<String> =
            made_since(d.path(), &dir, since).unwrap().iter().map(|p| p.to_string()).collect();
        let mut expected: Vec<String> = made.iter().map(|n| n.to_string()).collect();
        expected.push("dir/linked".into());
        if std::fs::metadata(d.path().join("dir/old")).unwrap().created().is_err() {
            // No birth times here: every inode changed since counts.
            expected.push("dir/old".into());
        }
        expected.sort();
        assert_eq!(found, expected);
        assert!(made_since(d.path(), &RelPath::new("gone").unwrap(), 0).unwrap().is_empty());
    }

    #[test]
    fn concurrent_marks_share_syncs_and_all_reach_the_disk() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a");
        let (log, _) = ActivityLog::open(&path).unwrap();
        let log = std::sync::Arc::new(log);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let r = [name(&format!("t{t}/f{i}")), name(&format!("t{t}"))];
                        log.mark(&r).unwrap();
                        // Returned: its record is on disk (read back as a crash would).
                        let on_disk = read_records(&log.path).unwrap();
                        assert!(on_disk.contains(&r[0]) && on_disk.contains(&r[1]));
                        log.done(&r, Some(1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (_, left) = ActivityLog::open(&path).unwrap();
        assert_eq!(left.len(), 8 * 50 + 8);
    }

    #[test]
    fn pending_changes_never_cool() {
        let d = tempfile::tempdir().unwrap();
        let (log, _) = ActivityLog::open(&d.path().join("a")).unwrap();
        log.mark(&[name("x")]).unwrap();
        log.cool(u64::MAX, Duration::ZERO).unwrap();
        assert_eq!(log.len(), 1);
        log.done(&[name("x")], None);
        log.cool(u64::MAX, Duration::ZERO).unwrap();
        assert!(log.is_empty());
    }
}
