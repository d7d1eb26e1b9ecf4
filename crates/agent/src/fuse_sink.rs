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
    /// Whether the spool overflowed (ops are then dropped, their regions kept sticky).
    pub overflow: Arc<crate::overflow::Overflow>,
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
        let regions = self.activity.mark_dirty(dirty)?;
        Ok(Marked { regions, log: self.activity.clone(), done: false })
    }

    fn commit(&self, mut prepared: Marked, ops: Vec<Op>) -> std::io::Result<u64> {
        prepared.done = true;
        // A file new to the replica (or emptied): its name, hot now, stands for its content.
        for op in &ops {
            match op {
                Op::Create { path, .. } => self.activity.created(&path.0, true),
                Op::Truncate { path, size: 0 } => self.activity.created(&path.0, false),
                _ => {}
            }
        }
        // Once one op is dropped every later one must be too, or the replica would hold a
        // change without one made before it: the overflow lasts until the dirty regions are
        // compared.
        if !self.overflow.active() {
            let mut last = 0;
            let time = now_us();
            let mut full = false;
            for op in ops {
                match self.spool.append(op, time, Placement::Disk, false) {
                    Ok(seq) => last = seq,
                    Err(doppel_spool::SpoolError::Full { .. }) => {
                        full = true;
                        break;
                    }
                    Err(e) => return Err(std::io::Error::other(e)),
                }
            }
            if !full {
                self.activity.done(&prepared.regions, Some(last));
                return Ok(last);
            }
            self.overflow.enter();
        }
        self.activity.dropped(&prepared.regions);
        Ok(0)
    }

    fn barrier(&self, seq: u64) {
        if !self.sync || seq == 0 || self.status.sync_degraded.load(Ordering::Relaxed) {
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

/// The vm capture's locks, as the mirror takes them, and the views it vouches for.
pub struct VmGuard {
    /// The capture's locks.
    pub locks: Arc<Locks>,
    /// (device, inode) of each live raw view of the guest's disks.
    pub views: std::collections::HashSet<(u64, u64)>,
}

impl Guard for VmGuard {
    fn entry(&self) -> Box<dyn Held + '_> {
        Box::new(self.locks.shared_recursive())
    }

    fn file(&self, dev: u64, ino: u64) -> Box<dyn Held + '_> {
        Box::new(self.locks.lock_file((dev, ino)))
    }

    fn times_kept(&self) -> bool {
        false
    }

    fn vouch(&self, dev: u64, ino: u64) -> Result<(), String> {
        if self.views.contains(&(dev, ino)) {
            Ok(())
        } else {
            Err("not a live view of the guest's disks (QEMU's export is gone): not read as a disk".into())
        }
    }
}
