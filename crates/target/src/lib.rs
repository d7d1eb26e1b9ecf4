//! # doppel-target: the DR side
//!
//! - [`config`]: [`TargetConfig`]: where replicas live, which sources may connect (by
//!   identity, each under its own name), and the link's limits.
//! - [`server`]: the TLS accept loop: authenticates each connection and hands it to a session.
//! - [`admission`]: what the accept loop decides before a peer is authenticated (caps on
//!   handshakes in flight, in total and per address; backoff on `accept` errors; warnings at
//!   most once per interval), pure decisions over explicit times.
//! - [`session`]: one source connection for one job: handshake, reading batches and listing
//!   requests, writing acks and heartbeats.
//! - [`commit`]: the group-commit policy (when a group of applied ops is made durable, how a
//!   full disk is waited out), a pure state machine over explicit times.
//! - [`worker`]: the blocking apply loop of a session: applies ops in order, commits when the
//!   policy says so, acknowledges durable progress, waits out a full disk without losing
//!   anything.
//! - [`registry`]: the replicas this target holds, at most one session per replica, their
//!   status, the live list of allowed sources (replaced by a reload) and each source's quota
//!   account.
//!
//! The same [`session::handle_stream`] serves TLS connections from remote sources and the
//! in-process pipe of an embedded target (`doppel protect DIR --to LOCAL_DIR`).

pub mod admission;
pub mod commit;
pub mod config;
pub mod datadir;
pub mod registry;
pub mod server;
pub mod session;
pub mod worker;

pub use admission::HandshakeLimits;
pub use config::{AllowedSource, HistoryPolicy, Layout, NameError, SourceLimits, TargetConfig, valid_name};
pub use datadir::{DataDirError, secure_data_dir};
pub use doppel_apply::privilege::{Privilege, PrivilegePolicy, Rule};
pub use doppel_apply::quota::{Limits as QuotaLimits, iec};
pub use registry::{LeaseError, PrivilegeCounts, QuotaUse, Reloaded, ReplicaState, ReplicaStatus, Target};
pub use server::serve;
pub use session::{FailbackHandler, Handover, Stream, handle_after, refuse_stream};
