//! Per-source quotas: what one source's replicas take on the target (allocated bytes and
//! inodes), and the check every op passes before it is applied.
//!
//! Use is what fills the target's disk: allocated blocks (`st_blocks`, so a sparse file counts
//! what it really holds, and a `Truncate` to a terabyte costs nothing) and inodes (a hard link
//! adds a name, not an inode). An [`Account`] is shared by every replica of a source: it is
//! counted once by walking the source's replicas when a quota first applies, then kept
//! current by each replica measuring what each op actually changed (so a replayed op, which
//! changes nothing the second time, counts nothing).
//!
//! The check is conservative only where it is cheap: an op that cannot grow use (an overwrite
//! of allocated bytes, a removal, an attribute) always passes, so a source at its limit keeps
//! replicating in place; an op that might grow use past the limit is measured precisely (the
//! holes it would fill) before it is refused. A refused op is not skipped: the replica pauses
//! on it, exactly as on a full disk, and retries until the quota is raised.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use doppel_proto::Op;
use parking_lot::Mutex;

/// No limit, in the atomics.
const UNLIMITED: u64 = u64::MAX;
/// The allocation unit assumed for what a new directory or symlink may take.
const BLOCK: u64 = 4096;

/// A source's limits (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Allocated bytes, all its replicas together.
    pub bytes: Option<u64>,
    /// Inodes (files, directories, symlinks, nodes), all its replicas together.
    pub files: Option<u64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.bytes.is_some() || self.files.is_some()
    }
}

/// An amount of use: allocated bytes and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Allocated bytes.
    pub bytes: u64,
    /// Inodes.
    pub files: u64,
}

/// Which limit an op would cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `quota_bytes`.
    Bytes,
    /// `quota_files`.
    Files,
}

/// An op that would take its source over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct OverQuota {
    /// The limit crossed.
    pub resource: Resource,
    /// Use now.
    pub used: u64,
    /// The limit.
    pub limit: u64,
    /// What the op needs on top of `used`.
    pub need: u64,
}

impl fmt::Display for OverQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.resource {
            Resource::Bytes => write!(
                f,
                "over quota: {} of quota_bytes {} used, the next op needs {} more",
                iec(self.used),
                iec(self.limit),
                iec(self.need)
            ),
            Resource::Files => write!(
                f,
                "over quota: {} of quota_files {} used, the next op needs {} more",
                self.used, self.limit, self.need
            ),
        }
    }
}

/// Bytes in the units an administrator reads (`10.0 MiB`), exact below a KiB.
pub fn iec(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u < UNITS.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{x:.1} {}", UNITS[u]) }
}

/// The decision: whether `need` fits beside `used` under `limits`. Pure.
pub fn check(used: Usage, need: Usage, limits: Limits) -> Result<(), OverQuota> {
    let over = |resource, used: u64, need: u64, limit: Option<u64>| match limit {
        Some(limit) if need > 0 && used.saturating_add(need) > limit => {
            Err(OverQuota { resource, used, limit, need })
        }
        _ => Ok(()),
    };
    over(Resource::Files, used.files, need.files, limits.files)?;
    over(Resource::Bytes, used.bytes, need.bytes, limits.bytes)
}

/// The most `op` can add, before looking at the tree: `None` if it can add nothing.
pub fn upper_bound(op: &Op) -> Option<Usage> {
    let u = match op {
        Op::Create { .. } | Op::Mknod { .. } => Usage { bytes: 0, files: 1 },
        Op::Mkdir { .. } | Op::Symlink { .. } => Usage { bytes: BLOCK, files: 1 },
        Op::Write { data, .. } => Usage { bytes: round_up(data.len() as u64) + BLOCK, files: 0 },
        Op::Fallocate { mode, len, .. } if *mode & libc::FALLOC_FL_PUNCH_HOLE as u32 == 0 => {
            Usage { bytes: round_up(*len) + BLOCK, files: 0 }
        }
        _ => return None,
    };
    Some(u)
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(BLOCK).saturating_mul(BLOCK)
}

/// The bytes a write or allocation of `[offset, offset + len)` in the open file `fd` would
/// newly allocate: the holes it covers and what lies past the end of the file, in blocks.
pub fn new_allocation(fd: impl AsFd, offset: u64, len: u64) -> std::io::Result<u64> {
    use rustix::fs::SeekFrom;
    let fd = fd.as_fd();
    let size = rustix::fs::fstat(fd)?.st_size as u64;
    let end = offset.saturating_add(len);
    let mut missing = end.saturating_sub(size.max(offset));
    let mut at = offset;
    while at < end.min(size) {
        // The next data at or after `at`; everything between is a hole.
        let data = match rustix::fs::seek(fd, SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        missing += data.min(end).min(size).saturating_sub(at);
        if data >= end.min(size) {
            break;
        }
        at = rustix::fs::seek(fd, SeekFrom::Hole(data))?;
    }
    Ok(round_up(missing))
}

/// What one inode takes, as its removal would free it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Its allocated bytes.
    pub bytes: u64,
    /// Its device and inode number (two names of one inode are one footprint).
    pub id: (u64, u64),
    /// Whether removing this name frees the inode (its last link, or a directory).
    pub last_name: bool,
}

