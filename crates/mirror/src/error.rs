//! Mirror errors.

use std::io;
use std::path::PathBuf;

/// Errors while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// Reading the source tree failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The op sink refused (the spool is closed: shutting down).
    #[error("cannot queue ops: {0}")]
    Sink(String),
    /// The spool is full: the caller records what is left as dirty instead.
    #[error("the spool is full")]
    Overflow,
    /// The capture does not vouch for a file (see `Guard::vouch`).
    #[error("{path}: {reason}")]
    Unvouched {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The comparison was abandoned (the replica it compared with is gone).
    #[error("comparison interrupted")]
    Interrupted,
    /// The index store failed while in use (an I/O error, or a damaged page).
    #[error("the index store failed: {0}")]
    Store(String),
    /// The index file is unreadable.
    #[error("index {path} is unreadable: {reason}")]
    Index {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}
