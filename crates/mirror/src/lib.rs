//! # doppel-mirror: making a replica equal to its source
//!
//! - [`index`]: the job's [`Index`]: for every protected name, what the replica holds (or will
//!   hold once the ops emitted so far are applied): type, attributes, per-block hashes, and the
//!   source stat fields that tell whether the name changed since (as git's index does).
//! - [`reconcile`]: the [`Reconciler`], which brings one name, a subtree, or the whole tree of
//!   the replica in line with the source by comparing it with the index, emitting only the ops
//!   needed: differing blocks, appended bytes, renames as renames.
//! - [`events`]: turns watch hints ([`doppel_capture::FsEvent`]) into reconciler work, in order,
//!   with renames applied at once and content changes coalesced.
//! - [`prehash`]: hashing the source's files while the other side lists its replica, so a
//!   difference mirror against a full replica reads both trees at once, not one after the other.
//! - [`verify`]: comparing without changing anything, and describing the differences.
//! - [`error`]: what can fail.
//!
//! A difference mirror is the same machinery with the index seeded from the target's listing;
//! verify compares without emitting.

pub mod error;
pub mod events;
pub mod index;
pub mod prehash;
pub mod reconcile;
pub mod verify;

pub use error::MirrorError;
pub use events::EventQueue;
pub use index::{Index, IndexEntry};
pub use reconcile::{OpSink, ReconcileStats, Reconciler, TreeCounts, TreeProgress};
pub use verify::{Difference, VerifyReport};
