//! # doppel-capture: seeing changes as they happen
//!
//! - [`event`]: [`FsEvent`], a hint that something under the job root changed, and the
//!   [`EventSource`] trait that the watch back-ends implement.
//! - [`watch`]: the `watch` capture back-ends: fanotify (a filesystem mark filtered to the job
//!   root) where the kernel and privileges allow it, inotify otherwise.
//!
//! - [`vm`]: the `vm` capture: a QEMU guest's disks, through QEMU's active mirror to an NBD
//!   server of doppel's, with QEMU's raw views of the disks as the job root.
//!
//! Watch events are hints, not ops: the mirror's reconciler looks at the file and its block
//! index to decide which ops to emit, so a lost or merged event can cost time but never
//! correctness, as long as an overflow is reported as [`FsEvent::Rescan`].

pub mod event;
pub mod fuse;
pub mod vm;
pub mod watch;

pub use event::{EventSource, FsEvent};
pub use watch::{WatchBackend, open_watch};
