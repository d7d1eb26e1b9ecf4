//! A replica's history: an undo journal that makes every past op boundary a restorable point.
//!
//! Before apply changes or removes anything in the replica, [`History::before`] writes an
//! [`record::UndoSet`] saying how to get back: the old bindings of the names the op touches
//! (by inode [`Handle`], so renames never lose track of a file), the old bytes of overwritten
//! ranges, old sizes, attributes and times; whatever the op would delete is moved into the
//! attic instead. The replica itself stays a plain tree at "now". From it and the journal:
//!
//! - [`view::PointView`] reads the tree as it was at any point in the window, lazily and while
//!   apply goes on (restore, test failover);
//! - [`rollback`] takes the replica itself back to a point (failover to a point).
//!
//! [`crate::retention`] decides which segments of the journal go.

pub mod capture;
pub mod journal;
pub mod record;
pub mod restore;
pub mod rollback;
pub mod view;
pub mod when;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use doppel_fs::Beneath;
pub use doppel_fs::handle::Handle;
use doppel_proto::Op;

use crate::error::ApplyError;
use crate::quota::Usage;
use crate::retention::{Facts, Plan, Retention, SizeLimit};
use capture::{Reader, Taker};
use journal::Journal;
use record::{Draft, Mark, UndoSet};

/// The history directory of a replica whose state lives in `state_dir`.
pub fn dir_of(state_dir: &Path) -> PathBuf {
    state_dir.join("history")
}

/// Where objects moved aside go: inside the history directory when it is on the replica's file
/// system (a rename reaches it), else beside the replica tree.
pub fn attic_of(root: &Path, state_dir: &Path) -> PathBuf {
    let inside = dir_of(state_dir).join("attic");
    let dev = |p: &Path| p.metadata().map(|m| m.dev()).ok();
    if dev(root).is_some() && dev(root) == dev(state_dir) {
        return inside;
    }
    let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    root.with_file_name(format!(".{name}.doppel-attic"))
}

/// The default retention: a day of points, no size limit but the disk's, an hour that no
/// shortage of space cuts.
pub const DEFAULT_RETENTION: Retention = Retention {
    keep: Duration::from_secs(24 * 3600),
    size: SizeLimit::Unlimited,
    min: Duration::from_secs(3600),
};

/// What status shows of a history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryStatus {
    /// The oldest point that can be restored (`None`: nothing journaled yet).
    pub oldest_point: Option<u64>,
    /// When that point ended (the capture time of the first op held), µs since the epoch.
    pub oldest_time_us: u64,
    /// The newest op journaled.
    pub newest_seq: u64,
    /// Bytes the history takes (journal and attic).
    pub bytes: u64,
    /// The window configured (`history`), in seconds.
    pub keep_secs: u64,
    /// The size limit or a shortage of space cut the window below `keep_secs`.
    pub cut_below_keep: bool,
    /// Space ran out with only the minimum window left: the replica waits.
    pub paused: bool,
}

/// How long a segment stays open: an eighth of the window kept (so a time cut is at most an
/// eighth late), between a second and an hour.
fn segment_age(r: &Retention) -> u64 {
    let us = u64::try_from((r.keep / 8).as_micros()).unwrap_or(u64::MAX);
    us.clamp(1_000_000, 3_600_000_000)
}

/// A replica's history, as the process applying its ops holds it.
pub struct History {
    journal: Journal,
    reader: Reader,
    retention: Retention,
    last_plan: Option<Plan>,
}

impl History {
    /// Opens the history of the replica at `root` whose state is in `state_dir`.
    pub fn open(root: &Path, state_dir: &Path, retention: Retention) -> Result<History, ApplyError> {
        let dir = dir_of(state_dir);
        let mut journal = Journal::open(&dir, &attic_of(root, state_dir))
            .map_err(|e| ApplyError::State { path: dir.clone(), source: e })?;
        journal.set_segment_age(segment_age(&retention));
        Ok(History { journal, reader: Reader::default(), retention, last_plan: None })
    }

    /// Changes the retention (a reload).
    pub fn set_retention(&mut self, r: Retention) {
        self.retention = r;
        self.journal.set_segment_age(segment_age(&r));
    }

    /// Sizes segments for a size limit of `limit` bytes: retention drops whole segments, so a
    /// segment is at most a quarter of the limit (at least 1 MiB), and at most
    /// [`journal::SEGMENT_BYTES`].
    pub fn size_segments_for(&mut self, limit: Option<u64>) {
        let bytes = limit.map_or(journal::SEGMENT_BYTES, |l| (l / 4).clamp(1 << 20, journal::SEGMENT_BYTES));
        self.journal.set_segment_bytes(bytes);
    }

