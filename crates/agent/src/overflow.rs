//! Spool overflow: when the spool's disk limit is reached, the job stops queueing ops and
//! records what changed instead, in a persistent dirty set; when the link has caught up, the
//! dirty set is compared with the replica and only what differs is sent.
//!
//! Commercial products in this field throw everything away and re-mirror at this point; here
//! the cost of an overflow is a comparison of the names (and, in `fuse` mode, the 4 MiB
//! extents) that changed while it lasted.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the job is in overflow.
#[derive(Debug, Default)]
pub struct Overflow {
    active: AtomicBool,
}

impl Overflow {
    /// Whether ops are being dropped in favour of the dirty set.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// Enters overflow; returns whether it was not already in it.
    pub fn enter(&self) -> bool {
        let entered = !self.active.swap(true, Ordering::SeqCst);
        if entered {
            tracing::warn!(
                "spool full: no longer queueing ops; recording changed names until the link catches up"
            );
        }
        entered
    }

    /// Leaves overflow (a comparison of the dirty set follows).
    pub fn leave(&self) {
        if self.active.swap(false, Ordering::SeqCst) {
            tracing::info!("spool drained: leaving overflow; comparing what changed meanwhile");
        }
    }
}
