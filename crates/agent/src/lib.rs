//! # doppel-agent: protecting a job
//!
//! The agent runs one job's pipeline on the source:
//!
//! ```text
//! watch (capture) -> reconciler (mirror) -> spool -> link -> target
//!                          ^                          |
//!                          +------ listings ----------+   acks -> spool
//! ```
//!
//! - [`config`]: [`JobConfig`], everything a job needs, from flags or the config file.
//! - [`state`]: what the agent remembers about a job between runs.
//! - [`status`]: live counters for `doppel status`.
//! - [`capture_loop`]: the capture thread: watch events to ops through the reconciler.
//! - [`sender`]: batches in a window sized to the bandwidth-delay product, adaptive compression.
//! - [`bandwidth`]: bandwidth schedules.
//! - [`overflow`]: what a job does when its spool is full.
//! - [`resume`]: the resume plan: what the job does after any break, decided from facts alone.
//! - [`link_loop`]: the link: connect, handshake, decide between resuming and comparing,
//!   stream batches in a window, take acks, reconnect after any break.
//! - [`listing`]: replica listings passed from the link to the capture thread a chunk at a
//!   time, never held whole.
//! - [`connect`]: reaching a destination (a remote target over TLS, or an embedded one).
//! - [`activity`]: the on-disk log of regions that may differ (fuse mode).
//! - [`agent`]: [`Agent`], which wires these together and shuts them down cleanly.
//! - [`fuse_sink`]: where a `fuse` mount's changes go (activity log, spool, sync mode).
//! - [`failback`]: the source side of a failback: the tree brought in line with the replica
//!   by an embedded target fed from the DR side, then handed back.
//! - [`handover`]: taking a job back after a failback (its tree now equals the replica).
//! - [`vm_disks`]: what a `vm` job remembers of its guest's disks, and the staging of its
//!   failback.
//! - [`error`]: what can stop a job.

pub mod activity;
pub mod agent;
pub mod bandwidth;
pub mod capture_loop;
pub mod config;
pub mod connect;
pub mod error;
pub mod failback;
pub mod fuse_sink;
pub mod handover;
pub mod link_loop;
pub mod listing;
pub mod overflow;
pub mod resume;
pub mod sender;
pub mod state;
pub mod status;
pub mod vm_disks;

pub use agent::{Agent, BookmarkError, Bookmarker, Limit, Settler, StatusSource, Verifier};
pub use bandwidth::{Rule, Schedule};
pub use config::{CaptureMode, Destination, JobConfig, VmSource};
pub use connect::Connector;
pub use error::{AgentError, RequestError};
pub use sender::Compression;
pub use status::{JobStatus, JobStatusSnapshot, Phase};
