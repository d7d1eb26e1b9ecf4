//! Live job status.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use doppel_link::ByteCounter;
use doppel_mirror::ReconcileStats;
use doppel_spool::Spool;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The step a job is at, as `doppel status` shows it (serialised in lowercase: exactly the
/// words the status has always shown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Checking and opening (before the capture thread runs).
    #[default]
    Starting,
    /// Comparing the tree with the saved index locally (clean `watch` restart).
    Scanning,
    /// Comparing the tree (or suspects) with the replica.
    Mirroring,
    /// Streaming changes as they happen.
    Replicating,
    /// The link is down; reconnecting.
    Disconnected,
    /// The target refused the job: its workload failed over.
    Fenced,
    /// The target refused the job for another reason retrying cannot fix.
    Refused,
    /// The job has stopped.
    Stopped,
    /// The spool is full (a condition shown over the step).
    Overflow,
    /// The target paused applying (a condition shown over the step).
    #[serde(rename = "target paused")]
    TargetPaused,
}

impl Phase {
    /// The word status shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Scanning => "scanning",
            Phase::Mirroring => "mirroring",
            Phase::Replicating => "replicating",
            Phase::Disconnected => "disconnected",
            Phase::Fenced => "fenced",
            Phase::Refused => "refused",
            Phase::Stopped => "stopped",
            Phase::Overflow => "overflow",
            Phase::TargetPaused => "target paused",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters shared by the job's threads and tasks.
#[derive(Default)]
pub struct JobStatus {
    state: Mutex<Phase>,
    detail: Mutex<String>,
    /// Connected to the target.
    pub connected: AtomicBool,
    /// Bytes sent on the link (on the wire, TLS included), since the agent started.
    pub bytes_sent: ByteCounter,
    /// Bytes received on the link.
    pub bytes_received: ByteCounter,
    /// Ops the target refused.
    pub refused: AtomicU64,
    /// When the target last acknowledged ops, µs since the epoch (0: not since start).
    pub acked_at_us: AtomicU64,
    /// Completed connections (handshakes).
    pub connections: AtomicU64,
    /// The watch back-end in use.
    pub backend: Mutex<String>,
    /// Reconciler totals (mirror progress).
    pub reconcile: Mutex<Option<Arc<ReconcileStats>>>,
    /// Sync mode is configured.
    pub sync: AtomicBool,
    /// Sync mode gave up waiting for the target and runs async until it catches up.
    pub sync_degraded: AtomicBool,
    /// Hot regions in the activity log (`fuse` mode).
    pub dirty_regions: AtomicU64,
    /// zstd level in use (0: off).
    pub compression_level: Arc<AtomicU64>,
    /// The current session's window.
    pub window: Mutex<Option<Arc<crate::sender::Window>>>,
    /// Resend accounting.
    pub resends: Arc<crate::sender::Resends>,
    /// The job's bandwidth limit in bytes per second (0: unlimited).
    pub rate_limit: AtomicU64,
    /// Whether the spool overflowed (shown as the state while it lasts).
    pub overflow: Arc<crate::overflow::Overflow>,
    /// Why the target paused applying, while it does (shown as the state).
    pub stalled: Mutex<Option<String>>,
    /// Names in the index, as of its last checkpoint.
    pub index_entries: AtomicU64,
    /// The index store's size on disk, as of its last checkpoint.
    pub index_disk_bytes: AtomicU64,
    /// The bound of the index's cache in memory.
    pub index_cache_bytes: AtomicU64,
}

/// A status snapshot, as `doppel status --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobStatusSnapshot {
    /// Job name.
    pub job: String,
    /// Protected tree.
    pub root: String,
    /// Destination.
    pub dest: String,
    /// `starting`, `mirroring`, `replicating`, `disconnected`, `fenced`, `stopped`...
    pub state: String,
    /// More about the state (the last link error, say).
    pub detail: String,
    /// Connected to the target.
    pub connected: bool,
    /// Watch back-end.
    pub capture: String,
    /// Last sequence captured.
    pub last_captured_seq: u64,
    /// Last sequence acknowledged by the target.
    pub last_acked_seq: u64,
    /// When the target last acknowledged ops, seconds since the epoch (`None`: not since the
    /// agent started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_acked_unix: Option<f64>,
    /// Bytes of ops waiting for an ack (memory and disk).
    pub pending_bytes: u64,
    /// Bytes of pending ops spilled to disk.
    pub spooled_bytes: u64,
    /// Age of the oldest unacknowledged op, in seconds.
    pub lag_seconds: f64,
    /// Bytes sent on the wire since the agent started.
    pub bytes_sent: u64,
    /// Bytes received on the wire since the agent started.
    pub bytes_received: u64,
    /// Ops refused by the target.
    pub refused_ops: u64,
    /// Connections made since the agent started.
    pub connections: u64,
    /// `off`, `on`, or `degraded` (sync mode gave up waiting for the target).
    pub sync: String,
    /// Regions that may differ from the replica until acknowledged (`fuse` mode).
    pub dirty_regions: u64,
    /// zstd level of batches (0: raw).
    pub compression_level: u64,
    /// Bytes allowed in flight (follows the bandwidth-delay product).
    pub window_bytes: u64,
    /// Smoothed time from sending a batch to its acknowledgement, in milliseconds.
    pub ack_latency_ms: f64,
    /// Bytes sent again after reconnects (data an earlier connection had sent).
    pub bytes_resent: u64,
    /// Bandwidth limit in bytes per second (0: unlimited).
    pub rate_limit: u64,
    /// Files compared (hashed) since the agent started.
    pub files_hashed: u64,
    /// Bytes compared (hashed) since the agent started.
    pub bytes_hashed: u64,
    /// The whole-tree comparison under way (a difference mirror, a verify, a local scan):
    /// regular files the job's selection holds, as its walk counted them (absent while the
    /// walk counts, and when no comparison runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_total_files: Option<u64>,
    /// Bytes of those files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_total_bytes: Option<u64>,
    /// Files of the comparison under way compared so far (absent when none runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_done_files: Option<u64>,
    /// Bytes compared so far: read and hashed, or found unchanged by their metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_done_bytes: Option<u64>,
    /// The history of the replica, for a job protected to a local directory (its embedded
    /// target keeps it; a remote target's status shows its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<doppel_apply::history::HistoryStatus>,
    /// Names in the job's index (as of its last checkpoint).
    #[serde(default)]
    pub index_entries: u64,
    /// The index's size on disk.
    #[serde(default)]
    pub index_disk_bytes: u64,
    /// The most memory the index's cache may use.
    #[serde(default)]
    pub index_cache_bytes: u64,
}

