//! Job configuration.

use std::path::PathBuf;
use std::time::Duration;

use doppel_capture::WatchBackend;
use doppel_link::NodeId;
use doppel_spool::SpoolLimits;
use std::sync::Arc;

use doppel_link::RateLimiter;

use crate::bandwidth::Schedule;
use crate::sender::Compression;

/// Where a job's replica is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A target daemon, reached over TLS and pinned by identity.
    Remote {
        /// `HOST:PORT`.
        addr: String,
        /// The target's identity (`doppel id` on the target).
        target_id: NodeId,
    },
    /// A directory on this machine, served by a target embedded in the agent.
    Local(PathBuf),
    /// The job's own source, during a failback (the DR side sends the replica back over
    /// connections the source opens).
    Failback {
        /// The source's name.
        source: String,
    },
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Remote { addr, target_id } => write!(f, "{addr} (target {target_id})"),
            Destination::Local(p) => write!(f, "{}", p.display()),
            Destination::Failback { source } => write!(f, "source {source} (failback)"),
        }
    }
}

/// How a job captures changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureMode {
    /// Watch events and block-hash deltas.
    Watch(WatchBackend),
    /// An in-place pass-through mount that sees every write, in order.
    Fuse,
    /// A QEMU guest's disks, captured at the hypervisor (see `doppel_capture::vm`). The job's
    /// root is then doppel's own directory of the disks' raw views (`HOME/vm/JOB`).
    Vm(VmSource),
}

/// The guest of a `vm` job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSource {
    /// The guest's QMP socket.
    pub qmp: std::path::PathBuf,
    /// Drive or block node names to protect; empty: every writable drive.
    pub disks: Vec<String>,
}

impl CaptureMode {
    /// Whether the capture sequences every write itself, with its bytes and in order (fuse,
    /// vm), as opposed to watching for hints and reading files afterwards.
    pub fn sequences_writes(&self) -> bool {
        matches!(self, CaptureMode::Fuse | CaptureMode::Vm(_))
    }

    /// The mode's name, as the config spells it.
    pub fn name(&self) -> &'static str {
        match self {
            CaptureMode::Watch(_) => "watch",
            CaptureMode::Fuse => "fuse",
            CaptureMode::Vm(_) => "vm",
        }
    }
}

/// Everything one job needs.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Job name: unique per source, names the replica on the target.
    pub name: String,
    /// The protected tree.
    pub root: PathBuf,
    /// Where the replica is.
    pub dest: Destination,
    /// Include rules (gitignore syntax); empty means everything.
    pub include: Vec<String>,
    /// Exclude rules (gitignore syntax).
    pub exclude: Vec<String>,
    /// How changes are captured.
    pub capture: CaptureMode,
    /// `fsync` on the source waits until the target acknowledged everything before it
    /// (`fuse` mode).
    pub sync: bool,
    /// How long such a wait may take before the job degrades to async.
    pub sync_timeout: Duration,
    /// `fuse` mode with the kernel's write-back cache: much faster small writes, but the
    /// replica keeps only the order a local disk keeps (everything an `fsync` covered before
    /// anything written after it returned), not the order of every write.
    pub fuse_writeback: bool,
    /// Spool limits.
    pub spool: SpoolLimits,
    /// Memory the index's page cache may use (the index itself lives on disk, whatever the
    /// tree's size).
    pub index_cache: usize,
    /// How batches are compressed.
    pub compression: Compression,
    /// The job's bandwidth schedule.
    pub bandwidth: Schedule,
    /// A limiter shared by every job going to the same target, if its bandwidth is limited.
    pub target_limiter: Option<Arc<RateLimiter>>,
    /// Bytes of batches sent but not yet acknowledged.
    pub window: u64,
    /// How long changes settle before they are compared (coalesces the events of one save).
    pub debounce: Duration,
    /// Heartbeat interval; a target silent for three intervals is presumed dead.
    pub heartbeat: Duration,
    /// How often the index is checkpointed.
    pub checkpoint_interval: Duration,
    /// History the embedded target of a local destination keeps.
    pub history: doppel_target::HistoryPolicy,
    /// A local destination new to the job may hold files: a copy of the source made
    /// beforehand (a seed), compared and corrected instead of refused.
    pub seeded: bool,
}

impl JobConfig {
    /// A job with default settings.
    pub fn new(name: &str, root: PathBuf, dest: Destination) -> JobConfig {
        let local = matches!(dest, Destination::Local(_));
        JobConfig {
            name: name.to_string(),
            root,
            dest,
            include: Vec::new(),
            exclude: Vec::new(),
            capture: CaptureMode::Watch(WatchBackend::Auto),
            sync: false,
            sync_timeout: Duration::from_secs(10),
            fuse_writeback: false,
            spool: SpoolLimits::default(),
            index_cache: doppel_mirror::index::DEFAULT_CACHE_BYTES,
            // Compressing for an in-process pipe only burns CPU.
            compression: if local { Compression::Off } else { Compression::Auto },
            bandwidth: Schedule::default(),
            target_limiter: None,
            window: 32 << 20,
            debounce: Duration::from_millis(50),
            heartbeat: Duration::from_secs(5),
            checkpoint_interval: Duration::from_secs(30),
            history: Some(doppel_apply::history::DEFAULT_RETENTION),
            seeded: false,
        }
    }
}
