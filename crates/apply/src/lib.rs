//! # doppel-apply: the replica side of replication
//!
//! - [`replica`]: [`Replica`], one job's replica: applies op records in sequence order, makes
//!   them durable in groups ([`Replica::commit`]) before they may be acknowledged, and keeps
//!   enough state to resume exactly after a crash of the process or of the machine.
//! - [`dirty`]: what changed since the last commit, so a commit `fsync`s only that (one
//!   source's commit does not flush every source's data on a shared file system).
//! - [`lanes`]: which ops of a batch may be applied on several threads at once (a run of new
//!   files), and carrying them out.
//! - [`ops`]: how each op is carried out beneath the replica root (never outside it, never
//!   through a symlink).
//! - [`privilege`]: what a source may do that grants privilege on the target (set-id bits,
//!   owners, capabilities, device nodes): allowed, stripped or refused, as a pure decision.
//! - [`quota`]: what a source's replicas take (allocated bytes, inodes) against its limits,
//!   and the check each op passes; an op over quota pauses its replica as a full disk does.
//! - [`state`]: the replica's persistent state files.
//! - [`listing`]: describing the replica (metadata and block hashes) for difference mirrors.
//! - [`outside`]: names a replica's tree keeps out of the stream (a source's own names the
//!   job's rules leave out, while it receives its replica back in a failback).
//! - [`history`]: the undo journal that makes every past op boundary a point: a view of any
//!   point while apply goes on, restore, rollback.
//! - [`retention`]: which history a replica keeps (time, size, the minimum window, pins), as
//!   a pure decision.
//! - [`error`]: what can go wrong, split by what the caller must do about it.

pub mod dirty;
pub mod error;
pub mod history;
pub mod lanes;
pub mod listing;
mod metered;
pub mod ops;
pub mod outside;
pub mod privilege;
pub mod quota;
pub mod replica;
pub mod retention;
pub mod state;
pub mod unreplicated;

pub use error::ApplyError;
pub use privilege::{Privilege, PrivilegePolicy, Rule};
pub use replica::{Flush, Flushed, Outcome, Replica, ReplicaInfo};