impl Footprint {
    /// The footprint of `st`.
    pub fn of(st: &rustix::fs::Stat) -> Footprint {
        let dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        Footprint {
            bytes: st.st_blocks as u64 * 512,
            id: (st.st_dev, st.st_ino),
            last_name: dir || st.st_nlink <= 1,
        }
    }

    /// What removing this name gives back.
    pub fn freed(&self) -> Usage {
        if self.last_name { Usage { bytes: self.bytes, files: 1 } } else { Usage::default() }
    }
}

/// The footprint of `name` in `dir`, or `None` if there is no such name.
pub fn footprint_at(dir: &OwnedFd, name: &[u8]) -> Option<Footprint> {
    rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).ok().map(|st| Footprint::of(&st))
}

/// Counts what the tree at `root` takes (each inode once; nothing on another file system).
pub fn walk(root: &Path) -> std::io::Result<Usage> {
    use std::os::unix::fs::MetadataExt;
    let top = std::fs::symlink_metadata(root)?;
    let dev = top.dev();
    let mut seen = std::collections::HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    let mut count = |m: &std::fs::Metadata| {
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            return;
        }
        usage.bytes += m.blocks() * 512;
        usage.files += 1;
    };
    count(&top);
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            count(&m);
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(usage)
}

/// One source's use and limits, shared by all its replicas (and read by status).
pub struct Account {
    /// Where the source's replicas live (counted once by [`Account::ensure_counted`]).
    roots: Vec<PathBuf>,
    bytes: AtomicI64,
    files: AtomicI64,
    limit_bytes: AtomicU64,
    limit_files: AtomicU64,
    /// Whether the walk has run (read on every op: a load, no lock).
    counted: AtomicBool,
    /// Held while the walk runs, so one walk counts a source.
    walking: Mutex<()>,
}

impl Account {
    /// An account for the replicas beneath `roots`, with `limits` (use is counted when a
    /// limit first applies).
    pub fn new(roots: Vec<PathBuf>, limits: Limits) -> Account {
        let a = Account {
            roots,
            bytes: AtomicI64::new(0),
            files: AtomicI64::new(0),
            limit_bytes: AtomicU64::new(UNLIMITED),
            limit_files: AtomicU64::new(UNLIMITED),
            counted: AtomicBool::new(false),
            walking: Mutex::new(()),
        };
        a.set_limits(limits);
        a
    }

    /// Changes the limits (a configuration reload): a paused replica sees them at its next
    /// retry.
    pub fn set_limits(&self, l: Limits) {
        self.limit_bytes.store(l.bytes.unwrap_or(UNLIMITED), Ordering::Relaxed);
        self.limit_files.store(l.files.unwrap_or(UNLIMITED), Ordering::Relaxed);
    }

    /// The limits now.
    pub fn limits(&self) -> Limits {
        let get = |a: &AtomicU64| Some(a.load(Ordering::Relaxed)).filter(|&v| v != UNLIMITED);
        Limits { bytes: get(&self.limit_bytes), files: get(&self.limit_files) }
    }

    /// Use now, if it was counted.
    pub fn used(&self) -> Option<Usage> {
        self.counted.load(Ordering::Acquire).then(|| self.usage())
    }

    fn usage(&self) -> Usage {
        let get = |a: &AtomicI64| a.load(Ordering::Relaxed).max(0) as u64;
        Usage { bytes: get(&self.bytes), files: get(&self.files) }
    }

    /// Counts use by walking the replicas, once, if a limit applies (a source without one is
    /// never walked: a large tree's walk costs time at every target start).
    pub fn ensure_counted(&self) -> std::io::Result<()> {
        if self.counted.load(Ordering::Acquire) || !self.limits().any() {
            return Ok(());
        }
        let _walking = self.walking.lock();
        if self.counted.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut total = Usage::default();
        for r in &self.roots {
            match walk(r) {
                Ok(u) => {
                    total.bytes += u.bytes;
                    total.files += u.files;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // Changes measured while the walk ran are in `total` already or were added to the
        // counters: the walk's figure replaces them.
        self.bytes.store(total.bytes as i64, Ordering::Relaxed);
        self.files.store(total.files as i64, Ordering::Relaxed);
        self.counted.store(true, Ordering::Release);
        tracing::info!(bytes = total.bytes, files = total.files, "counted the source's use for its quota");
        Ok(())
    }

    /// Forgets the count: the next [`Account::ensure_counted`] walks again (after a change no
    /// op measured, such as a rollback).
    pub fn forget_count(&self) {
        self.counted.store(false, Ordering::Release);
    }

    /// Whether `need` more fits (always, without a limit).
    pub fn admit(&self, need: Usage) -> Result<(), OverQuota> {
        check(self.usage(), need, self.limits())
    }

    /// Records a change of use (`added` minus `freed`).
    pub fn record(&self, added: Usage, freed: Usage) {
        let d = |a: u64, f: u64| a as i64 - f as i64;
        self.bytes.fetch_add(d(added.bytes, freed.bytes), Ordering::Relaxed);
        self.files.fetch_add(d(added.files, freed.files), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