impl JobStatus {
    /// Sets the step the job is at.
    pub fn set_state(&self, phase: Phase) {
        let mut g = self.state.lock();
        if *g != phase {
            tracing::info!(state = %phase, "job state");
            *g = phase;
        }
    }

    /// The step the job is at.
    pub fn state(&self) -> Phase {
        *self.state.lock()
    }

    /// Records the index's size for status (at start and at each checkpoint).
    pub fn show_index(&self, index: &doppel_mirror::Index) -> Result<(), doppel_mirror::MirrorError> {
        let footprint = index.footprint();
        self.index_entries.store(index.len()?, Ordering::Relaxed);
        self.index_disk_bytes.store(footprint.disk_bytes, Ordering::Relaxed);
        self.index_cache_bytes.store(footprint.cache_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Sets the detail line.
    pub fn set_detail(&self, s: impl Into<String>) {
        *self.detail.lock() = s.into();
    }

    /// A snapshot, combined with the spool's counters.
    pub fn snapshot(&self, job: &str, root: &str, dest: &str, spool: &Spool) -> JobStatusSnapshot {
        let s = spool.stats();
        let now = doppel_target::registry::now_us();
        let window = self.window.lock().clone();
        let stats = self.reconcile.lock().clone();
        let (files, bytes) = stats
            .as_ref()
            .map(|r| (r.files_hashed.load(Ordering::Relaxed), r.bytes_hashed.load(Ordering::Relaxed)))
            .unwrap_or_default();
        let tree = stats.as_ref().and_then(|r| r.tree.get());
        let total = tree.and_then(|t| t.total);
        // Conditions that last take precedence over the step the job is at.
        let stalled = self.stalled.lock().clone();
        let (state, detail) = if self.overflow.active() {
            (
                Phase::Overflow.to_string(),
                "spool full: recording changed names, to compare once the link catches up".to_string(),
            )
        } else if let Some(reason) = stalled.filter(|_| self.connected.load(Ordering::Relaxed)) {
            (Phase::TargetPaused.to_string(), format!("target paused: {reason}"))
        } else {
            (self.state().to_string(), self.detail.lock().clone())
        };
        JobStatusSnapshot {
            job: job.to_string(),
            root: root.to_string(),
            dest: dest.to_string(),
            state,
            detail,
            connected: self.connected.load(Ordering::Relaxed),
            capture: self.backend.lock().clone(),
            last_captured_seq: s.last_seq,
            last_acked_seq: s.acked,
            last_acked_unix: match self.acked_at_us.load(Ordering::Relaxed) {
                0 => None,
                t => Some(t as f64 / 1e6),
            },
            pending_bytes: s.memory_bytes + s.disk_bytes,
            spooled_bytes: s.disk_bytes,
            lag_seconds: s.oldest_pending_us.map(|t| now.saturating_sub(t) as f64 / 1e6).unwrap_or(0.0),
            bytes_sent: self.bytes_sent.get(),
            bytes_received: self.bytes_received.get(),
            refused_ops: self.refused.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            sync: match (self.sync.load(Ordering::Relaxed), self.sync_degraded.load(Ordering::Relaxed)) {
                (false, _) => "off".into(),
                (true, false) => "on".into(),
                (true, true) => "degraded".into(),
            },
            dirty_regions: self.dirty_regions.load(Ordering::Relaxed),
            compression_level: self.compression_level.load(Ordering::Relaxed),
            window_bytes: window.as_ref().map_or(0, |w| w.limit.load(Ordering::Relaxed)),
            ack_latency_ms: window
                .as_ref()
                .map_or(0.0, |w| w.latency_us.load(Ordering::Relaxed) as f64 / 1000.0),
            bytes_resent: self.resends.bytes.load(Ordering::Relaxed),
            rate_limit: self.rate_limit.load(Ordering::Relaxed),
            files_hashed: files,
            bytes_hashed: bytes,
            mirror_total_files: total.map(|t| t.0),
            mirror_total_bytes: total.map(|t| t.1),
            mirror_done_files: tree.map(|t| t.files_done),
            mirror_done_bytes: tree.map(|t| t.bytes_done),
            history: None,
            index_entries: self.index_entries.load(Ordering::Relaxed),
            index_disk_bytes: self.index_disk_bytes.load(Ordering::Relaxed),
            index_cache_bytes: self.index_cache_bytes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Phase;

    /// The status JSON and `doppel status` show exactly these words.
    #[test]
    fn phases_serialise_as_the_words_status_shows() {
        let all = [
            (Phase::Starting, "starting"),
            (Phase::Scanning, "scanning"),
            (Phase::Mirroring, "mirroring"),
            (Phase::Replicating, "replicating"),
            (Phase::Disconnected, "disconnected"),
            (Phase::Fenced, "fenced"),
            (Phase::Refused, "refused"),
            (Phase::Stopped, "stopped"),
            (Phase::Overflow, "overflow"),
            (Phase::TargetPaused, "target paused"),
        ];
        for (phase, word) in all {
            assert_eq!(serde_json::to_value(phase).unwrap(), word);
            assert_eq!(phase.to_string(), word);
            assert_eq!(serde_json::from_value::<Phase>(word.into()).unwrap(), phase);
        }
    }
}
