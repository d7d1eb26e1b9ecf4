//! # doppel-fs: the file-system layer
//!
//! All Linux-specific file-system work of doppel lives here, behind small functions, so that the
//! stages above it (capture, mirror, apply) read as data flow rather than system calls.
//!
//! - [`beneath`]: resolving replica paths strictly beneath a root, never through a symlink.
//! - [`meta`]: file metadata in doppel's terms (kind, mode, owner, times, identity).
//! - [`xattr`]: reading and writing extended attributes without following symlinks.
//! - [`hash`]: per-block BLAKE3 hashes of files.
//! - [`walk`]: deterministic, selection-aware tree walks.
//! - [`select`]: include/exclude rules with gitignore syntax.
//! - [`format`]: version stamps of the directories doppel keeps state in.
//! - [`handle`]: file handles, which open an inode wherever it was renamed to.
//! - [`lock`]: exclusive locks held for a process's life.

pub mod beneath;
pub mod format;
pub mod handle;
pub mod hash;
pub mod lock;
pub mod meta;
pub mod readahead;
pub mod select;
pub mod walk;
pub mod xattr;

pub use beneath::Beneath;
pub use meta::Meta;
pub use select::{Selection, SelectionError};