    /// The retention in force.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// The journal.
    pub fn journal(&mut self) -> &mut Journal {
        &mut self.journal
    }

    /// Takes and journals the undo of op `seq` before it is carried out. A replay of an op
    /// whose set is already journaled (after a kill) takes nothing again: the set describes
    /// the state before its first attempt.
    ///
    /// Returns what the history took meanwhile, for the source's quota: the journal's growth,
    /// and what was moved aside that the quota's measure of the op counts as freed.
    pub fn before(&mut self, root: &Beneath, seq: u64, time_us: u64, op: &Op) -> Result<Usage, ApplyError> {
        let op_hash = record::op_hash(op);
        if self.journal.last() == Some((seq, op_hash)) {
            return Ok(Usage::default());
        }
        let mark = match op {
            Op::Fsync { .. } => Some(Mark::Fsync),
            Op::Point { kind: doppel_proto::PointKind::PreResync } => Some(Mark::PreResync),
            Op::Point { kind: doppel_proto::PointKind::Resynced } => Some(Mark::Resynced),
            Op::Point { kind: doppel_proto::PointKind::Bookmark(n) } => Some(Mark::Bookmark(n.clone())),
            _ => None,
        };
        let draft =
            Draft { set: UndoSet { seq, time_us, op_hash, mark, undo: Vec::new() }, data: Vec::new() };
        let mut t = Taker {
            root,
            journal: &mut self.journal,
            reader: &mut self.reader,
            draft,
            asides: 0,
            kept: Usage::default(),
            counted_freed: false,
        };
        let io = |e: io::Error| ApplyError::Io { seq, kind: op.kind(), path: "(history)".into(), source: e };
        t.take(op).map_err(io)?;
        let (draft, kept) = (t.draft, t.kept);
        self.journal.append(&draft).map_err(io)?;
        let grown = self.journal.take_growth();
        Ok(Usage { bytes: kept.bytes + grown.bytes, files: kept.files + grown.files })
    }

    /// Makes the journal durable (before the replica's own commit).
    pub fn sync(&mut self) -> Result<(), ApplyError> {
        self.journal
            .sync()
            .map_err(|e| ApplyError::State { path: self.journal.dir().to_path_buf(), source: e })
    }

    /// [`History::sync`], to be done on another thread ([`journal::JournalSync::run`]).
    pub fn take_sync(&mut self) -> Result<journal::JournalSync, ApplyError> {
        self.journal
            .take_sync()
            .map_err(|e| ApplyError::State { path: self.journal.dir().to_path_buf(), source: e })
    }

    /// Applies retention: drops the segments it lets go (by time, by size, and `need_bytes`
    /// more when space ran out). Returns the plan (whether the replica must pause).
    ///
    /// Returns the plan and what dropping its segments freed (for the quota).
    pub fn retain(
        &mut self,
        now_us: u64,
        replica_bytes: u64,
        need_bytes: u64,
    ) -> Result<(Plan, Usage), ApplyError> {
        let segs: Vec<_> = self.journal.segments().iter().map(|s| s.seg).collect();
        let pin = view::pins(self.journal.dir());
        let plan = self.retention.plan(&segs, Facts { now_us, replica_bytes, need_bytes, pin });
        let mut freed = Usage::default();
        if plan.drop > 0 {
            tracing::debug!(drop = plan.drop, freed = plan.freed, "history retention drops segments");
            freed = self
                .journal
                .drop_oldest(plan.drop)
                .map_err(|e| ApplyError::State { path: self.journal.dir().to_path_buf(), source: e })?;
        }
        self.last_plan = Some(plan);
        Ok((plan, freed))
    }

    /// What status shows.
    pub fn status(&self) -> HistoryStatus {
        let segs = self.journal.segments();
        let plan = self.last_plan.unwrap_or(Plan {
            drop: 0,
            freed: 0,
            held: None,
            cut_below_keep: false,
            pause: false,
        });
        HistoryStatus {
            oldest_point: segs.first().map(|s| s.seg.first_seq.saturating_sub(1)),
            oldest_time_us: segs.first().map_or(0, |s| s.seg.first_time_us),
            newest_seq: segs.last().map_or(0, |s| s.seg.last_seq),
            bytes: self.journal.bytes(),
            keep_secs: self.retention.keep.as_secs(),
            cut_below_keep: plan.cut_below_keep,
            paused: plan.pause,
        }
    }

    /// The last retention decision.
    pub fn last_plan(&self) -> Option<Plan> {
        self.last_plan
    }
}

#[cfg(test)]
mod tests;
