//! The agent's side of the `fuse` capture: activity log, spool, sync mode.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use doppel_capture::fuse::{CaptureSink, Dirty, Locks};
use doppel_mirror::reconcile::{Guard, Held};
use doppel_proto::Op;
use doppel_spool::{Placement, Spool};
use doppel_target::registry::now_us;

use crate::activity::{ActivityLog, Region};
use crate::status::JobStatus;

/// Where the mount's changes go.
pub struct FuseSink {
    /// The job's spool (written through, so a killed agent loses nothing).
    pub spool: Arc<Spool>,
    /// Hot regions, on disk.
    pub activity: Arc<ActivityLog>,
    /// Live status (sync-mode state).
    pub status: Arc<JobStatus>,
    /// `fsync` waits for the target (sync mode).
    pub sync: bool,
    /// How long `fsync` waits in sync mode before the job degrades to async.
    pub sync_timeout: Duration,
}

/// Regions marked for one change, released if the change is abandoned.
pub struct Marked {
    regions: Vec<Region>,
    log: Arc<ActivityLog>,
    done: bool,
}

impl Drop for Marked {
    fn drop(&mut self) {
        if !self.done {
            self.log.done(&self.regions, None);
        }
    }
}

impl CaptureSink for FuseSink {
    type Prepared = Marked;

    fn prepare(&self, dirty: &[Dirty<'_>]) -> std::io::Result<Marked> {
        let regions: Vec<Region> = dirty.iter().flat_map(Region::of).collect();
        self.activity.mark(&regions)?;
        Ok(Marked { regions, log: self.activity.clone(), done: false })
    }

    fn commit(&self, mut prepared: Marked, ops: Vec<Op>) -> std::io::Result<u64> {
        let mut last = 0;
        let time = now_us();
        for op in ops {
            last = self.spool.append(op, time, Placement::Disk, true).map_err(std::io::Error::other)?;
        }
        prepared.done = true;
        self.activity.done(&prepared.regions, Some(last));
        Ok(last)
    }

    fn barrier(&self, seq: u64) {
        if !self.sync || self.status.sync_degraded.load(Ordering::Relaxed) {
            return;
        }
        if !self.spool.wait_acked(seq, self.sync_timeout) {
            self.status.sync_degraded.store(true, Ordering::Relaxed);
            tracing::error!(
                timeout = ?self.sync_timeout,
                "SYNC REPLICATION DEGRADED: the target did not acknowledge an fsync in time; \\
                 fsync no longer waits for the target until it catches up"
            );
        }
    }
}

/// The mount's locks, as the mirror takes them.
pub struct MountGuard(pub Arc<Locks>);

impl Guard for MountGuard {
    fn entry(&self) -> Box<dyn Held + '_> {
        Box::new(self.0.shared_recursive())
    }

    fn file(&self, dev: u64, ino: u64) -> Box<dyn Held + '_> {
        Box::new(self.0.lock_file((dev, ino)))
    }
}
