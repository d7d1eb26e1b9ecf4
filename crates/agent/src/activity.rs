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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use doppel_capture::fuse::Dirty;
use doppel_proto::RelPath;
use doppel_proto::frame::{HEADER_LEN, check_payload, header_for, parse_header};
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
}

impl Region {
    /// The regions covering a dirty mark.
    pub fn of(d: &Dirty<'_>) -> Vec<Region> {
        match d {
            Dirty::Name(p) => vec![Region::Name(p.as_bytes().to_vec())],
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
            Region::Name(p) | Region::Extent(p, _) | Region::Tree(p) => RelPath::new(p.clone()).ok(),
        }
    }
}

struct Hot {
    last_seq: u64,
    pending: u32,
    touched: Instant,
    /// Changed while the spool was full (its op was dropped): stays until a comparison.
    sticky: bool,
}

struct Inner {
    hot: HashMap<Region, Hot>,
    file: File,
    written: u64,
}

/// The activity log of one job.
pub struct ActivityLog {
    path: PathBuf,
    inner: Mutex<Inner>,
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
            .map(|r| (r.clone(), Hot { last_seq: 0, pending: 0, touched: now, sticky: true }))
            .collect();
        let log =
            ActivityLog { path: path.to_path_buf(), inner: Mutex::new(Inner { hot, file, written: 0 }) };
        log.compact()?;
        Ok((log, left))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `regions` as about to change; returns once any that were not hot are on disk.
    pub fn mark(&self, regions: &[Region]) -> io::Result<()> {
        let mut g = self.lock();
        let now = Instant::now();
        let mut new = Vec::new();
        for r in regions {
            match g.hot.get_mut(r) {
                Some(h) => {
                    h.pending += 1;
                    h.touched = now;
                }
                None => new.push(r.clone()),
            }
        }
        if !new.is_empty() {
            let mut buf = Vec::new();
            for r in &new {
                buf.extend(frame(r));
            }
            g.file.write_all(&buf)?;
            g.file.sync_data()?;
            g.written += buf.len() as u64;
            for r in new {
                g.hot.insert(r, Hot { last_seq: 0, pending: 1, touched: now, sticky: false });
            }
        }
        Ok(())
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
            // Rewriting costs two syncs and happens at most once per cooling pass; it keeps
            // what a crash would make us compare to what is really hot.
            before > g.hot.len()
        };
        if compact { self.compact() } else { Ok(()) }
    }

    /// Rewrites the file with just the hot regions.
    fn compact(&self) -> io::Result<()> {
        let mut g = self.lock();
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
        g.file = OpenOptions::new().append(true).open(&self.path)?;
        g.written = buf.len() as u64;
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
